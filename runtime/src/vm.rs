//! The hypervisor side of a sandbox: one `capsa-vmm` process per VM.
//!
//! [`Vm::start`] creates the sandbox's directory (`<run root>/<sandbox id>/`, holding `vsock.sock` and
//! `console.log`), spawns the VMM and waits until the guest agent answers Check. [`Vm::stop`] asks the
//! agent to power the guest off and waits for the VMM, escalating to SIGTERM and SIGKILL. Dropping a
//! [`Vm`] kills the VMM. The directory is removed whenever the VM ends, on every path.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::agent_client::{AgentAddress, AgentClient, AgentError};
use crate::artifacts::Artifacts;
use crate::jail::{CgroupPlacement, Jail, JailConfig, JailError, JailFile, JailRequest, PodCgroup};
use crate::virtiofsd::{SharedFsConfig, Virtiofsd, VirtiofsdError};

/// Where sandbox directories live by default.
pub const DEFAULT_RUN_ROOT: &str = "/run/capsa";
/// The kernel command line every guest gets (the VMM appends its device list).
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";
/// The guest's vsock context id (each VM has its own hybrid-vsock socket, so one CID fits all).
pub const GUEST_CID: u32 = 3;
/// Longest Unix socket path (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// Room kept for the `_<port>` suffix the VMM adds for guest-initiated connections.
const SOCKET_SUFFIX_ROOM: usize = 6;
/// Lines of VMM stderr kept for error reports.
const STDERR_TAIL_LINES: usize = 40;
/// Bytes of the console log shown in error reports.
const CONSOLE_TAIL_BYTES: u64 = 3000;

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    pub readonly: bool,
}

/// A virtio-net device backed by an open tap the VMM inherits (`--net fd=N,...`).
///
/// The fd must be a tap opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (as
/// [`crate::network::PodNetwork`] makes them) and should be close-on-exec: [`Vm::start`] lets exactly
/// these fds through to the VMM, at the same numbers, and no other child inherits them. It is shared
/// (`Arc`) so [`VmConfig`] stays `Clone`; drop every copy once the VM started, so that the tap goes
/// away with the VMM.
#[derive(Debug, Clone)]
pub struct NetDevice {
    pub tap: Arc<OwnedFd>,
    /// The guest NIC's MAC (the pod veth's, so the agent finds the NIC by it); `None` = the VMM picks.
    pub mac: Option<[u8; 6]>,
    /// Offered to the guest with VIRTIO_NET_F_MTU; `None` = not offered.
    pub mtu: Option<u32>,
}

impl NetDevice {
    /// The value of the VMM's `--net` flag for this device: `fd=N[,mac=..][,mtu=N]`.
    pub fn vmm_arg(&self) -> String {
        net_arg(self.tap.as_raw_fd(), self.mac, self.mtu)
    }
}

/// `fd=N[,mac=aa:bb:cc:dd:ee:ff][,mtu=N]`.
pub fn net_arg(fd: RawFd, mac: Option<[u8; 6]>, mtu: Option<u32>) -> String {
    let mut s = format!("fd={fd}");
    if let Some(mac) = mac {
        s.push_str(",mac=");
        s.push_str(&crate::network::format_mac(&mac));
    }
    if let Some(mtu) = mtu {
        s.push_str(&format!(",mtu={mtu}"));
    }
    s
}

/// What to boot and how.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub vmm_binary: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Appended to [`BASE_CMDLINE`].
    pub extra_cmdline: Vec<String>,
    pub disks: Vec<Disk>,
    pub rng: bool,
    /// Share `<sandbox dir>/shared` with the guest over virtio-fs (virtiofsd); `None` = no shared dir.
    pub shared_fs: Option<SharedFsConfig>,
    /// virtio-net devices over inherited tap fds (eth0, eth1, ... in this order in the guest).
    pub net: Vec<NetDevice>,
    /// Parent of the per-sandbox directories.
    pub run_root: PathBuf,
    /// How long the agent has to answer its first Check.
    pub boot_timeout: Duration,
    /// How long the VMM has to exit after DestroySandbox (and again after SIGTERM).
    pub stop_timeout: Duration,
    /// The VMM's jail (own uid, no capabilities, own root and mount/IPC namespaces); on by default.
    pub jail: JailConfig,
    /// The cgroup the VMM and virtiofsd run in (the pod's; capsa's own `capsa/<id>` by default).
    pub cgroup: CgroupPlacement,
    /// The VMM's per-thread seccomp filters (`--seccomp`); on unless configured otherwise.
    pub seccomp: SeccompMode,
}

/// capsa-vmm's `--seccomp` modes. In capsa's configuration: `seccomp = true` (on), `false` (off) or
/// `"log"` (violations allowed and logged by the kernel, to find a syscall a filter misses).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SeccompMode {
    #[default]
    On,
    Off,
    Log,
}

impl SeccompMode {
    pub fn as_arg(self) -> &'static str {
        match self {
            SeccompMode::On => "on",
            SeccompMode::Off => "off",
            SeccompMode::Log => "log",
        }
    }
}

impl<'de> serde::Deserialize<'de> for SeccompMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Value {
            Bool(bool),
            Name(String),
        }
        match Value::deserialize(d)? {
            Value::Bool(true) => Ok(SeccompMode::On),
            Value::Bool(false) => Ok(SeccompMode::Off),
            Value::Name(n) => match n.as_str() {
                "on" => Ok(SeccompMode::On),
                "off" => Ok(SeccompMode::Off),
                "log" => Ok(SeccompMode::Log),
                _ => Err(serde::de::Error::custom(format!(
                    "seccomp = {n:?}: expected true, false, \"on\", \"off\" or \"log\""
                ))),
            },
        }
    }
}

/// Watches the VMM process without reaping it (waitid with WNOWAIT, so `Child::wait` still gets the
/// status), so a VMM that dies while the VM should be running is logged at once, with the cause.
#[derive(Debug, Clone)]
struct VmmExitWatch {
    /// Set once the runtime stops the VM itself: the exit is then expected.
    stopping: Arc<AtomicBool>,
    /// How the VMM ended, once it has.
    ended: Arc<Mutex<Option<String>>>,
}

