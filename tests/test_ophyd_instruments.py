"""rust_daq.ophyd_async instruments: real ophyd-async signals and devices (soft signals,
SimMotor, a StandardReadable), driven by Acquisition into a real ring, written by an
in-process HDF5Writer and read back with h5py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import h5py
import numpy as np
import pyarrow as pa
import pytest
from ophyd_async.core import (
    Array1D,
    SignalRW,
    SoftSignalBackend,
    StandardReadable,
    StrictEnum,
    Table,
    init_devices,
    soft_signal_r_and_setter,
    soft_signal_rw,
)
from ophyd_async.sim import SimMotor

import rust_daq
from rust_daq import Acquisition, HDF5Writer, RingBuffer, SignalTypeError, UnsupportedTypeError
from rust_daq.adapters import PolledInstrument, StreamingInstrument
from rust_daq.ophyd_async import (
    MonitoredSignalInstrument,
    PolledSignalInstrument,
    ReadableInstrument,
    SignalInstrument,
)

Drive = Callable[[Acquisition], Awaitable[None]]


class Color(StrictEnum):
    RED = "Red"
    GREEN = "Green light"


class Peaks(Table):
    position: Array1D[np.int32]
    label: Sequence[str]


class Single(Table):  # one column: ophyd-async describes it as a void dtype ("|V8")
    energy: Array1D[np.float64]


class Box(StandardReadable):
    """A device of several signals, each with its own Reading timestamp."""

    def __init__(self, name: str = "") -> None:
        with self.add_children_as_readables():
            self.temp = soft_signal_rw(float, 20.0, units="degC")
            self.counts = soft_signal_rw(Array1D[np.int32], np.arange(4, dtype=np.int32))
            self.mode = soft_signal_rw(Color, Color.RED)
        super().__init__(name=name)


class Described(StandardReadable):
    """A device whose describe() says something else about its one signal (what another
    control system's device might describe)."""

    def __init__(self, override: dict[str, Any], name: str = "") -> None:
        with self.add_children_as_readables():
            self.x = soft_signal_rw(float, 1.0)
        super().__init__(name=name)
        self.override = override

    async def describe(self) -> dict[str, Any]:
        described = await super().describe()
        return {k: {**v, **self.override} for k, v in described.items()}


def ns(seconds: float) -> int:
    return int(np.round(seconds * 1e9))


async def acquire(ring: RingBuffer, instruments: Sequence[Any], drive: Drive) -> Acquisition:
    """Runs the instruments while `drive` works the signals; stops when it returns."""
    async with Acquisition(ring, instruments, precise=False, max_latency=0.02) as acq:

        async def driver() -> None:
            try:
                await drive(acq)
            finally:
                acq.stop()

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(driver)
                await acq.run()
    return acq


async def polled(acq: Acquisition, names: Sequence[str], more: int = 2) -> None:
    """Until every stream in `names` has been read `more` times since the call (the second
    read started after whatever the caller just did)."""

    def reads() -> dict[str, int]:
        return {n: s["reads"] for n, s in acq.stats()["streams"].items()}

    start = reads()
    while any(reads()[n] < start[n] + more for n in names):  # noqa: ASYNC110 (no event for a read)
        await anyio.sleep(0.002)


def write(ring: RingBuffer, path: Path) -> None:
    with HDF5Writer(path, ring) as w:
        w.flush_to_disk()
        assert w.records_unwritable == 0 and w.records_lost == 0


def group(f: h5py.File, stream: str) -> h5py.Group:
    for g in f["measurements"].values():
        if isinstance(g, h5py.Group) and g.attrs.get("arrow_name") == stream:
            return g
    raise KeyError(stream)


def columns(g: h5py.Group) -> dict[str, h5py.Dataset]:
    """The group's datasets by Arrow column path ("value", "timestamps.<key>")."""
    out = {}
    for ds in g.values():
        if isinstance(ds, h5py.Dataset) and "arrow_name" in ds.attrs:
            path = (
                json.loads(ds.attrs["arrow_path"]) if "arrow_path" in ds.attrs else [ds.attrs["arrow_name"]]
            )
            out[".".join(path)] = ds
    return out


def changes(values: Sequence[Any], stamps: Sequence[int]) -> list[tuple[Any, int]]:
    """Consecutive (value, timestamp) pairs with repeats collapsed: what a poller saw change."""
    out: list[tuple[Any, int]] = []
    for v, t in zip(values, stamps, strict=True):
        key = (v.tolist() if isinstance(v, np.ndarray) else v, int(t))
        if not out or out[-1] != key:
            out.append(key)
    return out


def reading(readings: dict[str, Any]) -> tuple[Any, int]:
    ((_, r),) = readings.items()
    v = r["value"]
    v = v.value if isinstance(v, Color) else v
    return (v.tolist() if isinstance(v, np.ndarray) else v, ns(r["timestamp"]))


async def poll_through(
    ring: RingBuffer,
    sigs: dict[str, Any],
    values: dict[str, list[Any]],
    expected: dict[str, list[tuple[Any, int]]],
    *,
    rate_hz: float,
) -> Acquisition:
    """Polls every signal while it is set to each of its `values` in turn; `expected` gets
    each signal's readings (value, timestamp), the initial one first."""
    for s in sigs.values():
        await s.connect()
    instruments = [SignalInstrument(s, "poll", rate_hz=rate_hz) for s in sigs.values()]

    async def drive(acq: Acquisition) -> None:
        for n, s in sigs.items():
            expected[n].append(reading(await s.read()))
        await polled(acq, list(sigs))
        for k in range(len(next(iter(values.values())))):
            for n, s in sigs.items():
                await s.set(values[n][k])
                expected[n].append(reading(await s.read()))
            await polled(acq, list(sigs))

    return await acquire(ring, instruments, drive)


# -- poll mode ---------------------------------------------------------------------------------


def test_polled_scalars_strings_enums_with_reading_timestamps(ring_path: str, tmp_path: Path) -> None:
    sets: dict[str, list[Any]] = {
        "f": [0.25, -1e300, 3.5],
        "i": [7, -(2**62), 0],
        "b": [False, True, False],
        "s": ["α/β", "", "two\nlines"],
        "e": [Color.GREEN, Color.RED, Color.GREEN],
        "lim": [1.0, 2.0, 3.0],
    }
    expected: dict[str, list[tuple[Any, int]]] = {n: [] for n in sets}
    h5 = tmp_path / "run.h5"

    async def main(ring: RingBuffer) -> Acquisition:
        limited = SoftSignalBackend(float, 0.0, units="V")
        limited.metadata["limits"] = {"control": {"low": -10.0, "high": 10.0}}
        sigs = {
            "f": soft_signal_rw(float, 1.5, name="f", units="mm", precision=3),
            "i": soft_signal_rw(int, 2, name="i", units="counts"),
            "b": soft_signal_rw(bool, True, name="b"),
            "s": soft_signal_rw(str, "start", name="s"),
            "e": soft_signal_rw(Color, Color.RED, name="e"),
            "lim": SignalRW(backend=limited, name="lim"),
        }
        return await poll_through(ring, sigs, sets, expected, rate_hz=200)

    with RingBuffer.create(ring_path, capacity_mb=16) as ring:
        acq = asyncio.run(main(ring))
        write(ring, h5)
    stats = acq.stats()["streams"]
    with h5py.File(h5) as f:
        for n in sets:
            cols = columns(group(f, n))
            assert set(cols) == {"timestamp", "value"}
            ds = cols["value"]
            values = list(ds.asstr()[:]) if ds.dtype.kind == "O" else ds[:].tolist()
            stamps = cols["timestamp"][:]
            # One row per read; every row holds a value the signal had, with its Reading's
            # own timestamp (never the time of the poll), each value seen in order.
            assert len(values) == stats[n]["rows"] == stats[n]["reads"] >= 2 * len(expected[n])
            assert changes(values, stamps) == expected[n], n
            assert cols["timestamp"].attrs["units"] == "ns"
            assert ds.attrs["source"] == f"soft://{n}"
        c = {n: columns(group(f, n))["value"] for n in sets}
        assert c["f"].dtype == np.float64 and c["i"].dtype == np.int64 and c["b"].dtype == np.bool_
        assert h5py.check_string_dtype(c["s"].dtype) and h5py.check_string_dtype(c["e"].dtype)
        assert (c["f"].attrs["units"], c["f"].attrs["precision"]) == ("mm", "3")
        assert c["i"].attrs["units"] == "counts" and "units" not in c["b"].attrs
        assert json.loads(c["e"].attrs["choices"]) == ["Red", "Green light"]
        assert json.loads(c["lim"].attrs["limits"]) == {"control": {"low": -10.0, "high": 10.0}}
        assert c["lim"].attrs["units"] == "V"


def test_polled_arrays_are_one_row_per_read(ring_path: str, tmp_path: Path) -> None:
    """A (8,) array is one (8,) row per read, a 2-D frame one (h, w) row, bool arrays too;
    a frame of a narrower dtype is widened (int8 into an int16 column)."""
    rng = np.random.default_rng(7)
    frames = {
        "spectrum": [rng.normal(size=8) for _ in range(3)],
        "image": [rng.integers(0, 4096, size=(4, 6)).astype(np.uint16) for _ in range(3)],
        "mask": [rng.random(5) > 0.5 for _ in range(3)],
        "small": [np.array([[1, -2], [3, -4]], np.int8)] * 3,
    }
    expected: dict[str, list[tuple[Any, int]]] = {n: [] for n in frames}
    h5 = tmp_path / "run.h5"

    async def main(ring: RingBuffer) -> Acquisition:
        sigs = {
            "spectrum": soft_signal_rw(Array1D[np.float64], np.zeros(8), name="spectrum", units="counts"),
            "image": soft_signal_rw(np.ndarray, np.zeros((4, 6), np.uint16), name="image"),
            "mask": soft_signal_rw(Array1D[np.bool_], np.zeros(5, bool), name="mask"),
            "small": soft_signal_rw(np.ndarray, np.zeros((2, 2), np.int16), name="small"),
        }
        return await poll_through(ring, sigs, frames, expected, rate_hz=100)

    with RingBuffer.create(ring_path, capacity_mb=16) as ring:
        acq = asyncio.run(main(ring))
        table = ring.reader().read_table("image")
        write(ring, h5)
    assert isinstance(table.schema.field("value").type, pa.FixedShapeTensorType)
    stats = acq.stats()["streams"]
    shapes = {"spectrum": (8,), "image": (4, 6), "mask": (5,), "small": (2, 2)}
    dtypes = {"spectrum": np.float64, "image": np.uint16, "mask": np.bool_, "small": np.int16}
    with h5py.File(h5) as f:
        for n, shape in shapes.items():
            cols = columns(group(f, n))
            ds = cols["value"]
            assert ds.shape == (stats[n]["reads"], *shape) and ds.dtype == dtypes[n], n
            assert changes(list(ds[:]), cols["timestamp"][:]) == expected[n], n
        assert columns(group(f, "spectrum"))["value"].attrs["units"] == "counts"


# -- monitor mode ------------------------------------------------------------------------------


def test_monitor_loses_no_update_and_batches_bursts(ring_path: str, tmp_path: Path) -> None:
    """Updates before the run, bursts during it, and the last ones set as the run stops (the
    acquisition cancels its streams: they are still queued): every one is a row, in order,
    with its own timestamp; bursts come out as few batches."""
    h5 = tmp_path / "run.h5"
    seen: list[tuple[Any, int]] = []  # what a second subscriber of the signal got

    async def main(ring: RingBuffer) -> tuple[Acquisition, MonitoredSignalInstrument]:
        sig, setter = soft_signal_r_and_setter(float, -1.0, name="mon", units="V")
        await sig.connect()
        inst = SignalInstrument(sig)
        assert isinstance(inst, MonitoredSignalInstrument)

        def reference(readings: dict[str, Any]) -> None:
            seen.append(reading(readings))

        async with Acquisition(ring, [inst], precise=False, max_latency=0.02) as acq:
            sig.subscribe_reading(reference)  # (gets the current reading first, like ours)
            for v in range(100):  # between connect() and the run: queued for it
                setter(float(v))
            assert inst.pending == 101

            async def drive() -> None:
                for v in range(100, 400):
                    setter(float(v))
                    if v % 7 == 0:
                        await anyio.lowlevel.checkpoint()
                acq.stop()
                await anyio.lowlevel.checkpoint()  # the run cancels its stream; these come before it ends
                for v in range(400, 450):
                    setter(float(v))

            async with anyio.create_task_group() as tg:
                tg.start_soon(drive)
                with anyio.fail_after(20):
                    await acq.run()
            sig.clear_sub(reference)
        setter(1e6)  # after close(): unsubscribed
        assert inst.pending == 0
        return acq, inst

    with RingBuffer.create(ring_path, capacity_mb=16) as ring:
        acq, inst = asyncio.run(main(ring))
        write(ring, h5)
    assert [v for v, _ in seen] == [-1.0, *map(float, range(450))]
    stats = acq.stats()["streams"]["mon"]
    assert stats["rows"] == 451
    assert stats["reads"] <= 47, "a burst is one batch (one per wake-up of the stream)"
    with h5py.File(h5) as f:
        cols = columns(group(f, "mon"))
        assert list(zip(cols["value"][:].tolist(), cols["timestamp"][:].tolist(), strict=True)) == seen
        assert cols["value"].attrs["units"] == "V" and cols["value"].attrs["source"] == "soft://mon"


def test_monitor_updates_from_another_thread(ring_path: str) -> None:
    """A control-system library may call back from its own thread: the update is queued
    there and the stream woken through the loop."""

    async def main(ring: RingBuffer) -> None:
        sig, setter = soft_signal_r_and_setter(int, 0, name="count")
        await sig.connect()

        def burst() -> None:
            for v in range(1, 201):
                setter(v)

        async def drive(acq: Acquisition) -> None:
            await anyio.to_thread.run_sync(burst)
            while acq.rows().get("count", 0) < 201:  # noqa: ASYNC110 (no event for a flush)
                await anyio.sleep(0.005)

        await acquire(ring, [SignalInstrument(sig)], drive)

    with RingBuffer.create(ring_path, capacity_mb=16) as ring:
        asyncio.run(main(ring))
        table = ring.reader().read_table("count")
    assert table.column("value").to_pylist() == list(range(201))
    assert table.schema.field("value").type == pa.int64()


def test_monitored_frames_and_string_sequences(ring_path: str, tmp_path: Path) -> None:
    h5 = tmp_path / "run.h5"
    frames = [np.full((5, 7), k, np.uint8) + np.arange(7, dtype=np.uint8) for k in range(20)]
    words = [["a"], [], ["b", "c/d", "é"], ["x"] * 4]

    async def main(ring: RingBuffer) -> list[tuple[Any, int]]:
        image = soft_signal_rw(np.ndarray, np.zeros((5, 7), np.uint8), name="image")
        names = soft_signal_rw(Sequence[str], ["first", "second"], name="names")
        await image.connect()
        await names.connect()
        stamps: list[tuple[Any, int]] = [reading(await image.read())]

        async def drive(acq: Acquisition) -> None:
            for k, frame in enumerate(frames):
                await image.set(frame)
                stamps.append(reading(await image.read()))
                if k < len(words):
                    await names.set(words[k])

        await acquire(ring, [SignalInstrument(image), SignalInstrument(names)], drive)
        return stamps

    with RingBuffer.create(ring_path, capacity_mb=16) as ring:
        stamps = asyncio.run(main(ring))
        write(ring, h5)
    with h5py.File(h5) as f:
        cols = columns(group(f, "image"))
        assert cols["value"].shape == (21, 5, 7) and cols["value"].dtype == np.uint8
        assert list(zip(cols["value"][:].tolist(), cols["timestamp"][:].tolist(), strict=True)) == stamps
        cols = columns(group(f, "names"))
        assert cols["value"].attrs["encoding"] == "json"
        assert [json.loads(s) for s in cols["value"].asstr()[:]] == [["first", "second"], *words]


def test_monitor_stops_at_a_reading_of_another_shape(ring_path: str) -> None:
    """The rows before it reach the ring; the error names the signal and both shapes."""

    async def main(ring: RingBuffer) -> None:
        sig = soft_signal_rw(Array1D[np.float64], np.zeros(8), name="spectrum")
        await sig.connect()

        async def drive(acq: Acquisition) -> None:
            for k in range(3):
                await sig.set(np.full(8, k + 1.0))
            await sig.set(np.zeros(5))
            await sig.set(np.ones(8))
            await anyio.sleep(5)  # the stream's error ends the run first

        await acquire(ring, [SignalInstrument(sig)], drive)

    with RingBuffer.create(ring_path, capacity_mb=16) as ring:
        with pytest.raises(BaseExceptionGroup) as info:
            asyncio.run(main(ring))
        table = ring.reader().read_table("spectrum")
    assert info.group_contains(
        SignalTypeError, match=r"signal 'spectrum': a reading of shape \[5\] .* said \[8\]"
    )
    values = table.column("value").combine_chunks().to_numpy_ndarray()
    np.testing.assert_array_equal(values, [np.zeros(8), *(np.full(8, k + 1.0) for k in range(3))])


# -- devices -----------------------------------------------------------------------------------


def test_readable_devices_sim_motor_and_a_box_with_an_odd_name(ring_path: str, tmp_path: Path) -> None:
    """SimMotor and a StandardReadable of a float, an array and an enum: one column per
    describe() key (the odd name kept), a row time that is the newest Reading's, and each
    key's own timestamp under timestamps.<key>."""
    h5 = tmp_path / "run.h5"
    odd = "odd/box.1 %"
    finals: dict[str, dict[str, Any]] = {}

    async def main(ring: RingBuffer) -> Acquisition:
        async with init_devices():
            motor = SimMotor()
        box = Box(name=odd)
        await box.connect()
        await motor.velocity.set(1000.0)
        instruments = [ReadableInstrument(motor, rate_hz=100), ReadableInstrument(box, rate_hz=100)]

        async def drive(acq: Acquisition) -> None:
            await polled(acq, ["motor", odd])
            await motor.set(0.5)
            await box.counts.set(np.array([9, 8, 7, 6], np.int32))
            await box.mode.set(Color.GREEN)
            await box.temp.set(21.5)
            await polled(acq, ["motor", odd])
            finals["motor"] = await motor.read()
            finals[odd] = await box.read()

        return await acquire(ring, instruments, drive)

    with RingBuffer.create(ring_path, capacity_mb=16) as ring:
        acq = asyncio.run(main(ring))
        write(ring, h5)
    stats = acq.stats()["streams"]
    with h5py.File(h5) as f:
        cols = columns(group(f, "motor"))
        assert set(cols) == {"timestamp", "motor", "timestamps.motor"}
        n = stats["motor"]["reads"]
        assert cols["motor"].shape == (n,) and cols["motor"].attrs["units"] == "mm"
        assert cols["motor"].attrs["source"] == "soft://motor"
        assert cols["motor"][0] == 0.0 and cols["motor"][-1] == finals["motor"]["motor"]["value"] == 0.5
        assert cols["timestamps.motor"][-1] == ns(finals["motor"]["motor"]["timestamp"])
        np.testing.assert_array_equal(cols["timestamp"][:], cols["timestamps.motor"][:])

        cols = columns(group(f, odd))
        keys = [f"{odd}-temp", f"{odd}-counts", f"{odd}-mode"]
        assert set(cols) == {"timestamp", *keys, *(f"timestamps.{k}" for k in keys)}
        n = stats[odd]["reads"]
        assert cols[keys[0]].shape == (n,) and cols[keys[0]].attrs["units"] == "degC"
        assert cols[keys[1]].shape == (n, 4) and cols[keys[1]].dtype == np.int32
        assert cols[keys[0]][-1] == 21.5 and cols[keys[1]][-1].tolist() == [9, 8, 7, 6]
        assert cols[keys[2]].asstr()[0] == "Red" and cols[keys[2]].asstr()[-1] == "Green light"
        stamps = np.stack([cols[f"timestamps.{k}"][:] for k in keys])
        np.testing.assert_array_equal(cols["timestamp"][:], stamps.max(axis=0))
        for k in keys:
            assert cols[f"timestamps.{k}"][-1] == ns(finals[odd][k]["timestamp"])
            assert cols[f"timestamps.{k}"].attrs["source"] == cols[k].attrs["source"] == f"soft://{k}"
        # Set last, the temperature's Reading is the newest: the row time is its own.
        assert cols["timestamp"][-1] == ns(finals[odd][keys[0]]["timestamp"])
        assert cols["timestamp"][-1] > cols[f"timestamps.{keys[1]}"][-1]


def test_tables_one_table_per_row(ring_path: str, tmp_path: Path) -> None:
    """ophyd-async Tables (one of two columns, one of a single column that describe() gives
    only as a void dtype) become structs of lists: value.<column> in the file."""
    h5 = tmp_path / "run.h5"
    tables = [Peaks(position=[3, 1, 4], label=["a", "b", "c"]), Peaks(position=[], label=[])]

    async def main(ring: RingBuffer) -> None:
        peaks = soft_signal_rw(Peaks, Peaks(position=[1], label=["only"]), name="peaks")
        single = soft_signal_rw(Single, Single(energy=[1.5, 2.5]), name="single")
        await peaks.connect()
        await single.connect()

        async def drive(acq: Acquisition) -> None:
            for t in tables:
                await peaks.set(t)

        await acquire(ring, [SignalInstrument(peaks), SignalInstrument(single, "poll", 50)], drive)

    with RingBuffer.create(ring_path, capacity_mb=16) as ring:
        asyncio.run(main(ring))
        write(ring, h5)
    with h5py.File(h5) as f:
        cols = columns(group(f, "peaks"))
        assert [p.tolist() for p in cols["value.position"][:]] == [[1], [3, 1, 4], []]
        assert cols["value.position"].dtype.metadata["vlen"] == np.int32
        assert [json.loads(s) for s in cols["value.label"].asstr()[:]] == [["only"], ["a", "b", "c"], []]
        cols = columns(group(f, "single"))
        assert len(cols["value.energy"]) >= 1
        assert all(e.tolist() == [1.5, 2.5] for e in cols["value.energy"][:])


# -- what is refused ---------------------------------------------------------------------------


def test_arguments_and_dispatch() -> None:
    sig = soft_signal_rw(float, 0.0, name="x")
    with pytest.raises(ValueError, match=r"mode='poll' needs rate_hz"):
        SignalInstrument(sig, "poll")
    with pytest.raises(ValueError, match=r"mode='monitor' takes no rate_hz \(got 10\)"):
        SignalInstrument(sig, rate_hz=10)
    for bad in (0, -1.0, float("nan"), float("inf"), True, "10"):
        with pytest.raises(ValueError, match="rate_hz must be a positive number"):
            SignalInstrument(sig, "poll", bad)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match=r"mode must be 'monitor' or 'poll', got 'watch'"):
        SignalInstrument(sig, "watch")
    with pytest.raises(TypeError, match="use ReadableInstrument"):
        SignalInstrument(Box(name="box"))  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="has no name to call its stream"):
        SignalInstrument(soft_signal_rw(float))
    with pytest.raises(ValueError, match="is not mode='poll'"):
        MonitoredSignalInstrument(sig, "poll", 3)
    with pytest.raises(ValueError, match="takes no rate_hz"):
        MonitoredSignalInstrument(sig, rate_hz=3)
    with pytest.raises(TypeError, match="readable device"):
        ReadableInstrument(object(), 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rate_hz must be a positive number"):
        ReadableInstrument(Box(name="box"), 0)
    with pytest.raises(ValueError, match="has no name"):
        ReadableInstrument(Box(), 1)

    # The acquisition dispatches with isinstance on runtime-checkable protocols: a monitor
    # must not look polled.
    monitor, poller = SignalInstrument(sig), SignalInstrument(sig, "poll", 5, name="x-polled")
    direct = PolledSignalInstrument(sig, rate_hz=3)
    assert isinstance(monitor, StreamingInstrument) and not isinstance(monitor, PolledInstrument)
    assert not hasattr(monitor, "read") and not hasattr(monitor, "rate_hz")
    assert isinstance(poller, PolledInstrument) and poller.rate_hz == 5.0 and poller.name == "x-polled"
    assert isinstance(direct, PolledInstrument) and direct.mode == "poll" and direct.name == "x"
    assert isinstance(ReadableInstrument(sig, 2), PolledInstrument)
    assert issubclass(SignalTypeError, UnsupportedTypeError) and rust_daq.SignalTypeError is SignalTypeError

    async def unconnected() -> None:
        with pytest.raises(RuntimeError, match=r"connect\(\) first"):
            await poller.read()
        with pytest.raises(RuntimeError, match=r"connect\(\) first"):
            async for _ in monitor.stream():
                pass

    asyncio.run(unconnected())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda: soft_signal_rw(np.ndarray, name="empty"),
            r"signal 'empty' \(dtype 'array', dtype_numpy '<f8', shape \[0\]\) has no Arrow column: an empty dimension",
        ),
        (
            lambda: soft_signal_rw(np.ndarray, np.zeros(4, np.complex128), name="iq"),
            r"signal 'iq' .*complex128 values \(numpy kind 'c'\) are not numbers",
        ),
    ],
)
def test_signals_without_a_column_are_refused_at_connect(make: Callable[[], Any], match: str) -> None:
    async def main() -> None:
        sig = make()
        await sig.connect()
        for inst in (SignalInstrument(sig), SignalInstrument(sig, "poll", 1)):
            with pytest.raises(SignalTypeError, match=match):
                await inst.connect()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"dtype": "array", "shape": [None]}, r"'dev-x' of device 'dev'.*a dimension of unknown length"),
        ({"external": "STREAM:"}, r"its data is external \('STREAM:'\)"),
        ({"dtype": "array", "shape": [3], "dtype_numpy": "<M8[ns]"}, r"numpy kind 'M'"),
        ({"dtype": "array", "shape": [3], "dtype_numpy": "nonsense"}, r"'nonsense' is not a numpy dtype"),
        ({"dtype": "array", "shape": [3], "dtype_numpy": ""}, r"an array without dtype_numpy"),
        ({"dtype": "integer", "dtype_numpy": "<f8"}, r"dtype 'integer' with numpy type float64 contradicts"),
        ({"dtype": "array", "shape": [2, 2], "dtype_numpy": "|S40"}, r"strings in more than one dimension"),
        ({"dtype": "string", "shape": [2]}, r"a 'string' of shape \[2\]: only dtype 'array' has dimensions"),
        ({"dtype": "object"}, r"dtype 'object' is not one of event-model's"),
    ],
)
def test_data_keys_without_a_column_are_refused(override: dict[str, Any], match: str) -> None:
    async def main() -> None:
        dev = Described(override, name="dev")
        await dev.connect()
        with pytest.raises(SignalTypeError, match=match):
            await ReadableInstrument(dev, 1).connect()

    asyncio.run(main())


