//! The single-producer lock: one 64-bit word in the header holding the producer's pid and
//! the low 32 bits of its start time, set by compare-and-swap. A process that died without
//! releasing it is detected (pid gone, or pid reused by a process that started at another
//! time) and its lock is taken over.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use crate::error::{Error, Result};

/// Bumped in the child after every fork(): a producer handle remembers the generation it
/// was opened in, so a copy inherited by a child (Python's multiprocessing forks by
/// default on Linux) neither writes beside its parent nor releases the parent's lock.
static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);
static ATFORK: Once = Once::new();

extern "C" fn bump_fork_generation() {
    FORK_GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// The current fork generation (installs the fork handler on first use).
pub fn fork_generation() -> u64 {
    ATFORK.call_once(|| {
        // SAFETY: registers a child handler that only does an atomic add (async-signal-safe).
        unsafe { libc::pthread_atfork(None, None, Some(bump_fork_generation)) };
    });
    FORK_GENERATION.load(Ordering::Relaxed)
}

/// Whether this process is a fork() child of the one that was in `generation`.
#[inline(always)]
pub fn forked_since(generation: u64) -> bool {
    FORK_GENERATION.load(Ordering::Relaxed) != generation
}

/// The lock word identifying this process.
pub fn my_lock_word() -> u64 {
    let pid = std::process::id();
    lock_word(pid, start_time(pid).unwrap_or(0))
}

pub fn lock_word(pid: u32, start: u64) -> u64 {
    (pid as u64) | ((start & 0xffff_ffff) << 32)
}

pub fn lock_pid(word: u64) -> u32 {
    word as u32
}

/// Start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process that wrote `word` is still running.
pub fn holder_alive(word: u64) -> bool {
    let pid = lock_pid(word);
    if pid == 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return false;
    }
    let stored = word >> 32;
    match start_time(pid) {
        // Same pid, other start time: the pid was reused, the producer is gone.
        Some(now) if stored != 0 => (now & 0xffff_ffff) == stored,
        _ => true,
    }
}

/// Outcome of a successful acquisition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    Fresh,
    /// Taken over from a dead process with this pid.
    TookOver(u32),
}

pub fn acquire(lock: &AtomicU64, mine: u64) -> Result<Acquired> {
    // Each round either succeeds, fails, or lost a compare-and-swap to another process that
    // changed the word meanwhile: a word that keeps changing this often is not a lock.
    for _ in 0..10_000 {
        let cur = lock.load(Ordering::Acquire);
        if cur == 0 {
            if lock
                .compare_exchange(0, mine, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Ok(Acquired::Fresh);
            }
            continue;
        }
        if cur == mine {
            return Err(Error::ProducerActive {
                pid: lock_pid(cur),
                this_process: true,
            });
        }
        if holder_alive(cur) {
            return Err(Error::ProducerActive {
                pid: lock_pid(cur),
                this_process: false,
            });
        }
        if lock
            .compare_exchange(cur, mine, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return Ok(Acquired::TookOver(lock_pid(cur)));
        }
    }
    Err(Error::corrupt(
        "the ring's producer_lock word keeps changing under compare-and-swap: \
         another process is writing garbage into the ring header",
    ))
}

pub fn release(lock: &AtomicU64, mine: u64) {
    let _ = lock.compare_exchange(mine, 0, Ordering::AcqRel, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_start_time_is_read() {
        let me = my_lock_word();
        assert_eq!(lock_pid(me), std::process::id());
        assert!(me >> 32 != 0, "start time should be readable from /proc");
        assert!(holder_alive(me));
    }

    #[test]
    fn reused_pid_with_other_start_time_is_dead() {
        let pid = std::process::id();
        let st = start_time(pid).unwrap();
        assert!(!holder_alive(lock_word(pid, st.wrapping_add(12345))));
    }

    #[test]
    fn second_acquire_fails_dead_holder_is_taken_over() {
        let lock = AtomicU64::new(0);
        let me = my_lock_word();
        assert_eq!(acquire(&lock, me).unwrap(), Acquired::Fresh);
        assert!(matches!(
            acquire(&lock, me),
            Err(Error::ProducerActive {
                this_process: true,
                ..
            })
        ));
        release(&lock, me);
        assert_eq!(lock.load(Ordering::Relaxed), 0);
        // A pid far above pid_max cannot exist.
        let ghost = lock_word(0x7fff_fff0, 1);
        lock.store(ghost, Ordering::Relaxed);
        assert_eq!(acquire(&lock, me).unwrap(), Acquired::TookOver(0x7fff_fff0));
    }
}
