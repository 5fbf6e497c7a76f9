//! Storages: block devices, virtio-fs shares, tmpfs and plain guest directories that containers use
//! (rootfs, volumes). Mounted on first use, reference-counted by mount point, unmounted when the last
//! user is gone.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use capsa_proto::agent::{Storage, StorageDriver};
use nix::mount::{MntFlags, MsFlags};

use super::path::clean_absolute;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage mount point {0:?}: {1}")]
    MountPoint(String, String),
    #[error("storage {mount_point:?}: source {source_dev:?} did not appear within {secs} s")]
    NoDevice {
        mount_point: PathBuf,
        source_dev: String,
        secs: u64,
    },
    #[error("storage {0:?}: unknown or unspecified driver")]
    Driver(PathBuf),
    #[error("storage {mount_point:?}: mounting {source_dev:?} ({fstype}) failed: {err}")]
    Mount {
        mount_point: PathBuf,
        source_dev: String,
        fstype: String,
        err: String,
    },
    #[error("storage {mount_point:?} is already mounted with a different source ({have:?}, asked {asked:?})")]
    Conflict {
        mount_point: PathBuf,
        have: String,
        asked: String,
    },
    #[error("storage {0:?}: {1}")]
    Io(PathBuf, String),
}

struct Entry {
    source: String,
    refs: usize,
    mounted: bool,
}

#[derive(Default)]
pub struct Storages {
    entries: Mutex<HashMap<PathBuf, Entry>>,
}

const DEVICE_WAIT: Duration = Duration::from_secs(5);

/// mount(2) flags and data string from fstab-style options.
pub fn parse_options(opts: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in opts {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" | "defaults" => {}
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            other => data.push(other.to_string()),
        }
    }
    (flags, data.join(","))
}

/// The clean, absolute mount point a storage request names; `/` and anything under `/proc`, `/sys` or
/// `/dev` are refused. The first check [`Storages::acquire`] makes, with no side effect.
pub fn mount_point(s: &Storage) -> Result<PathBuf, StorageError> {
    let mp = clean_absolute(Path::new(&s.mount_point))
        .map_err(|e| StorageError::MountPoint(s.mount_point.clone(), e.to_string()))?;
    if mp == Path::new("/") {
        return Err(StorageError::MountPoint(
            s.mount_point.clone(),
            "cannot mount over /".into(),
        ));
    }
    for forbidden in ["/proc", "/sys", "/dev"] {
        if mp.starts_with(forbidden) {
            return Err(StorageError::MountPoint(
                s.mount_point.clone(),
                format!("cannot mount under {forbidden}"),
            ));
        }
    }
    Ok(mp)
}

