//! Ports and MMIO ranges a guest may touch that capsa does not model (POST code 0x80, COM2-4, PCI config space,
//! ...): writes vanish, reads return all-ones like an empty ISA/PCI bus.

use tracing::trace;

use crate::devices::BusDevice;

pub struct Ignored {
    name: &'static str,
}

impl Ignored {
    pub fn new(name: &'static str) -> Self {
        Self { name }
    }
}

impl BusDevice for Ignored {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        trace!("{}: read offset {offset:#x} len {}", self.name, data.len());
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        trace!("{}: write offset {offset:#x} {data:x?}", self.name);
    }
}
