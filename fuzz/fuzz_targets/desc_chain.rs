//! Descriptor-chain walking with a hostile descriptor table: virtio-queue's available-ring iteration and
//! chain iteration (loops, out-of-range `next`, indirect tables, addresses outside or across guest memory
//! regions), then capsa's `Chain::parse` validation and the cursors every device moves bytes with.
//!
//! Input: size selector, available index, `max_bytes`, then raw bytes copied into guest memory from
//! address 0 (descriptor table at 0, available ring at 0x1000, used ring at 0x2000, data after).
#![no_main]

use capsa_fuzz::Input;
use capsa_vmm::devices::virtio::fuzzing::{Chain, DeviceQueue};
use capsa_vmm::devices::virtio::VirtioInterrupt;
use capsa_vmm::devices::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

/// Two regions with a hole between them, so a buffer can start in one and run into the hole.
const LOW: (u64, usize) = (0, 0x8000);
const HIGH: (u64, usize) = (0x1_0000, 0x4000);

fn queue(size: u16) -> Queue {
    let mut q = Queue::new(256).expect("max size");
    q.set_size(size);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x1000), Some(0));
    q.set_used_ring_address(Some(0x2000), Some(0));
    q.set_ready(true);
    q
}

/// Drain a validated direction through a cursor in small reads: it must yield exactly its length.
fn check_chain(mem: &GuestMemoryMmap, chain: &Chain, max_bytes: u64) {
    assert!(chain.readable.len() + chain.writable.len() <= max_bytes);
    for segs in [&chain.readable, &chain.writable] {
        let len = segs.len();
        if len > 0 {
            let last = segs
                .addr_of(len - 1)
                .expect("last byte of a validated chain");
            assert!(mem.address_in_range(last), "validated byte outside memory");
        }
        assert!(segs.addr_of(len).is_none());
        let mut cur = segs.cursor();
        let mut buf = [0u8; 4096];
        let mut total = 0u64;
        loop {
            let n = cur
                .read(mem, &mut buf)
                .expect("read inside validated ranges");
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        assert_eq!(total, len);
        assert_eq!(cur.remaining(), 0);
    }
    // Writes stay inside the writable ranges too (they may overwrite the rings: a guest can do that).
    let mut cur = chain.writable.cursor();
    let fill = [0xa5u8; 1024];
    let mut total = 0u64;
    loop {
        let n = cur
            .write(mem, &fill)
            .expect("write inside validated ranges");
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    assert_eq!(total, chain.writable.len());
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let size = 1u16 << (inp.u8() % 9); // 1..=256, powers of two as split queues require
    let avail_idx = inp.u16();
    let max_bytes = u64::from(inp.u32());
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(LOW.0), LOW.1),
        (GuestAddress(HIGH.0), HIGH.1),
    ])
    .expect("guest memory");
    let low = inp.bytes(LOW.1);
    mem.write_slice(low, GuestAddress(LOW.0))
        .expect("low region");
    let high = inp.bytes(HIGH.1);
    mem.write_slice(high, GuestAddress(HIGH.0))
        .expect("high region");
    mem.write_obj(avail_idx.to_le(), GuestAddress(0x1002))
        .expect("avail idx");

    // virtio-queue's own iteration, read-only: every chain ends.
    let mut q = queue(size);
    if !q.is_valid(&mem) {
        return;
    }
    if let Ok(iter) = q.iter(&mem) {
        for chain in iter {
            for desc in chain {
                let _ = (desc.addr(), desc.len(), desc.is_write_only());
            }
        }
    }

    // As a device worker does: pop, validate, move bytes, return used, notify.
    let interrupt = VirtioInterrupt::new().expect("eventfd");
    let event = EventFd::new(0).expect("eventfd");
    let mut dq = DeviceQueue::new(queue(size), event);
    let mut popped = 0u32;
    while let Some(chain) = dq.pop(&mem) {
        popped += 1;
        assert!(
            popped <= u32::from(size),
            "more chains than the queue holds"
        );
        // A head past the table (the guest's ring says so) gives an empty chain, refused below.
        let head = chain.head_index();
        let used = match Chain::parse(&mem, chain, max_bytes) {
            Ok(c) => {
                assert_eq!(c.head, head);
                check_chain(&mem, &c, max_bytes);
                c.writable.len().min(u64::from(u32::MAX)) as u32
            }
            Err(_) => 0,
        };
        dq.add_used(&mem, head, used);
    }
    dq.notify(&mem, &interrupt);
});
