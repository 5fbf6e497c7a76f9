//! Discovery of a pod namespace's interfaces over rtnetlink, and their conversion into the agent
//! API's network messages.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use capsa_proto::agent;
use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::RouteMessageBuilder;
use tracing::debug;

use super::netns::NetlinkHandle;
use super::tap::is_capsa_tap;
use super::NetworkError;

/// An IP address with its prefix length (`10.0.0.2/24`, `fd00::2/64`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpPrefix {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// A route of the main table whose output device is the interface it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRoute {
    /// Destination; `None` for the default route.
    pub dest: Option<IpPrefix>,
    pub gateway: Option<IpAddr>,
    /// Preferred source address (`src` in `ip route`).
    pub source: Option<IpAddr>,
    /// `RT_SCOPE_*` (0 universe, 253 link, 254 host).
    pub scope: u8,
    /// `RTPROT_*` (2 kernel, 3 boot, 4 static...). Routes the kernel made itself from an address
    /// (`proto kernel`) are not sent to the guest, whose kernel makes them too.
    pub protocol: u8,
    pub ipv6: bool,
}

/// A neighbour (ARP / NDP) entry of the interface with a link-layer address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNeighbour {
    pub ip: IpAddr,
    pub lladdr: [u8; 6],
    /// `NUD_*` state (0x80 permanent, 0x02 reachable).
    pub state: u16,
    /// `NTF_*` flags.
    pub flags: u8,
}

/// One pod interface (the namespace end of a veth, usually `eth0`) as the guest must see it: the
/// guest NIC gets the same name, MAC, MTU, addresses, routes and neighbours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInterface {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// IPv4 and IPv6 addresses; IPv6 link-local ones are left out (the guest makes its own).
    pub addresses: Vec<IpPrefix>,
    pub routes: Vec<PodRoute>,
    pub neighbours: Vec<PodNeighbour>,
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn family(ip: &IpAddr) -> agent::IPFamily {
    match ip {
        IpAddr::V4(_) => agent::IPFamily::IP_FAMILY_V4,
        IpAddr::V6(_) => agent::IPFamily::IP_FAMILY_V6,
    }
}

fn agent_address(p: &IpPrefix) -> agent::IPAddress {
    agent::IPAddress {
        family: family(&p.addr).into(),
        address: p.addr.to_string(),
        mask: p.prefix_len.to_string(),
        ..Default::default()
    }
}

impl PodInterface {
    /// The agent's `Interface` for the guest NIC: same name and MAC as the veth (the agent finds the
    /// NIC by `hw_addr`), same MTU and addresses.
    pub fn to_agent_interface(&self) -> agent::Interface {
        agent::Interface {
            device: self.name.clone(),
            name: self.name.clone(),
            ip_addresses: self.addresses.iter().map(agent_address).collect(),
            mtu: u64::from(self.mtu),
            hw_addr: format_mac(&self.mac),
            ..Default::default()
        }
    }

    /// The agent's `Route`s for this interface, `device` = the interface name. `proto kernel` routes
    /// (the on-link subnet of each address) are left out: the guest kernel adds them itself when the
    /// address is configured, and adding them again would fail with EEXIST.
    pub fn to_agent_routes(&self) -> Vec<agent::Route> {
        self.routes
            .iter()
            .filter(|r| r.protocol != u8::from(RouteProtocol::Kernel))
            .map(|r| agent::Route {
                dest: r.dest.map(|d| d.to_string()).unwrap_or_default(),
                gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                device: self.name.clone(),
                source: r.source.map(|s| s.to_string()).unwrap_or_default(),
                scope: u32::from(r.scope),
                family: if r.ipv6 {
                    agent::IPFamily::IP_FAMILY_V6
                } else {
                    agent::IPFamily::IP_FAMILY_V4
                }
                .into(),
                ..Default::default()
            })
            .collect()
    }

    /// The agent's `ARPNeighbor`s for this interface.
    pub fn to_agent_neighbours(&self) -> Vec<agent::ARPNeighbor> {
        self.neighbours
            .iter()
            .map(|n| agent::ARPNeighbor {
                to_ip_address: protobuf::MessageField::some(agent_address(&IpPrefix {
                    addr: n.ip,
                    prefix_len: if n.ip.is_ipv4() { 32 } else { 128 },
                })),
                device: self.name.clone(),
                lladdr: format_mac(&n.lladdr),
                state: i32::from(n.state),
                flags: i32::from(n.flags),
                ..Default::default()
            })
            .collect()
    }
}

fn is_ipv6_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// Name, MAC and MTU of an Ethernet link, or `None` when it is not an interface to hand to the guest.
fn link_info(link: &LinkMessage) -> Option<(String, [u8; 6], u32)> {
    let mut name = None;
    let mut mac = None;
    let mut mtu = None;
    for attr in &link.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            LinkAttribute::Mtu(m) => mtu = Some(*m),
            _ => {}
        }
    }
    let name = name?;
    if link.header.flags.contains(LinkFlags::Loopback) || name == "lo" {
        return None;
    }
    if is_capsa_tap(&name) {
        debug!(interface = %name, "skipping capsa's own tap");
        return None;
    }
    if link.header.link_layer_type != LinkLayerType::Ether {
        // tunl0, sit0, ip6tnl0... appear in every namespace once their module is loaded.
        debug!(interface = %name, kind = ?link.header.link_layer_type, "skipping non-Ethernet interface");
        return None;
    }
    Some((name, mac?, mtu.unwrap_or(1500)))
}

