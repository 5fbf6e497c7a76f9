//! vsock device tests: the guest is simulated through mock queues, the host side uses real Unix sockets.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

use super::packet::*;
use super::*;
use crate::devices::virtio::test_utils::*;

const CID: u64 = 3;
const T: Duration = Duration::from_secs(5);
const RX_BUF: u32 = 4096;

struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    rx: TestQueue<'a>,
    tx: TestQueue<'a>,
    _ev: TestQueue<'a>,
    bump: Bump,
    rx_bufs: std::collections::HashMap<u32, u64>,
    interrupt: Arc<VirtioInterrupt>,
}

impl<'a> Guest<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self {
            mem,
            rx: TestQueue::new(mem, 0x0, QUEUE_SIZE),
            tx: TestQueue::new(mem, 0x1_0000, QUEUE_SIZE),
            _ev: TestQueue::new(mem, 0x2_0000, QUEUE_SIZE),
            bump: Bump::new(),
            rx_bufs: Default::default(),
            interrupt: Arc::new(VirtioInterrupt::new().unwrap()),
        }
    }

    fn activate(&self, dev: &mut Vsock) {
        let qs = vec![
            self.rx.device_side(),
            self.tx.device_side(),
            self._ev.device_side(),
        ];
        dev.activate(self.mem.clone(), self.interrupt.clone(), qs)
            .unwrap();
    }

    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let a = self.bump.alloc(u64::from(RX_BUF));
            let head = self.rx.add(&[(a, RX_BUF, true)]);
            self.rx_bufs.insert(u32::from(head), a);
        }
    }

    /// Next packet the device put in rx, if one comes within `timeout`.
    fn recv_within(&mut self, timeout: Duration) -> Option<(Header, Vec<u8>)> {
        let (id, len) = self.rx.wait_used(timeout)?;
        let addr = self
            .rx_bufs
            .remove(&id)
            .expect("used id is one of our buffers");
        assert!(
            len as usize >= HDR_LEN,
            "rx used len {len} shorter than a header"
        );
        let raw = read_bytes(self.mem, addr, len as usize);
        let hdr = Header::from_bytes(raw[..HDR_LEN].try_into().unwrap());
        assert_eq!(hdr.len as usize, len as usize - HDR_LEN);
        assert_eq!(hdr.src_cid, HOST_CID);
        assert_eq!(hdr.dst_cid, CID);
        Some((hdr, raw[HDR_LEN..].to_vec()))
    }

    fn recv(&mut self) -> (Header, Vec<u8>) {
        self.recv_within(T).expect("no rx packet from the device")
    }

    /// Put a packet on tx and wait until the device consumed it; returns the used length.
    fn send_raw(&mut self, bytes: &[u8]) -> u32 {
        let a = self.bump.alloc(bytes.len() as u64);
        write_bytes(self.mem, a, bytes);
        let head = self.tx.add(&[(a, bytes.len() as u32, false)]);
        let (id, len) = self.tx.wait_used(T).expect("tx chain not used");
        assert_eq!(id, u32::from(head));
        len
    }

    fn send(&mut self, hdr: Header, payload: &[u8]) {
        let mut h = hdr;
        h.len = payload.len() as u32;
        let mut b = h.to_bytes().to_vec();
        b.extend_from_slice(payload);
        assert_eq!(self.send_raw(&b), 0);
    }
}

/// A guest packet on the stream (guest_port -> host_port).
fn gpkt(op: u16, guest_port: u32, host_port: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

fn socket_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("v.sock")
}

fn read_line(s: &mut UnixStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b).unwrap() {
            0 => break,
            _ if b[0] == b'\n' => break,
            _ => out.push(b[0]),
        }
    }
    String::from_utf8(out).unwrap()
}

fn read_exact_timeout(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(T)).unwrap();
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

/// Host connects with CONNECT `port`; the guest accepts. Returns (host stream, host-side port).
fn host_connect(g: &mut Guest, path: &PathBuf, port: u32, guest_buf: u32) -> (UnixStream, u32) {
    let mut s = UnixStream::connect(path).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let (req, _) = g.recv();
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!(req.dst_port, port);
    assert!(req.src_port >= 1 << 30);
    assert_eq!(req.type_, TYPE_STREAM);
    assert_eq!(req.buf_alloc, connection::CONN_BUF_SIZE);
    g.send(gpkt(OP_RESPONSE, port, req.src_port, guest_buf, 0), &[]);
    s.set_read_timeout(Some(T)).unwrap();
    assert_eq!(read_line(&mut s), format!("OK {}", req.src_port));
    (s, req.src_port)
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn config_and_identity() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Vsock::new(0xfedc_ba98, &socket_path(&dir)).unwrap();
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    assert_ne!(dev.avail_features() & (1 << VIRTIO_F_VERSION_1), 0);
    let mut lo = [0u8; 4];
    dev.read_config(0, &mut lo);
    let mut hi = [0u8; 4];
    dev.read_config(4, &mut hi);
    assert_eq!(u32::from_le_bytes(lo), 0xfedc_ba98);
    assert_eq!(u32::from_le_bytes(hi), 0);
    let mut all = [0u8; 8];
    dev.read_config(0, &mut all);
    assert_eq!(u64::from_le_bytes(all), 0xfedc_ba98);
    let mut past = [0xffu8; 4];
    dev.read_config(6, &mut past);
    assert_eq!(past, [0; 4]);
    dev.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 4]);
}

#[test]
fn new_rejects_reserved_cids_and_live_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let p = socket_path(&dir);
    assert!(matches!(Vsock::new(2, &p), Err(VsockError::InvalidCid(2))));
    assert!(matches!(
        Vsock::new(u64::from(u32::MAX), &p),
        Err(VsockError::InvalidCid(_))
    ));
    let live = Vsock::new(3, &p).unwrap();
    assert!(matches!(Vsock::new(4, &p), Err(VsockError::InUse(_))));
    drop(live);
    assert!(!p.exists(), "socket file removed on drop");
    // A stale socket file (nobody listening) is replaced.
    drop(UnixListener::bind(&p).unwrap());
    assert!(p.exists());
    let _dev = Vsock::new(3, &p).unwrap();
    UnixStream::connect(&p).unwrap();
}

