//! Descriptor-chain validation and guest-memory cursors shared by every virtio device.
//!
//! A chain popped from a queue is checked once, up front: every descriptor must lie inside guest memory,
//! device-readable descriptors must come before device-writable ones, the chain must end (a chain that still
//! has `NEXT` set when virtio-queue stops iterating loops or runs past the table) and its total length is
//! bounded. Devices then only move bytes through [`Cursor`]s over the validated segments.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
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
    /// Validate `chain`; `max_bytes` bounds the sum of all descriptor lengths.
    pub fn parse(
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        max_bytes: u64,
    ) -> Result<Self, ChainError> {
        let head = chain.head_index();
        let mut readable = Segments::default();
        let mut writable = Segments::default();
        let mut last_has_next = false;
        let mut count = 0usize;
        for desc in chain {
            count += 1;
            last_has_next = desc.has_next();
            let (addr, len) = (desc.addr(), desc.len());
            if len == 0 {
                continue;
            }
            if !GuestMemoryBackend::check_range(mem, addr, len as usize) {
                return Err(ChainError::OutOfMemory { addr: addr.0, len });
            }
            let total = readable.len + writable.len + u64::from(len);
            if total > max_bytes {
                return Err(ChainError::TooLong(max_bytes));
            }
            let target = if desc.is_write_only() {
                &mut writable
            } else {
                if !writable.segs.is_empty() {
                    return Err(ChainError::ReadAfterWrite);
                }
                &mut readable
            };
            target.segs.push((addr, len));
            target.len += u64::from(len);
        }
        if count == 0 {
            return Err(ChainError::Empty);
        }
        if last_has_next {
            return Err(ChainError::Unterminated);
        }
        Ok(Chain {
            head,
            readable,
            writable,
        })
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

    /// Next contiguous piece of at most `max` bytes, advancing past it.
    fn next_piece(&mut self, max: usize) -> Option<(GuestAddress, usize)> {
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
}

impl DeviceQueue {
    pub fn new(queue: Queue, event: EventFd) -> Self {
        Self {
            queue,
            event,
            used_added: false,
        }
    }

    /// Next available chain, if any (virtio-queue refuses a bogus available index).
    pub fn pop<'m>(
        &mut self,
        mem: &'m GuestMemoryMmap,
    ) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
        self.queue.pop_descriptor_chain(mem)
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
