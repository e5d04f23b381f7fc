//! The deployment as shipped: the kustomize manifests render, every argument they give a
//! podiam container parses with the binary's own flag parser, the pieces agree with each
//! other (token audience, server name, TLS Secrets), the certificates `deploy/gen-certs.sh`
//! makes carry real mutual TLS between the real binaries, and the docs cover every flag
//! and metric.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use clap::CommandFactory;
use podiam_tests::{
    certs::{Pair, Pki},
    http,
    kube_api::FakeKube,
    process::Process,
    stack::{self, agent_identity},
};
use serde_json::Value;

const SERVER: &str = env!("CARGO_BIN_EXE_podiam-fake-kube");
const OVERLAYS: [&str; 7] = [
    "base",
    "overlays/cert-manager",
    "overlays/prometheus-operator",
    "overlays/instance-profile",
    "overlays/pod-identity",
    // The components combined, as docs/install.md shows them.
    "examples/production",
    "examples/production-instance-profile",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `kubectl kustomize deploy/<dir>` as JSON documents, or `None` (said loudly) when
/// kubectl is missing outside CI.
fn render(dir: &str) -> Option<Vec<Value>> {
    let out = match Command::new("kubectl")
        .arg("kustomize")
        .arg(root().join("deploy").join(dir))
        .output()
    {
        Ok(out) => out,
        Err(error) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "kubectl is needed to render deploy/ and CI has it: {error}"
            );
            eprintln!("\n*** SKIPPING: kubectl is missing ({error}) ***\n");
            return None;
        }
    };
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/{dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> = serde_saphyr::from_multiple(&String::from_utf8(out.stdout).unwrap())
        .unwrap_or_else(|e| panic!("deploy/{dir} renders invalid YAML: {e}"));
    Some(docs.into_iter().filter(|d| !d.is_null()).collect())
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The container args with `$(VAR)` references replaced as the kubelet would.
fn args(container: &Value) -> Vec<String> {
    container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().replace("$(HOST_IP)", "10.0.0.1"))
        .collect()
}

