//! Crate-internal device code exposed to the cargo-fuzz targets in `fuzz/` (feature `fuzzing`, which no
//! build of capsa itself enables). Only re-exports and thin synchronous wrappers around the code the device
//! workers run: nothing here changes what a device does.

pub use super::block::fuzz::BlockHarness;
pub use super::chain::{Chain, ChainError, Cursor, DeviceQueue, Segments};
pub use super::vsock::fuzz::VsockHarness;
