//! capsa-bench: boot time and memory overhead of capsa-vmm, next to QEMU `-M microvm` booting the same
//! guest kernel and initrd, and what capsa-vmm's jail and seccomp filters cost. `make bench` runs it inside
//! the nested test host.
//!
//! Measured per run:
//! - boot to agent ready: VMM process spawn → the agent's first Check answer (hybrid vsock for capsa,
//!   AF_VSOCK through vhost-vsock for QEMU);
//! - start to agent ready (capsa only): the whole of `Vm::start`, so the jail's preparation before the
//!   spawn (uid lock, root directory, bind mounts) is included;
//! - the VMM's `BOOT_TIMER` line (capsa only);
//! - memory: `/proc/<pid>/smaps` of the VMM right after the agent answered, split into the guest RAM
//!   mapping and everything else (the VMM's own overhead);
//! - the cost of the jail and the seccomp filters: capsa-vmm boots in four variants (both on, the default;
//!   jail only; seccomp only; both off), alternating with each other and with QEMU in every round, the
//!   order rotating; the ratios of the medians of start to agent ready against "both off" are printed.
//!
//! Every figure is printed as a `BENCH <name>=<value> ok=<n>/<N>` line (capsa_e2e::figures): n of the N
//! planned runs succeeded. Three failed runs in a row end the benchmark with status 75 (the test host is
//! replaced, tests/run-e2e.sh), and so does a figure that rests on fewer than 80 % of its runs.
//!
//! Usage: capsa-bench [--runs N] [--vcpus N] [--memory-mib M] [--no-qemu] [--qemu PATH]
//!                    [--qemu-kernel PATH]
//! Inputs: CAPSA_VMM, CAPSA_KERNEL, CAPSA_INITRD (see docs/interfaces.md).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use capsa_e2e::figures::{Figure, Health, EXIT_HOST_UNHEALTHY};
use capsa_e2e::smaps::{self, Split};
use capsa_e2e::{median, Inputs};
use capsa_runtime::agent_client::{AgentAddress, AgentClient};
use capsa_runtime::vm::{file_tail, BootTimer, SeccompMode, Vm, VmConfig, BASE_CMDLINE};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

struct Opts {
    runs: usize,
    vcpus: u32,
    memory_mib: u32,
    qemu: Option<PathBuf>,
    qemu_kernel: Option<PathBuf>,
}

fn parse_opts() -> anyhow::Result<Opts> {
    let mut o = Opts {
        runs: 10,
        vcpus: 1,
        memory_mib: 128,
        qemu: Some(PathBuf::from("qemu-system-x86_64")),
        qemu_kernel: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--runs" => o.runs = val()?.parse().context("--runs")?,
            "--vcpus" => o.vcpus = val()?.parse().context("--vcpus")?,
            "--memory-mib" => o.memory_mib = val()?.parse().context("--memory-mib")?,
            "--no-qemu" => o.qemu = None,
            "--qemu" => o.qemu = Some(val()?.into()),
            "--qemu-kernel" => o.qemu_kernel = Some(val()?.into()),
            "-h" | "--help" => {
                println!("usage: capsa-bench [--runs N] [--vcpus N] [--memory-mib M] [--no-qemu] [--qemu PATH] [--qemu-kernel PATH]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other} (try --help)"),
        }
    }
    if o.runs == 0 {
        bail!("--runs must be at least 1");
    }
    Ok(o)
}

/// One boot's numbers.
#[derive(Debug, Clone)]
struct Sample {
    ready: Duration,
    /// `Vm::start` as a whole (capsa only; QEMU: the same as `ready`).
    start: Duration,
    mem: Option<Split>,
    timer: Option<BootTimer>,
}

#[derive(Debug, Default)]
struct Summary {
    samples: Vec<Sample>,
    errors: Vec<String>,
}

