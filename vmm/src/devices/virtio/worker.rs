//! A device worker thread that can be stopped (driver reset, VMM exit) and hands its state back.

use std::io;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A running worker; `T` is what the thread returns when stopped.
pub struct Worker<T> {
    kill: EventFd,
    handle: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> Worker<T> {
    /// Start `f` on a new thread; it must return soon after the eventfd it gets becomes readable.
    pub fn spawn<F>(name: &str, f: F) -> io::Result<Self>
    where
        F: FnOnce(EventFd) -> T + Send + 'static,
    {
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let theirs = kill.try_clone()?;
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || f(theirs))?;
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
