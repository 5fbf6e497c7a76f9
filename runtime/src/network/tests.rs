//! Integration tests against real namespaces: run as root (skipped with a printed reason otherwise).
//! Each test makes its own pod namespace and a peer namespace holding the other veth end, so the
//! host's namespace is never touched; a Drop guard deletes both.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::*;

const POD_MAC: [u8; 6] = [0x0a, 0x58, 0x0a, 0xc8, 0x00, 0x02];
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn must(args: &[&str]) -> String {
    run(args).unwrap_or_else(|e| panic!("fixture command failed: {e}"))
}

/// A pod namespace with `eth0` (10.200.0.2/24, fd00:200::2/64, MTU 1400, default routes, one
/// permanent neighbour) whose veth peer `vpeer0` (10.200.0.1, fd00:200::1) sits in a peer namespace.
struct Fixture {
    pod: String,
    peer: String,
}

impl Fixture {
    fn new() -> Option<Fixture> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIP: network namespace tests need root");
            return None;
        }
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pod = format!("capsa-test-{}-{n}", std::process::id());
        let peer = format!("{pod}-peer");
        if let Err(e) = run(&["ip", "netns", "add", &pod]) {
            println!("SKIP: cannot create a network namespace: {e}");
            return None;
        }
        let fx = Fixture { pod, peer };
        if let Err(e) = run(&["ip", "netns", "add", &fx.peer]) {
            println!("SKIP: cannot create a network namespace: {e}");
            return None;
        }
        fx.add_veth("eth0", "vpeer0", 1);
        let (p, q) = (fx.pod.as_str(), fx.peer.as_str());
        must(&[
            "ip",
            "-n",
            p,
            "link",
            "set",
            "eth0",
            "address",
            &format_mac(&POD_MAC),
        ]);
        must(&[
            "ip",
            "-n",
            p,
            "-6",
            "addr",
            "add",
            "fd00:200::2/64",
            "dev",
            "eth0",
            "nodad",
        ]);
        must(&[
            "ip",
            "-n",
            q,
            "-6",
            "addr",
            "add",
            "fd00:200::1/64",
            "dev",
            "vpeer0",
            "nodad",
        ]);
        must(&[
            "ip",
            "-n",
            p,
            "route",
            "add",
            "default",
            "via",
            "10.200.0.1",
            "dev",
            "eth0",
        ]);
        must(&[
            "ip",
            "-n",
            p,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fd00:200::1",
            "dev",
            "eth0",
        ]);
        must(&[
            "ip",
            "-n",
            p,
            "neigh",
            "add",
            "10.200.0.99",
            "lladdr",
            "ee:ee:ee:ee:ee:ee",
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
        Some(fx)
    }

    /// A veth `name` in the pod (10.200.<subnet>.2/24, MTU 1400) with `peer` in the peer namespace.
    fn add_veth(&self, name: &str, peer: &str, subnet: u8) {
        let (p, q) = (self.pod.as_str(), self.peer.as_str());
        must(&[
            "ip", "-n", q, "link", "add", name, "mtu", "1400", "type", "veth", "peer", "name",
            peer, "mtu", "1400",
        ]);
        must(&["ip", "-n", q, "link", "set", name, "netns", p]);
        let base = if subnet == 1 { 0 } else { subnet };
        must(&[
            "ip",
            "-n",
            p,
            "addr",
            "add",
            &format!("10.200.{base}.2/24"),
            "dev",
            name,
        ]);
        must(&[
            "ip",
            "-n",
            q,
            "addr",
            "add",
            &format!("10.200.{base}.1/24"),
            "dev",
            peer,
        ]);
        must(&["ip", "-n", p, "link", "set", name, "up"]);
        must(&["ip", "-n", p, "link", "set", "lo", "up"]);
        must(&["ip", "-n", q, "link", "set", peer, "up"]);
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.pod)
    }

    fn tc_json(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let mut cmd = vec!["ip", "netns", "exec", &self.pod, "tc", "-j"];
        cmd.extend_from_slice(args);
        let out = must(&cmd);
        if out.trim().is_empty() {
            return Vec::new();
        }
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("tc -j output {out:?}: {e}"))
    }

    fn ingress_qdiscs(&self) -> usize {
        self.tc_json(&["qdisc", "show"])
            .iter()
            .filter(|q| q["kind"] == "ingress")
            .count()
    }

    /// Filters with a mirred action on `dev`'s ingress, as their JSON text.
    fn mirred_filters(&self, dev: &str) -> Vec<String> {
        self.tc_json(&["filter", "show", "dev", dev, "ingress"])
            .iter()
            .map(|f| f.to_string())
            .filter(|s| s.contains("mirred"))
            .collect()
    }

    fn links(&self) -> Vec<(String, u32)> {
        let out = must(&["ip", "-n", &self.pod, "-j", "link", "show"]);
        let v: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        v.iter()
            .map(|l| {
                (
                    l["ifname"].as_str().unwrap().to_string(),
                    l["mtu"].as_u64().unwrap() as u32,
                )
            })
            .collect()
    }

    fn capsa_taps(&self) -> Vec<String> {
        self.links()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| is_capsa_tap(n))
            .collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.pod]);
        let _ = run(&["ip", "netns", "del", &self.peer]);
    }
}

