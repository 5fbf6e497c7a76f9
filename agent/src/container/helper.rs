//! The container helper: a single-threaded re-exec of the agent binary that runs libcontainer.
//!
//! libcontainer clones processes and runs Rust code in them before `exec`; doing that from the
//! multi-threaded tokio agent could deadlock on a lock another thread held at fork time. So the agent
//! starts `capsa-agent __container-helper '<json request>'` (fork+exec is safe), the helper creates
//! the container (or the exec process) with libcontainer, writes one JSON line with the result to its
//! stdout and exits. The container's init (or exec'd) process is then reparented to the agent (PID 1,
//! or a child subreaper in tests), whose reaper reports its exit.
//!
//! File descriptors: 3, 4, 5 are the process's stdin, stdout, stderr when it has no terminal.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

/// argv[1] that selects the helper.
pub const HELPER_ARG: &str = "__container-helper";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum HelperRequest {
    /// Create (not start) a container from `bundle/config.json`.
    Create {
        root: PathBuf,
        id: String,
        bundle: PathBuf,
        console_socket: Option<PathBuf>,
    },
    /// Start a process (`process` = an OCI Process JSON file) in a running container.
    Exec {
        root: PathBuf,
        id: String,
        process: PathBuf,
        console_socket: Option<PathBuf>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct HelperReply {
    pub pid: Option<i32>,
    pub error: Option<String>,
}

/// Entry point of the helper process (called from `main` before any runtime starts). Returns the
/// process exit code.
pub fn helper_main(arg: &str) -> i32 {
    // The Rust runtime ignores SIGPIPE and ignored dispositions survive exec: without this, a
    // container's `yes | head` would spin forever on EPIPE instead of dying of SIGPIPE.
    // SAFETY: plain signal-disposition and mask calls before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
    // Logs go to stderr, which the agent collects and adds to the error it reports.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .try_init();
    let reply = match serde_json::from_str::<HelperRequest>(arg) {
        Ok(req) => match run(req) {
            Ok(pid) => HelperReply {
                pid: Some(pid),
                error: None,
            },
            Err(e) => HelperReply {
                pid: None,
                error: Some(e),
            },
        },
        Err(e) => HelperReply {
            pid: None,
            error: Some(format!("bad helper request: {e}")),
        },
    };
    let line = serde_json::to_string(&reply).unwrap_or_else(|_| "{}".into());
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    if reply.error.is_some() {
        1
    } else {
        0
    }
}

fn stdio_fd(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: fcntl(F_GETFD) only asks whether the descriptor exists.
    let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1;
    // SAFETY: the agent passed these descriptors to us for exactly this purpose; nothing else here
    // owns them.
    open.then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn run(req: HelperRequest) -> Result<i32, String> {
    use libcontainer::container::builder::ContainerBuilder;
    use libcontainer::syscall::syscall::SyscallType;

    let (root, id, console_socket) = match &req {
        HelperRequest::Create {
            root,
            id,
            console_socket,
            ..
        }
        | HelperRequest::Exec {
            root,
            id,
            console_socket,
            ..
        } => (root.clone(), id.clone(), console_socket.clone()),
    };
    let mut builder = ContainerBuilder::new(id, SyscallType::Linux)
        .with_root_path(root)
        .map_err(|e| error_chain(&e))?
        .with_console_socket(console_socket.as_ref());
    if console_socket.is_none() {
        if let Some(fd) = stdio_fd(3) {
            builder = builder.with_stdin(fd);
        }
        if let Some(fd) = stdio_fd(4) {
            builder = builder.with_stdout(fd);
        }
        if let Some(fd) = stdio_fd(5) {
            builder = builder.with_stderr(fd);
        }
    }
    match req {
        HelperRequest::Create { bundle, .. } => {
            let container = builder
                .as_init(bundle)
                .with_systemd(false)
                .with_detach(true)
                .with_no_pivot(root_is_initramfs())
                .build()
                .map_err(|e| error_chain(&e))?;
            container
                .pid()
                .map(|p| p.as_raw())
                .ok_or_else(|| "libcontainer created the container but reported no pid".into())
        }
        HelperRequest::Exec { process, .. } => {
            let pid = builder
                .as_tenant()
                .with_process(Some(process))
                .with_detach(true)
                .build()
                .map_err(|e| error_chain(&e))?;
            Ok(pid.as_raw())
        }
    }
}

/// pivot_root(2) refuses to move an initramfs root (EINVAL): the guest boots the agent from one, so
/// containers there get MS_MOVE + chroot instead (what runc's --no-pivot does).
fn root_is_initramfs() -> bool {
    use nix::sys::statfs::{statfs, TMPFS_MAGIC};
    match statfs("/") {
        Ok(s) => {
            let t = s.filesystem_type();
            // RAMFS_MAGIC (0x858458f6), missing from libc for this target.
            t == TMPFS_MAGIC || t.0 as u64 == 0x8584_58f6
        }
        Err(_) => false,
    }
}

/// Agent side: the process's stdio for the helper (none when it has a terminal).
pub struct HelperStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Runs the helper (blocking: call from `spawn_blocking`) and returns the pid it reports.
///
/// The helper is not waited for here: the agent's reaper collects it (it is a child of the agent and
/// a `waitpid(-1)` loop runs there). Its result is read from its stdout up to the first newline, so a
/// descendant that inherited the pipe cannot make this hang after the reply.
pub fn run_helper(req: &HelperRequest, stdio: Option<HelperStdio>) -> Result<i32, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the agent binary: {e}"))?;
    let arg = serde_json::to_string(req).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.arg(HELPER_ARG)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("RUST_LOG");
    if let Some(s) = stdio {
        let fds = [
            s.stdin.as_raw_fd(),
            s.stdout.as_raw_fd(),
            s.stderr.as_raw_fd(),
        ];
        // SAFETY: between fork and exec only async-signal-safe calls (dup2/fcntl) are made. The
        // source descriptors are CLOEXEC; their dup2 copies at 3..5 are not, so only they survive exec.
        unsafe {
            cmd.pre_exec(move || {
                // First move the sources above 5 so dup2 onto 3..5 cannot clobber one not yet copied.
                let mut high = [0; 3];
                for (i, fd) in fds.iter().enumerate() {
                    let h = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
                    if h < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    high[i] = h;
                }
                for (i, h) in high.iter().enumerate() {
                    if libc::dup2(*h, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start the container helper: {e}"))?;
        drop(s); // the agent's copies: the container holds the only write ends now
        return read_reply(&mut child);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the container helper: {e}"))?;
    read_reply(&mut child)
}

fn read_reply(child: &mut std::process::Child) -> Result<i32, String> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| "helper stdout missing".to_string())?;
    let stderr = child.stderr.take();
    let mut line = String::new();
    let n = BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| format!("reading the container helper's reply: {e}"))?;
    let logs = || {
        let mut s = String::new();
        if let Some(mut e) = stderr {
            // The helper has exited (it wrote its reply), bounded read of what it logged.
            let _ = (&mut e).take(16 * 1024).read_to_string(&mut s);
        }
        s
    };
    if n == 0 {
        return Err(format!(
            "the container helper died without a reply: {}",
            logs().trim()
        ));
    }
    let reply: HelperReply = serde_json::from_str(line.trim())
        .map_err(|e| format!("bad reply from the container helper ({e}): {line}"))?;
    match (reply.pid, reply.error) {
        (Some(pid), None) => Ok(pid),
        (_, Some(err)) => {
            let l = logs();
            let detail = error_lines(&l);
            Err(if detail.is_empty() {
                err
            } else {
                format!("{err} ({detail})")
            })
        }
        (None, None) => Err("the container helper replied without a pid".into()),
    }
}

/// What libcontainer logged as errors, innermost first, without the tracing prefix, joined with "; ": its
/// outer errors are generic ("failed to prepare rootfs"), the first line names the mount, path or syscall.
/// Bounded (the helper's log is read up to 16 KiB; this keeps the reply to a few lines).
fn error_lines(logs: &str) -> String {
    const MAX: usize = 2048;
    let mut out = String::new();
    for l in logs.lines().filter(|l| l.contains("ERROR")) {
        let l = strip_ansi(l);
        let msg = match l.find("ERROR") {
            Some(i) => l[i + 5..].trim().to_string(),
            None => l,
        };
        if msg.is_empty() || out.contains(&msg) {
            continue;
        }
        if out.len() + msg.len() + 2 > MAX {
            out.push_str("; ...");
            break;
        }
        if !out.is_empty() {
            out.push_str("; ");
        }
        out.push_str(&msg);
    }
    out
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        let r = HelperRequest::Exec {
            root: "/run/capsa/containers".into(),
            id: "c1".into(),
            process: "/run/capsa/bundles/c1/exec-e1.json".into(),
            console_socket: None,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains(r#""op":"exec""#), "{s}");
        let back: HelperRequest = serde_json::from_str(&s).unwrap();
        assert!(matches!(back, HelperRequest::Exec { id, .. } if id == "c1"));
    }

    #[test]
    fn error_line_is_extracted() {
        let logs = "\u{1b}[2m2024\u{1b}[0m \u{1b}[31mERROR\u{1b}[0m libcontainer: failed to mount /x\nnoise\n";
        assert_eq!(error_lines(logs), "libcontainer: failed to mount /x");
        assert_eq!(error_lines("nothing"), "");
        let nested = "ERROR mount: EINVAL dest=/data\nERROR failed to prepare rootfs\nERROR failed to prepare rootfs\n";
        assert_eq!(
            error_lines(nested),
            "mount: EINVAL dest=/data; failed to prepare rootfs"
        );
        let long: String = (0..100)
            .map(|i| format!("ERROR line {i} {}\n", "x".repeat(50)))
            .collect();
        let joined = error_lines(&long);
        assert!(
            joined.len() <= 2048 + 5 && joined.ends_with("; ..."),
            "{joined}"
        );
    }
}