fn nl_err<'a>(
    request: &'static str,
    interface: &'a str,
) -> impl FnOnce(rtnetlink::Error) -> NetworkError + 'a {
    move |source| NetworkError::Netlink {
        request,
        interface: interface.to_string(),
        source,
    }
}

/// Lists the pod interfaces of the namespace the handle talks to: every Ethernet interface except
/// `lo` and capsa's own taps, with its addresses, main-table routes and neighbours. An empty list is
/// not an error here (see [`NetworkError::NoInterfaces`] for setup).
pub async fn discover_interfaces(
    handle: &NetlinkHandle,
) -> Result<Vec<PodInterface>, NetworkError> {
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl_err("RTM_GETLINK dump", "all interfaces"))?;
    let mut interfaces: Vec<PodInterface> = links
        .iter()
        .filter_map(|l| {
            link_info(l).map(|(name, mac, mtu)| PodInterface {
                name,
                index: l.header.index,
                mac,
                mtu,
                addresses: Vec::new(),
                routes: Vec::new(),
                neighbours: Vec::new(),
            })
        })
        .collect();
    if interfaces.is_empty() {
        return Ok(interfaces);
    }

    let addresses: Vec<_> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl_err("RTM_GETADDR dump", "all interfaces"))?;
    for msg in addresses {
        let Some(iface) = interfaces.iter_mut().find(|i| i.index == msg.header.index) else {
            continue;
        };
        let (mut local, mut address) = (None, None);
        for attr in &msg.attributes {
            match attr {
                AddressAttribute::Local(ip) => local = Some(*ip),
                AddressAttribute::Address(ip) => address = Some(*ip),
                _ => {}
            }
        }
        // For IPv4, IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on p2p links).
        let Some(ip) = local.or(address) else {
            continue;
        };
        if is_ipv6_link_local(&ip) {
            continue;
        }
        iface.addresses.push(IpPrefix {
            addr: ip,
            prefix_len: msg.header.prefix_len,
        });
    }

    let v4 = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let v6 = RouteMessageBuilder::<Ipv6Addr>::new().build();
    for (query, what) in [
        (v4, "RTM_GETROUTE dump (IPv4)"),
        (v6, "RTM_GETROUTE dump (IPv6)"),
    ] {
        let routes: Vec<RouteMessage> = handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(nl_err(what, "all interfaces"))?;
        for msg in routes {
            add_route(&mut interfaces, &msg);
        }
    }

    let neighbours: Vec<_> = handle
        .neighbours()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl_err("RTM_GETNEIGH dump", "all interfaces"))?;
    for msg in neighbours {
        let Some(iface) = interfaces
            .iter_mut()
            .find(|i| i.index == msg.header.ifindex)
        else {
            continue;
        };
        if !matches!(
            msg.header.state,
            NeighbourState::Permanent | NeighbourState::Reachable
        ) {
            continue;
        }
        let (mut ip, mut lladdr) = (None, None);
        for attr in &msg.attributes {
            match attr {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                    ip = Some(IpAddr::V4(*v4))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                    ip = Some(IpAddr::V6(*v6))
                }
                NeighbourAttribute::LinkLayerAddress(a) => {
                    lladdr = <[u8; 6]>::try_from(a.as_slice()).ok()
                }
                _ => {}
            }
        }
        if let (Some(ip), Some(lladdr)) = (ip, lladdr) {
            iface.neighbours.push(PodNeighbour {
                ip,
                lladdr,
                state: u16::from(msg.header.state),
                flags: msg.header.flags.bits(),
            });
        }
    }
    for i in &interfaces {
        debug!(interface = %i.name, mac = %format_mac(&i.mac), mtu = i.mtu, addresses = ?i.addresses,
            routes = i.routes.len(), neighbours = i.neighbours.len(), "discovered pod interface");
    }
    Ok(interfaces)
}

