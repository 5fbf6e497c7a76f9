//! virtio-vsock (device type 19) with the hybrid host side of docs/interfaces.md.
//!
//! - `packet`: the wire header.
//! - `connection`: one stream's state machine and credit accounting.
//! - `muxer`: the Unix listener, host connections, routing of guest packets.
//! - `iov`: payload I/O between guest memory and host sockets (`sendmsg`/`recvmsg` over the descriptors'
//!   guest memory, no intermediate buffer).
//! - this module: the [`VirtioDevice`] and its worker thread (epoll over the queue eventfds, the listener
//!   and every connection).
//!
//! Host memory a guest can make the device hold: per connection at most `CONN_BUF_SIZE` (256 KiB) of data
//! the host peer has not read yet (the credit we advertise; more resets the connection), and across all
//! connections at most [`MAX_HOST_BUFFERED`]. When taking one more packet could cross that total, the worker
//! stops taking tx chains (they stay in the queue: back-pressure, nothing dropped) until host peers read.

mod connection;
#[cfg(feature = "fuzzing")]
pub(super) mod fuzz;
mod iov;
mod muxer;
mod packet;
#[cfg(test)]
mod tests;

use std::io;
use std::ops::ControlFlow;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::chain::{Chain, DeviceQueue, RawChain, Segments};
use super::worker::{stop_requested, ThreadKind, Worker};
use super::{ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::devices::GuestMemoryMmap;
use connection::HostBuffered;
use iov::GuestBytes;
use muxer::Muxer;
use packet::{Header, HDR_LEN};

/// virtio device ID of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Size of each of the three queues (rx, tx, event).
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
const RXQ: usize = 0;
const TXQ: usize = 1;
// Queue 2 (events) is only ever used for transport resets, which this device does not send.
/// Largest payload in one packet, either way (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;
/// Most bytes buffered for host peers across all connections (default of [`Vsock::with_host_buffer_limit`]).
/// Per connection the bound is 256 KiB, so this is 32 connections whose host peers all stopped reading;
/// well-behaved peers (the shim, which reads its streams continuously) never come near it.
pub const MAX_HOST_BUFFERED: usize = 8 << 20;
/// Largest descriptor chain accepted (header + payload + slack for driver padding).
const MAX_CHAIN_BYTES: u64 = (MAX_PKT_PAYLOAD + HDR_LEN + 4096) as u64;

/// The kill eventfd is read (a syscall) before the first chain of a batch and then every this many.
const STOP_CHECK_EVERY: usize = 16;

const TOKEN_KILL: u64 = 0;
const TOKEN_QUEUE_BASE: u64 = 1; // 1, 2, 3 = rx, tx, event

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved (must be 3..=0xffff_fffe)")]
    InvalidCid(u64),
    #[error("cannot bind vsock socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("vsock socket {0} is in use by a live listener")]
    InUse(PathBuf),
}

/// The virtio-vsock device.
pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    listener: Option<UnixListener>,
    acked_features: u64,
    worker: Option<Worker<Option<UnixListener>>>,
    host_buffered: HostBuffered,
    host_buffer_limit: usize,
}

/// Bind the listener, replacing a stale socket file (one nobody listens on) but never a live one.
fn bind_listener(path: &Path) -> Result<UnixListener, VsockError> {
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Err(VsockError::InUse(path.to_path_buf()));
            }
            tracing::info!(path = %path.display(), "vsock: replacing stale socket file");
            let _ = std::fs::remove_file(path);
            UnixListener::bind(path).map_err(|source| VsockError::Bind {
                path: path.to_path_buf(),
                source,
            })
        }
        Err(source) => Err(VsockError::Bind {
            path: path.to_path_buf(),
            source,
        }),
    }
}

impl Vsock {
    /// A vsock device for guest `cid`, listening on `uds_path` right away (host connections made before
    /// the guest driver is up wait in the listen backlog).
    pub fn new(cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if !(3..=0xffff_fffe).contains(&cid) {
            return Err(VsockError::InvalidCid(cid));
        }
        let listener = bind_listener(uds_path)?;
        Ok(Self {
            cid,
            uds_path: uds_path.to_path_buf(),
            listener: Some(listener),
            acked_features: 0,
            worker: None,
            host_buffered: HostBuffered::default(),
            host_buffer_limit: MAX_HOST_BUFFERED,
        })
    }

    /// Bound the bytes buffered for host peers across all connections (default [`MAX_HOST_BUFFERED`]).
    /// Values below one packet ([`MAX_PKT_PAYLOAD`]) are raised to it, or the guest could never send.
    pub fn with_host_buffer_limit(mut self, bytes: usize) -> Self {
        self.host_buffer_limit = bytes.max(MAX_PKT_PAYLOAD);
        self
    }

