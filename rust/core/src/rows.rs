//! Rows before each record, shared between processes: the producer notes, for each record it
//! writes, how many rows its stream held before it; a reader in another process (the
//! daemon's Flight subscribers) that the producer lapped learns from it how many rows it lost,
//! which sequence numbers alone cannot say.
//!
//! A table of `slots` entries of 16 bytes, `[seq + 1, rows]` (0: empty), indexed by
//! `seq % slots`, in an anonymous shared file (`memfd`) handed to other processes as a file
//! descriptor: no name another user could open, nothing to clean up. The file is sealed
//! against shrinking and growing before it is mapped, so no process holding it can make an
//! access fault (SIGBUS), and allocated whole at creation. One writer (the producer, under its own lock); each entry is a
//! seqlock of one word: the writer empties the tag, writes the rows, then publishes the tag;
//! a reader accepts the rows only if it saw the tag it wants both before and after them.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{fence, AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};

/// Bytes per entry: the tag (`seq + 1`, 0 if empty) and the rows.
pub const ROW_ENTRY_SIZE: u64 = 16;
/// The most entries a table holds (256 MiB).
pub const MAX_ROW_SLOTS: u64 = 1 << 24;

const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

pub struct RowTable {
    file: File,
    map: MmapRaw,
    slots: u64,
    /// Mapped read-write: a table attached through a read-only descriptor (a reader's, in
    /// another process) is mapped read-only, and refuses `note` and `clear`.
    writable: bool,
}

