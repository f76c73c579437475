"""Real-time settings of the acquisition loop and the precise sleep under them: applied where
permitted and reported, refused with the reason where not (another user, without privileges),
undone when the run ends; the data is the same either way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest

from rust_daq import Acquisition, RingBuffer
from rust_daq._native import sleep_until
from rust_daq._realtime import RealtimeSettings, apply, restore
from rust_daq.adapters import SimulatedVoltmeter

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux scheduling")


def test_sleep_until_never_returns_early_and_says_how_late() -> None:
    for spin in (0, 20_000, 200_000):
        for ahead in (-1_000_000, 0, 300_000, 2_000_000):
            deadline = time.perf_counter_ns() + ahead
            late = sleep_until(deadline, spin)
            now = time.perf_counter_ns()
            assert now >= deadline and late >= 0
            assert late <= now - deadline + 1  # what it says is what it was (or less)
            if ahead < 0:
                assert late < 1_000_000_000  # a deadline already past: back at once
    with pytest.raises(ValueError, match="spin_ns must be >= 0"):
        sleep_until(time.perf_counter_ns(), -1)


def test_ctrl_c_interrupts_a_long_sleep() -> None:
    code = textwrap.dedent(
        """
        import time
        from rust_daq._native import sleep_until
        print("ready", flush=True)
        sleep_until(time.perf_counter_ns() + 60_000_000_000, 0)
        """
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=20)
    assert time.monotonic() - t0 < 10 and "KeyboardInterrupt" in err


@linux
def test_settings_are_applied_reported_and_undone() -> None:
    before = (os.sched_getscheduler(0), os.sched_getaffinity(0))
    s = apply(RealtimeSettings(priority=7, cpu=min(os.sched_getaffinity(0))))
    try:
        assert set(s.report) == {"sched_fifo", "timer_slack", "affinity", "mlockall"}
        for key, value in s.report.items():
            assert value.startswith(("applied", "refused: ")), (key, value)
        if s.fifo:
            assert s.report["sched_fifo"] == "applied (priority 7)"
            assert os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK == os.SCHED_FIFO
            assert os.sched_getparam(0).sched_priority == 7
        if s.report["affinity"].startswith("applied"):
            assert os.sched_getaffinity(0) == {min(before[1])}
    finally:
        restore(s)
    assert (os.sched_getscheduler(0), os.sched_getaffinity(0)) == before
    bad = apply(RealtimeSettings(cpu=10_000, lock_memory=False))
    restore(bad)
    assert bad.report["affinity"].startswith("refused: CPU 10000 is not one this process may use")
    assert bad.report["mlockall"] == "not asked for"


@linux
def test_a_realtime_run_acquires_the_same_and_restores_the_thread(ring_path: str) -> None:
    before = (os.sched_getscheduler(0), os.sched_getaffinity(0))
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:
        acq = Acquisition(ring, [SimulatedVoltmeter(rate_hz=1000, seed=1)], batch_rows=50, realtime=True)

        async def main() -> None:
            async with acq:
                await acq.run(reads=500)

        anyio.run(main)
        stats = acq.stats()
        assert stats["streams"]["voltmeter"]["rows"] == 500
        assert set(stats["realtime"]) == {"sched_fifo", "timer_slack", "affinity", "mlockall"}
        table = ring.reader().read_table("voltmeter")
        assert table.num_rows == 500
        ts = table.column("timestamp").cast("int64").to_pylist()
        assert ts == sorted(ts)
    assert (os.sched_getscheduler(0), os.sched_getaffinity(0)) == before


@linux
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_another_user_without_privileges_is_refused_and_still_acquires(ring_path: str) -> None:
    """As nobody (no CAP_SYS_NICE, RLIMIT_RTPRIO 0): SCHED_FIFO and the memory lock are
    refused, each with the reason; the run acquires every read all the same."""
    code = textwrap.dedent(
        f"""
        import os, resource, anyio, json
        from rust_daq import Acquisition, RingBuffer
        from rust_daq.adapters import SimulatedVoltmeter
        ring = RingBuffer.create({ring_path + "-nobody"!r}, capacity_mb=4)
        os.chmod(ring.path, 0o666)
        warm = Acquisition(ring, [SimulatedVoltmeter(rate_hz=500, name="warm")])
        acq = Acquisition(ring, [SimulatedVoltmeter(rate_hz=500)], realtime=True)
        async def main(a, reads):
            async with a:
                await a.run(reads=reads)
        anyio.run(main, warm, 3)  # (every module the run needs imported: nobody cannot read them)
        resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
        os.setgid(65534); os.setuid(65534)
        anyio.run(main, acq, 100)
        print(json.dumps({{"rows": acq.stats()["streams"]["voltmeter"]["rows"], **acq.stats()["realtime"]}}))
        ring.close()
        """
    )
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    finally:
        if os.path.exists(ring_path + "-nobody"):
            os.unlink(ring_path + "-nobody")
    assert r.returncode == 0, r.stderr
    import json

    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["rows"] == 100
    assert got["sched_fifo"].startswith("refused: Operation not permitted"), got
    assert got["mlockall"].startswith("refused: "), got
    assert got["affinity"].startswith("applied")  # (pinning within its own CPUs needs no privilege)


@linux
def test_memory_locked_before_is_left_to_whoever_locked_it() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(1) != 0:
        pytest.skip("mlockall is not permitted here")
    try:
        s = apply(RealtimeSettings(lock_memory=True))
        restore(s)
        assert s.report["mlockall"] == "not applied: this process has locked memory already"
        with open("/proc/self/status") as f:
            locked = next(int(line.split()[1]) for line in f if line.startswith("VmLck:"))
        assert locked > 0  # still ours: restore did not unlock it
    finally:
        libc.munlockall()


@linux
def test_the_cpu_a_loop_keeps_busy_is_the_one_a_realtime_run_pins_it_to(ring_path: str) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("one CPU: the loop keeps none to itself")
    with RingBuffer.create(ring_path, capacity_mb=8) as ring:
        fast, slow = SimulatedVoltmeter(rate_hz=1000, seed=1), SimulatedVoltmeter(rate_hz=10, seed=1)
        # A loop that spins to its deadlines takes the last CPU; one that sleeps takes none.
        assert Acquisition(ring, [fast]).loop_cpu() == allowed[-1]
        assert Acquisition(ring, [slow]).loop_cpu() is None
        assert Acquisition(ring, [slow], precise=True).loop_cpu() == allowed[-1]
        assert Acquisition(ring, [fast], precise=False).loop_cpu() is None
        # A realtime run's thread is pinned, also at 10 Hz: to the CPU asked for, or the last.
        asked = Acquisition(ring, [slow], realtime=RealtimeSettings(cpu=allowed[0]))
        assert asked.loop_cpu() == allowed[0]
        acq = Acquisition(ring, [slow], realtime=True)
        assert acq.realtime is not None
        try:
            apply(acq.realtime)
            assert acq.realtime.report["affinity"] == f"applied (CPU {acq.loop_cpu()})"
        finally:
            restore(acq.realtime)
    assert sorted(os.sched_getaffinity(0)) == allowed


def test_a_realtime_loop_sleeps_a_fifth_of_each_period_at_least() -> None:
    from rust_daq.acquisition import rt_spin_ns

    # Below the kernel's real-time throttle (95 % of each second) at any rate: a thread that
    # spins through its whole period loses 50 ms of every second to it.
    assert rt_spin_ns(1e-3) == 800_000
    assert rt_spin_ns(1 / 2000) == 400_000
    assert rt_spin_ns(1 / 10_000) == 80_000
    assert rt_spin_ns(0.1) == 800_000  # (slow schedules: 800 µs, then spin)


class _Clocks:
    """A wall clock and a thread CPU clock that the test moves by hand (ns)."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0

    def run(self, busy: int, idle: int = 0) -> None:
        self.wall += busy + idle
        self.cpu += busy


