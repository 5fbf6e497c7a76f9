//! Request checking: pure functions that turn the proto messages into checked values, so that a bad
//! request is refused before anything in the kernel changes. Every message names the field (as a path
//! into the request, e.g. `interface.ip_addresses[1].mask`) and the value that was wrong.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use capsa_proto::agent::{self, IPFamily};
use capsa_proto::protobuf::EnumOrUnknown;

use super::NetError;

/// Longest interface name the kernel takes (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;
/// Smallest MTU we accept (the IPv4 minimum, RFC 791); the device may ask for more.
pub const MTU_MIN: u64 = 68;
/// Largest MTU we accept (what the kernel's `IFLA_MTU` checks allow for most devices).
pub const MTU_MAX: u64 = 65535;
/// `NUD_PERMANENT`: the neighbour state used when a request gives none.
pub const NUD_PERMANENT: u16 = 0x80;
/// `RTNH_F_ONLINK`: the one route flag passed on to the kernel.
pub const RTNH_F_ONLINK: u32 = 4;
/// `IFF_NOARP`, the one bit of `Interface.raw_flags` UpdateInterface applies.
pub const IFF_NOARP: u32 = 0x80;
/// `RT_SCOPE_LINK`.
pub const RT_SCOPE_LINK: u8 = 253;

/// IPv4 or IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub fn max_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    pub fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }

    pub fn to_proto(self) -> IPFamily {
        match self {
            Family::V4 => IPFamily::IP_FAMILY_V4,
            Family::V6 => IPFamily::IP_FAMILY_V6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// An address with its prefix length, e.g. 10.0.0.2/24.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    pub fn family(&self) -> Family {
        Family::of(&self.addr)
    }

    /// 0.0.0.0/0 or ::/0.
    pub fn is_default(&self) -> bool {
        self.prefix == 0
    }

    /// The address with the host bits cleared.
    pub fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        }
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// True for IPv6 link-local addresses (fe80::/10), which UpdateInterface leaves in place.
pub fn is_ipv6_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(a) if (a.segments()[0] & 0xffc0) == 0xfe80)
}

fn invalid(msg: String) -> NetError {
    NetError::InvalidArgument(msg)
}

/// `aa:bb:cc:dd:ee:ff` (either case, `-` also accepted as separator).
pub fn parse_mac(field: &str, s: &str) -> Result<[u8; 6], NetError> {
    if s.is_empty() {
        return Err(invalid(format!(
            "{field} is empty; want a MAC address like aa:bb:cc:dd:ee:ff"
        )));
    }
    let bad = || {
        invalid(format!(
            "{field} {s:?} is not a MAC address (want aa:bb:cc:dd:ee:ff)"
        ))
    };
    let mut out = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for byte in out.iter_mut() {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(out)
}

/// Formats a link-layer address as lower-case `aa:bb:...`.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_family(field: &str, f: EnumOrUnknown<IPFamily>) -> Result<Family, NetError> {
    match f.enum_value() {
        Ok(IPFamily::IP_FAMILY_V4) => Ok(Family::V4),
        Ok(IPFamily::IP_FAMILY_V6) => Ok(Family::V6),
        Err(v) => Err(invalid(format!(
            "{field} {v} is not an IP family (0 = IPv4, 1 = IPv6)"
        ))),
    }
}

/// A plain address (no prefix) of the given family.
pub fn parse_ip(field: &str, s: &str, family: Family) -> Result<IpAddr, NetError> {
    let ip: IpAddr = s
        .parse()
        .map_err(|_| invalid(format!("{field} {s:?} is not an {family} address")))?;
    if Family::of(&ip) != family {
        return Err(invalid(format!(
            "{field} {s:?} is an {} address but the family is {family}",
            Family::of(&ip)
        )));
    }
    Ok(ip)
}

/// A prefix length, decimal, within the family's range.
pub fn parse_prefix(field: &str, s: &str, family: Family) -> Result<u8, NetError> {
    match s.trim().parse::<u8>() {
        Ok(p) if p <= family.max_prefix() => Ok(p),
        _ => Err(invalid(format!(
            "{field} {s:?} is not a prefix length for {family}"
        ))),
    }
}

