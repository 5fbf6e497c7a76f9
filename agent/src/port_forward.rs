//! CRI PortForward, guest side: a vsock listener on [`PORT_FORWARD_VSOCK_PORT`] that joins each host
//! connection to a TCP connection to `127.0.0.1:PORT` in the guest (the pod's network namespace).
//!
//! Protocol, one exchange per connection, then raw bytes both ways:
//! - host → guest: the decimal TCP port and `\n` (at most [`MAX_HEADER`] bytes, port 1..=65535);
//! - guest → host: `OK\n` once connected, or `ERR <reason>\n` and close.
//!
//! The host end is the shim's forwarder in the pod's network namespace (see the runtime's
//! `network::port_forward`). The guest gains nothing it could not do itself: the agent only dials
//! loopback ports of the guest, for the host.
//!
//! [`PORT_FORWARD_VSOCK_PORT`]: capsa_proto::PORT_FORWARD_VSOCK_PORT

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_vsock::{VsockAddr, VsockListener};

/// Longest request line: `65535\n` plus slack for a leading zero or two.
pub const MAX_HEADER: usize = 8;
/// Forwarded connections open at once; more wait for a slot (the host's accept queue holds them).
pub const MAX_CONNECTIONS: usize = 256;
/// How long the host may take to send its request line, and the guest to connect.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request line was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("request line longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error("connection closed before the request line ended")]
    Truncated,
    #[error("port {0:?} is not a number in 1..=65535")]
    BadPort(String),
}

/// Parses a request line (without its `\n`): the TCP port to dial.
pub fn parse_request(line: &[u8]) -> Result<u16, RequestError> {
    let text = String::from_utf8_lossy(line);
    match text.parse::<u16>() {
        Ok(port) if port != 0 && text.bytes().all(|b| b.is_ascii_digit()) => Ok(port),
        _ => Err(RequestError::BadPort(text.into_owned())),
    }
}

/// Reads the request line one byte at a time, so no payload byte after it is consumed.
async fn read_request<R: AsyncReadExt + Unpin>(r: &mut R) -> Result<u16, RequestError> {
    let mut line = Vec::with_capacity(MAX_HEADER);
    loop {
        let mut b = [0u8; 1];
        match r.read(&mut b).await {
            Ok(1) if b[0] == b'\n' => return parse_request(&line),
            Ok(1) if line.len() < MAX_HEADER => line.push(b[0]),
            Ok(1) => return Err(RequestError::TooLong),
            _ => return Err(RequestError::Truncated),
        }
    }
}

/// Serves forwarded connections on `port` until the process ends. Errors binding are returned;
/// per-connection errors are logged and end only that connection.
pub async fn serve(port: u32) -> io::Result<()> {
    let listener = VsockListener::bind(VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
    tracing::debug!(port, "port-forward listener ready");
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = match slots.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return Ok(()),
        };
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("port-forward accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _permit = permit;
            forward(conn, peer.cid()).await;
        });
    }
}

async fn forward<S>(mut host: S, peer_cid: u32)
where
    S: AsyncReadExt + AsyncWrite + Unpin,
{
    let port = match tokio::time::timeout(STEP_TIMEOUT, read_request(&mut host)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return refuse(&mut host, peer_cid, &e.to_string()).await,
        Err(_) => return refuse(&mut host, peer_cid, "no request line within 10s").await,
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut tcp = match tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return refuse(&mut host, peer_cid, &format!("connect {addr}: {e}")).await,
        Err(_) => return refuse(&mut host, peer_cid, &format!("connect {addr}: timed out")).await,
    };
    if host.write_all(b"OK\n").await.is_err() {
        return;
    }
    match tokio::io::copy_bidirectional(&mut host, &mut tcp).await {
        Ok((up, down)) => {
            tracing::debug!(
                port,
                to_guest = up,
                to_host = down,
                "port-forward connection done"
            )
        }
        Err(e) => tracing::debug!(port, "port-forward connection ended: {e}"),
    }
}

async fn refuse<S: AsyncWrite + Unpin>(host: &mut S, peer_cid: u32, reason: &str) {
    tracing::info!(peer_cid, "port-forward refused: {reason}");
    let line = format!("ERR {}\n", reason.replace('\n', " "));
    let _ = host.write_all(line.as_bytes()).await;
    let _ = host.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::TcpListener;

    #[test]
    fn request_lines() {
        assert_eq!(parse_request(b"8080"), Ok(8080));
        assert_eq!(parse_request(b"1"), Ok(1));
        assert_eq!(parse_request(b"65535"), Ok(65535));
        for bad in [
            &b"0"[..],
            b"65536",
            b"",
            b"+80",
            b" 80",
            b"80 ",
            b"-1",
            b"http",
        ] {
            assert!(
                matches!(parse_request(bad), Err(RequestError::BadPort(_))),
                "{bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn header_is_bounded_and_exact() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(b"123456789\n").await.unwrap();
        assert_eq!(read_request(&mut b).await, Err(RequestError::TooLong));
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(b"80").await.unwrap();
        drop(a);
        assert_eq!(read_request(&mut b).await, Err(RequestError::Truncated));
        // Payload after the line stays unread.
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(b"80\npayload").await.unwrap();
        assert_eq!(read_request(&mut b).await, Ok(80));
        let mut rest = [0u8; 7];
        b.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"payload");
    }

    #[tokio::test]
    async fn forwards_bytes_both_ways_to_a_loopback_server() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
            s.write_all(b"-bye").await.unwrap();
        });
        let (host, guest) = tokio::io::duplex(1024);
        tokio::spawn(forward(guest, 2));
        let (r, mut w) = tokio::io::split(host);
        let mut r = BufReader::new(r);
        w.write_all(format!("{port}\nhello").as_bytes())
            .await
            .unwrap();
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        assert_eq!(line, "OK\n");
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello-bye");
    }

    #[tokio::test]
    async fn a_closed_port_is_refused_with_a_reason() {
        // Bind then drop: the port is (almost certainly) closed now.
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().port()
        };
        let (host, guest) = tokio::io::duplex(1024);
        tokio::spawn(forward(guest, 2));
        let (r, mut w) = tokio::io::split(host);
        w.write_all(format!("{port}\n").as_bytes()).await.unwrap();
        let mut line = String::new();
        BufReader::new(r).read_line(&mut line).await.unwrap();
        assert!(line.starts_with("ERR connect 127.0.0.1:"), "{line}");
        assert!(line.contains("refused"), "{line}");
    }
}