impl VmmExitWatch {
    fn start(sandbox: &str, pid: u32) -> Self {
        let watch = Self {
            stopping: Arc::new(AtomicBool::new(false)),
            ended: Arc::new(Mutex::new(None)),
        };
        let Ok(raw) = i32::try_from(pid) else {
            return watch;
        };
        let (stopping, ended, sandbox) = (
            watch.stopping.clone(),
            watch.ended.clone(),
            sandbox.to_owned(),
        );
        tokio::task::spawn_blocking(move || {
            use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
            let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
            let status = loop {
                match waitid(Id::Pid(nix::unistd::Pid::from_raw(raw)), flags) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    // Already reaped (the VM was stopped and waited for): nothing to report here.
                    Err(_) => return,
                    Ok(s) => break s,
                }
            };
            let what = match status {
                WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGSYS, _) => {
                    "capsa-vmm killed by SIGSYS (a seccomp violation: a VMM thread made a syscall outside its filter)"
                        .to_string()
                }
                WaitStatus::Signaled(_, sig, _) => format!("capsa-vmm killed by {sig}"),
                WaitStatus::Exited(_, code) => format!("capsa-vmm exited with status {code}"),
                other => format!("capsa-vmm ended ({other:?})"),
            };
            if stopping.load(Ordering::Acquire) {
                tracing::debug!(%sandbox, "{what}");
            } else {
                tracing::error!(%sandbox, pid, "the VM died: {what}");
            }
            if let Ok(mut e) = ended.lock() {
                *e = Some(what);
            }
        });
        watch
    }
}

/// Logs the timeline's `kernel_entry` and `agent_started` steps once the VMM's `BOOT_TIMER` line (times
/// since its start, which is about `spawned`) has been read, waiting for it off the hot path.
fn log_boot_timer_steps(
    sandbox: &str,
    spawned: std::time::SystemTime,
    mut timer: watch::Receiver<Option<BootTimer>>,
) {
    let sandbox = sandbox.to_owned();
    tokio::spawn(async move {
        let t = match tokio::time::timeout(Duration::from_secs(2), timer.wait_for(|t| t.is_some()))
            .await
        {
            Ok(Ok(t)) => *t,
            _ => None,
        };
        if let Some(t) = t {
            let entry = crate::timeline::plus_us(spawned, t.start_to_kernel_entry_us);
            crate::timeline::step_at(&sandbox, "kernel_entry", entry);
            let agent = crate::timeline::plus_us(entry, t.kernel_entry_to_agent_us);
            crate::timeline::step_at(&sandbox, "agent_started", agent);
        }
    });
}

/// How the VMM process ended, in words; a seccomp violation is named as such.
pub fn describe_vmm_exit(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (_, Some(libc::SIGSYS)) => {
            "capsa-vmm killed by SIGSYS (a seccomp violation: a VMM thread made a syscall outside its filter)"
                .to_string()
        }
        (_, Some(sig)) => match nix::sys::signal::Signal::try_from(sig) {
            Ok(s) => format!("capsa-vmm killed by {s}"),
            Err(_) => format!("capsa-vmm killed by signal {sig}"),
        },
        (Some(_), _) => format!("capsa-vmm {status}"),
        (None, None) => format!("capsa-vmm ended ({status})"),
    }
}

impl VmConfig {
    /// Defaults: 1 vCPU, 128 MiB, no disks, rng on, `/run/capsa`, 30 s to boot, 10 s to stop.
    pub fn new(vmm_binary: PathBuf, kernel: PathBuf, initrd: Option<PathBuf>) -> Self {
        VmConfig {
            vmm_binary,
            kernel,
            initrd,
            vcpus: 1,
            memory_mib: 128,
            extra_cmdline: Vec::new(),
            disks: Vec::new(),
            rng: true,
            shared_fs: None,
            net: Vec::new(),
            run_root: PathBuf::from(DEFAULT_RUN_ROOT),
            boot_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(10),
            seccomp: SeccompMode::On,
            jail: JailConfig::default(),
            cgroup: CgroupPlacement::default(),
        }
    }

    /// The files the VMM opens by path and where the jail shows them: `/boot/kernel`, `/boot/initrd`,
    /// `/disks/<n>`. The sandbox directory's sockets and console log keep their host paths.
    pub fn jail_files(&self) -> Vec<JailFile> {
        let mut files = vec![JailFile {
            host: self.kernel.clone(),
            jail: PathBuf::from("/boot/kernel"),
            writable: false,
        }];
        if let Some(initrd) = &self.initrd {
            files.push(JailFile {
                host: initrd.clone(),
                jail: PathBuf::from("/boot/initrd"),
                writable: false,
            });
        }
        for (i, d) in self.disks.iter().enumerate() {
            files.push(JailFile {
                host: d.path.clone(),
                jail: PathBuf::from(format!("/disks/{i}")),
                writable: !d.readonly,
            });
        }
        files
    }

    /// This configuration with every path the VMM opens rewritten to where `jail` shows it.
    pub fn jailed(&self, jail: &Jail) -> VmConfig {
        let mut c = self.clone();
        c.vmm_binary = jail.program().to_path_buf();
        c.kernel = jail.jail_path(&self.kernel);
        c.initrd = self.initrd.as_deref().map(|i| jail.jail_path(i));
        for d in &mut c.disks {
            d.path = jail.jail_path(&d.path);
        }
        c
    }

    /// RLIMIT_NPROC for the jailed VMM: main thread, vCPUs, device workers, spare.
    pub fn max_vmm_threads(&self) -> u64 {
        1 + u64::from(self.vcpus)
            + self.disks.len() as u64
            + self.net.len() as u64
            + 4
            + crate::jail::SPARE_THREADS
    }

    pub fn from_artifacts(a: &Artifacts) -> Self {
        Self::new(a.vmm.clone(), a.kernel.clone(), Some(a.initrd.clone()))
    }

    /// The kernel command line given to the VMM.
    pub fn cmdline(&self) -> String {
        let mut s = String::from(BASE_CMDLINE);
        for extra in &self.extra_cmdline {
            s.push(' ');
            s.push_str(extra);
        }
        s
    }

