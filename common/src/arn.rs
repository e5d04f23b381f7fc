//! IAM role ARNs.
//!
//! A pod names its role in one of three forms: a bare name (`web`), a path and name
//! (`team-a/web`, with or without a leading slash), or a full ARN
//! (`arn:aws:iam::123456789012:role/team-a/web`). The first two are resolved against a
//! [`BaseRoleArn`]. Every form is checked against IAM's own rules, so that a malformed
//! value is refused here, with the reason, rather than by STS later.

use std::{fmt, str::FromStr, sync::Arc};

/// The AWS partitions podiam accepts in role ARNs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Partition {
    /// `aws`: the commercial regions.
    Aws,
    /// `aws-cn`: the China regions.
    AwsCn,
    /// `aws-us-gov`: GovCloud (US).
    AwsUsGov,
    /// `aws-iso`: the US ISO regions.
    AwsIso,
    /// `aws-iso-b`: the US ISOB regions.
    AwsIsoB,
}

/// A validated IAM role ARN, `arn:PARTITION:iam::ACCOUNT:role/PATH/NAME`. Cheap to clone;
/// its parts are derived from the validated text on access.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoleArn {
    full: Arc<str>,
}

/// The prefix that bare role names are resolved against:
/// `arn:PARTITION:iam::ACCOUNT:role/` plus an optional path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseRoleArn {
    /// Always ends with `/`.
    prefix: String,
}

/// Why a role ARN or role name was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ArnError {
    /// The value was empty or only white space.
    #[error("the role is empty")]
    Empty,
    /// A full ARN must have six `:`-separated fields.
    #[error("{0:?} is not an ARN: expected arn:PARTITION:iam::ACCOUNT:role/NAME")]
    Malformed(String),
    /// The partition is not one podiam knows.
    #[error("unknown partition {0:?}: expected one of aws, aws-cn, aws-us-gov, aws-iso, aws-iso-b")]
    UnknownPartition(String),
    /// The ARN is not an IAM ARN.
    #[error("service {0:?} is not iam: a role ARN reads arn:PARTITION:iam::ACCOUNT:role/NAME")]
    NotIam(String),
    /// IAM ARNs have no region.
    #[error("IAM ARNs have an empty region field, found {0:?}")]
    Region(String),
    /// The account is not 12 digits.
    #[error("account {0:?} is not a 12-digit AWS account ID")]
    Account(String),
    /// The resource is an assumed-role session, not a role.
    #[error(
        "{0:?} is an assumed-role session ARN, not a role: use arn:PARTITION:iam::ACCOUNT:role/NAME"
    )]
    AssumedRole(String),
    /// The resource is not a role.
    #[error("resource {0:?} is not a role: expected role/NAME or role/PATH/NAME")]
    NotRole(String),
    /// The role path breaks IAM's rules.
    #[error("role path {0:?} is invalid: at most 512 printable ASCII characters, no spaces")]
    Path(String),
    /// The role name breaks IAM's rules.
    #[error("role name {0:?} is invalid: 1 to 64 characters of letters, digits and + = , . @ _ -")]
    Name(String),
    /// A bare name was given but no base ARN is configured.
    #[error("role {0:?} is not a full ARN and no base role ARN is configured (--base-role-arn)")]
    NoBase(String),
}

const MAX_PATH: usize = 512;
const MAX_NAME: usize = 64;

// === impl Partition ===

impl Partition {
    const ALL: [Partition; 5] = [
        Partition::Aws,
        Partition::AwsCn,
        Partition::AwsUsGov,
        Partition::AwsIso,
        Partition::AwsIsoB,
    ];

    /// The partition's name as it appears in ARNs.
    pub fn as_str(self) -> &'static str {
        match self {
            Partition::Aws => "aws",
            Partition::AwsCn => "aws-cn",
            Partition::AwsUsGov => "aws-us-gov",
            Partition::AwsIso => "aws-iso",
            Partition::AwsIsoB => "aws-iso-b",
        }
    }

    fn parse(s: &str) -> Result<Self, ArnError> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| ArnError::UnknownPartition(s.to_string()))
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl RoleArn ===

