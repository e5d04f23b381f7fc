//! The `podiam-server` binary, black box: flags, `explain`, the admin server and shutdown,
//! against the stand-in API server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use podiam_tests::{
    certs::Pki,
    http,
    kube_api::FakeKube,
    objects::{association, namespace, pod, service_account},
    process::Process,
    stack,
};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_podiam-server");
const BASE: &str = "arn:aws:iam::123456789012:role/";

struct Cluster {
    kube: FakeKube,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

async fn cluster() -> Cluster {
    let kube = FakeKube::start().await.unwrap();
    kube.apply(namespace(
        "team-a",
        &[("iam.amazonaws.com/permitted", &format!("{BASE}web"))],
    ));
    kube.apply(namespace(
        "team-b",
        &[("iam.amazonaws.com/allowed-roles", r#"["batch-*"]"#)],
    ));
    kube.apply(pod("team-a", "web-0").ip("10.0.0.1").role("web").build());
    kube.apply(pod("team-a", "admin").ip("10.0.0.2").role("admin").build());
    kube.apply(pod("team-b", "job").ip("10.0.0.3").role("batch-7").build());
    kube.apply(
        pod("team-b", "host")
            .ip("192.0.2.1")
            .role("batch-1")
            .host_network()
            .build(),
    );
    kube.apply(
        pod("team-a", "etcd-node-x")
            .ip("10.0.0.5")
            .role("web")
            .annotation("kubernetes.io/config.mirror", "5f3a2c1e")
            .build(),
    );
    kube.apply(pod("team-a", "twin-1").ip("10.0.0.9").role("web").build());
    kube.apply(
        pod("team-b", "twin-2")
            .ip("10.0.0.9")
            .role("batch-1")
            .build(),
    );
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    kube.write_kubeconfig(&kubeconfig).unwrap();
    Cluster {
        kube,
        _dir: dir,
        kubeconfig,
    }
}

/// Runs `podiam-server explain ARGS` off the async runtime's threads.
async fn explain(kubeconfig: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .arg("explain")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--base-role-arn", BASE, "--log-level", "warn"])
        .args(args);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn help_documents_every_flag_with_its_env_var() {
    for args in [&["--help"][..], &["explain", "--help"]] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(out.status.success());
        let help = String::from_utf8(out.stdout).unwrap();
        // Flag lines are indented 6 (`      --x`) or 2 (`  -x, --y`); wrapped text, 10.
        let is_flag = |l: &&str| {
            l.starts_with("      --") || (l.starts_with("  -") && l.get(4..8) == Some(", --"))
        };
        let flags = help.lines().filter(is_flag).count();
        assert!(flags >= 4, "{help}");
        let envs = help.matches("[env: PODIAM_").count();
        // Every flag but --help/--version carries its environment variable.
        let exempt = help.matches("--help").count() + help.matches("--version").count();
        assert_eq!(envs + exempt, flags, "{help}");
    }
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .starts_with("podiam-server ")
    );
}

#[test]
fn bad_flags_fail_with_a_clear_message() {
    let out = Command::new(BIN)
        .env_clear()
        .args([
            "--base-role-arn",
            "arn:aws:iam::12:role/",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid --base-role-arn") && err.contains("12-digit"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test]
async fn explain_allowed_denied_undecided() {
    let c = cluster().await;

    let out = explain(&c.kubeconfig, &["--namespace", "team-a", "--pod", "web-0"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("decision:   allowed"), "{text}");
    assert!(
        text.contains(&format!(
            "{BASE}web (from annotation iam.amazonaws.com/role)"
        )),
        "{text}"
    );

    let out = explain(
        &c.kubeconfig,
        &["-n", "team-a", "--pod", "admin", "-o", "json"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["decision"], "denied");
    assert_eq!(v["reason"], "role_not_permitted");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains(&format!("{BASE}admin"))
    );
    assert_eq!(v["pod"]["name"], "admin");

    // By IP, as the server does; kube2iam's glob policy.
    let out = explain(&c.kubeconfig, &["--ip", "10.0.0.3", "-o", "json"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v = json(&out);
    assert_eq!(v["decision"], "allowed");
    assert_eq!(v["role_arn"], format!("{BASE}batch-7"));
    assert_eq!(v["pod"]["namespace"], "team-b");

    let out = explain(&c.kubeconfig, &["--ip", "10.0.0.9", "-o", "json"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["reason"], "ambiguous_ip");

    let out = explain(
        &c.kubeconfig,
        &["-n", "team-b", "--pod", "host", "-o", "json"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["reason"], "not_served");

    let out = explain(&c.kubeconfig, &["--ip", "192.0.2.1", "-o", "json"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(json(&out)["reason"], "pod_not_found");

    let out = explain(
        &c.kubeconfig,
        &["-n", "team-a", "--pod", "nope", "-o", "json"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(json(&out)["decision"], "undecided");
    assert_eq!(json(&out)["reason"], "pod_not_found");

    // A mirror pod asking for a permitted role: denied, and opted in, allowed.
    let mirror = ["-n", "team-a", "--pod", "etcd-node-x", "-o", "json"];
    let out = explain(&c.kubeconfig, &mirror).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v = json(&out);
    assert_eq!(
        (v["reason"].as_str(), v["pod"]["mirror"].as_bool()),
        (Some("mirror_pod"), Some(true))
    );
    let mut opted_in = mirror.to_vec();
    opted_in.push("--allow-mirror-pods");
    let out = explain(&c.kubeconfig, &opted_in).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = explain(&c.kubeconfig, &["-n", "team-a", "--pod", "etcd-node-x"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("mirror:") && text.contains("mirror_pod"),
        "{text}"
    );

    // Neither target given: a usage error from clap.
    let out = explain(&c.kubeconfig, &[]).await;
    assert_eq!(out.status.code(), Some(2));
    drop(c.kube);
}

#[tokio::test]
async fn explain_a_service_account_on_the_container_credentials_path() {
    let c = cluster().await;
    c.kube.apply(service_account(
        "team-a",
        "web",
        Some(&format!("{BASE}web")),
    ));
    c.kube.apply(service_account("team-a", "ops", None));
    c.kube.apply(association(
        "team-a",
        "ops-admin",
        "ops",
        &format!("{BASE}admin"),
    ));

    let out = explain(&c.kubeconfig, &["-n", "team-a", "--service-account", "web"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(&format!(
            "{BASE}web (from the ServiceAccount's eks.amazonaws.com/role-arn annotation)"
        )) && text.contains("kubernetes-pod-uid"),
        "{text}"
    );

    // The association's role is one the namespace does not permit.
    let out = explain(
        &c.kubeconfig,
        &["-n", "team-a", "--service-account", "ops", "-o", "json"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v = json(&out);
    assert_eq!(v["reason"], "role_not_permitted");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains(&format!("{BASE}admin")),
        "{v}"
    );

    let out = explain(
        &c.kubeconfig,
        &["-n", "team-b", "--service-account", "nobody", "-o", "json"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(json(&out)["reason"], "service_account_not_found");
    drop(c.kube);
}

#[tokio::test]
async fn explain_with_the_api_unreachable_is_undecided() {
    let c = cluster().await;
    let kubeconfig = c.kubeconfig.clone();
    let url = c.kube.url();
    drop(c.kube); // the port now refuses connections
    let out = explain(
        &kubeconfig,
        &["-n", "team-a", "--pod", "web-0", "-o", "json"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(json(&out)["reason"], "api_unreachable");
    // It says where it looked.
    let message = json(&out)["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains(url.trim_end_matches('/')), "{message}");
}

/// The server with its ports on loopback, test certificates, and an STS endpoint that
/// refuses connections (these tests need no credentials).
fn server_command(kubeconfig: &Path, pki: &Pki) -> Command {
    let mut cmd = stack::server_command(Path::new(BIN), "http://127.0.0.1:9", pki, kubeconfig, &[]);
    // As a manifest may leave it: an empty value means no role chaining.
    cmd.env("PODIAM_ASSUME_ROLE_ARN", "");
    cmd
}

#[tokio::test]
async fn readyz_waits_for_both_lists_and_sigterm_stops_cleanly() {
    let c = cluster().await;
    let hold = c.kube.hold_lists();
    let kubeconfig = c.kubeconfig.clone();
    let pki = Pki::generate(c._dir.path(), "cli").unwrap();
    let server =
        tokio::task::spawn_blocking(move || Process::spawn(server_command(&kubeconfig, &pki)))
            .await
            .unwrap()
            .unwrap();
    let admin = server.admin;

    assert_eq!(http::get(admin, "/healthz").await.unwrap().0, 200);
    assert!(
        c.kube
            .wait_lists(podiam_tests::kube_api::Kind::Pod, 1)
            .await
    );
    assert!(
        c.kube
            .wait_lists(podiam_tests::kube_api::Kind::Namespace, 1)
            .await
    );
    let (code, body) = http::get(admin, "/readyz").await.unwrap();
    assert_eq!(code, 503);
    assert!(
        body.contains("pods") && body.contains("namespaces"),
        "{body}"
    );
    drop(hold);

    http::wait_ready(admin, Duration::from_secs(20))
        .await
        .unwrap();
    let (code, metrics) = http::get(admin, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("podiam_pod_index_pods 7"), "{metrics}");
    assert!(
        metrics.contains("podiam_pod_index_ip_collisions 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("podiam_namespace_index_namespaces 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("process_resident_memory_bytes"),
        "{metrics}"
    );
    assert_eq!(http::get(admin, "/nope").await.unwrap().0, 404);

    let status = tokio::task::spawn_blocking(move || server.terminate(Duration::from_secs(10)))
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}
