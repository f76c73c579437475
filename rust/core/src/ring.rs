//! The ring: shared state (`Ring`), the single producer (`Producer`) and readers (`Reader`).
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
use std::time::{Duration, Instant};

use crate::copy;
use crate::error::{Error, Result};
use crate::format::{self, off, COMMITTED, NO_SEQ, SIZE_MASK, TYPE_DATA, TYPE_PADDING, WAITERS};
use crate::lock;
use crate::region::{now_ns, CreateOptions, Region};
use crate::wait;

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
/// How many torn copies `read_snapshot` retries before it reports an error.
const SNAPSHOT_ATTEMPTS: u32 = 10_000;
/// Looks a reader takes at its position before it concludes that the header's positions
/// contradict each other (a healthy ring needs at most a few, each a commit by the producer).
const LOOK_ATTEMPTS: u32 = 100_000;

/// Shared state of one mapped ring: any number of producers' and readers' handles in this
/// process hold it through an `Arc`, which keeps the mapping alive for zero-copy views.
pub struct Ring {
    region: Region,
    cap: u64,
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
        let capacity = validate_capacity(capacity)?;
        crate::region::check_file_name(path)?;
        let opts = CreateOptions {
            capacity,
            schema_size: format::DEFAULT_SCHEMA_SIZE,
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
                if Region::create_new(path, opts)?.is_none() {
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
                if g.capacity == capacity && g.policy == policy.code() {
                    drop(existing);
                    return Ring::attach_producer(path);
                }
                if !replace {
                    return Err(Error::config(format!(
                        "a ring with capacity {} bytes and policy {:?} exists at {}; asked for {capacity} bytes \
                         and policy {:?} (pass replace=True to discard it and create a new one)",
                        g.capacity,
                        Policy::from_code(g.policy).name(),
                        path.display(),
                        policy.name()
                    )));
                }
                let word = r.h64(off::PRODUCER_LOCK).load(Ordering::Acquire);
                if lock::holder_alive(word) {
                    return Err(Error::ProducerActive {
                        pid: lock::lock_pid(word),
                        this_process: word == lock::my_lock_word(),
                    });
                }
            }
            Region::create_new(
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
    fn h64(&self, field: usize) -> &AtomicU64 {
        self.region.h64(field)
    }
    #[inline(always)]
    fn h32(&self, field: usize) -> &AtomicU32 {
        self.region.h32(field)
    }

    pub fn oldest_pos(&self) -> u64 {
        self.h64(off::OLDEST_POS).load(Ordering::Acquire)
    }
    pub fn write_pos(&self) -> u64 {
        self.h64(off::WRITE_POS).load(Ordering::Acquire)
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
            records_lost: self.h64(off::RECORDS_LOST).load(Ordering::Relaxed),
            heartbeat_ns: self.h64(off::HEARTBEAT_NS).load(Ordering::Relaxed) as i64,
            producer_pid: (word != 0).then(|| lock::lock_pid(word)),
            producer_alive: lock::holder_alive(word),
        }
    }

    /// Every schema registered in the ring's schema table, in registration order.
    pub fn schemas(&self) -> Result<Vec<crate::schema::SchemaEntry>> {
        crate::schema::list(&self.region)
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

    /// Stores the primary consumer's durable position. Positions only grow: a `pos` below
    /// the current `read_tail` leaves it unchanged. Wakes a producer blocked on it.
    pub fn set_read_tail(&self, pos: u64, seq: u64) -> Result<()> {
        if !self.region.header_writable() {
            return Err(Error::invalid(format!(
                "cannot store read_tail: {} is read-only for this user",
                self.path().display()
            )));
        }
        let (commit, _) = self.snapshot();
        if pos > commit || pos % format::RECORD_ALIGN != 0 {
            return Err(Error::invalid(format!(
                "read_tail {pos} is not a record boundary at or below the committed position {commit}"
            )));
        }
        let (cur, _) = self.tail_snapshot();
        if pos <= cur {
            return Ok(());
        }
        let ver = self.h64(off::TAIL_VERSION);
        let v = ver.load(Ordering::Relaxed);
        let v = v + (v % 2); // a committer killed mid-update left it odd: move on
        ver.store(v + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        self.h64(off::READ_TAIL_SEQ).store(seq, Ordering::Relaxed);
        self.h64(off::READ_TAIL).store(pos, Ordering::Relaxed);
        ver.store(v + 2, Ordering::Release);
        wake_sleepers(self.h32(off::TAIL_NOTIFY));
        Ok(())
    }

    /// A copy of the committed bytes the primary consumer has not consumed: the framed
    /// records (headers, payloads, padding) from `max(read_tail, oldest)` to `commit_pos`,
    /// unwrapped into one buffer. Returns the absolute position the copy starts at.
    /// Gives up with an error after `SNAPSHOT_ATTEMPTS` copies torn by the producer.
    pub fn read_snapshot(&self) -> Result<(u64, Vec<u8>)> {
        for _ in 0..SNAPSHOT_ATTEMPTS {
            self.check_tripped()?;
            let (commit, _) = self.snapshot();
            let start = self
                .h64(off::READ_TAIL)
                .load(Ordering::Acquire)
                .max(self.oldest_pos());
            if start >= commit {
                return Ok((start, Vec::new()));
            }
            if start % format::RECORD_ALIGN != 0 || commit % format::RECORD_ALIGN != 0 {
                return Err(Error::corrupt(format!(
                    "misaligned positions in the header (commit {commit}, start {start})"
                )));
            }
            let len = (commit - start).min(self.cap);
            let mut buf = vec![0u8; len as usize];
            let at = start % self.cap;
            let first = len.min(self.cap - at);
            // SAFETY: [at, at+first) and [0, len-first) lie inside the data region; both
            // lengths are multiples of 64 (positions are), `buf` holds `len` bytes.
            unsafe {
                copy::from_ring(
                    buf.as_mut_ptr(),
                    self.region.data_ptr().add(at as usize),
                    first as usize,
                );
                copy::from_ring(
                    buf.as_mut_ptr().add(first as usize),
                    self.region.data_ptr(),
                    (len - first) as usize,
                );
            }
            if self.still_valid(start) {
                return Ok((start, buf));
            }
        }
        self.check_tripped()?;
        Err(Error::corrupt(format!(
            "read_snapshot: the producer overwrote the unconsumed data {SNAPSHOT_ATTEMPTS} times while \
             it was copied (or the header's positions are corrupt)"
        )))
    }

    /// Advances `read_tail` by `nbytes` from `max(read_tail, oldest)`, which must land on a
    /// record boundary at or below `commit_pos` (a length returned by `read_snapshot`, or a
    /// sum of whole records from its start). Returns the new `read_tail`.
    pub fn advance_tail(self: &Arc<Self>, nbytes: u64) -> Result<u64> {
        let (tail, _) = self.tail_snapshot();
        let base = tail.max(self.oldest_pos());
        let (commit, _) = self.snapshot();
        let target = base
            .checked_add(nbytes)
            .filter(|t| *t <= commit)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "advance_tail({nbytes}) goes past the committed data: {} bytes are unconsumed",
                    commit.saturating_sub(base)
                ))
            })?;
        if target - base > self.cap {
            return Err(Error::corrupt(format!(
                "advance_tail({nbytes}): {} unconsumed bytes in a ring of {} (corrupt positions)",
                commit - base,
                self.cap
            )));
        }
        let mut p = base;
        while p < target {
            self.check_tripped()?;
            let h = self.load_header(p % self.cap);
            if !self.still_valid(p) {
                return Err(Error::invalid(format!(
                    "advance_tail({nbytes}): the producer overwrote those records meanwhile; \
                     take a new read_snapshot() and retry"
                )));
            }
            p += self.check_header(p, &h)?;
        }
        if p != target {
            return Err(Error::invalid(format!(
                "advance_tail({nbytes}) ends inside a record (the record boundary is at {} bytes); \
                 advance by whole records",
                p - base
            )));
        }
        let mut rd = Reader {
            ring: self.clone(),
            pos: target,
            expected: 0,
            lost: 0,
            delivered: 0,
        };
        let seq = rd.seq_here()?;
        self.set_read_tail(target, seq)?;
        Ok(target)
    }

    /// Reads a record header at data offset `at` into a struct (atomically, field by field).
    fn load_header(&self, at: u64) -> HeaderFields {
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
    fn check_header(&self, pos: u64, h: &HeaderFields) -> Result<u64> {
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
    fn positions_error(&self) -> Error {
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

fn backoff(tries: u32) {
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
fn wake_sleepers(word: &AtomicU32) {
    fence(Ordering::SeqCst);
    let v = word.load(Ordering::Relaxed);
    if v & WAITERS != 0 {
        word.store((v & !WAITERS).wrapping_add(1) & !WAITERS, Ordering::Release);
        wait::wake_all(word);
    }
}

/// Sleeps on a futex word until woken or `timeout`, unless `ready()` holds once the
/// sleeper has announced itself.
fn sleep_on(word: &AtomicU32, timeout: Duration, ready: impl Fn() -> bool) {
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
    wait::wait(word, v, timeout);
}

#[derive(Clone, Copy, Debug)]
struct HeaderFields {
    commit: u64,
    rtype: u32,
    stream: u32,
    seq: u64,
    pos: u64,
    timestamp_ns: i64,
    payload_len: u64,
    schema_id: u32,
    flags: u32,
    stream_seq: u64,
}

/// A claimed record: header written (busy), payload space reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim {
    pub pos: u64,
    pub size: u64,
    pub payload_len: u64,
    pub seq: u64,
    pub stream: u32,
    /// Sequence number within the stream (`NO_SEQ` if the stream is not tracked).
    pub stream_seq: u64,
    now_ns: i64,
}

/// The one producer of a ring. Not `Sync`: the bindings serialise access.
pub struct Producer {
    ring: Arc<Ring>,
    lock_word: u64,
    write_pos: u64,
    commit_pos: u64,
    oldest: u64,
    next_seq: u64,
    snap_version: u64,
    records_lost: u64,
    pending: Option<Claim>,
    took_over_from: Option<u32>,
    /// `lock::fork_generation()` when attached: a forked copy of this handle must not write.
    fork_gen: u64,
    /// Which stream ids Arrow streams own and which schema id belongs to which stream,
    /// loaded from the schema table on first need (only this producer adds to it).
    arrow: Option<ArrowIds>,
}

/// The schema table's stream ids, as the producer needs them to keep plain records out of
/// Arrow streams (whose per-stream sequence numbers must count only their own records).
#[derive(Default)]
struct ArrowIds {
    /// `stream_of[schema_id]`: the stream id of each registered schema (0: none).
    stream_of: Vec<u32>,
    /// Stream id -> stream name, for every Arrow stream.
    names: std::collections::BTreeMap<u32, String>,
}

impl ArrowIds {
    fn load(ring: &Ring) -> Result<ArrowIds> {
        let mut ids = ArrowIds::default();
        for e in ring.schemas()? {
            ids.add(&e);
        }
        Ok(ids)
    }
    fn add(&mut self, e: &crate::schema::SchemaEntry) {
        let i = e.schema_id as usize;
        if self.stream_of.len() <= i {
            self.stream_of.resize(i + 1, 0);
        }
        self.stream_of[i] = e.stream_id;
        self.names.insert(e.stream_id, e.name.clone());
    }
}

/// Outcome of `Producer::try_claim`.
pub enum ClaimResult {
    Claimed(Claim),
    /// Policy "block": this many bytes of `read_tail` progress are needed first.
    WouldBlock {
        needed_tail: u64,
    },
}

impl Producer {
    fn attach(ring: Arc<Ring>) -> Result<Producer> {
        ring.check_intact()?;
        let fork_gen = lock::fork_generation();
        let mine = lock::my_lock_word();
        let acquired = lock::acquire(ring.h64(off::PRODUCER_LOCK), mine)?;
        let mut p = Producer {
            write_pos: ring.h64(off::WRITE_POS).load(Ordering::Acquire),
            commit_pos: ring.h64(off::COMMIT_POS).load(Ordering::Acquire),
            oldest: ring.h64(off::OLDEST_POS).load(Ordering::Acquire),
            next_seq: ring.h64(off::NEXT_SEQ).load(Ordering::Acquire),
            snap_version: ring.h64(off::SNAP_VERSION).load(Ordering::Acquire),
            records_lost: ring.h64(off::RECORDS_LOST).load(Ordering::Acquire),
            lock_word: mine,
            fork_gen,
            arrow: None,
            pending: None,
            took_over_from: match acquired {
                lock::Acquired::TookOver(pid) => Some(pid),
                lock::Acquired::Fresh => None,
            },
            ring,
        };
        if let Err(e) = p.recover() {
            lock::release(p.ring.h64(off::PRODUCER_LOCK), mine);
            p.lock_word = 0;
            return Err(e);
        }
        Ok(p)
    }

    /// Makes the ring consistent after a producer that died mid-write: a claimed but
    /// uncommitted record becomes committed padding (readers skip it; its sequence number
    /// is reused), a committed record whose counters were not yet published is counted.
    fn recover(&mut self) -> Result<()> {
        self.snap_version += self.snap_version % 2;
        if self.oldest > self.write_pos {
            // Died after reclaiming for a record it never claimed: start there.
            self.write_pos = self.oldest;
            self.commit_pos = self.oldest;
            self.ring
                .h64(off::WRITE_POS)
                .store(self.write_pos, Ordering::Release);
        }
        let mut p = self.commit_pos.max(self.oldest);
        if self.write_pos - p > self.ring.cap {
            return Err(self.ring.positions_error());
        }
        while p < self.write_pos {
            self.ring.check_tripped()?;
            let at = p % self.ring.cap;
            let h = self.ring.load_header(at);
            let size = self.ring.check_header(p, &h)?;
            if h.commit & COMMITTED == 0 {
                let r = &self.ring.region;
                r.r32(at, off::R_TYPE)
                    .store(TYPE_PADDING, Ordering::Relaxed);
                r.r64(at, off::R_SEQ).store(NO_SEQ, Ordering::Relaxed);
                r.r64(at, off::R_COMMIT)
                    .store(COMMITTED | size, Ordering::Release);
            } else if h.rtype == TYPE_DATA {
                self.next_seq = self.next_seq.max(h.seq + 1);
                if let Some(c) = self.stream_counter(h.stream) {
                    if h.stream_seq != NO_SEQ {
                        c.fetch_max(h.stream_seq + 1, Ordering::Relaxed);
                    }
                }
            }
            p += size;
        }
        self.commit_pos = self.write_pos;
        self.publish();
        self.ring
            .h64(off::HEARTBEAT_NS)
            .store(now_ns() as u64, Ordering::Relaxed);
        wake_sleepers(self.ring.h32(off::DATA_NOTIFY));
        Ok(())
    }

    pub fn ring(&self) -> &Arc<Ring> {
        &self.ring
    }
    /// Pid of the dead producer whose lock this one took over, if any.
    pub fn took_over_from(&self) -> Option<u32> {
        self.took_over_from
    }
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Publishes (`commit_pos`, `next_seq`) under the seqlock.
    #[inline(always)]
    fn publish(&mut self) {
        let r = &self.ring;
        let ver = r.h64(off::SNAP_VERSION);
        ver.store(self.snap_version + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        r.h64(off::COMMIT_POS)
            .store(self.commit_pos, Ordering::Relaxed);
        r.h64(off::NEXT_SEQ).store(self.next_seq, Ordering::Relaxed);
        self.snap_version += 2;
        ver.store(self.snap_version, Ordering::Release);
    }

    /// Claims space for a record of `payload_len` bytes: reclaims what it overlaps, writes
    /// a padding record if it would straddle the end, initialises the header (busy) and
    /// publishes `write_pos`. With policy "block" and no room, claims nothing.
    ///
    /// A plain record (this method) cannot use a stream id that an Arrow stream owns (see
    /// `try_claim_tagged`).
    pub fn try_claim(
        &mut self,
        payload_len: u64,
        stream: u32,
        timestamp_ns: Option<i64>,
    ) -> Result<ClaimResult> {
        self.try_claim_tagged(payload_len, stream, 0, timestamp_ns)
    }

    /// `try_claim` for a record of schema `schema_id` (0: plain bytes). A plain record may
    /// not use a stream id an Arrow stream owns, and an Arrow record must use its schema's
    /// stream id: per-stream sequence numbers then count exactly one stream's records.
    pub fn try_claim_tagged(
        &mut self,
        payload_len: u64,
        stream: u32,
        schema_id: u32,
        timestamp_ns: Option<i64>,
    ) -> Result<ClaimResult> {
        if lock::forked_since(self.fork_gen) {
            return Err(Error::Forked);
        }
        if self.pending.is_some() {
            return Err(Error::invalid(
                "a reserved record is pending: commit or abort it first",
            ));
        }
        self.ring.check_tripped()?;
        if stream != 0 || schema_id != 0 {
            self.check_stream(stream, schema_id)?;
        }
        let claimed = self.claim_inner(payload_len, stream, timestamp_ns)?;
        if let ClaimResult::Claimed(c) = &claimed {
            if schema_id != 0 {
                self.set_claim_tags(c, schema_id, 0);
            }
            if let Err(e) = self.ring.check_tripped() {
                // The file was truncated under the claim: nothing of it is in the file.
                self.pending = None;
                return Err(e);
            }
        }
        Ok(claimed)
    }

    fn arrow_ids(&mut self) -> Result<&mut ArrowIds> {
        if self.arrow.is_none() {
            self.arrow = Some(ArrowIds::load(&self.ring)?);
        }
        Ok(self.arrow.as_mut().expect("just loaded"))
    }

    /// Refuses a plain record on an Arrow stream's id, and an Arrow record on another id
    /// than its schema's.
    fn check_stream(&mut self, stream: u32, schema_id: u32) -> Result<()> {
        let ids = self.arrow_ids()?;
        if schema_id == 0 {
            if let Some(name) = ids.names.get(&stream) {
                return Err(Error::invalid(format!(
                    "stream id {stream} belongs to the Arrow stream {name:?}: plain records (write(..., \
                     stream={stream})) cannot use it, they would break that stream's sequence numbers; \
                     use a stream id no Arrow stream has (ring.streams() lists them), or write_arrow_batch"
                )));
            }
            return Ok(());
        }
        match ids.stream_of.get(schema_id as usize).copied() {
            Some(owner) if owner != 0 && owner == stream => Ok(()),
            Some(owner) if owner != 0 => Err(Error::invalid(format!(
                "schema id {schema_id} belongs to stream id {owner}, not {stream}"
            ))),
            _ => Err(Error::invalid(format!(
                "schema id {schema_id} is not registered in this ring's schema table"
            ))),
        }
    }

    fn claim_inner(
        &mut self,
        payload_len: u64,
        stream: u32,
        timestamp_ns: Option<i64>,
    ) -> Result<ClaimResult> {
        let cap = self.ring.cap;
        let size = match format::record_size(payload_len) {
            Some(s) if s <= cap => s,
            _ => {
                return Err(Error::TooLarge {
                    payload: payload_len,
                    max_payload: self.ring.max_payload(),
                })
            }
        };
        let w = self.write_pos;
        let at = w % cap;
        let pad = if at + size > cap { cap - at } else { 0 };
        let start = w + pad;
        let end = start + size;
        // Walk the records the new one will overlap (those starting before end - cap).
        let must_free = end.saturating_sub(cap);
        let mut oldest = self.oldest;
        let mut lost = 0u64;
        let tail = self.ring.h64(off::READ_TAIL).load(Ordering::Acquire);
        let block = self.ring.policy() == Policy::Block;
        // What lies between the oldest record and the write position fits in the ring (the
        // walk below is bounded by it); must_free itself may be up to a padding beyond that.
        if w.saturating_sub(oldest) > cap {
            return Err(self.ring.positions_error());
        }
        while oldest < must_free {
            if oldest >= w {
                oldest = start; // only the padding (never written) lay in between
                break;
            }
            let oat = oldest % cap;
            let h = self.ring.load_header(oat);
            let rsize = self.ring.check_header(oldest, &h)?;
            if h.rtype == TYPE_DATA && oldest >= tail {
                lost += 1;
            }
            oldest += rsize;
        }
        // Under "block", every record reclaimed must have been consumed. Reclaiming only
        // the (never written) padding beyond `w` needs nothing.
        let needed_tail = oldest.min(w);
        if block && needed_tail > self.oldest && tail < needed_tail {
            return Ok(ClaimResult::WouldBlock { needed_tail });
        }
        let now = now_ns();
        let r = &self.ring.region;
        if oldest != self.oldest {
            self.oldest = oldest;
            r.h64(off::OLDEST_POS).store(oldest, Ordering::Relaxed);
            // Every store below (into reclaimed space) is ordered after the new oldest_pos.
            fence(Ordering::Release);
            if lost != 0 {
                self.records_lost += lost;
                r.h64(off::RECORDS_LOST)
                    .store(self.records_lost, Ordering::Relaxed);
            }
        }
        if pad != 0 && w >= oldest {
            self.write_header(at, w, pad, TYPE_PADDING, 0, NO_SEQ, now, 0);
            r.r64(at, off::R_STREAM_SEQ)
                .store(NO_SEQ, Ordering::Relaxed);
            r.r64(at, off::R_COMMIT)
                .store(COMMITTED | pad, Ordering::Release);
        }
        let sat = start % cap;
        self.write_header(
            sat,
            start,
            size,
            TYPE_DATA,
            stream,
            self.next_seq,
            timestamp_ns.unwrap_or(now),
            payload_len,
        );
        let stream_seq = self
            .stream_counter(stream)
            .map_or(NO_SEQ, |c| c.load(Ordering::Relaxed));
        r.r64(sat, off::R_STREAM_SEQ)
            .store(stream_seq, Ordering::Relaxed);
        self.write_pos = end;
        r.h64(off::WRITE_POS).store(end, Ordering::Release);
        let claim = Claim {
            pos: start,
            size,
            payload_len,
            seq: self.next_seq,
            stream,
            stream_seq,
            now_ns: now,
        };
        self.pending = Some(claim);
        Ok(ClaimResult::Claimed(claim))
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn write_header(
        &self,
        at: u64,
        pos: u64,
        size: u64,
        rtype: u32,
        stream: u32,
        seq: u64,
        ts: i64,
        len: u64,
    ) {
        let r = &self.ring.region;
        r.r64(at, off::R_COMMIT).store(size, Ordering::Relaxed); // busy: COMMITTED clear
        r.r32(at, off::R_TYPE).store(rtype, Ordering::Relaxed);
        r.r32(at, off::R_STREAM).store(stream, Ordering::Relaxed);
        r.r64(at, off::R_SEQ).store(seq, Ordering::Relaxed);
        r.r64(at, off::R_POS).store(pos, Ordering::Relaxed);
        r.r64(at, off::R_TIMESTAMP)
            .store(ts as u64, Ordering::Relaxed);
        r.r64(at, off::R_PAYLOAD_LEN).store(len, Ordering::Relaxed);
        r.r32(at, off::R_SCHEMA_ID).store(0, Ordering::Relaxed);
        r.r32(at, off::R_FLAGS).store(0, Ordering::Relaxed);
    }

    /// Sets the schema id and flags of the pending claim (used by Arrow streams).
    pub fn set_claim_tags(&self, claim: &Claim, schema_id: u32, flags: u32) {
        let at = claim.pos % self.ring.cap;
        self.ring
            .region
            .r32(at, off::R_SCHEMA_ID)
            .store(schema_id, Ordering::Relaxed);
        self.ring
            .region
            .r32(at, off::R_FLAGS)
            .store(flags, Ordering::Relaxed);
    }

    /// Where the claimed record's payload goes (64-byte aligned, `claim.payload_len`
    /// bytes, writable until commit or abort).
    pub fn payload_ptr(&self, claim: &Claim) -> *mut u8 {
        let at = claim.pos % self.ring.cap + format::RECORD_HEADER_SIZE;
        // SAFETY: the record [pos, pos+size) lies inside the data region (never straddles).
        unsafe { self.ring.region.data_ptr().add(at as usize) }
    }

    /// Copies `len` bytes from `src` into the claimed payload at byte `offset` (any
    /// alignment; exactly `len` bytes are written, so a payload can be filled piecewise).
    ///
    /// # Safety
    /// `src` is valid for reads of `len` bytes; `offset + len <= claim.payload_len`.
    pub unsafe fn fill_at(&self, claim: &Claim, offset: u64, src: *const u8, len: usize) {
        assert!(offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= claim.payload_len));
        // SAFETY: the destination range lies inside the claim's payload (asserted).
        unsafe { copy::to_ring_exact(self.payload_ptr(claim).add(offset as usize), src, len) }
    }

    /// Registers a schema for stream `name` in the ring's schema table.
    ///
    /// A new stream gets the next stream id that no plain record has used yet (its per-stream
    /// counter is still 0, and no pending reservation has it), so its per-stream sequence
    /// numbers count only its own records.
    pub fn register_schema(
        &mut self,
        name: &str,
        schema: &[u8],
    ) -> Result<crate::schema::SchemaEntry> {
        if lock::forked_since(self.fork_gen) {
            return Err(Error::Forked);
        }
        self.ring.check_tripped()?;
        let pending = self.pending.map(|c| c.stream);
        let ring = self.ring.clone();
        let taken = move |id: u32| {
            pending == Some(id)
                || (id < format::MAX_TRACKED_STREAMS
                    && ring
                        .h64(format::STREAM_SEQ_OFFSET as usize + 8 * id as usize)
                        .load(Ordering::Relaxed)
                        != 0)
        };
        let e = crate::schema::register(&self.ring.region, name, schema, taken)?;
        self.arrow_ids()?.add(&e);
        Ok(e)
    }

    /// Copies `len` bytes from `src` into the claimed payload.
    ///
    /// # Safety
    /// `src` is valid for reads of `len` bytes, and `len <= claim.payload_len`.
    pub unsafe fn fill(&self, claim: &Claim, src: *const u8, len: usize) {
        assert!(len as u64 <= claim.payload_len);
        // SAFETY: destination is the claim's payload (64-aligned, padded to 64 bytes);
        // source validity is the caller's promise.
        unsafe { copy::to_ring(self.payload_ptr(claim), src, len) }
    }

    /// Commits the pending claim: readers can now see it. Returns its sequence number.
    pub fn commit(&mut self, claim: Claim) -> Result<u64> {
        if self.pending != Some(claim) {
            return Err(Error::invalid(
                "commit() of a record that is not the pending reservation",
            ));
        }
        self.pending = None;
        // A record filled (partly) into zero pages after a truncation is not published.
        self.ring.check_tripped()?;
        let region = &self.ring.region;
        region
            .r64(claim.pos % self.ring.cap, off::R_COMMIT)
            .store(COMMITTED | claim.size, Ordering::Release);
        region
            .h64(off::HEARTBEAT_NS)
            .store(claim.now_ns as u64, Ordering::Relaxed);
        if let Some(counter) = self.stream_counter(claim.stream) {
            counter.store(claim.stream_seq + 1, Ordering::Relaxed);
        }
        self.next_seq += 1;
        self.commit_pos = claim.pos + claim.size;
        self.publish();
        Ok(claim.seq)
    }

    /// Moves stream `stream`'s next sequence number forward to `next` (never back): the
    /// records in between count as lost for every reader, as if they had been overwritten.
    /// A relay uses it to carry losses that happened upstream (on another machine's ring)
    /// into this ring's per-stream sequence numbers. Returns the stream's next sequence
    /// number afterwards (unchanged if `next` is not ahead, or the stream is not tracked).
    pub fn advance_stream_seq(&mut self, stream: u32, next: u64) -> Result<u64> {
        if self.pending.is_some() {
            return Err(Error::invalid(
                "a reserved record is pending: commit or abort it first",
            ));
        }
        if next == NO_SEQ {
            return Err(Error::invalid(
                "a stream sequence number must be below 2^64-1",
            ));
        }
        Ok(self.stream_counter(stream).map_or(NO_SEQ, |c| {
            let now = c.load(Ordering::Relaxed).max(next);
            c.store(now, Ordering::Relaxed);
            now
        }))
    }

    /// The header counter holding stream `stream`'s next sequence number, for tracked
    /// streams (ids below `MAX_TRACKED_STREAMS`). Only the producer writes it.
    fn stream_counter(&self, stream: u32) -> Option<&AtomicU64> {
        (stream < format::MAX_TRACKED_STREAMS).then(|| {
            self.ring
                .h64(format::STREAM_SEQ_OFFSET as usize + 8 * stream as usize)
        })
    }

    /// Abandons the pending claim: it becomes padding; its sequence number is reused.
    pub fn abort(&mut self, claim: Claim) -> Result<()> {
        if self.pending != Some(claim) {
            return Err(Error::invalid(
                "abort() of a record that is not the pending reservation",
            ));
        }
        self.pending = None;
        let at = claim.pos % self.ring.cap;
        let region = &self.ring.region;
        region
            .r32(at, off::R_TYPE)
            .store(TYPE_PADDING, Ordering::Relaxed);
        region.r64(at, off::R_SEQ).store(NO_SEQ, Ordering::Relaxed);
        region
            .r64(at, off::R_COMMIT)
            .store(COMMITTED | claim.size, Ordering::Release);
        self.commit_pos = claim.pos + claim.size;
        self.publish();
        Ok(())
    }

    /// Wakes readers sleeping for data. Call after one or several commits.
    #[inline(always)]
    pub fn notify(&self) {
        wake_sleepers(self.ring.h32(off::DATA_NOTIFY));
    }

    /// Policy "block": sleeps until `read_tail` reaches `needed_tail` or `timeout` passes.
    pub fn wait_for_room(&self, needed_tail: u64, timeout: Duration) -> bool {
        let tail = self.ring.h64(off::READ_TAIL);
        let ready = || tail.load(Ordering::SeqCst) >= needed_tail;
        if ready() {
            return true;
        }
        sleep_on(self.ring.h32(off::TAIL_NOTIFY), timeout, ready);
        ready()
    }

    /// Writes one record, waiting up to `timeout` for room under policy "block" (in
    /// this thread: the bindings use the claim API to release the GIL instead).
    pub fn write(
        &mut self,
        payload: &[u8],
        stream: u32,
        timestamp_ns: Option<i64>,
        timeout: Duration,
    ) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.try_claim(payload.len() as u64, stream, timestamp_ns)? {
                ClaimResult::Claimed(c) => {
                    // SAFETY: payload is a live slice of exactly this length.
                    unsafe { self.fill(&c, payload.as_ptr(), payload.len()) };
                    let seq = self.commit(c)?;
                    self.notify();
                    return Ok(seq);
                }
                ClaimResult::WouldBlock { needed_tail } => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(self.full_error(needed_tail, timeout));
                    }
                    self.wait_for_room(needed_tail, deadline - now);
                }
            }
        }
    }

    /// The error `write` gives when the consumer did not make room within `waited`.
    pub fn full_error(&self, needed_tail: u64, waited: Duration) -> Error {
        Error::Full {
            needed: needed_tail
                .saturating_sub(self.ring.h64(off::READ_TAIL).load(Ordering::Relaxed)),
            waited_s: waited.as_secs_f64(),
        }
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        if lock::forked_since(self.fork_gen) {
            return; // the parent still owns the ring: leave its claim and its lock alone
        }
        if let Some(c) = self.pending {
            let _ = self.abort(c);
        }
        if self.lock_word != 0 {
            lock::release(self.ring.h64(off::PRODUCER_LOCK), self.lock_word);
        }
    }
}

