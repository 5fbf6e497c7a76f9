//! capsa-cri-bench: pod start through containerd's CRI, capsa vs runc, the host memory a capsa pod
//! costs, and pod networking. Prints numbers; asserts nothing. `make bench` runs it inside the nested test
//! host.
//!
//! Section `start`, per run and handler: RunPodSandbox → the pod is ready (RunPodSandbox returned), and
//! RunPodSandbox → the first line of a container's log (CreateContainer + StartContainer of `echo first;
//! sleep`, the log file containerd writes polled every 5 ms). Medians of N runs (default 10) and the
//! capsa/runc ratio. Memory: VmRSS and Pss (smaps_rollup) of the pod's capsa-vmm,
//! containerd-shim-capsa-v2 and virtiofsd processes, while the pod runs.
//!
//! Section `net`: one capsa pod and one runc pod on a CNI bridge (bridge + host-local + portmap from
//! containernetworking-plugins), each running busybox servers (a `dd` sink and a `cat` echo behind
//! `nc -ll -e`). Alternating capsa and runc, each run measures TCP throughput host → pod IP (this process
//! sends `--net-mib` MiB, the sink reports what it read), pod → host (`dd` on a socket `nc` connected to a listener of this
//! process on the bridge's gateway IP) and 200 round trips of 64 bytes on one connection (after 20 warm-up
//! ones). Medians over the runs for throughput, median and p90 of all round trips.
//!
//! Usage: capsa-cri-bench [--runs N] [--sections start,net] [--net-mib N] [--net-runs N].
//! Inputs: CAPSA_VMM, CAPSA_KERNEL, CAPSA_INITRD; needs containerd (and the CNI plugins for `net`).

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _};
use capsa_e2e::cni::{
    missing_cni_plugins, net_pod_config, pod_network, wait_network_ready, BridgeNet,
};
use capsa_e2e::cri::{
    container_config, log_lines, pids_mentioning, pod_config, Cri, CriContainerd,
};
use capsa_e2e::figures::{Figure, Health, EXIT_HOST_UNHEALTHY};
use capsa_e2e::netbench::{self, mib_per_s, percentile};
use capsa_e2e::{median, Inputs};
use capsa_runtime::timeline;
use k8s_cri::v1 as cri_api;
use tracing::{info, warn};

#[derive(Default)]
struct Sample {
    ready: Vec<Duration>,
    first_log: Vec<Duration>,
    errors: Vec<String>,
    /// Per run: step → ms after the RunPodSandbox call (CRI-side steps for both handlers, the shim's
    /// timeline steps for capsa).
    timeline: Vec<HashMap<String, f64>>,
}

/// The pod-start timeline's rows: (step, label). CRI-side steps are `cri_*`; the others are the capsa
/// shim's `capsa_timeline` events (capsa_runtime::timeline), container steps those of the app container.
const TIMELINE: [(&str, &str); 16] = [
    ("shim_start", "shim start (containerd runs `shim start`)"),
    ("shim_serving", "shim serving (ttrpc listening)"),
    ("boot_begin", "sandbox Create reaches the shim"),
    ("jail_ready", "VMM jail prepared"),
    ("virtiofsd_ready", "virtiofsd ready (socket exists)"),
    ("vmm_spawned", "VMM spawned"),
    ("kernel_entry", "guest kernel entry (BOOT_TIMER)"),
    ("agent_started", "agent started (BOOT_TIMER)"),
    ("agent_ready", "agent ready (notified, answered)"),
    ("sandbox_created", "CreateSandbox done (+ guest network)"),
    ("cri_pod_ready", "RunPodSandbox returned"),
    ("container_created", "container created (shim)"),
    ("cri_created", "CreateContainer returned"),
    ("container_started", "container started (shim)"),
    ("cri_started", "StartContainer returned"),
    ("cri_first_log", "first log line (CRI log file)"),
];

