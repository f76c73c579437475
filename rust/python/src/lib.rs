//! `rust_daq._native`: the PyO3 layer over `rust-daq-core`. It translates types, errors and
//! the GIL; the ring logic lives in the core crate.

mod buffer;
mod bulk;
mod errors;
mod reader;
mod reserve;
mod ring;
mod rows;
mod wait;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ring::RingBuffer>()?;
    m.add_class::<reader::RingReader>()?;
    m.add_class::<reader::Record>()?;
    m.add_class::<buffer::MapView>()?;
    m.add_class::<ring::MappingGuard>()?;
    m.add_class::<reserve::Reservation>()?;
    m.add_class::<rows::RowTable>()?;
    m.add_function(wrap_pyfunction!(wait::sleep_until, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add(
        "RECORD_HEADER_SIZE",
        rust_daq_core::format::RECORD_HEADER_SIZE,
    )?;
    m.add("RECORD_ALIGN", rust_daq_core::format::RECORD_ALIGN)?;
    m.add("FORMAT_VERSION", rust_daq_core::format::VERSION)?;
    m.add("MAX_CAPACITY", rust_daq_core::format::MAX_CAPACITY)?;
    Ok(())
}
