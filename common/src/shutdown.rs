//! Shutdown: the first SIGTERM or SIGINT cancels one token that every server and task
//! watches, so in-flight work can finish within its grace period; a second signal exits
//! at once.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Exit status after a second signal, as a shell reports a process killed by SIGINT.
const ABORT_STATUS: i32 = 130;

/// Installs the signal handlers and returns the token the first signal cancels.
pub fn on_signals() -> std::io::Result<CancellationToken> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
            _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
        }
        cancel.cancel();
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::warn!("second signal received, exiting without waiting");
        std::process::exit(ABORT_STATUS);
    });
    Ok(token)
}
