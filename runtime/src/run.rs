//! `capsa run`: one container in a fresh microVM, stdio attached to the caller's terminal.
//!
//! The rootfs (a directory, or an OCI image archive unpacked by [`crate::oci_image`]) reaches the guest the
//! way the shim's does ([`VmFactory`]: an ext4 image on virtio-blk). SIGINT/SIGTERM are forwarded to the
//! container (a second one kills it), SIGWINCH resizes its terminal, and the container's exit code
//! (128+N for signal N) is returned. The VM, its sandbox directory and the work directory (unpacked
//! image, ext4 image) are removed on every path, a signal during boot included.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};

use crate::oci_image::{self, ImageConfig, ImageError};
use crate::shim::config::{CapsaConfig, ANNOTATION_MEMORY, ANNOTATION_VCPUS};
use crate::shim::sandbox::{ContainerRequest, Sandbox, SandboxError, SandboxFactory};
use crate::shim::stdio::{pump_input, pump_output, READ_CHUNK};
use crate::shim::vm_sandbox::VmFactory;

/// How long output may keep flowing after the container exited.
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0} is neither a directory nor an OCI image archive")]
    BadSource(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image: {0}")]
    Image(#[from] ImageError),
    #[error("no command given and the image has no Entrypoint/Cmd")]
    NoCommand,
    #[error("{0}")]
    Sandbox(#[from] SandboxError),
    #[error("signal handling: {0}")]
    Signals(std::io::Error),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// A rootfs directory or an OCI image archive.
    pub source: PathBuf,
    /// Empty = the image's Entrypoint + Cmd.
    pub command: Vec<String>,
    pub tty: bool,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub config: CapsaConfig,
    /// Parent of the work directory (unpacked image, ext4 image).
    pub work_parent: PathBuf,
}

/// Removes a directory tree when dropped.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.0.display(), error = %e, "cannot remove the work directory");
            }
        }
    }
}

/// Puts the terminal on `fd` in raw mode; restores it when dropped.
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    fn enter() -> Option<RawMode> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        use nix::sys::termios::{tcsetattr, SetArg};
        let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// Rows and columns of the terminal on stdin (else stdout), if any.
fn window_size() -> Option<(u32, u32)> {
    for fd in [libc::STDIN_FILENO, libc::STDOUT_FILENO] {
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one `winsize` into the valid struct we pass.
        let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
        if r == 0 && ws.ws_row > 0 && ws.ws_col > 0 {
            return Some((u32::from(ws.ws_row), u32::from(ws.ws_col)));
        }
    }
    None
}

/// A short id unique on this host: `run-<pid>-<µs>`.
fn new_id() -> String {
    let us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() % 1_000_000_000)
        .unwrap_or(0);
    format!("run-{}-{us}", std::process::id())
}

/// The OCI spec of the container, modelled on containerd's default spec.
pub fn container_spec(
    args: &[String],
    env: &[String],
    cwd: &str,
    tty: bool,
    hostname: &str,
    vcpus: Option<u32>,
    memory_mib: Option<u64>,
) -> serde_json::Value {
    let caps = serde_json::json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE"
    ]);
    let mut env: Vec<String> = env.to_vec();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(
            0,
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
    }
    if tty && !env.iter().any(|e| e.starts_with("TERM=")) {
        let term = std::env::var("TERM").unwrap_or_else(|_| "xterm".into());
        env.push(format!("TERM={term}"));
    }
    let mut annotations = serde_json::Map::new();
    if let Some(n) = vcpus {
        annotations.insert(ANNOTATION_VCPUS.into(), n.to_string().into());
    }
    if let Some(m) = memory_mib {
        annotations.insert(ANNOTATION_MEMORY.into(), m.to_string().into());
    }
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": tty,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": env,
            "cwd": if cwd.is_empty() { "/" } else { cwd },
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": hostname,
        "annotations": annotations,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}],
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware"],
            "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// The command to run: the caller's, else the image's Entrypoint + Cmd.
pub fn resolve_command(command: &[String], image: &ImageConfig) -> Result<Vec<String>, RunError> {
    if !command.is_empty() {
        return Ok(command.to_vec());
    }
    let args: Vec<String> = image
        .entrypoint
        .iter()
        .chain(image.cmd.iter())
        .cloned()
        .collect();
    if args.is_empty() {
        return Err(RunError::NoCommand);
    }
    Ok(args)
}

/// Exit code of `capsa run` for a container exit status.
pub fn exit_code(status: u32) -> u8 {
    u8::try_from(status).unwrap_or(255)
}

