//! The jail capsa-vmm runs in (one per sandbox), set up between fork and exec of the VMM.
//!
//! [`Jail::prepare`] (in the runtime, before the spawn) allocates the sandbox's own uid/gid
//! ([`uid`]), lays out an empty root directory `<run root>/.jail/roots/<sandbox id>/` with one empty file
//! or directory per bind target, works out the VMM's loader and libraries ([`elf`]), checks that every file
//! the VMM opens is there and usable by the jail's uid (errors name the path), and builds everything the
//! child needs as C strings. [`Jail::pre_exec`] then runs in the forked child (raw syscalls only, no
//! allocation):
//!
//! 1. new mount, IPC, network and UTS namespaces (the VMM's taps are inherited fds and its Unix sockets are
//!    reached by path, so an empty network namespace costs it nothing); `/` made recursively private;
//! 2. the root bound onto itself, a small tmpfs on its `/dev` with private `kvm` (and `urandom`) nodes owned
//!    by the jail uid, read-only binds of the VMM binary, its libraries, the kernel, initrd and read-only
//!    disks, read-write binds of writable disks and of the sandbox directory (at its host path, so the
//!    sockets in it keep their names on both sides); the sandbox's `shared/` is covered by an empty tmpfs;
//! 3. `pivot_root` into it and the old root detached, `/` remounted read-only;
//! 4. rlimits (open files, file size, processes/threads, no core dumps), the capability bounding, ambient
//!    and inheritable sets cleared, `setgroups([])`, `setresgid`/`setresuid` to the jail ids (which empties
//!    the permitted and effective sets), `PR_SET_NO_NEW_PRIVS`, `SIGXFSZ` ignored, umask 077.
//!
//! No parent-death signal: a VMM outlives a crashed shim, as before, so that the shim's `delete` finds the
//! sandbox directory from the VMM's command line and cleans everything up (its uid stays taken meanwhile:
//! allocation skips uids that live processes run as).
//!
//! Every mount lives only in the VMM's own mount namespace and goes when the VMM exits, so nothing is left
//! in the host's mount table; dropping the [`Jail`] removes the root directory, gives writable disks back to
//! their owners and releases the uid. No PID namespace: see docs/security.md.

pub mod cgroup;
pub mod elf;
pub mod uid;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use cgroup::{CgroupPlacement, PodCgroup};
pub use uid::{UidLease, UidRange};

/// First uid (and gid) of the default jail range: above systemd's container range (524288–1879048191),
/// below 2^31 (tools that treat ids as signed), far from regular and system users.
pub const DEFAULT_UID_BASE: u32 = 1_900_000_000;
/// Size of the default range: at most this many sandboxes at once on a node.
pub const DEFAULT_UID_COUNT: u32 = 65536;
/// The jail's files under the run root: `roots/<sandbox id>/` and `uids/<uid>`.
pub const JAIL_DIR: &str = ".jail";
/// RLIMIT_NOFILE: the VMM's fixed fds (KVM, vCPUs, two eventfds per queue, epolls, taps: well under 200
/// for 8 vCPUs and a dozen devices) plus one per hybrid-vsock connection, which the guest and the shim
/// open; this bounds those to a few thousand.
pub const MAX_OPEN_FILES: u64 = 4096;
/// The console log may grow to this (RLIMIT_FSIZE, unless a writable disk or the guest memory is larger:
/// the VMM sizes its guest-memory memfd with ftruncate, which RLIMIT_FSIZE bounds too); beyond it writes
/// fail with EFBIG (SIGXFSZ is ignored). The VMM caps the console log itself (`--console-limit`).
pub const CONSOLE_LOG_MAX: u64 = 256 << 20;
/// RLIMIT_NPROC counts the threads of the jail uid, which only this VMM uses: its main thread, one per
/// vCPU and one per device worker, plus this many spare.
pub const SPARE_THREADS: u64 = 32;

