//! The sandboxes on this node as an operator sees them (`capsa list`, `capsa inspect`, `capsa metrics`):
//! found from the state directory (one directory per sandbox) and `/proc` (the `capsa-vmm` serving each
//! one, matched by its `--vsock-uds <dir>/vsock.sock`), never from a daemon, so it works whichever front end
//! started them and after a shim died.
//!
//! Everything read here may have been written or shaped by a hostile guest's VMM (its command line, the
//! files in its sandbox directory): it is only displayed, every read is bounded, and nothing found here is
//! followed, executed or signalled.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::vm::{validate_sandbox_id, SandboxPaths};

/// The file in a sandbox directory that names the pod (written by the runtime at boot).
pub const POD_FILE: &str = "pod.json";
/// Longest `pod.json` read back.
const MAX_POD_FILE: u64 = 16 * 1024;
/// Longest `/proc` file read (a command line, a status).
const MAX_PROC_FILE: u64 = 64 * 1024;

/// CRI's names for a pod, as containerd annotates its sandbox.
pub const CRI_SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
pub const CRI_SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
pub const CRI_SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";

#[derive(Debug, thiserror::Error)]
pub enum SandboxesError {
    #[error("cannot read the state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no sandbox {id:?} under {state_dir}")]
    NotFound { id: String, state_dir: PathBuf },
    #[error("sandbox id {0:?} is not valid")]
    BadId(String),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Who a sandbox is for, when the front end knows (a CRI pod's name, namespace and uid).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodIdentity {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
}

impl PodIdentity {
    /// From a sandbox spec's annotations; `None` when it carries no pod name.
    pub fn from_annotations(
        annotations: &std::collections::HashMap<String, String>,
    ) -> Option<Self> {
        let get = |k: &str| annotations.get(k).cloned().unwrap_or_default();
        let id = PodIdentity {
            name: get(CRI_SANDBOX_NAME),
            namespace: get(CRI_SANDBOX_NAMESPACE),
            uid: get(CRI_SANDBOX_UID),
        };
        (!id.name.is_empty()).then_some(id)
    }

    /// Creates `<dir>/pod.json`. The sandbox directory is writable by the jailed VMM, so nothing already
    /// there is trusted: the file must not exist (O_CREAT|O_EXCL never follows a planted symlink, and a
    /// planted file or FIFO makes this fail instead of writing through it).
    pub fn write(&self, dir: &Path) -> Result<(), SandboxesError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = dir.join(POD_FILE);
        let text = serde_json::to_vec(self).unwrap_or_default();
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
            .and_then(|mut f| f.write_all(&text))
            .map_err(|source| SandboxesError::Write { path, source })
    }

    fn read(dir: &Path) -> Option<Self> {
        let text = read_bounded(&dir.join(POD_FILE), MAX_POD_FILE)?;
        serde_json::from_slice(&text).ok()
    }
}

/// What state a sandbox's VM is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    Running,
    /// The VMM is stopped (SIGSTOP or a debugger): the guest is frozen.
    Frozen,
    /// No `capsa-vmm` serves the directory (booting, stopping, or left behind by a dead shim).
    NoVmm,
}

/// One sandbox on the node.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxInfo {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodIdentity>,
    pub state: VmState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmm_pid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// Seconds since the VMM started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime_secs: Option<u64>,
    pub dir: PathBuf,
}

/// The processes behind one sandbox, for `inspect` and `metrics`.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessInfo {
    pub pid: i32,
    pub rss_kib: u64,
    /// Proportional set size: shared pages split between their users.
    pub pss_kib: u64,
    /// User plus system CPU time.
    pub cpu_secs: f64,
    pub threads: u64,
    pub uid: Option<u32>,
    /// `Seccomp:` of /proc/<pid>/status: 0 none, 2 filter.
    pub seccomp: Option<u32>,
    /// The process's cgroup (v2 path, or the v1 memory controller's).
    pub cgroup: Option<String>,
}

