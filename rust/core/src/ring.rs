//! The shared state of one mapped ring (`Ring`): geometry, header positions, status, and
//! the record-header rules both sides apply. The single producer is in `producer.rs`, the
//! readers in `reader.rs`, the primary consumer's durable position (`read_tail`) in
//! `tail.rs`, the futex sleeping in `wait.rs`.
//!
//! Protocol (docs/ring-format.md has the reader-side rules in prose):
//! - Positions are absolute byte offsets that only grow; the data-region offset of a
//!   position is `pos % capacity`.
//! - The producer *reclaims* space before reusing it: it advances `oldest_pos` past every
//!   record the new one will overlap and publishes that (store, then a release fence)
//!   before it writes a single byte there.
//! - It then initialises the record header (busy) and publishes `write_pos` (release): a
//!   reader that sees a position below `write_pos` knows the header there is this lap's.
//! - It writes the payload and finally stores the commit word with `COMMITTED` (release).
//! - A reader copies a record and then checks, after an acquire fence, that `oldest_pos`
//!   has not passed the record's start. If any byte it copied came from a later write, that
//!   check fails (the later write is ordered after the `oldest_pos` store); the copy is
//!   discarded and the record counted as lost through the sequence-number gap.

use std::path::Path;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::file::{self, CreateOptions};
use crate::format::{self, off, SIZE_MASK, TYPE_DATA, TYPE_PADDING};
use crate::lock;
use crate::producer::Producer;
use crate::region::Region;
use crate::wait::backoff;

/// Overflow policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// The producer never waits; the oldest records are overwritten.
    Overwrite,
    /// The producer waits for the primary consumer's `read_tail`.
    Block,
}

impl Policy {
    pub fn code(self) -> u32 {
        match self {
            Policy::Overwrite => format::POLICY_OVERWRITE,
            Policy::Block => format::POLICY_BLOCK,
        }
    }
    pub fn from_code(code: u32) -> Policy {
        if code == format::POLICY_BLOCK {
            Policy::Block
        } else {
            Policy::Overwrite
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Policy::Overwrite => "overwrite",
            Policy::Block => "block",
        }
    }
    pub fn parse(s: &str) -> Result<Policy> {
        match s {
            "overwrite" => Ok(Policy::Overwrite),
            "block" => Ok(Policy::Block),
            other => Err(Error::config(format!(
                "unknown policy {other:?}; use \"overwrite\" or \"block\""
            ))),
        }
    }
}

/// Where a new reader starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// The oldest record still in the ring.
    Oldest,
    /// The next record to be committed (only new data).
    Latest,
    /// The primary consumer's durable `read_tail`.
    Tail,
}

impl Start {
    pub fn parse(s: &str) -> Result<Start> {
        match s {
            "oldest" => Ok(Start::Oldest),
            "latest" => Ok(Start::Latest),
            "tail" => Ok(Start::Tail),
            other => Err(Error::config(format!(
                "unknown start {other:?}; use \"oldest\", \"latest\" or \"tail\""
            ))),
        }
    }
}

/// How many times a seqlock read retries before it stops waiting for a writer that may
/// have died between its two version stores (then it returns the fields as they are).
const SEQLOCK_RETRIES: u32 = 10_000;
/// Looks a reader takes at its position before it concludes that the header's positions
/// contradict each other (a healthy ring needs at most a few, each a commit by the producer).
pub(crate) const LOOK_ATTEMPTS: u32 = 100_000;

/// Shared state of one mapped ring: any number of producers' and readers' handles in this
/// process hold it through an `Arc`, which keeps the mapping alive for zero-copy views.
pub struct Ring {
    pub(crate) region: Region,
    pub(crate) cap: u64,
}

/// Counters and positions at one moment (each field read atomically; the pair
/// `commit_pos`/`next_seq` consistently).
#[derive(Clone, Copy, Debug)]
pub struct Status {
    pub write_pos: u64,
    pub commit_pos: u64,
    pub oldest_pos: u64,
    pub next_seq: u64,
    pub read_tail: u64,
    pub read_tail_seq: u64,
    pub records_lost: u64,
    pub heartbeat_ns: i64,
    pub producer_pid: Option<u32>,
    pub producer_alive: bool,
}