/// A record found by `Reader::peek`: where it is and what its header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordRef {
    pub pos: u64,
    pub size: u64,
    pub seq: u64,
    pub timestamp_ns: i64,
    pub stream: u32,
    pub schema_id: u32,
    pub flags: u32,
    pub payload_len: u64,
    /// Sequence number within the stream (`NO_SEQ` if the stream is not tracked).
    pub stream_seq: u64,
}

/// What `Reader::peek` found at the reader's position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    Record(RecordRef),
    /// Claimed by the producer, not yet committed; will get this sequence number.
    Busy {
        seq: u64,
    },
    /// Nothing written beyond this position yet.
    Empty,
}

/// A cursor over the ring with its own position and loss count.
pub struct Reader {
    ring: Arc<Ring>,
    pos: u64,
    expected: u64,
    lost: u64,
    delivered: u64,
}

impl Reader {
    pub fn new(ring: Arc<Ring>, start: Start) -> Result<Reader> {
        ring.check_intact()?;
        let mut rd = Reader {
            ring,
            pos: 0,
            expected: 0,
            lost: 0,
            delivered: 0,
        };
        match start {
            Start::Latest => (rd.pos, rd.expected) = rd.ring.snapshot(),
            Start::Tail => (rd.pos, rd.expected) = rd.ring.tail_snapshot(),
            Start::Oldest => {
                rd.pos = rd.ring.oldest_pos();
                rd.expected = rd.seq_here()?;
            }
        }
        Ok(rd)
    }

