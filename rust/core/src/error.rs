//! One error type for the core. The Python bindings map each variant to an exception
//! class (`python/rust_daq/_errors.py`); the messages are written for the user who reads
//! them there: what was wrong and what to do.

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
            Error::ReadOnly { what } => write!(
                f,
                "{what} needs the producer handle; this one is read-only \
                 (use RingBuffer.create(...) or RingBuffer.open(path, writable=True))"
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
                "another process (pid {pid}) is the producer of this ring; \
                 one producer per ring (open with writable=False to read)"
            ),
            Error::Full { needed, waited_s } => write!(
                f,
                "ring full (policy 'block'): waited {waited_s:.3} s for the consumer to free \
                 {needed} bytes; nothing was written (is a consumer committing its reads?)"
            ),
            Error::Closed => f.write_str("operation on a closed ring handle"),
            Error::Forked => f.write_str(
                "this producer handle was inherited across fork(); only the process that opened it \
                 may write (open the ring in this process, or start workers with the 'spawn' method)",
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
