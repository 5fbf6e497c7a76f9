//! Tap devices for the VMM: opened on `/dev/net/tun` inside the pod namespace.
//!
//! The tap is not persistent (`TUNSETPERSIST` is never set), so the kernel deletes it when the last
//! fd on it is closed: closing the [`OwnedFd`] (and the VMM's copy) is what removes it.
//!
//! No offloads are enabled (`TUNSETOFFLOAD` is left at 0), so the kernel hands the tap complete,
//! checksummed, unsegmented frames and the vnet header of frames read is all zeroes; a VMM that
//! negotiates checksum/TSO offloads with the guest enables them on its fd with `TUNSETOFFLOAD`.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use tracing::debug;

use super::NetworkError;

/// The tun/tap control device.
pub const TUN_DEVICE: &str = "/dev/net/tun";

/// Size of the `virtio_net_hdr` that prefixes every frame read from or written to a capsa tap.
///
/// The tap is opened with `IFF_VNET_HDR`, whose header is 10 bytes by default (legacy
/// `virtio_net_hdr`). capsa sets it to 12 bytes (`TUNSETVNETHDRSZ`), the `virtio_net_hdr_v1` layout
/// with `num_buffers`, which is what a virtio 1.0 device (VIRTIO_F_VERSION_1) puts in front of every
/// packet, so the VMM can move buffers between the virtqueues and the tap without reshaping them.
pub const VNET_HDR_LEN: usize = 12;

/// Suffix of every tap capsa creates: `tap<N>_capsa`. Discovery skips such interfaces and the
/// netns-only cleanup deletes them.
pub const TAP_SUFFIX: &str = "_capsa";

/// The name of the tap for the `n`-th pod interface (at most 15 bytes, `IFNAMSIZ` - 1, for any `n` below 10^6).
pub fn tap_name(n: usize) -> String {
    format!("tap{n}{TAP_SUFFIX}")
}

/// Whether `name` is a tap capsa created (`tap<digits>_capsa`).
pub fn is_capsa_tap(name: &str) -> bool {
    name.strip_prefix("tap")
        .and_then(|rest| rest.strip_suffix(TAP_SUFFIX))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags as a short, padded to 40 bytes.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates the tap `name` in the calling thread's network namespace and returns its fd (blocking,
/// close-on-exec; the caller clears `FD_CLOEXEC` when handing it to the VMM).
pub fn create_tap(name: &str) -> Result<OwnedFd, NetworkError> {
    let err = |op: &'static str, source: io::Error| {
        let hint = match source.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
                " (no tun/tap support: load the tun module / provide /dev/net/tun)"
            }
            Some(libc::EPERM) | Some(libc::EACCES) => {
                " (creating a tap needs CAP_NET_ADMIN in the pod's namespace)"
            }
            Some(libc::EBUSY) => " (a tap of that name is already attached to another fd)",
            _ => "",
        };
        NetworkError::Tap {
            name: name.to_string(),
            op,
            hint,
            source,
        }
    };
    let cname = CString::new(name)
        .map_err(|_| err("name", io::Error::from(io::ErrorKind::InvalidInput)))?;
    if cname.as_bytes().len() >= libc::IFNAMSIZ {
        return Err(err(
            "name longer than 15 bytes",
            io::Error::from(io::ErrorKind::InvalidInput),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_DEVICE)
        .map_err(|e| err("open /dev/net/tun", e))?;
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..cname.as_bytes().len()].copy_from_slice(cname.as_bytes());
    req.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads (and writes back the final name into) a `struct ifreq`; `req` has its
    // layout and size (40 bytes) and lives across the call; the fd is open.
    if unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETIFF,
            &mut req as *mut IfReqFlags,
        )
    } < 0
    {
        return Err(err("TUNSETIFF", io::Error::last_os_error()));
    }
    let hdr_len: libc::c_int = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, which points at a live local.
    if unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETVNETHDRSZ,
            &hdr_len as *const libc::c_int,
        )
    } < 0
    {
        return Err(err("TUNSETVNETHDRSZ", io::Error::last_os_error()));
    }
    debug!(tap = name, "created tap");
    Ok(file.into())
}

/// The vnet header size configured on a tap fd (`TUNGETVNETHDRSZ`).
pub fn vnet_hdr_len(fd: &OwnedFd) -> io::Result<usize> {
    let mut len: libc::c_int = 0;
    // SAFETY: TUNGETVNETHDRSZ writes one c_int through the pointer, which points at a live local.
    if unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNGETVNETHDRSZ,
            &mut len as *mut libc::c_int,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(len as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names() {
        assert_eq!(tap_name(0), "tap0_capsa");
        assert!(tap_name(999_999).len() <= 15);
        assert!(is_capsa_tap("tap0_capsa"));
        assert!(is_capsa_tap("tap12_capsa"));
        assert!(!is_capsa_tap("tap_capsa"));
        assert!(!is_capsa_tap("tapx_capsa"));
        assert!(!is_capsa_tap("eth0"));
        assert!(!is_capsa_tap("tap0"));
        assert_eq!(std::mem::size_of::<IfReqFlags>(), 40);
    }
}