/// Runs the container; returns its exit status (128+N when signal N ended it).
pub async fn run(opts: RunOptions) -> Result<u32, RunError> {
    // Signals first: from here on Ctrl-C is ours to handle, so cleanup always runs.
    let mut sigint = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(RunError::Signals)?;

    let id = new_id();
    let work_path = opts.work_parent.join(format!("capsa-{id}"));
    std::fs::create_dir_all(&work_path).map_err(|source| RunError::Io {
        path: work_path.clone(),
        source,
    })?;
    let work = WorkDir(work_path);

    let prepare = async {
        let md = std::fs::metadata(&opts.source).map_err(|source| RunError::Io {
            path: opts.source.clone(),
            source,
        })?;
        if md.is_dir() {
            return Ok::<_, RunError>((opts.source.clone(), ImageConfig::default()));
        }
        let source = opts.source.clone();
        let rootfs = work.0.join("rootfs");
        let scratch = work.0.join("image");
        let r = rootfs.clone();
        tokio::task::spawn_blocking(move || {
            if !oci_image::is_image_archive(&source) {
                return Err(RunError::BadSource(source));
            }
            Ok(oci_image::unpack(&source, &r, &scratch)?)
        })
        .await
        .map_err(|e| RunError::Sandbox(SandboxError::Internal(e.to_string())))?
        .map(|cfg| (rootfs, cfg))
    };
    let (rootfs, image) = tokio::select! {
        r = prepare => r?,
        _ = sigint.recv() => return Ok(128 + libc::SIGINT as u32),
        _ = sigterm.recv() => return Ok(128 + libc::SIGTERM as u32),
        _ = sighup.recv() => return Ok(128 + libc::SIGHUP as u32),
    };
    let args = resolve_command(&opts.command, &image)?;
    let spec = container_spec(
        &args,
        &image.env,
        &image.working_dir,
        opts.tty,
        "capsa",
        opts.vcpus,
        opts.memory_mib,
    );
    let req = ContainerRequest {
        container_id: id.clone(),
        spec_json: spec.to_string().into_bytes(),
        rootfs,
        bundle: work.0.clone(),
    };

    let factory = VmFactory {
        config: opts.config.clone(),
    };
    let started = Instant::now();
    // Dropping the boot future on a signal kills the VMM and removes the sandbox directory.
    let sandbox = tokio::select! {
        s = factory.boot(&id, &req) => s?,
        _ = sigint.recv() => return Ok(128 + libc::SIGINT as u32),
        _ = sigterm.recv() => return Ok(128 + libc::SIGTERM as u32),
        _ = sighup.recv() => return Ok(128 + libc::SIGHUP as u32),
    };
    tracing::info!(sandbox = %id, elapsed = ?started.elapsed(), "VM ready");

    let result = attach(
        sandbox.clone(),
        &id,
        req,
        opts.tty,
        (&mut sigint, &mut sigterm, &mut sighup),
    )
    .await;
    if let Err(e) = sandbox.shutdown().await {
        tracing::warn!(sandbox = %id, error = %e, "stopping the VM");
    }
    drop(work);
    result
}

async fn attach(
    sandbox: Arc<dyn Sandbox>,
    id: &str,
    req: ContainerRequest,
    tty: bool,
    signals: (
        &mut tokio::signal::unix::Signal,
        &mut tokio::signal::unix::Signal,
        &mut tokio::signal::unix::Signal,
    ),
) -> Result<u32, RunError> {
    let (sigint, sigterm, sighup) = signals;
    let mut sigwinch = signal(SignalKind::window_change()).map_err(RunError::Signals)?;
    sandbox.create_container(req).await?;
    if tty {
        if let Some((rows, cols)) = window_size() {
            if let Err(e) = sandbox.resize_pty(id, "", rows, cols).await {
                tracing::debug!(error = %e, "initial terminal size");
            }
        }
    }
    // Raw mode only while the container runs; restored before any message is printed.
    let raw = if tty { RawMode::enter() } else { None };

    let mut outputs = Vec::new();
    {
        let (sb, cid) = (sandbox.clone(), id.to_owned());
        outputs.push(tokio::spawn(async move {
            let mut out = tokio::io::stdout();
            let r = pump_output(|| sb.read_stdout(&cid, "", READ_CHUNK), Some(&mut out)).await;
            let _ = tokio::io::AsyncWriteExt::flush(&mut out).await;
            r
        }));
    }
    if !tty {
        let (sb, cid) = (sandbox.clone(), id.to_owned());
        outputs.push(tokio::spawn(async move {
            let mut err = tokio::io::stderr();
            let r = pump_output(|| sb.read_stderr(&cid, "", READ_CHUNK), Some(&mut err)).await;
            let _ = tokio::io::AsyncWriteExt::flush(&mut err).await;
            r
        }));
    }
    sandbox.start_container(id).await?;
    let stdin_task = {
        let (sb, cid) = (sandbox.clone(), id.to_owned());
        tokio::spawn(async move {
            let write = |data: Vec<u8>| {
                let (sb, cid) = (sb.clone(), cid.clone());
                async move { sb.write_stdin(&cid, "", &data).await }
            };
            let never = Arc::new(tokio::sync::Notify::new());
            if let Err(e) = pump_input(tokio::io::stdin(), write, never).await {
                tracing::debug!(error = %e, "stdin copy ended");
            }
            // A terminal has no end of input of its own (^D is a byte the user types); closing it
            // would hang up the container's shell when stdin is not a terminal.
            if !tty {
                let _ = sb.close_stdin(&cid, "").await;
            }
        })
    };

    let wait = sandbox.wait_process(id, "");
    tokio::pin!(wait);
    let mut forwarded = 0u32;
    let status = loop {
        let sig = tokio::select! {
            r = &mut wait => break r?.status,
            _ = sigint.recv() => libc::SIGINT,
            _ = sigterm.recv() => libc::SIGTERM,
            _ = sighup.recv() => libc::SIGHUP,
            _ = sigwinch.recv() => {
                if tty {
                    if let Some((rows, cols)) = window_size() {
                        let _ = sandbox.resize_pty(id, "", rows, cols).await;
                    }
                }
                continue;
            }
        };
        forwarded += 1;
        // A container's PID 1 ignores signals it has no handler for: the second one kills.
        let sig = if forwarded >= 2 { libc::SIGKILL } else { sig };
        tracing::info!(signal = sig, "forwarding signal to the container");
        if let Err(e) = sandbox.signal_process(id, "", sig as u32, false).await {
            tracing::debug!(error = %e, "forwarding signal");
        }
    };
    stdin_task.abort();
    let drain = async {
        for o in outputs {
            let _ = o.await;
        }
    };
    if tokio::time::timeout(OUTPUT_DRAIN, drain).await.is_err() {
        tracing::warn!("the container's output did not end within {OUTPUT_DRAIN:?} of its exit");
    }
    drop(raw);
    let _ = sandbox.remove_container(id).await;
    Ok(status)
}

