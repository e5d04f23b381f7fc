//! podiam server.
//!
//! Data model: a [`cluster::ClusterIndex`] holds every pod (stripped to
//! [`pods::PodInfo`]: key, node, IPs, phase, the podiam annotations) and every namespace
//! (with its compiled [`policy::NamespacePolicy`]), fed by kube-runtime watchers. A
//! request's source IP maps to at most one live pod; [`policy::Decision::for_pod`] turns
//! that pod and its namespace into an allowed role with session parameters, or a denial
//! with a reason a human can act on. On the container-credentials path the caller is the
//! pod its ServiceAccount token is bound to ([`auth::TokenReviewer`]), and its role that of
//! its ServiceAccount ([`accounts::AccountIndex`]), under the same namespace policy.

pub mod accounts;
pub mod api;
pub mod args;
pub mod auth;
pub mod cluster;
pub mod credentials;
pub mod events;
pub mod explain;
pub mod feed;
pub mod pods;
pub mod policy;
pub mod run;
pub mod sts;
pub mod webhook;