/// The shim's timeline events for sandbox `pod` (and its container `cid`) in containerd's log, as ms
/// after `t0`.
fn shim_timeline(c: &CriContainerd, pod: &str, cid: &str, t0: SystemTime) -> HashMap<String, f64> {
    let log = std::fs::read_to_string(c.dir.join("containerd.log")).unwrap_or_default();
    let t0 = timeline::unix_us(t0) as f64;
    let mut steps = HashMap::new();
    for e in log.lines().filter_map(timeline::parse) {
        if e.sandbox != pod || e.container.as_deref().is_some_and(|c| c != cid) {
            continue;
        }
        steps
            .entry(e.step)
            .or_insert((e.unix_us as f64 - t0) / 1000.0);
    }
    steps
}

/// (VmRSS kB, Pss kB) of a process, as `capsa inspect` reads them; zeros once it is gone.
fn mem_kb(pid: i32) -> (u64, u64) {
    capsa_runtime::sandboxes::process_info(pid)
        .map(|p| (p.rss_kib, p.pss_kib))
        .unwrap_or((0, 0))
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Memory of the capsa processes serving the pod `pod` (VMM and virtiofsd found by the state dir,
/// the shim by the pod id on its command line).
fn capsa_pod_memory(c: &CriContainerd, pod: &str) -> Vec<(String, i32, u64, u64)> {
    let mut pids = pids_mentioning(&c.capsa_state.join(pod).to_string_lossy());
    pids.extend(
        pids_mentioning(pod)
            .into_iter()
            .filter(|p| comm(*p).starts_with("containerd-shim")),
    );
    pids.sort();
    pids.dedup();
    pids.into_iter()
        .map(|p| {
            let (rss, pss) = mem_kb(p);
            (comm(p), p, rss, pss)
        })
        .collect()
}

async fn one_run(
    c: &CriContainerd,
    handler: &str,
    i: usize,
    sample: &mut Sample,
    memory: &mut Option<Vec<(String, i32, u64, u64)>>,
) {
    let cri = c.client().await;
    let name = format!("bench-{handler}-{i}");
    let log_dir = c.log_dir(&name);
    let cfg = pod_config(&name, &log_dir);
    let t0_wall = SystemTime::now();
    let t0 = Instant::now();
    let mut steps = HashMap::new();
    let pod = match cri.run_pod(&cfg, handler).await {
        Ok(p) => p,
        Err(e) => {
            sample
                .errors
                .push(format!("RunPodSandbox: {}", e.message()));
            return;
        }
    };
    sample.ready.push(t0.elapsed());
    steps.insert("cri_pod_ready".to_owned(), ms(t0.elapsed()));
    // CreateContainer and StartContainer one by one, for the timeline.
    let started = async {
        let id = cri
            .rt
            .clone()
            .create_container(cri_api::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container_config(
                    "c",
                    &["sh", "-c", "echo first; sleep 600"],
                )),
                sandbox_config: Some(cfg.clone()),
            })
            .await?
            .into_inner()
            .container_id;
        steps.insert("cri_created".to_owned(), ms(t0.elapsed()));
        cri.rt
            .clone()
            .start_container(cri_api::StartContainerRequest {
                container_id: id.clone(),
            })
            .await?;
        steps.insert("cri_started".to_owned(), ms(t0.elapsed()));
        Ok::<_, tonic::Status>(id)
    }
    .await;
    let mut cid = String::new();
    match started {
        Ok(id) => {
            cid = id;
            let log = log_dir.join("c.log");
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                if !log_lines(&log, "stdout").is_empty() {
                    sample.first_log.push(t0.elapsed());
                    steps.insert("cri_first_log".to_owned(), ms(t0.elapsed()));
                    break;
                }
                if Instant::now() > deadline {
                    sample.errors.push("no log line within 120 s".into());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        Err(e) => sample.errors.push(format!(
            "container: {}",
            e.message().chars().take(200).collect::<String>()
        )),
    }
    if handler == "capsa" {
        steps.extend(shim_timeline(c, &pod, &cid, t0_wall));
    }
    sample.timeline.push(steps);
    if handler == "capsa" && memory.is_none() {
        *memory = Some(capsa_pod_memory(c, &pod));
    }
    if let Err(e) = cri.remove_pod(&pod).await {
        sample.errors.push(format!("remove pod: {}", e.message()));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The start section: `runs` rounds of one capsa and one runc pod (which goes first alternates), then the
/// table and the capsa pod's memory. Returns the section's figures.
fn start_section(
    rt: &tokio::runtime::Runtime,
    c: &CriContainerd,
    runs: usize,
    health: &mut Health,
) -> Vec<Figure> {
    let mut results = vec![("capsa", Sample::default()), ("runc", Sample::default())];
    let mut memory = None;
    for i in 0..runs {
        for k in 0..results.len() {
            let idx = (i + k) % results.len();
            let (handler, s) = &mut results[idx];
            let handler = *handler;
            let t = Instant::now();
            let errors_before = s.errors.len();
            let r = rt.block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(240),
                    one_run(c, handler, i, s, &mut memory),
                )
                .await
            });
            info!(
                "{handler} run {i}: {:?}{}",
                t.elapsed(),
                if r.is_err() { " (timed out)" } else { "" }
            );
            if r.is_err() {
                s.errors.push("run timed out after 240 s".into());
            }
            let ok = s.errors.len() == errors_before;
            if !ok {
                println!(
                    "  {handler} run {i}: FAILED: {}",
                    s.errors[errors_before..].join("; ")
                );
            }
            if health.record(ok) {
                return Vec::new();
            }
        }
    }
    println!("== pod start through CRI ({runs} runs each, capsa and runc alternating, medians; containerd 1.6, native snapshotter, host network)");
    let mut med = std::collections::HashMap::new();
    let mut figures = Vec::new();
    for (handler, s) in &mut results {
        let ready = (!s.ready.is_empty()).then(|| median(&mut s.ready));
        let first = (!s.first_log.is_empty()).then(|| median(&mut s.first_log));
        med.insert(*handler, (ready, first, s.ready.len(), s.first_log.len()));
        let show = |d: Option<Duration>, n: usize| match d {
            Some(d) => format!("{:8.1} ms ({n} of {runs} ok)", ms(d)),
            None => format!("     n/a    (0 of {runs} ok)"),
        };
        println!(
            "{handler:6} RunPodSandbox→ready {}   RunPodSandbox→first log line {}",
            show(ready, s.ready.len()),
            show(first, s.first_log.len())
        );
        figures.push(Figure::new(
            &format!("pod_ready_{handler}_ms"),
            ready.map(ms),
            s.ready.len(),
            runs,
        ));
        figures.push(Figure::new(
            &format!("first_log_{handler}_ms"),
            first.map(ms),
            s.first_log.len(),
            runs,
        ));
        let mut errs = s.errors.clone();
        errs.dedup();
        for e in errs.iter().take(3) {
            println!("       error: {e}");
        }
    }
    let ratio = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
        (Some(a), Some(b)) if b > Duration::ZERO => Some(a.as_secs_f64() / b.as_secs_f64()),
        _ => None,
    };
    let show = |r: Option<f64>| r.map_or("n/a".into(), |r| format!("{r:.1}x"));
    let (cr, cf, crn, cfn) = med.get("capsa").copied().unwrap_or((None, None, 0, 0));
    let (rr, rf, rrn, rfn) = med.get("runc").copied().unwrap_or((None, None, 0, 0));
    println!(
        "ratio capsa/runc: pod ready {}, first log line {}",
        show(ratio(cr, rr)),
        show(ratio(cf, rf))
    );
    print_timeline(&results, runs, &mut figures);
    figures.push(Figure::new(
        "pod_ready_ratio",
        ratio(cr, rr),
        crn.min(rrn),
        runs,
    ));
    figures.push(Figure::new(
        "first_log_ratio",
        ratio(cf, rf),
        cfn.min(rfn),
        runs,
    ));
    println!("== host memory of one capsa pod (while running)");
    let mut pss_total = None;
    match memory {
        Some(procs) if !procs.is_empty() => {
            let (mut rss, mut pss) = (0, 0);
            for (name, pid, r, p) in &procs {
                println!(
                    "  {name:28} pid {pid:6}  RSS {:8.1} MiB  PSS {:8.1} MiB",
                    *r as f64 / 1024.0,
                    *p as f64 / 1024.0
                );
                rss += r;
                pss += p;
            }
            println!(
                "  total                                   RSS {:8.1} MiB  PSS {:8.1} MiB",
                rss as f64 / 1024.0,
                pss as f64 / 1024.0
            );
            // What the RuntimeClass's overhead.podFixed.memory should be: the PSS rounded up to 16 MiB.
            let overhead_mib = pss.div_ceil(1024).div_ceil(16) * 16;
            println!(
                "  RuntimeClass overhead.podFixed.memory from this: {overhead_mib}Mi (capsa install prints {})",
                capsa_runtime::shim::install::OVERHEAD_MEMORY
            );
            pss_total = Some(pss as f64 / 1024.0);
        }
        _ => println!("  n/a (no capsa pod ran)"),
    }
    figures.push(Figure::new(
        "pod_pss_capsa_mib",
        pss_total,
        usize::from(pss_total.is_some()),
        1,
    ));
    figures
}

