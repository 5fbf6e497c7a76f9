//! Driver-side helpers for device tests: virtio-queue mock queues in a real `GuestMemoryMmap`.

use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::{MockSplitQueue, UsedRing};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::GuestMemoryMmap;

pub const MEM_SIZE: usize = 32 << 20;
/// First address handed out for data buffers; queues live below it.
pub const DATA_START: u64 = 0x10_0000;

pub fn test_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// One descriptor of a chain a test builds: (address, length, device-writable).
pub type Desc = (u64, u32, bool);

/// A bump allocator for test buffers in guest memory.
pub struct Bump(pub u64);

impl Bump {
    pub fn new() -> Self {
        Bump(DATA_START)
    }
    pub fn alloc(&mut self, len: u64) -> u64 {
        let a = self.0;
        self.0 = (self.0 + len + 15) & !15;
        assert!(self.0 <= MEM_SIZE as u64, "test ran out of guest memory");
        a
    }
}

/// A queue driven from the driver side.
///
/// The used ring is placed here rather than where `MockSplitQueue::create` puts it: virtio-queue 0.18's mock
/// ends the available ring after `len` bytes instead of `4 + 2 * len + 2`, so its used ring overlaps the
/// upper half of the available ring and a test that posts more than `size / 2` chains corrupts both.
pub struct TestQueue<'a> {
    pub mock: MockSplitQueue<'a, GuestMemoryMmap>,
    used: UsedRing<'a, GuestMemoryMmap>,
    size: u16,
    next_desc: u16,
    used_seen: u16,
    pub event: EventFd,
}

impl<'a> TestQueue<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        let mock = MockSplitQueue::create(mem, GuestAddress(base), size);
        // flags, idx, ring[size], used_event; the used ring is 4-byte aligned.
        let avail_end = mock.avail_addr().0 + 4 + 2 * u64::from(size) + 2;
        let used = UsedRing::new(mem, GuestAddress((avail_end + 3) & !3), size);
        Self {
            mock,
            used,
            size,
            next_desc: 0,
            used_seen: 0,
            event: EventFd::new(EFD_NONBLOCK).unwrap(),
        }
    }

    /// The device side: a ready `Queue` and the kick eventfd.
    pub fn device_side(&self) -> (Queue, EventFd) {
        let mut q: Queue = self.mock.create_queue().unwrap();
        let used = self.used_addr();
        q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        (q, self.event.try_clone().unwrap())
    }

    /// Guest address of the used ring.
    pub fn used_addr(&self) -> u64 {
        self.used.start().0 - 4
    }

    /// Publish chain head `head` in the available ring.
    pub fn publish(&self, head: u16) {
        let idx = self.mock.avail().idx().load();
        self.mock
            .avail()
            .ring()
            .ref_at((idx % self.size) as usize)
            .unwrap()
            .store(head);
        self.mock.avail().idx().store(idx.wrapping_add(1));
    }

    /// Write a chain into fresh descriptor slots, publish and kick it; returns the head index.
    pub fn add(&mut self, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let last = i + 1 == descs.len();
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            let next = if last { 0 } else { (idx + 1) % self.size };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.store(idx, addr, len, flags, next);
        }
        self.next_desc = (head + descs.len() as u16) % self.size;
        self.publish(head);
        self.kick();
        head
    }

    /// Write one raw descriptor at `idx` (for hostile chains).
    pub fn store(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        self.mock.desc_table().store(idx, d).unwrap();
    }

    /// Reserve `n` descriptor slots for a hand-built chain; returns the first.
    pub fn reserve(&mut self, n: u16) -> u16 {
        let first = self.next_desc;
        self.next_desc = (first + n) % self.size;
        first
    }

    pub fn kick(&self) {
        self.event.write(1).unwrap();
    }

    /// The next used element (id, len), if the device produced one.
    pub fn next_used(&mut self) -> Option<(u32, u32)> {
        let idx = self.used.idx().load();
        if idx == self.used_seen {
            return None;
        }
        let e = self
            .used
            .ring()
            .ref_at((self.used_seen % self.size) as usize)
            .unwrap()
            .load();
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((e.id(), e.len()))
    }

    pub fn wait_used(&mut self, timeout: Duration) -> Option<(u32, u32)> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(u) = self.next_used() {
                return Some(u);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

pub fn read_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

pub fn write_bytes(mem: &GuestMemoryMmap, addr: u64, data: &[u8]) {
    mem.write_slice(data, GuestAddress(addr)).unwrap();
}
