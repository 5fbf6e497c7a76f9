//! Per-thread seccomp-bpf filters for capsa-vmm (issue 11, defence in depth behind KVM and the devices).
//!
//! Every thread the VMM runs once the guest can execute gets an allowlist of its own, built in Rust with
//! `seccompiler` and compiled once when the VM starts ([`Filters::build`]):
//! - the main (control) thread: after setup, it only waits for events, kicks vCPUs and tears down;
//! - each vCPU thread: `KVM_RUN` and what the device emulation it calls needs (MMIO/PIO handlers,
//!   device activation and reset);
//! - each device worker kind (blk, rng, net, vsock, the virtio-fs vhost-user frontend) and the serial
//!   input thread;
//! - the worker launcher: device workers start when the guest activates a device, from a vCPU thread, and a
//!   thread inherits its parent's filters. So workers are started by a launcher thread whose filter is the
//!   union of the worker filters (plus thread creation), and each worker then narrows it to its own.
//!
//! A syscall outside the allowlist kills the whole process (`SECCOMP_RET_KILL_PROCESS`: the parent sees
//! SIGSYS); [`SeccompMode::Log`] lets it through and has the kernel log it (audit type=1326 in dmesg),
//! to find a missing syscall; [`SeccompMode::Off`] installs nothing.
//!
//! Modules: [`mode`] (the on/off/log switch), `kvm` (KVM ioctl numbers), `rules` (building blocks),
//! `allowlists` (what each thread kind may call), `policy` (compiled filters, installing them, starting
//! filtered worker threads).

mod allowlists;
mod kvm;
mod mode;
mod policy;
mod rules;

pub use mode::SeccompMode;
pub use policy::{spawn_filtered, Filters, Policy};

/// The kinds of thread the VMM runs, one filter each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ThreadKind {
    /// The thread that built the VM and then waits for it to stop.
    Main,
    Vcpu,
    /// Copies the VMM's stdin to the guest's serial port.
    SerialStdin,
    /// Starts device workers on behalf of vCPU threads.
    Launcher,
    Blk,
    Rng,
    Net,
    Vsock,
    /// The virtio-fs vhost-user frontend's interrupt forwarder.
    Fs,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 9] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::SerialStdin,
        ThreadKind::Launcher,
        ThreadKind::Blk,
        ThreadKind::Rng,
        ThreadKind::Net,
        ThreadKind::Vsock,
        ThreadKind::Fs,
    ];

    /// The device worker kinds (started through the launcher).
    pub const WORKERS: [ThreadKind; 5] = [
        ThreadKind::Blk,
        ThreadKind::Rng,
        ThreadKind::Net,
        ThreadKind::Vsock,
        ThreadKind::Fs,
    ];
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter for the {kind:?} thread: {source}")]
    Build {
        kind: ThreadKind,
        source: seccompiler::BackendError,
    },
    #[error("cannot compile the seccomp filter for the {kind:?} thread: {source}")]
    Compile {
        kind: ThreadKind,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the seccomp filter for the {kind:?} thread: {source}")]
    Install {
        kind: ThreadKind,
        source: seccompiler::Error,
    },
    #[error("cannot start the worker launcher thread: {0}")]
    Launcher(std::io::Error),
}

#[cfg(test)]
mod tests;
