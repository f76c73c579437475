"""Payloads that carry their own index and a CRC32 of the rest, so a reader can tell a
torn, corrupted or reordered record from a good one."""

from __future__ import annotations

import struct
import zlib

HEADER = struct.Struct("<QI")  # index, crc32 of the body
MIN_SIZE = HEADER.size


def make_payload(index: int, size: int) -> bytes:
    size = max(size, MIN_SIZE)
    body = bytes((index * 31 + i * 7) & 0xFF for i in range(min(size - MIN_SIZE, 64)))
    body = (body * ((size - MIN_SIZE) // max(len(body), 1) + 1))[: size - MIN_SIZE]
    return HEADER.pack(index, zlib.crc32(body)) + body


def check_payload(data: bytes | memoryview) -> int:
    """Returns the payload's index; raises AssertionError if it is corrupt."""
    index, crc = HEADER.unpack_from(data, 0)
    body = bytes(data[MIN_SIZE:])
    assert zlib.crc32(body) == crc, f"record {index}: CRC mismatch ({len(data)} bytes)"
    return int(index)
