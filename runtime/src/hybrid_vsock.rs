//! Host side of hybrid vsock (the Firecracker / Cloud Hypervisor convention).
//!
//! The VMM listens on a Unix socket. To reach guest port P the host connects, writes `CONNECT P\n` and
//! reads one `OK <host-side port>\n` line; from then on the stream is the guest's port. The reply is read
//! one byte at a time so that nothing the guest sends right after the `OK` line is swallowed.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Longest `OK <port>\n` line accepted (`OK 4294967295\n` is 14 bytes).
const MAX_REPLY: usize = 32;

/// Why a hybrid-vsock connection failed.
#[derive(Debug, thiserror::Error)]
pub enum HybridVsockError {
    #[error("vsock socket {path} does not exist (VM not started yet, or gone)")]
    NoSocket { path: PathBuf },
    #[error("connection to vsock socket {path} refused (the VMM is not listening: VM gone?)")]
    Refused { path: PathBuf },
    #[error(
        "the VMM closed {path} before answering CONNECT {port} (nothing listens on guest port {port} yet?)"
    )]
    Closed { path: PathBuf, port: u32 },
    #[error("bad reply to CONNECT {port} on {path}: {reply:?}")]
    BadReply {
        path: PathBuf,
        port: u32,
        reply: String,
    },
    #[error("timed out after {timeout:?} connecting to guest port {port} through {path}")]
    Timeout {
        path: PathBuf,
        port: u32,
        timeout: Duration,
    },
    #[error("I/O error on vsock socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl HybridVsockError {
    /// True when retrying later may succeed (the VM is still booting), false when it is hopeless.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            HybridVsockError::NoSocket { .. }
                | HybridVsockError::Refused { .. }
                | HybridVsockError::Closed { .. }
                | HybridVsockError::Timeout { .. }
        )
    }
}

fn connect_error(path: &Path, e: io::Error) -> HybridVsockError {
    match e.kind() {
        io::ErrorKind::NotFound => HybridVsockError::NoSocket {
            path: path.to_owned(),
        },
        io::ErrorKind::ConnectionRefused => HybridVsockError::Refused {
            path: path.to_owned(),
        },
        _ => HybridVsockError::Io {
            path: path.to_owned(),
            source: e,
        },
    }
}

fn io_error(path: &Path, port: u32, e: io::Error) -> HybridVsockError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe => HybridVsockError::Closed {
            path: path.to_owned(),
            port,
        },
        _ => HybridVsockError::Io {
            path: path.to_owned(),
            source: e,
        },
    }
}

/// Checks one complete reply line (without the newline) and returns the host-side port it names.
pub fn parse_ok_line(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let rest = line.strip_prefix("OK ")?;
    rest.trim().parse::<u32>().ok()
}

/// Feeds one reply byte into `buf`. Returns `Some(result)` once the line is complete or invalid.
fn push_reply_byte(
    buf: &mut Vec<u8>,
    byte: u8,
    path: &Path,
    port: u32,
) -> Option<Result<u32, HybridVsockError>> {
    let bad = |buf: &[u8]| HybridVsockError::BadReply {
        path: path.to_owned(),
        port,
        reply: String::from_utf8_lossy(buf).into_owned(),
    };
    if byte == b'\n' {
        return Some(parse_ok_line(buf).ok_or_else(|| bad(buf)));
    }
    buf.push(byte);
    // Fail early on anything that cannot become "OK <n>".
    if buf.len() > MAX_REPLY || !b"OK ".starts_with(&buf[..buf.len().min(3)]) {
        return Some(Err(bad(buf)));
    }
    None
}

/// Connects to guest `port` through the VMM's hybrid-vsock Unix socket at `path` (async).
pub async fn connect(
    path: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, HybridVsockError> {
    match tokio::time::timeout(timeout, connect_inner(path, port)).await {
        Ok(r) => r,
        Err(_) => Err(HybridVsockError::Timeout {
            path: path.to_owned(),
            port,
            timeout,
        }),
    }
}

async fn connect_inner(path: &Path, port: u32) -> Result<UnixStream, HybridVsockError> {
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|e| connect_error(path, e))?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| io_error(path, port, e))?;
    let mut buf = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        let n = stream
            .read(&mut byte)
            .await
            .map_err(|e| io_error(path, port, e))?;
        if n == 0 {
            return if buf.is_empty() {
                Err(HybridVsockError::Closed {
                    path: path.to_owned(),
                    port,
                })
            } else {
                Err(HybridVsockError::BadReply {
                    path: path.to_owned(),
                    port,
                    reply: String::from_utf8_lossy(&buf).into_owned(),
                })
            };
        }
        if let Some(result) = push_reply_byte(&mut buf, byte[0], path, port) {
            let host_port = result?;
            tracing::trace!(path = %path.display(), port, host_port, "hybrid vsock connected");
            return Ok(stream);
        }
    }
}

