//! End-to-end, through `podiam-sandbox` (root only): real SDK clients in pod namespaces,
//! the real agent's DNAT with `--require-imdsv2`, the real server, moto as STS, and a
//! stand-in for each node's metadata service that hands out the node's own role (named
//! `sandbox-node-*`, so any leak shows in an answer). Outside CI without root these
//! tests say loudly that they skip; in CI (as root) a missing piece fails them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use podiam_tests::netns::root_or_skip;
use podiam_tests::sandbox::State;

const BIN: &str = env!("CARGO_BIN_EXE_podiam-sandbox");
/// The AWS SDK for Rust's default chain, as a pod's process.
const SDK_IDENTITY: &str = env!("CARGO_BIN_EXE_podiam-sdk-identity");
const NODE_ROLE: &str = "sandbox-node-";
static NEXT: AtomicU32 = AtomicU32::new(1);

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sandbox.yaml")
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// A sandbox of its own (own name, own namespaces); `down` when dropped.
struct Sandbox {
    name: String,
    /// What `up` printed.
    up: String,
}

impl Sandbox {
    fn up(file: &Path) -> Self {
        Self::up_with(file, &[])
    }

    fn up_with(file: &Path, extra: &[&str]) -> Self {
        let name = format!(
            "t{}-{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let out = Command::new(BIN)
            .args(["--name", &name, "up"])
            .arg(file)
            .args(extra)
            .output()
            .unwrap();
        let sandbox = Self {
            name,
            up: text(&out),
        };
        assert!(out.status.success(), "up failed:\n{}", sandbox.up);
        sandbox
    }

    /// The line `up` printed for `pod` (what its `aws sts get-caller-identity` returned).
    fn up_line(&self, pod: &str) -> String {
        self.up
            .lines()
            .find(|l| l.trim_start().starts_with(pod))
            .unwrap_or_else(|| panic!("{pod} missing from:\n{}", self.up))
            .to_string()
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(["--name", &self.name])
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        text(&out)
    }

    /// Runs a command as `pod`.
    fn exec(&self, pod: &str, command: &[&str]) -> Output {
        let mut args = vec!["exec", pod, "--"];
        args.extend_from_slice(command);
        self.cli(&args)
    }

    /// The ARN boto3 (default credential chain) sees in `pod`, and the provider it used,
    /// or the error.
    fn boto3(&self, pod: &str) -> String {
        let script = "import boto3\n\
            s = boto3.Session()\n\
            c = s.get_credentials()\n\
            print('provider', c.method if c else None)\n\
            print('arn', s.client('sts').get_caller_identity()['Arn'] if c else None)\n";
        text(&self.exec(pod, &["python3", "-c", script]))
    }

    /// The ARN the AWS CLI prints in `pod`, or its error.
    fn cli_identity(&self, pod: &str) -> String {
        text(&self.exec(
            pod,
            &[
                "aws",
                "sts",
                "get-caller-identity",
                "--query",
                "Arn",
                "--output",
                "text",
            ],
        ))
    }

    /// Raw metadata requests from `pod`: (status or error) of IMDSv1, then the IMDSv2
    /// role listing and the credentials of the first role listed.
    fn raw(&self, pod: &str) -> String {
        text(&self.exec(pod, &["python3", "-c", RAW]))
    }

    /// Applies a pod `NAMESPACE/NAME` with `role` on `node` at `ip`.
    fn apply_pod(&self, pod: &str, role: &str, node: &str, ip: &str) {
        let (namespace, name) = pod.split_once('/').unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pod.yaml");
        std::fs::write(
            &file,
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  \
                 annotations:\n    iam.amazonaws.com/role: {role}\n\
                 spec:\n  nodeName: {node}\nstatus:\n  podIP: {ip}\n"
            ),
        )
        .unwrap();
        self.ok(&["apply", file.to_str().unwrap()]);
    }

    fn state(&self) -> State {
        State::load(&self.name).unwrap()
    }

    /// A metric of the agent of `node` (the line's value, or 0).
    fn agent_metric(&self, node: &str, line: &str) -> f64 {
        let state = self.state();
        let node = state.nodes.iter().find(|n| n.name == node).unwrap();
        let admin = format!("{}:{}", node.ip, podiam_tests::sandbox::AGENT_ADMIN_PORT);
        let (_, text) =
            podiam_tests::netns::get(&node.netns, admin.parse().unwrap(), "/metrics").unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(line)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }
}

