//! The ring header as bytes: encoding a fresh one, and validating one read from a file
//! against the file's length. Pure functions on byte slices (no file, no mapping), so every
//! rejection is unit-tested here.

use std::path::Path;

use crate::error::{Error, Result};
use crate::format::{self, off};
use crate::region::Geometry;

/// The header of a new ring of geometry `g`: positions, counters and lock all zero.
pub fn header_bytes(g: &Geometry) -> Vec<u8> {
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
