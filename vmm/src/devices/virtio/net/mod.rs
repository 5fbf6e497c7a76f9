//! virtio-net (device type 1) over a host TAP interface, emulated in user space.
//!
//! - `tap`: the TAP file descriptor (open by name or adopt an inherited fd), vnet header size, offloads.
//! - this module: the [`VirtioDevice`], its configuration space and its worker thread.
//!
//! One queue pair (rx = 0, tx = 1), 256 entries each. The 12-byte `virtio_net_hdr_v1` travels unchanged
//! between the guest and the tap (the tap is set to the same header size), so checksum and segmentation
//! offloads pass through: the guest may send partially checksummed / TSO frames (`CSUM`, `HOST_TSO4/6`), and
//! the tap hands the guest such frames only for the receive offloads the guest acked (`TUNSETOFFLOAD`).
//!
//! The worker waits (epoll) on the stop eventfd, both queue kicks and the tap:
//! - TX: each chain is validated (device-readable only, header + Ethernet header ..= header + 65550 bytes),
//!   copied into one reusable buffer and written to the tap with one `write`. When the tap answers EAGAIN the
//!   frame is kept, no further chain is taken, and the worker waits for EPOLLOUT on the tap. Invalid chains
//!   are returned with length 0, counted in `tx_dropped` and logged (rate-limited, `crate::log_limit`).
//! - RX: a frame is read from the tap only after the guest has posted a buffer for it; with no buffer the tap
//!   is not polled for input at all (the kernel queues, or drops, what arrives), and an rx kick resumes. The
//!   device holds at most one frame. With `MRG_RXBUF` a frame is spread over as many chains as it needs and
//!   `num_buffers` says how many; without it, a chain too small for the frame gets the frame dropped and is
//!   returned with length 0 (`rx_dropped`), the policy of Firecracker's user-space net device.

pub mod tap;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::io;
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::chain::{Chain, ChainError, DeviceQueue, RawChain};
use super::worker::{stop_requested, ThreadKind, Worker};
use super::{ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::devices::GuestMemoryMmap;
pub use tap::{Tap, TapError};

/// virtio device ID of network cards.
pub const VIRTIO_ID_NET: u32 = 1;
/// Size of the rx and the tx queue.
pub const QUEUE_SIZE: u16 = 256;
/// Queue 0 receives (host to guest), queue 1 transmits.
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];

pub const VIRTIO_NET_F_CSUM: u32 = 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
pub const VIRTIO_NET_F_MTU: u32 = 3;
pub const VIRTIO_NET_F_MAC: u32 = 5;
pub const VIRTIO_NET_F_GUEST_TSO4: u32 = 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u32 = 8;
pub const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
pub const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;
pub const VIRTIO_NET_F_STATUS: u32 = 16;
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
pub const HDR_LEN: usize = tap::VNET_HDR_LEN;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Largest frame after the header: a 64 KiB GSO packet plus Ethernet/VLAN headers (as Firecracker).
pub const MAX_FRAME_LEN: usize = 65550;
/// Largest header + frame either way.
pub const MAX_PACKET_LEN: usize = HDR_LEN + MAX_FRAME_LEN;
/// Shortest frame the guest may send: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;
/// Configuration space: mac[6], status u16, max_virtqueue_pairs u16, mtu u16.
const CONFIG_LEN: usize = 12;
/// Bound on the writable bytes of one rx chain (guest memory is checked anyway).
const MAX_RX_CHAIN_BYTES: u64 = u32::MAX as u64;

const TOKEN_KILL: u64 = 0;
const TOKEN_RXQ: u64 = 1;
const TOKEN_TXQ: u64 = 2;
const TOKEN_TAP: u64 = 3;

/// The host side of the device: something that moves whole frames (vnet header first) and takes offloads.
/// [`Tap`] in production; unit tests use a socket pair.
pub trait NetBackend: AsRawFd + Send + Sync + 'static {
    /// Read one frame (non-blocking: `WouldBlock` when none is queued).
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Write one frame (non-blocking: `WouldBlock` when the backend cannot take it now).
    fn write_frame(&self, buf: &[u8]) -> io::Result<usize>;
    /// Apply `TUN_F_*` receive offloads.
    fn set_offload(&self, tun_flags: u32) -> io::Result<()>;
    /// For logs.
    fn describe(&self) -> String;
}

