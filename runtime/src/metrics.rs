//! Node metrics in the Prometheus text format (`capsa metrics`, once or served over HTTP with `--listen`):
//! per sandbox, the VM's size and uptime, capsa-vmm's and virtiofsd's memory and CPU (from /proc), and
//! what the guest's agent reports (memory, load) with how long it took to answer.
//!
//! The guest is hostile: its metrics text is not passed through. Only the known series are taken from it,
//! each value must parse as a finite number, at most [`MAX_GUEST_LINES`] lines are looked at, and the agent
//! gets [`AGENT_DEADLINE`] to answer; a silent agent shows as `capsa_agent_up 0`.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::agent_client::{AgentAddress, AgentClient};
use crate::sandboxes::{self, SandboxDetails, SandboxesError, VmState};

/// How long one sandbox's agent may take to connect and answer GetMetrics.
pub const AGENT_DEADLINE: Duration = Duration::from_secs(2);
/// Lines of a guest's metrics text looked at.
pub const MAX_GUEST_LINES: usize = 64;

/// A guest series taken from the agent's text.
struct GuestSeries {
    /// Its name in the agent's text.
    agent_name: &'static str,
    /// The name (under the `capsa` prefix) and unit it is published with.
    name: &'static str,
    unit: Option<Unit>,
    help: &'static str,
}