impl RoleArn {
    /// Parses a full role ARN.
    pub fn parse(value: &str) -> Result<Self, ArnError> {
        let value = value.trim();
        if value.is_empty() {
            return Err(ArnError::Empty);
        }
        let (partition, account, resource) = split_iam_arn(value)?;
        let Some(rest) = resource.strip_prefix("role/") else {
            if resource.starts_with("assumed-role/") {
                return Err(ArnError::AssumedRole(value.to_string()));
            }
            return Err(ArnError::NotRole(resource.to_string()));
        };
        // `rest` is `PATH/NAME` without the leading slash of the path.
        let (path, name) = match rest.rfind('/') {
            Some(i) => (&rest[..=i], &rest[i + 1..]),
            None => ("", rest),
        };
        let path = format!("/{path}");
        validate_path(&path)?;
        validate_name(name)?;

        let full = format!("arn:{}:iam::{account}:role{path}{name}", partition.as_str());
        Ok(Self { full: full.into() })
    }

    /// Resolves what a pod annotation (or `--default-role`) says: a full ARN is parsed as
    /// it is; a bare name or `path/name` is appended to `base`.
    pub fn resolve(value: &str, base: Option<&BaseRoleArn>) -> Result<Self, ArnError> {
        let value = value.trim();
        if value.is_empty() {
            return Err(ArnError::Empty);
        }
        if value.starts_with("arn:") {
            return Self::parse(value);
        }
        let base = base.ok_or_else(|| ArnError::NoBase(value.to_string()))?;
        // kube2iam and kiam both accept a leading slash on `path/name`.
        let relative = value.trim_start_matches('/');
        if relative.is_empty() {
            return Err(ArnError::Name(value.to_string()));
        }
        Self::parse(&format!("{}{relative}", base.prefix))
    }

    /// The whole ARN.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The partition.
    pub fn partition(&self) -> Partition {
        let name = self.full.split(':').nth(1).unwrap_or_default();
        // `full` was validated in `parse`, so the partition is one of ours.
        Partition::parse(name).unwrap_or(Partition::Aws)
    }

    /// The 12-digit account ID.
    pub fn account(&self) -> &str {
        self.full.split(':').nth(4).unwrap_or_default()
    }

    /// The role's path: `/` or `/a/b/`.
    pub fn path(&self) -> &str {
        let (path, _) = self.path_and_name();
        path
    }

    /// The role's name, without its path.
    pub fn name(&self) -> &str {
        let (_, name) = self.path_and_name();
        name
    }

    /// Whether a pod asking for `requested` (the name in the metadata URL, or the full
    /// ARN; surrounding blanks ignored) asks for this role.
    pub fn answers_to(&self, requested: &str) -> bool {
        let requested = requested.trim();
        requested == self.as_str() || requested == self.name()
    }

    fn path_and_name(&self) -> (&str, &str) {
        // `full` is `arn:P:iam::A:role/PATH/NAME`; the resource starts after the fifth ':'.
        let resource = self.full.splitn(6, ':').nth(5).unwrap_or_default();
        let rest = resource.strip_prefix("role").unwrap_or(resource);
        let cut = rest.rfind('/').map_or(0, |i| i + 1);
        rest.split_at(cut)
    }
}

impl fmt::Display for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RoleArn").field(&self.full).finish()
    }
}

impl FromStr for RoleArn {
    type Err = ArnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for RoleArn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.full)
    }
}

impl<'de> serde::Deserialize<'de> for RoleArn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

// === impl BaseRoleArn ===

impl BaseRoleArn {
    /// The base for `account` in `partition`, with no path: `arn:PARTITION:iam::ACCOUNT:role/`.
    pub fn for_account(partition: Partition, account: &str) -> Result<Self, ArnError> {
        format!("arn:{partition}:iam::{account}:role/").parse()
    }

    /// The prefix, ending with `/`.
    pub fn as_str(&self) -> &str {
        &self.prefix
    }
}

impl FromStr for BaseRoleArn {
    type Err = ArnError;

    /// Accepts `arn:PARTITION:iam::ACCOUNT:role/` with an optional path after it; the
    /// trailing slash may be left out.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let value = value.trim();
        if value.is_empty() {
            return Err(ArnError::Empty);
        }
        let (partition, account, resource) = split_iam_arn(value)?;
        let Some(path) = resource.strip_prefix("role") else {
            return Err(ArnError::NotRole(resource.to_string()));
        };
        let mut path = if path.is_empty() {
            "/".to_string()
        } else if path.starts_with('/') {
            path.to_string()
        } else {
            return Err(ArnError::NotRole(resource.to_string()));
        };
        if !path.ends_with('/') {
            path.push('/');
        }
        validate_path(&path)?;
        Ok(Self {
            prefix: format!("arn:{}:iam::{account}:role{path}", partition.as_str()),
        })
    }
}

impl fmt::Display for BaseRoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.prefix)
    }
}

