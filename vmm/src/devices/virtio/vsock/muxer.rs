//! The host side of hybrid vsock: the Unix listener, host connections, and the routing of guest packets
//! to them. Owned by the device worker thread; every socket is non-blocking and registered edge-triggered
//! on the worker's epoll, with readiness remembered per connection.

use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{Connection, Handshake, HostBuffered, State};
use super::iov::{GuestBytes, TxPayload};
use super::packet::*;

/// Most simultaneous connections (host- and guest-initiated together).
pub const MAX_CONNECTIONS: usize = 1024;
/// Most RST replies to stray guest packets waiting for rx buffers; beyond that they are dropped.
const MAX_PENDING_RST: usize = 1024;
/// How long a host has to send its CONNECT line, and the guest to answer a REQUEST.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the guest has to close after the host closed both ways.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(8);
/// First host-side port for host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Epoll token of the listener; connection tokens start above it.
pub const TOKEN_LISTENER: u64 = 16;
const FIRST_CONN_TOKEN: u64 = 64;

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<u64, Connection>,
    /// (local port, guest port) -> token.
    keys: HashMap<(u32, u32), u64>,
    next_token: u64,
    next_local_port: u32,
    /// Connections that may have a packet for the guest, in service order.
    rx_ready: VecDeque<u64>,
    /// RST replies to guest packets for no connection.
    rst_queue: VecDeque<Header>,
    /// Bytes every connection holds for its host peer.
    buffered: HostBuffered,
}

