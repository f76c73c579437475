//! The ring file's byte layout. `docs/ring-format.md` documents the same thing for
//! readers in other languages; the `const` assertions below keep the two in step.
//!
//! Everything is little-endian. The structs here are never instantiated over the
//! mapping (that would put references into memory another process writes); they exist
//! so that `offset_of!` gives every field's offset from one `#[repr(C)]` definition.

use std::mem::{offset_of, size_of};

/// First eight bytes of every ring file.
pub const MAGIC: [u8; 8] = *b"RDAQRING";
/// Layout version this build reads and writes.
pub const VERSION: u32 = 1;
/// Size of the file header (one page): fixed fields, then zeros.
pub const HEADER_SIZE: u64 = 4096;
/// Smallest default size of the schema region that follows the header (rings of up to 4 MiB).
pub const DEFAULT_SCHEMA_SIZE: u64 = 256 * 1024;
/// Largest default size of the schema region (rings of 1 GiB and more); larger on request.
pub const MAX_DEFAULT_SCHEMA_SIZE: u64 = 64 << 20;
/// Largest schema region a ring may have.
pub const MAX_SCHEMA_SIZE: u64 = 1 << 30;

/// The schema region a ring of `capacity` data bytes gets unless told otherwise: a sixteenth
/// of the capacity, from 256 KiB to 64 MiB, in pages. A schema of a timestamp and a value
/// with units takes about 450 bytes of it, so a 100 MiB ring holds about 14,000 streams.
pub const fn default_schema_size(capacity: u64) -> u64 {
    let s = capacity / 16;
    let s = if s < DEFAULT_SCHEMA_SIZE {
        DEFAULT_SCHEMA_SIZE
    } else if s > MAX_DEFAULT_SCHEMA_SIZE {
        MAX_DEFAULT_SCHEMA_SIZE
    } else {
        s
    };
    s.div_ceil(HEADER_SIZE) * HEADER_SIZE
}
/// Every record starts on this boundary and its size is a multiple of it, so every
/// payload is 64-byte aligned (Arrow's recommended alignment; enough for any numpy dtype).
pub const RECORD_ALIGN: u64 = 64;
/// Size of a record header; the payload follows it.
pub const RECORD_HEADER_SIZE: u64 = 64;
/// Smallest data region accepted at creation.
pub const MIN_CAPACITY: u64 = 4096;
/// Largest data region accepted at creation (64 TiB: half of x86-64's user address space).
pub const MAX_CAPACITY: u64 = 1 << 46;

/// Bit 63 of a record's commit word: the record is complete and may be read.
pub const COMMITTED: u64 = 1 << 63;
/// The low bits of the commit word: the record's total size in bytes (header, payload,
/// alignment), the distance to the next record.
pub const SIZE_MASK: u64 = (1 << 48) - 1;

/// Record types.
pub const TYPE_DATA: u32 = 1;
pub const TYPE_PADDING: u32 = 2;

/// Sequence number stored in padding records (they have none).
pub const NO_SEQ: u64 = u64::MAX;

/// Overflow policies, as stored in the header.
pub const POLICY_OVERWRITE: u32 = 0;
pub const POLICY_BLOCK: u32 = 1;

