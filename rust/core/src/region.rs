//! The mapped ring file: creation, validation, mapping, and typed access to its fields.
//!
//! Memory another process writes is only ever touched through raw pointers and atomics
//! (`AtomicU64::from_ptr`): no `&[u8]` or `&T` of plain data points into the mapping.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, Result};
use crate::format::{self, off};
use crate::guard::Guard;

/// What the caller wants from `Region::create`.
#[derive(Clone, Copy, Debug)]
pub struct CreateOptions {
    pub capacity: u64,
    pub schema_size: u64,
    pub policy: u32,
    /// Replace an existing file of another capacity or policy instead of failing.
    pub replace: bool,
}

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

pub(crate) fn now_ns() -> i64 {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most buf.len() bytes into buf, which we own.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == buf.len() as isize {
        u64::from_le_bytes(buf)
    } else {
        // No entropy syscall: time and pid still make session ids differ between runs.
        (now_ns() as u64) ^ ((std::process::id() as u64) << 32)
    }
}

fn header_bytes(g: &Geometry) -> Vec<u8> {
    let mut h = vec![0u8; format::HEADER_SIZE as usize];
    let mut put = |at: usize, bytes: &[u8]| h[at..at + bytes.len()].copy_from_slice(bytes);
    put(off::MAGIC, &format::MAGIC);
    put(off::VERSION, &format::VERSION.to_le_bytes());
    put(
        off::HEADER_SIZE,
        &(format::HEADER_SIZE as u32).to_le_bytes(),
    );
    put(off::CAPACITY, &g.capacity.to_le_bytes());
    put(off::DATA_OFFSET, &g.data_offset.to_le_bytes());
    put(off::SCHEMA_OFFSET, &g.schema_offset.to_le_bytes());
    put(off::SCHEMA_SIZE, &g.schema_size.to_le_bytes());
    put(off::SESSION_ID, &g.session_id.to_le_bytes());
    put(off::POLICY, &g.policy.to_le_bytes());
    put(
        off::RECORD_ALIGN,
        &(format::RECORD_ALIGN as u32).to_le_bytes(),
    );
    put(off::CREATED_NS, &g.created_ns.to_le_bytes());
    h
}

