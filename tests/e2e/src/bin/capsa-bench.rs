//! capsa-bench: boot time and memory overhead of capsa-vmm, next to QEMU `-M microvm` booting the same
//! guest kernel and initrd. Prints numbers; asserts nothing. `make bench` runs it inside the nested test
//! host.
//!
//! Measured per run:
//! - boot to agent ready: VMM process spawn → the agent's first Check answer (hybrid vsock for capsa,
//!   AF_VSOCK through vhost-vsock for QEMU);
//! - the VMM's `BOOT_TIMER` line (capsa only);
//! - memory: `/proc/<pid>/smaps` of the VMM right after the agent answered, split into the guest RAM
//!   mapping and everything else (the VMM's own overhead);
//! - the cost of the VMM's jail: capsa-vmm boots with the jail on (the default) and off, alternating, and
//!   the ratio of the medians of boot to agent ready is printed (`BENCH jail_on_off_ratio=...`).
//!
//! Usage: capsa-bench [--runs N] [--vcpus N] [--memory-mib M] [--no-qemu] [--qemu PATH]
//!                    [--qemu-kernel PATH]
//! Inputs: CAPSA_VMM, CAPSA_KERNEL, CAPSA_INITRD (see docs/interfaces.md).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use capsa_e2e::smaps::{self, Split};
use capsa_e2e::{median, Inputs};
use capsa_runtime::agent_client::{AgentAddress, AgentClient};
use capsa_runtime::vm::{file_tail, BootTimer, Vm, VmConfig, BASE_CMDLINE};
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

async fn capsa_once(
    inputs: &Inputs,
    o: &Opts,
    root: &Path,
    i: usize,
    jail: bool,
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
    c.jail.enabled = jail;
    let id = if jail {
        format!("bench-{i}")
    } else {
        format!("bench-nojail-{i}")
    };
    let vm = Vm::start(&c, &id).await?;
    let ready = vm.ready_after();
    let mem = smaps::split_pid(vm.pid(), u64::from(o.memory_mib) << 20).ok();
    let timer = vm.boot_timer(Duration::from_secs(1)).await;
    let exit = vm.stop().await?;
    if !exit.status.success() {
        eprintln!(
            "capsa-bench: note: capsa-vmm run {i} ended with {}",
            exit.status
        );
    }
    Ok(Sample { ready, mem, timer })
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
    let mut capsa = Summary::default();
    let mut unjailed = Summary::default();
    let mut qemu = Summary::default();
    for i in 0..o.runs {
        // Jail on and off alternate, and which goes first alternates too.
        for jail in [i % 2 == 0, i % 2 != 0] {
            let r = capsa_once(&inputs, &o, root.path(), i, jail).await;
            if jail {
                capsa.record("capsa-vmm", i, r);
            } else {
                unjailed.record("capsa-vmm (jail off)", i, r);
            }
        }
        let Some(q) = o.qemu.as_ref().filter(|_| qemu_enabled) else {
            continue;
        };
        let r = qemu_once(q, &qemu_kernel, &inputs, &o, root.path(), i).await;
        // A broken setup fails the same way every time.
        if !qemu.record("QEMU microvm", i, r) && qemu.samples.is_empty() && i >= 1 {
            println!("  QEMU: giving up after {} failures", i + 1);
            qemu_enabled = false;
        }
    }

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
        ratio(secs(&capsa), secs(&qemu)),
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
    row("  min-max", mm(&capsa), mm(&qemu), String::new());
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
    row("", "jail on".into(), "jail off".into(), "on/off".into());
    row(
        "capsa-vmm boot to agent ready (median)",
        capsa.ready_median().map(ms).unwrap_or("-".into()),
        unjailed.ready_median().map(ms).unwrap_or("-".into()),
        ratio(secs(&capsa), secs(&unjailed)),
    );
    row("  min-max", mm(&capsa), mm(&unjailed), String::new());
    println!(
        "BENCH jail_on_off_ratio={} (jail on {} / off {}, {} and {} runs)",
        ratio(secs(&capsa), secs(&unjailed)),
        capsa.ready_median().map(ms).unwrap_or("-".into()),
        unjailed.ready_median().map(ms).unwrap_or("-".into()),
        capsa.samples.len(),
        unjailed.samples.len()
    );
    if let Some(m) = capsa.samples.iter().find_map(|s| s.mem.as_ref()) {
        println!("memory split (capsa-vmm): {}", m.method);
    }
    if let Some(m) = qemu.samples.iter().find_map(|s| s.mem.as_ref()) {
        println!("memory split (QEMU): {}", m.method);
    }
    println!(
        "runs ok: capsa-vmm {}/{}, QEMU {}/{}",
        capsa.samples.len(),
        o.runs,
        qemu.samples.len(),
        if o.qemu.is_some() { o.runs } else { 0 }
    );
    if capsa.samples.is_empty() {
        bail!("no capsa-vmm run succeeded");
    }
    Ok(())
}
