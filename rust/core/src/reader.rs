//! Readers (`Reader`): a cursor with its own position and loss count, any number of them in
//! any process. The read rule (copy, then check `oldest_pos`) is in `ring.rs`'s module doc
//! and in docs/ring-format.md.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::copy;
use crate::error::{Error, Result};
use crate::format::{self, off, COMMITTED, TYPE_PADDING};
use crate::ring::{Ring, Start, LOOK_ATTEMPTS};
use crate::wait::WaitStrategy;

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
    wait: WaitStrategy,
}

impl Reader {
    pub fn new(ring: Arc<Ring>, start: Start) -> Result<Reader> {
        ring.check_intact()?;
        let mut rd = Reader::at(ring, 0);
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

    /// A reader at `pos` that has delivered nothing (its expected sequence number is set by
    /// the caller, or found with `seq_here`).
    pub(crate) fn at(ring: Arc<Ring>, pos: u64) -> Reader {
        Reader {
            ring,
            pos,
            expected: 0,
            lost: 0,
            delivered: 0,
            wait: WaitStrategy::default(),
        }
    }

    /// Sequence number of the first data record at or after the reader's position
    /// (moving the position over padding, or forward if lapped).
    pub(crate) fn seq_here(&mut self) -> Result<u64> {
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

    /// Collects into `out` (cleared first) up to `max` committed records that follow each
    /// other from the reader's position with the same payload length (and, if given, from
    /// `stream`), for a bulk read: copy them all, then `confirm_run`. Stops at the first
    /// record that differs, at a claim not yet committed, or at the end of what is written.
    /// The reader's position is unchanged (only padding and a jump to the oldest record, as
    /// `peek` makes them, move it).
    pub fn peek_run(
        &mut self,
        max: usize,
        stream: Option<u32>,
        out: &mut Vec<RecordRef>,
    ) -> Result<()> {
        out.clear();
        let start = self.pos;
        let mut first: Option<RecordRef> = None;
        while out.len() < max {
            let rec = match self.peek() {
                Ok(Next::Record(r)) => r,
                Ok(Next::Busy { .. } | Next::Empty) => break,
                Err(e) => {
                    // Not past records nobody confirmed: back to where this run began.
                    self.pos = first.map_or(start, |f| f.pos);
                    out.clear();
                    return Err(e);
                }
            };
            let f = *first.get_or_insert(rec);
            if rec.payload_len != f.payload_len || stream.is_some_and(|s| s != rec.stream) {
                break;
            }
            out.push(rec);
            self.pos = rec.pos + rec.size;
        }
        // Back to the first record of the run (peek may have moved past padding or to the
        // oldest record before it: that move stands).
        if let Some(f) = first {
            self.pos = f.pos;
        }
        Ok(())
    }

    /// After copying the records `peek_run` found: confirms them in order and returns the
    /// index of the first one still intact (every one before it was reclaimed by the producer
    /// while it was copied; their copies must be discarded). Records are reclaimed in order,
    /// so the intact ones are a suffix. Returns `run.len()` if none is.
    pub fn confirm_run(&mut self, run: &[RecordRef]) -> usize {
        // Usually the first is intact, and so is everything after it: one check.
        let first_intact = run
            .iter()
            .position(|rec| self.ring.still_valid(rec.pos))
            .unwrap_or(run.len());
        for rec in &run[first_intact..] {
            self.lost += rec.seq.saturating_sub(self.expected);
            self.expected = rec.seq + 1;
            self.pos = rec.pos + rec.size;
            self.delivered += 1;
        }
        first_intact
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

    /// How `wait` spends its time (adaptive unless set).
    pub fn set_wait(&mut self, wait: WaitStrategy) {
        self.wait = wait;
    }
    pub fn wait_strategy(&self) -> WaitStrategy {
        self.wait
    }

    /// Waits up to `timeout` for the producer to commit something past our position, as
    /// the reader's wait strategy says. May return early.
    pub fn wait(&self, timeout: Duration) {
        let word = self
            .ring
            .region
            .header_writable()
            .then(|| self.ring.h32(off::DATA_NOTIFY));
        self.wait.wait(word, timeout, || self.may_have_data());
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
