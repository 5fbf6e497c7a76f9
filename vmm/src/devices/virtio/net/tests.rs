//! virtio-net tests: the guest is simulated through mock queues; the host side is a datagram socket pair
//! (deterministic EAGAIN and back-pressure) or a real TAP interface (skipped when one cannot be created).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::AtomicU32;
use std::sync::Mutex;
use std::time::Duration;

use super::*;
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::VIRTIO_MMIO_INT_VRING;

const T: Duration = Duration::from_secs(5);
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const ETHERTYPE: [u8; 2] = [0x88, 0xb5]; // IEEE local experimental
const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;

/// The host side for unit tests: one end of a non-blocking datagram socket pair.
struct SockBackend {
    sock: UnixDatagram,
    offload: Mutex<Option<u32>>,
}

impl AsRawFd for SockBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl NetBackend for SockBackend {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.recv(buf)
    }
    fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        self.sock.send(buf)
    }
    fn set_offload(&self, tun_flags: u32) -> io::Result<()> {
        *self.offload.lock().unwrap() = Some(tun_flags);
        Ok(())
    }
    fn describe(&self) -> String {
        "socket pair".into()
    }
}

/// A device on a socket pair; returns it, its backend and the peer (the "network").
fn sock_device(mtu: Option<u16>) -> (Net, Arc<SockBackend>, UnixDatagram) {
    let (dev_end, peer) = UnixDatagram::pair().unwrap();
    dev_end.set_nonblocking(true).unwrap();
    peer.set_read_timeout(Some(T)).unwrap();
    let backend = Arc::new(SockBackend {
        sock: dev_end,
        offload: Mutex::new(None),
    });
    let net = Net::with_backend(backend.clone(), MAC, mtu);
    (net, backend, peer)
}

struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    rx: TestQueue<'a>,
    tx: TestQueue<'a>,
    bump: Bump,
    irq: Arc<VirtioInterrupt>,
}

impl<'a> Guest<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self::with_rx_size(mem, QUEUE_SIZE)
    }

    fn with_rx_size(mem: &'a GuestMemoryMmap, rx_size: u16) -> Self {
        Self {
            mem,
            rx: TestQueue::new(mem, 0x0, rx_size),
            tx: TestQueue::new(mem, 0x1_0000, QUEUE_SIZE),
            bump: Bump::new(),
            irq: Arc::new(VirtioInterrupt::new().unwrap()),
        }
    }

    fn activate(&self, dev: &mut Net, features: u64) {
        dev.set_acked_features(features | (1 << VIRTIO_F_VERSION_1));
        dev.activate(
            self.mem.clone(),
            self.irq.clone(),
            vec![self.rx.device_side(), self.tx.device_side()],
        )
        .unwrap();
    }

    /// Put `descs` on tx and wait for the device to use the chain; returns the used length.
    fn tx_chain(&mut self, descs: &[Desc]) -> u32 {
        let head = self.tx.add(descs);
        let (id, len) = self.tx.wait_used(T).expect("tx chain not used");
        assert_eq!(id, u32::from(head));
        len
    }

    /// Send header + frame in one descriptor.
    fn send(&mut self, packet: &[u8]) -> u32 {
        let a = self.bump.alloc(packet.len() as u64);
        write_bytes(self.mem, a, packet);
        self.tx_chain(&[(a, packet.len() as u32, false)])
    }

    /// Post one device-writable rx buffer of `len` bytes; returns (head, address).
    fn post_rx(&mut self, len: u32) -> (u16, u64) {
        let a = self.bump.alloc(u64::from(len));
        (self.rx.add(&[(a, len, true)]), a)
    }
}

fn frame(tag: u8, len: usize) -> Vec<u8> {
    let mut f = MAC.to_vec();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&ETHERTYPE);
    f.extend((0..len - 14).map(|i| (i as u8).wrapping_mul(7) ^ tag));
    f
}

/// A host-to-guest packet: a zero vnet header (num_buffers deliberately garbage) and the frame.
fn packet(tag: u8, frame_len: usize) -> Vec<u8> {
    let mut p = vec![0u8; HDR_LEN];
    p[10] = 0xee;
    p[11] = 0xee;
    p.extend(frame(tag, frame_len));
    p
}

fn num_buffers(hdr: &[u8]) -> u16 {
    u16::from_le_bytes([hdr[10], hdr[11]])
}

fn stats(dev: &Net) -> NetStats {
    dev.counters().snapshot()
}

