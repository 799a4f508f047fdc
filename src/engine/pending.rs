//! The driver's table of client requests waiting for their entry to be applied.
//!
//! The driver hands out request ids in sequence, and entries commit in log order, which is the
//! order their proposals arrived in; so the table is a ring of slots indexed by id offset rather
//! than a hash map: adding is a push at the back, finding an answered request is an index, and
//! the slots of answered requests at the front are dropped as they empty. A request that never
//! commits (lost in a change of leader) holds the front until its deadline passes, so the ring
//! spans at most the requests of one request timeout.

use std::collections::VecDeque;

/// Waiting requests, keyed by the request ids this table hands out.
pub(crate) struct PendingTable<T> {
    /// The id the next request gets.
    next_id: u64,
    /// The id of `slots[0]`.
    first_id: u64,
    /// One slot per id from `first_id` on; `None` once answered.
    slots: VecDeque<Option<T>>,
}

impl<T> PendingTable<T> {
    /// An empty table whose first request gets `first_id`.
    pub(crate) fn new(first_id: u64) -> Self {
        PendingTable {
            next_id: first_id,
            first_id,
            slots: VecDeque::new(),
        }
    }

    /// Adds `request` and returns its id (one more than the previous one, wrapping).
    pub(crate) fn push(&mut self, request: T) -> u64 {
        let id = self.next_id;
        self.next_id = id.wrapping_add(1);
        if self.slots.is_empty() {
            self.first_id = id;
        }
        self.slots.push_back(Some(request));
        id
    }

    /// Takes out the request with `id`, if it is still waiting. Ids this table never handed out
    /// (such as those of entries proposed before a restart) find nothing.
    pub(crate) fn remove(&mut self, id: u64) -> Option<T> {
        let offset = usize::try_from(id.wrapping_sub(self.first_id)).ok()?;
        let request = self.slots.get_mut(offset)?.take()?;
        self.trim_front();
        Some(request)
    }

    /// Takes out the requests at the front for which `expired` holds, up to the first for which
    /// it does not, and hands each to `each` with its id. For a predicate that holds of a request whenever it
    /// holds of every later one (a deadline, when deadlines grow with the id), that is every
    /// request it holds of, found without touching the others.
    pub(crate) fn expire_front(
        &mut self,
        mut expired: impl FnMut(&T) -> bool,
        mut each: impl FnMut(u64, T),
    ) {
        while let Some(Some(front)) = self.slots.front() {
            if !expired(front) {
                break;
            }
            if let Some(Some(request)) = self.slots.pop_front() {
                each(self.first_id, request);
            }
            self.first_id = self.first_id.wrapping_add(1);
            self.trim_front();
        }
    }

    /// Takes out every request.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.first_id = self.next_id;
        self.slots.drain(..).flatten()
    }

    fn trim_front(&mut self) {
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.first_id = self.first_id.wrapping_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl<T> PendingTable<T> {
        fn len(&self) -> usize {
            self.slots.iter().flatten().count()
        }
    }

    #[test]
    fn ids_are_sequential_and_answered_requests_leave() {
        let mut table = PendingTable::new(10);
        let ids: Vec<u64> = ["a", "b", "c"].into_iter().map(|r| table.push(r)).collect();
        assert_eq!(ids, vec![10, 11, 12]);
        assert_eq!(table.remove(11), Some("b"));
        assert_eq!(table.remove(11), None, "answered once");
        assert_eq!(table.len(), 2);
        assert_eq!(table.remove(10), Some("a"));
        assert_eq!(table.slots.len(), 1, "the emptied front slots are dropped");
        assert_eq!(table.remove(9), None, "before the window");
        assert_eq!(table.remove(13), None, "not handed out yet");
        assert_eq!(table.remove(u64::MAX), None);
        assert_eq!(table.remove(12), Some("c"));
        assert_eq!(table.len(), 0);
        assert_eq!(
            table.push("d"),
            13,
            "ids keep counting once the table is empty"
        );
        assert_eq!(table.remove(13), Some("d"));
    }

    #[test]
    fn ids_wrap_around() {
        let mut table = PendingTable::new(u64::MAX - 1);
        let ids: Vec<u64> = (0..4).map(|r| table.push(r)).collect();
        assert_eq!(ids, vec![u64::MAX - 1, u64::MAX, 0, 1]);
        assert_eq!(table.remove(0), Some(2));
        assert_eq!(table.remove(u64::MAX - 1), Some(0));
        assert_eq!(table.remove(1), Some(3));
        assert_eq!(table.remove(u64::MAX), Some(1));
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn expire_front_and_drain_take_what_they_say() {
        let mut table = PendingTable::new(0);
        for request in 0..6 {
            table.push(request);
        }
        assert_eq!(table.remove(1), Some(1));
        let mut expired = Vec::new();
        table.expire_front(
            |&r| r < 4,
            |id, r| {
                assert_eq!(id, r as u64, "each with its own id");
                expired.push(r)
            },
        );
        assert_eq!(
            expired,
            vec![0, 2, 3],
            "stops at the first it does not hold of"
        );
        assert_eq!(table.len(), 2);
        assert_eq!(table.first_id, 4, "the emptied front slots were dropped");
        table.expire_front(|&r| r == 5, |_, r| expired.push(r));
        assert_eq!(expired.len(), 3, "a later match behind a miss stays");
        assert_eq!(table.remove(4), Some(4));
        let rest: Vec<i32> = table.drain().collect();
        assert_eq!(rest, vec![5]);
        assert_eq!(table.len(), 0);
        assert_eq!(table.remove(5), None);
        assert_eq!(table.push(9), 6);
    }
}
