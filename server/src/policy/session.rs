//! The optional session annotations, validated to STS's rules so that a bad value is a
//! denial with a reason here rather than an STS error later.

use std::time::Duration;

use podiam_common::annotations;

use super::{Denial, MAX_SESSION, MIN_SESSION};

/// A string STS accepts: a length range and `[A-Za-z0-9]` plus some punctuation.
struct Rule {
    annotation: fn() -> &'static str,
    len: std::ops::RangeInclusive<usize>,
    punctuation: &'static [u8],
    says: &'static str,
}

/// `iam.amazonaws.com/external-id`: STS allows `[\w+=,.@:/-]{2,1224}`.
const EXTERNAL_ID: Rule = Rule {
    annotation: || annotations::keys().external_id,
    len: 2..=1224,
    punctuation: b"_+=,.@:/-",
    says: "2 to 1224 characters of letters, digits and _ + = , . @ : / -",
};

/// `iam.amazonaws.com/session-name`: STS allows `[\w+=,.@-]{2,64}`.
const SESSION_NAME: Rule = Rule {
    annotation: || annotations::keys().session_name,
    len: 2..=64,
    punctuation: b"_+=,.@-",
    says: "2 to 64 characters of letters, digits and _ + = , . @ -",
};

pub(super) fn external_id(value: Option<&str>) -> Result<Option<String>, Denial> {
    checked(value, &EXTERNAL_ID)
}

/// The annotation's name, prefixed with the pod's namespace (`NAMESPACE.NAME`) unless it
/// already starts with it. Namespace names have no dots, so a session named `payments.x`
/// can only come from namespace `payments`: no pod can take the name of another
/// namespace's pods (`kube-system.cluster-autoscaler`) in CloudTrail or in IAM conditions
/// on the session name. A name longer than STS's 64 characters is shortened with a hash
/// when the session is assumed.
pub(super) fn session_name(namespace: &str, value: Option<&str>) -> Result<Option<String>, Denial> {
    let Some(name) = checked(value, &SESSION_NAME)? else {
        return Ok(None);
    };
    let prefix = format!("{namespace}.");
    if name.starts_with(&prefix) {
        return Ok(Some(name));
    }
    Ok(Some(prefix + &name))
}

fn checked(value: Option<&str>, rule: &Rule) -> Result<Option<String>, Denial> {
    let Some(value) = non_empty(value) else {
        return Ok(None);
    };
    let ok = rule.len.contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || rule.punctuation.contains(&b));
    if !ok {
        return Err(invalid((rule.annotation)(), value, rule.says));
    }
    Ok(Some(value.to_string()))
}

/// `iam.amazonaws.com/session-duration`: plain seconds or a duration such as `1h`,
/// `90m`, `1h30m`; within what STS accepts.
pub(super) fn duration(value: Option<&str>) -> Result<Option<Duration>, Denial> {
    let Some(value) = non_empty(value) else {
        return Ok(None);
    };
    let parsed = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(value).map_err(|error| {
            invalid(
                annotations::keys().session_duration,
                value,
                &format!("not a duration ({error}); write e.g. 3600, 3600s, 90m or 1h"),
            )
        })?,
    };
    if !(MIN_SESSION..=MAX_SESSION).contains(&parsed) {
        return Err(invalid(
            annotations::keys().session_duration,
            value,
            "30m to 12h: STS allows at most 12h, and SDKs refresh credentials with less than 15m left, so shorter sessions could never be handed out",
        ));
    }
    Ok(Some(parsed))
}

pub(super) fn serialize_secs<S: serde::Serializer>(
    value: &Option<Duration>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(d) => s.serialize_u64(d.as_secs()),
        None => s.serialize_none(),
    }
}

fn non_empty(value: Option<&str>) -> Option<&str> {
    value.map(str::trim).filter(|v| !v.is_empty())
}

fn invalid(annotation: &'static str, value: &str, reason: &str) -> Denial {
    Denial::InvalidAnnotation {
        annotation,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}
