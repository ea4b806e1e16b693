//! Kubernetes names for IoT Edge module and volume names.
//!
//! IoT Edge's Kubernetes mode dropped the characters a DNS label cannot
//! hold, so `my_mod` and `mymod` became the same Deployment. Here a name
//! that is a DNS-1123 label once lowercased is used as it is (`edgeHub` →
//! `edgehub`, so the hub's Service keeps the name devices expect); any other
//! name has its bad characters replaced and a stable suffix from a hash of
//! the original appended (`my_mod` → `my-mod-3f2a1c`), so two names can only
//! meet when they differ in case alone, which the translation reports as a
//! collision.

use sha2::{Digest, Sha256};

const MAX: usize = 63;

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub fn sanitize(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    if is_dns_label(&lower) {
        return lower;
    }
    let mut base = String::with_capacity(lower.len());
    for c in lower.chars() {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if !(c == '-' && (base.is_empty() || base.ends_with('-'))) {
            base.push(c);
        }
    }
    base.truncate(MAX - 7);
    let base = base.trim_end_matches('-');
    let hash = Sha256::digest(name.as_bytes());
    let suffix: String = hash[..3].iter().map(|b| format!("{b:02x}")).collect();
    if base.is_empty() {
        format!("m-{suffix}")
    } else {
        format!("{base}-{suffix}")
    }
}

/// A label value standing for `name` (≤ 63 characters, alphanumeric ends).
pub fn label_value(name: &str) -> String {
    if name.len() <= MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric())
    {
        name.to_owned()
    } else {
        sanitize(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names_only_lowercase() {
        assert_eq!(sanitize("edgeHub"), "edgehub");
        assert_eq!(sanitize("sensor-1"), "sensor-1");
    }

    #[test]
    fn lossy_names_get_a_stable_distinct_suffix() {
        let a = sanitize("my_mod");
        assert!(
            a.starts_with("my-mod-") && a.len() == "my-mod-".len() + 6,
            "{a}"
        );
        assert_eq!(a, sanitize("my_mod"));
        assert_ne!(a, sanitize("mymod"));
        assert_ne!(a, sanitize("my.mod"));
        assert_ne!(sanitize("my__mod"), sanitize("my_mod"));
        assert!(is_dns_label(&sanitize("$weird")));
        assert!(is_dns_label(&sanitize("___")));
        let long = "A".repeat(200);
        assert!(is_dns_label(&sanitize(&long)));
    }

    #[test]
    fn label_values() {
        assert_eq!(label_value("dep_1"), "dep_1");
        assert!(label_value(&"x".repeat(70)).len() <= 63);
    }
}