fn validate_capacity(capacity: u64) -> Result<u64> {
    if capacity == 0 {
        return Err(Error::config("ring capacity must be greater than 0 bytes"));
    }
    if capacity > format::MAX_CAPACITY {
        return Err(Error::config(format!(
            "ring capacity {capacity} bytes is beyond what can be mapped (at most {} bytes)",
            format::MAX_CAPACITY
        )));
    }
    if capacity < format::MIN_CAPACITY {
        return Err(Error::config(format!(
            "ring capacity {capacity} bytes is too small (at least {} bytes)",
            format::MIN_CAPACITY
        )));
    }
    Ok(format::align_up(capacity).expect("capacity <= MAX_CAPACITY"))
}

impl Ring {
    /// Creates a ring at `path`, or attaches to the one there as its producer if it has the
    /// same capacity and policy (a restarted producer continues its sequence). A ring of
    /// another capacity or policy is an error unless `replace`.
    pub fn create(
        path: &Path,
        capacity: u64,
        policy: Policy,
        replace: bool,
    ) -> Result<(Arc<Ring>, Producer)> {
        Ring::create_with(path, capacity, policy, replace, None)
    }

    /// `create` with a schema region of `schema_size` bytes (rounded up to a page; None:
    /// `format::default_schema_size(capacity)`). An existing ring is reused only if its
    /// schema region is at least as large as one asked for.
    pub fn create_with(
        path: &Path,
        capacity: u64,
        policy: Policy,
        replace: bool,
        schema_size: Option<u64>,
    ) -> Result<(Arc<Ring>, Producer)> {
        let capacity = validate_capacity(capacity)?;
        file::check_file_name(path)?;
        let asked_schema = match schema_size {
            None => None,
            Some(s) if s == 0 || s > format::MAX_SCHEMA_SIZE => {
                return Err(Error::config(format!(
                    "schema region size must be from 1 byte to {} bytes, got {s}",
                    format::MAX_SCHEMA_SIZE
                )))
            }
            Some(s) => Some(s.div_ceil(format::HEADER_SIZE) * format::HEADER_SIZE),
        };
        let opts = CreateOptions {
            capacity,
            schema_size: asked_schema.unwrap_or(format::default_schema_size(capacity)),
            policy: policy.code(),
            replace: false,
        };
        for _ in 0..3 {
            let exists = match std::fs::symlink_metadata(path) {
                Ok(_) => true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(e) => return Err(Error::io("cannot inspect ring path", path, e)),
            };
            if !exists {
                if file::create(path, opts)?.is_none() {
                    continue; // somebody created it meanwhile: attach to theirs
                }
                return Ring::attach_producer(path);
            }
            // Only its geometry and lock are looked at: no need to map every page.
            let existing = match Region::open(path, true, true, false) {
                Ok(r) => Some(r),
                Err(e @ Error::Format { .. }) if !replace => return Err(e),
                Err(Error::Format { .. }) => None,
                Err(e) => return Err(e),
            };
            if let Some(r) = &existing {
                let g = r.geometry();
                let schema_ok = asked_schema.is_none_or(|s| g.schema_size >= s);
                if g.capacity == capacity && g.policy == policy.code() && schema_ok {
                    drop(existing);
                    return Ring::attach_producer(path);
                }
                if !replace && !schema_ok && g.capacity == capacity && g.policy == policy.code() {
                    return Err(Error::config(format!(
                        "ring at {} has a schema region of {} bytes, less than the {} asked for; \
                         recreate it (replace=True) to get the larger one",
                        path.display(),
                        g.schema_size,
                        opts.schema_size
                    )));
                }
                if !replace {
                    return Err(Error::Mismatch {
                        path: path.to_path_buf(),
                        capacity: g.capacity,
                        policy: Policy::from_code(g.policy).name(),
                        asked_capacity: capacity,
                        asked_policy: policy.name(),
                    });
                }
                let word = r.h64(off::PRODUCER_LOCK).load(Ordering::Acquire);
                if lock::holder_alive(word) {
                    return Err(Error::ProducerActive {
                        pid: lock::lock_pid(word),
                        this_process: word == lock::my_lock_word(),
                    });
                }
            }
            file::create(
                path,
                CreateOptions {
                    replace: true,
                    ..opts
                },
            )?;
            return Ring::attach_producer(path);
        }
        Err(Error::invalid(format!(
            "ring at {} keeps being created and removed by another process",
            path.display()
        )))
    }

    /// Opens an existing ring as a reader, or as its producer with `writable`.
    pub fn open(path: &Path, writable: bool) -> Result<(Arc<Ring>, Option<Producer>)> {
        if writable {
            let (ring, producer) = Ring::attach_producer_opts(path, false)?;
            return Ok((ring, Some(producer)));
        }
        let region = Region::open(path, false, false, true)?;
        Ok((
            Arc::new(Ring {
                cap: region.capacity(),
                region,
            }),
            None,
        ))
    }

