//! virtio-fs (device type 26) served by a vhost-user backend (virtiofsd): the VMM is the vhost-user
//! frontend. It owns the config space (tag + number of request queues) and the transport; the backend maps
//! guest memory (which must be a shared memfd, see `crate::memory`) and serves the queues itself: the guest's
//! kicks go straight from the transport's ioeventfds to the backend, and the backend's "used" notifications
//! come back on one call eventfd per queue, which a small thread turns into virtio-mmio interrupts (the
//! InterruptStatus bit has to be set, so the call eventfd cannot be the irqfd itself).
//!
//! Queues: 0 = high priority, 1..=N = requests. Connection and feature negotiation happen in [`Fs::new`]
//! (so a missing backend is a start-up error); the memory table and rings are sent on activation. If the
//! backend goes away while the VM runs, the device logs it and stops; the VM keeps running.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::worker::{ThreadKind, Worker};
use super::{ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::config::{FsConfig, FS_TAG_MAX_LEN};
use crate::devices::GuestMemoryMmap;

/// virtio device ID of the file system device.
pub const VIRTIO_ID_FS: u32 = 26;
/// Size of the config space: `tag[36]` + `num_request_queues` (le32).
pub const CONFIG_SPACE_SIZE: usize = FS_TAG_MAX_LEN + 4;

/// vhost-user's own feature bit: the backend speaks protocol features (GET/SET_PROTOCOL_FEATURES).
const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// Virtio features passed from the backend to the driver (the rest are not ours to offer).
const PASSED_FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX);
/// How long one control message to the backend may take before the device gives up.
const BACKEND_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("cannot connect to the vhost-user backend at {path}: {source} (is virtiofsd listening there?)")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("vhost-user backend at {path}: {what}: {source}")]
    Protocol {
        path: String,
        what: &'static str,
        source: vhost::Error,
    },
    #[error("vhost-user backend at {path} does not offer VIRTIO_F_VERSION_1")]
    NotModern { path: String },
    #[error("vhost-user backend at {path} serves {supported} queues, {wanted} configured")]
    TooManyQueues {
        path: String,
        supported: u64,
        wanted: usize,
    },
    #[error("cannot set up the vhost-user socket: {0}")]
    Socket(std::io::Error),
}

/// Connects to the backend, retrying briefly while it has bound its socket but not yet listens.
fn connect(path: &Path) -> std::io::Result<UnixStream> {
    let mut tries = 0;
    loop {
        match UnixStream::connect(path) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && tries < 20 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(25));
            }
            other => return other,
        }
    }
}

/// The virtio-fs config space for `tag` and `request_queues`.
pub fn config_space(tag: &str, request_queues: u32) -> [u8; CONFIG_SPACE_SIZE] {
    let mut config = [0u8; CONFIG_SPACE_SIZE];
    let bytes = tag.as_bytes();
    let n = bytes.len().min(FS_TAG_MAX_LEN);
    config[..n].copy_from_slice(&bytes[..n]);
    config[FS_TAG_MAX_LEN..].copy_from_slice(&request_queues.to_le_bytes());
    config
}

/// A virtio-fs device whose queues a vhost-user backend serves.
pub struct Fs {
    tag: String,
    socket: PathBuf,
    config: [u8; CONFIG_SPACE_SIZE],
    queue_sizes: Vec<u16>,
    frontend: Frontend,
    /// Features the backend offered (GET_FEATURES).
    backend_features: u64,
    acked_features: u64,
    active: Option<Active>,
}

/// What a running device holds: the interrupt forwarder and which rings the backend runs.
struct Active {
    worker: Worker<()>,
    started: Vec<usize>,
}

impl Fs {
    /// Connects to the backend at `config.socket` and negotiates what can be before the guest driver runs.
    pub fn new(config: &FsConfig) -> Result<Self, FsError> {
        let path = config.socket.display().to_string();
        let num_queues = 1 + usize::from(config.queues);
        let stream = connect(&config.socket).map_err(|source| FsError::Connect {
            path: path.clone(),
            source,
        })?;
        stream
            .set_read_timeout(Some(BACKEND_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(BACKEND_TIMEOUT)))
            .map_err(FsError::Socket)?;
        let mut frontend = Frontend::from_stream(stream, num_queues as u64);
        let proto = |what: &'static str| {
            let path = path.clone();
            move |source: vhost::Error| FsError::Protocol { path, what, source }
        };

