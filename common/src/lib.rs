//! Pieces shared by the podiam agent and server.
//!
//! - [`annotations`]: the Kubernetes annotation names podiam reads (kiam's and kube2iam's).
//! - [`arn`]: IAM role ARNs: parsing a full ARN, or resolving a bare name or `path/name`
//!   against a base ARN.
//! - [`admin`]: the admin HTTP server (`/healthz`, `/readyz`, `/metrics`) on its own port,
//!   with [`readiness::Readiness`] gates that each subsystem releases.
//! - [`shutdown`]: one cancellation token for SIGTERM/SIGINT; a second signal aborts.
//! - [`listen`]: the accept loop every listener shares.
//! - [`logging`]: `tracing` setup from `--log-format` and `--log-level`.
//! - [`net`]: IPv4-mapped addresses compared as IPv4.
//! - [`pattern`]: regular expressions anchored so that no pattern text can escape the anchors.
//! - [`protocol`]: the agent ↔ server messages and typed errors.
//! - [`secret`]: strings that never format (keys, tokens).
//! - [`tls`]: mutual-TLS configurations from PEM files, reloaded when they change.

pub mod admin;
pub mod annotations;
pub mod arn;
pub mod listen;
pub mod logging;
pub mod net;
pub mod pattern;
pub mod protocol;
pub mod readiness;
pub mod secret;
pub mod shutdown;
pub mod tls;