const MOVED: &str = r#"podiam_agent_table_lookups_total{result="moved"}"#;

const RAW: &str = r#"
import urllib.request, urllib.error
def req(path, method="GET", headers={}):
    r = urllib.request.Request("http://169.254.169.254" + path, method=method, headers=headers)
    try:
        with urllib.request.urlopen(r, timeout=3) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except Exception as e:
        return "error", repr(e)
print("v1", req("/latest/meta-data/iam/security-credentials/"))
status, token = req("/latest/api/token", "PUT", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
print("token", status)
h = {"X-aws-ec2-metadata-token": token}
status, roles = req("/latest/meta-data/iam/security-credentials/", headers=h)
print("roles", status, roles)
if status == 200:
    print("creds", req("/latest/meta-data/iam/security-credentials/" + roles.strip(), headers=h))
"#;

impl Drop for Sandbox {
    fn drop(&mut self) {
        let out = self.cli(&["down"]);
        if !out.status.success() && !std::thread::panicking() {
            panic!("down failed: {}", text(&out));
        }
    }
}

#[test]
fn sdk_clients_in_pods_get_their_own_role_and_nothing_else() {
    if !root_or_skip("sdk_clients_in_pods_get_their_own_role_and_nothing_else") {
        return;
    }
    let sb = Sandbox::up(&example());
    // `up` shows every pod's identity: the two permitted pods their roles, the others none.
    let line = |pod: &str| sb.up_line(pod);
    assert!(
        line("payments/api").contains("assumed-role/payments-api/"),
        "{}",
        sb.up
    );
    assert!(
        line("analytics/etl").contains("assumed-role/analytics-etl-nightly/"),
        "{}",
        sb.up
    );
    assert!(
        line("payments/rogue").contains("no credentials"),
        "{}",
        sb.up
    );
    assert!(
        line("analytics/notebook").contains("no credentials"),
        "{}",
        sb.up
    );
    assert!(!sb.up.contains(NODE_ROLE), "{}", sb.up);

    // boto3's default chain finds the metadata service through the DNAT (IMDSv2).
    let api = sb.boto3("payments/api");
    assert!(api.contains("provider iam-role"), "{api}");
    assert!(
        api.contains("assumed-role/payments-api/payments.api"),
        "{api}"
    );
    // The AWS CLI too.
    let etl = sb.cli_identity("analytics/etl");
    assert!(etl.contains("assumed-role/analytics-etl-nightly/"), "{etl}");

    // IMDSv1 is refused (--require-imdsv2); v2 lists the pod's own role only.
    let raw = sb.raw("payments/api");
    assert!(raw.contains("v1 (401"), "{raw}");
    assert!(raw.contains("roles 200 payments-api"), "{raw}");
    assert!(raw.contains("AccessKeyId"), "{raw}");

    // The forbidden and the unannotated pods: no credentials from any client.
    for pod in ["payments/rogue", "analytics/notebook"] {
        let boto = sb.boto3(pod);
        assert!(boto.contains("provider None"), "{pod}: {boto}");
        let cli = sb.cli_identity(pod);
        assert!(cli.contains("Unable to locate credentials"), "{pod}: {cli}");
        let raw = sb.raw(pod);
        assert!(
            !raw.contains("AccessKeyId") && !raw.contains("roles 200"),
            "{pod}: {raw}"
        );
        assert!(!(boto + &cli + &raw).contains(NODE_ROLE), "{pod}");
    }
}

#[test]
fn an_agent_on_one_node_gets_nothing_for_a_pod_on_another() {
    if !root_or_skip("an_agent_on_one_node_gets_nothing_for_a_pod_on_another") {
        return;
    }
    let sb = Sandbox::up(&example());
    let state = sb.state();
    let etl = state.pod("analytics/etl").unwrap().clone();
    let node_a = state.node("node-a").unwrap().clone();
    assert_ne!(etl.node, node_a.name);
    let ip = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // A process on node-a that dials the agent directly is no pod: the kernel resets it.
    let direct = format!(
        "import urllib.request\n\
        try:\n    urllib.request.urlopen('http://{}:8181/latest/meta-data/iam/security-credentials/', timeout=3)\n    print('answered')\n\
        except Exception as e:\n    print('error', e)\n",
        node_a.ip
    );
    let out = Command::new("ip")
        .args(["netns", "exec", &node_a.netns, "python3", "-c", &direct])
        .output()
        .unwrap();
    assert!(text(&out).contains("error"), "{}", text(&out));
    // A pod on node-a borrows the address of a pod of node-b and asks through the redirect.
    let notebook = state.pod("analytics/notebook").unwrap().clone();
    assert_eq!(notebook.node, node_a.name);
    let pod_ns = notebook.netns.clone().unwrap();
    ip(&[
        "-n",
        &pod_ns,
        "addr",
        "add",
        &format!("{}/32", etl.ip),
        "dev",
        "lo",
    ]);
    // Node-a routes the borrowed address back to that pod's veth (as a CNI would for a
    // pod that really had it), so replies reach it.
    let route = ip(&["-n", &node_a.netns, "route", "get", &notebook.ip]);
    let veth = route
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .unwrap()
        .to_string();
    ip(&[
        "-n",
        &node_a.netns,
        "route",
        "add",
        &format!("{}/32", etl.ip),
        "dev",
        &veth,
    ]);
    let script = format!(
        "import http.client\n\
        def req(method, path, headers):\n    \
            c = http.client.HTTPConnection('169.254.169.254', 80, timeout=5, source_address=('{src}', 0))\n    \
            c.request(method, path, headers=headers)\n    \
            r = c.getresponse()\n    \
            return r.status, r.read().decode()\n\
        s, t = req('PUT', '/latest/api/token', {{'X-aws-ec2-metadata-token-ttl-seconds': '60'}})\n\
        print('token', s)\n\
        print('creds', req('GET', '/latest/meta-data/iam/security-credentials/analytics-etl-nightly', {{'X-aws-ec2-metadata-token': t}}))\n",
        src = etl.ip
    );
    let out = Command::new("ip")
        .args(["netns", "exec", &pod_ns, "python3", "-c", &script])
        .output()
        .unwrap();
    let answer = text(&out);
    assert!(answer.contains("token 200"), "{answer}");
    assert!(!answer.contains("AccessKeyId"), "{answer}");
    assert!(answer.contains("creds (4"), "refused with a 4xx: {answer}");
    // The server refused it for the node, and said so.
    let log = std::fs::read_to_string(podiam_tests::sandbox::dir(&sb.name).join("logs/server.log"))
        .unwrap();
    assert!(log.contains("node_mismatch"), "{log}");
    // The pod itself, on its own node, still gets its role.
    let own = sb.cli_identity("analytics/etl");
    assert!(own.contains("assumed-role/analytics-etl-nightly/"), "{own}");
}

#[test]
fn a_stopped_agent_means_refused_connections_and_a_restarted_one_serves() {
    if !root_or_skip("a_stopped_agent_means_refused_connections_and_a_restarted_one_serves") {
        return;
    }
    let sb = Sandbox::up(&example());
    sb.ok(&["agent", "stop", "node-a"]);
    assert!(sb.ok(&["status"]).contains("podiam-agent stopped"));
    let raw = sb.raw("payments/api");
    assert!(
        raw.contains("v1 ('error'") && raw.contains("refused"),
        "{raw}"
    );
    let cli = sb.cli_identity("payments/api");
    assert!(!cli.contains("assumed-role"), "{cli}");
    let boto = sb.boto3("payments/api");
    assert!(boto.contains("provider None"), "{boto}");
    assert!(!(raw + &cli + &boto).contains(NODE_ROLE));
    // Pods of the other node are unaffected.
    assert!(
        sb.cli_identity("analytics/etl")
            .contains("analytics-etl-nightly")
    );

    sb.ok(&["agent", "start", "node-a"]);
    let cli = sb.cli_identity("payments/api");
    assert!(cli.contains("assumed-role/payments-api/"), "{cli}");
}

#[test]
fn a_new_pod_on_a_reused_ip_gets_only_its_own_role() {
    if !root_or_skip("a_new_pod_on_a_reused_ip_gets_only_its_own_role") {
        return;
    }
    let sb = Sandbox::up(&example());
    let old = sb.state().pod("payments/api").unwrap().clone();
    assert!(sb.cli_identity("payments/api").contains("payments-api"));

    sb.ok(&["delete", "payments/api"]);
    sb.apply_pod("payments/reports", "payments-reports", &old.node, &old.ip);
    let new = sb.state().pod("payments/reports").unwrap().clone();
    assert_eq!(new.ip, old.ip, "the new pod has the old pod's IP");

    let cli = sb.cli_identity("payments/reports");
    assert!(cli.contains("assumed-role/payments-reports/"), "{cli}");
    let raw = sb.raw("payments/reports");
    assert!(raw.contains("roles 200 payments-reports"), "{raw}");
    assert!(!raw.contains("payments-api"), "{raw}");
    // The old pod is gone from the sandbox with its namespace.
    let status = sb.ok(&["status"]);
    assert!(!status.contains("payments/api "), "{status}");
}

fn hostile() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hostile.yaml")
}

