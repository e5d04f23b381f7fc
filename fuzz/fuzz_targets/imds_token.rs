//! IMDSv2 tokens and the TTL header, from any bytes.
//!
//! Properties: a TTL is granted only for a header that is, but for ASCII white space, a
//! whole number of seconds from 1 to 21600; a token verifies only from the IP it was
//! minted for and only before its expiry; a minted token verifies where and when it should;
//! and nothing a pod sends as a token makes verification panic.
#![no_main]

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::LazyLock,
    time::{Duration, UNIX_EPOCH},
};

use libfuzzer_sys::fuzz_target;
use podiam_agent::imds::token::{MAX_TTL, TokenKey, requested_ttl};
use podiam_fuzz::fields;

static KEY: LazyLock<TokenKey> = LazyLock::new(|| TokenKey::from_bytes(&[42; 32]));

/// The oracle for the TTL header: digits (an optional `+`, as Go's and Rust's integer
/// parsers accept) between optional ASCII white space, worth 1 to 21600.
fn ttl_oracle(value: &[u8]) -> Option<u64> {
    let text = value.trim_ascii();
    let digits = text.strip_prefix(b"+").unwrap_or(text);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let significant = digits
        .iter()
        .skip_while(|&&d| d == b'0')
        .collect::<Vec<_>>();
    if significant.len() > 5 {
        return None;
    }
    let n = significant
        .iter()
        .fold(0u64, |n, &&d| n * 10 + u64::from(d - b'0'));
    (1..=MAX_TTL.as_secs()).contains(&n).then_some(n)
}

fn ip_from(bytes: &[u8]) -> IpAddr {
    match bytes.len() {
        16.. => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&bytes[..16]);
            IpAddr::V6(Ipv6Addr::from(o))
        }
        4.. => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        _ => IpAddr::V4(Ipv4Addr::new(10, 0, 0, bytes.first().copied().unwrap_or(1))),
    }
}

fuzz_target!(|data: &[u8]| {
    let [ttl, ip, now, token] = fields(data, 4)[..] else {
        return;
    };
    // The TTL header.
    assert_eq!(
        requested_ttl(Some(ttl)).map(|d| d.as_secs()),
        ttl_oracle(ttl),
        "TTL header {:?}",
        String::from_utf8_lossy(ttl)
    );
    assert_eq!(requested_ttl(None), None);

    let ip = ip_from(ip);
    let other = match ip {
        IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4) ^ 1)),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) ^ 1)),
    };
    let secs = now.iter().take(4).fold(1_700_000_000u64, |n, &b| {
        n.wrapping_mul(31).wrapping_add(u64::from(b))
    }) % 4_000_000_000;
    let now = UNIX_EPOCH + Duration::from_secs(secs);

    // Whatever a pod sends: no panic, and accepted only if genuine for this IP, now.
    if let Ok(text) = std::str::from_utf8(token)
        && KEY.verify(text, ip, now).is_ok()
    {
        let expiry: u64 = text
            .trim()
            .split('.')
            .nth(1)
            .and_then(|e| e.parse().ok())
            .unwrap();
        assert!(
            expiry > secs,
            "{text:?} verified at {secs}, after its expiry"
        );
        assert!(
            KEY.verify(text, other, now).is_err(),
            "{text:?} verified from two IPs"
        );
        assert!(
            KEY.verify(text, ip, UNIX_EPOCH + Duration::from_secs(expiry))
                .is_err(),
            "{text:?} verified at its expiry"
        );
    }

    // A minted token: valid from its IP until its TTL has passed, and nowhere else.
    if let Some(ttl) = requested_ttl(Some(ttl)) {
        let minted = KEY.mint(ip, ttl, now);
        assert_eq!(KEY.verify(&minted, ip, now), Ok(()));
        assert!(
            KEY.verify(&minted, ip, now + ttl - Duration::from_secs(1))
                .is_ok()
        );
        assert!(KEY.verify(&minted, ip, now + ttl).is_err());
        assert!(KEY.verify(&minted, other, now).is_err());
        // Tampering with any one character breaks it.
        let at = usize::from(token.first().copied().unwrap_or(0)) % minted.len();
        let mut tampered = minted.clone().into_bytes();
        tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
        if let Ok(tampered) = String::from_utf8(tampered)
            && tampered.trim() != minted
        {
            assert!(
                KEY.verify(&tampered, ip, now).is_err(),
                "{tampered:?} verified"
            );
        }
    }
});