fn u32_at(h: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(h[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(h: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(h[at..at + 8].try_into().expect("8 bytes"))
}

/// Validates a header read from a file of `file_len` bytes. Pure: unit-tested on bytes.
pub fn validate_header(path: &Path, h: &[u8], file_len: u64) -> Result<Geometry> {
    if h.len() < 8 || h[..8] != format::MAGIC {
        let mut m = [0u8; 8];
        let n = h.len().min(8);
        m[..n].copy_from_slice(&h[..n]);
        return Err(Error::format(
            path,
            format!(
                "not a rust-daq ring file (magic 0x{:016x}, expected 0x{:016x} \"RDAQRING\")",
                u64::from_be_bytes(m),
                u64::from_be_bytes(format::MAGIC)
            ),
        ));
    }
    if (h.len() as u64) < format::HEADER_SIZE || file_len < format::HEADER_SIZE {
        return Err(Error::format(
            path,
            format!(
                "truncated ring file: {file_len} bytes, shorter than its {}-byte header",
                format::HEADER_SIZE
            ),
        ));
    }
    let version = u32_at(h, off::VERSION);
    if version != format::VERSION {
        return Err(Error::format(
            path,
            format!(
                "unsupported ring layout version {version}; this rust-daq reads version {} \
                 (upgrade rust-daq, or recreate the ring)",
                format::VERSION
            ),
        ));
    }
    let bad = |what: String| Err(Error::format(path, format!("corrupt ring header: {what}")));
    let header_size = u32_at(h, off::HEADER_SIZE) as u64;
    if header_size != format::HEADER_SIZE {
        return bad(format!(
            "header size {header_size}, expected {}",
            format::HEADER_SIZE
        ));
    }
    let align = u32_at(h, off::RECORD_ALIGN) as u64;
    if align != format::RECORD_ALIGN {
        return bad(format!(
            "record alignment {align}, expected {}",
            format::RECORD_ALIGN
        ));
    }
    let g = Geometry {
        capacity: u64_at(h, off::CAPACITY),
        data_offset: u64_at(h, off::DATA_OFFSET),
        schema_offset: u64_at(h, off::SCHEMA_OFFSET),
        schema_size: u64_at(h, off::SCHEMA_SIZE),
        session_id: u64_at(h, off::SESSION_ID),
        policy: u32_at(h, off::POLICY),
        created_ns: u64_at(h, off::CREATED_NS) as i64,
    };
    if g.capacity < format::MIN_CAPACITY
        || g.capacity > format::MAX_CAPACITY
        || g.capacity % format::RECORD_ALIGN != 0
    {
        return bad(format!(
            "capacity {} is not a multiple of 64 between {} and {}",
            g.capacity,
            format::MIN_CAPACITY,
            format::MAX_CAPACITY
        ));
    }
    if g.schema_offset != format::HEADER_SIZE
        || g.schema_size % 4096 != 0
        || g.schema_size > 1 << 32
    {
        return bad(format!(
            "schema region at {} of {} bytes",
            g.schema_offset, g.schema_size
        ));
    }
    if g.data_offset != g.schema_offset + g.schema_size {
        return bad(format!(
            "data offset {}, expected {}",
            g.data_offset,
            g.schema_offset + g.schema_size
        ));
    }
    if g.policy != format::POLICY_OVERWRITE && g.policy != format::POLICY_BLOCK {
        return bad(format!("unknown policy {}", g.policy));
    }
    let expected = g.data_offset + g.capacity;
    if file_len != expected {
        return Err(Error::format(
            path,
            format!(
                "ring file is {file_len} bytes but its header describes {expected} bytes \
                 (capacity {}): truncated or not a ring",
                g.capacity
            ),
        ));
    }
    // Positions: loaded in an order in which the producer's updates keep these relations
    // true at every instant (write_pos is stored after oldest_pos and before commit_pos).
    let read_tail = u64_at(h, off::READ_TAIL);
    let commit = u64_at(h, off::COMMIT_POS);
    let write = u64_at(h, off::WRITE_POS);
    let oldest = u64_at(h, off::OLDEST_POS);
    let c = g.capacity;
    let limit = 1u64 << 62;
    if write >= limit || oldest >= limit || read_tail >= limit {
        return bad(format!(
            "positions out of range (write {write}, oldest {oldest}, read_tail {read_tail})"
        ));
    }
    if commit > write || write > oldest + c || oldest > write + c {
        return bad(format!("inconsistent positions (write {write}, commit {commit}, oldest {oldest}, capacity {c})"));
    }
    if read_tail > commit
        || [write, commit, oldest, read_tail]
            .iter()
            .any(|p| p % format::RECORD_ALIGN != 0)
    {
        return bad(format!(
            "misaligned or impossible positions (read_tail {read_tail}, commit {commit})"
        ));
    }
    Ok(g)
}

impl Region {
    /// Creates a new ring file atomically: written in full under a temporary name in the
    /// same directory, then linked into place (or renamed over, with `replace`). Returns
    /// `Ok(None)` if a file already exists at `path` and `replace` is false.
    pub fn create_new(path: &Path, opts: CreateOptions) -> Result<Option<()>> {
        let g = Geometry {
            capacity: opts.capacity,
            data_offset: format::HEADER_SIZE + opts.schema_size,
            schema_offset: format::HEADER_SIZE,
            schema_size: opts.schema_size,
            session_id: random_u64(),
            policy: opts.policy,
            created_ns: now_ns(),
        };
        let total = g.data_offset + g.capacity;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path.file_name().ok_or_else(|| {
            Error::invalid(format!("ring path {} has no file name", path.display()))
        })?;
        check_file_name(path)?;
        // The temporary name carries (a prefix of) the ring's name, so a leftover of a
        // creator killed mid-way says which ring it was, and stays within NAME_MAX.
        let lossy = name.to_string_lossy();
        let mut keep = lossy.len().min(NAME_MAX - 48);
        while !lossy.is_char_boundary(keep) {
            keep -= 1;
        }
        let tmp = dir.join(format!(
            ".{}.{}.{:x}.tmp",
            &lossy[..keep],
            std::process::id(),
            random_u64()
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(|e| Error::io("cannot create ring file in", &dir, e))?;
        let cleanup = |e: Error| {
            let _ = std::fs::remove_file(&tmp);
            e
        };
        reserve_space(&file, total, &dir).map_err(cleanup)?;
        file.write_all_at(&header_bytes(&g), 0)
            .map_err(|e| cleanup(Error::io("cannot write ring header to", &tmp, e)))?;
        if opts.replace {
            // rename(2) replaces the directory entry itself; it never follows a symlink there.
            std::fs::rename(&tmp, path)
                .map_err(|e| cleanup(Error::io("cannot move new ring into place at", path, e)))?;
            return Ok(Some(()));
        }
        // link(2) fails if anything (file or symlink) exists at `path`: no clobbering races.
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(Some(())),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(Error::io("cannot create ring file", path, e)),
        }
    }

    /// Opens and maps an existing ring. `producer` maps the data region writable and
    /// requires write access; otherwise write access to the header is used when the file
    /// permits it (readers record `read_tail` and sleep on futexes there). `populate` maps
    /// every data page at once (for a ring about to be used, not one only inspected).
    pub fn open(path: &Path, producer: bool, nofollow: bool, populate: bool) -> Result<Region> {
        let flags = libc::O_CLOEXEC | if nofollow { libc::O_NOFOLLOW } else { 0 };
        let rw = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(path);
        let (file, writable) = match rw {
            Ok(f) => (f, true),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied && !producer => {
                let f = OpenOptions::new()
                    .read(true)
                    .custom_flags(flags)
                    .open(path)
                    .map_err(|e| Error::io("cannot open ring", path, e))?;
                (f, false)
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(Error::Untrusted {
                    path: path.to_path_buf(),
                    detail: "refusing to follow a symlink at the ring path (a ring file is opened \
                             with O_NOFOLLOW: a symlink there may point a producer at another file); \
                             remove the symlink, or pass the real file's path"
                        .into(),
                })
            }
            Err(e) => return Err(Error::io("cannot open ring", path, e)),
        };
        let meta = file
            .metadata()
            .map_err(|e| Error::io("cannot stat ring", path, e))?;
        if !meta.is_file() {
            return Err(Error::format(path, "not a regular file, so not a ring"));
        }
        if producer {
            check_owner(path, &meta, false)?;
        }
        let file_len = meta.len();
        // Read the header with pread, not through a mapping: a short file gives a short
        // read here, never a SIGBUS.
        let mut h = vec![0u8; format::HEADER_SIZE as usize];
        let n = read_prefix(&file, &mut h)
            .map_err(|e| Error::io("cannot read ring header of", path, e))?;
        h.truncate(n);
        let g = validate_header(path, &h, file_len)?;
        if producer {
            // A file of ours that is not a ring stays a format error (replace=True may
            // replace it); a ring of ours that others can read or write is refused.
            check_owner(path, &meta, true)?;
        }
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

/// Longest file name (bytes) on Linux file systems.
const NAME_MAX: usize = 255;

/// A ring's file name must fit in NAME_MAX bytes (the OS would refuse it with a less
/// helpful ENAMETOOLONG).
pub fn check_file_name(path: &Path) -> Result<()> {
    let Some(name) = path.file_name() else {
        return Err(Error::invalid(format!(
            "ring path {} has no file name",
            path.display()
        )));
    };
    if name.len() > NAME_MAX {
        let shown: String = name.to_string_lossy().chars().take(40).collect();
        return Err(Error::config(format!(
            "ring name \"{shown}...\" is {} bytes long; a file name has at most {NAME_MAX} bytes: \
             choose a shorter name",
            name.len()
        )));
    }
    Ok(())
}

/// A producer writes only into a ring file that is its own: owned by the effective user and
/// with no group or other permission bits (ring files are created 0600). A file anybody else
/// could have planted or can read is refused, with what is wrong and what to do.
fn check_owner(path: &Path, meta: &std::fs::Metadata, check_mode: bool) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let mode = meta.mode() & 0o7777;
    let mut wrong = Vec::new();
    if meta.uid() != me {
        wrong.push(format!(
            "is owned by uid {}, not by you (uid {me})",
            meta.uid()
        ));
    }
    if (check_mode || meta.uid() != me) && mode & 0o077 != 0 {
        wrong.push(format!(
            "has mode {mode:04o}, which lets other users read or write it (a ring file must be 0600)"
        ));
    }
    if wrong.is_empty() {
        return Ok(());
    }
    Err(Error::Untrusted {
        path: path.to_path_buf(),
        detail: format!(
            "refusing to produce into this ring file: it {}. Another user may have planted it to \
             read or truncate your data. Remove it (after checking who made it) or choose another \
             path; rust-daq creates ring files itself, mode 0600",
            wrong.join(" and ")
        ),
    })
}

fn read_prefix(file: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
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

/// Allocates every block of the file now, so that a full filesystem (a full /dev/shm)
/// is an error here rather than a SIGBUS on first touch of a page later.
fn reserve_space(file: &File, total: u64, dir: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let len = i64::try_from(total)
        .map_err(|_| Error::config(format!("ring of {total} bytes is too large")))?;
    // Refuse before allocating: on tmpfs (/dev/shm) posix_fallocate takes memory page by
    // page, and a tmpfs sized like the RAM lets the OOM killer strike before ENOSPC.
    let free = free_bytes(dir);
    let available = if on_tmpfs(dir) { mem_available() } else { None };
    for (limit, what) in [(free, "free space"), (available, "available memory")] {
        if let Some(limit) = limit {
            if total > limit {
                return Err(Error::config(format!(
                    "not enough space for a {total}-byte ring in {} ({limit} bytes of {what}); \
                     choose a smaller capacity",
                    dir.display()
                )));
            }
        }
    }
    // SAFETY: plain syscall on a file descriptor we own.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    match rc {
        0 => Ok(()),
        libc::ENOSPC | libc::EFBIG => {
            let free = free_bytes(dir)
                .map(|f| format!("{f} bytes free"))
                .unwrap_or_else(|| "free space unknown".into());
            Err(Error::config(format!(
                "not enough space for a {total}-byte ring in {} ({free}); choose a smaller capacity",
                dir.display()
            )))
        }
        // Filesystems without fallocate: fall back to a sparse file.
        libc::EOPNOTSUPP | libc::EINVAL => file
            .set_len(total)
            .map_err(|e| Error::io("cannot size ring file in", dir, e)),
        e => Err(Error::io(
            "cannot allocate ring file in",
            dir,
            io::Error::from_raw_os_error(e),
        )),
    }
}

/// Whether `dir` is on tmpfs (its pages are memory).
fn on_tmpfs(dir: &Path) -> bool {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statfs.
    if unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: statfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // f_type and TMPFS_MAGIC have platform-dependent integer types.
    #[allow(clippy::unnecessary_cast)]
    let matches = st.f_type as i64 == libc::TMPFS_MAGIC as i64;
    matches
}

/// MemAvailable from /proc/meminfo, in bytes.
fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn free_bytes(dir: &Path) -> Option<u64> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // The field types differ between platforms (u32 on some 32-bit ones).
    #[allow(clippy::unnecessary_cast)]
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> (Vec<u8>, u64) {
        let g = Geometry {
            capacity: 8192,
            data_offset: format::HEADER_SIZE + 4096,
            schema_offset: format::HEADER_SIZE,
            schema_size: 4096,
            session_id: 7,
            policy: 0,
            created_ns: 1,
        };
        (header_bytes(&g), g.data_offset + g.capacity)
    }

    #[test]
    fn accepts_a_fresh_header() {
        let (h, len) = good();
        let g = validate_header(Path::new("r"), &h, len).unwrap();
        assert_eq!(g.capacity, 8192);
        assert_eq!(g.session_id, 7);
    }

    #[test]
    fn rejects_bad_headers_with_reasons() {
        let p = Path::new("r");
        let (h, len) = good();
        let msg = |h: &[u8], len: u64| validate_header(p, h, len).unwrap_err().to_string();
        let mut m = h.clone();
        m[0] = b'X';
        assert!(msg(&m, len).contains("not a rust-daq ring file"));
        let mut v = h.clone();
        v[off::VERSION] = 9;
        assert!(msg(&v, len).contains("unsupported ring layout version 9"));
        assert!(msg(&h, len - 1).contains("truncated or not a ring"));
        assert!(msg(&h[..100], 100).contains("truncated ring file"));
        let mut c = h.clone();
        c[off::CAPACITY..off::CAPACITY + 8].copy_from_slice(&8193u64.to_le_bytes());
        assert!(msg(&c, len).contains("capacity 8193"));
        let mut w = h.clone();
        w[off::WRITE_POS..off::WRITE_POS + 8].copy_from_slice(&(1u64 << 63).to_le_bytes());
        assert!(msg(&w, len).contains("positions out of range"));
        let mut o = h.clone();
        o[off::WRITE_POS..off::WRITE_POS + 8].copy_from_slice(&(64 * 1000u64).to_le_bytes());
        assert!(msg(&o, len).contains("inconsistent positions"));
        let mut pol = h.clone();
        pol[off::POLICY] = 5;
        assert!(msg(&pol, len).contains("unknown policy 5"));
    }
}
