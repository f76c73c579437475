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