// ---- frames ------------------------------------------------------------------------------------

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A frame as written to the tap: a zeroed 12-byte virtio_net_hdr_v1, then Ethernet.
fn with_vnet_hdr(frame: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; VNET_HDR_LEN];
    v.extend_from_slice(frame);
    v
}

fn arp_request(src_mac: [u8; 6], src_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x06, 0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&src_ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

fn icmp_echo(src_mac: [u8; 6], dst_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, id: u16) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&1u16.to_be_bytes());
    icmp.extend_from_slice(b"capsa tcfilter test payload");
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = dst_mac.to_vec();
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

fn write_frame(fd: BorrowedFd<'_>, frame: &[u8]) {
    let buf = with_vnet_hdr(frame);
    let n = nix::unistd::write(fd, &buf).expect("write to tap");
    assert_eq!(n, buf.len());
}

/// Reads frames from the tap (stripping the vnet header) until `want` accepts one or 5 s pass.
fn read_until<T>(fd: BorrowedFd<'_>, mut want: impl FnMut(&[u8]) -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(200u16)).expect("poll tap") == 0 {
            continue;
        }
        let n = nix::unistd::read(fd.as_raw_fd(), &mut buf).expect("read tap");
        if n <= VNET_HDR_LEN {
            continue;
        }
        if let Some(t) = want(&buf[VNET_HDR_LEN..n]) {
            return Some(t);
        }
    }
    None
}

/// The peer's MAC from an ARP reply for `PEER_IP`.
fn arp_reply_from_peer(f: &[u8]) -> Option<[u8; 6]> {
    if f.len() >= 42
        && f[12..14] == [0x08, 0x06]
        && f[20..22] == [0, 2]
        && f[28..32] == PEER_IP.octets()
    {
        return Some(f[22..28].try_into().unwrap());
    }
    None
}

fn echo_reply_from_peer(f: &[u8], id: u16) -> Option<()> {
    if f.len() >= 42
        && f[0..6] == POD_MAC
        && f[12..14] == [0x08, 0x00]
        && f[23] == 1
        && f[26..30] == PEER_IP.octets()
        && f[34] == 0
        && f[38..40] == id.to_be_bytes()
    {
        return Some(());
    }
    None
}

// ---- tests ------------------------------------------------------------------------------------

#[tokio::test]
async fn discovery_reports_the_veth() {
    let Some(fx) = Fixture::new() else { return };
    let ifaces = discover(&fx.path()).await.expect("discover");
    assert_eq!(ifaces.len(), 1, "{ifaces:#?}");
    let i = &ifaces[0];
    assert_eq!(i.name, "eth0");
    assert_eq!(i.mac, POD_MAC);
    assert_eq!(i.mtu, 1400);
    let addrs: Vec<String> = i.addresses.iter().map(|a| a.to_string()).collect();
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    assert!(addrs.contains(&"10.200.0.2/24".to_string()), "{addrs:?}");
    assert!(addrs.contains(&"fd00:200::2/64".to_string()), "{addrs:?}");
    let v4_default = i
        .routes
        .iter()
        .find(|r| r.dest.is_none() && !r.ipv6)
        .expect("IPv4 default route");
    assert_eq!(v4_default.gateway, Some("10.200.0.1".parse().unwrap()));
    let v6_default = i
        .routes
        .iter()
        .find(|r| r.dest.is_none() && r.ipv6)
        .expect("IPv6 default route");
    assert_eq!(v6_default.gateway, Some("fd00:200::1".parse().unwrap()));
    let subnet = i
        .routes
        .iter()
        .find(|r| r.dest.map(|d| d.to_string()) == Some("10.200.0.0/24".into()))
        .expect("subnet route");
    assert_eq!(subnet.scope, 253);
    assert_eq!(subnet.source, Some("10.200.0.2".parse().unwrap()));
    assert_eq!(subnet.protocol, 2);
    assert!(i.routes.iter().all(|r| !r
        .dest
        .is_some_and(|d| d.addr.to_string().starts_with("fe80"))));
    assert_eq!(i.neighbours.len(), 1, "{:?}", i.neighbours);
    assert_eq!(
        i.neighbours[0].ip,
        "10.200.0.99".parse::<std::net::IpAddr>().unwrap()
    );
    assert_eq!(i.neighbours[0].lladdr, [0xee; 6]);
    assert_eq!(i.neighbours[0].state, 0x80);

    // Conversions carry the same facts; the kernel's subnet routes are left to the guest.
    let agent_if = i.to_agent_interface();
    assert_eq!(agent_if.hw_addr, "0a:58:0a:c8:00:02");
    assert_eq!(agent_if.mtu, 1400);
    let routes = i.to_agent_routes();
    assert!(routes
        .iter()
        .any(|r| r.dest.is_empty() && r.gateway == "10.200.0.1"));
    assert!(routes.iter().all(|r| r.dest != "10.200.0.0/24"));
}

