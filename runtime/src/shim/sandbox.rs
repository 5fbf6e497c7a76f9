//! What the task service needs from a sandbox (a VM with its agent), as a trait so the service can be
//! tested against a fake and driven by the real VM ([`super::vm_sandbox`]).

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;

/// Errors of sandbox operations; they map onto the gRPC codes containerd expects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SandboxError {
    #[error("{0}: not found")]
    NotFound(String),
    #[error("{0}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}: not supported by capsa")]
    Unimplemented(String),
    /// The VM (or its agent connection) is gone: every process in it is dead.
    #[error("sandbox VM is gone: {0}")]
    VmGone(String),
    /// The agent did not answer within the call's deadline (`hypervisor.rpc_timeout_secs`): the guest is
    /// hung or overloaded. The VM may still run.
    #[error("{0}")]
    Unresponsive(String),
    #[error("{0}")]
    Internal(String),
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExitInfo {
    /// Exit code, or 128 + signal.
    pub status: u32,
    /// Unix nanoseconds.
    pub exited_at_unix_ns: u64,
    pub pid: u32,
}

/// Exit status reported for processes of a VM that died under them (as if SIGKILLed).
pub const VM_GONE_EXIT_STATUS: u32 = 128 + 9;

/// A container to create in the sandbox.
#[derive(Debug, Clone)]
pub struct ContainerRequest {
    pub container_id: String,
    /// The bundle's `config.json`, unchanged.
    pub spec_json: Vec<u8>,
    /// The container's root file system on the host (the mounted `bundle/rootfs`).
    pub rootfs: PathBuf,
    /// The bundle directory on the host.
    pub bundle: PathBuf,
}

/// cgroup v2 statistics of a container, as the agent reports them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerStats {
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub cpu_nr_periods: u64,
    pub cpu_nr_throttled: u64,
    pub cpu_throttled_usec: u64,
    pub memory_usage_bytes: u64,
    pub memory_limit_bytes: u64,
    pub memory_max_usage_bytes: u64,
    pub memory_swap_usage_bytes: u64,
    pub memory_oom_kill: u64,
    pub memory_stat: Vec<(String, u64)>,
    pub pids_current: u64,
    pub pids_limit: u64,
    /// (major, minor, rbytes, wbytes, rios, wios)
    pub io: Vec<(u64, u64, u64, u64, u64, u64)>,
}

/// One VM with its agent. Processes are named by (container id, exec id); the empty exec id is the
/// container's init process.
#[async_trait]
pub trait Sandbox: Send + Sync + 'static {
    async fn create_container(&self, req: ContainerRequest) -> Result<(), SandboxError>;
    async fn start_container(&self, cid: &str) -> Result<(), SandboxError>;
    async fn remove_container(&self, cid: &str) -> Result<(), SandboxError>;
    async fn exec_process(
        &self,
        cid: &str,
        exec_id: &str,
        process_json: Vec<u8>,
    ) -> Result<(), SandboxError>;
    async fn signal_process(
        &self,
        cid: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), SandboxError>;
    /// Blocks until the process exits.
    async fn wait_process(&self, cid: &str, exec_id: &str) -> Result<ExitInfo, SandboxError>;
    /// Up to `len` bytes; empty = end of stream.
    async fn read_stdout(
        &self,
        cid: &str,
        exec_id: &str,
        len: u32,
    ) -> Result<Vec<u8>, SandboxError>;
    async fn read_stderr(
        &self,
        cid: &str,
        exec_id: &str,
        len: u32,
    ) -> Result<Vec<u8>, SandboxError>;
    /// Bytes accepted, possibly fewer than offered.
    async fn write_stdin(
        &self,
        cid: &str,
        exec_id: &str,
        data: &[u8],
    ) -> Result<usize, SandboxError>;
    async fn close_stdin(&self, cid: &str, exec_id: &str) -> Result<(), SandboxError>;
    async fn resize_pty(
        &self,
        cid: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), SandboxError>;
    async fn pause(&self, cid: &str) -> Result<(), SandboxError>;
    async fn resume(&self, cid: &str) -> Result<(), SandboxError>;
    async fn list_processes(&self, cid: &str) -> Result<Vec<u32>, SandboxError>;
    async fn update_container(
        &self,
        cid: &str,
        resources_json: Vec<u8>,
    ) -> Result<(), SandboxError>;
    async fn stats(&self, cid: &str) -> Result<ContainerStats, SandboxError>;
    /// Blocks until some container hits an OOM kill; returns its id.
    async fn next_oom_event(&self) -> Result<String, SandboxError>;
    /// Pid of the VMM process on the host (what containerd shows as the shim's task pid).
    fn host_pid(&self) -> u32;
    /// Kills the VM at once (SIGKILL of the VMM, no word to the guest) because `reason`, and waits a
    /// bounded time for it to be gone: for a guest that no longer answers. Every process in it then ends
    /// as [`VM_GONE_EXIT_STATUS`]; [`shutdown`](Self::shutdown) still cleans up the host side.
    async fn kill_vm(&self, reason: &str);
    /// Powers the VM off and removes everything it had on the host.
    async fn shutdown(&self) -> Result<(), SandboxError>;
}

/// Boots sandboxes. The shim boots one per pod, when the pod's first container is created.
#[async_trait]
pub trait SandboxFactory: Send + Sync + 'static {
    /// `first` is the container whose creation boots the VM (the pod's sandbox container under CRI,
    /// the only container under `ctr run`).
    async fn boot(
        &self,
        sandbox_id: &str,
        first: &ContainerRequest,
    ) -> Result<Arc<dyn Sandbox>, SandboxError>;
}
