//! virtio-mmio transport (virtio 1.x, "version 2" register layout). PLACEHOLDER: the virtio work replaces it.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::{VirtioDevice, VirtioInterrupt};
use crate::devices::{BusDevice, GuestMemoryMmap};

/// Size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register, where the core registers the queue ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

pub struct MmioTransport {
    #[allow(dead_code)]
    mem: GuestMemoryMmap,
    #[allow(dead_code)]
    device: Box<dyn VirtioDevice>,
    queue_events: Vec<EventFd>,
    interrupt: Arc<VirtioInterrupt>,
}

impl MmioTransport {
    pub fn new(mem: GuestMemoryMmap, device: Box<dyn VirtioDevice>) -> std::io::Result<Self> {
        let queue_events = device
            .queue_max_sizes()
            .iter()
            .map(|_| EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self { mem, device, queue_events, interrupt: Arc::new(VirtioInterrupt::new()?) })
    }

    /// One eventfd per queue, to register as ioeventfd on `base + QUEUE_NOTIFY_OFFSET` (datamatch = index).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The eventfd to register as irqfd on the device's GSI.
    pub fn interrupt_event(&self) -> &EventFd {
        self.interrupt.event()
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}