    /// Sequence number of the first data record at or after the reader's position
    /// (moving the position over padding, or forward if lapped).
    fn seq_here(&mut self) -> Result<u64> {
        for _ in 0..LOOK_ATTEMPTS {
            match self.peek()? {
                Next::Record(r) => return Ok(r.seq),
                Next::Busy { seq } => return Ok(seq),
                Next::Empty => {
                    let (commit, next) = self.ring.snapshot();
                    if commit <= self.pos {
                        return Ok(next);
                    }
                    // committed meanwhile (peek checked that write_pos covers commit_pos
                    // then): look again
                }
            }
        }
        Err(self.ring.positions_error())
    }

    pub fn ring(&self) -> &Arc<Ring> {
        &self.ring
    }
    /// Absolute position of the next record this reader will look at.
    pub fn position(&self) -> u64 {
        self.pos
    }
    /// Records lost so far (overwritten before this reader got to them, or torn copies).
    pub fn lost(&self) -> u64 {
        self.lost
    }
    pub fn delivered(&self) -> u64 {
        self.delivered
    }
    /// Sequence number the next record should have.
    pub fn expected_seq(&self) -> u64 {
        self.expected
    }

    /// Finds the next data record (skipping padding, jumping forward when lapped) without
    /// consuming it.
    pub fn peek(&mut self) -> Result<Next> {
        let ring = &*self.ring;
        let cap = ring.cap;
        // Each look either returns or moves past a padding record or to a newer oldest
        // record; a capacity's worth of records plus the producer's progress meanwhile is far
        // below this bound, unless the header's positions are corrupt.
        for _ in 0..LOOK_ATTEMPTS {
            ring.check_tripped()?;
            // write_pos first: its acquire makes the oldest_pos stored before it visible.
            let write = ring.write_pos();
            let oldest = ring.oldest_pos();
            if (write | oldest) % format::RECORD_ALIGN != 0 {
                return Err(ring.positions_error());
            }
            if self.pos < oldest {
                self.pos = oldest;
            }
            if self.pos >= write {
                // commit_pos, then write_pos: the producer stores write_pos first, so in a
                // healthy ring the second load is never below the first.
                let commit = ring.h64(off::COMMIT_POS).load(Ordering::Acquire);
                if commit > ring.write_pos() || commit % format::RECORD_ALIGN != 0 {
                    return Err(ring.positions_error());
                }
                return Ok(Next::Empty);
            }
            if write - self.pos > cap {
                ring.check_intact()?;
                return Err(Error::corrupt(format!(
                    "write position {write} is more than a capacity ({cap}) ahead of the oldest record {oldest}"
                )));
            }
            let at = self.pos % cap;
            let h = ring.load_header(at);
            if !ring.still_valid(self.pos) {
                continue; // reclaimed while we read the header: jump ahead
            }
            let size = ring.check_header(self.pos, &h)?;
            if h.commit & COMMITTED == 0 {
                return Ok(Next::Busy { seq: h.seq });
            }
            if h.rtype == TYPE_PADDING {
                self.pos += size;
                continue;
            }
            return Ok(Next::Record(RecordRef {
                pos: self.pos,
                size,
                seq: h.seq,
                timestamp_ns: h.timestamp_ns,
                stream: h.stream,
                schema_id: h.schema_id,
                flags: h.flags,
                payload_len: h.payload_len,
                stream_seq: h.stream_seq,
            }));
        }
        Err(ring.positions_error())
    }

