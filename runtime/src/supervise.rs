//! Supervision of a VM's helper processes: when a helper the guest depends on dies, the VM is stopped,
//! so the sandbox ends in the defined "VM gone" state instead of hanging.
//!
//! virtiofsd is the case today: without it every file access of the guest's containers (their root
//! file systems are on virtio-fs) blocks forever, so tasks can neither exit nor be killed. It is not
//! restarted transparently: the guest's FUSE session (inode numbers, open handles) lives in the dead
//! process and a new virtiofsd cannot take it over. Killing the VMM turns the fault into one the
//! front ends already handle: every process of the VM is reported exited and teardown proceeds.
//!
//! Processes are watched and signalled through pidfds, so a pid that was reaped and reused can never
//! be signalled by mistake.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;
use tokio::task::JoinHandle;

/// A pidfd for `pid` (`pidfd_open(2)`, Linux 5.3+).
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("pidfd_open returned a bad fd"))?;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `signal` to the process behind `pidfd` (`pidfd_send_signal(2)`). A process that already
/// ended is `ESRCH`.
pub fn pidfd_kill(pidfd: &OwnedFd, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid pidfd, a signal number, no siginfo (NULL) and no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Resolves when the process behind `pidfd` has ended (a pidfd turns readable then; the process need
/// not have been reaped).
pub async fn wait_exit(pidfd: OwnedFd) -> io::Result<()> {
    // SAFETY: we own `pidfd` and it stays open inside the AsyncFd until it is deregistered on drop.
    let afd = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }?;
    let _ready = afd.readable().await?;
    Ok(())
}

/// Watches helper `helper_pid` (named `helper` in logs) of the VM of `sandbox` whose VMM is
/// `vmm_pid`: if the helper ends first, the VMM is killed with SIGKILL and the reason logged. Abort
/// the returned task when the VM is stopped on purpose (before its helpers go).
pub fn stop_vm_when_helper_dies(
    sandbox: &str,
    helper: &'static str,
    helper_pid: u32,
    vmm_pid: u32,
) -> io::Result<JoinHandle<()>> {
    let helper_fd = pidfd_open(helper_pid)?;
    let vmm_fd = pidfd_open(vmm_pid)?;
    let sandbox = sandbox.to_owned();
    Ok(tokio::spawn(async move {
        if let Err(e) = wait_exit(helper_fd).await {
            tracing::warn!(sandbox, helper, error = %e, "cannot watch the helper process");
            return;
        }
        tracing::error!(
            sandbox,
            helper,
            helper_pid,
            vmm_pid,
            "{helper} exited while the VM was running; the guest cannot go on without it: killing the VMM"
        );
        match pidfd_kill(&vmm_fd, libc::SIGKILL) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => tracing::error!(sandbox, vmm_pid, error = %e, "cannot kill the VMM"),
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::process::Command;

    #[tokio::test]
    async fn a_dead_helper_takes_the_vmm_down() {
        let mut helper = Command::new("sleep").arg("30").spawn().unwrap();
        let mut vmm = Command::new("sleep").arg("30").spawn().unwrap();
        let task =
            stop_vm_when_helper_dies("sb", "virtiofsd", helper.id().unwrap(), vmm.id().unwrap())
                .unwrap();
        // Nothing happens while the helper lives.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), vmm.wait())
                .await
                .is_err(),
            "the VMM must keep running while its helper does"
        );
        helper.start_kill().unwrap();
        let status = tokio::time::timeout(Duration::from_secs(10), vmm.wait())
            .await
            .expect("the VMM is killed once the helper died")
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        task.await.unwrap();
        let _ = helper.wait().await;
    }

    #[tokio::test]
    async fn a_reaped_process_is_not_signalled() {
        let mut p = Command::new("true").spawn().unwrap();
        let fd = pidfd_open(p.id().unwrap()).unwrap();
        p.wait().await.unwrap();
        // The pid is gone (and may be reused): the pidfd refuses instead of hitting someone else.
        let e = pidfd_kill(&fd, libc::SIGKILL).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH));
        // And it reads as ended.
        tokio::time::timeout(Duration::from_secs(5), wait_exit(fd))
            .await
            .expect("an ended process's pidfd is readable")
            .unwrap();
    }
}
