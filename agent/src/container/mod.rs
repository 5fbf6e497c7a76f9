//! Containers inside the guest: OCI specs run with youki's libcontainer (see agent/README.md), stdio
//! streamed to the host on demand, exits from the agent's reaper, cgroup v2 limits, stats and OOM
//! events.
//!
//! [`Containers`] holds every container and process of the sandbox; the ttrpc server calls one method
//! per API call. Errors carry a gRPC code and a message naming the problem; no error here stops the
//! agent or touches another container.

pub mod cgroup;
pub mod guest;
pub mod helper;
pub mod path;
pub mod pod_init;
pub mod spec;
pub mod stdio;
pub mod storage;

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capsa_proto::agent::{
    CreateContainerRequest, ExecProcessRequest, ListProcessesResponse, StatsContainerResponse,
    Storage, WaitProcessResponse,
};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::sync::{mpsc, watch, Mutex};

use crate::reaper::{ChildExit, Reaper};
use helper::{run_helper, HelperRequest};
use pod_init::PAUSE_ARG;
use stdio::Stdio;

/// Runs a container sub-command of the agent binary if argv asks for one; returns its exit code.
/// `main` calls this first, before any runtime or thread exists.
pub fn maybe_run_subcommand() -> Option<i32> {
    let mut args = std::env::args();
    let _ = args.next();
    match args.next().as_deref() {
        Some(helper::HELPER_ARG) => Some(helper::helper_main(&args.next().unwrap_or_default())),
        Some(pod_init::PAUSE_ARG) => Some(pod_init::holder_main()),
        _ => None,
    }
}

/// gRPC-coded error for the API.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Internal(String),
}

impl ContainerError {
    pub fn code(&self) -> ttrpc::Code {
        match self {
            ContainerError::NotFound(_) => ttrpc::Code::NOT_FOUND,
            ContainerError::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            ContainerError::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            ContainerError::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            ContainerError::Internal(_) => ttrpc::Code::INTERNAL,
        }
    }
}

impl From<ContainerError> for ttrpc::Error {
    fn from(e: ContainerError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

impl From<spec::SpecError> for ContainerError {
    fn from(e: spec::SpecError) -> Self {
        ContainerError::InvalidArgument(e.to_string())
    }
}

impl From<stdio::StdioError> for ContainerError {
    fn from(e: stdio::StdioError) -> Self {
        match e {
            stdio::StdioError::Io(e) => ContainerError::Internal(format!("stdio: {e}")),
            other => ContainerError::FailedPrecondition(other.to_string()),
        }
    }
}

type Result<T> = std::result::Result<T, ContainerError>;

/// Writes the pod's `net.*` sysctls (see [`spec::take_net_sysctls`]) in the guest's network namespace, which
/// is the pod's.
fn set_pod_sysctls(sysctls: &[(PathBuf, String)]) -> Result<()> {
    for (rel, value) in sysctls {
        let path = Path::new("/proc/sys").join(rel);
        let key = rel.display().to_string().replace('/', ".");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, value.as_bytes()))
            .map_err(|e| {
                ContainerError::InvalidArgument(format!("sysctl {key} = {value:?}: {e}"))
            })?;
        tracing::info!(key, value, "pod sysctl set");
    }
    Ok(())
}

fn internal(what: &str) -> impl Fn(std::io::Error) -> ContainerError + '_ {
    move |e| ContainerError::Internal(format!("{what}: {e}"))
}

