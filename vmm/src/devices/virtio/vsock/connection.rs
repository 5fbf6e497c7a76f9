//! One vsock stream between a guest port and a host Unix-socket connection: its state machine and the
//! credit-based flow control in both directions.
//!
//! Guest → host: we advertise `CONN_BUF_SIZE` of buffer. A packet's payload is written to the host socket
//! straight from guest memory when nothing is queued before it; bytes the socket does not take yet are
//! copied to `host_out` (bounded by that advertisement; a guest that sends beyond it is reset). `fwd_cnt`
//! counts bytes actually written to the host socket. Every connection of a device adds its `host_out` to one
//! shared [`HostBuffered`] total, which the device bounds across connections (back-pressure on its tx
//! queue); a closed connection's unsent bytes are discarded at once.
//!
//! Host → guest: we read from the host socket straight into the guest's rx buffer, only as much as the
//! guest's credit (`peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`) and that buffer allow, so nothing is ever
//! buffered on this side; a slow guest leaves the data in the host socket and the host blocks.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::iov::{GuestBytes, TxPayload};
use super::packet::*;

/// Receive buffer we advertise to the guest, per connection.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Longest `CONNECT <port>\n` line accepted from a host.
const MAX_CONNECT_LINE: usize = 32;

/// Bytes buffered for host peers (guest data their sockets have not taken yet), summed over every
/// connection of one device.
#[derive(Debug, Clone, Default)]
pub struct HostBuffered(Arc<AtomicUsize>);

impl HostBuffered {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self, n: usize) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        self.0.fetch_sub(n, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// A host connected to the UDS; reading its `CONNECT <port>\n` line.
    HostHandshake,
    /// REQUEST sent (or queued) to the guest, waiting for its RESPONSE.
    LocalInit,
    Established,
    /// Finished; removed once any queued RST has gone to the guest.
    Closed,
}

/// What reading the host's CONNECT line gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Handshake {
    Pending,
    Port(u32),
    Failed,
}

#[derive(Debug)]
pub struct Connection {
    pub stream: UnixStream,
    pub state: State,
    /// The host-side port (allocated for host-initiated connections, the target port otherwise).
    pub local_port: u32,
    /// The guest-side port.
    pub peer_port: u32,
    /// When the current state gives up (handshakes, graceful close).
    pub deadline: Option<Instant>,
    /// Already in the muxer's rx schedule.
    pub scheduled: bool,

    line: Vec<u8>,
    // Host readiness, tracked from edge-triggered epoll.
    pub host_readable: bool,
    pub host_writable: bool,
    pub host_hup: bool,
    host_eof: bool,
    host_write_shut: bool,

    // Host -> guest accounting.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,

    // Guest -> host.
    host_out: VecDeque<u8>,
    /// The device-wide total `host_out` counts into.
    buffered: HostBuffered,
    /// Leading bytes of `host_out` that are ours (the `OK` line), not the guest's.
    out_exempt: usize,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,

    /// SHUTDOWN flags the guest sent.
    guest_shut: u32,
    /// SHUTDOWN flags we sent to the guest.
    shut_sent: u32,

    // Control packets owed to the guest.
    pending_request: bool,
    pending_response: bool,
    pending_credit_update: bool,
    pending_shutdown: u32,
    pending_rst: bool,
}

impl Connection {
    fn new(
        stream: UnixStream,
        state: State,
        local_port: u32,
        peer_port: u32,
        buffered: HostBuffered,
    ) -> Self {
        Self {
            stream,
            state,
            local_port,
            peer_port,
            deadline: None,
            scheduled: false,
            line: Vec::new(),
            host_readable: false,
            host_writable: true,
            host_hup: false,
            host_eof: false,
            host_write_shut: false,
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            host_out: VecDeque::new(),
            buffered,
            out_exempt: 0,
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            guest_shut: 0,
            shut_sent: 0,
            pending_request: false,
            pending_response: false,
            pending_credit_update: false,
            pending_shutdown: 0,
            pending_rst: false,
        }
    }

    /// A host connection accepted on the UDS, before its CONNECT line.
    pub fn host_accepted(stream: UnixStream, deadline: Instant, buffered: HostBuffered) -> Self {
        let mut c = Self::new(stream, State::HostHandshake, 0, 0, buffered);
        c.deadline = Some(deadline);
        c
    }

