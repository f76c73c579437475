//! The mapped ring file and typed access to its fields. `file` creates, opens and
//! validates the file; this maps it (header and schema region, data region) and hands out
//! atomic views of header, record and schema fields.
//!
//! Memory another process writes is only ever touched through raw pointers and atomics
//! (`AtomicU64::from_ptr`): no `&[u8]` or `&T` of plain data points into the mapping.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, Result};
use crate::file::{self, Opened};
use crate::format;
use crate::guard::Guard;

/// Immutable facts read from the header at open time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub capacity: u64,
    pub data_offset: u64,
    pub schema_offset: u64,
    pub schema_size: u64,
    pub session_id: u64,
    pub policy: u32,
    pub created_ns: i64,
}

/// A mapped ring file. The header and schema region form one mapping (writable when the
/// file is), the data region another (writable only for the producer).
pub struct Region {
    path: PathBuf,
    geometry: Geometry,
    // Declared before the mappings: unregistered before they are unmapped.
    guards: [Guard; 2],
    /// Set once the file was seen shorter than the ring (fstat), before any fault.
    shrunk: AtomicBool,
    meta: MmapRaw,
    data: MmapRaw,
    header_writable: bool,
    data_writable: bool,
    _file: File,
}

// SAFETY: a Region only hands out raw pointers and atomic references into its mappings;
// all cross-thread (and cross-process) access goes through atomics. The mappings live as
// long as the Region.
unsafe impl Send for Region {}
// SAFETY: as above; no method takes `&self` and mutates non-atomic state.
unsafe impl Sync for Region {}

