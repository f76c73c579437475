"""Over 10,000 mutated ring files opened and read in CI (hypothesis): every one gives records
or a clear rust-daq error, never a crash, a hang or a SIGBUS (which would end the run). Rings
with Arrow streams go through every Arrow entry point too (``streams()``, ``latest()``,
``read_batches()``, ``read_table()``): only rust-daq errors may escape them, never a raw
pyarrow or EOFError. Longer runs: `python fuzz/fuzz_ring.py` (atheris, coverage-guided)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzzing

FUZZ = settings(max_examples=4000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _write(path: str, data: bytes | bytearray) -> None:
    with open(path, "wb") as f:
        f.write(data)


@FUZZ
@given(mutations=st.lists(st.tuples(st.integers(0, 447), st.integers(0, 255)), min_size=1, max_size=12))
def test_mutated_headers(ring_path: str, mutations: list[tuple[int, int]]) -> None:
    data = bytearray(fuzzing.pristine())
    for at, value in mutations:
        data[at] = value
    _write(ring_path, data)
    fuzzing.open_and_drain(ring_path)


@FUZZ
@given(mutations=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=24))
def test_mutated_records(ring_path: str, mutations: list[tuple[int, int]]) -> None:
    data = bytearray(fuzzing.pristine())
    for at, value in mutations:
        data[fuzzing.DATA + at] = value
    _write(ring_path, data)
    fuzzing.open_and_drain(ring_path)


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.binary(min_size=448, max_size=448))
def test_random_headers(ring_path: str, header: bytes) -> None:
    rest = fuzzing.pristine()[448:]
    _write(ring_path, header + rest)
    fuzzing.open_and_drain(ring_path)
    _write(ring_path, b"RDAQRING" + header[8:] + rest)  # past the magic check
    fuzzing.open_and_drain(ring_path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(0, 2 * len(fuzzing.pristine())))
def test_truncated_and_extended_files(ring_path: str, size: int) -> None:
    data = fuzzing.pristine()
    _write(ring_path, data[:size] + bytes(max(0, size - len(data))))
    fuzzing.open_and_drain(ring_path)


ARROW = settings(
    max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@ARROW
@given(mutations=st.lists(st.tuples(st.integers(0, 2047), st.integers(0, 255)), min_size=1, max_size=12))
def test_mutated_schema_tables(ring_path: str, mutations: list[tuple[int, int]]) -> None:
    data = bytearray(fuzzing.pristine_arrow())
    for at, value in mutations:
        data[fuzzing.SCHEMAS + at] = value
    _write(ring_path, data)
    fuzzing.open_and_decode(ring_path)


@ARROW
@given(
    mutations=st.lists(
        st.tuples(st.integers(0, fuzzing.ARROW_CAPACITY - 1), st.integers(0, 255)), min_size=1, max_size=24
    )
)
def test_mutated_arrow_records(ring_path: str, mutations: list[tuple[int, int]]) -> None:
    data = bytearray(fuzzing.pristine_arrow())
    for at, value in mutations:
        data[fuzzing.DATA + at] = value
    _write(ring_path, data)
    fuzzing.open_and_decode(ring_path)


@ARROW
@given(
    record=st.integers(0, fuzzing.ARROW_CAPACITY // 64 - 1),
    schema_id=st.integers(0, 8),
    stream=st.integers(0, 4),
)
def test_mutated_schema_and_stream_ids(ring_path: str, record: int, schema_id: int, stream: int) -> None:
    """A record header's schema id and stream id point at another (or no) schema: the payload
    then does not decode as what the header says (a plain record taken for Arrow: EOFError)."""
    data = bytearray(fuzzing.pristine_arrow())
    at = fuzzing.DATA + 64 * record
    data[at + 48 : at + 52] = schema_id.to_bytes(4, "little")
    data[at + 12 : at + 16] = stream.to_bytes(4, "little")
    _write(ring_path, data)
    fuzzing.open_and_decode(ring_path)
