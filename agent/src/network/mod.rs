//! The network RPCs: UpdateInterface, UpdateRoutes, AddARPNeighbors, ListInterfaces, ListRoutes.
//!
//! The agent runs in the guest's network namespace, which is the pod's (containers share it), and
//! configures it over rtnetlink (no `ip` subprocess). Semantics follow Kata's agent:
//! - requests are checked completely first ([`parse`]); INVALID_ARGUMENT and NOT_FOUND mean nothing
//!   was changed. INTERNAL means the kernel refused a step (the error names it); earlier steps of that
//!   request stay applied.
//! - one rtnetlink connection per request; its task is aborted when the request ends, and every
//!   request is bounded by [`NETLINK_TIMEOUT`]. Requests that change something run one at a time.

pub mod nl;
pub mod parse;

#[cfg(test)]
mod netns_tests;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use capsa_proto::agent;
use rtnetlink::packet_route::route::{RouteProtocol, RouteType};
use rtnetlink::LinkUnspec;

use nl::{Link, Netlink, RT_TABLE_MAIN};
use parse::{format_mac, is_ipv6_link_local, Family, InterfaceRequest, IpNet};

/// Longest a network request may take talking to the kernel.
pub const NETLINK_TIMEOUT: Duration = Duration::from_secs(30);

/// Smallest MTU with which the kernel keeps IPv6 on a device.
const IPV6_MIN_MTU: u32 = 1280;

/// Errors of the network RPCs, mapped to ttrpc codes.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Internal(String),
}

impl NetError {
    pub fn code(&self) -> ttrpc::Code {
        match self {
            NetError::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            NetError::NotFound(_) => ttrpc::Code::NOT_FOUND,
            NetError::Internal(_) => ttrpc::Code::INTERNAL,
        }
    }
}

impl From<NetError> for ttrpc::Error {
    fn from(e: NetError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

type Result<T> = std::result::Result<T, NetError>;

/// Serialises the requests that change the namespace's configuration.
static CHANGES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `f` against a fresh connection, within [`NETLINK_TIMEOUT`].
async fn with_netlink<T, F, Fut>(f: F) -> Result<T>
where
    F: FnOnce(Netlink) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let nl = Netlink::open()?;
    tokio::time::timeout(NETLINK_TIMEOUT, f(nl))
        .await
        .map_err(|_| {
            NetError::Internal(format!(
                "netlink did not answer within {}s",
                NETLINK_TIMEOUT.as_secs()
            ))
        })?
}

fn by_name<'a>(links: &'a [Link], name: &str) -> Option<&'a Link> {
    links.iter().find(|l| l.name == name)
}

/// UpdateInterface: finds the link by MAC, renames it, sets its MTU, makes its addresses exactly the
/// requested ones (IPv6 link-local addresses stay), sets it up (and ARP off when `raw_flags` has
/// IFF_NOARP). Returns the interface as the kernel now reports it.
pub async fn update_interface(req: &agent::Interface) -> Result<agent::Interface> {
    let want = parse::parse_interface(req)?;
    let _one_at_a_time = CHANGES.lock().await;
    with_netlink(|nl| async move {
        let links = nl.links().await?;
        let link = links
            .iter()
            .find(|l| l.mac == want.mac)
            .ok_or_else(|| {
                NetError::NotFound(format!(
                    "interface.hw_addr {:?}: no interface has this MAC address",
                    req.hw_addr
                ))
            })?
            .clone();
        check_against_link(&want, &link, &links)?;
        let result = apply_interface(&nl, &want, &link).await;
        if result.is_err() {
            // Do not leave the device down (renaming takes it down): best effort.
            let _ = nl
                .set_link("", LinkUnspec::new_with_index(link.index).up())
                .await;
        }
        result?;
        let link = nl.link(link.index).await?;
        let addrs = nl.addresses(Some(link.index)).await?;
        Ok(to_interface(&link, addrs.iter().map(|a| a.net)))
    })
    .await
}