/// Wall clock, ns since the Unix epoch (negative before it): records' timestamps.
pub fn now_ns() -> i64 {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

impl Region {
    /// Opens and maps an existing ring. `producer` maps the data region writable and
    /// requires write access; otherwise write access to the header is used when the file
    /// permits it (readers record `read_tail` and sleep on futexes there). `populate` maps
    /// every data page at once (for a ring about to be used, not one only inspected).
    pub fn open(path: &Path, producer: bool, nofollow: bool, populate: bool) -> Result<Region> {
        let Opened {
            file,
            writable,
            geometry: g,
        } = file::open(path, producer, nofollow)?;
        let mut meta_opts = MmapOptions::new();
        meta_opts.offset(0).len(g.data_offset as usize);
        let meta_map = if writable {
            meta_opts.map_raw(&file)
        } else {
            meta_opts.map_raw_read_only(&file)
        }
        .map_err(|e| Error::io("cannot map ring header of", path, e))?;
        let mut data_opts = MmapOptions::new();
        // MAP_POPULATE: every page is mapped at open, not on first touch. Without it, each
        // process's first lap through the ring takes a page fault per 4 KiB, which more
        // than halved a producer's first-lap rate and put microseconds of jitter into the
        // hardware loop's writes.
        data_opts.offset(g.data_offset).len(g.capacity as usize);
        if populate {
            data_opts.populate();
        }
        let data_map = if producer {
            data_opts.map_raw(&file)
        } else {
            data_opts.map_raw_read_only(&file)
        }
        .map_err(|e| map_error(path, g.capacity, e))?;
        let guards = [
            Guard::register(meta_map.as_ptr(), meta_map.len(), writable)?,
            Guard::register(data_map.as_ptr(), data_map.len(), producer)?,
        ];
        Ok(Region {
            path: path.to_path_buf(),
            geometry: g,
            guards,
            shrunk: AtomicBool::new(false),
            meta: meta_map,
            data: data_map,
            header_writable: writable,
            data_writable: producer,
            _file: file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }
    pub fn capacity(&self) -> u64 {
        self.geometry.capacity
    }
    /// The open file descriptor of the ring file (valid while the Region lives).
    pub fn raw_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self._file.as_raw_fd()
    }
    pub fn header_writable(&self) -> bool {
        self.header_writable
    }

    /// Whether the file was truncated under this mapping: an access to a page it lost
    /// faulted (the SIGBUS handler mapped zero pages there, see `guard`), or `fstat` saw it
    /// short. Anything read from the mapping after that is not data.
    #[inline(always)]
    pub fn tripped(&self) -> bool {
        self.guards[1].tripped() || self.guards[0].tripped() || self.shrunk.load(Ordering::Acquire)
    }

    /// The size of the ring file now (`fstat` of the open descriptor).
    pub fn file_len(&self) -> Option<u64> {
        self._file.metadata().ok().map(|m| m.len())
    }

    /// Err if the file was truncated under this mapping (flag, or `fstat` now).
    pub fn check_intact(&self) -> Result<()> {
        let expected = self.geometry.data_offset + self.geometry.capacity;
        let len = self.file_len();
        if let Some(n) = len {
            if n < expected {
                self.shrunk.store(true, Ordering::Release);
            }
        }
        if self.tripped() {
            return Err(self.truncated_error_len(len));
        }
        Ok(())
    }

    /// Err (RingCorruptError) if the file was truncated under this mapping (flag only: no
    /// syscall). For hot paths; the error message looks the file size up.
    #[inline(always)]
    pub fn check_tripped(&self) -> Result<()> {
        if self.tripped() {
            return Err(self.truncated_error_len(self.file_len()));
        }
        Ok(())
    }

    fn truncated_error_len(&self, len: Option<u64>) -> Error {
        let expected = self.geometry.data_offset + self.geometry.capacity;
        let now = len.map_or_else(|| "of unknown size".to_string(), |n| format!("{n} bytes"));
        Error::corrupt(format!(
            "{} was truncated while mapped: the ring file is {now}, it must be {expected} bytes \
             (another process shrank it). Records already delivered (copies) are intact; nothing \
             more can be read from or written to this ring: close it and create a new one",
            self.path.display()
        ))
    }
    pub fn data_writable(&self) -> bool {
        self.data_writable
    }

    /// An atomic view of a 64-bit header field.
    #[inline(always)]
    pub fn h64(&self, field: usize) -> &AtomicU64 {
        assert!(field % 8 == 0 && field + 8 <= format::HEADER_SIZE as usize);
        // SAFETY: `field` is one of the `format::off` constants (or a per-stream counter): 8-aligned and inside the
        // header page, which is inside `meta` (mapped for the Region's lifetime, and
        // page-aligned so the address is 8-aligned). Access is atomic, so concurrent writes
        // by other processes are not data races on our side.
        unsafe { AtomicU64::from_ptr(self.meta.as_mut_ptr().add(field).cast()) }
    }

    /// An atomic view of a 32-bit header field.
    #[inline(always)]
    pub fn h32(&self, field: usize) -> &AtomicU32 {
        debug_assert!(field % 4 == 0 && field + 4 <= format::HEADER_SIZE as usize);
        // SAFETY: as for `h64`, with 4-byte alignment.
        unsafe { AtomicU32::from_ptr(self.meta.as_mut_ptr().add(field).cast()) }
    }

    /// An atomic view of a 64-bit field of the record header at data offset `at`.
    #[inline(always)]
    pub fn r64(&self, at: u64, field: usize) -> &AtomicU64 {
        assert!(
            at % format::RECORD_ALIGN == 0
                && at + format::RECORD_HEADER_SIZE <= self.geometry.capacity
        );
        // SAFETY: checked above: the 64-byte record header at `at` lies inside the data
        // mapping and is 64-aligned (the mapping is page-aligned); `field` < 64 and
        // 8-aligned. Atomic access only.
        unsafe { AtomicU64::from_ptr(self.data.as_mut_ptr().add(at as usize + field).cast()) }
    }

    /// An atomic view of a 32-bit field of the record header at data offset `at`.
    #[inline(always)]
    pub fn r32(&self, at: u64, field: usize) -> &AtomicU32 {
        assert!(
            at % format::RECORD_ALIGN == 0
                && at + format::RECORD_HEADER_SIZE <= self.geometry.capacity
        );
        // SAFETY: as for `r64`, with a 4-aligned field.
        unsafe { AtomicU32::from_ptr(self.data.as_mut_ptr().add(at as usize + field).cast()) }
    }

    /// Start of the data region in this process. Only for raw-pointer use.
    #[inline(always)]
    pub fn data_ptr(&self) -> *mut u8 {
        self.data.as_mut_ptr()
    }

    /// An atomic view of a 64-bit word of the schema region's table header.
    pub fn h64_schema(&self, field: usize) -> &AtomicU64 {
        assert!(field % 8 == 0 && field + 8 <= 64 && self.geometry.schema_size >= 64);
        // SAFETY: the schema region starts page-aligned inside `meta` and holds at least
        // 64 bytes (checked); field is 8-aligned within them. Atomic access only.
        unsafe { AtomicU64::from_ptr(self.schema_ptr().add(field).cast()) }
    }

    /// An atomic view of the 64-bit word at byte `at` of the schema region.
    pub fn a64_schema(&self, at: u64) -> &AtomicU64 {
        assert!(at % 8 == 0 && at + 8 <= self.geometry.schema_size);
        // SAFETY: inside the schema region (checked), 8-aligned. Atomic access only.
        unsafe { AtomicU64::from_ptr(self.schema_ptr().add(at as usize).cast()) }
    }

    /// Start of the schema region in this process. Only for raw-pointer use.
    pub fn schema_ptr(&self) -> *mut u8 {
        // SAFETY: schema_offset (== HEADER_SIZE) < data_offset == meta's length.
        unsafe {
            self.meta
                .as_mut_ptr()
                .add(self.geometry.schema_offset as usize)
        }
    }
}

fn map_error(path: &Path, capacity: u64, e: io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ENOMEM) {
        Error::config(format!(
            "cannot map a {capacity}-byte ring ({}): not enough address space or memory",
            path.display()
        ))
    } else {
        Error::io("cannot map ring data of", path, e)
    }
}