    /// Copies a peeked record's payload out of the ring. Follow with `confirm`.
    ///
    /// # Safety
    /// `dst` is valid for writes of `rec.payload_len` bytes and is not ring memory.
    pub unsafe fn copy_payload(&self, rec: &RecordRef, dst: *mut u8) {
        // SAFETY: the payload lies inside the record, inside the data region; it is
        // 64-aligned and padded to 64 bytes. Destination validity is the caller's promise.
        unsafe { copy::from_ring(dst, self.payload_ptr(rec), rec.payload_len as usize) }
    }

    /// Address of a peeked record's payload in this process (for zero-copy views).
    pub fn payload_ptr(&self, rec: &RecordRef) -> *const u8 {
        let at = rec.pos % self.ring.cap + format::RECORD_HEADER_SIZE;
        // SAFETY: inside the data region (records never straddle its end).
        unsafe { self.ring.region.data_ptr().add(at as usize) }
    }

    /// After reading a peeked record: true if it was intact (then the reader moves past it
    /// and accounts for any records skipped before it); false if the producer reclaimed
    /// it meanwhile (the copy must be discarded; the next `peek` jumps ahead).
    pub fn confirm(&mut self, rec: &RecordRef) -> bool {
        if !self.ring.still_valid(rec.pos) {
            return false;
        }
        self.lost += rec.seq.saturating_sub(self.expected);
        self.expected = rec.seq + 1;
        self.pos = rec.pos + rec.size;
        self.delivered += 1;
        true
    }

