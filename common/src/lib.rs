//! Pieces shared by the podiam agent and server.
//!
//! - [`clock`]: the injected wall clock (the one place it is read).
//! - [`feed`]: the node feed, a gRPC stream from a server to an agent of its node's pods.
//! - [`annotations`]: the Kubernetes annotation names podiam reads (kiam's and kube2iam's).
//! - [`arn`]: IAM role ARNs: parsing a full ARN, or resolving a bare name or `path/name`
//!   against a base ARN.
//! - [`admin`]: the admin HTTP server (`/healthz`, `/readyz`, `/metrics`) on its own port,
//!   with [`readiness::Readiness`] gates that each subsystem releases.
//! - [`shutdown`]: one cancellation token for SIGTERM/SIGINT; a second signal aborts.
//! - [`legacy`]: kiam's and kube2iam's flags podiam does not have, and what to use instead.
//! - [`listen`]: the accept loop every listener shares.
//! - [`logging`]: `tracing` setup from `--log-format` and `--log-level`.
//! - [`net`]: IPv4-mapped addresses compared as IPv4.
//! - [`pattern`]: regular expressions anchored so that no pattern text can escape the anchors.
//! - [`pod_identity`]: the container-credentials path's addresses, names and document.
//! - [`protocol`]: the agent ↔ server messages and typed errors.
//! - [`secret`]: strings that never format (keys, tokens).
//! - [`tls`]: mutual-TLS configurations from PEM files, reloaded when they change.

pub mod admin;
pub mod annotations;
pub mod arn;
pub mod clock;
pub mod feed;
pub mod legacy;
pub mod listen;
pub mod logging;
pub mod net;
pub mod pattern;
pub mod pod_identity;
pub mod protocol;
pub mod readiness;
pub mod secret;
pub mod shutdown;
pub mod tls;

/// An error and its causes, `outer: inner: innermost`, for a log line (an error's own
/// Display leaves its source out, so that a chain prints each cause once).
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_chain_prints_each_cause_once() {
        let error = crate::tls::TlsError::Read {
            path: "/nonexistent/ca.pem".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let text = super::chain(&error);
        assert_eq!(
            text,
            format!(
                "reading /nonexistent/ca.pem: {}",
                std::io::Error::from(std::io::ErrorKind::NotFound)
            )
        );
    }
}
