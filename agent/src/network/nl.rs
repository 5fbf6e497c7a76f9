//! The netlink side: one rtnetlink connection per request, and the kernel's links, addresses and routes
//! in plain Rust values.

use std::fmt;
use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourFlags, NeighbourState};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec};

use super::parse::{Family, IpNet, NeighborRequest, RouteRequest};
use super::NetError;

/// The main routing table (`RT_TABLE_MAIN`).
pub const RT_TABLE_MAIN: u32 = 254;

/// An rtnetlink connection. Its I/O task runs on the current tokio runtime and is aborted on drop,
/// so an early return (error, timeout) never leaves it behind.
pub struct Netlink {
    handle: Handle,
    conn: tokio::task::JoinHandle<()>,
}

impl Netlink {
    /// Opens a NETLINK_ROUTE socket in the calling thread's network namespace. Must run inside a
    /// tokio runtime.
    pub fn open() -> Result<Self, NetError> {
        let (conn, handle, _unsolicited) = rtnetlink::new_connection()
            .map_err(|e| NetError::Internal(format!("opening a netlink socket: {e}")))?;
        let conn = tokio::spawn(conn);
        Ok(Self { handle, conn })
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// The errno of a kernel refusal, if that is what `e` is.
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// `what: <kernel error>` as an INTERNAL error.
pub fn nl_error(what: impl fmt::Display, e: rtnetlink::Error) -> NetError {
    let why = match errno(&e) {
        Some(n) => std::io::Error::from_raw_os_error(n).to_string(),
        None => e.to_string(),
    };
    NetError::Internal(format!("{what}: {why}"))
}

/// A link as the kernel reports it.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Vec<u8>,
    pub mtu: u32,
    pub min_mtu: Option<u32>,
    pub max_mtu: Option<u32>,
    pub flags: LinkFlags,
    /// `IFLA_INFO_KIND`, e.g. "veth"; None for plain devices (virtio-net, lo).
    pub kind: Option<String>,
}

impl Link {
    pub fn is_loopback(&self) -> bool {
        self.flags.contains(LinkFlags::Loopback)
    }

    fn from_message(m: LinkMessage) -> Link {
        let mut l = Link {
            index: m.header.index,
            name: String::new(),
            mac: Vec::new(),
            mtu: 0,
            min_mtu: None,
            max_mtu: None,
            flags: m.header.flags,
            kind: None,
        };
        for a in m.attributes {
            match a {
                LinkAttribute::IfName(n) => l.name = n,
                LinkAttribute::Address(a) => l.mac = a,
                LinkAttribute::Mtu(v) => l.mtu = v,
                LinkAttribute::MinMtu(v) => l.min_mtu = Some(v),
                LinkAttribute::MaxMtu(v) => l.max_mtu = Some(v),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            l.kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        l
    }
}

/// An interface address as the kernel reports it.
#[derive(Debug, Clone)]
pub struct Addr {
    pub index: u32,
    pub net: IpNet,
    msg: AddressMessage,
}

impl Addr {
    fn from_message(m: AddressMessage) -> Option<Addr> {
        // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer's on point-to-point
        // links); IPv6 usually sends IFA_ADDRESS only.
        let mut local = None;
        let mut address = None;
        for a in &m.attributes {
            match a {
                AddressAttribute::Local(ip) => local = Some(*ip),
                AddressAttribute::Address(ip) => address = Some(*ip),
                _ => {}
            }
        }
        let addr = local.or(address)?;
        Some(Addr {
            index: m.header.index,
            net: IpNet {
                addr,
                prefix: m.header.prefix_len,
            },
            msg: m,
        })
    }
}

/// A route as the kernel reports it.
#[derive(Debug, Clone)]
pub struct Route {
    pub family: Family,
    pub dest: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub source: Option<IpAddr>,
    pub scope: u8,
    pub flags: u32,
    pub protocol: RouteProtocol,
    pub table: u32,
    pub kind: RouteType,
    msg: RouteMessage,
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

impl Route {
    fn from_message(m: RouteMessage) -> Option<Route> {
        let family = match m.header.address_family {
            AddressFamily::Inet => Family::V4,
            AddressFamily::Inet6 => Family::V6,
            _ => return None,
        };
        let mut r = Route {
            family,
            dest: IpNet {
                addr: family.unspecified(),
                prefix: m.header.destination_prefix_length,
            },
            gateway: None,
            oif: None,
            source: None,
            scope: m.header.scope.into(),
            flags: m.header.flags.bits(),
            protocol: m.header.protocol,
            table: u32::from(m.header.table),
            kind: m.header.kind,
            msg: RouteMessage::default(),
        };
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(d) => {
                    if let Some(ip) = route_ip(d) {
                        r.dest.addr = ip;
                    }
                }
                RouteAttribute::Gateway(g) => r.gateway = route_ip(g),
                RouteAttribute::Oif(i) => r.oif = Some(*i),
                RouteAttribute::PrefSource(s) => r.source = route_ip(s),
                RouteAttribute::Table(t) => r.table = *t,
                _ => {}
            }
        }
        r.msg = m;
        Some(r)
    }

    /// The message that deletes exactly this route: its header and the attributes that identify it
    /// (not the cache info and statistics a dump adds).
    fn delete_message(&self) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header = self.msg.header.clone();
        m.attributes = self
            .msg
            .attributes
            .iter()
            .filter(|a| {
                matches!(
                    a,
                    RouteAttribute::Destination(_)
                        | RouteAttribute::Gateway(_)
                        | RouteAttribute::Oif(_)
                        | RouteAttribute::PrefSource(_)
                        | RouteAttribute::Priority(_)
                        | RouteAttribute::Table(_)
                        | RouteAttribute::Source(_)
                )
            })
            .cloned()
            .collect();
        m
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        super::parse::fmt_dest_via(f, &self.dest, self.gateway)?;
        if let Some(i) = self.oif {
            write!(f, " dev #{i}")?;
        }
        Ok(())
    }
}

fn family_of(f: Family) -> AddressFamily {
    match f {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

impl Netlink {
    pub async fn links(&self) -> Result<Vec<Link>, NetError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_error("listing links", e))?;
        Ok(msgs.into_iter().map(Link::from_message).collect())
    }

    pub async fn link(&self, index: u32) -> Result<Link, NetError> {
        let mut msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_error(format!("reading link #{index}"), e))?;
        match msgs.pop() {
            Some(m) => Ok(Link::from_message(m)),
            None => Err(NetError::Internal(format!("link #{index} vanished"))),
        }
    }