/// Traffic counters, updated by the worker and readable at any time.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames read from the tap but not delivered (guest buffers too small).
    pub rx_dropped: AtomicU64,
    /// rx chains returned unused because they were malformed.
    pub rx_bad_chains: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// tx chains not sent: malformed, or refused by the tap.
    pub tx_dropped: AtomicU64,
    /// Times the worker woke up from epoll.
    pub worker_wakeups: AtomicU64,
}

/// A copy of [`NetCounters`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub rx_bad_chains: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    pub worker_wakeups: u64,
}

impl NetCounters {
    pub fn snapshot(&self) -> NetStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStats {
            rx_frames: l(&self.rx_frames),
            rx_bytes: l(&self.rx_bytes),
            rx_dropped: l(&self.rx_dropped),
            rx_bad_chains: l(&self.rx_bad_chains),
            tx_frames: l(&self.tx_frames),
            tx_bytes: l(&self.tx_bytes),
            tx_dropped: l(&self.tx_dropped),
            worker_wakeups: l(&self.worker_wakeups),
        }
    }
}

fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A locally administered, unicast MAC address from the host's random source.
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most `mac.len()` bytes into `mac`.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if n != mac.len() as isize {
        // Not expected on Linux >= 3.17; fall back to something that differs per process and moment.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let v = t ^ (u64::from(std::process::id()) << 24);
        mac.copy_from_slice(&v.to_le_bytes()[..6]);
    }
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// The virtio-net device.
pub struct Net {
    backend: Arc<dyn NetBackend>,
    mac: [u8; 6],
    mtu: Option<u16>,
    config: [u8; CONFIG_LEN],
    acked_features: u64,
    counters: Arc<NetCounters>,
    worker: Option<Worker<()>>,
}

impl Net {
    /// A device on `tap` with guest MAC `mac` and, if given, the MTU the guest is told to use.
    pub fn new(tap: Tap, mac: [u8; 6], mtu: Option<u16>) -> Self {
        Self::with_backend(Arc::new(tap), mac, mtu)
    }

    pub(crate) fn with_backend(
        backend: Arc<dyn NetBackend>,
        mac: [u8; 6],
        mtu: Option<u16>,
    ) -> Self {
        let mut config = [0u8; CONFIG_LEN];
        config[0..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&mtu.unwrap_or(0).to_le_bytes());
        Self {
            backend,
            mac,
            mtu,
            config,
            acked_features: 0,
            counters: Arc::new(NetCounters::default()),
            worker: None,
        }
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The live counters (shared with the worker).
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        // No VIRTIO_RING_F_EVENT_IDX: DeviceQueue never publishes avail_event, so the driver must keep kicking.
        let mut f = [
            VIRTIO_F_VERSION_1,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_MRG_RXBUF,
        ]
        .iter()
        .fold(0u64, |f, bit| f | (1 << bit));
        if self.mtu.is_some() {
            f |= 1 << VIRTIO_NET_F_MTU;
        }
        f
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        crate::guest_warn!(offset, "net: guest write to read-only config space ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<(Queue, EventFd)>,
    ) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let actual = queues.len();
        let Ok([(rxq, rxe), (txq, txe)]) = <[(Queue, EventFd); 2]>::try_from(queues) else {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                actual,
            });
        };
        let offload = tap::offload_flags(self.acked_features);
        self.backend.set_offload(offload).map_err(|e| {
            ActivateError::Backend(format!(
                "{}: cannot set offloads {offload:#x}: {e}",
                self.backend.describe()
            ))
        })?;
        let rx = DeviceQueue::new(rxq, rxe).with_features(self.acked_features);
        let tx = DeviceQueue::new(txq, txe).with_features(self.acked_features);
        let epoll = Epoll::new()?;
        for (fd, token, events) in [
            (rx.event.as_raw_fd(), TOKEN_RXQ, EventSet::IN),
            (tx.event.as_raw_fd(), TOKEN_TXQ, EventSet::IN),
            (self.backend.as_raw_fd(), TOKEN_TAP, EventSet::empty()),
        ] {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))?;
        }
        let worker = NetWorker {
            mem,
            interrupt,
            rx,
            tx,
            backend: self.backend.clone(),
            counters: self.counters.clone(),
            mrg_rxbuf: self.acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            epoll,
            tap_interest: EventSet::empty(),
            tap_dead: false,
            rx_buf: vec![0u8; MAX_PACKET_LEN],
            rx_len: None,
            rx_held: VecDeque::new(),
            tx_buf: vec![0u8; MAX_PACKET_LEN],
            tx_pending: None,
        };
        tracing::debug!(
            backend = %self.backend.describe(),
            features = format_args!("{:#x}", self.acked_features),
            offload = format_args!("{offload:#x}"),
            "net: activated"
        );
        self.worker = Some(Worker::spawn("capsa-net", ThreadKind::Net, move |kill| {
            worker.run(kill)
        })?);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.stop_worker();
        self.acked_features = 0;
        true
    }
}

