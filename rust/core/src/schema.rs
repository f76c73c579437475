//! The schema table: an append-only list in the schema region (after the header page),
//! which data never overwrites. Each entry names a stream and holds an opaque schema
//! (Arrow IPC schema bytes, for the Python layer); records refer to it by `schema_id`.
//!
//! Region layout (docs/ring-format.md, "Schema region"): a 64-byte table header
//! (`used: u64` bytes of entries, published with release order; `activations: u64`, a
//! counter), then 64-aligned entries: a 64-byte entry header (`size: u32`, `schema_id: u32`,
//! `stream_id: u32`, `name_len: u32`, `schema_len: u64`, `activation: u64`,
//! `registered_ns: i64`), the UTF-8 name padded to 64 bytes, the schema bytes padded to 64.
//!
//! A stream's current schema is its entry with the highest `activation`: the producer sets
//! it from the counter when it registers a schema and again when it switches a stream back
//! to a schema registered earlier.

use std::sync::atomic::Ordering;

use crate::copy;
use crate::error::{Error, Result};
use crate::format;
use crate::region::{now_ns, Region};

const TABLE_HEADER: u64 = 64;
const ENTRY_HEADER: u64 = 64;

/// One registered schema.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchemaEntry {
    pub schema_id: u32,
    pub stream_id: u32,
    pub name: String,
    pub schema: Vec<u8>,
    /// When the producer last switched the stream to this schema (a table-wide counter).
    pub activation: u64,
    pub registered_ns: i64,
}

fn pad(n: u64) -> u64 {
    format::align_up(n).expect("small")
}

/// Reads every published entry. Entries below `used` are immutable once published.
pub fn list(region: &Region) -> Result<Vec<SchemaEntry>> {
    list_from(region, 1)
}

/// Reads the published entries from `first_id` on (a reader's new ones: the table only
/// grows; earlier entries are stepped over by their headers, not copied). Each entry's
/// activation is read now.
pub fn list_from(region: &Region, first_id: u32) -> Result<Vec<SchemaEntry>> {
    let out = list_inner(region, first_id);
    // Read from zero pages (the file was truncated under the mapping): say so instead.
    region.check_tripped()?;
    out
}

/// The activation of every published entry, by `schema_id - 1` (which schema is each
/// stream's current one), without copying names or schemas.
pub fn activations(region: &Region) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    walk(region, |at, _| {
        out.push(region.a64_schema(at + 24).load(Ordering::Acquire));
        Ok(())
    })?;
    region.check_tripped()?;
    Ok(out)
}

/// Calls `f(offset, header)` for every published entry, in order, after checking its header.
fn walk(
    region: &Region,
    mut f: impl FnMut(u64, &[u8; ENTRY_HEADER as usize]) -> Result<()>,
) -> Result<()> {
    let size = region.geometry().schema_size;
    if size < TABLE_HEADER {
        return Ok(());
    }
    let base = region.schema_ptr();
    let used = region.h64_schema(0).load(Ordering::Acquire);
    if used > size - TABLE_HEADER {
        return Err(Error::corrupt(format!(
            "schema table claims {used} bytes, the region has {size}"
        )));
    }
    let mut at = TABLE_HEADER;
    while at < TABLE_HEADER + used {
        let mut hdr = [0u8; ENTRY_HEADER as usize];
        // SAFETY: at + 64 <= TABLE_HEADER + used <= size: inside the schema region, 64-aligned.
        unsafe { copy::from_ring(hdr.as_mut_ptr(), base.add(at as usize), hdr.len()) };
        let u32_at = |o: usize| u32::from_le_bytes(hdr[o..o + 4].try_into().expect("4"));
        let u64_at = |o: usize| u64::from_le_bytes(hdr[o..o + 8].try_into().expect("8"));
        let (entry, name_len, schema_len) = (u32_at(0) as u64, u32_at(12) as u64, u64_at(16));
        let fits = name_len <= 4096
            && schema_len <= size
            && entry == ENTRY_HEADER + pad(name_len) + pad(schema_len)
            && at + entry <= TABLE_HEADER + used;
        if !fits {
            return Err(Error::corrupt(format!(
                "schema table entry at {at} is invalid (size {entry}, name {name_len} bytes, schema {schema_len} bytes)"
            )));
        }
        f(at, &hdr)?;
        at += entry;
    }
    Ok(())
}