/// The pod-start timeline: per step, the median ms after the RunPodSandbox call for capsa (and the step
/// since the previous one) and runc, with n of N runs; a `BENCH timeline_<handler>_<step>_ms` figure each.
fn print_timeline(results: &[(&str, Sample)], runs: usize, figures: &mut Vec<Figure>) {
    println!("== pod-start timeline (median ms after the RunPodSandbox call; capsa's steps from its shim's log)");
    println!(
        "  {:42} {:>10} {:>9} {:>7} {:>10} {:>7}",
        "step", "capsa", "+step", "n", "runc", "n"
    );
    let med = |s: &Sample, step: &str| {
        let v: Vec<f64> = s
            .timeline
            .iter()
            .filter_map(|t| t.get(step).copied())
            .collect();
        (median_f64(&v), v.len())
    };
    let get = |h: &str| results.iter().find(|(n, _)| *n == h).map(|(_, s)| s);
    let mut prev: Option<f64> = None;
    for (step, label) in TIMELINE {
        let (c, cn) = get("capsa").map(|s| med(s, step)).unwrap_or((None, 0));
        let (r, rn) = get("runc").map(|s| med(s, step)).unwrap_or((None, 0));
        let delta = match (c, prev) {
            (Some(c), Some(p)) => format!("{:+.1}", c - p),
            _ => String::new(),
        };
        if c.is_some() {
            prev = c;
        }
        let show = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
        let count = |n: usize, v: Option<f64>| {
            if v.is_some() {
                format!("{n}/{runs}")
            } else {
                "-".into()
            }
        };
        println!(
            "  {label:42} {:>10} {delta:>9} {:>7} {:>10} {:>7}",
            show(c),
            count(cn, c),
            show(r),
            count(rn, r)
        );
        figures.push(Figure::new(
            &format!("timeline_capsa_{step}_ms"),
            c,
            cn,
            runs,
        ));
        if step.starts_with("cri_") {
            figures.push(Figure::new(
                &format!("timeline_runc_{step}_ms"),
                r,
                rn,
                runs,
            ));
        }
    }
}