impl Storages {
    /// Mounts `s` (or takes another reference if it is mounted) and returns its mount point.
    pub fn acquire(&self, s: &Storage) -> Result<PathBuf, StorageError> {
        let mp = mount_point(s)?;
        let driver = s
            .driver
            .enum_value()
            .unwrap_or(StorageDriver::STORAGE_DRIVER_UNSPECIFIED);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = entries.get_mut(&mp) {
            if e.source != s.source && driver != StorageDriver::STORAGE_DRIVER_LOCAL {
                return Err(StorageError::Conflict {
                    mount_point: mp,
                    have: e.source.clone(),
                    asked: s.source.clone(),
                });
            }
            e.refs += 1;
            return Ok(mp);
        }
        std::fs::create_dir_all(&mp).map_err(|e| StorageError::Io(mp.clone(), e.to_string()))?;
        let mounted = match driver {
            StorageDriver::STORAGE_DRIVER_LOCAL => {
                if s.fs_group != 0 {
                    let _ =
                        nix::unistd::chown(&mp, None, Some(nix::unistd::Gid::from_raw(s.fs_group)));
                }
                false
            }
            StorageDriver::STORAGE_DRIVER_BLK => {
                let dev = block_device_path(&s.source);
                wait_for(&dev).map_err(|_| StorageError::NoDevice {
                    mount_point: mp.clone(),
                    source_dev: s.source.clone(),
                    secs: DEVICE_WAIT.as_secs(),
                })?;
                let types: Vec<&str> = if s.fstype.is_empty() {
                    vec!["ext4", "erofs"]
                } else {
                    vec![s.fstype.as_str()]
                };
                let (flags, data) = parse_options(&s.options);
                let mut last = String::new();
                let mut ok = false;
                for t in &types {
                    match do_mount(Some(dev.as_path()), &mp, t, flags, &data) {
                        Ok(()) => {
                            ok = true;
                            break;
                        }
                        // erofs is read-only by nature: retry read-only on EROFS/EACCES.
                        Err(nix::errno::Errno::EROFS) | Err(nix::errno::Errno::EACCES)
                            if !flags.contains(MsFlags::MS_RDONLY) =>
                        {
                            match do_mount(
                                Some(dev.as_path()),
                                &mp,
                                t,
                                flags | MsFlags::MS_RDONLY,
                                &data,
                            ) {
                                Ok(()) => {
                                    ok = true;
                                    break;
                                }
                                Err(e) => last = e.to_string(),
                            }
                        }
                        Err(e) => last = e.to_string(),
                    }
                }
                if !ok {
                    return Err(StorageError::Mount {
                        mount_point: mp,
                        source_dev: s.source.clone(),
                        fstype: types.join("|"),
                        err: last,
                    });
                }
                true
            }
            StorageDriver::STORAGE_DRIVER_VIRTIO_FS | StorageDriver::STORAGE_DRIVER_TMPFS => {
                let (fstype, src) = if driver == StorageDriver::STORAGE_DRIVER_TMPFS {
                    ("tmpfs", "tmpfs".to_string())
                } else {
                    ("virtiofs", s.source.clone())
                };
                let (flags, data) = parse_options(&s.options);
                do_mount(Some(Path::new(&src)), &mp, fstype, flags, &data).map_err(|e| {
                    StorageError::Mount {
                        mount_point: mp.clone(),
                        source_dev: src.clone(),
                        fstype: fstype.into(),
                        err: e.to_string(),
                    }
                })?;
                true
            }
            StorageDriver::STORAGE_DRIVER_UNSPECIFIED => return Err(StorageError::Driver(mp)),
        };
        if mounted && s.fs_group != 0 {
            let _ = nix::unistd::chown(&mp, None, Some(nix::unistd::Gid::from_raw(s.fs_group)));
        }
        tracing::info!(mount_point = %mp.display(), source = %s.source, "storage mounted");
        entries.insert(
            mp.clone(),
            Entry {
                source: s.source.clone(),
                refs: 1,
                mounted,
            },
        );
        Ok(mp)
    }

    /// Drops one reference; unmounts when it was the last.
    pub fn release(&self, mp: &Path) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let Some(e) = entries.get_mut(mp) else {
            return;
        };
        e.refs -= 1;
        if e.refs > 0 {
            return;
        }
        let mounted = e.mounted;
        entries.remove(mp);
        if mounted {
            if let Err(err) = nix::mount::umount2(mp, MntFlags::MNT_DETACH) {
                tracing::warn!(mount_point = %mp.display(), "unmount failed: {err}");
            } else {
                tracing::info!(mount_point = %mp.display(), "storage unmounted");
            }
        }
    }

    /// References held on `mp` (0 = not tracked).
    pub fn refs(&self, mp: &Path) -> usize {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.get(mp).map(|e| e.refs).unwrap_or(0)
    }
}

/// Where sources of binds with mount propagation may be (the host's share, `/run/capsa/shared`, is below).
pub const PROPAGATED_SOURCES: &str = "/run/capsa";

/// Whether `dir` is a mount point in the agent's mount namespace.
fn is_mount_point(dir: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| Path::new(&mp.replace("\\040", " ")) == dir)
}