#[tokio::test]
async fn setup_joins_veth_and_tap_and_traffic_crosses() {
    let Some(fx) = Fixture::new() else { return };
    assert_eq!(fx.ingress_qdiscs(), 0);
    let mut net = PodNetwork::setup(&fx.path()).await.expect("setup");
    assert_eq!(net.endpoints().len(), 1);
    let ep = &net.endpoints()[0];
    assert_eq!(ep.tap_name, "tap0_capsa");
    assert_eq!(ep.interface.name, "eth0");
    let links = fx.links();
    assert!(
        links.contains(&("tap0_capsa".to_string(), 1400)),
        "{links:?}"
    );
    assert_eq!(fx.ingress_qdiscs(), 2);
    let f = fx.mirred_filters("eth0");
    assert_eq!(f.len(), 1, "{f:?}");
    assert!(f[0].contains("tap0_capsa"), "{f:?}");
    assert!(f[0].contains(r#""protocol":"all""#), "{f:?}");
    let f = fx.mirred_filters("tap0_capsa");
    assert_eq!(f.len(), 1, "{f:?}");
    assert!(f[0].contains("eth0"), "{f:?}");

    // Re-running discovery while set up ignores capsa's tap.
    let again = discover(&fx.path()).await.expect("discover");
    assert_eq!(
        again.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
        ["eth0"]
    );

    let fd = ep.tap_fd().expect("tap fd");
    assert_eq!(
        tap::vnet_hdr_len(&fd.try_clone_to_owned().unwrap()).unwrap(),
        VNET_HDR_LEN
    );
    // SAFETY: F_GETFD only reads the descriptor flags of an open fd.
    let fd_flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
    assert!(fd_flags & libc::FD_CLOEXEC != 0);

    // What the guest would send: an ARP request for the peer, then a ping, from the veth's MAC/IP.
    write_frame(fd, &arp_request(POD_MAC, POD_IP, PEER_IP));
    let peer_mac = read_until(fd, arp_reply_from_peer);
    if peer_mac.is_none() {
        // Diagnostics for a CI failure: filter hit counters and interface counters on both sides.
        println!(
            "{}",
            must(&[
                "ip",
                "netns",
                "exec",
                &fx.pod,
                "tc",
                "-s",
                "filter",
                "show",
                "dev",
                "tap0_capsa",
                "ingress"
            ])
        );
        println!(
            "{}",
            must(&[
                "ip", "netns", "exec", &fx.pod, "tc", "-s", "filter", "show", "dev", "eth0",
                "ingress"
            ])
        );
        println!("{}", must(&["ip", "-n", &fx.pod, "-s", "link"]));
        println!("{}", must(&["ip", "-n", &fx.peer, "-s", "link"]));
        println!("{}", must(&["ip", "-n", &fx.peer, "neigh"]));
    }
    let peer_mac = peer_mac.expect("no ARP reply from the peer through the tap within 5 s");
    write_frame(fd, &icmp_echo(POD_MAC, peer_mac, POD_IP, PEER_IP, 0x4321));
    read_until(fd, |f| echo_reply_from_peer(f, 0x4321))
        .expect("no ICMP echo reply through the tap within 5 s");

    net.teardown().await.expect("teardown");
    assert!(net.endpoints().is_empty());
    assert_eq!(
        fx.capsa_taps(),
        Vec::<String>::new(),
        "the tap vanishes with its fd"
    );
    assert_eq!(fx.ingress_qdiscs(), 0);
    assert!(fx.mirred_filters("eth0").is_empty());
    net.teardown().await.expect("second teardown is a no-op");

    // The namespace is as it was: setting up again works.
    let mut net = PodNetwork::setup(&fx.path()).await.expect("setup again");
    net.teardown().await.expect("teardown again");
}

#[tokio::test]
async fn teardown_after_the_netns_is_gone_closes_the_fds() {
    let Some(fx) = Fixture::new() else { return };
    let mut net = PodNetwork::setup(&fx.path()).await.expect("setup");
    must(&["ip", "netns", "del", &fx.pod]);
    net.teardown().await.expect("teardown of a deleted netns");
    assert!(net.endpoints().is_empty());
    net.teardown().await.expect("idempotent");
    let report = cleanup_netns(&fx.path())
        .await
        .expect("cleanup of a deleted netns");
    assert_eq!(report, CleanupReport::default());
}

#[tokio::test]
async fn missing_or_wrong_netns_is_a_typed_error() {
    let missing = PathBuf::from(format!(
        "/var/run/netns/capsa-test-missing-{}",
        std::process::id()
    ));
    match discover(&missing).await {
        Err(NetworkError::NetnsNotFound { path }) => assert_eq!(path, missing),
        other => panic!("expected NetnsNotFound, got {other:?}"),
    }
    let err = PodNetwork::setup(&missing).await.unwrap_err();
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );
    assert!(err.is_netns_gone());

    // Not on nsfs at all.
    let file = PathBuf::from("/proc/self/status");
    match discover(&file).await {
        Err(NetworkError::NotANetns { path, .. }) => assert_eq!(path, file),
        other => panic!("expected NotANetns, got {other:?}"),
    }
    // A namespace, but not a network one.
    let mnt = PathBuf::from("/proc/self/ns/mnt");
    match discover(&mnt).await {
        Err(NetworkError::NotANetns { path, reason }) => {
            assert_eq!(path, mnt);
            assert!(reason.contains("CLONE_NEWNET"), "{reason}");
        }
        other => panic!("expected NotANetns, got {other:?}"),
    }
}

#[tokio::test]
async fn a_netns_with_only_lo_is_refused() {
    let Some(fx) = Fixture::new() else { return };
    must(&["ip", "-n", &fx.pod, "link", "del", "eth0"]);
    match PodNetwork::setup(&fx.path()).await {
        Err(NetworkError::NoInterfaces { path }) => assert_eq!(path, fx.path()),
        other => panic!("expected NoInterfaces, got {other:?}"),
    }
    assert!(fx.capsa_taps().is_empty());
}

#[tokio::test]
async fn a_failure_midway_leaves_nothing_behind() {
    let Some(fx) = Fixture::new() else { return };
    // eth1 is plumbed after eth0 and already has an ingress qdisc that is not capsa's.
    fx.add_veth("eth1", "vpeer1", 2);
    must(&[
        "ip", "netns", "exec", &fx.pod, "tc", "qdisc", "add", "dev", "eth1", "ingress",
    ]);
    match PodNetwork::setup(&fx.path()).await {
        Err(NetworkError::IngressQdiscExists { interface }) => assert_eq!(interface, "eth1"),
        other => panic!("expected IngressQdiscExists on eth1, got {other:?}"),
    }
    assert!(fx.capsa_taps().is_empty(), "{:?}", fx.capsa_taps());
    // Only the foreign qdisc of eth1 remains; eth0's was removed.
    assert_eq!(fx.ingress_qdiscs(), 1);
    assert!(fx
        .tc_json(&["qdisc", "show", "dev", "eth0"])
        .iter()
        .all(|q| q["kind"] != "ingress"));
    assert!(fx.mirred_filters("eth0").is_empty());
}

#[tokio::test]
async fn cleanup_by_path_removes_only_capsa_plumbing() {
    let Some(fx) = Fixture::new() else { return };
    fx.add_veth("eth1", "vpeer1", 2);
    let mut net = PodNetwork::setup(&fx.path()).await.expect("setup");
    assert_eq!(net.endpoints().len(), 2);
    assert_eq!(fx.ingress_qdiscs(), 4);
    // A "VMM" still holds eth0's tap; the shim dies without teardown.
    let held = net.endpoints_mut()[0].take_tap_fd().expect("fd");
    drop(net);
    assert_eq!(fx.capsa_taps(), ["tap0_capsa"]);
    // A qdisc somebody else put on a third interface must survive.
    fx.add_veth("eth2", "vpeer2", 3);
    must(&[
        "ip", "netns", "exec", &fx.pod, "tc", "qdisc", "add", "dev", "eth2", "ingress",
    ]);

    let mut report = cleanup_netns(&fx.path()).await.expect("cleanup");
    report.qdiscs_deleted.sort();
    assert_eq!(report.taps_deleted, ["tap0_capsa"]);
    assert_eq!(report.qdiscs_deleted, ["eth0", "eth1"]);
    assert!(fx.capsa_taps().is_empty());
    assert_eq!(fx.ingress_qdiscs(), 1, "only eth2's foreign qdisc is left");
    drop(held);

    let report = cleanup_netns(&fx.path()).await.expect("second cleanup");
    assert_eq!(report, CleanupReport::default());
}

#[tokio::test]
async fn callers_thread_keeps_its_namespace() {
    let Some(fx) = Fixture::new() else { return };
    let before = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let inside = run_in_netns(&fx.path(), |_h| async move {
        Ok(std::fs::read_link("/proc/thread-self/ns/net").unwrap())
    })
    .await
    .unwrap();
    let after = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    assert_eq!(before, after);
    assert_ne!(before, inside);
}

/// Clears CAP_NET_ADMIN from the calling thread's effective set (capabilities are per thread).
fn drop_net_admin_on_this_thread() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget with a v3 header writes two `__user_cap_data_struct`s into `data`, which has
    // that layout and outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut Header,
            data.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "capget: {}", std::io::Error::last_os_error());
    data[0].effective &= !(1 << 12); // CAP_NET_ADMIN
                                     // SAFETY: capset reads the same two structs; pid 0 means the calling thread only.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    assert_eq!(r, 0, "capset: {}", std::io::Error::last_os_error());
}