/// Whether and how to jail the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailConfig {
    pub enabled: bool,
    pub uids: UidRange,
}

impl Default for JailConfig {
    fn default() -> Self {
        JailConfig {
            enabled: true,
            uids: UidRange {
                base: DEFAULT_UID_BASE,
                count: DEFAULT_UID_COUNT,
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail: {0}")]
    Config(String),
    #[error("jail: {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("jail: all {count} uids from {base} are in use (locks in {lock_dir})")]
    UidsExhausted {
        base: u32,
        count: u32,
        lock_dir: PathBuf,
    },
    #[error("bad cgroupsPath {path:?}: {reason}")]
    CgroupsPath { path: String, reason: String },
    #[error("jail: binary {path}: {reason}")]
    Binary { path: PathBuf, reason: String },
    #[error("jail: {path} cannot be used by the jailed VMM: {reason}")]
    NotAccessible { path: PathBuf, reason: String },
    #[error("jail: setting up the VMM's jail failed at `{step}`: {source}")]
    Setup {
        step: String,
        #[source]
        source: std::io::Error,
    },
}

/// A file the VMM opens by path: where it is on the host and where the VMM sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailFile {
    pub host: PathBuf,
    pub jail: PathBuf,
    pub writable: bool,
}

/// What the VMM needs in its jail.
#[derive(Debug, Clone)]
pub struct JailRequest<'a> {
    pub run_root: &'a Path,
    pub sandbox_id: &'a str,
    pub binary: &'a Path,
    /// Kernel, initrd, disks.
    pub files: Vec<JailFile>,
    /// The sandbox directory, bound read-write at its host path (sockets, console log).
    pub sandbox_dir: &'a Path,
    /// Subdirectories of `sandbox_dir` the VMM must not see (covered by an empty tmpfs).
    pub masked: Vec<PathBuf>,
    /// Host device nodes the VMM opens (`/dev/kvm`, `/dev/urandom`); missing ones are skipped.
    pub devices: Vec<PathBuf>,
    /// RLIMIT_NPROC (see [`SPARE_THREADS`]).
    pub max_threads: u64,
    /// Size of the guest memory, which the VMM backs with a memfd of that size: RLIMIT_FSIZE must allow it.
    pub guest_memory_bytes: u64,
}

/// One step of the child's setup, for the error report.
struct Op {
    kind: OpKind,
    what: String,
}

enum OpKind {
    Unshare,
    MakePrivate,
    Mount {
        src: Option<CString>,
        dst: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    Mknod {
        path: CString,
        rdev: libc::dev_t,
    },
    PivotRoot {
        root: CString,
    },
    Rlimit {
        resource: libc::__rlimit_resource_t,
        value: u64,
    },
    DropCaps,
    SetIds,
    NoNewPrivs,
}

/// Everything the child needs, built before the fork.
struct Plan {
    ops: Vec<Op>,
    uid: libc::uid_t,
    gid: libc::gid_t,
    /// Write end of the error pipe (close-on-exec): the index of a failed step goes here.
    err_fd: libc::c_int,
}

/// A prepared jail; see the module docs.
pub struct Jail {
    uid: u32,
    /// Released in Drop, after the root is gone.
    lease: Option<UidLease>,
    root: PathBuf,
    program: PathBuf,
    files: Vec<JailFile>,
    plan: Arc<Plan>,
    err_pipe: Option<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)>,
    /// Writable disks handed to the jail uid: (path, uid, gid) to restore.
    restore: Vec<(PathBuf, u32, u32)>,
}

impl std::fmt::Debug for Jail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jail")
            .field("uid", &self.uid)
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::NotAccessible {
        path: p.to_path_buf(),
        reason: "path contains a NUL byte".into(),
    })
}

/// `root` + an absolute `path`.
pub fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// The jail's directory for `run_root`.
pub fn jail_dir(run_root: &Path) -> PathBuf {
    run_root.join(JAIL_DIR)
}