/// The network section's bridge (its own, apart from the cri_network suite's).
const NET: BridgeNet = BridgeNet {
    name: "capsa-bench-net",
    bridge: "capsabench0",
    subnet: "10.88.78.0/24",
    gateway: "10.88.78.1",
    mtu: 1500,
};
const SINK_PORT: u16 = 5001;
const ECHO_PORT: u16 = 5002;
/// Where this process listens for the pods' sender (on every address, reached through the gateway IP).
const HOST_PORT: u16 = 19191;
const RTT_WARMUP: usize = 20;
const RTT_COUNT: usize = 200;
const RTT_SIZE: usize = 64;
/// Bound on one transfer or one series of round trips.
const NET_TIMEOUT: Duration = Duration::from_secs(120);

/// A benchmark pod and its server container.
struct NetPod {
    handler: &'static str,
    srv: String,
    ip: String,
}

/// One handler's measurements.
#[derive(Default)]
struct NetSample {
    to_pod: Vec<f64>,
    from_pod: Vec<f64>,
    rtt: Vec<Duration>,
    /// Runs whose round trips all came back.
    rtt_runs: usize,
    errors: Vec<String>,
}

/// Starts a pod on the bridge with the busybox servers, and waits until both answer.
async fn start_net_pod(
    c: &CriContainerd,
    cri: &Cri,
    handler: &'static str,
    ids: &mut Vec<String>,
) -> anyhow::Result<NetPod> {
    let name = format!("netbench-{handler}");
    let cfg = net_pod_config(c, &name);
    let t = Instant::now();
    let id = cri
        .run_pod(&cfg, handler)
        .await
        .with_context(|| format!("RunPodSandbox {name}"))?;
    ids.push(id.clone());
    let script = netbench::pod_servers_script(SINK_PORT, ECHO_PORT);
    let srv = cri
        .run_container(&id, &cfg, container_config("srv", &["sh", "-c", &script]))
        .await
        .with_context(|| format!("server container of {name}"))?;
    let (ip, _) = pod_network(cri, &id).await.map_err(anyhow::Error::msg)?;
    anyhow::ensure!(!ip.is_empty(), "PodSandboxStatus of {name} has no IP");
    // The servers are up when an empty transfer gets the sink's report and a round trip comes back.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (sink, echo) = (sock(&ip, SINK_PORT)?, sock(&ip, ECHO_PORT)?);
        let probe = tokio::task::spawn_blocking(move || {
            netbench::send_to_sink(sink, 0, Duration::from_secs(10))?;
            netbench::round_trips(echo, 0, 1, 1, Duration::from_secs(10))
        })
        .await?;
        match probe {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{name}'s servers never answered")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    info!(
        "pod {name}: {ip}, servers answering after {:?}",
        t.elapsed()
    );
    Ok(NetPod { handler, srv, ip })
}

