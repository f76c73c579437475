"""Instruments and the acquisition loop, through a real ring."""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.lowlevel
import numpy as np
import pyarrow as pa
import pytest

from rust_daq import Acquisition, RingBuffer
from rust_daq.adapters import (
    CallableInstrument,
    PolledInstrument,
    ScpiInstrument,
    SimulatedCamera,
    SimulatedVoltmeter,
)

DMM_YAML = Path(__file__).parent / "instruments" / "dmm.yaml"


def run(coro_fn, backend: str = "asyncio"):  # type: ignore[no-untyped-def]
    return anyio.run(coro_fn, backend=backend)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_voltmeter_and_camera_into_the_ring(ring_path: str, backend: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=64) as ring:
        volt = SimulatedVoltmeter(rate_hz=200, seed=1)
        cam = SimulatedCamera(shape=(32, 48), fps=20, seed=2)

        async def main() -> Acquisition:
            async with Acquisition(ring, [volt, cam], max_latency=0.05) as acq:
                await acq.run(duration=1.0)
            return acq

        acq = run(main, backend)
        stats = acq.stats()
        reader = ring.reader()
        v = reader.read_table("voltmeter")
        c = ring.reader().read_table("camera")
    sv, sc = stats["streams"]["voltmeter"], stats["streams"]["camera"]
    # Every read reached the ring; every scheduled slot was read or counted as missed.
    assert v.num_rows == sv["rows"] == sv["reads"]
    assert c.num_rows == sc["rows"] == sc["reads"]
    assert abs(sv["reads"] + sv["deadlines_missed"] - sv["expected_reads"]) <= 2
    assert abs(sc["reads"] + sc["deadlines_missed"] - sc["expected_reads"]) <= 2
    assert sv["reads"] >= 150 and sc["reads"] >= 15
    ts = v.column("timestamp").cast(pa.int64()).to_numpy()
    assert np.all(np.diff(ts) > 0), "timestamps increase"
    assert abs(np.median(np.diff(ts)) - 5e6) < 1e6, "about 200 Hz"
    volts = v.column("voltage").to_numpy()
    assert np.all(np.abs(volts) < 1.1) and volts.std() > 0.3
    assert v.schema.field("voltage").metadata == {b"units": b"V"}
    frames = c.column("frame").combine_chunks().to_numpy_ndarray()
    assert frames.shape == (c.num_rows, 32, 48) and frames.dtype == np.uint16
    assert c.column("frame_id").to_pylist() == list(range(c.num_rows))
    assert stats["records_lost"] == 0
    assert stats["write_latency_us"]["p50"] > 0
    # Each stream's write latency counts its own writes; together, all of them.
    lv, lc = sv["write_latency_us"], sc["write_latency_us"]
    assert (lv["n"], lc["n"]) == (sv["records"], sc["records"])
    assert lv["n"] + lc["n"] == stats["write_latency_us"]["n"]
    assert 0 < lv["p50"] <= lv["p99"] <= lv["max"] and 0 < lc["p50"] <= lc["max"]
    assert max(lv["max"], lc["max"]) == stats["write_latency_us"]["max"]


def test_one_kilohertz_is_scheduled_and_accounted(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=16) as ring:

        async def main() -> Acquisition:
            async with Acquisition(ring, [SimulatedVoltmeter(rate_hz=1000, seed=3)]) as acq:
                await acq.run(duration=1.0)
            return acq

        stats = run(main).stats()["streams"]["voltmeter"]
        rows = ring.reader().read_table("voltmeter").num_rows
    assert rows == stats["reads"] > 500
    assert abs(stats["reads"] + stats["deadlines_missed"] - stats["expected_reads"]) <= 2


def test_cancellation_writes_what_is_pending(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=16) as ring:
        acq = Acquisition(ring, [SimulatedVoltmeter(rate_hz=100)], batch_rows=10_000, max_latency=60)

        async def main() -> None:
            async with acq:
                with anyio.move_on_after(0.3):
                    await acq.run()

        run(main)
        rows = ring.reader().read_table("voltmeter").num_rows
    assert (
        rows == acq.stats()["streams"]["voltmeter"]["reads"] > 0
    )  # every read row, however many a loaded machine made