#[tokio::test]
async fn tap_creation_refused_is_a_typed_error() {
    let Some(fx) = Fixture::new() else { return };
    let result = run_in_netns(&fx.path(), |_h| async move {
        drop_net_admin_on_this_thread();
        Ok(tap::create_tap("tap7_capsa"))
    })
    .await
    .expect("run_in_netns");
    match result {
        Err(e @ NetworkError::Tap { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("tap7_capsa")
                    && msg.contains("TUNSETIFF")
                    && msg.contains("CAP_NET_ADMIN"),
                "{msg}"
            );
        }
        other => panic!("expected a Tap error, got {other:?}"),
    }
    assert!(fx.capsa_taps().is_empty());
}

#[tokio::test]
async fn a_dropped_setup_is_undone() {
    let Some(fx) = Fixture::new() else { return };
    // Polled once (the worker starts), then dropped. On a loaded machine the worker can finish before the
    // first poll returns: then that setup is torn down and the drop tried again.
    let mut dropped = false;
    for _ in 0..10 {
        match tokio::time::timeout(Duration::ZERO, PodNetwork::setup(&fx.path())).await {
            Err(_) => {
                dropped = true;
                break;
            }
            Ok(r) => r.expect("setup").teardown().await.expect("teardown"),
        }
    }
    assert!(dropped, "setup finished within its first poll ten times");
    // The worker finishes on its own thread, finds nobody to hand the taps to and undoes it all.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(fx.capsa_taps().is_empty(), "{:?}", fx.capsa_taps());
    assert_eq!(fx.ingress_qdiscs(), 0);
    // Nothing left over: a real setup works.
    let mut net = PodNetwork::setup(&fx.path()).await.expect("setup");
    net.teardown().await.expect("teardown");
}

