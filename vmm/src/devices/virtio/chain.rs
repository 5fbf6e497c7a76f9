//! Descriptor-chain validation and guest-memory cursors shared by every virtio device.
//!
//! A chain popped from a queue is checked once, up front, by walking its descriptors here (each one is read
//! from guest memory exactly once, so a guest rewriting the table meanwhile changes nothing): every
//! descriptor must lie inside guest memory, device-readable descriptors must come before device-writable
//! ones, the chain must end within its table (no loop, no index past the table), it has at most
//! [`MAX_CHAIN_DESCRIPTORS`] descriptors (and no more than the queue size), an indirect descriptor is
//! refused unless `VIRTIO_RING_F_INDIRECT_DESC` was negotiated (and then must end the chain and not nest),
//! and the total length is bounded. Devices then only move bytes through [`Cursor`]s over the validated
//! segments. virtio-queue is used for the rings only, not to walk chains.

use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::VirtioInterrupt;
use crate::devices::GuestMemoryMmap;

/// Why a descriptor chain was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor chain is empty or its head is out of range")]
    Empty,
    #[error("descriptor chain does not end within the queue size (loop or bad index)")]
    Unterminated,
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory { addr: u64, len: u32 },
    #[error("device-readable descriptor after a device-writable one")]
    ReadAfterWrite,
    #[error("descriptor chain carries more than {0} bytes")]
    TooLong(u64),
    #[error("descriptor chain has more than {0} descriptors")]
    TooManyDescriptors(u16),
    #[error("indirect descriptor, but VIRTIO_RING_F_INDIRECT_DESC was not negotiated")]
    IndirectNotNegotiated,
    #[error("indirect descriptor inside an indirect table, or followed by another descriptor")]
    IndirectMisplaced,
    #[error("indirect table of {0} bytes is empty or not a whole number of descriptors")]
    IndirectTableSize(u32),
    #[error("descriptor table entry at {0:#x} is outside guest memory")]
    TableOutOfMemory(u64),
}

/// Most descriptors in one chain, indirect tables included. Linux's drivers need at most the queue size
/// (virtio-blk: `seg_max` 254 + header + status); the cap bounds the work a chain costs, mostly for indirect
/// tables, which could otherwise hold 65535 descriptors. The effective cap is also never above the queue size
/// (virtio 1.2, 2.7.5.3.1).
pub const MAX_CHAIN_DESCRIPTORS: u16 = 256;

/// What a queue accepts in the layout of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainRules {
    /// `VIRTIO_RING_F_INDIRECT_DESC` was negotiated.
    pub indirect: bool,
    /// Most descriptors per chain.
    pub max_descriptors: u16,
}

impl Default for ChainRules {
    fn default() -> Self {
        Self {
            indirect: false,
            max_descriptors: MAX_CHAIN_DESCRIPTORS,
        }
    }
}

/// A chain taken from the available ring and not validated yet: its head and where to find its
/// descriptors. [`Chain::parse`] walks it.
#[derive(Debug, Clone, Copy)]
pub struct RawChain {
    head: u16,
    table: GuestAddress,
    queue_size: u16,
    rules: ChainRules,
}

impl RawChain {
    /// The head descriptor's index: the id the chain is returned under.
    pub fn head_index(&self) -> u16 {
        self.head
    }
}

/// Guest memory ranges of one direction of a chain.
#[derive(Debug, Default, Clone)]
pub struct Segments {
    segs: Vec<(GuestAddress, u32)>,
    len: u64,
}

impl Segments {
    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn clear(&mut self) {
        self.segs.clear();
        self.len = 0;
    }

    /// A cursor at the first byte.
    pub fn cursor(&self) -> Cursor<'_> {
        Cursor {
            segs: &self.segs,
            idx: 0,
            off: 0,
            remaining: self.len,
        }
    }

    /// Guest address of the byte at `pos`, if inside.
    pub fn addr_of(&self, pos: u64) -> Option<GuestAddress> {
        let mut base = 0u64;
        for (addr, len) in &self.segs {
            let len = u64::from(*len);
            if pos < base + len {
                return addr.0.checked_add(pos - base).map(GuestAddress);
            }
            base += len;
        }
        None
    }
}

