//! Containers' files through the sandbox's virtio-fs share (`rootfs_mode = "virtio-fs"`).
//!
//! The VM boots with `<sandbox dir>/shared` shared over virtio-fs; the agent mounts it once per sandbox at
//! [`GUEST_SHARED_DIR`]. For every container (the first and later ones) the shim bind-mounts
//! `bundle/rootfs` (the snapshot containerd mounted) at `<shared>/<cid>/rootfs`, and the host sources of
//! the spec's bind mounts (CRI's /etc/hosts, /etc/resolv.conf, /etc/hostname, termination-log, volumes) at
//! `<shared>/<cid>/mounts/<n>`; the spec the agent gets names the guest paths. `/dev/shm` binds become
//! binds of the pod's guest tmpfs ([`GUEST_SHM_DIR`]); sources under /proc, /sys, /dev, and sockets or
//! devices are dropped (logged): they name the host kernel, not the guest's.
//!
//! The guest can write into the shared directory, so the host never follows a path it could have
//! planted: directories are created and opened with `mkdirat`/`openat(O_NOFOLLOW)` relative to
//! descriptors the shim holds, mounts go onto `/proc/self/fd/N`, unmounts go through a descriptor of the
//! mount itself, and removal is `unlinkat` on those descriptors (never recursive).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;
use serde_json::Value;

use super::sandbox::SandboxError;

/// Where the agent mounts the sandbox's virtio-fs share.
pub const GUEST_SHARED_DIR: &str = "/run/capsa/shared";
/// The pod's /dev/shm in the guest: a tmpfs storage mounted at CreateSandbox, bound into every container
/// whose spec binds a host /dev/shm (CRI's sandbox shm), so the pod's containers share it as on a node.
pub const GUEST_SHM_DIR: &str = "/run/capsa/pod-shm";

/// Bind sources under these name the host kernel: no meaning in the guest.
const HOST_ONLY: &[&str] = &["/proc", "/sys", "/dev"];

/// `<GUEST_SHARED_DIR>/<cid>`.
pub fn guest_container_dir(cid: &str) -> String {
    format!("{GUEST_SHARED_DIR}/{cid}")
}

/// The container's root file system as the guest sees it.
pub fn guest_shared_rootfs(cid: &str) -> String {
    format!("{}/rootfs", guest_container_dir(cid))
}

/// A container id becomes one path component.
pub fn check_container_id(cid: &str) -> Result<(), SandboxError> {
    if cid.is_empty()
        || cid == "."
        || cid == ".."
        || cid.contains('/')
        || cid.contains('\0')
        || cid.len() > 255
    {
        return Err(SandboxError::InvalidArgument(format!(
            "container id {cid:?} cannot name a directory"
        )));
    }
    Ok(())
}

/// A host path to bind into the guest at `<shared>/<cid>/mounts/<index>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    pub index: usize,
    pub source: PathBuf,
    /// A directory (else a regular file).
    pub dir: bool,
    /// The spec asks for a read-only mount: the host side of the share is made read-only too (not
    /// recursively, as runc does), so nothing in the guest, its kernel included, can write through it.
    pub readonly: bool,
    /// Set for a directory bound with mount propagation (`rshared`, `rslave`: Kubernetes' Bidirectional and
    /// HostToContainer): the key under [`POD_VOLUMES`] where the pod shares it once for all its containers,
    /// so their guest mounts meet as on a node.
    pub pod_volume: Option<String>,
}

/// Directory of the share holding the host paths containers bind with mount propagation, one entry per host
/// path for the whole pod (see [`PodVolumes`]).
pub const POD_VOLUMES: &str = "pod-volumes";

/// A stable directory name for a host path: FNV-1a (64 bits) of its bytes, in hex.
fn volume_key(src: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in src.as_os_str().as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The spec for the guest and what the host must share for it.
#[derive(Debug, Clone)]
pub struct SharedSpec {
    pub json: Vec<u8>,
    pub binds: Vec<HostBind>,
    /// `destination (source): why` of each bind mount left out.
    pub dropped: Vec<String>,
}

fn has_option(m: &Value, opt: &str) -> bool {
    m["options"]
        .as_array()
        .is_some_and(|o| o.iter().any(|x| x == opt))
}

/// Whether something is mounted below `dir` on the host (read from /proc/self/mountinfo).
fn has_submounts(dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|mp| PathBuf::from(mp.replace("\\040", " ")))
        .any(|mp| mp != dir && mp.starts_with(&dir))
}

