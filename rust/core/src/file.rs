//! The ring file on disk: creating it atomically (written in full under a temporary name,
//! then linked or renamed into place), opening it, and validating its name, owner,
//! permissions and header before anything maps it. `region` maps what this opened.
//!
//! Nothing here goes through a mapping: the header is read with `pread`, so a short or
//! hostile file is an error, never a SIGBUS.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format;
use crate::header::{header_bytes, validate_header};
use crate::region::{now_ns, Geometry};

/// What the caller wants from `create`.
#[derive(Clone, Copy, Debug)]
pub struct CreateOptions {
    pub capacity: u64,
    pub schema_size: u64,
    pub policy: u32,
    /// Replace an existing file of another capacity or policy instead of failing.
    pub replace: bool,
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

/// Creates a new ring file atomically: written in full under a temporary name in the
/// same directory, then linked into place (or renamed over, with `replace`). Returns
/// `Ok(None)` if a file already exists at `path` and `replace` is false.
pub fn create(path: &Path, opts: CreateOptions) -> Result<Option<()>> {
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
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("ring path {} has no file name", path.display())))?;
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

/// An opened ring file whose name, owner, permissions and header were checked; not mapped.
pub struct Opened {
    pub file: File,
    /// Opened read-write (else read-only: the user may not write it).
    pub writable: bool,
    pub geometry: Geometry,
}

/// Opens an existing ring file and validates it. `producer` requires write access and a
/// file of the caller's own (see `check_owner`); otherwise a read-only open is the fallback
/// when the file may not be written. `nofollow` refuses a symlink at `path`.
pub fn open(path: &Path, producer: bool, nofollow: bool) -> Result<Opened> {
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
    let n =
        read_prefix(&file, &mut h).map_err(|e| Error::io("cannot read ring header of", path, e))?;
    h.truncate(n);
    let g = validate_header(path, &h, file_len)?;
    if producer {
        // A file of ours that is not a ring stays a format error (replace=True may
        // replace it); a ring of ours that others can read or write is refused.
        check_owner(path, &meta, true)?;
    }
    Ok(Opened {
        file,
        writable,
        geometry: g,
    })
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
