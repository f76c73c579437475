"""docs/ring-format.md is enough to read a ring: this reader is written from that page alone
(Python `struct` over a plain `mmap`, no rust_daq code), run against a live ring that wrapped
many times, and compared with the Rust reader record by record."""

from __future__ import annotations

import mmap
import random
import struct
from dataclasses import dataclass

from rust_daq import RingBuffer

from conftest import check_payload, make_payload

# Header fields, from the table in docs/ring-format.md.
MAGIC = b"RDAQRING"
HDR = struct.Struct("<8sIIQQQQQII")  # magic .. record_align, offsets 0..64
COMMITTED = 1 << 63
SIZE_MASK = (1 << 48) - 1
REC = struct.Struct(
    "<QIIQQqQIIQ"
)  # commit, type, stream, seq, pos, ts, payload_len, schema_id, flags, reserved
DATA, PADDING = 1, 2


def u64(m: mmap.mmap, off: int) -> int:
    return int(struct.unpack_from("<Q", m, off)[0])


@dataclass
class Rec:
    seq: int
    stream: int
    timestamp_ns: int
    position: int
    payload: bytes


class StructReader:
    """The reading rules of docs/ring-format.md, section "How to read"."""

    def __init__(self, path: str) -> None:
        self.f = open(path, "rb")
        self.m = mmap.mmap(self.f.fileno(), 0, prot=mmap.PROT_READ)
        (
            magic,
            version,
            header_size,
            capacity,
            data_offset,
            schema_offset,
            schema_size,
            _sid,
            policy,
            align,
        ) = HDR.unpack_from(self.m, 0)
        assert magic == MAGIC and version == 1 and header_size == 4096 and align == 64
        assert data_offset == schema_offset + schema_size == 4096 + schema_size
        assert len(self.m) == data_offset + capacity
        self.capacity, self.data, self.policy = capacity, data_offset, policy

    def close(self) -> None:
        self.m.close()
        self.f.close()

    @property
    def oldest(self) -> int:
        return u64(self.m, 144)

    def read_all(self, start: int) -> tuple[list[Rec], int]:
        """Reads from position `start` to the end; returns the records and the lost count."""
        r, out, lost, expected = start, [], 0, None
        while True:
            write_pos, oldest = u64(self.m, 128), u64(self.m, 144)
            if r < oldest:
                r = oldest
            if r >= write_pos:
                return out, lost
            at = self.data + r % self.capacity
            commit, rtype, stream, seq, pos, ts, plen, _schema, _flags, _ = REC.unpack_from(self.m, at)
            if self.oldest > r:
                continue
            size = commit & SIZE_MASK
            assert pos == r and size % 64 == 0 and size >= 64 and r % self.capacity + size <= self.capacity
            assert rtype in (DATA, PADDING)
            if not commit & COMMITTED:
                return out, lost
            if rtype == PADDING:
                r += size
                continue
            assert size == 64 + (plen + 63) // 64 * 64
            payload = bytes(self.m[at + 64 : at + 64 + plen])
            if self.oldest > r:
                continue  # torn copy: discard
            if expected is not None:
                lost += seq - expected
            expected = seq + 1
            out.append(Rec(seq, stream, ts, r, payload))
            r += size


def test_struct_reader_agrees_with_the_rust_reader(ring_path: str) -> None:
    rng = random.Random(11)
    with RingBuffer.create(ring_path, capacity_bytes=64 * 1024) as ring:
        n = 3000
        for i in range(n):  # ~20 laps of the data region, padding at every wrap
            ring.write(make_payload(i, rng.randrange(16, 1500)), stream=i % 3, timestamp_ns=10 * i)
        ours = ring.reader("oldest").read()
        theirs_reader = StructReader(ring_path)
        try:
            theirs, lost = theirs_reader.read_all(theirs_reader.oldest)
            assert lost == 0
            assert len(theirs) == len(ours) > 30
            for a, b in zip(theirs, ours, strict=True):
                assert (a.seq, a.stream, a.timestamp_ns, a.position) == (
                    b.seq,
                    b.stream,
                    b.timestamp_ns,
                    b.position,
                )
                assert a.payload == bytes(b.data)
                assert check_payload(a.payload) == a.seq
            assert theirs[-1].seq == n - 1
            # Header counters as the document defines them.
            m = theirs_reader.m
            assert u64(m, 152) == n  # next_seq
            assert u64(m, 136) == u64(m, 128) == ring.write_head  # commit_pos == write_pos
            assert u64(m, 168) == ring.records_lost == theirs[0].seq  # overwritten, nobody consumed
            assert theirs_reader.policy == 0
            assert struct.unpack_from("<Q", m, 192)[0] & 0xFFFFFFFF == ring.producer_pid
        finally:
            theirs_reader.close()


def test_struct_reader_sees_the_tail_as_documented(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=16 * 1024) as ring:
        for i in range(10):
            ring.write(make_payload(i, 200))
        primary = ring.reader()
        primary.read(max_records=4)
        primary.commit()
        sr = StructReader(ring_path)
        try:
            tail, tail_seq, version = struct.unpack_from("<QQQ", sr.m, 256)
            assert (tail, tail_seq) == (ring.read_tail, 4) and version % 2 == 0
            recs, _ = sr.read_all(tail)
            assert [r.seq for r in recs] == list(range(4, 10))
        finally:
            sr.close()


