//! virtio-rng (device type 4): fills device-writable buffers with bytes from the host's `/dev/urandom`.

use std::fs::File;
use std::io::Read;
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::chain::{Chain, DeviceQueue, RawChain};
use super::worker::{serve_queue, ThreadKind, Worker};
use super::{single_queue, ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::devices::GuestMemoryMmap;

/// virtio device ID of the entropy device.
pub const VIRTIO_ID_RNG: u32 = 4;
const QUEUE_SIZES: [u16; 1] = [256];
/// Most bytes handed out per request.
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("cannot open /dev/urandom: {0}")]
    Open(#[source] std::io::Error),
}

pub struct Rng {
    source: File,
    acked_features: u64,
    worker: Option<Worker<()>>,
}

impl Rng {
    pub fn new() -> Result<Self, RngError> {
        let source = File::open("/dev/urandom").map_err(RngError::Open)?;
        Ok(Self {
            source,
            acked_features: 0,
            worker: None,
        })
    }
}

/// Serve one request; returns the number of bytes written.
fn fill(source: &mut File, buf: &mut [u8], mem: &GuestMemoryMmap, chain: RawChain) -> u32 {
    let chain = match Chain::parse(mem, chain, u64::from(u32::MAX)) {
        Ok(c) => c,
        Err(e) => {
            crate::guest_warn!(error = %e, "rng: bad descriptor chain");
            return 0;
        }
    };
    if !chain.readable.is_empty() {
        crate::guest_warn!(
            head = chain.head,
            "rng: request has device-readable descriptors"
        );
        return 0;
    }
    let n = (chain.writable.len() as usize)
        .min(MAX_BYTES_PER_REQUEST)
        .min(buf.len());
    let buf = &mut buf[..n];
    if let Err(e) = source.read_exact(buf) {
        crate::guest_error!(error = %e, "rng: cannot read host entropy");
        return 0;
    }
    match chain.writable.cursor().write(mem, buf) {
        Ok(w) => w as u32,
        Err(e) => {
            crate::guest_warn!(error = %e, "rng: cannot write guest buffer");
            0
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        crate::guest_warn!(offset, "rng: guest write to config space ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<(Queue, EventFd)>,
    ) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let (queue, event) = single_queue(queues)?;
        let mut source = self.source.try_clone()?;
        let queue = DeviceQueue::new(queue, event).with_features(self.acked_features);
        self.worker = Some(Worker::spawn("capsa-rng", ThreadKind::Rng, move |kill| {
            let mut buf = vec![0u8; MAX_BYTES_PER_REQUEST];
            serve_queue(kill, queue, mem, interrupt, "rng", |mem, chain| {
                fill(&mut source, &mut buf, mem, chain)
            })
        })?);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        self.acked_features = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use vm_memory::ByteValued;

    use super::*;
    use crate::devices::virtio::test_utils::*;

    const T: Duration = Duration::from_secs(5);

    fn setup(mem: &GuestMemoryMmap) -> (Rng, TestQueue<'_>, Arc<VirtioInterrupt>) {
        let mut dev = Rng::new().unwrap();
        let q = TestQueue::new(mem, 0, 256);
        let irq = Arc::new(VirtioInterrupt::new().unwrap());
        dev.activate(mem.clone(), irq.clone(), vec![q.device_side()])
            .unwrap();
        (dev, q, irq)
    }

    #[test]
    fn identity() {
        let dev = Rng::new().unwrap();
        assert_eq!(dev.device_type(), 4);
        assert_eq!(dev.queue_max_sizes(), &[256]);
        assert_eq!(dev.avail_features(), 1 << VIRTIO_F_VERSION_1);
    }

    #[test]
    fn fills_buffers_across_descriptors() {
        let mem = test_mem();
        let (_dev, mut q, irq) = setup(&mem);
        let mut b = Bump::new();
        let (a1, a2) = (b.alloc(100), b.alloc(300));
        let head = q.add(&[(a1, 100, true), (a2, 300, true)]);
        assert_eq!(q.wait_used(T), Some((u32::from(head), 400)));
        let d1 = read_bytes(&mem, a1, 100);
        let d2 = read_bytes(&mem, a2, 300);
        // 400 random bytes are not all zero (probability 2^-3200).
        assert!(d1.iter().chain(d2.iter()).any(|&x| x != 0));
        assert_ne!(
            irq.status() & crate::devices::virtio::VIRTIO_MMIO_INT_VRING,
            0
        );
        // Two requests get different bytes.
        let a3 = b.alloc(64);
        q.add(&[(a3, 64, true)]);
        q.wait_used(T).unwrap();
        assert_ne!(read_bytes(&mem, a3, 64), d1[..64]);
    }

    #[test]
    fn large_request_is_capped() {
        let mem = test_mem();
        let (_dev, mut q, _) = setup(&mem);
        let a = Bump::new().alloc(1 << 20);
        let head = q.add(&[(a, 1 << 20, true)]);
        assert_eq!(
            q.wait_used(T),
            Some((u32::from(head), MAX_BYTES_PER_REQUEST as u32))
        );
        // Nothing past the cap was touched.
        assert!(read_bytes(&mem, a + MAX_BYTES_PER_REQUEST as u64, 4096)
            .iter()
            .all(|&x| x == 0));
    }

    #[test]
    fn hostile_chains_get_zero_length() {
        let mem = test_mem();
        let (_dev, mut q, _) = setup(&mem);
        let a = Bump::new().alloc(4096);
        // Device-readable buffer: nothing written.
        let h = q.add(&[(a, 64, false)]);
        assert_eq!(q.wait_used(T), Some((u32::from(h), 0)));
        assert!(read_bytes(&mem, a, 64).iter().all(|&x| x == 0));
        // Outside guest memory, and straddling its end.
        let h = q.add(&[(MEM_SIZE as u64 + 4096, 64, true)]);
        assert_eq!(q.wait_used(T), Some((u32::from(h), 0)));
        let h = q.add(&[(MEM_SIZE as u64 - 16, 64, true)]);
        assert_eq!(q.wait_used(T), Some((u32::from(h), 0)));
        // Looping chain.
        let first = q.reserve(2);
        q.store(first, a, 16, 1 | 2, first + 1);
        q.store(first + 1, a + 16, 16, 1 | 2, first);
        q.publish(first);
        q.kick();
        assert_eq!(q.wait_used(T), Some((u32::from(first), 0)));
        // Still serving.
        let h = q.add(&[(a, 32, true)]);
        assert_eq!(q.wait_used(T), Some((u32::from(h), 32)));
    }

    #[test]
    fn bad_available_index_does_not_hang() {
        let mem = test_mem();
        let (mut dev, q, _) = setup(&mem);
        // The driver claims 1000 new chains in a queue of 256.
        q.mock.avail().idx().store(1000);
        q.kick();
        std::thread::sleep(Duration::from_millis(50));
        assert!(dev.reset(), "worker still responsive");
    }

    #[test]
    fn indirect_and_overlong_chains_are_refused_and_the_device_keeps_serving() {
        let mem = test_mem();
        // A queue larger than the chain cap, so that the cap, not the queue size, refuses the long chain.
        let mut dev = Rng::new().unwrap();
        let mut q = TestQueue::new(&mem, 0, 512);
        let irq = Arc::new(VirtioInterrupt::new().unwrap());
        dev.activate(mem.clone(), irq, vec![q.device_side()])
            .unwrap();
        let mut b = Bump::new();
        let (table, buf) = (b.alloc(16), b.alloc(4096));
        // An indirect chain (the feature is not even offered): refused, the buffer untouched.
        write_bytes(
            &mem,
            table,
            RawDescriptor::from(SplitDescriptor::new(buf, 64, 2, 0)).as_slice(),
        );
        let head = q.reserve(1);
        q.store(head, table, 16, 4, 0);
        q.publish(head);
        q.kick();
        assert_eq!(q.wait_used(T), Some((u32::from(head), 0)));
        assert!(read_bytes(&mem, buf, 64).iter().all(|&x| x == 0));
        // One descriptor more than the cap: refused, nothing written.
        let n = usize::from(crate::devices::virtio::chain::MAX_CHAIN_DESCRIPTORS);
        let head = q.add(&vec![(buf, 8, true); n + 1]);
        assert_eq!(q.wait_used(T), Some((u32::from(head), 0)));
        assert!(read_bytes(&mem, buf, 64).iter().all(|&x| x == 0));
        // At the cap: served.
        let head = q.add(&vec![(buf, 8, true); n]);
        assert_eq!(q.wait_used(T), Some((u32::from(head), 8 * n as u32)));
        // And a plain request after all that.
        let head = q.add(&[(buf + 1024, 32, true)]);
        assert_eq!(q.wait_used(T), Some((u32::from(head), 32)));
        assert!(read_bytes(&mem, buf + 1024, 32).iter().any(|&x| x != 0));
    }
}
