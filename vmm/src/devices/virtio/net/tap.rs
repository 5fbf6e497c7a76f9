//! A Linux TAP interface as the host side of a virtio-net device.
//!
//! Opened by name through `/dev/net/tun` (needs CAP_NET_ADMIN unless the tap already exists and belongs to
//! the caller) or adopted from an inherited file descriptor that is already attached to a tap (then the VMM
//! needs no privilege). Either way the fd is a single-queue tap with `IFF_NO_PI | IFF_VNET_HDR`, a 12-byte
//! vnet header (`virtio_net_hdr_v1`, the VERSION_1 layout) and `O_NONBLOCK`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::NetBackend;

/// Size of the vnet header on the tap: `virtio_net_hdr_v1` (with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
const TUN_PATH: &str = "/dev/net/tun";
/// Flags every tap this device uses carries.
const REQUIRED_FLAGS: i32 = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?} must be 1..=15 bytes without '/', whitespace or NUL")]
    InvalidName(String),
    #[error("cannot open {TUN_PATH}: {0}")]
    OpenTun(#[source] io::Error),
    #[error("cannot create or attach tap {name:?} (TUNSETIFF): {source}")]
    SetIff { name: String, source: io::Error },
    #[error("fd {fd} is not an open file descriptor: {source}")]
    BadFd { fd: RawFd, source: io::Error },
    #[error("fd {fd} is not a tap device (TUNGETIFF failed: {source})")]
    NotTap { fd: RawFd, source: io::Error },
    #[error("fd {fd} is a TUN (layer 3) device, not a TAP")]
    NotTapMode { fd: RawFd },
    #[error("fd {fd} (tap {name:?}) was opened without IFF_NO_PI|IFF_VNET_HDR (flags {flags:#x}); open it with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR")]
    MissingFlags { fd: RawFd, name: String, flags: i32 },
    #[error("tap {name:?}: {what} failed: {source}")]
    Ioctl {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

/// An open TAP queue.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

fn ifreq_with_name(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a name array and a union of integers/addresses); all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    ifr
}

fn ifreq_name(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Whether `name` can be an interface name (the kernel's `dev_valid_name`, `%d` templates allowed).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

impl Tap {
    /// Create the tap `name` (or attach to an existing one this process may use).
    pub fn open(name: &str) -> Result<Self, TapError> {
        if !valid_name(name) {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let file: File = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(TapError::OpenTun)?;
        let mut ifr = ifreq_with_name(name);
        // Single queue: no IFF_MULTI_QUEUE, the device has one rx/tx pair.
        ifr.ifr_ifru.ifru_flags = REQUIRED_FLAGS as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one `ifreq`, which lives for the call; the fd is ours.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if r < 0 {
            return Err(TapError::SetIff {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let tap = Self {
            fd: file.into(),
            name: ifreq_name(&ifr),
        };
        tap.set_vnet_hdr_len()?;
        Ok(tap)
    }

    /// Adopt the inherited descriptor `fd`, which must already be attached to a tap opened with
    /// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`. The `Tap` owns (and eventually closes) it; the caller must not
    /// adopt the same fd twice.
    pub fn from_fd(fd: RawFd) -> Result<Self, TapError> {
        if fd < 0 {
            return Err(TapError::BadFd {
                fd,
                source: io::Error::from_raw_os_error(libc::EBADF),
            });
        }
        // SAFETY: F_GETFD only queries the descriptor table; no memory is passed.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::BadFd {
                fd,
                source: io::Error::last_os_error(),
            });
        }
        // Check before taking ownership, so a wrong fd is left alone.
        let mut ifr = ifreq_with_name("");
        // SAFETY: TUNGETIFF writes one `ifreq` that lives for the call; on a non-tun fd it fails (ENOTTY,
        // EBADFD) without touching memory.
        let r = unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut ifr) };
        if r < 0 {
            return Err(TapError::NotTap {
                fd,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: union read of the flags TUNGETIFF just filled in.
        let flags = i32::from(unsafe { ifr.ifr_ifru.ifru_flags }) & 0xffff;
        let name = ifreq_name(&ifr);
        if flags & libc::IFF_TAP == 0 {
            return Err(TapError::NotTapMode { fd });
        }
        if flags & REQUIRED_FLAGS != REQUIRED_FLAGS {
            return Err(TapError::MissingFlags { fd, name, flags });
        }
        // SAFETY: `fd` is open (F_GETFD succeeded) and is a tap; the configuration names each fd once, so
        // this `OwnedFd` is its only owner in the process.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = fd.as_raw_fd();
        let tap = Self { fd, name };
        // SAFETY: F_GETFL/F_SETFL/F_SETFD only change the descriptor's flags.
        let ok = unsafe {
            let fl = libc::fcntl(raw, libc::F_GETFL);
            fl >= 0
                && libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK) >= 0
                && libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) >= 0
        };
        if !ok {
            return Err(tap.ioctl_err("fcntl(O_NONBLOCK)"));
        }
        tap.set_vnet_hdr_len()?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn ioctl_err(&self, what: &'static str) -> TapError {
        TapError::Ioctl {
            name: self.name.clone(),
            what,
            source: io::Error::last_os_error(),
        }
    }

    fn set_vnet_hdr_len(&self) -> Result<(), TapError> {
        let len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which lives for the call.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &len) };
        if r < 0 {
            return Err(self.ioctl_err("TUNSETVNETHDRSZ"));
        }
        Ok(())
    }

    /// The flags TUNGETIFF reports (for tests and diagnostics).
    pub fn flags(&self) -> io::Result<i32> {
        let mut ifr = ifreq_with_name("");
        // SAFETY: TUNGETIFF writes one `ifreq` that lives for the call.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNGETIFF, &mut ifr) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: union read of the flags TUNGETIFF just filled in.
        Ok(i32::from(unsafe { ifr.ifr_ifru.ifru_flags }) & 0xffff)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: read writes at most `buf.len()` bytes into `buf`, which is valid for the call.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: write reads at most `buf.len()` bytes from `buf`, which is valid for the call.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn set_offload(&self, tun_flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(tun_flags),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("tap {}", self.name)
    }
}

/// The `TUN_F_*` offloads matching the guest's acked receive features.
pub fn offload_flags(acked: u64) -> u32 {
    use super::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6};
    let has = |bit: u32| acked & (1u64 << bit) != 0;
    let mut f = 0;
    // TSO without checksum offload is refused by the kernel (and by the virtio spec).
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        f |= libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            f |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            f |= libc::TUN_F_TSO6;
        }
    }
    f
}

/// Name of the interface behind a tap file descriptor, if it is one.
#[cfg(test)]
pub fn name_of_fd(fd: RawFd) -> Option<String> {
    let mut ifr = ifreq_with_name("");
    // SAFETY: TUNGETIFF writes one `ifreq` that lives for the call.
    let r = unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut ifr) };
    (r >= 0).then(|| ifreq_name(&ifr))
}
