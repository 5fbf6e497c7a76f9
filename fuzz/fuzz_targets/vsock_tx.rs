//! The vsock packet path: packets the guest puts on the tx queue (headers of any content, payload
//! lengths that lie, chains split anywhere or carrying device-writable descriptors) parsed and handled by
//! the vsock worker and its muxer, with rx buffers to answer into and a host side that listens on port
//! 1024, connects with `CONNECT <port>` lines, writes, and hangs up.
//!
//! Input: a sequence of operations (one byte each, then its operands) until the input ends.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;

use capsa_fuzz::{guest_memory, Bump, DriverQueue, Input};
use capsa_vmm::devices::virtio::fuzzing::VsockHarness;
use capsa_vmm::devices::virtio::vsock::QUEUE_SIZE;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 1 << 20;
const GUEST_CID: u64 = 3;
const HDR_LEN: usize = 44;
/// The host port a service listens on (the agent's port, seen from the other side).
const HOST_PORT: u32 = 1024;

struct Host {
    uds: PathBuf,
    listener: UnixListener,
}

fn host() -> &'static Host {
    static H: OnceLock<Host> = OnceLock::new();
    H.get_or_init(|| {
        let dir = capsa_fuzz::scratch_dir("vsock");
        let uds = dir.join("vsock.sock");
        let listener = UnixListener::bind(dir.join(format!("vsock.sock_{HOST_PORT}")))
            .expect("host port listener");
        listener.set_nonblocking(true).expect("nonblocking");
        Host { uds, listener }
    })
}

/// A header the fuzzer starts from: a stream packet from the guest to the host's port.
fn header(inp: &mut Input) -> [u8; HDR_LEN] {
    let mut h = [0u8; HDR_LEN];
    let mode = inp.u8();
    if mode & 1 != 0 {
        // Entirely from the input.
        let b = inp.bytes(HDR_LEN);
        h[..b.len()].copy_from_slice(b);
        return h;
    }
    h[0..8].copy_from_slice(&GUEST_CID.to_le_bytes());
    h[8..16].copy_from_slice(&2u64.to_le_bytes());
    h[16..20].copy_from_slice(&(0x4000 + u32::from(inp.u8() & 3)).to_le_bytes()); // src port
    h[20..24].copy_from_slice(&(HOST_PORT + u32::from(mode >> 7)).to_le_bytes()); // dst port
    h[28..30].copy_from_slice(&1u16.to_le_bytes()); // stream
    h[30..32].copy_from_slice(&u16::from(inp.u8() % 8).to_le_bytes()); // op
    h[32..36].copy_from_slice(&u32::from(inp.u8() & 3).to_le_bytes()); // flags
    h[36..40].copy_from_slice(&inp.u32().to_le_bytes()); // buf_alloc
    h[40..44].copy_from_slice(&inp.u32().to_le_bytes()); // fwd_cnt
    h
}

fuzz_target!(|data: &[u8]| {
    let host = host();
    let mem = guest_memory(MEM_SIZE);
    let mut rxq = DriverQueue::new(0, QUEUE_SIZE);
    let mut txq = DriverQueue::new(DriverQueue::SPAN, QUEUE_SIZE);
    let evq = DriverQueue::new(2 * DriverQueue::SPAN, QUEUE_SIZE);
    let mut bump = Bump::new(3 * DriverQueue::SPAN, MEM_SIZE as u64);
    let queues = [&rxq, &txq, &evq]
        .iter()
        .map(|q| (q.device_side(QUEUE_SIZE), EventFd::new(0).expect("eventfd")))
        .collect();
    let mut dev =
        VsockHarness::new(GUEST_CID, &host.uds, mem.clone(), queues).expect("vsock harness");
    let mut streams: Vec<UnixStream> = Vec::new();
    let mut inp = Input::new(data);

    while !inp.is_empty() {
        match inp.u8() % 7 {
            0 => {
                // A tx packet: header, payload, split into up to four readable descriptors.
                let mut pkt = header(&mut inp).to_vec();
                let plen = usize::from(inp.u16() % 0x2000);
                if pkt[24..28] == [0; 4] {
                    pkt[24..28].copy_from_slice(&(plen as u32).to_le_bytes());
                }
                pkt.extend_from_slice(inp.bytes(plen));
                let split = inp.u8();
                let Some(a) = bump.alloc(pkt.len() as u64) else {
                    break;
                };
                mem.write_slice(&pkt, GuestAddress(a)).expect("packet");
                let mut bufs = Vec::new();
                let mut off = 0usize;
                for i in 0..(split & 3) {
                    let cut = (off + usize::from(inp.u8()) * (usize::from(i) + 1)).min(pkt.len());
                    bufs.push((a + off as u64, (cut - off) as u32, false));
                    off = cut;
                }
                bufs.push((a + off as u64, (pkt.len() - off) as u32, split & 4 != 0));
                if txq.add_chain(&mem, &bufs).is_none() {
                    break;
                }
            }
            1 => {
                // An rx buffer of any size.
                let len = u32::from(inp.u16() % 0x2000);
                let Some(a) = bump.alloc(u64::from(len)) else {
                    break;
                };
                if rxq.add_chain(&mem, &[(a, len, true)]).is_none() {
                    break;
                }
            }
            2 => dev.step(),
            3 => {
                // The service on HOST_PORT takes its connections and writes to each.
                while let Ok((s, _)) = host.listener.accept() {
                    let _ = s.set_nonblocking(true);
                    streams.push(s);
                }
                let n = usize::from(inp.u8());
                let msg = inp.bytes(n);
                for s in &mut streams {
                    let _ = s.write(msg);
                }
            }
            4 => {
                // A host process connects to a guest port: a CONNECT line (or whatever the input says).
                if let Ok(mut s) = UnixStream::connect(&host.uds) {
                    let _ = s.set_nonblocking(true);
                    let n = usize::from(inp.u8() % 40);
                    let line = inp.bytes(n);
                    let _ = s.write(line);
                    streams.push(s);
                }
            }
            5 => {
                // Host ends read what they got, then some hang up.
                let mut buf = [0u8; 4096];
                for s in &mut streams {
                    let _ = s.read(&mut buf);
                }
                let keep = usize::from(inp.u8()) % (streams.len() + 1);
                streams.truncate(keep);
            }
            _ => {
                let how = inp.u8();
                if let Some(s) = streams.last() {
                    let _ = s.shutdown(match how % 3 {
                        0 => std::net::Shutdown::Read,
                        1 => std::net::Shutdown::Write,
                        _ => std::net::Shutdown::Both,
                    });
                }
            }
        }
    }
    dev.step();
    dev.step();
    // Every tx chain comes back used, whatever it held.
    assert_eq!(
        txq.used_idx(&mem),
        txq.avail_idx(),
        "tx chains not returned"
    );
    while rxq.next_used(&mem).is_some() {}
    drop(dev);
    // Whatever the worker's connections left in the host listener's backlog goes with this input.
    while host.listener.accept().is_ok() {}
});