/// Makes `dir` a shared mount in the agent's mount namespace (bound onto itself first when it is not a mount
/// point), so a container binding it with `rshared` or `rslave` propagation gets a peer or a slave of it: a
/// mount one container makes below a Bidirectional path is then seen by the pod's other containers that bind
/// the same path (containerd checks the same of the host path on a node). Idempotent.
pub fn ensure_shared_mount(dir: &Path) -> Result<(), StorageError> {
    let err = |what: &str, e: &dyn std::fmt::Display| {
        StorageError::Io(dir.to_path_buf(), format!("{what}: {e}"))
    };
    // Resolving the path mounts an announced virtio-fs submount there, if it is one.
    let dir = dir.canonicalize().map_err(|e| err("resolving it", &e))?;
    // The host puts these sources in the sandbox's share: nothing else of the guest's mount table (its root
    // above all) is changed for a spec, however it names its sources.
    if !dir.starts_with(PROPAGATED_SOURCES) || dir == Path::new(PROPAGATED_SOURCES) {
        return Err(err(
            "refused",
            &format!("a source with mount propagation must be below {PROPAGATED_SOURCES}"),
        ));
    }
    if !is_mount_point(&dir) {
        nix::mount::mount(
            Some(&dir),
            &dir,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| err("binding it onto itself", &e))?;
    }
    nix::mount::mount(
        None::<&str>,
        &dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(|e| err("making it a shared mount", &e))
}

/// `/dev/vdb`, `vdb` → `/dev/vdb`.
fn block_device_path(source: &str) -> PathBuf {
    if source.starts_with('/') {
        PathBuf::from(source)
    } else {
        Path::new("/dev").join(source)
    }
}

fn wait_for(p: &Path) -> Result<(), ()> {
    let deadline = Instant::now() + DEVICE_WAIT;
    while Instant::now() < deadline {
        if p.exists() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(())
}

fn do_mount(
    src: Option<&Path>,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: &str,
) -> Result<(), nix::errno::Errno> {
    let data = if data.is_empty() { None } else { Some(data) };
    nix::mount::mount(src, target, Some(fstype), flags, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(mp: &Path) -> Storage {
        let mut s = Storage::new();
        s.driver = StorageDriver::STORAGE_DRIVER_LOCAL.into();
        s.mount_point = mp.to_string_lossy().into_owned();
        s
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let (f, d) = parse_options(&[
            "ro".into(),
            "nodev".into(),
            "size=64m".into(),
            "mode=755".into(),
        ]);
        assert!(f.contains(MsFlags::MS_RDONLY | MsFlags::MS_NODEV));
        assert_eq!(d, "size=64m,mode=755");
    }

    #[test]
    fn local_storage_is_refcounted() {
        let d = tempfile::tempdir().unwrap();
        let mp = d.path().join("vol");
        let st = Storages::default();
        assert_eq!(st.acquire(&local(&mp)).unwrap(), mp);
        assert!(mp.is_dir());
        st.acquire(&local(&mp)).unwrap();
        assert_eq!(st.refs(&mp), 2);
        st.release(&mp);
        assert_eq!(st.refs(&mp), 1);
        st.release(&mp);
        assert_eq!(st.refs(&mp), 0);
    }

    #[test]
    fn bad_mount_points_and_drivers_are_named() {
        let st = Storages::default();
        let err = st.acquire(&local(Path::new("relative"))).unwrap_err();
        assert!(err.to_string().contains("relative"), "{err}");
        let err = st.acquire(&local(Path::new("/a/../../b"))).unwrap_err();
        assert!(err.to_string().contains(".."), "{err}");
        assert!(st.acquire(&local(Path::new("/"))).is_err());
        assert!(st.acquire(&local(Path::new("/proc/x"))).is_err());
        let d = tempfile::tempdir().unwrap();
        let mut s = local(&d.path().join("x"));
        s.driver = StorageDriver::STORAGE_DRIVER_UNSPECIFIED.into();
        assert!(matches!(st.acquire(&s), Err(StorageError::Driver(_))));
    }
    #[test]
    fn propagation_sources_outside_run_capsa_are_refused() {
        // Refused before anything is mounted, root or not.
        for bad in ["/", "/tmp", "/run/../etc"] {
            let e = ensure_shared_mount(Path::new(bad)).unwrap_err().to_string();
            assert!(e.contains("must be below /run/capsa"), "{bad}: {e}");
        }
    }
}