/// The sandbox wiring end to end up to the VMM's exec: a [`sandbox::SandboxNetwork`] on the
/// fixture's namespace gives [`crate::vm::Vm::start`] a `--net fd=N,mac=<veth MAC>,mtu=<veth MTU>`
/// device; the spawned "VMM" (a script recording its fds) holds exactly that tap fd at N and no
/// other tap; once the VM is gone and the config dropped, the tap is gone, and teardown removes
/// the veth's qdisc.
#[tokio::test]
async fn sandbox_network_hands_the_tap_to_the_vmm() {
    use std::os::unix::fs::PermissionsExt;
    let Some(fx) = Fixture::new() else { return };
    let spec = serde_json::json!({"linux": {"namespaces": [
        {"type": "network", "path": fx.path().to_string_lossy()}
    ]}});
    let mut net = sandbox::SandboxNetwork::from_spec(&spec)
        .await
        .unwrap()
        .expect("the spec names a netns");
    assert_eq!(fx.capsa_taps(), ["tap0_capsa"]);
    let devices = net.take_vmm_devices();
    assert_eq!(devices.len(), 1);
    assert!(
        net.take_vmm_devices().is_empty(),
        "the fds are handed out once"
    );
    let fd = devices[0].tap.as_raw_fd();
    assert_eq!(
        devices[0].vmm_arg(),
        format!("fd={fd},mac=0a:58:0a:c8:00:02,mtu=1400")
    );

    let dir = tempfile::tempdir().unwrap();
    let vmm = dir.path().join("fake-vmm");
    let out = dir.path().join("fds");
    std::fs::write(
        &vmm,
        format!(
            "#!/bin/sh\necho \"$*\" > {o}.args\nfor f in /proc/$$/fd/*; do echo \"${{f##*/}} $(readlink $f)\"; done > {o}\nexit 3\n",
            o = out.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(dir.path().join("k"), b"kernel").unwrap();
    let mut config = crate::vm::VmConfig::new(vmm.clone(), dir.path().join("k"), None);
    config.run_root = dir.path().join("run");
    // A shell-script VMM that lists its fds through /proc: not in a jail.
    config.jail.enabled = false;
    config.cgroup = crate::jail::CgroupPlacement::Inherit;
    config.net = devices;
    let err = crate::vm::Vm::start(&config, "netsb").await.unwrap_err();
    assert!(matches!(err, crate::vm::VmError::VmmExited { .. }), "{err}");
    let args = std::fs::read_to_string(format!("{}.args", out.display())).unwrap();
    assert!(
        args.contains(&format!("--net fd={fd},mac=0a:58:0a:c8:00:02,mtu=1400")),
        "{args}"
    );
    let fds = std::fs::read_to_string(&out).unwrap();
    let taps: Vec<&str> = fds
        .lines()
        .filter(|l| l.ends_with("/dev/net/tun"))
        .collect();
    assert_eq!(taps, [format!("{fd} /dev/net/tun")], "{fds}");
    // Nothing else of this process leaks into the VMM (its netlink sockets, tokio's epoll and
    // eventfds are close-on-exec); pipes and files may come from the test harness or the shell.
    for line in fds.lines() {
        let (_, target) = line.split_once(' ').unwrap();
        assert!(
            !target.starts_with("socket:") && !target.starts_with("anon_inode:"),
            "the VMM inherited an unexpected fd: {line}\n{fds}"
        );
    }
    // The shim's copy goes with the config: the tap goes with the (dead) VMM.
    drop(config);
    assert!(fx.capsa_taps().is_empty(), "{:?}", fx.links());
    assert_eq!(
        fx.ingress_qdiscs(),
        1,
        "the veth's qdisc stays until teardown"
    );
    net.teardown().await.unwrap();
    assert_eq!(fx.ingress_qdiscs(), 0);
    net.teardown().await.unwrap();
}

/// A shim that died with its VMM still holding the tap: the dead-shim `delete` path
/// ([`crate::shim::cleanup::cleanup_pod_network`]) deletes the tap and the veth's qdisc, so CNI DEL
/// finds the veth as CNI left it.
#[tokio::test]
async fn dead_shim_cleanup_removes_the_plumbing() {
    let Some(fx) = Fixture::new() else { return };
    let mut net = sandbox::SandboxNetwork::setup(&fx.path()).await.unwrap();
    // What an orphaned VMM holds.
    let orphan_fds = net.take_vmm_devices();
    assert_eq!(fx.capsa_taps(), ["tap0_capsa"]);
    assert_eq!(fx.ingress_qdiscs(), 2);
    // The shim's state is lost (no teardown); delete runs on its own thread without a runtime.
    std::mem::forget(net);
    let path = fx.path();
    let msg = tokio::task::spawn_blocking(move || crate::shim::cleanup::cleanup_pod_network(&path))
        .await
        .unwrap();
    assert!(msg.contains("tap0_capsa") && msg.contains("eth0"), "{msg}");
    assert!(fx.capsa_taps().is_empty(), "{:?}", fx.links());
    assert_eq!(fx.ingress_qdiscs(), 0);
    drop(orphan_fds);
}
