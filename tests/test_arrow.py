"""Arrow record streams through the ring: exact round trips, schemas stored in the file,
interleaved streams, schema changes, zero-copy reads, PyCapsule interop, bad input."""

from __future__ import annotations

import datetime as dt
import decimal
import gc
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import rust_daq
from rust_daq import (
    LiveView,
    RecordTooLargeError,
    RingBuffer,
    RingConfigError,
    UnknownStreamError,
    UnsupportedTypeError,
)

DATA = 4096 + 256 * 1024  # data region offset in the file (docs/ring-format.md)


def voltmeter(i: int, rows: int = 1000) -> pa.RecordBatch:
    """A batch whose values are a function of its index i (so a reader can verify it)."""
    t = np.arange(i * rows, (i + 1) * rows, dtype=np.int64)
    schema = pa.schema(
        [
            pa.field("timestamp", pa.int64(), metadata={"units": "ns"}),
            pa.field("voltage", pa.float64(), metadata={"units": "V"}),
        ]
    )
    return pa.record_batch([t, np.sin(t / 100.0)], schema=schema)


def frames(n: int, h: int = 32, w: int = 48, start: int = 0) -> pa.RecordBatch:
    stack = (np.arange(n * h * w, dtype=np.uint64).reshape(n, h, w) + start).astype(np.uint16)
    tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(stack)
    return pa.record_batch([pa.array(np.arange(start, start + n)), tensor], names=["frame_id", "frame"])


def every_type() -> pa.RecordBatch:
    n = 5
    cols = {
        "i8": pa.array([-128, 0, 1, 127, None], pa.int8()),
        "i16": pa.array([-(2**15), 0, 1, 2**15 - 1, 7], pa.int16()),
        "i32": pa.array([-(2**31), 0, None, 2**31 - 1, 7], pa.int32()),
        "i64": pa.array([-(2**63), 0, 1, 2**63 - 1, None], pa.int64()),
        "u8": pa.array([0, 1, 2, 255, 9], pa.uint8()),
        "u64": pa.array([0, 1, 2, 2**64 - 1, 9], pa.uint64()),
        "f16": pa.array(np.array([0.5, -1, 2, np.inf, 3], dtype=np.float16)),
        "f32": pa.array([0.5, -1.25, None, float("inf"), 3.0], pa.float32()),
        "f64": pa.array([0.1, -1e300, float("nan"), 5e-324, None], pa.float64()),
        "bool": pa.array([True, False, None, True, False]),
        "str": pa.array(["", "volt", "ünïcödé", None, "x" * 1000]),
        "large_str": pa.array(["a", "b", "c", "d", "e"], pa.large_string()),
        "bin": pa.array([b"", b"\x00\xff", None, b"abc", b"z"], pa.binary()),
        "ts": pa.array([0, 1, 2**62, None, -5], pa.timestamp("ns", tz="UTC")),
        "ts_us": pa.array([dt.datetime(2026, 11, 23, 12, 0, i) for i in range(n)], pa.timestamp("us")),
        "date": pa.array([dt.date(2026, 1, i + 1) for i in range(n)]),
        "duration": pa.array([0, 1, -1, 10**12, None], pa.duration("ns")),
        "decimal": pa.array(
            [decimal.Decimal("1.23"), None, decimal.Decimal("-9.99"), 0, 1], pa.decimal128(5, 2)
        ),
        "list": pa.array([[1, 2], [], None, [3], [4, 5, 6]], pa.list_(pa.int32())),
        "large_list": pa.array([[1.0], [2.0, 3.0], [], None, [4.0]], pa.large_list(pa.float64())),
        "fixed_list": pa.array([[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]], pa.list_(pa.int16(), 2)),
        "struct": pa.array([{"x": i, "y": str(i)} for i in range(n)]),
        "map": pa.array(
            [[("a", 1)], [], None, [("b", 2), ("c", 3)], [("d", 4)]], pa.map_(pa.string(), pa.int64())
        ),
        "tensor": pa.FixedShapeTensorArray.from_numpy_ndarray(
            np.arange(n * 6, dtype=np.float32).reshape(n, 2, 3)
        ),
        "null": pa.nulls(n),
    }
    return pa.record_batch(list(cols.values()), names=list(cols.keys()))