const GUEST_SERIES: [GuestSeries; 3] = [
    GuestSeries {
        agent_name: "capsa_guest_mem_total_bytes",
        name: "guest_memory_total",
        unit: Some(Unit::Bytes),
        help: "Memory the guest kernel manages (MemTotal)",
    },
    GuestSeries {
        agent_name: "capsa_guest_mem_available_bytes",
        name: "guest_memory_available",
        unit: Some(Unit::Bytes),
        help: "Memory available to the guest's programs (MemAvailable)",
    },
    GuestSeries {
        agent_name: "capsa_guest_load1",
        name: "guest_load1",
        unit: None,
        help: "The guest's 1-minute load average",
    },
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SandboxLabels {
    sandbox: String,
    pod: String,
    namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcessLabels {
    sandbox: String,
    pod: String,
    namespace: String,
    process: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    sandbox: String,
    pod: String,
    namespace: String,
    state: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;
type FloatCounter = Counter<f64, AtomicU64>;

/// The families one scrape fills.
struct Families {
    state: Family<StateLabels, Gauge>,
    vcpus: Family<SandboxLabels, Gauge>,
    memory: Family<SandboxLabels, Gauge>,
    uptime: Family<SandboxLabels, Gauge>,
    rss: Family<ProcessLabels, Gauge>,
    pss: Family<ProcessLabels, Gauge>,
    cpu: Family<ProcessLabels, FloatCounter>,
    threads: Family<ProcessLabels, Gauge>,
    agent_up: Family<SandboxLabels, Gauge>,
    agent_seconds: Family<SandboxLabels, FloatGauge>,
    guest: Vec<Family<SandboxLabels, FloatGauge>>,
}

impl Families {
    fn register(registry: &mut Registry) -> Self {
        let f = Families {
            state: Family::default(),
            vcpus: Family::default(),
            memory: Family::default(),
            uptime: Family::default(),
            rss: Family::default(),
            pss: Family::default(),
            cpu: Family::default(),
            threads: Family::default(),
            agent_up: Family::default(),
            agent_seconds: Family::default(),
            guest: GUEST_SERIES.iter().map(|_| Family::default()).collect(),
        };
        registry.register(
            "vm_state",
            "1 for the sandbox VM's current state (running, frozen, no-vmm)",
            f.state.clone(),
        );
        registry.register("vm_vcpus", "vCPUs of the sandbox VM", f.vcpus.clone());
        registry.register_with_unit(
            "vm_memory",
            "Guest memory of the sandbox VM",
            Unit::Bytes,
            f.memory.clone(),
        );
        registry.register_with_unit(
            "vm_uptime",
            "Time since capsa-vmm started",
            Unit::Seconds,
            f.uptime.clone(),
        );
        registry.register_with_unit(
            "process_resident_memory",
            "RSS of a sandbox's host process (capsa-vmm: guest pages touched plus the VMM)",
            Unit::Bytes,
            f.rss.clone(),
        );
        registry.register_with_unit(
            "process_proportional_memory",
            "PSS of a sandbox's host process (shared pages split between their users)",
            Unit::Bytes,
            f.pss.clone(),
        );
        registry.register_with_unit(
            "process_cpu",
            "User and system CPU time of a sandbox's host process",
            Unit::Seconds,
            f.cpu.clone(),
        );
        registry.register(
            "process_threads",
            "Threads of a sandbox's host process",
            f.threads.clone(),
        );
        registry.register(
            "agent_up",
            "1 when the guest agent answered GetMetrics within the deadline",
            f.agent_up.clone(),
        );
        registry.register_with_unit(
            "agent_rpc",
            "How long the guest agent took to connect and answer GetMetrics",
            Unit::Seconds,
            f.agent_seconds.clone(),
        );
        for (series, family) in GUEST_SERIES.iter().zip(&f.guest) {
            match &series.unit {
                Some(unit) => registry.register_with_unit(
                    series.name,
                    series.help,
                    unit.clone(),
                    family.clone(),
                ),
                None => registry.register(series.name, series.help, family.clone()),
            }
        }
        f
    }
}

/// One scrape of every sandbox under `state_dir`, in the Prometheus text format.
pub async fn gather(state_dir: &Path) -> Result<String, SandboxesError> {
    let all = match sandboxes::inspect_all(state_dir) {
        Ok(all) => all,
        Err(SandboxesError::StateDir { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    let mut registry = Registry::with_prefix("capsa");
    let sandbox_count: Gauge = Gauge::default();
    registry.register(
        "sandboxes",
        "Sandbox directories on this node",
        sandbox_count.clone(),
    );
    sandbox_count.set(all.len() as i64);
    let f = Families::register(&mut registry);
    // One agent at a time: a scrape is cheap for the guests, and bounded by AGENT_DEADLINE each.
    for d in &all {
        record(&f, d).await;
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &registry);
    Ok(out)
}

async fn record(f: &Families, d: &SandboxDetails) {
    let s = &d.info;
    let (pod, namespace) = s
        .pod
        .as_ref()
        .map(|p| (p.name.clone(), p.namespace.clone()))
        .unwrap_or_default();
    let labels = SandboxLabels {
        sandbox: s.id.clone(),
        pod: pod.clone(),
        namespace: namespace.clone(),
    };
    let state = match s.state {
        VmState::Running => "running",
        VmState::Frozen => "frozen",
        VmState::NoVmm => "no-vmm",
    };
    f.state
        .get_or_create(&StateLabels {
            sandbox: s.id.clone(),
            pod: pod.clone(),
            namespace: namespace.clone(),
            state,
        })
        .set(1);
    if let Some(v) = s.vcpus {
        f.vcpus.get_or_create(&labels).set(i64::from(v));
    }
    if let Some(m) = s.memory_mib {
        f.memory
            .get_or_create(&labels)
            .set(i64::try_from(m.saturating_mul(1 << 20)).unwrap_or(i64::MAX));
    }
    if let Some(u) = s.uptime_secs {
        f.uptime
            .get_or_create(&labels)
            .set(i64::try_from(u).unwrap_or(i64::MAX));
    }
    for (process, info) in [("capsa-vmm", &d.vmm), ("virtiofsd", &d.virtiofsd)] {
        let Some(p) = info else { continue };
        let l = ProcessLabels {
            sandbox: s.id.clone(),
            pod: pod.clone(),
            namespace: namespace.clone(),
            process,
        };
        let kib = |k: u64| i64::try_from(k.saturating_mul(1024)).unwrap_or(i64::MAX);
        f.rss.get_or_create(&l).set(kib(p.rss_kib));
        f.pss.get_or_create(&l).set(kib(p.pss_kib));
        f.cpu.get_or_create(&l).inc_by(p.cpu_secs);
        f.threads
            .get_or_create(&l)
            .set(i64::try_from(p.threads).unwrap_or(i64::MAX));
    }
    if s.state != VmState::Running {
        f.agent_up.get_or_create(&labels).set(0);
        return;
    }
    let started = Instant::now();
    let answer = tokio::time::timeout(AGENT_DEADLINE, guest_metrics(&s.dir)).await;
    let text = match answer {
        Ok(Ok(text)) => text,
        Ok(Err(e)) => {
            tracing::debug!(sandbox = %s.id, "agent metrics: {e}");
            f.agent_up.get_or_create(&labels).set(0);
            return;
        }
        Err(_) => {
            tracing::debug!(sandbox = %s.id, "agent metrics: no answer within {AGENT_DEADLINE:?}");
            f.agent_up.get_or_create(&labels).set(0);
            return;
        }
    };
    f.agent_up.get_or_create(&labels).set(1);
    f.agent_seconds
        .get_or_create(&labels)
        .set(started.elapsed().as_secs_f64());
    for (name, value) in parse_guest(&text) {
        if let Some(i) = GUEST_SERIES.iter().position(|g| g.agent_name == name) {
            f.guest[i].get_or_create(&labels).set(value);
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum GuestMetricsError {
    #[error("{0}")]
    Connect(#[from] crate::agent_client::AgentError),
    #[error("GetMetrics: {0}")]
    Rpc(#[from] ttrpc::Error),
}

async fn guest_metrics(dir: &Path) -> Result<String, GuestMetricsError> {
    let vsock = dir.join("vsock.sock");
    let client = AgentClient::connect(&AgentAddress::hybrid(vsock), AGENT_DEADLINE).await?;
    let m = client
        .raw()
        .get_metrics(
            client.context(),
            &capsa_proto::agent::GetMetricsRequest::new(),
        )
        .await?;
    Ok(m.metrics)
}

/// `name value` pairs of the known guest series from the agent's text; anything else (comments, labels,
/// unknown names, values that are not finite numbers, lines past the bound) is skipped.
fn parse_guest(text: &str) -> Vec<(&str, f64)> {
    text.lines()
        .take(MAX_GUEST_LINES)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let name = words.next()?;
            let value: f64 = words.next()?.parse().ok()?;
            let known = GUEST_SERIES.iter().any(|g| g.agent_name == name);
            (known && value.is_finite() && words.next().is_none()).then_some((name, value))
        })
        .collect()
}

/// Serves `GET /metrics` (any path, in fact) on `listen` until the process ends.
pub async fn serve(
    listen: std::net::SocketAddr,
    state_dir: std::path::PathBuf,
) -> std::io::Result<()> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, "serving metrics");
    let state_dir = std::sync::Arc::new(state_dir);
    loop {
        let (stream, _) = listener.accept().await?;
        let state_dir = state_dir.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                let state_dir = state_dir.clone();
                async move {
                    let (status, body) = match gather(&state_dir).await {
                        Ok(text) => (200, text),
                        Err(e) => (500, format!("{e}\n")),
                    };
                    hyper::Response::builder()
                        .status(status)
                        .header(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )
                        .body(Full::new(Bytes::from(body)))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_finite_guest_series_are_taken() {
        let text = "# TYPE capsa_guest_load1 gauge\ncapsa_guest_load1 0.25\n\
                    capsa_guest_mem_total_bytes 1048576\n\
                    capsa_guest_mem_available_bytes NaN\n\
                    capsa_vm_vcpus 999\n\
                    capsa_guest_load1{evil=\"x\"} 5\n\
                    capsa_guest_mem_total_bytes 1 extra\n";
        assert_eq!(
            parse_guest(text),
            [
                ("capsa_guest_load1", 0.25),
                ("capsa_guest_mem_total_bytes", 1048576.0)
            ]
        );
        let flood = "capsa_guest_load1 1\n".repeat(10_000);
        assert_eq!(parse_guest(&flood).len(), MAX_GUEST_LINES);
    }

    #[tokio::test]
    async fn a_sandbox_without_vmm_is_reported_and_its_agent_down() {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join("sb-1");
        std::fs::create_dir(&dir).unwrap();
        crate::sandboxes::PodIdentity {
            name: "web".into(),
            namespace: "shop".into(),
            uid: String::new(),
        }
        .write(&dir)
        .unwrap();
        let text = gather(state.path()).await.unwrap();
        assert!(text.contains("capsa_sandboxes 1\n"), "{text}");
        assert!(
            text.contains(
                "capsa_vm_state{sandbox=\"sb-1\",pod=\"web\",namespace=\"shop\",state=\"no-vmm\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("capsa_agent_up{sandbox=\"sb-1\",pod=\"web\",namespace=\"shop\"} 0\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        // No state directory: no sandboxes, not an error.
        let text = gather(&state.path().join("missing")).await.unwrap();
        assert!(text.contains("capsa_sandboxes 0\n"), "{text}");
    }
}
