//! The real [`Sandbox`]: a capsa microVM ([`crate::vm::Vm`]) and its agent.
//!
//! Root file systems reach the guest one of two ways (`hypervisor.rootfs_mode`):
//! - virtio-fs (the default when virtiofsd is found): the VM boots with its sandbox directory's `shared/`
//!   served by virtiofsd; CreateSandbox mounts it at [`GUEST_SHARED_DIR`] (and a tmpfs for the pod's
//!   /dev/shm); each container's `bundle/rootfs` and host bind sources are bind-mounted under it
//!   ([`super::shared_fs`]), so every container of a pod gets its rootfs, writes reach the snapshot, and
//!   CRI's /etc/hosts, resolv.conf, hostname and termination-log are carried in.
//! - block (fallback): the rootfs is copied into a sparse ext4 image (`mkfs.ext4 -d`) given to the VM as
//!   `/dev/vda`. Disks attach at boot only, so only the container that boots the VM gets a rootfs; a
//!   second container of a pod is refused, host bind mounts are dropped, writes stay in the image.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use capsa_proto::agent;
use capsa_proto::protobuf::EnumOrUnknown;
use capsa_proto::ttrpc;
use capsa_proto::AgentServiceClient;

use super::config::{CapsaConfig, ContainerLimits, RootfsMode};
use super::sandbox::{
    ContainerRequest, ContainerStats, ExitInfo, Sandbox, SandboxError, SandboxFactory,
};
use super::shared_fs::{
    shared_guest_spec, ContainerShare, PodVolumes, GUEST_SHARED_DIR, GUEST_SHM_DIR,
};
use crate::network::{GuestNetworkError, NetworkError, SandboxNetwork};
use crate::virtiofsd::SharedFsConfig;
use crate::vm::{Disk, Vm, VmConfig};

/// Where a container's rootfs storage is mounted in the guest (not under `/run/capsa/containers`,
/// which is the agent's libcontainer state root: a directory there makes "container already exists").
pub fn guest_rootfs(cid: &str) -> String {
    format!("/run/capsa/storage/{cid}/rootfs")
}

/// File name of the rootfs image inside the bundle (containerd removes the bundle on delete).
pub const ROOTFS_IMAGE: &str = "capsa-rootfs.ext4";

/// Slack on top of an agent call's deadline for the outer timer, which also bounds a send that cannot
/// complete (a frozen VMM that stopped reading its socket).
const OUTER_MARGIN: Duration = Duration::from_secs(1);
/// How long [`VmSandbox::kill_vm`] waits for a SIGKILLed VMM to be gone.
const KILL_WAIT: Duration = Duration::from_secs(5);

fn is_deadline(e: &ttrpc::Error) -> bool {
    matches!(e, ttrpc::Error::Others(m) if m.contains("deadline elapsed"))
}

fn map_err(what: &str, e: ttrpc::Error) -> SandboxError {
    match e {
        ttrpc::Error::RpcStatus(s) => {
            let msg = format!("{what}: {}", s.message());
            match s.code() {
                ttrpc::Code::NOT_FOUND => SandboxError::NotFound(msg),
                ttrpc::Code::ALREADY_EXISTS => SandboxError::AlreadyExists(msg),
                ttrpc::Code::FAILED_PRECONDITION => SandboxError::FailedPrecondition(msg),
                ttrpc::Code::INVALID_ARGUMENT => SandboxError::InvalidArgument(msg),
                ttrpc::Code::UNIMPLEMENTED => SandboxError::Unimplemented(msg),
                ttrpc::Code::DEADLINE_EXCEEDED => SandboxError::Unresponsive(msg),
                _ => SandboxError::Internal(msg),
            }
        }
        // ttrpc's own deadline: the agent is slow or stuck, which does not mean the VM is gone.
        ref e if is_deadline(e) => SandboxError::Unresponsive(format!(
            "{what}: no answer from the agent within its deadline (hypervisor.rpc_timeout_secs)"
        )),
        // The connection broke: the VM is gone.
        other => SandboxError::VmGone(format!("{what}: {other}")),
    }
}

fn unresponsive(what: &str, timeout: Duration) -> SandboxError {
    SandboxError::Unresponsive(format!(
        "{what}: no answer from the agent within {} s (hypervisor.rpc_timeout_secs)",
        timeout.as_secs()
    ))
}

/// Awaits one agent call made with a [`deadline`] context of `timeout`.
async fn bounded<T>(
    what: &str,
    timeout: Duration,
    call: impl std::future::Future<Output = ttrpc::Result<T>>,
) -> Result<T, SandboxError> {
    match tokio::time::timeout(timeout + OUTER_MARGIN, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if is_deadline(&e) => Err(unresponsive(what, timeout)),
        Ok(Err(e)) => Err(map_err(what, e)),
        Err(_) => Err(unresponsive(what, timeout)),
    }
}