#[test]
fn hostile_pods_get_nothing_that_is_not_their_own() {
    if !root_or_skip("hostile_pods_get_nothing_that_is_not_their_own") {
        return;
    }
    let sb = Sandbox::up(&example());
    // The hints printed after `up --name X` work as printed.
    assert!(
        sb.up.contains(&format!("--name {} explain", sb.name)),
        "{}",
        sb.up
    );
    // `explain` against the sandbox, with its exit status.
    let allowed = sb.cli(&["explain", "payments/api"]);
    assert_eq!(allowed.status.code(), Some(0), "{}", text(&allowed));
    assert!(
        text(&allowed).contains("decision:   allowed"),
        "{}",
        text(&allowed)
    );
    let denied = sb.cli(&["explain", "payments/rogue", "--", "-o", "json"]);
    assert_eq!(denied.status.code(), Some(1), "{}", text(&denied));
    assert!(
        text(&denied).contains("role_not_permitted"),
        "{}",
        text(&denied)
    );
    // `status | head -1`: the reader goes away early, and nothing panics.
    let mut status = Command::new(BIN)
        .args(["--name", &sb.name, "status"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(status.stdout.take());
    let out = status.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("panicked"), "{}", text(&out));

    sb.ok(&["apply", hostile().to_str().unwrap()]);
    for pod in ["escape/breakout", "payments/static-mirror"] {
        let out = sb.cli(&["explain", pod, "--", "-o", "json"]);
        assert_eq!(out.status.code(), Some(1), "{pod}: {}", text(&out));
    }
    assert!(text(&sb.cli(&["explain", "payments/static-mirror"])).contains("mirror_pod"));
    // An escaped `permitted` regex permits nothing, least of all another account's role.
    for pod in ["escape/breakout", "payments/static-mirror"] {
        let cli = sb.cli_identity(pod);
        assert!(!cli.contains("assumed-role"), "{pod}: {cli}");
        let raw = sb.raw(pod);
        assert!(raw.contains("roles 403"), "{pod}: {raw}");
        // The pod is told what to do, and nothing of the policy.
        assert!(
            !raw.contains("permitted") && !raw.contains("999999999999"),
            "{raw}"
        );
        assert!(!(cli + &raw).contains(NODE_ROLE));
    }
    // A session name from another namespace is prefixed with the pod's own.
    let cli = sb.cli_identity("payments/impostor");
    assert!(
        cli.contains("assumed-role/payments-batch/payments.kube-system.cluster-autoscaler"),
        "{cli}"
    );
}

#[test]
fn a_pod_deleted_while_the_api_server_is_away_leaves_nothing_to_its_ip() {
    if !root_or_skip("a_pod_deleted_while_the_api_server_is_away_leaves_nothing_to_its_ip") {
        return;
    }
    let sb = Sandbox::up(&example());
    let old = sb.state().pod("payments/api").unwrap().clone();
    assert!(sb.cli_identity("payments/api").contains("payments-api"));
    sb.ok(&["api", "stop"]);
    sb.ok(&["delete", "payments/api"]);
    // The server notices that its view is stale (5 s in the sandbox): not ready.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let status = sb.ok(&["status"]);
        let server = status
            .lines()
            .find(|l| l.contains("podiam-server"))
            .unwrap_or_default();
        // Every watch goes stale; the pod watch's is the one that matters here.
        if server.contains("not ready") && server.contains("pods") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // Another namespace's pod takes the IP: it gets nothing, least of all the old role.
    // The agent's table still names the old pod (no server has said it is gone), but the
    // IP now lives behind a new veth: refused on the node.
    sb.apply_pod("analytics/next", "analytics-reader", &old.node, &old.ip);
    let raw = sb.raw("analytics/next");
    assert!(raw.contains("roles 503"), "{raw}");
    assert!(sb.agent_metric(&old.node, MOVED) > 0.0);
    assert!(
        !raw.contains("payments-api") && !raw.contains(NODE_ROLE),
        "{raw}"
    );
    // The API server is back: a fresh list, and the new pod's own role.
    sb.ok(&["api", "start"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let cli = sb.cli_identity("analytics/next");
        if cli.contains("assumed-role/analytics-reader/") {
            break;
        }
        assert!(!cli.contains("payments-api"), "{cli}");
        assert!(std::time::Instant::now() < deadline, "{cli}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

#[test]
fn through_a_server_outage_known_pods_keep_their_credentials_and_nothing_else() {
    if !root_or_skip("through_a_server_outage_known_pods_keep_their_credentials_and_nothing_else") {
        return;
    }
    let sb = Sandbox::up(&example());
    let old = sb.state().pod("payments/api").unwrap().clone();
    assert!(sb.cli_identity("payments/api").contains("payments-api"));
    assert!(
        sb.cli_identity("analytics/etl")
            .contains("analytics-etl-nightly")
    );
    // Load from a known pod across the whole outage.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (name, stop) = (sb.name.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                let out = Command::new(BIN)
                    .args([
                        "--name",
                        &name,
                        "exec",
                        "analytics/etl",
                        "--",
                        "python3",
                        "-c",
                        RAW,
                    ])
                    .output()
                    .unwrap();
                let raw = text(&out);
                if raw.contains("creds (200") && raw.contains("analytics-etl-nightly") {
                    ok += 1;
                } else {
                    failed.push(raw);
                }
            }
            (ok, failed)
        })
    };

    sb.ok(&["server", "stop"]);
    assert!(sb.ok(&["status"]).contains("podiam-server stopped"));
    // Known pods keep their credentials, through their real SDKs.
    let cli = sb.cli_identity("payments/api");
    assert!(cli.contains("assumed-role/payments-api/"), "{cli}");
    // A pod no server has told the agent of: 503, which SDKs retry.
    let fresh_ip = format!("{}.200", old.ip.rsplit_once('.').unwrap().0);
    sb.apply_pod("payments/fresh", "payments-fresh", &old.node, &fresh_ip);
    let raw = sb.raw("payments/fresh");
    assert!(raw.contains("roles 503"), "{raw}");
    // A new pod on a reused IP during the outage: refused on the node, by its interface.
    sb.ok(&["delete", "payments/api"]);
    let moved = sb.agent_metric(&old.node, MOVED);
    sb.apply_pod("payments/reports", "payments-reports", &old.node, &old.ip);
    let raw = sb.raw("payments/reports");
    assert!(raw.contains("roles 503"), "{raw}");
    assert!(
        !raw.contains("payments-api") && !raw.contains(NODE_ROLE),
        "{raw}"
    );
    assert!(sb.agent_metric(&old.node, MOVED) > moved);

    sb.ok(&["server", "start"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let cli = sb.cli_identity("payments/reports");
        if cli.contains("assumed-role/payments-reports/") {
            break;
        }
        assert!(!cli.contains("payments-api"), "{cli}");
        assert!(std::time::Instant::now() < deadline, "{cli}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert!(
        sb.cli_identity("payments/fresh")
            .contains("assumed-role/payments-fresh/")
    );
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = load.join().unwrap();
    assert!(ok > 3, "only {ok} requests under load");
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        failed.first()
    );
}

/// A request to the container-credentials endpoint from a pod: `Authorization` from the
/// file `argv[1]` (`-` for none, `expired` for a well-formed token past its `exp`);
/// prints the status and the body.
const POD_IDENTITY_RAW: &str = r#"
import base64, json, sys, time, urllib.request, urllib.error
arg = sys.argv[1]
headers = {}
if arg == "expired":
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")
    headers["Authorization"] = enc({"alg": "RS256"}) + "." + enc({"exp": int(time.time()) - 60, "aud": ["pods.eks.amazonaws.com"]}) + ".c2ln"
elif arg != "-":
    headers["Authorization"] = open(arg).read()
r = urllib.request.Request("http://169.254.170.23/v1/credentials", headers=headers)
try:
    with urllib.request.urlopen(r, timeout=5) as rsp:
        print(rsp.status, json.loads(rsp.read())["AccessKeyId"][:4])
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
"#;

const TOKEN: &str = "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount/eks-pod-identity-token";

#[test]
fn pod_identity_gives_pods_their_service_accounts_role_and_refuses_every_other_token() {
    let test = "pod_identity_gives_pods_their_service_accounts_role_and_refuses_every_other_token";
    if !root_or_skip(test) {
        return;
    }
    let sb = Sandbox::up(&example());
    let line = |pod: &str| sb.up_line(pod);
    assert!(
        line("payments/ledger").contains("assumed-role/payments-ledger/"),
        "{}",
        sb.up
    );
    assert!(
        line("analytics/report").contains("assumed-role/analytics-reader/"),
        "{}",
        sb.up
    );

    // Three SDKs, through AWS_CONTAINER_CREDENTIALS_FULL_URI: no role annotation, so the
    // metadata service has nothing for these pods.
    let ledger = sb.boto3("payments/ledger");
    assert!(ledger.contains("provider container-role"), "{ledger}");
    assert!(
        ledger.contains("assumed-role/payments-ledger/payments.ledger"),
        "{ledger}"
    );
    let report = sb.cli_identity("analytics/report");
    assert!(
        report.contains("assumed-role/analytics-reader/analytics.report"),
        "{report}"
    );
    let rust = text(&sb.exec("analytics/report", &[SDK_IDENTITY]));
    assert!(
        rust.contains("arn arn:aws:sts::123456789012:assumed-role/analytics-reader/"),
        "{rust}"
    );
    let raw = sb.raw("payments/ledger");
    assert!(
        !raw.contains("AccessKeyId"),
        "IMDS gave the pod credentials: {raw}"
    );
    assert!(
        sb.agent_metric(
            "node-a",
            r#"podiam_pod_identity_requests_total{result="ok"}"#
        ) >= 1.0
    );

    let pi =
        |pod: &str, token: &str| text(&sb.exec(pod, &["python3", "-c", POD_IDENTITY_RAW, token]));
    assert!(
        pi("payments/ledger", TOKEN).starts_with("200 ASIA"),
        "{}",
        pi("payments/ledger", TOKEN)
    );
    // No token; a well-formed token past its expiry.
    let none = pi("payments/ledger", "-");
    assert!(
        none.starts_with("400") && none.contains("InvalidToken"),
        "{none}"
    );
    let expired = pi("payments/ledger", "expired");
    assert!(
        expired.starts_with("400") && expired.contains("expired"),
        "{expired}"
    );

    // The token of a pod on node-b, sent from a pod on node-a: not this node's pod.
    let dir = tempfile::tempdir().unwrap();
    let stolen = dir.path().join("report-token");
    let out = sb.exec("analytics/report", &["cat", TOKEN]);
    std::fs::write(&stolen, &out.stdout).unwrap();
    let other_node = pi("payments/ledger", stolen.to_str().unwrap());
    assert!(
        other_node.starts_with("403") && other_node.contains("AccessDenied"),
        "{other_node}"
    );
    assert!(
        !other_node.contains("analytics"),
        "the pod is told nothing of others: {other_node}"
    );

    // A token for another audience (an IRSA-style projected volume of the same pod).
    let irsa = dir.path().join("irsa.yaml");
    std::fs::write(
        &irsa,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: irsa, namespace: payments}\n\
         spec:\n  nodeName: node-a\n  serviceAccountName: ledger\n  containers:\n  - name: app\n    \
         volumeMounts: [{name: aws-iam-token, mountPath: /var/run/secrets/eks.amazonaws.com/serviceaccount}]\n  \
         volumes:\n  - name: aws-iam-token\n    projected:\n      sources:\n      - serviceAccountToken: \
         {audience: sts.amazonaws.com, expirationSeconds: 86400, path: token}\n",
    )
    .unwrap();
    sb.ok(&["apply", irsa.to_str().unwrap()]);
    let audience = pi(
        "payments/irsa",
        "/var/run/secrets/eks.amazonaws.com/serviceaccount/token",
    );
    assert!(
        audience.starts_with("400") && audience.contains("InvalidToken"),
        "{audience}"
    );
    let own = pi("payments/irsa", TOKEN);
    assert!(
        own.starts_with("200 ASIA"),
        "the webhook's token works: {own}"
    );

    // A role the namespace forbids, whatever the association says.
    let thief = dir.path().join("thief.yaml");
    std::fs::write(
        &thief,
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: thief, namespace: payments}\n---\n\
         apiVersion: podiam.io/v1alpha1\nkind: PodIdentityAssociation\nmetadata: {name: thief, namespace: payments}\n\
         spec: {serviceAccount: thief, roleArn: arn:aws:iam::123456789012:role/analytics-reader}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: thief, namespace: payments}\n\
         spec: {nodeName: node-b, serviceAccountName: thief, containers: [{name: app}]}\n",
    )
    .unwrap();
    sb.ok(&["apply", thief.to_str().unwrap()]);
    let forbidden = pi("payments/thief", TOKEN);
    assert!(
        forbidden.starts_with("403") && forbidden.contains("AccessDenied"),
        "{forbidden}"
    );
    assert!(
        sb.boto3("payments/thief").contains("Error"),
        "{}",
        sb.boto3("payments/thief")
    );
    let why = text(&sb.cli(&["explain", "payments/thief"]));
    assert!(why.contains("role_not_permitted"), "{why}");

    // A host-network pod: its connections come from the node, and are redirected too.
    let host = dir.path().join("host.yaml");
    std::fs::write(
        &host,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: hostnet, namespace: payments}\n\
         spec: {nodeName: node-a, hostNetwork: true, serviceAccountName: ledger, containers: [{name: app}]}\n",
    )
    .unwrap();
    sb.ok(&["apply", host.to_str().unwrap()]);
    let hostnet = sb.boto3("payments/hostnet");
    assert!(hostnet.contains("provider container-role"), "{hostnet}");
    assert!(
        hostnet.contains("assumed-role/payments-ledger/payments.hostnet"),
        "{hostnet}"
    );

    // The same stolen token sent from a pod on its own node (a copy read from a shared
    // volume): worth nothing away from its pod, and the owner's held credentials stay
    // (checked through the outage below).
    let thief = pi("analytics/etl", stolen.to_str().unwrap());
    assert!(
        thief.starts_with("400") && thief.contains("InvalidToken"),
        "{thief}"
    );

    // Through a server outage: a pod gets again what it was last handed for its token
    // (the node feed still lists it); nothing is handed to a token no server answered.
    sb.ok(&["server", "stop"]);
    let held = pi("analytics/report", TOKEN);
    assert!(held.starts_with("200 ASIA"), "{held}");
    assert!(
        sb.agent_metric(
            "node-b",
            r#"podiam_pod_identity_requests_total{result="held"}"#
        ) >= 1.0
    );
    let unknown = pi("payments/thief", TOKEN);
    assert!(unknown.starts_with("503"), "{unknown}");
    sb.ok(&["server", "start"]);

    // The token of a deleted pod.
    let kept = dir.path().join("ledger-token");
    let out = sb.exec("payments/ledger", &["cat", TOKEN]);
    std::fs::write(&kept, &out.stdout).unwrap();
    sb.ok(&["delete", "payments/ledger"]);
    let deleted = pi("payments/api", kept.to_str().unwrap());
    assert!(
        deleted.starts_with("400") && deleted.contains("InvalidToken"),
        "{deleted}"
    );
    assert!(!(ledger + &report + &rust + &other_node + &forbidden).contains(NODE_ROLE));
}

