//! The pod network as a resource of a sandbox: what a front end (the containerd shim, a future CRI
//! server) calls around booting the pod's VM.
//!
//! 1. [`netns_path`]: the sandbox's OCI spec names the pod's network namespace (CRI puts the path of
//!    the namespace it ran CNI in); no path (host network, `ctr run`) = no pod network.
//! 2. [`SandboxNetwork::setup`]: taps joined to the namespace's veths ([`PodNetwork::setup`]).
//! 3. [`SandboxNetwork::take_vmm_devices`]: the tap fds as [`NetDevice`]s for [`crate::vm::VmConfig`],
//!    with the veth's MAC and MTU, so the guest NIC is a copy of the veth.
//! 4. [`SandboxNetwork::configure_guest`], once the agent answers: UpdateInterface per interface,
//!    UpdateRoutes, AddARPNeighbors.
//! 5. [`SandboxNetwork::start_port_forward`]: CRI PortForward into the guest.
//! 6. [`SandboxNetwork::teardown`] when the sandbox goes (stop, failed boot, dead VMM), or
//!    [`super::cleanup_netns`] on the namespace when the process holding this state is gone.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use capsa_proto::agent;
use capsa_proto::ttrpc;
use capsa_proto::AgentServiceClient;
use tracing::{info, warn};

use super::port_forward::PortForwarder;
use super::{format_mac, NetworkError, PodNetwork};
use crate::vm::NetDevice;

