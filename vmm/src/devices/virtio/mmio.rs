//! virtio-mmio transport (virtio 1.x, "version 2" register layout).
//!
//! Registers are 32 bits wide and only 4-byte aligned 4-byte accesses to them are honoured; the device
//! configuration space at 0x100 accepts any size. Anything else a guest does is ignored (reads give zeroes).

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::devices::{BusDevice, GuestMemoryMmap};

/// Size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register, where the core registers the queue ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// Modern (virtio 1.x) register layout.
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest ("CAPS").
pub const MMIO_VENDOR_ID: u32 = 0x5350_4143;

// Register offsets.
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

/// Device status bits.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// The driver's view of one queue, kept by the transport until activation turns it into a [`Queue`].
#[derive(Debug, Clone, Default)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ..Default::default()
        }
    }

    fn to_queue(&self) -> Option<Queue> {
        let mut q = Queue::new(self.max_size).ok()?;
        q.try_set_size(self.size).ok()?;
        q.try_set_desc_table_address(GuestAddress(self.desc)).ok()?;
        q.try_set_avail_ring_address(GuestAddress(self.driver))
            .ok()?;
        q.try_set_used_ring_address(GuestAddress(self.device))
            .ok()?;
        q.set_ready(self.ready);
        Some(q)
    }
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Box<dyn VirtioDevice>,
    queue_events: Vec<EventFd>,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<QueueConfig>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    activated: bool,
    config_generation: u32,
}

