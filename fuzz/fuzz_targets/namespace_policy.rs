//! The namespace policy (kiam's `permitted` regex, kube2iam's `allowed-roles` globs)
//! against role ARNs, from any annotation text and any requested role.
//!
//! The property is the anchored semantics, checked against independent oracles: a policy
//! permits a role only if the whole ARN is in the language of the `permitted` expression
//! (read by another regex engine, `regex-automata`'s PikeVM, and only when the expression
//! is a whole expression on its own), or the whole ARN matches one resolved `allowed-roles` glob
//! (matched by dynamic programming, no regex). And the other way round for the globs: a
//! valid list never denies a role one of its globs matches.
#![no_main]

use std::{cell::RefCell, collections::HashMap, sync::LazyLock};

use libfuzzer_sys::fuzz_target;
use podiam_common::arn::{BaseRoleArn, Partition, RoleArn};
use podiam_fuzz::{fields, glob_matches};
use podiam_server::policy::namespace::{PolicyCache, Violation};
use regex_automata::{
    nfa::thompson::{self, pikevm::PikeVM},
    util::syntax,
};

static BASE: LazyLock<BaseRoleArn> =
    LazyLock::new(|| BaseRoleArn::for_account(Partition::Aws, "123456789012").unwrap());
/// Shared across inputs, as the server shares it across namespaces (bounded, evicting).
static CACHE: LazyLock<PolicyCache> = LazyLock::new(|| PolicyCache::new(Some(BASE.clone())));

/// The oracle's compiled expressions by pattern (most inputs change another field), and
/// the heap their NFAs hold: emptied past 128 MiB, well inside libFuzzer's RSS limit.
#[derive(Default)]
struct Oracle {
    compiled: HashMap<String, Option<PikeVM>>,
    bytes: usize,
}

thread_local! {
    static ORACLE: RefCell<Oracle> = RefCell::default();
}

/// Whether `arn` is wholly in the language of `pattern`, by `regex-automata`'s PikeVM
/// (the `regex` crate's own engine for the general case; ASCII classes, as podiam's
/// `regex-lite`); `None` when that engine cannot read it alone. Only the forward NFA is
/// built: `regex`'s full builder also compiles a reverse NFA and prepares lazy DFAs, which
/// took most of this target's time, for one match against one ARN.
fn permitted_oracle(pattern: &str, arn: &str) -> Option<bool> {
    let build = |p: &str| {
        PikeVM::builder()
            .syntax(syntax::Config::new().unicode(false).utf8(false))
            .thompson(thompson::Config::new().nfa_size_limit(Some(1 << 20)))
            .build(p)
            .ok()
    };
    let regex = ORACLE.with_borrow_mut(|oracle| {
        if let Some(known) = oracle.compiled.get(pattern) {
            return known.clone();
        }
        if oracle.bytes > 128 << 20 {
            *oracle = Oracle::default();
        }
        // A whole expression on its own (`a)|(b` is not, though anchored it parses).
        let compiled = regex_syntax::ast::parse::Parser::new()
            .parse(pattern)
            .ok()
            .and_then(|_| build(&format!("^(?:{pattern})$")));
        oracle.bytes += pattern.len()
            + compiled
                .as_ref()
                .map_or(0, |vm| vm.get_nfa().memory_usage());
        oracle
            .compiled
            .insert(pattern.to_string(), compiled.clone());
        compiled
    })?;
    Some(regex.is_match(&mut regex.create_cache(), arn.as_bytes()))
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

    // The oracles only where the verdict is checked against them: compiling every
    // expression podiam refused anyway would spend most of the run in the oracle's
    // regex compiler (instrumented like the rest), and steer the fuzzer towards its paths.
    let oracles = || {
        (
            permitted.and_then(|p| permitted_oracle(p.trim(), arn)),
            allowed.and_then(|a| allowed_oracle(a, arn)),
        )
    };
    match &verdict {
        Ok(()) => {
            let (by_regex, by_glob) = oracles();
            // A glob matches the whole ARN, or the regex does. Where the oracle's engine
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
            let (by_regex, by_glob) = oracles();
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
