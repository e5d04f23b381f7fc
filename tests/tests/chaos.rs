//! The short fault matrix (root only): a sandbox with two nodes under load on both paths
//! (IMDSv2, and the container-credentials endpoint), each fault injected and removed in
//! turn, every answer checked against the pod's role in STS. The full matrix, with longer holds, is `podiam-bench chaos` (docs/reliability.md).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::{path::Path, time::Duration};

use podiam_tests::{
    chaos::{self, Chaos, Fault, Up},
    netns::root_or_skip,
};

const BIN: &str = env!("CARGO_BIN_EXE_podiam-sandbox");

#[test]
fn under_load_no_fault_hands_out_wrong_credentials_or_stops_a_process() {
    if !root_or_skip("under_load_no_fault_hands_out_wrong_credentials_or_stops_a_process") {
        return;
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sandbox.yaml");
    let name = format!("ch{}", std::process::id() % 100_000);
    let up = Up::start(Path::new(BIN), &name, &manifest, 1).unwrap();
    let roles: Vec<&str> = up.roles.iter().map(String::as_str).collect();
    let mut load = Chaos::start(Path::new(BIN), &name, &roles, &up.container).unwrap();
    // Both paths under load: the container-credentials pods too.
    let container = load
        .targets
        .iter()
        .filter(|t| t.token_file.is_some())
        .count();
    assert_eq!(container, up.container.len(), "{:?}", load.targets);
    let started = std::time::Instant::now();
    assert!(
        load.wait_served(started, Duration::from_secs(60)).is_some(),
        "not every pod was served at the start"
    );
    // The checker tells the pods' credentials apart, so a swap would count as wrong.
    load.self_check().unwrap();

    let hold = Duration::from_secs(6);
    let mut rows = Vec::new();
    for fault in Fault::ALL {
        let row = load.run(fault, hold, Duration::from_secs(90)).unwrap();
        eprintln!("{}", chaos::table(std::slice::from_ref(&row)));
        rows.push(row);
    }
    let table = chaos::table(&rows);
    for row in &rows {
        let name = row.fault.name();
        assert_eq!(row.wrong, 0, "{name}: {:?}\n{table}", row.example);
        assert!(row.exited.is_empty(), "{name}: {:?}\n{table}", row.exited);
        assert!(
            row.recovery.is_some(),
            "{name}: not back to full service\n{table}"
        );
    }
    let row = |f: Fault| rows.iter().find(|r| r.fault == f).unwrap();
    // Pods keep their credentials through outages of the server, the API server and STS.
    for f in [Fault::ServerDown, Fault::ApiDown, Fault::StsDown] {
        assert!(row(f).ok > 0, "{}: nothing answered\n{table}", f.name());
    }
    // A pod that appears while STS fails is refused (503 for SDKs to retry), then served.
    assert!(row(Fault::StsThrottle).refused > 0, "{table}");
    // A role revoked while the server's view was stale: refused once the feed is back
    // (and, checked above, never issued anew meanwhile nor served after).
    assert!(row(Fault::ApiDownRevoked).refused > 0, "{table}");
    // A pod force-deleted while the server was down: its held credentials while no server
    // could say (checked above: never after its node's feed was back).
    assert!(row(Fault::DeletedWhileHeld).ok > 0, "{table}");
    // A stopped agent fails closed: its pods' requests go unanswered, never elsewhere.
    assert!(row(Fault::AgentDown).failed > 0, "{table}");
    drop(load);
    drop(up);
}
