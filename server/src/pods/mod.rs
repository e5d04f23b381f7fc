//! Pod identity: which pod has an IP and what it is annotated with.
//!
//! [`PodIndex`] is a plain synchronous index of [`PodInfo`], the part of a Pod object the
//! server reads ([`resources`] strips Pod and Namespace objects down to it). It knows
//! nothing of policy or of Kubernetes clients: [`crate::cluster`] watches and locks it.

mod index;
pub mod resources;

pub use self::index::{
    IpLookup, PodAnnotations, PodIndex, PodInfo, PodIps, PodKey, PodPhase, PodUid, canonical,
};
