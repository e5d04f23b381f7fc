//! IMDSv2 session tokens, stateless: `v1.<expiry>.<mac>`, where the MAC is an
//! HMAC-SHA256, under the node's key, of the caller's IP and the expiry.
//!
//! A token is valid only from the IP it was issued to and until its expiry, and it stays
//! valid across agent restarts (SDKs cache tokens for up to six hours and fail on a 401),
//! because the key lives in a file on the node (`--token-key-file`), created on first
//! start. Tokens are never stored.

use std::{
    io::Write,
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::{hmac, rand::SecureRandom};

/// Longest TTL a client may ask for (six hours, as EC2).
pub const MAX_TTL: Duration = Duration::from_secs(21_600);
const KEY_LEN: usize = 32;
const VERSION: &str = "v1";

/// The TTL a token request asks for, from the value of
/// `X-aws-ec2-metadata-token-ttl-seconds`: whole seconds from 1 to [`MAX_TTL`], surrounding
/// ASCII white space allowed. `None` for anything else, a missing header included.
pub fn requested_ttl(value: Option<&[u8]>) -> Option<Duration> {
    let text = std::str::from_utf8(value?.trim_ascii()).ok()?;
    let seconds: u64 = text.parse().ok()?;
    (1..=MAX_TTL.as_secs())
        .contains(&seconds)
        .then(|| Duration::from_secs(seconds))
}

/// Mints and checks tokens with the node's key.
pub struct TokenKey {
    key: hmac::Key,
}

/// Why a token was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token this agent issued (malformed or wrong MAC, or another caller's).
    #[error("invalid token")]
    Invalid,
    /// The token's TTL has passed.
    #[error("expired token")]
    Expired,
}

/// The key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Reading or creating the file failed.
    #[error("token key file {path}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is too short to be a key.
    #[error("token key file {path} holds {len} bytes; it needs at least {KEY_LEN}")]
    Short {
        /// The file.
        path: String,
        /// Its length.
        len: usize,
    },
    /// No randomness.
    #[error("no randomness for a new token key")]
    Random,
}

impl TokenKey {
    /// Loads the key from `path`, creating it (mode 0600, random) if it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyFileError> {
        let shown = path.display().to_string();
        let io = |source| KeyFileError::Io {
            path: shown.clone(),
            source,
        };
        if !path.exists() {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            let mut key = [0u8; KEY_LEN];
            ring::rand::SystemRandom::new()
                .fill(&mut key)
                .map_err(|_| KeyFileError::Random)?;
            // create_new: of two agents racing at start, one writes and both read it.
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(mut file) => {
                    file.write_all(&key).map_err(io)?;
                    file.sync_all().map_err(io)?;
                    tracing::info!(path = %shown, "created a new IMDS token key");
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(e)),
            }
        }
        let bytes = std::fs::read(path).map_err(io)?;
        if bytes.len() < KEY_LEN {
            return Err(KeyFileError::Short {
                path: shown,
                len: bytes.len(),
            });
        }
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(path = %shown, "token key file is readable by others than its owner");
        }
        Ok(Self::from_bytes(&bytes))
    }

    /// A key from raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        }
    }

    /// A token for `ip`, valid for `ttl` from `now`.
    pub fn mint(&self, ip: IpAddr, ttl: Duration, now: SystemTime) -> String {
        let expiry = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(ttl)
            .as_secs();
        let mac = hmac::sign(&self.key, &message(ip, expiry));
        format!(
            "{VERSION}.{expiry}.{}",
            URL_SAFE_NO_PAD.encode(mac.as_ref())
        )
    }

    /// Checks that `token` was issued to `ip` and has not expired at `now`.
    pub fn verify(&self, token: &str, ip: IpAddr, now: SystemTime) -> Result<(), TokenError> {
        let mut parts = token.trim().splitn(3, '.');
        let (Some(VERSION), Some(expiry), Some(mac)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Invalid);
        };
        let expiry: u64 = expiry.parse().map_err(|_| TokenError::Invalid)?;
        let mac = URL_SAFE_NO_PAD
            .decode(mac)
            .map_err(|_| TokenError::Invalid)?;
        hmac::verify(&self.key, &message(ip, expiry), &mac).map_err(|_| TokenError::Invalid)?;
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        if now >= expiry {
            return Err(TokenError::Expired);
        }
        Ok(())
    }
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(** redacted **)")
    }
}

fn message(ip: IpAddr, expiry: u64) -> Vec<u8> {
    format!("{VERSION}|{ip}|{expiry}").into_bytes()
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // Tokens minted and checked against real time.
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ttl_header_is_whole_seconds_from_1_to_21600() {
        let ttl = |v: &str| requested_ttl(Some(v.as_bytes())).map(|d| d.as_secs());
        assert_eq!(ttl("21600"), Some(21_600));
        assert_eq!(ttl(" 1\t"), Some(1));
        for bad in [
            "0",
            "21601",
            "-1",
            "1.5",
            "",
            " ",
            "60s",
            "\u{a0}60",
            "99999999999999999999",
        ] {
            assert_eq!(ttl(bad), None, "{bad:?}");
        }
        assert_eq!(requested_ttl(None), None);
    }

    #[test]
    fn tokens_are_bound_to_ip_and_time() {
        let key = TokenKey::from_bytes(&[7; 32]);
        let now = SystemTime::now();
        let t = key.mint(ip("10.0.0.1"), Duration::from_secs(60), now);
        assert_eq!(key.verify(&t, ip("10.0.0.1"), now), Ok(()));
        assert_eq!(
            key.verify(&t, ip("10.0.0.2"), now),
            Err(TokenError::Invalid)
        );
        let later = now + Duration::from_secs(61);
        assert_eq!(
            key.verify(&t, ip("10.0.0.1"), later),
            Err(TokenError::Expired)
        );
        // Another node's key, a tampered expiry, garbage.
        let other = TokenKey::from_bytes(&[8; 32]);
        assert_eq!(
            other.verify(&t, ip("10.0.0.1"), now),
            Err(TokenError::Invalid)
        );
        let (head, mac) = t.rsplit_once('.').unwrap();
        let (_, expiry) = head.split_once('.').unwrap();
        let bumped = format!("v1.{}.{mac}", expiry.parse::<u64>().unwrap() + 3600);
        assert_eq!(
            key.verify(&bumped, ip("10.0.0.1"), later),
            Err(TokenError::Invalid)
        );
        for junk in ["", "v1", "v1.x.y", "v2.1.AAAA", "v1.99999999999.!!!"] {
            assert_eq!(
                key.verify(junk, ip("10.0.0.1"), now),
                Err(TokenError::Invalid),
                "{junk}"
            );
        }
    }

    #[test]
    fn the_key_file_survives_restarts_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/token.key");
        let first = TokenKey::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let now = SystemTime::now();
        let t = first.mint(ip("10.0.0.1"), Duration::from_secs(600), now);
        let restarted = TokenKey::load_or_create(&path).unwrap();
        assert_eq!(restarted.verify(&t, ip("10.0.0.1"), now), Ok(()));
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(
            TokenKey::load_or_create(&path),
            Err(KeyFileError::Short { len: 5, .. })
        ));
    }
}