/// An address for an interface: unicast, not unspecified.
pub fn parse_ip_address(field: &str, a: &agent::IPAddress) -> Result<IpNet, NetError> {
    let family = parse_family(&format!("{field}.family"), a.family)?;
    let addr = parse_ip(&format!("{field}.address"), &a.address, family)?;
    if addr.is_unspecified() || addr.is_multicast() || addr == IpAddr::V4(Ipv4Addr::BROADCAST) {
        return Err(invalid(format!(
            "{field}.address {:?} cannot be an interface address",
            a.address
        )));
    }
    let prefix = parse_prefix(&format!("{field}.mask"), &a.mask, family)?;
    Ok(IpNet { addr, prefix })
}

/// An interface name the kernel accepts (`dev_valid_name`): 1 to 15 bytes, not `.` or `..`, no `/`,
/// `:` or white space.
pub fn check_ifname(field: &str, name: &str) -> Result<(), NetError> {
    let why = if name.is_empty() {
        Some("is empty")
    } else if name.len() > IFNAME_MAX {
        Some("is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("is not a valid interface name")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
    {
        Some("contains '/', ':', NUL or white space")
    } else {
        None
    };
    match why {
        Some(why) => Err(invalid(format!("{field} {name:?} {why}"))),
        None => Ok(()),
    }
}

/// 0 = leave the MTU as it is.
pub fn parse_mtu(field: &str, mtu: u64) -> Result<Option<u32>, NetError> {
    match mtu {
        0 => Ok(None),
        MTU_MIN..=MTU_MAX => Ok(Some(mtu as u32)),
        _ => Err(invalid(format!(
            "{field} {mtu} is outside {MTU_MIN}..={MTU_MAX} (0 leaves the MTU as it is)"
        ))),
    }
}

/// A checked UpdateInterface request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceRequest {
    pub mac: [u8; 6],
    /// New name, if any (empty in the request = keep).
    pub name: Option<String>,
    pub mtu: Option<u32>,
    /// The addresses the interface should have, in request order, without duplicates.
    pub addresses: Vec<IpNet>,
    /// `raw_flags` has IFF_NOARP: turn ARP off (as Kata does). Without it ARP is left as it is.
    pub noarp: bool,
}

pub fn parse_interface(i: &agent::Interface) -> Result<InterfaceRequest, NetError> {
    let mac = parse_mac("interface.hw_addr", &i.hw_addr)?;
    let name = if i.name.is_empty() {
        None
    } else {
        check_ifname("interface.name", &i.name)?;
        Some(i.name.clone())
    };
    let mtu = parse_mtu("interface.mtu", i.mtu)?;
    let mut addresses: Vec<IpNet> = Vec::with_capacity(i.ip_addresses.len());
    for (n, a) in i.ip_addresses.iter().enumerate() {
        let net = parse_ip_address(&format!("interface.ip_addresses[{n}]"), a)?;
        if !addresses.contains(&net) {
            addresses.push(net);
        }
    }
    Ok(InterfaceRequest {
        mac,
        name,
        mtu,
        addresses,
        noarp: i.raw_flags & IFF_NOARP != 0,
    })
}

/// `""` or `"default"` = the default route; `a.b.c.d/n`; a plain address = a host route. Host bits must
/// be clear (the kernel refuses 10.0.0.1/24 as a destination).
pub fn parse_dest(field: &str, s: &str, family: Family) -> Result<IpNet, NetError> {
    if s.is_empty() || s == "default" {
        return Ok(IpNet {
            addr: family.unspecified(),
            prefix: 0,
        });
    }
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| {
        invalid(format!(
            "{field} {s:?} is not an {family} destination (CIDR)"
        ))
    })?;
    if Family::of(&addr) != family {
        return Err(invalid(format!(
            "{field} {s:?} is an {} destination but the family is {family}",
            Family::of(&addr)
        )));
    }
    let prefix = match prefix {
        Some(p) => parse_prefix(field, p, family).map_err(|_| {
            invalid(format!(
                "{field} {s:?}: {p:?} is not a prefix length for {family}"
            ))
        })?,
        None => family.max_prefix(),
    };
    let net = IpNet { addr, prefix };
    if net.network() != addr {
        return Err(invalid(format!(
            "{field} {s:?} has host bits set (did you mean {}/{prefix}?)",
            net.network()
        )));
    }
    Ok(net)
}