def test_the_spin_budget_keeps_a_busy_loop_below_the_kernels_real_time_throttle() -> None:
    from rust_daq._realtime import SpinBudget

    c = _Clocks()
    b = SpinBudget(share=0.85, cap_ns=50_000_000, clock=lambda: c.wall, cpu_clock=lambda: c.cpu)
    period, want = 1_000_000, 800_000
    # 1 kHz with 200 µs of work a period: spinning 800 µs each time would use it all (the
    # kernel stops the thread for the rest of the second once it used 95 %).
    used, spins = 0, []
    for _ in range(5_000):
        c.run(200_000)  # the work
        spin = b.allowed(want)
        spins.append(spin)
        c.run(spin, idle=period - 200_000 - spin)  # the spin, the rest asleep
        used += 200_000 + spin
    assert spins[0] == want  # (credit for a burst at first)
    assert used <= 0.85 * 5_000 * period + 50_000_000
    # Settled at what is left of 85 % after the work, never more than was asked.
    assert abs(spins[-1] - 650_000) <= 1_000, spins[-1]
    assert max(spins) == want and min(spins) >= 0
    # Any window of one second stays below 95 %.
    per = [200_000 + s for s in spins]
    assert max(sum(per[i : i + 1000]) for i in range(0, 4000, 50)) <= 0.95e9


