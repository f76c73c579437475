//! rust-daq's ring core: a cross-process ring buffer in a memory-mapped file, with one
//! producer, any number of readers in any process, lapping detection and exact loss
//! accounting. No Python types here: `rust/python` binds it.
//!
//! The byte layout is documented in `docs/ring-format.md` and defined in [`format`], the one
//! public module; everything else is internal and re-exported here as far as it is API.
//!
//! One role per module: `ring` (shared state, header positions, record-header rules),
//! `producer`, `reader`, `tail` (the primary consumer's `read_tail` and snapshots), `wait`
//! (futex sleeping), `file` (creating, opening and checking the ring file), `header`
//! (encoding and validating its header bytes), `region` (its mapping and typed field
//! access), `schema` (the schema table), `lock` (the producer lock), `guard` (SIGBUS
//! protection), `copy` (copies into and out of the mapping), `rows` (the rows-before table
//! a producer shares with readers in other processes).

pub(crate) mod copy;
pub(crate) mod error;
pub(crate) mod file;
pub mod format;
pub(crate) mod guard;
pub(crate) mod header;
pub(crate) mod lock;
pub(crate) mod producer;
pub(crate) mod reader;
pub(crate) mod region;
pub(crate) mod ring;
pub(crate) mod rows;
pub(crate) mod schema;
pub(crate) mod tail;
pub(crate) mod wait;

pub use error::{Error, Result};
pub use guard::Guard;
pub use producer::{Claim, ClaimResult, Producer, HOT_WRAP_DEFAULT};
pub use reader::{Next, Reader, RecordRef};
pub use region::{now_ns, Geometry, Region};
pub use ring::{Policy, Ring, Start, Status};
pub use rows::{RowTable, MAX_ROW_SLOTS};
pub use schema::SchemaEntry;
pub use wait::WaitStrategy;
