//! The allow-list of peer identities (`--tls-allow`), like QEMU's `tls-authz`.
//!
//! ```text
//! *                      every certificate the CA signed
//! DNS:GLOB, IP:GLOB      a subject alternative name of that type
//! TYPE=GLOB[, TYPE=GLOB…]  subject attributes: each one must be in the subject
//! ```
//!
//! A subject pattern matches by attribute, not by text: the subject `O=Example, CN=hv-1`
//! (the order `openssl req -subj /O=Example/CN=hv-1` gives) and `CN=hv-1, O=Example` both
//! match `CN=hv-*`, and both match `O=Example, CN=hv-*`. Each attribute of the pattern must
//! be present in the subject with a matching value; the subject may carry more. Types are
//! the short names the identity is shown with (`CN`, `O`, `OU`, `C`, …), in any case;
//! spacing around `=` and `,` is ignored; `\,` is a comma inside a value. `*` in a value
//! matches any run of characters, and only within that value; values compare exactly
//! otherwise (case included).

use super::identity::Identity;

/// Why a `--tls-allow` pattern is refused.
#[derive(Debug, thiserror::Error)]
pub enum PatternError {
    #[error("it is empty")]
    Empty,
    #[error("\"{0}\" is not TYPE=VALUE (a subject attribute), DNS:…, IP:… or *")]
    NotAttribute(String),
}

/// One checked pattern.
#[derive(Debug, Clone)]
enum Pattern {
    Any,
    Name(String),
    Attributes(Vec<(String, String)>),
}

/// The checked allow-list; empty admits every certificate the CA signed.
#[derive(Debug, Clone, Default)]
pub(super) struct AllowList(Vec<Pattern>);

impl AllowList {
    /// Checks every pattern, so that a mistyped one stops the daemon at start instead of
    /// refusing every peer later.
    pub fn parse(patterns: &[String]) -> Result<AllowList, (String, PatternError)> {
        patterns
            .iter()
            .map(|p| Pattern::parse(p).map_err(|e| (p.clone(), e)))
            .collect::<Result<_, _>>()
            .map(AllowList)
    }

    pub fn allows(&self, subject: &Identity) -> bool {
        self.0.is_empty() || self.0.iter().any(|pattern| pattern.matches(subject))
    }
}

impl Pattern {
    fn parse(pattern: &str) -> Result<Pattern, PatternError> {
        let pattern = pattern.trim();
        if pattern.is_empty() {
            return Err(PatternError::Empty);
        }
        if pattern == "*" {
            return Ok(Pattern::Any);
        }
        if pattern.starts_with("DNS:") || pattern.starts_with("IP:") {
            return Ok(Pattern::Name(pattern.to_owned()));
        }
        split_unescaped(pattern)
            .into_iter()
            .map(|part| match part.split_once('=') {
                Some((key, value)) if !key.trim().is_empty() => {
                    Ok((key.trim().to_ascii_uppercase(), value.trim().to_owned()))
                }
                _ => Err(PatternError::NotAttribute(part.trim().to_owned())),
            })
            .collect::<Result<_, _>>()
            .map(Pattern::Attributes)
    }

    fn matches(&self, subject: &Identity) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Name(pattern) => subject.names.iter().any(|name| glob(pattern, name)),
            Pattern::Attributes(wanted) => wanted.iter().all(|(key, value)| {
                subject
                    .attributes
                    .iter()
                    .any(|(k, v)| k == key && glob(value, v))
            }),
        }
    }
}

/// The comma-separated parts of a DN pattern, with `\x` read as a literal `x`.
fn split_unescaped(pattern: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => parts
                .last_mut()
                .into_iter()
                .for_each(|p| p.extend(chars.next())),
            ',' => parts.push(String::new()),
            c => parts.last_mut().into_iter().for_each(|p| p.push(c)),
        }
    }
    parts
}

/// Glob match with `*` only.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(attributes: &[(&str, &str)], names: &[&str]) -> Identity {
        Identity {
            subject: String::new(),
            attributes: attributes
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            names: names.iter().map(|n| n.to_string()).collect(),
        }
    }

    fn allows(patterns: &[&str], subject: &Identity) -> bool {
        let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
        AllowList::parse(&patterns).unwrap().allows(subject)
    }

    #[test]
    fn globs() {
        assert!(glob("CN=src*", "CN=src-1"));
        assert!(glob("*", "anything"));
        assert!(glob("DNS:*.example.org", "DNS:a.example.org"));
        assert!(!glob("DNS:*.example.org", "DNS:example.org"));
        assert!(glob("a*b*c", "a-b-c"));
        assert!(!glob("a*b*c", "a-c-b"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
        assert!(!glob("ab*ba", "aba"));
    }

    #[test]
    fn subject_patterns_match_by_attribute_in_any_order() {
        let cn_first = subject(&[("CN", "hv-1"), ("O", "Example")], &[]);
        let o_first = subject(&[("O", "Example"), ("CN", "hv-1")], &[]);
        for s in [&cn_first, &o_first] {
            assert!(allows(&["CN=hv-*"], s));
            assert!(allows(&["o = Example ,cn=hv-1"], s));
            assert!(!allows(&["CN=hv-*, O=Other"], s));
            assert!(!allows(&["CN=hv"], s));
            assert!(!allows(&["OU=hv-1"], s));
        }
    }

    #[test]
    fn a_star_in_a_value_stays_in_that_value() {
        let s = subject(&[("CN", "a"), ("O", "b")], &[]);
        // The old text match let `*` run across `, O=…`.
        assert!(!allows(&["CN=a*b"], &s));
    }

    #[test]
    fn escaped_commas_are_part_of_the_value() {
        let s = subject(&[("O", "Example, Inc."), ("CN", "x")], &[]);
        assert!(allows(&[r"O=Example\, Inc."], &s));
        assert!(AllowList::parse(&["O=Example, Inc.".to_owned()]).is_err());
    }

    #[test]
    fn star_alone_admits_every_identity() {
        assert!(allows(&["*"], &subject(&[("CN", "a")], &[])));
        assert!(allows(&["*"], &Identity::default()));
    }

    #[test]
    fn names_match_alternative_names_only() {
        let s = subject(&[("CN", "a")], &["DNS:a.example.org", "IP:10.0.0.1"]);
        assert!(allows(&["DNS:*.example.org"], &s));
        assert!(allows(&["IP:10.0.0.*"], &s));
        assert!(!allows(&["DNS:*.example.com"], &s));
    }

    #[test]
    fn malformed_patterns_are_refused() {
        for bad in ["", "  ", "hv-1", "CN=a, hv", "=x"] {
            assert!(
                AllowList::parse(&[bad.to_owned()]).is_err(),
                "{bad:?} accepted"
            );
        }
    }
}
