"""The exceptions rust-daq raises. One hierarchy rooted at :class:`RustDaqError`; each
class also derives from the built-in exception whose meaning it shares, so ``except
ValueError`` or ``except TimeoutError`` code keeps working.

Operating-system failures (a missing directory, permission denied, no space) are raised
as the built-in :class:`OSError` subclasses (``FileNotFoundError``, ``PermissionError``...)
with the path in the message.
"""

from __future__ import annotations

__all__ = [
    "AccessError",
    "RecordingNameError",
    "ConfigError",
    "DaemonConfigError",
    "DocumentError",
    "IncompatibleFileError",
    "JetStreamError",
    "RemoteError",
    "ProducerActiveError",
    "ReadOnlyRingError",
    "RecordTooLargeError",
    "RingClosedError",
    "RingConfigError",
    "RingCorruptError",
    "RingFormatError",
    "RingFullError",
    "RingPermissionError",
    "SignalTypeError",
    "RingUsageError",
    "RustDaqError",
    "UnknownStreamError",
    "UnsupportedTypeError",
    "WriterProcessError",
]


class RustDaqError(Exception):
    """Base class of every error rust-daq raises on purpose."""


class RingFormatError(RustDaqError, ValueError):
    """The file is not a usable ring: wrong magic, unsupported layout version, truncated,
    or a header that contradicts itself or the file size."""


class RingCorruptError(RingFormatError):
    """Record data inside a ring is inconsistent (found while reading)."""


class RingConfigError(RustDaqError, ValueError):
    """An impossible ring configuration (capacity 0 or too large, unknown policy) or one
    that contradicts the existing ring at that path (capacity, policy)."""


class RecordTooLargeError(RustDaqError, ValueError):
    """A record does not fit in the ring; the message gives the largest that does."""


class ReadOnlyRingError(RustDaqError, PermissionError):
    """A write through a handle that is not the ring's producer."""


class RingPermissionError(ReadOnlyRingError):
    """A ring file this user must not produce into: owned by another user, open to group or
    other users (mode not 0600), or a symbolic link at the ring path. The message says which
    and what to do."""


class ProducerActiveError(RustDaqError, RuntimeError):
    """Another live process (or another handle in this one) is the ring's producer."""


class RingFullError(RustDaqError, TimeoutError):
    """``policy="block"``: the consumer did not free room before the timeout. Nothing of
    the record was written."""


class RingClosedError(RustDaqError, ValueError):
    """An operation on a closed ring handle."""


class RingUsageError(RustDaqError, ValueError):
    """A call that cannot be honoured in the ring's current state (advancing the tail past
    the data or into a record, committing a reservation that is not pending...)."""


class UnknownStreamError(RustDaqError, KeyError):
    """A stream name the ring has no schema for; the message lists the known streams."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnsupportedTypeError(RustDaqError, TypeError):
    """An Arrow type the ring does not carry (dictionary-encoded columns)."""


class SignalTypeError(UnsupportedTypeError):
    """An ophyd-async signal or device whose readings have no Arrow column (``describe()``
    gives a dtype or shape that no column type can hold: complex numbers, an empty array, a
    dimension of unknown length, external data...), or a reading that does not match what
    ``describe()`` said (another shape, a dtype that does not convert without loss). The
    message names the signal or data key, the dtype and shape, and why. Raised by
    :mod:`rust_daq.ophyd_async`, never a skipped or truncated value."""


class IncompatibleFileError(RustDaqError, ValueError):
    """The writer's output file exists but cannot be continued: another layout, another ring
    session, or not written by rust-daq."""


class ConfigError(RustDaqError, ValueError):
    """A configuration file that cannot be run; the message names the file, key and what is allowed."""


class DaemonConfigError(RustDaqError, ValueError):
    """The daemon cannot start as asked (address, token, TLS files)."""


class RemoteError(RustDaqError):
    """A call to the daemon failed: it refused the request (the message says why), it could
    not be reached, or it needs a token this client did not send. ``code`` is the daemon's
    error code (``"bad_request"``, ``"refused"``, ``"unauthenticated"``...; the list is in
    docs/distributed.md), None when the daemon sent none (not reached, an older daemon)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class AccessError(RustDaqError, OSError):
    """The daemon's token file cannot be written safely (directory not private, not ours)."""


class RecordingNameError(RustDaqError, ValueError):
    """A recording name or metadata from the wire that the daemon refuses; the message
    says what was wrong."""


class DocumentError(RustDaqError, ValueError):
    """A bluesky document that ``rust_daq.bluesky`` cannot write as it stands: an event value
    that contradicts its data key (another shape, a type that does not convert without
    loss), a data key with no Arrow type, an event of a descriptor (or a descriptor of a
    run) the callback has not seen, a file name template the start document cannot fill.
    The message names the document, the key and what was wrong."""


class WriterProcessError(RustDaqError, RuntimeError):
    """A writer process (``python -m rust_daq.writer``) that a caller relies on died, refused
    a command or did not answer in time; the message says which, with the end of its log."""


class JetStreamError(RustDaqError, ConnectionError):
    """A NATS JetStream server that ``rust_daq.nats`` cannot use as asked: the URL does not
    parse or holds credentials, the server cannot be reached, refuses the credentials, has
    no JetStream, or has no stream for the prefix; the message says which and what to do."""