/// Wakeups over 100 ms. A loop that spins racks up thousands; an idle worker may see at most a stray kick.
fn wakeups_while_idle(dev: &Net) -> u64 {
    let before = stats(dev).worker_wakeups;
    std::thread::sleep(Duration::from_millis(100));
    stats(dev).worker_wakeups - before
}

#[test]
fn identity_features_and_config() {
    let (dev, _, _) = sock_device(None);
    assert_eq!(dev.device_type(), 1);
    assert_eq!(dev.queue_max_sizes(), &[256, 256]);
    let f = dev.avail_features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_STATUS,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature {bit} offered");
    }
    assert_eq!(
        f & (1 << VIRTIO_NET_F_MTU),
        0,
        "no MTU feature without an MTU"
    );
    assert_eq!(f & (1 << 29), 0, "no EVENT_IDX");
    assert_eq!(f & (1 << 22), 0, "no MQ");
    assert_eq!(f & (1 << 4), 0, "no GUEST_UFO");
    let mut cfg = [0u8; 12];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[0..6], &MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), VIRTIO_NET_S_LINK_UP);
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1);
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 0);
    let mut past = [0xffu8; 4];
    dev.read_config(10, &mut past);
    assert_eq!(past, [0; 4]);
    dev.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 4]);

    let (dev, _, _) = sock_device(Some(9000));
    assert_ne!(dev.avail_features() & (1 << VIRTIO_NET_F_MTU), 0);
    let mut mtu = [0u8; 2];
    dev.read_config(10, &mut mtu);
    assert_eq!(u16::from_le_bytes(mtu), 9000);
    let mut one = [0u8; 1];
    dev.read_config(5, &mut one);
    assert_eq!(one[0], MAC[5]);
}

#[test]
fn random_mac_is_unicast_and_local() {
    let a = random_mac();
    assert_eq!(a[0] & 1, 0);
    assert_eq!(a[0] & 2, 2);
    assert_ne!(a, random_mac());
}

#[test]
fn offloads_follow_acked_features() {
    use super::tap::offload_flags;
    let g = |bits: &[u32]| bits.iter().fold(0u64, |f, b| f | (1 << b));
    assert_eq!(offload_flags(0), 0);
    assert_eq!(
        offload_flags(g(&[VIRTIO_NET_F_GUEST_CSUM])),
        libc::TUN_F_CSUM
    );
    assert_eq!(
        offload_flags(g(&[
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6
        ])),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    );
    // TSO without checksum offload is not a valid combination: nothing.
    assert_eq!(offload_flags(g(&[VIRTIO_NET_F_GUEST_TSO4])), 0);
    // Host-side (guest tx) offloads need no tap setting.
    assert_eq!(
        offload_flags(g(&[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4])),
        0
    );

    let mem = test_mem();
    let (mut dev, backend, _peer) = sock_device(None);
    let guest = Guest::new(&mem);
    guest.activate(
        &mut dev,
        g(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4]),
    );
    assert_eq!(
        *backend.offload.lock().unwrap(),
        Some(libc::TUN_F_CSUM | libc::TUN_F_TSO4)
    );
}

#[test]
fn wrong_queue_count_is_refused() {
    let mem = test_mem();
    let (mut dev, _, _) = sock_device(None);
    let q = TestQueue::new(&mem, 0, 256);
    let irq = Arc::new(VirtioInterrupt::new().unwrap());
    assert!(matches!(
        dev.activate(mem.clone(), irq, vec![q.device_side()]),
        Err(ActivateError::QueueCount {
            expected: 2,
            actual: 1
        })
    ));
}

#[test]
fn tx_frame_reaches_the_backend() {
    let mem = test_mem();
    let (mut dev, _, peer) = sock_device(None);
    let mut g = Guest::new(&mem);
    g.activate(&mut dev, 0);
    // Header and frame in separate descriptors, the frame split too.
    let mut hdr = [0u8; HDR_LEN];
    hdr[0] = 1; // NEEDS_CSUM: passed through untouched
    let f = frame(1, 1514);
    let (ah, af) = (g.bump.alloc(12), g.bump.alloc(1514));
    write_bytes(&mem, ah, &hdr);
    write_bytes(&mem, af, &f);
    assert_eq!(
        g.tx_chain(&[(ah, 12, false), (af, 1000, false), (af + 1000, 514, false)]),
        0
    );
    let mut got = vec![0u8; 70_000];
    let n = peer.recv(&mut got).unwrap();
    assert_eq!(&got[..12], &hdr);
    assert_eq!(&got[12..n], &f[..]);
    let s = stats(&dev);
    assert_eq!((s.tx_frames, s.tx_bytes, s.tx_dropped), (1, 1514, 0));
    assert_ne!(g.irq.status() & VIRTIO_MMIO_INT_VRING, 0);
}

