//! The one producer of a ring (`Producer`): attaching (taking the producer lock, recovering
//! what a dead predecessor left), reclaiming space, claiming, filling, committing and
//! aborting records, and the per-stream sequence counters.
//!
//! Over 500 lines for one reason: it is one type whose methods keep one set of invariants
//! over its private state (positions, pending claim, seqlock version); split over files,
//! that state would have to become visible to the whole crate.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::copy;
use crate::error::{Error, Result};
use crate::format::{self, off, COMMITTED, NO_SEQ, TYPE_DATA, TYPE_PADDING};
use crate::lock;
use crate::region::now_ns;
use crate::ring::{Policy, Ring};
use crate::schema::{SchemaEntry, StreamIds};
use crate::wait::{wake_sleepers, WaitStrategy};

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
    /// The payload is already in place (`prefill_hot`): do not fill it again.
    pub prefilled: bool,
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
    arrow: Option<StreamIds>,
    /// How a blocked write waits for room.
    wait: WaitStrategy,
    /// Policy "block": the offset past which a drained ring goes back to 0 (`set_hot_wrap`).
    hot_wrap: u64,
    /// The lap (`write_pos / capacity`) in which the producer last waited for its consumer
    /// to drain (`ClaimResult::WouldBlock::hot_wait`): at most once a lap.
    hot_waited_lap: u64,
    /// `prefill_hot`'s copy: (position of the record it is for, payload bytes).
    prefilled: Option<(u64, u64)>,
}

/// The default `Producer::set_hot_wrap`: 1 MiB (what a core's L2 holds, or about).
pub const HOT_WRAP_DEFAULT: u64 = 1 << 20;

/// Outcome of `Producer::try_claim`.
pub enum ClaimResult {
    Claimed(Claim),
    /// Policy "block": this many bytes of `read_tail` progress are needed first.
    WouldBlock {
        needed_tail: u64,
        /// `Some(d)`: the ring is not full. Its consumer is taking the last one or two large
        /// records (hot reuse, `set_hot_wrap`): the producer waits at most `d` for it to take
        /// them, so that the lap can end early, then claims again, which goes on in any
        /// case (it asks at most once a lap). `None`: full, wait for room.
        hot_wait: Option<Duration>,
    },
}

/// Records from this size up to `HOT_WAIT_MAX_RECORD` may wait for the consumer to drain
/// (`hot_wait`); smaller records are read in batches and never wait while the ring has room,
/// larger ones cycle through more memory than a cache holds anyway.
pub const HOT_WAIT_MIN_RECORD: u64 = 64 * 1024;
pub const HOT_WAIT_MAX_RECORD: u64 = 8 << 20;
/// How long `hot_wait` lasts: the time the consumer needs for the bytes it still has to take
/// at 8 GB/s (a consumer that copies frames as they come goes faster; one that processes
/// them as it reads is not kept up with, and the lap goes on), at most 2 ms.
const HOT_WAIT_BYTES_PER_NS: u64 = 8;
const HOT_WAIT_MAX: Duration = Duration::from_millis(2);

impl Producer {
    pub(crate) fn attach(ring: Arc<Ring>) -> Result<Producer> {
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
            wait: WaitStrategy::default(),
            hot_wrap: HOT_WRAP_DEFAULT,
            hot_waited_lap: u64::MAX,
            prefilled: None,
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
        self.prefilled = None;
        self.try_claim_prefilled(payload_len, stream, schema_id, timestamp_ns)
    }

    /// `try_claim_tagged` again after `prefill_hot` returned true for this record's payload
    /// (and a wait): if the record goes where the payload was copied, the claim says so
    /// (`Claim::prefilled`) and the caller commits it without filling it.
    pub fn try_claim_prefilled(
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
            self.arrow_ids()?.check(stream, schema_id)?;
        }
        let claimed = self.claim_inner(payload_len, stream, timestamp_ns, now_ns())?;
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

