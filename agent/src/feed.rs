//! The agent's subscription to its node's feed (see [`podiam_common::feed`]): one
//! server replica at a time, failing over to the next when the stream breaks or falls
//! silent for three heartbeats, resuming with what the table already holds.
//!
//! While no feed is connected the table keeps what it holds: pods it knows keep being
//! answered while their credentials have at least 15 minutes left, and everything else
//! goes to the per-request API (which fails while no server answers, and the pod gets
//! a 503 that SDKs retry).

use std::time::Duration;

use podiam_common::feed::{self, Held, WatchNode};
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::{servers::Servers, table::NodeTable};

/// How the subscription behaves.
#[derive(Clone, Debug)]
pub struct FeedSettings {
    /// The node's name (`spec.nodeName`); the server ignores it when it binds agents to
    /// nodes by their tokens, and needs it when it does not.
    pub node: String,
    /// Deadline of subscribing (connect, TLS, first answer headers).
    pub connect_timeout: Duration,
    /// Silence after which the first update is overdue (later: three heartbeats).
    pub first_update_timeout: Duration,
}

enum Ended {
    Shutdown,
    /// The stream broke; whether it had synced first (then the next try starts at once).
    Lost {
        synced: bool,
        reason: String,
    },
}

const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A server without the feed (an older version) is asked again this rarely.
const UNIMPLEMENTED_BACKOFF: Duration = Duration::from_secs(60);

/// Follows the feed until `shutdown`, feeding `table`.
pub async fn follow(
    servers: Servers,
    table: NodeTable,
    settings: FeedSettings,
    shutdown: CancellationToken,
) {
    let mut backoff = MIN_BACKOFF;
    let mut was_connected = false;
    loop {
        let mut unimplemented = false;
        for addr in servers.addresses() {
            match subscribe(&servers, &table, addr, &settings, &shutdown).await {
                Ended::Shutdown => return,
                Ended::Lost { synced, reason } => {
                    table.set_connected(false);
                    if synced || was_connected {
                        tracing::warn!(server = %addr, %reason, pods = table.len(), "node feed lost; serving the credentials held while finding another server");
                    } else {
                        tracing::debug!(server = %addr, %reason, "node feed not available");
                    }
                    was_connected = synced;
                    unimplemented |= reason.contains("Unimplemented");
                    if synced {
                        backoff = MIN_BACKOFF;
                    }
                }
            }
        }
        let pause = if unimplemented {
            UNIMPLEMENTED_BACKOFF
        } else {
            backoff.mul_f64(rand::rng().random_range(0.5..1.5))
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn subscribe(
    servers: &Servers,
    table: &NodeTable,
    addr: std::net::SocketAddr,
    settings: &FeedSettings,
    shutdown: &CancellationToken,
) -> Ended {
    let lost = |synced, reason: String| Ended::Lost { synced, reason };
    let open = async {
        let channel = servers.feed_channel(addr).await?;
        let mut client = channel.client();
        let held = table
            .held()
            .into_iter()
            // A server refuses more (a node never runs that many pods).
            .take(feed::MAX_HELD)
            .map(|(uid, version)| Held { uid, version })
            .collect();
        let mut request = tonic::Request::new(WatchNode {
            node: settings.node.clone(),
            held,
        });
        if let Some(token) = servers.bearer() {
            let value = format!("Bearer {}", token.expose()).parse()?;
            request.metadata_mut().insert("authorization", value);
        }
        let stream = client.watch(request).await?.into_inner();
        anyhow::Ok(stream)
    };
    let mut stream = tokio::select! {
        _ = shutdown.cancelled() => return Ended::Shutdown,
        opened = tokio::time::timeout(settings.connect_timeout, open) => match opened {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return lost(false, feed_error(&error)),
            Err(_) => return lost(false, format!("no answer within {:?}", settings.connect_timeout)),
        },
    };
    let mut silence = settings.first_update_timeout;
    let mut synced = false;
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return Ended::Shutdown,
            next = tokio::time::timeout(silence, stream.message()) => next,
        };
        let update = match next {
            Ok(Ok(Some(update))) => update,
            Ok(Ok(None)) => return lost(synced, "the server ended the stream".into()),
            Ok(Err(status)) => {
                return lost(synced, format!("{:?}: {}", status.code(), status.message()));
            }
            Err(_) => return lost(synced, format!("no update for {silence:?}")),
        };
        if update.heartbeat_ms > 0 {
            silence = Duration::from_millis(u64::from(update.heartbeat_ms)) * 3;
        }
        let first_sync = update.synced && !synced;
        table.apply(update);
        if first_sync {
            synced = true;
            table.set_connected(true);
            tracing::info!(server = %addr, pods = table.len(), "node feed synced");
        }
    }
}

/// A subscription error for the log, with tonic's status code when there is one.
fn feed_error(error: &anyhow::Error) -> String {
    match error.downcast_ref::<tonic::Status>() {
        Some(status) => format!("{:?}: {}", status.code(), status.message()),
        None => format!("{error:#}"),
    }
}