fn add_route(interfaces: &mut [PodInterface], msg: &RouteMessage) {
    let h = &msg.header;
    let mut table = u32::from(h.table);
    let (mut dest, mut gateway, mut source, mut oif) = (None, None, None, None);
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(a) => dest = route_ip(a),
            RouteAttribute::Gateway(a) => gateway = route_ip(a),
            RouteAttribute::PrefSource(a) => source = route_ip(a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) || h.kind != RouteType::Unicast {
        return;
    }
    let Some(iface) = oif.and_then(|o| interfaces.iter_mut().find(|i| i.index == o)) else {
        return;
    };
    let ipv6 = h.address_family == AddressFamily::Inet6;
    let dest = match (dest, h.destination_prefix_length) {
        (_, 0) => None,
        (Some(d), len) => Some(IpPrefix {
            addr: d,
            prefix_len: len,
        }),
        (None, _) => return,
    };
    if dest.is_some_and(|d| is_ipv6_link_local(&d.addr)) {
        return;
    }
    iface.routes.push(PodRoute {
        dest,
        gateway,
        source,
        scope: u8::from(h.scope),
        protocol: u8::from(h.protocol),
        ipv6,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PodInterface {
        PodInterface {
            name: "eth0".into(),
            index: 2,
            mac: [0x0a, 0x58, 0x0a, 0xf4, 0x00, 0x05],
            mtu: 1400,
            addresses: vec![
                IpPrefix {
                    addr: "10.244.0.5".parse().unwrap(),
                    prefix_len: 24,
                },
                IpPrefix {
                    addr: "fd00:10::5".parse().unwrap(),
                    prefix_len: 64,
                },
            ],
            routes: vec![
                PodRoute {
                    dest: None,
                    gateway: Some("10.244.0.1".parse().unwrap()),
                    source: None,
                    scope: 0,
                    protocol: 3,
                    ipv6: false,
                },
                PodRoute {
                    dest: Some(IpPrefix {
                        addr: "10.244.0.0".parse().unwrap(),
                        prefix_len: 24,
                    }),
                    gateway: None,
                    source: Some("10.244.0.5".parse().unwrap()),
                    scope: 253,
                    protocol: 2,
                    ipv6: false,
                },
                PodRoute {
                    dest: Some(IpPrefix {
                        addr: "10.96.0.0".parse().unwrap(),
                        prefix_len: 12,
                    }),
                    gateway: Some("10.244.0.1".parse().unwrap()),
                    source: Some("10.244.0.5".parse().unwrap()),
                    scope: 0,
                    protocol: 4,
                    ipv6: false,
                },
                PodRoute {
                    dest: None,
                    gateway: Some("fd00:10::1".parse().unwrap()),
                    source: None,
                    scope: 0,
                    protocol: 3,
                    ipv6: true,
                },
            ],
            neighbours: vec![PodNeighbour {
                ip: "10.244.0.1".parse().unwrap(),
                lladdr: [0xee, 0xee, 0xee, 0xee, 0xee, 0xee],
                state: 0x80,
                flags: 0,
            }],
        }
    }

    #[test]
    fn mac_format() {
        assert_eq!(
            format_mac(&[0x0a, 0x58, 0, 0xff, 0x10, 1]),
            "0a:58:00:ff:10:01"
        );
    }

    #[test]
    fn link_local_detection() {
        assert!(is_ipv6_link_local(&"fe80::1".parse().unwrap()));
        assert!(is_ipv6_link_local(&"febf::1".parse().unwrap()));
        assert!(!is_ipv6_link_local(&"fec0::1".parse().unwrap()));
        assert!(!is_ipv6_link_local(&"fd00::1".parse().unwrap()));
        assert!(!is_ipv6_link_local(&"169.254.0.1".parse().unwrap()));
    }

    #[test]
    fn interface_to_agent() {
        let i = sample().to_agent_interface();
        assert_eq!(i.device, "eth0");
        assert_eq!(i.name, "eth0");
        assert_eq!(i.mtu, 1400);
        assert_eq!(i.hw_addr, "0a:58:0a:f4:00:05");
        assert_eq!(i.ip_addresses.len(), 2);
        assert_eq!(i.ip_addresses[0].address, "10.244.0.5");
        assert_eq!(i.ip_addresses[0].mask, "24");
        assert_eq!(
            i.ip_addresses[0].family.enum_value(),
            Ok(agent::IPFamily::IP_FAMILY_V4)
        );
        assert_eq!(i.ip_addresses[1].address, "fd00:10::5");
        assert_eq!(i.ip_addresses[1].mask, "64");
        assert_eq!(
            i.ip_addresses[1].family.enum_value(),
            Ok(agent::IPFamily::IP_FAMILY_V6)
        );
    }

    #[test]
    fn routes_to_agent() {
        let r = sample().to_agent_routes();
        // The proto-kernel subnet route is left to the guest kernel.
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].dest, "");
        assert_eq!(r[0].gateway, "10.244.0.1");
        assert_eq!(r[0].device, "eth0");
        assert_eq!(r[0].source, "");
        assert_eq!(r[0].scope, 0);
        assert_eq!(r[0].family.enum_value(), Ok(agent::IPFamily::IP_FAMILY_V4));
        assert_eq!(r[1].dest, "10.96.0.0/12");
        assert_eq!(r[1].source, "10.244.0.5");
        assert_eq!(r[2].dest, "");
        assert_eq!(r[2].gateway, "fd00:10::1");
        assert_eq!(r[2].family.enum_value(), Ok(agent::IPFamily::IP_FAMILY_V6));
    }

    #[test]
    fn neighbours_to_agent() {
        let n = sample().to_agent_neighbours();
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].device, "eth0");
        assert_eq!(n[0].lladdr, "ee:ee:ee:ee:ee:ee");
        assert_eq!(n[0].state, 0x80);
        let ip = n[0].to_ip_address.as_ref().unwrap();
        assert_eq!(ip.address, "10.244.0.1");
        assert_eq!(ip.mask, "32");
    }
}