/// The file header. Fields written by different parties sit on separate 64-byte cache
/// lines: line 0-1 are written once at creation, line 2 by the producer on every record,
/// line 3 by the producer lock, line 4 by the primary consumer, line 5 by sleeping
/// readers and the producer that wakes them.
#[repr(C)]
pub struct RawHeader {
    // -- line 0: identity, immutable after creation
    pub magic: [u8; 8],
    pub version: u32,
    pub header_size: u32,
    pub capacity: u64,
    pub data_offset: u64,
    pub schema_offset: u64,
    pub schema_size: u64,
    pub session_id: u64,
    pub policy: u32,
    pub record_align: u32,
    // -- line 1: immutable after creation
    pub created_ns: i64,
    pub _reserved1: [u64; 7],
    // -- line 2: producer, every record
    /// End of the last claimed record. Headers below it are initialised for this lap.
    pub write_pos: u64,
    /// End of the last committed record (`write_head` in the Python API).
    pub commit_pos: u64,
    /// Start of the oldest record that has not been reclaimed.
    pub oldest_pos: u64,
    /// Sequence number the next data record will get.
    pub next_seq: u64,
    /// Seqlock version over (`commit_pos`, `next_seq`): odd while they change.
    pub snap_version: u64,
    /// Data records overwritten before the primary consumer's `read_tail` reached them.
    pub records_lost: u64,
    /// Wall clock (ns since the epoch) of the producer's last commit or attach.
    pub heartbeat_ns: i64,
    pub _reserved2: u64,
    // -- line 3: producer lock, written on attach/detach and while blocked
    /// `pid | (start_time_ticks as u32) << 32` of the live producer, 0 if none.
    pub producer_lock: u64,
    pub _reserved3: [u64; 7],
    // -- line 4: primary consumer
    /// The primary consumer's durable position (record boundary).
    pub read_tail: u64,
    /// Sequence number of the first data record at or after `read_tail`.
    pub read_tail_seq: u64,
    /// Seqlock version over (`read_tail`, `read_tail_seq`).
    pub tail_version: u64,
    /// Futex word a blocked producer (policy "block") sleeps on: a counter the consumer
    /// bumps when it advances `read_tail`, with `WAITERS` set by a sleeper.
    pub tail_notify: u32,
    pub _reserved4a: u32,
    pub _reserved4: [u64; 4],
    // -- line 5: readers' futex word
    /// Futex word sleeping readers wait on: a counter the producer bumps after a commit
    /// when a reader has set `WAITERS`.
    pub data_notify: u32,
    pub _reserved5a: u32,
    pub _reserved5: [u64; 7],
}

/// Header offset of the per-stream counters: `u64 next_stream_seq[MAX_TRACKED_STREAMS]`,
/// written by the producer, indexed by stream id.
pub const STREAM_SEQ_OFFSET: u64 = 1024;
/// Streams with ids below this get per-stream sequence numbers.
pub const MAX_TRACKED_STREAMS: u32 = ((HEADER_SIZE - STREAM_SEQ_OFFSET) / 8) as u32;

/// Bit 31 of a futex word: somebody sleeps (or is about to) on it. The waker clears it
/// when it wakes them, so a sleeper killed in its sleep costs at most one extra wake.
pub const WAITERS: u32 = 1 << 31;

/// A record header, at the start of every record.
#[repr(C)]
pub struct RawRecordHeader {
    /// `COMMITTED | size`; busy (bit 63 clear) from claim until commit.
    pub commit: u64,
    pub rtype: u32,
    pub stream: u32,
    pub seq: u64,
    /// Absolute position of this record: tells a fresh record from a previous lap's.
    pub pos: u64,
    pub timestamp_ns: i64,
    pub payload_len: u64,
    pub schema_id: u32,
    pub flags: u32,
    /// Sequence number within the record's stream (`NO_SEQ` if the stream is not tracked):
    /// a reader counts per-stream losses from its gaps.
    pub stream_seq: u64,
}

/// Byte offsets of header fields, for code that reads the mapping.
pub mod off {
    use super::*;
    pub const MAGIC: usize = offset_of!(RawHeader, magic);
    pub const VERSION: usize = offset_of!(RawHeader, version);
    pub const HEADER_SIZE: usize = offset_of!(RawHeader, header_size);
    pub const CAPACITY: usize = offset_of!(RawHeader, capacity);
    pub const DATA_OFFSET: usize = offset_of!(RawHeader, data_offset);
    pub const SCHEMA_OFFSET: usize = offset_of!(RawHeader, schema_offset);
    pub const SCHEMA_SIZE: usize = offset_of!(RawHeader, schema_size);
    pub const SESSION_ID: usize = offset_of!(RawHeader, session_id);
    pub const POLICY: usize = offset_of!(RawHeader, policy);
    pub const RECORD_ALIGN: usize = offset_of!(RawHeader, record_align);
    pub const CREATED_NS: usize = offset_of!(RawHeader, created_ns);
    pub const WRITE_POS: usize = offset_of!(RawHeader, write_pos);
    pub const COMMIT_POS: usize = offset_of!(RawHeader, commit_pos);
    pub const OLDEST_POS: usize = offset_of!(RawHeader, oldest_pos);
    pub const NEXT_SEQ: usize = offset_of!(RawHeader, next_seq);
    pub const SNAP_VERSION: usize = offset_of!(RawHeader, snap_version);
    pub const RECORDS_LOST: usize = offset_of!(RawHeader, records_lost);
    pub const HEARTBEAT_NS: usize = offset_of!(RawHeader, heartbeat_ns);
    pub const PRODUCER_LOCK: usize = offset_of!(RawHeader, producer_lock);
    pub const READ_TAIL: usize = offset_of!(RawHeader, read_tail);
    pub const READ_TAIL_SEQ: usize = offset_of!(RawHeader, read_tail_seq);
    pub const TAIL_VERSION: usize = offset_of!(RawHeader, tail_version);
    pub const TAIL_NOTIFY: usize = offset_of!(RawHeader, tail_notify);
    pub const DATA_NOTIFY: usize = offset_of!(RawHeader, data_notify);

