//! Regular expressions matched against a whole string (kiam's `permitted`, the agent's
//! `--allow-route-regexp`).
//!
//! A pattern is anchored by wrapping it as `^(?:PATTERN)$`, and that is only sound when
//! the pattern is a complete regular expression on its own: `x)|(.*` wrapped as text
//! becomes `^(?:x)|(.*)$`, whose second branch matches anything. So the pattern is parsed
//! by itself first and refused if it does not parse. A pattern that parses alone has every
//! group it opens closed and no `)` of its own left over, so the wrapper's group holds
//! exactly the pattern. The one construct that could still reach past the end of the
//! pattern, a verbose-mode `#` comment that would swallow the wrapper's `)$`, leaves the
//! wrapped form unparseable, and that is refused too.

use std::fmt;

use regex_lite::{Regex, RegexBuilder};

/// Compiled patterns are bounded so that a pattern cannot make us allocate without limit.
pub const SIZE_LIMIT: usize = 1 << 20;

/// Why a pattern was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct PatternError {
    pattern: String,
    reason: String,
}

/// Compiles `pattern` so that it matches only whole strings.
pub fn anchored(pattern: &str) -> Result<Regex, PatternError> {
    let refuse = |reason: String| PatternError {
        pattern: pattern.to_string(),
        reason,
    };
    build(pattern).map_err(|error| refuse(error.to_string()))?;
    build(&format!("^(?:{pattern})$")).map_err(|error| {
        refuse(format!(
            "it does not stay a whole expression once anchored ({error}); a verbose-mode `#` \
             comment must end with a newline"
        ))
    })
}

fn build(pattern: &str) -> Result<Regex, regex_lite::Error> {
    RegexBuilder::new(pattern).size_limit(SIZE_LIMIT).build()
}

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not a valid regular expression: {}",
            self.pattern, self.reason
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OTHER: &str = "arn:aws:iam::999999999999:role/OrganizationAccountAccessRole";

    #[test]
    fn anchors_cannot_be_escaped() {
        // Each of these permitted any role once wrapped as text; each is refused now.
        for escape in [
            "arn:aws:iam::123456789012:role/team-a-x)|(.*",
            "arn:aws:iam::123456789012:role/team-a-x)|(?:.*",
            "x)|.*|(y",
            ".*)$|^(.*",
            "[)]|(.*",
            "a)|(?s:.*",
            "(?x)arn:aws:iam::123456789012:role/team-a-.* #",
            "(?x) x ) | ( .*",
            "x)|(?i)(.*",
            "x)$|(",
            "\\",
            "x\\",
        ] {
            let error = anchored(escape).expect_err(escape);
            assert!(error.to_string().contains("not a valid regular expression"));
        }
    }

    #[test]
    fn whole_strings_only() {
        let re = anchored("arn:aws:iam::123456789012:role/team-a-.*").unwrap();
        assert!(re.is_match("arn:aws:iam::123456789012:role/team-a-web"));
        assert!(!re.is_match(OTHER));
        assert!(!re.is_match("xarn:aws:iam::123456789012:role/team-a-web"));
        let alternatives = anchored("a|b").unwrap();
        assert!(alternatives.is_match("a") && alternatives.is_match("b"));
        assert!(!alternatives.is_match("ab") && !alternatives.is_match("xb"));
        // Escaped and bracketed parentheses are ordinary characters.
        let literal = anchored(r"a\)|[(]b").unwrap();
        assert!(literal.is_match("a)") && literal.is_match("(b"));
        assert!(!literal.is_match(OTHER));
        // A verbose-mode comment that ends with a newline is fine.
        let verbose = anchored("(?x) a # the letter a\n").unwrap();
        assert!(verbose.is_match("a") && !verbose.is_match("ab"));
    }
}
