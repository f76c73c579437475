//! SIGBUS protection for ring mappings.
//!
//! A ring file that another process truncates while it is mapped (`truncate(path, 12288)`)
//! leaves pages in our mappings with no file behind them: the next access to one raises
//! SIGBUS, which by default kills the process. Every ring mapping is therefore registered
//! here, in a fixed, lock-free table of atomics, and a process-wide SIGBUS handler (installed
//! once, re-installed if another library replaced it since, chaining to the previous handler
//! for every fault that is not in a registered mapping) does, for a fault in one of ours:
//!
//! 1. marks the mapping's slot as *tripped* (the ring was truncated under us);
//! 2. maps anonymous zero pages (`MAP_FIXED | MAP_ANONYMOUS | MAP_PRIVATE`) over the rest of
//!    that mapping, from the faulting page on (the file ends before it, so every page after
//!    it is gone too), with the mapping's protection;
//! 3. returns, so the faulting access completes and reads zeros (or writes into private
//!    memory).
//!
//! Everything that reads or writes the ring checks the tripped flag after touching the
//! mapping (readers copy, then validate; the producer checks before it publishes), so bytes
//! read from zero pages are never delivered as data: the operation fails with a corrupt-ring
//! error instead. The flag is stored before the zero pages are mapped, so a thread that
//! reads the zero pages without faulting itself (another thread mapped them) sees it set.

use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Mappings that can be registered at once (two per open ring handle).
const SLOTS: usize = 4096;

const FREE: usize = 0;
const CLAIMING: usize = 1;
const LIVE: usize = 2;

struct Slot {
    state: AtomicUsize,
    start: AtomicUsize,
    /// Length in bytes, rounded up to whole pages (what the kernel maps).
    len: AtomicUsize,
    writable: AtomicUsize,
    /// Set by the handler when an access to this mapping faulted.
    tripped: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    state: AtomicUsize::new(FREE),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    writable: AtomicUsize::new(0),
    tripped: AtomicUsize::new(0),
};

static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
/// One past the highest slot ever used: the handler scans only that far.
static HIGH: AtomicUsize = AtomicUsize::new(0);
static PAGE: AtomicUsize = AtomicUsize::new(4096);
/// The SIGBUS action that was in place before ours (leaked: the handler may read it at
/// any time, so it is never freed).
static PREVIOUS: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());
static INSTALL: Mutex<()> = Mutex::new(());

/// A registered mapping. Dropping it unregisters the mapping (do that before unmapping).
#[derive(Debug)]
pub struct Guard {
    slot: usize,
}

impl Guard {
    /// Registers the mapping `[ptr, ptr + len)` (`writable`: mapped with PROT_WRITE) and
    /// makes sure the SIGBUS handler is in place.
    pub fn register(ptr: *const u8, len: usize, writable: bool) -> Result<Guard> {
        install()?;
        let page = PAGE.load(Ordering::Relaxed);
        let len = len.div_ceil(page) * page;
        for (i, s) in TABLE.iter().enumerate() {
            if s.state
                .compare_exchange(FREE, CLAIMING, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                s.start.store(ptr as usize, Ordering::Relaxed);
                s.len.store(len, Ordering::Relaxed);
                s.writable.store(writable as usize, Ordering::Relaxed);
                s.tripped.store(0, Ordering::Relaxed);
                HIGH.fetch_max(i + 1, Ordering::AcqRel);
                s.state.store(LIVE, Ordering::Release);
                return Ok(Guard { slot: i });
            }
        }
        Err(Error::config(format!(
            "this process has {} ring mappings open, the most rust-daq can protect; close some ring handles",
            SLOTS
        )))
    }

    /// Whether an access to this mapping faulted: the file was truncated under it.
    #[inline(always)]
    pub fn tripped(&self) -> bool {
        TABLE[self.slot].tripped.load(Ordering::Acquire) != 0
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        TABLE[self.slot].state.store(FREE, Ordering::Release);
    }
}

