//! Payload I/O straight between guest memory and a host socket: the validated pieces of a descriptor chain
//! become the iovec array of one `sendmsg`/`recvmsg`, so a packet's payload crosses the VMM without an
//! intermediate buffer (as Firecracker's vsock does). Only the bytes a host socket does not take are copied,
//! into the connection's bounded queue.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryError};

use crate::devices::virtio::chain::Cursor;
use crate::devices::GuestMemoryMmap;

/// Most iovecs in one syscall (on the stack). A payload in more pieces (up to 256 descriptors, each maybe
/// split at a memory-region boundary) takes more than one call; never truncated.
const MAX_IOVS: usize = 64;

/// Payload bytes of one packet in guest memory: `len` bytes from `start`, inside validated descriptors.
pub struct GuestBytes<'a> {
    mem: &'a GuestMemoryMmap,
    start: Cursor<'a>,
    len: usize,
}

/// Bytes the guest sent for a host peer: written to its socket as far as it takes them, the rest queued.
pub trait TxPayload {
    fn len(&self) -> usize;
    /// Write bytes `skip..` to `stream` (non-blocking); the count written.
    fn send_to(&self, stream: &UnixStream, skip: usize) -> io::Result<usize>;
    /// Append bytes `skip..` to `out`.
    fn append_to(&self, skip: usize, out: &mut VecDeque<u8>) -> io::Result<()>;
}

fn mem_err(e: GuestMemoryError) -> io::Error {
    io::Error::other(e)
}

impl<'a> GuestBytes<'a> {
    /// At most `len` bytes from `start` (fewer if the segments end first).
    pub fn new(mem: &'a GuestMemoryMmap, start: Cursor<'a>, len: usize) -> Self {
        let len = len.min(usize::try_from(start.remaining()).unwrap_or(usize::MAX));
        Self { mem, start, len }
    }

    /// Fill `iovs` with bytes `skip..skip + max` (as far as `MAX_IOVS` entries reach); returns the entries
    /// used. Every entry points into guest memory that `self.mem` keeps mapped.
    fn iovecs(
        &self,
        skip: usize,
        max: usize,
        iovs: &mut [libc::iovec; MAX_IOVS],
    ) -> Result<usize, GuestMemoryError> {
        let mut cur = self.start.clone();
        if cur.skip(skip) < skip {
            return Ok(0);
        }
        let mut left = max.min(self.len.saturating_sub(skip));
        let mut n = 0;
        while left > 0 && n < MAX_IOVS {
            let Some((addr, k)) = cur.next_piece(left) else {
                break;
            };
            left -= k;
            // A piece inside one descriptor may still span memory regions: one iovec per region.
            for slice in self.mem.get_slices(addr, k) {
                let slice = slice?;
                if n == MAX_IOVS {
                    return Ok(n);
                }
                // No xen mapping here: the guard is the plain pointer into the region's mmap, which lives
                // as long as `self.mem`.
                iovs[n] = libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                };
                n += 1;
            }
        }
        Ok(n)
    }

    /// Read at most `max` bytes from `stream` straight into these guest bytes (non-blocking); the count.
    /// Guest memory has no dirty bitmap (`GuestMemoryMmap<()>`), so nothing needs marking.
    pub fn recv_from(&self, stream: &UnixStream, max: usize) -> io::Result<usize> {
        let mut iovs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOVS];
        let n = self.iovecs(0, max, &mut iovs).map_err(mem_err)?;
        if n == 0 {
            return Ok(0);
        }
        // SAFETY: msghdr is plain old data; all-zero (no name, no control) is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iovs.as_mut_ptr();
        msg.msg_iovlen = n as _;
        // SAFETY: the first `n` iovecs describe guest memory inside validated descriptors, mapped while
        // `self.mem` lives (borrowed for this call); the guest may change those bytes concurrently, which
        // the kernel's copy tolerates, and no Rust reference to them exists. Without a control buffer,
        // descriptors a peer passes are discarded by the kernel, never installed.
        let r = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }
}

impl TxPayload for GuestBytes<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn send_to(&self, stream: &UnixStream, skip: usize) -> io::Result<usize> {
        let mut iovs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOVS];
        let n = self.iovecs(skip, usize::MAX, &mut iovs).map_err(mem_err)?;
        if n == 0 {
            return Ok(0);
        }
        // SAFETY: msghdr is plain old data; all-zero (no name, no control) is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iovs.as_mut_ptr();
        msg.msg_iovlen = n as _;
        // SAFETY: the first `n` iovecs describe guest memory inside validated descriptors, mapped while
        // `self.mem` lives; the kernel only reads them. MSG_NOSIGNAL: a gone peer is EPIPE, not SIGPIPE.
        let r = unsafe {
            libc::sendmsg(
                stream.as_raw_fd(),
                &msg,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    fn append_to(&self, skip: usize, out: &mut VecDeque<u8>) -> io::Result<()> {
        let mut cur = self.start.clone();
        if cur.skip(skip) < skip {
            return Ok(());
        }
        let n = self.len.saturating_sub(skip);
        let old = out.len();
        out.resize(old + n, 0);
        let (a, b) = out.as_mut_slices();
        // The new bytes are the last `n` of the deque: the end of `a` and/or the end of `b`.
        let (in_a, in_b) = if b.len() >= n {
            let bl = b.len();
            (&mut a[..0], &mut b[bl - n..])
        } else {
            let from = a.len() - (n - b.len());
            (&mut a[from..], b)
        };
        let copy = || -> io::Result<()> {
            for dst in [in_a, in_b] {
                let mut done = 0;
                while done < dst.len() {
                    let (addr, k) = cur
                        .next_piece(dst.len() - done)
                        .ok_or_else(|| io::Error::other("guest payload ends early"))?;
                    self.mem
                        .read_slice(&mut dst[done..done + k], addr)
                        .map_err(mem_err)?;
                    done += k;
                }
            }
            Ok(())
        };
        let r = copy();
        if r.is_err() {
            out.truncate(old);
        }
        r
    }
}

#[cfg(test)]
impl TxPayload for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    fn send_to(&self, stream: &UnixStream, skip: usize) -> io::Result<usize> {
        io::Write::write(&mut &*stream, &self[skip..])
    }

    fn append_to(&self, skip: usize, out: &mut VecDeque<u8>) -> io::Result<()> {
        out.extend(&self[skip..]);
        Ok(())
    }
}