    /// A guest REQUEST accepted: we connected to the host's `<uds>_<port>` listener.
    pub fn guest_initiated(stream: UnixStream, hdr: &Header, buffered: HostBuffered) -> Self {
        let mut c = Self::new(
            stream,
            State::Established,
            hdr.dst_port,
            hdr.src_port,
            buffered,
        );
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        c.pending_response = true;
        c
    }

    /// Read the host's `CONNECT <port>\n` byte by byte, so bytes after the line stay in the socket.
    pub fn read_handshake(&mut self) -> Handshake {
        let mut b = [0u8; 1];
        loop {
            match self.stream.read(&mut b) {
                Ok(0) => return Handshake::Failed,
                Ok(_) => {
                    if b[0] == b'\n' {
                        return parse_connect(&self.line)
                            .map_or(Handshake::Failed, Handshake::Port);
                    }
                    if self.line.len() >= MAX_CONNECT_LINE {
                        return Handshake::Failed;
                    }
                    self.line.push(b[0]);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.host_readable = false;
                    return Handshake::Pending;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return Handshake::Failed,
            }
        }
    }

    /// The CONNECT line named `peer_port`; we are `local_port`. Queue the REQUEST to the guest.
    pub fn start_host_connect(&mut self, local_port: u32, peer_port: u32, deadline: Instant) {
        self.local_port = local_port;
        self.peer_port = peer_port;
        self.state = State::LocalInit;
        self.pending_request = true;
        self.deadline = Some(deadline);
    }

    /// Whether the muxer can forget this connection.
    pub fn is_dead(&self) -> bool {
        self.state == State::Closed && !self.pending_rst
    }

    /// Abort: tell the guest (RST) unless it does not know about us, and close.
    pub fn reset(&mut self) {
        let guest_knows = match self.state {
            State::HostHandshake | State::Closed => false,
            // The REQUEST never left: the guest has no socket to reset.
            State::LocalInit => !self.pending_request,
            State::Established => true,
        };
        self.pending_rst = guest_knows;
        self.set_closed();
    }

    /// Close without telling the guest (it reset us, or never heard of us).
    pub fn close_silently(&mut self) {
        self.pending_rst = false;
        self.set_closed();
    }

    /// Enter `Closed`: nothing more goes to the host, so the bytes still queued for it are discarded.
    fn set_closed(&mut self) {
        self.state = State::Closed;
        self.buffered.sub(self.host_out.len());
        self.host_out = VecDeque::new();
        self.out_exempt = 0;
    }

    /// Guest bytes (and our `OK` line) waiting for the host socket.
    #[cfg(test)]
    fn host_queued(&self) -> usize {
        self.host_out.len()
    }

    fn queue_for_host(&mut self, bytes: &[u8]) {
        self.host_out.extend(bytes);
        self.buffered.add(bytes.len());
    }

    /// Bytes the guest still lets us send.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether asking for a packet may produce one.
    pub fn may_have_rx(&self) -> bool {
        self.pending_rst
            || self.pending_request
            || self.pending_response
            || self.pending_shutdown != 0
            || self.pending_credit_update
            || (self.can_forward_host_data() && self.host_readable && self.peer_credit() > 0)
    }

    fn can_forward_host_data(&self) -> bool {
        self.state == State::Established && !self.host_eof && self.guest_shut & SHUTDOWN_RCV == 0
    }

    fn header(&self, guest_cid: u64, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The next packet for the guest; data goes straight into `payload` (at most its length), and the
    /// header's `len` says how much.
    pub fn next_packet(&mut self, guest_cid: u64, payload: &GuestBytes) -> Option<Header> {
        let hdr = self.next_packet_inner(guest_cid, payload)?;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending_credit_update = false;
        Some(hdr)
    }

    fn next_packet_inner(&mut self, guest_cid: u64, payload: &GuestBytes) -> Option<Header> {
        if self.pending_rst {
            self.pending_rst = false;
            self.set_closed();
            return Some(self.header(guest_cid, OP_RST));
        }
        match self.state {
            State::HostHandshake | State::Closed => return None,
            State::LocalInit => {
                if self.pending_request {
                    self.pending_request = false;
                    return Some(self.header(guest_cid, OP_REQUEST));
                }
                return None;
            }
            State::Established => {}
        }
        if self.pending_response {
            self.pending_response = false;
            return Some(self.header(guest_cid, OP_RESPONSE));
        }
        if self.can_forward_host_data() && self.host_readable {
            let n = (self.peer_credit() as usize).min(payload.len());
            if n > 0 {
                loop {
                    match payload.recv_from(&self.stream, n) {
                        Ok(0) => {
                            self.host_eof = true;
                            self.host_readable = false;
                            let mut flags = SHUTDOWN_SEND;
                            if self.host_hup {
                                flags |= SHUTDOWN_RCV;
                            }
                            self.pending_shutdown |= flags;
                            break;
                        }
                        Ok(k) => {
                            self.rx_cnt += Wrapping(k as u32);
                            let mut h = self.header(guest_cid, OP_RW);
                            h.len = k as u32;
                            return Some(h);
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            self.host_readable = false;
                            break;
                        }
                        Err(e) => {
                            crate::guest_warn!(error = %e, port = self.local_port, "vsock: host read failed; reset");
                            self.set_closed();
                            return Some(self.header(guest_cid, OP_RST));
                        }
                    }
                }
            }
        }
        if self.pending_shutdown != 0 {
            let flags = self.pending_shutdown;
            self.pending_shutdown = 0;
            self.shut_sent |= flags;
            self.check_finished();
            let mut h = self.header(guest_cid, OP_SHUTDOWN);
            h.flags = flags;
            return Some(h);
        }
        if self.pending_credit_update {
            return Some(self.header(guest_cid, OP_CREDIT_UPDATE));
        }
        None
    }

    /// A packet from the guest for this connection. Returns false if the packet violated the protocol
    /// (the connection is then reset).
    pub fn on_guest_packet<P: TxPayload + ?Sized>(&mut self, hdr: &Header, payload: &P) -> bool {
        if hdr.op == OP_RST {
            if self.state == State::Established && self.shut_sent == 0 && self.guest_shut == 0 {
                // Worth a line: an established stream the guest resets without a shutdown first.
                crate::guest_warn!(
                    port = self.local_port,
                    peer = self.peer_port,
                    "vsock: the guest reset an open connection"
                );
            }
            self.close_silently();
            return true;
        }
        match self.state {
            State::HostHandshake | State::Closed => return true,
            State::LocalInit => {
                if hdr.op != OP_RESPONSE {
                    tracing::debug!(op = hdr.op, "vsock: unexpected op while connecting; reset");
                    self.reset();
                    return false;
                }
                self.state = State::Established;
                self.deadline = None;
                let ok = format!("OK {}\n", self.local_port);
                self.out_exempt += ok.len();
                self.queue_for_host(ok.as_bytes());
                self.peer_buf_alloc = hdr.buf_alloc;
                self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
                self.flush_host();
                return true;
            }
            State::Established => {}
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match hdr.op {
            OP_RW => {
                let queued = self.host_out.len() - self.out_exempt;
                if queued + payload.len() > CONN_BUF_SIZE as usize {
                    crate::guest_warn!(
                        port = self.local_port,
                        "vsock: guest exceeded its credit; reset"
                    );
                    self.reset();
                    return false;
                }
                if self.guest_shut & SHUTDOWN_SEND != 0 || self.host_write_shut {
                    crate::guest_warn!("vsock: guest data after its SHUTDOWN; reset");
                    self.reset();
                    return false;
                }
                self.send_guest_data(payload);
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.pending_credit_update = true,
            OP_SHUTDOWN => {
                self.guest_shut |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                self.flush_host();
                self.check_finished();
            }
            _ => {
                crate::guest_warn!(
                    op = hdr.op,
                    "vsock: unexpected op on an established connection; reset"
                );
                self.reset();
                return false;
            }
        }
        true
    }

    /// Guest data for the host: straight from guest memory to the socket if nothing is queued before it,
    /// then whatever the socket did not take into `host_out` (the caller checked the credit).
    fn send_guest_data<P: TxPayload + ?Sized>(&mut self, payload: &P) {
        let len = payload.len();
        let mut done = 0;
        if self.host_out.is_empty() {
            while self.host_writable && done < len {
                match payload.send_to(&self.stream, done) {
                    Ok(0) => {
                        self.reset();
                        return;
                    }
                    Ok(n) => {
                        done += n;
                        self.fwd_cnt += Wrapping(n as u32);
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.host_writable = false,
                    Err(e) => {
                        crate::guest_warn!(error = %e, port = self.local_port, "vsock: host write failed; reset");
                        self.reset();
                        return;
                    }
                }
            }
        }
        if done < len {
            if let Err(e) = payload.append_to(done, &mut self.host_out) {
                crate::guest_warn!(error = %e, port = self.local_port, "vsock: cannot queue guest data; reset");
                self.reset();
                return;
            }
            self.buffered.add(len - done);
        }
        self.flush_host();
    }

    /// Write queued guest bytes to the host socket as far as it takes them.
    pub fn flush_host(&mut self) {
        while self.host_writable && !self.host_out.is_empty() && self.state != State::Closed {
            let (front, _) = self.host_out.as_slices();
            match self.stream.write(front) {
                Ok(0) => {
                    self.reset();
                    return;
                }
                Ok(n) => {
                    self.host_out.drain(..n);
                    self.buffered.sub(n);
                    let exempt = n.min(self.out_exempt);
                    self.out_exempt -= exempt;
                    self.fwd_cnt += Wrapping((n - exempt) as u32);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.host_writable = false,
                Err(e) => {
                    crate::guest_warn!(error = %e, port = self.local_port, "vsock: host write failed; reset");
                    self.reset();
                    return;
                }
            }
        }
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CONN_BUF_SIZE / 4 {
            self.pending_credit_update = true;
        }
        if self.host_out.is_empty() && self.guest_shut & SHUTDOWN_SEND != 0 && !self.host_write_shut
        {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        self.check_finished();
    }

    /// Both directions are over: the guest will not send (and everything it sent reached the host) and
    /// either the guest will not receive or the host sent EOF. Then reset to release the guest's socket.
    fn check_finished(&mut self) {
        if self.state != State::Established || !self.host_out.is_empty() {
            return;
        }
        let guest_done = self.guest_shut == SHUTDOWN_RCV | SHUTDOWN_SEND;
        let both_eof =
            self.guest_shut & SHUTDOWN_SEND != 0 && self.host_eof && self.pending_shutdown == 0;
        if guest_done || both_eof {
            self.reset();
        }
    }

    /// The host closed both ways and we told the guest: give the guest time to drain, then reset.
    pub fn closing_with_host_gone(&self) -> bool {
        self.state == State::Established && self.shut_sent == SHUTDOWN_RCV | SHUTDOWN_SEND
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.buffered.sub(self.host_out.len());
    }
}

/// Parse `CONNECT <port>` (the newline already stripped; a trailing `\r` is tolerated).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let port = s.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
        assert_eq!(parse_connect(b"connect 1"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }

    #[test]
    fn credit_accounting_wraps() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Connection::new(a, State::Established, 1, 2, HostBuffered::default());
        c.peer_buf_alloc = 100;
        c.rx_cnt = Wrapping(u32::MAX - 9);
        c.peer_fwd_cnt = Wrapping(u32::MAX - 49);
        assert_eq!(c.peer_credit(), 60);
        c.rx_cnt += Wrapping(20); // wraps past zero
        assert_eq!(c.peer_credit(), 40);
        c.peer_buf_alloc = 10; // the guest shrank its buffer below what is in flight
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn host_buffered_total_follows_every_connection() {
        let total = HostBuffered::default();
        let (a, _pa) = UnixStream::pair().unwrap();
        let (b, mut pb) = UnixStream::pair().unwrap();
        let (c, _pc) = UnixStream::pair().unwrap();
        let mut c1 = Connection::new(a, State::Established, 1, 2, total.clone());
        let mut c2 = Connection::new(b, State::Established, 3, 4, total.clone());
        let mut c3 = Connection::new(c, State::Established, 5, 6, total.clone());
        // The host sockets are full: guest data stays queued.
        for c in [&mut c1, &mut c2, &mut c3] {
            c.host_writable = false;
        }
        let rw = |len: u32| Header {
            op: OP_RW,
            type_: TYPE_STREAM,
            len,
            buf_alloc: 1 << 20,
            ..Default::default()
        };
        assert!(c1.on_guest_packet(&rw(1000), &[1u8; 1000][..]));
        assert!(c2.on_guest_packet(&rw(500), &[2u8; 500][..]));
        assert!(c3.on_guest_packet(&rw(10), &[3u8; 10][..]));
        assert_eq!((c1.host_queued(), total.get()), (1000, 1510));
        // A reset discards what the host will never get.
        c1.reset();
        assert_eq!((c1.host_queued(), total.get()), (0, 510));
        // Bytes the socket takes leave the total.
        c2.host_writable = true;
        c2.flush_host();
        assert_eq!(total.get(), 10);
        let mut got = [0u8; 500];
        pb.read_exact(&mut got).unwrap();
        assert_eq!(got, [2; 500]);
        // So do a dropped connection's.
        drop(c3);
        assert_eq!(total.get(), 0);
    }
}
