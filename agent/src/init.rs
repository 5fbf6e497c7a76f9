//! PID-1 duties: the guest's basic file systems, cgroup v2, stdio on the console, `lo` up.
//! Every step is best effort: failures are logged and the agent keeps going.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::stat::Mode;

/// Errors of one init step.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("mkdir {path}: {source}")]
    Mkdir {
        path: String,
        source: std::io::Error,
    },
    #[error("mount {fstype} on {target}: {source}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        source: nix::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Sys {
        what: &'static str,
        source: nix::Error,
    },
}

/// One file system PID 1 mounts.
struct MountSpec {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// In order: later entries live inside earlier ones.
const MOUNTS: &[MountSpec] = &[
    MountSpec {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    MountSpec {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    MountSpec {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    MountSpec {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("mode=0620,ptmxmode=0666"),
    },
    MountSpec {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("mode=1777"),
    },
    MountSpec {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    MountSpec {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    MountSpec {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("nsdelegate"),
    },
];

/// Root of the cgroup v2 hierarchy.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

fn mkdir_p(path: &str) -> Result<(), InitError> {
    fs::create_dir_all(path).map_err(|source| InitError::Mkdir {
        path: path.to_string(),
        source,
    })
}

fn mount_one(m: &MountSpec) -> Result<(), InitError> {
    mkdir_p(m.target)?;
    match mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data) {
        // Already mounted (e.g. the kernel's CONFIG_DEVTMPFS_MOUNT): fine.
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(source) => Err(InitError::Mount {
            fstype: m.fstype,
            target: m.target,
            source,
        }),
    }
}

/// Mounts the early file systems needed before logging can reach /dev/console. Runs before the
/// logger exists, so it returns the errors for the caller to log later.
pub fn mount_filesystems() -> Vec<InitError> {
    MOUNTS.iter().filter_map(|m| mount_one(m).err()).collect()
}

/// Points fds 0, 1 and 2 at /dev/console. The kernel does this for init only when the initramfs
/// has a /dev/console node; with devtmpfs mounted it exists now.
pub fn console_stdio() -> Result<(), InitError> {
    let console = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
        .map_err(|source| InitError::Io {
            what: "open /dev/console".into(),
            source,
        })?;
    for fd in 0..=2 {
        // SAFETY: dup2 onto the standard descriptors; `console` stays open for the call.
        if unsafe { libc::dup2(console.as_raw_fd(), fd) } < 0 {
            return Err(InitError::Io {
                what: format!("dup2 /dev/console -> {fd}"),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// The usual /dev symlinks devtmpfs does not make.
fn dev_symlinks() -> Vec<InitError> {
    let links = [
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
        ("/proc/kcore", "/dev/core"),
    ];
    links
        .iter()
        .filter_map(|(to, from)| match std::os::unix::fs::symlink(to, from) {
            Ok(()) => None,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => None,
            Err(source) => Some(InitError::Io {
                what: format!("symlink {from} -> {to}"),
                source,
            }),
        })
        .collect()
}

/// Enables every available controller for the root cgroup's children. Controllers are enabled
/// one at a time so one refusal does not block the others. Returns the enabled controllers.
pub fn enable_cgroup_controllers(root: &Path) -> Result<Vec<String>, InitError> {
    let available =
        fs::read_to_string(root.join("cgroup.controllers")).map_err(|source| InitError::Io {
            what: "read cgroup.controllers".into(),
            source,
        })?;
    let mut enabled = Vec::new();
    for c in available.split_whitespace() {
        match fs::write(root.join("cgroup.subtree_control"), format!("+{c}")) {
            Ok(()) => enabled.push(c.to_string()),
            Err(e) => tracing::warn!("cannot enable cgroup controller {c}: {e}"),
        }
    }
    Ok(enabled)
}

/// `ifconfig lo up`.
pub fn loopback_up() -> Result<(), InitError> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|source| InitError::Sys {
        what: "socket(AF_INET)",
        source,
    })?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read/write `req`, which outlives the calls.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(InitError::Sys {
                what: "SIOCGIFFLAGS lo",
                source: Errno::last(),
            });
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(InitError::Sys {
                what: "SIOCSIFFLAGS lo",
                source: Errno::last(),
            });
        }
    }
    Ok(())
}

/// Everything after logging is up. Logs failures, never fails.
pub fn finish() {
    for e in dev_symlinks() {
        tracing::warn!("init: {e}");
    }
    match enable_cgroup_controllers(Path::new(CGROUP_ROOT)) {
        Ok(c) => tracing::debug!("cgroup controllers enabled: {}", c.join(" ")),
        Err(e) => tracing::warn!("init: {e}"),
    }
    if let Err(e) = loopback_up() {
        tracing::warn!("init: {e}");
    }
    // PATH for processes the agent starts; the kernel gives init almost no environment.
    if std::env::var_os("PATH").is_none() {
        std::env::set_var(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    // New files default to 0644/0755.
    nix::sys::stat::umask(Mode::from_bits_truncate(0o022));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_controllers_enabled_one_by_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("cgroup.controllers"), "cpu memory pids\n").expect("write");
        let enabled = enable_cgroup_controllers(dir.path()).expect("enable");
        assert_eq!(enabled, ["cpu", "memory", "pids"]);
        // A plain file keeps only the last write; the real file accumulates.
        assert_eq!(
            fs::read_to_string(dir.path().join("cgroup.subtree_control")).expect("read"),
            "+pids"
        );
    }

    #[test]
    fn mount_table_is_ordered() {
        // No mount point lies inside one that is mounted later (it would be hidden).
        for (i, earlier) in MOUNTS.iter().enumerate() {
            for later in &MOUNTS[i + 1..] {
                let inside = format!("{}/", later.target);
                assert!(
                    !earlier.target.starts_with(&inside),
                    "{} is mounted before its parent {}",
                    earlier.target,
                    later.target
                );
            }
        }
    }
}