/// The checks that need the kernel's view: the new name is free, the MTU within the device's range.
fn check_against_link(want: &InterfaceRequest, link: &Link, links: &[Link]) -> Result<()> {
    if let Some(name) = &want.name {
        if let Some(other) = by_name(links, name).filter(|o| o.index != link.index) {
            return Err(NetError::InvalidArgument(format!(
                "interface.name {name:?} is already the name of another interface (hw_addr {})",
                format_mac(&other.mac)
            )));
        }
    }
    if let Some(mtu) = want.mtu {
        let min = link.min_mtu.unwrap_or(0);
        let max = link.max_mtu.filter(|m| *m > 0).unwrap_or(u32::MAX);
        if mtu < min || mtu > max {
            return Err(NetError::InvalidArgument(format!(
                "interface.mtu {mtu} is outside what {} takes ({min}..={max})",
                link.name
            )));
        }
    }
    let mtu = want.mtu.unwrap_or(link.mtu);
    if let Some(v6) = want.addresses.iter().find(|a| a.family() == Family::V6) {
        if mtu < IPV6_MIN_MTU {
            return Err(NetError::InvalidArgument(format!(
                "interface.ip_addresses has IPv6 address {v6} but the MTU {mtu} is below {IPV6_MIN_MTU}, \
                 which turns IPv6 off on the device"
            )));
        }
    }
    Ok(())
}

async fn apply_interface(nl: &Netlink, want: &InterfaceRequest, link: &Link) -> Result<()> {
    let index = link.index;
    let mut dev = link.name.clone();
    if let Some(name) = want.name.as_ref().filter(|n| **n != link.name) {
        nl.set_link(
            &format!("setting {dev} down to rename it"),
            LinkUnspec::new_with_index(index).down(),
        )
        .await?;
        nl.set_link(
            &format!("renaming {dev} to {name}"),
            LinkUnspec::new_with_index(index).name(name.clone()),
        )
        .await?;
        dev = name.clone();
    }
    if let Some(mtu) = want.mtu.filter(|m| *m != link.mtu) {
        nl.set_link(
            &format!("setting the MTU of {dev} to {mtu}"),
            LinkUnspec::new_with_index(index).mtu(mtu),
        )
        .await?;
    }
    for a in nl.addresses(Some(index)).await? {
        if !is_ipv6_link_local(&a.net.addr) && !want.addresses.contains(&a.net) {
            nl.del_address(&a, &dev).await?;
        }
    }
    // Added even when present: removing a primary IPv4 address may have taken a wanted secondary
    // with it, and NLM_F_REPLACE makes this idempotent.
    for a in &want.addresses {
        nl.add_address(index, *a, &dev).await?;
    }
    let mut up = LinkUnspec::new_with_index(index).up();
    if want.noarp {
        up = up.arp(false);
    }
    nl.set_link(&format!("setting {dev} up"), up).await
}

fn to_ip_address(net: IpNet) -> agent::IPAddress {
    let mut a = agent::IPAddress::new();
    a.family = net.family().to_proto().into();
    a.address = net.addr.to_string();
    a.mask = net.prefix.to_string();
    a
}

fn to_interface(link: &Link, addrs: impl Iterator<Item = IpNet>) -> agent::Interface {
    let mut i = agent::Interface::new();
    i.device = link.name.clone();
    i.name = link.name.clone();
    i.ip_addresses = addrs.map(to_ip_address).collect();
    i.mtu = u64::from(link.mtu);
    i.hw_addr = format_mac(&link.mac);
    i.type_ = link.kind.clone().unwrap_or_default();
    i.raw_flags = link.flags.bits();
    i
}

/// ListInterfaces: every link but loopback, with its addresses, by index.
pub async fn list_interfaces() -> Result<agent::Interfaces> {
    with_netlink(|nl| async move {
        let mut links = nl.links().await?;
        links.retain(|l| !l.is_loopback());
        links.sort_by_key(|l| l.index);
        let mut addrs: BTreeMap<u32, Vec<IpNet>> = BTreeMap::new();
        for a in nl.addresses(None).await? {
            addrs.entry(a.index).or_default().push(a.net);
        }
        let mut out = agent::Interfaces::new();
        out.interfaces = links
            .iter()
            .map(|l| to_interface(l, addrs.remove(&l.index).unwrap_or_default().into_iter()))
            .collect();
        Ok(out)
    })
    .await
}