    /// Reads the next record into a new `Vec` (copy, then validate; torn copies are
    /// retried from the new oldest record). `None` if nothing is committed yet.
    pub fn next_copy(&mut self) -> Result<Option<(RecordRef, Vec<u8>)>> {
        // Each torn copy means the producer reclaimed the record meanwhile: the next look
        // starts further on. Bounded all the same (a producer lapping us this often).
        for _ in 0..LOOK_ATTEMPTS {
            let rec = match self.peek()? {
                Next::Record(r) => r,
                _ => return Ok(None),
            };
            let mut buf = Vec::with_capacity(rec.payload_len as usize);
            // SAFETY: buf has capacity payload_len; set_len after the bytes are written.
            unsafe {
                self.copy_payload(&rec, buf.as_mut_ptr());
                buf.set_len(rec.payload_len as usize);
            }
            if self.confirm(&rec) {
                return Ok(Some((rec, buf)));
            }
        }
        self.ring.check_tripped()?;
        Err(Error::corrupt(format!(
            "{LOOK_ATTEMPTS} copies in a row were overwritten while they were made: the ring is far \
             too small for this producer, or its header is corrupt"
        )))
    }

    /// Whether a record may be available (committed past our position, or we were lapped).
    fn may_have_data(&self) -> bool {
        let r = &self.ring;
        r.h64(off::COMMIT_POS).load(Ordering::SeqCst) > self.pos
            || r.h64(off::OLDEST_POS).load(Ordering::SeqCst) > self.pos
    }