    /// Sets flags, name or MTU of one link; `what` names the change for errors.
    pub async fn set_link(
        &self,
        what: &str,
        msg: rtnetlink::LinkMessageBuilder<LinkUnspec>,
    ) -> Result<(), NetError> {
        self.handle
            .link()
            .set(msg.build())
            .execute()
            .await
            .map_err(|e| nl_error(what, e))
    }

    /// All addresses (both families), or those of one link.
    pub async fn addresses(&self, index: Option<u32>) -> Result<Vec<Addr>, NetError> {
        let mut req = self.handle.address().get();
        if let Some(i) = index {
            req = req.set_link_index_filter(i);
        }
        let msgs: Vec<AddressMessage> = req
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_error("listing addresses", e))?;
        Ok(msgs
            .into_iter()
            .filter_map(Addr::from_message)
            .filter(|a| index.is_none() || index == Some(a.index))
            .collect())
    }

    /// Removes an address; one already gone (e.g. a secondary address the kernel dropped with its
    /// primary) is fine.
    pub async fn del_address(&self, a: &Addr, dev: &str) -> Result<(), NetError> {
        match self.handle.address().del(a.msg.clone()).execute().await {
            Err(e) if errno(&e) == Some(libc::EADDRNOTAVAIL) => Ok(()),
            r => r.map_err(|e| nl_error(format!("removing {} from {dev}", a.net), e)),
        }
    }

    /// Adds an address, or refreshes it when present (NLM_F_REPLACE): calling twice is harmless.
    pub async fn add_address(&self, index: u32, net: IpNet, dev: &str) -> Result<(), NetError> {
        self.handle
            .address()
            .add(index, net.addr, net.prefix)
            .replace()
            .execute()
            .await
            .map_err(|e| nl_error(format!("adding {net} to {dev}"), e))
    }

    /// All routes of both families, every table.
    pub async fn routes(&self) -> Result<Vec<Route>, NetError> {
        let mut out = Vec::new();
        for family in [Family::V4, Family::V6] {
            let mut q = RouteMessage::default();
            q.header.address_family = family_of(family);
            let msgs: Vec<RouteMessage> = self
                .handle
                .route()
                .get(q)
                .execute()
                .try_collect()
                .await
                .map_err(|e| nl_error(format!("listing {family} routes"), e))?;
            out.extend(msgs.into_iter().filter_map(Route::from_message));
        }
        Ok(out)
    }

    /// Deletes a route; one already gone (with its address or device) is fine.
    pub async fn del_route(&self, r: &Route) -> Result<(), NetError> {
        match self.handle.route().del(r.delete_message()).execute().await {
            Err(e) if errno(&e) == Some(libc::ESRCH) => Ok(()),
            res => res.map_err(|e| nl_error(format!("deleting route {r}"), e)),
        }
    }

    /// Adds a route to the main table, replacing one with the same destination (`ip route replace`).
    pub async fn add_route(&self, r: &RouteRequest, oif: u32) -> Result<(), NetError> {
        let mut m = RouteMessage::default();
        m.header.address_family = family_of(r.family);
        m.header.destination_prefix_length = r.dest.prefix;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Static;
        m.header.scope = RouteScope::from(r.scope);
        m.header.kind = RouteType::Unicast;
        if r.onlink {
            m.header.flags.insert(RouteFlags::Onlink);
        }
        if !r.dest.is_default() {
            m.attributes
                .push(RouteAttribute::Destination(r.dest.addr.into()));
        }
        if let Some(g) = r.gateway {
            m.attributes.push(RouteAttribute::Gateway(g.into()));
        }
        if let Some(s) = r.source {
            m.attributes.push(RouteAttribute::PrefSource(s.into()));
        }
        m.attributes.push(RouteAttribute::Oif(oif));
        self.handle
            .route()
            .add(m)
            .replace()
            .execute()
            .await
            .map_err(|e| nl_error(format!("routes[{}] ({r})", r.index), e))
    }

    /// Adds or replaces a neighbour entry.
    pub async fn add_neighbor(&self, n: &NeighborRequest, index: u32) -> Result<(), NetError> {
        self.handle
            .neighbours()
            .add(index, n.ip)
            .link_layer_address(&n.lladdr)
            .state(NeighbourState::from(n.state))
            .flags(NeighbourFlags::from_bits_retain(n.flags))
            .replace()
            .execute()
            .await
            .map_err(|e| {
                nl_error(
                    format!(
                        "neighbors[{}] ({} lladdr {} dev {})",
                        n.index,
                        n.ip,
                        super::parse::format_mac(&n.lladdr),
                        n.device
                    ),
                    e,
                )
            })
    }
}

#[cfg(test)]
impl Netlink {
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}