/// The network namespace path of an OCI runtime spec (`linux.namespaces[type=network].path`), if it
/// names one. `None` for a spec without a network namespace (host network) or with a new, unnamed one
/// (`path` missing or empty: nothing to take interfaces from).
pub fn netns_path(spec: &serde_json::Value) -> Option<PathBuf> {
    spec.get("linux")?
        .get("namespaces")?
        .as_array()?
        .iter()
        .find(|ns| ns.get("type").and_then(|t| t.as_str()) == Some("network"))?
        .get("path")
        .and_then(|p| p.as_str())
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// [`netns_path`] of a spec in JSON (the bundle's `config.json`); `None` when it does not parse.
pub fn netns_path_from_json(spec_json: &[u8]) -> Option<PathBuf> {
    serde_json::from_slice::<serde_json::Value>(spec_json)
        .ok()
        .as_ref()
        .and_then(netns_path)
}

/// An agent call configuring the guest's network failed.
#[derive(Debug, thiserror::Error)]
#[error("guest network: {request} {what}: {source}")]
pub struct GuestNetworkError {
    pub request: &'static str,
    /// The interface, or the number of routes or neighbours, concerned.
    pub what: String,
    #[source]
    pub source: ttrpc::Error,
}

/// A sandbox's pod network: the [`PodNetwork`] in its namespace plus the steps around the VM.
#[derive(Debug)]
pub struct SandboxNetwork {
    net: PodNetwork,
    /// CRI PortForward into the guest, once the VM runs (see [`Self::start_port_forward`]).
    port_forward: Option<PortForwarder>,
}

impl SandboxNetwork {
    /// Sets up the pod network of the spec's namespace; `Ok(None)` when the spec names none. A path
    /// that does not exist is [`NetworkError::NetnsNotFound`] (naming it), with nothing left behind.
    pub async fn from_spec(spec: &serde_json::Value) -> Result<Option<Self>, NetworkError> {
        match netns_path(spec) {
            Some(path) => Ok(Some(Self::setup(&path).await?)),
            None => Ok(None),
        }
    }

    /// Sets up the pod network of the namespace at `netns`.
    pub async fn setup(netns: &Path) -> Result<Self, NetworkError> {
        let net = PodNetwork::setup(netns).await?;
        Ok(SandboxNetwork {
            net,
            port_forward: None,
        })
    }

    pub fn netns(&self) -> &Path {
        self.net.netns()
    }

    pub fn pod_network(&self) -> &PodNetwork {
        &self.net
    }

    /// The VMM's net devices, one per pod interface in order (eth0 first): each takes its tap fd
    /// (so this returns each device once) with the veth's MAC and MTU. Drop them after
    /// [`crate::vm::Vm::start`]: the taps then live exactly as long as the VMM.
    pub fn take_vmm_devices(&mut self) -> Vec<NetDevice> {
        self.net
            .endpoints_mut()
            .iter_mut()
            .filter_map(|e| {
                let fd = e.take_tap_fd()?;
                Some(NetDevice {
                    tap: Arc::new(fd),
                    mac: Some(e.interface.mac),
                    mtu: Some(e.interface.mtu),
                })
            })
            .collect()
    }

    /// Gives the guest its network through the agent: UpdateInterface for each interface (the agent
    /// finds the NIC by the veth's MAC), then UpdateRoutes, then AddARPNeighbors (skipped when there
    /// are none). Each call has `timeout`.
    pub async fn configure_guest(
        &self,
        client: &AgentServiceClient,
        timeout: Duration,
    ) -> Result<(), GuestNetworkError> {
        let ctx =
            || ttrpc::context::with_timeout(i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX));
        for iface in self.net.agent_interfaces() {
            let what = format!("{} ({})", iface.name, iface.hw_addr);
            let req = agent::UpdateInterfaceRequest {
                interface: protobuf::MessageField::some(iface),
                ..Default::default()
            };
            client
                .update_interface(ctx(), &req)
                .await
                .map_err(|source| GuestNetworkError {
                    request: "UpdateInterface",
                    what,
                    source,
                })?;
        }
        let routes = self.net.agent_routes();
        let n_routes = routes.len();
        let req = agent::UpdateRoutesRequest {
            routes: protobuf::MessageField::some(agent::Routes {
                routes,
                ..Default::default()
            }),
            ..Default::default()
        };
        client
            .update_routes(ctx(), &req)
            .await
            .map_err(|source| GuestNetworkError {
                request: "UpdateRoutes",
                what: format!("{n_routes} routes"),
                source,
            })?;
        let neighbors = self.net.agent_neighbours();
        let n_neigh = neighbors.len();
        if !neighbors.is_empty() {
            let req = agent::AddARPNeighborsRequest {
                neighbors,
                ..Default::default()
            };
            client
                .add_arp_neighbors(ctx(), &req)
                .await
                .map_err(|source| GuestNetworkError {
                    request: "AddARPNeighbors",
                    what: format!("{n_neigh} neighbours"),
                    source,
                })?;
        }
        for e in self.net.endpoints() {
            info!(netns = %self.netns().display(), interface = %e.interface.name,
                mac = %format_mac(&e.interface.mac), addresses = ?e.interface.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                routes = n_routes, neighbours = n_neigh, "guest network configured");
        }
        Ok(())
    }

    /// Makes CRI PortForward reach the guest (see [`super::port_forward`]): connections to
    /// `127.0.0.1:PORT` in the pod's namespace go to `127.0.0.1:PORT` in the guest behind the VMM's
    /// hybrid-vsock socket `vsock_uds`. A failure (no iptables on the node, say) is logged and the
    /// pod runs without it: PortForward then fails as it did before, and nothing else does.
    pub async fn start_port_forward(&mut self, vsock_uds: &Path) {
        if self.port_forward.is_some() {
            return;
        }
        match PortForwarder::start(self.netns(), vsock_uds).await {
            Ok(f) => self.port_forward = Some(f),
            Err(e) => {
                warn!(netns = %self.netns().display(), "CRI PortForward unavailable for this pod: {e}")
            }
        }
    }

    /// Removes capsa's plumbing from the namespace and closes any tap fd still held (see
    /// [`PodNetwork::teardown`]). Idempotent; a namespace already gone is not an error.
    pub async fn teardown(&mut self) -> Result<(), NetworkError> {
        if let Some(f) = self.port_forward.take() {
            f.stop().await;
        }
        let r = self.net.teardown().await;
        if let Err(e) = &r {
            warn!(netns = %self.netns().display(), error = %e, "pod network teardown failed");
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn netns_path_from_a_spec() {
        let cri = json!({"linux": {"namespaces": [
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1234"},
            {"type": "ipc"}
        ]}});
        assert_eq!(
            netns_path(&cri),
            Some(PathBuf::from("/var/run/netns/cni-1234"))
        );
        // A new, unnamed namespace, host network, no linux section, odd types: no pod network.
        for spec in [
            json!({"linux": {"namespaces": [{"type": "network"}]}}),
            json!({"linux": {"namespaces": [{"type": "network", "path": ""}]}}),
            json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "uts"}]}}),
            json!({"linux": {"namespaces": "network"}}),
            json!({"linux": {}}),
            json!({"process": {}}),
            json!({"linux": {"namespaces": [{"type": "network", "path": 7}]}}),
        ] {
            assert_eq!(netns_path(&spec), None, "{spec}");
        }
        assert_eq!(
            netns_path_from_json(cri.to_string().as_bytes()),
            Some(PathBuf::from("/var/run/netns/cni-1234"))
        );
        assert_eq!(netns_path_from_json(b"{not json"), None);
    }

    #[tokio::test]
    async fn a_missing_netns_fails_naming_the_path() {
        let spec = json!({"linux": {"namespaces": [
            {"type": "network", "path": "/nonexistent/capsa-netns"}
        ]}});
        let err = SandboxNetwork::from_spec(&spec).await.unwrap_err();
        assert!(matches!(err, NetworkError::NetnsNotFound { .. }), "{err}");
        assert!(
            err.to_string().contains("/nonexistent/capsa-netns"),
            "{err}"
        );
        assert!(SandboxNetwork::from_spec(&json!({}))
            .await
            .unwrap()
            .is_none());
    }
}
