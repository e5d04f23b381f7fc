//! The container-credentials path (EKS Pod Identity's contract), as the SDKs, the agent,
//! the server and the admission webhook share it.
//!
//! A pod's SDK reads [`ENV_FULL_URI`] and [`ENV_TOKEN_FILE`], sends the token file's
//! content as `Authorization` (no `Bearer`) to the agent at [`ADDRESS_V4`] or
//! [`ADDRESS_V6`] port 80, and gets [`CredentialsDocument`] back. The token is the pod's
//! projected ServiceAccount token for [`DEFAULT_AUDIENCE`]; the names below are EKS's, so
//! pod specs written for EKS Pod Identity work unchanged.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// The endpoint's IPv4 address.
pub const ADDRESS_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 23);
/// The endpoint's IPv6 address.
pub const ADDRESS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23);
/// The only path served.
pub const PATH: &str = "/v1/credentials";
/// The URI injected for IPv4 (and dual-stack) pods.
pub const FULL_URI_V4: &str = "http://169.254.170.23/v1/credentials";
/// The URI injected for IPv6-only pods.
pub const FULL_URI_V6: &str = "http://[fd00:ec2::23]/v1/credentials";
/// The audience of the pods' tokens (EKS Pod Identity's).
pub const DEFAULT_AUDIENCE: &str = "pods.eks.amazonaws.com";
/// The SDKs' variable for the endpoint.
pub const ENV_FULL_URI: &str = "AWS_CONTAINER_CREDENTIALS_FULL_URI";
/// The SDKs' variable for the token file (re-read at every fetch).
pub const ENV_TOKEN_FILE: &str = "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE";
/// The projected token volume's name.
pub const TOKEN_VOLUME: &str = "eks-pod-identity-token";
/// Where the volume is mounted.
pub const TOKEN_DIR: &str = "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount";
/// The token's file name in the volume.
pub const TOKEN_FILE: &str = "eks-pod-identity-token";
/// The token's lifetime the webhook asks for (the kubelet refreshes it at 80 %).
pub const TOKEN_EXPIRATION_SECS: i64 = 86_400;
/// ServiceAccount: the role of pods running as it (IRSA's annotation, which many charts
/// already set).
pub const ROLE_ARN_ANNOTATION: &str = "eks.amazonaws.com/role-arn";
/// Pod: containers the webhook leaves alone (`a,b`), as EKS's webhook reads it.
pub const SKIP_CONTAINERS_ANNOTATION: &str = "eks.amazonaws.com/skip-containers";
/// Pod label: the webhook mutated the pod.
pub const MUTATED_LABEL: &str = "podiam.io/pod-identity";

/// The association object (a CRD): its API group.
pub const GROUP: &str = "podiam.io";
/// Its version.
pub const VERSION: &str = "v1alpha1";
/// Its kind.
pub const KIND: &str = "PodIdentityAssociation";
/// Its plural (the URL segment).
pub const PLURAL: &str = "podidentityassociations";

/// The path of the token file in a container.
pub fn token_path() -> String {
    format!("{TOKEN_DIR}/{TOKEN_FILE}")
}

/// Whether `ip` is one of the endpoint's addresses.
pub fn is_endpoint(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4 == ADDRESS_V4,
        IpAddr::V6(v6) => v6 == ADDRESS_V6 || v6.to_ipv4_mapped() == Some(ADDRESS_V4),
    }
}

/// What the container-credentials provider of every SDK reads (`Expiration` is required
/// by all of them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CredentialsDocument {
    /// `ASIA...`.
    pub access_key_id: String,
    /// The secret key.
    pub secret_access_key: Secret,
    /// The session token.
    pub token: Secret,
    /// The role's account.
    pub account_id: String,
    /// When they expire.
    #[serde(with = "crate::protocol::rfc3339")]
    pub expiration: SystemTime,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_addresses() {
        assert!(is_endpoint("169.254.170.23".parse().unwrap()));
        assert!(is_endpoint("fd00:ec2::23".parse().unwrap()));
        assert!(is_endpoint("::ffff:169.254.170.23".parse().unwrap()));
        assert!(!is_endpoint("169.254.169.254".parse().unwrap()));
        assert_eq!(
            FULL_URI_V6,
            format!("http://[{ADDRESS_V6}]{PATH}"),
            "the addresses and URIs agree"
        );
        assert_eq!(FULL_URI_V4, format!("http://{ADDRESS_V4}{PATH}"));
    }
}