/// Details of one sandbox (`capsa inspect`).
#[derive(Debug, Clone, Serialize)]
pub struct SandboxDetails {
    #[serde(flatten)]
    pub info: SandboxInfo,
    pub console_log: PathBuf,
    pub vsock_socket: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmm: Option<ProcessInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub virtiofsd: Option<ProcessInfo>,
    /// The VMM's command line, as /proc shows it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub vmm_command: Vec<String>,
}

/// Ids of the sandbox directories under `state_dir`, sorted.
fn sandbox_ids(state_dir: &Path) -> Result<Vec<String>, SandboxesError> {
    let entries = std::fs::read_dir(state_dir).map_err(|source| SandboxesError::StateDir {
        path: state_dir.to_path_buf(),
        source,
    })?;
    let mut ids: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .filter_map(|e| {
            let id = e.file_name().to_str()?.to_owned();
            validate_sandbox_id(&id).ok().map(|()| id)
        })
        .collect();
    ids.sort();
    Ok(ids)
}

/// Every sandbox directory under `state_dir` (sorted by id) with its VMM, if one runs.
pub fn list(state_dir: &Path) -> Result<Vec<SandboxInfo>, SandboxesError> {
    let procs = Processes::scan();
    Ok(sandbox_ids(state_dir)?
        .iter()
        .map(|id| info_for(state_dir, id, &procs))
        .collect())
}

/// Every sandbox in detail, from one read of the state directory and of /proc (`capsa metrics`).
pub fn inspect_all(state_dir: &Path) -> Result<Vec<SandboxDetails>, SandboxesError> {
    let procs = Processes::scan();
    Ok(sandbox_ids(state_dir)?
        .iter()
        .map(|id| details_for(state_dir, id, &procs))
        .collect())
}

/// One sandbox in detail.
pub fn inspect(state_dir: &Path, id: &str) -> Result<SandboxDetails, SandboxesError> {
    validate_sandbox_id(id).map_err(|_| SandboxesError::BadId(id.to_owned()))?;
    if !state_dir.join(id).is_dir() {
        return Err(SandboxesError::NotFound {
            id: id.to_owned(),
            state_dir: state_dir.to_path_buf(),
        });
    }
    Ok(details_for(state_dir, id, &Processes::scan()))
}

fn details_for(state_dir: &Path, id: &str, procs: &Processes) -> SandboxDetails {
    let paths = SandboxPaths::new(state_dir, id);
    let info = info_for(state_dir, id, procs);
    let vmm_command = info
        .vmm_pid
        .and_then(|pid| procs.0.get(&pid))
        .map(|args| {
            args.iter()
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default();
    SandboxDetails {
        vmm: info.vmm_pid.and_then(process_info),
        virtiofsd: procs
            .virtiofsd_serving(&paths.fs_socket)
            .and_then(process_info),
        console_log: paths.console_log,
        vsock_socket: paths.vsock,
        vmm_command,
        info,
    }
}

fn info_for(state_dir: &Path, id: &str, procs: &Processes) -> SandboxInfo {
    let paths = SandboxPaths::new(state_dir, id);
    let vsock = paths.vsock.as_os_str().as_encoded_bytes().to_vec();
    let vmm = procs
        .vmms()
        .find(|(_, args)| flag_value(args, "--vsock-uds") == Some(vsock.as_slice()))
        .map(|(pid, args)| (*pid, args));
    let number = |args: &Vec<Vec<u8>>, flag: &str| -> Option<u64> {
        std::str::from_utf8(flag_value(args, flag)?)
            .ok()?
            .parse()
            .ok()
    };
    let state = match vmm {
        None => VmState::NoVmm,
        Some((pid, _)) if matches!(proc_state(pid), Some('T' | 't')) => VmState::Frozen,
        Some(_) => VmState::Running,
    };
    SandboxInfo {
        id: id.to_owned(),
        pod: PodIdentity::read(&paths.dir),
        state,
        vmm_pid: vmm.map(|(pid, _)| pid),
        vcpus: vmm
            .and_then(|(_, a)| number(a, "--vcpus"))
            .and_then(|v| u32::try_from(v).ok()),
        memory_mib: vmm.and_then(|(_, a)| number(a, "--memory-mib")),
        uptime_secs: vmm
            .and_then(|(pid, _)| process_age(pid))
            .map(|d| d.as_secs()),
        dir: paths.dir,
    }
}

/// The value after `flag` in a command line.
fn flag_value<'a>(args: &'a [Vec<u8>], flag: &str) -> Option<&'a [u8]> {
    let i = args.iter().position(|a| a == flag.as_bytes())?;
    args.get(i + 1).map(Vec::as_slice)
}

