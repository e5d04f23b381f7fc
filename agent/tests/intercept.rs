//! Real interception in network namespaces this test creates (root only): a "node"
//! namespace runs the agent with `--iptables`, a "pod" namespace reaches it only through
//! the DNAT of 169.254.169.254:80, and a stand-in for the node's real metadata service
//! listens on 169.254.169.254:80 inside the node namespace, serving the node's role, so
//! that a leak would show. No namespace has a route out of the machine.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use podiam_tests::netns::root_or_skip;
use podiam_tests::{certs::Pki, process::Process};

const BIN: &str = env!("CARGO_BIN_EXE_podiam-agent");
const NODE_ROLE: &str = "NODE-ROLE-must-never-reach-a-pod";
static NEXT: AtomicU32 = AtomicU32::new(1);

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn output(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// A node namespace and a pod namespace joined by a veth pair; removed on drop.
struct Lab {
    node: String,
    pod: String,
    node_ip: String,
    node_ip6: String,
    node_veth: String,
    dir: tempfile::TempDir,
    pki: Pki,
    real_imds: Vec<Child>,
}

impl Lab {
    fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}{n}", std::process::id() % 10_000);
        let (node, pod) = (format!("pdm-node-{id}"), format!("pdm-pod-{id}"));
        let (vn, vp) = (format!("pdmc{id}"), format!("pdmp{id}"));
        let subnet = 100 + (std::process::id() % 100) + n;
        let (node_ip, pod_ip) = (format!("100.64.{subnet}.1"), format!("100.64.{subnet}.2"));
        sh(&["ip", "netns", "add", &node]);
        sh(&["ip", "netns", "add", &pod]);
        let (node_ip6, pod_ip6) = (
            format!("fd00:64:{subnet}::1"),
            format!("fd00:64:{subnet}::2"),
        );
        sh(&[
            "ip", "link", "add", &vn, "type", "veth", "peer", "name", &vp,
        ]);
        sh(&["ip", "link", "set", &vn, "netns", &node]);
        sh(&["ip", "link", "set", &vp, "netns", &pod]);
        sh(&[
            "ip",
            "-n",
            &node,
            "addr",
            "add",
            &format!("{node_ip}/24"),
            "dev",
            &vn,
        ]);
        sh(&[
            "ip",
            "-n",
            &pod,
            "addr",
            "add",
            &format!("{pod_ip}/24"),
            "dev",
            &vp,
        ]);
        for (ns, dev) in [
            (&node, &vn),
            (&pod, &vp),
            (&node, &"lo".to_string()),
            (&pod, &"lo".to_string()),
        ] {
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        // The pod's only routes beyond its link: the metadata and container-credentials
        // addresses, via its node; the node's own to the latter (a real node's default
        // route covers it).
        for dest in ["169.254.169.254/32", "169.254.170.23/32"] {
            sh(&["ip", "-n", &pod, "route", "add", dest, "via", &node_ip]);
        }
        sh(&[
            "ip",
            "-n",
            &node,
            "route",
            "add",
            "169.254.170.23/32",
            "dev",
            "lo",
        ]);
        // The same over IPv6 (no duplicate address detection: usable at once).
        for (ns, ip, dev) in [(&node, &node_ip6, &vn), (&pod, &pod_ip6, &vp)] {
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/64"),
                "dev",
                dev,
                "nodad",
            ]);
        }
        sh(&[
            "ip",
            "-n",
            &pod,
            "-6",
            "route",
            "add",
            "fd00:ec2::254/128",
            "via",
            &node_ip6,
        ]);
        sh(&[
            "ip",
            "-n",
            &node,
            "addr",
            "add",
            "fd00:ec2::254/128",
            "dev",
            "lo",
            "nodad",
        ]);
        // The node's own metadata service, as EC2 provides it.
        sh(&[
            "ip",
            "-n",
            &node,
            "addr",
            "add",
            "169.254.169.254/32",
            "dev",
            "lo",
        ]);
        let dir = tempfile::tempdir().unwrap();
        let creds = dir
            .path()
            .join("www/latest/meta-data/iam/security-credentials");
        std::fs::create_dir_all(&creds).unwrap();
        std::fs::write(creds.join("index.html"), NODE_ROLE).unwrap();
        let serve = |bind: &str| {
            Command::new("ip")
                .args(["netns", "exec", &node, "python3", "-m", "http.server", "80"])
                .args(["--bind", bind, "--directory"])
                .arg(dir.path().join("www"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        };
        let real_imds = vec![serve("169.254.169.254"), serve("fd00:ec2::254")];
        let pki = Pki::generate(dir.path(), "lab").unwrap();
        let lab = Self {
            node,
            pod,
            node_ip,
            node_ip6: node_ip6.clone(),
            node_veth: vn.clone(),
            dir,
            pki,
            real_imds,
        };
        // The real service answers before the test starts (its answer is the readiness signal).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(lab.pod_sees().contains(NODE_ROLE) && lab.pod_sees_v6().contains(NODE_ROLE)) {
            assert!(
                Instant::now() < deadline,
                "the stand-in metadata service did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        lab
    }

    /// What a pod gets for its role listing: the body, an HTTP status, or the error.
    fn pod_sees(&self) -> String {
        self.pod_gets("169.254.169.254")
    }

    /// The same from the IPv6 metadata address.
    fn pod_sees_v6(&self) -> String {
        self.pod_gets("[fd00:ec2::254]")
    }

    fn pod_gets(&self, host: &str) -> String {
        self.gets_in(
            &self.pod,
            &format!("http://{host}/latest/meta-data/iam/security-credentials/"),
        )
    }

    /// What a process in namespace `ns` gets for `url`: the body, an HTTP status, or the error.
    fn gets_in(&self, ns: &str, url: &str) -> String {
        let script = format!(
            "import urllib.request, urllib.error\n\
            try:\n    print(urllib.request.urlopen('{url}', timeout=3).read().decode())\n\
            except urllib.error.HTTPError as e:\n    print('HTTP', e.code, e.read().decode())\n\
            except Exception as e:\n    print('ERROR', e)\n"
        );
        output(&["ip", "netns", "exec", ns, "python3", "-c", &script])
    }

    /// The agent's readiness, as its admin server in the node namespace answers it.
    fn readyz(&self, agent: &Process) -> String {
        self.gets_in(&self.node, &format!("http://{}/readyz", agent.admin))
    }

    /// Once the agent's rules are verified, whether it finds every pod interface covered.
    fn interfaces_covered(&self, agent: &Process) -> bool {
        self.until("rules verified", |l| {
            !l.readyz(agent).contains("interception")
        });
        !self.readyz(agent).contains("pod-interfaces")
    }

    /// A metric of the agent in the node namespace (0 when absent).
    fn metric(&self, agent: &Process, name: &str) -> f64 {
        let text = self.gets_in(&self.node, &format!("http://{}/metrics", agent.admin));
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    fn filter(&self, chain: &str) -> String {
        self.filter_of("iptables-nft", chain)
    }

    fn filter_of(&self, iptables: &str, chain: &str) -> String {
        output(&[
            "ip", "netns", "exec", &self.node, iptables, "-t", "filter", "-S", chain,
        ])
    }

    fn agent(&self, extra: &[&str]) -> Process {
        let cmd = self.agent_command(extra);
        let agent = Process::spawn_announcing(cmd, &["metadata endpoint"]).unwrap();
        assert!(
            agent.wait_log("interception rules installed", Duration::from_secs(10))
                || agent.wait_log("\"interception configured\"", Duration::from_secs(1)),
            "{:?}",
            agent.logs()
        );
        agent
    }

    /// The agent's command in the node namespace; a flag in `extra` replaces its default.
    fn agent_command(&self, extra: &[&str]) -> Command {
        let dir = self.dir.path();
        let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
        let defaults: Vec<(&str, String)> = vec![
            ("--host-interface", "pdmc+".into()),
            ("--rules-interval", "200ms".into()),
            ("--listen", format!("{}:8181", self.node_ip)),
            ("--admin-addr", "127.0.0.1:0".into()),
            ("--log-format", "json".into()),
            ("--server-address", "127.0.0.1:9".into()),
            ("--metadata-addr", "127.0.0.1:9".into()),
            ("--token-key-file", path(&dir.join("imds.key"))),
            ("--token-file", path(&dir.join("none"))),
            ("--ca", path(&self.pki.ca)),
            ("--cert", path(&self.pki.client.cert)),
            ("--key", path(&self.pki.client.key)),
        ];
        let mut cmd = Command::new("ip");
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .args(["netns", "exec", &self.node, BIN, "--iptables"]);
        for (flag, value) in &defaults {
            if !extra.contains(flag) {
                cmd.args([*flag, value.as_str()]);
            }
        }
        cmd.args(extra);
        cmd
    }

    fn nat(&self, chain: &str) -> String {
        self.nat_of("iptables-nft", chain)
    }

    fn nat_of(&self, iptables: &str, chain: &str) -> String {
        output(&[
            "ip", "netns", "exec", &self.node, iptables, "-t", "nat", "-S", chain,
        ])
    }

    fn until(&self, what: &str, f: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f(self) {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.real_imds {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.node])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.pod])
            .status();
    }
}