/// Where a sandbox's jail root lives.
pub fn root_dir(run_root: &Path, sandbox_id: &str) -> PathBuf {
    jail_dir(run_root).join("roots").join(sandbox_id)
}

/// Where the uid locks live.
pub fn lock_dir(run_root: &Path) -> PathBuf {
    jail_dir(run_root).join("uids")
}

/// Removes `<run root>/.jail/{roots,uids}` and `.jail` when they are empty (another sandbox's entries keep
/// them; an allocator that loses the race recreates the directory).
pub fn prune_empty(run_root: &Path) {
    let jail = jail_dir(run_root);
    for d in [jail.join("roots"), jail.join("uids"), jail] {
        let _ = std::fs::remove_dir(d);
    }
}

/// Removes what a dead shim's sandbox left of its jail: the root directory and its uid lock (if no one
/// holds it). Returns what was removed, for the log.
pub fn cleanup_sandbox(run_root: &Path, sandbox_id: &str) -> Vec<String> {
    let mut done = Vec::new();
    let root = root_dir(run_root, sandbox_id);
    if root.exists() {
        match std::fs::remove_dir_all(&root) {
            Ok(()) => done.push(format!("jail root {}", root.display())),
            Err(e) => tracing::warn!(root = %root.display(), error = %e, "cannot remove jail root"),
        }
    }
    for uid in uid::sweep_stale(&lock_dir(run_root), Some(sandbox_id)) {
        done.push(format!("jail uid {uid}"));
    }
    prune_empty(run_root);
    done
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JailError + 'a {
    move |source| JailError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates an empty file (and its parents) in the jail root as a bind target.
fn touch(path: &Path) -> Result<(), JailError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io("cannot create", parent))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map(drop)
        .map_err(io("cannot create", path))
}

/// Whether `md` grants `bits` (a mask of the "other" class, e.g. 0o4 = read) to a uid that is neither the
/// owner nor in the group.
fn others_may(md: &std::fs::Metadata, bits: u32) -> bool {
    md.permissions().mode() & bits == bits
}