#[test]
fn host_connect_handshake_and_data_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let mem = test_mem();
    let mut dev = Vsock::new(CID, &path).unwrap();
    let mut g = Guest::new(&mem);
    g.activate(&mut dev);
    g.post_rx(8);
    let (mut s, local) = host_connect(&mut g, &path, 1024, 65536);

    s.write_all(b"hello guest").unwrap();
    let (h, data) = g.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RW, local, 1024));
    assert_eq!(data, b"hello guest");
    assert_ne!(
        g.interrupt.status() & crate::devices::virtio::VIRTIO_MMIO_INT_VRING,
        0
    );

    g.send(gpkt(OP_RW, 1024, local, 65536, 11), b"hello host");
    assert_eq!(read_exact_timeout(&mut s, 10), b"hello host");

    // The host half-closes: the guest gets SHUTDOWN(SEND) and can still send.
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let (h, _) = g.recv();
    assert_eq!(h.op, OP_SHUTDOWN);
    assert_eq!(h.flags & SHUTDOWN_SEND, SHUTDOWN_SEND);
    assert_eq!(h.flags & SHUTDOWN_RCV, 0);
    g.send(gpkt(OP_RW, 1024, local, 65536, 11), b"still here");
    assert_eq!(read_exact_timeout(&mut s, 10), b"still here");
    // The guest closes too: the host sees EOF and the guest gets RST (connection finished).
    g.send(
        gpkt(OP_SHUTDOWN, 1024, local, 65536, 11).with_flags(SHUTDOWN_SEND | SHUTDOWN_RCV),
        &[],
    );
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let (h, _) = g.recv();
    assert_eq!(h.op, OP_RST);
}

impl Header {
    fn with_flags(mut self, f: u32) -> Self {
        self.flags = f;
        self
    }
}

#[test]
fn host_connection_before_activation_waits() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let mem = test_mem();
    let mut dev = Vsock::new(CID, &path).unwrap();
    // The host connects and sends its request while the guest driver is not up yet.
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"CONNECT 1024\npipelined").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut g = Guest::new(&mem);
    g.activate(&mut dev);
    g.post_rx(4);
    let (req, _) = g.recv();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 1024));
    g.send(gpkt(OP_RESPONSE, 1024, req.src_port, 65536, 0), &[]);
    s.set_read_timeout(Some(T)).unwrap();
    assert_eq!(read_line(&mut s), format!("OK {}", req.src_port));
    // Bytes the host wrote right after the CONNECT line are data, not lost.
    let (h, data) = g.recv();
    assert_eq!(h.op, OP_RW);
    assert_eq!(data, b"pipelined");
}

#[test]
fn guest_refusal_closes_host_connection() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let mem = test_mem();
    let mut dev = Vsock::new(CID, &path).unwrap();
    let mut g = Guest::new(&mem);
    g.activate(&mut dev);
    g.post_rx(4);
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"CONNECT 99\n").unwrap();
    let (req, _) = g.recv();
    g.send(gpkt(OP_RST, 99, req.src_port, 0, 0), &[]);
    s.set_read_timeout(Some(T)).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    assert!(buf.is_empty(), "host got {buf:?} instead of EOF");
}

#[test]
fn bad_connect_lines_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let mem = test_mem();
    let mut dev = Vsock::new(CID, &path).unwrap();
    let mut g = Guest::new(&mem);
    g.activate(&mut dev);
    g.post_rx(4);
    for line in [&b"HELLO\n"[..], b"CONNECT x\n", &[b'A'; 100][..]] {
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(line).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let mut buf = Vec::new();
        // Closed by the device: EOF, or a reset when it left bytes unread.
        match s.read_to_end(&mut buf) {
            Ok(_) => assert!(buf.is_empty()),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
    }
    assert!(
        g.recv_within(Duration::from_millis(100)).is_none(),
        "guest must not hear of bad requests"
    );
}

#[test]
fn guest_connect_to_host_port() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let host_listener = UnixListener::bind(format!("{}_5000", path.display())).unwrap();
    let mem = test_mem();
    let mut dev = Vsock::new(CID, &path).unwrap();
    let mut g = Guest::new(&mem);
    g.activate(&mut dev);
    g.post_rx(8);
    g.send(gpkt(OP_REQUEST, 7777, 5000, 65536, 0), &[]);
    let (mut s, _) = host_listener.accept().unwrap();
    let (h, _) = g.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RESPONSE, 5000, 7777));

    g.send(gpkt(OP_RW, 7777, 5000, 65536, 0), b"ping");
    assert_eq!(read_exact_timeout(&mut s, 4), b"ping");
    s.write_all(b"pong").unwrap();
    let (h, data) = g.recv();
    assert_eq!((h.op, h.fwd_cnt), (OP_RW, 4));
    assert_eq!(data, b"pong");

    // The host closes completely: the guest is told neither side will send or receive.
    drop(s);
    let (h, _) = g.recv();
    assert_eq!(h.op, OP_SHUTDOWN);
    assert_eq!(h.flags, SHUTDOWN_SEND | SHUTDOWN_RCV);
    g.send(gpkt(OP_RST, 7777, 5000, 65536, 4), &[]);
    // The port pair is free again.
    g.send(gpkt(OP_REQUEST, 7777, 5000, 65536, 0), &[]);
    let _s2 = host_listener.accept().unwrap();
    assert_eq!(g.recv().0.op, OP_RESPONSE);
}

#[test]
fn guest_connect_without_listener_gets_rst() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let mem = test_mem();
    let mut dev = Vsock::new(CID, &path).unwrap();
    let mut g = Guest::new(&mem);
    g.activate(&mut dev);
    g.post_rx(4);
    g.send(gpkt(OP_REQUEST, 7777, 6000, 65536, 0), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, 6000, 7777));
}

