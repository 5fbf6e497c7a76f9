//! virtiofsd, the vhost-user backend of a sandbox's shared directory (virtio-fs).
//!
//! [`Virtiofsd::spawn`] starts `virtiofsd --socket-path <sandbox dir>/fs.sock --shared-dir <sandbox
//! dir>/shared ...` and returns once the socket accepts connections; capsa-vmm then connects to it
//! (`--fs tag=<tag>,socket=<sock>`). virtiofsd serves exactly one frontend and exits when it disconnects,
//! so it normally ends with the VMM; [`Virtiofsd::stop`] (and dropping) kills it if it has not.
//!
//! Later mounts: with `--sandbox namespace` virtiofsd works in a private copy of the mount table, so a rootfs
//! mounted under the shared dir after it started (a pod's second container) would stay invisible where `/`
//! is not a shared mount (the test host). So the shared dir is first bind-mounted onto itself with shared
//! propagation: virtiofsd's copy becomes its slave and receives every later mount. Stopping detaches it
//! (`MNT_DETACH`, taking whatever is still mounted below with it), so removing the sandbox directory never
//! reaches into a container's rootfs.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// The tag the guest mounts the sandbox's shared directory by.
pub const DEFAULT_TAG: &str = "capsa-shared";
/// Where virtiofsd is looked for when nothing else says (the workspace's build dir comes first).
pub const INSTALLED_VIRTIOFSD: &str = "/usr/libexec/capsa/virtiofsd";

/// virtiofsd's `--cache` policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachePolicy {
    /// Nothing cached in the guest: every access goes to the host (host-side changes are seen at once).
    Never,
    /// Attributes and data cached for a short time (virtiofsd's default).
    Auto,
}

impl CachePolicy {
    fn as_arg(self) -> &'static str {
        match self {
            CachePolicy::Never => "never",
            CachePolicy::Auto => "auto",
        }
    }
}

/// virtiofsd's `--sandbox` mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxMode {
    /// Own mount/pid/net namespaces, pivot_root into the shared dir (needs root or user namespaces).
    Namespace,
    /// No isolation: virtiofsd runs in the caller's namespaces (sees later host mounts under the dir at once).
    None,
}

impl SandboxMode {
    fn as_arg(self) -> &'static str {
        match self {
            SandboxMode::Namespace => "namespace",
            SandboxMode::None => "none",
        }
    }
}

/// How to run virtiofsd for a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedFsConfig {
    pub virtiofsd: PathBuf,
    /// The virtio-fs tag the guest mounts.
    pub tag: String,
    pub cache: CachePolicy,
    pub sandbox: SandboxMode,
    /// How long virtiofsd has to create its socket.
    pub start_timeout: Duration,
    /// `cgroup.procs` files virtiofsd joins before its exec (the pod's cgroup); empty = the caller's.
    pub cgroup_procs: Vec<PathBuf>,
}

impl SharedFsConfig {
    /// Defaults: tag [`DEFAULT_TAG`], `--cache auto`, `--sandbox namespace`, 5 s to start.
    pub fn new(virtiofsd: PathBuf) -> Self {
        SharedFsConfig {
            virtiofsd,
            tag: DEFAULT_TAG.to_string(),
            cache: CachePolicy::Auto,
            sandbox: SandboxMode::Namespace,
            start_timeout: Duration::from_secs(5),
            cgroup_procs: Vec::new(),
        }
    }

    /// virtiofsd's arguments.
    pub fn args(&self, socket: &Path, shared_dir: &Path) -> Vec<std::ffi::OsString> {
        vec![
            "--socket-path".into(),
            socket.into(),
            "--shared-dir".into(),
            shared_dir.into(),
            "--cache".into(),
            self.cache.as_arg().into(),
            "--sandbox".into(),
            self.sandbox.as_arg().into(),
            // Mount points under the shared dir (containers' rootfs bind mounts) show up as submounts.
            "--announce-submounts".into(),
            "--log-level".into(),
            "warn".into(),
        ]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VirtiofsdError {
    #[error("virtiofsd {0} not found (make virtiofsd builds build/virtiofsd)")]
    Missing(PathBuf),
    #[error("cannot create the shared directory {path}: {source}")]
    SharedDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start virtiofsd {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("virtiofsd exited before listening ({status}); its log: {log}")]
    Exited { status: String, log: String },
    #[error("virtiofsd did not create {socket} within {timeout:?}; its log: {log}")]
    Timeout {
        socket: PathBuf,
        timeout: Duration,
        log: String,
    },
}

/// A running virtiofsd.
#[derive(Debug)]
pub struct Virtiofsd {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    /// The shared dir when it was made a shared-propagation mount point (unmounted on stop/drop).
    propagation_mount: Option<PathBuf>,
}

/// Bind-mounts `dir` onto itself and marks it MS_SHARED; false (logged) when that is not possible.
fn make_propagating_mount(dir: &Path) -> bool {
    use nix::mount::{mount, MsFlags};
    let bind = mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>);
    if let Err(e) = bind {
        tracing::warn!(dir = %dir.display(), error = %e,
            "cannot bind-mount the shared dir; mounts made under it after start stay invisible to the guest");
        return false;
    }
    if let Err(e) = mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    ) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot make the shared dir a shared mount");
    }
    true
}

fn detach(dir: &Path) {
    if let Err(e) = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot unmount the shared dir");
    }
}