    /// The VMM's arguments for a sandbox directory.
    pub fn vmm_args(&self, paths: &SandboxPaths) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--kernel".into(),
            self.kernel.clone().into(),
            "--cmdline".into(),
            self.cmdline().into(),
            "--vcpus".into(),
            self.vcpus.to_string().into(),
            "--memory-mib".into(),
            self.memory_mib.to_string().into(),
            "--vsock-cid".into(),
            GUEST_CID.to_string().into(),
            "--vsock-uds".into(),
            paths.vsock.clone().into(),
            "--console-log".into(),
            paths.console_log.clone().into(),
            "--seccomp".into(),
            self.seccomp.as_arg().into(),
        ];
        if let Some(initrd) = &self.initrd {
            args.push("--initrd".into());
            args.push(initrd.clone().into());
        }
        for d in &self.disks {
            args.push("--disk".into());
            let mut v: OsString = d.path.clone().into();
            if d.readonly {
                v.push(",readonly");
            }
            args.push(v);
        }
        if self.rng {
            args.push("--rng".into());
        }
        if let Some(fs) = &self.shared_fs {
            args.push("--fs".into());
            let mut v: OsString = format!("tag={},socket=", fs.tag).into();
            v.push(&paths.fs_socket);
            args.push(v);
        }
        for n in &self.net {
            args.push("--net".into());
            args.push(n.vmm_arg().into());
        }
        args
    }

    /// The fds the VMM must inherit (those of [`Self::net`]), checked to be >= 3 (0-2 are its stdio).
    fn inherited_fds(&self) -> Result<Vec<RawFd>, VmError> {
        self.net
            .iter()
            .map(|n| n.tap.as_raw_fd())
            .map(|fd| {
                if fd < 3 {
                    Err(VmError::NetFd {
                        fd,
                        reason: "fds 0-2 are the VMM's stdio",
                    })
                } else {
                    Ok(fd)
                }
            })
            .collect()
    }
}

/// The files of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPaths {
    pub dir: PathBuf,
    pub vsock: PathBuf,
    pub console_log: PathBuf,
    /// virtiofsd's vhost-user socket (only with a shared dir).
    pub fs_socket: PathBuf,
    /// The directory the guest sees over virtio-fs (only with a shared dir).
    pub shared_dir: PathBuf,
    /// virtiofsd's stderr.
    pub virtiofsd_log: PathBuf,
}

impl SandboxPaths {
    pub fn new(run_root: &Path, sandbox_id: &str) -> Self {
        let dir = run_root.join(sandbox_id);
        SandboxPaths {
            vsock: dir.join("vsock.sock"),
            console_log: dir.join("console.log"),
            fs_socket: dir.join("fs.sock"),
            shared_dir: dir.join("shared"),
            virtiofsd_log: dir.join("virtiofsd.log"),
            dir,
        }
    }
}

/// The `BOOT_TIMER` line the VMM prints when the guest agent starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BootTimer {
    /// VMM process start → first vCPU entering the kernel.
    pub start_to_kernel_entry_us: u64,
    /// Kernel entry → the agent's write to port 0x440.
    pub kernel_entry_to_agent_us: u64,
}

/// Parses `BOOT_TIMER start_to_kernel_entry_us=<A> kernel_entry_to_agent_us=<B>`.
pub fn parse_boot_timer(line: &str) -> Option<BootTimer> {
    let rest = line.trim().strip_prefix("BOOT_TIMER")?;
    let (mut a, mut b) = (None, None);
    for kv in rest.split_whitespace() {
        let (k, v) = kv.split_once('=')?;
        match k {
            "start_to_kernel_entry_us" => a = v.parse().ok(),
            "kernel_entry_to_agent_us" => b = v.parse().ok(),
            _ => {}
        }
    }
    Some(BootTimer {
        start_to_kernel_entry_us: a?,
        kernel_entry_to_agent_us: b?,
    })
}

