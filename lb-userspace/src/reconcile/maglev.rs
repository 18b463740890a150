//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), computed here and read by the XDP
//! program: a table of `MAGLEV_SIZE` (a prime) entries, each naming a backend. Every backend
//! owns a permutation of the table derived from two hashes of its name; backends take turns
//! claiming their next free entry until the table is full. The result depends only on the set
//! of names, so every node builds the same table, and a change of one backend moves few
//! entries (measured in the tests below).

use lb_common::{MAGLEV_SIZE, MaglevTable};

use crate::model::Backend;

/// The Maglev table of a backend set: `picks` (sorted, so every node builds the same table)
/// with their backend ids.
pub fn table_for(picks: &[Backend], ids: &[u32]) -> Box<MaglevTable> {
    let names: Vec<String> = picks.iter().map(Backend::to_string).collect();
    let entries = table(&names, MAGLEV_SIZE);
    let mut table = Box::<MaglevTable>::default();
    for (slot, entry) in table.backend_ids.iter_mut().zip(entries) {
        *slot = ids[entry as usize];
    }
    table
}

/// A table of `size` entries over `names` (each entry an index into `names`); empty when there
/// are no names. `size` must be a prime larger than the number of names for every backend to
/// get its share.
pub fn table(names: &[String], size: u32) -> Vec<u32> {
    if names.is_empty() {
        return Vec::new();
    }
    let m = size as u64;
    let perms: Vec<(u64, u64)> = names
        .iter()
        .map(|name| {
            let offset = fnv1a(name.as_bytes(), 0xcbf2_9ce4_8422_2325) % m;
            let skip = fnv1a(name.as_bytes(), 0x8422_2325_cbf2_9ce4) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; names.len()];
    let mut entries = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    loop {
        for (i, (offset, skip)) in perms.iter().enumerate() {
            let mut candidate = (offset + next[i] * skip) % m;
            while entries[candidate as usize] != u32::MAX {
                next[i] += 1;
                candidate = (offset + next[i] * skip) % m;
            }
            entries[candidate as usize] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == m {
                return entries;
            }
        }
    }
}

/// FNV-1a, 64 bits, from a chosen basis: stable across builds and machines (unlike std's
/// randomly keyed hasher), which every node building the same table depends on.
fn fnv1a(bytes: &[u8], basis: u64) -> u64 {
    bytes.iter().fold(basis, |hash, byte| {
        (hash ^ *byte as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.244.{}.{}:8080", i / 200, i % 200 + 10))
            .collect()
    }

    /// Entries whose backend (by name) differs between two tables.
    fn moved(a_names: &[String], a: &[u32], b_names: &[String], b: &[u32]) -> usize {
        a.iter()
            .zip(b)
            .filter(|(x, y)| a_names[**x as usize] != b_names[**y as usize])
            .count()
    }

    #[test]
    fn every_backend_gets_a_near_equal_share() {
        for n in [1, 2, 3, 10, 100] {
            let table = table(&names(n), MAGLEV_SIZE);
            assert_eq!(table.len(), MAGLEV_SIZE as usize);
            let mut counts = vec![0usize; n];
            for entry in &table {
                counts[*entry as usize] += 1;
            }
            let fair = MAGLEV_SIZE as usize / n;
            for count in counts {
                // Maglev's guarantee: shares differ by at most one "round" of the fill.
                assert!(
                    count.abs_diff(fair) <= fair / 50 + 2,
                    "n={n}: {count} vs {fair}"
                );
            }
        }
    }

    #[test]
    fn the_table_depends_on_the_set_of_names_only() {
        // The agent passes names sorted, so the same set gives the same table on every node.
        let forward = names(7);
        let mut backward = forward.clone();
        backward.reverse();
        backward.sort();
        assert_eq!(table(&backward, MAGLEV_SIZE), table(&forward, MAGLEV_SIZE));
    }

    #[test]
    fn removing_or_adding_a_backend_moves_few_flows() {
        let before_names = names(10);
        let before = table(&before_names, MAGLEV_SIZE);

        let mut removed_names = before_names.clone();
        removed_names.remove(3);
        let removed = table(&removed_names, MAGLEV_SIZE);
        let moved_by_removal = moved(&before_names, &before, &removed_names, &removed);
        // Ideal: only the removed backend's tenth moves.
        let ideal = MAGLEV_SIZE as usize / 10;
        eprintln!(
            "remove 1 of 10: {moved_by_removal} of {MAGLEV_SIZE} entries moved (ideal {ideal})"
        );
        assert!(moved_by_removal >= ideal - ideal / 20);
        assert!(moved_by_removal <= ideal * 13 / 10, "{moved_by_removal}");

        let mut added_names = before_names.clone();
        added_names.push("10.244.9.99:8080".into());
        added_names.sort();
        let added = table(&added_names, MAGLEV_SIZE);
        let moved_by_addition = moved(&before_names, &before, &added_names, &added);
        let ideal = MAGLEV_SIZE as usize / 11;
        eprintln!(
            "add 1 to 10: {moved_by_addition} of {MAGLEV_SIZE} entries moved (ideal {ideal})"
        );
        assert!(moved_by_addition <= ideal * 13 / 10, "{moved_by_addition}");
    }
}