/// Blocking variant of [`connect`] for callers without a tokio runtime.
pub fn connect_blocking(
    path: &Path,
    port: u32,
    timeout: Duration,
) -> Result<StdUnixStream, HybridVsockError> {
    let deadline = Instant::now() + timeout;
    let timed_out = || HybridVsockError::Timeout {
        path: path.to_owned(),
        port,
        timeout,
    };
    let mut stream = StdUnixStream::connect(path).map_err(|e| connect_error(path, e))?;
    let remaining = deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(timed_out)?;
    let set = |s: &StdUnixStream, d| {
        s.set_read_timeout(Some(d))
            .and_then(|_| s.set_write_timeout(Some(d)))
    };
    set(&stream, remaining).map_err(|e| io_error(path, port, e))?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| io_error(path, port, e))?;
    let mut buf = Vec::with_capacity(16);
    loop {
        let remaining = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(timed_out)?;
        stream
            .set_read_timeout(Some(remaining))
            .map_err(|e| io_error(path, port, e))?;
        let mut byte = [0u8; 1];
        let n = match stream.read(&mut byte) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timed_out())
            }
            Err(e) => return Err(io_error(path, port, e)),
        };
        if n == 0 {
            return Err(if buf.is_empty() {
                HybridVsockError::Closed {
                    path: path.to_owned(),
                    port,
                }
            } else {
                HybridVsockError::BadReply {
                    path: path.to_owned(),
                    port,
                    reply: String::from_utf8_lossy(&buf).into_owned(),
                }
            });
        }
        if let Some(result) = push_reply_byte(&mut buf, byte[0], path, port) {
            result?;
            stream
                .set_read_timeout(None)
                .and_then(|_| stream.set_write_timeout(None))
                .map_err(|e| io_error(path, port, e))?;
            return Ok(stream);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::thread;

    /// A fake VMM: accepts one connection, expects `CONNECT 1024\n`, sends `reply` (and `extra` in the
    /// same write, to catch readers that over-read), then echoes.
    fn fake_vmm(dir: &Path, reply: &'static [u8], extra: &'static [u8]) -> PathBuf {
        let path = dir.join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            let mut b = [0u8; 1];
            while s.read(&mut b).unwrap() == 1 {
                req.push(b[0]);
                if b[0] == b'\n' {
                    break;
                }
            }
            assert_eq!(req, b"CONNECT 1024\n");
            let mut out = reply.to_vec();
            out.extend_from_slice(extra);
            s.write_all(&out).unwrap();
            let mut buf = [0u8; 256];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        path
    }

    #[tokio::test]
    async fn handshake_keeps_bytes_after_ok_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = fake_vmm(dir.path(), b"OK 1073741824\n", b"early");
        let mut s = connect(&path, 1024, Duration::from_secs(5)).await.unwrap();
        let mut early = [0u8; 5];
        s.read_exact(&mut early).await.unwrap();
        assert_eq!(&early, b"early");
        s.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        s.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"ping");
    }

    #[test]
    fn blocking_handshake_keeps_bytes_after_ok_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = fake_vmm(dir.path(), b"OK 1073741824\n", b"early");
        let mut s = connect_blocking(&path, 1024, Duration::from_secs(5)).unwrap();
        let mut early = [0u8; 5];
        s.read_exact(&mut early).unwrap();
        assert_eq!(&early, b"early");
        s.write_all(b"pong").unwrap();
        let mut echo = [0u8; 4];
        s.read_exact(&mut echo).unwrap();
        assert_eq!(&echo, b"pong");
    }

    #[tokio::test]
    async fn bad_reply_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = fake_vmm(dir.path(), b"NO such port\n", b"");
        let err = connect(&path, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(err, HybridVsockError::BadReply { ref reply, .. } if reply.starts_with("N")),
            "{err}"
        );
        assert!(!err.is_transient());
    }

    #[tokio::test]
    async fn non_numeric_port_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = fake_vmm(dir.path(), b"OK abc\n", b"");
        let err = connect(&path, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, HybridVsockError::BadReply { .. }), "{err}");
    }

    #[tokio::test]
    async fn endless_reply_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = fake_vmm(dir.path(), b"OK 1111111111111111111111111111111111111", b"");
        let err = connect(&path, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, HybridVsockError::BadReply { .. }), "{err}");
    }

    #[tokio::test]
    async fn closed_before_reply() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            drop(s);
        });
        let err = connect(&path, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, HybridVsockError::Closed { .. }), "{err}");
        assert!(err.is_transient());
    }

    #[tokio::test]
    async fn missing_socket_and_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.sock");
        let err = connect(&path, 1024, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, HybridVsockError::NoSocket { .. }), "{err}");
        // A socket file whose listener is gone: refused.
        let path = dir.path().join("gone.sock");
        drop(UnixListener::bind(&path).unwrap());
        let err = connect(&path, 1024, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, HybridVsockError::Refused { .. }), "{err}");
    }

    #[tokio::test]
    async fn silent_vmm_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let _keep = thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            thread::sleep(Duration::from_secs(2));
            drop(s);
        });
        let err = connect(&path, 1024, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, HybridVsockError::Timeout { .. }), "{err}");
        let path2 = dir.path().join("v2.sock");
        let listener2 = UnixListener::bind(&path2).unwrap();
        thread::spawn(move || {
            let (s, _) = listener2.accept().unwrap();
            thread::sleep(Duration::from_secs(2));
            drop(s);
        });
        let err = connect_blocking(&path2, 1024, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, HybridVsockError::Timeout { .. }), "{err}");
    }

    #[test]
    fn parse_ok() {
        assert_eq!(parse_ok_line(b"OK 1073741824"), Some(1073741824));
        assert_eq!(parse_ok_line(b"OK 5\r"), Some(5));
        assert_eq!(parse_ok_line(b"OK"), None);
        assert_eq!(parse_ok_line(b"ok 5"), None);
        assert_eq!(parse_ok_line(b"OK -1"), None);
    }
}