fn is_bind(m: &Value) -> bool {
    m["type"].as_str() == Some("bind")
        || m["options"]
            .as_array()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

/// Whether a bind source can be shared: Ok(is a directory), or why not.
fn classify(src: &Path) -> Result<bool, String> {
    if !src.is_absolute() {
        return Err("relative source".into());
    }
    if HOST_ONLY.iter().any(|p| src.starts_with(p)) {
        return Err("a host kernel interface, meaningless in the VM".into());
    }
    let md = std::fs::metadata(src).map_err(|e| format!("not on the host: {e}"))?;
    if md.is_dir() {
        Ok(true)
    } else if md.is_file() {
        Ok(false)
    } else {
        Err("not a regular file or directory (socket, fifo or device)".into())
    }
}

/// Rewrites containerd's spec for a container whose files come through the share: the root becomes
/// [`guest_shared_rootfs`], host bind mounts point into `<guest dir>/mounts/<n>` (returned as
/// [`HostBind`]s to set up), `/dev/shm` binds point at [`GUEST_SHM_DIR`], host-only binds are dropped.
/// Namespaces stay as containerd wrote them: the agent maps CRI's `/proc/<pid>/ns/{ipc,uts}` paths to
/// the pod's namespaces in the guest, drops network (the VM is the pod's network) and gives fresh ones
/// for the rest.
pub fn shared_guest_spec(spec_json: &[u8], cid: &str) -> Result<SharedSpec, SandboxError> {
    check_container_id(cid)?;
    let mut spec: Value = serde_json::from_slice(spec_json)
        .map_err(|e| SandboxError::InvalidArgument(format!("config.json: {e}")))?;
    if !spec.is_object() {
        return Err(SandboxError::InvalidArgument(
            "config.json is not an object".into(),
        ));
    }
    let readonly = spec["root"]["readonly"].as_bool().unwrap_or(false);
    spec["root"] = serde_json::json!({"path": guest_shared_rootfs(cid), "readonly": readonly});
    // Host-network pods share the node's UTS namespace, which in a VM is the guest's: its hostname comes
    // from CreateSandbox, and libcontainer refuses a hostname without a private UTS namespace.
    let has_uts = spec["linux"]["namespaces"]
        .as_array()
        .is_some_and(|ns| ns.iter().any(|n| n["type"] == "uts"));
    if !has_uts {
        if let Some(obj) = spec.as_object_mut() {
            obj.remove("hostname");
        }
    }
    let mut binds = Vec::new();
    let mut dropped = Vec::new();
    if let Some(mounts) = spec.get_mut("mounts").and_then(|m| m.as_array_mut()) {
        let old = std::mem::take(mounts);
        for mut m in old {
            if !is_bind(&m) {
                mounts.push(m);
                continue;
            }
            let dest = m["destination"].as_str().unwrap_or_default().to_owned();
            let src = PathBuf::from(m["source"].as_str().unwrap_or_default());
            if Path::new(&dest) == Path::new("/dev/shm") {
                m["source"] = GUEST_SHM_DIR.into();
                mounts.push(m);
                continue;
            }
            match classify(&src) {
                Ok(dir) => {
                    let index = binds.len();
                    m["source"] = format!("{}/mounts/{index}", guest_container_dir(cid)).into();
                    let readonly = has_option(&m, "ro");
                    if readonly && dir && has_submounts(&src) {
                        // The guest sees the source and what is mounted below it as one virtio-fs tree, where
                        // `ro` would cover the submounts too; runc's `ro` is not recursive. The host side of
                        // the share is read-only at the top only, so the guest mount stays writable and
                        // writes to the top fail there (EROFS) while the submounts take them.
                        if let Some(opts) = m["options"].as_array_mut() {
                            opts.retain(|o| o != "ro");
                        }
                        tracing::info!(container = cid, destination = %dest, source = %src.display(),
                            "read-only bind with mounts below it: read-only on the host side only");
                    }
                    let propagated = dir && (has_option(&m, "rshared") || has_option(&m, "rslave"));
                    let pod_volume = propagated.then(|| {
                        // Read-only and writable uses of one path are two entries: the host enforces ro.
                        let key =
                            format!("{}{}", volume_key(&src), if readonly { "-ro" } else { "" });
                        m["source"] = format!("{GUEST_SHARED_DIR}/{POD_VOLUMES}/{key}").into();
                        key
                    });
                    binds.push(HostBind {
                        index,
                        source: src,
                        dir,
                        readonly,
                        pod_volume,
                    });
                    mounts.push(m);
                }
                Err(why) => {
                    tracing::warn!(container = cid, destination = %dest, source = %src.display(),
                        reason = %why, "dropping a bind mount the VM cannot have");
                    dropped.push(format!("{dest} ({}): {why}", src.display()));
                }
            }
        }
    }
    let json = serde_json::to_vec(&spec).map_err(|e| SandboxError::Internal(e.to_string()))?;
    Ok(SharedSpec {
        json,
        binds,
        dropped,
    })
}

fn io_err(what: String, e: nix::Error) -> SandboxError {
    SandboxError::Internal(format!("{what}: {e}"))
}

fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// The mount id of the file `fd` refers to (from /proc/self/fdinfo).
fn mnt_id(fd: &OwnedFd) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
}