/// Where the agent keeps container state in the guest.
#[derive(Debug, Clone)]
pub struct Paths {
    /// libcontainer's state root.
    pub state_root: PathBuf,
    /// One bundle directory per container (config.json, exec process files).
    pub bundles: PathBuf,
    /// Console sockets, one per terminal being set up. A short directory of its own: a Unix socket path
    /// has at most 107 bytes, and CRI's container and exec ids are 64 characters each.
    pub consoles: PathBuf,
    pub cgroup_root: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            state_root: "/run/capsa/containers".into(),
            bundles: "/run/capsa/bundles".into(),
            consoles: "/run/capsa/tty".into(),
            cgroup_root: cgroup::CGROUP_ROOT.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

struct Process {
    pid: i32,
    stdio: Stdio,
    exit: watch::Receiver<Option<ChildExit>>,
}

struct Container {
    id: String,
    init_exec_id: String,
    bundle: PathBuf,
    cgroup_dir: PathBuf,
    storages: Vec<PathBuf>,
    status: StdMutex<Status>,
    processes: StdMutex<HashMap<String, Arc<Process>>>,
    oom_seen: StdMutex<u64>,
}

impl Container {
    fn status(&self) -> Status {
        *self.status.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn set_status(&self, s: Status) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }
    fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        let key = if exec_id.is_empty() {
            self.init_exec_id.as_str()
        } else {
            exec_id
        };
        self.processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
            .ok_or_else(|| {
                ContainerError::NotFound(format!("container {:?} has no process {key:?}", self.id))
            })
    }
    /// Queues an OOM event if memory.events counted a new OOM kill.
    fn check_oom(&self, tx: &mpsc::Sender<String>) {
        let n = cgroup::oom_kills(&self.cgroup_dir);
        let mut seen = self.oom_seen.lock().unwrap_or_else(|e| e.into_inner());
        if n > *seen {
            *seen = n;
            tracing::info!(container = %self.id, oom_kills = n, "OOM kill");
            let _ = tx.try_send(self.id.clone());
        }
    }
}

struct Pod {
    ns: spec::PodNamespaces,
}

/// Every container of the sandbox.
pub struct Containers {
    reaper: Reaper,
    paths: Paths,
    storages: Arc<storage::Storages>,
    containers: StdMutex<HashMap<String, Arc<Container>>>,
    /// Ids being created (reserved against a concurrent duplicate create).
    creating: StdMutex<std::collections::HashSet<String>>,
    pod: Mutex<Option<Pod>>,
    oom_tx: mpsc::Sender<String>,
    oom_rx: Mutex<mpsc::Receiver<String>>,
}

fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ContainerError::Internal(format!("worker task failed: {e}")))
}