def test_readings_that_contradict_describe_are_refused(ring_path: str) -> None:
    async def main() -> None:
        ghost = Described({}, name="dev")
        await ghost.connect()
        inst = ReadableInstrument(ghost, 10)
        await inst.connect()
        batch = await inst.read()
        assert batch.column("dev-x").to_pylist() == [1.0]
        ghost.x.set_name("dev-y")  # read() now gives another key than connect() described
        with pytest.raises(SignalTypeError, match=r"missing \['dev-x'\], not described \['dev-y'\]"):
            await inst.read()

        timestamp = soft_signal_rw(float, 0.0, name="timestamp")
        with pytest.raises(ValueError, match="a data key named 'timestamp'"):
            await ReadableInstrument(timestamp, 1).connect()

        frames = soft_signal_rw(np.ndarray, np.zeros((2, 2), np.int16), name="frames")
        await frames.connect()
        poller = SignalInstrument(frames, "poll", 10)
        await poller.connect()
        await frames.set(np.zeros((2, 2), np.float32))
        with pytest.raises(SignalTypeError, match=r"signal 'frames': a reading of dtype float32 .* int16"):
            await poller.read()
        await frames.set(np.zeros((2, 3), np.int16))
        with pytest.raises(SignalTypeError, match=r"shape \[2, 3\] where describe\(\) said \[2, 2\]"):
            await poller.read()

    asyncio.run(main())


def test_polled_shape_change_ends_the_run(ring_path: str) -> None:
    async def main(ring: RingBuffer) -> None:
        sig = soft_signal_rw(Array1D[np.float64], np.zeros(8), name="spectrum")
        await sig.connect()

        async def drive(acq: Acquisition) -> None:
            await polled(acq, ["spectrum"])
            await sig.set(np.zeros(9))
            await anyio.sleep(5)

        await acquire(ring, [SignalInstrument(sig, "poll", 100)], drive)

    with RingBuffer.create(ring_path, capacity_mb=16) as ring:
        with pytest.raises(BaseExceptionGroup) as info:
            asyncio.run(main(ring))
        rows = ring.reader().read_table("spectrum").num_rows
    assert info.group_contains(SignalTypeError, match=r"shape \[9\] where describe\(\) said \[8\]")
    assert rows >= 2
