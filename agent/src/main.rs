//! capsa-agent binary: the guest's PID 1 (`/init` in the initrd). Run as any other pid (tests
//! on a host) it skips PID-1 duties. The pieces live in the capsa_agent library (src/lib.rs).

use std::time::Duration;

use anyhow::Context;
use capsa_agent::guest_details::{self, AgentFacts};
use capsa_agent::reaper::Reaper;
use capsa_agent::sandbox::PowerOff;
use capsa_agent::server::{self, Agent, AgentServiceImpl};
use capsa_agent::{boot_timer, init, logging};
use tracing::level_filters::LevelFilter;

const USAGE: &str = "usage: capsa-agent [--listen ADDR] [--log-level LEVEL]
  --listen ADDR       vsock://CID:PORT or unix:///path (default vsock://-1:1024)
  --log-level LEVEL   off|error|warn|info|debug|trace (not PID 1; default $CAPSA_LOG or info;
                      as PID 1 the kernel command line's capsa.log=LEVEL decides)
  --version";

#[derive(Debug)]
struct Args {
    listen: String,
    log_level: Option<LevelFilter>,
}

enum ParsedArgs {
    Run(Args, Vec<String>),
    Exit(&'static str),
}

/// Parses the command line. As PID 1 the kernel hands init the command-line words it does not
/// know, so unknown arguments are returned as warnings rather than errors.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<ParsedArgs, String> {
    let mut out = Args {
        listen: server::default_listen_addr(),
        log_level: None,
    };
    let mut ignored = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let (key, inline) = match a.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match key.as_str() {
            "--listen" => out.listen = value("--listen")?,
            "--log-level" => {
                let v = value("--log-level")?;
                out.log_level =
                    Some(logging::parse_level(&v).ok_or_else(|| format!("bad log level {v:?}"))?);
            }
            "--version" | "-V" => return Ok(ParsedArgs::Exit(env!("CARGO_PKG_VERSION"))),
            "--help" | "-h" => return Ok(ParsedArgs::Exit(USAGE)),
            _ => ignored.push(a),
        }
    }
    Ok(ParsedArgs::Run(out, ignored))
}