#[test]
fn hostile_tx_chains_are_returned_unsent() {
    let mem = test_mem();
    let (mut dev, _, peer) = sock_device(None);
    peer.set_nonblocking(true).unwrap();
    let mut g = Guest::new(&mem);
    g.activate(&mut dev, 0);
    let big = g.bump.alloc(MAX_PACKET_LEN as u64 + 4096);
    write_bytes(&mem, big, &packet(3, MAX_FRAME_LEN));
    let small = g.bump.alloc(4096);
    let cases: Vec<(&str, Vec<Desc>)> = vec![
        (
            "one byte over header + 65550",
            vec![(big, MAX_PACKET_LEN as u32 + 1, false)],
        ),
        (
            "over the maximum in several descriptors",
            vec![
                (big, 12, false),
                (big + 12, 40_000, false),
                (big + 40_012, 25_550, false),
                (small, 1, false),
            ],
        ),
        ("write-only descriptor", vec![(small, 100, true)]),
        (
            "readable then writable",
            vec![(small, 60, false), (small + 64, 60, true)],
        ),
        ("shorter than the header", vec![(small, 8, false)]),
        ("header without a frame", vec![(small, 12, false)]),
        ("header and a runt frame", vec![(small, 12 + 13, false)]),
        ("zero-length descriptor", vec![(small, 0, false)]),
        (
            "outside guest memory",
            vec![(MEM_SIZE as u64 - 100, 1000, false)],
        ),
    ];
    for (what, descs) in &cases {
        assert_eq!(g.tx_chain(descs), 0, "{what}");
    }
    // A looping chain.
    let first = g.tx.reserve(2);
    g.tx.store(first, small, 30, 1, first + 1);
    g.tx.store(first + 1, small, 30, 1, first);
    g.tx.publish(first);
    g.tx.kick();
    assert_eq!(g.tx.wait_used(T), Some((u32::from(first), 0)));
    let mut buf = vec![0u8; 70_000];
    assert_eq!(
        peer.recv(&mut buf).unwrap_err().kind(),
        io::ErrorKind::WouldBlock,
        "nothing reached the network"
    );
    assert_eq!(stats(&dev).tx_dropped, cases.len() as u64 + 1);
    // The largest valid packet still goes through.
    assert_eq!(g.tx_chain(&[(big, MAX_PACKET_LEN as u32, false)]), 0);
    peer.set_nonblocking(false).unwrap();
    assert_eq!(peer.recv(&mut buf).unwrap(), MAX_PACKET_LEN);
    assert_eq!(&buf[12..MAX_PACKET_LEN], &frame(3, MAX_FRAME_LEN)[..]);
    assert_eq!(stats(&dev).tx_frames, 1);
}

#[test]
fn tx_waits_for_a_writable_backend_without_spinning() {
    let mem = test_mem();
    let (mut dev, backend, peer) = sock_device(None);
    // Fill the pair until the device side would block.
    let filler = backend.sock.try_clone().unwrap();
    let mut queued = 0;
    loop {
        match filler.send(&[0u8; 1500]) {
            Ok(_) => queued += 1,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(queued > 0);
    let mut g = Guest::new(&mem);
    g.activate(&mut dev, 0);
    let p = packet(9, 600);
    let a = g.bump.alloc(p.len() as u64);
    write_bytes(&mem, a, &p);
    let head = g.tx.add(&[(a, p.len() as u32, false)]);
    // Blocked: the chain stays with the device and the worker sleeps.
    assert!(wakeups_while_idle(&dev) <= 2, "worker spins on EAGAIN");
    assert_eq!(g.tx.next_used(), None, "frame kept, not dropped");
    // More kicks do not make it drop or reorder anything.
    let p2 = packet(10, 700);
    let a2 = g.bump.alloc(p2.len() as u64);
    write_bytes(&mem, a2, &p2);
    let head2 = g.tx.add(&[(a2, p2.len() as u32, false)]);
    assert!(wakeups_while_idle(&dev) <= 2);
    assert_eq!(g.tx.next_used(), None);
    // The network drains; the device resumes on EPOLLOUT.
    let mut buf = vec![0u8; 4096];
    for _ in 0..queued {
        assert_eq!(peer.recv(&mut buf).unwrap(), 1500);
    }
    assert_eq!(g.tx.wait_used(T), Some((u32::from(head), 0)));
    assert_eq!(g.tx.wait_used(T), Some((u32::from(head2), 0)));
    let n = peer.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &p[..]);
    let n = peer.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &p2[..]);
    let s = stats(&dev);
    assert_eq!((s.tx_frames, s.tx_dropped), (2, 0));
}