/// Every process's pid and raw command line (NUL-separated, at most 64 KiB), from /proc; processes that
/// vanish while it is read are skipped.
pub fn process_cmdlines() -> impl Iterator<Item = (i32, Vec<u8>)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            let cmdline = read_bounded(&entry.path().join("cmdline"), MAX_PROC_FILE)?;
            Some((pid, cmdline))
        })
}

/// Pids of `capsa-vmm` processes whose command line names `needle` (the sandbox's vsock socket).
pub fn find_vmm_pids(needle: &str) -> Vec<i32> {
    Processes::scan()
        .vmms()
        .filter(|(_, args)| args.iter().any(|a| a == needle.as_bytes()))
        .map(|(pid, _)| *pid)
        .collect()
}

/// The `capsa-vmm` and `virtiofsd` processes and their arguments, from one read of /proc.
struct Processes(BTreeMap<i32, Vec<Vec<u8>>>);

impl Processes {
    fn scan() -> Self {
        Processes(
            process_cmdlines()
                .filter_map(|(pid, cmdline)| {
                    let args: Vec<Vec<u8>> = cmdline
                        .split(|b| *b == 0)
                        .filter(|a| !a.is_empty())
                        .map(<[u8]>::to_vec)
                        .collect();
                    let program = args.first()?;
                    (program.ends_with(b"capsa-vmm") || program.ends_with(b"virtiofsd"))
                        .then_some((pid, args))
                })
                .collect(),
        )
    }

    fn vmms(&self) -> impl Iterator<Item = (&i32, &Vec<Vec<u8>>)> {
        self.0
            .iter()
            .filter(|(_, args)| args.first().is_some_and(|p| p.ends_with(b"capsa-vmm")))
    }

    /// The virtiofsd serving `socket` (`--socket-path=<socket>` or `--socket-path <socket>`).
    fn virtiofsd_serving(&self, socket: &Path) -> Option<i32> {
        let socket = socket.as_os_str().as_encoded_bytes();
        let mut joined = b"--socket-path=".to_vec();
        joined.extend_from_slice(socket);
        self.0.iter().find_map(|(pid, args)| {
            let is_virtiofsd = args.first()?.ends_with(b"virtiofsd");
            let serves = args.contains(&joined)
                || args
                    .windows(2)
                    .any(|w| w[0] == b"--socket-path" && w[1] == socket);
            (is_virtiofsd && serves).then_some(*pid)
        })
    }
}

