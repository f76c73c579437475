//! Everything the binding does with the GIL released, in one place: the size from which a
//! copy is worth releasing it, the wait loop that sleeps in slices and lets Ctrl-C through
//! between them, and taking a Mutex without deadlocking against the GIL. `ring.rs` (writes
//! waiting for room), `reader.rs` (reads waiting for data) and `reserve.rs` use them.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Payloads at least this large are copied with the GIL released.
pub const DETACH_COPY_BYTES: usize = 256 * 1024;
/// Longest sleep between two checks for Ctrl-C while blocked.
pub const SIGNAL_SLICE: Duration = Duration::from_millis(50);

/// Runs `copy` (a copy of `len` bytes), with the GIL released if the copy is large.
#[inline]
pub fn copy_maybe_detached(py: Python<'_>, len: usize, copy: impl FnOnce() + Send) {
    if len >= DETACH_COPY_BYTES {
        py.detach(copy);
    } else {
        copy();
    }
}

/// One slice of a wait that ends at `deadline`: false if the deadline has passed (nothing
/// done); else runs `sleep(slice)` with the GIL released, `slice` at most `SIGNAL_SLICE`,
/// then raises KeyboardInterrupt (or whatever a signal handler raised) if a signal came.
/// The caller loops: check its condition, then call this again.
pub fn sleep_slice(
    py: Python<'_>,
    deadline: Instant,
    sleep: impl FnOnce(Duration) + Send,
) -> PyResult<bool> {
    let now = Instant::now();
    if now >= deadline {
        return Ok(false);
    }
    let slice = (deadline - now).min(SIGNAL_SLICE);
    py.detach(move || sleep(slice));
    py.check_signals()?;
    Ok(true)
}

/// A timeout given in seconds from Python: finite and >= 0 (capped at 1e9 s).
pub fn duration(seconds: f64, what: &str) -> PyResult<Duration> {
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(PyValueError::new_err(format!(
            "{what} must be a finite number of seconds >= 0, got {seconds}"
        )));
    }
    Ok(Duration::from_secs_f64(seconds.min(1e9)))
}

/// Locks `m` without deadlocking against the GIL: if another thread holds it (possibly
/// while waiting without the GIL), wait for it with the GIL released.
pub fn lock_detached<'a, T: Send>(py: Python<'_>, m: &'a Mutex<T>) -> MutexGuard<'a, T> {
    match m.try_lock() {
        Ok(g) => g,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => {
            let guard = py.detach(|| SendGuard(m.lock().unwrap_or_else(|p| p.into_inner())));
            guard.0
        }
    }
}

struct SendGuard<'a, T>(MutexGuard<'a, T>);
// SAFETY: the guard is created in the detached closure on this same thread and handed back
// to it: it never changes threads (py.detach runs the closure on the calling thread).
unsafe impl<T> Send for SendGuard<'_, T> {}

/// Sleeps until `deadline_ns` on CLOCK_MONOTONIC (what `time.perf_counter_ns()` reads on
/// Linux), with the GIL released: in the kernel until `spin_ns` before it (an absolute
/// `clock_nanosleep`, which a late wake-up does not push further), then spinning to it.
/// Returns how late it returned, in ns (0 if the deadline had passed already: never
/// negative). For a loop's deadlines under SCHED_FIFO, where a spinning thread would be
/// throttled by the kernel (at most 95 % of a second for real-time tasks) and a sleeping one
/// wakes within microseconds. Raises what a signal handler raised (Ctrl-C) after the sleep.
#[pyfunction]
#[pyo3(signature = (deadline_ns, spin_ns=50_000))]
pub fn sleep_until(py: Python<'_>, deadline_ns: i64, spin_ns: i64) -> PyResult<i64> {
    if spin_ns < 0 {
        return Err(PyValueError::new_err(format!(
            "spin_ns must be >= 0, got {spin_ns}"
        )));
    }
    loop {
        // Ok(lateness), or Err(()) when a signal interrupted the sleep: its handler runs
        // (check_signals) and the sleep goes on to the same deadline.
        let r = py.detach(move || {
            if deadline_ns > monotonic_ns() + spin_ns && !sleep_to(deadline_ns - spin_ns) {
                return Err(());
            }
            loop {
                let now = monotonic_ns();
                if now >= deadline_ns {
                    return Ok(now - deadline_ns);
                }
                std::hint::spin_loop();
            }
        });
        py.check_signals()?;
        if let Ok(late) = r {
            return Ok(late);
        }
    }
}

fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// An absolute sleep to `at_ns` (CLOCK_MONOTONIC). False if a signal interrupted it.
fn sleep_to(at_ns: i64) -> bool {
    let ts = libc::timespec {
        tv_sec: (at_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (at_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: ts is a valid timespec; the remain argument is unused with TIMER_ABSTIME.
    let rc = unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        )
    };
    rc != libc::EINTR
}