    /// Bytes currently buffered for host peers, all connections together.
    pub fn host_buffered(&self) -> usize {
        self.host_buffered.get()
    }

    /// The guest CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// The Unix socket hosts connect to.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            if let Some(Some(l)) = w.stop() {
                self.listener = Some(l);
            }
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stop_worker();
        self.listener = None;
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        crate::guest_warn!(
            offset,
            "vsock: guest write to read-only config space ignored"
        );
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
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                actual: queues.len(),
            });
        }
        let listener = match self.listener.take() {
            Some(l) => l,
            None => {
                bind_listener(&self.uds_path).map_err(|e| ActivateError::Backend(e.to_string()))?
            }
        };
        let queues: Vec<DeviceQueue> = queues
            .into_iter()
            .map(|(q, e)| DeviceQueue::new(q, e).with_features(self.acked_features))
            .collect();
        let epoll = Epoll::new()?;
        for (i, q) in queues.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                q.event.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_QUEUE_BASE + i as u64),
            )?;
        }
        // On failure the listener is gone; the next activation binds again.
        let muxer = Muxer::new(
            self.cid,
            self.uds_path.clone(),
            listener,
            epoll,
            self.host_buffered.clone(),
        )?;
        let worker = VsockWorker::new(mem, interrupt, queues, muxer, self.host_buffer_limit);
        self.worker = Some(Worker::spawn(
            "capsa-vsock",
            ThreadKind::Vsock,
            move |kill| worker.run(kill),
        )?);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.stop_worker();
        self.acked_features = 0;
        true
    }
}

struct VsockWorker {
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<DeviceQueue>,
    muxer: Muxer,
    /// The chain being served on each queue, kept so its segment lists are reused (no allocation per
    /// packet). Payload bytes never leave guest memory on their way to or from a host socket, except what a
    /// socket does not take yet.
    tx_chain: Chain,
    rx_chain: Chain,
    host_buffer_limit: usize,
}

fn empty_chain() -> Chain {
    Chain {
        head: 0,
        readable: Segments::default(),
        writable: Segments::default(),
    }
}

impl VsockWorker {
    fn new(
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<DeviceQueue>,
        muxer: Muxer,
        host_buffer_limit: usize,
    ) -> Self {
        Self {
            mem,
            interrupt,
            queues,
            muxer,
            tx_chain: empty_chain(),
            rx_chain: empty_chain(),
            host_buffer_limit,
        }
    }

