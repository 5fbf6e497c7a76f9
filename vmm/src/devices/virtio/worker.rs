//! A device worker thread that can be stopped (driver reset, VMM exit) and hands its state back.
//!
//! A worker checks for a stop between descriptor chains ([`stop_requested`]), not only when it waits, so a
//! reset or SIGTERM never waits for a whole batch the guest queued: at most for the chain in progress.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::chain::{DeviceQueue, RawChain};
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

/// Whether the worker has been told to stop (`kill` is the eventfd [`Worker::spawn`] hands it). Call it
/// between descriptor chains; once it returns true the worker must return (the signal is consumed).
pub fn stop_requested(kill: &EventFd) -> bool {
    matches!(kill.read(), Ok(n) if n > 0)
}

/// The loop of a single-queue device: wait for a kick (or `kill`), hand every available chain to
/// `handle` (which returns the used length), return the chains and interrupt the driver. A stop is
/// noticed between chains.
pub fn serve_queue<F>(
    kill: EventFd,
    mut queue: DeviceQueue,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    name: &str,
    mut handle: F,
) where
    F: FnMut(&GuestMemoryMmap, RawChain) -> u32,
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
        loop {
            if stop_requested(&kill) {
                return;
            }
            let Some(chain) = queue.pop(&mem) else {
                break;
            };
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::devices::virtio::test_utils::*;

    #[test]
    fn a_stop_is_noticed_between_chains_not_after_the_batch() {
        let mem = test_mem();
        let mut q = TestQueue::new(&mem, 0, 256);
        let mut bump = Bump::new();
        // A batch of 100 chains, each taking the handler 20 ms: 2 s in all.
        let heads: Vec<u16> = (0..100)
            .map(|_| q.add(&[(bump.alloc(64), 64, true)]))
            .collect();
        let (queue, event) = q.device_side();
        let queue = DeviceQueue::new(queue, event);
        let irq = Arc::new(VirtioInterrupt::new().unwrap());
        let handled = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(AtomicUsize::new(0));
        let (h, s) = (handled.clone(), started.clone());
        let dev_mem = mem.clone();
        let worker = Worker::spawn("test-worker", ThreadKind::Rng, move |kill| {
            serve_queue(kill, queue, dev_mem, irq, "test", |_, _| {
                s.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
                h.fetch_add(1, Ordering::SeqCst);
                7
            })
        })
        .unwrap();
        while started.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let t = Instant::now();
        assert!(worker.stop().is_some());
        let waited = t.elapsed();
        let done = handled.load(Ordering::SeqCst);
        // The chain in progress finishes; the batch does not.
        assert!(done < 10, "{done} chains handled after the stop");
        assert!(waited < Duration::from_millis(500), "stop took {waited:?}");
        // Only the handled chains were returned to the driver.
        let mut used = Vec::new();
        while let Some((id, len)) = q.next_used() {
            assert_eq!(len, 7);
            used.push(id);
        }
        assert_eq!(used.len(), done);
        assert_eq!(
            used,
            heads[..done]
                .iter()
                .map(|&h| u32::from(h))
                .collect::<Vec<_>>()
        );
    }
}