fn open_at(dir: &OwnedFd, name: &str, flags: OFlag, mode: Mode) -> nix::Result<OwnedFd> {
    let fd = nix::fcntl::openat(Some(dir.as_raw_fd()), name, flags | OFlag::O_CLOEXEC, mode)?;
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates directory `name` in `dir` (it must not exist) and opens it without following symlinks.
fn mkdir_at(dir: &OwnedFd, name: &str) -> nix::Result<OwnedFd> {
    nix::sys::stat::mkdirat(Some(dir.as_raw_fd()), name, Mode::from_bits_truncate(0o755))?;
    open_at(
        dir,
        name,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
}

/// Binds `source` onto `target` (a /proc/self/fd path of entry `name` in `parent`) and returns a descriptor
/// of the new mount (looked up as `name` in `parent`, checked to be a different mount than its parent).
fn bind_at(
    source: &Path,
    target: &Path,
    parent: &OwnedFd,
    name: &str,
    dir: bool,
    readonly: bool,
    what: &str,
) -> Result<OwnedFd, SandboxError> {
    if readonly {
        bind_readonly(source, target)
            .map_err(|e| io_err(format!("read-only bind-mount {what}"), e))?;
    } else {
        nix::mount::mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| io_err(format!("bind-mount {what}"), e))?;
    }
    let mut flags = OFlag::O_PATH | OFlag::O_NOFOLLOW;
    if dir {
        flags |= OFlag::O_DIRECTORY;
    }
    let fd = match open_at(parent, name, flags, Mode::empty()) {
        Ok(fd) if mnt_id(&fd).is_some() && mnt_id(&fd) != mnt_id(parent) => fd,
        other => {
            // Someone replaced the entry between mount and open: take the mount off through the
            // target descriptor and give up.
            let _ = nix::mount::umount2(target, MntFlags::MNT_DETACH);
            return Err(SandboxError::Internal(format!(
                "bind-mount {what}: the mount point changed under us ({:?})",
                other.err()
            )));
        }
    };
    // The guest-facing copy only receives: nothing mounted under it propagates back to the host's
    // source (and mounts made on the host later still reach the guest, for HostToContainer).
    if let Err(e) = nix::mount::mount(
        None::<&str>,
        &fd_path(&fd),
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    ) {
        tracing::debug!(what, error = %e, "cannot make the bind mount a slave");
    }
    Ok(fd)
}

/// Binds `source` (with what is mounted below it) onto `target`, read-only at the top only, as runc's `ro`.
///
/// The flag is set on the detached copy before it is attached (open_tree, mount_setattr, move_mount): a
/// remount after attaching would change the host's copy only, since mount flag changes do not propagate, and
/// virtiofsd serves the share from its own mount namespace, a slave copy that gets the mount as attached.
fn bind_readonly(source: &Path, target: &Path) -> nix::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    // <linux/mount.h>
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
    // The target is a /proc/self/fd magic link, which mount(2) follows too.
    const MOVE_MOUNT_T_SYMLINKS: libc::c_uint = 0x10;
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    let cstr = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(|_| nix::Error::EINVAL);
    let (src, dst) = (cstr(source)?, cstr(target)?);
    let empty = c"";
    // SAFETY: open_tree(2) with a NUL-terminated path and flags only; it returns a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            OPEN_TREE_CLONE | AT_RECURSIVE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(nix::Error::last());
    }
    let fd = i32::try_from(fd).map_err(|_| nix::Error::EBADF)?;
    // SAFETY: open_tree returned this descriptor; nothing else owns it. Dropping it after the move is fine
    // (the tree is attached by then); before, it takes the detached copy away.
    let tree = unsafe { OwnedFd::from_raw_fd(fd) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: mount_setattr(2) on the detached tree's descriptor (AT_EMPTY_PATH, without AT_RECURSIVE: its top
    // mount only), with a properly sized mount_attr that lives across the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(nix::Error::last());
    }
    // SAFETY: move_mount(2) from the tree's descriptor (empty path) to a NUL-terminated target path.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_SYMLINKS,
        )
    };
    if r < 0 {
        return Err(nix::Error::last());
    }
    Ok(())
}

/// Something created under the container's directory, removed in reverse order.
#[derive(Debug)]
struct Created {
    /// Index into `ContainerShare::dirs` of the parent (`None` = the shared dir itself).
    parent: Option<usize>,
    name: String,
    dir: bool,
}

/// A live mount: a descriptor of the mount's root, so unmounting reaches exactly it.
#[derive(Debug)]
struct Mounted {
    fd: OwnedFd,
    what: String,
}

/// What one container has under the shared dir; everything is undone by [`ContainerShare::release`]
/// or when dropped.
#[derive(Debug)]
pub struct ContainerShare {
    cid: String,
    shared: Option<OwnedFd>,
    dirs: Vec<OwnedFd>,
    created: Vec<Created>,
    mounts: Vec<Mounted>,
    /// The pod volumes this container holds a reference on, and where they live.
    pod_volumes: Option<(PodVolumes, Vec<String>)>,
}

/// The pod's shared host paths (`<shared>/pod-volumes/<key>`), reference-counted by the containers that bind
/// them; a clone is a handle on the same set. The last container to go unmounts and removes the entry.
#[derive(Debug, Clone, Default)]
pub struct PodVolumes {
    inner: std::sync::Arc<std::sync::Mutex<PodVolumesInner>>,
}

#[derive(Debug, Default)]
struct PodVolumesInner {
    /// The `pod-volumes` directory, once created.
    dir: Option<OwnedFd>,
    entries: std::collections::HashMap<String, PodVolume>,
}

#[derive(Debug)]
struct PodVolume {
    refs: usize,
    /// The host path it binds (a key names one path only, checked on every acquire).
    source: PathBuf,
    mount: Mounted,
}

