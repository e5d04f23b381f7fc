//! The redirect as iptables rules, as pure data: which interfaces, which chain, what text
//! `iptables-restore` is given. Installing it is [`super::Interceptor`]'s job.
//!
//! Our own chain `PODIAM` in the nat table holds the DNAT; PREROUTING jumps to it once per
//! interface pattern, each jump tagged with a comment so that only our rules are ever
//! touched. The chain is replaced atomically (one `iptables-restore --noflush` commit),
//! so at no moment is the redirect missing while it is updated.

use std::{fmt, net::SocketAddr};

/// Our chain in the nat table.
pub const CHAIN: &str = "PODIAM";
/// The comment on our PREROUTING jumps.
pub const COMMENT: &str = "podiam: redirect the metadata service to the agent";
/// The metadata service address and port.
pub const METADATA_V4: &str = "169.254.169.254";
/// The IPv6 metadata address (Nitro instances).
pub const METADATA_V6: &str = "fd00:ec2::254";

/// One `--host-interface` entry: `cali+`, `eni+`, `eth0`, `!eth0`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceSpec {
    /// `!name`: every interface but this one.
    pub negate: bool,
    /// The name, with a trailing `+` for a prefix.
    pub name: String,
}

/// The interface syntax is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid --host-interface {value:?}: {reason}")]
pub struct SpecError {
    value: String,
    reason: &'static str,
}

/// The rules for one address family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    /// Where matching connections go (the agent's listener).
    pub target: SocketAddr,
    /// Which interfaces are pods'.
    pub interfaces: Vec<InterfaceSpec>,
}

// === impl InterfaceSpec ===

impl InterfaceSpec {
    /// Parses a comma-separated list (kiam and kube2iam syntax).
    pub fn parse_list(value: &str) -> Result<Vec<Self>, SpecError> {
        let err = |reason| SpecError {
            value: value.to_string(),
            reason,
        };
        let specs = value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|entry| {
                let (negate, name) = match entry.strip_prefix('!') {
                    Some(rest) => (true, rest.trim()),
                    None => (false, entry),
                };
                let base = name.strip_suffix('+').unwrap_or(name);
                if name.is_empty() || name.len() > 15 {
                    return Err(err("interface names are 1 to 15 characters"));
                }
                if base.contains('+')
                    || !base
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
                {
                    return Err(err(
                        "use letters, digits, - _ . @, and a trailing + for a prefix",
                    ));
                }
                if negate && base.is_empty() {
                    return Err(err("`!+` would match no interface"));
                }
                Ok(InterfaceSpec {
                    negate,
                    name: name.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if specs.is_empty() {
            return Err(err("no interface given"));
        }
        Ok(specs)
    }

    /// Whether this names one interface (no `+`, not negated), which must then exist.
    pub fn exact(&self) -> Option<&str> {
        (!self.negate && !self.name.ends_with('+')).then_some(self.name.as_str())
    }

    fn match_args(&self) -> String {
        if self.negate {
            format!("! -i {}", self.name)
        } else {
            format!("-i {}", self.name)
        }
    }
}

impl fmt::Display for InterfaceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.negate {
            f.write_str("!")?;
        }
        f.write_str(&self.name)
    }
}

// === impl Rules ===

impl Rules {
    /// The metadata address of this family.
    pub fn metadata(&self) -> &'static str {
        if self.target.is_ipv4() {
            METADATA_V4
        } else {
            METADATA_V6
        }
    }

    /// What `iptables-restore --noflush` is given: our chain, replaced whole.
    pub fn chain_restore(&self) -> String {
        let dest = match self.target {
            SocketAddr::V4(a) => a.to_string(),
            SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
        };
        let prefix = if self.target.is_ipv4() { 32 } else { 128 };
        format!(
            "*nat\n:{CHAIN} - [0:0]\n-A {CHAIN} -d {}/{prefix} -p tcp -m tcp --dport 80 -j DNAT --to-destination {dest}\nCOMMIT\n",
            self.metadata()
        )
    }

    /// The chain as `iptables -S PODIAM` prints it once installed.
    pub fn chain_listing(&self) -> Vec<String> {
        let prefix = if self.target.is_ipv4() { 32 } else { 128 };
        let dest = match self.target {
            SocketAddr::V4(a) => a.to_string(),
            SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
        };
        vec![
            format!("-N {CHAIN}"),
            format!(
                "-A {CHAIN} -d {}/{prefix} -p tcp -m tcp --dport 80 -j DNAT --to-destination {dest}",
                self.metadata()
            ),
        ]
    }

    /// The PREROUTING jump rules (arguments after `-A PREROUTING`).
    pub fn jumps(&self) -> Vec<String> {
        self.interfaces
            .iter()
            .map(|i| {
                format!(
                    "{} -m comment --comment \"{COMMENT}\" -j {CHAIN}",
                    i.match_args()
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_syntax() {
        let specs = InterfaceSpec::parse_list("cali+, eni+,!eth0").unwrap();
        assert_eq!(
            specs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["cali+", "eni+", "!eth0"]
        );
        assert_eq!(specs[2].exact(), None);
        assert_eq!(
            InterfaceSpec::parse_list("docker0").unwrap()[0].exact(),
            Some("docker0")
        );
        for bad in [
            "",
            ",",
            "ca+li",
            "eth 0",
            "this-name-is-too-long",
            "!",
            "!+",
            "e;th0",
            "eth0$",
        ] {
            assert!(InterfaceSpec::parse_list(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rule_text() {
        let rules = Rules {
            target: "10.1.2.3:8181".parse().unwrap(),
            interfaces: InterfaceSpec::parse_list("cali+,!eth0").unwrap(),
        };
        assert_eq!(
            rules.chain_restore(),
            "*nat\n:PODIAM - [0:0]\n-A PODIAM -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.1.2.3:8181\nCOMMIT\n"
        );
        assert_eq!(
            rules.jumps(),
            [
                format!("-i cali+ -m comment --comment \"{COMMENT}\" -j PODIAM"),
                format!("! -i eth0 -m comment --comment \"{COMMENT}\" -j PODIAM"),
            ]
        );
        let v6 = Rules {
            target: "[fd00::1]:8181".parse().unwrap(),
            interfaces: InterfaceSpec::parse_list("eni+").unwrap(),
        };
        assert!(
            v6.chain_restore().contains("-d fd00:ec2::254/128")
                && v6.chain_restore().contains("[fd00::1]:8181")
        );
    }
}
