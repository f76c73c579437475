"""The instrument types a run configuration can name (``[[instruments]] type = "..."``).

Each type is one entry: the TOML ``type``, the adapter that makes the instrument, and a
pydantic model of its table (:class:`InstrumentTable`: the keys, their types and limits,
checked before anything runs; a key left out takes the adapter's own default). A new type
is one :func:`register_instrument_type` call, nothing else::

    class ThermometerTable(InstrumentTable):
        port: str
        rate_hz: Rate = 10.0

    register_instrument_type("thermometer", Thermometer, ThermometerTable)

Imported by :mod:`rust_daq.config`, not by the package (pydantic costs time to import).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo
from pydantic import field_validator as field_validator
from pydantic_core import PydanticCustomError

from .._access import control_char
from ._base import Instrument
from ._scpi import ScpiInstrument
from ._sim import SimulatedCamera, SimulatedVoltmeter

__all__ = [
    "INSTRUMENT_TYPES",
    "Finite",
    "InstrumentTable",
    "InstrumentType",
    "Rate",
    "StreamName",
    "Table",
    "register_instrument_type",
    "said",
]


def said(message: str) -> PydanticCustomError:
    """A validation error whose message is shown as it is (after the file and table), for
    problems that are not "this key must be that" (a frame too large for the ring)."""
    return PydanticCustomError("rust_daq", "{message}", {"message": message})


class Table(BaseModel):
    """A TOML table: its keys are exactly the fields (an unknown key is an error), with
    TOML's own types (no "5" for 5, no true for 1)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


#: A number that is not nan or inf (TOML has both).
Finite = Annotated[float, Field(allow_inf_nan=False)]


def _rate(value: float) -> float:
    if not 0 < value <= 100_000:
        raise ValueError("must be between 0 and 100000")
    return value


#: Reads (or frames) a second.
Rate = Annotated[float, Field(allow_inf_nan=False), AfterValidator(_rate)]


def _name(name: str) -> str:
    if not name.strip():
        raise ValueError("must be a non-empty string (it names the stream)")
    bad = control_char(name)
    if bad is not None:
        raise said(
            f"name {name!r} contains the control or unassigned character {bad!r}; use printable characters"
        )
    return name


#: An instrument's name, which names its stream. (The writer maps any other name to a valid
#: HDF5 name.)
StreamName = Annotated[str, AfterValidator(_name)]


class InstrumentTable(Table):
    """The table of one ``[[instruments]]`` entry, without its ``type``. Every instrument has
    a name (default: the adapter's)."""

    name: StreamName | None = None


@dataclass(frozen=True)
class InstrumentType:
    """One registry entry: ``make(**table)`` (the keys given, validated) makes the instrument."""

    make: Callable[..., Instrument]
    table: type[InstrumentTable]

    def build(self, table: InstrumentTable) -> Instrument:
        return self.make(**table.model_dump(exclude_unset=True))


#: TOML ``type`` -> the entry; in the order a config error lists them.
INSTRUMENT_TYPES: dict[str, InstrumentType] = {}


def register_instrument_type(
    name: str, make: Callable[..., Instrument], table: type[InstrumentTable]
) -> None:
    """Makes ``type = "<name>"`` in a config's ``[[instruments]]`` mean ``make(**table)``."""
    INSTRUMENT_TYPES[name] = InstrumentType(make, table)


# -- the built-in types ---------------------------------------------------------------------------


class VoltmeterTable(InstrumentTable):
    rate_hz: Rate = 100.0
    amplitude: Finite = 1.0
    frequency_hz: Finite = 5.0
    noise: Finite = 0.01
    seed: int | None = None


def _shape(value: Any) -> Any:
    if not (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value)
    ):
        raise ValueError("must be [height, width], two positive integers")
    return tuple(value)


class CameraTable(InstrumentTable):
    fps: Rate = 10.0
    shape: Annotated[tuple[int, int], BeforeValidator(_shape)] = (256, 256)
    seed: int | None = None

    @field_validator("shape")
    @classmethod
    def _fits_the_ring(cls, shape: tuple[int, int], info: ValidationInfo) -> tuple[int, int]:
        """A frame (uint16) must fit in a record of the ring (``context["capacity_mb"]``)."""
        capacity_mb = (info.context or {}).get("capacity_mb")
        if capacity_mb is None:
            return shape
        frame = shape[0] * shape[1] * 2
        room = int(capacity_mb * (1 << 20)) - (64 << 10)
        if frame > room:
            raise said(
                f"shape {list(shape)!r} makes frames of {frame / 1e6:,.1f} MB, more than a record of "
                f"the ring ([ring] capacity_mb = {capacity_mb:g}) holds ({max(room, 0) / 1e6:,.1f} MB); "
                "use a smaller shape or a larger capacity_mb"
            )
        return shape


class ScpiTable(InstrumentTable):
    resource: str = Field(description="a VISA resource string")
    query: str = "MEAS:VOLT:DC?"
    column: str = "voltage"
    units: str = "V"
    rate_hz: Rate = 10.0
    backend: str = ""


register_instrument_type("voltmeter", SimulatedVoltmeter, VoltmeterTable)
register_instrument_type("camera", SimulatedCamera, CameraTable)
register_instrument_type("scpi", ScpiInstrument, ScpiTable)
