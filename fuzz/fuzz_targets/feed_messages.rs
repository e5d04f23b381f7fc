//! The node feed's messages, from any bytes: a run of length-delimited `NodeUpdate`s
//! applied to an agent's node table, as if a server (or something posing as one on a
//! broken stream) had sent them; and the agent's `WatchNode` request as a server decodes it.
//!
//! Properties: no panic whatever the content (IPs, ARNs, expiry times, sizes); and the
//! table never names a pod for an IP that pod does not claim in the latest state the feed
//! gave for it, nor a pod the feed removed. A model (a map of UID to the last state) says
//! what the latest state is.
#![no_main]

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, LazyLock},
    time::Duration,
};

use libfuzzer_sys::fuzz_target;
use podiam_agent::table::{Lookup, NodeTable, TableMetrics};
use podiam_common::{
    feed::{NodeUpdate, PodState, WatchNode},
    net::canonical,
};
use podiam_fuzz::FixedClock;
use prost::Message;

static METRICS: LazyLock<TableMetrics> =
    LazyLock::new(|| TableMetrics::register(&prometheus::Registry::new()).unwrap());
/// With its clock paused: a lookup that may wait for the feed (zero time here) gets its
/// answer when its timer fires, at once, rather than at the next millisecond's tick, which
/// held the target to a few hundred executions a second, asleep.
static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
});

fn ips(pod: &PodState) -> Vec<IpAddr> {
    pod.ips
        .iter()
        .filter_map(|ip| ip.parse().ok().map(canonical))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let _ = WatchNode::decode(data);

    let table = NodeTable::new(None, Arc::new(FixedClock::new()), METRICS.clone());
    table.set_connected(true);
    let mut model: HashMap<String, PodState> = HashMap::new();
    let mut buf = data;
    while !buf.is_empty() {
        let Ok(update) = NodeUpdate::decode_length_delimited(&mut buf) else {
            break;
        };
        for uid in &update.removed {
            model.remove(uid);
        }
        for pod in &update.pods {
            model.insert(pod.uid.clone(), pod.clone());
        }
        table.apply(update);
    }

    let asked: Vec<IpAddr> = model.values().flat_map(ips).collect();
    RUNTIME.block_on(async {
        for ip in asked {
            if let Lookup::Found(entry) = table.lookup(ip, Duration::ZERO).await {
                let Some(state) = model.get(&entry.uid) else {
                    panic!(
                        "{ip} names {}, which the feed removed or never sent",
                        entry.uid
                    );
                };
                assert!(
                    ips(state).contains(&ip),
                    "{ip} names {}, which does not claim it",
                    entry.uid
                );
                assert!(entry.ips.iter().all(|held| ips(state).contains(held)));
            }
        }
    });
});
