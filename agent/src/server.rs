//! The ttrpc server: `capsa.agent.v1.AgentService` on vsock (or a Unix socket for tests).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use capsa_proto::agent::{self, check_response::ServingStatus};
use capsa_proto::agent_ttrpc::{create_agent_service, AgentService};
use capsa_proto::protobuf::well_known_types::empty::Empty;
use capsa_proto::AGENT_VSOCK_PORT;
use ttrpc::r#async::{Server, TtrpcContext};

use crate::guest_details::{self, AgentFacts};
use crate::reaper::Reaper;
use crate::sandbox::{self, PowerOff};

/// Where the agent listens by default: any CID, port 1024.
pub fn default_listen_addr() -> String {
    format!("vsock://-1:{AGENT_VSOCK_PORT}")
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("bind {addr}: {source}")]
    Bind { addr: String, source: ttrpc::Error },
    #[error("start server on {addr}: {source}")]
    Start { addr: String, source: ttrpc::Error },
}

/// Shared state of the agent the handlers work on. Grows with containers, storages, ...
pub struct Agent {
    pub facts: AgentFacts,
    pub power_off: PowerOff,
    /// Child-exit registry: container and exec processes register here.
    pub reaper: Reaper,
}

/// The AgentService implementation.
#[derive(Clone)]
pub struct AgentServiceImpl {
    agent: Arc<Agent>,
}

impl AgentServiceImpl {
    pub fn new(agent: Agent) -> Self {
        Self {
            agent: Arc::new(agent),
        }
    }
}

fn status_error(code: ttrpc::Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

fn unimplemented_error(method: &str) -> ttrpc::Error {
    status_error(
        ttrpc::Code::UNIMPLEMENTED,
        format!(
            "capsa-agent {}: {method} is not implemented yet",
            env!("CARGO_PKG_VERSION")
        ),
    )
}

/// Writes the `AgentService` impl: the methods given as they are, plus methods that answer
/// UNIMPLEMENTED. (`#[async_trait]` must see the expanded methods, so it goes inside the macro.)
macro_rules! agent_service_impl {
    (
        implemented { $($implemented:item)* }
        unimplemented { $($method:ident($req:ty) -> $resp:ty, $name:literal;)* }
    ) => {
        #[async_trait]
        impl AgentService for AgentServiceImpl {
            $($implemented)*
            $(
                async fn $method(&self, _ctx: &TtrpcContext, _req: $req) -> ttrpc::Result<$resp> {
                    tracing::debug!(concat!($name, ": unimplemented"));
                    Err(unimplemented_error($name))
                }
            )*
        }
    };
}

agent_service_impl! {
implemented {
    async fn check(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::CheckRequest,
    ) -> ttrpc::Result<agent::CheckResponse> {
        let mut r = agent::CheckResponse::new();
        r.status = ServingStatus::SERVING.into();
        Ok(r)
    }

    async fn get_guest_details(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::GetGuestDetailsRequest,
    ) -> ttrpc::Result<agent::GuestDetailsResponse> {
        guest_details::collect(&self.agent.facts).map_err(|e| {
            tracing::warn!("GetGuestDetails: {e}");
            status_error(ttrpc::Code::INTERNAL, e)
        })
    }

    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::DestroySandboxRequest,
    ) -> ttrpc::Result<Empty> {
        tracing::info!("DestroySandbox: replying, then powering off");
        sandbox::schedule_power_off(self.agent.power_off.clone());
        Ok(Empty::new())
    }

}
    unimplemented {
        set_guest_date_time(agent::SetGuestDateTimeRequest) -> Empty, "SetGuestDateTime";
        online_cpu_mem(agent::OnlineCPUMemRequest) -> Empty, "OnlineCPUMem";
        get_metrics(agent::GetMetricsRequest) -> agent::Metrics, "GetMetrics";
        create_sandbox(agent::CreateSandboxRequest) -> Empty, "CreateSandbox";
        add_storages(agent::AddStoragesRequest) -> Empty, "AddStorages";
        copy_file(agent::CopyFileRequest) -> Empty, "CopyFile";
        create_container(agent::CreateContainerRequest) -> Empty, "CreateContainer";
        start_container(agent::StartContainerRequest) -> Empty, "StartContainer";
        remove_container(agent::RemoveContainerRequest) -> Empty, "RemoveContainer";
        update_container(agent::UpdateContainerRequest) -> Empty, "UpdateContainer";
        stats_container(agent::StatsContainerRequest) -> agent::StatsContainerResponse, "StatsContainer";
        pause_container(agent::PauseContainerRequest) -> Empty, "PauseContainer";
        resume_container(agent::ResumeContainerRequest) -> Empty, "ResumeContainer";
        list_processes(agent::ListProcessesRequest) -> agent::ListProcessesResponse, "ListProcesses";
        get_oom_event(agent::GetOOMEventRequest) -> agent::OOMEvent, "GetOOMEvent";
        exec_process(agent::ExecProcessRequest) -> Empty, "ExecProcess";
        signal_process(agent::SignalProcessRequest) -> Empty, "SignalProcess";
        wait_process(agent::WaitProcessRequest) -> agent::WaitProcessResponse, "WaitProcess";
        read_stdout(agent::ReadStreamRequest) -> agent::ReadStreamResponse, "ReadStdout";
        read_stderr(agent::ReadStreamRequest) -> agent::ReadStreamResponse, "ReadStderr";
        write_stdin(agent::WriteStreamRequest) -> agent::WriteStreamResponse, "WriteStdin";
        close_stdin(agent::CloseStdinRequest) -> Empty, "CloseStdin";
        tty_win_resize(agent::TtyWinResizeRequest) -> Empty, "TtyWinResize";
        update_interface(agent::UpdateInterfaceRequest) -> agent::Interface, "UpdateInterface";
        update_routes(agent::UpdateRoutesRequest) -> agent::Routes, "UpdateRoutes";
        list_interfaces(agent::ListInterfacesRequest) -> agent::Interfaces, "ListInterfaces";
        list_routes(agent::ListRoutesRequest) -> agent::Routes, "ListRoutes";
        add_arp_neighbors(agent::AddARPNeighborsRequest) -> Empty, "AddARPNeighbors";
    }
}

