//! podiam's test harness. Everything here is a **test double** or a helper for tests and
//! benchmarks; none of it ships.
//!
//! - [`kube_api::FakeKube`]: a stand-in Kubernetes API server, driven from test code,
//!   that the real kube client (in the real server) talks to over HTTP.
//! - [`admission`]: the API server's side of a mutating webhook (AdmissionReview, JSON Patch).
//! - [`http`]: a minimal HTTP client for admin endpoints.
//! - [`api_client`]: an HTTP/2 mutual-TLS client of the server's agent API.
//! - [`fake_imds`]: the node's real metadata service, with the node's secrets (a test double).
//! - [`fake_sts`]: a counting in-memory STS and a clock for the broker under paused time.
//! - [`imds_client`]: a metadata client that picks its source address, and a raw mode.
//! - [`certs`]: a test PKI (rcgen) for mutual TLS.
//! - [`chaos`]: the fault matrix: load from sandbox pods, faults one at a time, answers checked.
//! - [`code`]: what the binaries' code registers (metric names), read as text.
//! - [`moto`]: moto, from the project's venv, as the STS.
//! - [`stack`]: a real podiam server with moto, the proxy and a PKI, for end-to-end tests.
//! - [`sts_proxy`]: a counting, fault-injecting proxy in front of moto (a test double).
//! - [`manifests`]: loads multi-document YAML manifests into the stand-in.
//! - [`netns`]: network namespaces: `ip` commands, sockets made inside a namespace.
//! - [`sandbox`]: the one-machine cluster of `podiam-sandbox` (state, control, supervisor).
//! - [`process`]: podiam binaries as child processes (admin address, RSS, CPU).
//! - [`objects`]: builders for the Pod, Namespace, ServiceAccount and association manifests.
//! - [`strict_json`]: JSON log lines read strictly (no key twice).

// Test doubles and benchmarks measure and wait in real time, not the product's clock.
#![allow(clippy::disallowed_methods)]

pub mod admission;
pub mod api_client;
pub mod certs;
pub mod chaos;
pub mod code;
pub mod fake_imds;
pub mod fake_sts;
pub mod http;
pub mod imds_client;
pub mod kube_api;
pub mod manifests;
pub mod moto;
pub mod netns;
pub mod objects;
pub mod process;
pub mod sandbox;
pub mod stack;
pub mod strict_json;
pub mod sts_proxy;
