//! Child reaping. As PID 1 the agent inherits every orphan in the guest and must wait for all of
//! them; the processes the agent starts itself (containers, execs) need their exit status.
//!
//! One task waits for SIGCHLD and calls `waitpid(-1, WNOHANG)` until nothing is left. Exits of
//! pids registered in the child-exit registry are delivered on a oneshot channel; others (orphans)
//! are logged and dropped.
//!
//! Rules for code that starts processes:
//! - Start them through [`Reaper::spawn_registered`]: the fork happens under the registry lock, so
//!   an exit cannot be reaped before its pid is registered.
//! - Never wait for them another way (`std::process::Child::wait`, `tokio::process`): the reaper
//!   takes every exit status, those would see ECHILD.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// exit(code).
    Exited(i32),
    /// Killed by a signal.
    Signaled { signal: i32, core_dumped: bool },
}

impl ExitStatus {
    /// containerd's convention: the exit code, or 128 + signal number.
    pub fn containerd_status(self) -> u32 {
        match self {
            ExitStatus::Exited(code) => u32::try_from(code & 0xff).unwrap_or(255),
            ExitStatus::Signaled { signal, .. } => 128 + u32::try_from(signal).unwrap_or(0),
        }
    }
}

/// One reaped child.
#[derive(Debug, Clone, Copy)]
pub struct ChildExit {
    pub pid: Pid,
    pub status: ExitStatus,
    /// Guest wall clock when it was reaped.
    pub at: SystemTime,
}

type Registry = HashMap<i32, oneshot::Sender<ChildExit>>;

/// Handle to the child-exit registry (cheap to clone).
#[derive(Clone, Default)]
pub struct Reaper {
    registry: Arc<Mutex<Registry>>,
}

impl Reaper {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock cannot leave the map inconsistent: keep going.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `spawn` (which starts a process and returns its pid plus anything else) under the
    /// registry lock, registers the pid, and returns a receiver for its exit.
    pub fn spawn_registered<T, E>(
        &self,
        spawn: impl FnOnce() -> Result<(Pid, T), E>,
    ) -> Result<(T, oneshot::Receiver<ChildExit>), E> {
        let mut registry = self.lock();
        let (pid, extra) = spawn()?;
        let (tx, rx) = oneshot::channel();
        registry.insert(pid.as_raw(), tx);
        Ok((extra, rx))
    }

    /// Number of registered, not yet reaped children.
    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    /// Reaps every child that has exited. Returns how many were reaped.
    pub fn reap_all(&self) -> usize {
        let mut n = 0;
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return n,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!("waitpid: {e}");
                    return n;
                }
                Ok(WaitStatus::Exited(pid, code)) => {
                    n += 1;
                    self.deliver(pid, ExitStatus::Exited(code));
                }
                Ok(WaitStatus::Signaled(pid, sig, core_dumped)) => {
                    n += 1;
                    self.deliver(
                        pid,
                        ExitStatus::Signaled {
                            signal: sig as i32,
                            core_dumped,
                        },
                    );
                }
                // Stopped/continued/ptrace events: not exits (we do not ask for them anyway).
                Ok(_) => continue,
            }
        }
    }

    fn deliver(&self, pid: Pid, status: ExitStatus) {
        let exit = ChildExit {
            pid,
            status,
            at: SystemTime::now(),
        };
        let waiter = self.lock().remove(&pid.as_raw());
        match waiter {
            Some(tx) => {
                tracing::debug!(pid = pid.as_raw(), ?status, "child exited");
                // The receiver may be gone (nobody cares any more): fine.
                let _ = tx.send(exit);
            }
            None => tracing::debug!(pid = pid.as_raw(), ?status, "reaped orphan"),
        }
    }

    /// Starts the reaper task on the current tokio runtime.
    pub fn start(&self) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = self.clone();
        Ok(tokio::spawn(async move {
            // Children that exited before the handler was installed.
            reaper.reap_all();
            while sigchld.recv().await.is_some() {
                reaper.reap_all();
            }
            tracing::error!("SIGCHLD stream ended; reaper stopped");
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn run(reaper: &Reaper, script: &str) -> oneshot::Receiver<ChildExit> {
        let ((), rx) = reaper
            .spawn_registered(|| {
                let child = Command::new("/bin/sh").arg("-c").arg(script).spawn()?;
                let pid = i32::try_from(child.id()).map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>((Pid::from_raw(pid), ()))
            })
            .expect("spawn sh");
        rx
    }

    #[tokio::test]
    async fn delivers_exit_statuses() {
        let reaper = Reaper::new();
        let _task = reaper.start().expect("start reaper");
        let exited = run(&reaper, "exit 3");
        let killed = run(&reaper, "kill -9 $$");

        let e = exited.await.expect("exit delivered");
        assert_eq!(e.status, ExitStatus::Exited(3));
        assert_eq!(e.status.containerd_status(), 3);

        let k = killed.await.expect("exit delivered");
        assert!(matches!(k.status, ExitStatus::Signaled { signal: 9, .. }));
        assert_eq!(k.status.containerd_status(), 137);
        assert_eq!(reaper.pending(), 0);
    }
}