        frontend.set_owner().map_err(proto("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(proto("GET_FEATURES"))?;
        if backend_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(FsError::NotModern { path });
        }
        let mut protocol_features = VhostUserProtocolFeatures::empty();
        if backend_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES) != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(proto("GET_PROTOCOL_FEATURES"))?;
            protocol_features =
                offered & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK);
            frontend
                .set_protocol_features(protocol_features)
                .map_err(proto("SET_PROTOCOL_FEATURES"))?;
            if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every request without a reply of its own gets an ack, so backend errors surface here.
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
                let supported = frontend.get_queue_num().map_err(proto("GET_QUEUE_NUM"))?;
                if supported < num_queues as u64 {
                    return Err(FsError::TooManyQueues {
                        path,
                        supported,
                        wanted: num_queues,
                    });
                }
            }
        }
        tracing::debug!(
            tag = config.tag,
            backend_features = format_args!("{backend_features:#x}"),
            protocol_features = format_args!("{:#x}", protocol_features.bits()),
            "virtio-fs: connected to the vhost-user backend"
        );
        Ok(Self {
            tag: config.tag.clone(),
            socket: config.socket.clone(),
            config: config_space(&config.tag, u32::from(config.queues)),
            queue_sizes: vec![config.queue_size; num_queues],
            frontend,
            backend_features,
            acked_features: 0,
            active: None,
        })
    }

    /// The tag the guest mounts.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The backend's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn uses_protocol_features(&self) -> bool {
        self.backend_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES) != 0
    }

    /// Sends features, memory table and rings; returns the call eventfds of the started rings.
    fn start_backend(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &[(Queue, EventFd)],
        started: &mut Vec<usize>,
    ) -> Result<Vec<(usize, EventFd)>, String> {
        let err = |what: &str| {
            let what = what.to_string();
            move |e: vhost::Error| format!("{what}: {e}")
        };
        let mut features = self.acked_features;
        if self.uses_protocol_features() {
            features |= 1 << VHOST_USER_F_PROTOCOL_FEATURES;
        }
        self.frontend
            .set_features(features)
            .map_err(err("SET_FEATURES"))?;

        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("guest memory is not shared with the backend (no memfd): {e}"))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(err("SET_MEM_TABLE"))?;

        let mut calls = Vec::new();
        for (index, (queue, kick)) in queues.iter().enumerate() {
            if !queue.ready() {
                continue;
            }
            let host = |addr: u64, what: &str| {
                mem.get_host_address(GuestAddress(addr))
                    .map(|p| p as u64)
                    .map_err(|e| format!("queue {index} {what} {addr:#x}: {e}"))
            };
            let vring = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: host(queue.desc_table(), "descriptor table")?,
                used_ring_addr: host(queue.used_ring(), "used ring")?,
                avail_ring_addr: host(queue.avail_ring(), "available ring")?,
                log_addr: None,
            };
            let call = EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
            self.frontend
                .set_vring_num(index, queue.size())
                .map_err(err("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(index, &vring)
                .map_err(err("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(index, queue.next_avail())
                .map_err(err("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(index, &call)
                .map_err(err("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(index, kick)
                .map_err(err("SET_VRING_KICK"))?;
            started.push(index);
            if self.uses_protocol_features() {
                // With protocol features, rings start disabled.
                self.frontend
                    .set_vring_enable(index, true)
                    .map_err(err("SET_VRING_ENABLE"))?;
            }
            calls.push((index, call));
        }
        Ok(calls)
    }

    /// Stops the backend's rings (GET_VRING_BASE stops a ring); errors are logged.
    fn stop_backend(&mut self, started: &[usize]) {
        for &index in started {
            if self.uses_protocol_features() {
                if let Err(e) = self.frontend.set_vring_enable(index, false) {
                    tracing::warn!(tag = self.tag, index, error = %e, "virtio-fs: cannot disable ring");
                }
            }
            if let Err(e) = self.frontend.get_vring_base(index) {
                tracing::warn!(tag = self.tag, index, error = %e, "virtio-fs: cannot stop ring");
            }
        }
    }
}

/// Forwards the backend's call eventfds to the virtio interrupt until `kill` fires or the backend hangs up.
fn forward_interrupts(
    kill: EventFd,
    calls: Vec<(usize, EventFd)>,
    backend: RawFd,
    interrupt: Arc<VirtioInterrupt>,
    tag: String,
) {
    const KILL: u64 = u64::MAX;
    const BACKEND: u64 = u64::MAX - 1;
    let setup = || -> std::io::Result<Epoll> {
        let ep = Epoll::new()?;
        ep.ctl(
            ControlOperation::Add,
            kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, KILL),
        )?;
        // Only hang-ups: replies to control messages are not ours to read.
        ep.ctl(
            ControlOperation::Add,
            backend,
            EpollEvent::new(EventSet::READ_HANG_UP | EventSet::HANG_UP, BACKEND),
        )?;
        for (i, (_, call)) in calls.iter().enumerate() {
            ep.ctl(
                ControlOperation::Add,
                call.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        Ok(ep)
    };
    let epoll = match setup() {
        Ok(ep) => ep,
        Err(e) => {
            tracing::error!(tag, error = %e, "virtio-fs: cannot set up the interrupt thread; device stops");
            return;
        }
    };
    let mut events = vec![EpollEvent::default(); calls.len() + 2];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(tag, error = %e, "virtio-fs: epoll failed; device stops");
                return;
            }
        };
        let mut signal = false;
        for ev in &events[..n] {
            match ev.data() {
                KILL => return,
                BACKEND => {
                    tracing::error!(
                        tag,
                        "virtio-fs: the vhost-user backend closed its connection (virtiofsd died?); \
                         the file system stops responding, the VM keeps running"
                    );
                    return;
                }
                i => {
                    if let Some((_, call)) = calls.get(i as usize) {
                        // Non-blocking: EAGAIN just means another wake-up already drained it.
                        let _ = call.read();
                        signal = true;
                    }
                }
            }
        }
        if signal {
            if let Err(e) = interrupt.signal_used_queue() {
                tracing::warn!(tag, error = %e, "virtio-fs: cannot raise the interrupt");
            }
        }
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.backend_features & PASSED_FEATURES
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        crate::guest_warn!(
            tag = self.tag,
            offset,
            len = data.len(),
            "virtio-fs: config space is read-only; write ignored"
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<(Queue, EventFd)>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != self.queue_sizes.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_sizes.len(),
                actual: queues.len(),
            });
        }
        let mut started = Vec::new();
        let calls = match self.start_backend(&mem, &queues, &mut started) {
            Ok(calls) => calls,
            Err(e) => {
                self.stop_backend(&started);
                return Err(ActivateError::Backend(format!(
                    "virtio-fs {} (backend {}): {e}",
                    self.tag,
                    self.socket.display()
                )));
            }
        };
        let backend = self.frontend.as_raw_fd();
        let tag = self.tag.clone();
        let worker = Worker::spawn(
            &format!("capsa-fs-{}", self.tag),
            ThreadKind::Fs,
            move |kill| forward_interrupts(kill, calls, backend, interrupt, tag),
        );
        match worker {
            Ok(worker) => {
                tracing::info!(
                    tag = self.tag,
                    rings = started.len(),
                    "virtio-fs: backend serving"
                );
                self.active = Some(Active { worker, started });
                Ok(())
            }
            Err(e) => {
                self.stop_backend(&started);
                Err(ActivateError::Worker(e))
            }
        }
    }

    fn reset(&mut self) -> bool {
        if let Some(active) = self.active.take() {
            active.worker.stop();
            self.stop_backend(&active.started);
        }
        self.acked_features = 0;
        true
    }
}

/// The configured virtio-fs devices, in order (after the devices of `virtio_wiring::create_devices`).
pub fn create_devices(
    config: &crate::config::VmConfig,
) -> Result<Vec<crate::virtio_wiring::NamedDevice>, crate::vmm::Error> {
    let mut devices: Vec<crate::virtio_wiring::NamedDevice> = Vec::with_capacity(config.fs.len());
    for fs in &config.fs {
        let name = format!("fs {} ({})", fs.tag, fs.socket.display());
        let dev = Fs::new(fs).map_err(|e| crate::vmm::Error::Device {
            name: name.clone(),
            reason: e.to_string(),
        })?;
        devices.push((name, Box::new(dev)));
    }
    Ok(devices)
}

impl Drop for Fs {
    fn drop(&mut self) {
        // Stop the interrupt thread before the socket it watches closes.
        if let Some(active) = self.active.take() {
            active.worker.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_layout() {
        let c = config_space("rootfs", 1);
        assert_eq!(c.len(), 40);
        assert_eq!(&c[..6], b"rootfs");
        assert!(c[6..36].iter().all(|&b| b == 0));
        assert_eq!(&c[36..], &1u32.to_le_bytes());
        let full = "x".repeat(36);
        let c = config_space(&full, 4);
        assert_eq!(&c[..36], full.as_bytes());
        assert_eq!(u32::from_le_bytes([c[36], c[37], c[38], c[39]]), 4);
    }

    #[test]
    fn missing_backend_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let config = FsConfig {
            tag: "t".into(),
            socket: dir.path().join("nobody.sock"),
            queues: 1,
            queue_size: 1024,
        };
        let err = Fs::new(&config).err().expect("no backend").to_string();
        assert!(err.contains("nobody.sock"), "{err}");
        assert!(err.contains("virtiofsd"), "{err}");
    }

    #[test]
    fn backend_that_hangs_up_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fs.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            drop(s);
        });
        let config = FsConfig {
            tag: "t".into(),
            socket: path,
            queues: 1,
            queue_size: 1024,
        };
        let err = Fs::new(&config).err().expect("backend hung up").to_string();
        assert!(err.contains("fs.sock"), "{err}");
        t.join().unwrap();
    }
}