impl PodVolumes {
    fn lock(&self) -> std::sync::MutexGuard<'_, PodVolumesInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a reference on `key`, binding `source` there first when no container has it yet.
    fn acquire(
        &self,
        shared: &OwnedFd,
        key: &str,
        source: &Path,
        readonly: bool,
    ) -> Result<(), SandboxError> {
        let mut inner = self.lock();
        if let Some(v) = inner.entries.get_mut(key) {
            if v.source != source {
                return Err(SandboxError::Internal(format!(
                    "{POD_VOLUMES}/{key} already binds {} (asked for {})",
                    v.source.display(),
                    source.display()
                )));
            }
            v.refs += 1;
            return Ok(());
        }
        if inner.dir.is_none() {
            let fd = match mkdir_at(shared, POD_VOLUMES) {
                Ok(fd) => fd,
                Err(nix::Error::EEXIST) => open_at(
                    shared,
                    POD_VOLUMES,
                    OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
                    Mode::empty(),
                )
                .map_err(|e| io_err(format!("open {POD_VOLUMES} in the shared dir"), e))?,
                Err(e) => return Err(io_err(format!("create {POD_VOLUMES} in the shared dir"), e)),
            };
            inner.dir = Some(fd);
        }
        let Some(dir) = inner.dir.as_ref() else {
            return Err(SandboxError::Internal(format!("{POD_VOLUMES} missing")));
        };
        let target = match mkdir_at(dir, key) {
            Ok(fd) => fd,
            // Left by a container whose cleanup failed: use it if it is a plain directory.
            Err(nix::Error::EEXIST) => open_at(
                dir,
                key,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
                Mode::empty(),
            )
            .map_err(|e| io_err(format!("open {POD_VOLUMES}/{key}"), e))?,
            Err(e) => return Err(io_err(format!("create {POD_VOLUMES}/{key}"), e)),
        };
        let what = format!("{} on {POD_VOLUMES}/{key}", source.display());
        let mount = match bind_at(source, &fd_path(&target), dir, key, true, readonly, &what) {
            Ok(fd) => Mounted { fd, what },
            Err(e) => {
                let _ = nix::unistd::unlinkat(Some(dir.as_raw_fd()), key, UnlinkatFlags::RemoveDir);
                return Err(e);
            }
        };
        inner.entries.insert(
            key.to_owned(),
            PodVolume {
                refs: 1,
                source: source.to_path_buf(),
                mount,
            },
        );
        Ok(())
    }

    /// Drops a reference on `key`; the last one unmounts and removes the entry.
    fn release(&self, key: &str) -> Vec<String> {
        let mut inner = self.lock();
        let Some(v) = inner.entries.get_mut(key) else {
            return Vec::new();
        };
        v.refs -= 1;
        if v.refs > 0 {
            return Vec::new();
        }
        let mut errors = Vec::new();
        if let Some(v) = inner.entries.remove(key) {
            if let Err(e) = nix::mount::umount2(&fd_path(&v.mount.fd), MntFlags::MNT_DETACH) {
                if e != nix::Error::EINVAL {
                    errors.push(format!("unmount {}: {e}", v.mount.what));
                }
            }
        }
        if let Some(dir) = inner.dir.as_ref() {
            if let Err(e) =
                nix::unistd::unlinkat(Some(dir.as_raw_fd()), key, UnlinkatFlags::RemoveDir)
            {
                if e != nix::Error::ENOENT {
                    errors.push(format!("remove {POD_VOLUMES}/{key}: {e}"));
                }
            }
        }
        errors
    }

    /// How many host paths are shared now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ContainerShare {
    /// Bind-mounts `rootfs` at `<shared_dir>/<cid>/rootfs` and each bind's source at
    /// `<shared_dir>/<cid>/mounts/<n>`. On error everything done so far is undone.
    pub fn create(
        shared_dir: &Path,
        cid: &str,
        rootfs: &Path,
        binds: &[HostBind],
    ) -> Result<ContainerShare, SandboxError> {
        Self::create_in_pod(shared_dir, cid, rootfs, binds, &PodVolumes::default())
    }

    /// [`ContainerShare::create`], with the binds that name a pod volume taken from (or added to) `volumes`.
    pub fn create_in_pod(
        shared_dir: &Path,
        cid: &str,
        rootfs: &Path,
        binds: &[HostBind],
        volumes: &PodVolumes,
    ) -> Result<ContainerShare, SandboxError> {
        check_container_id(cid)?;
        let shared = nix::fcntl::open(
            shared_dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err(format!("open shared dir {}", shared_dir.display()), e))?;
        // SAFETY: open returned a new descriptor that nothing else owns.
        let shared = unsafe { OwnedFd::from_raw_fd(shared) };
        let mut share = ContainerShare {
            cid: cid.to_owned(),
            shared: Some(shared),
            dirs: Vec::new(),
            created: Vec::new(),
            mounts: Vec::new(),
            pod_volumes: Some((volumes.clone(), Vec::new())),
        };
        // On error `share` drops here and undoes what it did.
        share.build(rootfs, binds)?;
        Ok(share)
    }

    fn shared_fd(&self) -> Result<&OwnedFd, SandboxError> {
        self.shared
            .as_ref()
            .ok_or_else(|| SandboxError::Internal("container share already released".into()))
    }

