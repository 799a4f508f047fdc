//! The core's in-memory view of the log: everything appended, whether or not the driver has made it
//! durable yet (the driver's contract makes it durable before any message depending on it leaves).

use crate::types::{Entry, LogIndex, Payload, Term};

/// The log as the core sees it. Index 0 is the empty prefix with term 0. The log may start past
/// index 1 when the entries before it were compacted into a snapshot: then it knows the index
/// just before its first entry, and that entry's term only when the store told it.
#[derive(Clone, Debug, Default)]
pub struct RaftLog {
    /// The index just before the first entry (0 for a log that starts at 1).
    offset: LogIndex,
    /// The term of the entry at `offset`, when known (always known at offset 0).
    offset_term: Option<Term>,
    /// The entries from `offset + 1` on, after `compacted` leading slots that a compaction
    /// has already released (see [`RaftLog::compact_through`]).
    entries: Vec<Entry>,
    /// How many slots at the front of `entries` are compacted away and wait to be drained.
    compacted: usize,
}

impl RaftLog {
    /// A log holding `entries`, which must be contiguous; the first may have any index above 0.
    /// Returns why not otherwise.
    pub(crate) fn from_entries(entries: Vec<Entry>) -> Result<Self, &'static str> {
        let offset = match entries.first() {
            None => 0,
            Some(first) if first.index == 0 => return Err("a log entry has index 0"),
            Some(first) => first.index - 1,
        };
        if !entries
            .iter()
            .zip(offset + 1..)
            .all(|(entry, index)| entry.index == index)
        {
            return Err("recovered entries are not contiguous");
        }
        Ok(RaftLog {
            offset,
            offset_term: (offset == 0).then_some(0),
            entries,
            compacted: 0,
        })
    }

    /// The log a node recovers: `entries` (contiguous, the first with any index above 0) after
    /// the snapshot `snapshot` = (index, term) when there is one. The entries may start before
    /// the snapshot's end (the store keeps a snapshot interval more) but not after it, and must
    /// agree with it where they overlap; entries that end before it are superseded by it.
    pub(crate) fn recovered(
        entries: Vec<Entry>,
        snapshot: Option<(LogIndex, Term)>,
    ) -> Result<Self, &'static str> {
        let mut log = Self::from_entries(entries)?;
        let Some((index, term)) = snapshot else {
            return Ok(log);
        };
        if log.live().is_empty() || log.last_index() < index {
            log.reset_to(index, term);
            return Ok(log);
        }
        if log.first_index() > index + 1 {
            return Err("the recovered log starts after a gap past its snapshot");
        }
        if log.offset == index {
            log.offset_term = Some(term);
        } else if log.term_at(index) != Some(term) {
            return Err("the recovered log disagrees with its snapshot");
        }
        Ok(log)
    }

    /// The entries held, in index order from `first_index()`.
    fn live(&self) -> &[Entry] {
        &self.entries[self.compacted..]
    }

    /// The index of the first entry held (1 for a log never compacted, also when empty).
    pub fn first_index(&self) -> LogIndex {
        self.offset + 1
    }

    /// The index of the last entry (`first_index() - 1` when empty).
    pub fn last_index(&self) -> LogIndex {
        self.offset + self.live().len() as LogIndex
    }

    /// The term of the last entry (0 when the log is empty and never compacted).
    pub fn last_term(&self) -> Term {
        self.live()
            .last()
            .map_or(self.offset_term.unwrap_or(0), |e| e.term)
    }

    /// The term of the entry at `index`; `Some(0)` for index 0, `None` past the end, before
    /// the start, and at the compacted prefix's last index when its term is unknown.
    pub fn term_at(&self, index: LogIndex) -> Option<Term> {
        if index == self.offset {
            return self.offset_term;
        }
        self.entry(index).map(|e| e.term)
    }

    /// The entry at `index`.
    pub fn entry(&self, index: LogIndex) -> Option<&Entry> {
        let position = usize::try_from(index.checked_sub(self.offset + 1)?).ok()?;
        self.live().get(position)
    }

    /// Entries with indexes in `from..=to` (clamped to the log).
    pub fn slice(&self, from: LogIndex, to: LogIndex) -> &[Entry] {
        let start = (from.max(self.first_index()) - self.first_index()) as usize;
        let end = (to.min(self.last_index()).saturating_sub(self.offset)) as usize;
        if start >= end {
            &[]
        } else {
            &self.live()[start..end]
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
        while first > self.first_index() && self.term_at(first - 1) == Some(term) {
            first -= 1;
        }
        first
    }

    /// The last index whose entry has term `term`, if the log has any.
    pub fn last_index_of_term(&self, term: Term) -> Option<LogIndex> {
        self.live()
            .iter()
            .rev()
            .find(|e| e.term == term)
            .map(|e| e.index)
    }

    /// The entries, given up.
    pub(crate) fn into_entries(mut self) -> Vec<Entry> {
        self.entries.drain(..self.compacted);
        self.entries
    }

    /// Appends one entry; it must follow the last.
    pub(crate) fn push(&mut self, entry: Entry) {
        debug_assert_eq!(entry.index, self.last_index() + 1);
        self.entries.push(entry);
    }

    /// Drops every entry with index `<= index` (whose term is `term`): a snapshot covers them.
    pub(crate) fn compact_through(&mut self, index: LogIndex, term: Term) {
        if index <= self.offset {
            return;
        }
        debug_assert!(self.term_at(index).is_none_or(|t| t == term));
        let drop = ((index - self.offset) as usize).min(self.live().len());
        // Draining the front at every compaction moved the whole retained log each time (a
        // log_retention of entries every eighth of it: 3 % of the in-process bench's cycles).
        // The compacted slots only give up their payloads now, and are drained once they
        // outnumber the entries held, so each entry is moved at most once on average.
        for slot in &mut self.entries[self.compacted..self.compacted + drop] {
            slot.payload = Payload::Blank;
        }
        self.compacted += drop;
        if self.compacted >= self.live().len() {
            self.entries.drain(..self.compacted);
            self.compacted = 0;
        }
        self.offset = index;
        self.offset_term = Some(term);
    }

    /// Drops every entry: the log now starts after a snapshot ending at `index` with `term`.
    pub(crate) fn reset_to(&mut self, index: LogIndex, term: Term) {
        self.entries.clear();
        self.compacted = 0;
        self.offset = index;
        self.offset_term = Some(term);
    }

    /// Drops every entry with index `>= from`.
    pub(crate) fn truncate_from(&mut self, from: LogIndex) {
        debug_assert!(from > self.offset, "truncating into the compacted prefix");
        self.entries
            .truncate(self.compacted + from.saturating_sub(self.first_index()) as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::NodeId;
    use bytes::Bytes;

    fn log_of_terms(terms: &[Term]) -> RaftLog {
        log_from(1, terms)
    }

    fn log_from(first: LogIndex, terms: &[Term]) -> RaftLog {
        RaftLog::from_entries(
            terms
                .iter()
                .enumerate()
                .map(|(i, &term)| Entry {
                    index: first + i as u64,
                    term,
                    payload: Payload::Blank,
                })
                .collect(),
        )
        .unwrap()
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

    #[test]
    fn a_log_recovered_past_index_1_answers_by_absolute_index() {
        let mut log = log_from(101, &[3, 3, 4]);
        assert_eq!(log.first_index(), 101);
        assert_eq!(log.last_index(), 103);
        assert_eq!(log.last_term(), 4);
        assert_eq!(log.term_at(102), Some(3));
        assert_eq!(
            log.term_at(100),
            None,
            "the compacted prefix's term is unknown"
        );
        assert_eq!(log.term_at(50), None);
        assert_eq!(log.entry(101).map(|e| e.index), Some(101));
        assert_eq!(log.slice(1, 102).len(), 2);
        assert_eq!(log.first_index_of_term_at(102), 101);
        assert_eq!(log.last_index_of_term(3), Some(102));
        assert!(log.is_up_to_date(103, 4));
        assert!(!log.is_up_to_date(200, 3));
        log.truncate_from(103);
        assert_eq!(log.last_index(), 102);
        log.push(Entry {
            index: 103,
            term: 5,
            payload: Payload::Blank,
        });
        assert_eq!(log.term_at(103), Some(5));
    }

    /// Compactions leave their slots to be drained later; a log compacted, grown and cut back
    /// in any order must still answer every lookup by absolute index, as a plain list does.
    #[test]
    fn a_log_compacted_in_steps_answers_like_the_entries_it_holds() {
        let command = |index: LogIndex| Payload::Command {
            tag: crate::types::ProposalTag {
                proposer: NodeId(1),
                request_id: index,
            },
            data: Bytes::from(index.to_le_bytes().to_vec()),
        };
        let mut log = RaftLog::default();
        let mut model: Vec<Entry> = Vec::new(); // what the log must hold, from first_index()
        let mut first: LogIndex = 1;
        for round in 0u64..400 {
            for _ in 0..(round % 7) + 1 {
                let index = log.last_index() + 1;
                let entry = Entry {
                    index,
                    term: 1 + round / 50,
                    payload: command(index),
                };
                log.push(entry.clone());
                model.push(entry);
            }
            if round % 5 == 0 && model.len() > 2 {
                let from = log.last_index() - 1; // cut the last two
                log.truncate_from(from);
                model.truncate(model.len() - 2);
            }
            if round % 3 == 0 && model.len() > 4 {
                let through = first + (round % 4) + 1;
                let term = log.term_at(through).unwrap();
                log.compact_through(through, term);
                model.drain(..(through + 1 - first) as usize);
                first = through + 1;
                assert_eq!(
                    log.term_at(through),
                    Some(term),
                    "the prefix's last term is kept"
                );
            }
            assert_eq!(log.first_index(), first);
            assert_eq!(log.last_index(), first + model.len() as LogIndex - 1);
            assert_eq!(log.slice(0, LogIndex::MAX), &model[..]);
            for entry in &model {
                assert_eq!(log.entry(entry.index), Some(entry));
            }
            assert_eq!(log.entry(first - 1), None);
            assert_eq!(
                log.last_term(),
                model.last().map_or(log.last_term(), |e| e.term)
            );
        }
        assert!(
            log.entries.len() <= 2 * model.len() + 8,
            "compacted slots are drained"
        );
        assert_eq!(log.into_entries(), model);
    }

    #[test]
    fn a_log_with_a_hole_or_index_0_is_refused() {
        let entry = |index| Entry {
            index,
            term: 1,
            payload: Payload::Blank,
        };
        assert!(RaftLog::from_entries(vec![entry(1), entry(3)]).is_err());
        assert!(RaftLog::from_entries(vec![entry(0)]).is_err());
        assert!(RaftLog::from_entries(vec![entry(7), entry(8)]).is_ok());
        assert!(RaftLog::from_entries(Vec::new()).is_ok());
    }
}