/// Where `capsa run` puts its work directory by default.
pub fn default_work_parent() -> PathBuf {
    std::env::temp_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_comes_from_the_caller_or_the_image() {
        let img = ImageConfig {
            entrypoint: vec!["/bin/ep".into()],
            cmd: vec!["arg".into()],
            ..Default::default()
        };
        assert_eq!(
            resolve_command(&["sh".into()], &img).unwrap(),
            ["sh".to_string()]
        );
        assert_eq!(resolve_command(&[], &img).unwrap(), ["/bin/ep", "arg"]);
        assert!(matches!(
            resolve_command(&[], &ImageConfig::default()),
            Err(RunError::NoCommand)
        ));
    }

    #[test]
    fn spec_carries_command_env_tty_and_sizing() {
        let s = container_spec(
            &["echo".into(), "hi".into()],
            &["A=1".into()],
            "",
            true,
            "capsa",
            Some(2),
            Some(512),
        );
        assert_eq!(s["process"]["args"], serde_json::json!(["echo", "hi"]));
        assert_eq!(s["process"]["terminal"], true);
        assert_eq!(s["process"]["cwd"], "/");
        let env: Vec<&str> = s["process"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(env[0].starts_with("PATH="), "{env:?}");
        assert!(env.contains(&"A=1"));
        assert!(env.iter().any(|e| e.starts_with("TERM=")));
        assert_eq!(s["annotations"][ANNOTATION_VCPUS], "2");
        assert_eq!(s["annotations"][ANNOTATION_MEMORY], "512");
        // The shim's sizing reads the same annotations.
        let cfg = CapsaConfig::default();
        let size = cfg
            .vm_size(
                &crate::shim::bootstrap::annotations_of(&s),
                crate::shim::config::ContainerLimits::from_spec(&s),
            )
            .unwrap();
        assert_eq!((size.vcpus, size.memory_mib), (2, 512));
        let s = container_spec(&["x".into()], &[], "/w", false, "h", None, None);
        assert_eq!(s["process"]["terminal"], false);
        assert_eq!(s["process"]["cwd"], "/w");
        assert!(s["annotations"].as_object().unwrap().is_empty());
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(0), 0);
        assert_eq!(exit_code(3), 3);
        assert_eq!(exit_code(130), 130);
        assert_eq!(exit_code(70000), 255);
    }

    #[tokio::test]
    async fn a_missing_source_fails_and_leaves_no_work_dir() {
        let dir = tempfile::tempdir().unwrap();
        let opts = RunOptions {
            source: dir.path().join("missing"),
            command: vec!["true".into()],
            tty: false,
            vcpus: None,
            memory_mib: None,
            config: CapsaConfig::default(),
            work_parent: dir.path().join("work"),
        };
        assert!(matches!(run(opts).await, Err(RunError::Io { .. })));
        let left: Vec<_> = std::fs::read_dir(dir.path().join("work"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "{left:?}");
        // A file that is not an image archive.
        let f = dir.path().join("not-an-image");
        std::fs::write(&f, b"hello").unwrap();
        let opts = RunOptions {
            source: f,
            command: vec!["true".into()],
            tty: false,
            vcpus: None,
            memory_mib: None,
            config: CapsaConfig::default(),
            work_parent: dir.path().join("work"),
        };
        assert!(matches!(run(opts).await, Err(RunError::BadSource(_))));
        assert_eq!(
            std::fs::read_dir(dir.path().join("work")).unwrap().count(),
            0
        );
    }
}