def test_every_supported_type_round_trips_exactly(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        batch = every_type()
        reader = ring.reader()
        assert ring.write_arrow_batch(batch, "all") == 0
        ((name, got),) = reader.read_batches()
        assert name == "all"
        assert got.schema.equals(batch.schema, check_metadata=True)
        for col in batch.schema.names:
            if col != "f64":  # NaN != NaN for Arrow's equals: compared bit for bit below
                assert got.column(col).equals(batch.column(col)), col
        f64_got, f64_sent = got.column("f64"), batch.column("f64")
        assert f64_got.is_null().to_pylist() == f64_sent.is_null().to_pylist()
        bits = [np.frombuffer(a.buffers()[1], np.uint64)[:5] for a in (f64_got, f64_sent)]
        np.testing.assert_array_equal(bits[0][:4], bits[1][:4])


def test_field_metadata_and_units_travel(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        b = voltmeter(0).replace_schema_metadata({"instrument": "DMM 34465A"})
        ring.write_arrow_batch(b, "voltmeter")
        schema = ring.streams()["voltmeter"]
        assert schema.field("voltage").metadata == {b"units": b"V"}
        assert schema.metadata == {b"instrument": b"DMM 34465A"}
        ((_, got),) = ring.reader().read_batches()
        assert got.schema.field("timestamp").metadata == {b"units": b"ns"}


def test_tables_write_one_record_per_batch_and_schemas_are_stored_once(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=4) as ring:
        table = pa.Table.from_batches([voltmeter(i, 100) for i in range(7)])
        assert ring.write_arrow_batch(table, "v") == 6
        assert len(ring._schemas()) == 1, "one schema entry for seven records"
        got = ring.reader().read_table("v")
        assert got.equals(table)
        # The records are bare record-batch messages: no schema message in the payload.
        (rec, *_) = ring.reader().read()
        assert len(rec.data) == pa.ipc.get_record_batch_size(table.to_batches()[0])


def test_two_interleaved_streams_many_laps_late_reader_decodes_everything(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=512 * 1024) as ring:
        for i in range(400):  # ~7 laps of the data region
            ring.write_arrow_batch(voltmeter(i, 500), "voltmeter")
            if i % 4 == 0:
                ring.write_arrow_batch(frames(2, start=i), "camera")
        assert ring.write_head > 5 * ring.capacity
        late = ring.reader("oldest")  # attaches long after both schemas were registered
        got = late.read_batches()
        assert {name for name, _ in got} == {"voltmeter", "camera"}
        seen_v = []
        for name, batch in got:
            if name == "voltmeter":
                i = batch.column("timestamp")[0].as_py() // 500
                assert batch.equals(voltmeter(i, 500))
                seen_v.append(i)
            else:
                start = batch.column("frame_id")[0].as_py()
                assert batch.equals(frames(2, start=start))
        assert seen_v == list(range(seen_v[0], 400))
        assert late.undecodable == 0 and late.not_arrow == 0
        assert [r.stream for r in ring.reader("oldest").read()][:2] != []
        assert ring.streams().keys() == {"voltmeter", "camera"}


def test_schema_change_mid_run(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        reader = ring.reader()
        ring.write_arrow_batch(voltmeter(0, 10), "dmm")
        v2 = pa.record_batch(
            [pa.array(np.arange(10, dtype=np.int64)), pa.array(np.ones(10)), pa.array(["ok"] * 10)],
            names=["timestamp", "voltage", "status"],
        )
        ring.write_arrow_batch(v2, "dmm")
        ring.write_arrow_batch(voltmeter(1, 10), "dmm")  # back to the first schema: id reused
        recs = ring.reader().read()
        assert [r.schema_id for r in recs] == [1, 2, 1]
        assert len({r.stream for r in recs}) == 1
        assert ring.streams()["dmm"].names == ["timestamp", "voltage"]
        got = reader.read_batches()
        assert [b.schema.names for _, b in got] == [
            ["timestamp", "voltage"],
            ["timestamp", "voltage", "status"],
            ["timestamp", "voltage"],
        ]
        table = ring.reader().read_table("dmm")
        assert table.num_rows == 30
        assert table.column("status").to_pylist() == [None] * 10 + ["ok"] * 10 + [None] * 10


def test_zero_copy_batches_point_into_the_mapping(ring_path: str) -> None:
    ring = RingBuffer.create(ring_path, capacity_bytes=256 * 1024)
    base, end = ring.data_address(), ring.data_address() + ring.capacity
    ring.write_arrow_batch(voltmeter(0), "v")
    ring.write_arrow_batch(frames(3), "cam")
    reader = ring.reader()
    (_, volts), (_, cam) = reader.read_batches(copy=False)
    arr = volts.column("voltage").to_numpy(zero_copy_only=True)
    stack = cam.column("frame").to_numpy_ndarray()
    assert base <= arr.ctypes.data < end
    assert base <= stack.ctypes.data < end and stack.shape == (3, 32, 48)
    np.testing.assert_array_equal(stack, frames(3).column("frame").to_numpy_ndarray())
    assert reader.batch_valid(volts) and reader.batch_valid(cam)
    for i in range(1, 60):  # overwrite both records
        ring.write_arrow_batch(voltmeter(i), "v")
    assert not reader.batch_valid(volts) and not reader.batch_valid(cam)
    # Copies are always valid, and they live outside the mapping.
    (_, copied), *_ = ring.reader().read_batches(copy=True)
    assert reader.batch_valid(copied)
    c = copied.column("voltage").to_numpy(zero_copy_only=True)
    assert not base <= c.ctypes.data < end
    # The zero-copy arrays keep the mapping alive after the ring is closed and collected.
    ring.close()
    del ring, reader, volts, cam
    gc.collect()
    assert stack.sum() >= 0 and len(arr) == 1000


def test_interop_with_arro3_both_ways(ring_path: str) -> None:
    arro3 = pytest.importorskip("arro3.core")
    with RingBuffer.create(ring_path, capacity_mb=4) as ring:
        # A producer that is not pyarrow: arro3 objects export the PyCapsule interface.
        a3_batch = arro3.RecordBatch.from_arrow(voltmeter(0, 50))
        a3_table = arro3.Table.from_arrow(pa.Table.from_batches([voltmeter(1, 50), voltmeter(2, 50)]))
        ring.write_arrow_batch(a3_batch, "v")
        assert ring.write_arrow_batch(a3_table, "v") == 2
        # A consumer that is not pyarrow reads a stream through __arrow_c_stream__.
        stream = ring.reader().stream_reader("v")
        table = arro3.Table.from_arrow(stream)
        assert table.num_rows == 150
        back = pa.table(table)
        assert back.column("timestamp").to_pylist() == list(range(150))
        assert back.schema.field("voltage").metadata == {b"units": b"V"}


def test_latest_rows_for_a_notebook(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=4) as ring:
        for i in range(20):
            ring.write_arrow_batch(voltmeter(i, 100), "v")
            ring.write_arrow_batch(frames(1, start=i), "cam")
        got = ring.latest("v", rows=50)
        np.testing.assert_array_equal(got["timestamp"], np.arange(1950, 2000))
        np.testing.assert_allclose(got["voltage"], np.sin(np.arange(1950, 2000) / 100.0))
        base = ring.data_address()
        assert base <= got["voltage"].ctypes.data < base + ring.capacity, "one batch: zero-copy"
        spanning = ring.latest("v", rows=250)  # three batches: concatenated (a copy)
        np.testing.assert_array_equal(spanning["timestamp"], np.arange(1750, 2000))
        cams = ring.latest("cam", rows=3)
        assert cams["frame"].shape == (3, 32, 48)
        assert cams["frame_id"].tolist() == [17, 18, 19]
        view = LiveView(ring, "v", rows=10)
        assert view.update()["timestamp"].tolist() == list(range(1990, 2000))
        ring.write_arrow_batch(voltmeter(20, 100), "v")
        assert view.update()["timestamp"].tolist() == list(range(2090, 2100))
        assert view.valid()
        with pytest.raises(UnknownStreamError, match="unknown stream 'nope'; the ring's streams: 'v', 'cam'"):
            ring.latest("nope")


def test_latest_rows_as_a_table_are_a_copy_that_outlives_the_ring_lapping(ring_path: str) -> None:
    """LiveView.update_table, what the daemon serves for 'the latest N rows': Arrow types as
    written (a tensor column stays one), a copy intact after the producer laps the ring."""
    with RingBuffer.create(ring_path, capacity_bytes=256 * 1024) as ring:
        for i in range(10):
            ring.write_arrow_batch(frames(2, start=2 * i), "cam")
        view = LiveView(ring, "cam", rows=3)
        table = view.update_table()
        assert table.schema.equals(frames(1).schema)
        assert table.column("frame_id").to_pylist() == [17, 18, 19]
        expected = table.column("frame").combine_chunks().to_numpy_ndarray().copy()
        written = [frames(2, start=s).column("frame").to_numpy_ndarray() for s in (16, 18)]
        assert np.array_equal(expected, np.concatenate(written)[1:])
        base = ring.data_address()
        frame_buf = table.column("frame").chunks[0].storage.values.buffers()[1]
        assert not base <= frame_buf.address < base + ring.capacity, "a copy, not a view"
        for i in range(10, 200):  # ~20 laps of the ring
            ring.write_arrow_batch(frames(2, start=2 * i), "cam")
        assert table.column("frame_id").to_pylist() == [17, 18, 19]
        assert np.array_equal(table.column("frame").combine_chunks().to_numpy_ndarray(), expected)
        assert view.update_table().column("frame_id").to_pylist() == [397, 398, 399]


def test_latest_rows_after_a_schema_change_have_the_new_schema(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=4) as ring:
        ring.write_arrow_batch(voltmeter(0, 100), "v")
        renamed = pa.record_batch([pa.array(np.arange(100, 103))], names=["counts"])
        ring.write_arrow_batch(renamed, "v")
        view = LiveView(ring, "v", rows=50)  # the window spans both schemas
        assert view.update_table().to_pydict() == {"counts": [100, 101, 102]}
        assert ring.latest("v", rows=50)["counts"].tolist() == [100, 101, 102]


def test_reservations_fill_in_place(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        with ring.reserve(16, stream=5) as res:
            assert res.address % 64 == 0
            res.write(b"abcd")
            res.write(memoryview(b"efgh"))
            res.write(np.array([1.5], dtype=np.float64))
            assert res.written == 16
            with pytest.raises(ValueError, match="overflows the reservation"):
                res.write(b"x")
        res2 = ring.reserve(8 * 100)
        view = np.frombuffer(res2, dtype=np.float64)
        view[:] = np.arange(100)
        with pytest.raises(BufferError, match="still alive"):
            res2.commit()
        del view
        assert res2.commit() == 1
        with pytest.raises(ZeroDivisionError), ring.reserve(8):
            1 / 0  # noqa: B018 - aborts the reservation
        res4 = ring.reserve(8)
        with pytest.raises(rust_daq.RingUsageError, match="pending"):
            ring.write(b"blocked while a reservation is pending")
        del res4
        gc.collect()  # collected without commit: aborted, the producer can go on
        assert ring.write(b"next") == 2, "aborted sequence numbers are reused"
        recs = ring.reader().read()
        assert bytes(recs[0].data) == b"abcdefgh" + struct.pack("<d", 1.5) and recs[0].stream == 5
        np.testing.assert_array_equal(np.frombuffer(recs[1].data), np.arange(100.0))
        assert [r.seq for r in recs] == [0, 1, 2]


def test_arrow_from_another_process(ring_path: str) -> None:
    code = textwrap.dedent(
        f"""
        import numpy as np, pyarrow as pa
        from rust_daq import RingBuffer
        with RingBuffer.open({ring_path!r}, writable=True) as ring:
            for i in range(50):
                t = np.arange(i * 10, i * 10 + 10)
                ring.write_arrow_batch(pa.record_batch([t], names=["t"]), "remote")
        """
    )
    RingBuffer.create(ring_path, capacity_mb=1).close()
    with RingBuffer.open(ring_path) as ring:
        reader = ring.reader()
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        table = reader.read_table("remote")
        assert table.column("t").to_pylist() == list(range(500))


# -- bad input ----------------------------------------------------------------------------


def test_not_arrow_data_is_a_type_error_naming_it(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        with pytest.raises(TypeError, match=r"needs a pyarrow RecordBatch .* got builtins\.dict"):
            ring.write_arrow_batch({"a": [1, 2]}, "s")
        with pytest.raises(TypeError, match="got numpy.ndarray"):
            ring.write_arrow_batch(np.arange(3), "s")
        with pytest.raises(TypeError, match="stream must be a non-empty str"):
            ring.write_arrow_batch(voltmeter(0), "")
        assert ring.records_written == 0


def test_batch_larger_than_the_ring(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_bytes=64 * 1024) as ring:
        with pytest.raises(
            RecordTooLargeError, match=r"stream 'v' \(10000 rows\) serialises to 160192 bytes"
        ):
            ring.write_arrow_batch(voltmeter(0, 10_000), "v")
        assert ring.records_written == 0
        assert ring.write_arrow_batch(voltmeter(0, 100), "v") == 0, "the stream still works"


def test_dictionary_columns_are_refused(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        b = pa.record_batch([pa.array(["a", "b", "a"]).dictionary_encode()], names=["state"])
        with pytest.raises(UnsupportedTypeError, match="column 'state' has type dictionary<values=string"):
            ring.write_arrow_batch(b, "s")
        nested = pa.record_batch(
            [pa.array([["a"], ["b"]], pa.list_(pa.dictionary(pa.int8(), pa.string())))], names=["tags"]
        )
        with pytest.raises(UnsupportedTypeError, match="column 'tags'"):
            ring.write_arrow_batch(nested, "s")
        assert ring.records_written == 0 and ring.streams() == {}


def test_a_full_schema_region(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        with pytest.raises(RingConfigError, match="schema region is full"):
            for i in range(10_000):  # every batch a new schema: ~200 bytes of metadata each
                b = pa.record_batch([pa.array([i])], names=[f"column_{i}_" + "x" * 500])
                ring.write_arrow_batch(b, "churn")
        written = ring.records_written
        assert written > 100
        table = ring.reader().read_table("churn")  # every schema, promoted to one table
        assert table.num_rows == written and table.num_columns == written


def test_unknown_stream(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        ring.write_arrow_batch(voltmeter(0, 5), "v")
        with pytest.raises(UnknownStreamError, match="unknown stream 'w'; the ring's streams: 'v'"):
            ring.reader().read_table("w")
        with pytest.raises(KeyError):
            ring.reader().stream_reader("w")


def test_corrupt_payloads_are_skipped_and_counted(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        for i in range(3):
            ring.write_arrow_batch(voltmeter(i, 10), "v")
        ring.write(b"not arrow")
        second = ring.reader().read()[1].position
    # Smash the flatbuffer metadata of the second record (its payload starts 64 bytes in).
    with open(ring_path, "r+b") as f:
        f.seek(DATA + second + 64 + 8)
        f.write(b"\xff" * 64)
    with RingBuffer.open(ring_path) as ring:
        reader = ring.reader()
        got = reader.read_batches()
        assert [b.column("timestamp")[0].as_py() for _, b in got] == [0, 20]
        assert reader.undecodable == 1 and reader.not_arrow == 1


def _arrow_ring_bytes() -> tuple[bytes, int]:
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ring")
        with RingBuffer.create(path, capacity_bytes=16 * 1024) as ring:
            b = pa.record_batch(
                [
                    pa.array(["alpha", "beta", None, "gamma" * 5]),
                    pa.array([[1, 2], [], None, [3]], pa.list_(pa.int64())),
                    pa.array([0.5, 1.5, 2.5, 3.5]),
                    pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((4, 2, 2), np.uint16)),
                ],
                names=["s", "l", "f", "t"],
            )
            for _ in range(3):
                ring.write_arrow_batch(b, "fuzz")
            first = ring.reader().read()[0]
        with open(path, "rb") as f:
            return f.read(), first.position + 64 + len(first.data)


_PRISTINE_ARROW = _arrow_ring_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8))
@example(mutations=[(1712, 0)])  # the second record's schema id set to 0: counted as not Arrow
def test_fuzzed_arrow_payloads_never_crash(ring_path: str, mutations: list[tuple[int, int]]) -> None:
    data, first_end = _PRISTINE_ARROW
    data = bytearray(data)
    span = 3 * first_end
    for at, value in mutations:
        data[DATA + at % span] = value
    with open(ring_path, "wb") as f:
        f.write(data)
    with RingBuffer.open(ring_path) as ring:
        try:
            reader = ring.reader()
            got = reader.read_batches()
        except rust_daq.RingCorruptError:
            return  # a mutated record header: refused, not crashed
        for _, batch in got:
            # What is returned is valid Arrow: touching every value cannot crash.
            batch.validate(full=True)
            batch.to_pylist()
        # Every record delivered is a batch, undecodable, or (schema id mutated to 0) not Arrow.
        assert len(got) + reader.undecodable + reader.not_arrow == reader.delivered


def test_closing_a_ring_unmaps_it_without_waiting_for_the_garbage_collector(ring_path: str) -> None:
    def mapped() -> int:
        with open("/proc/self/maps") as f:
            return sum(1 for line in f if ring_path in line)

    gc.disable()
    try:
        with RingBuffer.create(ring_path, capacity_mb=1) as ring:
            ring.write_arrow_batch(voltmeter(0, 10), "v")
            assert mapped() == 3  # header, data, and pyarrow's map for Arrow writes
        del ring
        assert mapped() == 0
    finally:
        gc.enable()


def test_a_relay_keeps_the_upstream_stream_numbering(ring_path: str) -> None:
    """write_arrow_batch(stream_seq=N), as `rust-daq write --from` uses it: gaps upstream stay
    gaps here, and the numbering never goes back."""
    with RingBuffer.create(ring_path, capacity_mb=4) as ring:
        for i, upstream in enumerate([0, 1, 5, 3, None]):
            ring.write_arrow_batch(voltmeter(i, 10), "v", stream_seq=upstream)
        got = [
            (r.stream_seq, pa.ipc.read_record_batch(r.data, voltmeter(0, 1).schema))
            for r in ring.reader("oldest").read()
        ]
        assert [s for s, _ in got] == [0, 1, 5, 6, 7], "3 came after 5: numbered on, not back"
        assert [b.column("timestamp")[0].as_py() for _, b in got] == [0, 10, 20, 30, 40]
        with pytest.raises(TypeError, match="stream_seq must be a non-negative int"):
            ring.write_arrow_batch(voltmeter(9, 10), "v", stream_seq=-1)
        assert ring.records_written == 5, "the refused write wrote nothing"


def test_a_lapped_reader_counts_what_it_lost_of_each_stream(ring_path: str) -> None:
    """Two streams interleaved 3:1 through a ring too small to hold them; a reader that falls
    behind loses records of both. Its per-stream count must equal the gaps in each stream's
    own numbering (the `i` column), and add up to the reader's total loss."""
    with RingBuffer.create(ring_path, capacity_bytes=256 * 1024) as ring:
        reader = ring.reader()
        seen: dict[str, list[int]] = {"fast": [], "slow": []}
        written = {"fast": 0, "slow": 0}

        def drain() -> None:
            for name, batch in reader.read_batches():
                seen[name] += batch.column("i").to_pylist()

        n = 0
        for burst in range(6):
            for _ in range(3000 if burst % 2 else 40):  # odd bursts lap the reader
                for name in ("fast", "fast", "fast", "slow") if n % 4 == 0 else ("fast",):
                    ring.write_arrow_batch(pa.record_batch({"i": [written[name]]}), name)
                    written[name] += 1
                n += 1
            drain()
        lost = reader.lost_by_stream()
        for name, got in seen.items():
            assert got == sorted(got) and len(set(got)) == len(got)
            gaps = (got[-1] - got[0] + 1) - len(got)
            assert lost[name] == (gaps, None if gaps else 0), name
        assert lost["fast"][0] > 0 and lost["slow"][0] > 0
        assert reader.lost >= lost["fast"][0] + lost["slow"][0]


@pytest.mark.parametrize("max_records", [None, 1, 2])
def test_a_stream_whose_numbering_jumps_counts_the_jump_as_lost(
    ring_path: str, max_records: int | None
) -> None:
    """A relay carries the upstream stream_seq (records lost upstream): a jump in a stream's
    numbering is a loss for every reader even when the ring itself lost nothing, however the
    reads are cut, and beside a stream that lost nothing."""
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        b = pa.record_batch({"i": [1]})
        ring.write_arrow_batch(b, "v", stream_seq=0)
        ring.write_arrow_batch(b, "w")
        ring.write_arrow_batch(b, "v", stream_seq=5)
        ring.write_arrow_batch(b, "w")
        ring.write_arrow_batch(b, "v")  # (6)
        reader = ring.reader()
        got = 0
        while batches := reader.read_batches(max_records=max_records):
            got += len(batches)
        assert got == 5 and reader.lost == 0
        assert reader.lost_by_stream() == {"v": (4, None), "w": (0, 0)}


def test_rows_lost_are_counted_for_records_without_a_stream_number() -> None:
    """A record without a per-stream number (stream ids from 384) still has its row position
    when the producer knows it: the rows between two such records are lost rows."""
    from rust_daq._records import LossAccount

    account = LossAccount()
    assert account.observe("s", None, 10, rows_before=0) == 0
    assert account.observe("s", None, 10, rows_before=50) == 0
    assert account.records("s") == 0 and account.rows("s") == 40
    assert account.observe("t", 3, 10, rows_before=100) == 0
    assert account.observe("t", 6, 10, rows_before=150) == 2
    assert account.records("t") == 2 and account.rows("t") == 40


def test_a_live_view_takes_any_positive_integer_rows_and_refuses_the_rest(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        ring.write_arrow_batch(voltmeter(0, 100), "v")
        assert len(LiveView(ring, "v", rows=np.int64(30)).update()["voltage"]) == 30
        assert len(ring.latest("v", rows=np.int32(7))["voltage"]) == 7
        for bad in (0, -1, 2.5, True, "10", None):
            with pytest.raises(ValueError, match="rows must be a positive integer"):
                LiveView(ring, "v", rows=bad)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="rows must be a positive integer"):
                ring.latest("v", rows=bad)  # type: ignore[arg-type]


def test_the_map_arrow_writes_through_is_faulted_in_before_the_first_write(ring_path: str) -> None:
    """pyarrow maps the ring file itself, without MAP_POPULATE: its first lap took a page fault
    per 4 KiB. After _prepare_arrow every mapping of the ring file in this process is resident
    (its Rss is its Size), and writes then go through it."""
    ring = RingBuffer.create(ring_path, capacity_bytes=8 << 20)
    ring._prepare_arrow()
    inode = os.stat(ring_path).st_ino
    sizes = []
    with open("/proc/self/smaps") as f:
        current = None
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and "-" in fields[0] and fields[4] == str(inode):
                current = [0, 0]
                sizes.append(current)
            elif current is not None and fields[0] in ("Size:", "Rss:"):
                current[0 if fields[0] == "Size:" else 1] = int(fields[1])
            elif len(fields) >= 5 and "-" in fields[0]:
                current = None
    data = [s for s in sizes if s[0] >= 8 << 10]  # the data regions (KiB), not the headers
    assert len(data) >= 2, f"expected the ring's and pyarrow's maps of the file: {sizes}"
    assert all(rss == size for size, rss in data), f"not resident: {data}"
    ring.write_arrow_batch(pa.record_batch([pa.array([1.5, 2.5])], names=["v"]), "s")
    assert ring.reader().read_table("s").column("v").to_pylist() == [1.5, 2.5]
    ring.close()
