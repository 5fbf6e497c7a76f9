//! Legacy PC devices on the port-I/O bus: COM1, the i8042 reset line, CMOS/RTC, the boot timer, and a sink for
//! the ports Linux pokes that capsa does not model.

pub mod boot_timer;
pub mod cmos;
pub mod i8042;
pub mod ignored;
pub mod serial;

pub use boot_timer::BootTimer;
pub use cmos::Cmos;
pub use i8042::I8042;
pub use ignored::Ignored;
pub use serial::{EventFdTrigger, SerialDevice, DEFAULT_CONSOLE_LIMIT};