/// Binds `addr` (`vsock://CID:PORT` or `unix:///path`) and starts serving. The returned server
/// must be kept alive.
pub async fn start(addr: &str, service: AgentServiceImpl) -> Result<Server, ServeError> {
    if let Some(path) = addr.strip_prefix("unix://") {
        // A stale socket from an earlier run would make bind fail.
        let _ = std::fs::remove_file(path);
    }
    let services = create_agent_service(Arc::new(service));
    let mut server = Server::new()
        .bind(addr)
        .map_err(|source| ServeError::Bind {
            addr: addr.to_string(),
            source,
        })?
        .register_service(services);
    server.start().await.map_err(|source| ServeError::Start {
        addr: addr.to_string(),
        source,
    })?;
    Ok(server)
}

/// Starts the server, retrying with back-off (the vsock transport may come up after the agent).
/// `max_attempts`: `None` = forever (PID 1 must never give up).
pub async fn start_with_retry(
    addr: &str,
    service: AgentServiceImpl,
    max_attempts: Option<u32>,
) -> Result<Server, ServeError> {
    let mut delay = Duration::from_millis(10);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match start(addr, service.clone()).await {
            Ok(server) => return Ok(server),
            Err(e) if max_attempts.is_some_and(|max| attempt >= max) => return Err(e),
            Err(e) => {
                tracing::warn!("{e}; retrying in {delay:?} (attempt {attempt})");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsa_proto::agent_ttrpc::AgentServiceClient;
    use tokio::sync::mpsc;

    const TIMEOUT_NS: i64 = 5_000_000_000;

    async fn start_test_server(
        dir: &std::path::Path,
    ) -> (Server, AgentServiceClient, mpsc::UnboundedReceiver<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let service = AgentServiceImpl::new(Agent {
            facts: AgentFacts {
                start_uptime_ns: 42,
                is_init: false,
            },
            power_off: PowerOff::Notify(tx),
            reaper: Reaper::new(),
        });
        let addr = format!("unix://{}", dir.join("agent.sock").display());
        let server = start_with_retry(&addr, service, Some(3))
            .await
            .expect("server starts");
        let client = ttrpc::r#async::Client::connect(&addr)
            .await
            .expect("client connects");
        (server, AgentServiceClient::new(client), rx)
    }

    #[tokio::test]
    async fn check_and_guest_details_over_unix_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut server, client, _rx) = start_test_server(dir.path()).await;

        let ctx = || ttrpc::context::with_timeout(TIMEOUT_NS);
        let check = client
            .check(ctx(), &agent::CheckRequest::new())
            .await
            .expect("Check");
        assert_eq!(check.status.enum_value(), Ok(ServingStatus::SERVING));

        let d = client
            .get_guest_details(ctx(), &agent::GetGuestDetailsRequest::new())
            .await
            .expect("GetGuestDetails");
        assert_eq!(d.agent_version, env!("CARGO_PKG_VERSION"));
        assert!(!d.kernel_release.is_empty());
        assert!(d.online_cpus >= 1);
        assert!(d.mem_total_bytes > 0);
        assert_eq!(d.agent_start_uptime_ns, 42);
        assert!(!d.agent_is_init);

        server.shutdown().await.expect("shutdown");
    }

    #[tokio::test]
    async fn unimplemented_and_destroy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut server, client, mut rx) = start_test_server(dir.path()).await;
        let ctx = || ttrpc::context::with_timeout(TIMEOUT_NS);

        let err = client
            .create_container(ctx(), &agent::CreateContainerRequest::new())
            .await
            .expect_err("CreateContainer is not implemented");
        match err {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), ttrpc::Code::UNIMPLEMENTED);
                assert!(s.message().contains("CreateContainer"), "{}", s.message());
            }
            other => panic!("unexpected error {other:?}"),
        }

        client
            .destroy_sandbox(ctx(), &agent::DestroySandboxRequest::new())
            .await
            .expect("DestroySandbox replies");
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("power-off scheduled")
            .expect("power-off notified");

        server.shutdown().await.expect("shutdown");
    }
}