#[test]
fn redirect_is_real_reasserted_and_fails_closed() {
    if !root_or_skip("redirect_is_real_reasserted_and_fails_closed") {
        return;
    }
    let lab = Lab::new();
    // Without podiam, the pod reaches the node's own metadata service: the leak podiam closes.
    assert!(lab.pod_sees().contains(NODE_ROLE));

    let agent = lab.agent(&[]);
    lab.until("the redirect", |l| !l.pod_sees().contains(NODE_ROLE));
    // The rules settle: five re-assertions later, nothing was installed again (a listing
    // that never matched would restore, and flush conntrack, every interval).
    std::thread::sleep(Duration::from_secs(1));
    let logs = agent.logs().join("\n");
    assert_eq!(
        logs.matches("interception rules installed").count(),
        1,
        "{logs}"
    );
    // A CNI's ACCEPT put ahead of ours: ours go back to the top.
    for chain in ["INPUT", "FORWARD"] {
        sh(&[
            "ip",
            "netns",
            "exec",
            &lab.node,
            "iptables-nft",
            "-I",
            chain,
            "1",
            "-j",
            "ACCEPT",
        ]);
    }
    lab.until("our jumps first again", |l| {
        ["INPUT", "FORWARD"].iter().all(|c| {
            l.filter(c)
                .lines()
                .find(|r| r.starts_with("-A "))
                .is_some_and(|r| r.contains("PODIAM"))
        })
    });
    // The agent answers (no server reachable here: 503, which SDKs retry).
    assert!(lab.pod_sees().contains("HTTP 503"), "{}", lab.pod_sees());
    assert!(
        lab.nat("PODIAM").contains("--to-destination"),
        "{}",
        lab.nat("PODIAM")
    );
    assert_eq!(lab.nat("PREROUTING").matches("-j PODIAM").count(), 1);

    // Someone flushes the chain: the agent restores it.
    sh(&[
        "ip",
        "netns",
        "exec",
        &lab.node,
        "iptables-nft",
        "-t",
        "nat",
        "-F",
        "PODIAM",
    ]);
    lab.until("the chain restored", |l| {
        l.nat("PODIAM").contains("--to-destination")
    });
    assert!(!lab.pod_sees().contains(NODE_ROLE));

    // The agent stops: the rules stay, and the pod gets a refused connection.
    agent.terminate(Duration::from_secs(10)).unwrap();
    assert!(
        lab.nat("PODIAM").contains("--to-destination"),
        "rules left in place"
    );
    let answer = lab.pod_sees();
    assert!(
        answer.contains("ERROR") && answer.contains("refused"),
        "{answer}"
    );
    assert!(!answer.contains(NODE_ROLE));

    // It comes back, without duplicating its rules.
    let again = lab.agent(&[]);
    lab.until("served again", |l| l.pod_sees().contains("HTTP 503"));
    assert_eq!(lab.nat("PREROUTING").matches("-j PODIAM").count(), 1);

    // Opt-in removal on exit.
    drop(again);
    let removing = lab.agent(&["--remove-rules-on-exit"]);
    removing.terminate(Duration::from_secs(10)).unwrap();
    assert!(
        !lab.nat("PREROUTING").contains("PODIAM"),
        "{}",
        lab.nat("PREROUTING")
    );
}

