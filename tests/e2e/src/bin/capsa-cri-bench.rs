//! capsa-cri-bench: pod start through containerd's CRI, capsa vs runc, and the host memory a capsa pod
//! costs. Prints numbers; asserts nothing. `make bench` runs it inside the nested test host.
//!
//! Per run and handler: RunPodSandbox → the pod is ready (RunPodSandbox returned), and RunPodSandbox →
//! the first line of a container's log (CreateContainer + StartContainer of `echo first; sleep`, the log
//! file containerd writes polled every 5 ms). Medians of N runs (default 10) and the capsa/runc ratio.
//! Memory: VmRSS and Pss (smaps_rollup) of the pod's capsa-vmm, containerd-shim-capsa-v2 and virtiofsd
//! processes, while the pod runs.
//!
//! Usage: capsa-cri-bench [--runs N]. Inputs: CAPSA_VMM, CAPSA_KERNEL, CAPSA_INITRD; needs containerd.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use capsa_e2e::cri::{container_config, log_lines, pids_mentioning, pod_config, CriContainerd};
use capsa_e2e::{median, Inputs};

#[derive(Default)]
struct Sample {
    ready: Vec<Duration>,
    first_log: Vec<Duration>,
    errors: Vec<String>,
}

/// (VmRSS kB, Pss kB) of a process.
fn mem_kb(pid: i32) -> (u64, u64) {
    let field = |path: String, key: &str| -> u64 {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (
        field(format!("/proc/{pid}/status"), "VmRSS:"),
        field(format!("/proc/{pid}/smaps_rollup"), "Pss:"),
    )
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
    let t0 = Instant::now();
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
    let started = cri
        .run_container(
            &pod,
            &cfg,
            container_config("c", &["sh", "-c", "echo first; sleep 600"]),
        )
        .await;
    match started {
        Ok(_) => {
            let log = log_dir.join("c.log");
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                if !log_lines(&log, "stdout").is_empty() {
                    sample.first_log.push(t0.elapsed());
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

fn main() -> anyhow::Result<()> {
    let mut runs = 10usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().context("--runs needs a value")?.parse()?,
            "-h" | "--help" => {
                println!("usage: capsa-cri-bench [--runs N]");
                return Ok(());
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if !capsa_e2e::cri::containerd_available("capsa-cri-bench") {
        return Ok(());
    }
    let inputs = Inputs::from_env();
    inputs.require();
    let c = CriContainerd::start(&inputs);
    let rt = tokio::runtime::Runtime::new()?;
    let mut results = Vec::new();
    let mut memory = None;
    for handler in ["capsa", "runc"] {
        let mut s = Sample::default();
        for i in 0..runs {
            let t = Instant::now();
            let r = rt.block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(240),
                    one_run(&c, handler, i, &mut s, &mut memory),
                )
                .await
            });
            eprintln!(
                "capsa-cri-bench: {handler} run {i}: {:?}{}",
                t.elapsed(),
                if r.is_err() { " (timed out)" } else { "" }
            );
            if r.is_err() {
                s.errors.push("run timed out after 240 s".into());
            }
        }
        results.push((handler, s));
    }
    println!("== pod start through CRI ({runs} runs each, medians; containerd 1.6, native snapshotter, host network)");
    let mut med = std::collections::HashMap::new();
    for (handler, s) in &mut results {
        let ready = (!s.ready.is_empty()).then(|| median(&mut s.ready));
        let first = (!s.first_log.is_empty()).then(|| median(&mut s.first_log));
        med.insert(*handler, (ready, first));
        let show = |d: Option<Duration>, n: usize| match d {
            Some(d) => format!("{:8.1} ms (n={n})", ms(d)),
            None => "     n/a".to_owned(),
        };
        println!(
            "{handler:6} RunPodSandbox→ready {}   RunPodSandbox→first log line {}",
            show(ready, s.ready.len()),
            show(first, s.first_log.len())
        );
        let mut errs = s.errors.clone();
        errs.dedup();
        for e in errs.iter().take(3) {
            println!("       error: {e}");
        }
    }
    let ratio = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
        (Some(a), Some(b)) if b > Duration::ZERO => {
            format!("{:.1}x", a.as_secs_f64() / b.as_secs_f64())
        }
        _ => "n/a".into(),
    };
    let (cr, cf) = med.get("capsa").copied().unwrap_or((None, None));
    let (rr, rf) = med.get("runc").copied().unwrap_or((None, None));
    println!(
        "ratio capsa/runc: pod ready {}, first log line {}",
        ratio(cr, rr),
        ratio(cf, rf)
    );
    println!("== host memory of one capsa pod (while running)");
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
        }
        _ => println!("  n/a (no capsa pod ran)"),
    }
    drop(c);
    Ok(())
}
