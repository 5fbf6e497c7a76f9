//! virtio devices and their virtio-mmio transport.
//!
//! Contract between the transport and the devices (the VMM core relies on it too):
//! - `mmio::MmioTransport::new(mem, Box<dyn VirtioDevice>)` implements [`super::BusDevice`]; the core
//!   registers it on the MMIO bus, registers each of `queue_events()` as a KVM ioeventfd on
//!   `base + 0x50` (QueueNotify) with the queue index as datamatch, and `interrupt_event()` as a KVM irqfd
//!   on the device's GSI.
//! - On DRIVER_OK the transport calls [`VirtioDevice::activate`] once; the device then serves its queues on
//!   its own worker thread(s) and raises interrupts through [`VirtioInterrupt`].
//! - A driver reset (Status = 0) calls [`VirtioDevice::reset`], which stops the worker; a later DRIVER_OK
//!   activates again. All devices here support it.
//!
//! Devices (each `Box::new(..)` into `MmioTransport::new`):
//! - [`Vsock::new(cid, uds_path)`](Vsock::new): hybrid vsock; binds the Unix socket at once (a stale socket
//!   file is replaced, a live one is an error) and removes it on drop. Host connections made before the guest
//!   driver is up wait in the listen backlog.
//! - [`Block::new(path, read_only)`](Block::new): raw image; capacity = file size / 512; `.with_id(id)` sets
//!   the GET_ID answer (the VMM passes `capsa-vdX` or the configured id, never anything of the host file).
//! - [`Rng::new()`](Rng::new): entropy from the host's `/dev/urandom`.
//! - [`Fs::new(&FsConfig)`](Fs::new): virtio-fs served by a vhost-user backend (virtiofsd); connects and
//!   negotiates at once (no backend = error). Needs guest memory from `crate::memory::create(.., true)`.
//! - [`Net::new(tap, mac, mtu)`](Net::new): virtio-net over a TAP interface ([`net::Tap::open`] by name or
//!   [`net::Tap::from_fd`] for an inherited tap fd); one queue pair, emulated in user space.
//!
//! Rules every device follows: descriptor chains are walked and validated first (`chain.rs`: inside guest
//! memory, readable before writable, terminated, at most 256 descriptors and never more than the queue size,
//! no indirect descriptors unless VIRTIO_RING_F_INDIRECT_DESC was negotiated, bounded length); an invalid
//! chain is returned used with length 0 and logged through `guest_warn!`/`guest_error!` (rate-limited per
//! call site, `crate::log_limit`), and the device goes on with the next chain; guest-controlled values never
//! panic or index out of bounds. Workers check for a stop between chains (`worker::stop_requested`).

pub mod block;
mod chain;
pub mod fs;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod vsock;
mod worker;

pub use block::Block;
pub use fs::Fs;
pub use net::Net;
pub use rng::Rng;
pub use vsock::Vsock;

/// Feature bit every modern (virtio 1.x) device offers and every driver must accept.
pub const VIRTIO_F_VERSION_1: u32 = 32;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::GuestMemoryMmap;

/// `InterruptStatus` bit: the device used buffers in a queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x1;
/// `InterruptStatus` bit: the device's configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x2;

/// The interrupt line of one virtio-mmio device: the `InterruptStatus` register plus the irqfd that the VMM
/// core wires to the device's GSI.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    event: EventFd,
}

impl VirtioInterrupt {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Tell the driver that a queue has new used buffers.
    pub fn signal_used_queue(&self) -> std::io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_VRING)
    }

    /// Tell the driver that the device configuration space changed.
    pub fn signal_config_change(&self) -> std::io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_CONFIG)
    }

    fn signal(&self, bit: u32) -> std::io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.event.write(1)
    }

    /// Current `InterruptStatus` register value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// `InterruptACK`: clear the acknowledged bits.
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The eventfd to register as a KVM irqfd.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

/// Why a device could not start serving its queues.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device expects {expected} queues, driver set up {actual}")]
    QueueCount { expected: usize, actual: usize },
    #[error("device already activated")]
    AlreadyActive,
    #[error("cannot start device worker: {0}")]
    Worker(#[from] std::io::Error),
    #[error("{0}")]
    Backend(String),
}

/// The one queue of a single-queue device (blk, rng), or the error naming how many the driver set up.
pub fn single_queue(queues: Vec<(Queue, EventFd)>) -> Result<(Queue, EventFd), ActivateError> {
    let actual = queues.len();
    match <[(Queue, EventFd); 1]>::try_from(queues) {
        Ok([queue]) => Ok(queue),
        Err(_) => Err(ActivateError::QueueCount {
            expected: 1,
            actual,
        }),
    }
}

/// Reads `data.len()` bytes at `offset` of a device's configuration space `config` into `data`; a read that
/// does not lie wholly inside it leaves `data` zeroed (a guest may read any offset and width).
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = start
        .checked_add(data.len())
        .and_then(|end| config.get(start..end))
    {
        data.copy_from_slice(src);
    }
}

/// One virtio device behind a transport. Implementations live one per folder/file next to this module.
pub trait VirtioDevice: Send {
    /// virtio device ID (1 net, 2 block, 4 rng, 19 vsock, 26 fs, ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (VIRTIO_F_VERSION_1 included).
    fn avail_features(&self) -> u64;
    /// Features the driver accepted (a subset of `avail_features`, checked by the transport).
    fn set_acked_features(&mut self, features: u64);
    /// Read the device-specific configuration space; out-of-range reads leave `data` zeroed.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write the device-specific configuration space; out-of-range writes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Start serving: called once, on DRIVER_OK, with the queues the driver configured and the ioeventfd
    /// that signals each of them.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<(Queue, EventFd)>,
    ) -> Result<(), ActivateError>;
    /// Stop serving after a driver reset. Returns false when the device cannot be reset.
    fn reset(&mut self) -> bool {
        false
    }
}

#[cfg(test)]
mod config_space_tests {
    use super::read_config_space;

    #[test]
    fn reads_inside_and_zeroes_outside() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [9u8; 2];
        read_config_space(&cfg, 1, &mut d);
        assert_eq!(d, [2, 3]);
        for (off, len) in [(3, 2), (4, 1), (u64::MAX, 1), (u64::from(u32::MAX) + 7, 4)] {
            let mut d = vec![9u8; len];
            read_config_space(&cfg, off, &mut d);
            assert!(d.iter().all(|b| *b == 0), "offset {off} len {len}: {d:?}");
        }
    }
}