impl Muxer {
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        listener: UnixListener,
        epoll: Epoll,
        buffered: HostBuffered,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TOKEN_LISTENER),
        )?;
        Ok(Self {
            guest_cid,
            uds_path,
            listener,
            epoll,
            conns: HashMap::new(),
            keys: HashMap::new(),
            next_token: FIRST_CONN_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            rx_ready: VecDeque::new(),
            rst_queue: VecDeque::new(),
            buffered,
        })
    }

    /// Give the listener back (device reset); every connection is closed.
    pub fn into_listener(self) -> UnixListener {
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            self.listener.as_raw_fd(),
            EpollEvent::default(),
        );
        self.listener
    }

    /// Bytes buffered for host peers, all connections together.
    pub fn host_buffered(&self) -> usize {
        self.buffered.get()
    }

    pub fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    /// A malformed packet from the guest: reset the connection it names, or answer RST.
    pub fn on_bad_packet(&mut self, hdr: &Header) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID || hdr.op == OP_RST {
            return;
        }
        match self.keys.get(&(hdr.dst_port, hdr.src_port)).copied() {
            Some(token) => {
                if let Some(c) = self.conns.get_mut(&token) {
                    c.reset();
                }
                self.settle(token);
            }
            None => self.queue_rst(hdr),
        }
    }

    fn schedule(&mut self, token: u64) {
        if let Some(c) = self.conns.get_mut(&token) {
            if !c.scheduled && c.may_have_rx() {
                c.scheduled = true;
                self.rx_ready.push_back(token);
            }
        }
    }

    fn add_connection(&mut self, conn: Connection) -> Option<u64> {
        let token = self.next_token;
        self.next_token += 1;
        let ev = EventSet::IN
            | EventSet::OUT
            | EventSet::READ_HANG_UP
            | EventSet::HANG_UP
            | EventSet::ERROR
            | EventSet::EDGE_TRIGGERED;
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            conn.stream.as_raw_fd(),
            EpollEvent::new(ev, token),
        ) {
            crate::guest_warn!(error = %e, "vsock: cannot watch connection");
            return None;
        }
        if conn.state != State::HostHandshake {
            self.keys.insert((conn.local_port, conn.peer_port), token);
        }
        self.conns.insert(token, conn);
        Some(token)
    }

    fn remove_connection(&mut self, token: u64) {
        if let Some(c) = self.conns.remove(&token) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            if self.keys.get(&(c.local_port, c.peer_port)) == Some(&token) {
                self.keys.remove(&(c.local_port, c.peer_port));
            }
            tracing::debug!(
                local = c.local_port,
                peer = c.peer_port,
                "vsock: connection closed"
            );
        }
    }

    /// Drop the connection if finished, otherwise make sure it is scheduled if it has something to say.
    fn settle(&mut self, token: u64) {
        match self.conns.get(&token) {
            Some(c) if c.is_dead() => self.remove_connection(token),
            Some(_) => self.schedule(token),
            None => {}
        }
    }

    /// Accept every pending host connection.
    pub fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() >= MAX_CONNECTIONS {
                        crate::guest_warn!("vsock: too many connections; host connection refused");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        crate::guest_warn!(error = %e, "vsock: cannot make host connection non-blocking");
                        continue;
                    }
                    let conn = Connection::host_accepted(
                        stream,
                        Instant::now() + CONNECT_TIMEOUT,
                        self.buffered.clone(),
                    );
                    if let Some(t) = self.add_connection(conn) {
                        // Edge-triggered: the CONNECT line may already be there.
                        if let Some(c) = self.conns.get_mut(&t) {
                            c.host_readable = true;
                        }
                        self.handshake(t);
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    crate::guest_warn!(error = %e, "vsock: accept failed");
                    return;
                }
            }
        }
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = if p >= u32::MAX - 1 {
                FIRST_LOCAL_PORT
            } else {
                p + 1
            };
            if !self.keys.contains_key(&(p, peer_port)) {
                return p;
            }
        }
    }

    fn handshake(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if c.state != State::HostHandshake || !c.host_readable {
            return;
        }
        match c.read_handshake() {
            Handshake::Pending => {}
            Handshake::Failed => {
                tracing::debug!("vsock: bad CONNECT line from host");
                self.remove_connection(token);
            }
            Handshake::Port(peer) => {
                let local = self.alloc_local_port(peer);
                if let Some(c) = self.conns.get_mut(&token) {
                    c.start_host_connect(local, peer, Instant::now() + CONNECT_TIMEOUT);
                }
                self.keys.insert((local, peer), token);
                tracing::debug!(local, peer, "vsock: host connects to guest port");
                self.schedule(token);
            }
        }
    }

    /// Readiness reported by epoll for connection `token`.
    pub fn on_connection_event(&mut self, token: u64, events: EventSet) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if events
            .intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR)
        {
            c.host_readable = true;
        }
        if events.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP) {
            c.host_writable = true;
        }
        if events.contains(EventSet::HANG_UP) {
            c.host_hup = true;
        }
        if c.state == State::HostHandshake {
            self.handshake(token);
            return;
        }
        c.flush_host();
        self.settle(token);
    }

    fn queue_rst(&mut self, to: &Header) {
        if self.rst_queue.len() >= MAX_PENDING_RST {
            tracing::debug!("vsock: RST queue full; dropping reply");
            return;
        }
        self.rst_queue.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Default::default()
        });
    }

    /// A packet the guest put on the tx queue.
    pub fn on_guest_packet<P: TxPayload + ?Sized>(&mut self, hdr: &Header, payload: &P) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            tracing::debug!(
                src = hdr.src_cid,
                dst = hdr.dst_cid,
                "vsock: packet with wrong CIDs dropped"
            );
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != OP_RST {
                self.queue_rst(hdr);
            }
            return;
        }
        let Some(&token) = self.keys.get(&key) else {
            match hdr.op {
                OP_REQUEST => self.guest_connect(hdr),
                OP_RST => {}
                _ => self.queue_rst(hdr),
            }
            return;
        };
        if hdr.op == OP_REQUEST {
            // The guest reuses a live port pair: refuse; the existing connection is reset too.
            if let Some(c) = self.conns.get_mut(&token) {
                c.reset();
            }
            self.settle(token);
            return;
        }
        if let Some(c) = self.conns.get_mut(&token) {
            c.on_guest_packet(hdr, payload);
        }
        self.settle(token);
    }

    /// The guest wants host port `hdr.dst_port`: connect to `<uds>_<port>`.
    fn guest_connect(&mut self, hdr: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            crate::guest_warn!("vsock: too many connections; guest connect refused");
            self.queue_rst(hdr);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", hdr.dst_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, port = hdr.dst_port, "vsock: guest connect to host refused");
                self.queue_rst(hdr);
                return;
            }
        };
        let mut conn = Connection::guest_initiated(stream, hdr, self.buffered.clone());
        conn.host_readable = true;
        match self.add_connection(conn) {
            Some(t) => self.schedule(t),
            None => self.queue_rst(hdr),
        }
    }

    /// Whether a packet for the guest may be waiting.
    pub fn has_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rx_ready.is_empty()
    }

    /// The next packet for the guest; its data (header `len` bytes) is read straight into `payload`.
    pub fn next_rx(&mut self, payload: &GuestBytes) -> Option<Header> {
        if let Some(h) = self.rst_queue.pop_front() {
            return Some(h);
        }
        // Each scheduled connection gets one chance per call, so one that cannot fill this buffer (too
        // small for its data) does not make us spin.
        for _ in 0..self.rx_ready.len() {
            let Some(token) = self.rx_ready.pop_front() else {
                break;
            };
            let Some(c) = self.conns.get_mut(&token) else {
                continue;
            };
            c.scheduled = false;
            let pkt = c.next_packet(self.guest_cid, payload);
            if pkt.is_some() && c.closing_with_host_gone() && c.deadline.is_none() {
                c.deadline = Some(Instant::now() + CLOSE_TIMEOUT);
            }
            self.settle(token);
            if pkt.is_some() {
                return pkt;
            }
        }
        None
    }

    /// Reset connections whose deadline passed; returns whether any did and the epoll timeout (ms) until
    /// the next deadline (-1: none).
    pub fn check_deadlines(&mut self, now: Instant) -> (bool, i32) {
        let mut expired = Vec::new();
        let mut next: Option<Instant> = None;
        for (&t, c) in &self.conns {
            if let Some(d) = c.deadline {
                if d <= now {
                    expired.push(t);
                } else {
                    next = Some(next.map_or(d, |n| n.min(d)));
                }
            }
        }
        let any = !expired.is_empty();
        for t in expired {
            if let Some(c) = self.conns.get_mut(&t) {
                tracing::debug!(local = c.local_port, peer = c.peer_port, state = ?c.state, "vsock: timed out");
                c.deadline = None;
                c.reset();
            }
            self.settle(t);
        }
        let timeout = match next {
            Some(d) => i32::try_from(
                d.saturating_duration_since(now)
                    .as_millis()
                    .saturating_add(1),
            )
            .unwrap_or(i32::MAX),
            None => -1,
        };
        (any, timeout)
    }
}

/// Connect to a Unix stream socket without ever blocking: a listener whose backlog is full refuses
/// (EAGAIN) instead of stalling the worker thread.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::from(ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket we own; the stream closes it on every path from here.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un and `len` does not exceed its size.
    let r = unsafe {
        libc::connect(
            fd,
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

#[cfg(test)]
pub fn tests_connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    connect_nonblocking(path)
}