    fn attach_producer(path: &Path) -> Result<(Arc<Ring>, Producer)> {
        Ring::attach_producer_opts(path, true)
    }

    fn attach_producer_opts(path: &Path, nofollow: bool) -> Result<(Arc<Ring>, Producer)> {
        let region = Region::open(path, true, nofollow, true)?;
        let ring = Arc::new(Ring {
            cap: region.capacity(),
            region,
        });
        let producer = Producer::attach(ring.clone())?;
        Ok((ring, producer))
    }

    pub fn region(&self) -> &Region {
        &self.region
    }
    pub fn path(&self) -> &Path {
        self.region.path()
    }
    pub fn capacity(&self) -> u64 {
        self.cap
    }
    pub fn policy(&self) -> Policy {
        Policy::from_code(self.region.geometry().policy)
    }
    pub fn session_id(&self) -> u64 {
        self.region.geometry().session_id
    }
    /// Largest payload one record can carry.
    pub fn max_payload(&self) -> u64 {
        self.cap - format::RECORD_HEADER_SIZE
    }

    #[inline(always)]
    pub(crate) fn h64(&self, field: usize) -> &AtomicU64 {
        self.region.h64(field)
    }
    #[inline(always)]
    pub(crate) fn h32(&self, field: usize) -> &AtomicU32 {
        self.region.h32(field)
    }

    pub fn oldest_pos(&self) -> u64 {
        self.h64(off::OLDEST_POS).load(Ordering::Acquire)
    }
    pub fn write_pos(&self) -> u64 {
        self.h64(off::WRITE_POS).load(Ordering::Acquire)
    }
    /// `status().records_lost` alone: one load, not the producer's liveness check (a
    /// signal and a read of /proc, about 12 µs).
    pub fn records_lost(&self) -> u64 {
        self.h64(off::RECORDS_LOST).load(Ordering::Relaxed)
    }
    /// `status().heartbeat_ns` alone.
    pub fn heartbeat_ns(&self) -> i64 {
        self.h64(off::HEARTBEAT_NS).load(Ordering::Relaxed) as i64
    }

    /// Two fields written under one seqlock version word, as one consistent pair.
    fn seqlock_pair(&self, version: usize, first: usize, second: usize) -> (u64, u64) {
        let ver = self.h64(version);
        let mut tries = 0;
        loop {
            let v1 = ver.load(Ordering::Acquire);
            let a = self.h64(first).load(Ordering::Relaxed);
            let b = self.h64(second).load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            let v2 = ver.load(Ordering::Relaxed);
            tries += 1;
            if (v1 == v2 && v1 % 2 == 0) || tries > SEQLOCK_RETRIES {
                return (a, b);
            }
            backoff(tries);
        }
    }

    /// (`commit_pos`, `next_seq`) from the same commit.
    pub fn snapshot(&self) -> (u64, u64) {
        self.seqlock_pair(off::SNAP_VERSION, off::COMMIT_POS, off::NEXT_SEQ)
    }

    /// (`read_tail`, `read_tail_seq`) as stored by the same `set_read_tail`.
    pub fn tail_snapshot(&self) -> (u64, u64) {
        self.seqlock_pair(off::TAIL_VERSION, off::READ_TAIL, off::READ_TAIL_SEQ)
    }

    pub fn status(&self) -> Status {
        let (read_tail, read_tail_seq) = self.tail_snapshot();
        let (commit_pos, next_seq) = self.snapshot();
        let word = self.h64(off::PRODUCER_LOCK).load(Ordering::Acquire);
        Status {
            write_pos: self.write_pos(),
            commit_pos,
            oldest_pos: self.oldest_pos(),
            next_seq,
            read_tail,
            read_tail_seq,
            records_lost: self.records_lost(),
            heartbeat_ns: self.heartbeat_ns(),
            producer_pid: (word != 0).then(|| lock::lock_pid(word)),
            producer_alive: lock::holder_alive(word),
        }
    }

    /// Every schema registered in the ring's schema table, in registration order.
    pub fn schemas(&self) -> Result<Vec<crate::schema::SchemaEntry>> {
        crate::schema::list(&self.region)
    }

    /// The schemas registered from `first_id` on (the table only grows: a reader asks for
    /// the entries it has not seen).
    pub fn schemas_from(&self, first_id: u32) -> Result<Vec<crate::schema::SchemaEntry>> {
        crate::schema::list_from(&self.region, first_id)
    }

