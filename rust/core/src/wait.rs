//! Sleeping until another process changes a word in the shared header. On Linux this is
//! a shared (not PRIVATE) futex on the mapped word; elsewhere a short sleep. `sleep_on` and
//! `wake_sleepers` add the `WAITERS` flag protocol of docs/ring-format.md on top, so a
//! producer that nobody waits for never makes a syscall.

use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::time::Duration;

use crate::format::WAITERS;

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