impl Jail {
    /// Allocates the uid and builds the jail root and the child's plan.
    pub fn prepare(req: &JailRequest<'_>, uids: UidRange) -> Result<Jail, JailError> {
        let in_use = uid::uids_in_use(uids);
        let lease = uid::allocate(&lock_dir(req.run_root), uids, &in_use, req.sandbox_id)?;
        let uid = lease.uid();
        let gid = uid;
        let root = root_dir(req.run_root, req.sandbox_id);
        let mut jail = Jail {
            uid,
            lease: Some(lease),
            root: root.clone(),
            program: PathBuf::new(),
            files: req.files.clone(),
            plan: Arc::new(Plan {
                ops: Vec::new(),
                uid,
                gid,
                err_fd: -1,
            }),
            err_pipe: None,
            restore: Vec::new(),
        };
        // From here on, dropping `jail` undoes everything done so far.
        if root.exists() {
            // A dead shim's leftover for the same id (it holds no mounts: those lived in its VMM's namespace).
            std::fs::remove_dir_all(&root).map_err(io("cannot remove stale jail root", &root))?;
        }
        std::fs::create_dir_all(&root).map_err(io("cannot create jail root", &root))?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))
            .map_err(io("cannot chmod", &root))?;
        let plan = jail.build(req)?;
        jail.plan = Arc::new(plan);
        Ok(jail)
    }

    fn build(&mut self, req: &JailRequest<'_>) -> Result<Plan, JailError> {
        let root = self.root.clone();
        let (uid, gid) = (self.uid, self.uid);
        let mut ops = vec![
            Op {
                kind: OpKind::Unshare,
                what: "unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWUTS)".into(),
            },
            Op {
                kind: OpKind::MakePrivate,
                what: "mount --make-rprivate /".into(),
            },
            Op {
                kind: OpKind::Mount {
                    src: Some(cstr(&root)?),
                    dst: cstr(&root)?,
                    fstype: None,
                    flags: libc::MS_BIND,
                    data: None,
                },
                what: format!("mount --bind {0} {0}", root.display()),
            },
        ];
        let bind = |ops: &mut Vec<Op>,
                    src: &Path,
                    dst: &Path,
                    remount: libc::c_ulong|
         -> Result<(), JailError> {
            ops.push(Op {
                kind: OpKind::Mount {
                    src: Some(cstr(src)?),
                    dst: cstr(dst)?,
                    fstype: None,
                    flags: libc::MS_BIND,
                    data: None,
                },
                what: format!("mount --bind {} {}", src.display(), dst.display()),
            });
            ops.push(Op {
                kind: OpKind::Mount {
                    src: None,
                    dst: cstr(dst)?,
                    fstype: None,
                    flags: libc::MS_REMOUNT | libc::MS_BIND | remount,
                    data: None,
                },
                what: format!("remount {} with flags {remount:#x}", dst.display()),
            });
            Ok(())
        };
        const RO: libc::c_ulong = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;

        // /dev: a tmpfs with private nodes owned by the jail uid.
        let dev = root.join("dev");
        std::fs::create_dir_all(&dev).map_err(io("cannot create", &dev))?;
        ops.push(Op {
            kind: OpKind::Mount {
                src: Some(CString::from(c"tmpfs")),
                dst: cstr(&dev)?,
                fstype: Some(CString::from(c"tmpfs")),
                flags: libc::MS_NOSUID | libc::MS_NOEXEC,
                data: Some(CString::from(c"mode=0755,size=64k,nr_inodes=16")),
            },
            what: format!("mount -t tmpfs tmpfs {}", dev.display()),
        });
        for d in &req.devices {
            let md = match std::fs::metadata(d) {
                Ok(md) => md,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("cannot stat device", d)(e)),
            };
            use std::os::unix::fs::FileTypeExt;
            if !md.file_type().is_char_device() {
                return Err(JailError::NotAccessible {
                    path: d.clone(),
                    reason: "not a character device".into(),
                });
            }
            let name = d.file_name().unwrap_or_default();
            let node = dev.join(name);
            ops.push(Op {
                kind: OpKind::Mknod {
                    path: cstr(&node)?,
                    rdev: md.rdev(),
                },
                what: format!("mknod {} (as {})", node.display(), d.display()),
            });
        }
        ops.push(Op {
            kind: OpKind::Mount {
                src: None,
                dst: cstr(&dev)?,
                fstype: None,
                flags: libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NOEXEC,
                data: None,
            },
            what: format!("remount {} read-only", dev.display()),
        });

        // The VMM binary and what its loader needs.
        let bin_md = std::fs::metadata(req.binary).map_err(io("VMM binary", req.binary))?;
        if !others_may(&bin_md, 0o5) {
            return Err(JailError::NotAccessible {
                path: req.binary.to_path_buf(),
                reason: format!(
                    "mode {:o} does not let other users read and execute it",
                    bin_md.permissions().mode() & 0o7777
                ),
            });
        }
        let name = req.binary.file_name().ok_or_else(|| JailError::Binary {
            path: req.binary.to_path_buf(),
            reason: "no file name".into(),
        })?;
        self.program = Path::new("/").join(name);
        let target = under(&root, &self.program);
        touch(&target)?;
        bind(
            &mut ops,
            req.binary,
            &target,
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        )?;
        for lib in elf::runtime_files(req.binary)? {
            let md = std::fs::metadata(&lib).map_err(io("library", &lib))?;
            if !others_may(&md, 0o4) {
                return Err(JailError::NotAccessible {
                    path: lib,
                    reason: "not readable by other users".into(),
                });
            }
            let target = under(&root, &lib);
            touch(&target)?;
            bind(
                &mut ops,
                &lib,
                &target,
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            )?;
        }

        // Kernel, initrd, disks.
        for f in &req.files {
            let md = std::fs::metadata(&f.host).map_err(io("cannot open", &f.host))?;
            if f.writable {
                if md.uid() != uid {
                    std::os::unix::fs::chown(&f.host, Some(uid), Some(gid))
                        .map_err(io("cannot hand the writable disk to the jail uid", &f.host))?;
                    self.restore.push((f.host.clone(), md.uid(), md.gid()));
                }
            } else if !others_may(&md, 0o4) {
                return Err(JailError::NotAccessible {
                    path: f.host.clone(),
                    reason: format!(
                        "mode {:o} does not let other users read it",
                        md.permissions().mode() & 0o7777
                    ),
                });
            }
            let target = under(&root, &f.jail);
            touch(&target)?;
            let flags = if f.writable {
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC
            } else {
                RO | libc::MS_NOEXEC
            };
            bind(&mut ops, &f.host, &target, flags)?;
        }

        // The sandbox directory: the VMM creates its vsock listener there and connects to the sockets of
        // virtiofsd and the shim. Group-writable for the jail gid, sticky so the VMM cannot remove or
        // rename what the runtime put there.
        let sd = req.sandbox_dir;
        std::os::unix::fs::chown(sd, Some(0), Some(gid))
            .map_err(io("cannot chown sandbox directory", sd))?;
        std::fs::set_permissions(sd, std::fs::Permissions::from_mode(0o1770))
            .map_err(io("cannot chmod sandbox directory", sd))?;
        let target = under(&root, sd);
        std::fs::create_dir_all(&target).map_err(io("cannot create", &target))?;
        bind(
            &mut ops,
            sd,
            &target,
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        )?;
        for m in &req.masked {
            let t = under(&root, m);
            ops.push(Op {
                kind: OpKind::Mount {
                    src: Some(CString::from(c"tmpfs")),
                    dst: cstr(&t)?,
                    fstype: Some(CString::from(c"tmpfs")),
                    flags: RO | libc::MS_NOEXEC,
                    data: Some(CString::from(c"size=4k,nr_inodes=1,mode=000")),
                },
                what: format!("mask {} with an empty tmpfs", t.display()),
            });
        }

        ops.push(Op {
            kind: OpKind::PivotRoot { root: cstr(&root)? },
            what: format!("pivot_root into {}", root.display()),
        });
        ops.push(Op {
            kind: OpKind::Mount {
                src: None,
                dst: CString::from(c"/"),
                fstype: None,
                flags: libc::MS_REMOUNT | libc::MS_BIND | RO | libc::MS_NOEXEC,
                data: None,
            },
            what: "remount / read-only".into(),
        });

        let fsize = req
            .files
            .iter()
            .filter(|f| f.writable)
            .filter_map(|f| std::fs::metadata(&f.host).ok().map(|m| m.len()))
            .fold(CONSOLE_LOG_MAX.max(req.guest_memory_bytes), u64::max);
        for (resource, value, name) in [
            (libc::RLIMIT_NOFILE, MAX_OPEN_FILES, "RLIMIT_NOFILE"),
            (libc::RLIMIT_FSIZE, fsize, "RLIMIT_FSIZE"),
            (libc::RLIMIT_NPROC, req.max_threads, "RLIMIT_NPROC"),
            (libc::RLIMIT_CORE, 0, "RLIMIT_CORE"),
        ] {
            ops.push(Op {
                kind: OpKind::Rlimit { resource, value },
                what: format!("setrlimit({name}, {value})"),
            });
        }
        ops.push(Op {
            kind: OpKind::DropCaps,
            what: "clear the capability bounding, ambient and inheritable sets".into(),
        });
        ops.push(Op {
            kind: OpKind::SetIds,
            what: format!("setgroups([]), setresgid({gid}), setresuid({uid})"),
        });
        ops.push(Op {
            kind: OpKind::NoNewPrivs,
            what: "prctl(PR_SET_NO_NEW_PRIVS)".into(),
        });

        let (r, w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| JailError::Io {
                what: "pipe",
                path: root.clone(),
                source: e.into(),
            })?;
        use std::os::fd::AsRawFd;
        let err_fd = w.as_raw_fd();
        self.err_pipe = Some((r, w));
        Ok(Plan {
            ops,
            uid,
            gid,
            err_fd,
        })
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }

    pub fn gid(&self) -> u32 {
        self.uid
    }

    /// The host directory that becomes the VMM's `/`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The VMM binary's path inside the jail (what to exec after `pivot_root`).
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// Where the VMM sees a host file given in the request's `files`; other paths are unchanged (the
    /// sandbox directory keeps its host path).
    pub fn jail_path(&self, host: &Path) -> PathBuf {
        self.files
            .iter()
            .find(|f| f.host == host)
            .map(|f| f.jail.clone())
            .unwrap_or_else(|| host.to_path_buf())
    }

    /// Lets the jailed VMM connect to a socket the runtime created in the sandbox directory.
    pub fn grant_socket(&self, path: &Path) -> Result<(), JailError> {
        std::os::unix::fs::chown(path, None, Some(self.gid()))
            .map_err(io("cannot chown socket", path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .map_err(io("cannot chmod socket", path))
    }

    /// The closure for `Command::pre_exec`. It only reads the prepared plan and makes syscalls.
    pub fn pre_exec(&self) -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
        let plan = self.plan.clone();
        move || {
            // SAFETY: runs in the forked child before exec; `enter` only makes async-signal-safe syscalls
            // on memory prepared before the fork (see its comments).
            unsafe { enter(&plan) }
        }
    }

    /// After a failed spawn: which setup step failed (read from the error pipe), as an error naming it.
    pub fn spawn_error(&mut self, source: std::io::Error) -> JailError {
        use std::io::Read as _;
        let step = self.err_pipe.take().and_then(|(r, w)| {
            drop(w);
            let mut f = std::fs::File::from(r);
            let mut b = [0u8; 4];
            f.read_exact(&mut b).ok().map(|_| u32::from_ne_bytes(b))
        });
        let step = match step.and_then(|i| self.plan.ops.get(i as usize)) {
            Some(op) => op.what.clone(),
            None => format!(
                "exec {} (host {}) inside the jail",
                self.program.display(),
                self.root
                    .join(self.program.strip_prefix("/").unwrap_or(&self.program))
                    .display()
            ),
        };
        JailError::Setup { step, source }
    }

    /// Closes the runtime's copy of the error pipe once the VMM was spawned.
    pub fn spawned(&mut self) {
        self.err_pipe = None;
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        for (path, uid, gid) in self.restore.drain(..) {
            if let Err(e) = std::os::unix::fs::chown(&path, Some(uid), Some(gid)) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot give a disk back to its owner");
                }
            }
        }
        match std::fs::remove_dir_all(&self.root) {
            Ok(()) => tracing::debug!(root = %self.root.display(), "jail root removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(root = %self.root.display(), error = %e, "cannot remove jail root")
            }
        }
        // The uid goes last, then the jail's directories if no other sandbox uses them.
        let lock = self.lease.take().map(|l| l.path().to_path_buf());
        if let Some(run_root) = lock
            .as_deref()
            .and_then(Path::parent)
            .and_then(Path::parent)
            .and_then(Path::parent)
        {
            prune_empty(run_root);
        }
    }
}

