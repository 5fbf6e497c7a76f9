//! Host side of a pod's network: Kata's "tcfilter" model.
//!
//! containerd's CRI creates the pod's network namespace and runs the CNI plugins in it; they leave a
//! veth (usually `eth0`) there carrying the pod IP, its routes and maybe static neighbours. capsa
//! does not change any of that. For every such interface it creates, inside the same namespace, a
//! tap device (`tap<N>_capsa`, opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`) and joins the two
//! with tc: an `ingress` qdisc on each and a match-all u32 filter whose action is `mirred egress
//! redirect` to the other one. Every frame arriving on the veth leaves through the tap into the VMM,
//! and every frame the guest sends comes out of the veth, unchanged at layer 2. The guest NIC gets
//! the veth's MAC, name, MTU, addresses, routes and neighbours (see [`PodInterface`] and its
//! conversions into the agent API), so the pod IP lives in the guest and the namespace's own stack
//! is bypassed (frames arriving on the veth are stolen by the filter before it sees them).
//!
//! Why this model: any CNI plugin works unchanged (bridge, ptp, Calico, Cilium...), since all of them
//! end in a veth in the namespace; no bridge or MAC rewriting is needed; and the VMM gets ready-made
//! tap fds, so it needs no CAP_NET_ADMIN and never enters the namespace.
//!
//! Entry points: [`PodNetwork::setup`] (discover + taps + tc, undone on failure),
//! [`PodNetwork::teardown`], [`cleanup_netns`] for a shim that lost its state, [`discover`] and
//! [`run_in_netns`]; [`sandbox`] strings them together around a sandbox VM (spec → taps → VMM
//! devices → guest configuration → teardown) for the shim and other front ends. All netlink work
//! runs on a dedicated thread that entered the namespace (see [`netns`]); the caller's threads never
//! change namespace. This layer is pod-generic: the containerd
//! shim and a CRI server both call it.

pub mod discover;
pub mod netns;
pub mod port_forward;
pub mod sandbox;
pub mod tap;
pub mod tc;

#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use capsa_proto::agent;
use futures_util::TryStreamExt;
use rtnetlink::LinkUnspec;
use tracing::{debug, info, warn};

pub use discover::{format_mac, IpPrefix, PodInterface, PodNeighbour, PodRoute};
pub use netns::{open_netns, run_in_netns, NetlinkHandle};
pub use sandbox::{netns_path, GuestNetworkError, SandboxNetwork};
pub use tap::{is_capsa_tap, tap_name, VNET_HDR_LEN};

/// What went wrong setting up or tearing down a pod's network; every variant names the namespace,
/// interface or request concerned.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network namespace {path}: does not exist")]
    NetnsNotFound { path: PathBuf },
    #[error("network namespace {path}: not a network namespace: {reason}")]
    NotANetns { path: PathBuf, reason: String },
    #[error("network namespace {path}: cannot open: {source}")]
    NetnsOpen { path: PathBuf, source: io::Error },
    #[error("network namespace {path}: setns(CLONE_NEWNET) failed: {source}")]
    Setns { path: PathBuf, source: io::Error },
    #[error("network namespace {path}: cannot start the worker thread or its runtime: {source}")]
    Thread { path: PathBuf, source: io::Error },
    #[error("network namespace {path}: the worker thread panicked")]
    ThreadPanicked { path: PathBuf },
    #[error("network namespace {path}: cannot open an rtnetlink socket: {source}")]
    NetlinkSocket { path: PathBuf, source: io::Error },
    #[error("netlink {request} on {interface}: {source}")]
    Netlink {
        request: &'static str,
        interface: String,
        source: rtnetlink::Error,
    },
    #[error("network namespace {path}: no network interface to give the pod (only lo)")]
    NoInterfaces { path: PathBuf },
    #[error("tap {name}: {op}: {source}{hint}")]
    Tap {
        name: String,
        op: &'static str,
        hint: &'static str,
        source: io::Error,
    },
    #[error("interface {interface} already has an ingress qdisc (left by an earlier run? see cleanup_netns)")]
    IngressQdiscExists { interface: String },
    #[error("tap {name} vanished right after creation")]
    TapMissing { name: String },
}