/// A call context whose deadline is `timeout`.
fn deadline(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX))
}

/// A pod network that cannot be set up: a namespace that is missing or not one is the caller's
/// mistake, the rest is ours.
fn network_error(e: NetworkError) -> SandboxError {
    let msg = format!("pod network: {e}");
    if e.is_netns_gone() {
        SandboxError::InvalidArgument(msg)
    } else {
        SandboxError::Internal(msg)
    }
}

fn guest_network_error(e: GuestNetworkError) -> SandboxError {
    map_err(&format!("pod network: {} {}", e.request, e.what), e.source)
}

/// Tears the pod network down, logging (not returning) a failure: used on error paths.
async fn undo_network(network: Option<SandboxNetwork>) {
    if let Some(mut n) = network {
        let _ = n.teardown().await;
    }
}

fn unbounded() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(0)
}

/// Rewrites containerd's spec for the guest: the root is the rootfs storage, host bind mounts
/// (CRI's /etc/hosts, resolv.conf, ...; they do not exist in the guest) are dropped.
pub fn guest_spec(spec_json: &[u8], cid: &str) -> Result<Vec<u8>, SandboxError> {
    let mut spec: serde_json::Value = serde_json::from_slice(spec_json)
        .map_err(|e| SandboxError::InvalidArgument(format!("config.json: {e}")))?;
    let readonly = spec["root"]["readonly"].as_bool().unwrap_or(false);
    spec["root"] = serde_json::json!({"path": guest_rootfs(cid), "readonly": readonly});
    // Host-network pods share the node's UTS namespace, which in a VM is the guest's: its hostname
    // comes from CreateSandbox, and libcontainer refuses a hostname without a private UTS namespace.
    let has_uts = spec["linux"]["namespaces"]
        .as_array()
        .is_some_and(|ns| ns.iter().any(|n| n["type"] == "uts"));
    if !has_uts {
        if let Some(obj) = spec.as_object_mut() {
            obj.remove("hostname");
        }
    }
    if let Some(mounts) = spec.get_mut("mounts").and_then(|m| m.as_array_mut()) {
        mounts.retain(|m| {
            let bind = m["type"].as_str() == Some("bind")
                || m["options"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"));
            if bind {
                tracing::warn!(container = cid, destination = ?m["destination"], "dropping a host bind mount (no shared file system yet)");
            }
            !bind
        });
    }
    serde_json::to_vec(&spec).map_err(|e| SandboxError::Internal(e.to_string()))
}

/// Bytes the files under `dir` take (symlinks and special files count as one block).
fn tree_size(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0u64;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let md = entry.metadata()?;
            total += md.len().max(4096).div_ceil(4096) * 4096;
            if md.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(total)
}

/// Builds a sparse ext4 image holding the tree at `dir`: size = content × 1.5 + 64 MiB.
pub async fn build_rootfs_image(dir: &Path, image: &Path) -> Result<(), SandboxError> {
    let d = dir.to_owned();
    let content = tokio::task::spawn_blocking(move || tree_size(&d))
        .await
        .map_err(|e| SandboxError::Internal(e.to_string()))?
        .map_err(|e| SandboxError::Internal(format!("walk rootfs {}: {e}", dir.display())))?;
    let size = (content + content / 2 + (64 << 20)).div_ceil(1 << 20) << 20;
    let f = std::fs::File::create(image)
        .map_err(|e| SandboxError::Internal(format!("create {}: {e}", image.display())))?;
    f.set_len(size)
        .map_err(|e| SandboxError::Internal(format!("size {}: {e}", image.display())))?;
    drop(f);
    let out = tokio::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
        .arg(dir)
        .arg(image)
        .output()
        .await
        .map_err(|e| SandboxError::Internal(format!("run mkfs.ext4 (e2fsprogs): {e}")))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(image);
        return Err(SandboxError::Internal(format!(
            "mkfs.ext4 -d {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The host's memory (`MemTotal` of /proc/meminfo) in MiB; `None` when it cannot be read.
fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024)
}

/// Boots capsa microVMs per [`CapsaConfig`].
pub struct VmFactory {
    pub config: CapsaConfig,
}

#[async_trait]
impl SandboxFactory for VmFactory {
    async fn boot(
        &self,
        sandbox_id: &str,
        first: &ContainerRequest,
    ) -> Result<Arc<dyn Sandbox>, SandboxError> {
        crate::timeline::step(sandbox_id, "boot_begin");
        let spec: serde_json::Value = serde_json::from_slice(&first.spec_json)
            .map_err(|e| SandboxError::InvalidArgument(format!("config.json: {e}")))?;
        let annotations = super::bootstrap::annotations_of(&spec);
        let size = self
            .config
            .vm_size(&annotations, ContainerLimits::from_spec(&spec))
            .map_err(|e| SandboxError::InvalidArgument(e.to_string()))?;
        if let Some(host_mib) = host_memory_mib() {
            CapsaConfig::check_host_memory(size, host_mib)
                .map_err(|e| SandboxError::InvalidArgument(e.to_string()))?;
        }
        let (mode, virtiofsd) = self
            .config
            .hypervisor
            .resolve_rootfs_mode()
            .map_err(|e| SandboxError::FailedPrecondition(e.to_string()))?;
        let image = first.bundle.join(ROOTFS_IMAGE);
        if mode == RootfsMode::Block {
            build_rootfs_image(&first.rootfs, &image).await?;
        }

        let h = &self.config.hypervisor;
        let mut vm_config = VmConfig::new(h.path.clone(), h.kernel.clone(), h.initrd.clone());
        vm_config.vcpus = size.vcpus;
        vm_config.memory_mib = u32::try_from(size.memory_mib).unwrap_or(u32::MAX);
        vm_config.run_root = self.config.runtime.state_dir.clone();
        vm_config.seccomp = h.seccomp;
        vm_config.jail = h.jail_config();
        // The VMM and virtiofsd are charged to the pod (Kata's sandbox_cgroup_only); without a
        // cgroupsPath (`capsa run`) they get capsa's own `capsa/<sandbox id>`.
        if let Some(p) = spec["linux"]["cgroupsPath"]
            .as_str()
            .filter(|p| !p.is_empty())
        {
            vm_config.cgroup = crate::jail::CgroupPlacement::SpecPath(p.to_owned());
        }
        match &virtiofsd {
            Some(v) => vm_config.shared_fs = Some(SharedFsConfig::new(v.clone())),
            None => {
                vm_config.disks = vec![Disk {
                    path: image.clone(),
                    readonly: false,
                }]
            }
        }
        h.apply_timeouts(&mut vm_config);
        if !h.kernel_params.is_empty() {
            vm_config.extra_cmdline = h
                .kernel_params
                .split_whitespace()
                .map(String::from)
                .collect();
        }
        if h.debug_console {
            vm_config
                .extra_cmdline
                .extend(super::debug_console::DEBUG_CMDLINE.map(String::from));
        }
        // The pod's network namespace (CRI's, with the CNI veth): taps joined to its interfaces
        // become the VM's NICs. No namespace path (host network, `ctr run`): loopback only.
        let mut network = match SandboxNetwork::from_spec(&spec).await {
            Ok(n) => n,
            Err(e) => {
                let _ = std::fs::remove_file(&image);
                return Err(network_error(e));
            }
        };
        if let Some(n) = network.as_mut() {
            vm_config.net = n.take_vmm_devices();
        }
        tracing::info!(
            sandbox = sandbox_id,
            vcpus = size.vcpus,
            memory_mib = size.memory_mib,
            rootfs_mode = ?mode,
            netns = ?network.as_ref().map(|n| n.netns().display().to_string()),
            "booting sandbox VM"
        );
        let started = Vm::start(&vm_config, sandbox_id).await;
        // The VMM has its own copies of the tap fds: ours go, so the taps live as long as it does.
        vm_config.net.clear();
        let vm = match started {
            Ok(vm) => vm,
            Err(e) => {
                undo_network(network).await;
                let _ = std::fs::remove_file(&image);
                return Err(SandboxError::Internal(format!("boot sandbox VM: {e}")));
            }
        };
        // For `capsa list`/`inspect`/`metrics`: which pod this VM is (display only).
        if let Some(pod) = crate::sandboxes::PodIdentity::from_annotations(&annotations) {
            if let Err(e) = pod.write(&vm.paths().dir) {
                tracing::warn!(sandbox = sandbox_id, "{e}");
            }
        }
        if h.debug_console {
            // Ends by itself when the sandbox directory (and the console log in it) goes with the VM.
            super::debug_console::follow(sandbox_id.to_owned(), vm.paths().console_log.clone());
        }
        let client = vm.agent().raw().clone();
        let shared_dir = vm.shared_dir().map(Path::to_path_buf);
        let storages = if shared_dir.is_some() {
            sandbox_storages()
        } else {
            Vec::new()
        };
        let req = agent::CreateSandboxRequest {
            sandbox_id: sandbox_id.to_owned(),
            hostname: spec["hostname"].as_str().unwrap_or_default().to_owned(),
            storages: storages.clone(),
            ..Default::default()
        };
        let rpc = h.rpc_timeout();
        let created = match bounded(
            "CreateSandbox",
            rpc,
            client.create_sandbox(deadline(rpc), &req),
        )
        .await
        {
            Ok(_) => Ok(()),
            // An agent without pod support still runs standalone containers.
            Err(SandboxError::Unimplemented(_)) => {
                if storages.is_empty() {
                    Ok(())
                } else {
                    let r = agent::AddStoragesRequest {
                        storages,
                        ..Default::default()
                    };
                    bounded(
                        "AddStorages (virtio-fs share)",
                        rpc,
                        client.add_storages(deadline(rpc), &r),
                    )
                    .await
                    .map(|_| ())
                }
            }
            Err(e) => Err(e),
        };
        let created = match (created, &network) {
            (Ok(()), Some(n)) => n
                .configure_guest(&client, rpc)
                .await
                .map_err(guest_network_error),
            (r, _) => r,
        };
        if let Err(e) = created {
            let _ = vm.stop().await;
            undo_network(network).await;
            let _ = std::fs::remove_file(&image);
            return Err(e);
        }
        if let Some(n) = network.as_mut() {
            n.start_port_forward(&vm.paths().vsock).await;
        }
        let vmm_pidfd = crate::supervise::pidfd_open(vm.pid())
            .map_err(|e| tracing::warn!(sandbox = sandbox_id, error = %e, "no pidfd for the VMM: a hung guest is killed by pid"))
            .ok();
        crate::timeline::step(sandbox_id, "sandbox_created");
        Ok(Arc::new(VmSandbox {
            id: sandbox_id.to_owned(),
            pid: vm.pid(),
            vmm_pidfd,
            rpc_timeout: rpc,
            client,
            vm: tokio::sync::Mutex::new(Some(vm)),
            first_container: first.container_id.clone(),
            images: std::sync::Mutex::new(if mode == RootfsMode::Block {
                vec![image]
            } else {
                Vec::new()
            }),
            shared_dir,
            shares: std::sync::Mutex::new(HashMap::new()),
            pod_volumes: PodVolumes::default(),
            network: tokio::sync::Mutex::new(network),
        }))
    }
}

/// A running sandbox VM.
pub struct VmSandbox {
    /// The sandbox id (for the pod-start timeline).
    id: String,
    client: AgentServiceClient,
    vm: tokio::sync::Mutex<Option<Vm>>,
    pid: u32,
    /// The VMM's pidfd, for [`Sandbox::kill_vm`] (a pid could be reused once the VMM is reaped).
    vmm_pidfd: Option<std::os::fd::OwnedFd>,
    /// Deadline of each short agent call (`hypervisor.rpc_timeout_secs`).
    rpc_timeout: Duration,
    first_container: String,
    images: std::sync::Mutex<Vec<PathBuf>>,
    /// The host side of the virtio-fs share (virtio-fs mode), else `None`.
    shared_dir: Option<PathBuf>,
    /// What each container has under the share; released on remove and shutdown (and when dropped).
    shares: std::sync::Mutex<HashMap<String, ContainerShare>>,
    /// Host paths bound with mount propagation, shared once for the pod (held through `shares`).
    pod_volumes: PodVolumes,
    /// The pod network (taps and tc redirects in the pod's netns), torn down after the VM stops.
    network: tokio::sync::Mutex<Option<SandboxNetwork>>,
}

/// The storages CreateSandbox mounts in virtio-fs mode: the share, and a tmpfs for the pod's /dev/shm.
pub fn sandbox_storages() -> Vec<agent::Storage> {
    vec![
        agent::Storage {
            driver: EnumOrUnknown::new(agent::StorageDriver::STORAGE_DRIVER_VIRTIO_FS),
            source: crate::virtiofsd::DEFAULT_TAG.into(),
            fstype: "virtiofs".into(),
            mount_point: GUEST_SHARED_DIR.into(),
            ..Default::default()
        },
        agent::Storage {
            driver: EnumOrUnknown::new(agent::StorageDriver::STORAGE_DRIVER_TMPFS),
            source: "shm".into(),
            fstype: "tmpfs".into(),
            options: ["nosuid", "nodev", "noexec", "mode=1777", "size=65536k"]
                .map(String::from)
                .to_vec(),
            mount_point: GUEST_SHM_DIR.into(),
            ..Default::default()
        },
    ]
}

impl VmSandbox {
    /// A context carrying the short-call deadline.
    fn ctx(&self) -> ttrpc::context::Context {
        deadline(self.rpc_timeout)
    }

    /// Awaits a short agent call made with [`Self::ctx`], bounded even if the send itself hangs.
    async fn rpc<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = ttrpc::Result<T>>,
    ) -> Result<T, SandboxError> {
        bounded(what, self.rpc_timeout, call).await
    }

    fn shares(&self) -> std::sync::MutexGuard<'_, HashMap<String, ContainerShare>> {
        self.shares.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Unmounts and removes container `cid`'s part of the share, if it has one.
    async fn release_share(&self, cid: &str) {
        let share = self.shares().remove(cid);
        if let Some(share) = share {
            let _ = tokio::task::spawn_blocking(move || share.release()).await;
        }
    }

    async fn create_shared(
        &self,
        shared_dir: &Path,
        req: ContainerRequest,
    ) -> Result<(), SandboxError> {
        let cid = req.container_id.clone();
        if self.shares().contains_key(&cid) {
            return Err(SandboxError::AlreadyExists(format!("container {cid}")));
        }
        let spec = shared_guest_spec(&req.spec_json, &cid)?;
        let (dir, id, rootfs, binds) = (
            shared_dir.to_path_buf(),
            cid.clone(),
            req.rootfs.clone(),
            spec.binds.clone(),
        );
        let volumes = self.pod_volumes.clone();
        let share = tokio::task::spawn_blocking(move || {
            ContainerShare::create_in_pod(&dir, &id, &rootfs, &binds, &volumes)
        })
        .await
        .map_err(|e| SandboxError::Internal(e.to_string()))??;
        let r = agent::CreateContainerRequest {
            container_id: cid.clone(),
            exec_id: cid.clone(),
            oci_spec_json: spec.json,
            ..Default::default()
        };
        if let Err(e) = self
            .rpc(
                "CreateContainer",
                self.client.create_container(self.ctx(), &r),
            )
            .await
        {
            let _ = tokio::task::spawn_blocking(move || share.release()).await;
            return Err(e);
        }
        tracing::info!(container = %cid, binds = spec.binds.len(), dropped = spec.dropped.len(),
            "container created on the virtio-fs share");
        crate::timeline::container_step(&self.id, &cid, "container_created");
        self.shares().insert(cid, share);
        Ok(())
    }
}

#[async_trait]
impl Sandbox for VmSandbox {
    async fn create_container(&self, req: ContainerRequest) -> Result<(), SandboxError> {
        if let Some(dir) = self.shared_dir.clone() {
            return self.create_shared(&dir, req).await;
        }
        let cid = req.container_id.clone();
        if cid != self.first_container {
            return Err(SandboxError::Unimplemented(format!(
                "container {cid}: a second container in a pod needs rootfs_mode = \"virtio-fs\" (block mode attaches the rootfs image at boot only)"
            )));
        }
        let storage = agent::Storage {
            driver: EnumOrUnknown::new(agent::StorageDriver::STORAGE_DRIVER_BLK),
            source: "/dev/vda".into(),
            fstype: "ext4".into(),
            mount_point: guest_rootfs(&cid),
            ..Default::default()
        };
        let r = agent::CreateContainerRequest {
            container_id: cid.clone(),
            exec_id: cid.clone(),
            oci_spec_json: guest_spec(&req.spec_json, &cid)?,
            storages: vec![storage],
            ..Default::default()
        };
        self.rpc(
            "CreateContainer",
            self.client.create_container(self.ctx(), &r),
        )
        .await?;
        crate::timeline::container_step(&self.id, &cid, "container_created");
        Ok(())
    }

    async fn start_container(&self, cid: &str) -> Result<(), SandboxError> {
        let r = agent::StartContainerRequest {
            container_id: cid.into(),
            ..Default::default()
        };
        self.rpc(
            "StartContainer",
            self.client.start_container(self.ctx(), &r),
        )
        .await?;
        crate::timeline::container_step(&self.id, cid, "container_started");
        Ok(())
    }

    async fn remove_container(&self, cid: &str) -> Result<(), SandboxError> {
        let r = agent::RemoveContainerRequest {
            container_id: cid.into(),
            timeout_secs: 0,
            ..Default::default()
        };
        let result = self
            .rpc(
                "RemoveContainer",
                self.client.remove_container(self.ctx(), &r),
            )
            .await
            .map(|_| ());
        match &result {
            // The container is gone from the guest: its files can go from the share.
            Ok(()) | Err(SandboxError::NotFound(_)) | Err(SandboxError::VmGone(_)) => {
                self.release_share(cid).await
            }
            Err(_) => {}
        }
        result
    }

    async fn exec_process(
        &self,
        cid: &str,
        exec_id: &str,
        process_json: Vec<u8>,
    ) -> Result<(), SandboxError> {
        let r = agent::ExecProcessRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            oci_process_json: process_json,
            ..Default::default()
        };
        self.rpc("ExecProcess", self.client.exec_process(self.ctx(), &r))
            .await?;
        Ok(())
    }

    async fn signal_process(
        &self,
        cid: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), SandboxError> {
        let r = agent::SignalProcessRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            signal,
            all,
            ..Default::default()
        };
        self.rpc("SignalProcess", self.client.signal_process(self.ctx(), &r))
            .await?;
        Ok(())
    }

    async fn wait_process(&self, cid: &str, exec_id: &str) -> Result<ExitInfo, SandboxError> {
        let r = agent::WaitProcessRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        let w = self
            .client
            .wait_process(unbounded(), &r)
            .await
            .map_err(|e| map_err("WaitProcess", e))?;
        Ok(ExitInfo {
            status: w.exit_status,
            exited_at_unix_ns: w.exited_at_unix_ns,
            pid: w.pid,
        })
    }

    async fn read_stdout(
        &self,
        cid: &str,
        exec_id: &str,
        len: u32,
    ) -> Result<Vec<u8>, SandboxError> {
        let r = agent::ReadStreamRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            len,
            ..Default::default()
        };
        let resp = self
            .client
            .read_stdout(unbounded(), &r)
            .await
            .map_err(|e| map_err("ReadStdout", e))?;
        Ok(resp.data)
    }

    async fn read_stderr(
        &self,
        cid: &str,
        exec_id: &str,
        len: u32,
    ) -> Result<Vec<u8>, SandboxError> {
        let r = agent::ReadStreamRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            len,
            ..Default::default()
        };
        let resp = self
            .client
            .read_stderr(unbounded(), &r)
            .await
            .map_err(|e| map_err("ReadStderr", e))?;
        Ok(resp.data)
    }

    async fn write_stdin(
        &self,
        cid: &str,
        exec_id: &str,
        data: &[u8],
    ) -> Result<usize, SandboxError> {
        let r = agent::WriteStreamRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            data: data.to_vec(),
            ..Default::default()
        };
        let resp = self
            .rpc("WriteStdin", self.client.write_stdin(self.ctx(), &r))
            .await?;
        Ok(resp.len as usize)
    }

    async fn close_stdin(&self, cid: &str, exec_id: &str) -> Result<(), SandboxError> {
        let r = agent::CloseStdinRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.rpc("CloseStdin", self.client.close_stdin(self.ctx(), &r))
            .await?;
        Ok(())
    }

    async fn resize_pty(
        &self,
        cid: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), SandboxError> {
        let r = agent::TtyWinResizeRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            row: rows,
            column: cols,
            ..Default::default()
        };
        self.rpc("TtyWinResize", self.client.tty_win_resize(self.ctx(), &r))
            .await?;
        Ok(())
    }

    async fn pause(&self, cid: &str) -> Result<(), SandboxError> {
        let r = agent::PauseContainerRequest {
            container_id: cid.into(),
            ..Default::default()
        };
        self.rpc(
            "PauseContainer",
            self.client.pause_container(self.ctx(), &r),
        )
        .await?;
        Ok(())
    }

    async fn resume(&self, cid: &str) -> Result<(), SandboxError> {
        let r = agent::ResumeContainerRequest {
            container_id: cid.into(),
            ..Default::default()
        };
        self.rpc(
            "ResumeContainer",
            self.client.resume_container(self.ctx(), &r),
        )
        .await?;
        Ok(())
    }

    async fn list_processes(&self, cid: &str) -> Result<Vec<u32>, SandboxError> {
        let r = agent::ListProcessesRequest {
            container_id: cid.into(),
            ..Default::default()
        };
        let resp = self
            .rpc("ListProcesses", self.client.list_processes(self.ctx(), &r))
            .await?;
        Ok(resp.pids)
    }

    async fn update_container(
        &self,
        cid: &str,
        resources_json: Vec<u8>,
    ) -> Result<(), SandboxError> {
        let r = agent::UpdateContainerRequest {
            container_id: cid.into(),
            linux_resources_json: resources_json,
            ..Default::default()
        };
        self.rpc(
            "UpdateContainer",
            self.client.update_container(self.ctx(), &r),
        )
        .await?;
        Ok(())
    }

    async fn stats(&self, cid: &str) -> Result<ContainerStats, SandboxError> {
        let r = agent::StatsContainerRequest {
            container_id: cid.into(),
            ..Default::default()
        };
        let resp = self
            .rpc(
                "StatsContainer",
                self.client.stats_container(self.ctx(), &r),
            )
            .await?;
        let cg = resp.cgroup_stats.unwrap_or_default();
        let cpu = cg.cpu.clone().unwrap_or_default();
        let mem = cg.memory.clone().unwrap_or_default();
        let pids = cg.pids.clone().unwrap_or_default();
        let mut stat: Vec<(String, u64)> = mem.stat.into_iter().collect();
        stat.sort();
        Ok(ContainerStats {
            cpu_usage_usec: cpu.usage_usec,
            cpu_user_usec: cpu.user_usec,
            cpu_system_usec: cpu.system_usec,
            cpu_nr_periods: cpu.nr_periods,
            cpu_nr_throttled: cpu.nr_throttled,
            cpu_throttled_usec: cpu.throttled_usec,
            memory_usage_bytes: mem.usage_bytes,
            memory_limit_bytes: mem.limit_bytes,
            memory_max_usage_bytes: mem.max_usage_bytes,
            memory_swap_usage_bytes: mem.swap_usage_bytes,
            memory_oom_kill: mem.oom_kill,
            memory_stat: stat,
            pids_current: pids.current,
            pids_limit: pids.limit,
            io: cg
                .io
                .iter()
                .map(|d| (d.major, d.minor, d.rbytes, d.wbytes, d.rios, d.wios))
                .collect(),
        })
    }

    async fn next_oom_event(&self) -> Result<String, SandboxError> {
        let resp = self
            .client
            .get_oom_event(unbounded(), &agent::GetOOMEventRequest::default())
            .await
            .map_err(|e| map_err("GetOOMEvent", e))?;
        Ok(resp.container_id)
    }

    fn host_pid(&self) -> u32 {
        self.pid
    }

    async fn kill_vm(&self, reason: &str) {
        tracing::error!(
            vmm_pid = self.pid,
            "killing the VM (SIGKILL of capsa-vmm): {reason}"
        );
        let Some(fd) = &self.vmm_pidfd else {
            if let Ok(pid) = i32::try_from(self.pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            return;
        };
        match crate::supervise::pidfd_kill(fd, libc::SIGKILL) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return,
            Err(e) => {
                tracing::error!(vmm_pid = self.pid, error = %e, "cannot kill the VMM");
                return;
            }
        }
        let waited = match fd.try_clone() {
            Ok(dup) => tokio::time::timeout(KILL_WAIT, crate::supervise::wait_exit(dup))
                .await
                .map_err(|_| format!("still there after {KILL_WAIT:?}"))
                .and_then(|r| r.map_err(|e| e.to_string())),
            Err(e) => Err(e.to_string()),
        };
        match waited {
            Ok(()) => tracing::info!(vmm_pid = self.pid, "VMM killed"),
            Err(e) => tracing::warn!(vmm_pid = self.pid, "VMM killed, not seen to end: {e}"),
        }
    }

    async fn shutdown(&self) -> Result<(), SandboxError> {
        // Containers' mounts come off first: stopping the VM removes the sandbox directory.
        let shares: Vec<ContainerShare> = self.shares().drain().map(|(_, s)| s).collect();
        if !shares.is_empty() {
            let _ = tokio::task::spawn_blocking(move || {
                for s in shares {
                    s.release();
                }
            })
            .await;
        }
        let vm = self.vm.lock().await.take();
        let result = match vm {
            Some(vm) => vm
                .stop()
                .await
                .map(|_| ())
                .map_err(|e| SandboxError::Internal(format!("stop VM: {e}"))),
            None => Ok(()),
        };
        // After the VM: its taps are gone with the VMM; the veths' qdiscs go now.
        undo_network(self.network.lock().await.take()).await;
        let images = std::mem::take(&mut *self.images.lock().unwrap_or_else(|p| p.into_inner()));
        for img in images {
            let _ = std::fs::remove_file(img);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_deadline_is_not_a_dead_vm() {
        let slow = map_err(
            "SignalProcess",
            ttrpc::Error::Others("Request deadline elapsed".into()),
        );
        assert!(
            matches!(slow, SandboxError::Unresponsive(ref m) if m.contains("no answer")),
            "{slow:?}"
        );
        let broken = map_err("SignalProcess", ttrpc::Error::LocalClosed);
        assert!(matches!(broken, SandboxError::VmGone(_)), "{broken:?}");
    }

    #[tokio::test]
    async fn a_call_that_never_completes_ends_at_its_deadline() {
        let started = std::time::Instant::now();
        // Neither a reply nor ttrpc's own deadline: the send itself is stuck.
        let stuck = std::future::pending::<ttrpc::Result<()>>();
        let e = bounded("SignalProcess", Duration::from_secs(1), stuck)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, SandboxError::Unresponsive(m) if m.contains("SignalProcess") && m.contains("1 s")),
            "{e:?}"
        );
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(1) + OUTER_MARGIN && took < Duration::from_secs(5),
            "{took:?}"
        );
        // ttrpc's deadline names the call and the configured seconds too.
        let e = bounded("StartContainer", Duration::from_secs(3), async {
            Err::<(), _>(ttrpc::Error::Others("Request deadline elapsed".into()))
        })
        .await
        .unwrap_err();
        assert!(
            matches!(&e, SandboxError::Unresponsive(m) if m.contains("StartContainer") && m.contains("3 s")),
            "{e:?}"
        );
    }

    #[test]
    fn spec_is_rewritten_for_the_guest() {
        let spec = serde_json::json!({
            "root": {"path": "rootfs", "readonly": true},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/containerd/hosts", "options": ["rbind", "ro"]},
                {"destination": "/etc/resolv.conf", "source": "/x", "options": ["bind"]}
            ],
            "process": {"args": ["echo", "hello"]},
            "hostname": "h"
        });
        let out = guest_spec(spec.to_string().as_bytes(), "c1").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["root"]["path"], "/run/capsa/storage/c1/rootfs");
        assert_eq!(v["root"]["readonly"], true);
        let dests: Vec<&str> = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(dests, ["/proc"]);
        assert_eq!(v["process"]["args"][1], "hello");
        assert!(v.get("hostname").is_none(), "no UTS namespace: no hostname");
        let with_uts = serde_json::json!({"root": {"path": "rootfs"}, "hostname": "pod",
            "linux": {"namespaces": [{"type": "uts"}]}});
        let out = guest_spec(with_uts.to_string().as_bytes(), "c1").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["hostname"], "pod");
        assert!(matches!(
            guest_spec(b"{", "c1"),
            Err(SandboxError::InvalidArgument(_))
        ));
    }

    #[tokio::test]
    async fn a_missing_netns_fails_the_boot_and_leaves_nothing() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // A VMM that would leave a marker if it were ever started.
        let vmm = dir.path().join("fake-vmm");
        let marker = dir.path().join("vmm-ran");
        std::fs::write(
            &vmm,
            format!("#!/bin/sh\ntouch {}\nexit 1\n", marker.display()),
        )
        .unwrap();
        std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.path().join("k"), b"kernel").unwrap();
        let mut config = CapsaConfig::default();
        config.hypervisor.path = vmm;
        config.hypervisor.kernel = dir.path().join("k");
        config.hypervisor.initrd = None;
        // virtio-fs mode with a virtiofsd that is never started (it would be, by Vm::start).
        std::fs::write(dir.path().join("virtiofsd"), b"").unwrap();
        config.hypervisor.virtiofsd = Some(dir.path().join("virtiofsd"));
        config.hypervisor.rootfs_mode = Some(RootfsMode::VirtioFs);
        config.runtime.state_dir = dir.path().join("state");
        let bundle = dir.path().join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs/bin")).unwrap();
        let spec = serde_json::json!({"linux": {"namespaces": [
            {"type": "network", "path": "/nonexistent/capsa-netns"}
        ]}});
        let req = ContainerRequest {
            container_id: "sb".into(),
            spec_json: spec.to_string().into_bytes(),
            rootfs: bundle.join("rootfs"),
            bundle: bundle.clone(),
        };
        let factory = VmFactory { config };
        let err = match factory.boot("sb", &req).await {
            Ok(_) => panic!("booted with a missing netns"),
            Err(e) => e,
        };
        assert!(
            matches!(&err, SandboxError::InvalidArgument(m) if m.contains("/nonexistent/capsa-netns")),
            "{err:?}"
        );
        assert!(!marker.exists(), "the VMM was started");
        assert!(
            !bundle.join(ROOTFS_IMAGE).exists(),
            "the rootfs image is left"
        );
        assert!(!dir.path().join("state/sb").exists());
    }

    #[tokio::test]
    async fn rootfs_image_holds_the_tree() {
        if std::process::Command::new("mkfs.ext4")
            .arg("-V")
            .output()
            .is_err()
            || std::process::Command::new("debugfs")
                .arg("-V")
                .output()
                .is_err()
        {
            eprintln!("skipping: e2fsprogs not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rootfs");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/hello"), b"#!/bin/sh\necho hi\n").unwrap();
        let img = dir.path().join("img");
        build_rootfs_image(&root, &img).await.unwrap();
        let md = std::fs::metadata(&img).unwrap();
        assert!(md.len() >= 64 << 20);
        let out = std::process::Command::new("debugfs")
            .args(["-R", "cat /bin/hello"])
            .arg(&img)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "#!/bin/sh\necho hi\n");
        // A missing tree is an error, and no image is left behind.
        let img2 = dir.path().join("img2");
        assert!(build_rootfs_image(&dir.path().join("missing"), &img2)
            .await
            .is_err());
    }
}