impl Containers {
    pub fn new(reaper: Reaper, paths: Paths) -> Arc<Self> {
        // Containers' processes are re-parented to the agent when the helper exits: as PID 1 that
        // happens anyway; elsewhere (tests) the agent must be a child subreaper.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let (oom_tx, oom_rx) = mpsc::channel(256);
        let c = Arc::new(Containers {
            reaper,
            paths,
            storages: Arc::new(storage::Storages::default()),
            containers: StdMutex::new(HashMap::new()),
            creating: StdMutex::new(Default::default()),
            pod: Mutex::new(None),
            oom_tx,
            oom_rx: Mutex::new(oom_rx),
        });
        // OOM poller: memory.events of every running container, every 100 ms.
        let weak = Arc::downgrade(&c);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let Some(me) = weak.upgrade() else { return };
                for c in me.all() {
                    if matches!(c.status(), Status::Running | Status::Paused) {
                        c.check_oom(&me.oom_tx);
                    }
                }
            }
        });
        c
    }

    fn all(&self) -> Vec<Arc<Container>> {
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn get(&self, id: &str) -> Result<Arc<Container>> {
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(format!("no container {id:?}")))
    }

    /// Sets up the pod's shared namespaces (ipc, uts; network is the guest's) and its hostname.
    pub async fn create_sandbox(&self, hostname: &str, storages: &[Storage]) -> Result<()> {
        for s in storages {
            let st = self.storages.clone();
            let s = s.clone();
            blocking(move || st.acquire(&s))
                .await?
                .map_err(|e| ContainerError::InvalidArgument(e.to_string()))?;
        }
        let mut pod = self.pod.lock().await;
        if pod.is_some() {
            return Err(ContainerError::AlreadyExists(
                "the sandbox was already created".into(),
            ));
        }
        *pod = Some(self.start_pod(hostname).await?);
        Ok(())
    }

    /// Mounts storages outside CreateContainer (they stay until the sandbox goes).
    pub async fn add_storages(&self, storages: &[Storage]) -> Result<()> {
        for s in storages {
            let st = self.storages.clone();
            let s = s.clone();
            blocking(move || st.acquire(&s))
                .await?
                .map_err(|e| ContainerError::InvalidArgument(e.to_string()))?;
        }
        Ok(())
    }

    async fn pod_namespaces(&self) -> Result<spec::PodNamespaces> {
        let mut pod = self.pod.lock().await;
        if pod.is_none() {
            *pod = Some(self.start_pod("").await?);
        }
        match pod.as_ref() {
            Some(p) => Ok(p.ns.clone()),
            None => Err(ContainerError::Internal("pod namespaces missing".into())),
        }
    }

    /// Starts the namespace holder (`capsa-agent __pause`, see [`pod_init`]) in new ipc, uts and pid
    /// namespaces; the pod's namespaces are those of its child, PID 1 of the new pid namespace.
    async fn start_pod(&self, hostname: &str) -> Result<Pod> {
        let reaper = self.reaper.clone();
        let hostname = hostname.to_string();
        let (init, exit) = blocking(move || {
            reaper.spawn_registered(|| {
                let exe = std::env::current_exe()?;
                let mut cmd = std::process::Command::new(exe);
                cmd.arg(PAUSE_ARG)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::null());
                let h = hostname.clone();
                // SAFETY: only syscalls (unshare, sethostname) between fork and exec.
                unsafe {
                    cmd.pre_exec(move || {
                        nix::sched::unshare(
                            nix::sched::CloneFlags::CLONE_NEWIPC
                                | nix::sched::CloneFlags::CLONE_NEWUTS
                                | nix::sched::CloneFlags::CLONE_NEWPID,
                        )?;
                        if !h.is_empty() {
                            nix::unistd::sethostname(&h)?;
                        }
                        Ok(())
                    });
                }
                let mut child = cmd.spawn()?;
                let pid = i32::try_from(child.id()).map_err(std::io::Error::other)?;
                // The holder writes its child's pid at once; EOF instead means it failed (the reaper gets it).
                let mut line = String::new();
                if let Some(out) = child.stdout.take() {
                    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)?;
                }
                let init: i32 = line.trim().parse().map_err(|_| {
                    std::io::Error::other(format!("the holder reported {line:?}, not a pid"))
                })?;
                Ok::<_, std::io::Error>((Pid::from_raw(pid), init))
            })
        })
        .await?
        .map_err(internal("starting the pod's namespace holder"))?;
        tokio::spawn(async move {
            if let Ok(e) = exit.await {
                tracing::error!(status = ?e.status, "the pod's namespace holder exited");
            }
        });
        Ok(Pod {
            ns: spec::PodNamespaces {
                ipc: format!("/proc/{init}/ns/ipc").into(),
                uts: format!("/proc/{init}/ns/uts").into(),
                pid: format!("/proc/{init}/ns/pid").into(),
            },
        })
    }

    pub async fn create_container(self: &Arc<Self>, req: CreateContainerRequest) -> Result<()> {
        let id = req.container_id.clone();
        path::check_id("container", &id).map_err(ContainerError::InvalidArgument)?;
        let init_exec_id = if req.exec_id.is_empty() {
            id.clone()
        } else {
            path::check_id("exec", &req.exec_id).map_err(ContainerError::InvalidArgument)?;
            req.exec_id.clone()
        };
        {
            let exists = self
                .containers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&id);
            let mut creating = self.creating.lock().unwrap_or_else(|e| e.into_inner());
            if exists || !creating.insert(id.clone()) {
                return Err(ContainerError::AlreadyExists(format!(
                    "container {id:?} already exists"
                )));
            }
        }
        let r = self.create_inner(req, init_exec_id).await;
        self.creating
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        r
    }

    async fn create_inner(
        self: &Arc<Self>,
        req: CreateContainerRequest,
        init_exec_id: String,
    ) -> Result<()> {
        let id = req.container_id.clone();
        let mut held: Vec<PathBuf> = Vec::new();
        let r = self.create_steps(&req, &init_exec_id, &mut held).await;
        if r.is_err() {
            for mp in held.iter().rev() {
                self.storages.release(mp);
            }
            let _ = std::fs::remove_dir_all(self.paths.bundles.join(&id));
            let _ = std::fs::remove_dir_all(self.paths.state_root.join(&id));
        }
        r
    }

    async fn create_steps(
        self: &Arc<Self>,
        req: &CreateContainerRequest,
        init_exec_id: &str,
        held: &mut Vec<PathBuf>,
    ) -> Result<()> {
        let id = req.container_id.clone();
        // Parse before mounting anything: a bad spec costs nothing.
        let spec = spec::parse_spec(&req.oci_spec_json)?;
        for s in &req.storages {
            let st = self.storages.clone();
            let s = s.clone();
            let mp = blocking(move || st.acquire(&s))
                .await?
                .map_err(|e| ContainerError::InvalidArgument(e.to_string()))?;
            held.push(mp);
        }
        let pod = self.pod_namespaces().await?;
        let cg = cgroup::container_cgroup(&id);
        // The rootfs may lie on a storage: resolve root.path inside the storage it is under, so a
        // symlink on that storage cannot point the root elsewhere.
        let root_path = spec.root().as_ref().map(|r| r.path().clone());
        let rootfs_storage = match &root_path {
            Some(rp) if rp.is_absolute() => {
                let rp = path::clean_absolute(rp)
                    .map_err(|e| ContainerError::InvalidArgument(format!("rootfs path: {e}")))?;
                match held.iter().find(|mp| rp.starts_with(mp)) {
                    Some(mp) => {
                        let rel = rp.strip_prefix(mp).unwrap_or(Path::new(""));
                        Some(
                            path::resolve_in_root(mp, &Path::new("/").join(rel)).map_err(|e| {
                                ContainerError::InvalidArgument(format!("rootfs path: {e}"))
                            })?,
                        )
                    }
                    None => None,
                }
            }
            _ => None,
        };
        let ctx = spec::PrepareContext {
            container_id: &id,
            rootfs_storage: rootfs_storage.as_deref(),
            pod: &pod,
            cgroup_path: &cg,
            online_cpus: spec::count_online(Path::new("/sys/devices/system/cpu/online")),
            online_mems: spec::count_online(Path::new("/sys/devices/system/node/online")),
        };
        let mut spec = spec;
        let net_sysctls = spec::take_net_sysctls(&mut spec)?;
        let spec = spec::prepare_spec(spec, &ctx)?;
        // A missing cwd is created, as runc does (libcontainer would fail the exec with EINVAL).
        let root_and_process = (spec.root().as_ref(), spec.process().as_ref());
        if let (Some(root), Some(process)) = root_and_process {
            if !root.path().is_absolute() {
                return Err(ContainerError::InvalidArgument(format!(
                    "root.path {} is not absolute after preparation",
                    root.path().display()
                )));
            }
            let (rootfs, cwd) = (root.path().clone(), process.cwd().clone());
            let shown = cwd.clone();
            blocking(move || path::create_dir_in_root(&rootfs, &cwd))
                .await?
                .map_err(|e| {
                    ContainerError::InvalidArgument(format!(
                        "process.cwd {}: cannot create it in the rootfs: {e}",
                        shown.display()
                    ))
                })?;
        }
        set_pod_sysctls(&net_sysctls)?;
        for src in spec::propagated_bind_sources(&spec) {
            let src2 = src.clone();
            blocking(move || storage::ensure_shared_mount(&src2))
                .await?
                .map_err(|e| {
                    ContainerError::InvalidArgument(format!(
                        "mount propagation for bind source {}: {e}",
                        src.display()
                    ))
                })?;
        }
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);

        let bundle = self.paths.bundles.join(&id);
        std::fs::create_dir_all(&bundle).map_err(internal("creating the bundle directory"))?;
        std::fs::create_dir_all(&self.paths.state_root)
            .map_err(internal("creating the state root"))?;
        let json = serde_json::to_vec(&spec)
            .map_err(|e| ContainerError::Internal(format!("serialising the spec: {e}")))?;
        std::fs::write(bundle.join("config.json"), json)
            .map_err(internal("writing config.json"))?;

        let req_h = |console: Option<PathBuf>| HelperRequest::Create {
            root: self.paths.state_root.clone(),
            id: id.clone(),
            bundle: bundle.clone(),
            console_socket: console,
        };
        let (pid, stdio, exit) = self.spawn_process(terminal, init_exec_id, req_h).await?;
        let cdir = cgroup::cgroup_dir(&self.paths.cgroup_root, &cg);
        let container = Arc::new(Container {
            id: id.clone(),
            init_exec_id: init_exec_id.to_string(),
            bundle,
            oom_seen: StdMutex::new(cgroup::oom_kills(&cdir)),
            cgroup_dir: cdir,
            storages: std::mem::take(held),
            status: StdMutex::new(Status::Created),
            processes: StdMutex::new(HashMap::new()),
        });
        let proc = self.track(&container, init_exec_id, pid, stdio, exit, true);
        container
            .processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(init_exec_id.to_string(), proc);
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), container);
        tracing::info!(container = %id, pid, "container created");
        Ok(())
    }

    /// A fresh console socket path under [`Paths::consoles`], short whatever the ids are.
    fn console_socket_path(&self) -> Result<PathBuf> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        std::fs::create_dir_all(&self.paths.consoles)
            .map_err(internal("creating the console socket directory"))?;
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(self.paths.consoles.join(format!("{n}.sock")))
    }

    /// Creates stdio, runs the helper under the reaper's registry lock, returns pid, stdio, exit.
    async fn spawn_process(
        &self,
        terminal: bool,
        exec_id: &str,
        make_req: impl FnOnce(Option<PathBuf>) -> HelperRequest,
    ) -> Result<(i32, Stdio, tokio::sync::oneshot::Receiver<ChildExit>)> {
        let reaper = self.reaper.clone();
        if terminal {
            let sock = self.console_socket_path()?;
            let listener = stdio::console_listener(&sock).map_err(|e| {
                ContainerError::Internal(format!(
                    "console socket {} for process {exec_id:?}: {e}",
                    sock.display()
                ))
            })?;
            let req = make_req(Some(sock.clone()));
            let r = blocking(move || {
                let (master, exit) = reaper.spawn_registered(|| {
                    let pid = run_helper(&req, None)?;
                    let master = stdio::receive_pty_master(&listener, Duration::from_secs(10))
                        .map_err(|e| format!("receiving the terminal: {e}"))?;
                    Ok::<_, String>((Pid::from_raw(pid), (pid, master)))
                })?;
                Ok::<_, String>((master, exit))
            })
            .await?;
            let _ = std::fs::remove_file(&sock);
            let ((pid, master), exit) = r.map_err(ContainerError::InvalidArgument)?;
            let stdio = Stdio::from_tty_master(master).map_err(internal("terminal"))?;
            Ok((pid, stdio, exit))
        } else {
            let set = stdio::make_pipes().map_err(internal("creating stdio pipes"))?;
            let req = make_req(None);
            let theirs = set.theirs;
            let (pid, exit) = blocking(move || {
                reaper.spawn_registered(|| {
                    let pid = run_helper(&req, Some(theirs))?;
                    Ok::<_, String>((Pid::from_raw(pid), pid))
                })
            })
            .await?
            .map_err(ContainerError::InvalidArgument)?;
            let stdio = Stdio::from_pipes(set.ours).map_err(internal("stdio pipes"))?;
            Ok((pid, stdio, exit))
        }
    }

    /// Wraps a started process; a task turns its reaped exit into the watch value.
    fn track(
        self: &Arc<Self>,
        container: &Arc<Container>,
        exec_id: &str,
        pid: i32,
        stdio: Stdio,
        exit: tokio::sync::oneshot::Receiver<ChildExit>,
        is_init: bool,
    ) -> Arc<Process> {
        let (tx, rx) = watch::channel(None);
        let c = container.clone();
        let oom_tx = self.oom_tx.clone();
        let exec_id = exec_id.to_string();
        tokio::spawn(async move {
            if let Ok(e) = exit.await {
                tracing::info!(container = %c.id, exec = %exec_id, pid, status = ?e.status, "process exited");
                if is_init {
                    // An OOM kill must be visible by the time anyone hears of the exit.
                    c.check_oom(&oom_tx);
                    c.set_status(Status::Stopped);
                }
                let _ = tx.send(Some(e));
            }
        });
        Arc::new(Process {
            pid,
            stdio,
            exit: rx,
        })
    }

    pub async fn start_container(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        if c.status() != Status::Created {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {id:?} is {:?}, not Created",
                c.status()
            )));
        }
        let root = self.paths.state_root.join(id);
        blocking(move || {
            libcontainer::container::Container::load(root).and_then(|mut ct| ct.start())
        })
        .await?
        .map_err(|e| ContainerError::Internal(format!("starting container {id:?}: {e}")))?;
        // The init may already have run to completion.
        if c.status() == Status::Created {
            c.set_status(Status::Running);
        }
        Ok(())
    }

    pub async fn exec_process(self: &Arc<Self>, req: ExecProcessRequest) -> Result<()> {
        let c = self.get(&req.container_id)?;
        path::check_id("exec", &req.exec_id).map_err(ContainerError::InvalidArgument)?;
        if c.status() != Status::Running {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {:?} is {:?}, not Running",
                c.id,
                c.status()
            )));
        }
        if c.process(&req.exec_id).is_ok() {
            return Err(ContainerError::AlreadyExists(format!(
                "container {:?} already has a process {:?}",
                c.id, req.exec_id
            )));
        }
        let process = spec::parse_process(&req.oci_process_json)?;
        let terminal = process.terminal().unwrap_or(false);
        let pfile = c.bundle.join(format!("exec-{}.json", req.exec_id));
        let json = serde_json::to_vec(&process)
            .map_err(|e| ContainerError::Internal(format!("serialising the process: {e}")))?;
        std::fs::write(&pfile, json).map_err(internal("writing the process file"))?;
        let root = self.paths.state_root.clone();
        let id = c.id.clone();
        let req_h = |console| HelperRequest::Exec {
            root,
            id,
            process: pfile.clone(),
            console_socket: console,
        };
        let r = self.spawn_process(terminal, &req.exec_id, req_h).await;
        let _ = std::fs::remove_file(&pfile);
        let (pid, stdio, exit) = r?;
        let proc = self.track(&c, &req.exec_id, pid, stdio, exit, false);
        c.processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(req.exec_id.clone(), proc);
        tracing::info!(container = %c.id, exec = %req.exec_id, pid, "exec started");
        Ok(())
    }

    pub async fn signal_process(&self, id: &str, exec_id: &str, sig: u32, all: bool) -> Result<()> {
        let c = self.get(id)?;
        let signal = i32::try_from(sig)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| ContainerError::InvalidArgument(format!("unknown signal {sig}")))?;
        let p = c.process(exec_id)?;
        if all {
            // Every process of the container (a frozen one gets it when thawed).
            for pid in cgroup::pids(&c.cgroup_dir) {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
            }
            return Ok(());
        }
        if p.exit.borrow().is_some() {
            return Err(ContainerError::NotFound(format!(
                "process {exec_id:?} of container {id:?} has already exited"
            )));
        }
        nix::sys::signal::kill(Pid::from_raw(p.pid), signal)
            .map_err(|e| ContainerError::Internal(format!("kill({}, {signal}): {e}", p.pid)))
    }

    pub async fn wait_process(&self, id: &str, exec_id: &str) -> Result<WaitProcessResponse> {
        let c = self.get(id)?;
        let p = c.process(exec_id)?;
        let mut rx = p.exit.clone();
        let e = loop {
            if let Some(e) = *rx.borrow_and_update() {
                break e;
            }
            if rx.changed().await.is_err() {
                return Err(ContainerError::Internal(
                    "the process's exit was lost".into(),
                ));
            }
        };
        let mut r = WaitProcessResponse::new();
        r.exit_status = e.status.containerd_status();
        r.exited_at_unix_ns = unix_ns(e.at);
        r.pid = u32::try_from(p.pid).unwrap_or(0);
        Ok(r)
    }

    pub async fn read_stream(
        &self,
        id: &str,
        exec_id: &str,
        stderr: bool,
        len: u32,
    ) -> Result<Vec<u8>> {
        let p = self.get(id)?.process(exec_id)?;
        Ok(p.stdio.read(stderr, len as usize).await?)
    }

    pub async fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<u32> {
        let p = self.get(id)?.process(exec_id)?;
        let n = p.stdio.write(data).await?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let p = self.get(id)?.process(exec_id)?;
        Ok(p.stdio.close_stdin().await?)
    }

    pub async fn tty_resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let p = self.get(id)?.process(exec_id)?;
        let rows = u16::try_from(rows)
            .map_err(|_| ContainerError::InvalidArgument(format!("row {rows} out of range")))?;
        let cols = u16::try_from(cols)
            .map_err(|_| ContainerError::InvalidArgument(format!("column {cols} out of range")))?;
        Ok(p.stdio.resize(rows, cols)?)
    }

    pub async fn pause(&self, id: &str, pause: bool) -> Result<()> {
        let c = self.get(id)?;
        let want = if pause {
            Status::Running
        } else {
            Status::Paused
        };
        if c.status() != want {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {id:?} is {:?}, cannot {}",
                c.status(),
                if pause { "pause" } else { "resume" }
            )));
        }
        let root = self.paths.state_root.join(id);
        blocking(move || {
            libcontainer::container::Container::load(root).and_then(|mut ct| {
                if pause {
                    ct.pause()
                } else {
                    ct.resume()
                }
            })
        })
        .await?
        .map_err(|e| ContainerError::Internal(format!("container {id:?}: {e}")))?;
        c.set_status(if pause {
            Status::Paused
        } else {
            Status::Running
        });
        Ok(())
    }

    pub async fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        let c = self.get(id)?;
        let res: oci_spec::runtime::LinuxResources = serde_json::from_slice(resources_json)
            .map_err(|e| {
                ContainerError::InvalidArgument(format!("invalid LinuxResources JSON: {e}"))
            })?;
        spec::check_resources(
            &res,
            spec::count_online(Path::new("/sys/devices/system/cpu/online")),
            spec::count_online(Path::new("/sys/devices/system/node/online")),
        )?;
        let cid = c.id.clone();
        blocking(move || cgroup::apply_resources(&cid, &res))
            .await?
            .map_err(|e| ContainerError::Internal(format!("updating container {id:?}: {e}")))
    }

    pub async fn stats(&self, id: &str) -> Result<StatsContainerResponse> {
        let c = self.get(id)?;
        let mut r = StatsContainerResponse::new();
        r.cgroup_stats = Some(cgroup::stats(&c.cgroup_dir)).into();
        Ok(r)
    }

    pub async fn list_processes(&self, id: &str, format: &str) -> Result<ListProcessesResponse> {
        let c = self.get(id)?;
        let pids = cgroup::pids(&c.cgroup_dir);
        let mut r = ListProcessesResponse::new();
        r.pids = pids.iter().filter_map(|p| u32::try_from(*p).ok()).collect();
        match format {
            "" => {}
            "json" => {
                r.process_list = serde_json::to_vec(&r.pids).unwrap_or_default();
            }
            "table" => {
                let mut s = String::from("PID CMD\n");
                for p in &pids {
                    let cmd = std::fs::read(format!("/proc/{p}/cmdline"))
                        .map(|b| {
                            String::from_utf8_lossy(&b)
                                .replace('\0', " ")
                                .trim()
                                .to_string()
                        })
                        .unwrap_or_default();
                    s.push_str(&format!("{p} {cmd}\n"));
                }
                r.process_list = s.into_bytes();
            }
            other => {
                return Err(ContainerError::InvalidArgument(format!(
                    "unknown process list format {other:?} (use \"\", \"json\" or \"table\")"
                )))
            }
        }
        Ok(r)
    }

    /// Long poll: the id of the next container that had an OOM kill.
    pub async fn oom_event(&self) -> Result<String> {
        let mut rx = self.oom_rx.lock().await;
        rx.recv()
            .await
            .ok_or_else(|| ContainerError::Internal("OOM event channel closed".into()))
    }

    pub async fn remove_container(&self, id: &str, timeout_secs: u32) -> Result<()> {
        let c = self.get(id)?;
        let init = c.process("")?;
        if init.exit.borrow().is_none() && c.status() != Status::Created {
            // Give it the grace period, then kill what is left.
            let mut rx = init.exit.clone();
            let grace = Duration::from_secs(u64::from(timeout_secs));
            let exited = tokio::time::timeout(grace, rx.wait_for(|e| e.is_some()))
                .await
                .is_ok();
            if !exited {
                for pid in cgroup::pids(&c.cgroup_dir) {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                if c.status() == Status::Paused {
                    let _ = std::fs::write(c.cgroup_dir.join("cgroup.freeze"), "0");
                }
                let _ = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|e| e.is_some()))
                    .await;
            }
        }
        let root = self.paths.state_root.join(id);
        let r = blocking(move || {
            libcontainer::container::Container::load(root).and_then(|mut ct| ct.delete(true))
        })
        .await?;
        if let Err(e) = r {
            tracing::warn!(container = %id, "libcontainer delete: {e}");
            let _ = std::fs::remove_dir_all(self.paths.state_root.join(id));
            let _ = std::fs::remove_dir(&c.cgroup_dir);
        }
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        let _ = std::fs::remove_dir_all(&c.bundle);
        for mp in c.storages.iter().rev() {
            self.storages.release(mp);
        }
        tracing::info!(container = %id, "container removed");
        Ok(())
    }

    /// Kills every container (DestroySandbox).
    pub fn kill_all(&self) {
        for c in self.all() {
            for pid in cgroup::pids(&c.cgroup_dir) {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}