impl Virtiofsd {
    /// Creates `shared_dir` if needed, starts virtiofsd on `socket` with stderr to `log`, and waits until
    /// the socket exists.
    pub async fn spawn(
        config: &SharedFsConfig,
        socket: &Path,
        shared_dir: &Path,
        log: &Path,
    ) -> Result<Virtiofsd, VirtiofsdError> {
        if !config.virtiofsd.exists() {
            return Err(VirtiofsdError::Missing(config.virtiofsd.clone()));
        }
        std::fs::create_dir_all(shared_dir).map_err(|source| VirtiofsdError::SharedDir {
            path: shared_dir.to_path_buf(),
            source,
        })?;
        let log_file = std::fs::File::create(log).map_err(|source| VirtiofsdError::Spawn {
            binary: config.virtiofsd.clone(),
            source,
        })?;
        let propagation_mount = (config.sandbox == SandboxMode::Namespace
            && make_propagating_mount(shared_dir))
        .then(|| shared_dir.to_path_buf());
        // Undo the mount on every early return.
        let guard = MountGuard(propagation_mount.clone());
        let args = config.args(socket, shared_dir);
        tracing::debug!(virtiofsd = %config.virtiofsd.display(), ?args, "starting virtiofsd");
        let mut cmd = Command::new(&config.virtiofsd);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true);
        if !config.cgroup_procs.is_empty() {
            let files: Vec<std::ffi::CString> = config
                .cgroup_procs
                .iter()
                .filter_map(|p| {
                    use std::os::unix::ffi::OsStrExt;
                    std::ffi::CString::new(p.as_os_str().as_bytes()).ok()
                })
                .collect();
            // SAFETY: runs in the forked child before exec; `join_cgroups` only makes open/write/close
            // calls on the C strings built above (no allocation).
            unsafe {
                cmd.pre_exec(move || crate::vm::join_cgroups(&files));
            }
        }
        let mut child = cmd.spawn().map_err(|source| VirtiofsdError::Spawn {
            binary: config.virtiofsd.clone(),
            source,
        })?;
        let deadline = Instant::now() + config.start_timeout;
        loop {
            if socket.exists() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(VirtiofsdError::Exited {
                    status: status.to_string(),
                    log: crate::vm::file_tail(log, 2000),
                });
            }
            if Instant::now() > deadline {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(VirtiofsdError::Timeout {
                    socket: socket.to_path_buf(),
                    timeout: config.start_timeout,
                    log: crate::vm::file_tail(log, 2000),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tracing::debug!(socket = %socket.display(), pid = child.id(), "virtiofsd listening");
        std::mem::forget(guard);
        Ok(Virtiofsd {
            child,
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
            propagation_mount,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The end of virtiofsd's log.
    pub fn log_tail(&self) -> String {
        crate::vm::file_tail(&self.log, 2000)
    }

    /// Waits up to `grace` for virtiofsd to exit by itself (it does when the VMM disconnects), then kills it.
    pub async fn stop(mut self, grace: Duration) {
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) => tracing::debug!(%status, "virtiofsd exited"),
            _ => {
                tracing::debug!("virtiofsd still running: killing it");
                let _ = self.child.kill().await;
            }
        }
        if let Some(dir) = self.propagation_mount.take() {
            detach(&dir);
        }
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if let Some(dir) = self.propagation_mount.take() {
            detach(&dir);
        }
    }
}

/// Detaches the propagation mount if `spawn` fails after making it.
struct MountGuard(Option<PathBuf>);

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            detach(&dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments() {
        let c = SharedFsConfig::new("/usr/bin/virtiofsd".into());
        let args: Vec<String> = c
            .args(
                Path::new("/run/capsa/sb/fs.sock"),
                Path::new("/run/capsa/sb/shared"),
            )
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args.join(" "),
            "--socket-path /run/capsa/sb/fs.sock --shared-dir /run/capsa/sb/shared --cache auto \
             --sandbox namespace --announce-submounts --log-level warn"
        );
    }

    fn script(dir: &Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("fake-virtiofsd");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[tokio::test]
    async fn waits_for_the_socket_and_reports_failures() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // A stand-in that creates the socket path ($2) and then waits to be killed.
        let mut c = SharedFsConfig::new(script(d, "touch \"$2\"; exec sleep 30"));
        let v = Virtiofsd::spawn(&c, &d.join("fs.sock"), &d.join("shared"), &d.join("log"))
            .await
            .unwrap();
        assert!(d.join("shared").is_dir());
        let shared = d.join("shared").canonicalize().unwrap();
        let mounted = || {
            std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .lines()
                .any(|l| l.split(' ').nth(4) == shared.to_str())
        };
        let root = nix::unistd::geteuid().is_root();
        // As root the shared dir is a (shared-propagation) mount point while virtiofsd runs.
        assert_eq!(mounted(), root);
        let pid = v.pid().unwrap();
        let t = Instant::now();
        v.stop(Duration::from_millis(50)).await;
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(!mounted(), "shared dir still mounted after stop");
        assert!(
            !Path::new(&format!("/proc/{pid}/cmdline")).exists() || {
                // A zombie until reaped is fine; `kill().await` reaps it.
                std::fs::read(format!("/proc/{pid}/cmdline")).map_or(true, |c| c.is_empty())
            }
        );

        c.virtiofsd = script(d, "echo 'bad shared dir' >&2; exit 1");
        let e = Virtiofsd::spawn(&c, &d.join("fs2.sock"), &d.join("shared"), &d.join("log2"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("bad shared dir"), "{e}");

        c.virtiofsd = script(d, "exec sleep 30");
        c.start_timeout = Duration::from_millis(200);
        let e = Virtiofsd::spawn(&c, &d.join("fs3.sock"), &d.join("shared"), &d.join("log3"))
            .await
            .unwrap_err();
        assert!(matches!(e, VirtiofsdError::Timeout { .. }), "{e}");

        c.virtiofsd = d.join("nope");
        assert!(matches!(
            Virtiofsd::spawn(&c, &d.join("fs4.sock"), &d.join("shared"), &d.join("log4")).await,
            Err(VirtiofsdError::Missing(_))
        ));
    }
}
