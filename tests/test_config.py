"""The run configuration's schema (rust_daq.config), the instrument registry, and the writer's
options as one value: in-process, plus one real `rust-daq run` of a registered type."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import pytest

from rust_daq import ConfigError
from rust_daq.config import load_config
from rust_daq.hdf5 import process
from rust_daq.hdf5.options import WriterOptions

_V = '[[instruments]]\ntype = "voltmeter"\n'


def refused(tmp_path: Path, toml: str) -> list[str]:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    lines = str(e.value).splitlines()
    assert all(line.startswith(str(cfg)) for line in lines), lines
    assert "pydantic" not in str(e.value) and "validation error" not in str(e.value)
    return [line.removeprefix(str(cfg)) for line in lines]


@pytest.mark.parametrize(
    ("toml", "line"),
    [
        (
            _V + 'name = ""\n',
            " [[instruments]] #1: name must be a non-empty string (it names the stream), got ''",
        ),
        ("duration = nan\n" + _V, ": duration must be a finite number, got nan"),
        (
            '[[instruments]]\ntype = "camera"\nshape = [2.5, 3.0]\n',
            " [[instruments]] #1: shape must be [height, width], two positive integers, got [2.5, 3.0]",
        ),
        (
            '[writer]\ncompression = "gzip:99"\n' + _V,
            " [writer]: compression 'gzip:99': a gzip level is 0 (none) to 9 (smallest), got '99'",
        ),
        ("[ring]\ncapacity_mb = nan\n" + _V, " [ring]: capacity_mb must be a finite number, got nan"),
        ("[ring]\nschema_mb = 0\n" + _V, " [ring]: schema_mb must be a positive number of MiB, got 0"),
        ("[ring]\ncapacity_mb = true\n" + _V, " [ring]: capacity_mb must be a number, got True"),
        (
            "[ring]\nsize = 5\n" + _V,
            " [ring]: unknown key 'size'; allowed: capacity_mb, keep, path, policy, schema_mb",
        ),
        (
            '[writer]\nformat = "h5"\n' + _V,
            " [writer]: unknown key 'format'; allowed: compression, enabled, flush_interval, layout, output",
        ),
        (
            '[[instruments]]\ntype = "camera"\nexposure = 3\n',
            " [[instruments]] #1: unknown key 'exposure'; allowed: fps, name, seed, shape",
        ),
        ("ring = 5\n" + _V, ": ring must be a table, got 5"),
        (_V + 'seed = "x"\n', " [[instruments]] #1: seed must be an integer, got 'x'"),
        ("[daemon]\ndata_dir = 3\n" + _V, " [daemon]: data_dir must be a string, got 3"),
    ],
)
def test_each_bad_value_is_named_with_its_table_key_and_what_is_allowed(
    tmp_path: Path, toml: str, line: str
) -> None:
    assert refused(tmp_path, toml) == [line]


def test_every_problem_is_said_at_once_one_line_each(tmp_path: Path) -> None:
    lines = refused(
        tmp_path,
        'duration = inf\n[ring]\npolicy = "drop"\n[writer]\nlayout = "rows"\n'
        + _V
        + "rate_hz = 0\n"
        + '[[instruments]]\ntype = "camera"\nshape = [16]\nfps = true\n'
        + '[[instruments]]\ntype = "thermometer"\n',
    )
    assert lines == [
        ": duration must be a finite number, got inf",
        " [ring]: policy must be 'overwrite' or 'block', got 'drop'",
        " [writer]: layout must be 'append' or 'batches', got 'rows'",
        " [[instruments]] #1: rate_hz must be between 0 and 100000, got 0",
        " [[instruments]] #2: fps must be a number, got True",
        " [[instruments]] #2: shape must be [height, width], two positive integers, got [16]",
        " [[instruments]] #3: unknown instrument type 'thermometer'; allowed: voltmeter, camera, scpi",
    ]


def test_a_good_config_makes_the_session_it_says(tmp_path: Path) -> None:
    cfg = tmp_path / "good.toml"
    cfg.write_text(
        'duration = 2\n[ring]\npath = "lab-x"\ncapacity_mb = 8\nschema_mb = 3\npolicy = "block"\nkeep = true\n'
        '[writer]\noutput = "o.h5"\nlayout = "batches"\ncompression = "gzip:3"\nflush_interval = 2\n'
        '[metadata]\nsample = "Si"\n' + _V + 'name = "dmm"\nrate_hz = 50\n'
        '[[instruments]]\ntype = "camera"\nshape = [4, 6]\n'
    )
    s = load_config(cfg)
    assert (s.ring_path, s.capacity_mb, s.policy, s.own_ring) == ("/dev/shm/lab-x", 8, "block", False)
    assert s.schema_mb == 3 and s.realtime is None
    assert (s.output, s.layout, s.compression, s.flush_interval) == ("o.h5", "batches", "gzip:3", 2.0)
    assert s.duration == 2 and s.metadata == {"sample": "Si"}
    dmm, camera = s.instruments
    assert (dmm.name, dmm.rate_hz) == ("dmm", 50.0)
    assert camera.name == "camera" and camera.shape == (4, 6)  # type: ignore[union-attr]


# -- the registry ---------------------------------------------------------------------------------

_THERMOMETER = """
import sys
import pyarrow as pa
from rust_daq.adapters import CallableInstrument
from rust_daq.adapters.registry import InstrumentTable, Rate, register_instrument_type