impl Summary {
    /// Prints run `i` of `who` and keeps its sample or error; returns whether it succeeded.
    fn record(&mut self, who: &str, i: usize, run: anyhow::Result<Sample>) -> bool {
        match run {
            Ok(s) => {
                let mem =
                    |f: fn(&Split) -> u64| s.mem.as_ref().map(|m| mib(f(m))).unwrap_or("-".into());
                println!(
                    "  {who} run {i}: ready {}, VMM own {}, guest RAM touched {}{}",
                    ms(s.ready),
                    mem(|m| m.vmm_rss_kib),
                    mem(|m| m.guest_rss_kib),
                    s.timer
                        .map(|t| format!(
                            ", BOOT_TIMER {} us + {} us",
                            t.start_to_kernel_entry_us, t.kernel_entry_to_agent_us
                        ))
                        .unwrap_or_default()
                );
                self.samples.push(s);
                true
            }
            Err(e) => {
                println!("  {who} run {i}: FAILED: {e:#}");
                self.errors.push(format!("{e:#}"));
                false
            }
        }
    }

    fn ready_median(&self) -> Option<Duration> {
        let mut v: Vec<Duration> = self.samples.iter().map(|s| s.ready).collect();
        (!v.is_empty()).then(|| median(&mut v))
    }
    fn start_median(&self) -> Option<Duration> {
        let mut v: Vec<Duration> = self.samples.iter().map(|s| s.start).collect();
        (!v.is_empty()).then(|| median(&mut v))
    }
    fn ready_min_max(&self) -> Option<(Duration, Duration)> {
        let min = self.samples.iter().map(|s| s.ready).min()?;
        let max = self.samples.iter().map(|s| s.ready).max()?;
        Some((min, max))
    }
    fn mem_median(&self, f: impl Fn(&Split) -> u64) -> Option<u64> {
        let mut v: Vec<u64> = self
            .samples
            .iter()
            .filter_map(|s| s.mem.as_ref().map(&f))
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort();
        Some(v[v.len() / 2])
    }
    fn timer_median(&self, f: impl Fn(&BootTimer) -> u64) -> Option<u64> {
        let mut v: Vec<u64> = self
            .samples
            .iter()
            .filter_map(|s| s.timer.as_ref().map(&f))
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort();
        Some(v[v.len() / 2])
    }
}

/// How capsa-vmm is confined in one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Variant {
    jail: bool,
    seccomp: bool,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant {
            jail: true,
            seccomp: true,
        },
        Variant {
            jail: true,
            seccomp: false,
        },
        Variant {
            jail: false,
            seccomp: true,
        },
        Variant {
            jail: false,
            seccomp: false,
        },
    ];

    fn label(self) -> &'static str {
        match (self.jail, self.seccomp) {
            (true, true) => "jail+seccomp",
            (true, false) => "jail only",
            (false, true) => "seccomp only",
            (false, false) => "neither",
        }
    }

    fn id(self, i: usize) -> String {
        format!(
            "bench-{}{}-{i}",
            if self.jail { "j" } else { "nj" },
            if self.seccomp { "s" } else { "ns" }
        )
    }
}

async fn capsa_once(
    inputs: &Inputs,
    o: &Opts,
    root: &Path,
    i: usize,
    v: Variant,
) -> anyhow::Result<Sample> {
    let mut c = VmConfig::new(
        inputs.vmm.clone(),
        inputs.kernel.clone(),
        Some(inputs.initrd.clone()),
    );
    c.vcpus = o.vcpus;
    c.memory_mib = o.memory_mib;
    c.run_root = root.to_path_buf();
    c.boot_timeout = Duration::from_secs(60);
    c.jail.enabled = v.jail;
    c.seccomp = if v.seccomp {
        SeccompMode::On
    } else {
        SeccompMode::Off
    };
    let t0 = Instant::now();
    let vm = Vm::start(&c, &v.id(i)).await?;
    let start = t0.elapsed();
    let ready = vm.ready_after();
    let mem = smaps::split_pid(vm.pid(), u64::from(o.memory_mib) << 20).ok();
    let timer = vm.boot_timer(Duration::from_secs(1)).await;
    let exit = vm.stop().await?;
    if !exit.status.success() {
        eprintln!(
            "capsa-bench: note: capsa-vmm run {i} ({}) ended with {}",
            v.label(),
            exit.status
        );
    }
    Ok(Sample {
        ready,
        start,
        mem,
        timer,
    })
}

