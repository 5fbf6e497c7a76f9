//! `capsa`: the command-line front end of the capsa runtime.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use capsa_runtime::artifacts::Artifacts;
use capsa_runtime::check;
use clap::{Parser, Subcommand};

#[path = "capsa/run.rs"]
mod capsa_run;
#[path = "capsa/operator.rs"]
mod operator;

#[derive(Parser)]
#[command(name = "capsa", version, about = "capsa: containers in KVM microVMs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check that this host can run capsa (KVM, vsock, cgroups, the VMM, guest kernel and initrd).
    Check {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// capsa-vmm binary (default: $CAPSA_VMM, next to this binary, /usr/libexec/capsa/capsa-vmm).
        #[arg(long)]
        vmm: Option<PathBuf>,
        /// Guest kernel (default: $CAPSA_KERNEL, build/guest/vmlinux, /usr/share/capsa/vmlinux).
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Guest initrd (default: $CAPSA_INITRD, build/guest/initrd.img, /usr/share/capsa/initrd.img).
        #[arg(long)]
        initrd: Option<PathBuf>,
    },
    /// Run one container in a fresh microVM with stdio attached; exits with the container's exit code
    /// (128+N when signal N ended it; 125 when capsa itself failed).
    #[command(trailing_var_arg = true)]
    Run {
        /// Give the container a terminal (raw mode on this one; window size follows it).
        #[arg(short = 't', long)]
        tty: bool,
        /// vCPUs of the VM (default: the configuration's default_vcpus).
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory of the VM in MiB (default: the configuration's default_memory_mib).
        #[arg(long)]
        memory: Option<u64>,
        /// capsa's configuration (default: $CAPSA_CONFIG, /etc/capsa/configuration.toml; without one
        /// the VMM, kernel and initrd are found like `capsa check` finds them).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Run capsa-vmm without its jail (as root, all capabilities, the host's /): for debugging
        /// only; the configuration's `hypervisor.jail = false` does the same.
        #[arg(long)]
        no_jail: bool,
        /// A root file system directory or an OCI image archive (tar of an OCI layout or `docker save`).
        source: PathBuf,
        /// The command (after `--`); default: the image's Entrypoint + Cmd.
        command: Vec<String>,
    },
    /// List the sandboxes (pod VMs) on this node: id, pod, VMM pid, vCPUs, memory, uptime, state.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: operator::StateDirArg,
    },
    /// Show one sandbox: its VM, VMM and virtiofsd processes (memory, CPU, uid, seccomp, cgroup), paths.
    Inspect {
        sandbox: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: operator::StateDirArg,
    },
    /// Print a sandbox's guest console log (the last 1 MiB the VMM kept).
    Console {
        sandbox: String,
        /// Keep printing what the guest writes until the sandbox goes away.
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        state: operator::StateDirArg,
    },
    /// Undo `capsa install`: remove the runtime from containerd's config and the shim's link (running
    /// pods keep running until they end).
    Uninstall {
        /// containerd's configuration file.
        #[arg(long, default_value = "/etc/containerd/config.toml")]
        containerd_config: PathBuf,
        /// capsa's configuration file (kept unless --purge).
        #[arg(long, default_value = capsa_runtime::shim::config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Where `capsa install` linked containerd-shim-capsa-v2.
        #[arg(long, default_value = "/usr/local/bin")]
        bin_dir: PathBuf,
        /// Also remove capsa's configuration file.
        #[arg(long)]
        purge: bool,
    },
    /// Print the node's sandbox metrics in the Prometheus text format, or serve them over HTTP.
    Metrics {
        /// Serve `GET /metrics` on this address (e.g. 127.0.0.1:9184) instead of printing once.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        #[command(flatten)]
        state: operator::StateDirArg,
    },
    /// Register capsa with containerd (runtime `capsa`, io.containerd.capsa.v2) and print the
    /// Kubernetes RuntimeClass.
    Install {
        /// containerd's configuration file.
        #[arg(long, default_value = "/etc/containerd/config.toml")]
        containerd_config: PathBuf,
        /// capsa's configuration file (written with defaults when missing).
        #[arg(long, default_value = capsa_runtime::shim::config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Where to link containerd-shim-capsa-v2 so containerd finds it in $PATH.
        #[arg(long, default_value = "/usr/local/bin")]
        bin_dir: PathBuf,
    },
}

fn main() -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAPSA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            tty,
            vcpus,
            memory,
            config,
            no_jail,
            source,
            command,
        } => capsa_run::main(capsa_run::Args {
            tty,
            vcpus,
            memory,
            config,
            no_jail,
            source,
            command,
        }),
        Command::Install {
            containerd_config,
            config,
            bin_dir,
        } => {
            let exe = std::env::current_exe().context("locating the capsa binary")?;
            let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
            let artifacts = Artifacts::locate(None, None, None);
            let report = capsa_runtime::shim::install::install(
                &capsa_runtime::shim::install::InstallPaths {
                    containerd_config,
                    capsa_config: config,
                    shim: dir.join(capsa_runtime::shim::install::SHIM_BINARY),
                    shim_link_dir: bin_dir,
                    vmm: artifacts.vmm,
                    kernel: artifacts.kernel,
                    initrd: artifacts.initrd,
                },
            )?;
            for line in report.lines {
                eprintln!("{line}");
            }
            print!("{}", capsa_runtime::shim::install::runtime_class_manifest());
            Ok(ExitCode::SUCCESS)
        }
        Command::List { json, state } => operator::list(&state.resolve()?, json),
        Command::Inspect {
            sandbox,
            json,
            state,
        } => operator::inspect(&state.resolve()?, &sandbox, json),
        Command::Console {
            sandbox,
            follow,
            state,
        } => operator::console(&state.resolve()?, &sandbox, follow),
        Command::Uninstall {
            containerd_config,
            config,
            bin_dir,
            purge,
        } => {
            let report = capsa_runtime::shim::install::uninstall(
                &capsa_runtime::shim::install::UninstallPaths {
                    containerd_config,
                    capsa_config: config,
                    shim_link_dir: bin_dir,
                    purge,
                },
            )?;
            for line in report.lines {
                eprintln!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Metrics { listen, state } => operator::metrics(&state.resolve()?, listen),
        Command::Check {
            json,
            vmm,
            kernel,
            initrd,
        } => {
            let artifacts = Artifacts::locate(vmm, kernel, initrd);
            let report = check::run(&check::CheckInputs::host(artifacts));
            let text = if json {
                let mut s =
                    serde_json::to_string_pretty(&report).context("serialising the report")?;
                s.push('\n');
                s
            } else {
                report.render()
            };
            let mut out = std::io::stdout().lock();
            match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                Err(e) => return Err(e).context("writing the report"),
            }
            Ok(if report.can_run {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
