//! Pod networking through containerd's CRI and a real CNI chain (bridge + host-local + portmap from
//! containernetworking-plugins): two capsa pods and one runc pod on one bridge.
//!
//! Checks, each reported on its own line (`NETCHECK <name>: PASS|FAIL ...`) before the test asserts:
//! - each capsa pod's `eth0` carries the IP PodSandboxStatus reports, with the conflist's MTU; the pod's
//!   netns holds capsa's tap and the veth's ingress qdisc while the pod runs;
//! - TCP (busybox httpd + wget) capsa↔capsa and capsa↔runc both ways, host → capsa pod IP (what a
//!   kubelet probe does), capsa pod → host (the bridge gateway IP);
//! - a hostPort (portmap) reaches a capsa pod's server from the host;
//! - CRI PortForward (containerd's websocket, as kubectl port-forward uses it) returns the page of a
//!   capsa pod's httpd, as it does for the runc pod; to a closed port it ends with no data;
//! - RemovePodSandbox leaves no netns, no VMM, no tap, no IP allocation behind (counted before/after),
//!   and the shim logged its teardown of each capsa pod's netns;
//! - a capsa pod whose VMM is SIGKILLed loses its tap at once, and one whose shim is SIGKILLed is
//!   cleaned up by the shim's `delete`: RemovePodSandbox leaves nothing behind either way;
//! - a capsa container (`ctr run`) whose spec names a network namespace that does not exist fails,
//!   naming the path, and leaves nothing behind.
//!
//! Gated on CAPSA_E2E=1 and containerd being installed; containerd, shims, VMMs, mounts, the bridge and
//! the temporary directory are removed at the end, on failure too.

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use capsa_e2e::cni::{
    exec, missing_cni_plugins, net_pod_config, pod_network, wait_network_ready, BridgeNet,
};
use capsa_e2e::cri::{
    container_config, containerd_available, pids_mentioning, pids_of, port_forward, Cri,
    CriContainerd, BUSYBOX_IMAGE,
};
use capsa_e2e::leaks::{leak_snapshot, LeakSnapshot};
use capsa_e2e::{e2e_enabled, Inputs};
use k8s_cri::v1 as cri;

const NET: BridgeNet = BridgeNet {
    name: "capsa-e2e-net",
    bridge: "capsae2e0",
    subnet: "10.88.77.0/24",
    gateway: "10.88.77.1",
    mtu: 1400,
};
const GATEWAY: &str = NET.gateway;
const MTU: u32 = NET.mtu;
const POD_PORT: u16 = 8080;
const HOST_PORT: u16 = 18080;
const HOST_LISTEN_PORT: u16 = 19090;
const MISSING_NETNS: &str = "/var/run/netns/capsa-e2e-missing";

/// Outcomes of the named checks, printed as they happen.
#[derive(Default)]
struct Report {
    results: Vec<(String, Result<String, String>)>,
}

impl Report {
    fn record(&mut self, name: &str, r: Result<String, String>) {
        match &r {
            Ok(detail) => eprintln!("NETCHECK {name}: PASS {detail}"),
            Err(e) => eprintln!("NETCHECK {name}: FAIL {e}"),
        }
        self.results.push((name.to_owned(), r));
    }

    fn failures(&self) -> Vec<String> {
        self.results
            .iter()
            .filter_map(|(n, r)| r.as_ref().err().map(|e| format!("{n}: {e}")))
            .collect()
    }
}

/// A pod of the suite and its web container.
struct Pod {
    name: String,
    handler: &'static str,
    id: String,
    web: String,
    ip: String,
    netns: Option<PathBuf>,
}

/// Set on every pod; read back in its container under both runtimes.
const NET_SYSCTLS: [(&str, &str); 2] = [
    ("net.ipv4.ping_group_range", "0 2147483647"),
    ("net.ipv4.tcp_keepalive_time", "600"),
];

