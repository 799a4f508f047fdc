//! The core's in-memory view of the log: everything appended, whether or not the driver has made it
//! durable yet (the driver's contract makes it durable before any message depending on it leaves).

use crate::types::{Entry, LogIndex, Term};

/// The log as the core sees it. Indexes start at 1; index 0 is the empty prefix with term 0.
#[derive(Clone, Debug, Default)]
pub struct RaftLog {
    entries: Vec<Entry>,
}

impl RaftLog {
    /// A log holding `entries`, which must be contiguous from index 1.
    pub(crate) fn from_entries(entries: Vec<Entry>) -> Self {
        assert!(
            entries
                .iter()
                .enumerate()
                .all(|(i, e)| e.index == i as LogIndex + 1),
            "recovered entries must be contiguous from index 1"
        );
        RaftLog { entries }
    }

    /// The index of the last entry (0 when empty).
    pub fn last_index(&self) -> LogIndex {
        self.entries.len() as LogIndex
    }

    /// The term of the last entry (0 when empty).
    pub fn last_term(&self) -> Term {
        self.entries.last().map_or(0, |e| e.term)
    }

    /// The term of the entry at `index`; `Some(0)` for index 0, `None` past the end.
    pub fn term_at(&self, index: LogIndex) -> Option<Term> {
        if index == 0 {
            return Some(0);
        }
        self.entry(index).map(|e| e.term)
    }

    /// The entry at `index`.
    pub fn entry(&self, index: LogIndex) -> Option<&Entry> {
        let position = usize::try_from(index.checked_sub(1)?).ok()?;
        self.entries.get(position)
    }

    /// Entries with indexes in `from..=to` (clamped to the log).
    pub fn slice(&self, from: LogIndex, to: LogIndex) -> &[Entry] {
        let start = (from.max(1) - 1) as usize;
        let end = (to.min(self.last_index())) as usize;
        if start >= end {
            &[]
        } else {
            &self.entries[start..end]
        }
    }

    /// True if a log whose last entry is (`last_term`, `last_index`) is at least as up to date as
    /// this one (Raft §5.4.1).
    pub fn is_up_to_date(&self, last_index: LogIndex, last_term: Term) -> bool {
        (last_term, last_index) >= (self.last_term(), self.last_index())
    }

    /// The first index of the run of entries with term `term` that ends at or before `index`
    /// (used for fast back-off hints).
    pub fn first_index_of_term_at(&self, index: LogIndex) -> LogIndex {
        let Some(term) = self.term_at(index) else {
            return index;
        };
        let mut first = index;
        while first > 1 && self.term_at(first - 1) == Some(term) {
            first -= 1;
        }
        first
    }

    /// The last index whose entry has term `term`, if the log has any.
    pub fn last_index_of_term(&self, term: Term) -> Option<LogIndex> {
        self.entries
            .iter()
            .rev()
            .find(|e| e.term == term)
            .map(|e| e.index)
    }

    /// The entries, given up.
    pub(crate) fn into_entries(self) -> Vec<Entry> {
        self.entries
    }

    /// Appends one entry; it must follow the last.
    pub(crate) fn push(&mut self, entry: Entry) {
        debug_assert_eq!(entry.index, self.last_index() + 1);
        self.entries.push(entry);
    }

    /// Drops every entry with index `>= from`.
    pub(crate) fn truncate_from(&mut self, from: LogIndex) {
        self.entries.truncate((from.max(1) - 1) as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Payload;

    fn log_of_terms(terms: &[Term]) -> RaftLog {
        RaftLog::from_entries(
            terms
                .iter()
                .enumerate()
                .map(|(i, &term)| Entry {
                    index: i as u64 + 1,
                    term,
                    payload: Payload::Blank,
                })
                .collect(),
        )
    }

    #[test]
    fn term_lookups() {
        let log = log_of_terms(&[1, 1, 2, 2, 2, 4]);
        assert_eq!(log.term_at(0), Some(0));
        assert_eq!(log.term_at(6), Some(4));
        assert_eq!(log.term_at(7), None);
        assert_eq!(log.first_index_of_term_at(5), 3);
        assert_eq!(log.first_index_of_term_at(1), 1);
        assert_eq!(log.last_index_of_term(2), Some(5));
        assert_eq!(log.last_index_of_term(3), None);
        assert_eq!(log.slice(2, 4).len(), 3);
        assert_eq!(log.slice(5, 100).len(), 2);
        assert!(log.slice(7, 9).is_empty());
    }

    #[test]
    fn up_to_date_compares_last_term_then_length() {
        let log = log_of_terms(&[1, 2, 2]);
        assert!(log.is_up_to_date(3, 2));
        assert!(log.is_up_to_date(1, 3));
        assert!(!log.is_up_to_date(10, 1));
        assert!(!log.is_up_to_date(2, 2));
    }
}