impl RowTable {
    /// A new, empty table of `slots` entries in a sealed memfd.
    pub fn create(slots: u64) -> io::Result<Self> {
        if slots == 0 || slots > MAX_ROW_SLOTS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a row table holds 1 to {MAX_ROW_SLOTS} entries, not {slots}"),
            ));
        }
        let name = c"rust-daq-rows";
        // SAFETY: `name` is a NUL-terminated string that outlives the call.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        // Zero-filled: every entry empty. Allocated now, not at a first touch that could
        // fail (SIGBUS) under strict overcommit.
        file.set_len(slots * ROW_ENTRY_SIZE)?;
        let len = (slots * ROW_ENTRY_SIZE) as libc::off_t;
        // SAFETY: fallocate on a descriptor we own, with integer arguments only.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fcntl on a descriptor we own, with integer arguments only.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, SEALS) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Self::map(file, true)
    }

    /// Attaches to the table behind `fd` (a descriptor another process passed; it is
    /// duplicated, the caller keeps `fd`). Refused unless the file is sealed against
    /// shrinking and its length is a whole number of entries. A descriptor opened read-only
    /// gives a read-only mapping: that process can read the table and never change it.
    pub fn from_fd(fd: RawFd) -> io::Result<Self> {
        // SAFETY: dup of a descriptor number; an invalid one fails with EBADF.
        let own = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if own < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `own` is a new descriptor that nobody else owns.
        let file = unsafe { File::from_raw_fd(own) };
        // SAFETY: fcntl on a descriptor we own, with integer arguments only.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "descriptor {fd} is not a row table (not a memfd sealed against shrinking)"
                ),
            ));
        }
        // SAFETY: fcntl on a descriptor we own, with integer arguments only.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        Self::map(file, flags & libc::O_ACCMODE != libc::O_RDONLY)
    }

    fn map(file: File, writable: bool) -> io::Result<Self> {
        let len = file.metadata()?.len();
        if len == 0 || len % ROW_ENTRY_SIZE != 0 || len / ROW_ENTRY_SIZE > MAX_ROW_SLOTS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a row table of {len} bytes: not a whole number of entries"),
            ));
        }
        let options = MmapOptions::new().len(len as usize).to_owned();
        let map = if writable {
            options.map_raw(&file)?
        } else {
            options.map_raw_read_only(&file)?
        };
        Ok(Self {
            file,
            map,
            slots: len / ROW_ENTRY_SIZE,
            writable,
        })
    }

    pub fn slots(&self) -> u64 {
        self.slots
    }

    /// The descriptor to hand to another process (it stays open while this table lives).
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn entry(&self, seq: u64) -> (&AtomicU64, &AtomicU64) {
        let at = (seq % self.slots) * ROW_ENTRY_SIZE;
        // SAFETY: `at + 16 <= len` (slot < slots), the mapping is page-aligned so the two
        // words are 8-byte aligned, it lives as long as `self`, and its length is sealed:
        // it cannot shrink under us. Every process touches these words only atomically, and
        // through a read-only mapping only loads them (`note` and `clear` refuse first).
        unsafe {
            let p = self.map.as_mut_ptr().add(at as usize) as *const AtomicU64;
            (&*p, &*p.add(1))
        }
    }

    /// Whether this mapping may change the table (not one attached read-only).
    pub fn writable(&self) -> bool {
        self.writable
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.writable {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "this row table was attached read-only (through a read-only descriptor)",
        ))
    }

    /// Notes that record `seq`'s stream held `rows` rows before it. One writer at a time.
    /// Refused on a table attached read-only.
    pub fn note(&self, seq: u64, rows: u64) -> io::Result<()> {
        self.check_writable()?;
        let (tag, value) = self.entry(seq);
        tag.store(0, Ordering::Relaxed);
        fence(Ordering::Release); // the empty tag before the new rows
        value.store(rows, Ordering::Relaxed);
        tag.store(seq.wrapping_add(1), Ordering::Release); // the rows before the tag
        Ok(())
    }

    /// Empties the entry of record `seq` (if it still holds it): its rows are unknown.
    /// Refused on a table attached read-only.
    pub fn clear(&self, seq: u64) -> io::Result<()> {
        self.check_writable()?;
        let (tag, _) = self.entry(seq);
        let _ = tag.compare_exchange(seq.wrapping_add(1), 0, Ordering::Release, Ordering::Relaxed);
        Ok(())
    }

    /// The rows noted for record `seq`, or None if its entry holds another record (it was
    /// overwritten, or never noted).
    pub fn rows_before(&self, seq: u64) -> Option<u64> {
        let want = seq.wrapping_add(1);
        let (tag, value) = self.entry(seq);
        if want == 0 || tag.load(Ordering::Acquire) != want {
            return None;
        }
        let rows = value.load(Ordering::Relaxed);
        fence(Ordering::Acquire); // the rows before the second look at the tag
        (tag.load(Ordering::Relaxed) == want).then_some(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_read_back_and_overwritten_entries_refused() {
        let t = RowTable::create(8).unwrap();
        assert_eq!(t.rows_before(0), None);
        t.note(3, 30).unwrap();
        t.note(4, 40).unwrap();
        assert_eq!(t.rows_before(3), Some(30));
        assert_eq!(t.rows_before(4), Some(40));
        t.note(11, 110).unwrap(); // the slot of 3
        assert_eq!(t.rows_before(3), None);
        assert_eq!(t.rows_before(11), Some(110));
        t.clear(3).unwrap(); // not its entry any more: left alone
        assert_eq!(t.rows_before(11), Some(110));
        t.clear(11).unwrap();
        assert_eq!(t.rows_before(11), None);
        assert_eq!(t.rows_before(u64::MAX), None);
    }

    #[test]
    fn a_second_mapping_of_the_descriptor_sees_the_notes() {
        let t = RowTable::create(1024).unwrap();
        let other = RowTable::from_fd(t.fd()).unwrap();
        assert_eq!(other.slots(), 1024);
        for seq in 0..5000u64 {
            t.note(seq, seq * 7).unwrap();
        }
        for seq in 0..5000u64 {
            let want = (seq >= 5000 - 1024).then_some(seq * 7);
            assert_eq!(other.rows_before(seq), want, "seq {seq}");
        }
    }

    #[test]
    fn a_table_attached_through_a_read_only_descriptor_is_read_only() {
        let t = RowTable::create(16).unwrap();
        t.note(3, 30).unwrap();
        let ro = File::open(format!("/proc/self/fd/{}", t.fd())).unwrap(); // O_RDONLY
        let other = RowTable::from_fd(ro.as_raw_fd()).unwrap();
        assert!(!other.writable() && t.writable());
        assert_eq!(other.rows_before(3), Some(30));
        let e = other.note(4, 40).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(
            other.clear(3).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied
        );
        assert_eq!((t.rows_before(3), t.rows_before(4)), (Some(30), None));
        t.note(4, 41).unwrap();
        assert_eq!(
            other.rows_before(4),
            Some(41),
            "it still sees the writer's notes"
        );
    }

    #[test]
    fn a_reader_racing_the_writer_never_sees_rows_of_another_record() {
        let t = RowTable::create(4).unwrap();
        let other = RowTable::from_fd(t.fd()).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    t.note(seq, seq * 3).unwrap();
                    seq += 1;
                }
            });
            let mut seen = 0;
            for k in 0..2_000_000u64 {
                if let Some(rows) = other.rows_before(k / 4) {
                    assert_eq!(rows, (k / 4) * 3);
                    seen += 1;
                }
            }
            stop.store(true, Ordering::Relaxed);
            let _ = seen;
        });
    }

    #[test]
    fn an_unsealed_file_is_refused() {
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        let e = RowTable::from_fd(f.as_raw_fd()).err().unwrap();
        assert!(e.to_string().contains("not a row table"), "{e}");
        assert!(RowTable::from_fd(1 << 20).is_err()); // no such descriptor
        assert!(RowTable::create(0).is_err());
        assert!(RowTable::create(MAX_ROW_SLOTS + 1).is_err());
    }
}