fn main() {
    // The container helper and the pod's namespace holder are re-execs of this binary.
    if let Some(code) = capsa_agent::container::maybe_run_subcommand() {
        std::process::exit(code);
    }
    // Very first thing: tell the VMM the agent has started (only inside the guest).
    let is_init = std::process::id() == 1;
    if is_init {
        boot_timer::signal_agent_started();
    }
    let start_uptime_ns = guest_details::uptime_ns().unwrap_or(0);

    let (args, ignored) = match parse_args(std::env::args().skip(1)) {
        Ok(ParsedArgs::Run(args, ignored)) => (args, ignored),
        Ok(ParsedArgs::Exit(text)) => {
            println!("{text}");
            return;
        }
        Err(e) if !is_init => {
            eprintln!("capsa-agent: {e}\n{USAGE}");
            std::process::exit(2);
        }
        Err(e) => {
            eprintln!("capsa-agent: {e}; using defaults");
            (
                Args {
                    listen: server::default_listen_addr(),
                    log_level: None,
                },
                Vec::new(),
            )
        }
    };

    // PID 1: file systems first (the console lives on devtmpfs), then logging.
    let mut early_errors = Vec::new();
    if is_init {
        early_errors = init::mount_filesystems();
        if let Err(e) = init::console_stdio() {
            early_errors.push(e);
        }
    }
    let (level, level_warning) = if is_init {
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        match logging::level_from_cmdline(&cmdline) {
            Ok(l) => (l.unwrap_or(logging::DEFAULT_LEVEL), None),
            Err(bad) => (
                logging::DEFAULT_LEVEL,
                Some(format!(
                    "bad {}={bad:?}, using info",
                    logging::CMDLINE_LOG_KEY
                )),
            ),
        }
    } else {
        let env = std::env::var("CAPSA_LOG").ok();
        let l = args
            .log_level
            .or_else(|| env.as_deref().and_then(logging::parse_level))
            .unwrap_or(logging::DEFAULT_LEVEL);
        (l, None)
    };
    let console_warning = logging::init(level, is_init);
    for w in [level_warning, console_warning].into_iter().flatten() {
        tracing::warn!("{w}");
    }
    for e in &early_errors {
        tracing::warn!("init: {e}");
    }
    if !ignored.is_empty() {
        tracing::warn!("ignoring arguments: {}", ignored.join(" "));
    }

    if is_init {
        init::finish();
        std::panic::set_hook(Box::new(|info| {
            tracing::error!("panic: {info}");
        }));
    } else {
        // Orphans of processes we start get re-parented to us, as they would to PID 1.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    }

    let facts = AgentFacts {
        start_uptime_ns,
        is_init,
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        pid1 = is_init,
        "capsa-agent starting"
    );

    loop {
        match run(&args, facts.clone()) {
            Ok(()) => return,
            Err(e) if !is_init => {
                tracing::error!("{e:#}");
                std::process::exit(1);
            }
            // PID 1 exiting panics the kernel: log and start again.
            Err(e) => {
                tracing::error!("{e:#}; restarting the agent in 1s");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// Runs the async part: reaper, ttrpc server. Returns only when not PID 1 and told to stop.
fn run(args: &Args, facts: AgentFacts) -> anyhow::Result<()> {
    let workers = guest_details::online_cpus().clamp(1, 2) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    rt.block_on(async {
        let reaper = Reaper::new();
        let _reaper_task = reaper.start().context("installing the SIGCHLD handler")?;

        let is_init = facts.is_init;
        let service = AgentServiceImpl::new(Agent {
            facts: facts.clone(),
            power_off: if is_init {
                PowerOff::Reboot
            } else {
                PowerOff::Exit
            },
            reaper,
        });
        let max_attempts = if is_init { None } else { Some(5) };
        let mut server = server::start_with_retry(&args.listen, service, max_attempts).await?;
        let since_start_us = guest_details::uptime_ns()
            .unwrap_or(0)
            .saturating_sub(facts.start_uptime_ns)
            / 1_000;
        tracing::info!(
            "listening on {} ({} us after agent start; guest uptime at agent start {} ms)",
            args.listen,
            since_start_us,
            facts.start_uptime_ns / 1_000_000
        );

        if args.listen.starts_with("vsock://") {
            tokio::spawn(async {
                let port = capsa_proto::PORT_FORWARD_VSOCK_PORT;
                if let Err(e) = capsa_agent::port_forward::serve(port).await {
                    tracing::error!("port-forward listener on vsock port {port}: {e}");
                }
            });
            tokio::task::spawn_blocking(notify_host_ready);
        }
        if is_init {
            // Serve forever. (Signals other than those we handle do not reach PID 1.)
            std::future::pending::<()>().await;
        }
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
        let _ = server.shutdown().await;
        Ok(())
    })
}

/// Tells the host the server is listening: a connection to the host's [`READY_NOTIFY_VSOCK_PORT`], closed at
/// once. Best effort: a host that does not listen there polls instead.
///
/// [`READY_NOTIFY_VSOCK_PORT`]: capsa_proto::READY_NOTIFY_VSOCK_PORT
fn notify_host_ready() {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
    let result = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .and_then(|fd| {
        let addr = VsockAddr::new(libc::VMADDR_CID_HOST, capsa_proto::READY_NOTIFY_VSOCK_PORT);
        connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)
    });
    match result {
        Ok(()) => tracing::debug!("told the host the agent is ready"),
        Err(e) => tracing::debug!("no host listener for the ready notification: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Result<ParsedArgs, String> {
        parse_args(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn default_and_flags() {
        let Ok(ParsedArgs::Run(a, ignored)) = args(&[]) else {
            panic!("parse")
        };
        assert_eq!(a.listen, "vsock://-1:1024");
        assert!(ignored.is_empty());

        let Ok(ParsedArgs::Run(a, ignored)) = args(&[
            "--listen",
            "unix:///tmp/a.sock",
            "--log-level=debug",
            "quiet",
        ]) else {
            panic!("parse")
        };
        assert_eq!(a.listen, "unix:///tmp/a.sock");
        assert_eq!(a.log_level, Some(LevelFilter::DEBUG));
        assert_eq!(ignored, ["quiet"]);

        assert!(args(&["--listen"]).is_err());
        assert!(args(&["--log-level", "loud"]).is_err());
    }
}