#[test]
fn host_to_guest_respects_guest_credit_and_slow_rx() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let mem = test_mem();
    let mut dev = Vsock::new(CID, &path).unwrap();
    let mut g = Guest::new(&mem);
    g.activate(&mut dev);
    g.post_rx(2);
    const GUEST_BUF: u32 = 10_000;
    let (s, local) = host_connect(&mut g, &path, 1024, GUEST_BUF);
    let total = 100_000;
    let data = pattern(total);
    let writer = {
        let data = data.clone();
        let mut s = s.try_clone().unwrap();
        std::thread::spawn(move || s.write_all(&data).unwrap())
    };
    // The guest is not reading rx for a while (no buffers posted): nothing must get lost.
    std::thread::sleep(Duration::from_millis(100));
    let mut got = Vec::new();
    let mut consumed = 0usize;
    g.post_rx(4);
    while got.len() < total {
        // Take everything the credit allows, re-posting each used buffer.
        let target = (consumed + GUEST_BUF as usize).min(total);
        while got.len() < target {
            let (h, d) = g.recv();
            g.post_rx(1);
            assert_eq!(h.op, OP_RW);
            got.extend_from_slice(&d);
            assert!(
                got.len() - consumed <= GUEST_BUF as usize,
                "device exceeded the guest's credit"
            );
        }
        // Credit exhausted: the device must stay quiet until the guest reports progress.
        if got.len() < total {
            assert!(
                g.recv_within(Duration::from_millis(100)).is_none(),
                "data sent without credit"
            );
        }
        consumed = got.len();
        g.send(
            gpkt(OP_CREDIT_UPDATE, 1024, local, GUEST_BUF, consumed as u32),
            &[],
        );
    }
    writer.join().unwrap();
    assert_eq!(got, data);
}

#[test]
fn guest_to_slow_host_is_byte_exact_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let mem = test_mem();
    let mut dev = Vsock::new(CID, &path).unwrap();
    let mut g = Guest::new(&mem);
    g.activate(&mut dev);
    g.post_rx(64);
    let (s, local) = host_connect(&mut g, &path, 1024, 65536);
    let total = 2 << 20;
    let data = pattern(total);
    let reader = {
        let mut s = s.try_clone().unwrap();
        std::thread::spawn(move || {
            // A host that does not read at first, then reads slowly.
            std::thread::sleep(Duration::from_millis(300));
            let mut out = Vec::new();
            let mut buf = [0u8; 16384];
            while out.len() < total {
                let n = s.read(&mut buf).unwrap();
                assert_ne!(n, 0);
                out.extend_from_slice(&buf[..n]);
                std::thread::sleep(Duration::from_micros(200));
            }
            out
        })
    };
    // Guest side of the credit protocol: send only what the device's buf_alloc/fwd_cnt allow.
    let (mut peer_alloc, mut peer_fwd) = (connection::CONN_BUF_SIZE, 0u32);
    let mut sent = 0usize;
    let mut stalls = 0;
    while sent < total {
        let credit = peer_alloc - (sent as u32 - peer_fwd);
        if credit == 0 {
            stalls += 1;
            let (h, _) = g.recv();
            assert_eq!(h.op, OP_CREDIT_UPDATE, "only credit updates expected");
            g.post_rx(1);
            peer_alloc = h.buf_alloc;
            peer_fwd = h.fwd_cnt;
            continue;
        }
        let n = (credit as usize).min(32 * 1024).min(total - sent);
        g.send(gpkt(OP_RW, 1024, local, 65536, 0), &data[sent..sent + n]);
        sent += n;
        while let Some((h, _)) = g.recv_within(Duration::ZERO) {
            g.post_rx(1);
            peer_fwd = h.fwd_cnt;
        }
    }
    assert!(
        stalls > 0,
        "the slow host never exhausted the guest's credit"
    );
    let out = reader.join().unwrap();
    assert_eq!(out.len(), data.len());
    assert!(out == data, "bytes differ");
}

#[test]
fn guest_exceeding_credit_is_reset() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let mem = test_mem();
    let mut dev = Vsock::new(CID, &path).unwrap();
    let mut g = Guest::new(&mem);
    g.activate(&mut dev);
    g.post_rx(8);
    let (mut s, local) = host_connect(&mut g, &path, 1024, 65536);
    // The host never reads; the guest ignores credit and pushes far more than advertised.
    let chunk = vec![0x5a; MAX_PKT_PAYLOAD];
    let mut reset = false;
    for _ in 0..64 {
        g.send(gpkt(OP_RW, 1024, local, 65536, 0), &chunk);
        if let Some((h, _)) = g.recv_within(Duration::ZERO) {
            if h.op == OP_RST {
                reset = true;
                break;
            }
        }
    }
    if !reset {
        reset = g.recv().0.op == OP_RST;
    }
    assert!(reset, "credit violation must reset the connection");
    // The host connection was closed after what fit in the credit.
    s.set_read_timeout(Some(T)).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert!(got.len() <= connection::CONN_BUF_SIZE as usize);
}

#[test]
fn credit_request_gets_credit_update() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let mem = test_mem();
    let mut dev = Vsock::new(CID, &path).unwrap();
    let mut g = Guest::new(&mem);
    g.activate(&mut dev);
    g.post_rx(8);
    let (mut s, local) = host_connect(&mut g, &path, 1024, 65536);
    g.send(gpkt(OP_RW, 1024, local, 65536, 0), b"abc");
    assert_eq!(read_exact_timeout(&mut s, 3), b"abc");
    g.send(gpkt(OP_CREDIT_REQUEST, 1024, local, 65536, 0), &[]);
    let (h, _) = g.recv();
    assert_eq!(
        (h.op, h.fwd_cnt, h.buf_alloc),
        (OP_CREDIT_UPDATE, 3, connection::CONN_BUF_SIZE)
    );
}

/// Device and host connection up; returns what hostile tests need.
fn hostile_setup<'a>(
    mem: &'a GuestMemoryMmap,
    dir: &tempfile::TempDir,
) -> (Vsock, Guest<'a>, UnixStream, u32) {
    let path = socket_path(dir);
    let mut dev = Vsock::new(CID, &path).unwrap();
    let mut g = Guest::new(mem);
    g.activate(&mut dev);
    g.post_rx(8);
    let (s, local) = host_connect(&mut g, &path, 1024, 65536);
    (dev, g, s, local)
}

