//! Devices the VMM exposes to the guest.
//!
//! Every device is reached through a [`BusDevice`] registered on the PIO or MMIO bus at a fixed base
//! address; the vCPU threads dispatch their exits to it. Legacy devices live in `legacy/`, virtio in `virtio/`.

pub mod legacy;
pub mod virtio;

/// Guest memory as every device sees it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// A device on the port-I/O or MMIO bus. `offset` is relative to the base the device was registered at.
///
/// Implementations must accept any `offset` and any `data` length a guest can produce: an access they do not
/// understand is ignored (reads return zeroes), never a panic.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}
