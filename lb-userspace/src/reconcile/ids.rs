//! Service and backend ids. An id is never handed out while it is in use, and a freed one only
//! after the cursor has gone round the whole space (as the kernel hands out pids): affinity
//! and conntrack entries outlive the sets and backends they name, and the longer an id rests,
//! the surer they are gone (the agent also moves the cursor past every id they name at start,
//! see [`IdSpace::skip_through`]). With 2^32 - 1 ids and the maps' capacities far below that,
//! a cursor that comes round again finds the old ids long idle; when every id is taken,
//! [`IdSpace::allocate`] says so instead of wrapping into a used one.
use std::collections::BTreeSet;

/// A range of ids, the ones in use, and where the next search starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdSpace {
    first: u32,
    last: u32,
    /// Where the next search starts (in `first..=last`).
    cursor: u32,
    used: BTreeSet<u32>,
}

impl Default for IdSpace {
    /// Every id but 0.
    fn default() -> Self {
        Self::new(1, u32::MAX)
    }
}

impl IdSpace {
    /// The ids `first..=last` (`first <= last`), none in use.
    pub fn new(first: u32, last: u32) -> Self {
        assert!(first <= last, "an empty id space {first}..={last}");
        Self {
            first,
            last,
            cursor: first,
            used: BTreeSet::new(),
        }
    }

    /// How many ids the space has.
    pub fn size(&self) -> u64 {
        u64::from(self.last) - u64::from(self.first) + 1
    }

    pub fn in_use(&self) -> usize {
        self.used.len()
    }

    /// The next free id at or after the cursor, going round once; `None` when every id is in
    /// use. The cursor moves past it.
    pub fn allocate(&mut self) -> Option<u32> {
        let id = self
            .free_in(self.cursor, self.last)
            .or_else(|| self.free_in(self.first, self.cursor))?;
        self.used.insert(id);
        self.cursor = self.after(id);
        Some(id)
    }

    /// Marks `id` used (one an earlier agent programmed); ids outside the space are ignored.
    pub fn mark_used(&mut self, id: u32) {
        if (self.first..=self.last).contains(&id) {
            self.used.insert(id);
        }
    }

    /// The same space, its cursor where it is, with no id in use (to adopt the maps into
    /// again).
    pub fn emptied(&self) -> Self {
        Self {
            used: BTreeSet::new(),
            ..*self
        }
    }

    /// `id` is no longer in use; it comes back once the cursor has gone round.
    pub fn release(&mut self, id: u32) {
        self.used.remove(&id);
    }

    /// Moves the cursor past `id` when it is ahead of it (ids that entries outside the
    /// reconciler's view may still name: they are handed out last).
    pub fn skip_through(&mut self, id: u32) {
        if id >= self.cursor && id <= self.last {
            self.cursor = self.after(id);
        }
    }

    fn after(&self, id: u32) -> u32 {
        match id.checked_add(1) {
            Some(next) if next <= self.last => next,
            _ => self.first,
        }
    }

    /// The lowest id of `from..=to` not in use: past the run of used ids starting at `from`.
    fn free_in(&self, from: u32, to: u32) -> Option<u32> {
        let mut candidate = u64::from(from);
        for used in self.used.range(from..=to) {
            if u64::from(*used) != candidate {
                break;
            }
            candidate += 1;
        }
        u32::try_from(candidate).ok().filter(|id| *id <= to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_every_id_once_then_says_the_space_is_full() {
        let mut ids = IdSpace::new(1, 1000);
        let handed: Vec<u32> = (0..1000)
            .map(|_| ids.allocate().expect("a free id"))
            .collect();
        assert_eq!(handed, (1..=1000).collect::<Vec<_>>());
        assert_eq!(
            ids.allocate(),
            None,
            "the space is full: no id wraps into a used one"
        );
        assert_eq!(ids.in_use(), 1000);
        ids.release(500);
        assert_eq!(ids.allocate(), Some(500), "the only free id");
        assert_eq!(ids.allocate(), None);
    }

    #[test]
    fn a_freed_id_comes_back_only_after_the_cursor_went_round() {
        let mut ids = IdSpace::new(1, 10);
        for _ in 0..5 {
            ids.allocate();
        }
        ids.release(2);
        // Later ids first, 2 only once the rest of the space is used.
        let next: Vec<u32> = (0..6).map(|_| ids.allocate().unwrap()).collect();
        assert_eq!(next, vec![6, 7, 8, 9, 10, 2]);
        assert_eq!(ids.allocate(), None);
    }

    #[test]
    fn the_top_of_the_u32_space_wraps_to_free_ids_without_overflow() {
        let mut ids = IdSpace::default();
        assert_eq!(ids.size(), u64::from(u32::MAX));
        ids.mark_used(1);
        ids.mark_used(2);
        ids.skip_through(u32::MAX - 2);
        assert_eq!(ids.allocate(), Some(u32::MAX - 1));
        assert_eq!(ids.allocate(), Some(u32::MAX));
        // Round again: past the ids in use, never 0, never a used one.
        assert_eq!(ids.allocate(), Some(3));
        ids.release(u32::MAX);
        assert_eq!(ids.allocate(), Some(4));
    }

    #[test]
    fn skip_through_only_moves_the_cursor_forward() {
        let mut ids = IdSpace::new(1, 100);
        ids.skip_through(50);
        assert_eq!(ids.allocate(), Some(51));
        ids.skip_through(10);
        assert_eq!(ids.allocate(), Some(52));
        ids.skip_through(1000); // outside the space: ignored
        assert_eq!(ids.allocate(), Some(53));
    }

    #[test]
    fn a_busy_space_is_searched_past_long_runs_of_used_ids() {
        // A space the size of the backends map, nearly full, after a wrap.
        let mut ids = IdSpace::new(1, 262_144);
        for id in 1..=262_143 {
            ids.mark_used(id);
        }
        ids.skip_through(262_144);
        assert_eq!(ids.allocate(), Some(262_144));
        assert_eq!(ids.allocate(), None);
        ids.release(131_072);
        assert_eq!(ids.allocate(), Some(131_072));
    }
}