// === helpers ===

/// Splits `arn:PARTITION:iam::ACCOUNT:RESOURCE`, checking every field but the resource.
fn split_iam_arn(value: &str) -> Result<(Partition, &str, &str), ArnError> {
    let mut fields = value.splitn(6, ':');
    let (Some("arn"), Some(partition), Some(service), Some(region), Some(account), Some(resource)) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(ArnError::Malformed(value.to_string()));
    };
    let partition = Partition::parse(partition)?;
    if service != "iam" {
        return Err(ArnError::NotIam(service.to_string()));
    }
    if !region.is_empty() {
        return Err(ArnError::Region(region.to_string()));
    }
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ArnError::Account(account.to_string()));
    }
    Ok((partition, account, resource))
}

/// IAM: `/` or `/` + printable ASCII (U+0021..U+007E) + `/`, at most 512 characters.
/// Empty, `.` and `..` segments are refused too: `team/../admin` must not pass a policy
/// written for `team/*` while naming another role.
fn validate_path(path: &str) -> Result<(), ArnError> {
    let inner = path
        .strip_prefix('/')
        .and_then(|p| p.strip_suffix('/'))
        .unwrap_or_default();
    let ok = path.len() <= MAX_PATH
        && path.starts_with('/')
        && path.ends_with('/')
        && path.bytes().all(|b| (0x21..=0x7e).contains(&b))
        && (path == "/"
            || inner
                .split('/')
                .all(|seg| !seg.is_empty() && seg != "." && seg != ".."));
    if ok {
        Ok(())
    } else {
        Err(ArnError::Path(path.to_string()))
    }
}

