//! The virtio-mmio register interface: reads and writes at any offset and width, in any order, against a
//! transport with a device that checks what the transport hands it (features it offered, queues valid in
//! guest memory at activation, one activation per reset) and walks the queues it gets. The input can
//! also write guest memory (so rings set up through the registers can hold chains) and run a driver's
//! whole initialisation sequence with addresses from the input.
#![no_main]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use capsa_fuzz::{guest_memory, Input};
use capsa_vmm::devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use capsa_vmm::devices::virtio::{
    ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use capsa_vmm::devices::{BusDevice, GuestMemoryMmap};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 0x1_0000;
const QUEUE_MAX: [u16; 3] = [256, 16, 1];
const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << 5) | (1 << 9);

struct Probe {
    active: Arc<AtomicBool>,
    can_reset: bool,
    acked: u64,
    config: [u8; 24],
}

impl VirtioDevice for Probe {
    fn device_type(&self) -> u32 {
        4
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX
    }
    fn avail_features(&self) -> u64 {
        FEATURES
    }
    fn set_acked_features(&mut self, features: u64) {
        assert_eq!(
            features & !FEATURES,
            0,
            "transport acked features never offered"
        );
        self.acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        capsa_vmm::devices::virtio::read_config_space(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let Ok(off) = usize::try_from(offset) else {
            return;
        };
        if let Some(dst) = off
            .checked_add(data.len())
            .and_then(|end| self.config.get_mut(off..end))
        {
            dst.copy_from_slice(data);
        }
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _interrupt: Arc<VirtioInterrupt>,
        queues: Vec<(Queue, EventFd)>,
    ) -> Result<(), ActivateError> {
        assert!(
            !self.active.load(Ordering::SeqCst),
            "activated twice without a reset"
        );
        assert_eq!(
            self.acked & (1 << VIRTIO_F_VERSION_1),
            1 << VIRTIO_F_VERSION_1
        );
        if queues.len() != QUEUE_MAX.len() {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_MAX.len(),
                actual: queues.len(),
            });
        }
        for (i, (mut q, _evt)) in queues.into_iter().enumerate() {
            assert!(q.size() <= QUEUE_MAX[i]);
            if !q.ready() {
                continue;
            }
            assert!(q.is_valid(&mem), "ready queue {i} handed over invalid");
            // Walk what the driver made available, as a device would.
            while let Some(chain) = q.pop_descriptor_chain(&mem) {
                let head = chain.head_index();
                let n = chain.count();
                let _ = q.add_used(&mem, head, n as u32);
            }
        }
        self.active.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        if self.can_reset {
            self.active.store(false, Ordering::SeqCst);
            self.acked = 0;
        }
        self.can_reset
    }
}

fn write32(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn read32(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// The registers a driver writes, so the fuzzer hits them more often than by offset alone.
const REGS: [u64; 20] = [
    0x014, 0x020, 0x024, 0x030, 0x038, 0x044, 0x050, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094,
    0x0a0, 0x0a4, 0x0ac, 0x0b0, 0x0fc, 0x100, 0x104,
];

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let flags = inp.u8();
    let mem = guest_memory(MEM_SIZE);
    let active = Arc::new(AtomicBool::new(false));
    let probe = Probe {
        active: active.clone(),
        can_reset: flags & 1 == 0,
        acked: 0,
        config: [7; 24],
    };
    let mut t = MmioTransport::new(mem.clone(), Box::new(probe)).expect("transport");

    while !inp.is_empty() {
        match inp.u8() % 6 {
            0 => {
                // A read of any width at any offset in the window (or past it).
                let off = u64::from(inp.u16()) % 0x1100;
                let mut buf = vec![0u8; usize::from(inp.u8() % 9)];
                t.read(off, &mut buf);
            }
            1 => {
                // A 32-bit write to a known register.
                let off = REGS[usize::from(inp.u8()) % REGS.len()];
                write32(&mut t, off, inp.u32());
            }
            2 => {
                // A write of any width at any offset.
                let off = u64::from(inp.u16()) % 0x1100;
                let len = usize::from(inp.u8() % 9);
                let b = inp.bytes(len);
                t.write(off, b);
            }
            3 => {
                // The guest writes its memory (rings, descriptors).
                let addr = u64::from(inp.u16());
                let len = usize::from(inp.u8());
                let b = inp.bytes(len);
                let _ = mem.write_slice(b, GuestAddress(addr));
            }
            4 => {
                // A driver's initialisation, with queue sizes and ring addresses from the input.
                write32(&mut t, 0x070, 0);
                write32(&mut t, 0x070, 1);
                write32(&mut t, 0x070, 3);
                write32(&mut t, 0x024, 1);
                write32(&mut t, 0x020, 1);
                write32(&mut t, 0x024, 0);
                write32(&mut t, 0x020, inp.u32() & FEATURES as u32);
                write32(&mut t, 0x070, 11);
                for q in 0..QUEUE_MAX.len() as u32 {
                    write32(&mut t, 0x030, q);
                    let max = read32(&mut t, 0x034);
                    write32(&mut t, 0x038, u32::from(inp.u16()) % (max + 1));
                    for reg in [0x080, 0x090, 0x0a0] {
                        write32(&mut t, reg, u32::from(inp.u16()));
                        write32(&mut t, reg + 4, 0);
                    }
                    write32(&mut t, 0x044, 1);
                }
                write32(&mut t, 0x070, 15);
            }
            _ => write32(&mut t, QUEUE_NOTIFY_OFFSET, u32::from(inp.u8() % 4)),
        }
        // What every read must say, whatever happened.
        assert_eq!(read32(&mut t, 0x000), 0x7472_6976);
        assert_eq!(read32(&mut t, 0x004), 2);
        assert_eq!(t.is_activated(), active.load(Ordering::SeqCst));
        let status = read32(&mut t, 0x070);
        assert_eq!(status, t.status());
        if t.is_activated() {
            assert_ne!(status & 4, 0, "active without DRIVER_OK");
        }
    }
});
