//! rust-daq's ring core: a cross-process ring buffer in a memory-mapped file, with one
//! producer, any number of readers in any process, lapping detection and exact loss
//! accounting. No Python types here: `rust/python` binds it.
//!
//! The byte layout is documented in `docs/ring-format.md` and defined in [`format`].

pub mod copy;
pub mod error;
pub mod format;
pub mod guard;
pub mod lock;
pub mod region;
pub mod ring;
pub mod schema;
pub mod wait;

pub use error::{Error, Result};
pub use ring::{
    Claim, ClaimResult, Next, Policy, Producer, Reader, RecordRef, Ring, Start, Status,
};