#[test]
fn rx_frame_fills_one_chain_without_mrg_rxbuf() {
    let mem = test_mem();
    let (mut dev, _, peer) = sock_device(None);
    let mut g = Guest::new(&mem);
    g.activate(&mut dev, 0);
    let (head, a) = g.post_rx(2048);
    let p = packet(5, 1000);
    peer.send(&p).unwrap();
    assert_eq!(g.rx.wait_used(T), Some((u32::from(head), p.len() as u32)));
    let got = read_bytes(&mem, a, p.len());
    assert_eq!(&got[..10], &p[..10]);
    assert_eq!(num_buffers(&got), 1);
    assert_eq!(&got[12..], &p[12..]);
    let s = stats(&dev);
    assert_eq!((s.rx_frames, s.rx_bytes, s.rx_dropped), (1, 1000, 0));
    assert_ne!(g.irq.status() & VIRTIO_MMIO_INT_VRING, 0);
    // A chain of several descriptors.
    let (b1, b2) = (g.bump.alloc(20), g.bump.alloc(2000));
    let head = g.rx.add(&[(b1, 20, true), (b2, 2000, true)]);
    let p = packet(6, 1500);
    peer.send(&p).unwrap();
    assert_eq!(g.rx.wait_used(T), Some((u32::from(head), p.len() as u32)));
    let mut got = read_bytes(&mem, b1, 20);
    got.extend(read_bytes(&mem, b2, p.len() - 20));
    assert_eq!(num_buffers(&got), 1);
    assert_eq!(&got[12..], &p[12..]);
}

#[test]
fn rx_frame_spreads_over_chains_with_mrg_rxbuf() {
    let mem = test_mem();
    let (mut dev, _, peer) = sock_device(None);
    let mut g = Guest::new(&mem);
    g.activate(&mut dev, MRG);
    let bufs: Vec<(u16, u64)> = (0..5).map(|_| g.post_rx(1000)).collect();
    let p = packet(7, 3000);
    peer.send(&p).unwrap();
    let mut got = Vec::new();
    for (i, want) in [1000u32, 1000, 1000, 12].iter().enumerate() {
        let (id, len) = g.rx.wait_used(T).expect("merged buffer");
        assert_eq!((id, len), (u32::from(bufs[i].0), *want));
        got.extend(read_bytes(&mem, bufs[i].1, len as usize));
    }
    assert_eq!(num_buffers(&got), 4);
    assert_eq!(&got[..10], &p[..10]);
    assert_eq!(&got[12..], &p[12..]);
    // The fifth buffer takes the next frame alone.
    let p = packet(8, 200);
    peer.send(&p).unwrap();
    assert_eq!(
        g.rx.wait_used(T),
        Some((u32::from(bufs[4].0), p.len() as u32))
    );
    assert_eq!(num_buffers(&read_bytes(&mem, bufs[4].1, 12)), 1);
    assert_eq!(stats(&dev).rx_frames, 2);
}

#[test]
fn rx_chain_too_small_without_mrg_rxbuf_drops_the_frame() {
    let mem = test_mem();
    let (mut dev, _, peer) = sock_device(None);
    let mut g = Guest::new(&mem);
    g.activate(&mut dev, 0);
    let (small, a) = g.post_rx(100);
    write_bytes(&mem, a, &[0xaa; 100]);
    peer.send(&packet(1, 1500)).unwrap();
    assert_eq!(g.rx.wait_used(T), Some((u32::from(small), 0)));
    assert_eq!(read_bytes(&mem, a, 100), vec![0xaa; 100], "nothing written");
    let s = stats(&dev);
    assert_eq!((s.rx_frames, s.rx_dropped), (0, 1));
    // The next frame with a big enough buffer arrives.
    let (big, b) = g.post_rx(2048);
    let p = packet(2, 1500);
    peer.send(&p).unwrap();
    assert_eq!(g.rx.wait_used(T), Some((u32::from(big), p.len() as u32)));
    assert_eq!(read_bytes(&mem, b + 12, 1500), &p[12..]);
}

