//! The free-space check in front of every write
//! ([`ConsensusConfig::disk_reserve_bytes`](crate::ConsensusConfig::disk_reserve_bytes)).
//!
//! One `statvfs` per proposal was 1 % of a loaded node's CPU. Free space moves slowly next to
//! a reserve of megabytes, so a reading is reused: for at most [`REREAD_AFTER`], and only while
//! the bytes proposed since could not have used up the margin it showed above the reserve. A
//! reading under the reserve is never reused, so writes resume at the first proposal after
//! space returns.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::StorageError;

/// How long a reading of the free space is trusted. Another process filling the disk is
/// noticed within this, at worst: far less than any reserve takes to fill.
pub(crate) const REREAD_AFTER: Duration = Duration::from_millis(10);

/// The state directory, its reserve, and the last reading that showed room.
#[derive(Debug)]
pub(crate) struct DiskSpaceGate {
    dir: Option<PathBuf>,
    reserve: u64,
    last: Mutex<Option<Reading>>,
}

#[derive(Clone, Copy, Debug)]
struct Reading {
    at: Instant,
    /// Free bytes above the reserve at `at`, less what was proposed since.
    margin: u64,
}

impl DiskSpaceGate {
    /// A gate for `dir` (none: no check) keeping `reserve` bytes free (zero: no check).
    pub(crate) fn new(dir: Option<PathBuf>, reserve: u64) -> Self {
        DiskSpaceGate {
            dir,
            reserve,
            last: Mutex::new(None),
        }
    }

    /// Refuses a write of `bytes` with [`StorageError::DiskFull`] while the state directory's
    /// filesystem has less free space than the reserve. A filesystem that cannot be asked
    /// refuses nothing.
    pub(crate) fn check(&self, bytes: u64) -> Result<(), StorageError> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        self.check_with(bytes, Instant::now(), || available_bytes(dir))
    }

    fn check_with(
        &self,
        bytes: u64,
        now: Instant,
        read_free_space: impl FnOnce() -> Option<u64>,
    ) -> Result<(), StorageError> {
        if self.reserve == 0 {
            return Ok(());
        }
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(reading) = last.as_mut()
            && now.saturating_duration_since(reading.at) < REREAD_AFTER
            && reading.margin >= bytes
        {
            reading.margin -= bytes;
            return Ok(());
        }
        let Some(available) = read_free_space() else {
            *last = None;
            return Ok(());
        };
        if available < self.reserve {
            *last = None;
            let path = self
                .dir
                .as_ref()
                .map_or_else(String::new, |dir| dir.display().to_string());
            return Err(StorageError::DiskFull {
                path,
                available_bytes: available,
                reserve_bytes: self.reserve,
            });
        }
        *last = Some(Reading {
            at: now,
            margin: (available - self.reserve).saturating_sub(bytes),
        });
        Ok(())
    }
}

/// Bytes an unprivileged process may still write on the filesystem holding `dir`, or `None`
/// when it cannot be asked (not Unix, or the directory is missing).
fn available_bytes(dir: &std::path::Path) -> Option<u64> {
    #[cfg(unix)]
    {
        let stats = rustix::fs::statvfs(dir).ok()?;
        Some(stats.f_bavail.saturating_mul(stats.f_frsize))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        None
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn gate() -> DiskSpaceGate {
        DiskSpaceGate::new(Some(PathBuf::from("/state")), 8 * MIB)
    }

    /// Checks `bytes` at `now` against a disk with `free` bytes; returns whether it passed and
    /// whether the free space was read.
    fn check(gate: &DiskSpaceGate, bytes: u64, now: Instant, free: u64) -> (bool, bool) {
        let read = Cell::new(false);
        let passed = gate
            .check_with(bytes, now, || {
                read.set(true);
                Some(free)
            })
            .is_ok();
        (passed, read.get())
    }

    #[test]
    fn a_reading_is_reused_within_its_time_and_margin_only() {
        let gate = gate();
        let start = Instant::now();
        assert_eq!(check(&gate, 100, start, 10 * MIB), (true, true));
        // Within the time and the 2 MiB margin: no new reading, whatever the disk holds now.
        assert_eq!(check(&gate, MIB, start, 0), (true, false));
        // The margin left (1 MiB - 100 bytes) cannot cover another MiB: read again, and the disk
        // is now full.
        assert_eq!(check(&gate, MIB, start, 4 * MIB), (false, true));
        // A full reading is never reused: space returns, the next write goes through.
        assert_eq!(check(&gate, 1, start, 10 * MIB), (true, true));
        // Past its time a reading is read again even with margin left.
        let later = start + REREAD_AFTER;
        assert_eq!(check(&gate, 1, later, 4 * MIB), (false, true));
    }

    #[test]
    fn the_refusal_names_the_directory_and_both_sizes() {
        let error = gate()
            .check_with(1, Instant::now(), || Some(MIB))
            .unwrap_err();
        let StorageError::DiskFull {
            path,
            available_bytes,
            reserve_bytes,
        } = error
        else {
            panic!("expected DiskFull, got {error:?}");
        };
        assert_eq!(
            (path.as_str(), available_bytes, reserve_bytes),
            ("/state", MIB, 8 * MIB)
        );
    }

    #[test]
    fn no_directory_no_reserve_or_no_answer_refuses_nothing() {
        let now = Instant::now();
        let without_dir = DiskSpaceGate::new(None, 8 * MIB);
        assert!(without_dir.check(u64::MAX).is_ok());
        let without_reserve = DiskSpaceGate::new(Some(PathBuf::from("/state")), 0);
        assert!(without_reserve.check_with(1, now, || Some(0)).is_ok());
        assert!(gate().check_with(1, now, || None).is_ok());
    }
}