/// Reports step `i` on the error pipe and returns the current errno as an error.
///
/// # Safety
/// Only async-signal-safe calls; `plan.err_fd` is the pipe's write end or -1.
unsafe fn failed(plan: &Plan, i: usize) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    let b = (i as u32).to_ne_bytes();
    // SAFETY: write(2) from a valid 4-byte buffer; a bad fd only makes it fail.
    unsafe { libc::write(plan.err_fd, b.as_ptr().cast(), b.len()) };
    e
}

fn opt_ptr(c: &Option<CString>) -> *const libc::c_char {
    c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

/// The jail setup in the child. No allocation (io::Error from an errno does not allocate).
///
/// # Safety
/// Call only in a freshly forked child, before exec.
unsafe fn enter(plan: &Plan) -> std::io::Result<()> {
    for (i, op) in plan.ops.iter().enumerate() {
        // SAFETY (whole match): each arm is a raw syscall on C strings and structs prepared before the fork
        // or on the stack; none of them allocates, takes locks or is async-signal-unsafe.
        let ok = unsafe {
            match &op.kind {
                OpKind::Unshare => {
                    libc::unshare(
                        libc::CLONE_NEWNS
                            | libc::CLONE_NEWIPC
                            | libc::CLONE_NEWNET
                            | libc::CLONE_NEWUTS,
                    ) == 0
                }
                OpKind::MakePrivate => {
                    libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) == 0
                }
                OpKind::Mount {
                    src,
                    dst,
                    fstype,
                    flags,
                    data,
                } => {
                    libc::mount(
                        opt_ptr(src),
                        dst.as_ptr(),
                        opt_ptr(fstype),
                        *flags,
                        opt_ptr(data).cast(),
                    ) == 0
                }
                OpKind::Mknod { path, rdev } => {
                    libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o600, *rdev) == 0
                        && libc::chown(path.as_ptr(), plan.uid, plan.gid) == 0
                }
                OpKind::PivotRoot { root } => {
                    libc::chdir(root.as_ptr()) == 0
                        && libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) == 0
                        && libc::umount2(c".".as_ptr(), libc::MNT_DETACH) == 0
                        && libc::chdir(c"/".as_ptr()) == 0
                }
                OpKind::Rlimit { resource, value } => {
                    let l = libc::rlimit {
                        rlim_cur: *value,
                        rlim_max: *value,
                    };
                    libc::setrlimit(*resource, &l) == 0
                }
                OpKind::DropCaps => drop_caps(),
                OpKind::SetIds => {
                    libc::setgroups(0, std::ptr::null()) == 0
                        && libc::setresgid(plan.gid, plan.gid, plan.gid) == 0
                        && libc::setresuid(plan.uid, plan.uid, plan.uid) == 0
                }
                OpKind::NoNewPrivs => libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0,
            }
        };
        if !ok {
            // SAFETY: see `failed`.
            return Err(unsafe { failed(plan, i) });
        }
    }
    // SAFETY: signal(2) and umask(2) are async-signal-safe. With SIGXFSZ ignored, a write past
    // RLIMIT_FSIZE fails with EFBIG instead of killing the VMM.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        libc::umask(0o077);
    }
    Ok(())
}

/// Clears the bounding set (every capability up to the last one the kernel knows), the ambient set and the
/// inheritable set; the permitted and effective sets are emptied by the uid change that follows.
///
/// # Safety
/// Async-signal-safe syscalls only.
unsafe fn drop_caps() -> bool {
    // SAFETY: prctl/capget/capset with valid stack structs.
    unsafe {
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                && *libc::__errno_location() != libc::EINVAL
            {
                return false;
            }
        }
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ) != 0
        {
            return false;
        }
        #[repr(C)]
        struct Header {
            version: u32,
            pid: libc::c_int,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        let mut hdr = Header {
            version: VERSION_3,
            pid: 0,
        };
        let mut data = [Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(libc::SYS_capget, &mut hdr as *mut Header, data.as_mut_ptr()) != 0 {
            return false;
        }
        for d in &mut data {
            d.inheritable = 0;
        }
        libc::syscall(libc::SYS_capset, &mut hdr as *mut Header, data.as_ptr()) == 0
    }
}

#[cfg(test)]
mod tests;