#[test]
fn rx_with_mrg_rxbuf_waits_for_enough_buffers() {
    let mem = test_mem();
    let (mut dev, _, peer) = sock_device(None);
    let mut g = Guest::new(&mem);
    g.activate(&mut dev, MRG);
    let mut bufs: Vec<(u16, u64)> = (0..2).map(|_| g.post_rx(1000)).collect();
    let p = packet(4, 3000);
    peer.send(&p).unwrap();
    assert!(
        wakeups_while_idle(&dev) <= 2,
        "worker spins waiting for buffers"
    );
    assert_eq!(g.rx.next_used(), None, "no partial frame handed over");
    bufs.extend((0..2).map(|_| g.post_rx(1000)));
    let mut got = Vec::new();
    for (head, addr) in &bufs {
        let (id, len) = g.rx.wait_used(T).unwrap();
        assert_eq!(id, u32::from(*head));
        got.extend(read_bytes(&mem, *addr, len as usize));
    }
    assert_eq!(num_buffers(&got), 4);
    assert_eq!(&got[12..], &p[12..]);
    assert_eq!(stats(&dev).rx_dropped, 0);
}

#[test]
fn rx_with_mrg_rxbuf_drops_a_frame_the_whole_queue_cannot_hold() {
    let mem = test_mem();
    let (mut dev, _, peer) = sock_device(None);
    let mut g = Guest::with_rx_size(&mem, 16);
    g.activate(&mut dev, MRG);
    let bufs: Vec<(u16, u64)> = (0..16).map(|_| g.post_rx(12)).collect();
    peer.send(&packet(1, 1000)).unwrap();
    for (i, (head, _)) in bufs.iter().enumerate() {
        assert_eq!(
            g.rx.wait_used(T),
            Some((u32::from(*head), 0)),
            "{i} {:?}",
            stats(&dev)
        );
    }
    assert_eq!(stats(&dev).rx_dropped, 1);
    // Buffers posted again serve the next frame.
    let more: Vec<(u16, u64)> = (0..2).map(|_| g.post_rx(1000)).collect();
    peer.send(&packet(2, 1500)).unwrap();
    assert_eq!(g.rx.wait_used(T), Some((u32::from(more[0].0), 1000)));
    assert_eq!(g.rx.wait_used(T), Some((u32::from(more[1].0), 512)));
}

#[test]
fn hostile_rx_chains_are_returned_unused() {
    for features in [0, MRG] {
        let mem = test_mem();
        let (mut dev, _, peer) = sock_device(None);
        let mut g = Guest::new(&mem);
        g.activate(&mut dev, features);
        let a = g.bump.alloc(4096);
        let cases: Vec<(&str, Vec<Desc>)> = vec![
            ("device-readable", vec![(a, 2048, false)]),
            (
                "readable after writable",
                vec![(a, 1024, true), (a + 1024, 1024, false)],
            ),
            ("smaller than the header", vec![(a, 8, true)]),
            ("zero-length", vec![(a, 0, true)]),
            (
                "outside guest memory",
                vec![(MEM_SIZE as u64 - 16, 2048, true)],
            ),
        ];
        for (what, descs) in &cases {
            let head = g.rx.add(descs);
            assert_eq!(g.rx.wait_used(T), Some((u32::from(head), 0)), "{what}");
        }
        let first = g.rx.reserve(2);
        g.rx.store(first, a, 1024, 1 | 2, first + 1);
        g.rx.store(first + 1, a + 1024, 1024, 1 | 2, first);
        g.rx.publish(first);
        g.rx.kick();
        assert_eq!(g.rx.wait_used(T), Some((u32::from(first), 0)), "loop");
        assert_eq!(stats(&dev).rx_bad_chains, cases.len() as u64 + 1);
        // Nothing was read from the network for them; a good buffer then gets the frame.
        let p = packet(1, 500);
        peer.send(&p).unwrap();
        let (head, b) = g.post_rx(2048);
        assert_eq!(g.rx.wait_used(T), Some((u32::from(head), p.len() as u32)));
        assert_eq!(read_bytes(&mem, b + 12, 500), &p[12..]);
    }
}