#[test]
fn kube2iam_renamed_keys_in_the_sandbox() {
    if !root_or_skip("kube2iam_renamed_keys_in_the_sandbox") {
        return;
    }
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kube2iam-keys.yaml");
    let sb = Sandbox::up_with(
        &file,
        &[
            "--server-arg=--iam-role-key=example.com/role",
            "--server-arg=--namespace-key=example.com/allowed-roles",
        ],
    );
    let cli = sb.cli_identity("legacy/worker");
    assert!(cli.contains("assumed-role/legacy-worker/"), "{cli}");
    // The standard key is not read once it is renamed, as in kube2iam.
    let other = sb.cli_identity("legacy/standard-key");
    assert!(!other.contains("assumed-role"), "{other}");
    let explained = sb.cli(&["explain", "legacy/worker"]);
    assert_eq!(explained.status.code(), Some(0), "{}", text(&explained));
    assert!(
        text(&explained).contains("example.com/role"),
        "{}",
        text(&explained)
    );
}

/// The metric names and label names a PromQL expression uses (label names from `by (...)`,
/// `without (...)` and `{...}` matchers).
fn names_in(expr: &str) -> (Vec<String>, Vec<String>) {
    let word = |s: &str| -> Vec<String> {
        s.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect()
    };
    let metrics = word(expr)
        .into_iter()
        .filter(|w| w.starts_with("podiam_") || w.starts_with("process_"))
        .collect();
    let mut labels = Vec::new();
    for open in ["by (", "by(", "without (", "without(", "{"] {
        for (i, _) in expr.match_indices(open) {
            let rest = &expr[i + open.len()..];
            let close = if open == "{" { '}' } else { ')' };
            let inside = &rest[..rest.find(close).unwrap_or(rest.len())];
            for part in inside.split(',') {
                let name = part
                    .split(['=', '!', '~'])
                    .next()
                    .unwrap_or_default()
                    .trim();
                if !name.is_empty() {
                    labels.push(name.to_string());
                }
            }
        }
    }
    (metrics, labels)
}