/// Why a tx chain was not sent.
#[derive(Debug, thiserror::Error)]
enum TxError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("device-writable descriptor in a tx chain")]
    Writable,
    #[error("tx chain of {0} bytes is shorter than the header and an Ethernet header")]
    Short(u64),
    #[error("cannot read tx chain: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

struct NetWorker {
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    rx: DeviceQueue,
    tx: DeviceQueue,
    backend: Arc<dyn NetBackend>,
    counters: Arc<NetCounters>,
    mrg_rxbuf: bool,
    epoll: Epoll,
    /// What the tap is registered for right now.
    tap_interest: EventSet,
    /// The tap reported an error (e.g. the interface was deleted); it is no longer polled.
    tap_dead: bool,
    rx_buf: Vec<u8>,
    /// Length (header included) of the frame in `rx_buf` that still waits for guest buffers.
    rx_len: Option<usize>,
    /// Validated rx chains taken from the queue and not yet used.
    rx_held: VecDeque<Chain>,
    tx_buf: Vec<u8>,
    /// A frame in `tx_buf` the tap refused with EAGAIN: (chain head, length).
    tx_pending: Option<(u16, usize)>,
}

impl NetWorker {
    fn run(mut self, kill: EventFd) {
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_KILL),
        ) {
            tracing::error!(error = %e, "net: cannot watch kill event; worker stops");
            return;
        }
        let mut events = [EpollEvent::default(); 8];
        loop {
            if self.process_tx(&kill).is_break() || self.process_rx(&kill).is_break() {
                return;
            }
            self.rx.notify(&self.mem, &self.interrupt);
            self.tx.notify(&self.mem, &self.interrupt);
            self.update_tap_interest();
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "net: epoll wait failed; worker stops");
                    return;
                }
            };
            inc(&self.counters.worker_wakeups, 1);
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_KILL => return,
                    TOKEN_RXQ => self.rx.drain_event(),
                    TOKEN_TXQ => self.tx.drain_event(),
                    TOKEN_TAP
                        if ev
                            .event_set()
                            .intersects(EventSet::ERROR | EventSet::HANG_UP) =>
                    {
                        self.tap_failed("the tap reported an error or hang-up");
                    }
                    _ => {}
                }
            }
        }
    }

    fn tap_fd(&self) -> RawFd {
        self.backend.as_raw_fd()
    }

    /// Stop polling a broken tap so the worker does not spin on its error condition.
    fn tap_failed(&mut self, why: &str) {
        if self.tap_dead {
            return;
        }
        tracing::error!(
            backend = %self.backend.describe(),
            why,
            "net: host interface unusable; no more frames to the guest"
        );
        self.tap_dead = true;
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            self.tap_fd(),
            EpollEvent::default(),
        );
    }

    /// Poll the tap for input only while a frame could be delivered, and for output only while a tx frame
    /// waits.
    fn update_tap_interest(&mut self) {
        if self.tap_dead {
            return;
        }
        let mut want = EventSet::empty();
        if self.rx_len.is_none() && !self.rx_held.is_empty() {
            want |= EventSet::IN;
        }
        if self.tx_pending.is_some() {
            want |= EventSet::OUT;
        }
        if want == self.tap_interest {
            return;
        }
        match self.epoll.ctl(
            ControlOperation::Modify,
            self.tap_fd(),
            EpollEvent::new(want, TOKEN_TAP),
        ) {
            Ok(()) => self.tap_interest = want,
            Err(e) => {
                tracing::error!(error = %e, "net: cannot change tap polling");
                self.tap_failed("epoll_ctl failed");
            }
        }
    }

    /// Send the guest's frames until the queue is empty or the tap is full; breaks when the worker is told
    /// to stop (checked between chains).
    fn process_tx(&mut self, kill: &EventFd) -> ControlFlow<()> {
        loop {
            if stop_requested(kill) {
                return ControlFlow::Break(());
            }
            if let Some((head, len)) = self.tx_pending {
                match self.backend.write_frame(&self.tx_buf[..len]) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return ControlFlow::Continue(())
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Ok(_) => {
                        inc(&self.counters.tx_frames, 1);
                        inc(&self.counters.tx_bytes, (len - HDR_LEN) as u64);
                    }
                    Err(e) => {
                        inc(&self.counters.tx_dropped, 1);
                        crate::guest_warn!(error = %e, len, "net: tap refused a tx frame");
                    }
                }
                self.tx.add_used(&self.mem, head, 0);
                self.tx_pending = None;
            }
            let Some(chain) = self.tx.pop(&self.mem) else {
                return ControlFlow::Continue(());
            };
            let head = chain.head_index();
            match gather_tx(&self.mem, chain, &mut self.tx_buf) {
                Ok(len) => self.tx_pending = Some((head, len)),
                Err(e) => {
                    inc(&self.counters.tx_dropped, 1);
                    crate::guest_warn!(error = %e, head, "net: bad tx chain");
                    self.tx.add_used(&self.mem, head, 0);
                }
            }
        }
    }

    /// Deliver tap frames while the guest has buffers; breaks when the worker is told to stop (checked
    /// between frames).
    fn process_rx(&mut self, kill: &EventFd) -> ControlFlow<()> {
        loop {
            if stop_requested(kill) {
                return ControlFlow::Break(());
            }
            if self.rx_len.is_none() {
                if self.tap_dead {
                    return ControlFlow::Continue(());
                }
                // Only take a frame from the tap when the guest has a buffer for it.
                if self.rx_held.is_empty() && !self.hold_rx_chain() {
                    return ControlFlow::Continue(());
                }
                match self.backend.read_frame(&mut self.rx_buf) {
                    Ok(n) if n >= HDR_LEN => self.rx_len = Some(n.min(self.rx_buf.len())),
                    Ok(n) => {
                        inc(&self.counters.rx_dropped, 1);
                        crate::guest_warn!(len = n, "net: runt frame from the tap");
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return ControlFlow::Continue(())
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::error!(error = %e, "net: cannot read from the tap");
                        self.tap_failed("read failed");
                        return ControlFlow::Continue(());
                    }
                }
            }
            if !self.deliver_rx() {
                return ControlFlow::Continue(());
            }
        }
    }

    /// Take the next valid rx chain from the queue into `rx_held`, returning malformed ones with length 0.
    /// False when the queue has no more chains.
    fn hold_rx_chain(&mut self) -> bool {
        loop {
            let Some(chain) = self.rx.pop(&self.mem) else {
                return false;
            };
            let head = chain.head_index();
            let why = match Chain::parse(&self.mem, chain, MAX_RX_CHAIN_BYTES) {
                Ok(c) if !c.readable.is_empty() => {
                    "device-readable descriptor in an rx chain".into()
                }
                // Every rx buffer holds at least the header (a spec requirement with MRG_RXBUF).
                Ok(c) if c.writable.len() < HDR_LEN as u64 => {
                    format!(
                        "rx chain of {} bytes cannot hold the header",
                        c.writable.len()
                    )
                }
                Ok(c) => {
                    self.rx_held.push_back(c);
                    return true;
                }
                Err(e) => e.to_string(),
            };
            inc(&self.counters.rx_bad_chains, 1);
            crate::guest_warn!(head, why, "net: bad rx chain");
            self.rx.add_used(&self.mem, head, 0);
        }
    }

    /// Put the frame in `rx_buf` into held chains. True when the frame is gone (delivered or dropped), false
    /// when it waits for more buffers.
    fn deliver_rx(&mut self) -> bool {
        let Some(len) = self.rx_len else {
            return true;
        };
        let queue_size = usize::from(self.rx.queue.size());
        let mut room: u64 = self.rx_held.iter().map(|c| c.writable.len()).sum();
        let chains = if self.mrg_rxbuf {
            while room < len as u64 {
                if self.rx_held.len() >= queue_size {
                    // The whole queue cannot hold it: give every buffer back and drop the frame.
                    self.drop_rx_frame(
                        self.rx_held.len(),
                        "rx buffers in the whole queue too small",
                    );
                    return true;
                }
                if !self.hold_rx_chain() {
                    return false;
                }
                room += self.rx_held.back().map_or(0, |c| c.writable.len());
            }
            let mut need = 0usize;
            let mut acc = 0u64;
            for c in &self.rx_held {
                need += 1;
                acc += c.writable.len();
                if acc >= len as u64 {
                    break;
                }
            }
            need
        } else {
            if self.rx_held.is_empty() && !self.hold_rx_chain() {
                return false;
            }
            if self.rx_held.front().map_or(0, |c| c.writable.len()) < len as u64 {
                self.drop_rx_frame(1, "rx buffer too small for the frame (no MRG_RXBUF)");
                return true;
            }
            1
        };
        // num_buffers (little endian); the tap leaves these two bytes alone.
        let nb = u16::try_from(chains).unwrap_or(u16::MAX).to_le_bytes();
        self.rx_buf[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&nb);
        let mut off = 0usize;
        let mut complete = true;
        for _ in 0..chains {
            let Some(chain) = self.rx_held.pop_front() else {
                complete = false;
                break;
            };
            let n = (chain.writable.len().min((len - off) as u64)) as usize;
            let written = chain
                .writable
                .cursor()
                .write(&self.mem, &self.rx_buf[off..off + n]);
            match written {
                Ok(w) if w == n => self.rx.add_used(&self.mem, chain.head, n as u32),
                other => {
                    // Not expected: the chain's ranges were checked against guest memory.
                    crate::guest_error!(result = ?other.map_err(|e| e.to_string()), "net: cannot write rx buffer");
                    self.rx.add_used(&self.mem, chain.head, 0);
                    complete = false;
                }
            }
            off += n;
        }
        if complete {
            inc(&self.counters.rx_frames, 1);
            inc(&self.counters.rx_bytes, (len - HDR_LEN) as u64);
        } else {
            inc(&self.counters.rx_dropped, 1);
        }
        self.rx_len = None;
        true
    }

    /// Drop the pending frame, returning the first `chains` held chains with length 0.
    fn drop_rx_frame(&mut self, chains: usize, why: &'static str) {
        for _ in 0..chains {
            if let Some(c) = self.rx_held.pop_front() {
                self.rx.add_used(&self.mem, c.head, 0);
            }
        }
        inc(&self.counters.rx_dropped, 1);
        crate::guest_warn!(len = ?self.rx_len, why, "net: rx frame dropped");
        self.rx_len = None;
    }
}

/// Validate a tx chain and copy header + frame into `buf`; returns the length.
fn gather_tx(mem: &GuestMemoryMmap, chain: RawChain, buf: &mut [u8]) -> Result<usize, TxError> {
    let chain = Chain::parse(mem, chain, MAX_PACKET_LEN as u64)?;
    if !chain.writable.is_empty() {
        return Err(TxError::Writable);
    }
    let len = chain.readable.len();
    if len < (HDR_LEN + MIN_FRAME_LEN) as u64 {
        return Err(TxError::Short(len));
    }
    // len <= MAX_PACKET_LEN == buf.len(), checked by Chain::parse.
    let len = len as usize;
    let Some(dst) = buf.get_mut(..len) else {
        return Err(TxError::Chain(ChainError::TooLong(MAX_PACKET_LEN as u64)));
    };
    let n = chain.readable.cursor().read(mem, dst)?;
    if n != len {
        return Err(TxError::Short(n as u64));
    }
    Ok(len)
}