/// A validated descriptor chain.
#[derive(Debug, Clone)]
pub struct Chain {
    pub head: u16,
    pub readable: Segments,
    pub writable: Segments,
}

impl Chain {
    /// Walk and validate `chain`; `max_bytes` bounds the sum of all descriptor lengths.
    pub fn parse(
        mem: &GuestMemoryMmap,
        chain: RawChain,
        max_bytes: u64,
    ) -> Result<Self, ChainError> {
        let mut c = Chain {
            head: chain.head,
            readable: Segments::default(),
            writable: Segments::default(),
        };
        c.parse_into(mem, chain, max_bytes)?;
        Ok(c)
    }

    /// [`Chain::parse`] into `self`, reusing its segment lists (a worker that keeps one `Chain` allocates
    /// nothing per chain). On error `self` holds no segments.
    pub fn parse_into(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: RawChain,
        max_bytes: u64,
    ) -> Result<(), ChainError> {
        self.head = chain.head;
        self.readable.clear();
        self.writable.clear();
        let r = Self::walk(
            mem,
            chain,
            max_bytes,
            &mut self.readable,
            &mut self.writable,
        );
        if r.is_err() {
            self.readable.clear();
            self.writable.clear();
        }
        r
    }

    fn walk(
        mem: &GuestMemoryMmap,
        chain: RawChain,
        max_bytes: u64,
        readable: &mut Segments,
        writable: &mut Segments,
    ) -> Result<(), ChainError> {
        let RawChain {
            head,
            queue_size,
            rules,
            ..
        } = chain;
        let max_descriptors = rules.max_descriptors.min(queue_size);
        // The table being walked (the ring's, or an indirect one) and the next entry in it.
        let mut table = chain.table;
        let mut table_len = queue_size;
        let mut index = head;
        let mut in_indirect = false;
        // Entries visited in the current table (more than it holds means a loop) and in all.
        let mut steps = 0u32;
        let mut count = 0u16;
        loop {
            if index >= table_len {
                return Err(if count == 0 && !in_indirect {
                    ChainError::Empty
                } else {
                    ChainError::Unterminated
                });
            }
            steps += 1;
            if steps > u32::from(table_len) {
                return Err(ChainError::Unterminated);
            }
            // index < table_len <= u16::MAX, so this stays far below u64::MAX.
            let at = table
                .0
                .checked_add(u64::from(index) * std::mem::size_of::<Descriptor>() as u64)
                .ok_or(ChainError::TableOutOfMemory(table.0))?;
            let desc: Descriptor = mem
                .read_obj(GuestAddress(at))
                .map_err(|_| ChainError::TableOutOfMemory(at))?;
            if desc.refers_to_indirect_table() {
                if !rules.indirect {
                    return Err(ChainError::IndirectNotNegotiated);
                }
                if in_indirect || desc.has_next() {
                    return Err(ChainError::IndirectMisplaced);
                }
                let entry_len = std::mem::size_of::<Descriptor>() as u32;
                let entries = desc.len() / entry_len;
                if entries == 0
                    || !desc.len().is_multiple_of(entry_len)
                    || entries > u32::from(u16::MAX)
                {
                    return Err(ChainError::IndirectTableSize(desc.len()));
                }
                if !GuestMemoryBackend::check_range(mem, desc.addr(), desc.len() as usize) {
                    return Err(ChainError::OutOfMemory {
                        addr: desc.addr().0,
                        len: desc.len(),
                    });
                }
                table = desc.addr();
                // entries <= u16::MAX, checked above.
                table_len = entries as u16;
                index = 0;
                in_indirect = true;
                steps = 0;
                continue;
            }
            count += 1;
            if count > max_descriptors {
                return Err(ChainError::TooManyDescriptors(max_descriptors));
            }
            let (addr, len) = (desc.addr(), desc.len());
            if len > 0 {
                if !GuestMemoryBackend::check_range(mem, addr, len as usize) {
                    return Err(ChainError::OutOfMemory { addr: addr.0, len });
                }
                let total = readable.len + writable.len + u64::from(len);
                if total > max_bytes {
                    return Err(ChainError::TooLong(max_bytes));
                }
                let target = if desc.is_write_only() {
                    &mut *writable
                } else {
                    if !writable.segs.is_empty() {
                        return Err(ChainError::ReadAfterWrite);
                    }
                    &mut *readable
                };
                target.segs.push((addr, len));
                target.len += u64::from(len);
            }
            if !desc.has_next() {
                break;
            }
            index = desc.next();
        }
        Ok(())
    }
}