fn prom_get(sb: &Sandbox, path: &str) -> serde_json::Value {
    let state = sb.state();
    let addr = state.prometheus.as_deref().unwrap().parse().unwrap();
    let (code, body) = podiam_tests::netns::get(&state.ctl, addr, path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    assert_eq!(code, 200, "{path}: {body}");
    v
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[test]
fn the_dashboard_and_alerts_answer_from_a_real_prometheus() {
    if !root_or_skip("the_dashboard_and_alerts_answer_from_a_real_prometheus") {
        return;
    }
    let sb = Sandbox::up(&example());
    // `up` made traffic (every pod asked for credentials); more, and a refusal.
    assert!(sb.cli_identity("payments/api").contains("payments-api"));
    let _ = sb.raw("payments/rogue");
    // Prometheus has scraped since: the agents' request counters are in.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let v = prom_get(
            &sb,
            &format!(
                "/api/v1/query?query={}",
                encode("sum(podiam_api_requests_total)")
            ),
        );
        if v["data"]["result"][0]["value"][1]
            .as_str()
            .is_some_and(|n| n != "0")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no scrape with traffic: {v}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    // Every target scraped and up (a target's first scrape may still be due).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let status = sb.ok(&["status"]);
        if status.contains("prometheus http://") && status.contains("all 3 targets up") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    // The shipped alert rules are loaded.
    let rules = prom_get(&sb, "/api/v1/rules");
    let loaded = rules["data"]["groups"].as_array().map_or(0, Vec::len);
    assert!(loaded > 0, "{rules}");

    let registered = podiam_tests::code::registered_metrics();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/dashboard.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap_or_default();
        for target in panel["targets"].as_array().into_iter().flatten() {
            let Some(expr) = target["expr"].as_str() else {
                continue;
            };
            // Grafana's variables, as Grafana would fill them in.
            let expr = expr
                .replace("$__rate_interval", "1m")
                .replace("$__interval", "1m")
                .replace("$__range", "1h");
            queries += 1;
            let v = prom_get(&sb, &format!("/api/v1/query?query={}", encode(&expr)));
            assert_eq!(v["status"], "success", "{title}: {expr}: {v}");
            let (metrics, labels) = names_in(&expr);
            for metric in &metrics {
                if metric.starts_with("process_") {
                    continue;
                }
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| metric.strip_suffix(s))
                    .unwrap_or(metric);
                assert!(
                    registered
                        .iter()
                        .any(|(name, _)| name == metric || name == base),
                    "{title}: {metric} is not a metric the binaries export"
                );
            }
            for label in &labels {
                if ["job", "instance", "le", "node", "__name__"].contains(&label.as_str()) {
                    continue;
                }
                // On a series Prometheus holds, or named beside the metric's registration.
                let series = metrics.iter().any(|m| {
                    let v = prom_get(&sb, &format!("/api/v1/series?match[]={}", encode(m)));
                    v["data"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|s| s.get(label).is_some())
                });
                let in_code = registered.iter().any(|(name, around)| {
                    metrics
                        .iter()
                        .any(|m| m == name || m.starts_with(&format!("{name}_")))
                        && around.contains(&format!("\"{label}\""))
                });
                assert!(
                    series || in_code,
                    "{title}: label {label} is not one the binaries export for {metrics:?}"
                );
            }
        }
    }
    assert!(queries >= 10, "{queries} queries");
}
