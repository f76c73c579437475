//! Waiting for another process: how a reader waits for data and a blocked producer for
//! room. [`WaitStrategy`] says how the time is spent (spin, park), in the manner of
//! Aeron's idle strategies and the Disruptor's wait strategies. Parking is a shared (not
//! PRIVATE) futex on a word of the mapped header on Linux, elsewhere a short sleep;
//! `sleep_on` and `wake_sleepers` add the `WAITERS` flag protocol of docs/ring-format.md on
//! top, so a producer that nobody waits for never makes a syscall.

use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::format::WAITERS;

/// How a waiting side spends its time until the other side acts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WaitStrategy {
    /// Spin for [`SPIN`], then park on the futex: a hand-over within tens of microseconds
    /// costs no system call on either side, and a long wait costs no CPU. (No phase of
    /// `sched_yield` between the two, as Aeron's backoff has: with another task runnable on
    /// a 2-core machine, a yield gave the CPU away for a scheduler slice, and case 3's p99
    /// latency went from about 60 µs to 250 µs.)
    #[default]
    Adaptive,
    /// Spin until ready or the timeout: the lowest latency, one core kept busy while waiting.
    Busy,
    /// Park on the futex at once: no CPU while waiting; each hand-over costs the waker a
    /// system call and the sleeper a wake-up (tens of microseconds).
    Park,
}

/// How long an adaptive wait spins before it parks.
pub const SPIN: Duration = Duration::from_micros(50);

impl WaitStrategy {
    pub fn parse(s: &str) -> Result<WaitStrategy> {
        match s {
            "adaptive" => Ok(WaitStrategy::Adaptive),
            "busy" => Ok(WaitStrategy::Busy),
            "park" => Ok(WaitStrategy::Park),
            other => Err(Error::config(format!(
                "unknown wait {other:?}; use \"adaptive\", \"busy\" or \"park\""
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WaitStrategy::Adaptive => "adaptive",
            WaitStrategy::Busy => "busy",
            WaitStrategy::Park => "park",
        }
    }

    /// Waits up to `timeout` for `ready()`, spending the time as the strategy says; parks on
    /// `word` (None: the header is read-only here, so a short sleep instead). Returns
    /// `ready()`; may return false before the timeout (callers loop).
    pub(crate) fn wait(
        self,
        word: Option<&AtomicU32>,
        timeout: Duration,
        ready: impl Fn() -> bool,
    ) -> bool {
        if ready() {
            return true;
        }
        let spin = match self {
            WaitStrategy::Adaptive => SPIN,
            WaitStrategy::Busy => timeout,
            WaitStrategy::Park => Duration::ZERO,
        };
        let start = Instant::now();
        let spin = spin.min(timeout);
        while start.elapsed() < spin {
            for _ in 0..32 {
                if ready() {
                    return true;
                }
                std::hint::spin_loop();
            }
        }
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return ready();
        }
        match word {
            Some(w) => sleep_on(w, left, &ready),
            None => std::thread::sleep(left.min(Duration::from_micros(200))),
        }
        ready()
    }
}

/// Sleeps while `*word == expected`, at most `timeout`. May return early (spuriously);
/// callers re-check their condition.
pub(crate) fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    #[cfg(target_os = "linux")]
    {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `word` points into a live shared mapping and is 4-aligned; FUTEX_WAIT
        // only reads it. A shared futex keys on the backing file page, so processes that
        // map the same file meet on the same futex.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAIT,
                expected,
                &ts as *const libc::timespec,
                std::ptr::null::<u32>(),
                0u32,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (word, expected);
        std::thread::sleep(timeout.min(Duration::from_micros(500)));
    }
}

/// Wakes every process sleeping on `word`.
pub(crate) fn wake_all(word: &AtomicU32) {
    #[cfg(target_os = "linux")]
    // SAFETY: as in `wait`; FUTEX_WAKE does not touch the word's memory.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            0usize,
            0usize,
            0u32,
        );
    }
    #[cfg(not(target_os = "linux"))]
    let _ = word;
}

/// Between two tries of a seqlock read: spin a little, then yield.
pub(crate) fn backoff(tries: u32) {
    if tries < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// Wakes everybody sleeping on a futex word, if anybody said they would sleep.
/// The caller has just published what the sleepers wait for; the SeqCst fence pairs with
/// the sleeper's SeqCst flag-set and re-check (no lost wake-up).
#[inline(always)]
pub(crate) fn wake_sleepers(word: &AtomicU32) {
    fence(Ordering::SeqCst);
    let v = word.load(Ordering::Relaxed);
    if v & WAITERS != 0 {
        word.store((v & !WAITERS).wrapping_add(1) & !WAITERS, Ordering::Release);
        wake_all(word);
    }
}

/// Sleeps on a futex word until woken or `timeout`, unless `ready()` holds once the
/// sleeper has announced itself.
pub(crate) fn sleep_on(word: &AtomicU32, timeout: Duration, ready: impl Fn() -> bool) {
    let mut v = word.load(Ordering::Acquire);
    if v & WAITERS == 0 {
        match word.compare_exchange(v, v | WAITERS, Ordering::SeqCst, Ordering::Acquire) {
            Ok(_) => v |= WAITERS,
            Err(_) => return, // it changed: something happened, let the caller look
        }
    } else {
        fence(Ordering::SeqCst);
    }
    if ready() {
        return;
    }
    wait(word, v, timeout);
}
