//! Network namespaces for the sandbox and the root-only tests: `ip` commands with their
//! errors, and work done on a thread that has entered a namespace (a socket keeps the
//! namespace it was made in, so listeners and connections can be made from outside).

use std::{fs::File, path::PathBuf, process::Command};

use anyhow::{Context, bail};
use nix::sched::{CloneFlags, setns};

/// Whether this process may create namespaces (root). Outside CI it says loudly that
/// `test` skips; in CI, which runs as root, not being root fails the test.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root (network namespaces, iptables) and CI runs as root"
    );
    eprintln!("\n*** SKIPPING {test}: it needs root (network namespaces, iptables) ***\n");
    false
}

/// Runs `program args`, returning its stdout; an error carries its stderr.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS`.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args).map(drop)
}

/// `/run/netns/NAME`.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Whether the named namespace exists.
pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// Moves the calling thread into the named namespace (threads it creates later, and
/// processes it spawns, are born there).
pub fn enter(name: &str) -> anyhow::Result<()> {
    let file = File::open(path(name)).with_context(|| format!("opening netns {name}"))?;
    setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering netns {name}"))
}

/// Runs `f` on a fresh thread inside the named namespace and returns its result.
pub fn within<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let name = name.to_string();
    std::thread::spawn(move || {
        enter(&name)?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("a thread in netns panicked"))?
}

/// Binds a TCP listener inside the named namespace.
pub fn bind(name: &str, addr: std::net::SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let listener = within(name, move || std::net::TcpListener::bind(addr))?
        .with_context(|| format!("binding {addr} in netns {name}"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// `GET http://addr/path` from inside the named namespace.
pub fn get(name: &str, addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let path = path.to_string();
    within(name, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)?
            .block_on(async {
                tokio::time::timeout(
                    std::time::Duration::from_secs(3),
                    crate::http::get(addr, &path),
                )
                .await
                .map_err(|_| anyhow::anyhow!("{addr}: no answer within 3 s"))?
                .map_err(anyhow::Error::from)
            })
    })?
}

/// The processes inside the named namespace.
pub fn pids(name: &str) -> Vec<i32> {
    run("ip", &["netns", "pids", name])
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills every process inside the named namespace and deletes it; `false` if it did not
/// exist.
pub fn destroy(name: &str) -> anyhow::Result<bool> {
    if !exists(name) {
        return Ok(false);
    }
    let me = std::process::id() as i32;
    for pid in pids(name).into_iter().filter(|p| *p != me) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    ip(&["netns", "del", name])?;
    Ok(true)
}
