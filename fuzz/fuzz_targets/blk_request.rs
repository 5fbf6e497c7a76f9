//! The virtio-blk request path: request chains built from the fuzz input (header, data and status
//! descriptors of any length and direction, or raw hostile descriptors) served by the blk worker's handler
//! against a small raw image, read-write and read-only.
//!
//! Input: flags (bit 0: read-only disk), then requests until the input ends: a kind byte, then either a
//! well-formed request (type, sector, data descriptor lengths, status length) or raw descriptors.
#![no_main]

use std::sync::OnceLock;

use capsa_fuzz::{guest_memory, Bump, DriverQueue, Input, RawDesc};
use capsa_vmm::devices::virtio::block::SECTOR_SIZE;
use capsa_vmm::devices::virtio::fuzzing::BlockHarness;
use capsa_vmm::devices::virtio::Block;
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: usize = 1 << 20;
const QUEUE_SIZE: u16 = 256;
const DISK_SECTORS: u64 = 64;
/// Request types worth trying (IN, OUT, FLUSH, GET_ID, and a few unsupported ones).
const TYPES: [u32; 8] = [0, 1, 4, 8, 11, 13, 2, u32::MAX];

/// One disk image per process (read-write and read-only devices on the same file); its size is fixed, so
/// what earlier inputs wrote does not change what a request may reach.
fn devices() -> &'static (Block, Block) {
    static D: OnceLock<(Block, Block)> = OnceLock::new();
    D.get_or_init(|| {
        let path = capsa_fuzz::scratch_dir("blk").join("disk.img");
        let data: Vec<u8> = (0..DISK_SECTORS * SECTOR_SIZE + 100)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, data).expect("disk image");
        let rw = Block::new(&path, false).expect("rw disk");
        let ro = Block::new(&path, true).expect("ro disk");
        (rw, ro)
    })
}

/// A data length: mostly whole sectors, sometimes anything.
fn data_len(inp: &mut Input) -> u32 {
    let v = inp.u16();
    if v & 0x8000 != 0 {
        u32::from(v & 0x7fff)
    } else {
        u32::from(v % 9) * SECTOR_SIZE as u32
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let flags = inp.u8();
    let (rw, ro) = devices();
    let block = if flags & 1 != 0 { ro } else { rw };
    let mut harness = BlockHarness::new(block).expect("harness");
    let mem = guest_memory(MEM_SIZE);
    let mut q = DriverQueue::new(0, QUEUE_SIZE);
    let mut bump = Bump::new(DriverQueue::SPAN, MEM_SIZE as u64);
    let mut expected = Vec::new();

    while !inp.is_empty() && q.free_slots() > 0 {
        let kind = inp.u8();
        if kind & 0x80 == 0 {
            // Well-formed shape: header, data descriptors, status byte.
            let mut bufs = Vec::new();
            let mut hdr = [0u8; 16];
            hdr[0..4].copy_from_slice(&TYPES[usize::from(kind & 7)].to_le_bytes());
            if kind & 8 != 0 {
                hdr[0..4].copy_from_slice(&inp.u32().to_le_bytes());
            }
            hdr[8..16].copy_from_slice(&(inp.u64() % (DISK_SECTORS + 4)).to_le_bytes());
            let hdr_len = if kind & 0x10 != 0 {
                u32::from(inp.u8() % 24)
            } else {
                16
            };
            let Some(a) = bump.alloc(16) else { break };
            mem.write_slice(&hdr, GuestAddress(a)).expect("header");
            bufs.push((a, hdr_len, false));
            let ndata = (kind >> 5) & 3;
            // For OUT the data is device-readable (and comes from the input), else writable.
            let data_write = hdr[0] != 1;
            for _ in 0..ndata {
                let len = data_len(&mut inp);
                let Some(a) = bump.alloc(u64::from(len)) else {
                    break;
                };
                if !data_write {
                    let fill = inp.bytes(len as usize);
                    mem.write_slice(fill, GuestAddress(a)).expect("data");
                }
                bufs.push((a, len, data_write));
            }
            let status_len = if inp.u8() & 1 != 0 { 1 } else { 0 };
            let Some(a) = bump.alloc(1) else { break };
            bufs.push((a, status_len, true));
            let writable: u64 = bufs.iter().filter(|b| b.2).map(|b| u64::from(b.1)).sum();
            let Some(head) = q.add_chain(&mem, &bufs) else {
                break;
            };
            expected.push((head, writable, a, status_len));
        } else {
            // Raw descriptors: any length, flags and next; any address from the end of the rings (so
            // they cannot rewrite the other requests' descriptors) to past the end of memory.
            let n = (kind & 7) + 1;
            let Some(first) = q.reserve(u16::from(n)) else {
                break;
            };
            for i in 0..u16::from(n) {
                let d = RawDesc {
                    addr: DriverQueue::SPAN
                        + inp.u64() % (MEM_SIZE as u64 - DriverQueue::SPAN + 0x1000),
                    len: inp.u32() % 0x2_0000,
                    flags: inp.u16() & 7,
                    next: inp.u16(),
                };
                q.store(&mem, first + i, d);
            }
            q.publish(&mem, first);
        }
    }

    let mut queue = capsa_vmm::devices::virtio::fuzzing::DeviceQueue::new(
        q.device_side(QUEUE_SIZE),
        vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd"),
    );
    // Well-formed requests: the used length never exceeds what the driver made writable, and a served
    // request's status byte holds a virtio-blk status.
    while let Some(chain) = queue.pop(&mem) {
        let head = chain.head_index();
        let used = harness.handle(&mem, chain);
        let Some(&(_, writable, status_addr, status_len)) = expected.iter().find(|e| e.0 == head)
        else {
            continue;
        };
        assert!(
            u64::from(used) <= writable,
            "used {used} > writable {writable}"
        );
        if used > 0 && status_len == 1 {
            let st: u8 = mem.read_obj(GuestAddress(status_addr)).expect("status");
            assert!(st <= 2, "status {st}");
        }
    }
});
