//! Running podiam binaries as child processes in tests and benchmarks: the admin address
//! is read from the process's own log line, its stderr is drained so it never blocks, and
//! its memory is read from `/proc`.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;

use nix::{sys::signal, unistd::Pid};

/// A running server or agent; killed when dropped.
#[derive(Debug)]
pub struct Process {
    child: Child,
    /// The admin server's address, as the process announced it.
    pub admin: SocketAddr,
    addrs: HashMap<String, SocketAddr>,
    logs: Arc<Mutex<Vec<String>>>,
    /// Whether its JSON log lines are checked strictly when it is dropped (in tests).
    strict: bool,
}

impl Process {
    /// Spawns `cmd`, which must log JSON (`--log-format json`) and bind its admin server
    /// (`--admin-addr 127.0.0.1:0`), and waits for its `admin server listening` line.
    pub fn spawn(cmd: Command) -> std::io::Result<Self> {
        Self::spawn_announcing(cmd, &[])
    }

    /// Like [`Process::spawn`], and also waits for each `"<what> listening"` line of
    /// `others` (e.g. `"agent API"`), whose addresses [`Process::addr`] then returns.
    pub fn spawn_announcing(cmd: Command, others: &[&str]) -> std::io::Result<Self> {
        Self::spawn_inner(cmd, others, None).map(|mut p| {
            p.strict = true;
            p
        })
    }

    /// Like [`Process::spawn_announcing`], and also appends every log line to `log`.
    pub fn spawn_logged(cmd: Command, others: &[&str], log: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        Self::spawn_inner(cmd, others, Some(file))
    }

    fn spawn_inner(
        mut cmd: Command,
        others: &[&str],
        mut file: Option<std::fs::File>,
    ) -> std::io::Result<Self> {
        let mut child = cmd.stderr(Stdio::piped()).spawn()?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| std::io::Error::other("no stderr"))?;
        let mut lines = BufReader::new(stderr).lines();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let mut addrs = HashMap::new();
        let wanted: Vec<String> = std::iter::once("admin server")
            .chain(others.iter().copied())
            .map(|w| format!("{w} listening"))
            .collect();
        while !wanted.iter().all(|w| addrs.contains_key(w)) {
            let Some(line) = lines.next() else {
                let status = child.wait()?;
                return Err(std::io::Error::other(format!(
                    "process exited ({status}) before announcing {wanted:?}"
                )));
            };
            let line = line?;
            if let Some(file) = &mut file {
                writeln!(file, "{line}")?;
            }
            logs.lock().push(line.clone());
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            let message = v["message"].as_str().unwrap_or_default();
            if wanted.iter().any(|w| w == message)
                && let Some(addr) = v["addr"].as_str().and_then(|a| a.parse().ok())
            {
                addrs.insert(message.to_string(), addr);
            } else if v.is_null() {
                // Not JSON: show it, it may explain a failure.
                eprintln!("{line}");
            }
        }
        let admin = addrs["admin server listening"];
        // Keep draining (and keeping) the log so the process never blocks on a full pipe.
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Some(file) = &mut file {
                    let _ = writeln!(file, "{line}");
                }
                sink.lock().push(line);
            }
        });
        Ok(Self {
            child,
            admin,
            addrs,
            logs,
            strict: false,
        })
    }

    /// The address announced as `"<what> listening"`.
    pub fn addr(&self, what: &str) -> Option<SocketAddr> {
        self.addrs.get(&format!("{what} listening")).copied()
    }

    /// The log lines so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().clone()
    }

    /// Waits until a log line contains `needle` (for processes whose admin port the test
    /// cannot reach, their log is their signal); `false` after `timeout`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.logs.lock().iter().any(|l| l.contains(needle)) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory now (VmRSS), in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        proc_status_kib(self.pid(), "VmRSS:")
    }

    /// Peak resident memory (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        proc_status_kib(self.pid(), "VmHWM:")
    }

    /// User plus system CPU time used so far.
    pub fn cpu_time(&self) -> Option<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        // Fields after the command name, which is in parentheses and may contain spaces.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
        Some(Duration::from_secs_f64(ticks as f64 / hz as f64))
    }

    /// Sends SIGTERM and waits for the exit, up to `timeout` (then kills).
    pub fn terminate(mut self, timeout: Duration) -> std::io::Result<ExitStatus> {
        self.stop(timeout)
    }

    /// Like [`Process::terminate`], keeping the handle (its logs stay readable).
    pub fn stop(&mut self, timeout: Duration) -> std::io::Result<ExitStatus> {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).map_err(std::io::Error::other)?);
        signal::kill(pid, signal::Signal::SIGTERM).map_err(std::io::Error::other)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.child.kill()?;
                return Err(std::io::Error::other("did not exit after SIGTERM"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Process {
    /// Kills the process; in tests, also fails on any JSON log line with a key twice.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.strict && !std::thread::panicking() {
            for line in self.logs.lock().iter().filter(|l| l.starts_with('{')) {
                if let Err(error) = crate::strict_json::check(line) {
                    panic!("a log line that log shippers would mangle ({error}): {line}");
                }
            }
        }
    }
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