/// Why a VM could not start or stop.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("invalid sandbox id {id:?}: {reason}")]
    InvalidId { id: String, reason: &'static str },
    #[error("socket path {path} is {len} bytes; at most {max} fit (use a shorter run root or sandbox id)")]
    SocketPathTooLong {
        path: PathBuf,
        len: usize,
        max: usize,
    },
    #[error("{what} {path} not found")]
    MissingFile { what: &'static str, path: PathBuf },
    #[error("sandbox directory {0} already exists (sandbox id in use?)")]
    AlreadyExists(PathBuf),
    #[error("cannot create sandbox directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {path} for the agent's ready notification: {source}")]
    ReadySocket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the VMM {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM exited during boot ({status})\n--- VMM stderr (tail) ---\n{stderr_tail}\n--- guest console (tail) ---\n{console_tail}")]
    VmmExited {
        status: String,
        stderr_tail: String,
        console_tail: String,
    },
    #[error("the guest agent did not come up: {source}\n--- VMM stderr (tail) ---\n{stderr_tail}\n--- guest console (tail) ---\n{console_tail}")]
    AgentNotReady {
        #[source]
        source: Box<AgentError>,
        stderr_tail: String,
        console_tail: String,
    },
    #[error("net device fd {fd}: {reason}")]
    NetFd { fd: RawFd, reason: &'static str },
    #[error("shared directory: {0}")]
    SharedFs(#[from] VirtiofsdError),
    #[error("waiting for the VMM failed: {0}")]
    Wait(#[source] std::io::Error),
    #[error(transparent)]
    Jail(#[from] JailError),
}

/// Validates a sandbox id: it becomes a directory name.
pub fn validate_sandbox_id(id: &str) -> Result<(), VmError> {
    let bad = |reason| {
        Err(VmError::InvalidId {
            id: id.to_owned(),
            reason,
        })
    };
    if id.is_empty() {
        return bad("empty");
    }
    if id.len() > 128 {
        return bad("longer than 128 bytes");
    }
    if id == "." || id == ".." || id.starts_with('.') {
        return bad("starts with '.'");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return bad("only ASCII letters, digits, '_', '-' and '.' are allowed");
    }
    Ok(())
}

/// Removes the sandbox directory when dropped.
#[derive(Debug)]
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.0) {
            Ok(()) => tracing::debug!(dir = %self.0.display(), "sandbox directory removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %self.0.display(), error = %e, "cannot remove sandbox directory")
            }
        }
    }
}

#[derive(Debug, Default)]
struct StderrLog {
    lines: VecDeque<String>,
}

impl StderrLog {
    fn tail(&self) -> String {
        self.lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

fn spawn_stderr_reader(
    stderr: ChildStderr,
    log: Arc<Mutex<StderrLog>>,
    boot_timer: watch::Sender<Option<BootTimer>>,
    id: String,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut reader = BufReader::new(stderr);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
            tracing::debug!(sandbox = %id, "vmm: {line}");
            if let Some(t) = parse_boot_timer(&line) {
                boot_timer.send_replace(Some(t));
            }
            if let Ok(mut log) = log.lock() {
                if log.lines.len() == STDERR_TAIL_LINES {
                    log.lines.pop_front();
                }
                log.lines.push_back(line);
            }
        }
    })
}

/// The last bytes of a file, lossily decoded; empty when it cannot be read.
pub fn file_tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::from("(no console log)");
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > max && f.seek(SeekFrom::Start(len - max)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return String::new();
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// How the VMM ended after [`Vm::stop`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopPath {
    /// The guest powered off after DestroySandbox.
    Clean,
    /// The VMM needed SIGTERM.
    Terminated,
    /// The VMM needed SIGKILL.
    Killed,
}

/// Result of [`Vm::stop`].
#[derive(Debug, Clone)]
pub struct VmExit {
    pub status: ExitStatus,
    pub path: StopPath,
    /// Error of the DestroySandbox call, if it failed (the VM was then stopped by signal).
    pub destroy_error: Option<String>,
}

/// A running VM with a ready agent.
#[derive(Debug)]
pub struct Vm {
    id: String,
    paths: SandboxPaths,
    child: Option<Child>,
    pid: u32,
    agent: AgentClient,
    stderr_log: Arc<Mutex<StderrLog>>,
    stderr_task: Option<JoinHandle<()>>,
    boot_timer: watch::Receiver<Option<BootTimer>>,
    ready_after: Duration,
    stop_timeout: Duration,
    /// The shared directory's backend; killed on drop (before the directory goes).
    virtiofsd: Option<Virtiofsd>,
    /// Kills the VMM if virtiofsd dies first (see [`crate::supervise`]); aborted when the VM stops.
    virtiofsd_watch: Option<JoinHandle<()>>,
    exit_watch: VmmExitWatch,
    /// The VMM's jail (root directory, uid); removed once the VMM is gone.
    jail: Option<Jail>,
    /// The pod cgroup capsa created for the VMM and virtiofsd; removed after them.
    cgroup: Option<PodCgroup>,
    // Last: removed after the VMM has been killed in Drop.
    _dir: DirGuard,
}

/// Creates (or finds) the cgroup the VMM and virtiofsd join.
fn pod_cgroup(placement: &CgroupPlacement, sandbox_id: &str) -> Result<Option<PodCgroup>, VmError> {
    let roots = crate::jail::cgroup::node_hierarchies();
    match placement {
        CgroupPlacement::Inherit => Ok(None),
        CgroupPlacement::SpecPath(p) => {
            let rel = crate::jail::cgroup::parse_cgroups_path(p)?;
            let cg = PodCgroup::create(&roots, &rel)?;
            tracing::info!(sandbox = sandbox_id, cgroups_path = %p, dirs = ?cg.dirs(), "VMM joins the pod's cgroup");
            Ok(Some(cg))
        }
        CgroupPlacement::Own => {
            // The shared parent stays (another sandbox may be creating its child in it).
            let parent = PodCgroup::create(&roots, Path::new("capsa")).map(PodCgroup::keep);
            match parent
                .and_then(|()| PodCgroup::create(&roots, &Path::new("capsa").join(sandbox_id)))
            {
                Ok(cg) => Ok(Some(cg)),
                Err(e) => {
                    tracing::warn!(sandbox = sandbox_id, error = %e, "the VMM stays in the caller's cgroup");
                    Ok(None)
                }
            }
        }
    }
}

/// C strings of the `cgroup.procs` files a child writes `0` into before exec.
pub(crate) fn procs_cstrings(cg: Option<&PodCgroup>) -> Vec<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    cg.map(|c| c.procs_files())
        .unwrap_or_default()
        .iter()
        .filter_map(|p| std::ffi::CString::new(p.as_os_str().as_bytes()).ok())
        .collect()
}

/// Moves the calling process into each cgroup (`0` = the writer). For pre_exec: async-signal-safe.
///
/// # Safety
/// Only open/write/close on prepared C strings.
pub(crate) unsafe fn join_cgroups(files: &[std::ffi::CString]) -> std::io::Result<()> {
    for f in files {
        // SAFETY: open/write/close are async-signal-safe; `f` is a valid C string.
        unsafe {
            let fd = libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            if !ok {
                return Err(e);
            }
        }
    }
    Ok(())
}

impl Vm {
    /// Starts a VM for `sandbox_id` and waits for its agent.
    pub async fn start(config: &VmConfig, sandbox_id: &str) -> Result<Vm, VmError> {
        validate_sandbox_id(sandbox_id)?;
        for (what, path) in [
            ("VMM binary", &config.vmm_binary),
            ("guest kernel", &config.kernel),
        ]
        .into_iter()
        .chain(config.initrd.as_ref().map(|p| ("guest initrd", p)))
        {
            if !path.exists() {
                return Err(VmError::MissingFile {
                    what,
                    path: path.clone(),
                });
            }
        }
        let inherit = config.inherited_fds()?;
        let paths = SandboxPaths::new(&config.run_root, sandbox_id);
        let len = paths.vsock.as_os_str().len();
        if len + SOCKET_SUFFIX_ROOM > MAX_SOCKET_PATH {
            return Err(VmError::SocketPathTooLong {
                path: paths.vsock,
                len,
                max: MAX_SOCKET_PATH - SOCKET_SUFFIX_ROOM,
            });
        }
        std::fs::create_dir_all(&config.run_root).map_err(|source| VmError::CreateDir {
            path: config.run_root.clone(),
            source,
        })?;
        {
            use std::os::unix::fs::DirBuilderExt;
            match std::fs::DirBuilder::new().mode(0o700).create(&paths.dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(VmError::AlreadyExists(paths.dir));
                }
                Err(source) => {
                    return Err(VmError::CreateDir {
                        path: paths.dir,
                        source,
                    })
                }
            }
        }
        let dir = DirGuard(paths.dir.clone());
        let cgroup = pod_cgroup(&config.cgroup, sandbox_id)?;
        let cgroup_procs = procs_cstrings(cgroup.as_ref());
        let mut jail = if config.jail.enabled {
            let mut devices = vec![PathBuf::from("/dev/kvm")];
            if config.rng {
                // virtio-rng reads the host's /dev/urandom (vmm/src/devices/virtio/rng.rs).
                devices.push(PathBuf::from("/dev/urandom"));
            }
            let masked = if config.shared_fs.is_some() {
                // Created here so the jail can cover it (virtiofsd finds it in place).
                std::fs::create_dir_all(&paths.shared_dir).map_err(|source| {
                    VmError::CreateDir {
                        path: paths.shared_dir.clone(),
                        source,
                    }
                })?;
                vec![paths.shared_dir.clone()]
            } else {
                Vec::new()
            };
            let req = JailRequest {
                run_root: &config.run_root,
                sandbox_id,
                binary: &config.vmm_binary,
                files: config.jail_files(),
                sandbox_dir: &paths.dir,
                masked,
                devices,
                max_threads: config.max_vmm_threads(),
                guest_memory_bytes: u64::from(config.memory_mib) << 20,
            };
            let jail = Jail::prepare(&req, config.jail.uids)?;
            tracing::info!(sandbox = sandbox_id, uid = jail.uid(), root = %jail.root().display(), "VMM jail prepared");
            crate::timeline::step(sandbox_id, "jail_ready");
            Some(jail)
        } else {
            tracing::warn!(
                sandbox = sandbox_id,
                "VMM JAIL DISABLED (hypervisor.jail = false / --no-jail): capsa-vmm runs as root with every \
                 capability and sees the host's whole file system; for debugging only"
            );
            None
        };
        let virtiofsd = match &config.shared_fs {
            Some(fs) => {
                let mut fs = fs.clone();
                fs.cgroup_procs = cgroup.as_ref().map(|c| c.procs_files()).unwrap_or_default();
                let v = Virtiofsd::spawn(
                    &fs,
                    &paths.fs_socket,
                    &paths.shared_dir,
                    &paths.virtiofsd_log,
                )
                .await?;
                if let Some(j) = &jail {
                    j.grant_socket(&paths.fs_socket)?;
                }
                crate::timeline::step(sandbox_id, "virtiofsd_ready");
                Some(v)
            }
            None => None,
        };

        // The agent connects to host port READY_NOTIFY_VSOCK_PORT once it listens; the VMM turns that into a
        // connection to `<vsock>_<port>`. Bound before the VMM starts, so the notification cannot be missed.
        let ready_path = PathBuf::from(format!(
            "{}_{}",
            paths.vsock.display(),
            capsa_proto::READY_NOTIFY_VSOCK_PORT
        ));
        let ready_listener =
            tokio::net::UnixListener::bind(&ready_path).map_err(|source| VmError::ReadySocket {
                path: ready_path.clone(),
                source,
            })?;
        if let Some(j) = &jail {
            j.grant_socket(&ready_path)?;
        }
        let (ready_tx, ready_rx) = tokio::sync::mpsc::channel(1);
        let ready_task = tokio::spawn(async move {
            while let Ok((conn, _)) = ready_listener.accept().await {
                drop(conn);
                if ready_tx.send(()).await.is_err() {
                    break;
                }
            }
        });

        let (program, args) = match &jail {
            Some(j) => (j.program().to_path_buf(), config.jailed(j).vmm_args(&paths)),
            None => (config.vmm_binary.clone(), config.vmm_args(&paths)),
        };
        tracing::info!(sandbox = sandbox_id, vmm = %config.vmm_binary.display(), jailed = jail.is_some(), ?args, "starting VM");
        let spawned_at = Instant::now();
        let mut cmd = Command::new(&program);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut enter_jail = jail.as_ref().map(|j| j.pre_exec());
        // SAFETY: the closure runs in the forked child before exec. It allocates nothing (`inherit`,
        // `cgroup_procs` and the jail's plan were built before the fork) and makes only async-signal-safe
        // syscalls: fcntl(2) clearing FD_CLOEXEC in the child's own fd table lets exactly the tap fds (all
        // >= 3, checked above) through exec at the numbers `args` names (the parent's copies stay
        // close-on-exec); open/write/close move the child into the pod's cgroup before it allocates
        // anything; the jail's closure documents its own calls.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &inherit {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                join_cgroups(&cgroup_procs)?;
                if let Some(enter) = enter_jail.as_mut() {
                    enter()?;
                }
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(source) => {
                ready_task.abort();
                return Err(match jail.as_mut() {
                    Some(j) => VmError::Jail(j.spawn_error(source)),
                    None => VmError::Spawn {
                        binary: config.vmm_binary.clone(),
                        source,
                    },
                });
            }
        };
        let spawned_wall = std::time::SystemTime::now();
        crate::timeline::step_at(sandbox_id, "vmm_spawned", spawned_wall);
        if let Some(j) = jail.as_mut() {
            j.spawned();
        }
        let pid = child.id().unwrap_or(0);
        match config.seccomp {
            SeccompMode::On => {}
            SeccompMode::Off => tracing::warn!(
                sandbox = sandbox_id,
                "seccomp is OFF (configuration): capsa-vmm runs without syscall filters; use only for debugging"
            ),
            SeccompMode::Log => tracing::warn!(
                sandbox = sandbox_id,
                "seccomp is in LOG mode (configuration): capsa-vmm's filters only log violations (dmesg, audit \
                 type=1326); the VMM is not confined"
            ),
        }
        let exit_watch = VmmExitWatch::start(sandbox_id, pid);
        let stderr_log = Arc::new(Mutex::new(StderrLog::default()));
        let (timer_tx, timer_rx) = watch::channel(None);
        let stderr_task = child
            .stderr
            .take()
            .map(|s| spawn_stderr_reader(s, stderr_log.clone(), timer_tx, sandbox_id.to_owned()));

        let addr = AgentAddress::hybrid(&paths.vsock);
        let outcome = tokio::select! {
            ready = AgentClient::wait_ready_notified(&addr, config.boot_timeout, ready_rx) => Ok(ready),
            status = child.wait() => Err(status),
        };
        // Later notifications (an agent restarting its server) mean nothing; the socket goes with the dir.
        ready_task.abort();
        let _ = std::fs::remove_file(&ready_path);
        let tails = |task: Option<JoinHandle<()>>| {
            let log = stderr_log.clone();
            let console = paths.console_log.clone();
            async move {
                if let Some(task) = task {
                    // The VMM is gone or being killed: stderr reaches EOF soon.
                    let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
                }
                let stderr_tail = log.lock().map(|l| l.tail()).unwrap_or_default();
                (stderr_tail, file_tail(&console, CONSOLE_TAIL_BYTES))
            }
        };
        match outcome {
            Ok(Ok(agent)) => {
                let ready_after = spawned_at.elapsed();
                tracing::info!(sandbox = sandbox_id, pid, ?ready_after, "VM ready");
                crate::timeline::step(sandbox_id, "agent_ready");
                log_boot_timer_steps(sandbox_id, spawned_wall, timer_rx.clone());
                // A dead virtiofsd would leave every file access of the guest blocked: stop the VM.
                let virtiofsd_watch = virtiofsd.as_ref().and_then(|v| v.pid()).and_then(|vpid| {
                    crate::supervise::stop_vm_when_helper_dies(sandbox_id, "virtiofsd", vpid, pid)
                        .map_err(|e| tracing::warn!(sandbox = sandbox_id, error = %e, "cannot supervise virtiofsd"))
                        .ok()
                });
                Ok(Vm {
                    id: sandbox_id.to_owned(),
                    paths,
                    child: Some(child),
                    pid,
                    agent,
                    stderr_log,
                    stderr_task,
                    boot_timer: timer_rx,
                    ready_after,
                    stop_timeout: config.stop_timeout,
                    virtiofsd,
                    virtiofsd_watch,
                    exit_watch,
                    jail,
                    cgroup,
                    _dir: dir,
                })
            }
            Ok(Err(source)) => {
                exit_watch.stopping.store(true, Ordering::Release);
                let _ = child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                let (stderr_tail, console_tail) = tails(stderr_task).await;
                Err(VmError::AgentNotReady {
                    source: Box::new(source),
                    stderr_tail,
                    console_tail,
                })
            }
            Err(status) => {
                let status = match status {
                    Ok(s) => describe_vmm_exit(&s),
                    Err(e) => format!("wait failed: {e}"),
                };
                let (stderr_tail, console_tail) = tails(stderr_task).await;
                Err(VmError::VmmExited {
                    status,
                    stderr_tail,
                    console_tail,
                })
            }
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The agent client (cloneable).
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How the VMM ended, if it has (e.g. "capsa-vmm killed by SIGSYS (a seccomp violation ...)").
    pub fn vmm_ended(&self) -> Option<String> {
        self.exit_watch.ended.lock().ok().and_then(|e| e.clone())
    }

    pub fn paths(&self) -> &SandboxPaths {
        &self.paths
    }

    /// The host directory the guest sees over virtio-fs (tag `config.shared_fs.tag`), if configured.
    pub fn shared_dir(&self) -> Option<&Path> {
        self.virtiofsd
            .as_ref()
            .map(|_| self.paths.shared_dir.as_path())
    }

    /// The jail's uid, `None` when the VMM runs unjailed.
    pub fn jail_uid(&self) -> Option<u32> {
        self.jail.as_ref().map(Jail::uid)
    }

    /// The cgroup directories the VMM and virtiofsd were placed in (empty = the caller's cgroup).
    pub fn cgroup_dirs(&self) -> &[PathBuf] {
        self.cgroup
            .as_ref()
            .map(PodCgroup::dirs)
            .unwrap_or_default()
    }

    /// VMM spawn → first Check answer.
    pub fn ready_after(&self) -> Duration {
        self.ready_after
    }

    /// The VMM's `BOOT_TIMER` line, waiting up to `wait` for it to be read from stderr.
    pub async fn boot_timer(&self, wait: Duration) -> Option<BootTimer> {
        let mut rx = self.boot_timer.clone();
        let r = tokio::time::timeout(wait, rx.wait_for(|t| t.is_some())).await;
        match r {
            Ok(Ok(t)) => *t,
            _ => *self.boot_timer.borrow(),
        }
    }

    /// The last lines the VMM wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        self.stderr_log.lock().map(|l| l.tail()).unwrap_or_default()
    }

    /// The end of the guest's console log.
    pub fn console_tail(&self) -> String {
        file_tail(&self.paths.console_log, CONSOLE_TAIL_BYTES)
    }

    /// Powers the guest off through the agent and waits for the VMM: SIGTERM after the stop timeout,
    /// SIGKILL after another. The sandbox directory is gone when this returns.
    pub async fn stop(mut self) -> Result<VmExit, VmError> {
        let Some(mut child) = self.child.take() else {
            return Err(VmError::Wait(std::io::Error::other("VMM already reaped")));
        };
        // virtiofsd ends after the VMM now, as it should.
        if let Some(w) = self.virtiofsd_watch.take() {
            w.abort();
        }
        if let Some(ended) = self.vmm_ended() {
            tracing::error!(sandbox = %self.id, "stopping a VM whose VMM is gone: {ended}");
        }
        self.exit_watch.stopping.store(true, Ordering::Release);
        let (destroy_error, hung) =
            match tokio::time::timeout(self.stop_timeout, self.agent.destroy_sandbox()).await {
                Ok(Ok(())) => (None, false),
                // The guest may go down before the reply is read: not an error if the VMM exits.
                Ok(Err(e)) => (Some(e.to_string()), e.is_timeout()),
                Err(_) => (
                    Some(format!(
                        "DestroySandbox timed out after {:?}",
                        self.stop_timeout
                    )),
                    true,
                ),
            };
        if let Some(e) = &destroy_error {
            tracing::debug!(sandbox = %self.id, error = %e, "DestroySandbox did not answer");
        }
        let mut path = StopPath::Clean;
        // A guest that did not answer at all will not power itself off, and a frozen VMM does not act on
        // SIGTERM: SIGKILL at once, so a stop is bounded by one stop_timeout.
        let wait_first = if hung && child.try_wait().ok().flatten().is_none() {
            Duration::ZERO
        } else {
            self.stop_timeout
        };
        let status = match tokio::time::timeout(wait_first, child.wait()).await {
            Ok(r) => r.map_err(VmError::Wait)?,
            Err(_) if hung => {
                tracing::warn!(sandbox = %self.id, "the agent did not answer DestroySandbox: SIGKILL");
                path = StopPath::Killed;
                child.kill().await.map_err(VmError::Wait)?;
                child.wait().await.map_err(VmError::Wait)?
            }
            Err(_) => {
                tracing::warn!(sandbox = %self.id, "VMM still running after DestroySandbox: SIGTERM");
                path = StopPath::Terminated;
                if let Ok(pid) = i32::try_from(self.pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
                match tokio::time::timeout(self.stop_timeout, child.wait()).await {
                    Ok(r) => r.map_err(VmError::Wait)?,
                    Err(_) => {
                        tracing::warn!(sandbox = %self.id, "VMM ignored SIGTERM: SIGKILL");
                        path = StopPath::Killed;
                        child.kill().await.map_err(VmError::Wait)?;
                        child.wait().await.map_err(VmError::Wait)?
                    }
                }
            }
        };
        if let Some(task) = self.stderr_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        if let Some(v) = self.virtiofsd.take() {
            // It exits by itself once the VMM is gone.
            v.stop(Duration::from_secs(2)).await;
        }
        let ended = describe_vmm_exit(&status);
        if status.code().is_none() && path == StopPath::Clean {
            tracing::error!(sandbox = %self.id, ?path, "VM stopped: {ended}");
        } else {
            tracing::info!(sandbox = %self.id, %status, ?path, "VM stopped: {ended}");
        }
        Ok(VmExit {
            status,
            path,
            destroy_error,
        })
        // `self` drops here: the directory goes.
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            self.exit_watch.stopping.store(true, Ordering::Release);
            tracing::debug!(sandbox = %self.id, pid = self.pid, "killing VMM");
            let _ = child.start_kill();
        }
        if let Some(task) = self.stderr_task.take() {
            task.abort();
        }
        if let Some(w) = self.virtiofsd_watch.take() {
            w.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_timer_line() {
        assert_eq!(
            parse_boot_timer(
                "BOOT_TIMER start_to_kernel_entry_us=1200 kernel_entry_to_agent_us=880000\n"
            ),
            Some(BootTimer {
                start_to_kernel_entry_us: 1200,
                kernel_entry_to_agent_us: 880000
            })
        );
        assert_eq!(
            parse_boot_timer("BOOT_TIMER start_to_kernel_entry_us=1"),
            None
        );
        assert_eq!(parse_boot_timer("something else"), None);
        assert_eq!(
            parse_boot_timer("BOOT_TIMER start_to_kernel_entry_us=x kernel_entry_to_agent_us=2"),
            None
        );
    }

    #[test]
    fn sandbox_ids() {
        assert!(validate_sandbox_id("abc-123_x.y").is_ok());
        assert!(validate_sandbox_id(&"f".repeat(64)).is_ok());
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "ü"] {
            assert!(validate_sandbox_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn vmm_command_line() {
        let mut c = VmConfig::new("/v".into(), "/k".into(), Some("/i".into()));
        c.vcpus = 2;
        c.memory_mib = 256;
        c.extra_cmdline = vec!["capsa.marker=1".into()];
        c.disks = vec![Disk {
            path: "/d.img".into(),
            readonly: true,
        }];
        let p = SandboxPaths::new(Path::new("/run/capsa"), "sb");
        let args: Vec<String> = c
            .vmm_args(&p)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("--vcpus 2 --memory-mib 256"), "{joined}");
        assert!(joined.contains("--vsock-cid 3 --vsock-uds /run/capsa/sb/vsock.sock"));
        assert!(joined.contains("--console-log /run/capsa/sb/console.log"));
        assert!(joined.contains("--initrd /i"));
        assert!(joined.contains("--disk /d.img,readonly"));
        assert!(joined.ends_with("--rng"));
        let i = args.iter().position(|a| a == "--cmdline").unwrap();
        assert_eq!(
            args[i + 1],
            "console=ttyS0 reboot=k panic=-1 quiet capsa.marker=1"
        );
    }

    #[test]
    fn vmm_command_line_with_shared_dir() {
        let mut c = VmConfig::new("/v".into(), "/k".into(), None);
        c.shared_fs = Some(SharedFsConfig::new("/usr/libexec/virtiofsd".into()));
        let p = SandboxPaths::new(Path::new("/run/capsa"), "sb");
        let args: Vec<String> = c
            .vmm_args(&p)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let i = args.iter().position(|a| a == "--fs").unwrap();
        assert_eq!(args[i + 1], "tag=capsa-shared,socket=/run/capsa/sb/fs.sock");
        assert_eq!(p.shared_dir, Path::new("/run/capsa/sb/shared"));
        c.shared_fs = None;
        assert!(!c.vmm_args(&p).iter().any(|a| a == "--fs"));
    }

    #[test]
    fn vmm_command_line_with_net_devices() {
        assert_eq!(net_arg(7, None, None), "fd=7");
        assert_eq!(
            net_arg(3, Some([0x0a, 0x58, 0, 0xff, 1, 2]), Some(1400)),
            "fd=3,mac=0a:58:00:ff:01:02,mtu=1400"
        );
        let mut c = VmConfig::new("/v".into(), "/k".into(), None);
        let open = || Arc::new(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()));
        c.net = vec![
            NetDevice {
                tap: open(),
                mac: Some([2, 0, 0, 0, 0, 1]),
                mtu: Some(1500),
            },
            NetDevice {
                tap: open(),
                mac: None,
                mtu: None,
            },
        ];
        let fds: Vec<RawFd> = c.net.iter().map(|n| n.tap.as_raw_fd()).collect();
        assert_eq!(c.inherited_fds().unwrap(), fds);
        let p = SandboxPaths::new(Path::new("/run/capsa"), "sb");
        let args: Vec<String> = c
            .vmm_args(&p)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let nets: Vec<&str> = args
            .windows(2)
            .filter(|w| w[0] == "--net")
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(
            nets,
            [
                format!("fd={},mac=02:00:00:00:00:01,mtu=1500", fds[0]),
                format!("fd={}", fds[1])
            ]
        );
    }

    #[test]
    fn jail_paths_of_kernel_initrd_and_disks() {
        let mut c = VmConfig::new(
            "/v/capsa-vmm".into(),
            "/k/vmlinux".into(),
            Some("/i.img".into()),
        );
        c.disks = vec![
            Disk {
                path: "/d/ro.img".into(),
                readonly: true,
            },
            Disk {
                path: "/d/rw.img".into(),
                readonly: false,
            },
        ];
        let files = c.jail_files();
        let map: Vec<(&str, &str, bool)> = files
            .iter()
            .map(|f| {
                (
                    f.host.to_str().unwrap(),
                    f.jail.to_str().unwrap(),
                    f.writable,
                )
            })
            .collect();
        assert_eq!(
            map,
            [
                ("/k/vmlinux", "/boot/kernel", false),
                ("/i.img", "/boot/initrd", false),
                ("/d/ro.img", "/disks/0", false),
                ("/d/rw.img", "/disks/1", true),
            ]
        );
        assert_eq!(
            c.max_vmm_threads(),
            1 + 1 + 2 + 4 + crate::jail::SPARE_THREADS
        );
    }

    #[test]
    fn jailed_vmm_command_line() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (the jail chowns)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"k").unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, b"d").unwrap();
        let mut c = VmConfig::new("/bin/sleep".into(), kernel.clone(), None);
        c.disks = vec![Disk {
            path: disk.clone(),
            readonly: true,
        }];
        c.run_root = dir.path().join("run");
        let p = SandboxPaths::new(&c.run_root, "sb");
        std::fs::create_dir_all(&p.dir).unwrap();
        let req = JailRequest {
            run_root: &c.run_root,
            sandbox_id: "sb",
            binary: &c.vmm_binary,
            files: c.jail_files(),
            sandbox_dir: &p.dir,
            masked: Vec::new(),
            devices: Vec::new(),
            max_threads: c.max_vmm_threads(),
            guest_memory_bytes: u64::from(c.memory_mib) << 20,
        };
        let jail = Jail::prepare(&req, c.jail.uids).unwrap();
        let jc = c.jailed(&jail);
        assert_eq!(jc.vmm_binary, Path::new("/sleep"));
        let args: Vec<String> = jc
            .vmm_args(&p)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("--kernel /boot/kernel "), "{joined}");
        assert!(joined.contains("--disk /disks/0,readonly"), "{joined}");
        // The sandbox directory keeps its host path inside the jail.
        assert!(
            joined.contains(&format!("--vsock-uds {}", p.vsock.display())),
            "{joined}"
        );
        assert!(!joined.contains(&kernel.display().to_string()), "{joined}");
    }

    fn fake_files(dir: &Path) -> VmConfig {
        use std::os::unix::fs::PermissionsExt;
        let vmm = dir.join("fake-vmm");
        // A VMM that fails at once, like capsa-vmm on a bad kernel.
        std::fs::write(
            &vmm,
            "#!/bin/sh\necho 'error: cannot load kernel: bad ELF' >&2\nexit 2\n",
        )
        .unwrap();
        std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.join("k"), b"not a kernel").unwrap();
        let mut c = VmConfig::new(vmm, dir.join("k"), None);
        c.run_root = dir.join("run");
        c.boot_timeout = Duration::from_secs(5);
        // Shell-script VMMs cannot run in a jail (no /bin/sh there); the jail has its own tests.
        c.jail.enabled = false;
        c.cgroup = CgroupPlacement::Inherit;
        c
    }

    #[tokio::test]
    async fn missing_kernel_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = fake_files(dir.path());
        c.kernel = dir.path().join("nope");
        let err = Vm::start(&c, "sb1").await.unwrap_err();
        assert!(
            matches!(
                err,
                VmError::MissingFile {
                    what: "guest kernel",
                    ..
                }
            ),
            "{err}"
        );
        assert!(!c.run_root.join("sb1").exists());
    }

    #[tokio::test]
    async fn early_vmm_exit_reports_stderr_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let c = fake_files(dir.path());
        let err = Vm::start(&c, "sb2").await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, VmError::VmmExited { .. }), "{msg}");
        assert!(msg.contains("cannot load kernel"), "{msg}");
        assert!(msg.contains("exit status: 2"), "{msg}");
        assert!(!c.run_root.join("sb2").exists());
    }

    #[tokio::test]
    async fn a_vmm_killed_by_sigsys_is_reported_as_a_seccomp_violation() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let c = fake_files(dir.path());
        // What the kernel does to capsa-vmm when a thread breaks its seccomp filter.
        std::fs::write(
            &c.vmm_binary,
            "#!/bin/sh\necho starting >&2\nkill -SYS $$\n",
        )
        .unwrap();
        std::fs::set_permissions(&c.vmm_binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = Vm::start(&c, "sb5").await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, VmError::VmmExited { .. }), "{msg}");
        assert!(
            msg.contains("capsa-vmm killed by SIGSYS (a seccomp violation"),
            "{msg}"
        );
        assert!(!c.run_root.join("sb5").exists());
    }

    #[tokio::test]
    async fn the_exit_watch_names_the_signal_without_reaping() {
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", "kill -SYS $$"])
            .spawn()
            .unwrap();
        let watch = VmmExitWatch::start("sb6", child.id().unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        let ended = loop {
            if let Some(e) = watch.ended.lock().unwrap().clone() {
                break e;
            }
            assert!(Instant::now() < deadline, "no exit seen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(ended.contains("SIGSYS (a seccomp violation"), "{ended}");
        // Not reaped by the watch: the owner still gets the status.
        let status = child.wait().await.unwrap();
        assert!(describe_vmm_exit(&status).contains("SIGSYS"), "{status}");
    }

    #[test]
    fn seccomp_setting_and_flag() {
        #[derive(serde::Deserialize)]
        struct T {
            seccomp: SeccompMode,
        }
        for (toml, mode) in [
            ("seccomp = true", SeccompMode::On),
            ("seccomp = false", SeccompMode::Off),
            ("seccomp = \"log\"", SeccompMode::Log),
            ("seccomp = \"on\"", SeccompMode::On),
        ] {
            assert_eq!(toml::from_str::<T>(toml).unwrap().seccomp, mode, "{toml}");
        }
        assert!(toml::from_str::<T>("seccomp = \"maybe\"").is_err());
        let dir = tempfile::tempdir().unwrap();
        let mut c = fake_files(dir.path());
        let paths = SandboxPaths::new(&c.run_root, "sb7");
        let args = c.vmm_args(&paths);
        let at = args
            .iter()
            .position(|a| a == "--seccomp")
            .expect("--seccomp");
        assert_eq!(args[at + 1], "on");
        c.seccomp = SeccompMode::Off;
        let args = c.vmm_args(&paths);
        assert_eq!(args[at + 1], "off");
    }

    #[tokio::test]
    async fn silent_vmm_times_out_and_is_killed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mut c = fake_files(dir.path());
        std::fs::write(
            &c.vmm_binary,
            "#!/bin/sh\necho booting >&2\nexec sleep 30\n",
        )
        .unwrap();
        std::fs::set_permissions(&c.vmm_binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        c.boot_timeout = Duration::from_millis(300);
        let err = Vm::start(&c, "sb3").await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, VmError::AgentNotReady { .. }), "{msg}");
        assert!(msg.contains("booting"), "{msg}");
        assert!(!c.run_root.join("sb3").exists());
    }

    #[tokio::test]
    async fn existing_dir_is_not_touched() {
        let dir = tempfile::tempdir().unwrap();
        let c = fake_files(dir.path());
        std::fs::create_dir_all(c.run_root.join("sb4")).unwrap();
        let err = Vm::start(&c, "sb4").await.unwrap_err();
        assert!(matches!(err, VmError::AlreadyExists(_)), "{err}");
        assert!(c.run_root.join("sb4").exists());
    }

    #[tokio::test]
    async fn long_socket_path_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = fake_files(dir.path());
        c.run_root = PathBuf::from(format!("/tmp/{}", "r".repeat(80)));
        let err = Vm::start(&c, &"s".repeat(20)).await.unwrap_err();
        assert!(matches!(err, VmError::SocketPathTooLong { .. }), "{err}");
    }
}
