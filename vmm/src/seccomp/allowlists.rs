//! What each thread kind may call once the guest runs. Found by measurement (strace -f of the VMM tests'
//! guests and of real guests in the test host, and `--seccomp log` runs there); see docs/interfaces.md.

use libc::*;
use seccompiler::BackendError;

use super::kvm;
use super::rules::Allowlist;
use super::ThreadKind;

/// What every thread does: memory (never executable), locks, time, signals, logging to stderr, exiting.
fn base(pid: u32) -> Result<Allowlist, BackendError> {
    let mut a = Allowlist::new();
    a.allow(&[
        SYS_brk,
        SYS_munmap,
        SYS_mremap,
        SYS_madvise,
        SYS_futex,
        SYS_clock_gettime,
        SYS_clock_nanosleep,
        SYS_nanosleep,
        SYS_sched_yield,
        SYS_rt_sigreturn,
        SYS_rt_sigprocmask,
        SYS_sigaltstack,
        SYS_restart_syscall,
        // tracing and the serial console write; descriptors are the ones already open.
        SYS_write,
        SYS_close,
        // std's HashMap keys (once per thread).
        SYS_getrandom,
        SYS_getpid,
        SYS_gettid,
        SYS_exit,
        SYS_exit_group,
    ]);
    // Anonymous memory for the allocator and thread stacks, never executable.
    a.allow_masked(SYS_mmap, 2, PROT_EXEC as u64, 0)?;
    a.allow_masked(SYS_mprotect, 2, PROT_EXEC as u64, 0)?;
    // Debug builds check that a descriptor is open before closing it (std's OwnedFd).
    a.allow_arg(SYS_fcntl, 1, &[F_GETFD as u64])?;
    // Signals only within this process (the vCPU kick, abort()).
    a.allow_arg(SYS_tgkill, 0, &[u64::from(pid)])?;
    Ok(a)
}

/// Waiting on eventfds and device fds.
fn epoll(a: &mut Allowlist) -> &mut Allowlist {
    a.allow(&[
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_wait,
        SYS_epoll_pwait,
        SYS_read,
    ])
}

/// The allowlist of one thread kind; `pid` is the VMM's own process id (for tgkill).
pub fn allowlist(kind: ThreadKind, pid: u32) -> Result<Allowlist, BackendError> {
    let mut a = base(pid)?;
    match kind {
        ThreadKind::Main => {
            // Waits for a vCPU event, kicks the vCPUs (tgkill), joins them, removes the vsock socket,
            // drops the devices.
            a.allow(&[SYS_unlink, SYS_unlinkat]);
        }
        ThreadKind::Vcpu => {
            // KVM_RUN; at activation, the tap's offloads (net) and a non-blocking listener (vsock).
            a.allow_arg(
                SYS_ioctl,
                1,
                &[kvm::KVM_RUN, kvm::TUNSETOFFLOAD, kvm::FIONBIO],
            )?;
            // Device activation: eventfds for the worker and the vhost-user rings, the vhost-user
            // protocol on the already-connected frontend socket, and starting workers through the
            // launcher; device reset stops them.
            // The workers' epoll sets are made at activation, on this thread (measured in the test host:
            // epoll_create1, epoll_ctl).
            a.allow(&[
                SYS_eventfd2,
                SYS_read,
                SYS_sendmsg,
                SYS_recvmsg,
                SYS_epoll_create1,
                SYS_epoll_ctl,
            ]);
            // EventFd::try_clone, and the flags of descriptors handed to workers.
            a.allow_arg(
                SYS_fcntl,
                1,
                &[F_DUPFD_CLOEXEC, F_GETFL, F_SETFL].map(|c| c as u64),
            )?;
        }
        ThreadKind::SerialStdin => {
            a.allow(&[SYS_read]);
        }
        ThreadKind::Launcher => {
            for worker in ThreadKind::WORKERS {
                a.union(&allowlist(worker, pid)?);
            }
            // Creating a thread (glibc's pthread_create, then std's thread start in the child, which runs
            // under this filter until it installs its own). clone only for threads.
            a.allow_masked(SYS_clone, 0, CLONE_THREAD as u64, CLONE_THREAD as u64)?;
            a.allow(&[
                // Answered ENOSYS by the launcher's first filter (glibc then uses clone); allowed here
                // because the strictest answer of all filters wins and this one would otherwise kill.
                SYS_clone3,
                SYS_set_robust_list,
                SYS_rseq,
                // The new worker then installs its own filter.
                SYS_prctl,
                SYS_seccomp,
                SYS_sched_getaffinity,
            ]);
        }
        ThreadKind::Blk => {
            // Positioned reads and writes on the image opened at setup; flush is fdatasync.
            epoll(&mut a).allow(&[SYS_pread64, SYS_pwrite64, SYS_fdatasync]);
        }
        ThreadKind::Rng => {
            epoll(&mut a);
        }
        ThreadKind::Net => {
            // Frames are read(2) from and write(2) to the tap opened (or inherited) at setup.
            epoll(&mut a);
        }
        ThreadKind::Vsock => {
            // Host connections accepted on the listener bound at setup; stream I/O; half-close. Packet
            // payloads move between guest memory and the sockets with sendmsg/recvmsg over iovecs (no
            // control data: descriptors a peer passes are discarded by the kernel).
            epoll(&mut a).allow(&[
                SYS_accept4,
                SYS_connect,
                SYS_shutdown,
                SYS_recvfrom,
                SYS_sendto,
                SYS_sendmsg,
                SYS_recvmsg,
            ]);
            // Guest-initiated connections go to `<uds>_<port>`: Unix sockets only (connect is by path: the
            // one path-based operation a running VMM does, and only on Unix sockets next to its own).
            a.allow_arg(SYS_socket, 0, &[AF_UNIX as u64])?;
            a.allow_arg(SYS_ioctl, 1, &[kvm::FIONBIO])?;
        }
        ThreadKind::Fs => {
            epoll(&mut a);
        }
    }
    Ok(a)
}