    /// mkdirat `name` under `parent` (None = shared dir), recorded for removal; returns its index.
    fn make_dir(&mut self, parent: Option<usize>, name: &str) -> Result<usize, SandboxError> {
        let pfd = match parent {
            Some(i) => &self.dirs[i],
            None => self.shared_fd()?,
        };
        let fd = mkdir_at(pfd, name).map_err(|e| {
            if e == nix::Error::EEXIST {
                SandboxError::AlreadyExists(format!(
                    "container {}: {name} in the shared dir",
                    self.cid
                ))
            } else {
                io_err(format!("container {}: create {name}", self.cid), e)
            }
        })?;
        self.created.push(Created {
            parent,
            name: name.to_owned(),
            dir: true,
        });
        self.dirs.push(fd);
        Ok(self.dirs.len() - 1)
    }

    fn build(&mut self, rootfs: &Path, binds: &[HostBind]) -> Result<(), SandboxError> {
        let cid = self.cid.clone();
        let top = self.make_dir(None, &cid)?;
        let root_dir = self.make_dir(Some(top), "rootfs")?;
        let target = fd_path(&self.dirs[root_dir]);
        self.bind(rootfs, &target, top, "rootfs", true, false)?;
        if binds.is_empty() {
            return Ok(());
        }
        for b in binds {
            let Some(key) = &b.pod_volume else { continue };
            let (Some(shared), Some((volumes, held))) =
                (self.shared.as_ref(), self.pod_volumes.as_mut())
            else {
                return Err(SandboxError::Internal(
                    "container share already released".into(),
                ));
            };
            volumes.acquire(shared, key, &b.source, b.readonly)?;
            held.push(key.clone());
        }
        if binds.iter().all(|b| b.pod_volume.is_some()) {
            return Ok(());
        }
        let mounts = self.make_dir(Some(top), "mounts")?;
        for b in binds.iter().filter(|b| b.pod_volume.is_none()) {
            let name = b.index.to_string();
            if b.dir {
                let d = self.make_dir(Some(mounts), &name)?;
                let target = fd_path(&self.dirs[d]);
                self.bind(&b.source, &target, mounts, &name, true, b.readonly)?;
            } else {
                let f = open_at(
                    &self.dirs[mounts],
                    &name,
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW,
                    Mode::from_bits_truncate(0o644),
                )
                .map_err(|e| io_err(format!("container {cid}: create mounts/{name}"), e))?;
                self.created.push(Created {
                    parent: Some(mounts),
                    name: name.clone(),
                    dir: false,
                });
                self.bind(&b.source, &fd_path(&f), mounts, &name, false, b.readonly)?;
            }
        }
        Ok(())
    }

    /// Binds `source` onto `target` (a /proc/self/fd path), then keeps a descriptor of the new mount
    /// (looked up as `name` in `dirs[parent]`, checked to be a different mount than its parent).
    fn bind(
        &mut self,
        source: &Path,
        target: &Path,
        parent: usize,
        name: &str,
        dir: bool,
        readonly: bool,
    ) -> Result<(), SandboxError> {
        let what = format!("{} on {}/{name}", source.display(), self.cid);
        let fd = bind_at(
            source,
            target,
            &self.dirs[parent],
            name,
            dir,
            readonly,
            &what,
        )?;
        self.mounts.push(Mounted { fd, what });
        Ok(())
    }

    /// Unmounts and removes everything; returns what failed (also logged).
    pub fn release(mut self) -> Vec<String> {
        self.undo()
    }

    fn undo(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        if let Some((volumes, held)) = self.pod_volumes.take() {
            for key in held.iter().rev() {
                errors.extend(volumes.release(key));
            }
        }
        while let Some(m) = self.mounts.pop() {
            if let Err(e) = nix::mount::umount2(&fd_path(&m.fd), MntFlags::MNT_DETACH) {
                // EINVAL: no longer a mount (the shared dir went first, taking it along).
                if e != nix::Error::EINVAL {
                    errors.push(format!("unmount {}: {e}", m.what));
                }
            }
        }
        while let Some(c) = self.created.pop() {
            let pfd = match c.parent {
                Some(i) => self.dirs.get(i),
                None => self.shared.as_ref(),
            };
            let Some(pfd) = pfd else { continue };
            let flag = if c.dir {
                UnlinkatFlags::RemoveDir
            } else {
                UnlinkatFlags::NoRemoveDir
            };
            if let Err(e) = nix::unistd::unlinkat(Some(pfd.as_raw_fd()), c.name.as_str(), flag) {
                // A directory the guest wrote into is left (never removed recursively).
                if e != nix::Error::ENOENT {
                    errors.push(format!("remove {}/{}: {e}", self.cid, c.name));
                }
            }
        }
        self.dirs.clear();
        self.shared = None;
        for e in &errors {
            tracing::warn!(container = %self.cid, error = %e, "container share cleanup");
        }
        errors
    }
}

