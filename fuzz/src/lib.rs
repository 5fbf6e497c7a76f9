//! Helpers shared by capsa's fuzz targets: a reader that turns the fuzz input into values (zeroes once it
//! runs out, so every input is valid), and a driver-side split virtqueue written straight into a real
//! `GuestMemoryMmap`, the way a guest's virtio driver lays it out.

use capsa_vmm::devices::GuestMemoryMmap;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Reads little-endian values off the front of the fuzz input.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// Guest memory of `len` bytes at guest address 0.
pub fn guest_memory(len: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)]).expect("guest memory")
}

/// One descriptor as a driver writes it: address, length, flags, next.
#[derive(Debug, Clone, Copy)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// A split virtqueue as the guest driver sees it: descriptor table, available ring and used ring at
/// fixed guest addresses, filled in by the fuzz target.
pub struct DriverQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    /// A queue of `size` entries whose three parts start at `base` (4 KiB each is enough for 256 entries).
    pub fn new(base: u64, size: u16) -> Self {
        Self {
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Bytes of guest memory the queue occupies from its base.
    pub const SPAN: u64 = 0x3000;

    /// The device side, as the transport hands it over on DRIVER_OK.
    pub fn device_side(&self, max_size: u16) -> Queue {
        let mut q = Queue::new(max_size).expect("queue max size");
        q.try_set_size(self.size).expect("queue size");
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .expect("desc address");
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .expect("avail address");
        q.try_set_used_ring_address(GuestAddress(self.used))
            .expect("used address");
        q.set_ready(true);
        q
    }

    /// Write descriptor `idx` of the table.
    pub fn store(&self, mem: &GuestMemoryMmap, idx: u16, d: RawDesc) {
        let a = GuestAddress(self.desc + 16 * u64::from(idx % self.size));
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..16].copy_from_slice(&d.next.to_le_bytes());
        mem.write_slice(&b, a).expect("descriptor table in memory");
    }

    /// Write `bufs` (address, length, device-writable) as one chain in fresh descriptor slots and make it
    /// available; returns the head index, or `None` when the table is full.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> Option<u16> {
        let head = self.reserve(bufs.len().max(1) as u16)?;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let last = i + 1 == bufs.len();
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let next = (idx + 1) % self.size;
            self.store(
                mem,
                idx,
                RawDesc {
                    addr,
                    len,
                    flags,
                    next,
                },
            );
        }
        self.publish(mem, head);
        Some(head)
    }

    /// Descriptor slots not yet used by [`Self::add_chain`] or [`Self::reserve`] (they do not wrap).
    pub fn free_slots(&self) -> u16 {
        self.size - self.next_desc
    }

    /// Reserve `n` consecutive descriptor slots for a hand-written chain; returns the first, or `None` when
    /// the table has fewer left.
    pub fn reserve(&mut self, n: u16) -> Option<u16> {
        if n > self.free_slots() {
            return None;
        }
        let first = self.next_desc;
        self.next_desc += n;
        Some(first)
    }

    /// Put `head` in the available ring and bump its index.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(slot))
            .expect("avail ring in memory");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2))
            .expect("avail ring in memory");
    }

    /// Chains made available so far.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The device's used index.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        u16::from_le(
            mem.read_obj(GuestAddress(self.used + 2))
                .expect("used ring in memory"),
        )
    }

    /// The next used element (id, len) the device returned, if any.
    pub fn next_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u32, u32)> {
        if self.used_idx(mem) == self.used_seen {
            return None;
        }
        let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
        let id: u32 = mem.read_obj(GuestAddress(at)).expect("used ring in memory");
        let len: u32 = mem
            .read_obj(GuestAddress(at + 4))
            .expect("used ring in memory");
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((u32::from_le(id), u32::from_le(len)))
    }
}

/// A bump allocator for driver buffers in guest memory, from `start` to `end`; `None` once full.
pub struct Bump {
    next: u64,
    end: u64,
}

impl Bump {
    pub fn new(start: u64, end: u64) -> Self {
        Self { next: start, end }
    }

    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        let a = self.next;
        let next = (a.checked_add(len)? + 15) & !15;
        if next > self.end {
            return None;
        }
        self.next = next;
        Some(a)
    }
}

/// A scratch directory for this fuzzing process (sockets, disk images) under `$TMPDIR`, which
/// `run-all.sh` points into its own scratch directory and removes afterwards.
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("capsa-fuzz-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}