#[test]
fn no_rx_buffers_means_no_reads_and_no_spinning() {
    let mem = test_mem();
    let (mut dev, backend, peer) = sock_device(None);
    let thief = backend.sock.try_clone().unwrap();
    let mut g = Guest::new(&mem);
    g.activate(&mut dev, 0);
    for tag in 0..4 {
        peer.send(&packet(tag, 100 + usize::from(tag))).unwrap();
    }
    // A tx round trip proves the worker ran its loop with the frames pending.
    assert_eq!(g.send(&packet(9, 60)), 0);
    assert!(
        wakeups_while_idle(&dev) <= 2,
        "worker spins without rx buffers"
    );
    let s = stats(&dev);
    assert_eq!((s.rx_frames, s.rx_dropped), (0, 0));
    // One buffer: exactly the first frame; the worker reads nothing ahead.
    let (head, a) = g.post_rx(2048);
    assert_eq!(g.rx.wait_used(T), Some((u32::from(head), 12 + 100)));
    assert_eq!(read_bytes(&mem, a + 12, 100), &packet(0, 100)[12..]);
    assert!(wakeups_while_idle(&dev) <= 2);
    let mut buf = vec![0u8; 4096];
    let n = thief
        .recv(&mut buf)
        .expect("frame 1 still queued at the host");
    assert_eq!(&buf[..n], &packet(1, 101)[..]);
    // The rest come in order once buffers arrive.
    let bufs: Vec<(u16, u64)> = (0..2).map(|_| g.post_rx(2048)).collect();
    for (i, (head, a)) in bufs.iter().enumerate() {
        let tag = i as u8 + 2;
        let len = 100 + usize::from(tag);
        assert_eq!(
            g.rx.wait_used(T),
            Some((u32::from(*head), (12 + len) as u32))
        );
        assert_eq!(read_bytes(&mem, a + 12, len), &packet(tag, len)[12..]);
    }
    assert_eq!(stats(&dev).rx_dropped, 0);
}

#[test]
fn reset_stops_and_reactivation_serves_again() {
    let mem = test_mem();
    let (mut dev, _, peer) = sock_device(None);
    let mut g = Guest::new(&mem);
    g.activate(&mut dev, MRG);
    assert_eq!(g.send(&packet(1, 64)), 0);
    assert!(dev.reset());
    assert!(dev.reset(), "resetting an idle device is fine");
    let mut buf = vec![0u8; 4096];
    assert!(peer.recv(&mut buf).is_ok());
    // A new driver instance: fresh queues elsewhere in memory.
    let mut g2 = Guest {
        mem: &mem,
        rx: TestQueue::new(&mem, 0x2_0000, QUEUE_SIZE),
        tx: TestQueue::new(&mem, 0x3_0000, QUEUE_SIZE),
        bump: Bump(0x80_0000),
        irq: Arc::new(VirtioInterrupt::new().unwrap()),
    };
    g2.activate(&mut dev, 0);
    assert!(matches!(
        dev.activate(
            mem.clone(),
            g2.irq.clone(),
            vec![g2.rx.device_side(), g2.tx.device_side()]
        ),
        Err(ActivateError::AlreadyActive)
    ));
    let p = packet(2, 80);
    assert_eq!(g2.send(&p), 0);
    let n = peer.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &p[..]);
    let (head, _) = g2.post_rx(2048);
    peer.send(&packet(3, 90)).unwrap();
    assert_eq!(g2.rx.wait_used(T), Some((u32::from(head), 102)));
    assert_eq!(stats(&dev).tx_frames, 2);
}

// ---- A real TAP interface -------------------------------------------------------------------------------

static TAP_SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh, non-persistent tap (gone when its last fd closes), up, without IPv6 chatter; None (with the
/// reason printed) when this host does not allow creating one.
fn test_tap() -> Option<Tap> {
    let name = format!(
        "cvt{}{}",
        std::process::id() % 1_000_000,
        TAP_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let tap = match Tap::open(&name) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("skipping tap test: cannot create tap {name}: {e}");
            return None;
        }
    };
    assert_eq!(tap.name(), name);
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    if let Err(e) = set_link_up(&name) {
        eprintln!("skipping tap test: cannot bring {name} up: {e}");
        return None;
    }
    Some(tap)
}

fn set_link_up(name: &str) -> io::Result<()> {
    // SAFETY: plain socket creation; the result is checked and owned below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `s` is a fresh descriptor nobody else owns.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, b) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq, which lives across both calls; the
    // union read is of the flags the first call filled in.
    unsafe {
        if libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            return Err(io::Error::last_os_error());
        }
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_NOARP) as libc::c_short;
        if libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &mut ifr) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// An AF_PACKET socket on the tap's host side: what it sends, the guest receives, and vice versa.
struct PacketSock(OwnedFd);

impl PacketSock {
    fn bind(ifname: &str) -> io::Result<Self> {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the result is checked and owned below.
        let s = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if s < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `s` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(s) };
        let cname = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: if_nametoindex reads the NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: sockaddr_ll is plain data; all-zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: bind reads `sll` and setsockopt reads `tv`, both alive for the calls.
        unsafe {
            if libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            ) < 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            ) < 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Self(fd))
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: send reads `frame`, which is valid for the call.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "{}", io::Error::last_os_error());
    }

    /// The next frame with our ethertype, within `T`.
    fn recv_ours(&self) -> Option<Vec<u8>> {
        let end = std::time::Instant::now() + T;
        let mut buf = vec![0u8; 70_000];
        while std::time::Instant::now() < end {
            // SAFETY: recv writes at most `buf.len()` bytes into `buf`.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 14 && buf[12..14] == ETHERTYPE {
                return Some(buf[..n as usize].to_vec());
            }
        }
        None
    }
}

