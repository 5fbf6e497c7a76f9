//! containerd's Task service (`containerd.task.v2.Task`) mapped onto the sandbox's agent.
//!
//! One service per shim, one sandbox (VM) per shim: the first Create boots it, later Creates (other
//! containers of the same pod) join it, Shutdown with no container left stops it.
//!
//! Event order: TaskCreate is published before Create returns; TaskStart/TaskExecStarted before
//! Start returns and before the exit watcher exists; TaskExit before the process is marked stopped
//! (so Wait and Delete, which need a stopped process, always come after it); TaskDelete last.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::ExitSignal;
use containerd_shim_protos::api;
use containerd_shim_protos::events::task as ev;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{EnumOrUnknown, Message, MessageField};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::{self, r#async::TtrpcContext};
use containerd_shim_protos::types::task::{ProcessInfo, Status};
use tokio::sync::{watch, Notify};

use super::bootstrap::{annotations_of, grouping};
use super::events::{EventSink, TaskEvent};
use super::sandbox::{
    ContainerRequest, ContainerStats, ExitInfo, Sandbox, SandboxError, SandboxFactory,
    VM_GONE_EXIT_STATUS,
};
use super::stdio::{Bridge, StdioConfig};

/// The signal that must end a task whatever the guest does.
const SIGKILL: u32 = 9;

/// How long an exited process's output may keep flowing before its exit is reported anyway.
pub const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Type URL containerd 1.6 decodes container metrics from.
pub const CGROUPS_V2_METRICS: &str = "io.containerd.cgroups.v2.Metrics";

type TtrpcResult<T> = ttrpc::Result<T>;

fn status(code: ttrpc::Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn not_found(what: impl std::fmt::Display) -> ttrpc::Error {
    status(ttrpc::Code::NOT_FOUND, format!("{what}: not found"))
}

impl From<SandboxError> for ttrpc::Error {
    fn from(e: SandboxError) -> Self {
        let code = match &e {
            SandboxError::NotFound(_) => ttrpc::Code::NOT_FOUND,
            SandboxError::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            SandboxError::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            SandboxError::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            SandboxError::Unimplemented(_) => ttrpc::Code::UNIMPLEMENTED,
            SandboxError::VmGone(_) => ttrpc::Code::UNAVAILABLE,
            SandboxError::Unresponsive(_) => ttrpc::Code::DEADLINE_EXCEEDED,
            SandboxError::Internal(_) => ttrpc::Code::INTERNAL,
        };
        status(code, e.to_string())
    }
}

pub fn timestamp_from_ns(ns: u64) -> Timestamp {
    let mut ts = Timestamp::new();
    ts.seconds = i64::try_from(ns / 1_000_000_000).unwrap_or(i64::MAX);
    ts.nanos = (ns % 1_000_000_000) as i32;
    ts
}

pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// A bundle's rootfs must be a real directory: a symlink (say to `/`) would share whatever it points
/// at with the guest, read-write; runc refuses it too.
pub(crate) fn check_rootfs(rootfs: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(rootfs) {
        Ok(m) if m.file_type().is_symlink() => {
            let target = std::fs::read_link(rootfs)
                .map(|t| t.display().to_string())
                .unwrap_or_else(|_| "?".into());
            Err(format!(
                "rootfs {} is a symlink (to {target}): invalid rootfs, refused",
                rootfs.display()
            ))
        }
        Ok(m) if !m.is_dir() => Err(format!(
            "rootfs {} is not a directory: invalid rootfs",
            rootfs.display()
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("rootfs {}: {e}", rootfs.display())),
    }
}

/// Something that mounts containerd's rootfs mounts (tests replace it).
#[async_trait]
pub trait RootfsMounter: Send + Sync + 'static {
    async fn mount(&self, mounts: &[api::Mount], target: &Path) -> Result<(), String>;
    async fn unmount(&self, target: &Path) -> Result<(), String>;
}

/// Mounts with containerd-shim's mount helpers (overlay, bind, ...), as runc's shim does.
pub struct HostMounter;

#[async_trait]
impl RootfsMounter for HostMounter {
    async fn mount(&self, mounts: &[api::Mount], target: &Path) -> Result<(), String> {
        for m in mounts {
            containerd_shim::util::mount_rootfs(m, target)
                .await
                .map_err(|e| {
                    format!(
                        "mount {} ({}) on {}: {e}",
                        m.source,
                        m.type_,
                        target.display()
                    )
                })?;
        }
        Ok(())
    }

    async fn unmount(&self, target: &Path) -> Result<(), String> {
        let t = target.to_string_lossy().into_owned();
        tokio::task::spawn_blocking(move || {
            containerd_shim::mount::umount_recursive(Some(&t), libc::MNT_DETACH)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("unmount {}: {e}", target.display()))
    }
}

struct Proc {
    exec_id: String,
    pid: u32,
    status: Status,
    stdio: StdioConfig,
    stdin: String,
    stdout: String,
    stderr: String,
    /// OCI Process JSON of an exec, kept until Start.
    exec_spec: Option<Vec<u8>>,
    exit: watch::Sender<Option<ExitInfo>>,
    /// Set by the first [`TaskService::finish`]: its exit event is on the way (one event per process).
    finishing: bool,
    close_stdin: Option<Arc<Notify>>,
    watcher: Option<tokio::task::JoinHandle<()>>,
}

impl Proc {
    fn new(exec_id: &str, pid: u32, stdio: StdioConfig, req_io: [&str; 3]) -> Self {
        Proc {
            exec_id: exec_id.to_owned(),
            pid,
            status: Status::CREATED,
            stdio,
            stdin: req_io[0].to_owned(),
            stdout: req_io[1].to_owned(),
            stderr: req_io[2].to_owned(),
            exec_spec: None,
            exit: watch::channel(None).0,
            finishing: false,
            close_stdin: None,
            watcher: None,
        }
    }

    fn exited(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(w) = self.watcher.take() {
            w.abort();
        }
    }
}

struct Container {
    bundle: PathBuf,
    rootfs_mounted: bool,
    init: Proc,
    execs: HashMap<String, Proc>,
}

impl Container {
    fn proc(&self, exec_id: &str) -> Option<&Proc> {
        if exec_id.is_empty() {
            Some(&self.init)
        } else {
            self.execs.get(exec_id)
        }
    }

    fn proc_mut(&mut self, exec_id: &str) -> Option<&mut Proc> {
        if exec_id.is_empty() {
            Some(&mut self.init)
        } else {
            self.execs.get_mut(exec_id)
        }
    }
}

struct Inner {
    factory: Arc<dyn SandboxFactory>,
    events: Arc<dyn EventSink>,
    mounter: Arc<dyn RootfsMounter>,
    /// Serialises the boot of the VM; holds it afterwards.
    sandbox: tokio::sync::Mutex<Option<(String, Arc<dyn Sandbox>)>>,
    containers: Mutex<HashMap<String, Container>>,
    exit: Arc<ExitSignal>,
    /// containerd's namespace (the shim's `-namespace`), told to logging binaries.
    namespace: String,
}

/// The Task service. Cheap to clone.
#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

impl TaskService {
    pub fn new(
        factory: Arc<dyn SandboxFactory>,
        events: Arc<dyn EventSink>,
        mounter: Arc<dyn RootfsMounter>,
        exit: Arc<ExitSignal>,
    ) -> Self {
        TaskService {
            inner: Arc::new(Inner {
                factory,
                events,
                mounter,
                sandbox: tokio::sync::Mutex::new(None),
                containers: Mutex::new(HashMap::new()),
                exit,
                namespace: String::new(),
            }),
        }
    }

    /// Sets containerd's namespace (call before serving).
    pub fn with_namespace(mut self, namespace: &str) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.namespace = namespace.to_owned();
        }
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Container>> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    async fn sandbox(&self) -> TtrpcResult<Arc<dyn Sandbox>> {
        self.inner
            .sandbox
            .lock()
            .await
            .as_ref()
            .map(|(_, s)| s.clone())
            .ok_or_else(|| status(ttrpc::Code::FAILED_PRECONDITION, "no sandbox VM is running"))
    }

    /// Boots the sandbox for `req` or checks that `req` belongs to the running one.
    async fn sandbox_for(
        &self,
        group: &str,
        req: &ContainerRequest,
    ) -> TtrpcResult<Arc<dyn Sandbox>> {
        let mut guard = self.inner.sandbox.lock().await;
        if let Some((id, sb)) = guard.as_ref() {
            if id != group {
                return Err(status(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!(
                        "container {} belongs to sandbox {group}, but this shim serves sandbox {id}",
                        req.container_id
                    ),
                ));
            }
            return Ok(sb.clone());
        }
        let sb = self.inner.factory.boot(group, req).await?;
        *guard = Some((group.to_owned(), sb.clone()));
        self.spawn_oom_watcher(sb.clone());
        Ok(sb)
    }

    fn spawn_oom_watcher(&self, sb: Arc<dyn Sandbox>) {
        let events = self.inner.events.clone();
        tokio::spawn(async move {
            loop {
                match sb.next_oom_event().await {
                    Ok(cid) => {
                        events
                            .publish(TaskEvent::Oom(ev::TaskOOM {
                                container_id: cid,
                                ..Default::default()
                            }))
                            .await
                    }
                    Err(SandboxError::Unimplemented(_)) | Err(SandboxError::VmGone(_)) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "GetOOMEvent");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }

    /// Starts the exit watcher of a started process; the caller has published its start event.
    fn spawn_watcher(&self, sb: Arc<dyn Sandbox>, cid: &str, exec_id: &str, mut bridge: Bridge) {
        let this = self.clone();
        let (cid, exec_id) = (cid.to_owned(), exec_id.to_owned());
        let (key_cid, key_eid) = (cid.clone(), exec_id.clone());
        let handle = tokio::spawn(async move {
            let exit = match sb.wait_process(&cid, &exec_id).await {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(%cid, %exec_id, error = %e, "wait failed; reporting the process as killed");
                    ExitInfo {
                        status: VM_GONE_EXIT_STATUS,
                        exited_at_unix_ns: now_ns(),
                        pid: 0,
                    }
                }
            };
            if !bridge.wait_output(OUTPUT_DRAIN_TIMEOUT).await {
                tracing::warn!(%cid, %exec_id, "output still open after exit; reporting the exit anyway");
            }
            this.finish(&cid, &exec_id, exit).await;
            drop(bridge);
        });
        let mut map = self.lock();
        if let Some(p) = map.get_mut(&key_cid).and_then(|c| c.proc_mut(&key_eid)) {
            if p.exited().is_none() {
                p.watcher = Some(handle);
            }
        }
    }

    /// Publishes TaskExit, then marks the process stopped and wakes its waiters.
    /// Only the first call for a process reports; later ones (a watcher after a kill that gave up on
    /// the VM) do nothing.
    async fn finish(&self, cid: &str, exec_id: &str, mut exit: ExitInfo) {
        let pid = {
            let mut map = self.lock();
            match map.get_mut(cid).and_then(|c| c.proc_mut(exec_id)) {
                Some(p) if p.exited().is_none() && !p.finishing => {
                    p.finishing = true;
                    p.pid
                }
                _ => return,
            }
        };
        if exit.exited_at_unix_ns == 0 {
            exit.exited_at_unix_ns = now_ns();
        }
        self.inner
            .events
            .publish(TaskEvent::Exit(ev::TaskExit {
                container_id: cid.to_owned(),
                id: if exec_id.is_empty() {
                    cid.to_owned()
                } else {
                    exec_id.to_owned()
                },
                pid,
                exit_status: exit.status,
                exited_at: MessageField::some(timestamp_from_ns(exit.exited_at_unix_ns)),
                ..Default::default()
            }))
            .await;
        let mut map = self.lock();
        if let Some(p) = map.get_mut(cid).and_then(|c| c.proc_mut(exec_id)) {
            p.status = Status::STOPPED;
            p.watcher = None;
            p.exit.send_replace(Some(exit));
        }
    }

    fn proc_state<T>(
        &self,
        cid: &str,
        exec_id: &str,
        f: impl FnOnce(&Container, &Proc) -> TtrpcResult<T>,
    ) -> TtrpcResult<T> {
        let map = self.lock();
        let c = map
            .get(cid)
            .ok_or_else(|| not_found(format!("container {cid}")))?;
        let p = c
            .proc(exec_id)
            .ok_or_else(|| not_found(format!("process {exec_id} of container {cid}")))?;
        f(c, p)
    }

    /// Whether any container is still known to this shim.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Stops the VM, if one runs.
    pub async fn shutdown_sandbox(&self) {
        let sb = self.inner.sandbox.lock().await.take();
        if let Some((id, sb)) = sb {
            if let Err(e) = sb.shutdown().await {
                tracing::warn!(sandbox = %id, error = %e, "sandbox shutdown");
            }
        }
    }
}

fn stats_to_metrics(s: &ContainerStats) -> containerd_shim_protos::cgroups_v2::metrics::Metrics {
    use containerd_shim_protos::cgroups_v2::metrics as m;
    let stat = |k: &str| {
        s.memory_stat
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| *v)
            .unwrap_or(0)
    };
    m::Metrics {
        pids: MessageField::some(m::PidsStat {
            current: s.pids_current,
            limit: s.pids_limit,
            ..Default::default()
        }),
        cpu: MessageField::some(m::CPUStat {
            usage_usec: s.cpu_usage_usec,
            user_usec: s.cpu_user_usec,
            system_usec: s.cpu_system_usec,
            nr_periods: s.cpu_nr_periods,
            nr_throttled: s.cpu_nr_throttled,
            throttled_usec: s.cpu_throttled_usec,
            ..Default::default()
        }),
        memory: MessageField::some(m::MemoryStat {
            usage: s.memory_usage_bytes,
            usage_limit: s.memory_limit_bytes,
            max_usage: s.memory_max_usage_bytes,
            swap_usage: s.memory_swap_usage_bytes,
            anon: stat("anon"),
            file: stat("file"),
            kernel_stack: stat("kernel_stack"),
            slab: stat("slab"),
            sock: stat("sock"),
            shmem: stat("shmem"),
            file_mapped: stat("file_mapped"),
            file_dirty: stat("file_dirty"),
            file_writeback: stat("file_writeback"),
            inactive_anon: stat("inactive_anon"),
            active_anon: stat("active_anon"),
            inactive_file: stat("inactive_file"),
            active_file: stat("active_file"),
            unevictable: stat("unevictable"),
            pgfault: stat("pgfault"),
            pgmajfault: stat("pgmajfault"),
            ..Default::default()
        }),
        memory_events: MessageField::some(m::MemoryEvents {
            oom_kill: s.memory_oom_kill,
            ..Default::default()
        }),
        io: MessageField::some(m::IOStat {
            usage: s
                .io
                .iter()
                .map(|&(major, minor, rbytes, wbytes, rios, wios)| m::IOEntry {
                    major,
                    minor,
                    rbytes,
                    wbytes,
                    rios,
                    wios,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let cid = req.id.clone();
        if cid.is_empty() {
            return Err(status(
                ttrpc::Code::INVALID_ARGUMENT,
                "container id is empty",
            ));
        }
        if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
            return Err(status(
                ttrpc::Code::UNIMPLEMENTED,
                "restoring from a checkpoint is not supported by capsa",
            ));
        }
        if self.lock().contains_key(&cid) {
            return Err(status(
                ttrpc::Code::ALREADY_EXISTS,
                format!("container {cid}: already exists"),
            ));
        }
        let stdio = StdioConfig::parse(&req.stdin, &req.stdout, &req.stderr, req.terminal)
            .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
        let bundle = PathBuf::from(&req.bundle);
        let spec_path = bundle.join("config.json");
        let spec_json = tokio::fs::read(&spec_path).await.map_err(|e| {
            status(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("read {}: {e}", spec_path.display()),
            )
        })?;
        let spec: serde_json::Value = serde_json::from_slice(&spec_json).map_err(|e| {
            status(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("{} is not valid JSON: {e}", spec_path.display()),
            )
        })?;
        let group = grouping(&cid, &annotations_of(&spec));

        let rootfs = bundle.join("rootfs");
        let rootfs_mounted = !req.rootfs.is_empty();
        if rootfs_mounted {
            self.inner
                .mounter
                .mount(&req.rootfs, &rootfs)
                .await
                .map_err(|e| status(ttrpc::Code::INTERNAL, e))?;
        }
        // Checked before anything reaches the guest, which would otherwise write through it.
        if let Err(reason) = check_rootfs(&rootfs) {
            if rootfs_mounted {
                let _ = self.inner.mounter.unmount(&rootfs).await;
            }
            return Err(status(ttrpc::Code::INVALID_ARGUMENT, reason));
        }
        let creq = ContainerRequest {
            container_id: cid.clone(),
            spec_json,
            rootfs: rootfs.clone(),
            bundle: bundle.clone(),
        };
        let created = async {
            let sb = self.sandbox_for(&group, &creq).await?;
            sb.create_container(creq.clone()).await?;
            Ok::<_, ttrpc::Error>(sb)
        }
        .await;
        let sb = match created {
            Ok(sb) => sb,
            Err(e) => {
                if rootfs_mounted {
                    let _ = self.inner.mounter.unmount(&rootfs).await;
                }
                return Err(e);
            }
        };
        let pid = sb.host_pid();
        {
            let mut map = self.lock();
            map.insert(
                cid.clone(),
                Container {
                    bundle: bundle.clone(),
                    rootfs_mounted,
                    init: Proc::new("", pid, stdio, [&req.stdin, &req.stdout, &req.stderr]),
                    execs: HashMap::new(),
                },
            );
        }
        self.inner
            .events
            .publish(TaskEvent::Create(ev::TaskCreate {
                container_id: cid.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(ev::TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                checkpoint: String::new(),
                pid,
                ..Default::default()
            }))
            .await;
        tracing::info!(container = %cid, sandbox = %group, "created");
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let (cid, eid) = (req.id.as_str(), req.exec_id.as_str());
        let (pid, stdio, exec_spec) = self.proc_state(cid, eid, |_, p| {
            if p.status != Status::CREATED {
                return Err(status(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("process {eid:?} of container {cid} is not in the created state"),
                ));
            }
            Ok((p.pid, p.stdio.clone(), p.exec_spec.clone()))
        })?;
        let sb = self.sandbox().await?;
        match exec_spec {
            None => sb.start_container(cid).await?,
            Some(spec) => sb.exec_process(cid, eid, spec).await?,
        }
        let bridge = Bridge::spawn(sb.clone(), cid, eid, &stdio, &self.inner.namespace);
        {
            let mut map = self.lock();
            if let Some(p) = map.get_mut(cid).and_then(|c| c.proc_mut(eid)) {
                p.status = Status::RUNNING;
                p.close_stdin = Some(bridge.stdin_closer());
            }
        }
        let event = if eid.is_empty() {
            TaskEvent::Start(ev::TaskStart {
                container_id: cid.to_owned(),
                pid,
                ..Default::default()
            })
        } else {
            TaskEvent::ExecStarted(ev::TaskExecStarted {
                container_id: cid.to_owned(),
                exec_id: eid.to_owned(),
                pid,
                ..Default::default()
            })
        };
        self.inner.events.publish(event).await;
        self.spawn_watcher(sb, cid, eid, bridge);
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let (cid, eid) = (req.id.as_str(), req.exec_id.as_str());
        let (pid, exit) = self.proc_state(cid, eid, |_, p| match p.status {
            Status::RUNNING | Status::PAUSED | Status::PAUSING => Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("process {eid:?} of container {cid} is still running"),
            )),
            _ => Ok((p.pid, p.exited())),
        })?;
        let exit = exit.unwrap_or(ExitInfo {
            status: 0,
            exited_at_unix_ns: now_ns(),
            pid,
        });
        let resp = api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp_from_ns(exit.exited_at_unix_ns)),
            ..Default::default()
        };
        if !eid.is_empty() {
            if let Some(c) = self.lock().get_mut(cid) {
                c.execs.remove(eid);
            }
            return Ok(resp);
        }
        if let Ok(sb) = self.sandbox().await {
            match sb.remove_container(cid).await {
                Ok(()) | Err(SandboxError::NotFound(_)) | Err(SandboxError::VmGone(_)) => {}
                // The container has stopped but the guest cannot remove it: a hung guest must not keep
                // containerd from deleting the task. The VM goes, then so does the container's share.
                Err(SandboxError::Unresponsive(why)) => {
                    sb.kill_vm(&format!(
                        "the agent did not answer the delete of container {cid} ({why})"
                    ))
                    .await;
                    match sb.remove_container(cid).await {
                        Ok(()) | Err(SandboxError::NotFound(_)) | Err(SandboxError::VmGone(_)) => {}
                        Err(e) => {
                            tracing::warn!(container = %cid, error = %e, "remove after killing the VM")
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        let removed = self.lock().remove(cid);
        if let Some(c) = removed {
            if c.rootfs_mounted {
                if let Err(e) = self.inner.mounter.unmount(&c.bundle.join("rootfs")).await {
                    tracing::warn!(container = %cid, error = %e, "unmount rootfs");
                }
            }
        }
        self.inner
            .events
            .publish(TaskEvent::Delete(ev::TaskDelete {
                container_id: cid.to_owned(),
                id: cid.to_owned(),
                pid,
                exit_status: exit.status,
                exited_at: MessageField::some(timestamp_from_ns(exit.exited_at_unix_ns)),
                ..Default::default()
            }))
            .await;
        Ok(resp)
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let (cid, eid) = (req.id.as_str(), req.exec_id.as_str());
        if eid.is_empty() {
            return Err(status(ttrpc::Code::INVALID_ARGUMENT, "exec id is empty"));
        }
        let stdio = StdioConfig::parse(&req.stdin, &req.stdout, &req.stderr, req.terminal)
            .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| status(ttrpc::Code::INVALID_ARGUMENT, "exec has no process spec"))?;
        serde_json::from_slice::<serde_json::Value>(&spec).map_err(|e| {
            status(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("exec process spec is not JSON: {e}"),
            )
        })?;
        {
            let mut map = self.lock();
            let c = map
                .get_mut(cid)
                .ok_or_else(|| not_found(format!("container {cid}")))?;
            if c.init.status != Status::RUNNING {
                return Err(status(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("container {cid} is not running"),
                ));
            }
            if c.execs.contains_key(eid) {
                return Err(status(
                    ttrpc::Code::ALREADY_EXISTS,
                    format!("exec {eid} of container {cid}: already exists"),
                ));
            }
            let mut p = Proc::new(
                eid,
                c.init.pid,
                stdio,
                [&req.stdin, &req.stdout, &req.stderr],
            );
            p.exec_spec = Some(spec);
            c.execs.insert(eid.to_owned(), p);
        }
        self.inner
            .events
            .publish(TaskEvent::ExecAdded(ev::TaskExecAdded {
                container_id: cid.to_owned(),
                exec_id: eid.to_owned(),
                ..Default::default()
            }))
            .await;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        self.proc_state(&req.id, &req.exec_id, |_, _| Ok(()))?;
        let sb = self.sandbox().await?;
        sb.resize_pty(&req.id, &req.exec_id, req.height, req.width)
            .await?;
        Ok(api::Empty::new())
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        self.proc_state(&req.id, &req.exec_id, |c, p| {
            let exit = p.exited();
            Ok(api::StateResponse {
                id: if p.exec_id.is_empty() {
                    req.id.clone()
                } else {
                    p.exec_id.clone()
                },
                bundle: c.bundle.to_string_lossy().into_owned(),
                pid: p.pid,
                status: EnumOrUnknown::new(p.status),
                stdin: p.stdin.clone(),
                stdout: p.stdout.clone(),
                stderr: p.stderr.clone(),
                terminal: p.stdio.terminal,
                exit_status: exit.map(|e| e.status).unwrap_or(0),
                exited_at: exit
                    .map(|e| MessageField::some(timestamp_from_ns(e.exited_at_unix_ns)))
                    .unwrap_or_default(),
                exec_id: p.exec_id.clone(),
                ..Default::default()
            })
        })
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        self.proc_state(&req.id, "", |_, _| Ok(()))?;
        let sb = self.sandbox().await?;
        let pids = sb.list_processes(&req.id).await?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.proc_state(&req.id, "", |_, p| match p.status {
            Status::RUNNING => Ok(()),
            _ => Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("container {} is not running", req.id),
            )),
        })?;
        let sb = self.sandbox().await?;
        sb.pause(&req.id).await?;
        if let Some(c) = self.lock().get_mut(&req.id) {
            c.init.status = Status::PAUSED;
        }
        self.inner
            .events
            .publish(TaskEvent::Paused(ev::TaskPaused {
                container_id: req.id.clone(),
                ..Default::default()
            }))
            .await;
        Ok(api::Empty::new())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        self.proc_state(&req.id, "", |_, p| match p.status {
            Status::PAUSED => Ok(()),
            _ => Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("container {} is not paused", req.id),
            )),
        })?;
        let sb = self.sandbox().await?;
        sb.resume(&req.id).await?;
        if let Some(c) = self.lock().get_mut(&req.id) {
            if c.init.status == Status::PAUSED {
                c.init.status = Status::RUNNING;
            }
        }
        self.inner
            .events
            .publish(TaskEvent::Resumed(ev::TaskResumed {
                container_id: req.id.clone(),
                ..Default::default()
            }))
            .await;
        Ok(api::Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(status(
            ttrpc::Code::UNIMPLEMENTED,
            "checkpoint is not supported by capsa",
        ))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let (cid, eid) = (req.id.as_str(), req.exec_id.as_str());
        let (state, pid) = self.proc_state(cid, eid, |_, p| Ok((p.status, p.pid)))?;
        match state {
            Status::STOPPED if !req.all => {
                return Err(not_found(format!(
                    "process {eid:?} of container {cid}: already finished"
                )))
            }
            Status::STOPPED => return Ok(api::Empty::new()),
            _ => {}
        }
        let sb = self.sandbox().await?;
        match sb.signal_process(cid, eid, req.signal, req.all).await {
            Ok(()) => {}
            Err(SandboxError::NotFound(_)) | Err(SandboxError::VmGone(_))
                if state == Status::CREATED => {}
            // The guest is gone: the exit watcher reports the process (137) by itself.
            Err(SandboxError::VmGone(_)) if req.signal == SIGKILL => {}
            // A SIGKILL of a task must end it: a guest that cannot even take that is hung, and killing
            // the VM is the only way left.
            Err(SandboxError::Unresponsive(why)) if req.signal == SIGKILL && eid.is_empty() => {
                sb.kill_vm(&format!(
                    "the agent did not answer SIGKILL of container {cid} ({why}); every task of the sandbox exits {VM_GONE_EXIT_STATUS}"
                ))
                .await;
                self.finish(
                    cid,
                    eid,
                    ExitInfo {
                        status: VM_GONE_EXIT_STATUS,
                        exited_at_unix_ns: now_ns(),
                        pid,
                    },
                )
                .await;
                return Ok(api::Empty::new());
            }
            Err(e) => return Err(e.into()),
        }
        if state == Status::CREATED {
            // Never started: no watcher will see it die. Report the exit here.
            let _ = pid;
            self.finish(
                cid,
                eid,
                ExitInfo {
                    status: 128 + req.signal,
                    exited_at_unix_ns: now_ns(),
                    pid,
                },
            )
            .await;
        }
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let closer = self.proc_state(&req.id, &req.exec_id, |_, p| Ok(p.close_stdin.clone()))?;
        if req.stdin {
            if let Some(c) = closer {
                c.notify_one();
            }
        }
        Ok(api::Empty::new())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        self.proc_state(&req.id, "", |_, _| Ok(()))?;
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        serde_json::from_slice::<serde_json::Value>(&resources).map_err(|e| {
            status(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("update resources are not LinuxResources JSON: {e}"),
            )
        })?;
        let sb = self.sandbox().await?;
        sb.update_container(&req.id, resources).await?;
        Ok(api::Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let mut rx = self.proc_state(&req.id, &req.exec_id, |_, p| Ok(p.exit.subscribe()))?;
        let exit = loop {
            if let Some(e) = *rx.borrow_and_update() {
                break e;
            }
            if rx.changed().await.is_err() {
                // The process was deleted without an exit: it never ran.
                return Err(not_found(format!(
                    "process {:?} of container {}",
                    req.exec_id, req.id
                )));
            }
        };
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp_from_ns(exit.exited_at_unix_ns)),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        self.proc_state(&req.id, "", |_, _| Ok(()))?;
        let sb = self.sandbox().await?;
        let s = sb.stats(&req.id).await?;
        let metrics = stats_to_metrics(&s);
        let value = metrics
            .write_to_bytes()
            .map_err(|e| status(ttrpc::Code::INTERNAL, e.to_string()))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(Any {
                type_url: CGROUPS_V2_METRICS.to_owned(),
                value,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = {
            let map = self.lock();
            map.get(&req.id).map(|c| c.init.pid).unwrap_or(0)
        };
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        if !self.is_empty() {
            return Ok(api::Empty::new());
        }
        self.shutdown_sandbox().await;
        self.inner.exit.signal();
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
#[path = "task_tests.rs"]
mod tests;
