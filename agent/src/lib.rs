//! podiam agent: the per-node EC2-metadata endpoint.
//!
//! Data model: a request's source address is the caller's identity. The agent holds no
//! AWS rights and no pod index: it asks a podiam server ([`servers::Servers`], mutual
//! TLS, with the agent's ServiceAccount token) for the role and credentials of the pod
//! with that address, and serves them in the metadata service's format ([`imds`]).
//! Paths outside the credential surface go to the real metadata service only through the
//! allow-list of [`proxy`]. IMDSv2 tokens are stateless and survive restarts
//! ([`imds::token`]). [`intercept`] redirects pods' 169.254.169.254 to the agent, and
//! leaves the redirect in place when the agent stops (fail closed). [`pod_identity`] is the
//! container-credentials endpoint (EKS Pod Identity's), where the pod's projected
//! ServiceAccount token, not its address, is the identity.

pub mod args;
pub mod feed;
pub mod imds;
pub mod intercept;
pub mod interfaces;
pub mod pod_identity;
pub mod pods;
pub mod proxy;
pub mod servers;
pub mod table;