    pub const R_COMMIT: usize = offset_of!(RawRecordHeader, commit);
    pub const R_TYPE: usize = offset_of!(RawRecordHeader, rtype);
    pub const R_STREAM: usize = offset_of!(RawRecordHeader, stream);
    pub const R_SEQ: usize = offset_of!(RawRecordHeader, seq);
    pub const R_POS: usize = offset_of!(RawRecordHeader, pos);
    pub const R_TIMESTAMP: usize = offset_of!(RawRecordHeader, timestamp_ns);
    pub const R_PAYLOAD_LEN: usize = offset_of!(RawRecordHeader, payload_len);
    pub const R_SCHEMA_ID: usize = offset_of!(RawRecordHeader, schema_id);
    pub const R_FLAGS: usize = offset_of!(RawRecordHeader, flags);
    pub const R_STREAM_SEQ: usize = offset_of!(RawRecordHeader, stream_seq);
}

// The documented layout (docs/ring-format.md). Changing any of these is a new VERSION.
const _: () = {
    assert!(size_of::<RawHeader>() == 384);
    assert!(size_of::<RawHeader>() as u64 <= HEADER_SIZE);
    assert!(size_of::<RawRecordHeader>() as u64 == RECORD_HEADER_SIZE);
    assert!(off::CAPACITY == 16);
    assert!(off::POLICY == 56);
    assert!(off::CREATED_NS == 64);
    assert!(off::WRITE_POS == 128);
    assert!(off::COMMIT_POS == 136);
    assert!(off::OLDEST_POS == 144);
    assert!(off::NEXT_SEQ == 152);
    assert!(off::SNAP_VERSION == 160);
    assert!(off::RECORDS_LOST == 168);
    assert!(off::HEARTBEAT_NS == 176);
    assert!(off::PRODUCER_LOCK == 192);
    assert!(off::READ_TAIL == 256);
    assert!(off::READ_TAIL_SEQ == 264);
    assert!(off::TAIL_VERSION == 272);
    assert!(off::TAIL_NOTIFY == 280);
    assert!(off::DATA_NOTIFY == 320);
    assert!(off::R_TYPE == 8);
    assert!(off::R_STREAM == 12);
    assert!(off::R_SEQ == 16);
    assert!(off::R_POS == 24);
    assert!(off::R_TIMESTAMP == 32);
    assert!(off::R_PAYLOAD_LEN == 40);
    assert!(off::R_SCHEMA_ID == 48);
    assert!(off::R_FLAGS == 52);
    assert!(off::R_STREAM_SEQ == 56);
    assert!(STREAM_SEQ_OFFSET as usize >= size_of::<RawHeader>());
};

/// Rounds `n` up to a multiple of `RECORD_ALIGN`; `None` on overflow.
#[inline]
pub fn align_up(n: u64) -> Option<u64> {
    n.checked_add(RECORD_ALIGN - 1)
        .map(|v| v & !(RECORD_ALIGN - 1))
}

/// Total size of a record carrying `payload_len` bytes; `None` on overflow.
#[inline]
pub fn record_size(payload_len: u64) -> Option<u64> {
    align_up(payload_len)?.checked_add(RECORD_HEADER_SIZE)
}