/// Installs the SIGBUS handler, unless it is already the current one. Cheap (one
/// `sigaction` call): done at every mapping, so a library that installed its own handler
/// since (Python's `faulthandler.enable()`) is chained behind ours again.
fn install() -> Result<()> {
    let _g = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        PAGE.store(page as usize, Ordering::Relaxed);
    }
    let handler = on_sigbus as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
        as libc::sighandler_t;
    // SAFETY: a zeroed sigaction is a valid out-parameter; a null new action only queries.
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to our own stack variables.
    if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut current) } != 0 {
        return Err(Error::io(
            "cannot query the SIGBUS handler for",
            "ring mappings",
            std::io::Error::last_os_error(),
        ));
    }
    if current.sa_sigaction == handler {
        return Ok(());
    }
    // SAFETY: as above.
    let mut ours: libc::sigaction = unsafe { std::mem::zeroed() };
    ours.sa_sigaction = handler;
    ours.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
    // SAFETY: sa_mask is a valid sigset_t to initialise.
    unsafe { libc::sigemptyset(&mut ours.sa_mask) };
    // Publish what we chain to before the handler can run.
    PREVIOUS.store(Box::into_raw(Box::new(current)), Ordering::Release);
    // SAFETY: `ours` is fully initialised; the handler it names is async-signal-safe.
    if unsafe { libc::sigaction(libc::SIGBUS, &ours, std::ptr::null_mut()) } != 0 {
        return Err(Error::io(
            "cannot install the SIGBUS handler for",
            "ring mappings",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The SIGBUS handler. Async-signal-safe: atomics, `mmap`, `sigaction`, `raise` only.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo (SA_SIGINFO).
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // si_code > 0: raised by the kernel for a memory access (not kill()/raise()).
    if code > 0 {
        let high = HIGH.load(Ordering::Acquire).min(SLOTS);
        for s in &TABLE[..high] {
            if s.state.load(Ordering::Acquire) != LIVE {
                continue;
            }
            let start = s.start.load(Ordering::Relaxed);
            let len = s.len.load(Ordering::Relaxed);
            if addr < start || addr - start >= len {
                continue;
            }
            s.tripped.store(1, Ordering::SeqCst);
            let page = PAGE.load(Ordering::Relaxed);
            let from = addr & !(page - 1);
            let prot = if s.writable.load(Ordering::Relaxed) != 0 {
                libc::PROT_READ | libc::PROT_WRITE
            } else {
                libc::PROT_READ
            };
            // SAFETY: [from, start + len) is part of a live ring mapping of this process
            // (registered, not yet unregistered): replacing its pages with anonymous zero
            // pages changes what they read, never which addresses are mapped.
            let r = unsafe {
                libc::mmap(
                    from as *mut libc::c_void,
                    start + len - from,
                    prot,
                    libc::MAP_FIXED | libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
                    -1,
                    0,
                )
            };
            if r != libc::MAP_FAILED {
                return;
            }
            break;
        }
    }
    chain(sig, info, ctx, code);
}

/// Hands a SIGBUS that is not ours to the handler that was installed before.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void, code: i32) {
    let prev = PREVIOUS.load(Ordering::Acquire);
    let (action, flags) = if prev.is_null() {
        (libc::SIG_DFL, 0)
    } else {
        // SAFETY: PREVIOUS only ever holds leaked, fully initialised sigaction boxes.
        unsafe { ((*prev).sa_sigaction, (*prev).sa_flags) }
    };
    if action == libc::SIG_DFL || action == libc::SIG_IGN {
        // Default action: restore it and let the signal happen again (a fault re-executes
        // the access; a sent signal is re-raised, delivered once this handler returns).
        // SAFETY: a zeroed sigaction with SIG_DFL is a valid action.
        let mut dfl: libc::sigaction = unsafe { std::mem::zeroed() };
        dfl.sa_sigaction = libc::SIG_DFL;
        // SAFETY: valid pointer; sigaction and raise are async-signal-safe.
        unsafe {
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
            if code <= 0 {
                libc::raise(sig);
            }
        }
        return;
    }
    if flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with SA_SIGINFO, so it has this signature.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(action) };
        f(sig, info, ctx);
    } else {
        // SAFETY: a handler installed without SA_SIGINFO takes only the signal number.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(action) };
        f(sig);
    }
}
