//! The host's client of the in-guest agent: ttrpc (`capsa.agent.v1.AgentService`) over a connected
//! stream, normally hybrid vsock through the VMM's Unix socket, or AF_VSOCK to a VM whose VMM offers
//! vhost-vsock (used by the QEMU comparison benchmark).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use capsa_proto::agent;
use capsa_proto::agent_ttrpc::AgentServiceClient;
use ttrpc::r#async::transport::Socket;
use ttrpc::r#async::Client;

use crate::hybrid_vsock::{self, HybridVsockError};

pub use capsa_proto::AGENT_VSOCK_PORT;

/// Default deadline of one agent call.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between readiness attempts: short, since boot time is benchmarked.
pub const READY_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Longest a single readiness attempt (connect + Check) may take.
const READY_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// With a ready notification to wait for, the pause between fallback attempts (the notification can be
/// lost, e.g. when the guest's agent predates it).
pub const NOTIFIED_FALLBACK_INTERVAL: Duration = Duration::from_millis(250);

/// Where the agent is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddress {
    /// The VMM's hybrid-vsock Unix socket and the guest port.
    Hybrid { uds: PathBuf, port: u32 },
    /// AF_VSOCK context id and port (vhost-vsock VMMs).
    Vsock { cid: u32, port: u32 },
    /// A plain Unix socket the agent listens on itself (`capsa-agent --listen unix://PATH`, tests).
    Unix(PathBuf),
}

impl AgentAddress {
    /// The agent's usual port behind a hybrid-vsock socket.
    pub fn hybrid(uds: impl Into<PathBuf>) -> Self {
        AgentAddress::Hybrid {
            uds: uds.into(),
            port: AGENT_VSOCK_PORT,
        }
    }

    /// The agent's usual port at an AF_VSOCK context id.
    pub fn vsock(cid: u32) -> Self {
        AgentAddress::Vsock {
            cid,
            port: AGENT_VSOCK_PORT,
        }
    }
}

impl std::fmt::Display for AgentAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentAddress::Hybrid { uds, port } => write!(f, "{}:{port}", uds.display()),
            AgentAddress::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            AgentAddress::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

/// Why talking to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Connect(#[from] HybridVsockError),
    #[error("cannot connect to the agent at {addr}: {source}")]
    Vsock {
        addr: String,
        #[source]
        source: ttrpc::Error,
    },
    #[error("agent call {method} failed: {source}")]
    Rpc {
        method: &'static str,
        #[source]
        source: ttrpc::Error,
    },
    #[error("agent call {method} timed out after {timeout:?}")]
    Timeout {
        method: &'static str,
        timeout: Duration,
    },
    #[error("agent answered Check with status {0}")]
    NotServing(String),
    #[error(
        "agent at {addr} not ready after {timeout:?} ({attempts} attempts); last error: {last}"
    )]
    NotReady {
        addr: String,
        timeout: Duration,
        attempts: u32,
        last: String,
    },
}

impl AgentError {
    /// The agent did not answer in time (as opposed to answering with an error or a broken connection).
    pub fn is_timeout(&self) -> bool {
        match self {
            AgentError::Timeout { .. } => true,
            AgentError::Rpc {
                source: ttrpc::Error::Others(m),
                ..
            } => m.contains("deadline elapsed"),
            _ => false,
        }
    }
}

/// Facts the agent reports about its guest (a plain copy of `GuestDetailsResponse`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GuestDetails {
    pub kernel_release: String,
    pub agent_version: String,
    pub online_cpus: u32,
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    pub uptime_ns: u64,
    pub agent_start_uptime_ns: u64,
    pub agent_is_init: bool,
    pub kernel_cmdline: String,
}

impl From<agent::GuestDetailsResponse> for GuestDetails {
    fn from(r: agent::GuestDetailsResponse) -> Self {
        GuestDetails {
            kernel_release: r.kernel_release,
            agent_version: r.agent_version,
            online_cpus: r.online_cpus,
            mem_total_bytes: r.mem_total_bytes,
            mem_available_bytes: r.mem_available_bytes,
            uptime_ns: r.uptime_ns,
            agent_start_uptime_ns: r.agent_start_uptime_ns,
            agent_is_init: r.agent_is_init,
            kernel_cmdline: r.kernel_cmdline,
        }
    }
}