#[test]
fn connections_opened_before_the_redirect_are_cut_off() {
    if !root_or_skip("connections_opened_before_the_redirect_are_cut_off") {
        return;
    }
    use std::io::{BufRead, BufReader, Write};
    let lab = Lab::new();
    // Connection tracking is on, as on every real node (kube-proxy, the CNI): without a
    // user, a fresh namespace tracks nothing and there would be no entry to flush.
    sh(&[
        "ip",
        "netns",
        "exec",
        &lab.node,
        "iptables-nft",
        "-A",
        "INPUT",
        "-m",
        "conntrack",
        "--ctstate",
        "ESTABLISHED,RELATED",
        "-j",
        "ACCEPT",
    ]);
    // A pod holds a connection to the real metadata service, opened before the agent.
    let script = "import socket, sys\n\
        s = socket.create_connection(('169.254.169.254', 80), timeout=5)\n\
        print('connected', flush=True)\n\
        sys.stdin.readline()\n\
        try:\n    \
            s.sendall(b'GET /latest/meta-data/iam/security-credentials/ HTTP/1.0\\r\\n\\r\\n')\n    \
            print('answer', s.recv(4096))\n\
        except Exception as e:\n    \
            print('error', repr(e))\n";
    let mut pod = Command::new("ip")
        .args(["netns", "exec", &lab.pod, "python3", "-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(pod.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "connected");

    let _agent = lab.agent(&[]);
    // The agent flushed conntrack after installing: the old connection's next packet is
    // redirected like any new one, and the agent has no such connection: reset.
    writeln!(pod.stdin.take().unwrap()).unwrap();
    let mut answer = String::new();
    out.read_line(&mut answer).unwrap();
    let _ = pod.wait();
    assert!(!answer.contains(NODE_ROLE), "{answer}");
    assert!(
        answer.starts_with("error") || answer.contains("answer b''"),
        "{answer}"
    );
}

#[test]
fn ipv6_metadata_address_is_redirected_with_ipv6() {
    if !root_or_skip("ipv6_metadata_address_is_redirected_with_ipv6") {
        return;
    }
    let lab = Lab::new();
    // Nitro's IPv6 endpoint leaks the node's role just like the IPv4 one.
    assert!(lab.pod_sees_v6().contains(NODE_ROLE));
    // The node's default IPv6 route (towards the pod's link: nothing leaves the lab) names
    // the interface whose address the agent redirects to.
    sh(&[
        "ip",
        "-n",
        &lab.node,
        "-6",
        "route",
        "add",
        "default",
        "dev",
        &lab.node_veth,
    ]);

    let agent = lab.agent(&["--ipv6"]);
    assert!(
        agent.wait_log("IPv6 metadata endpoint listening", Duration::from_secs(5)),
        "{:?}",
        agent.logs()
    );
    lab.until("both redirects", |l| {
        !l.pod_sees_v6().contains(NODE_ROLE) && !l.pod_sees().contains(NODE_ROLE)
    });
    // The agent itself answers on both (503: no server in this lab).
    assert!(
        lab.pod_sees_v6().contains("HTTP 503"),
        "{}",
        lab.pod_sees_v6()
    );
    assert!(lab.pod_sees().contains("HTTP 503"), "{}", lab.pod_sees());
    let v6 = lab.nat_of("ip6tables-nft", "PODIAM");
    assert!(
        v6.contains("-d fd00:ec2::254/128") && v6.contains("--to-destination [fd00:64:"),
        "{v6}"
    );

    // Fail closed on IPv6 too.
    agent.terminate(Duration::from_secs(10)).unwrap();
    let answer = lab.pod_sees_v6();
    assert!(
        answer.contains("ERROR") && answer.contains("refused"),
        "{answer}"
    );
    // Leave no IPv6 rules behind in this namespace for the next run's agent.
    let removing = lab.agent(&["--ipv6", "--remove-rules-on-exit"]);
    removing.terminate(Duration::from_secs(10)).unwrap();
    assert!(!lab.nat_of("ip6tables-nft", "PREROUTING").contains("PODIAM"));
}

#[test]
fn ipv6_endpoint_is_refused_without_ipv6() {
    if !root_or_skip("ipv6_endpoint_is_refused_without_ipv6") {
        return;
    }
    let lab = Lab::new();
    assert!(lab.pod_sees_v6().contains(NODE_ROLE));
    let agent = lab.agent(&[]);
    // No IPv6 redirect, and no way around it either: the instance may have the IPv6
    // endpoint enabled.
    lab.until("the IPv6 endpoint refused", |l| {
        let v6 = l.pod_sees_v6();
        v6.contains("ERROR") && v6.contains("refused")
    });
    assert!(lab.pod_sees().contains("HTTP 503"), "{}", lab.pod_sees());
    assert!(
        lab.filter_of("ip6tables-nft", "PODIAM-BLOCK")
            .contains("-d fd00:ec2::254/128"),
        "{}",
        lab.filter_of("ip6tables-nft", "PODIAM-BLOCK")
    );
    // Counted, as packets the kernel refused.
    lab.until("the refusal counted", |l| {
        l.metric(
            &agent,
            "podiam_agent_refused_connections_total{reason=\"metadata_not_redirected\"}",
        ) >= 1.0
    });
    drop(agent);
    let removing = lab.agent(&["--remove-rules-on-exit"]);
    removing.terminate(Duration::from_secs(10)).unwrap();
    assert!(!lab.filter_of("ip6tables-nft", "INPUT").contains("PODIAM"));
    assert!(
        lab.pod_sees_v6().contains(NODE_ROLE),
        "removed on exit, as asked"
    );
}

#[test]
fn ipv4_is_redirected_whatever_the_family_of_listen() {
    if !root_or_skip("ipv4_is_redirected_whatever_the_family_of_listen") {
        return;
    }
    let lab = Lab::new();
    let listen = format!("[{}]:8181", lab.node_ip6);
    let agent = lab.agent(&["--listen", &listen]);
    assert!(
        agent.wait_log("IPv4 metadata endpoint listening", Duration::from_secs(5)),
        "{:?}",
        agent.logs()
    );
    lab.until("both redirected", |l| {
        l.pod_sees().contains("HTTP 503") && l.pod_sees_v6().contains("HTTP 503")
    });
    assert!(
        lab.nat("PODIAM")
            .contains(&format!("--to-destination {}:8181", lab.node_ip)),
        "{}",
        lab.nat("PODIAM")
    );
    drop(agent);
}

#[test]
fn rules_go_in_before_anything_that_can_fail() {
    if !root_or_skip("rules_go_in_before_anything_that_can_fail") {
        return;
    }
    let lab = Lab::new();
    // A misconfigured agent: its TLS files are missing. It exits, and leaves pods with
    // refused connections, never with the node's role.
    let out = lab
        .agent_command(&["--ca", "/nonexistent/ca.pem"])
        .output()
        .unwrap();
    let stderr =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("/nonexistent/ca.pem"), "{stderr}");
    for answer in [lab.pod_sees(), lab.pod_sees_v6()] {
        assert!(
            answer.contains("ERROR") && answer.contains("refused"),
            "{answer}"
        );
        assert!(!answer.contains(NODE_ROLE));
    }
}

#[test]
fn only_redirected_pod_traffic_reaches_the_agent() {
    if !root_or_skip("only_redirected_pod_traffic_reaches_the_agent") {
        return;
    }
    let lab = Lab::new();
    let agent = lab.agent(&[]);
    lab.until("the redirect", |l| l.pod_sees().contains("HTTP 503"));
    let direct = format!(
        "http://{}:8181/latest/meta-data/iam/security-credentials/",
        lab.node_ip
    );
    // Another host (here: the node itself) dialling $HOST_IP:8181, and a pod dialling it
    // without the metadata address: both reset by the kernel.
    for (who, ns) in [("the node", &lab.node), ("a pod", &lab.pod)] {
        let answer = lab.gets_in(ns, &direct);
        assert!(
            answer.contains("ERROR") && (answer.contains("refused") || answer.contains("reset")),
            "{who}: {answer}"
        );
    }
    lab.until("the refusals counted", |l| {
        l.metric(
            &agent,
            "podiam_agent_refused_connections_total{reason=\"not_redirected\"}",
        ) >= 2.0
    });
    // The redirected path still works.
    assert!(lab.pod_sees().contains("HTTP 503"), "{}", lab.pod_sees());
    assert_eq!(lab.filter("INPUT").matches("-j PODIAM-GUARD").count(), 1);
    drop(agent);
}

#[test]
fn the_container_credentials_address_is_redirected_guarded_and_fails_closed_alike() {
    let test = "the_container_credentials_address_is_redirected_guarded_and_fails_closed_alike";
    if !root_or_skip(test) {
        return;
    }
    let lab = Lab::new();
    let url = "http://169.254.170.23/v1/credentials";
    // Without the agent, nothing is there.
    assert!(lab.gets_in(&lab.pod, url).contains("ERROR"));
    let agent = lab.agent(&["--pod-identity"]);
    // The agent answers itself for a request without a token (JSON, as SDKs want it), from
    // a pod and from the node (host-network pods).
    lab.until("the redirect", |l| {
        l.gets_in(&l.pod, url).contains("HTTP 400")
    });
    let answer = lab.gets_in(&lab.pod, url);
    assert!(answer.contains(r#""code":"InvalidToken""#), "{answer}");
    let from_node = lab.gets_in(&lab.node, url);
    assert!(from_node.contains("HTTP 400"), "{from_node}");
    // The node's own metadata traffic is not redirected by that rule.
    assert!(
        lab.gets_in(
            &lab.node,
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
        )
        .contains(NODE_ROLE)
    );
    // Its listener takes only redirected connections.
    let direct = lab.gets_in(
        &lab.pod,
        &format!("http://{}:8182/v1/credentials", lab.node_ip),
    );
    assert!(direct.contains("ERROR"), "{direct}");
    // The rules settle: no chain restored and no jump moved after the first install.
    std::thread::sleep(Duration::from_secs(1));
    let logs = agent.logs().join("\n");
    assert!(
        !logs.contains("restoring a chain that changed") && !logs.contains("moved back to the top"),
        "{logs}"
    );
    // The agent stops: the redirect stays, and the pod gets a refused connection.
    agent.terminate(Duration::from_secs(10)).unwrap();
    let after = lab.gets_in(&lab.pod, url);
    assert!(
        after.contains("ERROR") && after.contains("refused"),
        "{after}"
    );
}

#[test]
fn uncovered_pod_interfaces_keep_the_agent_not_ready() {
    if !root_or_skip("uncovered_pod_interfaces_keep_the_agent_not_ready") {
        return;
    }
    let lab = Lab::new();
    // A veth that --host-interface (pdmc+) does not cover: a pod behind it would not be
    // redirected.
    let stray = format!("pdmx{}", &lab.node_veth[4..]);
    let peer = format!("pdmy{}", &lab.node_veth[4..]);
    sh(&[
        "ip", "-n", &lab.node, "link", "add", &stray, "type", "veth", "peer", "name", &peer,
    ]);
    let agent = lab.agent(&[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.readyz(&agent).contains("pod-interfaces") {
        assert!(
            Instant::now() < deadline,
            "not ready for the stray veth: {} {:?}",
            lab.readyz(&agent),
            agent.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(lab.metric(&agent, "podiam_agent_uncovered_interfaces"), 2.0);
    assert!(
        agent.wait_log(&stray, Duration::from_secs(5)),
        "the interface is named in the log: {:?}",
        agent.logs()
    );
    // It goes away: ready.
    sh(&["ip", "-n", &lab.node, "link", "del", &stray]);
    lab.until("ready", |l| !l.readyz(&agent).contains("pod-interfaces"));
    assert_eq!(lab.metric(&agent, "podiam_agent_uncovered_interfaces"), 0.0);
    drop(agent);
    // Or the operator says it is no pod's.
    sh(&[
        "ip", "-n", &lab.node, "link", "add", &stray, "type", "veth", "peer", "name", &peer,
    ]);
    let ignoring = lab.agent(&[
        "--ignore-interface",
        "pdmx+,pdmy+",
        "--remove-rules-on-exit",
    ]);
    assert!(
        lab.interfaces_covered(&ignoring),
        "{}",
        lab.readyz(&ignoring)
    );
    ignoring.terminate(Duration::from_secs(10)).unwrap();
    // On a bridge, routed traffic enters as the bridge: the veth's own name does not
    // cover it, the bridge's does.
    let bridge = format!("pdmb{}", &lab.node_veth[4..]);
    sh(&[
        "ip", "-n", &lab.node, "link", "add", &bridge, "type", "bridge",
    ]);
    sh(&[
        "ip", "-n", &lab.node, "link", "set", &stray, "master", &bridge,
    ]);
    let by_name = lab.agent(&[
        "--host-interface",
        "pdmc+,pdmx+",
        "--ignore-interface",
        "pdmy+",
    ]);
    lab.until("not ready: the bridge is not covered", |l| {
        l.readyz(&by_name).contains("pod-interfaces")
    });
    drop(by_name);
    let by_bridge = lab.agent(&[
        "--host-interface",
        "pdmc+,pdmb+",
        "--ignore-interface",
        "pdmy+",
        "--remove-rules-on-exit",
    ]);
    assert!(
        lab.interfaces_covered(&by_bridge),
        "{}",
        lab.readyz(&by_bridge)
    );
    by_bridge.terminate(Duration::from_secs(10)).unwrap();
}

#[test]
fn bad_interception_flags_fail_clearly() {
    if !root_or_skip("bad_interception_flags_fail_clearly") {
        return;
    }
    // In a namespace of its own: the block goes in before the listen address is checked.
    let ns = format!("pdm-flags-{}", std::process::id());
    sh(&["ip", "netns", "add", &ns]);
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _cleanup = Cleanup(ns.clone());
    let run = |args: &[&str]| {
        let out = Command::new("ip")
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .args(["netns", "exec", &ns, BIN])
            .args([
                "--listen",
                "192.0.2.1:8181",
                "--server-address",
                "127.0.0.1:9",
                "--iptables",
            ])
            .arg("--token-key-file")
            .arg(Path::new("/tmp").join(format!("podiam-test-{}.key", std::process::id())))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--host-interface", "ca+li"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("invalid --host-interface"), "{err}");
    let (code, err) = run(&["--host-interface", "cali+"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("is not an address of this node"), "{err}");
    // Even so, pods' metadata traffic is refused from then on.
    let block = output(&[
        "ip",
        "netns",
        "exec",
        &ns,
        "iptables-nft",
        "-S",
        "PODIAM-BLOCK",
    ]);
    assert!(block.contains("REJECT"), "{block}");
    let (code, err) = run(&["--host-interface", "cali+", "--listen-v6", "[::1]:8181"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--ipv6"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Without --iptables something must say which callers are pods.
    let out = Command::new(BIN)
        .env_clear()
        .args(["--listen", "127.0.0.1:0", "--server-address", "127.0.0.1:9"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("--pod-sources"), "{err}");
}