impl NetworkError {
    /// True when the namespace is gone (deleted, or its bind mount removed): nothing left to undo
    /// inside it.
    pub fn is_netns_gone(&self) -> bool {
        matches!(self, Self::NetnsNotFound { .. } | Self::NotANetns { .. })
    }
}

/// One pod interface joined to its tap.
#[derive(Debug)]
pub struct Endpoint {
    /// The veth as discovered; what the guest NIC must be configured as.
    pub interface: PodInterface,
    pub tap_name: String,
    pub tap_index: u32,
    tap: Option<OwnedFd>,
}

impl Endpoint {
    /// The tap fd (blocking, close-on-exec, vnet header of [`VNET_HDR_LEN`] bytes) for the VMM;
    /// `None` once taken or torn down.
    pub fn tap_fd(&self) -> Option<BorrowedFd<'_>> {
        self.tap.as_ref().map(|f| f.as_fd())
    }

    /// Takes ownership of the tap fd (the tap lives as long as some fd on it is open).
    pub fn take_tap_fd(&mut self) -> Option<OwnedFd> {
        self.tap.take()
    }
}

/// A pod's network as set up by [`PodNetwork::setup`]: owns the tap fds. Call
/// [`teardown`](Self::teardown) when the sandbox goes away; dropping it only closes the fds.
#[derive(Debug)]
pub struct PodNetwork {
    netns: PathBuf,
    endpoints: Vec<Endpoint>,
}

/// What [`cleanup_netns`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    /// capsa taps deleted (only those some process still held open).
    pub taps_deleted: Vec<String>,
    /// Interfaces whose ingress qdisc (with capsa's redirect) was deleted.
    pub qdiscs_deleted: Vec<String>,
    /// capsa's port-forward redirect rules deleted (see [`port_forward`]).
    pub port_forward_rules_deleted: usize,
}

/// Discovers the pod interfaces of the namespace at `netns` (everything but `lo`, non-Ethernet
/// devices and capsa's own taps).
pub async fn discover(netns: &Path) -> Result<Vec<PodInterface>, NetworkError> {
    run_in_netns(
        netns,
        |h| async move { discover::discover_interfaces(&h).await },
    )
    .await
}

impl PodNetwork {
    /// Sets up the network of the pod namespace at `netns`: a tap per pod interface (sorted by
    /// name: `eth0` gets `tap0_capsa`), joined to it by tc redirects. On failure everything done so
    /// far is undone (no tap, qdisc or filter is left), and so it is if this future is dropped
    /// before it completes.
    pub async fn setup(netns: &Path) -> Result<PodNetwork, NetworkError> {
        let path = netns.to_path_buf();
        let worker_path = path.clone();
        // Should this future be dropped midway, the worker undoes its own work.
        let endpoints = netns::run_in_netns_or_undo(
            netns,
            move |h| async move { setup_in_netns(&h, &worker_path).await },
            |h, endpoints: Vec<Endpoint>| async move {
                for e in &endpoints {
                    let (index, name) = (e.interface.index, &e.interface.name);
                    if let Err(err) = tc::del_ingress_qdisc(&h, index, name).await {
                        warn!(interface = %name, error = %err, "undo: removing the ingress qdisc failed");
                    }
                }
            },
        )
        .await?;
        for e in &endpoints {
            info!(netns = %path.display(), interface = %e.interface.name, tap = %e.tap_name,
                mac = %format_mac(&e.interface.mac), mtu = e.interface.mtu, "pod interface joined to tap");
        }
        Ok(PodNetwork {
            netns: path,
            endpoints,
        })
    }

