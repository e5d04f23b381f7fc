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

/// How `host` (a `Host` header, or a request's authority) names the container-credentials
/// endpoint: `Some(true)` as RFC 3986 writes a host (`169.254.170.23`, `[fd00:ec2::23]`,
/// the IPv6 one in any spelling or IPv4-mapped, each with or without `:port`);
/// `Some(false)` only when read leniently (brackets anywhere dropped, a bare IPv6
/// address); `None` when it names anything else.
pub fn endpoint_host(host: &str) -> Option<bool> {
    use podiam_common::pod_identity::{ADDRESS_V4, ADDRESS_V6};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let is = |text: &str| match text.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip == ADDRESS_V4,
        Ok(IpAddr::V6(ip)) => ip == ADDRESS_V6 || ip.to_ipv4_mapped() == Some(ADDRESS_V4),
        Err(_) => false,
    };
    let digits = |text: &str| text.bytes().all(|b| b.is_ascii_digit());
    // `rest` is empty or `:` and digits.
    let port_or_nothing =
        |rest: &str| rest.is_empty() || rest.strip_prefix(':').is_some_and(digits);
    let strict = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split_once(']').is_some_and(|(ip, rest)| {
            ip.parse::<Ipv6Addr>().is_ok() && is(ip) && port_or_nothing(rest)
        }),
        None => {
            let (ip, rest) = host.split_at(host.find(':').unwrap_or(host.len()));
            ip.parse::<Ipv4Addr>().is_ok() && is(ip) && port_or_nothing(rest)
        }
    };
    if strict {
        return Some(true);
    }
    let bare: String = host.chars().filter(|&c| c != '[' && c != ']').collect();
    let lenient = is(&bare)
        || bare
            .rsplit_once(':')
            .is_some_and(|(ip, port)| is(ip) && digits(port));
    lenient.then_some(false)
}

/// The claims of a JWT as the container-credentials endpoint may read them without its
/// key: three non-empty segments of base64url characters (`=` padding tolerated), the
/// middle one decoding, strictly, to JSON. `None` for anything else.
pub fn jwt_claims(token: &str) -> Option<serde_json::Value> {
    let segments: Vec<&str> = token.split('.').collect();
    let alphabet = |s: &&str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '='))
    };
    if segments.len() != 3 || !segments.iter().all(alphabet) {
        return None;
    }
    let payload = base64url_decode(segments[1].trim_end_matches('='))?;
    serde_json::from_slice(&payload).ok()
}

/// RFC 4648 §5 base64url without padding, strictly: every character in the alphabet, no
/// dangling character, and the unused bits of the last one zero. Bit by bit, no tables.
pub fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    const ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bits: Vec<bool> = Vec::new();
    for c in text.chars() {
        let value = ALPHABET.find(c)?;
        bits.extend((0..6).rev().map(|i| (value >> i) & 1 == 1));
    }
    if text.len() % 4 == 1 || bits[bits.len() - bits.len() % 8..].iter().any(|&b| b) {
        return None;
    }
    Some(
        bits.chunks_exact(8)
            .map(|byte| byte.iter().fold(0u8, |n, &b| (n << 1) | u8::from(b)))
            .collect(),
    )
}

/// Whether JWT claims are live at `now` (seconds): a numeric `exp` after now, and no
/// numeric `nbf` after now.
pub fn claims_live(claims: &serde_json::Value, now: u64) -> bool {
    let Some(claims) = claims.as_object() else {
        return false;
    };
    let number = |key: &str| claims.get(key).and_then(serde_json::Value::as_f64);
    let now = now as f64;
    number("exp").is_some_and(|exp| exp > now) && number("nbf").is_none_or(|nbf| nbf <= now)
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
    fn endpoint_hosts() {
        for host in [
            "169.254.170.23",
            "169.254.170.23:80",
            "[fd00:ec2::23]:80",
            "[fd00:ec2:0::23]",
            "[::ffff:169.254.170.23]",
        ] {
            assert_eq!(endpoint_host(host), Some(true), "{host}");
        }
        for host in ["fd00:ec2::23", "[[169.254.170.23]]", "fd00:ec2::23:80"] {
            assert_eq!(endpoint_host(host), Some(false), "{host}");
        }
        for host in [
            "169.254.169.254",
            "169.254.170.23.example",
            "[fd00:ec2::24]",
            "",
            "localhost:80",
        ] {
            assert_eq!(endpoint_host(host), None, "{host}");
        }
    }

    #[test]
    fn base64url() {
        use base64::Engine;
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        for bytes in [
            &b""[..],
            b"a",
            b"ab",
            b"abc",
            b"\xff\xfe\x00",
            b"{\"exp\":1}",
        ] {
            assert_eq!(
                base64url_decode(&engine.encode(bytes)).as_deref(),
                Some(bytes)
            );
        }
        // A dangling character, non-zero unused bits, padding, the other alphabet.
        for text in [
            "QUJD".to_string() + "Q",
            "QR".into(),
            "QQ==".into(),
            "+/".into(),
        ] {
            assert_eq!(
                base64url_decode(&text).is_some(),
                engine.decode(&text).is_ok(),
                "{text}"
            );
            assert_eq!(base64url_decode(&text), None, "{text}");
        }
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
