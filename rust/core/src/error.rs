//! One error type for the core. The messages say what was wrong and what to do in terms of
//! the ring itself, never in a binding's terms (no parameter, method or class names of the
//! Python API): a binding maps each variant to its own error type and adds its own advice
//! where the variant calls for it (the Python one in `rust/python/src/errors.rs`). Variants
//! that carry such advice (`Mismatch`, `SchemaFull`, `StreamIdTaken`, `ReadOnly`,
//! `ProducerActive`, `Forked`) carry their facts as fields rather than as finished text.

use std::fmt;
use std::io;
use std::path::PathBuf;

#[derive(Debug)]
pub enum Error {
    /// An OS call failed on `path` (missing directory, permission denied, no space...).
    Io {
        what: String,
        path: PathBuf,
        source: io::Error,
    },
    /// The file is not a ring, is of another layout version, is truncated, or its
    /// header contradicts itself.
    Format { path: PathBuf, detail: String },
    /// Record data in the ring is inconsistent (found while reading).
    Corrupt { detail: String },
    /// A requested configuration is impossible or contradicts the existing ring.
    Config { detail: String },
    /// Creating a ring where one of another capacity or policy exists (and replacing it
    /// was not asked for).
    Mismatch {
        path: PathBuf,
        capacity: u64,
        policy: &'static str,
        asked_capacity: u64,
        asked_policy: &'static str,
    },
    /// The schema table has no room for another schema (it is append-only).
    SchemaFull {
        size: u64,
        schemas: usize,
        schema_len: usize,
        stream: String,
    },
    /// A plain record on a stream id that an Arrow stream owns.
    StreamIdTaken { stream: u32, name: String },
    /// A record does not fit in the ring.
    TooLarge { payload: u64, max_payload: u64 },
    /// A write through a handle that is not the producer.
    ReadOnly { what: &'static str },
    /// Another live process (or handle) is the producer.
    ProducerActive { pid: u32, this_process: bool },
    /// `policy="block"`: the consumer did not make room in time.
    Full { needed: u64, waited_s: f64 },
    /// The handle was closed.
    Closed,
    /// A producer handle used in a fork() child of the process that opened it.
    Forked,
    /// A ring file the caller must not trust: not its own, open to other users, or a
    /// symlink where a ring file should be.
    Untrusted { path: PathBuf, detail: String },
    /// An argument the caller passed is wrong (e.g. `advance_tail` past the data).
    Invalid { detail: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(what: impl Into<String>, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            path: path.into(),
            source,
        }
    }
    pub(crate) fn format(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            detail: detail.into(),
        }
    }
    pub(crate) fn corrupt(detail: impl Into<String>) -> Self {
        Error::Corrupt {
            detail: detail.into(),
        }
    }
    pub(crate) fn config(detail: impl Into<String>) -> Self {
        Error::Config {
            detail: detail.into(),
        }
    }
    pub(crate) fn invalid(detail: impl Into<String>) -> Self {
        Error::Invalid {
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { what, path, source } => {
                write!(f, "{what} {}: {source}", path.display())?;
                match source.kind() {
                    io::ErrorKind::NotFound => write!(f, " (does the directory exist?)"),
                    io::ErrorKind::PermissionDenied => {
                        write!(f, " (ring files are created with mode 0600 by their owner)")
                    }
                    _ => Ok(()),
                }
            }
            Error::Format { path, detail } | Error::Untrusted { path, detail } => {
                write!(f, "{}: {detail}", path.display())
            }
            Error::Corrupt { detail } => write!(f, "ring data is corrupt: {detail}"),
            Error::Config { detail } | Error::Invalid { detail } => f.write_str(detail),
            Error::TooLarge {
                payload,
                max_payload,
            } => write!(
                f,
                "record of {payload} bytes does not fit in this ring (at most {max_payload} \
                 payload bytes); create the ring with a larger capacity"
            ),
            Error::Mismatch {
                path,
                capacity,
                policy,
                asked_capacity,
                asked_policy,
            } => write!(
                f,
                "a ring with capacity {capacity} bytes and policy {policy:?} exists at {}; asked for \
                 {asked_capacity} bytes and policy {asked_policy:?}",
                path.display()
            ),
            Error::SchemaFull {
                size,
                schemas,
                schema_len,
                stream,
            } => write!(
                f,
                "the ring's schema region is full ({size} bytes, {schemas} schemas): cannot register a \
                 {schema_len}-byte schema for stream {stream:?}; recreate the ring with a larger schema \
                 region (RingBuffer.create(..., schema_mb=..., replace=True); [ring] schema_mb)"
            ),
            Error::StreamIdTaken { stream, name } => write!(
                f,
                "stream id {stream} belongs to the Arrow stream {name:?}: plain records cannot use it \
                 (they would break that stream's sequence numbers); use a stream id no Arrow stream has"
            ),
            Error::ReadOnly { what } => write!(
                f,
                "{what} needs the producer handle; this one is read-only"
            ),
            Error::ProducerActive {
                pid,
                this_process: true,
            } => write!(
                f,
                "this process (pid {pid}) already has a producer handle on this ring; \
                 close it first (one producer per ring)"
            ),
            Error::ProducerActive {
                pid,
                this_process: false,
            } => write!(
                f,
                "another process (pid {pid}) is the producer of this ring; one producer per ring"
            ),
            Error::Full { needed, waited_s } => write!(
                f,
                "ring full (policy 'block'): waited {waited_s:.3} s for the consumer to free \
                 {needed} bytes; nothing was written (is a consumer committing its reads?)"
            ),
            Error::Closed => f.write_str("operation on a closed ring handle"),
            Error::Forked => f.write_str(
                "this producer handle was inherited across fork(); only the process that opened it \
                 may write: open the ring in the process that writes",
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