    /// The namespace path this network lives in.
    pub fn netns(&self) -> &Path {
        &self.netns
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    pub fn endpoints_mut(&mut self) -> &mut [Endpoint] {
        &mut self.endpoints
    }

    /// `UpdateInterface` payloads, one per endpoint.
    pub fn agent_interfaces(&self) -> Vec<agent::Interface> {
        self.endpoints
            .iter()
            .map(|e| e.interface.to_agent_interface())
            .collect()
    }

    /// The `UpdateRoutes` list (all endpoints).
    pub fn agent_routes(&self) -> Vec<agent::Route> {
        self.endpoints
            .iter()
            .flat_map(|e| e.interface.to_agent_routes())
            .collect()
    }

    /// The `AddARPNeighbors` list (all endpoints).
    pub fn agent_neighbours(&self) -> Vec<agent::ARPNeighbor> {
        self.endpoints
            .iter()
            .flat_map(|e| e.interface.to_agent_neighbours())
            .collect()
    }

    /// Removes the ingress qdiscs (and so the filters) capsa added to the veths and closes the tap
    /// fds; each tap disappears once the last fd on it (the VMM's too) is closed. Idempotent; when
    /// the namespace is already gone (containerd deletes it after CNI DEL) it only closes the fds.
    /// On a netlink failure the fds are closed anyway and the error is returned; calling again
    /// retries the qdisc removal.
    pub async fn teardown(&mut self) -> Result<(), NetworkError> {
        if self.endpoints.is_empty() {
            return Ok(());
        }
        let veths: Vec<(u32, String)> = self
            .endpoints
            .iter()
            .map(|e| (e.interface.index, e.interface.name.clone()))
            .collect();
        let result = run_in_netns(&self.netns, move |h| async move {
            let mut first_err = None;
            for (index, name) in &veths {
                if let Err(e) = tc::del_ingress_qdisc(&h, *index, name).await {
                    warn!(interface = %name, error = %e, "removing the ingress qdisc failed");
                    first_err.get_or_insert(e);
                }
            }
            first_err.map_or(Ok(()), Err)
        })
        .await;
        for e in &mut self.endpoints {
            drop(e.tap.take());
        }
        match result {
            Ok(()) => {
                info!(netns = %self.netns.display(), "pod network torn down");
                self.endpoints.clear();
                Ok(())
            }
            Err(e) if e.is_netns_gone() => {
                info!(netns = %self.netns.display(), "network namespace already gone; closed the tap fds");
                self.endpoints.clear();
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        if !self.endpoints.is_empty() {
            warn!(netns = %self.netns.display(), "PodNetwork dropped without teardown; the veths keep their ingress qdisc");
        }
    }
}

/// Undoes capsa's plumbing in the namespace at `netns` without any in-memory state (a shim
/// `delete` after the shim died): deletes capsa's taps still held open somewhere and, on every
/// other interface, the ingress qdisc *only if* it holds a filter whose action carries capsa's
/// cookie (so qdiscs added by anyone else stay). A missing namespace is not an error.
pub async fn cleanup_netns(netns: &Path) -> Result<CleanupReport, NetworkError> {
    let ns_path = netns.to_path_buf();
    let result = run_in_netns(netns, |h| async move {
        let mut report = CleanupReport::default();
        let links: Vec<_> = h
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| NetworkError::Netlink {
                request: "RTM_GETLINK dump",
                interface: "all interfaces".into(),
                source,
            })?;
        for link in links {
            let Some(name) = link.attributes.iter().find_map(|a| match a {
                rtnetlink::packet_route::link::LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            }) else {
                continue;
            };
            let index = link.header.index;
            if is_capsa_tap(&name) {
                match h.link().del(index).execute().await {
                    Ok(()) => report.taps_deleted.push(name),
                    Err(e) if tc::errno(&e) == Some(libc::ENODEV) => {}
                    Err(source) => {
                        return Err(NetworkError::Netlink {
                            request: "RTM_DELLINK",
                            interface: name,
                            source,
                        })
                    }
                }
                continue;
            }
            let filters = tc::ingress_filters(&h, index, &name).await?;
            if filters.iter().any(tc::is_capsa_filter)
                && tc::del_ingress_qdisc(&h, index, &name).await?
            {
                report.qdiscs_deleted.push(name);
            }
        }
        // The port-forward redirect points at a listener of the shim that is gone.
        match port_forward::remove_rules_here(&ns_path) {
            Ok(n) => report.port_forward_rules_deleted = n,
            Err(e) => warn!("cleanup: {e}"),
        }
        Ok(report)
    })
    .await;
    match result {
        Err(e) if e.is_netns_gone() => {
            debug!(netns = %netns.display(), "cleanup: network namespace already gone");
            Ok(CleanupReport::default())
        }
        Ok(report) => {
            info!(netns = %netns.display(), taps = ?report.taps_deleted, qdiscs = ?report.qdiscs_deleted,
                port_forward_rules = report.port_forward_rules_deleted,
                "cleaned up capsa's pod network plumbing");
            Ok(report)
        }
        other => other,
    }
}

/// Inside the namespace: discover, then plumb interface after interface; on error undo everything.
async fn setup_in_netns(h: &NetlinkHandle, path: &Path) -> Result<Vec<Endpoint>, NetworkError> {
    let mut interfaces = discover::discover_interfaces(h).await?;
    if interfaces.is_empty() {
        return Err(NetworkError::NoInterfaces {
            path: path.to_path_buf(),
        });
    }
    interfaces.sort_by(|a, b| a.name.cmp(&b.name));
    let mut endpoints = Vec::new();
    // Veths whose ingress qdisc we added, to remove on failure.
    let mut veth_qdiscs: Vec<(u32, String)> = Vec::new();
    for (n, iface) in interfaces.into_iter().enumerate() {
        match plumb(h, n, iface, &mut veth_qdiscs).await {
            Ok(ep) => endpoints.push(ep),
            Err(e) => {
                warn!(netns = %path.display(), error = %e, "pod network setup failed; undoing it");
                for (index, name) in &veth_qdiscs {
                    if let Err(undo) = tc::del_ingress_qdisc(h, *index, name).await {
                        warn!(interface = %name, error = %undo, "undo: removing the ingress qdisc failed");
                    }
                }
                // Closing the fds removes the taps (and their qdiscs and filters with them).
                drop(endpoints);
                return Err(e);
            }
        }
    }
    Ok(endpoints)
}

/// Creates the `n`-th tap and joins it to `iface`. On error the tap fd is dropped here (removing the
/// tap); a veth qdisc added is recorded in `veth_qdiscs` for the caller to undo.
async fn plumb(
    h: &NetlinkHandle,
    n: usize,
    iface: PodInterface,
    veth_qdiscs: &mut Vec<(u32, String)>,
) -> Result<Endpoint, NetworkError> {
    let tap_name = tap::tap_name(n);
    let fd = tap::create_tap(&tap_name)?;
    let link = h
        .link()
        .get()
        .match_name(tap_name.clone())
        .execute()
        .try_next()
        .await
        .map_err(|source| NetworkError::Netlink {
            request: "RTM_GETLINK",
            interface: tap_name.clone(),
            source,
        })?
        .ok_or_else(|| NetworkError::TapMissing {
            name: tap_name.clone(),
        })?;
    let tap_index = link.header.index;
    h.link()
        .set(
            LinkUnspec::new_with_index(tap_index)
                .mtu(iface.mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(|source| NetworkError::Netlink {
            request: "RTM_SETLINK mtu+up",
            interface: tap_name.clone(),
            source,
        })?;
    tc::add_ingress_qdisc(h, iface.index, &iface.name).await?;
    veth_qdiscs.push((iface.index, iface.name.clone()));
    tc::add_ingress_qdisc(h, tap_index, &tap_name).await?;
    tc::add_redirect(h, (iface.index, &iface.name), (tap_index, &tap_name)).await?;
    tc::add_redirect(h, (tap_index, &tap_name), (iface.index, &iface.name)).await?;
    debug!(interface = %iface.name, tap = %tap_name, tap_index, "tap joined");
    Ok(Endpoint {
        interface: iface,
        tap_name,
        tap_index,
        tap: Some(fd),
    })
}
