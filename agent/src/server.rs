//! The ttrpc server: `capsa.agent.v1.AgentService` on vsock (or a Unix socket for tests).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use capsa_proto::agent::{self, check_response::ServingStatus};
use capsa_proto::agent_ttrpc::{create_agent_service, AgentService};
use capsa_proto::protobuf::well_known_types::empty::Empty;
use capsa_proto::AGENT_VSOCK_PORT;
use ttrpc::r#async::{Server, TtrpcContext};

use crate::container::Containers;
use crate::guest_details::{self, AgentFacts};
use crate::network;
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
    containers: Arc<Containers>,
}

impl AgentServiceImpl {
    /// Must be called inside the tokio runtime (the container manager starts its OOM poller).
    pub fn new(agent: Agent) -> Self {
        let containers = Containers::new(agent.reaper.clone(), Default::default());
        Self {
            agent: Arc::new(agent),
            containers,
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
        self.containers.kill_all();
        sandbox::schedule_power_off(self.agent.power_off.clone());
        Ok(Empty::new())
    }

    async fn create_sandbox(&self, _ctx: &TtrpcContext, req: agent::CreateSandboxRequest) -> ttrpc::Result<Empty> {
        self.containers.create_sandbox(&req.hostname, &req.storages).await?;
        Ok(Empty::new())
    }

    async fn add_storages(&self, _ctx: &TtrpcContext, req: agent::AddStoragesRequest) -> ttrpc::Result<Empty> {
        self.containers.add_storages(&req.storages).await?;
        Ok(Empty::new())
    }

    async fn set_guest_date_time(&self, _ctx: &TtrpcContext, req: agent::SetGuestDateTimeRequest) -> ttrpc::Result<Empty> {
        crate::container::guest::set_time(req.sec, req.usec)?;
        Ok(Empty::new())
    }

    async fn copy_file(&self, _ctx: &TtrpcContext, req: agent::CopyFileRequest) -> ttrpc::Result<Empty> {
        crate::container::guest::copy_file(&req)?;
        Ok(Empty::new())
    }

    async fn get_metrics(&self, _ctx: &TtrpcContext, _req: agent::GetMetricsRequest) -> ttrpc::Result<agent::Metrics> {
        let mut m = agent::Metrics::new();
        m.metrics = crate::container::guest::metrics();
        Ok(m)
    }

    async fn create_container(&self, _ctx: &TtrpcContext, req: agent::CreateContainerRequest) -> ttrpc::Result<Empty> {
        let id = req.container_id.clone();
        self.containers.create_container(req).await.map_err(|e| {
            tracing::warn!(container = %id, "CreateContainer: {e}");
            e
        })?;
        Ok(Empty::new())
    }

    async fn start_container(&self, _ctx: &TtrpcContext, req: agent::StartContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.start_container(&req.container_id).await?;
        Ok(Empty::new())
    }

    async fn remove_container(&self, _ctx: &TtrpcContext, req: agent::RemoveContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.remove_container(&req.container_id, req.timeout_secs).await?;
        Ok(Empty::new())
    }

    async fn update_container(&self, _ctx: &TtrpcContext, req: agent::UpdateContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.update(&req.container_id, &req.linux_resources_json).await?;
        Ok(Empty::new())
    }

    async fn stats_container(&self, _ctx: &TtrpcContext, req: agent::StatsContainerRequest) -> ttrpc::Result<agent::StatsContainerResponse> {
        Ok(self.containers.stats(&req.container_id).await?)
    }

    async fn pause_container(&self, _ctx: &TtrpcContext, req: agent::PauseContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.pause(&req.container_id, true).await?;
        Ok(Empty::new())
    }

    async fn resume_container(&self, _ctx: &TtrpcContext, req: agent::ResumeContainerRequest) -> ttrpc::Result<Empty> {
        self.containers.pause(&req.container_id, false).await?;
        Ok(Empty::new())
    }

    async fn list_processes(&self, _ctx: &TtrpcContext, req: agent::ListProcessesRequest) -> ttrpc::Result<agent::ListProcessesResponse> {
        Ok(self.containers.list_processes(&req.container_id, &req.format).await?)
    }

    async fn get_oom_event(&self, _ctx: &TtrpcContext, _req: agent::GetOOMEventRequest) -> ttrpc::Result<agent::OOMEvent> {
        let mut e = agent::OOMEvent::new();
        e.container_id = self.containers.oom_event().await?;
        Ok(e)
    }

    async fn exec_process(&self, _ctx: &TtrpcContext, req: agent::ExecProcessRequest) -> ttrpc::Result<Empty> {
        self.containers.exec_process(req).await?;
        Ok(Empty::new())
    }

    async fn signal_process(&self, _ctx: &TtrpcContext, req: agent::SignalProcessRequest) -> ttrpc::Result<Empty> {
        self.containers.signal_process(&req.container_id, &req.exec_id, req.signal, req.all).await?;
        Ok(Empty::new())
    }

    async fn wait_process(&self, _ctx: &TtrpcContext, req: agent::WaitProcessRequest) -> ttrpc::Result<agent::WaitProcessResponse> {
        Ok(self.containers.wait_process(&req.container_id, &req.exec_id).await?)
    }

    async fn read_stdout(&self, _ctx: &TtrpcContext, req: agent::ReadStreamRequest) -> ttrpc::Result<agent::ReadStreamResponse> {
        let mut r = agent::ReadStreamResponse::new();
        r.data = self.containers.read_stream(&req.container_id, &req.exec_id, false, req.len).await?;
        Ok(r)
    }

    async fn read_stderr(&self, _ctx: &TtrpcContext, req: agent::ReadStreamRequest) -> ttrpc::Result<agent::ReadStreamResponse> {
        let mut r = agent::ReadStreamResponse::new();
        r.data = self.containers.read_stream(&req.container_id, &req.exec_id, true, req.len).await?;
        Ok(r)
    }

    async fn write_stdin(&self, _ctx: &TtrpcContext, req: agent::WriteStreamRequest) -> ttrpc::Result<agent::WriteStreamResponse> {
        let mut r = agent::WriteStreamResponse::new();
        r.len = self.containers.write_stdin(&req.container_id, &req.exec_id, &req.data).await?;
        Ok(r)
    }

    async fn close_stdin(&self, _ctx: &TtrpcContext, req: agent::CloseStdinRequest) -> ttrpc::Result<Empty> {
        self.containers.close_stdin(&req.container_id, &req.exec_id).await?;
        Ok(Empty::new())
    }

    async fn tty_win_resize(&self, _ctx: &TtrpcContext, req: agent::TtyWinResizeRequest) -> ttrpc::Result<Empty> {
        self.containers.tty_resize(&req.container_id, &req.exec_id, req.row, req.column).await?;
        Ok(Empty::new())
    }

    async fn update_interface(&self, _ctx: &TtrpcContext, req: agent::UpdateInterfaceRequest) -> ttrpc::Result<agent::Interface> {
        let empty = agent::Interface::new();
        let iface = req.interface.as_ref().unwrap_or(&empty);
        network::update_interface(iface).await.map_err(|e| {
            tracing::warn!(hw_addr = %iface.hw_addr, "UpdateInterface: {e}");
            e.into()
        })
    }

    async fn update_routes(&self, _ctx: &TtrpcContext, req: agent::UpdateRoutesRequest) -> ttrpc::Result<agent::Routes> {
        network::update_routes(&req).await.map_err(|e| {
            tracing::warn!("UpdateRoutes: {e}");
            e.into()
        })
    }

    async fn add_arp_neighbors(&self, _ctx: &TtrpcContext, req: agent::AddARPNeighborsRequest) -> ttrpc::Result<Empty> {
        network::add_arp_neighbors(&req).await.map_err(|e| {
            tracing::warn!("AddARPNeighbors: {e}");
            ttrpc::Error::from(e)
        })?;
        Ok(Empty::new())
    }

    async fn list_interfaces(&self, _ctx: &TtrpcContext, _req: agent::ListInterfacesRequest) -> ttrpc::Result<agent::Interfaces> {
        Ok(network::list_interfaces().await?)
    }

    async fn list_routes(&self, _ctx: &TtrpcContext, _req: agent::ListRoutesRequest) -> ttrpc::Result<agent::Routes> {
        Ok(network::list_routes().await?)
    }

}
    unimplemented {
        online_cpu_mem(agent::OnlineCPUMemRequest) -> Empty, "OnlineCPUMem";
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
            .online_cpu_mem(ctx(), &agent::OnlineCPUMemRequest::new())
            .await
            .expect_err("OnlineCPUMem is not implemented");
        match err {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), ttrpc::Code::UNIMPLEMENTED);
                assert!(s.message().contains("OnlineCPUMem"), "{}", s.message());
            }
            other => panic!("unexpected error {other:?}"),
        }
        // Bad input to an implemented call: an error naming the problem, the server keeps going.
        match client
            .create_container(ctx(), &agent::CreateContainerRequest::new())
            .await
        {
            Err(ttrpc::Error::RpcStatus(s)) => {
                assert_eq!(s.code(), ttrpc::Code::INVALID_ARGUMENT);
                assert!(s.message().contains("container id"), "{}", s.message());
            }
            other => panic!("unexpected reply {other:?}"),
        }
        // Network requests are checked before the kernel is asked anything.
        match client
            .update_interface(ctx(), &agent::UpdateInterfaceRequest::new())
            .await
        {
            Err(ttrpc::Error::RpcStatus(s)) => {
                assert_eq!(s.code(), ttrpc::Code::INVALID_ARGUMENT);
                assert!(s.message().contains("interface.hw_addr"), "{}", s.message());
            }
            other => panic!("unexpected reply {other:?}"),
        }
        let mut route = agent::Route::new();
        route.dest = "10.0.0.0/33".into();
        route.device = "eth0".into();
        let mut routes = agent::Routes::new();
        routes.routes.push(route);
        let mut req = agent::UpdateRoutesRequest::new();
        req.routes = Some(routes).into();
        match client.update_routes(ctx(), &req).await {
            Err(ttrpc::Error::RpcStatus(s)) => {
                assert_eq!(s.code(), ttrpc::Code::INVALID_ARGUMENT);
                assert!(s.message().contains("routes[0].dest"), "{}", s.message());
            }
            other => panic!("unexpected reply {other:?}"),
        }
        match client
            .wait_process(ctx(), &agent::WaitProcessRequest::new())
            .await
        {
            Err(ttrpc::Error::RpcStatus(s)) => assert_eq!(s.code(), ttrpc::Code::NOT_FOUND),
            other => panic!("unexpected reply {other:?}"),
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