/// After hostile input, the connection must still carry data both ways.
fn assert_still_works(g: &mut Guest, s: &mut UnixStream, local: u32) {
    g.send(gpkt(OP_RW, 1024, local, 65536, 0), b"alive");
    assert_eq!(read_exact_timeout(s, 5), b"alive");
    s.write_all(b"yes").unwrap();
    let (h, d) = g.recv();
    assert_eq!((h.op, d.as_slice()), (OP_RW, &b"yes"[..]));
}

#[test]
fn hostile_tx_chains_are_used_and_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let mem = test_mem();
    let (_dev, mut g, mut s, local) = hostile_setup(&mem, &dir);

    // Descriptor outside guest memory.
    let h = g.tx.add(&[(MEM_SIZE as u64 - 8, 64, false)]);
    assert_eq!(g.tx.wait_used(T), Some((u32::from(h), 0)));
    let h = g.tx.add(&[(u64::MAX - 10, 64, false)]);
    assert_eq!(g.tx.wait_used(T), Some((u32::from(h), 0)));
    // A chain that loops: 0 -> 1 -> 0.
    let first = g.tx.reserve(2);
    let a = g.bump.alloc(64);
    g.tx.store(first, a, 44, 1, first + 1);
    g.tx.store(first + 1, a, 20, 1, first);
    g.tx.publish(first);
    g.tx.kick();
    assert_eq!(g.tx.wait_used(T), Some((u32::from(first), 0)));
    // A descriptor pointing at itself.
    let d = g.tx.reserve(1);
    g.tx.store(d, a, 44, 1, d);
    g.tx.publish(d);
    g.tx.kick();
    assert_eq!(g.tx.wait_used(T), Some((u32::from(d), 0)));
    // next index out of the table.
    let d = g.tx.reserve(1);
    g.tx.store(d, a, 44, 1, 60000);
    g.tx.publish(d);
    g.tx.kick();
    assert_eq!(g.tx.wait_used(T), Some((u32::from(d), 0)));
    // Wrong direction: a device-writable buffer on tx.
    let h = g.tx.add(&[(a, 64, true)]);
    assert_eq!(g.tx.wait_used(T), Some((u32::from(h), 0)));
    // Header too short.
    assert_eq!(g.send_raw(&[1, 2, 3, 4, 5]), 0);
    // Huge descriptor length (beyond the chain limit).
    let h = g.tx.add(&[(DATA_START, 16 << 20, false)]);
    assert_eq!(g.tx.wait_used(T), Some((u32::from(h), 0)));
    // Header claiming more payload than the buffer holds, on an unknown port pair: RST reply.
    let mut hdr = gpkt(OP_RW, 4242, 4343, 0, 0);
    hdr.len = 60000;
    let mut b = hdr.to_bytes().to_vec();
    b.extend_from_slice(b"short");
    assert_eq!(g.send_raw(&b), 0);
    let (r, _) = g.recv();
    assert_eq!((r.op, r.src_port, r.dst_port), (OP_RST, 4343, 4242));
    // Unknown op and unknown type for unknown connections: RST replies.
    g.send(gpkt(99, 4242, 4343, 0, 0), &[]);
    assert_eq!(g.recv().0.op, OP_RST);
    let mut dgram = gpkt(OP_REQUEST, 4242, 4343, 0, 0);
    dgram.type_ = 2;
    g.send(dgram, &[]);
    assert_eq!(g.recv().0.op, OP_RST);
    // Wrong source CID: dropped silently.
    let mut spoof = gpkt(OP_REQUEST, 4242, 4343, 0, 0);
    spoof.src_cid = 77;
    g.send(spoof, &[]);
    assert!(g.recv_within(Duration::from_millis(50)).is_none());

    assert_still_works(&mut g, &mut s, local);
}

#[test]
fn oversized_len_on_live_connection_resets_it() {
    let dir = tempfile::tempdir().unwrap();
    let mem = test_mem();
    let (_dev, mut g, mut s, local) = hostile_setup(&mem, &dir);
    let mut hdr = gpkt(OP_RW, 1024, local, 65536, 0);
    hdr.len = u32::MAX;
    assert_eq!(g.send_raw(&hdr.to_bytes()), 0);
    assert_eq!(g.recv().0.op, OP_RST);
    let mut buf = Vec::new();
    s.set_read_timeout(Some(T)).unwrap();
    s.read_to_end(&mut buf).unwrap();
    assert!(buf.is_empty());
}

#[test]
fn unknown_op_on_live_connection_resets_it() {
    let dir = tempfile::tempdir().unwrap();
    let mem = test_mem();
    let (_dev, mut g, mut s, local) = hostile_setup(&mem, &dir);
    g.send(gpkt(0x1234, 1024, local, 65536, 0), &[]);
    assert_eq!(g.recv().0.op, OP_RST);
    let mut buf = Vec::new();
    s.set_read_timeout(Some(T)).unwrap();
    s.read_to_end(&mut buf).unwrap();
    assert!(buf.is_empty());
}

#[test]
fn hostile_rx_buffers_are_used_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let mem = test_mem();
    let mut dev = Vsock::new(CID, &path).unwrap();
    let mut g = Guest::new(&mem);
    g.activate(&mut dev);
    // Host asks for a connection so the device has something to send.
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"CONNECT 1024\n").unwrap();
    let a = g.bump.alloc(4096);
    // Device-readable rx buffer, too-small buffer, buffer outside memory.
    let bad: Vec<u16> = vec![
        g.rx.add(&[(a, 4096, false)]),
        g.rx.add(&[(a, 20, true)]),
        g.rx.add(&[(MEM_SIZE as u64, 4096, true)]),
    ];
    for h in bad {
        assert_eq!(g.rx.wait_used(T), Some((u32::from(h), 0)));
    }
    // A good buffer still gets the request.
    g.post_rx(1);
    let (req, _) = g.recv();
    assert_eq!(req.op, OP_REQUEST);
}

