//! The primary consumer's durable position, `read_tail`: storing it (a seqlock pair with
//! its sequence number; a producer under policy "block" waits on it), and the snapshot API
//! (`read_snapshot` / `advance_tail`) that consumes whole framed records without a `Reader`.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use crate::copy;
use crate::error::{Error, Result};
use crate::format::{self, off};
use crate::reader::Reader;
use crate::ring::Ring;
use crate::wait::wake_sleepers;

/// How many torn copies `read_snapshot` retries before it reports an error.
const SNAPSHOT_ATTEMPTS: u32 = 10_000;

impl Ring {
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
        let seq = Reader::at(self.clone(), target).seq_here()?;
        self.set_read_tail(target, seq)?;
        Ok(target)
    }
}