    /// Every schema's activation, by `schema_id - 1` (a stream's current schema is its entry
    /// with the highest).
    pub fn schema_activations(&self) -> Result<Vec<u64>> {
        crate::schema::activations(&self.region)
    }

    /// Whether the record that started at `pos` is still intact (not reclaimed). Call it
    /// after reading a record's bytes: a `true` covers every read made before the call.
    /// Always false once the file was truncated under the mapping (the bytes read may come
    /// from the zero pages the SIGBUS guard mapped there).
    #[inline]
    pub fn still_valid(&self, pos: u64) -> bool {
        fence(Ordering::Acquire);
        self.h64(off::OLDEST_POS).load(Ordering::Relaxed) <= pos && !self.region.tripped()
    }

    /// Err (`Error::Corrupt`) if the ring file was truncated under this mapping; checks the
    /// file size with `fstat` too (for attach time and status, not for every record).
    pub fn check_intact(&self) -> Result<()> {
        self.region.check_intact()
    }

    /// Err if an access to the mapping already found the file truncated (no syscall).
    #[inline(always)]
    pub fn check_tripped(&self) -> Result<()> {
        self.region.check_tripped()
    }

    /// Reads a record header at data offset `at` into a struct (atomically, field by field).
    pub(crate) fn load_header(&self, at: u64) -> HeaderFields {
        let r = &self.region;
        HeaderFields {
            commit: r.r64(at, off::R_COMMIT).load(Ordering::Acquire),
            rtype: r.r32(at, off::R_TYPE).load(Ordering::Relaxed),
            stream: r.r32(at, off::R_STREAM).load(Ordering::Relaxed),
            seq: r.r64(at, off::R_SEQ).load(Ordering::Relaxed),
            pos: r.r64(at, off::R_POS).load(Ordering::Relaxed),
            timestamp_ns: r.r64(at, off::R_TIMESTAMP).load(Ordering::Relaxed) as i64,
            payload_len: r.r64(at, off::R_PAYLOAD_LEN).load(Ordering::Relaxed),
            schema_id: r.r32(at, off::R_SCHEMA_ID).load(Ordering::Relaxed),
            flags: r.r32(at, off::R_FLAGS).load(Ordering::Relaxed),
            stream_seq: r.r64(at, off::R_STREAM_SEQ).load(Ordering::Relaxed),
        }
    }

    /// Checks a record header found at position `pos` against the format's rules.
    pub(crate) fn check_header(&self, pos: u64, h: &HeaderFields) -> Result<u64> {
        let at = pos % self.cap;
        let size = h.commit & SIZE_MASK;
        let ok_size = size >= format::RECORD_HEADER_SIZE
            && size % format::RECORD_ALIGN == 0
            && at + size <= self.cap;
        let ok_type = h.rtype == TYPE_DATA || h.rtype == TYPE_PADDING;
        let ok_len = h.rtype != TYPE_DATA || format::record_size(h.payload_len) == Some(size);
        if h.pos != pos || !ok_size || !ok_type || !ok_len {
            // Zeros where a header should be: most likely the file was truncated under us.
            self.check_intact()?;
            return Err(Error::corrupt(format!(
                "record header at position {pos} (offset {at}) is invalid: stored position {}, size {size}, \
                 type {}, payload length {} (capacity {})",
                h.pos, h.rtype, h.payload_len, self.cap
            )));
        }
        Ok(size)
    }

    /// The error for header positions that contradict each other (or the file's truncation,
    /// if that is why they read as they do).
    pub(crate) fn positions_error(&self) -> Error {
        if let Err(e) = self.check_intact() {
            return e;
        }
        let (commit, _) = self.snapshot();
        Error::corrupt(format!(
            "the ring header's positions are inconsistent (write_pos {}, commit_pos {commit}, \
             oldest_pos {}, capacity {}): another process wrote into the header; recreate the ring",
            self.write_pos(),
            self.oldest_pos(),
            self.cap
        ))
    }
}

/// A record header as loaded by `Ring::load_header` (each field read atomically).
#[derive(Clone, Copy, Debug)]
pub(crate) struct HeaderFields {
    pub(crate) commit: u64,
    pub(crate) rtype: u32,
    pub(crate) stream: u32,
    pub(crate) seq: u64,
    pub(crate) pos: u64,
    pub(crate) timestamp_ns: i64,
    pub(crate) payload_len: u64,
    pub(crate) schema_id: u32,
    pub(crate) flags: u32,
    pub(crate) stream_seq: u64,
}