#[test]
fn manifests_render_and_every_argument_parses_with_the_binary() {
    for dir in OVERLAYS {
        let Some(docs) = render(dir) else { return };
        let server = find(&docs, "Deployment", "podiam-server");
        let agent = find(&docs, "DaemonSet", "podiam-agent");
        let server_c = &server["spec"]["template"]["spec"]["containers"][0];
        let agent_c = &agent["spec"]["template"]["spec"]["containers"][0];

        // The binaries' own parsers accept the arguments as given (names and values).
        let server_args = args(server_c);
        if let Err(e) = podiam_server::args::Cli::command().try_get_matches_from(
            std::iter::once("podiam-server".to_string()).chain(server_args.clone()),
        ) {
            panic!("deploy/{dir}: podiam-server rejects its args: {e}");
        }
        let agent_args = args(agent_c);
        if let Err(e) = podiam_agent::args::Cli::command().try_get_matches_from(
            std::iter::once("podiam-agent".to_string()).chain(agent_args.clone()),
        ) {
            panic!("deploy/{dir}: podiam-agent rejects its args: {e}");
        }

        // Events name the server's own pod (downward API), as the docs say.
        let pod_name = server_c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == "POD_NAME");
        assert_eq!(
            pod_name.map(|e| &e["valueFrom"]["fieldRef"]["fieldPath"]),
            Some(&Value::from("metadata.name")),
            "deploy/{dir}: POD_NAME"
        );
        // kube-prometheus-stack selects by its release label by default.
        for kind in ["ServiceMonitor", "PrometheusRule"] {
            for doc in docs.iter().filter(|d| d["kind"] == kind) {
                assert!(
                    doc["metadata"]["labels"]["release"].is_string(),
                    "deploy/{dir}: {kind} without a release label"
                );
            }
        }

        // The server is redundant and spread; the agent is on every node, host network.
        assert!(server["spec"]["replicas"].as_u64().unwrap() >= 2, "{dir}");
        let spec = &agent["spec"]["template"]["spec"];
        assert_eq!(spec["hostNetwork"], true, "{dir}");
        assert_eq!(spec["priorityClassName"], "system-node-critical");
        assert_eq!(spec["tolerations"][0]["operator"], "Exists");
        let caps = &agent_c["securityContext"]["capabilities"];
        assert_eq!(caps["drop"][0], "ALL");
        let added: BTreeSet<_> = caps["add"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            added.is_subset(&BTreeSet::from(["NET_ADMIN", "NET_RAW"]))
                && added.contains("NET_ADMIN"),
            "{dir}: {added:?}"
        );
        let sc = &server_c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(
            server["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"],
            true
        );

        // The agent's projected token is for the audience the server reviews.
        let flag = |args: &[String], name: &str| {
            args.iter()
                .find_map(|a| a.strip_prefix(&format!("--{name}=")).map(str::to_string))
        };
        let audience = flag(&server_args, "token-audience").unwrap_or("podiam".into());
        let projected = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|v| v["projected"]["sources"][0]["serviceAccountToken"]["audience"].as_str())
            .unwrap();
        assert_eq!(projected, audience, "{dir}");
        // The agent's ServiceAccount is the one the server expects.
        let expected_sa = flag(&server_args, "agent-service-account").unwrap();
        assert_eq!(
            format!(
                "{}/{}",
                agent["metadata"]["namespace"].as_str().unwrap(),
                spec["serviceAccountName"].as_str().unwrap()
            ),
            expected_sa
        );
        // Both mount the Secrets the TLS setups create.
        let secrets = |pod: &Value| -> BTreeSet<String> {
            pod["spec"]["template"]["spec"]["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|v| v["secret"]["secretName"].as_str().map(str::to_string))
                .collect()
        };
        assert!(secrets(server).contains("podiam-server-tls"), "{dir}");
        assert!(secrets(agent).contains("podiam-agent-tls"), "{dir}");

        // With cert-manager, the server certificate names what the agents verify.
        if docs.iter().any(|d| d["kind"] == "Certificate") {
            let name = flag(&agent_args, "server-name").unwrap();
            let cert = find(&docs, "Certificate", "podiam-server");
            assert!(
                cert["spec"]["dnsNames"]
                    .as_array()
                    .unwrap()
                    .contains(&Value::from(name.clone())),
                "{name}"
            );
            assert_eq!(cert["spec"]["secretName"], "podiam-server-tls");
            assert_eq!(
                find(&docs, "Certificate", "podiam-agent")["spec"]["secretName"],
                "podiam-agent-tls"
            );
        }
        // The container-credentials path: both binaries on, the webhook reachable through
        // its Service on the server's port, fail-open for pod creation and never for
        // kube-system, and the server's rights to what it watches.
        if let Some(webhook) = docs
            .iter()
            .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        {
            assert!(server_args.contains(&"--pod-identity".to_string()), "{dir}");
            assert!(agent_args.contains(&"--pod-identity".to_string()), "{dir}");
            let hook = &webhook["webhooks"][0];
            assert_eq!(hook["failurePolicy"], "Ignore", "{dir}");
            assert!(
                hook["namespaceSelector"]
                    .to_string()
                    .contains("kube-system"),
                "{dir}"
            );
            let service = &hook["clientConfig"]["service"];
            assert_eq!(service["path"], podiam_server::webhook::PATH);
            let svc = find(&docs, "Service", service["name"].as_str().unwrap());
            assert_eq!(svc["spec"]["ports"][0]["port"], service["port"]);
            let target = svc["spec"]["ports"][0]["targetPort"].as_str().unwrap();
            let port = server_c["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == target)
                .unwrap_or_else(|| panic!("{dir}: no server port {target}"));
            let listen = flag(&server_args, "webhook-listen").unwrap();
            assert!(
                listen.ends_with(&format!(":{}", port["containerPort"])),
                "{dir}: {listen}"
            );
            let rules = find(&docs, "ClusterRole", "podiam-server-pod-identity").to_string();
            assert!(
                rules.contains("serviceaccounts") && rules.contains("podidentityassociations"),
                "{dir}"
            );
            find(
                &docs,
                "CustomResourceDefinition",
                "podidentityassociations.podiam.io",
            );
            if docs.iter().any(|d| d["kind"] == "Certificate") {
                let host = format!("{}.podiam.svc", service["name"].as_str().unwrap());
                let names = find(&docs, "Certificate", "podiam-server")["spec"]["dnsNames"].clone();
                assert!(
                    names.as_array().unwrap().contains(&Value::from(host)),
                    "{dir}"
                );
            }
        }
        // The agents' server address is the headless Service.
        let service = find(&docs, "Service", "podiam-server");
        assert_eq!(service["spec"]["clusterIP"], "None");
        assert!(
            flag(&agent_args, "server-address")
                .unwrap()
                .starts_with("podiam-server.podiam.svc")
        );
    }
}