/// A position inside [`Segments`]; reads and writes advance it and never leave the validated ranges.
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    segs: &'a [(GuestAddress, u32)],
    idx: usize,
    off: u32,
    remaining: u64,
}

impl Cursor<'_> {
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Move `n` bytes forward (fewer at the end of the segments); returns how many.
    pub fn skip(&mut self, n: usize) -> usize {
        let mut done = 0;
        while done < n {
            let Some((_, k)) = self.next_piece(n - done) else {
                break;
            };
            done += k;
        }
        done
    }

    /// Next piece of at most `max` bytes that is contiguous in guest-physical addresses (it lies inside one
    /// validated descriptor, but may span guest memory regions), advancing past it.
    pub fn next_piece(&mut self, max: usize) -> Option<(GuestAddress, usize)> {
        while let Some(&(addr, len)) = self.segs.get(self.idx) {
            let left = len.saturating_sub(self.off);
            if left == 0 {
                self.idx += 1;
                self.off = 0;
                continue;
            }
            let n = (left as usize).min(max);
            if n == 0 {
                return None;
            }
            let a = GuestAddress(addr.0.checked_add(u64::from(self.off))?);
            // n <= left <= u32::MAX
            self.off += n as u32;
            self.remaining -= n as u64;
            return Some((a, n));
        }
        None
    }

    /// Copy guest bytes into `buf`; returns the count (short at the end of the segments).
    pub fn read(
        &mut self,
        mem: &GuestMemoryMmap,
        buf: &mut [u8],
    ) -> Result<usize, vm_memory::GuestMemoryError> {
        let mut done = 0;
        while done < buf.len() {
            let Some((addr, n)) = self.next_piece(buf.len() - done) else {
                break;
            };
            mem.read_slice(&mut buf[done..done + n], addr)?;
            done += n;
        }
        Ok(done)
    }

    /// Copy `buf` into guest memory; returns the count (short at the end of the segments).
    pub fn write(
        &mut self,
        mem: &GuestMemoryMmap,
        buf: &[u8],
    ) -> Result<usize, vm_memory::GuestMemoryError> {
        let mut done = 0;
        while done < buf.len() {
            let Some((addr, n)) = self.next_piece(buf.len() - done) else {
                break;
            };
            mem.write_slice(&buf[done..done + n], addr)?;
            done += n;
        }
        Ok(done)
    }
}

/// A queue as a device worker owns it: the virtio-queue state plus the eventfd the guest kicks.
pub struct DeviceQueue {
    pub queue: Queue,
    pub event: EventFd,
    used_added: bool,
    rules: ChainRules,
}

impl DeviceQueue {
    /// A queue whose chains follow the default [`ChainRules`] (no indirect descriptors).
    pub fn new(queue: Queue, event: EventFd) -> Self {
        Self {
            queue,
            event,
            used_added: false,
            rules: ChainRules::default(),
        }
    }

    /// Accept indirect descriptors if the driver acked `VIRTIO_RING_F_INDIRECT_DESC` in `acked_features`.
    pub fn with_features(mut self, acked_features: u64) -> Self {
        self.rules.indirect = acked_features & (1u64 << VIRTIO_RING_F_INDIRECT_DESC) != 0;
        self
    }

    /// Replace the chain rules.
    #[cfg(test)]
    pub fn with_rules(mut self, rules: ChainRules) -> Self {
        self.rules = rules;
        self
    }

    /// Next available chain, if any (virtio-queue refuses a bogus available index); [`Chain::parse`]
    /// validates it.
    pub fn pop(&mut self, mem: &GuestMemoryMmap) -> Option<RawChain> {
        let chain = self.queue.pop_descriptor_chain(mem)?;
        Some(RawChain {
            head: chain.head_index(),
            table: GuestAddress(self.queue.desc_table()),
            queue_size: self.queue.size(),
            rules: self.rules,
        })
    }

