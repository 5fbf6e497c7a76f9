//! `capsa-vmm`: runs one microVM. See `capsa-vmm --help` and docs/interfaces.md.

use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use capsa_vmm::{Cli, Vmm, VmmOptions};
use clap::Parser;

fn main() -> ExitCode {
    let process_start = Instant::now();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();

    // clap prints usage errors and exits 2, and exits 0 for --help/--version.
    let cli = Cli::parse();
    match run(cli, process_start) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e
                .downcast_ref::<capsa_vmm::Error>()
                .map_or(1, |e| e.exit_code());
            eprintln!("capsa-vmm: {e:#}");
            ExitCode::from(code as u8)
        }
    }
}

fn run(cli: Cli, process_start: Instant) -> anyhow::Result<()> {
    // Handlers first, so a SIGTERM while the VM is being built still means a clean stop (exit 0).
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone())
            .context("cannot install signal handlers")?;
    }
    #[cfg(debug_assertions)]
    let seccomp_selftest = cli.seccomp_selftest;
    let config = cli.into_config().map_err(capsa_vmm::Error::from)?;
    let vmm = Vmm::with_options(
        config,
        VmmOptions {
            serial_input: true,
            process_start: Some(process_start),
            stop_flag: Some(stop),
            #[cfg(debug_assertions)]
            seccomp_selftest,
            ..Default::default()
        },
    )?;
    let reason = vmm.run()?;
    tracing::info!("exiting: {reason:?}");
    Ok(())
}