def test_schema_table_and_arrow_records_as_documented(ring_path: str) -> None:
    import pyarrow as pa

    with RingBuffer.create(ring_path, capacity_bytes=64 * 1024) as ring:
        v1 = pa.record_batch([pa.array([1, 2, 3])], names=["a"])
        v2 = pa.record_batch([pa.array([1.5]), pa.array(["x"])], names=["a", "b"])
        ring.write_arrow_batch(v1, "dmm")
        ring.write_arrow_batch(v2, "dmm")
        ring.write_arrow_batch(v1, "dmm")  # back to the first schema
        ring.write_arrow_batch(v2, "scope")
        sr = StructReader(ring_path)
        try:
            m, base = sr.m, 4096
            used, activations = struct.unpack_from("<QQ", m, base)
            entries, at = [], base + 64
            while at < base + 64 + used:
                size, schema_id, stream_id, name_len, schema_len, activation, _ns = struct.unpack_from(
                    "<IIIIQQq", m, at
                )
                name = bytes(m[at + 64 : at + 64 + name_len]).decode()
                s_at = at + 64 + (name_len + 63) // 64 * 64
                schema = pa.ipc.read_schema(pa.py_buffer(bytes(m[s_at : s_at + schema_len])))
                assert size == 64 + (name_len + 63) // 64 * 64 + (schema_len + 63) // 64 * 64
                entries.append((schema_id, stream_id, name, schema, activation))
                at += size
            assert [(e[0], e[1], e[2]) for e in entries] == [(1, 1, "dmm"), (2, 1, "dmm"), (3, 2, "scope")]
            current = {}
            for e in sorted(entries, key=lambda e: e[4]):
                current[e[2]] = e[3]
            assert current["dmm"].names == ["a"] and activations == max(e[4] for e in entries)
            by_id = {e[0]: e for e in entries}
            recs, _ = sr.read_all(sr.oldest)
            got = []
            for r in recs:
                at = sr.data + r.position
                schema_id = struct.unpack_from("<I", m, at + 48)[0]
                batch = pa.ipc.read_record_batch(pa.py_buffer(r.payload), by_id[schema_id][3])
                got.append((by_id[schema_id][2], batch))
            assert [(n, b.equals(x)) for (n, b), x in zip(got, [v1, v2, v1, v2], strict=True)] == [
                ("dmm", True),
                ("dmm", True),
                ("dmm", True),
                ("scope", True),
            ]
        finally:
            sr.close()


def test_padding_in_the_middle_keeps_its_claims_fields_as_documented(ring_path: str) -> None:
    """Aborted claims (and one per Arrow schema activation) become padding that keeps the
    claim's payload_len, stream and stream_seq; end-of-lap padding has zeros there."""
    import pyarrow as pa

    no_seq = 2**64 - 1
    with RingBuffer.create(ring_path, capacity_bytes=64 * 1024) as ring:
        ring.write(b"a" * 10, stream=5)
        ring.reserve(100, stream=5).abort()
        ring.write(b"b" * 10, stream=5)  # reuses the aborted claim's numbers
        ring.write_arrow_batch(pa.record_batch([pa.array([1, 2, 3])], names=["a"]), "dmm")
        sr = StructReader(ring_path)
        try:
            m, headers, r = sr.m, [], 0
            while r < u64(m, 128):  # no wrap yet: walk every record from position 0
                headers.append(REC.unpack_from(m, sr.data + r))
                r += headers[-1][0] & SIZE_MASK
            kinds = [(h[1], h[2], h[3], h[6] != 0, h[9]) for h in headers]  # type stream seq len>0 sseq
            assert kinds == [
                (DATA, 5, 0, True, 0),
                (PADDING, 5, no_seq, True, 1),  # the aborted claim: real stream_seq, payload_len 100
                (DATA, 5, 1, True, 1),
                (PADDING, 0, no_seq, True, 0),  # the schema message of the activation
                (DATA, 1, 2, True, 0),  # the Arrow stream got id 1 (5 is taken by plain records)
            ]
            assert headers[1][6] == 100 and headers[1][0] & SIZE_MASK == 64 + 128
            # next_stream_seq (offset 1024 + 8k): the number the stream's next record gets.
            assert [u64(m, 1024 + 8 * k) for k in (0, 1, 5)] == [0, 1, 2]
            # End-of-lap padding: zeros where middle padding keeps its claim's fields.
            ring.write_many([b"x" * 1000] * 200, stream=5)
            r, tail_pad = u64(m, 144), None
            while r < u64(m, 128) and tail_pad is None:
                h = REC.unpack_from(m, sr.data + r % sr.capacity)
                if h[1] == PADDING and r % sr.capacity + (h[0] & SIZE_MASK) == sr.capacity:
                    tail_pad = h
                r += h[0] & SIZE_MASK
            assert tail_pad is not None
            stream, seq, plen, schema_id, sseq = (tail_pad[i] for i in (2, 3, 6, 7, 9))
            assert (stream, seq, plen, schema_id, sseq) == (0, no_seq, 0, 0, no_seq)
        finally:
            sr.close()


def test_a_ring_recreated_at_the_same_path_has_a_new_session_id(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=16 * 1024) as ring:
        ring.write(b"old")
        first = ring.session_id
    old = StructReader(ring_path)
    try:
        assert u64(old.m, 48) == first
        with RingBuffer.create(ring_path, capacity_bytes=32 * 1024, replace=True) as ring:
            ring.write(b"new")
            assert ring.session_id != first
            new = StructReader(ring_path)
            try:
                assert u64(new.m, 48) == ring.session_id != u64(old.m, 48) == first
                # The old mapping is the old file: it never sees the new ring's records.
                assert [r.payload for r in old.read_all(old.oldest)[0]] == [b"old"]
                assert [r.payload for r in new.read_all(new.oldest)[0]] == [b"new"]
            finally:
                new.close()
        # Reattaching with the same geometry keeps the ring and its id.
        with RingBuffer.create(ring_path, capacity_bytes=32 * 1024) as ring:
            assert ring.session_id != first and ring.records_written == 1
    finally:
        old.close()