/// The pod's net sysctls as its container reads them.
async fn check_net_sysctls(cri: &Cri, pod: &Pod) -> Result<String, String> {
    let got = exec(
        cri,
        &pod.web,
        &[
            "sh",
            "-c",
            "echo $(cat /proc/sys/net/ipv4/ping_group_range) $(cat /proc/sys/net/ipv4/tcp_keepalive_time)",
        ],
    )
    .await?;
    let want = "0 2147483647 600";
    if got.trim() == want {
        Ok(want.into())
    } else {
        Err(format!("read {:?}, want {want:?}", got.trim()))
    }
}

fn suite_pod_config(c: &CriContainerd, name: &str, host_port: bool) -> cri::PodSandboxConfig {
    let mut cfg = net_pod_config(c, name);
    // Pod sysctls in the pod's network namespace: one Kubernetes calls safe, one unsafe (issue 9).
    if let Some(l) = cfg.linux.as_mut() {
        l.sysctls = NET_SYSCTLS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }
    if host_port {
        cfg.port_mappings = vec![cri::PortMapping {
            protocol: cri::Protocol::Tcp as i32,
            container_port: i32::from(POD_PORT),
            host_port: i32::from(HOST_PORT),
            host_ip: String::new(),
        }];
    }
    cfg
}