/// A checked route of UpdateRoutes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRequest {
    /// Position in the request, for messages.
    pub index: usize,
    pub family: Family,
    pub dest: IpNet,
    pub gateway: Option<IpAddr>,
    pub device: String,
    pub source: Option<IpAddr>,
    pub scope: u8,
    pub onlink: bool,
}

/// A route's destination and gateway the way `ip route` prints them: `default` or the CIDR, then ` via GW`.
pub fn fmt_dest_via(
    f: &mut fmt::Formatter<'_>,
    dest: &IpNet,
    gateway: Option<IpAddr>,
) -> fmt::Result {
    if dest.is_default() {
        f.write_str("default")?;
    } else {
        write!(f, "{dest}")?;
    }
    if let Some(g) = gateway {
        write!(f, " via {g}")?;
    }
    Ok(())
}

impl fmt::Display for RouteRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_dest_via(f, &self.dest, self.gateway)?;
        write!(f, " dev {}", self.device)?;
        if let Some(s) = self.source {
            write!(f, " src {s}")?;
        }
        Ok(())
    }
}

pub fn parse_route(index: usize, r: &agent::Route) -> Result<RouteRequest, NetError> {
    let field = format!("routes[{index}]");
    let family = parse_family(&format!("{field}.family"), r.family)?;
    if r.device.is_empty() {
        return Err(invalid(format!("{field}.device is empty")));
    }
    check_ifname(&format!("{field}.device"), &r.device)?;
    let dest = parse_dest(&format!("{field}.dest"), &r.dest, family)?;
    let gateway = if r.gateway.is_empty() {
        None
    } else {
        let g = parse_ip(&format!("{field}.gateway"), &r.gateway, family)?;
        if g.is_unspecified() || g.is_multicast() {
            return Err(invalid(format!(
                "{field}.gateway {:?} cannot be a gateway",
                r.gateway
            )));
        }
        Some(g)
    };
    let source = if r.source.is_empty() {
        None
    } else {
        Some(parse_ip(&format!("{field}.source"), &r.source, family)?)
    };
    let scope = u8::try_from(r.scope).map_err(|_| {
        invalid(format!(
            "{field}.scope {} is not a route scope (0..=255)",
            r.scope
        ))
    })?;
    // As `ip route add` does: an IPv4 route without a gateway reaches its destination directly.
    let scope = if scope == 0 && gateway.is_none() && family == Family::V4 {
        RT_SCOPE_LINK
    } else {
        scope
    };
    if gateway.is_some() && scope >= RT_SCOPE_LINK {
        return Err(invalid(format!(
            "{field}.scope {scope} (link or host) cannot go with gateway {:?}",
            r.gateway
        )));
    }
    Ok(RouteRequest {
        index,
        family,
        dest,
        gateway,
        device: r.device.clone(),
        source,
        scope,
        // Other flags describe the route's state on the host (RTNH_F_LINKDOWN, ...): not ours to set.
        onlink: r.flags & RTNH_F_ONLINK != 0,
    })
}

/// Checks all routes and orders them for adding: routes without a gateway first (so that a gateway
/// route via an on-link address finds its device route), request order otherwise.
pub fn parse_routes(routes: &[agent::Route]) -> Result<Vec<RouteRequest>, NetError> {
    let mut out = routes
        .iter()
        .enumerate()
        .map(|(i, r)| parse_route(i, r))
        .collect::<Result<Vec<_>, _>>()?;
    out.sort_by_key(|r| r.gateway.is_some());
    Ok(out)
}

/// A checked neighbour of AddARPNeighbors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighborRequest {
    pub index: usize,
    pub ip: IpAddr,
    pub device: String,
    pub lladdr: [u8; 6],
    pub state: u16,
    pub flags: u8,
}