/// Next rx frame with our ethertype (other traffic the kernel sends to the tap is skipped and its buffer
/// posted again); returns (used length, bytes).
fn recv_ours(g: &mut Guest, bufs: &mut std::collections::HashMap<u32, u64>) -> (u32, Vec<u8>) {
    let end = std::time::Instant::now() + T;
    while std::time::Instant::now() < end {
        let Some((id, len)) = g.rx.wait_used(T) else {
            break;
        };
        let a = bufs.remove(&id).expect("used id is one of ours");
        let got = read_bytes(g.mem, a, len as usize);
        let (h, a) = g.post_rx(4096);
        bufs.insert(u32::from(h), a);
        if got.len() >= HDR_LEN + 14 && got[HDR_LEN + 12..HDR_LEN + 14] == ETHERTYPE {
            return (len, got);
        }
    }
    panic!("no frame of ours reached the guest");
}

#[test]
fn tap_carries_frames_both_ways() {
    let Some(tap) = test_tap() else { return };
    let name = tap.name().to_string();
    let flags = tap.flags().unwrap();
    assert_eq!(
        flags & (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR),
        libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR
    );
    assert_eq!(flags & libc::IFF_MULTI_QUEUE, 0);
    let host = PacketSock::bind(&name).unwrap();
    let mem = test_mem();
    // A single-queue tap takes one open file: each device adopts a duplicate of it (as with `--net fd=N`),
    // and `tap` keeps the interface alive in between.
    for features in [0, MRG | (1 << VIRTIO_NET_F_GUEST_CSUM)] {
        // SAFETY: dup of a descriptor we own; `from_fd` takes ownership of the copy.
        let dup = unsafe { libc::dup(tap.as_raw_fd()) };
        let mtu = (features != 0).then_some(1500);
        let mut dev = Net::new(Tap::from_fd(dup).unwrap(), MAC, mtu);
        let mut g = Guest::new(&mem);
        g.activate(&mut dev, features);
        // Guest to host.
        let mut p = vec![0u8; HDR_LEN];
        p.extend(frame(0x11, 300));
        assert_eq!(g.send(&p), 0);
        assert_eq!(
            host.recv_ours().expect("frame on the tap"),
            frame(0x11, 300)
        );
        // Host to guest.
        let mut bufs = std::collections::HashMap::new();
        for _ in 0..8 {
            let (h, a) = g.post_rx(4096);
            bufs.insert(u32::from(h), a);
        }
        let f = frame(0x22, 1400);
        host.send(&f);
        let (len, got) = recv_ours(&mut g, &mut bufs);
        assert_eq!(len as usize, HDR_LEN + f.len());
        assert_eq!(got[1], 0, "gso_type NONE");
        assert_eq!(num_buffers(&got), 1);
        assert_eq!(&got[HDR_LEN..], &f[..]);
        let s = stats(&dev);
        assert!(s.tx_frames >= 1 && s.rx_frames >= 1);
        assert!(dev.reset());
    }
    drop(tap);
}

#[test]
fn tap_without_rx_buffers_is_not_drained() {
    let Some(tap) = test_tap() else { return };
    let name = tap.name().to_string();
    // A second descriptor on the same (single) queue: whatever the device did not read, this one can.
    // SAFETY: dup of a descriptor we own; the result is checked and owned below.
    let dup = unsafe { libc::dup(tap.as_raw_fd()) };
    assert!(dup >= 0);
    // SAFETY: `dup` is a fresh descriptor nobody else owns.
    let peek = unsafe { OwnedFd::from_raw_fd(dup) };
    let host = PacketSock::bind(&name).unwrap();
    let mem = test_mem();
    let mut dev = Net::new(tap, MAC, None);
    let mut g = Guest::new(&mem);
    g.activate(&mut dev, 0);
    for tag in 0..3 {
        host.send(&frame(tag, 200));
    }
    let mut p = vec![0u8; HDR_LEN];
    p.extend(frame(0x33, 60));
    assert_eq!(g.send(&p), 0);
    assert!(
        wakeups_while_idle(&dev) <= 2,
        "worker spins on a readable tap"
    );
    assert_eq!(stats(&dev).rx_frames, 0);
    // Everything the host sent is still in the tap queue.
    let mut seen = 0;
    let mut buf = vec![0u8; 70_000];
    loop {
        // SAFETY: read writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::read(peek.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            break;
        }
        let n = n as usize;
        if n >= HDR_LEN + 14 && buf[HDR_LEN + 12..HDR_LEN + 14] == ETHERTYPE {
            assert_eq!(&buf[HDR_LEN..n], &frame(seen, 200)[..]);
            seen += 1;
        }
    }
    assert_eq!(seen, 3);
}

