//! A process's stdio as the host sees it: bounded kernel pipes (or a pty master) read on demand.
//!
//! Nothing is buffered in the agent: ReadStdout reads at most `len` bytes from the pipe when the host
//! asks, so a container that writes faster than the host reads blocks on its full pipe (backpressure)
//! and the agent's memory stays bounded by one read per call. EOF (an empty read) comes after the last
//! byte, once every writer has closed the pipe.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::unix::pipe;
use tokio::sync::Mutex;

/// Largest single read or write the agent does for the host (ttrpc frames are limited to 4 MiB).
pub const MAX_CHUNK: usize = 1 << 20;
/// Pipe capacity asked of the kernel (bounded by /proc/sys/fs/pipe-max-size).
const PIPE_SIZE: libc::c_int = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("stdin of this process is closed")]
    StdinClosed,
    #[error("this process has no {0} stream (it has a terminal: use stdout)")]
    NoStream(&'static str),
    #[error("the process has no terminal")]
    NoTerminal,
    #[error("stdio: {0}")]
    Io(#[from] io::Error),
}

/// Pipes created for a process: the agent's ends and the process's ends.
pub struct PipeSet {
    pub ours: PipeEnds,
    pub theirs: super::helper::HelperStdio,
}

pub struct PipeEnds {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    // SAFETY: F_SETPIPE_SZ on a pipe we own; failure only means the default size stays.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
    Ok((r, w))
}

pub fn make_pipes() -> io::Result<PipeSet> {
    let (in_r, in_w) = pipe_pair()?;
    let (out_r, out_w) = pipe_pair()?;
    let (err_r, err_w) = pipe_pair()?;
    Ok(PipeSet {
        ours: PipeEnds {
            stdin: in_w,
            stdout: out_r,
            stderr: err_r,
        },
        theirs: super::helper::HelperStdio {
            stdin: in_r,
            stdout: out_w,
            stderr: err_w,
        },
    })
}

/// The host-facing side of a process's stdio.
pub enum Stdio {
    Pipes {
        stdin: Mutex<Option<pipe::Sender>>,
        stdout: Mutex<Option<pipe::Receiver>>,
        stderr: Mutex<Option<pipe::Receiver>>,
    },
    Tty {
        master: AsyncFd<OwnedFd>,
        read_lock: Mutex<bool>,  // true once EOF was seen
        write_lock: Mutex<bool>, // true once stdin was closed
    },
}

impl Stdio {
    pub fn from_pipes(ends: PipeEnds) -> io::Result<Stdio> {
        Ok(Stdio::Pipes {
            stdin: Mutex::new(Some(pipe::Sender::from_owned_fd(ends.stdin)?)),
            stdout: Mutex::new(Some(pipe::Receiver::from_owned_fd(ends.stdout)?)),
            stderr: Mutex::new(Some(pipe::Receiver::from_owned_fd(ends.stderr)?)),
        })
    }

    pub fn from_tty_master(master: OwnedFd) -> io::Result<Stdio> {
        set_nonblocking(&master)?;
        Ok(Stdio::Tty {
            // SAFETY: we own `master` and it stays open (inside the AsyncFd) until deregistered.
            master: unsafe { AsyncFd::register(master) }.map_err(io::Error::from)?,
            read_lock: Mutex::new(false),
            write_lock: Mutex::new(false),
        })
    }

    /// Reads up to `len` bytes (at most [`MAX_CHUNK`]), waiting for data; empty = end of stream.
    pub async fn read(&self, stderr: bool, len: usize) -> Result<Vec<u8>, StdioError> {
        let len = if len == 0 {
            64 * 1024
        } else {
            len.min(MAX_CHUNK)
        };
        match self {
            Stdio::Pipes {
                stdout, stderr: e, ..
            } => {
                let mut guard = if stderr {
                    e.lock().await
                } else {
                    stdout.lock().await
                };
                let Some(rx) = guard.as_mut() else {
                    return Ok(Vec::new());
                };
                let mut buf = vec![0u8; len];
                loop {
                    rx.readable().await?;
                    match rx.try_read(&mut buf) {
                        Ok(0) => {
                            *guard = None; // EOF: later reads return EOF at once
                            return Ok(Vec::new());
                        }
                        Ok(n) => {
                            buf.truncate(n);
                            return Ok(buf);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            Stdio::Tty {
                master, read_lock, ..
            } => {
                if stderr {
                    return Err(StdioError::NoStream("stderr"));
                }
                let mut eof = read_lock.lock().await;
                if *eof {
                    return Ok(Vec::new());
                }
                let mut buf = vec![0u8; len];
                loop {
                    let mut ready = master.ready(Interest::READABLE).await?;
                    match ready.try_io(|fd| fd_read(fd.get_ref(), &mut buf)) {
                        Ok(Ok(0)) => {
                            *eof = true;
                            return Ok(Vec::new());
                        }
                        Ok(Ok(n)) => {
                            buf.truncate(n);
                            return Ok(buf);
                        }
                        // The slave side is gone: that is the terminal's end of stream.
                        Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => {
                            *eof = true;
                            return Ok(Vec::new());
                        }
                        Ok(Err(e)) => return Err(e.into()),
                        Err(_would_block) => continue,
                    }
                }
            }
        }
    }

    /// Writes some of `data` (waiting until the pipe takes at least one byte); returns how much.
    pub async fn write(&self, data: &[u8]) -> Result<usize, StdioError> {
        if data.is_empty() {
            return Ok(0);
        }
        match self {
            Stdio::Pipes { stdin, .. } => {
                let mut guard = stdin.lock().await;
                let Some(tx) = guard.as_mut() else {
                    return Err(StdioError::StdinClosed);
                };
                loop {
                    tx.writable().await?;
                    match tx.try_write(data) {
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            Stdio::Tty {
                master, write_lock, ..
            } => {
                let closed = write_lock.lock().await;
                if *closed {
                    return Err(StdioError::StdinClosed);
                }
                loop {
                    let mut ready = master.ready(Interest::WRITABLE).await?;
                    match ready.try_io(|fd| fd_write(fd.get_ref(), data)) {
                        Ok(r) => return Ok(r?),
                        Err(_would_block) => continue,
                    }
                }
            }
        }
    }

    /// Closes stdin: the pipe's write end, or for a terminal sends EOF (^D) and refuses later writes.
    pub async fn close_stdin(&self) -> Result<(), StdioError> {
        match self {
            Stdio::Pipes { stdin, .. } => {
                stdin.lock().await.take();
                Ok(())
            }
            Stdio::Tty {
                master, write_lock, ..
            } => {
                let mut closed = write_lock.lock().await;
                if !*closed {
                    *closed = true;
                    let _ = fd_write(master.get_ref(), &[4u8]);
                }
                Ok(())
            }
        }
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), StdioError> {
        match self {
            Stdio::Tty { master, .. } => {
                let ws = libc::winsize {
                    ws_row: rows,
                    ws_col: cols,
                    ws_xpixel: 0,
                    ws_ypixel: 0,
                };
                // SAFETY: TIOCSWINSZ reads a winsize struct that lives for the call.
                let r = unsafe { libc::ioctl(master.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
                if r < 0 {
                    return Err(io::Error::last_os_error().into());
                }
                Ok(())
            }
            Stdio::Pipes { .. } => Err(StdioError::NoTerminal),
        }
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
    let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
    Ok(())
}

fn fd_read(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    nix::unistd::read(fd.as_raw_fd(), buf).map_err(io::Error::from)
}

fn fd_write(fd: &OwnedFd, buf: &[u8]) -> io::Result<usize> {
    nix::unistd::write(fd.as_fd(), buf).map_err(io::Error::from)
}

/// Receives the pty master libcontainer's init sends over the console socket (blocking; waits at
/// most `timeout`).
pub fn receive_pty_master(
    listener: &std::os::unix::net::UnixListener,
    timeout: std::time::Duration,
) -> io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    use std::io::IoSliceMut;
    use std::os::fd::FromRawFd;

    listener.set_nonblocking(true)?;
    let deadline = std::time::Instant::now() + timeout;
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() > deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the container never connected to the console socket",
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut name = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut name)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<UnixAddr>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(fd) = fds.first() {
                // SAFETY: SCM_RIGHTS just installed this descriptor in our table; we own it now.
                return Ok(unsafe { OwnedFd::from_raw_fd(*fd) });
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "the console socket message carried no file descriptor",
    ))
}

/// Removes a stale socket file and binds a fresh listener.
pub fn console_listener(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    let _ = std::fs::remove_file(path);
    std::os::unix::net::UnixListener::bind(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn pipes_stream_in_order_then_eof() {
        let set = make_pipes().unwrap();
        let stdio = Stdio::from_pipes(set.ours).unwrap();
        let theirs = set.theirs;
        // A writer thread pushes 4 MiB through a 1 MiB pipe: it must block until we read.
        let writer = std::thread::spawn(move || {
            let mut f = std::fs::File::from(theirs.stdout);
            let data: Vec<u8> = (0..4 * MAX_CHUNK).map(|i| (i % 251) as u8).collect();
            f.write_all(&data).unwrap();
            drop(theirs.stderr);
        });
        let mut got = Vec::new();
        loop {
            let chunk = stdio.read(false, 300_000).await.unwrap();
            if chunk.is_empty() {
                break;
            }
            assert!(chunk.len() <= 300_000);
            got.extend_from_slice(&chunk);
        }
        writer.join().unwrap();
        assert_eq!(got.len(), 4 * MAX_CHUNK);
        assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
        // EOF is sticky, and stderr (closed by the writer) reports EOF too.
        assert!(stdio.read(false, 10).await.unwrap().is_empty());
        assert!(stdio.read(true, 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn stdin_write_and_close() {
        let set = make_pipes().unwrap();
        let stdio = Stdio::from_pipes(set.ours).unwrap();
        let n = stdio.write(b"hello").await.unwrap();
        assert_eq!(n, 5);
        stdio.close_stdin().await.unwrap();
        assert!(matches!(
            stdio.write(b"x").await,
            Err(StdioError::StdinClosed)
        ));
        let mut s = String::new();
        use std::io::Read;
        std::fs::File::from(set.theirs.stdin)
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "hello");
        assert!(matches!(stdio.resize(10, 10), Err(StdioError::NoTerminal)));
    }

    #[tokio::test]
    async fn tty_master_reads_writes_and_resizes() {
        let pty = nix::pty::openpty(None, None).unwrap();
        let stdio = Stdio::from_tty_master(pty.master).unwrap();
        stdio.resize(33, 77).unwrap();
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ fills the struct.
        unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!((ws.ws_row, ws.ws_col), (33, 77));
        let mut slave = std::fs::File::from(pty.slave);
        slave.write_all(b"out\n").unwrap();
        let got = stdio.read(false, 100).await.unwrap();
        assert!(String::from_utf8_lossy(&got).starts_with("out"), "{got:?}");
        assert!(matches!(
            stdio.read(true, 1).await,
            Err(StdioError::NoStream(_))
        ));
        drop(slave);
        // Drain until EOF (EIO once the slave is closed).
        loop {
            if stdio.read(false, 100).await.unwrap().is_empty() {
                break;
            }
        }
    }
}