def test_the_spin_budget_pays_back_a_burst_and_spins_in_full_when_the_work_is_light() -> None:
    from rust_daq._realtime import SpinBudget

    c = _Clocks()
    b = SpinBudget(share=0.85, cap_ns=50_000_000, clock=lambda: c.wall, cpu_clock=lambda: c.cpu)
    c.run(500_000_000)  # half a second of work (a slow instrument; 85 % of it is earned meanwhile)
    assert b.allowed(800_000) == 0  # no spinning: sleep to the deadline
    spins = []
    for _ in range(2_000):
        c.run(50_000)
        spins.append(b.allowed(800_000))
        c.run(spins[-1], idle=1_000_000 - 50_000 - spins[-1])
    assert spins[0] < 800_000  # paid back first...
    assert spins[-1] == 800_000  # ...then 50 µs of work and 800 µs of spin fit in 85 %
    # The credit never grows past its cap, however long the thread idles.
    c.run(0, idle=10_000_000_000)
    assert b.allowed(800_000) == 800_000
    c.run(400_000_000)  # 400 ms of work earns 340: 50 of credit, no more, leaves none
    assert b.allowed(800_000) == 0


def test_a_long_burst_costs_the_spin_at_most_one_cap_of_debt() -> None:
    from rust_daq._realtime import SpinBudget

    c = _Clocks()
    b = SpinBudget(share=0.85, cap_ns=50_000_000, clock=lambda: c.wall, cpu_clock=lambda: c.cpu)
    c.run(2_000_000_000)  # two seconds of work (the kernel has long forgotten the first)
    assert b.allowed(800_000) == 0
    periods = 0
    while b.allowed(800_000) == 0:  # 50 µs of work a period, asleep the rest
        c.run(50_000, idle=950_000)
        periods += 1
    assert periods <= 70, periods  # (50 ms of debt at 0.8 ms a period; 358 without the floor)


def test_each_thread_keeps_its_own_budget_across_runs() -> None:
    import threading

    from rust_daq._realtime import thread_budget

    mine = thread_budget()
    assert thread_budget() is mine
    other: list[object] = []
    t = threading.Thread(target=lambda: other.append(thread_budget()))
    t.start()
    t.join(10)
    assert other and other[0] is not mine


def test_the_spin_budget_follows_the_kernels_throttle() -> None:
    from rust_daq._realtime import _RT_FILES, budget_for, thread_budget

    assert budget_for(950_000, 1_000_000) == (pytest.approx(0.85), 50_000_000)  # the default
    assert budget_for(-1, 1_000_000) == (pytest.approx(0.85), 50_000_000)  # no throttle
    assert budget_for(500_000, 1_000_000) == (pytest.approx(0.40), 50_000_000)
    assert budget_for(95_000, 100_000) == (pytest.approx(0.85), 5_000_000)  # a shorter period
    assert budget_for(80_000, 1_000_000) == (0.0, 50_000_000)  # a tenth or less: never spin
    with pytest.raises(ValueError, match="sched_rt_period_us"):
        budget_for(950_000, 0)
    # Under any throttle, spinning with no work fits a twentieth of the period below it.
    for runtime, period in [
        (950_000, 1_000_000),
        (600_000, 1_000_000),
        (190_000, 200_000),
        (150_000, 1_000_000),
    ]:
        share, cap_ns = budget_for(runtime, period)
        assert share * period * 1_000 + cap_ns <= (runtime / period - 0.05) * period * 1_000 + 1
    # This machine's budget is the one its kernel's files give.
    runtime, period = (int(Path(f).read_text()) for f in _RT_FILES)
    import threading

    got: list[tuple[float, int]] = []
    t = threading.Thread(target=lambda: got.append((thread_budget().share, thread_budget().cap_ns)))
    t.start()
    t.join()
    assert got == [budget_for(runtime, period)]
