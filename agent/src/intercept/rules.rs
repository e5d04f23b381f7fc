//! The interception as iptables rules, as pure data: which chains, which rules, which
//! jumps into the built-in chains, and what text `iptables-restore` is given. Installing
//! them is [`super::Interceptor`]'s job.
//!
//! Per address family, three chains of our own, each replaced atomically (one
//! `iptables-restore --noflush` commit, so no rule is ever missing while it changes):
//!
//! - nat `PODIAM`: the DNAT of the metadata address to the agent, jumped to from
//!   PREROUTING for each pod-interface pattern. Only when the family is redirected.
//! - filter `PODIAM-BLOCK`: refuses (TCP reset) pods' traffic to the metadata address that
//!   was not redirected, jumped to from INPUT and FORWARD for each pod-interface pattern.
//!   Redirected traffic no longer has that destination, so only what escaped the DNAT
//!   (no DNAT for this family, a rule flushed by someone else) meets it. Installed first,
//!   for every family, so a pod never reaches the node's metadata service.
//! - filter `PODIAM-GUARD`: the agent's listener takes only connections that the DNAT
//!   brought from the metadata address; anything else (another host hitting
//!   `$HOST_IP:8181`, a pod dialling it directly) is reset. Jumped to from INPUT.
//!
//! Each jump carries a comment naming its chain, so only our rules are ever touched.

use std::{fmt, net::SocketAddr};

/// Our DNAT chain in the nat table.
pub const CHAIN: &str = "PODIAM";
/// Our chain refusing pods' unredirected metadata traffic (filter table).
pub const BLOCK: &str = "PODIAM-BLOCK";
/// Our chain guarding the agent's listener (filter table).
pub const GUARD: &str = "PODIAM-GUARD";
/// The comment on our PREROUTING jumps.
pub const COMMENT: &str = "podiam: redirect the metadata service to the agent";
/// The comment on our jumps to [`BLOCK`].
pub const BLOCK_COMMENT: &str = "podiam: refuse metadata traffic from pods that was not redirected";
/// The comment on our jump to [`GUARD`].
pub const GUARD_COMMENT: &str = "podiam: only redirected pod traffic reaches the agent";
/// The metadata service address and port.
pub const METADATA_V4: &str = "169.254.169.254";
/// The IPv6 metadata address (Nitro instances).
pub const METADATA_V6: &str = "fd00:ec2::254";
/// The container-credentials address (EKS Pod Identity's).
pub const POD_IDENTITY_V4: &str = "169.254.170.23";
/// Its IPv6 address.
pub const POD_IDENTITY_V6: &str = "fd00:ec2::23";

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
#[error("invalid {flag} {value:?}: {reason}")]
pub struct SpecError {
    flag: &'static str,
    value: String,
    reason: &'static str,
}

/// The rules of one address family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    /// IPv4 or IPv6.
    pub v4: bool,
    /// Where redirected connections go (the agent's listener); `None`: this family is not
    /// redirected, only blocked.
    pub target: Option<SocketAddr>,
    /// Which interfaces are pods'.
    pub interfaces: Vec<InterfaceSpec>,
    /// The container-credentials endpoint is served on this port of the target's address:
    /// its address is redirected there (and refused when not redirected) like the
    /// metadata address. `None`: that address is left alone.
    pub pod_identity: Option<u16>,
}

/// One chain of ours: its table, its rules, and the jumps into built-in chains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    /// `nat` or `filter`.
    pub table: &'static str,
    /// Its name.
    pub name: &'static str,
    /// Its rules as `iptables -S` prints them, without the `-A NAME ` prefix.
    pub rules: Vec<String>,
    /// (built-in chain, rule) pairs jumping here; each rule carries `comment`.
    pub jumps: Vec<(&'static str, String)>,
    /// The comment that marks our jumps here.
    pub comment: &'static str,
}

// === impl InterfaceSpec ===