impl MmioTransport {
    pub fn new(mem: GuestMemoryMmap, device: Box<dyn VirtioDevice>) -> std::io::Result<Self> {
        let queues: Vec<QueueConfig> = device
            .queue_max_sizes()
            .iter()
            .map(|&m| QueueConfig::new(m))
            .collect();
        let queue_events = queues
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            mem,
            device,
            queue_events,
            interrupt: Arc::new(VirtioInterrupt::new()?),
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            activated: false,
            config_generation: 0,
        })
    }

    /// One eventfd per queue, to register as ioeventfd on `base + QUEUE_NOTIFY_OFFSET` (datamatch = index).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The eventfd to register as irqfd on the device's GSI.
    pub fn interrupt_event(&self) -> &EventFd {
        self.interrupt.event()
    }

    /// Current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device is serving its queues.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue configuration may change between FEATURES_OK and DRIVER_OK, for a queue not yet ready.
    fn queue_config_writable(&self) -> bool {
        self.status & STATUS_FEATURES_OK != 0
            && self.status & (STATUS_DRIVER_OK | STATUS_FAILED) == 0
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            REG_MAGIC => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => MMIO_VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size)),
            REG_QUEUE_NUM => q.map_or(0, |q| u32::from(q.size)),
            REG_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            REG_QUEUE_DESC_LOW => q.map_or(0, |q| q.desc as u32),
            REG_QUEUE_DESC_HIGH => q.map_or(0, |q| (q.desc >> 32) as u32),
            REG_QUEUE_DRIVER_LOW => q.map_or(0, |q| q.driver as u32),
            REG_QUEUE_DRIVER_HIGH => q.map_or(0, |q| (q.driver >> 32) as u32),
            REG_QUEUE_DEVICE_LOW => q.map_or(0, |q| q.device as u32),
            REG_QUEUE_DEVICE_HIGH => q.map_or(0, |q| (q.device >> 32) as u32),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            // No shared memory regions: length all ones means "does not exist".
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!(offset, "virtio-mmio: read of unknown register");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => {
                if self.status & STATUS_DRIVER == 0
                    || self.status & (STATUS_FEATURES_OK | STATUS_FAILED) != 0
                {
                    crate::guest_warn!(
                        status = self.status,
                        "virtio-mmio: feature write in wrong state ignored"
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => set_low(&mut self.acked_features, v),
                    1 => set_high(&mut self.acked_features, v),
                    _ => {
                        if v != 0 {
                            crate::guest_warn!(
                                sel = self.driver_features_sel,
                                "virtio-mmio: unknown features acked"
                            )
                        }
                    }
                }
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NOTIFY => self.notify(v),
            REG_INTERRUPT_ACK => self.interrupt.acknowledge(v),
            REG_STATUS => self.write_status(v),
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, v),
            _ => tracing::debug!(
                offset,
                v,
                "virtio-mmio: write to unknown or read-only register ignored"
            ),
        }
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        if !self.queue_config_writable() {
            crate::guest_warn!(
                offset,
                status = self.status,
                "virtio-mmio: queue register write in wrong state ignored"
            );
            return;
        }
        let Some(q) = self.selected_queue() else {
            crate::guest_warn!(
                offset,
                "virtio-mmio: queue register write for a queue that does not exist"
            );
            return;
        };
        if offset == REG_QUEUE_READY {
            q.ready = v == 1;
            return;
        }
        if q.ready {
            crate::guest_warn!(
                offset,
                "virtio-mmio: write to a ready queue's configuration ignored"
            );
            return;
        }
        match offset {
            REG_QUEUE_NUM => {
                // Split virtqueues: a power of two no larger than the maximum.
                if v == 0 || v > u32::from(q.max_size) || !v.is_power_of_two() {
                    crate::guest_warn!(
                        size = v,
                        max = q.max_size,
                        "virtio-mmio: bad queue size ignored"
                    );
                } else {
                    q.size = v as u16;
                }
            }
            REG_QUEUE_DESC_LOW => set_low(&mut q.desc, v),
            REG_QUEUE_DESC_HIGH => set_high(&mut q.desc, v),
            REG_QUEUE_DRIVER_LOW => set_low(&mut q.driver, v),
            REG_QUEUE_DRIVER_HIGH => set_high(&mut q.driver, v),
            REG_QUEUE_DEVICE_LOW => set_low(&mut q.device, v),
            REG_QUEUE_DEVICE_HIGH => set_high(&mut q.device, v),
            _ => {}
        }
    }

    /// A QueueNotify write the ioeventfd did not catch (no ioeventfd registered, or a test).
    fn notify(&mut self, index: u32) {
        match self.queue_events.get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    crate::guest_warn!(error = %e, "virtio-mmio: cannot signal queue event");
                }
            }
            None => {
                crate::guest_warn!(index, "virtio-mmio: notify for a queue that does not exist")
            }
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if self.status & STATUS_DEVICE_NEEDS_RESET != 0 && v & STATUS_FAILED == 0 {
            crate::guest_warn!("virtio-mmio: device needs reset; status write ignored");
            return;
        }
        // The driver only ever adds bits (besides reset).
        if v & self.status != self.status {
            crate::guest_warn!(
                old = self.status,
                new = v,
                "virtio-mmio: status write clears bits; ignored"
            );
            return;
        }
        let added = v & !self.status;
        if added & STATUS_FAILED != 0 {
            self.status |= STATUS_FAILED;
            return;
        }
        let ordered = |bit: u32, needs: u32| added & bit == 0 || v & needs == needs;
        if !ordered(STATUS_DRIVER, STATUS_ACKNOWLEDGE)
            || !ordered(STATUS_FEATURES_OK, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
            || !ordered(
                STATUS_DRIVER_OK,
                STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
            )
        {
            crate::guest_warn!(
                old = self.status,
                new = v,
                "virtio-mmio: status bits set out of order; ignored"
            );
            return;
        }
        let mut new = self.status | (added & (STATUS_ACKNOWLEDGE | STATUS_DRIVER));
        if added & STATUS_FEATURES_OK != 0 {
            if self.features_acceptable() {
                self.device.set_acked_features(self.acked_features);
                new |= STATUS_FEATURES_OK;
            } else {
                crate::guest_warn!(
                    acked = self.acked_features,
                    offered = self.device.avail_features(),
                    "virtio-mmio: driver features refused"
                );
            }
        }
        self.status = new;
        if added & STATUS_DRIVER_OK != 0 && self.status & STATUS_FEATURES_OK != 0 {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.avail_features();
        self.acked_features & !offered == 0
            && self.acked_features & (1u64 << VIRTIO_F_VERSION_1) != 0
    }

    fn activate(&mut self) {
        if self.activated {
            return;
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, cfg) in self.queues.iter().enumerate() {
            let queue = match cfg.to_queue() {
                Some(q) if !cfg.ready || q.is_valid(&self.mem) => q,
                _ => {
                    crate::guest_error!(
                        queue = i,
                        "virtio-mmio: invalid queue configuration at DRIVER_OK"
                    );
                    self.needs_reset();
                    return;
                }
            };
            let evt = match self.queue_events.get(i).map(EventFd::try_clone) {
                Some(Ok(e)) => e,
                _ => {
                    crate::guest_error!(queue = i, "virtio-mmio: cannot clone queue eventfd");
                    self.needs_reset();
                    return;
                }
            };
            queues.push((queue, evt));
        }
        match self
            .device
            .activate(self.mem.clone(), self.interrupt.clone(), queues)
        {
            Ok(()) => {
                self.activated = true;
                self.status |= STATUS_DRIVER_OK;
            }
            Err(e) => {
                crate::guest_error!(error = %e, device = self.device.device_type(), "virtio-mmio: activation failed");
                self.needs_reset();
            }
        }
    }

    fn needs_reset(&mut self) {
        self.status |= STATUS_DEVICE_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        if let Err(e) = self.interrupt.signal_config_change() {
            crate::guest_warn!(error = %e, "virtio-mmio: cannot signal config change");
        }
    }

    fn reset(&mut self) {
        if self.activated {
            if !self.device.reset() {
                crate::guest_warn!(
                    device = self.device.device_type(),
                    "virtio-mmio: device cannot be reset"
                );
                self.status |= STATUS_DEVICE_NEEDS_RESET;
                return;
            }
            self.activated = false;
        }
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        for evt in &self.queue_events {
            let _ = evt.read();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.interrupt.acknowledge(u32::MAX);
    }
}

const REG_QUEUE_NOTIFY: u64 = QUEUE_NOTIFY_OFFSET;

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_SPACE {
            if let Some(cfg_off) = offset.checked_sub(CONFIG_SPACE) {
                self.device.read_config(cfg_off, data);
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: bad register read size"
            );
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if self.status & STATUS_FAILED != 0 {
                return;
            }
            self.device.write_config(offset - CONFIG_SPACE, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: bad register write size"
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::ActivateError;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A device that records what the transport does to it.
    struct Dummy {
        acked: Arc<std::sync::Mutex<u64>>,
        activations: Arc<AtomicUsize>,
        resets: Arc<AtomicUsize>,
        config: [u8; 8],
        can_reset: bool,
    }

    const DUMMY_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << 3);

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn avail_features(&self) -> u64 {
            DUMMY_FEATURES
        }
        fn set_acked_features(&mut self, f: u64) {
            *self.acked.lock().unwrap() = f;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let Ok(off) = usize::try_from(offset) else {
                return;
            };
            if let Some(src) = self.config.get(off..off.saturating_add(data.len())) {
                data.copy_from_slice(src);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let Ok(off) = usize::try_from(offset) else {
                return;
            };
            if let Some(dst) = self.config.get_mut(off..off.saturating_add(data.len())) {
                dst.copy_from_slice(data);
            }
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            _i: Arc<VirtioInterrupt>,
            queues: Vec<(Queue, EventFd)>,
        ) -> Result<(), ActivateError> {
            if queues.len() != 2 {
                return Err(ActivateError::QueueCount {
                    expected: 2,
                    actual: queues.len(),
                });
            }
            self.activations.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.resets.fetch_add(1, Ordering::SeqCst);
            self.can_reset
        }
    }

    struct Fixture {
        t: MmioTransport,
        acked: Arc<std::sync::Mutex<u64>>,
        activations: Arc<AtomicUsize>,
        resets: Arc<AtomicUsize>,
    }

    fn fixture(can_reset: bool) -> Fixture {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let acked = Arc::new(std::sync::Mutex::new(0));
        let activations = Arc::new(AtomicUsize::new(0));
        let resets = Arc::new(AtomicUsize::new(0));
        let dev = Dummy {
            acked: acked.clone(),
            activations: activations.clone(),
            resets: resets.clone(),
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            can_reset,
        };
        Fixture {
            t: MmioTransport::new(mem, Box::new(dev)).unwrap(),
            acked,
            activations,
            resets,
        }
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0xffu8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, REG_DRIVER_FEATURES_SEL, 0);
        w(t, REG_DRIVER_FEATURES, features as u32);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        w(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, idx: u32, size: u32, base: u64) {
        w(t, REG_QUEUE_SEL, idx);
        w(t, REG_QUEUE_NUM, size);
        w(t, REG_QUEUE_DESC_LOW, base as u32);
        w(t, REG_QUEUE_DESC_HIGH, (base >> 32) as u32);
        w(t, REG_QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        w(t, REG_QUEUE_DRIVER_HIGH, 0);
        w(t, REG_QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        w(t, REG_QUEUE_DEVICE_HIGH, 0);
        w(t, REG_QUEUE_READY, 1);
    }

    const ALL_OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    #[test]
    fn identification_registers() {
        let mut f = fixture(true);
        assert_eq!(r(&mut f.t, REG_MAGIC), 0x7472_6976);
        assert_eq!(r(&mut f.t, REG_VERSION), 2);
        assert_eq!(r(&mut f.t, REG_DEVICE_ID), 42);
        assert_eq!(r(&mut f.t, REG_VENDOR_ID), MMIO_VENDOR_ID);
        w(&mut f.t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut f.t, REG_DEVICE_FEATURES), DUMMY_FEATURES as u32);
        w(&mut f.t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut f.t, REG_DEVICE_FEATURES), 1); // VERSION_1 is bit 32
        w(&mut f.t, REG_DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut f.t, REG_DEVICE_FEATURES), 0);
        w(&mut f.t, REG_QUEUE_SEL, 0);
        assert_eq!(r(&mut f.t, REG_QUEUE_NUM_MAX), 16);
        w(&mut f.t, REG_QUEUE_SEL, 1);
        assert_eq!(r(&mut f.t, REG_QUEUE_NUM_MAX), 8);
        w(&mut f.t, REG_QUEUE_SEL, 2);
        assert_eq!(r(&mut f.t, REG_QUEUE_NUM_MAX), 0);
    }

    #[test]
    fn config_space_any_size_and_out_of_range() {
        let mut f = fixture(true);
        let mut b = [0u8; 2];
        f.t.read(0x102, &mut b);
        assert_eq!(b, [3, 4]);
        f.t.write(0x101, &[9]);
        let mut b = [0u8; 8];
        f.t.read(0x100, &mut b);
        assert_eq!(b, [1, 9, 3, 4, 5, 6, 7, 8]);
        let mut b = [0xaau8; 4];
        f.t.read(0x106, &mut b); // runs past the end
        assert_eq!(b, [0; 4]);
        f.t.read(u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
        f.t.write(u64::MAX - 1, &[1, 2, 3]);
    }

    #[test]
    fn features_ok_requires_version_1() {
        let mut f = fixture(true);
        negotiate(&mut f.t, 1 << 3);
        assert_eq!(r(&mut f.t, REG_STATUS) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn features_ok_rejects_unoffered_features() {
        let mut f = fixture(true);
        negotiate(&mut f.t, DUMMY_FEATURES | (1 << 5));
        assert_eq!(r(&mut f.t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        // Writing features after FEATURES_OK was refused is still allowed; the driver can try again.
        w(&mut f.t, REG_DRIVER_FEATURES_SEL, 0);
        w(&mut f.t, REG_DRIVER_FEATURES, DUMMY_FEATURES as u32);
        w(
            &mut f.t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(r(&mut f.t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        assert_eq!(*f.acked.lock().unwrap(), DUMMY_FEATURES);
    }

    #[test]
    fn features_frozen_after_features_ok() {
        let mut f = fixture(true);
        negotiate(&mut f.t, 1 << VIRTIO_F_VERSION_1);
        w(&mut f.t, REG_DRIVER_FEATURES_SEL, 0);
        w(&mut f.t, REG_DRIVER_FEATURES, 1 << 3);
        assert_eq!(f.t.acked_features, 1 << VIRTIO_F_VERSION_1);
    }

    #[test]
    fn full_handshake_activates_once() {
        let mut f = fixture(true);
        negotiate(&mut f.t, DUMMY_FEATURES);
        setup_queue(&mut f.t, 0, 16, 0x1_0000);
        setup_queue(&mut f.t, 1, 8, 0x2_0000);
        w(&mut f.t, REG_STATUS, ALL_OK);
        assert_eq!(r(&mut f.t, REG_STATUS), ALL_OK);
        assert_eq!(f.activations.load(Ordering::SeqCst), 1);
        assert!(f.t.is_activated());
        // Queue configuration is frozen now.
        w(&mut f.t, REG_QUEUE_SEL, 0);
        w(&mut f.t, REG_QUEUE_NUM, 4);
        assert_eq!(r(&mut f.t, REG_QUEUE_NUM), 16);
        w(&mut f.t, REG_QUEUE_READY, 0);
        assert_eq!(r(&mut f.t, REG_QUEUE_READY), 1);
        // Re-writing DRIVER_OK does not activate again.
        w(&mut f.t, REG_STATUS, ALL_OK);
        assert_eq!(f.activations.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn driver_ok_without_features_ok_is_ignored() {
        let mut f = fixture(true);
        w(&mut f.t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w(
            &mut f.t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
        );
        assert_eq!(f.activations.load(Ordering::SeqCst), 0);
        assert_eq!(r(&mut f.t, REG_STATUS), STATUS_ACKNOWLEDGE);
    }

    #[test]
    fn queue_outside_memory_sets_needs_reset() {
        let mut f = fixture(true);
        negotiate(&mut f.t, DUMMY_FEATURES);
        setup_queue(&mut f.t, 0, 16, 0x1_0000);
        setup_queue(&mut f.t, 1, 8, 0xffff_0000_0000); // not guest memory
        w(&mut f.t, REG_STATUS, ALL_OK);
        assert_eq!(f.activations.load(Ordering::SeqCst), 0);
        let st = r(&mut f.t, REG_STATUS);
        assert_ne!(st & STATUS_DEVICE_NEEDS_RESET, 0);
        assert_eq!(st & STATUS_DRIVER_OK, 0);
        assert_ne!(
            r(&mut f.t, REG_INTERRUPT_STATUS) & super::super::VIRTIO_MMIO_INT_CONFIG,
            0
        );
    }

    #[test]
    fn bad_queue_values_ignored() {
        let mut f = fixture(true);
        // Before FEATURES_OK, queue registers are not writable.
        w(&mut f.t, REG_QUEUE_SEL, 0);
        w(&mut f.t, REG_QUEUE_NUM, 8);
        assert_eq!(r(&mut f.t, REG_QUEUE_NUM), 16);
        negotiate(&mut f.t, DUMMY_FEATURES);
        w(&mut f.t, REG_QUEUE_NUM, 32); // > max
        w(&mut f.t, REG_QUEUE_NUM, 6); // not a power of two
        w(&mut f.t, REG_QUEUE_NUM, 0);
        assert_eq!(r(&mut f.t, REG_QUEUE_NUM), 16);
        w(&mut f.t, REG_QUEUE_NUM, 4);
        assert_eq!(r(&mut f.t, REG_QUEUE_NUM), 4);
        // A queue that does not exist.
        w(&mut f.t, REG_QUEUE_SEL, 99);
        w(&mut f.t, REG_QUEUE_NUM, 4);
        w(&mut f.t, REG_QUEUE_READY, 1);
        assert_eq!(r(&mut f.t, REG_QUEUE_READY), 0);
        // Wrong access sizes and misaligned offsets.
        w(&mut f.t, REG_QUEUE_SEL, 0);
        f.t.write(REG_QUEUE_NUM, &[2]);
        f.t.write(REG_QUEUE_NUM, &[2, 0, 0, 0, 0, 0, 0, 0]);
        f.t.write(REG_QUEUE_NUM + 1, &[2, 0, 0, 0]);
        assert_eq!(r(&mut f.t, REG_QUEUE_NUM), 4);
        let mut b = [0xffu8; 2];
        f.t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        // Notify for a queue that does not exist.
        w(&mut f.t, QUEUE_NOTIFY_OFFSET, 1000);
    }

    #[test]
    fn notify_write_signals_queue_event() {
        let mut f = fixture(true);
        w(&mut f.t, QUEUE_NOTIFY_OFFSET, 1);
        assert_eq!(f.t.queue_events()[1].read().unwrap(), 1);
        assert!(f.t.queue_events()[0].read().is_err()); // nothing pending (EAGAIN)
    }

    #[test]
    fn interrupt_ack_clears_bits() {
        let f = fixture(true);
        let mut t = f.t;
        t.interrupt.signal_used_queue().unwrap();
        t.interrupt.signal_config_change().unwrap();
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 3);
        w(&mut t, REG_INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 2);
        assert_eq!(t.interrupt_event().read().unwrap(), 2);
    }

    #[test]
    fn reset_returns_to_initial_state() {
        let mut f = fixture(true);
        negotiate(&mut f.t, DUMMY_FEATURES);
        setup_queue(&mut f.t, 0, 16, 0x1_0000);
        setup_queue(&mut f.t, 1, 8, 0x2_0000);
        w(&mut f.t, REG_STATUS, ALL_OK);
        assert!(f.t.is_activated());
        w(&mut f.t, REG_STATUS, 0);
        assert_eq!(f.resets.load(Ordering::SeqCst), 1);
        assert_eq!(r(&mut f.t, REG_STATUS), 0);
        assert!(!f.t.is_activated());
        w(&mut f.t, REG_QUEUE_SEL, 0);
        assert_eq!(r(&mut f.t, REG_QUEUE_READY), 0);
        assert_eq!(r(&mut f.t, REG_QUEUE_DESC_LOW), 0);
        // And it can be brought up again.
        negotiate(&mut f.t, DUMMY_FEATURES);
        setup_queue(&mut f.t, 0, 16, 0x1_0000);
        setup_queue(&mut f.t, 1, 8, 0x2_0000);
        w(&mut f.t, REG_STATUS, ALL_OK);
        assert_eq!(f.activations.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn reset_unsupported_sets_needs_reset() {
        let mut f = fixture(false);
        negotiate(&mut f.t, DUMMY_FEATURES);
        setup_queue(&mut f.t, 0, 16, 0x1_0000);
        setup_queue(&mut f.t, 1, 8, 0x2_0000);
        w(&mut f.t, REG_STATUS, ALL_OK);
        w(&mut f.t, REG_STATUS, 0);
        assert_ne!(r(&mut f.t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
        assert!(f.t.is_activated());
    }

    #[test]
    fn status_cannot_clear_bits() {
        let mut f = fixture(true);
        negotiate(&mut f.t, DUMMY_FEATURES);
        w(&mut f.t, REG_STATUS, STATUS_ACKNOWLEDGE);
        assert_eq!(
            r(&mut f.t, REG_STATUS),
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
        );
        w(
            &mut f.t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_FAILED,
        );
        assert_ne!(r(&mut f.t, REG_STATUS) & STATUS_FAILED, 0);
    }

    /// The whole path a guest driver takes, through registers only, to a real device serving a request.
    #[test]
    fn drives_real_rng_device_end_to_end() {
        use crate::devices::virtio::test_utils::{read_bytes, Bump, TestQueue};
        use crate::devices::virtio::Rng;
        use std::time::Duration;

        let mem = crate::devices::virtio::test_utils::test_mem();
        let mut t = MmioTransport::new(mem.clone(), Box::new(Rng::new().unwrap())).unwrap();
        assert_eq!(r(&mut t, REG_DEVICE_ID), 4);
        w(&mut t, REG_STATUS, 0);
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        let mut q = TestQueue::new(&mem, 0x4000, 16);
        w(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        w(&mut t, REG_QUEUE_NUM, 16);
        for (lo, addr) in [
            (REG_QUEUE_DESC_LOW, q.mock.desc_table_addr().0),
            (REG_QUEUE_DRIVER_LOW, q.mock.avail_addr().0),
            (REG_QUEUE_DEVICE_LOW, q.used_addr()),
        ] {
            w(&mut t, lo, addr as u32);
            w(&mut t, lo + 4, (addr >> 32) as u32);
        }
        w(&mut t, REG_QUEUE_READY, 1);
        w(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(r(&mut t, REG_STATUS), ALL_OK);

        // The driver queues a buffer and notifies through the register (no ioeventfd in this test).
        let a = Bump::new().alloc(256);
        let head = q.add(&[(a, 256, true)]);
        w(&mut t, QUEUE_NOTIFY_OFFSET, 0);
        assert_eq!(
            q.wait_used(Duration::from_secs(5)),
            Some((u32::from(head), 256))
        );
        assert!(read_bytes(&mem, a, 256).iter().any(|&b| b != 0));
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS) & 1, 1);
        assert!(t.interrupt_event().read().unwrap() >= 1);
        w(&mut t, REG_INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);

        // Reset stops the worker; the device comes back after a new handshake.
        w(&mut t, REG_STATUS, 0);
        assert!(!t.is_activated());
    }
}