class ThermometerTable(InstrumentTable):
    kelvin: float
    rate_hz: Rate = 10.0


def thermometer(*, kelvin: float, name: str = "thermometer", rate_hz: float = 10.0) -> CallableInstrument:
    return CallableInstrument(lambda: kelvin, name, rate_hz=rate_hz, column="temperature", units={"temperature": "K"})


register_instrument_type("thermometer", thermometer, ThermometerTable)

from rust_daq.cli import main

sys.argv = ["rust-daq", *sys.argv[1:]]
main()
"""


def test_a_registered_instrument_type_runs_through_rust_daq_run(tmp_path: Path) -> None:
    """One register_instrument_type call, nothing in cli.py or config.py: its table is
    checked like the built-in ones, and `rust-daq run` acquires and writes it."""
    script = tmp_path / "with_thermometer.py"
    script.write_text(_THERMOMETER)
    out = tmp_path / "t.h5"
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        textwrap.dedent(f"""
        duration = 1.0
        [writer]
        output = "{out}"
        flush_interval = 0.2
        [[instruments]]
        type = "thermometer"
        name = "cryostat"
        kelvin = 4.2
        rate_hz = 50
        """)
    )
    r = subprocess.run(
        [sys.executable, str(script), "run", str(cfg), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    with h5py.File(out, "r") as f:
        t = f["measurements/cryostat/temperature"]
        assert t.shape[0] > 10 and set(t[()]) == {4.2} and t.attrs["units"] == "K"
    assert f"│ cryostat │ {t.shape[0]:>4} │ {t.shape[0]:>7} │" in r.stdout, (
        "every row acquired is in the file"
    )
    cfg.write_text('[[instruments]]\ntype = "thermometer"\nkelvin = "cold"\nspeed = 1\n')
    r = subprocess.run(
        [sys.executable, str(script), "run", str(cfg), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert f"{cfg} [[instruments]] #1: kelvin must be a number, got 'cold'" in r.stderr
    assert f"{cfg} [[instruments]] #1: unknown key 'speed'; allowed: kelvin, name, rate_hz" in r.stderr


# -- the writer's options -------------------------------------------------------------------------


def test_the_writers_options_go_through_its_command_line_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[WriterOptions] = []
    monkeypatch.setattr(process, "run", lambda options: seen.append(options) or 0)
    for options in (
        WriterOptions(ring="r", output="o.h5"),
        WriterOptions(
            ring="/dev/shm/r",
            output="/tmp/o.h5",
            layout="batches",
            flush_interval=0.25,
            compression="gzip:1",
            swmr=False,
            streams=("a", "b c"),
            metadata={"sample": "Si", "n": 3},
            parent_pipe=True,
            remove_ring_if_orphaned=True,
        ),
    ):
        assert process.main(options.argv()) == 0
        assert seen.pop() == options


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layout": "rows"}, "layout must be 'append' or 'batches', got 'rows'"),
        ({"flush_interval": float("nan")}, "flush_interval must be a positive number of seconds, got nan"),
        ({"flush_interval": 0}, "flush_interval must be a positive number of seconds, got 0"),
        ({"compression": "zip"}, "unknown compression 'zip'"),
        ({"compression": "gzip:99"}, "a gzip level is 0 \\(none\\) to 9"),
    ],
)
def test_bad_writer_options_are_refused_when_made(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        WriterOptions(ring="r", output="o.h5", **kwargs)  # type: ignore[arg-type]


def test_the_writer_command_says_what_is_wrong_with_exit_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert process.main(["--ring", "r", "--output", "o.h5", "--layout", "rows"]) == 2
    assert "--layout" in capsys.readouterr().err
    assert process.main(["--ring", "r", "--output", "o.h5", "--metadata", "{not json"]) == 2
    assert "rust_daq.writer: " in capsys.readouterr().err
    assert process.main(["--output", "o.h5"]) == 2
    assert "--ring and --output are required" in capsys.readouterr().err
    assert process.main(["--help"]) == 0
    assert "--remove-ring-if-orphaned" in capsys.readouterr().out


def test_the_acquisition_table_asks_for_realtime(tmp_path: Path) -> None:
    cfg = tmp_path / "rt.toml"
    cfg.write_text("[acquisition]\nrealtime = true\npriority = 20\ncpu = 0\n" + _V)
    assert load_config(cfg).realtime == {"priority": 20, "cpu": 0}
    cfg.write_text("[acquisition]\nrealtime = true\npriority = 0\n" + _V)
    with pytest.raises(ConfigError, match=r"\[acquisition\]: priority"):
        load_config(cfg)