fn sock(ip: &str, port: u16) -> anyhow::Result<std::net::SocketAddr> {
    format!("{ip}:{port}")
        .parse()
        .with_context(|| format!("address {ip}:{port}"))
}

/// Host → pod: MiB/s.
async fn to_pod(pod: &NetPod, bytes: u64) -> anyhow::Result<f64> {
    let addr = sock(&pod.ip, SINK_PORT)?;
    let took =
        tokio::task::spawn_blocking(move || netbench::send_to_sink(addr, bytes, NET_TIMEOUT))
            .await??;
    Ok(mib_per_s(bytes, took))
}

/// Pod → host: MiB/s of what this process received, which must be every byte the pod sent.
async fn from_pod(cri: &Cri, pod: &NetPod, bytes: u64) -> anyhow::Result<f64> {
    let listener = std::net::TcpListener::bind(("0.0.0.0", HOST_PORT))
        .with_context(|| format!("listen on :{HOST_PORT}"))?;
    let receiver =
        tokio::task::spawn_blocking(move || netbench::receive_all(&listener, NET_TIMEOUT));
    let script = netbench::pod_sender_script(bytes, NET.gateway, HOST_PORT);
    let sent = cri
        .exec_sync_timeout(
            &pod.srv,
            &["sh", "-c", &script],
            NET_TIMEOUT.as_secs() as i64,
        )
        .await;
    let (got, took) = receiver.await??;
    match sent {
        Ok(r) if r.exit_code == 0 => {}
        Ok(r) => bail!(
            "the pod's sender exited {}: {}",
            r.exit_code,
            String::from_utf8_lossy(&r.stderr)
        ),
        Err(e) => bail!("ExecSync of the sender: {}", e.message()),
    }
    anyhow::ensure!(got == bytes, "received {got} of {bytes} bytes");
    Ok(mib_per_s(bytes, took))
}

async fn rtt(pod: &NetPod) -> anyhow::Result<Vec<Duration>> {
    let addr = sock(&pod.ip, ECHO_PORT)?;
    tokio::task::spawn_blocking(move || {
        netbench::round_trips(addr, RTT_WARMUP, RTT_COUNT, RTT_SIZE, NET_TIMEOUT)
    })
    .await?
}

