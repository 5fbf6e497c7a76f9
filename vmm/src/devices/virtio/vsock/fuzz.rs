//! The vsock worker's queue processing, driven synchronously by the fuzz targets in fuzz/ (feature
//! `fuzzing`): the same `VsockWorker` and `Muxer` as `activate` builds, stepped without a thread.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::Queue;
use vmm_sys_util::epoll::EpollEvent;
use vmm_sys_util::eventfd::EventFd;

use super::muxer::{self, Muxer};
use super::{
    bind_listener, DeviceQueue, GuestMemoryMmap, VirtioInterrupt, VsockWorker, QUEUE_SIZES,
    TOKEN_QUEUE_BASE,
};

pub struct VsockHarness {
    worker: VsockWorker,
    /// Never signalled: the worker's between-chains stop check reads it.
    kill: EventFd,
    uds_path: PathBuf,
}

impl VsockHarness {
    /// A worker for guest `cid` listening on `uds_path` (host ports are `<uds_path>_<port>`), serving the
    /// rx, tx and event queues in `queues`.
    pub fn new(
        cid: u64,
        uds_path: &Path,
        mem: GuestMemoryMmap,
        queues: Vec<(Queue, EventFd)>,
    ) -> io::Result<Self> {
        if queues.len() != QUEUE_SIZES.len() {
            return Err(io::Error::other("vsock needs rx, tx and event queues"));
        }
        let listener = bind_listener(uds_path).map_err(io::Error::other)?;
        let epoll = vmm_sys_util::epoll::Epoll::new()?;
        let muxer = Muxer::new(
            cid,
            uds_path.to_path_buf(),
            listener,
            epoll,
            super::connection::HostBuffered::default(),
        )?;
        Ok(Self {
            worker: VsockWorker::new(
                mem,
                Arc::new(VirtioInterrupt::new()?),
                queues
                    .into_iter()
                    .map(|(q, e)| DeviceQueue::new(q, e))
                    .collect(),
                muxer,
                super::MAX_HOST_BUFFERED,
            ),
            kill: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?,
            uds_path: uds_path.to_path_buf(),
        })
    }

    /// One turn of the worker loop that never blocks: guest tx packets, rx buffers, deadlines, then the
    /// host-side events (listener, connections) that are ready now.
    pub fn step(&mut self) {
        let w = &mut self.worker;
        let kill = &self.kill;
        let _ = w.process_tx(kill);
        let _ = w.process_rx(kill);
        let _ = w.muxer.check_deadlines(Instant::now());
        for q in &mut w.queues {
            q.notify(&w.mem, &w.interrupt);
        }
        let mut events = [EpollEvent::default(); 16];
        let n = w.muxer.epoll().wait(0, &mut events).unwrap_or(0);
        for ev in &events[..n] {
            match ev.data() {
                t @ TOKEN_QUEUE_BASE..=3 => {
                    if let Some(q) = w.queues.get((t - TOKEN_QUEUE_BASE) as usize) {
                        q.drain_event();
                    }
                }
                muxer::TOKEN_LISTENER => w.muxer.accept_all(),
                t => w.muxer.on_connection_event(t, ev.event_set()),
            }
        }
        let _ = w.process_tx(kill);
        let _ = w.process_rx(kill);
    }

    /// The interrupt status the worker raised (bit 0: used buffers).
    pub fn interrupt_status(&self) -> u32 {
        self.worker.interrupt.status()
    }
}

impl Drop for VsockHarness {
    /// As [`super::Vsock`]'s drop: the socket file goes with the device.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}
