//! The pod's namespace holder, `capsa-agent __pause`: what keeps the pod's shared ipc, uts and pid namespaces
//! alive while containers come and go (Kubernetes' pause container, inside the guest).
//!
//! The agent starts it with new ipc and uts namespaces and a new pid namespace for its children. The holder
//! forks once: the child is PID 1 of the pod's pid namespace ("pause"), which containers join when their spec
//! asks to share the pod's pid namespace (Kubernetes' `shareProcessNamespace`). It reaps the orphans that
//! namespace gets and lives until killed. The holder writes the child's pid (as the agent sees it) on stdout,
//! one line, and waits for it.

use std::io::Write;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

/// argv[1] of the pod's namespace holder.
pub const PAUSE_ARG: &str = "__pause";

/// Entry point of `capsa-agent __pause` (called from `main` before any thread exists); returns once the pod's
/// init is gone (killed with the sandbox), or at once if it could not be started.
pub fn holder_main() -> i32 {
    // SAFETY: the holder is single-threaded (no runtime has started), so the child may run any code.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => pod_init(),
        Ok(ForkResult::Parent { child }) => {
            let mut out = std::io::stdout().lock();
            if writeln!(out, "{child}").and_then(|()| out.flush()).is_err() {
                return 1;
            }
            drop(out);
            loop {
                match waitpid(child, None) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(_) => return 0,
                    Ok(_) => continue,
                }
            }
        }
        Err(e) => {
            eprintln!("capsa-agent {PAUSE_ARG}: fork: {e}");
            1
        }
    }
}

/// PID 1 of the pod's pid namespace: reap whatever exits, forever. Signals without a handler do not reach a
/// namespace's PID 1, so only SIGKILL from the agent's namespace (DestroySandbox) ends it.
fn pod_init() -> ! {
    let name = c"pause";
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    // A blocked SIGCHLD stays pending (it is not discarded as ignored), so sigwait sees every one.
    let _ = chld.thread_block();
    loop {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        let _ = chld.wait();
    }
}
