//! containerd's `binary://` stdio URIs: a logging binary that receives a process's stdout and stderr.
//!
//! The contract is the one containerd's runc shim implements (`NewBinaryIO`): the binary is the URI's path;
//! each query pair `k=v` becomes two arguments `k v`; its environment carries `CONTAINER_ID` and
//! `CONTAINER_NAMESPACE`; it gets the read ends of the stdout and stderr pipes as file descriptors 3 and 4 and
//! the write end of a readiness pipe as 5, which it closes (or writes to) once it is ready. The process's
//! output is written to the pipes only after that. When both streams end the pipes are closed; the binary
//! then has [`EXIT_GRACE`] to exit before it is killed.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use tokio::process::{Child, Command};

/// How long a logging binary may take to exit after its input ended.
pub const EXIT_GRACE: Duration = Duration::from_secs(10);

/// A parsed `binary://` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggingBinary {
    pub path: PathBuf,
    pub args: Vec<String>,
}

/// A started logging binary, ready for output.
pub struct RunningLogger {
    pub child: Child,
    pub stdout: File,
    pub stderr: File,
}

impl LoggingBinary {
    /// Parses `binary:///abs/path?k=v&flag`; `None` when `uri` is not a `binary://` URI.
    pub fn parse(uri: &str) -> Option<Result<Self, String>> {
        let rest = uri.strip_prefix("binary://")?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let path = percent_decode(path);
        if !path.starts_with('/') {
            return Some(Err(format!(
                "stdio URI {uri:?}: the logging binary must be an absolute path"
            )));
        }
        let mut args = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            args.push(percent_decode(k));
            args.push(percent_decode(v));
        }
        Some(Ok(LoggingBinary {
            path: PathBuf::from(path),
            args,
        }))
    }

    /// Whether the binary exists and is executable (checked when the task is created, so a typo fails there).
    pub fn check(&self) -> Result<(), String> {
        let c = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes())
            .map_err(|_| format!("logging binary {}: NUL in path", self.path.display()))?;
        // SAFETY: access(2) only reads the NUL-terminated path.
        if unsafe { libc::access(c.as_ptr(), libc::X_OK) } != 0 {
            return Err(format!(
                "logging binary {}: {}",
                self.path.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// Starts the binary for container `cid` of containerd namespace `namespace` and waits until it is ready.
    pub async fn start(&self, cid: &str, namespace: &str) -> std::io::Result<RunningLogger> {
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let (ready_r, ready_w) = pipe()?;
        let fds = [out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()];
        let mut cmd = Command::new(&self.path);
        cmd.args(&self.args)
            .env("CONTAINER_ID", cid)
            .env("CONTAINER_NAMESPACE", namespace)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        // SAFETY: only fcntl/dup2/close between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Move the three ends above 5 first, so that placing one cannot overwrite another; the
                // copies are not close-on-exec, and dup2 onto 3, 4, 5 clears the flag there.
                let mut high = [0; 3];
                for (h, fd) in high.iter_mut().zip(fds) {
                    *h = libc::fcntl(fd, libc::F_DUPFD, 10);
                    if *h < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (target, h) in (3..).zip(high) {
                    if libc::dup2(h, target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(h);
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        // Only the binary holds the read ends and the readiness writer now.
        drop((out_r, err_r, ready_w));
        // Ready = a byte or EOF on the readiness pipe.
        tokio::task::spawn_blocking(move || {
            let mut b = [0u8; 1];
            File::from(ready_r).read(&mut b).map(|_| ())
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(RunningLogger {
            child,
            stdout: File::from(out_w),
            stderr: File::from(err_w),
        })
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

/// URL percent-decoding, with `+` as a space (as Go's `url.Query` does); a malformed escape stays as it is.
fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).and_then(|&c| hex(c)),
            b.get(i + 2).and_then(|&c| hex(c)),
        ) {
            (b'+', ..) => out.push(b' '),
            (b'%', Some(hi), Some(lo)) => {
                // Two hex digits: at most 0xff.
                out.push((hi * 16 + lo) as u8);
                i += 2;
            }
            (c, ..) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_become_a_path_and_argument_pairs() {
        assert_eq!(LoggingBinary::parse("file:///x"), None);
        let b = LoggingBinary::parse("binary:///usr/bin/my%20logger?tag=web+1&verbose")
            .unwrap()
            .unwrap();
        assert_eq!(b.path, PathBuf::from("/usr/bin/my logger"));
        assert_eq!(b.args, ["tag", "web 1", "verbose", ""]);
        assert!(LoggingBinary::parse("binary://relative/logger")
            .unwrap()
            .is_err());
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
    }

    #[test]
    fn check_names_a_missing_binary() {
        let b = LoggingBinary::parse("binary:///nonexistent/logger")
            .unwrap()
            .unwrap();
        let e = b.check().unwrap_err();
        assert!(e.contains("/nonexistent/logger"), "{e}");
        let sh = LoggingBinary::parse("binary:///bin/sh").unwrap().unwrap();
        sh.check().unwrap();
    }
}