/// Memory, CPU and confinement of one process; `None` when it is gone.
pub fn process_info(pid: i32) -> Option<ProcessInfo> {
    let status = String::from_utf8(read_bounded(
        Path::new(&format!("/proc/{pid}/status")),
        MAX_PROC_FILE,
    )?)
    .ok()?;
    let field = |key: &str| -> Option<&str> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
    };
    let number = |key: &str| field(key).and_then(|v| v.parse::<u64>().ok());
    let pss_kib = read_bounded(
        Path::new(&format!("/proc/{pid}/smaps_rollup")),
        MAX_PROC_FILE,
    )
    .and_then(|t| {
        String::from_utf8_lossy(&t)
            .lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    })
    .unwrap_or(0);
    let stat = proc_stat(pid)?;
    let ticks = clock_ticks();
    let cpu_secs = (stat.utime + stat.stime) as f64 / ticks as f64;
    let cgroup =
        read_bounded(Path::new(&format!("/proc/{pid}/cgroup")), MAX_PROC_FILE).and_then(|t| {
            let t = String::from_utf8_lossy(&t).into_owned();
            // cgroup v2: "0::/path"; v1: the memory controller's line.
            t.lines()
                .find_map(|l| l.strip_prefix("0::"))
                .or_else(|| {
                    t.lines()
                        .find(|l| {
                            l.split(':')
                                .nth(1)
                                .is_some_and(|c| c.split(',').any(|c| c == "memory"))
                        })
                        .and_then(|l| l.splitn(3, ':').nth(2))
                })
                .map(str::to_owned)
        });
    Some(ProcessInfo {
        pid,
        rss_kib: number("VmRSS:").unwrap_or(0),
        pss_kib,
        cpu_secs,
        threads: number("Threads:").unwrap_or(0),
        uid: field("Uid:").and_then(|v| v.parse().ok()),
        seccomp: field("Seccomp:").and_then(|v| v.parse().ok()),
        cgroup,
    })
}

struct ProcStat {
    state: char,
    utime: u64,
    stime: u64,
    start_ticks: u64,
}

/// Fields of /proc/<pid>/stat after the command name (which may hold spaces and parentheses).
fn proc_stat(pid: i32) -> Option<ProcStat> {
    let raw = read_bounded(Path::new(&format!("/proc/{pid}/stat")), MAX_PROC_FILE)?;
    let text = String::from_utf8_lossy(&raw);
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime 15, starttime 22.
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        utime: f.get(11)?.parse().ok()?,
        stime: f.get(12)?.parse().ok()?,
        start_ticks: f.get(19)?.parse().ok()?,
    })
}

fn proc_state(pid: i32) -> Option<char> {
    proc_stat(pid).map(|s| s.state)
}

/// How long ago process `pid` started.
fn process_age(pid: i32) -> Option<Duration> {
    let start = proc_stat(pid)?.start_ticks as f64 / clock_ticks() as f64;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(Duration::from_secs_f64((uptime - start).max(0.0)))
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions; it only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// At most `max` bytes of a file; `None` when it cannot be read.
fn read_bounded(path: &Path, max: u64) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(max)
        .read_to_end(&mut buf)
        .ok()?;
    Some(buf)
}