/// One run on one pod: the three measurements, recorded in `s`.
async fn net_run(cri: &Cri, pod: &NetPod, bytes: u64, s: &mut NetSample) {
    let t = Instant::now();
    match to_pod(pod, bytes).await {
        Ok(v) => s.to_pod.push(v),
        Err(e) => s.errors.push(format!("host→pod: {e:#}")),
    }
    match from_pod(cri, pod, bytes).await {
        Ok(v) => s.from_pod.push(v),
        Err(e) => s.errors.push(format!("pod→host: {e:#}")),
    }
    match rtt(pod).await {
        Ok(v) => {
            s.rtt.extend(v);
            s.rtt_runs += 1;
        }
        Err(e) => s.errors.push(format!("round trips: {e:#}")),
    }
    info!(
        "{}: host→pod {:?} MiB/s, pod→host {:?} MiB/s, {} round trips, in {:?}",
        pod.handler,
        s.to_pod.last(),
        s.from_pod.last(),
        s.rtt.len(),
        t.elapsed()
    );
}

fn median_f64(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// The network section: both pods, `runs` alternating runs, the table. Returns the section's figures.
async fn net_section(c: &CriContainerd, mib: u64, runs: usize) -> Vec<Figure> {
    let cri = c.client().await;
    let mut ids = Vec::new();
    let mut samples: Vec<(&'static str, NetSample)> = vec![
        ("capsa", NetSample::default()),
        ("runc", NetSample::default()),
    ];
    let bytes = mib * 1024 * 1024;
    let started = Instant::now();
    let run = async {
        wait_network_ready(&cri).await.map_err(anyhow::Error::msg)?;
        let mut pods = Vec::new();
        for (handler, _) in &samples {
            pods.push(start_net_pod(c, &cri, handler, &mut ids).await?);
        }
        for i in 0..runs {
            for (pod, (_, s)) in pods.iter().zip(samples.iter_mut()) {
                info!("net run {i}: {}", pod.handler);
                net_run(&cri, pod, bytes, s).await;
            }
        }
        anyhow::Ok(())
    };
    let outcome = match tokio::time::timeout(Duration::from_secs(600), run).await {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!("the network section timed out after 600 s")),
    };
    for id in &ids {
        if let Err(e) = cri.remove_pod(id).await {
            warn!("remove pod {id}: {}", e.message());
        }
    }
    info!("network section: {:?}", started.elapsed());
    println!(
        "== pod network through CRI (CNI bridge + host-local, busybox nc in the pod; {runs} runs each, \
         capsa and runc alternating; {mib} MiB per transfer; {RTT_COUNT} round trips of {RTT_SIZE} B per run)"
    );
    if let Err(e) = &outcome {
        println!("  error: {e:#}");
    }
    let get = |h: &str| samples.iter().find(|(n, _)| *n == h).map(|(_, s)| s);
    let (cs, rs) = (get("capsa").unwrap(), get("runc").unwrap());
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let rtt_stat = |s: &NetSample, p: f64| (!s.rtt.is_empty()).then(|| us(percentile(&s.rtt, p)));
    let rows = [
        (
            "TCP host→pod (MiB/s)",
            median_f64(&cs.to_pod),
            median_f64(&rs.to_pod),
        ),
        (
            "TCP pod→host (MiB/s)",
            median_f64(&cs.from_pod),
            median_f64(&rs.from_pod),
        ),
        (
            "RTT 64 B, median (µs)",
            rtt_stat(cs, 50.0),
            rtt_stat(rs, 50.0),
        ),
        ("RTT 64 B, p90 (µs)", rtt_stat(cs, 90.0), rtt_stat(rs, 90.0)),
    ];
    println!(
        "  {:24} {:>10} {:>10} {:>11}",
        "", "capsa", "runc", "capsa/runc"
    );
    let show = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.1}"));
    let mut figures = Vec::new();
    let oks = [
        cs.to_pod.len().min(rs.to_pod.len()),
        cs.from_pod.len().min(rs.from_pod.len()),
        cs.rtt_runs.min(rs.rtt_runs),
        cs.rtt_runs.min(rs.rtt_runs),
    ];
    let names = [
        "net_host_to_pod_ratio",
        "net_pod_to_host_ratio",
        "net_rtt_median_ratio",
        "net_rtt_p90_ratio",
    ];
    for (((what, c, r), ok), name) in rows.into_iter().zip(oks).zip(names) {
        let ratio = match (c, r) {
            (Some(c), Some(r)) if r > 0.0 => Some(c / r),
            _ => None,
        };
        println!(
            "  {what:24} {:>10} {:>10} {:>11}  ({ok} of {runs} runs ok)",
            show(c),
            show(r),
            ratio.map_or("n/a".into(), |r| format!("{r:.2}"))
        );
        figures.push(Figure::new(name, ratio, ok, runs));
    }
    for (h, s) in [("capsa", cs), ("runc", rs)] {
        println!(
            "  {h}: per run host→pod {:?} MiB/s, pod→host {:?} MiB/s",
            s.to_pod
                .iter()
                .map(|v| (v * 10.0).round() / 10.0)
                .collect::<Vec<_>>(),
            s.from_pod
                .iter()
                .map(|v| (v * 10.0).round() / 10.0)
                .collect::<Vec<_>>()
        );
        let mut errs = s.errors.clone();
        errs.dedup();
        for e in errs.iter().take(3) {
            println!("  {h} error: {e}");
        }
    }
    figures
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut runs = 10usize;
    let mut sections = vec!["start".to_owned(), "net".to_owned()];
    let mut net_mib = 32u64;
    let mut net_runs = 3usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--runs" => runs = value()?.parse()?,
            "--sections" => sections = value()?.split(',').map(str::to_owned).collect(),
            "--net-mib" => net_mib = value()?.parse()?,
            "--net-runs" => net_runs = value()?.parse()?,
            "-h" | "--help" => {
                println!(
                    "usage: capsa-cri-bench [--runs N] [--sections start,net] [--net-mib N] [--net-runs N]"
                );
                return Ok(());
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if let Some(s) = sections
        .iter()
        .find(|s| !["start", "net"].contains(&s.as_str()))
    {
        bail!("unknown section {s} (start, net)");
    }
    anyhow::ensure!(net_mib > 0, "--net-mib must be positive");
    if !capsa_e2e::cri::containerd_available("capsa-cri-bench") {
        return Ok(());
    }
    let mut net = sections.iter().any(|s| s == "net");
    let missing = missing_cni_plugins();
    if net && !missing.is_empty() {
        println!("== pod network: skipped, CNI plugins {missing:?} missing (apt-get install containernetworking-plugins)");
        net = false;
    }
    let inputs = Inputs::from_env();
    inputs.require();
    // Pods of the start section use the host network: the CNI configuration does not touch them.
    let conflist = net.then(|| NET.conflist());
    let c = CriContainerd::start_with_cni(&inputs, conflist.as_deref());
    let rt = tokio::runtime::Runtime::new()?;
    let mut health = Health::default();
    let mut figures = Vec::new();
    if sections.iter().any(|s| s == "start") {
        figures.extend(start_section(&rt, &c, runs, &mut health));
    }
    if net && !health.broken() {
        figures.extend(rt.block_on(net_section(&c, net_mib, net_runs)));
    }
    drop(c);
    if net {
        NET.remove_bridge();
    }
    if health.broken() {
        health.report("capsa-cri-bench");
        std::process::exit(EXIT_HOST_UNHEALTHY);
    }
    println!();
    for f in &figures {
        f.print("");
    }
    // The timeline's steps are shown, not required here (a step may not apply, e.g. virtiofsd in block
    // mode); make bench requires the main ones (tests/e2e/bench.sh).
    let thin: Vec<String> = figures
        .iter()
        .filter(|f| !f.name.starts_with("timeline_"))
        .filter_map(|f| f.problem().map(|p| format!("{}: {p}", f.name)))
        .collect();
    if !thin.is_empty() {
        println!(
            "capsa-cri-bench: {} figure(s) cannot be trusted ({}); exiting with status {EXIT_HOST_UNHEALTHY} so \
             the benchmark runs again in a fresh test host",
            thin.len(),
            thin.join("; ")
        );
        std::process::exit(EXIT_HOST_UNHEALTHY);
    }
    Ok(())
}