    /// Give back the chain just popped (it will be popped again later).
    pub fn undo_pop(&mut self) {
        self.queue.go_to_previous_position();
    }

    /// Return chain `head` to the driver with `len` bytes written.
    pub fn add_used(&mut self, mem: &GuestMemoryMmap, head: u16, len: u32) {
        match self.queue.add_used(mem, head, len) {
            Ok(()) => self.used_added = true,
            Err(e) => crate::guest_warn!(error = %e, head, "virtio: cannot add used descriptor"),
        }
    }

    /// Raise the queue interrupt if chains were used since the last call and the driver wants to know.
    pub fn notify(&mut self, mem: &GuestMemoryMmap, interrupt: &VirtioInterrupt) {
        if !std::mem::take(&mut self.used_added) {
            return;
        }
        let needed = self.queue.needs_notification(mem).unwrap_or(true);
        if needed {
            if let Err(e) = interrupt.signal_used_queue() {
                crate::guest_warn!(error = %e, "virtio: cannot signal used queue");
            }
        }
    }

    /// Clear the kick eventfd.
    pub fn drain_event(&self) {
        let _ = self.event.read();
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };

    use super::*;
    use crate::devices::virtio::test_utils::*;

    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    /// One raw descriptor: address, length, flags, next.
    type RawDesc = (u64, u32, u16, u16);