#[test]
fn rx_split_across_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let mem = test_mem();
    let mut dev = Vsock::new(CID, &path).unwrap();
    let mut g = Guest::new(&mem);
    g.activate(&mut dev);
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"CONNECT 1024\n").unwrap();
    // Header split over two descriptors, as some drivers do.
    let a = g.bump.alloc(30);
    let b = g.bump.alloc(100);
    let head = g.rx.add(&[(a, 30, true), (b, 100, true)]);
    let (id, len) = g.rx.wait_used(T).unwrap();
    assert_eq!((id, len), (u32::from(head), HDR_LEN as u32));
    let mut raw = read_bytes(&mem, a, 30);
    raw.extend(read_bytes(&mem, b, 14));
    let h = Header::from_bytes(raw[..].try_into().unwrap());
    assert_eq!((h.op, h.dst_port), (OP_REQUEST, 1024));
}

#[test]
fn connect_timeout_when_guest_never_answers() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let mem = test_mem();
    let mut dev = Vsock::new(CID, &path).unwrap();
    let mut g = Guest::new(&mem);
    g.activate(&mut dev);
    g.post_rx(4);
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"CONNECT 1024\n").unwrap();
    let (req, _) = g.recv();
    assert_eq!(req.op, OP_REQUEST);
    // No RESPONSE: after the timeout the guest gets RST and the host EOF.
    let (h, _) = g.recv_within(muxer::CONNECT_TIMEOUT + T).unwrap();
    assert_eq!((h.op, h.src_port), (OP_RST, req.src_port));
    let mut buf = Vec::new();
    s.set_read_timeout(Some(T)).unwrap();
    s.read_to_end(&mut buf).unwrap();
    assert!(buf.is_empty());
}

#[test]
fn reset_drops_connections_and_reactivates() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let mem = test_mem();
    let mut dev = Vsock::new(CID, &path).unwrap();
    {
        let mut g = Guest::new(&mem);
        g.activate(&mut dev);
        g.post_rx(4);
        let (mut s, _) = host_connect(&mut g, &path, 1024, 65536);
        assert!(dev.reset());
        let mut buf = Vec::new();
        s.set_read_timeout(Some(T)).unwrap();
        s.read_to_end(&mut buf).unwrap();
        assert!(buf.is_empty(), "host connection closed by the reset");
    }
    // Fresh queues after the reset; the same listener serves.
    let mem2 = test_mem();
    let mut g = Guest::new(&mem2);
    g.activate(&mut dev);
    g.post_rx(4);
    let (_s, _) = host_connect(&mut g, &path, 1024, 65536);
    assert!(matches!(
        dev.activate(mem2.clone(), g.interrupt.clone(), vec![]),
        Err(ActivateError::AlreadyActive)
    ));
    drop(dev);
    assert!(!path.exists());
}

#[test]
fn activate_with_wrong_queue_count_fails() {
    let dir = tempfile::tempdir().unwrap();
    let mem = test_mem();
    let mut dev = Vsock::new(CID, &socket_path(&dir)).unwrap();
    let g = Guest::new(&mem);
    let r = dev.activate(mem.clone(), g.interrupt.clone(), vec![g.rx.device_side()]);
    assert!(matches!(
        r,
        Err(ActivateError::QueueCount {
            expected: 3,
            actual: 1
        })
    ));
}

#[test]
fn guest_half_close_keeps_host_to_guest_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let host_listener = UnixListener::bind(format!("{}_5001", path.display())).unwrap();
    let mem = test_mem();
    let mut dev = Vsock::new(CID, &path).unwrap();
    let mut g = Guest::new(&mem);
    g.activate(&mut dev);
    g.post_rx(8);
    g.send(gpkt(OP_REQUEST, 9000, 5001, 65536, 0), &[]);
    let (mut s, _) = host_listener.accept().unwrap();
    assert_eq!(g.recv().0.op, OP_RESPONSE);
    g.send(gpkt(OP_RW, 9000, 5001, 65536, 0), b"request");
    g.send(
        gpkt(OP_SHUTDOWN, 9000, 5001, 65536, 0).with_flags(SHUTDOWN_SEND),
        &[],
    );
    // The host reads the data, then EOF.
    s.set_read_timeout(Some(T)).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"request");
    // And can still answer.
    s.write_all(b"response").unwrap();
    let (h, d) = g.recv();
    assert_eq!((h.op, d.as_slice()), (OP_RW, &b"response"[..]));
    // Host closes: its SHUTDOWN completes the stream and the connection is reset.
    drop(s);
    let (h, _) = g.recv();
    assert_eq!(h.op, OP_SHUTDOWN);
    assert_eq!(g.recv().0.op, OP_RST);
}

#[test]
fn guest_connect_to_full_backlog_does_not_block() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    // A listener that never accepts; fill its backlog.
    let lpath = format!("{}_5002", path.display());
    let l = UnixListener::bind(&lpath).unwrap();
    // Shrink its backlog so a few connections fill it.
    // SAFETY: listen(2) on a socket we own.
    assert_eq!(
        unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 1) },
        0
    );
    let mut fillers = Vec::new();
    for _ in 0..64 {
        let Ok(s) = muxer::tests_connect_nonblocking(std::path::Path::new(&lpath)) else {
            break;
        };
        fillers.push(s);
    }
    assert!(fillers.len() < 64, "backlog never filled");
    let mem = test_mem();
    let mut dev = Vsock::new(CID, &path).unwrap();
    let mut g = Guest::new(&mem);
    g.activate(&mut dev);
    g.post_rx(4);
    g.send(gpkt(OP_REQUEST, 9100, 5002, 65536, 0), &[]);
    assert_eq!(g.recv().0.op, OP_RST);
}

