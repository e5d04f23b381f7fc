//! Oracles for the fuzz targets: plain, slow, independent readings of what podiam's fast
//! code must agree with. Test code: nothing here runs in podiam.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The path prefixes (after `/latest/`, lower case) whose content must never reach a pod
/// through the metadata proxy: user data, the node's role and credentials, its identity
/// credentials, the signed identity documents and the instance tags.
pub const NEVER_PROXIED: &[&[&str]] = &[
    &["user-data"],
    &["meta-data", "iam"],
    &["meta-data", "identity-credentials"],
    &["dynamic", "instance-identity", "pkcs7"],
    &["dynamic", "instance-identity", "signature"],
    &["dynamic", "instance-identity", "rsa2048"],
    &["meta-data", "tags", "instance"],
];

/// The segments after `latest` as a lenient HTTP server might read `raw`: every layer of
/// percent-encoding decoded, `\` taken for `/`, `;parameters` dropped, case folded,
/// repeated slashes collapsed and dot segments resolved (RFC 3986 §5.2.4, with `..` at the
/// root staying at the root). `None` when it is not under `/latest/` even so.
pub fn lenient_segments(raw: &str) -> Option<Vec<String>> {
    let mut text = raw.as_bytes().to_vec();
    for _ in 0..8 {
        let decoded = decode_once(&text);
        if decoded == text {
            break;
        }
        text = decoded;
    }
    let text = String::from_utf8_lossy(&text)
        .to_lowercase()
        .replace('\\', "/");
    let mut segments: Vec<String> = Vec::new();
    for part in text.split('/') {
        let part = part.split(';').next().unwrap_or_default();
        match part {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            p => segments.push(p.to_string()),
        }
    }
    (segments.first().map(String::as_str) == Some("latest")).then(|| segments.split_off(1))
}

fn decode_once(bytes: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2))
            && let (Some(h), Some(l)) = (hex(h), hex(l))
        {
            out.push(h * 16 + l);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// The never-proxied prefix `segments` falls under, if any.
pub fn never_proxied(segments: &Option<Vec<String>>) -> Option<String> {
    let segments = segments.as_ref()?;
    NEVER_PROXIED
        .iter()
        .find(|prefix| {
            segments.len() >= prefix.len()
                && segments.iter().zip(prefix.iter()).all(|(a, b)| a == b)
        })
        .map(|prefix| prefix.join("/"))
}

/// kube2iam's glob: `*` matches any run of characters (none included), every other
/// character only itself. Dynamic programming over both strings, no regex.
pub fn glob_matches(glob: &str, text: &str) -> bool {
    let g: Vec<char> = glob.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // row[j]: whether g[..i] matches t[..j].
    let mut row = vec![false; t.len() + 1];
    row[0] = true;
    for &c in &g {
        let mut next = vec![false; t.len() + 1];
        if c == '*' {
            let mut any = false;
            for j in 0..=t.len() {
                any |= row[j];
                next[j] = any;
            }
        } else {
            for j in 1..=t.len() {
                next[j] = row[j - 1] && t[j - 1] == c;
            }
        }
        row = next;
    }
    row[t.len()]
}

/// A fixed wall clock for the targets: runs are reproducible from their input alone.
#[derive(Clone, Copy, Debug)]
pub struct FixedClock(pub SystemTime);

impl FixedClock {
    /// 2026-11-26T00:00:00Z.
    pub fn new() -> Self {
        Self(UNIX_EPOCH + Duration::from_secs(1_795_651_200))
    }
}

impl Default for FixedClock {
    fn default() -> Self {
        Self::new()
    }
}

impl podiam_common::clock::Clock for FixedClock {
    fn now(&self) -> SystemTime {
        self.0
    }
}

/// Splits fuzz input into `n` pieces at NUL bytes (missing ones are empty), so that one input can
/// carry several fields (`a\0b\0c`).
pub fn fields(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = data.splitn(n, |&b| b == 0).collect();
    out.resize(n, &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_matches("a*c", "abc"));
        assert!(glob_matches("a*c", "ac"));
        assert!(glob_matches("*", ""));
        assert!(!glob_matches("a*c", "abd"));
        assert!(!glob_matches("a.c", "abc"));
        assert!(glob_matches("**", "x"));
    }

    #[test]
    fn lenient() {
        assert_eq!(
            never_proxied(&lenient_segments("/latest/USER-data")),
            Some("user-data".into())
        );
        assert_eq!(
            never_proxied(&lenient_segments("/latest/meta-data/x/%252e%252e/iam/info")),
            Some("meta-data/iam".into())
        );
        assert_eq!(
            never_proxied(&lenient_segments("/latest/meta-data/ami-id")),
            None
        );
        assert_eq!(lenient_segments("/other/user-data"), None);
    }
}
