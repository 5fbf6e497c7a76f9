//! A stand-in for `capsa-vmm` plus its guest, for suites that must run without KVM: it accepts the
//! VMM's command line, serves hybrid vsock on `--vsock-uds` and answers the agent's Check,
//! GetGuestDetails and DestroySandbox itself. Behaviour knobs, as words on the kernel command line:
//! - `capsa_fake.boot_ms=N`: simulated boot time before port 1024 accepts (default 200);
//! - `capsa_fake.ignore_destroy`: answer DestroySandbox but keep running (tests SIGTERM escalation);
//! - `capsa_fake.ignore_sigterm`: ignore SIGTERM too (tests SIGKILL escalation).

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use capsa_proto::agent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use ttrpc::r#async::transport::Listener;
use ttrpc::r#async::{Server, TtrpcContext};

#[derive(Debug, Default)]
struct Args {
    kernel: Option<PathBuf>,
    cmdline: String,
    vcpus: u32,
    memory_mib: u64,
    vsock_uds: Option<PathBuf>,
    console_log: Option<PathBuf>,
}

impl Args {
    fn knob(&self, word: &str) -> bool {
        self.cmdline.split_whitespace().any(|w| w == word)
    }
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        vcpus: 1,
        memory_mib: 128,
        ..Default::default()
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--kernel" => a.kernel = Some(value()?.into()),
            "--cmdline" => a.cmdline = value()?,
            "--vcpus" => a.vcpus = value()?.parse().context("--vcpus")?,
            "--memory-mib" => a.memory_mib = value()?.parse().context("--memory-mib")?,
            "--vsock-uds" => a.vsock_uds = Some(value()?.into()),
            "--console-log" => a.console_log = Some(value()?.into()),
            "--initrd" | "--vsock-cid" | "--disk" | "--config" | "--seccomp" => {
                value()?;
            }
            "--rng" => {}
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

struct FakeAgent {
    args: Arc<Args>,
    started: Instant,
}

#[async_trait::async_trait]
impl capsa_proto::AgentService for FakeAgent {
    async fn check(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::CheckRequest,
    ) -> ttrpc::Result<agent::CheckResponse> {
        let mut r = agent::CheckResponse::new();
        r.status = agent::check_response::ServingStatus::SERVING.into();
        Ok(r)
    }

    async fn get_guest_details(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::GetGuestDetailsRequest,
    ) -> ttrpc::Result<agent::GuestDetailsResponse> {
        let mut r = agent::GuestDetailsResponse::new();
        r.kernel_release = "6.1.0-fake".into();
        r.agent_version = "fake".into();
        r.online_cpus = self.args.vcpus;
        // A real kernel keeps some memory for itself.
        r.mem_total_bytes = (self.args.memory_mib << 20) / 10 * 9;
        r.mem_available_bytes = r.mem_total_bytes / 2;
        r.uptime_ns = self.started.elapsed().as_nanos() as u64;
        r.agent_is_init = true;
        r.kernel_cmdline = self.args.cmdline.clone();
        Ok(r)
    }

    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::DestroySandboxRequest,
    ) -> ttrpc::Result<protobuf::well_known_types::empty::Empty> {
        if !self.args.knob("capsa_fake.ignore_destroy") {
            tokio::spawn(async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                std::process::exit(0);
            });
        }
        Ok(protobuf::well_known_types::empty::Empty::new())
    }
}

async fn handshake(mut s: UnixStream) -> std::io::Result<Option<(UnixStream, u32)>> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).await? == 1 {
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > 64 {
            return Ok(None);
        }
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    let Some(port) = line
        .strip_prefix("CONNECT ")
        .and_then(|p| p.trim().parse::<u32>().ok())
    else {
        return Ok(None);
    };
    Ok(Some((s, port)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let args = Arc::new(parse_args()?);
    let kernel = args.kernel.clone().context("--kernel is required")?;
    if !kernel.exists() {
        eprintln!("capsa-fake-vmm: kernel {} not found", kernel.display());
        std::process::exit(2);
    }
    let uds = args.vsock_uds.clone().context("--vsock-uds is required")?;
    if let Some(log) = &args.console_log {
        let mut f = std::fs::File::create(log).context("console log")?;
        writeln!(f, "fake guest booting: {}", args.cmdline)?;
    }
    let boot = Duration::from_millis(
        args.cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix("capsa_fake.boot_ms="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(200),
    );
    if args.knob("capsa_fake.ignore_sigterm") {
        // SAFETY: setting a signal disposition to SIG_IGN.
        unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
    } else {
        tokio::spawn(async {
            if let Ok(mut s) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                s.recv().await;
                std::process::exit(0);
            }
        });
    }

    let listener = UnixListener::bind(&uds).with_context(|| format!("bind {}", uds.display()))?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<UnixStream>();
    let incoming = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|s| (Ok::<_, std::io::Error>(s), rx))
    });
    let service = capsa_proto::create_agent_service(Arc::new(FakeAgent {
        args: args.clone(),
        started,
    }));
    let mut server = Server::new()
        .add_listener(Listener::new(incoming))
        .register_service(service);
    server.start().await.context("ttrpc server")?;

    let ready_at = started + boot;
    let mut timer_printed = false;
    loop {
        let (s, _) = listener.accept().await?;
        if !timer_printed && Instant::now() >= ready_at {
            timer_printed = true;
            eprintln!(
                "BOOT_TIMER start_to_kernel_entry_us=1000 kernel_entry_to_agent_us={}",
                boot.as_micros().saturating_sub(1000)
            );
        }
        let tx = tx.clone();
        tokio::spawn(async move {
            let Ok(Some((mut s, port))) = handshake(s).await else {
                return;
            };
            // Like a real VMM: nothing listens on the guest port before the agent starts.
            if port != capsa_proto::AGENT_VSOCK_PORT || Instant::now() < ready_at {
                return;
            }
            if s.write_all(b"OK 1073741824\n").await.is_ok() {
                let _ = tx.send(s);
            }
        });
    }
}
