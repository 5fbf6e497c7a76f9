//! The network RPCs against the real kernel, each test in a fresh network namespace of its own (the
//! test's thread unshares CLONE_NEWNET), so the host's network is never touched. Needs root (or
//! CAP_NET_ADMIN/CAP_SYS_ADMIN) and veth; without them the tests print why and pass.

use std::future::Future;
use std::net::IpAddr;

use capsa_proto::agent::{self, IPFamily};
use futures_util::TryStreamExt;
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::{LinkUnspec, LinkVeth};

use super::nl::Netlink;
use super::*;

const MAC: &str = "02:ca:95:a0:00:01";
const MAC_BYTES: [u8; 6] = [0x02, 0xca, 0x95, 0xa0, 0x00, 0x01];
/// IFF_UP.
const IFF_UP: u32 = 1;

/// Runs `test` on a thread of its own in a new network namespace holding lo and a veth pair: `v0`
/// (MAC [`MAC`]) and its peer `v1` (up, so that v0 gets a carrier). Skips when that is not possible.
fn in_netns<F, Fut>(test: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let outcome = std::thread::spawn(move || -> std::result::Result<(), String> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("unshare(CLONE_NEWNET): {e}"))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(async {
            let nl = Netlink::open().map_err(|e| e.to_string())?;
            nl.handle()
                .link()
                .add(
                    LinkVeth::new("v0", "v1")
                        .address(MAC_BYTES.to_vec())
                        .build(),
                )
                .execute()
                .await
                .map_err(|e| format!("creating a veth pair: {e}"))?;
            nl.set_link("v1 up", LinkUnspec::new_with_name("v1").up())
                .await
                .map_err(|e| e.to_string())?;
            drop(nl);
            test().await;
            Ok(())
        })
    })
    .join();
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(why)) => eprintln!("skipping: cannot set up a network namespace: {why}"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn ip(family: IPFamily, address: &str, mask: &str) -> agent::IPAddress {
    let mut a = agent::IPAddress::new();
    a.family = family.into();
    a.address = address.into();
    a.mask = mask.into();
    a
}

fn v4(address: &str, mask: &str) -> agent::IPAddress {
    ip(IPFamily::IP_FAMILY_V4, address, mask)
}

fn v6(address: &str, mask: &str) -> agent::IPAddress {
    ip(IPFamily::IP_FAMILY_V6, address, mask)
}

fn iface(name: &str, mtu: u64, addrs: Vec<agent::IPAddress>) -> agent::Interface {
    let mut i = agent::Interface::new();
    i.hw_addr = MAC.into();
    i.name = name.into();
    i.mtu = mtu;
    i.ip_addresses = addrs;
    i
}

fn addrs_of(i: &agent::Interface) -> Vec<String> {
    let mut v: Vec<String> = i
        .ip_addresses
        .iter()
        .filter(|a| !a.address.starts_with("fe80:"))
        .map(|a| format!("{}/{}", a.address, a.mask))
        .collect();
    v.sort();
    v
}

async fn interface(name: &str) -> agent::Interface {
    let all = list_interfaces().await.expect("ListInterfaces");
    all.interfaces
        .into_iter()
        .find(|i| i.name == name)
        .unwrap_or_else(|| panic!("no interface {name}"))
}

fn route(family: IPFamily, dest: &str, gateway: &str, device: &str) -> agent::Route {
    let mut r = agent::Route::new();
    r.family = family.into();
    r.dest = dest.into();
    r.gateway = gateway.into();
    r.device = device.into();
    r
}

fn routes_req(routes: Vec<agent::Route>) -> agent::UpdateRoutesRequest {
    let mut rs = agent::Routes::new();
    rs.routes = routes;
    let mut req = agent::UpdateRoutesRequest::new();
    req.routes = Some(rs).into();
    req
}

/// `dest via gateway dev device [src s]`, sorted, for comparisons.
fn route_lines(rs: &agent::Routes) -> Vec<String> {
    let mut v: Vec<String> = rs
        .routes
        .iter()
        .map(|r| {
            let mut s = if r.dest.is_empty() {
                "default".to_string()
            } else {
                r.dest.clone()
            };
            if !r.gateway.is_empty() {
                s += &format!(" via {}", r.gateway);
            }
            s += &format!(" dev {}", r.device);
            if !r.source.is_empty() {
                s += &format!(" src {}", r.source);
            }
            s
        })
        .collect();
    v.sort();
    v
}

fn expect_invalid(e: NetError, want: &str) {
    match e {
        NetError::InvalidArgument(m) => assert!(m.contains(want), "{m:?} lacks {want:?}"),
        other => panic!("want InvalidArgument containing {want:?}, got {other:?}"),
    }
}

#[test]
fn update_interface_renames_sets_mtu_and_addresses_idempotently() {
    in_netns(|| async {
        let req = iface(
            "eth7",
            1400,
            vec![
                v4("10.10.0.2", "24"),
                v6("fd00:10::2", "64"),
                v4("10.10.1.2", "16"),
            ],
        );
        let got = update_interface(&req).await.expect("UpdateInterface");
        assert_eq!(got.name, "eth7");
        assert_eq!(got.device, "eth7");
        assert_eq!(got.mtu, 1400);
        assert_eq!(got.hw_addr, MAC);
        assert_eq!(got.type_, "veth");
        assert_ne!(got.raw_flags & IFF_UP, 0, "link is up");
        assert_eq!(
            addrs_of(&got),
            ["10.10.0.2/24", "10.10.1.2/16", "fd00:10::2/64"]
        );

        // Twice: the same result, no error; the MAC matches whatever its case.
        let mut again = req.clone();
        again.hw_addr = MAC.to_uppercase();
        let got2 = update_interface(&again)
            .await
            .expect("UpdateInterface again");
        assert_eq!(addrs_of(&got2), addrs_of(&got));
        assert_eq!((got2.name.as_str(), got2.mtu), ("eth7", 1400));

        // ListInterfaces agrees, and leaves lo out.
        let listed = list_interfaces().await.expect("ListInterfaces");
        assert!(
            listed.interfaces.iter().all(|i| i.name != "lo"),
            "{listed:?}"
        );
        assert!(listed.interfaces.iter().any(|i| i.name == "v1"));
        assert_eq!(addrs_of(&interface("eth7").await), addrs_of(&got));

        // A new address set replaces the old one; no name / no MTU = keep them.
        let got3 = update_interface(&iface("", 0, vec![v4("10.10.0.3", "24")]))
            .await
            .expect("UpdateInterface new addresses");
        assert_eq!(addrs_of(&got3), ["10.10.0.3/24"]);
        assert_eq!((got3.name.as_str(), got3.mtu), ("eth7", 1400));

        // The same address with another prefix is another address.
        let got4 = update_interface(&iface("eth7", 1500, vec![v4("10.10.0.3", "16")]))
            .await
            .expect("UpdateInterface new prefix");
        assert_eq!(addrs_of(&got4), ["10.10.0.3/16"]);
        assert_eq!(got4.mtu, 1500);

        // No addresses at all.
        let got5 = update_interface(&iface("eth7", 0, vec![]))
            .await
            .expect("no addresses");
        assert!(addrs_of(&got5).is_empty(), "{got5:?}");
        assert_eq!(got5.raw_flags & parse::IFF_NOARP, 0);

        // IFF_NOARP in raw_flags turns ARP off.
        let mut noarp = iface("eth7", 0, vec![]);
        noarp.raw_flags = parse::IFF_NOARP;
        let got6 = update_interface(&noarp).await.expect("NOARP");
        assert_ne!(got6.raw_flags & parse::IFF_NOARP, 0, "{got6:?}");
    });
}

#[test]
fn ipv4_secondary_address_survives_removal_of_its_primary() {
    in_netns(|| async {
        update_interface(&iface(
            "eth0",
            0,
            vec![v4("10.30.0.2", "24"), v4("10.30.0.3", "24")],
        ))
        .await
        .expect("two addresses");
        // 10.30.0.2 is the primary: removing it drops the secondary too, which must come back.
        let got = update_interface(&iface("eth0", 0, vec![v4("10.30.0.3", "24")]))
            .await
            .expect("keep the secondary");
        assert_eq!(addrs_of(&got), ["10.30.0.3/24"]);
    });
}

#[test]
fn bad_update_interface_changes_nothing() {
    in_netns(|| async {
        let before = update_interface(&iface("eth0", 1450, vec![v4("10.20.0.2", "24")]))
            .await
            .expect("UpdateInterface");

        let bad = iface(
            "eth9",
            1300,
            vec![v4("10.20.0.9", "24"), v4("10.20.0.10", "33")],
        );
        expect_invalid(
            update_interface(&bad).await.unwrap_err(),
            r#"interface.ip_addresses[1].mask "33" is not a prefix length for IPv4"#,
        );
        // The name of another interface.
        expect_invalid(
            update_interface(&iface("v1", 1300, vec![]))
                .await
                .unwrap_err(),
            r#"interface.name "v1" is already the name of another interface"#,
        );
        // IPv6 wanted with an MTU that turns IPv6 off.
        expect_invalid(
            update_interface(&iface("eth9", 1000, vec![v6("fd00::2", "64")]))
                .await
                .unwrap_err(),
            "below 1280",
        );
        // Bad / unknown MAC.
        let mut no_mac = iface("eth9", 0, vec![]);
        no_mac.hw_addr.clear();
        expect_invalid(
            update_interface(&no_mac).await.unwrap_err(),
            "interface.hw_addr",
        );
        let mut other_mac = iface("eth9", 0, vec![]);
        other_mac.hw_addr = "02:00:00:00:00:99".into();
        match update_interface(&other_mac).await.unwrap_err() {
            NetError::NotFound(m) => assert!(m.contains("02:00:00:00:00:99"), "{m}"),
            other => panic!("want NotFound, got {other:?}"),
        }

        let after = interface("eth0").await;
        assert_eq!(addrs_of(&after), addrs_of(&before));
        assert_eq!((after.name.as_str(), after.mtu), ("eth0", 1450));
        assert_ne!(after.raw_flags & IFF_UP, 0);
    });
}

#[test]
fn update_routes_with_default_via_on_link_gateway() {
    in_netns(|| async {
        update_interface(&iface(
            "eth0",
            0,
            vec![v4("10.40.0.2", "24"), v6("fd00:40::2", "64")],
        ))
        .await
        .expect("UpdateInterface");

        // The gateway routes come first in the request: they must still be added last.
        let mut via_with_src = route(
            IPFamily::IP_FAMILY_V4,
            "192.168.5.0/24",
            "10.40.0.1",
            "eth0",
        );
        via_with_src.source = "10.40.0.2".into();
        let req = routes_req(vec![
            route(IPFamily::IP_FAMILY_V4, "", "10.40.0.1", "eth0"),
            via_with_src,
            route(IPFamily::IP_FAMILY_V6, "", "fd00:40::1", "eth0"),
            route(IPFamily::IP_FAMILY_V4, "10.40.0.0/24", "", "eth0"),
            route(IPFamily::IP_FAMILY_V6, "fd00:40::/64", "", "eth0"),
            route(IPFamily::IP_FAMILY_V4, "172.16.0.0/12", "", "v1"),
        ]);
        let got = update_routes(&req).await.expect("UpdateRoutes");
        let lines = route_lines(&got);
        for want in [
            "default via 10.40.0.1 dev eth0",
            "default via fd00:40::1 dev eth0",
            "10.40.0.0/24 dev eth0",
            "192.168.5.0/24 via 10.40.0.1 dev eth0 src 10.40.0.2",
            "fd00:40::/64 dev eth0",
            "172.16.0.0/12 dev v1",
        ] {
            assert!(
                lines.iter().any(|l| l == want),
                "{want:?} missing from {lines:#?}"
            );
        }
        let default4 = got
            .routes
            .iter()
            .find(|r| r.dest.is_empty() && r.family.enum_value() == Ok(IPFamily::IP_FAMILY_V4))
            .expect("IPv4 default route");
        assert_eq!(default4.scope, 0);
        let dev_route = got
            .routes
            .iter()
            .find(|r| r.dest == "172.16.0.0/12")
            .unwrap();
        assert_eq!(dev_route.scope, u32::from(parse::RT_SCOPE_LINK));
        assert!(
            lines.iter().all(|l| !l.contains("dev lo")),
            "loopback routes are not listed: {lines:#?}"
        );

        // Twice: the same routes.
        let again = update_routes(&req).await.expect("UpdateRoutes again");
        assert_eq!(route_lines(&again), lines);
        assert_eq!(
            route_lines(&list_routes().await.expect("ListRoutes")),
            lines
        );

        // A device the request names gets exactly its routes; other devices are left alone.
        let got = update_routes(&routes_req(vec![route(
            IPFamily::IP_FAMILY_V4,
            "10.40.0.0/24",
            "",
            "eth0",
        )]))
        .await
        .expect("UpdateRoutes fewer");
        let lines = route_lines(&got);
        assert!(
            lines
                .iter()
                .all(|l| !l.starts_with("default") && !l.starts_with("192.168.5.")),
            "{lines:#?}"
        );
        assert!(
            lines.iter().any(|l| l == "10.40.0.0/24 dev eth0"),
            "{lines:#?}"
        );
        assert!(
            lines.iter().any(|l| l == "172.16.0.0/12 dev v1"),
            "{lines:#?}"
        );

        // An unknown device: refused, nothing changed.
        let err = update_routes(&routes_req(vec![
            route(IPFamily::IP_FAMILY_V4, "10.50.0.0/24", "", "v1"),
            route(IPFamily::IP_FAMILY_V4, "", "10.40.0.1", "eth5"),
        ]))
        .await
        .unwrap_err();
        expect_invalid(err, r#"routes[1].device "eth5" does not exist"#);
        assert_eq!(route_lines(&list_routes().await.unwrap()), lines);

        // A gateway the kernel cannot reach: INTERNAL, naming the route.
        match update_routes(&routes_req(vec![route(
            IPFamily::IP_FAMILY_V4,
            "",
            "10.99.0.1",
            "eth0",
        )]))
        .await
        .unwrap_err()
        {
            NetError::Internal(m) => assert!(
                m.contains("routes[0] (default via 10.99.0.1 dev eth0)"),
                "{m}"
            ),
            other => panic!("want Internal, got {other:?}"),
        }
    });
}

#[test]
fn arp_neighbors() {
    in_netns(|| async {
        update_interface(&iface(
            "eth0",
            0,
            vec![v4("10.60.0.2", "24"), v6("fd00:60::2", "64")],
        ))
        .await
        .expect("UpdateInterface");
        let mut n4 = agent::ARPNeighbor::new();
        n4.to_ip_address = Some(v4("10.60.0.1", "")).into();
        n4.device = "eth0".into();
        n4.lladdr = "02:00:00:00:60:01".into();
        let mut n6 = n4.clone();
        n6.to_ip_address = Some(v6("fd00:60::1", "")).into();
        n6.lladdr = "02:00:00:00:60:06".into();
        let mut req = agent::AddARPNeighborsRequest::new();
        req.neighbors = vec![n4.clone(), n6];
        add_arp_neighbors(&req).await.expect("AddARPNeighbors");
        add_arp_neighbors(&req)
            .await
            .expect("AddARPNeighbors again");

        // A replaced entry takes the new address.
        n4.lladdr = "02:00:00:00:60:02".into();
        req.neighbors = vec![n4.clone()];
        add_arp_neighbors(&req)
            .await
            .expect("AddARPNeighbors replace");

        let nl = Netlink::open().unwrap();
        let msgs: Vec<_> = nl
            .handle()
            .neighbours()
            .get()
            .execute()
            .try_collect()
            .await
            .expect("neighbour dump");
        let mut found = Vec::new();
        for m in msgs {
            let mut dst = None;
            let mut lla = None;
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => {
                        dst = Some(IpAddr::V4(*v))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(v)) => {
                        dst = Some(IpAddr::V6(*v))
                    }
                    NeighbourAttribute::LinkLayerAddress(l) => lla = Some(parse::format_mac(l)),
                    _ => {}
                }
            }
            if m.header.state == NeighbourState::Permanent {
                if let (Some(d), Some(l)) = (dst, lla) {
                    found.push(format!("{d} {l}"));
                }
            }
        }
        found.sort();
        assert_eq!(
            found,
            [
                "10.60.0.1 02:00:00:00:60:02",
                "fd00:60::1 02:00:00:00:60:06"
            ]
        );

        // Unknown device, bad lladdr: refused.
        n4.device = "eth3".into();
        req.neighbors = vec![n4.clone()];
        expect_invalid(
            add_arp_neighbors(&req).await.unwrap_err(),
            r#"neighbors[0].device "eth3" does not exist"#,
        );
        n4.device = "eth0".into();
        n4.lladdr = "02:00".into();
        req.neighbors = vec![n4];
        expect_invalid(
            add_arp_neighbors(&req).await.unwrap_err(),
            "neighbors[0].lladdr",
        );
    });
}