impl Drop for ContainerShare {
    fn drop(&mut self) {
        if !self.mounts.is_empty() || !self.created.is_empty() {
            self.undo();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cri_spec(dir: &Path) -> Value {
        std::fs::write(dir.join("hosts"), "127.0.0.1 localhost\n").unwrap();
        std::fs::write(dir.join("resolv.conf"), "nameserver 10.0.0.10\n").unwrap();
        std::fs::create_dir_all(dir.join("volume")).unwrap();
        json!({
            "root": {"path": "rootfs", "readonly": true},
            "hostname": "pod-a",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": dir.join("hosts"), "options": ["rbind", "rprivate", "rw"]},
                {"destination": "/etc/resolv.conf", "source": dir.join("resolv.conf"), "options": ["bind", "ro"]},
                {"destination": "/dev/shm", "type": "bind", "source": "/run/containerd/io.containerd.grpc.v1.cri/sandboxes/x/shm", "options": ["rbind"]},
                {"destination": "/data", "type": "bind", "source": dir.join("volume"), "options": ["rbind"]},
                {"destination": "/sys/fs/cgroup", "type": "bind", "source": "/sys/fs/cgroup", "options": ["rbind"]},
                {"destination": "/gone", "type": "bind", "source": dir.join("missing"), "options": ["rbind"]},
                {"destination": "/rel", "type": "bind", "source": "relative", "options": ["rbind"]}
            ],
            "process": {"args": ["sleep", "1"]},
            "linux": {"namespaces": [
                {"type": "pid"},
                {"type": "ipc", "path": "/proc/42/ns/ipc"},
                {"type": "uts", "path": "/proc/42/ns/uts"},
                {"type": "network", "path": "/proc/42/ns/net"}
            ]}
        })
    }

    #[test]
    fn spec_points_into_the_share() {
        let d = tempfile::tempdir().unwrap();
        let spec = cri_spec(d.path());
        let out = shared_guest_spec(spec.to_string().as_bytes(), "c1").unwrap();
        let v: Value = serde_json::from_slice(&out.json).unwrap();
        assert_eq!(v["root"]["path"], "/run/capsa/shared/c1/rootfs");
        assert_eq!(v["root"]["readonly"], true);
        let mounts: Vec<(String, String)> = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["destination"].as_str().unwrap().to_owned(),
                    m["source"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let expect = [
            ("/proc", "proc"),
            ("/etc/hosts", "/run/capsa/shared/c1/mounts/0"),
            ("/etc/resolv.conf", "/run/capsa/shared/c1/mounts/1"),
            ("/dev/shm", GUEST_SHM_DIR),
            ("/data", "/run/capsa/shared/c1/mounts/2"),
        ];
        let expect: Vec<(String, String)> = expect
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(mounts, expect);
        // Options are kept (the guest applies ro etc.).
        assert_eq!(v["mounts"][2]["options"], json!(["bind", "ro"]));
        assert_eq!(
            out.binds,
            vec![
                HostBind {
                    index: 0,
                    source: d.path().join("hosts"),
                    dir: false,
                    readonly: false,
                    pod_volume: None,
                },
                HostBind {
                    index: 1,
                    source: d.path().join("resolv.conf"),
                    dir: false,
                    readonly: true,
                    pod_volume: None,
                },
                HostBind {
                    index: 2,
                    source: d.path().join("volume"),
                    dir: true,
                    readonly: false,
                    pod_volume: None,
                },
            ]
        );
        let dropped = out.dropped.join("\n");
        assert_eq!(out.dropped.len(), 3, "{dropped}");
        assert!(dropped.contains("/sys/fs/cgroup"), "{dropped}");
        assert!(dropped.contains("/gone"), "{dropped}");
        assert!(dropped.contains("/rel"), "{dropped}");
        // Namespaces pass through unchanged (the agent maps them); a shared UTS keeps the hostname.
        assert_eq!(v["linux"], spec["linux"]);
        assert_eq!(v["hostname"], "pod-a");
        assert_eq!(v["process"], spec["process"]);
    }

    #[test]
    fn hostname_without_uts_namespace_and_bad_input() {
        let v = json!({"root": {"path": "rootfs"}, "hostname": "h", "linux": {"namespaces": [{"type": "pid"}]}});
        let out = shared_guest_spec(v.to_string().as_bytes(), "c").unwrap();
        let v: Value = serde_json::from_slice(&out.json).unwrap();
        assert!(v.get("hostname").is_none());
        assert_eq!(v["root"]["readonly"], false);
        assert!(matches!(
            shared_guest_spec(b"{", "c"),
            Err(SandboxError::InvalidArgument(_))
        ));
        assert!(matches!(
            shared_guest_spec(b"[1]", "c"),
            Err(SandboxError::InvalidArgument(_))
        ));
        for bad in ["", ".", "..", "a/b"] {
            assert!(
                matches!(
                    shared_guest_spec(b"{}", bad),
                    Err(SandboxError::InvalidArgument(_))
                ),
                "{bad:?}"
            );
        }
    }

    fn mounts_under(dir: &Path) -> usize {
        let dir = dir.canonicalize().unwrap();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| {
                l.split(' ')
                    .nth(4)
                    .is_some_and(|mp| Path::new(mp).starts_with(&dir))
            })
            .count()
    }

    #[test]
    fn share_binds_and_cleans_up() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: bind mounts need root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let shared = d.path().join("shared");
        let rootfs = d.path().join("bundle/rootfs");
        std::fs::create_dir_all(&shared).unwrap();
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::write(rootfs.join("bin/sh"), "shell").unwrap();
        let spec = cri_spec(d.path());
        let s = shared_guest_spec(spec.to_string().as_bytes(), "c1").unwrap();
        let before = mounts_under(d.path());

        let share = ContainerShare::create(&shared, "c1", &rootfs, &s.binds).unwrap();
        assert_eq!(mounts_under(d.path()), before + 4);
        let c = shared.join("c1");
        assert_eq!(
            std::fs::read_to_string(c.join("rootfs/bin/sh")).unwrap(),
            "shell"
        );
        assert_eq!(
            std::fs::read_to_string(c.join("mounts/0")).unwrap(),
            "127.0.0.1 localhost\n"
        );
        assert_eq!(
            std::fs::read_to_string(c.join("mounts/1")).unwrap(),
            "nameserver 10.0.0.10\n"
        );
        // Writes through the share reach the host sources (termination-log, volumes).
        std::fs::write(c.join("mounts/2/out"), "x").unwrap();
        assert!(d.path().join("volume/out").exists());
        std::fs::write(c.join("rootfs/new"), "y").unwrap();
        assert!(rootfs.join("new").exists());

        // A second container with the same id is refused and leaves the first intact.
        let e = ContainerShare::create(&shared, "c1", &rootfs, &[]).unwrap_err();
        assert!(matches!(e, SandboxError::AlreadyExists(_)), "{e}");
        assert_eq!(mounts_under(d.path()), before + 4);

        assert!(share.release().is_empty());
        assert_eq!(mounts_under(d.path()), before);
        assert!(!c.exists(), "container dir left behind");
        // The host's files are untouched.
        assert!(rootfs.join("bin/sh").exists() && d.path().join("hosts").exists());

        // A failing bind (missing source) undoes the rootfs mount and the directories.
        let bad = vec![HostBind {
            index: 0,
            source: d.path().join("nope"),
            dir: false,
            readonly: false,
            pod_volume: None,
        }];
        let e = ContainerShare::create(&shared, "c2", &rootfs, &bad).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        assert_eq!(mounts_under(d.path()), before);
        assert!(!shared.join("c2").exists());

        // Dropping without release cleans up too; a planted symlink is not followed.
        let share = ContainerShare::create(&shared, "c3", &rootfs, &s.binds).unwrap();
        drop(share);
        assert_eq!(mounts_under(d.path()), before);
        std::os::unix::fs::symlink(d.path().join("volume"), shared.join("c4")).unwrap();
        let e = ContainerShare::create(&shared, "c4", &rootfs, &[]).unwrap_err();
        assert!(matches!(e, SandboxError::AlreadyExists(_)), "{e}");
        assert_eq!(mounts_under(d.path()), before);
        assert_eq!(std::fs::read_dir(shared.join("c4")).unwrap().count(), 1);
        assert!(std::fs::read_dir(&shared)
            .unwrap()
            .all(|e| e.unwrap().file_name() == "c4"));
    }
    #[test]
    fn readonly_binds_are_readonly_on_the_host_side_not_recursively() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: bind mounts need root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let shared = d.path().join("shared");
        let rootfs = d.path().join("rootfs");
        let vol = d.path().join("vol");
        let plain = d.path().join("plain");
        for p in [&shared, &rootfs, &vol.join("sub"), &plain] {
            std::fs::create_dir_all(p).unwrap();
        }
        std::fs::write(d.path().join("file"), "f").unwrap();
        // A writable tmpfs below the read-only volume (Kubernetes: a volume inside a read-only hostPath).
        nix::mount::mount(
            Some("tmpfs"),
            &vol.join("sub"),
            Some("tmpfs"),
            MsFlags::empty(),
            Some("size=1m"),
        )
        .unwrap();
        let spec = json!({
            "root": {"path": "rootfs"},
            "mounts": [
                {"destination": "/vol", "type": "bind", "source": vol, "options": ["rbind", "ro"]},
                {"destination": "/plain", "type": "bind", "source": plain, "options": ["rbind", "ro"]},
                {"destination": "/file", "type": "bind", "source": d.path().join("file"), "options": ["bind", "ro"]}
            ]
        });
        let s = shared_guest_spec(spec.to_string().as_bytes(), "c").unwrap();
        let v: Value = serde_json::from_slice(&s.json).unwrap();
        // With a mount below it, the guest's bind is writable (the host enforces the top); without, ro stays.
        assert_eq!(v["mounts"][0]["options"], json!(["rbind"]));
        assert_eq!(v["mounts"][1]["options"], json!(["rbind", "ro"]));
        assert_eq!(v["mounts"][2]["options"], json!(["bind", "ro"]));
        assert!(s.binds.iter().all(|b| b.readonly));