#[test]
fn host_buffering_is_capped_across_connections_with_tx_backpressure() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let mem = test_mem();
    // More than one connection may buffer (CONN_BUF_SIZE, 256 KiB): only the total cap can stop this.
    let limit = 6 * MAX_PKT_PAYLOAD;
    let mut dev = Vsock::new(CID, &path)
        .unwrap()
        .with_host_buffer_limit(limit);
    let mut g = Guest::new(&mem);
    g.activate(&mut dev);
    g.post_rx(32);
    // Two host peers that do not read for now.
    let (a, pa) = host_connect(&mut g, &path, 1024, 1 << 20);
    let (b, pb) = host_connect(&mut g, &path, 1025, 1 << 20);
    let chunks = [
        pattern(MAX_PKT_PAYLOAD),
        pattern(MAX_PKT_PAYLOAD)
            .iter()
            .map(|x| x ^ 0xff)
            .collect::<Vec<u8>>(),
    ];
    let targets = [(1024, pa), (1025, pb)];
    // The guest sends 64 KiB packets on both connections in turn until the device stops taking them.
    let mut queued = [0usize; 2];
    let mut blocked = None;
    for i in 0..64 {
        let c = i % 2;
        let (port, local) = targets[c];
        let mut bytes = gpkt(OP_RW, port, local, 1 << 20, 0).to_bytes().to_vec();
        bytes[24..28].copy_from_slice(&(MAX_PKT_PAYLOAD as u32).to_le_bytes());
        bytes.extend_from_slice(&chunks[c]);
        let addr = g.bump.alloc(bytes.len() as u64);
        write_bytes(&mem, addr, &bytes);
        let head = g.tx.add(&[(addr, bytes.len() as u32, false)]);
        queued[c] += 1;
        let used = match g.tx.wait_used(Duration::from_millis(300)) {
            Some(u) => Some(u),
            // Slow machine, or back-pressure: only the latter leaves the device at its limit.
            None if dev.host_buffered() + MAX_PKT_PAYLOAD <= limit => g.tx.wait_used(T),
            None => None,
        };
        match used {
            Some((id, len)) => assert_eq!((id, len), (u32::from(head), 0)),
            None => {
                blocked = Some(head);
                break;
            }
        }
    }
    let head = blocked.expect("the device never stopped taking tx chains");
    let buffered = dev.host_buffered();
    assert!(buffered <= limit, "{buffered} buffered over the limit");
    assert!(
        buffered > connection::CONN_BUF_SIZE as usize,
        "{buffered}: the cap must be across connections"
    );
    // The chain stays in the queue; nothing was reset or dropped.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(g.tx.next_used(), None, "tx chain taken over the limit");
    while let Some((h, _)) = g.recv_within(Duration::ZERO) {
        assert_eq!(h.op, OP_CREDIT_UPDATE, "unexpected packet {h:?}");
        g.post_rx(1);
    }
    // The host peers read: the device resumes, and every byte arrives in order.
    let readers: Vec<_> = [a, b]
        .into_iter()
        .enumerate()
        .map(|(c, mut s)| {
            let want: Vec<u8> = chunks[c].repeat(queued[c]);
            std::thread::spawn(move || {
                assert_eq!(read_exact_timeout(&mut s, want.len()), want);
                s
            })
        })
        .collect();
    assert_eq!(g.tx.wait_used(T), Some((u32::from(head), 0)));
    let _streams: Vec<UnixStream> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    let deadline = std::time::Instant::now() + T;
    while dev.host_buffered() != 0 {
        assert!(std::time::Instant::now() < deadline, "buffers not released");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn worker_stops_between_tx_and_rx_chains() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let mem = test_mem();
    let mut g = Guest::new(&mem);
    let queues = [g.rx.device_side(), g.tx.device_side(), g._ev.device_side()]
        .into_iter()
        .map(|(q, e)| DeviceQueue::new(q, e))
        .collect();
    let listener = UnixListener::bind(&path).unwrap();
    let buffered = HostBuffered::default();
    let muxer = Muxer::new(CID, path.clone(), listener, Epoll::new().unwrap(), buffered).unwrap();
    let mut worker = VsockWorker::new(
        mem.clone(),
        g.interrupt.clone(),
        queues,
        muxer,
        MAX_HOST_BUFFERED,
    );
    let kill = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    // Three packets for ports nobody listens on: each gets an RST.
    for port in 0..3 {
        let bytes = gpkt(OP_REQUEST, 7000 + port, 6000, 65536, 0).to_bytes();
        let a = g.bump.alloc(bytes.len() as u64);
        write_bytes(&mem, a, &bytes);
        g.tx.add(&[(a, bytes.len() as u32, false)]);
    }
    g.post_rx(3);
    // Told to stop: not one chain is taken.
    kill.write(1).unwrap();
    assert!(worker.process_tx(&kill).is_break());
    assert_eq!(g.tx.next_used(), None);
    assert!(worker.process_tx(&kill).is_continue());
    for _ in 0..3 {
        assert!(g.tx.next_used().is_some());
    }
    // The RSTs wait for rx buffers; a stop comes first there too.
    kill.write(1).unwrap();
    assert!(worker.process_rx(&kill).is_break());
    assert_eq!(g.rx.next_used(), None);
    assert!(worker.process_rx(&kill).is_continue());
    for _ in 0..3 {
        assert_eq!(g.recv().0.op, OP_RST);
    }
}