/// A connected agent client. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct AgentClient {
    inner: AgentServiceClient,
    call_timeout: Duration,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("call_timeout", &self.call_timeout)
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// Wraps an already connected stream (after the hybrid-vsock handshake, or any byte stream).
    /// Must be called inside a tokio runtime.
    pub fn from_socket(socket: Socket) -> Self {
        AgentClient {
            inner: AgentServiceClient::new(Client::new(socket)),
            call_timeout: DEFAULT_CALL_TIMEOUT,
        }
    }

    /// Sets the deadline of each call made through this client.
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Connects once (no retries).
    pub async fn connect(addr: &AgentAddress, timeout: Duration) -> Result<Self, AgentError> {
        match addr {
            AgentAddress::Hybrid { uds, port } => {
                let stream = hybrid_vsock::connect(uds, *port, timeout).await?;
                Ok(Self::from_socket(Socket::from(stream)))
            }
            AgentAddress::Vsock { .. } | AgentAddress::Unix(_) => {
                let url = addr.to_string();
                let client = tokio::time::timeout(timeout, Client::connect(&url))
                    .await
                    .map_err(|_| AgentError::Vsock {
                        addr: url.clone(),
                        source: ttrpc::Error::Others(format!("timed out after {timeout:?}")),
                    })?
                    .map_err(|source| AgentError::Vsock {
                        addr: url.clone(),
                        source,
                    })?;
                Ok(AgentClient {
                    inner: AgentServiceClient::new(client),
                    call_timeout: DEFAULT_CALL_TIMEOUT,
                })
            }
        }
    }

    /// Connects and calls Check until the agent answers SERVING, retrying every
    /// [`READY_POLL_INTERVAL`] until `timeout` has passed.
    pub async fn wait_ready(addr: &AgentAddress, timeout: Duration) -> Result<Self, AgentError> {
        Self::wait_ready_inner(addr, timeout, None).await
    }

    /// Like [`wait_ready`](Self::wait_ready), but each attempt waits for a message on `ready` (the agent's
    /// connection to [`capsa_proto::READY_NOTIFY_VSOCK_PORT`]) or, failing that, for
    /// [`NOTIFIED_FALLBACK_INTERVAL`]: the host does not poke a guest that is still booting every 10 ms.
    pub async fn wait_ready_notified(
        addr: &AgentAddress,
        timeout: Duration,
        mut ready: tokio::sync::mpsc::Receiver<()>,
    ) -> Result<Self, AgentError> {
        Self::wait_ready_inner(addr, timeout, Some(&mut ready)).await
    }

    async fn wait_ready_inner(
        addr: &AgentAddress,
        timeout: Duration,
        mut ready: Option<&mut tokio::sync::mpsc::Receiver<()>>,
    ) -> Result<Self, AgentError> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut attempts = 0u32;
        let mut last = String::from("no attempt yet");
        loop {
            if let Some(rx) = ready.as_mut() {
                let wait = deadline
                    .saturating_duration_since(Instant::now())
                    .min(NOTIFIED_FALLBACK_INTERVAL);
                let notifier_gone = tokio::select! {
                    msg = rx.recv() => msg.is_none(),
                    _ = tokio::time::sleep(wait) => false,
                };
                if notifier_gone {
                    // Plain polling from here on.
                    ready = None;
                }
                if Instant::now() >= deadline {
                    return Err(AgentError::NotReady {
                        addr: addr.to_string(),
                        timeout,
                        attempts,
                        last,
                    });
                }
            }
            attempts += 1;
            let per_attempt = deadline
                .saturating_duration_since(Instant::now())
                .min(READY_ATTEMPT_TIMEOUT);
            match Self::try_ready(addr, per_attempt).await {
                Ok(client) => {
                    tracing::debug!(%addr, attempts, elapsed = ?start.elapsed(), "agent ready");
                    return Ok(client);
                }
                Err(e) => {
                    tracing::trace!(%addr, attempts, error = %e, "agent not ready yet");
                    // A malformed handshake reply will not fix itself.
                    if let AgentError::Connect(ref c) = e {
                        if !c.is_transient() {
                            return Err(e);
                        }
                    }
                    last = e.to_string();
                }
            }
            if ready.is_some() {
                continue;
            }
            if Instant::now() + READY_POLL_INTERVAL >= deadline {
                return Err(AgentError::NotReady {
                    addr: addr.to_string(),
                    timeout,
                    attempts,
                    last,
                });
            }
            tokio::time::sleep(READY_POLL_INTERVAL).await;
        }
    }

    async fn try_ready(addr: &AgentAddress, timeout: Duration) -> Result<Self, AgentError> {
        let client = Self::connect(addr, timeout).await?;
        let probe = client
            .clone()
            .with_call_timeout(timeout.max(Duration::from_millis(1)));
        probe.check().await?;
        Ok(client)
    }

    fn ctx(&self) -> ttrpc::context::Context {
        ttrpc::context::with_timeout(self.call_timeout.as_nanos().min(i64::MAX as u128) as i64)
    }

    async fn call<T>(
        &self,
        method: &'static str,
        fut: impl std::future::Future<Output = ttrpc::Result<T>>,
    ) -> Result<T, AgentError> {
        // ttrpc enforces the deadline itself; the outer timeout also covers a stuck send.
        match tokio::time::timeout(self.call_timeout + Duration::from_millis(100), fut).await {
            Ok(r) => r.map_err(|source| AgentError::Rpc { method, source }),
            Err(_) => Err(AgentError::Timeout {
                method,
                timeout: self.call_timeout,
            }),
        }
    }

    /// Liveness/readiness probe; errors unless the agent is SERVING.
    pub async fn check(&self) -> Result<(), AgentError> {
        let req = agent::CheckRequest::default();
        let resp = self
            .call("Check", self.inner.check(self.ctx(), &req))
            .await?;
        match resp.status.enum_value() {
            Ok(agent::check_response::ServingStatus::SERVING) => Ok(()),
            Ok(other) => Err(AgentError::NotServing(format!("{other:?}"))),
            Err(n) => Err(AgentError::NotServing(format!("unknown ({n})"))),
        }
    }

    /// Kernel release, vCPUs, memory, uptime and more about the guest.
    pub async fn guest_details(&self) -> Result<GuestDetails, AgentError> {
        let req = agent::GetGuestDetailsRequest::default();
        let resp = self
            .call(
                "GetGuestDetails",
                self.inner.get_guest_details(self.ctx(), &req),
            )
            .await?;
        Ok(resp.into())
    }

    /// Asks the agent to stop everything and power the VM off. The VMM exits afterwards.
    pub async fn destroy_sandbox(&self) -> Result<(), AgentError> {
        let req = agent::DestroySandboxRequest::default();
        self.call(
            "DestroySandbox",
            self.inner.destroy_sandbox(self.ctx(), &req),
        )
        .await?;
        Ok(())
    }

    /// The generated client, for calls this wrapper does not cover yet.
    pub fn raw(&self) -> &AgentServiceClient {
        &self.inner
    }

    /// Per-call deadline a caller can use with [`AgentClient::raw`].
    pub fn context(&self) -> ttrpc::context::Context {
        self.ctx()
    }
}
