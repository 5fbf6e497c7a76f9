//! The compiled filters of one VM, installing them on the calling thread, and starting device workers
//! with their own filter through the launcher thread.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::sync::mpsc::{channel, sync_channel, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule};

use super::allowlists::allowlist;
use super::rules::target_arch;
use super::{SeccompError, SeccompMode, ThreadKind};

/// Every thread kind's BPF programs, compiled once; installed in order (the kernel runs them all and the
/// strictest answer wins).
#[derive(Debug)]
pub struct Filters {
    mode: SeccompMode,
    programs: BTreeMap<ThreadKind, Vec<BpfProgram>>,
}

impl Filters {
    /// Builds and compiles every thread kind's filter; `None` when `mode` is off.
    pub fn build(mode: SeccompMode) -> Result<Option<Self>, SeccompError> {
        let mismatch = match mode {
            SeccompMode::Off => return Ok(None),
            SeccompMode::On => SeccompAction::KillProcess,
            SeccompMode::Log => SeccompAction::Log,
        };
        let pid = std::process::id();
        let mut programs = BTreeMap::new();
        for kind in ThreadKind::ALL {
            let mut list = Vec::new();
            if kind == ThreadKind::Launcher {
                list.push(compile(kind, clone3_enosys().map_err(build_err(kind))?)?);
            }
            let filter = allowlist(kind, pid)
                .and_then(|a| a.into_filter(mismatch.clone()))
                .map_err(build_err(kind))?;
            list.push(compile(kind, filter)?);
            programs.insert(kind, list);
        }
        Ok(Some(Self { mode, programs }))
    }

    pub fn mode(&self) -> SeccompMode {
        self.mode
    }

    /// Installs `kind`'s filter on the calling thread (and sets no_new_privs); irreversible.
    pub fn apply(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        for program in self.programs.get(&kind).into_iter().flatten() {
            seccompiler::apply_filter(program)
                .map_err(|source| SeccompError::Install { kind, source })?;
        }
        Ok(())
    }

    /// The compiled programs of `kind` (for tests and size reports).
    pub fn programs(&self, kind: ThreadKind) -> &[BpfProgram] {
        self.programs.get(&kind).map_or(&[], Vec::as_slice)
    }
}

fn build_err(kind: ThreadKind) -> impl Fn(seccompiler::BackendError) -> SeccompError {
    move |source| SeccompError::Build { kind, source }
}

fn compile(kind: ThreadKind, filter: SeccompFilter) -> Result<BpfProgram, SeccompError> {
    filter
        .try_into()
        .map_err(|source| SeccompError::Compile { kind, source })
}

/// clone3 passes its flags in memory, where a filter cannot check them: answer ENOSYS, so glibc falls back
/// to clone, whose flags the launcher's allowlist checks (threads only).
fn clone3_enosys() -> Result<SeccompFilter, seccompiler::BackendError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = [(libc::SYS_clone3, vec![])].into_iter().collect();
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        target_arch(),
    )
}

type Job = Box<dyn FnOnce() + Send>;

/// One VM's filters and its worker launcher. Threads that entered the policy ([`Policy::enter`]) start
/// their threads through [`spawn_filtered`].
pub struct Policy {
    filters: Filters,
    launcher: Sender<Job>,
}

thread_local! {
    /// The policy the calling thread runs under, if any.
    static CURRENT: RefCell<Option<Arc<Policy>>> = const { RefCell::new(None) };
}

impl Policy {
    /// Compiles the filters and starts the launcher thread (filtered); `None` when `mode` is off.
    pub fn start(mode: SeccompMode) -> Result<Option<Arc<Self>>, SeccompError> {
        let Some(filters) = Filters::build(mode)? else {
            return Ok(None);
        };
        let (launcher, jobs) = channel::<Job>();
        let policy = Arc::new(Self { filters, launcher });
        let (ready_tx, ready_rx) = sync_channel(1);
        // The launcher holds no reference to the policy: it ends when the last one (and so the sender) goes.
        let programs = policy.filters.programs(ThreadKind::Launcher).to_vec();
        std::thread::Builder::new()
            .name("capsa-launcher".into())
            .spawn(move || {
                let installed = programs.iter().try_for_each(|p| {
                    seccompiler::apply_filter(p).map_err(|source| SeccompError::Install {
                        kind: ThreadKind::Launcher,
                        source,
                    })
                });
                let ok = installed.is_ok();
                let _ = ready_tx.send(installed);
                if !ok {
                    return;
                }
                while let Ok(job) = jobs.recv() {
                    job();
                }
            })
            .map_err(SeccompError::Launcher)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Some(policy)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SeccompError::Launcher(io::Error::other(
                "the launcher thread ended during start",
            ))),
        }
    }

    pub fn mode(&self) -> SeccompMode {
        self.filters.mode()
    }

    /// Installs `kind`'s filter on the calling thread; threads it starts with [`spawn_filtered`] then go
    /// through the launcher.
    pub fn enter(self: &Arc<Self>, kind: ThreadKind) -> Result<(), SeccompError> {
        self.filters.apply(kind)?;
        CURRENT.with(|c| *c.borrow_mut() = Some(self.clone()));
        tracing::debug!(?kind, mode = %self.mode(), "seccomp filter installed");
        Ok(())
    }
}

/// Starts thread `name` running `f` under `kind`'s filter when the calling thread runs under a policy
/// (through the launcher, so the new thread does not inherit the caller's filter); otherwise a plain thread
/// (seccomp off, or device tests without a VM).
pub fn spawn_filtered<T, F>(name: &str, kind: ThreadKind, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let builder = std::thread::Builder::new().name(name.to_string());
    let Some(policy) = CURRENT.with(|c| c.borrow().clone()) else {
        return builder.spawn(f);
    };
    let (reply_tx, reply_rx) = sync_channel(1);
    let theirs = policy.clone();
    let job: Job = Box::new(move || {
        let spawned = builder.spawn(move || {
            if let Err(e) = theirs.enter(kind) {
                // Running unfiltered is not an option: this thread would serve the guest.
                tracing::error!(error = %e, "seccomp: a device worker cannot install its filter; aborting");
                std::process::abort();
            }
            f()
        });
        let _ = reply_tx.send(spawned);
    });
    policy
        .launcher
        .send(job)
        .map_err(|_| io::Error::other("the seccomp worker launcher is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the seccomp worker launcher did not answer"))?
}