/// "1h02m", "3m04s", "12s".
pub fn format_age(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// The table `capsa list` prints.
pub fn format_table(sandboxes: &[SandboxInfo]) -> String {
    let dash = || "-".to_owned();
    let rows: Vec<[String; 7]> = sandboxes
        .iter()
        .map(|s| {
            [
                s.id.clone(),
                s.pod
                    .as_ref()
                    .map(|p| {
                        if p.namespace.is_empty() {
                            p.name.clone()
                        } else {
                            format!("{}/{}", p.namespace, p.name)
                        }
                    })
                    .unwrap_or_else(dash),
                s.vmm_pid.map(|p| p.to_string()).unwrap_or_else(dash),
                s.vcpus.map(|p| p.to_string()).unwrap_or_else(dash),
                s.memory_mib.map(|m| format!("{m}Mi")).unwrap_or_else(dash),
                s.uptime_secs.map(format_age).unwrap_or_else(dash),
                match s.state {
                    VmState::Running => "running",
                    VmState::Frozen => "frozen",
                    VmState::NoVmm => "no-vmm",
                }
                .to_owned(),
            ]
        })
        .collect();
    let header = [
        "SANDBOX", "POD", "VMM PID", "VCPUS", "MEMORY", "UPTIME", "STATE",
    ];
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:w$}  "));
            }
        }
        l.push('\n');
        l
    };
    let mut out = line(&header.map(str::to_owned));
    for r in &rows {
        out.push_str(&line(r));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sandbox_dir_without_vmm_is_listed_with_its_pod() {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join("sb-1");
        std::fs::create_dir(&dir).unwrap();
        PodIdentity {
            name: "web".into(),
            namespace: "shop".into(),
            uid: "u1".into(),
        }
        .write(&dir)
        .unwrap();
        // Not sandboxes: a file, a hidden directory (the jails' roots), a bad id.
        std::fs::write(state.path().join("file"), "x").unwrap();
        std::fs::create_dir(state.path().join(".jail")).unwrap();
        std::fs::create_dir(state.path().join("bad id")).unwrap();
        let l = list(state.path()).unwrap();
        assert_eq!(l.len(), 1, "{l:?}");
        assert_eq!(l[0].id, "sb-1");
        assert_eq!(l[0].state, VmState::NoVmm);
        assert_eq!(l[0].pod.as_ref().unwrap().namespace, "shop");
        let t = format_table(&l);
        assert!(t.starts_with("SANDBOX"), "{t}");
        assert!(t.contains("sb-1     shop/web  -"), "{t}");
        let d = inspect(state.path(), "sb-1").unwrap();
        assert_eq!(d.console_log, dir.join("console.log"));
        assert!(d.vmm.is_none());
        assert!(matches!(
            inspect(state.path(), "nope"),
            Err(SandboxesError::NotFound { .. })
        ));
        assert!(matches!(
            inspect(state.path(), "../etc"),
            Err(SandboxesError::BadId(_))
        ));
    }

    #[test]
    fn a_planted_pod_file_or_link_is_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("victim");
        std::fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join(POD_FILE)).unwrap();
        let pod = PodIdentity {
            name: "web".into(),
            ..Default::default()
        };
        assert!(matches!(
            pod.write(dir.path()),
            Err(SandboxesError::Write { .. })
        ));
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    }

    #[test]
    fn a_hostile_pod_file_is_ignored_not_trusted() {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join("sb");
        std::fs::create_dir(&dir).unwrap();
        // Larger than the bound: cut, so it does not parse, so no pod is shown.
        std::fs::write(
            dir.join(POD_FILE),
            format!("{{\"name\":\"{}\"}}", "x".repeat(100_000)),
        )
        .unwrap();
        assert!(list(state.path()).unwrap()[0].pod.is_none());
        std::fs::write(dir.join(POD_FILE), "not json").unwrap();
        assert!(list(state.path()).unwrap()[0].pod.is_none());
    }

    #[test]
    fn flags_and_this_process() {
        let args: Vec<Vec<u8>> = ["capsa-vmm", "--vcpus", "2", "--memory-mib", "384"]
            .iter()
            .map(|a| a.as_bytes().to_vec())
            .collect();
        assert_eq!(flag_value(&args, "--vcpus"), Some(&b"2"[..]));
        assert_eq!(flag_value(&args, "--memory-mib"), Some(&b"384"[..]));
        assert_eq!(flag_value(&args, "--kernel"), None);
        let me = process_info(std::process::id() as i32).unwrap();
        assert!(me.rss_kib > 0 && me.threads >= 1, "{me:?}");
        assert!(process_age(std::process::id() as i32).is_some());
        assert_eq!(format_age(3725), "1h02m");
        assert_eq!(format_age(64), "1m04s");
        assert_eq!(format_age(5), "5s");
    }

    #[test]
    fn pod_identity_from_cri_annotations() {
        let mut a = std::collections::HashMap::new();
        assert!(PodIdentity::from_annotations(&a).is_none());
        a.insert(CRI_SANDBOX_NAME.to_owned(), "web".to_owned());
        a.insert(CRI_SANDBOX_NAMESPACE.to_owned(), "shop".to_owned());
        let p = PodIdentity::from_annotations(&a).unwrap();
        assert_eq!(
            (p.name.as_str(), p.namespace.as_str(), p.uid.as_str()),
            ("web", "shop", "")
        );
    }
}
