//! `capsa list`, `capsa inspect`, `capsa console` and `capsa metrics`: what runs on this node, for its
//! operator.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use capsa_runtime::sandboxes::{self, SandboxesError};
use capsa_runtime::shim::config::CapsaConfig;

/// Where the sandboxes are.
#[derive(clap::Args)]
pub struct StateDirArg {
    /// The state directory (default: `[runtime] state_dir` of capsa's configuration, /run/capsa).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// capsa's configuration (default: $CAPSA_CONFIG, /etc/capsa/configuration.toml).
    #[arg(long)]
    config: Option<PathBuf>,
}

impl StateDirArg {
    pub fn resolve(&self) -> anyhow::Result<PathBuf> {
        if let Some(d) = &self.state_dir {
            return Ok(d.clone());
        }
        let config = CapsaConfig::load(self.config.as_deref())?;
        Ok(config.runtime.state_dir)
    }
}

fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing stdout"),
        _ => Ok(()),
    }
}

pub fn list(state_dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let all = match sandboxes::list(state_dir) {
        Ok(all) => all,
        // No state directory yet: no sandbox has run.
        Err(SandboxesError::StateDir { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Vec::new()
        }
        Err(e) => return Err(e.into()),
    };
    if json {
        print(&(serde_json::to_string_pretty(&all)? + "\n"))?;
    } else {
        print(&sandboxes::format_table(&all))?;
    }
    Ok(ExitCode::SUCCESS)
}

pub fn inspect(state_dir: &Path, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let d = sandboxes::inspect(state_dir, id)?;
    if json {
        print(&(serde_json::to_string_pretty(&d)? + "\n"))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = String::new();
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    t += &format!("sandbox:      {}\n", d.info.id);
    if let Some(p) = &d.info.pod {
        t += &format!("pod:          {}/{} (uid {})\n", p.namespace, p.name, p.uid);
    }
    t += &format!("state:        {:?}\n", d.info.state);
    t += &format!(
        "vcpus:        {}\n",
        opt(d.info.vcpus.map(|v| v.to_string()))
    );
    t += &format!(
        "memory:       {}\n",
        opt(d.info.memory_mib.map(|v| format!("{v} MiB")))
    );
    t += &format!(
        "uptime:       {}\n",
        opt(d.info.uptime_secs.map(sandboxes::format_age))
    );
    t += &format!("directory:    {}\n", d.info.dir.display());
    t += &format!("console log:  {}\n", d.console_log.display());
    t += &format!("vsock socket: {}\n", d.vsock_socket.display());
    for (name, p) in [("capsa-vmm", &d.vmm), ("virtiofsd", &d.virtiofsd)] {
        match p {
            Some(p) => {
                t += &format!(
                    "{name}:{:pad$}pid {}, RSS {:.1} MiB, PSS {:.1} MiB, CPU {:.2} s, {} threads, uid {}, seccomp {}, cgroup {}\n",
                    "",
                    p.pid,
                    p.rss_kib as f64 / 1024.0,
                    p.pss_kib as f64 / 1024.0,
                    p.cpu_secs,
                    p.threads,
                    opt(p.uid.map(|u| u.to_string())),
                    opt(p.seccomp.map(|s| s.to_string())),
                    opt(p.cgroup.clone()),
                    pad = 13usize.saturating_sub(name.len() + 1),
                )
            }
            None => t += &format!("{name}:{:pad$}not running\n", "", pad = 13usize.saturating_sub(name.len() + 1)),
        }
    }
    if !d.vmm_command.is_empty() {
        t += &format!("vmm command:  {}\n", d.vmm_command.join(" "));
    }
    print(&t)?;
    Ok(ExitCode::SUCCESS)
}

/// One scrape printed, or (`listen`) an HTTP endpoint serving them until killed.
pub fn metrics(state_dir: &Path, listen: Option<std::net::SocketAddr>) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match listen {
        Some(addr) => {
            rt.block_on(capsa_runtime::metrics::serve(addr, state_dir.to_path_buf()))
                .with_context(|| format!("serving metrics on {addr}"))?;
        }
        None => print(&rt.block_on(capsa_runtime::metrics::gather(state_dir))?)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the console log; with `follow`, keeps printing what is appended until the sandbox directory
/// is gone (the VMM caps the log, so it only grows to its limit).
pub fn console(state_dir: &Path, id: &str, follow: bool) -> anyhow::Result<ExitCode> {
    let d = sandboxes::inspect(state_dir, id)?;
    let path = d.console_log;
    let mut file =
        std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n > 0 {
            match out.write_all(&buf[..n]) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    return Ok(ExitCode::SUCCESS)
                }
                r => r.context("writing stdout")?,
            }
            continue;
        }
        out.flush().ok();
        if !follow || !d.info.dir.exists() {
            return Ok(ExitCode::SUCCESS);
        }
        // A file that shrank was replaced or truncated: start over.
        let pos = file.stream_position().unwrap_or(0);
        if std::fs::metadata(&path)
            .map(|m| m.len() < pos)
            .unwrap_or(false)
        {
            file.seek(SeekFrom::Start(0)).ok();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