    /// Serve until `kill` fires; returns the listener for the next activation.
    fn run(mut self, kill: EventFd) -> Option<UnixListener> {
        if let Err(e) = self.muxer.epoll().ctl(
            ControlOperation::Add,
            kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_KILL),
        ) {
            tracing::error!(error = %e, "vsock: cannot watch kill event");
            return Some(self.muxer.into_listener());
        }
        let mut events = vec![EpollEvent::default(); 64];
        // Connections made before activation are waiting in the backlog.
        self.muxer.accept_all();
        loop {
            let timeout = loop {
                if self.process_tx(&kill).is_break() || self.process_rx(&kill).is_break() {
                    return Some(self.muxer.into_listener());
                }
                let (expired, timeout) = self.muxer.check_deadlines(Instant::now());
                if !expired {
                    break timeout;
                }
            };
            for q in &mut self.queues {
                q.notify(&self.mem, &self.interrupt);
            }
            let n = match self.muxer.epoll().wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "vsock: epoll wait failed; worker stops");
                    return Some(self.muxer.into_listener());
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_KILL => return Some(self.muxer.into_listener()),
                    t @ TOKEN_QUEUE_BASE..=3 => {
                        if let Some(q) = self.queues.get((t - TOKEN_QUEUE_BASE) as usize) {
                            q.drain_event();
                        }
                    }
                    muxer::TOKEN_LISTENER => self.muxer.accept_all(),
                    t => self.muxer.on_connection_event(t, ev.event_set()),
                }
            }
        }
    }

    /// Take the packets the guest queued, as long as one more cannot push the bytes buffered for host
    /// peers over the limit; the rest wait in the queue until host peers read (the loop calls us again
    /// after every socket event). Breaks when the worker is told to stop (checked before the first chain
    /// and then every [`STOP_CHECK_EVERY`] chains).
    fn process_tx(&mut self, kill: &EventFd) -> ControlFlow<()> {
        let mem = &self.mem;
        let mut hdr_buf = [0u8; HDR_LEN];
        for n in 0usize.. {
            if n % STOP_CHECK_EVERY == 0 && stop_requested(kill) {
                return ControlFlow::Break(());
            }
            if self.muxer.host_buffered() + MAX_PKT_PAYLOAD > self.host_buffer_limit {
                tracing::debug!(
                    buffered = self.muxer.host_buffered(),
                    "vsock: host peers are behind; tx paused"
                );
                return ControlFlow::Continue(());
            }
            let Some(chain) = self.queues[TXQ].pop(mem) else {
                return ControlFlow::Continue(());
            };
            let head = chain.head_index();
            match parse_tx(mem, chain, &mut self.tx_chain, &mut hdr_buf) {
                Ok((hdr, payload)) => self.muxer.on_guest_packet(&hdr, &payload),
                Err(TxError::Chain(e)) => {
                    crate::guest_warn!(error = %e, head, "vsock: bad tx descriptor chain")
                }
                Err(TxError::Packet(why, hdr)) => {
                    crate::guest_warn!(why, head, "vsock: bad tx packet");
                    if let Some(hdr) = hdr {
                        self.muxer.on_bad_packet(&hdr);
                    }
                }
            }
            self.queues[TXQ].add_used(mem, head, 0);
        }
        ControlFlow::Continue(())
    }

    /// Fill rx buffers with whatever the host side has for the guest. Breaks when the worker is told to
    /// stop (checked as in [`Self::process_tx`]).
    fn process_rx(&mut self, kill: &EventFd) -> ControlFlow<()> {
        let mem = &self.mem;
        let mut n = 0usize;
        while self.muxer.has_rx() {
            n += 1;
            if n % STOP_CHECK_EVERY == 1 && stop_requested(kill) {
                return ControlFlow::Break(());
            }
            let Some(chain) = self.queues[RXQ].pop(mem) else {
                break;
            };
            let head = chain.head_index();
            if let Err(e) = self.rx_chain.parse_into(mem, chain, MAX_CHAIN_BYTES) {
                crate::guest_warn!(error = %e, head, "vsock: bad rx descriptor chain");
                self.queues[RXQ].add_used(mem, head, 0);
                continue;
            }
            let chain = &self.rx_chain;
            if !chain.readable.is_empty() || chain.writable.len() < HDR_LEN as u64 {
                crate::guest_warn!(head, "vsock: rx buffer not device-writable or too small");
                self.queues[RXQ].add_used(mem, head, 0);
                continue;
            }
            let room = (chain.writable.len() as usize - HDR_LEN).min(MAX_PKT_PAYLOAD);
            let mut data = chain.writable.cursor();
            data.skip(HDR_LEN);
            let payload = GuestBytes::new(mem, data, room);
            // Data is read from the host socket straight into the buffer, after the header's place.
            let Some(hdr) = self.muxer.next_rx(&payload) else {
                self.queues[RXQ].undo_pop();
                break;
            };
            match chain.writable.cursor().write(mem, &hdr.to_bytes()) {
                Ok(HDR_LEN) => {
                    self.queues[RXQ].add_used(mem, head, HDR_LEN as u32 + hdr.len);
                }
                Ok(_) | Err(_) => {
                    crate::guest_error!(head, "vsock: cannot write rx buffer");
                    self.queues[RXQ].add_used(mem, head, 0);
                }
            }
        }
        ControlFlow::Continue(())
    }
}

enum TxError {
    Chain(super::chain::ChainError),
    Packet(&'static str, Option<Header>),
}

/// Validate a tx chain (into `chain`, reused) and read its header; the payload stays in guest memory.
fn parse_tx<'a>(
    mem: &'a GuestMemoryMmap,
    raw: RawChain,
    chain: &'a mut Chain,
    hdr_buf: &mut [u8; HDR_LEN],
) -> Result<(Header, GuestBytes<'a>), TxError> {
    chain
        .parse_into(mem, raw, MAX_CHAIN_BYTES)
        .map_err(TxError::Chain)?;
    let chain: &'a Chain = chain;
    if !chain.writable.is_empty() {
        return Err(TxError::Packet(
            "device-writable descriptor in tx chain",
            None,
        ));
    }
    let mut cur = chain.readable.cursor();
    match cur.read(mem, hdr_buf) {
        Ok(HDR_LEN) => {}
        _ => return Err(TxError::Packet("header too short", None)),
    }
    let hdr = Header::from_bytes(hdr_buf);
    let len = hdr.len as usize;
    if len > MAX_PKT_PAYLOAD || len as u64 > cur.remaining() {
        return Err(TxError::Packet(
            "payload length beyond the buffer or the maximum",
            Some(hdr),
        ));
    }
    if len > 0 && hdr.op != packet::OP_RW {
        return Err(TxError::Packet("payload on a control packet", Some(hdr)));
    }
    Ok((hdr, GuestBytes::new(mem, cur, len)))
}