/// Bytes the throughput benchmarks push each way (`VSOCK_BENCH_MIB` overrides, in MiB).
fn bench_bytes() -> usize {
    std::env::var("VSOCK_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(256)
        << 20
}

fn read_hdr(mem: &GuestMemoryMmap, addr: u64) -> Header {
    let mut b = [0u8; HDR_LEN];
    mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
    Header::from_bytes(&b)
}

/// CPU time the device's worker thread ("capsa-vsock") has used: what the data path costs, whatever else
/// the machine runs meanwhile.
fn worker_cpu() -> Duration {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let mut ticks = 0u64;
    for t in std::fs::read_dir("/proc/self/task").unwrap() {
        let t = t.unwrap().path();
        if std::fs::read_to_string(t.join("comm"))
            .unwrap_or_default()
            .trim()
            != "capsa-vsock"
        {
            continue;
        }
        let stat = std::fs::read_to_string(t.join("stat")).unwrap_or_default();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        ticks += fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    }
    Duration::from_millis(ticks * 1000 / hz)
}

fn mib_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

/// Throughput of the device's data path with a guest simulated on mock queues and a real host peer on the
/// Unix socket: guest → host with 64 KiB packets (header and payload in two descriptors, as Linux sends
/// them), and host → guest into 4 KiB rx buffers (Linux's rx buffer size). Prints MiB/s; run with
/// `cargo test --release -p capsa-vmm -- --ignored --nocapture vsock_throughput`.
#[test]
#[ignore = "benchmark: prints MiB/s"]
fn vsock_throughput() {
    let total = bench_bytes();
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let mem = test_mem();
    let mut dev = Vsock::new(CID, &path).unwrap();
    let mut g = Guest::new(&mem);
    g.activate(&mut dev);
    // Every rx buffer holds a header and 4 KiB, as Linux's do.
    let rx_len = HDR_LEN as u32 + 4096;
    let post = |g: &mut Guest, addr: u64| {
        let head = g.rx.add(&[(addr, rx_len, true)]);
        g.rx_bufs.insert(u32::from(head), addr);
    };
    for _ in 0..16 {
        let a = g.bump.alloc(u64::from(rx_len));
        post(&mut g, a);
    }
    const GUEST_BUF: u32 = 256 * 1024;
    let (s, local) = host_connect(&mut g, &path, 1024, GUEST_BUF);

    // Guest → host.
    let reader = {
        let mut s = s.try_clone().unwrap();
        std::thread::spawn(move || {
            // A cheap reader (the device, not the peer, is measured): it checks one byte per read against
            // the stream's pattern; byte-exactness is what the other tests check.
            let want = pattern(MAX_PKT_PAYLOAD);
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0usize;
            while got < total {
                let n = s.read(&mut buf).unwrap();
                assert_ne!(n, 0, "EOF after {got} bytes");
                assert_eq!(buf[0], want[got % MAX_PKT_PAYLOAD], "byte {got}");
                got += n;
            }
        })
    };
    let payload = pattern(MAX_PKT_PAYLOAD);
    let pay = g.bump.alloc(MAX_PKT_PAYLOAD as u64);
    write_bytes(&mem, pay, &payload);
    let mut hdr = gpkt(OP_RW, 1024, local, GUEST_BUF, 0);
    hdr.len = MAX_PKT_PAYLOAD as u32;
    let hdr_addr = g.bump.alloc(HDR_LEN as u64);
    write_bytes(&mem, hdr_addr, &hdr.to_bytes());
    let (start, cpu0) = (std::time::Instant::now(), worker_cpu());
    let (mut peer_alloc, mut peer_fwd) = (connection::CONN_BUF_SIZE, 0u32);
    let (mut sent, mut in_flight) = (0usize, 0usize);
    while sent < total || in_flight > 0 {
        let mut progress = false;
        let credit = peer_alloc.wrapping_sub((sent as u32).wrapping_sub(peer_fwd)) as usize;
        if sent < total && credit >= MAX_PKT_PAYLOAD && in_flight < 64 {
            g.tx.add(&[
                (hdr_addr, HDR_LEN as u32, false),
                (pay, MAX_PKT_PAYLOAD as u32, false),
            ]);
            sent += MAX_PKT_PAYLOAD;
            in_flight += 1;
            progress = true;
        }
        while g.tx.next_used().is_some() {
            in_flight -= 1;
            progress = true;
        }
        while let Some((id, len)) = g.rx.next_used() {
            let addr = g.rx_bufs.remove(&id).unwrap();
            assert_eq!(len as usize, HDR_LEN);
            let h = read_hdr(&mem, addr);
            assert_eq!(h.op, OP_CREDIT_UPDATE);
            peer_alloc = h.buf_alloc;
            peer_fwd = h.fwd_cnt;
            post(&mut g, addr);
            progress = true;
        }
        if !progress {
            std::thread::yield_now();
        }
    }
    reader.join().unwrap();
    let (tx_time, tx_cpu) = (start.elapsed(), worker_cpu() - cpu0);

    // Host → guest.
    let stream = pattern(1 << 20);
    let writer = {
        let stream = stream.clone();
        let mut s = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let chunk = stream;
            let mut left = total;
            while left > 0 {
                let n = left.min(chunk.len());
                s.write_all(&chunk[..n]).unwrap();
                left -= n;
            }
        })
    };
    for _ in 0..48 {
        let a = g.bump.alloc(u64::from(rx_len));
        post(&mut g, a);
    }
    let (start, cpu0) = (std::time::Instant::now(), worker_cpu());
    let (mut got, mut acked) = (0usize, 0usize);
    while got < total {
        let Some((id, len)) = g.rx.next_used() else {
            std::thread::yield_now();
            continue;
        };
        let addr = g.rx_bufs.remove(&id).unwrap();
        let h = read_hdr(&mem, addr);
        let first: u8 = mem.read_obj(GuestAddress(addr + HDR_LEN as u64)).unwrap();
        post(&mut g, addr);
        if h.op == OP_CREDIT_UPDATE {
            continue; // the last one of the guest → host run
        }
        assert_eq!(h.op, OP_RW);
        assert_eq!(h.len + HDR_LEN as u32, len);
        assert_eq!(first, stream[got % stream.len()], "byte {got}");
        got += h.len as usize;
        if got - acked >= GUEST_BUF as usize / 4 {
            acked = got;
            let mut c = gpkt(OP_CREDIT_UPDATE, 1024, local, GUEST_BUF, got as u32);
            c.len = 0;
            let b = c.to_bytes();
            let a = g.bump.0;
            write_bytes(&mem, a, &b);
            g.tx.add(&[(a, HDR_LEN as u32, false)]);
            while g.tx.next_used().is_none() {
                std::thread::yield_now();
            }
        }
    }
    let (rx_time, rx_cpu) = (start.elapsed(), worker_cpu() - cpu0);
    writer.join().unwrap();
    println!(
        "vsock throughput ({} MiB each way): guest → host {:.0} MiB/s ({:.0} MiB per worker CPU second), \
         host → guest {:.0} MiB/s ({:.0} MiB per worker CPU second; 4 KiB rx buffers)",
        total >> 20,
        mib_per_s(total, tx_time),
        mib_per_s(total, tx_cpu),
        mib_per_s(total, rx_time),
        mib_per_s(total, rx_cpu),
    );
}

