"""Acquisition runs as another stack drives them: a given number of reads per run (a
detector's points), runs one after another, and the garbage collector's freeze counted so
that no run changes the state the user (or another acquisition) set."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import anyio
import numpy as np
import pytest

from rust_daq import Acquisition, RingBuffer
from rust_daq.adapters import CallableInstrument, SimulatedVoltmeter


@pytest.fixture
def no_user_freeze() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def counter(name: str, rate_hz: float = 1000.0) -> CallableInstrument:
    n = iter(range(1_000_000))
    return CallableInstrument(lambda: float(next(n)), name, rate_hz=rate_hz)


def test_run_reads_exactly_that_many_and_runs_add_up(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:

        async def main() -> Acquisition:
            async with Acquisition(ring, [counter("a"), SimulatedVoltmeter(rate_hz=500, seed=3)]) as acq:
                await acq.run(reads=7)
                assert acq.rows() == {"a": 7, "voltmeter": 7}
                await acq.run(reads=5)
                assert acq.rows() == {"a": 12, "voltmeter": 12}
                with anyio.fail_after(30):  # a duration that ends first
                    await acq.run(reads=10**9, duration=0.05)
            return acq

        acq = anyio.run(main)
        table = ring.reader().read_table("a")
        got = table.column("value").to_numpy()
        # connect() took one sample (the schema): the reads continue from 1, none twice.
        np.testing.assert_array_equal(got, np.arange(1, len(got) + 1, dtype=np.float64))
        assert len(got) == acq.stats()["streams"]["a"]["reads"] >= 12
        assert ring.reader().read_table("voltmeter").num_rows == acq.stats()["streams"]["voltmeter"]["rows"]


def test_run_arguments_are_checked(ring_path: str) -> None:
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:

        async def main() -> None:
            async with Acquisition(ring, [counter("a")]) as acq:
                for bad in (0, -1, 1.5, True):
                    with pytest.raises(ValueError, match="reads must be a positive number"):
                        await acq.run(reads=bad)  # type: ignore[arg-type]
                with pytest.raises(ValueError, match="duration must be"):
                    await acq.run(duration=float("nan"))

        anyio.run(main)


def _run_and_watch(ring: RingBuffer, freeze_gc: bool | None) -> int:
    """Runs an acquisition; returns gc.get_freeze_count() seen from inside the run."""
    seen = [-1]

    async def main() -> None:
        async with Acquisition(ring, [counter("a", 200.0)], freeze_gc=freeze_gc) as acq:
            async with anyio.create_task_group() as tg:
                tg.start_soon(acq.run)
                await anyio.sleep(0.05)
                seen[0] = gc.get_freeze_count()
                acq.stop()

    anyio.run(main)
    return seen[0]


def test_gc_freeze_restores_the_state_before(
    ring_path: str, monkeypatch: pytest.MonkeyPatch, no_user_freeze: None
) -> None:
    freezes: list[int] = []
    real = gc.freeze
    monkeypatch.setattr(gc, "freeze", lambda: freezes.append(1) or real())
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:
        assert gc.get_freeze_count() == 0
        assert _run_and_watch(ring, None) > 0  # the main thread: frozen during the run
        assert gc.get_freeze_count() == 0  # ...and back as it was
        assert freezes == [1]
        keep = [object() for _ in range(10)]
        real()  # the user's own freeze (gc.freeze itself, not counted)
        frozen = gc.get_freeze_count()
        # (the count falls as frozen objects die; it never drops to 0 unless unfrozen)
        assert _run_and_watch(ring, True) > frozen // 2
        assert freezes == [1]  # not frozen again over the user's freeze...
        assert gc.get_freeze_count() > frozen // 2  # ...and not undone (the old code unfroze it)
        del keep


def test_gc_freeze_is_counted_across_concurrent_acquisitions(
    ring_path: str, tmp_path: object, no_user_freeze: None
) -> None:
    with (
        RingBuffer.create(ring_path, capacity_mb=8) as one,
        RingBuffer.create(ring_path + "b", capacity_mb=8) as two,
    ):
        seen: dict[str, int] = {}

        async def main() -> None:
            async with (
                Acquisition(one, [counter("a", 200.0)], freeze_gc=True) as a,
                Acquisition(two, [counter("b", 200.0)], freeze_gc=True) as b,
            ):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(a.run)
                    tg.start_soon(b.run)
                    await anyio.sleep(0.05)
                    a.stop()
                    await anyio.sleep(0.05)
                    seen["after the first ended"] = gc.get_freeze_count()
                    b.stop()

        try:
            anyio.run(main)
        finally:
            import os

            os.unlink(ring_path + "b")
        assert seen["after the first ended"] > 0  # the other still runs: still frozen
        assert gc.get_freeze_count() == 0


def test_no_freeze_and_no_collect_on_a_loop_of_another_thread(
    ring_path: str, monkeypatch: pytest.MonkeyPatch, no_user_freeze: None
) -> None:
    collects: list[int] = []
    real = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collects.append(1) or real(*a))
    seen: list[int] = []
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:
        # A loop in another thread (as the RunEngine runs its own): off by default...
        t = threading.Thread(target=lambda: seen.append(_run_and_watch(ring, None)))
        t.start()
        t.join(60)
        assert seen == [0] and collects == []
        # ...and asked for there, it freezes without a collection of the whole heap.
        t = threading.Thread(target=lambda: seen.append(_run_and_watch(ring, True)))
        t.start()
        t.join(60)
        assert seen[1] > 0 and collects == []
        # On the main thread's own loop it collects first.
        _run_and_watch(ring, True)
        assert collects == [1]
    assert gc.get_freeze_count() == 0
