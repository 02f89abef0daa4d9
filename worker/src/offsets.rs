//! Which offset of a partition may be committed: the lowest one not yet finished.
//!
//! Lanes finish messages of one partition out of order (different users, different lanes). Kafka's
//! committed offset means "everything before this is done", so it may only advance over a contiguous
//! run of finished offsets; otherwise a crash would skip unfinished work.

use std::collections::{BTreeSet, HashMap};

/// Per-partition bookkeeping of in-flight offsets, reset when a partition is (re)assigned.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<i32, Partition>,
}

#[derive(Debug, Default)]
struct Partition {
    generation: u64,
    in_flight: BTreeSet<i64>,
    /// Highest finished offset (may be beyond in-flight ones).
    highest_done: Option<i64>,
}

impl OffsetTracker {
    /// Forgets a partition's in-flight work (it was revoked or reassigned); returns the new
    /// generation, which completions of the old assignment will not match.
    pub fn reset(&mut self, partition: i32) -> u64 {
        let entry = self.partitions.entry(partition).or_default();
        entry.generation += 1;
        entry.in_flight.clear();
        entry.highest_done = None;
        entry.generation
    }

    /// The current generation of a partition.
    pub fn generation(&mut self, partition: i32) -> u64 {
        self.partitions.entry(partition).or_default().generation
    }

    /// A message was handed to a lane.
    pub fn started(&mut self, partition: i32, offset: i64) {
        self.partitions.entry(partition).or_default().in_flight.insert(offset);
    }

    /// A message is finished; returns the offset to store (the next one to consume) if it advanced.
    /// Completions from an older generation are ignored.
    pub fn finished(&mut self, partition: i32, generation: u64, offset: i64) -> Option<i64> {
        let entry = self.partitions.get_mut(&partition)?;
        if entry.generation != generation || !entry.in_flight.remove(&offset) {
            return None;
        }
        entry.highest_done = Some(entry.highest_done.map_or(offset, |done| done.max(offset)));
        match entry.in_flight.first() {
            // Something earlier is still running: commit up to it, not past it.
            Some(&lowest) if lowest < offset => None,
            Some(&lowest) => Some(lowest),
            None => entry.highest_done.map(|done| done + 1),
        }
    }

    /// Messages in flight across all partitions.
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|partition| partition.in_flight.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advances_only_over_contiguous_finished_offsets() {
        let mut tracker = OffsetTracker::default();
        let generation = tracker.generation(0);
        for offset in 10..14 {
            tracker.started(0, offset);
        }
        assert_eq!(tracker.finished(0, generation, 12), None, "10 and 11 still running");
        assert_eq!(tracker.finished(0, generation, 10), Some(11));
        assert_eq!(tracker.finished(0, generation, 11), Some(13), "12 was already done");
        assert_eq!(tracker.finished(0, generation, 13), Some(14));
        assert_eq!(tracker.in_flight(), 0);
    }

    #[test]
    fn completions_of_a_revoked_assignment_are_ignored() {
        let mut tracker = OffsetTracker::default();
        let old = tracker.generation(3);
        tracker.started(3, 5);
        let new = tracker.reset(3);
        assert_ne!(old, new);
        assert_eq!(tracker.finished(3, old, 5), None);
        tracker.started(3, 5);
        assert_eq!(tracker.finished(3, new, 5), Some(6));
    }

    #[test]
    fn partitions_are_independent() {
        let mut tracker = OffsetTracker::default();
        tracker.started(0, 1);
        tracker.started(1, 7);
        assert_eq!(tracker.finished(1, 0, 7), Some(8));
        assert_eq!(tracker.in_flight(), 1);
    }
}
