//! The hash chain over a log: the value a signed acknowledgement names, so that one signature
//! vouches for the whole log prefix it acknowledges.
//!
//! `digest(i) = SHA-256(domain ‖ term ‖ index ‖ payload)` (every field of the payload, a
//! membership's keys and addresses included) and `chain(i) = SHA-256(chain(i − 1) ‖
//! digest(i))`, with `chain(0)` all zeros. Two logs with one chain value at an index hold the same
//! entries up to it (short of a SHA-256 collision), which is Raft's log-matching property made
//! checkable by anyone: a certificate names a chain value, and whoever holds the log recomputes it.

use sha2::{Digest as _, Sha256};

use crate::types::{Entry, LogIndex, Payload};

/// A SHA-256 value.
pub type Hash = [u8; 32];

/// Domain separation for entry digests.
const ENTRY_DOMAIN: &[u8] = b"stratoswarm-consensus/entry/v1";

/// The digest of one entry: its term, index and payload (the proposer's tag included, since it
/// decides who is answered).
pub fn entry_digest(entry: &Entry) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update(ENTRY_DOMAIN);
    hasher.update(entry.term.to_be_bytes());
    hasher.update(entry.index.to_be_bytes());
    match &entry.payload {
        Payload::Blank => hasher.update([0u8]),
        Payload::Command { tag, data } => {
            hasher.update([1u8]);
            hasher.update(tag.proposer.0.to_be_bytes());
            hasher.update(tag.request_id.to_be_bytes());
            hasher.update((data.len() as u64).to_be_bytes());
            hasher.update(data);
        }
        Payload::Membership(membership) => {
            hasher.update([2u8]);
            for set in [
                &membership.voters,
                &membership.outgoing,
                &membership.learners,
            ] {
                hasher.update((set.len() as u64).to_be_bytes());
                for id in set {
                    hasher.update(id.0.to_be_bytes());
                }
            }
            // The keys decide whose signatures count, so they are chained too (after a marker,
            // and only when there are any, so that a keyless membership hashes as before).
            if !membership.keys.is_empty() {
                hasher.update([3u8]);
                hasher.update((membership.keys.len() as u64).to_be_bytes());
                for (id, key) in &membership.keys {
                    hasher.update(id.0.to_be_bytes());
                    hasher.update(key);
                }
            }
            // The addresses decide where members dial, and a chain value vouches for whole
            // entries: chained the same way (their own marker, only when there are any). Logs
            // written before they were chained recompute other values for a membership that
            // carries addresses; certificates stored over such an entry then no longer match.
            if !membership.addresses.is_empty() {
                hasher.update([4u8]);
                hasher.update((membership.addresses.len() as u64).to_be_bytes());
                for (id, address) in &membership.addresses {
                    hasher.update(id.0.to_be_bytes());
                    hasher.update((address.len() as u64).to_be_bytes());
                    hasher.update(address.as_bytes());
                }
            }
        }
    }
    hasher.finalize().into()
}

/// The chain value after `previous` with an entry of digest `digest`.
pub fn chain_link(previous: &Hash, digest: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update(previous);
    hasher.update(digest);
    hasher.finalize().into()
}

/// The chain value at the last of `entries`, starting from `start` (the value before the first).
pub fn chain_over<'a>(start: Hash, entries: impl IntoIterator<Item = &'a Entry>) -> Hash {
    entries.into_iter().fold(start, |chain, entry| {
        chain_link(&chain, &entry_digest(entry))
    })
}

/// Digests and chain values of a node's log, kept in step with every write the core makes.
#[derive(Clone, Debug, Default)]
pub(crate) struct LogChain {
    /// `(digest, chain)` of index `i` at position `i − 1`.
    links: Vec<(Hash, Hash)>,
}

impl LogChain {
    /// The chain of a log starting at index 1.
    pub(crate) fn of(entries: &[Entry]) -> Self {
        let mut chain = LogChain::default();
        chain.append(entries);
        chain
    }

    /// The last index covered.
    pub(crate) fn last_index(&self) -> LogIndex {
        self.links.len() as LogIndex
    }

    /// The chain value at `index` (all zeros at 0), if the log reaches it.
    pub(crate) fn at(&self, index: LogIndex) -> Option<Hash> {
        if index == 0 {
            return Some([0; 32]);
        }
        self.links.get(index as usize - 1).map(|link| link.1)
    }

