//! A device worker thread that can be stopped (driver reset, VMM exit) and hands its state back.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::DescriptorChain;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::chain::DeviceQueue;
use super::VirtioInterrupt;
use crate::devices::GuestMemoryMmap;
pub use crate::seccomp::ThreadKind;

/// A running worker; `T` is what the thread returns when stopped.
pub struct Worker<T> {
    kill: EventFd,
    handle: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> Worker<T> {
    /// Start `f` on a new thread; it must return soon after the eventfd it gets becomes readable. The thread
    /// runs under `kind`'s seccomp filter when the VM has filters on (see `crate::seccomp`).
    pub fn spawn<F>(name: &str, kind: ThreadKind, f: F) -> io::Result<Self>
    where
        F: FnOnce(EventFd) -> T + Send + 'static,
    {
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let theirs = kill.try_clone()?;
        let handle = crate::seccomp::spawn_filtered(name, kind, move || f(theirs))?;
        Ok(Self {
            kill,
            handle: Some(handle),
        })
    }

    /// Stop the thread and return its result (None if it panicked).
    pub fn stop(mut self) -> Option<T> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Option<T> {
        let handle = self.handle.take()?;
        if let Err(e) = self.kill.write(1) {
            tracing::error!(error = %e, "virtio: cannot signal worker to stop");
        }
        match handle.join() {
            Ok(v) => Some(v),
            Err(_) => {
                tracing::error!("virtio: device worker panicked");
                None
            }
        }
    }
}

impl<T> Drop for Worker<T> {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = self.kill.write(1);
            let _ = handle.join();
        }
    }
}

/// The loop of a single-queue device: wait for a kick (or `kill`), hand every available chain to
/// `handle` (which returns the used length), return the chains and interrupt the driver.
pub fn serve_queue<F>(
    kill: EventFd,
    mut queue: DeviceQueue,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    name: &str,
    mut handle: F,
) where
    F: FnMut(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    const KILL: u64 = 0;
    const QUEUE: u64 = 1;
    let epoll = match Epoll::new().and_then(|ep| {
        ep.ctl(
            ControlOperation::Add,
            kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, KILL),
        )?;
        ep.ctl(
            ControlOperation::Add,
            queue.event.as_raw_fd(),
            EpollEvent::new(EventSet::IN, QUEUE),
        )?;
        Ok(ep)
    }) {
        Ok(ep) => ep,
        Err(e) => {
            tracing::error!(error = %e, device = name, "virtio: cannot set up worker epoll");
            return;
        }
    };
    let mut events = [EpollEvent::default(); 2];
    loop {
        // Chains may have been made available before the first kick.
        while let Some(chain) = queue.pop(&mem) {
            let head = chain.head_index();
            let len = handle(&mem, chain);
            queue.add_used(&mem, head, len);
        }
        queue.notify(&mem, &interrupt);
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, device = name, "virtio: epoll wait failed; worker stops");
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                KILL => return,
                _ => queue.drain_event(),
            }
        }
    }
}