def test_callable_instruments_sync_async_and_mapping(ring_path: str) -> None:
    counter = iter(range(10**6))

    async def pressure() -> dict[str, float]:
        await anyio.lowlevel.checkpoint()
        return {"pressure": 1e-6, "temperature": 4.2}

    inst = [
        CallableInstrument(lambda: next(counter), "counter", rate_hz=50, column="n"),
        CallableInstrument(pressure, "gauge", rate_hz=20, units={"pressure": "mbar", "temperature": "K"}),
    ]
    with RingBuffer.create(ring_path, capacity_mb=16) as ring:

        async def main() -> None:
            async with Acquisition(ring, inst, max_latency=0.05) as acq:
                await acq.run(duration=0.5)

        run(main)
        n = ring.reader().read_table("counter")
        g = ring.reader().read_table("gauge")
    assert n.column("n").to_pylist() == list(range(1, n.num_rows + 1))  # connect() read 0
    assert g.schema.field("pressure").metadata == {b"units": b"mbar"}
    assert set(g.column("temperature").to_pylist()) == {4.2}


def test_scpi_multimeter_through_pyvisa_sim(ring_path: str) -> None:
    pytest.importorskip("pyvisa_sim")
    dmm = ScpiInstrument(
        "USB0::0x1111::0x2222::0x1234::0::INSTR", name="dmm", rate_hz=20, backend=f"{DMM_YAML}@sim"
    )
    assert isinstance(dmm, PolledInstrument)
    with RingBuffer.create(ring_path, capacity_mb=16) as ring:

        async def main() -> None:
            async with Acquisition(ring, [dmm], max_latency=0.05) as acq:
                assert dmm.identity == "rust-daq,SIM-DMM,0001,1.0"
                await acq.run(duration=0.5)

        run(main)
        t = ring.reader().read_table("dmm")
    assert t.num_rows >= 5
    assert set(t.column("voltage").to_pylist()) == {1.25}
    assert t.schema.field("voltage").metadata == {b"units": b"V"}


def test_embedding_another_stack_signal(ring_path: str) -> None:
    """The adapter pattern for another DAQ stack: its readable object (here a stand-in for an
    ophyd-async signal, with an async get_value) becomes an instrument."""

    class FakeSignal:  # what ophyd-async's SignalR offers: async get_value()
        def __init__(self) -> None:
            self.value = 0.0

        async def get_value(self) -> float:
            self.value += 0.5
            return self.value

    signal = FakeSignal()
    inst = CallableInstrument(
        signal.get_value, "motor_x", rate_hz=40, column="position", units={"position": "mm"}
    )
    with RingBuffer.create(ring_path, capacity_mb=16) as ring:

        async def main() -> None:
            async with Acquisition(ring, [inst], max_latency=0.05) as acq:
                await acq.run(duration=0.3)

        run(main)
        t = ring.reader().read_table("motor_x")
    pos = t.column("position").to_pylist()
    assert pos == [0.5 * k for k in range(2, 2 + len(pos))]  # connect() read 0.5
    assert t.schema.field("position").metadata == {b"units": b"mm"}


def test_bad_acquisition_arguments(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=1) as ring:
        with pytest.raises(ValueError, match="unique"):
            Acquisition(ring, [SimulatedVoltmeter(), SimulatedVoltmeter()])
        with pytest.raises(ValueError, match="no instruments"):
            Acquisition(ring, [])
        with RingBuffer.open(ring_path) as ro, pytest.raises(ValueError, match="producer handle"):
            Acquisition(ro, [SimulatedVoltmeter()])
    with pytest.raises(ValueError, match="rate_hz must be positive"):
        SimulatedVoltmeter(rate_hz=0)
    with pytest.raises(ValueError, match="shape"):
        SimulatedCamera(shape=(0, 5))


def test_the_simulated_camera_hands_out_a_precomputed_cycle() -> None:
    """Rendered once at connect (a read computes nothing, so it cannot hold the GIL beside the
    loop): frame k is frame k + cycle, the spot moves between frames, frames are read-only."""
    cam = SimulatedCamera(shape=(64, 96), fps=10, seed=3)
    assert cam.cycle == 100

    async def main() -> list[pa.RecordBatch]:
        await cam.connect()
        return [await cam.read() for _ in range(102)]

    batches = anyio.run(main)
    frames = [np.asarray(b.column("frame").to_numpy_ndarray())[0] for b in batches]
    assert [b.column("frame_id")[0].as_py() for b in batches] == list(range(102))
    assert frames[0].shape == (64, 96) and frames[0].dtype == np.uint16
    assert np.array_equal(frames[0], frames[100]) and np.array_equal(frames[1], frames[101])
    peaks = [np.unravel_index(np.argmax(f), f.shape) for f in frames[:50:10]]
    assert len(set(peaks)) == 5, f"the spot does not move: {peaks}"
    assert 2500 < int(frames[0].max()) < 65535 and 50 < int(np.median(frames[0])) < 200
    assert not cam.frame(0).flags.writeable
    big = SimulatedCamera(shape=(2048, 2048))
    assert big.cycle == SimulatedCamera.CYCLE_BYTES // (2048 * 2048 * 2) == 8