#[tokio::test]
async fn gen_certs_makes_a_pair_the_binaries_accept_for_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(root().join("deploy/gen-certs.sh"))
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pki = Pki::from_files(
        dir.path().join("ca.crt"),
        Pair {
            cert: dir.path().join("podiam-server.crt"),
            key: dir.path().join("podiam-server.key"),
        },
        Pair {
            cert: dir.path().join("podiam-agent.crt"),
            key: dir.path().join("podiam-agent.key"),
        },
    );
    // The real server with those files, and the real agent verifying it by the name the
    // shipped manifests give it: the agent is ready only after a health check over mTLS.
    let server_name = render("base")
        .map(|docs| {
            let agent = find(&docs, "DaemonSet", "podiam-agent");
            args(&agent["spec"]["template"]["spec"]["containers"][0])
                .iter()
                .find_map(|a| a.strip_prefix("--server-name=").map(str::to_string))
                .expect("the agent's manifest sets --server-name")
        })
        .unwrap_or_else(|| "podiam-server.podiam.svc".into());
    let kube = FakeKube::start().await.unwrap();
    kube.add_token("agent-token", agent_identity("node-a"));
    let kubeconfig = dir.path().join("kubeconfig");
    kube.write_kubeconfig(&kubeconfig).unwrap();
    let server_bin = stack::sibling(SERVER, "podiam-server");
    let server = Process::spawn_announcing(
        stack::server_command(&server_bin, "http://127.0.0.1:9", &pki, &kubeconfig, &[]),
        &["agent API"],
    )
    .unwrap();
    http::wait_ready(server.admin, Duration::from_secs(30))
        .await
        .unwrap();
    let api = server.addr("agent API").unwrap();
    std::fs::write(dir.path().join("token"), "agent-token").unwrap();
    let agent = stack::agent_command_for(
        &stack::sibling(SERVER, "podiam-agent"),
        &pki,
        &api.to_string(),
        &server_name,
        "127.0.0.1:9",
        &dir.path().join("imds.key"),
        &dir.path().join("token"),
    );
    let mut agent = agent;
    agent.args(["--pod-sources", "127.0.0.0/8"]);
    let agent = Process::spawn(agent).unwrap();
    let ready = http::wait_ready(agent.admin, Duration::from_secs(15)).await;
    assert!(
        ready.is_ok(),
        "agent not ready over gen-certs TLS: {:?}",
        agent.logs()
    );
}

/// Long flags of a clap command (after propagation of globals), without help/version.
fn flags(cmd: &clap::Command) -> BTreeSet<String> {
    cmd.get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| *l != "help" && *l != "version")
        .map(|l| format!("--{l}"))
        .collect()
}

/// The flags in the table under `### <heading>` of operations.md (rows starting "| `--").
fn documented(doc: &str, heading: &str) -> BTreeSet<String> {
    let start = doc
        .find(&format!("### {heading}\n"))
        .unwrap_or_else(|| panic!("docs/operations.md has no section ### {heading}"));
    let rest = &doc[start + heading.len() + 5..];
    let section = &rest[..rest.find("\n#").unwrap_or(rest.len())];
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `--"))
        .map(|l| format!("--{}", &l[..l.find('`').unwrap()]))
        .collect()
}

#[test]
fn the_docs_cover_every_flag_and_metric() {
    let doc = std::fs::read_to_string(root().join("docs/operations.md")).unwrap();
    let mut server = podiam_server::args::Cli::command();
    server.build();
    let explain = server.find_subcommand("explain").unwrap().clone();
    let mut agent = podiam_agent::args::Cli::command();
    agent.build();
    for (heading, cmd) in [
        ("podiam-server", &server),
        ("podiam-server explain", &explain),
        ("podiam-agent", &agent),
    ] {
        let want = flags(cmd);
        let have = documented(&doc, heading);
        let missing: Vec<_> = want.difference(&have).collect();
        let unknown: Vec<_> = have.difference(&want).collect();
        assert!(
            missing.is_empty() && unknown.is_empty(),
            "{heading}: undocumented {missing:?}, documented but not a flag {unknown:?}"
        );
    }
    // Every metric the code registers.
    let metrics: BTreeSet<String> = podiam_tests::code::registered_metrics()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert!(metrics.len() > 20, "{metrics:?}");
    let missing: Vec<_> = metrics
        .iter()
        .filter(|m| !doc.contains(&format!("`{m}`")))
        .collect();
    assert!(missing.is_empty(), "docs/operations.md lacks {missing:?}");
}