impl InterfaceSpec {
    /// Parses a comma-separated list (kiam and kube2iam syntax) given to `flag`.
    pub fn parse_list(flag: &'static str, value: &str) -> Result<Vec<Self>, SpecError> {
        let specs = Self::parse_entries(flag, value)?;
        if specs.is_empty() {
            return Err(SpecError {
                flag,
                value: value.to_string(),
                reason: "no interface given",
            });
        }
        Ok(specs)
    }

    /// Like [`InterfaceSpec::parse_list`], but an empty list is fine.
    pub fn parse_entries(flag: &'static str, value: &str) -> Result<Vec<Self>, SpecError> {
        let err = |reason| SpecError {
            flag,
            value: value.to_string(),
            reason,
        };
        value
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
            .collect()
    }

    /// Whether this names one interface (no `+`, not negated), which must then exist.
    pub fn exact(&self) -> Option<&str> {
        (!self.negate && !self.name.ends_with('+')).then_some(self.name.as_str())
    }

    /// Whether iptables' `-i` with this pattern matches `interface`.
    pub fn matches(&self, interface: &str) -> bool {
        let hit = match self.name.strip_suffix('+') {
            Some(prefix) => interface.starts_with(prefix),
            None => interface == self.name,
        };
        hit != self.negate
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
        if self.v4 { METADATA_V4 } else { METADATA_V6 }
    }

    /// The container-credentials address of this family.
    pub fn pod_identity_address(&self) -> &'static str {
        if self.v4 {
            POD_IDENTITY_V4
        } else {
            POD_IDENTITY_V6
        }
    }

    /// The addresses redirected (or refused), with the port each goes to on the target.
    fn endpoints(&self, metadata_port: u16) -> Vec<(&'static str, u16)> {
        let mut endpoints = vec![(self.metadata(), metadata_port)];
        if let Some(port) = self.pod_identity {
            endpoints.push((self.pod_identity_address(), port));
        }
        endpoints
    }

    fn host_prefix(&self) -> u8 {
        if self.v4 { 32 } else { 128 }
    }

    /// Our chains, in the order they are installed: the block first, so that pods never
    /// reach the node's metadata service, even while the redirect is not in place yet.
    pub fn chains(&self) -> Vec<Chain> {
        let mut chains = vec![self.block()];
        if let Some(target) = self.target {
            chains.push(self.dnat(target));
            chains.push(self.guard(target));
        }
        chains
    }

    fn per_interface(
        &self,
        builtin: &'static str,
        chain: &str,
        comment: &str,
    ) -> Vec<(&'static str, String)> {
        self.interfaces
            .iter()
            .map(|i| {
                (
                    builtin,
                    format!(
                        "{} -m comment --comment \"{comment}\" -j {chain}",
                        i.match_args()
                    ),
                )
            })
            .collect()
    }

    fn block(&self) -> Chain {
        let mut jumps = self.per_interface("INPUT", BLOCK, BLOCK_COMMENT);
        jumps.extend(self.per_interface("FORWARD", BLOCK, BLOCK_COMMENT));
        Chain {
            table: "filter",
            name: BLOCK,
            rules: self
                .endpoints(0)
                .into_iter()
                .map(|(address, _)| {
                    format!(
                        "-d {address}/{} -p tcp -m tcp --dport 80 -j REJECT --reject-with tcp-reset",
                        self.host_prefix()
                    )
                })
                .collect(),
            jumps,
            comment: BLOCK_COMMENT,
        }
    }

    fn dnat(&self, target: SocketAddr) -> Chain {
        Chain {
            table: "nat",
            name: CHAIN,
            rules: self
                .endpoints(target.port())
                .into_iter()
                .map(|(address, port)| {
                    format!(
                        "-d {address}/{} -p tcp -m tcp --dport 80 -j DNAT --to-destination {}",
                        self.host_prefix(),
                        bracketed(SocketAddr::new(target.ip(), port))
                    )
                })
                .collect(),
            jumps: {
                let mut jumps = self.per_interface("PREROUTING", CHAIN, COMMENT);
                // Host-network pods reach the container-credentials address from the node
                // itself: their connections are redirected too (the node's own traffic to
                // the metadata address is not: the jump matches only this address).
                if self.pod_identity.is_some() {
                    jumps.push((
                        "OUTPUT",
                        format!(
                            "-d {}/{} -p tcp -m tcp --dport 80 -m comment --comment \"{COMMENT}\" -j {CHAIN}",
                            self.pod_identity_address(),
                            self.host_prefix()
                        ),
                    ));
                }
                jumps
            },
            comment: COMMENT,
        }
    }

    fn guard(&self, target: SocketAddr) -> Chain {
        let mut rules = Vec::new();
        for (address, port) in self.endpoints(target.port()) {
            let listener = format!(
                "-d {}/{} -p tcp -m tcp --dport {port}",
                target.ip(),
                self.host_prefix(),
            );
            rules.push(format!(
                "{listener} -m conntrack --ctstate DNAT --ctorigdst {address} --ctorigdstport 80 -j RETURN"
            ));
            rules.push(format!("{listener} -j REJECT --reject-with tcp-reset"));
        }
        Chain {
            table: "filter",
            name: GUARD,
            rules,
            jumps: vec![(
                "INPUT",
                format!("-m comment --comment \"{GUARD_COMMENT}\" -j {GUARD}"),
            )],
            comment: GUARD_COMMENT,
        }
    }
}

