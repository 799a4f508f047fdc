//! The synced-through mark: how far the log reached at the last successful sync, kept beside the
//! database, and the check at start-up that fjall's recovery did not lose any of it.
//!
//! fjall's journal recovery truncates a journal at the first entry that does not decode. That is
//! right for a torn tail (a write a crash cut short, never synced, never acknowledged), but a byte
//! damaged in the middle of a journal makes it silently drop every later batch, acknowledged ones
//! included. So the store writes, after each successful sync, the last log index that sync made
//! durable (8 bytes and a CRC-32, in `state_dir/`[`SYNCED_MARK_FILE`]), and at start-up compares it
//! with the log fjall recovered: a log that ends before the mark lost synced entries, and the
//! store refuses to start, naming the journal file fjall cut and the offset it cut at (journal
//! sizes are taken before and after fjall opens).
//!
//! The mark is written without an fsync (it must not double the cost of a sync): after a power
//! loss it may lag, which only weakens the check, never makes it fire falsely. Lowering it (a
//! truncation of synced entries, as when a follower's log conflicts with its leader's) is
//! fsynced before the journal sync that makes the truncation durable, so that it can never be
//! ahead of the log.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::StorageError;
use crate::types::LogIndex;

/// File name of the mark, in the state directory.
pub const SYNCED_MARK_FILE: &str = "synced-through";

/// The mark file and the value last written to it.
pub(super) struct SyncedMark {
    file: File,
    written: Option<LogIndex>,
}

impl SyncedMark {
    /// Opens (creating) the mark in `state_dir` and returns it with the value it holds; a mark
    /// that is missing, short or fails its checksum (torn by a power loss) reads as `None`.
    pub(super) fn open(state_dir: &Path) -> Result<(Self, Option<LogIndex>), StorageError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(state_dir.join(SYNCED_MARK_FILE))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let value = match bytes.as_slice() {
            [index @ .., a, b, c, d] if index.len() == 8 => {
                let stored = u32::from_le_bytes([*a, *b, *c, *d]);
                (crc32fast::hash(index) == stored).then(|| {
                    LogIndex::from_le_bytes(index.try_into().expect("eight bytes, matched above"))
                })
            }
            _ => None,
        };
        Ok((
            Self {
                file,
                written: value,
            },
            value,
        ))
    }

    /// Writes `index` as the mark; `durable` fsyncs it too.
    fn write(&mut self, index: LogIndex, durable: bool) -> std::io::Result<()> {
        let mut bytes = index.to_le_bytes().to_vec();
        bytes.extend_from_slice(&crc32fast::hash(&index.to_le_bytes()).to_le_bytes());
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(&bytes)?;
        if durable {
            self.file.sync_data()?;
        }
        self.written = Some(index);
        Ok(())
    }

    /// Before a sync that leaves the log ending at `last`: lowers the mark durably if `last` is
    /// below it.
    pub(super) fn before_sync(&mut self, last: LogIndex) -> std::io::Result<()> {
        match self.written {
            Some(written) if last < written => self.write(last, true),
            _ => Ok(()),
        }
    }

    /// After a successful sync that left the log ending at `last`.
    pub(super) fn after_sync(&mut self, last: LogIndex) -> std::io::Result<()> {
        if self.written == Some(last) {
            return Ok(());
        }
        self.write(last, false)
    }
}

/// The size of every journal file (`*.jnl`) under `database_dir`, or none if it does not exist.
pub(super) fn journal_sizes(database_dir: &Path) -> std::io::Result<Vec<(PathBuf, u64)>> {
    let entries = match std::fs::read_dir(database_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let mut sizes = Vec::new();
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        if path.extension().is_some_and(|extension| extension == "jnl") {
            sizes.push((path, entry.metadata()?.len()));
        }
    }
    sizes.sort();
    Ok(sizes)
}

/// A journal fjall's recovery made shorter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct JournalCut {
    pub(super) path: PathBuf,
    /// Where fjall cut it: the first byte it discarded.
    pub(super) offset: u64,
    /// Its length before.
    pub(super) length: u64,
}

/// The journals that are shorter in `after` than in `before`.
pub(super) fn cuts(before: &[(PathBuf, u64)], after: &[(PathBuf, u64)]) -> Vec<JournalCut> {
    before
        .iter()
        .filter_map(|(path, length)| {
            let now = after
                .iter()
                .find(|(other, _)| other == path)
                .map_or(0, |(_, now)| *now);
            (now < *length).then(|| JournalCut {
                path: path.clone(),
                offset: now,
                length: *length,
            })
        })
        .collect()
}

/// The start-up check: the log recovered ends at `last`, the mark says `mark` was synced.
pub(super) fn check(
    last: LogIndex,
    mark: Option<LogIndex>,
    cuts: &[JournalCut],
) -> Result<(), StorageError> {
    let Some(mark) = mark else {
        return Ok(());
    };
    if last >= mark {
        return Ok(());
    }
    let lost = format!(
        "entries {} to {mark} were synced (acknowledged) but the log recovered ends at {last}",
        last + 1
    );
    Err(match cuts.first() {
        Some(cut) => StorageError::Corrupt {
            location: format!("journal {} at byte {}", cut.path.display(), cut.offset),
            detail: format!(
                "damaged: fjall's recovery discarded bytes {}..{} of it as a torn tail, but {lost}; \
                 refusing to start",
                cut.offset, cut.length
            ),
        },
        None => StorageError::Corrupt {
            location: format!("log after index {last}"),
            detail: format!("{lost}; refusing to start"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_round_trips_and_a_torn_one_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let (mut mark, value) = SyncedMark::open(dir.path()).unwrap();
        assert_eq!(value, None);
        mark.after_sync(41).unwrap();
        mark.before_sync(7).unwrap();
        drop(mark);
        assert_eq!(SyncedMark::open(dir.path()).unwrap().1, Some(7));
        let path = dir.path().join(SYNCED_MARK_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(SyncedMark::open(dir.path()).unwrap().1, None);
    }

    #[test]
    fn a_log_shorter_than_the_mark_names_the_cut_journal() {
        let cut = JournalCut {
            path: PathBuf::from("/d/fjall/0.jnl"),
            offset: 100,
            length: 900,
        };
        assert!(check(10, Some(10), &[]).is_ok());
        assert!(check(10, None, std::slice::from_ref(&cut)).is_ok());
        let error = check(4, Some(10), &[cut]).unwrap_err().to_string();
        assert!(error.contains("0.jnl at byte 100"), "{error}");
        assert!(error.contains("entries 5 to 10"), "{error}");
    }
}