#[test]
fn tap_from_fd_checks_what_it_adopts() {
    // Not a descriptor at all / not open.
    assert!(matches!(Tap::from_fd(-1), Err(TapError::BadFd { .. })));
    assert!(matches!(
        Tap::from_fd(1_000_000),
        Err(TapError::BadFd { .. })
    ));
    // A regular file.
    let f = tempfile::tempfile().unwrap();
    let e = Tap::from_fd(f.as_raw_fd()).unwrap_err();
    assert!(matches!(e, TapError::NotTap { .. }), "{e}");
    assert!(e.to_string().contains("not a tap"), "{e}");
    // Still ours: the failed adoption did not close it.
    // SAFETY: F_GETFD only queries the descriptor table.
    assert!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFD) } >= 0);
    // Invalid names never reach the kernel.
    for bad in ["", "a/b", "0123456789abcdef", "a b", ".."] {
        assert!(
            matches!(Tap::open(bad), Err(TapError::InvalidName(_))),
            "{bad:?}"
        );
    }

    let Some(tap) = test_tap() else { return };
    // /dev/net/tun not attached to any interface.
    let tun = std::fs::File::open("/dev/net/tun").unwrap();
    assert!(matches!(
        Tap::from_fd(tun.as_raw_fd()),
        Err(TapError::NotTap { .. })
    ));
    // An inherited tap fd is adopted, made non-blocking, and keeps the interface.
    // SAFETY: dup of a descriptor we own; `from_fd` takes ownership of the copy.
    let dup = unsafe { libc::dup(tap.as_raw_fd()) };
    let adopted = Tap::from_fd(dup).unwrap();
    assert_eq!(adopted.name(), tap.name());
    assert_eq!(
        super::tap::name_of_fd(adopted.as_raw_fd()).as_deref(),
        Some(tap.name())
    );
    // SAFETY: F_GETFL only queries the descriptor's flags.
    let fl = unsafe { libc::fcntl(adopted.as_raw_fd(), libc::F_GETFL) };
    assert_ne!(fl & libc::O_NONBLOCK, 0);
    // A tap opened without IFF_VNET_HDR, and a TUN device, are refused.
    for (flags, want_tun) in [
        (libc::IFF_TAP | libc::IFF_NO_PI, false),
        (libc::IFF_TUN | libc::IFF_NO_PI, true),
    ] {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        let name = format!("{}x{}", tap.name(), u8::from(want_tun));
        // SAFETY: ifreq is plain data; all-zero is valid.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, b) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *d = b as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes the ifreq, alive for the call.
        assert!(unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } >= 0);
        let e = Tap::from_fd(f.as_raw_fd()).unwrap_err();
        if want_tun {
            assert!(matches!(e, TapError::NotTapMode { .. }), "{e}");
        } else {
            assert!(matches!(e, TapError::MissingFlags { .. }), "{e}");
        }
    }
}

#[test]
fn deleted_tap_does_not_make_the_worker_spin() {
    let Some(tap) = test_tap() else { return };
    let name = tap.name().to_string();
    let mem = test_mem();
    let mut dev = Net::new(tap, MAC, None);
    let mut g = Guest::new(&mem);
    g.activate(&mut dev, 0);
    g.post_rx(2048);
    let mut p = vec![0u8; HDR_LEN];
    p.extend(frame(0x44, 60));
    assert_eq!(g.send(&p), 0);
    assert_eq!(stats(&dev).tx_frames, 1);
    let out = std::process::Command::new("ip")
        .args(["link", "del", &name])
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        other => {
            eprintln!("skipping: cannot delete {name}: {other:?}");
            return;
        }
    }
    // The tap now polls as an error forever; the worker stops watching it instead of spinning.
    let _ = wakeups_while_idle(&dev);
    assert!(wakeups_while_idle(&dev) <= 2, "worker spins on a dead tap");
    // The guest's frames are still returned (and counted as dropped).
    assert_eq!(g.send(&p), 0);
    let s = stats(&dev);
    assert_eq!((s.tx_frames, s.tx_dropped), (1, 1));
    assert!(dev.reset());
}