impl Guest<'_> {
    /// Put a packet on tx as a chain cut at `cuts` (offsets into header + payload) and wait until used.
    fn send_split(&mut self, hdr: Header, payload: &[u8], cuts: &[usize]) {
        let mut h = hdr;
        h.len = payload.len() as u32;
        let mut b = h.to_bytes().to_vec();
        b.extend_from_slice(payload);
        let a = self.bump.alloc(b.len() as u64);
        write_bytes(self.mem, a, &b);
        let mut descs = Vec::new();
        let mut from = 0;
        for &c in cuts.iter().chain(std::iter::once(&b.len())) {
            descs.push((a + from as u64, (c - from) as u32, false));
            from = c;
        }
        let head = self.tx.add(&descs);
        assert_eq!(self.tx.wait_used(T), Some((u32::from(head), 0)));
    }
}

#[test]
fn tx_payload_split_across_descriptors_arrives_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mem = test_mem();
    let (_dev, mut g, mut s, local) = hostile_setup(&mem, &dir);
    let data = pattern(3000);
    // Header cut in two, payload in pieces of 1, 2, 997 and the rest; then header and payload in one
    // descriptor; then the header alone and every payload byte of a short packet in its own descriptor.
    g.send_split(
        gpkt(OP_RW, 1024, local, 65536, 0),
        &data[..2000],
        &[20, 44, 45, 47, 1044],
    );
    g.send_split(gpkt(OP_RW, 1024, local, 65536, 0), &data[2000..2990], &[]);
    let cuts: Vec<usize> = (44..54).collect();
    g.send_split(gpkt(OP_RW, 1024, local, 65536, 0), &data[2990..], &cuts);
    assert_eq!(read_exact_timeout(&mut s, 3000), data);
    g.send(gpkt(OP_CREDIT_REQUEST, 1024, local, 65536, 0), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.fwd_cnt), (OP_CREDIT_UPDATE, 3000));
}

#[test]
fn tx_to_a_full_socket_keeps_the_rest_and_grants_only_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let mem = test_mem();
    let mut dev = Vsock::new(CID, &path).unwrap();
    let mut g = Guest::new(&mem);
    g.activate(&mut dev);
    g.post_rx(64);
    let (mut s, local) = host_connect(&mut g, &path, 1024, 65536);
    // The host does not read: the guest uses all its credit in odd-sized packets (header and payload in
    // separate descriptors, payload cut once more). The socket takes part, with a partial write at its
    // limit; the device keeps the rest.
    let total = connection::CONN_BUF_SIZE as usize;
    let data = pattern(total);
    let mut sent = 0;
    while sent < total {
        let n = (total - sent).min(60_001);
        g.send_split(
            gpkt(OP_RW, 1024, local, 65536, 0),
            &data[sent..sent + n],
            &[HDR_LEN, HDR_LEN + n / 3],
        );
        sent += n;
    }
    let buffered = dev.host_buffered();
    assert!(
        buffered > 0 && buffered < total,
        "{buffered} of {total} buffered: the socket took none or all"
    );
    // The credit the device reports counts only bytes the socket took.
    let credit_update = |g: &mut Guest| {
        while let Some((h, _)) = g.recv_within(Duration::ZERO) {
            assert_eq!(h.op, OP_CREDIT_UPDATE);
            g.post_rx(1);
        }
        g.send(gpkt(OP_CREDIT_REQUEST, 1024, local, 65536, 0), &[]);
        let (h, _) = g.recv();
        g.post_rx(1);
        assert_eq!(h.op, OP_CREDIT_UPDATE);
        h.fwd_cnt as usize
    };
    assert_eq!(credit_update(&mut g) + buffered, total);
    // The host reads: every byte, in order; then the whole credit is back.
    assert_eq!(read_exact_timeout(&mut s, total), data);
    let deadline = std::time::Instant::now() + T;
    while dev.host_buffered() != 0 {
        assert!(std::time::Instant::now() < deadline, "queue not flushed");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(credit_update(&mut g), total);
}

#[test]
fn rx_into_short_buffers_split_across_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let mem = test_mem();
    let mut dev = Vsock::new(CID, &path).unwrap();
    let mut g = Guest::new(&mem);
    g.activate(&mut dev);
    g.post_rx(1); // for the REQUEST
    let (mut s, local) = host_connect(&mut g, &path, 1024, 65536);
    let data = pattern(100);
    s.write_all(&data).unwrap();
    // Buffers with room for 10 payload bytes: header cut at 30, payload over three descriptors (the first
    // shared with the header's end). The device fills each with at most 10 bytes, in order.
    let mut got = Vec::new();
    while got.len() < data.len() {
        let (a, b, c) = (g.bump.alloc(30), g.bump.alloc(18), g.bump.alloc(6));
        let head = g.rx.add(&[(a, 30, true), (b, 18, true), (c, 6, true)]);
        let (id, len) = g.rx.wait_used(T).expect("rx buffer used");
        assert_eq!(id, u32::from(head));
        let mut raw = read_bytes(&mem, a, 30);
        raw.extend(read_bytes(&mem, b, 18));
        raw.extend(read_bytes(&mem, c, 6));
        let h = Header::from_bytes(raw[..HDR_LEN].try_into().unwrap());
        assert_eq!((h.op, h.src_port), (OP_RW, local));
        assert!(
            h.len > 0 && h.len <= 10,
            "{} bytes in a 10-byte buffer",
            h.len
        );
        assert_eq!(len, HDR_LEN as u32 + h.len);
        got.extend_from_slice(&raw[HDR_LEN..HDR_LEN + h.len as usize]);
    }
    assert_eq!(got, data);
    // Nothing more: no packet beyond the 100 bytes.
    assert!(g.recv_within(Duration::from_millis(50)).is_none());
}