    fn arrow_ids(&mut self) -> Result<&mut StreamIds> {
        if self.arrow.is_none() {
            self.arrow = Some(StreamIds::load(&self.ring.region)?);
        }
        Ok(self.arrow.as_mut().expect("just loaded"))
    }

    /// `now`: the wall clock (the padding's timestamp, the record's unless given, the
    /// heartbeat at commit).
    fn claim_inner(
        &mut self,
        payload_len: u64,
        stream: u32,
        timestamp_ns: Option<i64>,
        now: i64,
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
        let tail = self.ring.h64(off::READ_TAIL).load(Ordering::Acquire);
        let block = self.ring.policy() == Policy::Block;
        // What lies between the oldest record and the write position fits in the ring (the
        // walk below is bounded by it); must_free itself may be up to a padding beyond that.
        if w.saturating_sub(self.oldest) > cap {
            return Err(self.ring.positions_error());
        }
        let mut pad = if at + size > cap { cap - at } else { 0 };
        // Hot reuse (policy "block"): once the consumer has taken everything, go back to
        // offset 0 early (an end-of-lap padding before the end), so that the records cycle
        // through the first megabytes (still in cache) instead of the whole ring. Only a
        // drained ring: everything the walk below reclaims is then consumed (it never
        // blocks, nothing is lost), and a consumer that lags keeps the whole ring as slack.
        if pad == 0 && block && self.hot_wrap != 0 && at >= self.hot_wrap.max(2 * size) {
            if tail >= w {
                pad = cap - at;
            } else if (HOT_WAIT_MIN_RECORD..=HOT_WAIT_MAX_RECORD).contains(&size)
                && w - tail <= 2 * size
                && self.hot_waited_lap != w / cap
            {
                // A consumer a record or two behind large records is copying them: wait
                // for it briefly (once a lap) rather than go on through cold memory.
                self.hot_waited_lap = w / cap;
                let ns = (w - tail) / HOT_WAIT_BYTES_PER_NS;
                return Ok(ClaimResult::WouldBlock {
                    needed_tail: w,
                    hot_wait: Some(Duration::from_nanos(ns).min(HOT_WAIT_MAX)),
                });
            }
        }
        let start = w + pad;
        let end = start + size;
        // Walk the records the new one will overlap (those starting before end - cap).
        let (oldest, lost) = self.reclaim(w, start, end.saturating_sub(cap), tail)?;
        // Under "block", every record reclaimed must have been consumed. Reclaiming only
        // the (never written) padding beyond `w` needs nothing.
        let needed_tail = oldest.min(w);
        if block && needed_tail > self.oldest && tail < needed_tail {
            return Ok(ClaimResult::WouldBlock {
                needed_tail,
                hot_wait: None,
            });
        }
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
        let prefilled = self.prefilled.take() == Some((start, payload_len));
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
            prefilled,
            now_ns: now,
        };
        self.pending = Some(claim);
        Ok(ClaimResult::Claimed(claim))
    }

    /// The oldest record once a record placed at `start` (after the write position `w`)
    /// reclaimed every record starting before `must_free`, and how many of those were data
    /// not yet consumed (at or after `tail`).
    #[inline(always)]
    fn reclaim(&self, w: u64, start: u64, must_free: u64, tail: u64) -> Result<(u64, u64)> {
        let cap = self.ring.cap;
        let mut oldest = self.oldest;
        let mut lost = 0u64;
        while oldest < must_free {
            if oldest >= w {
                oldest = start; // only the padding (never written) lay in between
                break;
            }
            let h = self.ring.load_header(oldest % cap);
            let rsize = self.ring.check_header(oldest, &h)?;
            if h.rtype == TYPE_DATA && oldest >= tail {
                lost += 1;
            }
            oldest += rsize;
        }
        Ok((oldest, lost))
    }

    /// After `WouldBlock { hot_wait: Some(_) }`, before waiting: copies the payload of the
    /// record being written to where it goes if the consumer drains in time (the start of
    /// the next lap), so that this copy overlaps the consumer's copy of the last records
    /// instead of following it. The records it overwrites are consumed; they are reclaimed
    /// first, exactly as a claim there would (`oldest_pos`, then a release fence). The claim
    /// that follows the wait uses the copy (`Claim::prefilled`) if the lap ends early there,
    /// and otherwise goes on as usual (the copy was only into reclaimed space). Returns false,
    /// having done nothing, if that space is not free yet.
    ///
    /// # Safety
    /// `src` is valid for reads of `len` bytes, the payload of the claim that asked.
    pub unsafe fn prefill_hot(&mut self, src: *const u8, len: usize) -> Result<bool> {
        self.prefilled = None;
        if lock::forked_since(self.fork_gen) {
            return Err(Error::Forked);
        }
        self.ring.check_tripped()?;
        let cap = self.ring.cap;
        let w = self.write_pos;
        let size = match format::record_size(len as u64) {
            Some(s) if s <= cap && self.pending.is_none() => s,
            _ => return Ok(false),
        };
        let lap_start = w - w % cap;
        let start = lap_start + cap;
        // Nothing a wait that fails would not have reclaimed soon anyway: this lap's first
        // records and padding. Data of an earlier lap still in the ring (after a lap through
        // the whole ring, or a longer one) stays there for readers of the history until this
        // lap reaches it, if the consumer does not drain in time.
        let mut p = self.oldest;
        while p < lap_start {
            let h = self.ring.load_header(p % cap);
            let rsize = self.ring.check_header(p, &h)?;
            if h.rtype == TYPE_DATA {
                return Ok(false);
            }
            p += rsize;
        }
        let tail = self.ring.h64(off::READ_TAIL).load(Ordering::Acquire);
        let (oldest, lost) = self.reclaim(w, start, start + size - cap, tail)?;
        // As in claim_inner: everything reclaimed must have been consumed.
        if lost != 0 || oldest > w || (oldest > self.oldest && tail < oldest) {
            return Ok(false);
        }
        if oldest != self.oldest {
            self.oldest = oldest;
            self.ring
                .h64(off::OLDEST_POS)
                .store(oldest, Ordering::Relaxed);
            fence(Ordering::Release);
        }
        let claim = Claim {
            pos: start,
            size,
            payload_len: len as u64,
            seq: 0,
            stream: 0,
            stream_seq: 0,
            prefilled: false,
            now_ns: 0,
        };
        // SAFETY: the payload of a record at `start`: inside the data region (size <= cap,
        // at offset 0 of a lap), reclaimed above and beyond write_pos, so no reader looks
        // at it; `src` is the caller's promise.
        unsafe { copy::to_ring(self.payload_ptr(&claim), src, len) };
        self.prefilled = Some((start, len as u64));
        Ok(true)
    }

    /// Policy "block": how far into the ring (bytes) the producer goes before it returns to
    /// offset 0 early, when the consumer has taken every record (at least twice the
    /// record's size); 0: never early, every lap the whole ring. Past it, a claim of a
    /// large record whose consumer is a record or two behind asks its caller to wait for it
    /// briefly (`ClaimResult::WouldBlock::hot_wait`, once a lap).
    pub fn set_hot_wrap(&mut self, bytes: u64) {
        self.hot_wrap = bytes;
    }
    pub fn hot_wrap(&self) -> u64 {
        self.hot_wrap
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
        self.ring.claim_payload_ptr(claim)
    }

    /// Copies `len` bytes from `src` into the claimed payload at byte `offset` (any
    /// alignment; exactly `len` bytes are written, so a payload can be filled piecewise).
    ///
    /// # Safety
    /// `src` is valid for reads of `len` bytes; `offset + len <= claim.payload_len`.
    pub unsafe fn fill_at(&self, claim: &Claim, offset: u64, src: *const u8, len: usize) {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.ring.fill_claim_at(claim, offset, src, len) }
    }

    /// Registers a schema for stream `name` in the ring's schema table.
    ///
    /// A new stream gets the next stream id that no plain record has used yet (its per-stream
    /// counter is still 0, and no pending reservation has it), so its per-stream sequence
    /// numbers count only its own records.
    pub fn register_schema(&mut self, name: &str, schema: &[u8]) -> Result<SchemaEntry> {
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
        self.arrow_ids()?;
        let table = self.arrow.as_mut().expect("loaded by arrow_ids");
        crate::schema::register(&self.ring.region, table, name, schema, taken)
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
        let seq = self.commit_unpublished(claim)?;
        self.publish();
        Ok(seq)
    }

    /// `commit` without publishing (`commit_pos`, `next_seq`): readers see the record (they
    /// go by its header), the header's counters lag until the next `publish`.
    fn commit_unpublished(&mut self, claim: Claim) -> Result<u64> {
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
        Ok(claim.seq)
    }

    /// Writes rows `0..rows` of `row_len` bytes each (row i at `base + i * row_len`) as one
    /// plain record each on `stream`, as far as the ring has room without waiting, and
    /// returns how many it wrote (the caller writes the next one with `write`'s wait, then
    /// calls again; rows whose records are `HOT_WAIT_MIN_RECORD` bytes or more are left to
    /// `write`: 0).
    /// What a row-by-row `write` would do, for a fraction of its cost: the
    /// checks once, one clock read (the records' timestamp and the heartbeat: they are
    /// handed over at once), `commit_pos` and `next_seq` published at the end (also when an
    /// error stops it: what was committed stays committed) and whenever the run has gone
    /// half a capacity past the last publish, so that `oldest_pos <= commit_pos` holds at
    /// every moment (an overwrite ring reclaims as the run goes).
    ///
    /// # Safety
    /// `base` is valid for reads of `rows * row_len` bytes.
    pub unsafe fn write_rows(
        &mut self,
        base: *const u8,
        rows: usize,
        row_len: usize,
        stream: u32,
    ) -> Result<usize> {
        match format::record_size(row_len as u64) {
            // (records a hot wait is for: one `write` each, with its wait and copy ahead)
            Some(size) if rows != 0 && size < HOT_WAIT_MIN_RECORD => {}
            _ => return Ok(0),
        }
        if lock::forked_since(self.fork_gen) {
            return Err(Error::Forked);
        }
        if self.pending.is_some() {
            return Err(Error::invalid(
                "a reserved record is pending: commit or abort it first",
            ));
        }
        if stream != 0 {
            self.arrow_ids()?.check(stream, 0)?;
        }
        self.prefilled = None;
        let now = now_ns();
        let size = format::record_size(row_len as u64).unwrap_or(u64::MAX);
        // commit_pos may lag the committed records during the run, never oldest_pos: it is
        // published before the run has written half a capacity past it (the new oldest
        // record is then never beyond that published record boundary).
        let half = self.ring.cap / 2;
        let mut published = self.commit_pos;
        let mut done = 0;
        let result = (|| {
            while done < rows {
                self.ring.check_tripped()?;
                if self.write_pos + size > published + half {
                    self.publish();
                    published = self.commit_pos;
                }
                let c = match self.claim_inner(row_len as u64, stream, Some(now), now)? {
                    ClaimResult::Claimed(c) => c,
                    ClaimResult::WouldBlock { .. } => break,
                };
                // SAFETY: row `done` lies inside the caller's rows; the claim is its length.
                unsafe { self.fill(&c, base.add(done * row_len), row_len) };
                self.commit_unpublished(c)?;
                done += 1;
            }
            Ok(done)
        })();
        self.publish();
        result
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

    /// The wait `WouldBlock { needed_tail, hot_wait: Some(d) }` asks for, `left` being what
    /// the caller's timeout still allows: copies `payload` ahead (`prefill_hot`) if there is
    /// one and the whole wait is allowed, then waits for the consumer to drain, at most `d`
    /// (and `left`; not at all for 0). Returns whether the payload was copied ahead: claim
    /// again with `try_claim_prefilled` then, else with `try_claim_tagged`.
    ///
    /// # Safety
    /// `payload`, if given, is valid for reads of its length, the claim's payload.
    pub unsafe fn hot_wait(
        &mut self,
        needed_tail: u64,
        d: Duration,
        left: Duration,
        payload: Option<(*const u8, usize)>,
    ) -> Result<bool> {
        if left.is_zero() {
            return Ok(false);
        }
        let prefilled = match payload {
            // SAFETY: the caller's promise, passed on.
            Some((src, len)) if left >= d => unsafe { self.prefill_hot(src, len)? },
            _ => false,
        };
        self.wait_for_room(needed_tail, d.min(left));
        Ok(prefilled)
    }

    /// Policy "block": waits until `read_tail` reaches `needed_tail` or `timeout` passes, as
    /// the producer's wait strategy says (adaptive unless set). May return false early.
    pub fn wait_for_room(&self, needed_tail: u64, timeout: Duration) -> bool {
        let tail = self.ring.h64(off::READ_TAIL);
        let ready = || tail.load(Ordering::SeqCst) >= needed_tail;
        self.wait
            .wait(Some(self.ring.h32(off::TAIL_NOTIFY)), timeout, ready)
    }

    /// How `wait_for_room` spends its time.
    pub fn set_wait(&mut self, wait: WaitStrategy) {
        self.wait = wait;
    }
    pub fn wait_strategy(&self) -> WaitStrategy {
        self.wait
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
        let mut prefilled = false;
        loop {
            let claimed = if prefilled {
                self.try_claim_prefilled(payload.len() as u64, stream, 0, timestamp_ns)?
            } else {
                self.try_claim(payload.len() as u64, stream, timestamp_ns)?
            };
            match claimed {
                ClaimResult::Claimed(c) => {
                    if !c.prefilled {
                        // SAFETY: payload is a live slice of exactly this length.
                        unsafe { self.fill(&c, payload.as_ptr(), payload.len()) };
                    }
                    let seq = self.commit(c)?;
                    self.notify();
                    return Ok(seq);
                }
                ClaimResult::WouldBlock {
                    needed_tail,
                    hot_wait: Some(d),
                } => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let src = Some((payload.as_ptr(), payload.len()));
                    // SAFETY: as above.
                    prefilled = unsafe { self.hot_wait(needed_tail, d, left, src)? };
                }
                ClaimResult::WouldBlock { needed_tail, .. } => {
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

/// The payload of a claim, for whoever fills it while the producer lock is not held (a
/// binding's reservation object, which outlives the call that claimed it).
impl Ring {
    /// Where the claimed record's payload goes in this process (64-byte aligned,
    /// `claim.payload_len` bytes, writable until commit or abort).
    pub fn claim_payload_ptr(&self, claim: &Claim) -> *mut u8 {
        let at = claim.pos % self.cap + format::RECORD_HEADER_SIZE;
        // SAFETY: the record [pos, pos+size) lies inside the data region (never straddles).
        unsafe { self.region.data_ptr().add(at as usize) }
    }

    /// Copies `len` bytes from `src` into the claimed payload at byte `offset` (any
    /// alignment; exactly `len` bytes are written, so a payload can be filled piecewise).
    ///
    /// # Safety
    /// `src` is valid for reads of `len` bytes; `claim` is the pending claim of this ring's
    /// producer (not yet committed or aborted). Panics unless `offset + len <= claim.payload_len`.
    pub unsafe fn fill_claim_at(&self, claim: &Claim, offset: u64, src: *const u8, len: usize) {
        assert!(offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= claim.payload_len));
        // SAFETY: the destination range lies inside the claim's payload (asserted).
        unsafe { copy::to_ring_exact(self.claim_payload_ptr(claim).add(offset as usize), src, len) }
    }
}