fn list_inner(region: &Region, first_id: u32) -> Result<Vec<SchemaEntry>> {
    let base = region.schema_ptr();
    let mut out = Vec::new();
    walk(region, |at, hdr| {
        let u32_at = |o: usize| u32::from_le_bytes(hdr[o..o + 4].try_into().expect("4"));
        let u64_at = |o: usize| u64::from_le_bytes(hdr[o..o + 8].try_into().expect("8"));
        let (schema_id, stream_id, name_len, schema_len) =
            (u32_at(4), u32_at(8), u32_at(12) as u64, u64_at(16));
        if schema_id < first_id {
            return Ok(());
        }
        let mut name = vec![0u8; name_len as usize];
        let mut schema = vec![0u8; schema_len as usize];
        // SAFETY: both ranges lie inside the entry, checked by walk; the source is 64-aligned.
        unsafe {
            copy::from_ring(
                name.as_mut_ptr(),
                base.add((at + ENTRY_HEADER) as usize),
                name.len(),
            );
            copy::from_ring(
                schema.as_mut_ptr(),
                base.add((at + ENTRY_HEADER + pad(name_len)) as usize),
                schema.len(),
            );
        }
        let name = String::from_utf8(name)
            .map_err(|_| Error::corrupt(format!("schema entry at {at}: name is not UTF-8")))?;
        // The activation word is the only field that changes after publication: reread it
        // atomically rather than from the copy.
        let activation = region.a64_schema(at + 24).load(Ordering::Acquire);
        out.push(SchemaEntry {
            schema_id,
            stream_id,
            name,
            schema,
            activation,
            registered_ns: u64_at(32) as i64,
        });
        Ok(())
    })?;
    Ok(out)
}

/// Registers `schema` for stream `name` (producer only) and returns its entry: an identical
/// (name, schema) pair already in the table is reused; a new schema for a known stream gets
/// a new `schema_id` and keeps the stream's id. `table` is the producer's copy of the table
/// (`StreamIds`, loaded once: only the producer writes the table), so a registration costs
/// the same with 10 streams as with 10,000; it was a walk over every entry, and a ring's
/// first 10,000 streams took minutes.
///
/// `taken(id)`: whether stream id `id` is already used by plain records; a new stream skips
/// such ids.
pub(crate) fn register(
    region: &Region,
    table: &mut StreamIds,
    name: &str,
    schema: &[u8],
    taken: impl Fn(u32) -> bool,
) -> Result<SchemaEntry> {
    if name.is_empty() || name.len() > 4096 {
        return Err(Error::invalid(format!(
            "stream names are 1 to 4096 bytes of UTF-8, got {} bytes",
            name.len()
        )));
    }
    let activation = region.h64_schema(8).load(Ordering::Relaxed) + 1;
    if let Some(ids) = table.by_name.get(name) {
        if let Some(&i) = ids.iter().find(|&&i| table.entries[i].schema == schema) {
            let e = &table.entries[i];
            let current = ids
                .iter()
                .map(|&j| &table.entries[j])
                .max_by_key(|o| region.a64_schema(o.offset + 24).load(Ordering::Acquire));
            let entry = SchemaEntry {
                schema_id: e.schema_id,
                stream_id: e.stream_id,
                name: name.to_string(),
                schema: schema.to_vec(),
                activation: region.a64_schema(e.offset + 24).load(Ordering::Acquire),
                registered_ns: e.registered_ns,
            };
            if current.map(|c| c.schema_id) != Some(e.schema_id) {
                region.h64_schema(8).store(activation, Ordering::Relaxed);
                region
                    .a64_schema(e.offset + 24)
                    .store(activation, Ordering::Release);
                return Ok(SchemaEntry {
                    activation,
                    ..entry
                });
            }
            return Ok(entry);
        }
    }
    let stream_id = table
        .by_name
        .get(name)
        .map(|ids| table.entries[ids[0]].stream_id)
        .unwrap_or_else(|| {
            let mut id = table.max_stream + 1;
            // Bounded: ids only grow, and `taken` is false from MAX_TRACKED_STREAMS on.
            while id < u32::MAX && taken(id) {
                id += 1;
            }
            id
        });
    let schema_id = table.entries.len() as u32 + 1;
    let size = region.geometry().schema_size;
    let used = region.h64_schema(0).load(Ordering::Acquire);
    let entry = ENTRY_HEADER + pad(name.len() as u64) + pad(schema.len() as u64);
    if TABLE_HEADER + used + entry > size {
        return Err(Error::SchemaFull {
            size,
            schemas: table.entries.len(),
            schema_len: schema.len(),
            stream: name.to_string(),
        });
    }
    let at = TABLE_HEADER + used;
    let mut hdr = [0u8; ENTRY_HEADER as usize];
    hdr[0..4].copy_from_slice(&(entry as u32).to_le_bytes());
    hdr[4..8].copy_from_slice(&schema_id.to_le_bytes());
    hdr[8..12].copy_from_slice(&stream_id.to_le_bytes());
    hdr[12..16].copy_from_slice(&(name.len() as u32).to_le_bytes());
    hdr[16..24].copy_from_slice(&(schema.len() as u64).to_le_bytes());
    hdr[24..32].copy_from_slice(&activation.to_le_bytes());
    let now = now_ns();
    hdr[32..40].copy_from_slice(&now.to_le_bytes());
    let base = region.schema_ptr();
    // SAFETY: [at, at + entry) lies inside the schema region (checked above), beyond `used`,
    // so no reader looks at it until `used` is published below. 64-aligned destinations.
    unsafe {
        copy::to_ring(base.add(at as usize), hdr.as_ptr(), hdr.len());
        copy::to_ring(
            base.add((at + ENTRY_HEADER) as usize),
            name.as_ptr(),
            name.len(),
        );
        copy::to_ring(
            base.add((at + ENTRY_HEADER + pad(name.len() as u64)) as usize),
            schema.as_ptr(),
            schema.len(),
        );
    }
    region.h64_schema(8).store(activation, Ordering::Relaxed);
    region.h64_schema(0).store(used + entry, Ordering::Release);
    let e = SchemaEntry {
        schema_id,
        stream_id,
        name: name.to_string(),
        schema: schema.to_vec(),
        activation,
        registered_ns: now,
    };
    table.add_at(&e, at);
    Ok(e)
}

