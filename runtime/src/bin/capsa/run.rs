//! `capsa run`: the CLI side (configuration, runtime, exit code) of [`capsa_runtime::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use capsa_runtime::artifacts::Artifacts;
use capsa_runtime::run::{self, RunOptions};
use capsa_runtime::shim::config::{CapsaConfig, CONFIG_ENV, DEFAULT_CONFIG_PATH};

/// Exit status when capsa itself failed (docker's convention).
const CAPSA_FAILED: u8 = 125;

pub struct Args {
    pub tty: bool,
    pub vcpus: Option<u32>,
    pub memory: Option<u64>,
    pub config: Option<PathBuf>,
    /// Run capsa-vmm without its jail (debugging only).
    pub no_jail: bool,
    pub source: PathBuf,
    pub command: Vec<String>,
}

/// The configuration: a file when there is one, else defaults with the artifacts found like
/// `capsa check` finds them (environment, next to this binary, the workspace's build/guest).
fn load_config(explicit: Option<PathBuf>) -> anyhow::Result<CapsaConfig> {
    let from_file = explicit.is_some()
        || std::env::var_os(CONFIG_ENV).is_some_and(|v| !v.is_empty())
        || std::path::Path::new(DEFAULT_CONFIG_PATH).exists();
    let mut config = CapsaConfig::load(explicit.as_deref())?;
    if !from_file {
        let a = Artifacts::locate(None, None, None);
        config.hypervisor.path = a.vmm;
        config.hypervisor.kernel = a.kernel;
        config.hypervisor.initrd = Some(a.initrd);
    }
    Ok(config)
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let config = match load_config(args.config) {
        Ok(mut c) => {
            if args.no_jail {
                c.hypervisor.jail = false;
            }
            c
        }
        Err(e) => {
            eprintln!("capsa run: {e:#}");
            return Ok(ExitCode::from(CAPSA_FAILED));
        }
    };
    let opts = RunOptions {
        source: args.source,
        command: args.command,
        tty: args.tty,
        vcpus: args.vcpus,
        memory_mib: args.memory,
        config,
        work_parent: run::default_work_parent(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(run::run(opts));
    // A blocking read of stdin may still be pending: do not wait for it.
    rt.shutdown_background();
    match result {
        Ok(status) => Ok(ExitCode::from(run::exit_code(status))),
        Err(e) => {
            eprintln!("capsa run: {e}");
            Ok(ExitCode::from(CAPSA_FAILED))
        }
    }
}