/// Routes this module reports and manages: unicast routes of the main table through a device.
fn is_main_unicast(r: &nl::Route) -> bool {
    r.table == RT_TABLE_MAIN && r.kind == RouteType::Unicast && r.oif.is_some()
}

async fn read_routes(nl: &Netlink) -> Result<agent::Routes> {
    let links = nl.links().await?;
    let names: BTreeMap<u32, &Link> = links.iter().map(|l| (l.index, l)).collect();
    let mut out = agent::Routes::new();
    for r in nl.routes().await?.into_iter().filter(is_main_unicast) {
        let Some(link) = r.oif.and_then(|i| names.get(&i)) else {
            continue;
        };
        if link.is_loopback() {
            continue;
        }
        let mut p = agent::Route::new();
        p.dest = if r.dest.is_default() {
            String::new()
        } else {
            r.dest.to_string()
        };
        p.gateway = r.gateway.map(|g| g.to_string()).unwrap_or_default();
        p.device = link.name.clone();
        p.source = r.source.map(|s| s.to_string()).unwrap_or_default();
        p.scope = u32::from(r.scope);
        p.family = r.family.to_proto().into();
        p.flags = r.flags;
        out.routes.push(p);
    }
    Ok(out)
}

/// ListRoutes: the main table's unicast routes, loopback's left out.
pub async fn list_routes() -> Result<agent::Routes> {
    with_netlink(|nl| async move { read_routes(&nl).await }).await
}

/// UpdateRoutes: on every device the request names, deletes the main table's routes except those
/// the kernel made for addresses (protocol kernel, including IPv6 link-local ones) and adds the
/// requested ones, device routes before gateway routes. Returns ListRoutes.
pub async fn update_routes(req: &agent::UpdateRoutesRequest) -> Result<agent::Routes> {
    let empty = agent::Routes::new();
    let routes = req.routes.as_ref().unwrap_or(&empty);
    let want = parse::parse_routes(&routes.routes)?;
    let _one_at_a_time = CHANGES.lock().await;
    with_netlink(|nl| async move {
        let links = nl.links().await?;
        let mut oifs = Vec::with_capacity(want.len());
        for r in &want {
            let link = by_name(&links, &r.device).ok_or_else(|| {
                NetError::InvalidArgument(format!(
                    "routes[{}].device {:?} does not exist",
                    r.index, r.device
                ))
            })?;
            oifs.push(link.index);
        }
        let devices: BTreeSet<u32> = oifs.iter().copied().collect();
        for r in nl.routes().await? {
            let ours = is_main_unicast(&r) && r.oif.is_some_and(|i| devices.contains(&i));
            let kept = r.protocol == RouteProtocol::Kernel || is_ipv6_link_local(&r.dest.addr);
            if ours && !kept {
                nl.del_route(&r).await?;
            }
        }
        for (r, oif) in want.iter().zip(oifs) {
            nl.add_route(r, oif).await?;
        }
        read_routes(&nl).await
    })
    .await
}

/// AddARPNeighbors: adds or replaces neighbour entries (ARP for IPv4, NDP for IPv6), permanent unless
/// the request gives a state.
pub async fn add_arp_neighbors(req: &agent::AddARPNeighborsRequest) -> Result<()> {
    let want = req
        .neighbors
        .iter()
        .enumerate()
        .map(|(i, n)| parse::parse_neighbor(i, n))
        .collect::<Result<Vec<_>>>()?;
    let _one_at_a_time = CHANGES.lock().await;
    with_netlink(|nl| async move {
        let links = nl.links().await?;
        let mut indexes = Vec::with_capacity(want.len());
        for n in &want {
            let link = by_name(&links, &n.device).ok_or_else(|| {
                NetError::InvalidArgument(format!(
                    "neighbors[{}].device {:?} does not exist",
                    n.index, n.device
                ))
            })?;
            indexes.push(link.index);
        }
        for (n, index) in want.iter().zip(indexes) {
            nl.add_neighbor(n, index).await?;
        }
        Ok(())
    })
    .await
}