/// The schema table's stream ids, as the producer needs them to keep plain records out of
/// Arrow streams (whose per-stream sequence numbers must count only their own records).
#[derive(Default)]
pub(crate) struct StreamIds {
    /// `stream_of[schema_id]`: the stream id of each registered schema (0: none).
    stream_of: Vec<u32>,
    /// Stream id -> stream name, for every Arrow stream.
    names: std::collections::BTreeMap<u32, String>,
    /// Every entry, by `schema_id - 1`, with its offset in the region.
    entries: Vec<Cached>,
    /// Stream name -> indices into `entries`.
    by_name: std::collections::HashMap<String, Vec<usize>>,
    max_stream: u32,
}

/// The producer's copy of one entry (the activation word is read from the region: it is the
/// one field that changes).
struct Cached {
    schema_id: u32,
    stream_id: u32,
    schema: Vec<u8>,
    registered_ns: i64,
    offset: u64,
}

impl StreamIds {
    pub(crate) fn load(region: &Region) -> Result<StreamIds> {
        let mut ids = StreamIds::default();
        let mut at = TABLE_HEADER;
        for e in list(region)? {
            ids.add_at(&e, at);
            at += ENTRY_HEADER + pad(e.name.len() as u64) + pad(e.schema.len() as u64);
        }
        Ok(ids)
    }

    fn add_at(&mut self, e: &SchemaEntry, offset: u64) {
        let i = e.schema_id as usize;
        if self.stream_of.len() <= i {
            self.stream_of.resize(i + 1, 0);
        }
        self.stream_of[i] = e.stream_id;
        self.names.insert(e.stream_id, e.name.clone());
        self.by_name
            .entry(e.name.clone())
            .or_default()
            .push(self.entries.len());
        self.entries.push(Cached {
            schema_id: e.schema_id,
            stream_id: e.stream_id,
            schema: e.schema.clone(),
            registered_ns: e.registered_ns,
            offset,
        });
        self.max_stream = self.max_stream.max(e.stream_id);
    }

    /// Refuses a plain record (`schema_id` 0) on an Arrow stream's id, and an Arrow record
    /// on another id than its schema's.
    pub(crate) fn check(&self, stream: u32, schema_id: u32) -> Result<()> {
        if schema_id == 0 {
            if let Some(name) = self.names.get(&stream) {
                return Err(Error::StreamIdTaken {
                    stream,
                    name: name.clone(),
                });
            }
            return Ok(());
        }
        match self.stream_of.get(schema_id as usize).copied() {
            Some(owner) if owner != 0 && owner == stream => Ok(()),
            Some(owner) if owner != 0 => Err(Error::invalid(format!(
                "schema id {schema_id} belongs to stream id {owner}, not {stream}"
            ))),
            _ => Err(Error::invalid(format!(
                "schema id {schema_id} is not registered in this ring's schema table"
            ))),
        }
    }
}