    /// The digests of `from..=to`, if the log reaches `to`.
    pub(crate) fn digests(&self, from: LogIndex, to: LogIndex) -> Option<Vec<Hash>> {
        if to < from {
            return Some(Vec::new());
        }
        let slice = self.links.get(from as usize - 1..to as usize)?;
        Some(slice.iter().map(|link| link.0).collect())
    }

    /// Forgets every index from `from` on (a truncated log).
    pub(crate) fn truncate_from(&mut self, from: LogIndex) {
        self.links.truncate(from.saturating_sub(1) as usize);
    }

    /// Extends the chain with `entries`, which continue the log (an entry that does not is a
    /// bug in the core; it is caught in debug builds).
    pub(crate) fn append(&mut self, entries: &[Entry]) {
        for entry in entries {
            debug_assert_eq!(entry.index, self.last_index() + 1, "chain out of step");
            let digest = entry_digest(entry);
            let previous = self.at(self.last_index()).unwrap_or([0; 32]);
            self.links.push((digest, chain_link(&previous, &digest)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::Membership;
    use crate::types::{NodeId, ProposalTag};

    fn command(index: LogIndex, data: &'static [u8]) -> Entry {
        Entry {
            term: 1,
            index,
            payload: Payload::Command {
                tag: ProposalTag {
                    proposer: NodeId(1),
                    request_id: index,
                },
                data: bytes::Bytes::from_static(data),
            },
        }
    }

    #[test]
    fn the_chain_follows_truncation_and_rewrites() {
        let log = [command(1, b"a"), command(2, b"b"), command(3, b"c")];
        let mut chain = LogChain::of(&log);
        assert_eq!(chain.at(3), Some(chain_over([0; 32], &log)));
        let before = chain.at(3);
        chain.truncate_from(3);
        assert_eq!(chain.last_index(), 2);
        chain.append(&[command(3, b"C")]);
        assert_ne!(chain.at(3), before, "a rewritten entry changes the chain");
        assert_eq!(chain.at(2), Some(chain_over([0; 32], &log[..2])));
        assert_eq!(chain.digests(2, 3).map(|d| d.len()), Some(2));
        assert_eq!(chain.digests(2, 4), None);
    }

    #[test]
    fn every_field_of_an_entry_changes_its_digest() {
        let base = command(1, b"a");
        let mut other_term = base.clone();
        other_term.term = 2;
        let mut other_index = base.clone();
        other_index.index = 2;
        let blank = Entry {
            payload: Payload::Blank,
            ..base.clone()
        };
        let digests =
            [&base, &other_term, &other_index, &blank, &command(1, b"b")].map(entry_digest);
        for (i, a) in digests.iter().enumerate() {
            for b in &digests[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn every_field_of_a_membership_changes_its_digest() {
        let (a, b) = (NodeId(1), NodeId(2));
        let entry = |membership: Membership| Entry {
            term: 1,
            index: 1,
            payload: Payload::Membership(Box::new(membership)),
        };
        let voters = Membership::of_voters([a, b]);
        let mut joint = voters.clone();
        joint.outgoing.insert(a);
        let mut learner = voters.clone();
        learner.learners.insert(NodeId(3));
        let mut keyed = voters.clone();
        keyed.keys.insert(a, [7; 32]);
        let mut other_key = voters.clone();
        other_key.keys.insert(a, [8; 32]);
        let mut addressed = voters.clone();
        addressed.addresses.insert(b, "n2@127.0.0.1:7001".into());
        let mut other_address = voters.clone();
        other_address
            .addresses
            .insert(b, "n2@127.0.0.1:7002".into());
        let mut other_member_address = voters.clone();
        other_member_address
            .addresses
            .insert(a, "n2@127.0.0.1:7001".into());
        let mut keyed_and_addressed = keyed.clone();
        keyed_and_addressed.addresses = addressed.addresses.clone();
        let digests = [
            voters,
            joint,
            learner,
            keyed,
            other_key,
            addressed,
            other_address,
            other_member_address,
            keyed_and_addressed,
        ]
        .map(|m| entry_digest(&entry(m)));
        for (i, x) in digests.iter().enumerate() {
            for y in &digests[i + 1..] {
                assert_ne!(x, y);
            }
        }
    }
}