pub fn parse_neighbor(index: usize, n: &agent::ARPNeighbor) -> Result<NeighborRequest, NetError> {
    let field = format!("neighbors[{index}]");
    let Some(to) = n.to_ip_address.as_ref() else {
        return Err(invalid(format!("{field}.to_ip_address is missing")));
    };
    let family = parse_family(&format!("{field}.to_ip_address.family"), to.family)?;
    let ip = parse_ip(
        &format!("{field}.to_ip_address.address"),
        &to.address,
        family,
    )?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(invalid(format!(
            "{field}.to_ip_address.address {:?} cannot be a neighbour",
            to.address
        )));
    }
    if n.device.is_empty() {
        return Err(invalid(format!("{field}.device is empty")));
    }
    check_ifname(&format!("{field}.device"), &n.device)?;
    let lladdr = parse_mac(&format!("{field}.lladdr"), &n.lladdr)?;
    let state = match n.state {
        0 => NUD_PERMANENT,
        s => u16::try_from(s).map_err(|_| {
            invalid(format!(
                "{field}.state {s} is not a neighbour state (NUD_*)"
            ))
        })?,
    };
    let flags = u8::try_from(n.flags).map_err(|_| {
        invalid(format!(
            "{field}.flags {} is not neighbour flags (NTF_*)",
            n.flags
        ))
    })?;
    Ok(NeighborRequest {
        index,
        ip,
        device: n.device.clone(),
        lladdr,
        state,
        flags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(e: NetError) -> String {
        match e {
            NetError::InvalidArgument(m) => m,
            other => panic!("want InvalidArgument, got {other:?}"),
        }
    }

    fn ipaddr(family: IPFamily, address: &str, mask: &str) -> agent::IPAddress {
        let mut a = agent::IPAddress::new();
        a.family = family.into();
        a.address = address.into();
        a.mask = mask.into();
        a
    }

    #[test]
    fn mac_addresses() {
        assert_eq!(
            parse_mac("f", "AA:bb:0c:Dd:ee:01").unwrap(),
            [0xaa, 0xbb, 0x0c, 0xdd, 0xee, 0x01]
        );
        assert_eq!(parse_mac("f", "aa-bb-cc-dd-ee-ff").unwrap()[5], 0xff);
        for bad in [
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:ff:00",
            "aabbccddeeff",
            "aa:bb:cc:dd:ee:fg",
            "a:bb:cc:dd:ee:ff0",
            "+a:bb:cc:dd:ee:ff",
        ] {
            let m = msg(parse_mac("interface.hw_addr", bad).unwrap_err());
            assert!(m.contains("interface.hw_addr") && m.contains(bad), "{m}");
        }
        assert!(msg(parse_mac("interface.hw_addr", "").unwrap_err()).contains("empty"));
        assert_eq!(
            format_mac(&[0xaa, 0x0b, 0, 1, 2, 0xff]),
            "aa:0b:00:01:02:ff"
        );
    }

    #[test]
    fn addresses_and_prefixes() {
        let n = parse_ip_address("a", &ipaddr(IPFamily::IP_FAMILY_V4, "10.1.2.3", "24")).unwrap();
        assert_eq!(n.to_string(), "10.1.2.3/24");
        let n = parse_ip_address("a", &ipaddr(IPFamily::IP_FAMILY_V6, "fd00::2", "64")).unwrap();
        assert_eq!(n.to_string(), "fd00::2/64");
        assert!(parse_ip_address("a", &ipaddr(IPFamily::IP_FAMILY_V4, "10.0.0.1", "0")).is_ok());
        assert!(parse_ip_address("a", &ipaddr(IPFamily::IP_FAMILY_V6, "fd00::1", "128")).is_ok());

        let m = msg(parse_ip_address(
            "interface.ip_addresses[1]",
            &ipaddr(IPFamily::IP_FAMILY_V4, "10.0.0.1", "33"),
        )
        .unwrap_err());
        assert_eq!(
            m,
            r#"interface.ip_addresses[1].mask "33" is not a prefix length for IPv4"#
        );
        let m = msg(
            parse_ip_address("x", &ipaddr(IPFamily::IP_FAMILY_V6, "fd00::1", "129")).unwrap_err(),
        );
        assert!(m.contains("x.mask \"129\"") && m.contains("IPv6"), "{m}");
        for mask in ["", "-1", "24x", "/24"] {
            assert!(
                parse_ip_address("x", &ipaddr(IPFamily::IP_FAMILY_V4, "10.0.0.1", mask)).is_err()
            );
        }
        // Family mismatch both ways, garbage, a CIDR in the address field.
        let m = msg(
            parse_ip_address("x", &ipaddr(IPFamily::IP_FAMILY_V4, "fd00::1", "64")).unwrap_err(),
        );
        assert!(
            m.contains("x.address \"fd00::1\" is an IPv6 address but the family is IPv4"),
            "{m}"
        );
        assert!(parse_ip_address("x", &ipaddr(IPFamily::IP_FAMILY_V6, "10.0.0.1", "24")).is_err());
        assert!(parse_ip_address("x", &ipaddr(IPFamily::IP_FAMILY_V4, "10.0.0", "24")).is_err());
        assert!(
            parse_ip_address("x", &ipaddr(IPFamily::IP_FAMILY_V4, "10.0.0.1/24", "24")).is_err()
        );
        for not_unicast in ["0.0.0.0", "224.0.0.1", "255.255.255.255"] {
            let m = msg(
                parse_ip_address("x", &ipaddr(IPFamily::IP_FAMILY_V4, not_unicast, "24"))
                    .unwrap_err(),
            );
            assert!(m.contains("cannot be an interface address"), "{m}");
        }
        let mut unknown = ipaddr(IPFamily::IP_FAMILY_V4, "10.0.0.1", "24");
        unknown.family = EnumOrUnknown::from_i32(7);
        assert!(msg(parse_ip_address("x", &unknown).unwrap_err()).contains("x.family 7"));
    }

    #[test]
    fn link_local_and_network() {
        assert!(is_ipv6_link_local(&"fe80::1".parse().unwrap()));
        assert!(is_ipv6_link_local(&"febf::1".parse().unwrap()));
        assert!(!is_ipv6_link_local(&"fec0::1".parse().unwrap()));
        assert!(!is_ipv6_link_local(&"169.254.0.1".parse().unwrap()));
        let n = IpNet {
            addr: "10.1.2.3".parse().unwrap(),
            prefix: 20,
        };
        assert_eq!(n.network().to_string(), "10.1.0.0");
        let n = IpNet {
            addr: "10.1.2.3".parse().unwrap(),
            prefix: 0,
        };
        assert_eq!(n.network().to_string(), "0.0.0.0");
        let n = IpNet {
            addr: "fd00:1:2:3::9".parse().unwrap(),
            prefix: 48,
        };
        assert_eq!(n.network().to_string(), "fd00:1:2::");
    }

    #[test]
    fn interface_names_and_mtu() {
        for ok in ["eth0", "a", "veth-123456789a", "x.y_z"] {
            check_ifname("n", ok).unwrap();
        }
        for bad in ["", ".", "..", "eth 0", "a/b", "a:1", "veth-123456789ab"] {
            let m = msg(check_ifname("interface.name", bad).unwrap_err());
            assert!(m.starts_with(&format!("interface.name {bad:?}")), "{m}");
        }
        assert_eq!(parse_mtu("m", 0).unwrap(), None);
        assert_eq!(parse_mtu("m", 68).unwrap(), Some(68));
        assert_eq!(parse_mtu("m", 65535).unwrap(), Some(65535));
        assert!(msg(parse_mtu("interface.mtu", 67).unwrap_err()).contains("interface.mtu 67"));
        assert!(parse_mtu("m", 65536).is_err());
        assert!(parse_mtu("m", u64::MAX).is_err());
    }

    #[test]
    fn interface_request() {
        let mut i = agent::Interface::new();
        i.hw_addr = "02:00:00:00:00:01".into();
        i.name = "eth1".into();
        i.mtu = 1400;
        i.ip_addresses = vec![
            ipaddr(IPFamily::IP_FAMILY_V4, "10.0.0.2", "24"),
            ipaddr(IPFamily::IP_FAMILY_V6, "fd00::2", "64"),
            ipaddr(IPFamily::IP_FAMILY_V4, "10.0.0.2", "24"),
        ];
        let r = parse_interface(&i).unwrap();
        assert_eq!(r.mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(r.name.as_deref(), Some("eth1"));
        assert_eq!(r.mtu, Some(1400));
        assert_eq!(r.addresses.len(), 2, "duplicates dropped");
        assert!(!r.noarp);
        i.raw_flags = IFF_NOARP | 1;
        assert!(parse_interface(&i).unwrap().noarp);

        i.name.clear();
        i.mtu = 0;
        let r = parse_interface(&i).unwrap();
        assert_eq!((r.name, r.mtu), (None, None));

        i.ip_addresses[2].mask = "40".into();
        let m = msg(parse_interface(&i).unwrap_err());
        assert!(
            m.starts_with("interface.ip_addresses[2].mask \"40\""),
            "{m}"
        );
        i.hw_addr.clear();
        assert!(msg(parse_interface(&i).unwrap_err()).contains("interface.hw_addr"));
    }

    fn route(family: IPFamily, dest: &str, gateway: &str, device: &str) -> agent::Route {
        let mut r = agent::Route::new();
        r.family = family.into();
        r.dest = dest.into();
        r.gateway = gateway.into();
        r.device = device.into();
        r
    }

    #[test]
    fn destinations() {
        let v4 = Family::V4;
        assert_eq!(parse_dest("d", "", v4).unwrap().to_string(), "0.0.0.0/0");
        assert_eq!(
            parse_dest("d", "default", Family::V6).unwrap().to_string(),
            "::/0"
        );
        assert_eq!(
            parse_dest("d", "10.0.0.0/8", v4).unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            parse_dest("d", "10.0.0.7", v4).unwrap().to_string(),
            "10.0.0.7/32"
        );
        assert_eq!(parse_dest("d", "fd00::/64", Family::V6).unwrap().prefix, 64);
        let m = msg(parse_dest("routes[0].dest", "10.0.0.1/24", v4).unwrap_err());
        assert!(m.contains("host bits") && m.contains("10.0.0.0/24"), "{m}");
        let m = msg(parse_dest("routes[0].dest", "10.0.0.0/33", v4).unwrap_err());
        assert!(m.contains("\"33\" is not a prefix length for IPv4"), "{m}");
        let m = msg(parse_dest("routes[0].dest", "fd00::/64", v4).unwrap_err());
        assert!(m.contains("IPv6 destination but the family is IPv4"), "{m}");
        assert!(parse_dest("d", "10.0.0.0/", v4).is_err());
        assert!(parse_dest("d", "bogus", v4).is_err());
    }

    #[test]
    fn routes() {
        let rs = parse_routes(&[
            route(IPFamily::IP_FAMILY_V4, "", "10.0.0.1", "eth0"),
            route(IPFamily::IP_FAMILY_V4, "10.0.0.0/24", "", "eth0"),
            route(IPFamily::IP_FAMILY_V6, "fd00::/64", "", "eth0"),
            route(IPFamily::IP_FAMILY_V6, "", "fd00::1", "eth0"),
        ])
        .unwrap();
        // Device routes first, request order kept otherwise.
        let order: Vec<usize> = rs.iter().map(|r| r.index).collect();
        assert_eq!(order, [1, 2, 0, 3]);
        assert_eq!(
            rs[0].scope, RT_SCOPE_LINK,
            "IPv4 device route gets scope link"
        );
        assert_eq!(rs[1].scope, 0, "IPv6 routes keep scope universe");
        assert_eq!(rs[2].scope, 0);
        assert_eq!(rs[2].to_string(), "default via 10.0.0.1 dev eth0");
        assert!(rs[2].dest.is_default());

        let mut r = route(IPFamily::IP_FAMILY_V4, "10.1.0.0/16", "10.0.0.1", "eth0");
        r.source = "10.0.0.2".into();
        r.flags = RTNH_F_ONLINK | 16;
        r.scope = 200;
        let p = parse_route(0, &r).unwrap();
        assert_eq!(p.source, Some("10.0.0.2".parse().unwrap()));
        assert!(p.onlink);
        assert_eq!(p.scope, 200);
        assert_eq!(
            p.to_string(),
            "10.1.0.0/16 via 10.0.0.1 dev eth0 src 10.0.0.2"
        );

        let cases = [
            (
                route(IPFamily::IP_FAMILY_V4, "", "10.0.0.1", ""),
                "routes[3].device is empty",
            ),
            (
                route(IPFamily::IP_FAMILY_V4, "", "fd00::1", "eth0"),
                "routes[3].gateway \"fd00::1\"",
            ),
            (
                route(IPFamily::IP_FAMILY_V4, "", "0.0.0.0", "eth0"),
                "cannot be a gateway",
            ),
            (
                route(IPFamily::IP_FAMILY_V6, "10.0.0.0/8", "", "eth0"),
                "routes[3].dest \"10.0.0.0/8\"",
            ),
            (
                route(IPFamily::IP_FAMILY_V4, "", "", "bad name"),
                "routes[3].device \"bad name\"",
            ),
        ];
        for (r, want) in cases {
            let m = msg(parse_route(3, &r).unwrap_err());
            assert!(m.contains(want), "{m} lacks {want}");
        }
        let mut r = route(IPFamily::IP_FAMILY_V4, "", "10.0.0.1", "eth0");
        r.scope = 253;
        assert!(msg(parse_route(0, &r).unwrap_err()).contains("routes[0].scope 253"));
        r.scope = 256;
        assert!(msg(parse_route(0, &r).unwrap_err()).contains("routes[0].scope 256"));
        let mut r = route(IPFamily::IP_FAMILY_V4, "", "", "eth0");
        r.source = "fd00::1".into();
        assert!(msg(parse_route(0, &r).unwrap_err()).contains("routes[0].source"));
        // A bad route anywhere fails the whole request.
        let err = parse_routes(&[
            route(IPFamily::IP_FAMILY_V4, "", "", "eth0"),
            route(IPFamily::IP_FAMILY_V4, "x", "", "eth0"),
        ])
        .unwrap_err();
        assert!(msg(err).contains("routes[1].dest"));
    }

    #[test]
    fn neighbors() {
        let mut n = agent::ARPNeighbor::new();
        let m = msg(parse_neighbor(0, &n).unwrap_err());
        assert!(m.contains("neighbors[0].to_ip_address is missing"), "{m}");
        n.to_ip_address = Some(ipaddr(IPFamily::IP_FAMILY_V4, "10.0.0.9", "")).into();
        n.device = "eth0".into();
        n.lladdr = "02:00:00:00:00:09".into();
        let p = parse_neighbor(0, &n).unwrap();
        assert_eq!(p.state, NUD_PERMANENT);
        assert_eq!(p.lladdr, [2, 0, 0, 0, 0, 9]);
        n.state = 0x40;
        n.flags = 8;
        let p = parse_neighbor(0, &n).unwrap();
        assert_eq!((p.state, p.flags), (0x40, 8));

        let mut bad = n.clone();
        bad.lladdr = "nope".into();
        assert!(msg(parse_neighbor(2, &bad).unwrap_err()).contains("neighbors[2].lladdr \"nope\""));
        let mut bad = n.clone();
        bad.device.clear();
        assert!(msg(parse_neighbor(2, &bad).unwrap_err()).contains("neighbors[2].device is empty"));
        let mut bad = n.clone();
        bad.to_ip_address = Some(ipaddr(IPFamily::IP_FAMILY_V6, "10.0.0.9", "")).into();
        assert!(msg(parse_neighbor(2, &bad).unwrap_err())
            .contains("neighbors[2].to_ip_address.address"));
        let mut bad = n.clone();
        bad.state = 1 << 20;
        assert!(msg(parse_neighbor(2, &bad).unwrap_err()).contains("neighbors[2].state"));
        let mut bad = n;
        bad.flags = 300;
        assert!(msg(parse_neighbor(2, &bad).unwrap_err()).contains("neighbors[2].flags 300"));
    }
}
