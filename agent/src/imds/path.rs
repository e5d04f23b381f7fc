//! Request paths, normalised before any decision: percent-decoded once, repeated slashes
//! collapsed, `.` and `..` resolved. Anything that leaves `/latest/`, or that decodes to
//! control characters or to another encoded layer (`%2f` inside `%252f`), is refused:
//! routing and the proxy's allow-list only ever see the normal form.

/// A path under `/latest/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Normal {
    /// The segments after `latest`.
    pub segments: Vec<String>,
    /// Whether the path ended with `/`.
    pub trailing_slash: bool,
}

/// Why a path was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Bad percent-encoding, or encoded bytes that are not UTF-8.
    #[error("malformed percent-encoding")]
    Encoding,
    /// Anything but RFC 3986 path characters after decoding: control characters, `?`,
    /// `#`, spaces, backslashes, or a still-encoded `%` (double encoding).
    #[error("forbidden characters")]
    Characters,
    /// Not under `/latest/` once normalised (includes `..` above it).
    #[error("outside /latest/")]
    Outside,
    /// Longer than any metadata path.
    #[error("path too long")]
    TooLong,
}

const MAX_PATH: usize = 1024;

impl Normal {
    /// Normalises the path of a request URI (without its query).
    pub fn parse(raw: &str) -> Result<Self, PathError> {
        if raw.len() > MAX_PATH {
            return Err(PathError::TooLong);
        }
        let decoded = percent_decode(raw)?;
        // Only RFC 3986 path characters: an encoded `?`, `#` or space would otherwise turn
        // one segment into a different upstream request than the one the checks saw.
        let allowed = |b: u8| b.is_ascii_alphanumeric() || b"/-._~!$&'()*+,;=:@".contains(&b);
        if !decoded.bytes().all(allowed) {
            return Err(PathError::Characters);
        }
        // A path ending in a dot segment names a directory, as RFC 3986's
        // remove_dot_segments has it: `/latest/a/..` is `/latest/`.
        let last = decoded.rsplit('/').next().unwrap_or_default();
        let mut trailing_slash = matches!(last, "" | "." | "..");
        let mut segments: Vec<String> = Vec::new();
        for part in decoded.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    if segments.pop().is_none() {
                        return Err(PathError::Outside);
                    }
                }
                p => segments.push(p.to_string()),
            }
        }
        if segments.first().map(String::as_str) != Some("latest") {
            return Err(PathError::Outside);
        }
        segments.remove(0);
        // `/latest` is the directory `/latest/`.
        trailing_slash |= segments.is_empty();
        Ok(Self {
            segments,
            trailing_slash,
        })
    }

    /// The normal form, `/latest/a/b` (with the trailing slash if there was one).
    pub fn to_path(&self) -> String {
        let mut path = String::from("/latest");
        for s in &self.segments {
            path.push('/');
            path.push_str(s);
        }
        if self.trailing_slash || self.segments.is_empty() {
            path.push('/');
        }
        path
    }

    /// The segments joined by `/` (no leading or trailing slash), for matching.
    pub fn relative(&self) -> String {
        self.segments.join("/")
    }

    /// Whether the segments start with `prefix`.
    pub fn starts_with(&self, prefix: &[&str]) -> bool {
        self.segments.len() >= prefix.len() && self.segments.iter().zip(prefix).all(|(a, b)| a == b)
    }
}

fn percent_decode(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(PathError::Encoding)?;
            let hex = std::str::from_utf8(hex).map_err(|_| PathError::Encoding)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| PathError::Encoding)?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| PathError::Encoding)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, PathError> {
        Normal::parse(p).map(|n| n.to_path())
    }

    #[test]
    fn normal_forms() {
        let cases = [
            (
                "/latest/meta-data/instance-id",
                "/latest/meta-data/instance-id",
            ),
            (
                "/latest/meta-data/placement/availability-zone/",
                "/latest/meta-data/placement/availability-zone/",
            ),
            (
                "//latest///meta-data//instance-id",
                "/latest/meta-data/instance-id",
            ),
            (
                "/latest/./meta-data/x/../instance-id",
                "/latest/meta-data/instance-id",
            ),
            (
                "/latest/meta-data/%69nstance-id",
                "/latest/meta-data/instance-id",
            ),
            (
                "/latest/meta-data/iam/x/%2e%2e/info",
                "/latest/meta-data/iam/info",
            ),
            (
                "/latest/meta-data%2finstance-id",
                "/latest/meta-data/instance-id",
            ),
            ("/latest", "/latest/"),
        ];
        for (raw, want) in cases {
            assert_eq!(norm(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn normal_forms_are_fixed_points() {
        // Found by the imds_path fuzz target: a path ending in a dot segment is a
        // directory, and `/latest` is `/latest/`.
        for (raw, want) in [
            ("/latest/a/%2e.", "/latest/"),
            ("/latest/meta-data/..", "/latest/"),
            ("/latest/meta-data/iam/.", "/latest/meta-data/iam/"),
            ("/latest/meta-data/x/..", "/latest/meta-data/"),
            ("/latest", "/latest/"),
        ] {
            let path = Normal::parse(raw).unwrap();
            assert_eq!(path.to_path(), want, "{raw}");
            assert!(path.trailing_slash, "{raw}");
            assert_eq!(Normal::parse(want), Ok(path), "{raw}");
        }
    }

    #[test]
    fn refusals() {
        let cases = [
            ("/latest/../meta-data", PathError::Outside),
            ("/latest/%2e%2e/%2e%2e/etc/passwd", PathError::Outside),
            ("/2009-04-04/meta-data/", PathError::Outside),
            ("/", PathError::Outside),
            ("/latest/meta-data/%252e%252e", PathError::Characters),
            ("/latest/meta-data/%00", PathError::Characters),
            ("/latest/meta-data/%0aX", PathError::Characters),
            ("/latest/meta-data\\..\\user-data", PathError::Characters),
            ("/latest/user-data%3F", PathError::Characters),
            ("/latest/meta-data/iam%23x", PathError::Characters),
            ("/latest/meta-data/a%20b", PathError::Characters),
            ("/latest/meta-data/%E2%80%AE", PathError::Characters),
            ("/latest/meta-data/%zz", PathError::Encoding),
            ("/latest/meta-data/%c3", PathError::Encoding),
            ("/latest/meta-data/%", PathError::Encoding),
        ];
        for (raw, want) in cases {
            assert_eq!(norm(raw), Err(want), "{raw}");
        }
        assert_eq!(
            norm(&format!("/latest/{}", "a/".repeat(600))),
            Err(PathError::TooLong)
        );
    }
}
