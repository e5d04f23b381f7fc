//! A container-credentials request as a pod may send it, from any bytes: what the agent
//! checks alone before it asks a server (`podiam_agent::pod_identity::vet`): the path, the
//! method, the `Host`, and the ServiceAccount token's shape and times.
//!
//! Properties: no panic; a request passes only if an independent reading agrees that its
//! path is `/v1/credentials`, its method `GET`, its host names 169.254.170.23 or
//! fd00:ec2::23 (with or without a port), and its token is three base64url segments whose
//! middle one decodes (strictly, by a plain decoder) to a JSON object with a numeric `exp`
//! after now and no numeric `nbf` after now; and every request that reading finds valid,
//! in the forms SDKs send, passes, with the token handed on exactly as sent (trimmed).
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use http::{HeaderMap, HeaderValue, Method, Uri, header};
use libfuzzer_sys::fuzz_target;
use podiam_agent::pod_identity::vet;
use podiam_fuzz::{claims_live, endpoint_host, fields, jwt_claims};

fuzz_target!(|data: &[u8]| {
    let [now, method, target, host, authorization] = fields(data, 5)[..] else {
        return;
    };
    // Now: decimal seconds (below 2^34, the year 2514), so that times in tokens compare.
    let now = std::str::from_utf8(now)
        .ok()
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(1_795_651_200)
        % (1 << 34);
    let (Ok(method), Ok(uri)) = (Method::from_bytes(method), Uri::try_from(target)) else {
        return;
    };
    // `@` then claims: the harness makes the JWT around them, so that the fuzzer can work
    // on the JSON rather than on its base64.
    let authorization = match authorization.strip_prefix(b"@") {
        Some(claims) => format!(
            "eyJhbGciOiJSUzI1NiIsImtpZCI6IngifQ.{}.c2ln",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims)
        )
        .into_bytes(),
        None => authorization.to_vec(),
    };
    let mut headers = HeaderMap::new();
    for (name, value) in [
        (header::HOST, host),
        (header::AUTHORIZATION, &authorization[..]),
    ] {
        if !value.is_empty() {
            let Ok(value) = HeaderValue::from_bytes(value) else {
                return;
            };
            headers.insert(name, value);
        }
    }

    let verdict = vet(
        &method,
        &uri,
        &headers,
        UNIX_EPOCH + Duration::from_secs(now),
    );

    // The oracle's reading. The host is the `Host` header if it is text, else the URI's
    // authority (absolute-form requests).
    let visible = |v: &HeaderValue| {
        v.as_bytes()
            .iter()
            .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
    };
    let host = headers
        .get(header::HOST)
        .filter(|v| visible(v))
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .or_else(|| uri.authority().map(|a| a.as_str().to_string()))
        .unwrap_or_default();
    let token = headers
        .get(header::AUTHORIZATION)
        .filter(|v| visible(v))
        .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_string());
    let live = token
        .as_deref()
        .and_then(jwt_claims)
        .is_some_and(|claims| claims_live(&claims, now));
    let host_ok = endpoint_host(&host);
    let valid =
        uri.path() == "/v1/credentials" && method == Method::GET && host_ok.is_some() && live;

    match verdict {
        Ok(passed) => {
            assert!(
                valid,
                "passed: {method} {uri} host={host:?} token={token:?} now={now}"
            );
            assert_eq!(
                Some(passed),
                token.as_deref(),
                "the token handed on is not the one sent"
            );
        }
        // What SDKs send (a host as written by RFC 3986) must pass when it is valid.
        Err(refusal) => assert!(
            !(valid && host_ok == Some(true)),
            "refused ({refusal:?}): {method} {uri} host={host:?} token={token:?} now={now}"
        ),
    }
});
