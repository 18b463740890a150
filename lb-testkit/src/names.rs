//! Unique, short names for namespaces, interfaces and cgroups.

use std::sync::atomic::{AtomicU32, Ordering};

/// Longest interface name Linux accepts (`IFNAMSIZ` - 1).
pub const MAX_NAME_LEN: usize = 15;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Returns `prefix` followed by this process's pid and a process-wide counter
/// (`<prefix><pid>-<n>`), so that parallel tests in one process and parallel
/// processes never pick the same name.
///
/// The result is at most [`MAX_NAME_LEN`] bytes: the prefix is shortened when
/// needed. Panics only if the pid and counter alone do not fit.
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let suffix = format!("{}-{n}", std::process::id());
    assert!(
        suffix.len() <= MAX_NAME_LEN,
        "unique_name: suffix {suffix:?} is longer than {MAX_NAME_LEN} bytes"
    );
    let mut keep = prefix.len().min(MAX_NAME_LEN - suffix.len());
    while !prefix.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}{suffix}", &prefix[..keep])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn names_are_short_and_unique() {
        let mut seen = HashSet::new();
        for prefix in ["", "a", "veth", "a-very-long-prefix-indeed", "ééééééééé"] {
            for _ in 0..100 {
                let name = unique_name(prefix);
                assert!(name.len() <= MAX_NAME_LEN, "{name:?} too long");
                assert!(seen.insert(name.clone()), "{name:?} repeated");
            }
        }
    }

    #[test]
    fn short_prefix_is_kept() {
        let name = unique_name("pod");
        assert!(name.starts_with(&format!("pod{}-", std::process::id())));
    }
}
