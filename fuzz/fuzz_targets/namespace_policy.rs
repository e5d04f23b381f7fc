//! The namespace policy (kiam's `permitted` regex, kube2iam's `allowed-roles` globs)
//! against role ARNs, from any annotation text and any requested role.
//!
//! The property is the anchored semantics, checked against independent oracles: a policy
//! permits a role only if the whole ARN is in the language of the `permitted` expression
//! (read by another regex engine, `regex`, and only when the expression is a whole
//! expression on its own), or the whole ARN matches one resolved `allowed-roles` glob
//! (matched by dynamic programming, no regex). And the other way round for the globs: a
//! valid list never denies a role one of its globs matches.
#![no_main]

use std::{cell::RefCell, collections::HashMap, sync::LazyLock};

use libfuzzer_sys::fuzz_target;
use podiam_common::arn::{BaseRoleArn, Partition, RoleArn};
use podiam_fuzz::{fields, glob_matches};
use podiam_server::policy::namespace::{PolicyCache, Violation};

static BASE: LazyLock<BaseRoleArn> =
    LazyLock::new(|| BaseRoleArn::for_account(Partition::Aws, "123456789012").unwrap());
/// Shared across inputs, as the server shares it across namespaces (bounded, evicting).
static CACHE: LazyLock<PolicyCache> = LazyLock::new(|| PolicyCache::new(Some(BASE.clone())));

thread_local! {
    /// The oracle's compiled expressions by pattern (most inputs change another field).
    static ORACLE: RefCell<HashMap<String, Option<regex::bytes::Regex>>> = RefCell::default();
}

/// Whether `arn` is wholly in the language of `pattern`, by the `regex` crate (ASCII
/// classes, as podiam's `regex-lite`); `None` when that engine cannot read it alone.
fn permitted_oracle(pattern: &str, arn: &str) -> Option<bool> {
    let build = |p: &str| {
        regex::bytes::RegexBuilder::new(p)
            .unicode(false)
            .size_limit(1 << 20)
            .build()
            .ok()
    };
    let regex = ORACLE.with_borrow_mut(|cache| {
        if cache.len() > 4096 {
            cache.clear();
        }
        cache
            .entry(pattern.to_string())
            .or_insert_with(|| {
                build(pattern)?;
                build(&format!("^(?:{pattern})$"))
            })
            .clone()
    })?;
    Some(regex.is_match(arn.as_bytes()))
}

/// Whether one entry of the `allowed-roles` list, resolved as kube2iam does (an ARN as
/// written, anything else under the base ARN), glob-matches the whole ARN.
fn allowed_oracle(list: &str, arn: &str) -> Option<bool> {
    let entries: Vec<String> = serde_json::from_str(list).ok()?;
    Some(entries.iter().any(|entry| {
        let entry = entry.trim();
        let full = if entry.starts_with("arn:") {
            entry.to_string()
        } else {
            format!("{}{}", BASE.as_str(), entry.trim_start_matches('/'))
        };
        glob_matches(&full, arn)
    }))
}

fuzz_target!(|data: &[u8]| {
    let [which, permitted, allowed, role] = fields(data, 4)[..] else {
        return;
    };
    let (Ok(permitted), Ok(allowed), Ok(role)) = (
        std::str::from_utf8(permitted),
        std::str::from_utf8(allowed),
        std::str::from_utf8(role),
    ) else {
        return;
    };
    let Ok(role) = RoleArn::resolve(role, Some(&BASE)) else {
        return;
    };
    let which = which.first().copied().unwrap_or(0);
    let permitted = (which & 1 != 0).then_some(permitted);
    let allowed = (which & 2 != 0).then_some(allowed);
    let verdict = CACHE.policy(permitted, allowed).check(&role);
    let arn = role.as_str();

    let by_regex = permitted.and_then(|p| permitted_oracle(p.trim(), arn));
    let by_glob = allowed.and_then(|a| allowed_oracle(a, arn));
    match &verdict {
        Ok(()) => {
            // A glob matches the whole ARN, or the regex does. Where the `regex` crate
            // cannot read the expression, the anchoring rule still holds: it must be a
            // whole expression on its own.
            let by_regex = match (permitted, by_regex) {
                (Some(_), Some(matched)) => matched,
                (Some(p), None) => regex_lite::Regex::new(p.trim()).is_ok(),
                (None, _) => false,
            };
            assert!(
                by_glob == Some(true) || by_regex,
                "{arn} permitted by permitted={permitted:?} allowed-roles={allowed:?}"
            );
        }
        Err(Violation::NotPermitted { .. }) => {
            assert_ne!(
                by_glob,
                Some(true),
                "{arn} denied though allowed-roles={allowed:?} matches"
            );
            assert_ne!(
                by_regex,
                Some(true),
                "{arn} denied though permitted={permitted:?} matches"
            );
        }
        Err(Violation::NoPolicy) => assert!(permitted.is_none() && allowed.is_none()),
        Err(Violation::Invalid { .. }) => {}
    }
});