    /// Waits up to `timeout` for the producer to commit something past our position:
    /// spins briefly, then sleeps on the ring's futex. May return early.
    pub fn wait(&self, timeout: Duration) {
        let spin_until = Instant::now() + timeout.min(Duration::from_micros(20));
        while Instant::now() < spin_until {
            if self.may_have_data() {
                return;
            }
            std::hint::spin_loop();
        }
        let left = timeout.saturating_sub(Duration::from_micros(20));
        if left.is_zero() {
            return;
        }
        if !self.ring.region.header_writable() {
            std::thread::sleep(left.min(Duration::from_micros(200)));
            return;
        }
        sleep_on(self.ring.h32(off::DATA_NOTIFY), left, || {
            self.may_have_data()
        });
    }

    /// Stores this reader's position as the ring's `read_tail` (primary consumer only).
    ///
    /// The reader can be ahead of the published `commit_pos`: it skips the padding at the end
    /// of a lap as soon as the producer writes it (with the claim of the record after it, which
    /// may still be filling), and a record's commit flag is visible an instant before
    /// `commit_pos` moves past it. Then the tail stored is `commit_pos`, with the sequence
    /// number the producer paired with it: everything before it is consumed, and the next
    /// commit moves the tail the rest of the way.
    pub fn commit(&self) -> Result<()> {
        let (commit, next_seq) = self.ring.snapshot();
        if self.pos <= commit {
            self.ring.set_read_tail(self.pos, self.expected)
        } else {
            self.ring.set_read_tail(commit, next_seq)
        }
    }
}