/// IAM: `[\w+=,.@-]{1,64}`.
fn validate_name(name: &str) -> Result<(), ArnError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ArnError::Name(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> BaseRoleArn {
        "arn:aws:iam::123456789012:role/".parse().unwrap()
    }

    #[test]
    fn parses_full_arns_in_every_partition() {
        for p in ["aws", "aws-cn", "aws-us-gov", "aws-iso", "aws-iso-b"] {
            let s = format!("arn:{p}:iam::123456789012:role/web");
            let arn = RoleArn::parse(&s).unwrap();
            assert_eq!(arn.as_str(), s);
            assert_eq!(arn.partition().as_str(), p);
            assert_eq!(arn.account(), "123456789012");
            assert_eq!(arn.path(), "/");
            assert_eq!(arn.name(), "web");
        }
    }

    #[test]
    fn parses_paths() {
        let arn = RoleArn::parse("arn:aws:iam::123456789012:role/team-a/svc/web").unwrap();
        assert_eq!(arn.path(), "/team-a/svc/");
        assert_eq!(arn.name(), "web");
        assert_eq!(
            arn.to_string(),
            "arn:aws:iam::123456789012:role/team-a/svc/web"
        );
    }

    #[test]
    fn rejects_bad_arns_with_the_reason() {
        type Check = fn(&ArnError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, ArnError::Empty)),
            ("   ", |e| matches!(e, ArnError::Empty)),
            ("arn:aws:iam::123456789012", |e| {
                matches!(e, ArnError::Malformed(_))
            }),
            (
                "arn:aws-iso-e:iam::123456789012:role/x",
                |e| matches!(e, ArnError::UnknownPartition(p) if p == "aws-iso-e"),
            ),
            ("arn:azure:iam::123456789012:role/x", |e| {
                matches!(e, ArnError::UnknownPartition(_))
            }),
            (
                "arn:aws:s3::123456789012:role/x",
                |e| matches!(e, ArnError::NotIam(s) if s == "s3"),
            ),
            ("arn:aws:iam:us-east-1:123456789012:role/x", |e| {
                matches!(e, ArnError::Region(_))
            }),
            ("arn:aws:iam::12345:role/x", |e| {
                matches!(e, ArnError::Account(_))
            }),
            ("arn:aws:iam::12345678901a:role/x", |e| {
                matches!(e, ArnError::Account(_))
            }),
            ("arn:aws:iam::123456789012:user/x", |e| {
                matches!(e, ArnError::NotRole(_))
            }),
            ("arn:aws:sts::123456789012:assumed-role/x/s", |e| {
                matches!(e, ArnError::NotIam(_))
            }),
            ("arn:aws:iam::123456789012:assumed-role/x/s", |e| {
                matches!(e, ArnError::AssumedRole(_))
            }),
            ("arn:aws:iam::123456789012:role/", |e| {
                matches!(e, ArnError::Name(_))
            }),
            ("arn:aws:iam::123456789012:role/a b", |e| {
                matches!(e, ArnError::Name(_))
            }),
            ("arn:aws:iam::123456789012:role/a:b", |e| {
                matches!(e, ArnError::Name(_))
            }),
            ("arn:aws:iam::123456789012:role/ä", |e| {
                matches!(e, ArnError::Name(_))
            }),
            ("arn:aws:iam::123456789012:role/pa th/x", |e| {
                matches!(e, ArnError::Path(_))
            }),
            ("arn:aws:iam::123456789012:role/team/../admin", |e| {
                matches!(e, ArnError::Path(_))
            }),
            ("arn:aws:iam::123456789012:role/./admin", |e| {
                matches!(e, ArnError::Path(_))
            }),
            ("arn:aws:iam::123456789012:role/team//admin", |e| {
                matches!(e, ArnError::Path(_))
            }),
        ];
        for (input, check) in cases {
            let err = RoleArn::parse(input).unwrap_err();
            assert!(check(&err), "{input:?}: unexpected {err:?}");
            assert!(!err.to_string().is_empty());
        }
        let long = format!("arn:aws:iam::123456789012:role/{}", "a".repeat(65));
        assert!(matches!(RoleArn::parse(&long), Err(ArnError::Name(_))));
        let ok = format!("arn:aws:iam::123456789012:role/{}", "a".repeat(64));
        assert!(RoleArn::parse(&ok).is_ok());
        let long_path = format!("arn:aws:iam::123456789012:role/{}/x", "p".repeat(511));
        assert!(matches!(RoleArn::parse(&long_path), Err(ArnError::Path(_))));
    }

    #[test]
    fn resolves_names_against_the_base() {
        let b = base();
        let cases = [
            ("web", "arn:aws:iam::123456789012:role/web"),
            ("team/web", "arn:aws:iam::123456789012:role/team/web"),
            ("/team/web", "arn:aws:iam::123456789012:role/team/web"),
            (" web\n", "arn:aws:iam::123456789012:role/web"),
            (
                "arn:aws-cn:iam::210987654321:role/other",
                "arn:aws-cn:iam::210987654321:role/other",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(RoleArn::resolve(input, Some(&b)).unwrap().as_str(), want);
        }
        let pathed: BaseRoleArn = "arn:aws:iam::123456789012:role/pods".parse().unwrap();
        assert_eq!(pathed.as_str(), "arn:aws:iam::123456789012:role/pods/");
        let arn = RoleArn::resolve("web", Some(&pathed)).unwrap();
        assert_eq!(arn.path(), "/pods/");
        // A relative name cannot climb out of the base path.
        assert!(matches!(
            RoleArn::resolve("../admin", Some(&pathed)),
            Err(ArnError::Path(_))
        ));
        assert_eq!(arn.name(), "web");
    }

    #[test]
    fn resolving_a_name_without_a_base_says_so() {
        assert_eq!(
            RoleArn::resolve("web", None).unwrap_err(),
            ArnError::NoBase("web".into())
        );
        assert!(RoleArn::resolve("arn:aws:iam::123456789012:role/web", None).is_ok());
        assert!(matches!(
            RoleArn::resolve("/", Some(&base())),
            Err(ArnError::Name(_))
        ));
        assert!(matches!(
            RoleArn::resolve("a b", Some(&base())),
            Err(ArnError::Name(_))
        ));
    }

    #[test]
    fn base_arns() {
        assert_eq!(base().as_str(), "arn:aws:iam::123456789012:role/");
        for bad in [
            "arn:aws:iam::123456789012:user/",
            "arn:aws:iam::123456789012:roles/",
            "arn:aws:iam::123:role/",
            "123456789012",
        ] {
            assert!(bad.parse::<BaseRoleArn>().is_err(), "{bad}");
        }
        let b = BaseRoleArn::for_account(Partition::AwsUsGov, "123456789012").unwrap();
        assert_eq!(b.as_str(), "arn:aws-us-gov:iam::123456789012:role/");
    }

    #[test]
    fn serde_round_trip_validates() {
        let arn = RoleArn::parse("arn:aws:iam::123456789012:role/web").unwrap();
        let json = serde_json::to_string(&arn).unwrap();
        assert_eq!(json, "\"arn:aws:iam::123456789012:role/web\"");
        assert_eq!(serde_json::from_str::<RoleArn>(&json).unwrap(), arn);
        assert!(serde_json::from_str::<RoleArn>("\"arn:aws:iam::1:role/x\"").is_err());
    }
}