        // virtiofsd serves the share from a slave copy of it in a mount namespace of its own: a mirror here.
        let mirror = d.path().join("mirror");
        std::fs::create_dir_all(&mirror).unwrap();
        let flags = |f| (None::<&str>, f, None::<&str>);
        nix::mount::mount(
            Some(&shared),
            &shared,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        let (a, f, b) = flags(MsFlags::MS_SHARED);
        nix::mount::mount(a, &shared, b, f, b).unwrap();
        nix::mount::mount(
            Some(&shared),
            &mirror,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        let (a, f, b) = flags(MsFlags::MS_SLAVE);
        nix::mount::mount(a, &mirror, b, f, b).unwrap();

        let share = ContainerShare::create(&shared, "c", &rootfs, &s.binds).unwrap();
        let m = shared.join("c/mounts");
        let erofs = |p: PathBuf| {
            let e = std::fs::write(&p, "x").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{}: {e}", p.display());
        };
        erofs(m.join("0/top"));
        erofs(m.join("1/top"));
        erofs(m.join("2"));
        std::fs::write(m.join("0/sub/below"), "ok").unwrap();
        assert_eq!(
            std::fs::read_to_string(vol.join("sub/below")).unwrap(),
            "ok"
        );
        assert!(!vol.join("top").exists() && !plain.join("top").exists());
        assert_eq!(std::fs::read_to_string(d.path().join("file")).unwrap(), "f");
        // The same through the slave copy: the mount arrived there read-only.
        let mm = mirror.join("c/mounts");
        erofs(mm.join("0/top"));
        erofs(mm.join("2"));
        std::fs::write(mm.join("0/sub/below2"), "ok").unwrap();
        // (virtiofsd's copy is in another mount namespace, where it does not keep the host from removing
        // the mount points; in this one it would.)
        nix::mount::umount2(&mirror, MntFlags::MNT_DETACH).unwrap();
        let errors = share.release();
        assert!(errors.is_empty(), "{errors:?}");
        for p in [&shared, &vol.join("sub")] {
            nix::mount::umount2(p, MntFlags::MNT_DETACH).unwrap();
        }
    }
    #[test]
    fn propagated_binds_are_shared_once_per_pod() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: bind mounts need root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let shared = d.path().join("shared");
        let rootfs = d.path().join("rootfs");
        let vol = d.path().join("vol");
        let other = d.path().join("other");
        for p in [&shared, &rootfs, &vol, &other] {
            std::fs::create_dir_all(p).unwrap();
        }
        let spec = |opt: &str| {
            json!({
                "root": {"path": "rootfs"},
                "mounts": [
                    {"destination": "/v", "type": "bind", "source": vol, "options": ["rbind", opt]},
                    {"destination": "/o", "type": "bind", "source": other, "options": ["rbind", "rprivate"]}
                ]
            })
            .to_string()
        };
        let a = shared_guest_spec(spec("rshared").as_bytes(), "a").unwrap();
        let b = shared_guest_spec(spec("rslave").as_bytes(), "b").unwrap();
        let va: Value = serde_json::from_slice(&a.json).unwrap();
        let vb: Value = serde_json::from_slice(&b.json).unwrap();
        // The same host path: the same guest directory for both containers, outside their own dirs.
        let key = a.binds[0].pod_volume.clone().unwrap();
        assert_eq!(b.binds[0].pod_volume.as_deref(), Some(key.as_str()));
        let guest = format!("{GUEST_SHARED_DIR}/{POD_VOLUMES}/{key}");
        assert_eq!(va["mounts"][0]["source"], guest.as_str());
        assert_eq!(vb["mounts"][0]["source"], guest.as_str());
        assert_eq!(va["mounts"][1]["source"], "/run/capsa/shared/a/mounts/1");
        assert_eq!(a.binds[1].pod_volume, None);

        let volumes = PodVolumes::default();
        let before = mounts_under(d.path());
        let sa = ContainerShare::create_in_pod(&shared, "a", &rootfs, &a.binds, &volumes).unwrap();
        let sb = ContainerShare::create_in_pod(&shared, "b", &rootfs, &b.binds, &volumes).unwrap();
        // rootfs twice, `other` twice, `vol` once.
        assert_eq!(mounts_under(d.path()), before + 5);
        assert_eq!(volumes.len(), 1);
        // A key names one host path: another path under the same key is refused, nothing else changes.
        let mut forged = b.binds.clone();
        forged[0].source = other.clone();
        let e =
            ContainerShare::create_in_pod(&shared, "f", &rootfs, &forged, &volumes).unwrap_err();
        assert!(e.to_string().contains("already binds"), "{e}");
        assert_eq!(mounts_under(d.path()), before + 5);
        assert!(!shared.join("f").exists());
        let host_side = shared.join(POD_VOLUMES).join(&key);
        std::fs::write(host_side.join("f"), "x").unwrap();
        assert!(vol.join("f").exists());
        assert!(sa.release().is_empty());
        assert_eq!(volumes.len(), 1, "b still binds it");
        assert!(host_side.join("f").exists());
        assert!(sb.release().is_empty());
        assert!(volumes.is_empty());
        assert!(!host_side.exists());
        assert_eq!(mounts_under(d.path()), before);
        // A failing pod volume (source gone) undoes the container's other mounts.
        let gone = json!({"root": {"path": "rootfs"}, "mounts": [
            {"destination": "/v", "type": "bind", "source": vol, "options": ["rbind", "rshared"]}]});
        let g = shared_guest_spec(gone.to_string().as_bytes(), "g").unwrap();
        std::fs::remove_dir_all(&vol).unwrap();
        assert!(ContainerShare::create_in_pod(&shared, "g", &rootfs, &g.binds, &volumes).is_err());
        assert!(volumes.is_empty());
        assert_eq!(mounts_under(d.path()), before);
        assert!(!shared.join("g").exists());
    }
}