fn sh(cmd: &str) -> Result<String, String> {
    let o = Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{cmd}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// What pods leave on the host, to compare before and after.
#[derive(Debug, PartialEq, Eq)]
struct HostCounts {
    netns: Vec<String>,
    ip_allocations: Vec<String>,
    host_taps: Vec<String>,
    /// capsa's processes, mounts, sandbox directories, sockets and cgroups.
    leaks: LeakSnapshot,
}

fn host_counts(c: &CriContainerd) -> HostCounts {
    HostCounts {
        netns: dir_names(Path::new("/var/run/netns")),
        ip_allocations: dir_names(&NET.ip_allocations_dir())
            .into_iter()
            .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
            .collect(),
        host_taps: dir_names(Path::new("/sys/class/net"))
            .into_iter()
            .filter(|n| n.ends_with("_capsa"))
            .collect(),
        leaks: leak_snapshot(&c.dir, &c.capsa_state),
    }
}

/// `wget` from `from`'s container to `to`'s web server: must answer `pod-<to>`. A few attempts (the
/// server may still be starting).
async fn tcp_check(cri: &Cri, from: &Pod, to: &Pod) -> Result<String, String> {
    let url = format!("http://{}:{POD_PORT}/", to.ip);
    let want = format!("pod-{}", to.name);
    let started = Instant::now();
    let mut last = String::new();
    for _ in 0..3 {
        // (busybox 1.35's `wget -T` crashes: bound it with `timeout` instead.)
        match exec(
            cri,
            &from.web,
            &["timeout", "10", "wget", "-q", "-O", "-", &url],
        )
        .await
        {
            Ok(out) if out.trim() == want => {
                return Ok(format!(
                    "{url} answered {want:?} in {:?}",
                    started.elapsed()
                ))
            }
            Ok(out) => last = format!("unexpected body {out:?}"),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(format!("{} → {url}: {last}", from.name))
}

/// An HTTP GET from this process (the host's network namespace).
fn http_get(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n")
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    Ok(out)
}

async fn host_get(addr: SocketAddr, want: String) -> Result<String, String> {
    let started = Instant::now();
    let mut last = String::new();
    for _ in 0..3 {
        let r = tokio::task::spawn_blocking(move || http_get(addr))
            .await
            .map_err(|e| e.to_string())?;
        match r {
            Ok(body) if body.contains(&want) => {
                return Ok(format!(
                    "{addr} answered {want:?} in {:?}",
                    started.elapsed()
                ))
            }
            Ok(body) => last = format!("unexpected answer {body:?}"),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(last)
}

/// The pod (`nc` in its web container) connects to a listener of this process on the gateway IP.
async fn pod_to_host(cri: &Cri, pod: &Pod) -> Result<String, String> {
    let listener = TcpListener::bind(("0.0.0.0", HOST_LISTEN_PORT))
        .map_err(|e| format!("listen on :{HOST_LISTEN_PORT}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let (tx, rx) = std::sync::mpsc::channel();
    let acceptor = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((s, peer)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut got = String::new();
                    let _ = std::io::BufReader::new(s).read_line(&mut got);
                    let _ = tx.send((peer, got));
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    let msg = format!("hello-from-{}", pod.name);
    let script = format!("echo {msg} | nc -w 5 {GATEWAY} {HOST_LISTEN_PORT}");
    let ran = exec(cri, &pod.web, &["sh", "-c", &script]).await;
    let got = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
        .await
        .map_err(|e| e.to_string())?;
    let _ = acceptor.join();
    match got {
        Ok((peer, text)) if text.trim() == msg => Ok(format!(
            "{GATEWAY}:{HOST_LISTEN_PORT} got {msg:?} from {peer}"
        )),
        Ok((peer, text)) => Err(format!("got {text:?} from {peer}")),
        Err(_) => Err(format!("no connection arrived (exec: {ran:?})")),
    }
}

/// capsa's plumbing in a pod's netns: its links (with the tap) and eth0's ingress qdisc.
fn netns_plumbing(netns: &Path) -> Result<String, String> {
    let n = netns.display();
    let links = sh(&format!("nsenter --net={n} ip -o link show"))?;
    let qdisc = sh(&format!("nsenter --net={n} tc qdisc show dev eth0 ingress"))?;
    if !links.contains("tap0_capsa") {
        return Err(format!("no tap0_capsa in {n}: {links}"));
    }
    if !qdisc.contains("ingress") {
        return Err(format!("no ingress qdisc on eth0 in {n}: {qdisc:?}"));
    }
    let nat = sh(&format!("nsenter --net={n} iptables -w 5 -t nat -S OUTPUT"))?;
    if !nat.contains("capsa-port-forward") {
        return Err(format!("no capsa-port-forward redirect in {n}: {nat:?}"));
    }
    Ok(format!(
        "{n}: tap0_capsa + ingress qdisc on eth0 + port-forward redirect"
    ))
}

async fn start_pod(
    c: &CriContainerd,
    cri: &Cri,
    name: &str,
    handler: &'static str,
    host_port: bool,
    pods: &mut Vec<(String, &'static str)>,
) -> Result<Pod, String> {
    let cfg = suite_pod_config(c, name, host_port);
    let started = Instant::now();
    let id = cri
        .run_pod(&cfg, handler)
        .await
        .map_err(|e| format!("RunPodSandbox {name}: {e}"))?;
    pods.push((id.clone(), handler));
    let ran = started.elapsed();
    let server = format!(
        "mkdir -p /www && echo pod-{name} > /www/index.html && httpd -p {POD_PORT} -h /www && exec sleep 3600"
    );
    let web = cri
        .run_container(&id, &cfg, container_config("web", &["sh", "-c", &server]))
        .await
        .map_err(|e| format!("web container of {name}: {e}"))?;
    let (ip, netns) = pod_network(cri, &id).await?;
    eprintln!(
        "pod {name} ({handler}): RunPodSandbox {ran:?}, web running after {:?}, ip {ip}, netns {netns:?}",
        started.elapsed()
    );
    if ip.is_empty() {
        return Err(format!("PodSandboxStatus of {name} has no IP"));
    }
    Ok(Pod {
        name: name.into(),
        handler,
        id,
        web,
        ip,
        netns,
    })
}

/// CRI PortForward to the pod's httpd returns its page.
async fn port_forward_check(cri: &Cri, pod: &Pod) -> Result<String, String> {
    let want = format!("pod-{}", pod.name);
    let r = port_forward(
        cri,
        &pod.id,
        POD_PORT,
        b"GET / HTTP/1.0\r\n\r\n",
        want.as_bytes(),
        Duration::from_secs(30),
    )
    .await?;
    let text = String::from_utf8_lossy(&r.data);
    if text.contains(&want) && text.starts_with("HTTP/1.") {
        Ok(format!("{} bytes, {:?}", r.data.len(), text.lines().next()))
    } else {
        Err(format!("got {text:?}, error channel {:?}", r.error))
    }
}

/// CRI PortForward to a port nothing listens on ends promptly with no data (runc reports
/// "connection refused" on the error channel; capsa resets the forwarded connection).
async fn port_forward_closed(cri: &Cri, pod: &Pod) -> Result<String, String> {
    let r = port_forward(cri, &pod.id, 9, b"hello", b"", Duration::from_secs(30)).await?;
    if r.data.is_empty() {
        Ok(format!("ended with no data; error channel {:?}", r.error))
    } else {
        Err(format!(
            "data from a closed port: {:?}",
            String::from_utf8_lossy(&r.data)
        ))
    }
}

async fn check_eth0(cri: &Cri, pod: &Pod) -> Result<String, String> {
    let addr = exec(
        cri,
        &pod.web,
        &["ip", "-4", "-o", "addr", "show", "dev", "eth0"],
    )
    .await?;
    let mtu = exec(cri, &pod.web, &["cat", "/sys/class/net/eth0/mtu"]).await?;
    let want = format!("inet {}/24", pod.ip);
    if !addr.contains(&want) {
        return Err(format!("eth0 has {addr:?}, want {want:?}"));
    }
    if mtu.trim() != MTU.to_string() {
        return Err(format!("eth0 MTU {}, want {MTU}", mtu.trim()));
    }
    Ok(format!("{} on eth0, MTU {}", pod.ip, mtu.trim()))
}

/// RemovePodSandbox, then checks what the pod leaves behind.
async fn remove_and_check(c: &CriContainerd, cri: &Cri, pod: &Pod) -> Result<String, String> {
    let started = Instant::now();
    cri.remove_pod(&pod.id)
        .await
        .map_err(|e| format!("Stop/RemovePodSandbox: {e}"))?;
    let took = started.elapsed();
    let mut left = Vec::new();
    if let Some(ns) = &pod.netns {
        if ns.exists() {
            left.push(format!("netns {}", ns.display()));
        }
    }
    let ipfile = NET.ip_allocations_dir().join(&pod.ip);
    if ipfile.exists() {
        left.push(format!("IP allocation {}", ipfile.display()));
    }
    if pod.handler == "capsa" {
        let dir = c.capsa_state.join(&pod.id);
        // The VMM's pid may outlive RemovePodSandbox for a moment while it is reaped.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pids_mentioning(&dir.to_string_lossy()).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if !pids_mentioning(&dir.to_string_lossy()).is_empty() {
            left.push("VMM process".into());
        }
        if dir.exists() {
            left.push(format!("sandbox dir {}", dir.display()));
        }
    }
    if left.is_empty() {
        Ok(format!("removed in {took:?}, nothing left"))
    } else {
        Err(format!("left behind: {left:?}"))
    }
}

#[derive(Debug, Clone, Copy)]
enum Crash {
    Vmm,
    Shim,
}

/// SIGKILLs the pod's VMM or shim, checks what that leaves in the netns, then removes the pod and
/// checks nothing is left.
async fn crash_and_remove(
    c: &CriContainerd,
    cri: &Cri,
    pod: &Pod,
    crash: Crash,
) -> Result<String, String> {
    let vsock = c.capsa_state.join(&pod.id).join("vsock.sock");
    let vmms = pids_of("capsa-vmm", &vsock.to_string_lossy());
    let victims = match crash {
        Crash::Vmm => vmms.clone(),
        Crash::Shim => pids_of("containerd-shim-capsa-v2", &pod.id),
    };
    if victims.is_empty() {
        return Err(format!(
            "no {crash:?} process found for {} (VMMs {vmms:?})",
            pod.name
        ));
    }
    for pid in &victims {
        // SAFETY: plain kill(2) of a process this test's containerd started.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut detail = format!("killed {crash:?} {victims:?}");
    if let (Crash::Vmm, Some(ns)) = (crash, &pod.netns) {
        // The VMM held the only fd on the tap: it went with it.
        let links = sh(&format!("nsenter --net={} ip -o link show", ns.display()))?;
        if links.contains("tap0_capsa") {
            return Err(format!("tap0_capsa outlived the VMM: {links}"));
        }
        detail.push_str("; tap gone with the VMM");
    }
    let removed = tokio::time::timeout(Duration::from_secs(120), remove_and_check(c, cri, pod))
        .await
        .map_err(|_| "Stop/RemovePodSandbox took over 120 s".to_string())??;
    Ok(format!("{detail}; {removed}"))
}

/// `ctr run` of a capsa container whose spec joins a network namespace that does not exist.
fn missing_netns(c: &CriContainerd) -> Result<String, String> {
    let before = host_counts(c);
    let cfg = c.dir.join("capsa.toml");
    let o = c.ctr(&[
        "-n",
        "k8s.io",
        "run",
        "--rm",
        "--snapshotter",
        "native",
        "--runtime",
        "io.containerd.capsa.v2",
        "--runtime-config-path",
        &cfg.to_string_lossy(),
        "--with-ns",
        &format!("network:{MISSING_NETNS}"),
        BUSYBOX_IMAGE,
        "netmiss",
        "true",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let _ = c.ctr(&["-n", "k8s.io", "task", "rm", "-f", "netmiss"]);
    let _ = c.ctr(&["-n", "k8s.io", "container", "rm", "netmiss"]);
    std::thread::sleep(Duration::from_secs(1));
    let after = host_counts(c);
    if o.status.success() {
        return Err("the container ran".into());
    }
    if !stderr.contains(MISSING_NETNS) {
        return Err(format!("the error does not name the path: {stderr}"));
    }
    if before != after {
        return Err(format!("left behind: before {before:?}, after {after:?}"));
    }
    Ok(format!("refused: {}", stderr.trim()))
}

async fn suite(c: &CriContainerd, report: &mut Report, pods: &mut Vec<(String, &'static str)>) {
    let cri = c.client().await;
    if let Err(e) = wait_network_ready(&cri).await {
        report.record("cni-ready", Err(e));
        return;
    }
    let baseline = host_counts(c);
    eprintln!("before: {baseline:?}");

    let mut started = Vec::new();
    for (name, handler, host_port) in [
        ("net-a", "capsa", true),
        ("net-b", "capsa", false),
        ("net-r", "runc", false),
    ] {
        match start_pod(c, &cri, name, handler, host_port, pods).await {
            Ok(p) => started.push(p),
            Err(e) => {
                report.record(&format!("start-{name}"), Err(e));
                return;
            }
        }
    }
    let (a, b, r) = (&started[0], &started[1], &started[2]);
    for p in [a, b, r] {
        report.record(
            &format!("sysctls-{}", p.name),
            check_net_sysctls(&cri, p).await,
        );
    }
    for p in [a, b] {
        report.record(&format!("eth0-{}", p.name), check_eth0(&cri, p).await);
        let plumbing = match &p.netns {
            Some(ns) => netns_plumbing(ns),
            None => Err("CRI reports no netns path".into()),
        };
        report.record(&format!("plumbing-{}", p.name), plumbing);
    }
    for (from, to) in [(a, b), (b, a), (a, r), (r, a)] {
        report.record(
            &format!("tcp-{}-to-{}", from.name, to.name),
            tcp_check(&cri, from, to).await,
        );
    }
    let pod_addr: SocketAddr = format!("{}:{POD_PORT}", a.ip).parse().expect("pod addr");
    report.record(
        "tcp-host-to-net-a",
        host_get(pod_addr, "pod-net-a".into()).await,
    );
    report.record("tcp-net-a-to-host", pod_to_host(&cri, a).await);
    let gw_port: SocketAddr = format!("{GATEWAY}:{HOST_PORT}").parse().expect("addr");
    report.record(
        "hostport-gateway-ip",
        host_get(gw_port, "pod-net-a".into()).await,
    );
    // CRI PortForward (kubectl port-forward): containerd dials localhost:PORT in the pod's netns;
    // capsa carries it into the guest. runc alongside, as the reference.
    for p in [a, r] {
        report.record(
            &format!("port-forward-{}", p.name),
            port_forward_check(&cri, p).await,
        );
    }
    report.record(
        "port-forward-closed-port-net-a",
        port_forward_closed(&cri, a).await,
    );
    // Informational: portmap's localhost path (route_localnet + SNAT), not required.
    let lo: SocketAddr = format!("127.0.0.1:{HOST_PORT}").parse().expect("addr");
    eprintln!(
        "info: hostPort via 127.0.0.1: {:?}",
        host_get(lo, "pod-net-a".into()).await
    );

    for p in &started {
        let r = remove_and_check(c, &cri, p).await;
        pods.retain(|(id, _)| *id != p.id);
        report.record(&format!("remove-{}", p.name), r);
    }
    // Failure paths: a pod whose VMM dies, a pod whose shim dies (containerd then runs the shim's
    // `delete`, which cleans the netns from the bundle's config.json).
    for (name, crash) in [("net-c", Crash::Vmm), ("net-d", Crash::Shim)] {
        let pod = match start_pod(c, &cri, name, "capsa", false, pods).await {
            Ok(p) => p,
            Err(e) => {
                report.record(&format!("start-{name}"), Err(e));
                continue;
            }
        };
        report.record(
            &format!("{crash:?}-killed-{name}"),
            crash_and_remove(c, &cri, &pod, crash).await,
        );
        pods.retain(|(id, _)| *id != pod.id);
        started.push(pod);
    }
    // The shim's log (in containerd's) says when each capsa pod's plumbing went: with the netns
    // still there (before CNI DEL) or after containerd had removed it.
    let log = std::fs::read_to_string(c.dir.join("containerd.log")).unwrap_or_default();
    // (net-d's shim was killed: its `delete` prints nothing but the DeleteResponse.)
    for p in started
        .iter()
        .filter(|p| p.handler == "capsa" && p.name != "net-d")
    {
        let ns = p
            .netns
            .as_ref()
            .map(|n| n.display().to_string())
            .unwrap_or_default();
        let line = log.lines().find(|l| {
            l.contains(&ns) && (l.contains("pod network torn down") || l.contains("already gone"))
        });
        report.record(
            &format!("teardown-{}", p.name),
            match line {
                Some(l) if l.contains("torn down") => {
                    Ok("qdiscs removed while the netns existed (before CNI DEL)".into())
                }
                Some(_) => Ok("netns already gone at shim shutdown; tap fds closed".into()),
                // net-c's VMM was killed: its shim tears down and exits at once, and its last log lines can
                // be lost with the log FIFO (seen in CI); "nothing-left" below still checks the netns.
                None if p.name == "net-c" => Ok(
                    "no log line (the shim exited with its VMM); checked by nothing-left".into(),
                ),
                None => Err(format!("no teardown line for {ns} in containerd's log")),
            },
        );
    }
    let after = host_counts(c);
    eprintln!("after: {after:?}");
    report.record(
        "nothing-left",
        if after == baseline {
            Ok(format!("{after:?}"))
        } else {
            Err(format!("before {baseline:?}, after {after:?}"))
        },
    );
    report.record("missing-netns", missing_netns(c));
}

#[test]
fn cri_pod_network() {
    if !e2e_enabled("cri_pod_network") || !containerd_available("cri_pod_network") {
        return;
    }
    let missing = missing_cni_plugins();
    assert!(
        missing.is_empty(),
        "CNI plugins {missing:?} missing (apt-get install containernetworking-plugins)"
    );
    let inputs = Inputs::from_env();
    inputs.require();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = CriContainerd::start_with_cni(&inputs, Some(&NET.conflist()));
    let started = Instant::now();
    let mut report = Report::default();
    let mut pods = Vec::new();
    let run = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(600), suite(&c, &mut report, &mut pods)).await
    });
    if run.is_err() {
        report.record("suite", Err("timed out after 600 s".into()));
    }
    // Whatever failed: remove the pods still there (CNI DEL releases their IPs and port mappings).
    if !pods.is_empty() {
        let cri = rt.block_on(c.client());
        for (id, _) in &pods {
            let _ = rt.block_on(cri.remove_pod(id));
        }
    }
    eprintln!("cri_pod_network: {:?} in all", started.elapsed());
    let failures = report.failures();
    let tail = if failures.is_empty() {
        String::new()
    } else {
        c.log_tail()
    };
    drop(c);
    NET.remove_bridge();
    assert!(
        failures.is_empty(),
        "{} check(s) failed:\n{}\n--- containerd log ---\n{tail}",
        failures.len(),
        failures.join("\n")
    );
    assert!(report.results.len() >= 21, "not every check ran");
}