fn bracketed(target: SocketAddr) -> String {
    match target {
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    }
}

// === impl Chain ===

impl Chain {
    /// What `iptables-restore --noflush` is given: the chain, replaced whole.
    pub fn restore(&self) -> String {
        let mut text = format!("*{}\n:{} - [0:0]\n", self.table, self.name);
        for rule in &self.rules {
            text.push_str(&format!("-A {} {rule}\n", self.name));
        }
        text.push_str("COMMIT\n");
        text
    }

    /// The chain as `iptables -S NAME` prints it once installed.
    pub fn listing(&self) -> Vec<String> {
        std::iter::once(format!("-N {}", self.name))
            .chain(self.rules.iter().map(|r| format!("-A {} {r}", self.name)))
            .collect()
    }

    /// The built-in chains it is jumped to from.
    pub fn builtins(&self) -> Vec<&'static str> {
        let mut builtins: Vec<&'static str> = self.jumps.iter().map(|(b, _)| *b).collect();
        builtins.dedup();
        builtins
    }

    /// The jump rules wanted in `builtin` (arguments after `-A BUILTIN`).
    pub fn jumps_in(&self, builtin: &str) -> Vec<&str> {
        self.jumps
            .iter()
            .filter(|(b, _)| *b == builtin)
            .map(|(_, rule)| rule.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: &str) -> Result<Vec<InterfaceSpec>, SpecError> {
        InterfaceSpec::parse_list("--host-interface", value)
    }

    #[test]
    fn interface_syntax() {
        let specs = parse("cali+, eni+,!eth0").unwrap();
        assert_eq!(
            specs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["cali+", "eni+", "!eth0"]
        );
        assert_eq!(specs[2].exact(), None);
        assert_eq!(parse("docker0").unwrap()[0].exact(), Some("docker0"));
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
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(
            InterfaceSpec::parse_entries("--ignore-interface", "")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn interface_patterns_match_as_iptables_does() {
        let specs = parse("cali+,eth1,!eth0").unwrap();
        assert!(specs[0].matches("cali1234") && specs[0].matches("cali"));
        assert!(!specs[0].matches("eni1"));
        assert!(specs[1].matches("eth1") && !specs[1].matches("eth10"));
        assert!(specs[2].matches("veth9") && !specs[2].matches("eth0"));
        let negated_prefix = parse("!eth+").unwrap();
        assert!(!negated_prefix[0].matches("eth3") && negated_prefix[0].matches("cali1"));
    }

    #[test]
    fn rule_text() {
        let rules = Rules {
            v4: true,
            target: Some("10.1.2.3:8181".parse().unwrap()),
            interfaces: parse("cali+,!eth0").unwrap(),
            pod_identity: None,
        };
        let chains = rules.chains();
        let names: Vec<&str> = chains.iter().map(|c| c.name).collect();
        assert_eq!(names, [BLOCK, CHAIN, GUARD], "the block goes in first");
        assert_eq!(
            chains[1].restore(),
            "*nat\n:PODIAM - [0:0]\n-A PODIAM -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.1.2.3:8181\nCOMMIT\n"
        );
        assert_eq!(
            chains[1].jumps_in("PREROUTING"),
            [
                format!("-i cali+ -m comment --comment \"{COMMENT}\" -j PODIAM"),
                format!("! -i eth0 -m comment --comment \"{COMMENT}\" -j PODIAM"),
            ]
        );
        assert_eq!(chains[0].builtins(), ["INPUT", "FORWARD"]);
        assert_eq!(
            chains[0].listing(),
            [
                "-N PODIAM-BLOCK",
                "-A PODIAM-BLOCK -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j REJECT --reject-with tcp-reset"
            ]
        );
        assert_eq!(
            chains[2].listing()[1],
            "-A PODIAM-GUARD -d 10.1.2.3/32 -p tcp -m tcp --dport 8181 -m conntrack --ctstate DNAT --ctorigdst 169.254.169.254 --ctorigdstport 80 -j RETURN"
        );
        let v6 = Rules {
            v4: false,
            target: Some("[fd00::1]:8181".parse().unwrap()),
            interfaces: parse("eni+").unwrap(),
            pod_identity: None,
        };
        let dnat = v6.chains()[1].restore();
        assert!(
            dnat.contains("-d fd00:ec2::254/128") && dnat.contains("[fd00::1]:8181"),
            "{dnat}"
        );
        // Not redirected: blocked only.
        let blocked = Rules { target: None, ..v6 };
        let chains = blocked.chains();
        assert_eq!(chains.len(), 1);
        assert!(chains[0].rules[0].starts_with("-d fd00:ec2::254/128"));
    }

    #[test]
    fn the_container_credentials_address_is_redirected_blocked_and_guarded_alike() {
        let rules = Rules {
            v4: true,
            target: Some("10.1.2.3:8181".parse().unwrap()),
            interfaces: parse("cali+").unwrap(),
            pod_identity: Some(8182),
        };
        let chains = rules.chains();
        assert_eq!(
            chains[0].rules,
            [
                "-d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j REJECT --reject-with tcp-reset",
                "-d 169.254.170.23/32 -p tcp -m tcp --dport 80 -j REJECT --reject-with tcp-reset",
            ]
        );
        assert_eq!(
            chains[1].rules[1],
            "-d 169.254.170.23/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.1.2.3:8182"
        );
        // Host-network pods' connections, from the node: that address only.
        assert_eq!(chains[1].builtins(), ["PREROUTING", "OUTPUT"]);
        assert_eq!(
            chains[1].jumps_in("OUTPUT"),
            [format!(
                "-d 169.254.170.23/32 -p tcp -m tcp --dport 80 -m comment --comment \"{COMMENT}\" -j PODIAM"
            )]
        );
        assert_eq!(
            chains[2].rules,
            [
                "-d 10.1.2.3/32 -p tcp -m tcp --dport 8181 -m conntrack --ctstate DNAT --ctorigdst 169.254.169.254 --ctorigdstport 80 -j RETURN",
                "-d 10.1.2.3/32 -p tcp -m tcp --dport 8181 -j REJECT --reject-with tcp-reset",
                "-d 10.1.2.3/32 -p tcp -m tcp --dport 8182 -m conntrack --ctstate DNAT --ctorigdst 169.254.170.23 --ctorigdstport 80 -j RETURN",
                "-d 10.1.2.3/32 -p tcp -m tcp --dport 8182 -j REJECT --reject-with tcp-reset",
            ]
        );
        let v6 = Rules {
            v4: false,
            target: None,
            ..rules
        };
        assert_eq!(
            v6.chains()[0].rules[1],
            "-d fd00:ec2::23/128 -p tcp -m tcp --dport 80 -j REJECT --reject-with tcp-reset"
        );
    }
}
