//! `containerd-shim-capsa-v2`: containerd's shim v2 for capsa (runtime_type `io.containerd.capsa.v2`).
//!
//! Actions (containerd 1.6): `start` spawns the long-running shim and prints its ttrpc address;
//! `delete` cleans up after a dead shim and prints a `DeleteResponse`; with `-socket` (and no action)
//! this is the long-running shim serving `containerd.task.v2.Task`.

use std::collections::HashMap;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use capsa_runtime::shim::bootstrap;
use capsa_runtime::shim::cleanup;
use capsa_runtime::shim::config::CapsaConfig;
use capsa_runtime::shim::events::ContainerdEvents;
use capsa_runtime::shim::task::{HostMounter, TaskService};
use capsa_runtime::shim::vm_sandbox::VmFactory;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, Flags};
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim_async::{create_task, Task};
use containerd_shim_protos::ttrpc::r#async::transport::Listener;
use containerd_shim_protos::ttrpc::r#async::Server;

/// Service names containerd calls the task API by: 1.6 uses v2, 2.x v3 (the same messages).
const TASK_SERVICES: [&str; 2] = ["containerd.task.v2.Task", "containerd.task.v3.Task"];

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().collect();
    let flags = match containerd_shim::parse(args.get(1..).unwrap_or_default()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("containerd-shim-capsa-v2: {e}");
            return ExitCode::from(2);
        }
    };
    if flags.version {
        println!("containerd-shim-capsa-v2 {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let result = match flags.action.as_str() {
        "start" => start(&flags),
        "delete" => delete(&flags),
        "" if !flags.socket.is_empty() => serve(flags),
        other => Err(anyhow::anyhow!(
            "unknown action {other:?} (expected start or delete; the daemon is started with -socket)"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Whatever reads this (containerd captures start's output) gets the whole chain.
            eprintln!("containerd-shim-capsa-v2: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn read_stdin() -> Vec<u8> {
    let mut input = Vec::new();
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let _ = stdin.lock().take(10 << 20).read_to_end(&mut input);
    }
    input
}

fn start(flags: &Flags) -> anyhow::Result<()> {
    let input = read_stdin();
    let address = bootstrap::start(flags, &input).context("start")?;
    // containerd 1.6 reads the bare address from our combined output: nothing else may be printed.
    let mut out = std::io::stdout().lock();
    out.write_all(address.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn delete(flags: &Flags) -> anyhow::Result<()> {
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir()?
    } else {
        PathBuf::from(&flags.bundle)
    };
    let config = CapsaConfig::load(None).unwrap_or_default();
    let done = cleanup::cleanup(
        &flags.id,
        &flags.namespace,
        &flags.address,
        &bundle,
        &config.runtime.state_dir,
    );
    let _ = done;
    let resp = bootstrap::delete_response(128 + libc::SIGKILL as u32);
    let bytes = resp.write_to_bytes().context("encode DeleteResponse")?;
    let mut out = std::io::stdout().lock();
    out.write_all(&bytes)?;
    out.flush()?;
    Ok(())
}

/// Sends the shim's logs to the bundle's `log` FIFO (containerd copies it into its own log).
fn init_logging(debug: bool, level: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let filter = if debug { "debug" } else { level };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("log")
        .inspect(|f| {
            // Blocking writes from here on: containerd drains the FIFO.
            let fd = std::os::fd::AsRawFd::as_raw_fd(f);
            // SAFETY: fcntl on a descriptor we own.
            unsafe {
                let fl = libc::fcntl(fd, libc::F_GETFL);
                libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK);
            }
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(false);
    match file {
        Ok(f) => builder.with_writer(std::sync::Mutex::new(f)).init(),
        Err(_) => builder.with_writer(std::io::sink).init(),
    }
}

/// Points stdout and stderr at /dev/null: `start` waits for our stdout to close.
fn detach_stdio() -> anyhow::Result<()> {
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&null);
    // SAFETY: dup2 onto the standard descriptors; `null` stays valid for the call.
    unsafe {
        if libc::dup2(fd, libc::STDOUT_FILENO) < 0 || libc::dup2(fd, libc::STDERR_FILENO) < 0 {
            bail!("dup2: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn serve(flags: Flags) -> anyhow::Result<()> {
    let config = CapsaConfig::load(None).context("load configuration")?;
    init_logging(flags.debug, &config.runtime.log_level);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let r = rt.block_on(serve_async(flags, config));
    if let Err(e) = &r {
        tracing::error!(error = %format!("{e:#}"), "shim failed");
    }
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    r
}

async fn serve_async(flags: Flags, config: CapsaConfig) -> anyhow::Result<()> {
    let socket = bootstrap::socket_path(&flags.socket).to_owned();
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").context("TTRPC_ADDRESS is not set")?;
    let publisher = RemotePublisher::new(&ttrpc_address)
        .await
        .with_context(|| format!("connect to containerd's events at {ttrpc_address}"))?;
    let exit = Arc::new(ExitSignal::default());
    let svc = TaskService::new(
        Arc::new(VmFactory { config }),
        Arc::new(ContainerdEvents::new(publisher, flags.namespace.clone())),
        Arc::new(HostMounter),
        exit.clone(),
    )
    .with_namespace(&flags.namespace);
    let task: Arc<dyn Task + Send + Sync> = Arc::new(svc.clone());
    let mut services = HashMap::new();
    for name in TASK_SERVICES {
        for (_, service) in create_task(task.clone()) {
            services.insert(name.to_owned(), service);
        }
    }

    if let Some(parent) = std::path::Path::new(&socket).parent() {
        std::fs::create_dir_all(parent)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(&socket)
        .with_context(|| format!("listen on {socket}"))?;
    let listener = Listener::try_from(listener).context("ttrpc listener")?;
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(services);
    server.start().await.context("start ttrpc server")?;
    detach_stdio()?;
    tracing::info!(id = %flags.id, namespace = %flags.namespace, %socket, "shim serving");
    if let Some(us) = std::env::var(capsa_runtime::timeline::SHIM_START_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_micros(us);
        capsa_runtime::timeline::step_at(&flags.id, "shim_start", at);
    }
    capsa_runtime::timeline::step(&flags.id, "shim_serving");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::select! {
        _ = exit.wait() => tracing::info!("shutdown requested"),
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    svc.shutdown_sandbox().await;
    let _ = server.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
