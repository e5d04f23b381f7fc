//! IMDS path normalisation and the proxy's gate, from any request path.
//!
//! Properties, beyond "no panic":
//! - a normal form stays under `/latest/`, holds no empty, `.` or `..` segment, and
//!   normalises to itself;
//! - what the agent sends to the metadata service (the normal form, never the raw path)
//!   is not one of the never-proxied prefixes even as a lenient server would read it
//!   (every layer of `%`-encoding decoded, case ignored, `;parameters` dropped, slashes
//!   collapsed, dot segments resolved), whatever the allow-list says.
#![no_main]

use std::{sync::LazyLock, time::Duration};

use libfuzzer_sys::fuzz_target;
use podiam_agent::{
    imds::path::Normal,
    proxy::{DEFAULT_ALLOW, MetadataProxy},
};
use podiam_fuzz::{lenient_segments, never_proxied};

/// An allow-list that allows everything, so that only the never-proxied rules stand
/// between a path and the metadata service; and the default one.
static OPEN: LazyLock<MetadataProxy> =
    LazyLock::new(|| MetadataProxy::new("127.0.0.1:9", ".*", Duration::from_secs(1)).unwrap());
static DEFAULT: LazyLock<MetadataProxy> = LazyLock::new(|| {
    MetadataProxy::new("127.0.0.1:9", DEFAULT_ALLOW, Duration::from_secs(1)).unwrap()
});

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(path) = Normal::parse(raw) else {
        return;
    };
    let normal = path.to_path();
    assert!(
        normal.starts_with("/latest/"),
        "{raw:?} normalised to {normal:?}"
    );
    for segment in &path.segments {
        assert!(
            !matches!(segment.as_str(), "" | "." | "..") && !segment.contains('/'),
            "{raw:?} kept segment {segment:?}"
        );
    }
    assert_eq!(
        Normal::parse(&normal).as_ref(),
        Ok(&path),
        "{raw:?}: the normal form {normal:?} is not a fixed point"
    );

    let credentials = matches!(
        path.segments.iter().map(String::as_str).collect::<Vec<_>>()[..],
        [
            "meta-data",
            "iam",
            "security-credentials" | "security-credentials-extended",
            ..
        ]
    );
    let passes = OPEN.check(&path).is_ok();
    if DEFAULT.check(&path).is_ok() {
        assert!(passes, "{raw:?} passes the default allow-list but not '.*'");
    }
    if !passes || credentials {
        // Refused, or answered by the agent itself: nothing reaches the metadata service.
        return;
    }
    // The metadata service is sent the normal form, never the raw path.
    if let Some(prefix) = never_proxied(&lenient_segments(&normal)) {
        panic!("{raw:?} is proxied as {normal:?}, which a lenient server reads as {prefix}");
    }
});