async fn qemu_once(
    qemu: &Path,
    kernel: &Path,
    inputs: &Inputs,
    o: &Opts,
    root: &Path,
    i: usize,
) -> anyhow::Result<Sample> {
    // vsock CIDs are global to the host: keep them clear of other runs of this program.
    let cid = 10_000 + (std::process::id() % 100_000) * 16 + i as u32;
    let console = root.join(format!("qemu-{i}.console"));
    let mut cmd = Command::new(qemu);
    cmd.args(["-M", "microvm,acpi=off,x-option-roms=off,rtc=off"])
        .args(["-enable-kvm", "-cpu", "host"])
        .args([
            "-smp",
            &o.vcpus.to_string(),
            "-m",
            &o.memory_mib.to_string(),
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .args(["-global", "virtio-mmio.force-legacy=off"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(&inputs.initrd)
        .args(["-append", BASE_CMDLINE])
        .args(["-object", "rng-random,filename=/dev/urandom,id=rng0"])
        .args(["-device", "virtio-rng-device,rng=rng0"])
        .args(["-device", &format!("vhost-vsock-device,guest-cid={cid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // The agent's ready notification reaches the host over vhost-vsock as a connection to host port
    // READY_NOTIFY_VSOCK_PORT: QEMU gets the same no-polling readiness as capsa-vmm.
    let ready = ready_notifications().context("vsock listener for the ready notification")?;
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", qemu.display()))?;
    let pid = child.id().unwrap_or(0);
    let mut stderr = child.stderr.take();
    let addr = AgentAddress::vsock(cid);
    let outcome = tokio::select! {
        r = AgentClient::wait_ready_notified(&addr, Duration::from_secs(60), ready) => Ok(r),
        s = child.wait() => Err(s),
    };
    let ready = t0.elapsed();
    let result = match outcome {
        Ok(Ok(_agent)) => {
            let mem = smaps::split_pid(pid, u64::from(o.memory_mib) << 20).ok();
            Ok(Sample {
                ready,
                start: ready,
                mem,
                timer: None,
            })
        }
        Ok(Err(e)) => Err(anyhow::anyhow!("{e}")),
        Err(status) => Err(anyhow::anyhow!("QEMU exited during boot: {status:?}")),
    };
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    match result {
        Ok(s) => Ok(s),
        Err(e) => {
            let mut err_text = String::new();
            if let Some(s) = stderr.as_mut() {
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), s.read_to_string(&mut err_text))
                        .await;
            }
            Err(e.context(format!(
                "QEMU stderr:\n{}\nguest console (tail):\n{}",
                err_text.trim_end(),
                file_tail(&console, 2000)
            )))
        }
    }
}

/// Listens on host vsock port [`capsa_proto::READY_NOTIFY_VSOCK_PORT`] (any CID) and sends a message per
/// connection; the listener closes when the receiver is dropped.
fn ready_notifications() -> anyhow::Result<tokio::sync::mpsc::Receiver<()>> {
    use nix::sys::socket::{
        accept, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
    };
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(
        fd.as_raw_fd(),
        &VsockAddr::new(libc::VMADDR_CID_ANY, capsa_proto::READY_NOTIFY_VSOCK_PORT),
    )?;
    listen(&fd, Backlog::new(4)?)?;
    // SAFETY: the listener's descriptor is moved into the AsyncFd, which owns it until it is dropped.
    let listener = unsafe { tokio::io::unix::AsyncFd::register(fd) }
        .map_err(|e| anyhow::anyhow!("registering the vsock listener: {e}"))?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                r = listener.readable() => r,
                _ = tx.closed() => return,
            };
            let Ok(mut guard) = accepted else { return };
            match accept(listener.as_raw_fd()) {
                Ok(conn) => {
                    // SAFETY: accept returned a fresh descriptor that nothing else owns.
                    drop(unsafe { OwnedFd::from_raw_fd(conn) });
                    let _ = tx.try_send(());
                }
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(_) => return,
            }
        }
    });
    Ok(rx)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

fn row(label: &str, capsa: String, qemu: String, r: String) {
    println!("{label:<44} {capsa:>14} {qemu:>14} {r:>10}");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = parse_opts()?;
    let inputs = Inputs::from_env();
    for (what, p) in [
        ("CAPSA_VMM", &inputs.vmm),
        ("CAPSA_KERNEL", &inputs.kernel),
        ("CAPSA_INITRD", &inputs.initrd),
    ] {
        if !p.exists() {
            bail!(
                "{what}: {} does not exist (make all builds it)",
                p.display()
            );
        }
    }
    let root = tempfile::Builder::new()
        .prefix("capsa-bench-")
        .tempdir_in("/tmp")
        .context("run root")?;
    println!(
        "capsa-bench: {} runs, {} vCPU(s), {} MiB; kernel {}, initrd {}",
        o.runs,
        o.vcpus,
        o.memory_mib,
        inputs.kernel.display(),
        inputs.initrd.display()
    );

    // capsa and QEMU runs alternate, so that a change in the machine's speed during the benchmark (the nested
    // test host shares its CPUs with whatever else runs) weighs on both alike.
    let qemu_kernel = o
        .qemu_kernel
        .clone()
        .unwrap_or_else(|| inputs.kernel.clone());
    let mut qemu_enabled = o.qemu.is_some();
    if qemu_enabled && !Path::new("/dev/vhost-vsock").exists() {
        println!("  QEMU: skipped: /dev/vhost-vsock missing (modprobe vhost_vsock)");
        qemu_enabled = false;
    }
    // One summary per variant, in Variant::ALL's order; index 0 (jail and seccomp on) is capsa's default.
    let mut variants: Vec<Summary> = Variant::ALL.iter().map(|_| Summary::default()).collect();
    let mut qemu = Summary::default();
    let mut health = Health::default();
    // QEMU's figures are planned when it can run here at all; a QEMU that fails shows 0 of N.
    let qemu_planned = if qemu_enabled { o.runs } else { 0 };
    for i in 0..o.runs {
        // The variants alternate, and which goes first rotates from round to round.
        for k in 0..Variant::ALL.len() {
            let idx = (i + k) % Variant::ALL.len();
            let v = Variant::ALL[idx];
            let r = capsa_once(&inputs, &o, root.path(), i, v).await;
            let ok = variants[idx].record(&format!("capsa-vmm ({})", v.label()), i, r);
            if health.record(ok) {
                break;
            }
        }
        if health.broken() {
            break;
        }
        let Some(q) = o.qemu.as_ref().filter(|_| qemu_enabled) else {
            continue;
        };
        let r = qemu_once(q, &qemu_kernel, &inputs, &o, root.path(), i).await;
        let ok = qemu.record("QEMU microvm", i, r);
        if health.record(ok) {
            break;
        }
        // A broken QEMU set-up fails the same way every time (the figure then shows 0 of N).
        if !ok && qemu.samples.is_empty() && i >= 1 {
            println!("  QEMU: giving up after {} failures", i + 1);
            qemu_enabled = false;
        }
    }
    if health.broken() {
        health.report("capsa-bench");
        drop(root);
        std::process::exit(EXIT_HOST_UNHEALTHY);
    }
    let capsa = &variants[0];
    println!();
    row(
        "",
        "capsa-vmm".into(),
        "QEMU microvm".into(),
        "capsa/QEMU".into(),
    );
    let secs = |s: &Summary| s.ready_median().map(|d| d.as_secs_f64());
    row(
        "boot to agent ready (median)",
        capsa.ready_median().map(ms).unwrap_or("-".into()),
        qemu.ready_median().map(ms).unwrap_or("-".into()),
        ratio(secs(capsa), secs(&qemu)),
    );
    let mm = |s: &Summary| {
        s.ready_min_max()
            .map(|(a, b)| {
                format!(
                    "{:.0}-{:.0} ms",
                    a.as_secs_f64() * 1e3,
                    b.as_secs_f64() * 1e3
                )
            })
            .unwrap_or("-".into())
    };
    row("  min-max", mm(capsa), mm(&qemu), String::new());
    for (label, f) in [
        (
            "VMM own memory: RSS - guest RAM (median)",
            (|m: &Split| m.vmm_rss_kib) as fn(&Split) -> u64,
        ),
        ("VMM total RSS (median)", |m: &Split| m.total_rss_kib),
        ("guest RAM touched (median)", |m: &Split| m.guest_rss_kib),
    ] {
        let c = capsa.mem_median(f);
        let q = qemu.mem_median(f);
        row(
            label,
            c.map(mib).unwrap_or("-".into()),
            q.map(mib).unwrap_or("-".into()),
            ratio(c.map(|v| v as f64), q.map(|v| v as f64)),
        );
    }
    let us = |v: Option<u64>| {
        v.map(|v| format!("{:.1} ms", v as f64 / 1e3))
            .unwrap_or("-".into())
    };
    row(
        "BOOT_TIMER start -> kernel entry (median)",
        us(capsa.timer_median(|t| t.start_to_kernel_entry_us)),
        "-".into(),
        String::new(),
    );
    row(
        "BOOT_TIMER kernel entry -> agent (median)",
        us(capsa.timer_median(|t| t.kernel_entry_to_agent_us)),
        "-".into(),
        String::new(),
    );
    println!();
    let start_secs = |s: &Summary| s.start_median().map(|d| d.as_secs_f64());
    let neither = &variants[3];
    row(
        "start to agent ready (Vm::start)",
        "median".into(),
        "runs".into(),
        "/neither".into(),
    );
    for (v, s) in Variant::ALL.iter().zip(&variants) {
        row(
            &format!("  capsa-vmm, {}", v.label()),
            s.start_median().map(ms).unwrap_or("-".into()),
            format!("{}/{} ok", s.samples.len(), o.runs),
            ratio(start_secs(s), start_secs(neither)),
        );
    }
    if let Some(m) = capsa.samples.iter().find_map(|s| s.mem.as_ref()) {
        println!("memory split (capsa-vmm): {}", m.method);
    }
    if let Some(m) = qemu.samples.iter().find_map(|s| s.mem.as_ref()) {
        println!("memory split (QEMU): {}", m.method);
    }
    println!();

    // The figures (capsa_e2e::figures): n of N runs each; a ratio counts the thinner of its two sides.
    let n = o.runs;
    let both = |a: &Summary, b: &Summary| a.samples.len().min(b.samples.len());
    let ms_of = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
    let div = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let mib_of = |v: Option<u64>| v.map(|k| k as f64 / 1024.0);
    let mut figures = vec![
        Figure::new(
            "boot_capsa_ms",
            ms_of(capsa.ready_median()),
            capsa.samples.len(),
            n,
        ),
        Figure::new(
            "vmm_own_memory_capsa_mib",
            mib_of(capsa.mem_median(|m| m.vmm_rss_kib)),
            capsa.samples.iter().filter(|s| s.mem.is_some()).count(),
            n,
        ),
    ];
    if qemu_planned > 0 {
        figures.extend([
            Figure::new(
                "boot_qemu_ms",
                ms_of(qemu.ready_median()),
                qemu.samples.len(),
                qemu_planned,
            ),
            Figure::new(
                "boot_capsa_qemu_ratio",
                div(secs(capsa), secs(&qemu)),
                both(capsa, &qemu),
                qemu_planned,
            ),
        ]);
    }
    for (idx, name) in [
        (0, "jail_seccomp_on_off_ratio"),
        (1, "jail_only_on_off_ratio"),
        (2, "seccomp_only_on_off_ratio"),
    ] {
        figures.push(Figure::new(
            name,
            div(start_secs(&variants[idx]), start_secs(neither)),
            both(&variants[idx], neither),
            n,
        ));
    }
    for (v, s) in Variant::ALL.iter().zip(&variants) {
        figures.push(Figure::new(
            &format!(
                "start_to_ready_{}_ms",
                v.id(0).trim_start_matches("bench-").trim_end_matches("-0")
            ),
            ms_of(s.start_median()),
            s.samples.len(),
            n,
        ));
    }
    for f in &figures {
        f.print("");
    }
    println!("(start_to_ready_<js|jns|njs|njns>: j = jail, s = seccomp, n = off; boot_*: spawn to agent ready)");
    let thin: Vec<String> = figures
        .iter()
        .filter_map(|f| f.problem().map(|p| format!("{}: {p}", f.name)))
        .collect();
    if !thin.is_empty() {
        println!(
            "capsa-bench: {} figure(s) cannot be trusted ({}); exiting with status {EXIT_HOST_UNHEALTHY} so the \
             benchmark runs again in a fresh test host",
            thin.len(),
            thin.join("; ")
        );
        drop(root);
        std::process::exit(EXIT_HOST_UNHEALTHY);
    }
    Ok(())
}