    /// Write an indirect table of `descs` at `at`.
    fn table(mem: &GuestMemoryMmap, at: u64, descs: &[RawDesc]) {
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let d = Descriptor::new(addr, len, flags, next);
            mem.write_obj(d, GuestAddress(at + 16 * i as u64)).unwrap();
        }
    }

    fn parse_with(
        q: &TestQueue,
        mem: &GuestMemoryMmap,
        rules: ChainRules,
    ) -> Result<Chain, ChainError> {
        let (queue, event) = q.device_side();
        let mut dq = DeviceQueue::new(queue, event).with_rules(rules);
        let raw = dq.pop(mem).expect("a chain is available");
        Chain::parse(mem, raw, u64::from(u32::MAX))
    }

    fn indirect_rules() -> ChainRules {
        ChainRules {
            indirect: true,
            ..Default::default()
        }
    }

    #[test]
    fn indirect_descriptors_only_when_negotiated() {
        let mem = test_mem();
        let mut q = TestQueue::new(&mem, 0, 16);
        let mut b = Bump::new();
        let (t, r, w) = (b.alloc(32), b.alloc(16), b.alloc(32));
        table(&mem, t, &[(r, 16, NEXT, 1), (w, 32, WRITE, 0)]);
        let head = q.reserve(1);
        q.store(head, t, 32, INDIRECT, 0);
        q.publish(head);
        // Not negotiated (the default, and what an ack without the bit gives).
        assert_eq!(
            parse_with(&q, &mem, ChainRules::default()).unwrap_err(),
            ChainError::IndirectNotNegotiated
        );
        let (queue, event) = q.device_side();
        let mut dq = DeviceQueue::new(queue, event).with_features(1 << 32);
        let raw = dq.pop(&mem).unwrap();
        assert_eq!(
            Chain::parse(&mem, raw, u64::MAX).unwrap_err(),
            ChainError::IndirectNotNegotiated
        );
        // Negotiated: the table's descriptors make the chain.
        let (queue, event) = q.device_side();
        let mut dq = DeviceQueue::new(queue, event).with_features(1 << VIRTIO_RING_F_INDIRECT_DESC);
        let c = Chain::parse(&mem, dq.pop(&mem).unwrap(), u64::MAX).unwrap();
        assert_eq!(c.head, head);
        assert_eq!((c.readable.len(), c.writable.len()), (16, 32));
        assert_eq!(c.readable.addr_of(0), Some(GuestAddress(r)));
        assert_eq!(c.writable.addr_of(31), Some(GuestAddress(w + 31)));
    }

    #[test]
    fn misplaced_or_malformed_indirect_descriptors_are_refused() {
        let mem = test_mem();
        let mut b = Bump::new();
        let (t, t2, buf) = (b.alloc(64), b.alloc(64), b.alloc(64));
        let cases: Vec<(&str, u32, u16, Vec<RawDesc>, ChainError)> = vec![
            (
                "nested",
                32,
                INDIRECT,
                vec![(buf, 8, NEXT, 1), (t2, 16, INDIRECT, 0)],
                ChainError::IndirectMisplaced,
            ),
            (
                "with NEXT",
                16,
                INDIRECT | NEXT,
                vec![(buf, 8, 0, 0)],
                ChainError::IndirectMisplaced,
            ),
            (
                "empty table",
                0,
                INDIRECT,
                vec![],
                ChainError::IndirectTableSize(0),
            ),
            (
                "partial entry",
                20,
                INDIRECT,
                vec![(buf, 8, 0, 0)],
                ChainError::IndirectTableSize(20),
            ),
            (
                "loop in the table",
                32,
                INDIRECT,
                vec![(buf, 8, NEXT, 1), (buf, 8, NEXT, 0)],
                ChainError::Unterminated,
            ),
            (
                "next past the table",
                32,
                INDIRECT,
                vec![(buf, 8, NEXT, 1), (buf, 8, NEXT, 2)],
                ChainError::Unterminated,
            ),
        ];
        for (what, len, flags, entries, want) in cases {
            let mut q = TestQueue::new(&mem, 0, 16);
            table(&mem, t, &entries);
            let head = q.reserve(1);
            q.store(head, t, len, flags, head + 1);
            if flags & NEXT != 0 {
                q.store(head + 1, buf, 8, 0, 0);
            }
            q.publish(head);
            assert_eq!(
                parse_with(&q, &mem, indirect_rules()).unwrap_err(),
                want,
                "{what}"
            );
        }
        // A table outside guest memory.
        let mut q = TestQueue::new(&mem, 0, 16);
        let head = q.reserve(1);
        q.store(head, MEM_SIZE as u64 - 16, 32, INDIRECT, 0);
        q.publish(head);
        assert!(matches!(
            parse_with(&q, &mem, indirect_rules()).unwrap_err(),
            ChainError::OutOfMemory { .. }
        ));
    }

    #[test]
    fn descriptors_per_chain_are_capped() {
        let mem = test_mem();
        let buf = Bump::new().alloc(4096);
        // A queue larger than the cap: a direct chain of MAX_CHAIN_DESCRIPTORS passes, one more is refused.
        let mut q = TestQueue::new(&mem, 0, 1024);
        let n = usize::from(MAX_CHAIN_DESCRIPTORS);
        q.add(&vec![(buf, 1, true); n]);
        q.add(&vec![(buf, 1, true); n + 1]);
        let (queue, event) = q.device_side();
        let mut dq = DeviceQueue::new(queue, event);
        let c = Chain::parse(&mem, dq.pop(&mem).unwrap(), u64::MAX).unwrap();
        assert_eq!(c.writable.len(), n as u64);
        assert_eq!(
            Chain::parse(&mem, dq.pop(&mem).unwrap(), u64::MAX).unwrap_err(),
            ChainError::TooManyDescriptors(MAX_CHAIN_DESCRIPTORS)
        );
        // An indirect table counts too, and the queue size bounds the chain below the cap.
        let mut q = TestQueue::new(&mem, 0, 16);
        let t = buf + 1024;
        let entries: Vec<RawDesc> = (0..17u16).map(|i| (buf, 1, WRITE | NEXT, i + 1)).collect();
        table(&mem, t, &entries);
        // The last entry ends the chain.
        table(&mem, t + 16 * 16, &[(buf, 1, WRITE, 0)]);
        let head = q.reserve(1);
        q.store(head, t, 17 * 16, INDIRECT, 0);
        q.publish(head);
        assert_eq!(
            parse_with(&q, &mem, indirect_rules()).unwrap_err(),
            ChainError::TooManyDescriptors(16)
        );
        // A direct chain that loops is unterminated, whatever the cap.
        let mut q = TestQueue::new(&mem, 0, 16);
        let first = q.reserve(2);
        q.store(first, buf, 1, NEXT, first + 1);
        q.store(first + 1, buf, 1, NEXT, first);
        q.publish(first);
        assert_eq!(
            parse_with(&q, &mem, ChainRules::default()).unwrap_err(),
            ChainError::Unterminated
        );
    }
}
