//! A sleep that ends within microseconds of its deadline, for the leader's linger.
//!
//! Tokio's timers turn on a millisecond wheel: a `sleep` of 200 µs ends 1-2 ms later unless
//! something else wakes the thread first. A linger is meant to be a fraction of one fsync
//! ([`ConsensusConfig::leader_linger`](crate::ConsensusConfig::leader_linger)), so where the
//! driver's runtime has an I/O reactor on Linux it is armed on a `timerfd`, which the reactor's
//! `epoll` wakes for as the kernel's high-resolution timer fires. Elsewhere (no reactor on
//! the thread, another OS, or a `timerfd` the kernel refused) the linger falls back to
//! tokio's timer and may run up to a millisecond long.

use std::time::Instant;

/// A reusable one-shot timer; at most one sleep at a time (the driver's single wait).
pub(crate) struct PreciseTimer {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    timer: Option<linux::Timerfd>,
}

impl PreciseTimer {
    /// A timer for the current runtime: precise where it can be, tokio's otherwise. Call it
    /// inside the runtime that will await it.
    pub(crate) fn new(with_reactor: bool) -> Self {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            let timer = if with_reactor {
                linux::Timerfd::new()
                    .inspect_err(|error| {
                        tracing::debug!(%error, "no timerfd: the linger falls back to tokio's timer")
                    })
                    .ok()
            } else {
                None
            };
            PreciseTimer { timer }
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            let _ = with_reactor;
            PreciseTimer {}
        }
    }

    /// Whether sleeps end within microseconds of their deadline (a `timerfd`).
    #[cfg(test)]
    pub(crate) fn is_precise(&self) -> bool {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            self.timer.is_some()
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            false
        }
    }

    /// Returns once `deadline` has passed.
    pub(crate) async fn sleep_until(&mut self, deadline: Instant) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Some(timer) = &mut self.timer {
            match timer.sleep_until(deadline).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::debug!(%error, "timerfd failed: this sleep falls back to tokio's timer")
                }
            }
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod linux {
    use std::io;
    use std::os::fd::OwnedFd;
    use std::time::Instant;

    use rustix::time::{
        Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, timerfd_create,
        timerfd_settime,
    };
    use tokio::io::Interest;
    use tokio::io::unix::AsyncFd;

    pub(super) struct Timerfd {
        fd: AsyncFd<OwnedFd>,
        /// The deadline the kernel timer is armed for, until a read sees it fire. The driver
        /// waits again with the same linger deadline after every input that arrives during
        /// it; the timer then stays armed as it is rather than being set once per input.
        armed_for: Option<Instant>,
    }

    impl Timerfd {
        pub(super) fn new() -> io::Result<Self> {
            let fd = timerfd_create(
                TimerfdClockId::Monotonic,
                TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
            )?;
            // `with_interest` is deprecated because an arbitrary `AsRawFd` may hand the reactor
            // a descriptor that closes or changes under it; an `OwnedFd` moved in here is the
            // same open descriptor until the `AsyncFd` drops it, which is the whole contract
            // of the `unsafe` replacement (this crate forbids `unsafe`).
            #[allow(deprecated)]
            let registered = AsyncFd::with_interest(fd, Interest::READABLE)?;
            Ok(Timerfd {
                fd: registered,
                armed_for: None,
            })
        }

        pub(super) async fn sleep_until(&mut self, deadline: Instant) -> io::Result<()> {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(()); // a zero `it_value` would disarm the timer, not fire it
            }
            if self.armed_for != Some(deadline) {
                self.arm(left)?;
                self.armed_for = Some(deadline);
            }
            loop {
                let mut ready = self.fd.readable().await?;
                let mut expirations = [0u8; 8];
                match ready.try_io(|fd| {
                    rustix::io::read(fd.get_ref(), &mut expirations).map_err(io::Error::from)
                }) {
                    Ok(Ok(_)) => {
                        self.armed_for = None;
                        return Ok(());
                    }
                    Ok(Err(error)) => return Err(error),
                    // Readiness left from an earlier sleep: cleared; wait for this one.
                    Err(_would_block) => continue,
                }
            }
        }

        /// Arms the timer `left` from now. Arming resets the count of expirations a sleep
        /// given up earlier may have left unread, so a stale one never ends the next sleep.
        fn arm(&self, left: std::time::Duration) -> io::Result<()> {
            let value = rustix::time::Timespec {
                tv_sec: left.as_secs().try_into().unwrap_or(i64::MAX),
                tv_nsec: left.subsec_nanos().into(),
            };
            let zero = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            timerfd_settime(
                self.fd.get_ref(),
                TimerfdTimerFlags::empty(),
                &Itimerspec {
                    it_interval: zero,
                    it_value: value,
                },
            )?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn runtime(with_io: bool) -> tokio::runtime::Runtime {
        let mut builder = tokio::runtime::Builder::new_current_thread();
        builder.enable_time();
        if with_io {
            builder.enable_io();
        }
        builder.build().expect("a runtime")
    }

    #[test]
    fn a_sleep_never_ends_before_its_deadline_with_or_without_a_reactor() {
        for with_io in [true, false] {
            runtime(with_io).block_on(async {
                let mut timer = PreciseTimer::new(with_io);
                if cfg!(target_os = "linux") {
                    assert_eq!(timer.is_precise(), with_io);
                }
                for micros in [0, 1, 150, 700, 2_500] {
                    let deadline = Instant::now() + Duration::from_micros(micros);
                    timer.sleep_until(deadline).await;
                    assert!(Instant::now() >= deadline, "{micros} µs (io: {with_io})");
                }
                // A deadline already past returns at once, and a sleep given up before its
                // deadline leaves nothing that ends the next one early.
                timer
                    .sleep_until(Instant::now() - Duration::from_millis(1))
                    .await;
                let abandoned = Instant::now() + Duration::from_micros(100);
                let _ = tokio::time::timeout(Duration::ZERO, timer.sleep_until(abandoned)).await;
                std::thread::sleep(Duration::from_micros(300)); // it would have fired by now
                let deadline = Instant::now() + Duration::from_millis(3);
                timer.sleep_until(deadline).await;
                assert!(
                    Instant::now() >= deadline,
                    "a stale expiry ended a sleep (io: {with_io})"
                );
                // A sleep given up and taken up again with the same deadline (the driver
                // after an input during a linger) still ends at that deadline, not before.
                let deadline = Instant::now() + Duration::from_millis(2);
                let _ = tokio::time::timeout(Duration::ZERO, timer.sleep_until(deadline)).await;
                timer.sleep_until(deadline).await;
                assert!(
                    Instant::now() >= deadline,
                    "a resumed sleep ended early (io: {with_io})"
                );
            });
        }
    }
}
