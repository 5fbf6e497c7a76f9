//! virtio-blk (device type 2) over a raw image file, read-only or read-write.
//!
//! Requests: IN (read), OUT (write), FLUSH (fdatasync), GET_ID; anything else is UNSUPP. A request that
//! reaches past the capacity, is not whole sectors, or writes a read-only disk gets IOERR. Data moves through
//! a bounded bounce buffer, so a request of any size costs at most `CHUNK` bytes of host memory.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::chain::{Chain, RawChain, Segments};
use super::worker::{serve_queue, ThreadKind, Worker};
use super::{single_queue, ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::devices::virtio::chain::DeviceQueue;
use crate::devices::GuestMemoryMmap;

/// virtio device ID of block devices.
pub const VIRTIO_ID_BLOCK: u32 = 2;
pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];

pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
pub const VIRTIO_BLK_F_RO: u32 = 5;
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Length of the GET_ID answer.
pub const ID_LEN: usize = 20;
/// The id of a disk nobody named.
pub const DEFAULT_ID: &str = "capsa-disk";

/// `id` NUL-padded (or cut) to the GET_ID answer's length.
fn id_bytes(id: &str) -> [u8; ID_LEN] {
    let mut out = [0u8; ID_LEN];
    let n = id.len().min(ID_LEN);
    out[..n].copy_from_slice(&id.as_bytes()[..n]);
    out
}

/// Request header: type u32, reserved u32, sector u64.
const HDR_LEN: usize = 16;
/// Bounce buffer size.
const CHUNK: usize = 128 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot stat disk image {path}: {source}")]
    Metadata {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct Block {
    file: File,
    read_only: bool,
    /// Size in sectors (a partial last sector is not exposed).
    capacity: u64,
    id: [u8; ID_LEN],
    config: [u8; 16],
    acked_features: u64,
    worker: Option<Worker<()>>,
}

impl Block {
    /// Open the raw image at `path`.
    pub fn new(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| BlockError::Metadata {
            path: path.to_path_buf(),
            source,
        })?;
        let capacity = meta.len() / SECTOR_SIZE;
        let mut config = [0u8; 16];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        // size_max (unused, feature not offered) then seg_max.
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        Ok(Self {
            file,
            read_only,
            capacity,
            id: id_bytes(DEFAULT_ID),
            config,
            acked_features: 0,
            worker: None,
        })
    }

    /// Set the id the guest reads with GET_ID (at most [`ID_LEN`] bytes are used). Nothing about the host
    /// file (path, device, inode) goes into it: the default is [`DEFAULT_ID`], the VMM passes `capsa-vdX`
    /// or the configured id.
    pub fn with_id(mut self, id: &str) -> Self {
        self.id = id_bytes(id);
        self
    }

    /// The GET_ID answer.
    pub fn id(&self) -> [u8; ID_LEN] {
        self.id
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
}

struct Disk {
    file: File,
    read_only: bool,
    capacity_bytes: u64,
    id: [u8; ID_LEN],
    buf: Vec<u8>,
}

impl Disk {
    /// Serve one request; returns the used length (bytes written to the guest, status included).
    fn handle(&mut self, mem: &GuestMemoryMmap, chain: RawChain) -> u32 {
        let chain = match Chain::parse(mem, chain, u64::from(u32::MAX)) {
            Ok(c) => c,
            Err(e) => {
                crate::guest_warn!(error = %e, "blk: bad descriptor chain");
                return 0;
            }
        };
        // The status byte is the last device-writable byte.
        let Some(status_addr) = chain
            .writable
            .len()
            .checked_sub(1)
            .and_then(|p| chain.writable.addr_of(p))
        else {
            crate::guest_warn!(head = chain.head, "blk: request without a status byte");
            return 0;
        };
        let (status, data_written) = self.execute(mem, &chain);
        if let Err(e) = mem.write_obj(status, status_addr) {
            crate::guest_warn!(error = %e, "blk: cannot write status");
            return 0;
        }
        data_written.saturating_add(1)
    }

    /// Returns the status and how many data bytes went to the guest.
    fn execute(&mut self, mem: &GuestMemoryMmap, chain: &Chain) -> (u8, u32) {
        let mut rd = chain.readable.cursor();
        let mut hdr = [0u8; HDR_LEN];
        match rd.read(mem, &mut hdr) {
            Ok(HDR_LEN) => {}
            _ => {
                crate::guest_warn!("blk: request header too short");
                return (VIRTIO_BLK_S_IOERR, 0);
            }
        }
        let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(s);
        // Device-writable bytes before the status byte.
        let out_room = chain.writable.len().saturating_sub(1);
        match req_type {
            VIRTIO_BLK_T_IN => {
                let Some(offset) = self.check_range(sector, out_room) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                match self.read_to_guest(mem, &chain.writable, offset, out_room) {
                    Ok(n) => (VIRTIO_BLK_S_OK, n),
                    Err(e) => {
                        crate::guest_warn!(error = %e, sector, "blk: read failed");
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let len = rd.remaining();
                let Some(offset) = self.check_range(sector, len) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                match self.write_from_guest(mem, rd, offset) {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(e) => {
                        crate::guest_warn!(error = %e, sector, "blk: write failed");
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.read_only {
                    return (VIRTIO_BLK_S_OK, 0);
                }
                match self.file.sync_data() {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(e) => {
                        crate::guest_warn!(error = %e, "blk: flush failed");
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = (out_room as usize).min(ID_LEN);
                match chain.writable.cursor().write(mem, &self.id[..n]) {
                    Ok(w) => (VIRTIO_BLK_S_OK, w as u32),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            other => {
                tracing::debug!(req_type = other, "blk: unsupported request");
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
        }
    }

    /// Byte offset of `sector` if `len` bytes from there are whole sectors inside the disk.
    fn check_range(&self, sector: u64, len: u64) -> Option<u64> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            crate::guest_warn!(len, "blk: request length is not whole sectors");
            return None;
        }
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(len)?;
        if end > self.capacity_bytes {
            crate::guest_warn!(sector, len, "blk: request beyond the end of the disk");
            return None;
        }
        Some(offset)
    }

    fn read_to_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        dst: &Segments,
        mut offset: u64,
        len: u64,
    ) -> std::io::Result<u32> {
        let mut cur = dst.cursor();
        let mut left = len;
        while left > 0 {
            let n = (left as usize).min(CHUNK);
            let buf = &mut self.buf[..n];
            self.file.read_exact_at(buf, offset)?;
            let w = cur.write(mem, buf).map_err(std::io::Error::other)?;
            if w != n {
                return Err(std::io::Error::other("guest buffer shorter than validated"));
            }
            offset += n as u64;
            left -= n as u64;
        }
        Ok(len as u32)
    }

    fn write_from_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        mut src: super::chain::Cursor<'_>,
        mut offset: u64,
    ) -> std::io::Result<()> {
        loop {
            let n = (src.remaining() as usize).min(CHUNK);
            if n == 0 {
                return Ok(());
            }
            let buf = &mut self.buf[..n];
            let r = src.read(mem, buf).map_err(std::io::Error::other)?;
            self.file.write_all_at(&buf[..r], offset)?;
            if r == 0 {
                return Ok(());
            }
            offset += r as u64;
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        let mut f =
            (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_FLUSH);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        crate::guest_warn!(offset, "blk: guest write to config space ignored");
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
        let mut disk = Disk {
            file: self.file.try_clone()?,
            read_only: self.read_only,
            capacity_bytes: self.capacity * SECTOR_SIZE,
            id: self.id,
            buf: vec![0u8; CHUNK],
        };
        let queue = DeviceQueue::new(queue, event).with_features(self.acked_features);
        self.worker = Some(Worker::spawn("capsa-blk", ThreadKind::Blk, move |kill| {
            serve_queue(kill, queue, mem, interrupt, "blk", |mem, chain| {
                disk.handle(mem, chain)
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
    use std::io::{Read, Seek, Write};
    use std::time::Duration;

    use super::*;
    use crate::devices::virtio::test_utils::*;

    const T: Duration = Duration::from_secs(5);
    const DISK_SECTORS: u64 = 64;

    fn image() -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..DISK_SECTORS * SECTOR_SIZE + 100)
            .map(|i| (i % 251) as u8)
            .collect();
        f.write_all(&data).unwrap();
        f
    }

    fn file_bytes(f: &tempfile::NamedTempFile, off: u64, len: usize) -> Vec<u8> {
        let mut h = File::open(f.path()).unwrap();
        h.seek(std::io::SeekFrom::Start(off)).unwrap();
        let mut v = vec![0u8; len];
        h.read_exact(&mut v).unwrap();
        v
    }

    fn header(t: u32, sector: u64) -> Vec<u8> {
        let mut h = t.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&sector.to_le_bytes());
        h
    }

    struct Drv<'a> {
        mem: &'a GuestMemoryMmap,
        q: TestQueue<'a>,
        bump: Bump,
    }

    impl Drv<'_> {
        fn hdr(&mut self, t: u32, sector: u64) -> u64 {
            let a = self.bump.alloc(16);
            write_bytes(self.mem, a, &header(t, sector));
            a
        }
        fn status_buf(&mut self) -> u64 {
            let a = self.bump.alloc(1);
            write_bytes(self.mem, a, &[0xee]);
            a
        }
        fn submit(&mut self, descs: &[Desc]) -> (u32, u32) {
            let head = self.q.add(descs);
            let u = self.q.wait_used(T).expect("request not completed");
            assert_eq!(u.0, u32::from(head));
            u
        }
        fn status(&self, a: u64) -> u8 {
            read_bytes(self.mem, a, 1)[0]
        }
    }

    fn setup<'a>(mem: &'a GuestMemoryMmap, path: &Path, ro: bool) -> (Block, Drv<'a>) {
        let mut dev = Block::new(path, ro).unwrap();
        let q = TestQueue::new(mem, 0, QUEUE_SIZE);
        let irq = Arc::new(VirtioInterrupt::new().unwrap());
        dev.activate(mem.clone(), irq, vec![q.device_side()])
            .unwrap();
        (
            dev,
            Drv {
                mem,
                q,
                bump: Bump::new(),
            },
        )
    }

    #[test]
    fn config_and_features() {
        let img = image();
        let dev = Block::new(img.path(), false).unwrap();
        assert_eq!(dev.device_type(), 2);
        let mut cap = [0u8; 8];
        dev.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
        let mut lo = [0u8; 4];
        dev.read_config(4, &mut lo);
        assert_eq!(lo, [0; 4]);
        let mut seg = [0u8; 4];
        dev.read_config(12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), 254);
        let f = dev.avail_features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_FLUSH), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        let ro = Block::new(img.path(), true).unwrap();
        assert_ne!(ro.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
        let mut past = [0xffu8; 4];
        dev.read_config(14, &mut past);
        assert_eq!(past, [0; 4]);
        assert!(matches!(
            Block::new(Path::new("/nonexistent/disk.img"), true),
            Err(BlockError::Open { .. })
        ));
    }

    #[test]
    fn read_write_flush_get_id() {
        let img = image();
        let mem = test_mem();
        let (_dev, mut d) = setup(&mem, img.path(), false);

        // IN: 3 sectors from sector 5 into two data descriptors.
        let h = d.hdr(VIRTIO_BLK_T_IN, 5);
        let (b1, b2) = (d.bump.alloc(512), d.bump.alloc(1024));
        let st = d.status_buf();
        let (_, len) = d.submit(&[
            (h, 16, false),
            (b1, 512, true),
            (b2, 1024, true),
            (st, 1, true),
        ]);
        assert_eq!(len, 1536 + 1);
        assert_eq!(d.status(st), VIRTIO_BLK_S_OK);
        let mut got = read_bytes(&mem, b1, 512);
        got.extend(read_bytes(&mem, b2, 1024));
        assert_eq!(got, file_bytes(&img, 5 * 512, 1536));

        // OUT: 2 sectors at sector 10.
        let h = d.hdr(VIRTIO_BLK_T_OUT, 10);
        let data: Vec<u8> = (0..1024u32).map(|i| (i * 3) as u8 ^ 0x5a).collect();
        let b = d.bump.alloc(1024);
        write_bytes(&mem, b, &data);
        let st = d.status_buf();
        let (_, len) = d.submit(&[(h, 16, false), (b, 1024, false), (st, 1, true)]);
        assert_eq!(len, 1);
        assert_eq!(d.status(st), VIRTIO_BLK_S_OK);
        assert_eq!(file_bytes(&img, 10 * 512, 1024), data);
        // Neighbours untouched.
        assert_eq!(
            file_bytes(&img, 9 * 512, 512),
            (9 * 512..10 * 512)
                .map(|i| (i % 251) as u8)
                .collect::<Vec<_>>()
        );

        // FLUSH.
        let h = d.hdr(VIRTIO_BLK_T_FLUSH, 0);
        let st = d.status_buf();
        assert_eq!(d.submit(&[(h, 16, false), (st, 1, true)]).1, 1);
        assert_eq!(d.status(st), VIRTIO_BLK_S_OK);

        // GET_ID.
        let h = d.hdr(VIRTIO_BLK_T_GET_ID, 0);
        let b = d.bump.alloc(20);
        let st = d.status_buf();
        assert_eq!(
            d.submit(&[(h, 16, false), (b, 20, true), (st, 1, true)]).1,
            21
        );
        assert_eq!(d.status(st), VIRTIO_BLK_S_OK);
        assert_eq!(read_bytes(&mem, b, 20), id_bytes(DEFAULT_ID));

        // Last sector is readable; the partial tail past it is not exposed.
        let h = d.hdr(VIRTIO_BLK_T_IN, DISK_SECTORS - 1);
        let b = d.bump.alloc(512);
        let st = d.status_buf();
        assert_eq!(
            d.submit(&[(h, 16, false), (b, 512, true), (st, 1, true)]).1,
            513
        );
        assert_eq!(d.status(st), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn bad_requests_get_error_status() {
        let img = image();
        let mem = test_mem();
        let (_dev, mut d) = setup(&mem, img.path(), false);
        let before = file_bytes(&img, 0, (DISK_SECTORS * SECTOR_SIZE) as usize);
        let cases: Vec<(u32, u64, u32, u8)> = vec![
            (VIRTIO_BLK_T_IN, DISK_SECTORS, 512, VIRTIO_BLK_S_IOERR), // past the end
            (VIRTIO_BLK_T_IN, DISK_SECTORS - 1, 1024, VIRTIO_BLK_S_IOERR), // straddles the end
            (VIRTIO_BLK_T_IN, u64::MAX, 512, VIRTIO_BLK_S_IOERR),     // sector * 512 overflows
            (VIRTIO_BLK_T_OUT, u64::MAX / 512, 1024, VIRTIO_BLK_S_IOERR), // end overflows
            (VIRTIO_BLK_T_OUT, 1, 100, VIRTIO_BLK_S_IOERR),           // not whole sectors
            (VIRTIO_BLK_T_IN, 1, 100, VIRTIO_BLK_S_IOERR),
            (77, 0, 512, VIRTIO_BLK_S_UNSUPP),
        ];
        for (t, sector, len, want) in cases {
            let h = d.hdr(t, sector);
            let b = d.bump.alloc(u64::from(len));
            let st = d.status_buf();
            let (_, used) = d.submit(&[
                (h, 16, false),
                (b, len, t != VIRTIO_BLK_T_OUT),
                (st, 1, true),
            ]);
            assert_eq!(d.status(st), want, "type {t} sector {sector} len {len}");
            assert_eq!(used, 1);
        }
        // Header too short.
        let h = d.bump.alloc(8);
        let st = d.status_buf();
        d.submit(&[(h, 8, false), (st, 1, true)]);
        assert_eq!(d.status(st), VIRTIO_BLK_S_IOERR);
        assert_eq!(file_bytes(&img, 0, before.len()), before);
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let img = image();
        let mem = test_mem();
        let (_dev, mut d) = setup(&mem, img.path(), true);
        let h = d.hdr(VIRTIO_BLK_T_OUT, 0);
        let b = d.bump.alloc(512);
        write_bytes(&mem, b, &[0xab; 512]);
        let st = d.status_buf();
        d.submit(&[(h, 16, false), (b, 512, false), (st, 1, true)]);
        assert_eq!(d.status(st), VIRTIO_BLK_S_IOERR);
        assert_eq!(
            file_bytes(&img, 0, 512),
            (0..512).map(|i| (i % 251) as u8).collect::<Vec<_>>()
        );
        // Reads and flushes work.
        let h = d.hdr(VIRTIO_BLK_T_FLUSH, 0);
        let st = d.status_buf();
        d.submit(&[(h, 16, false), (st, 1, true)]);
        assert_eq!(d.status(st), VIRTIO_BLK_S_OK);
        let h = d.hdr(VIRTIO_BLK_T_IN, 0);
        let st = d.status_buf();
        d.submit(&[(h, 16, false), (b, 512, true), (st, 1, true)]);
        assert_eq!(d.status(st), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn hostile_chains_are_used_without_touching_memory() {
        let img = image();
        let mem = test_mem();
        let (_dev, mut d) = setup(&mem, img.path(), false);
        // No device-writable byte for the status.
        let h = d.hdr(VIRTIO_BLK_T_IN, 0);
        assert_eq!(d.submit(&[(h, 16, false)]).1, 0);
        // Data descriptor outside guest memory.
        let h = d.hdr(VIRTIO_BLK_T_IN, 0);
        let st = d.status_buf();
        assert_eq!(
            d.submit(&[
                (h, 16, false),
                (MEM_SIZE as u64 - 256, 512, true),
                (st, 1, true)
            ])
            .1,
            0
        );
        assert_eq!(d.status(st), 0xee, "status untouched for an invalid chain");
        // Readable descriptor after a writable one.
        let h = d.hdr(VIRTIO_BLK_T_OUT, 0);
        let st = d.status_buf();
        let b = d.bump.alloc(512);
        assert_eq!(
            d.submit(&[(st, 1, true), (h, 16, false), (b, 512, false)])
                .1,
            0
        );
        // Looping chain.
        let first = d.q.reserve(2);
        let h = d.hdr(VIRTIO_BLK_T_IN, 0);
        d.q.store(first, h, 16, 1, first + 1);
        d.q.store(first + 1, b, 512, 1 | 2, first);
        d.q.publish(first);
        d.q.kick();
        assert_eq!(d.q.wait_used(T), Some((u32::from(first), 0)));
        // Huge length: refused by the memory check, no allocation of that size.
        let h = d.hdr(VIRTIO_BLK_T_IN, 0);
        let st = d.status_buf();
        assert_eq!(
            d.submit(&[(h, 16, false), (DATA_START, u32::MAX, true), (st, 1, true)])
                .1,
            0
        );
        // Still working.
        let h = d.hdr(VIRTIO_BLK_T_IN, 0);
        let st = d.status_buf();
        assert_eq!(
            d.submit(&[(h, 16, false), (b, 512, true), (st, 1, true)]).1,
            513
        );
        assert_eq!(d.status(st), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn large_request_through_bounce_buffer() {
        let mut img = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect();
        img.write_all(&data).unwrap();
        let mem = test_mem();
        let (_dev, mut d) = setup(&mem, img.path(), false);
        let h = d.hdr(VIRTIO_BLK_T_IN, 0);
        let b = d.bump.alloc(1 << 20);
        let st = d.status_buf();
        assert_eq!(
            d.submit(&[(h, 16, false), (b, 1 << 20, true), (st, 1, true)])
                .1,
            (1 << 20) + 1
        );
        assert_eq!(read_bytes(&mem, b, 1 << 20), data);
    }

    #[test]
    fn get_id_is_the_configured_id_and_never_the_inode() {
        use std::os::unix::fs::MetadataExt;
        let img = image();
        let meta = std::fs::metadata(img.path()).unwrap();
        let mem = test_mem();
        let mut dev = Block::new(img.path(), false).unwrap().with_id("rootfs-1");
        let q = TestQueue::new(&mem, 0, QUEUE_SIZE);
        let irq = Arc::new(VirtioInterrupt::new().unwrap());
        dev.activate(mem.clone(), irq, vec![q.device_side()])
            .unwrap();
        let mut d = Drv {
            mem: &mem,
            q,
            bump: Bump::new(),
        };
        let h = d.hdr(VIRTIO_BLK_T_GET_ID, 0);
        let b = d.bump.alloc(20);
        let st = d.status_buf();
        assert_eq!(
            d.submit(&[(h, 16, false), (b, 20, true), (st, 1, true)]).1,
            21
        );
        assert_eq!(d.status(st), VIRTIO_BLK_S_OK);
        let id = read_bytes(&mem, b, 20);
        assert_eq!(&id[..8], b"rootfs-1");
        assert!(id[8..].iter().all(|&x| x == 0));
        // Whatever the id, nothing of the host file is in it: not its inode, not its device.
        for dev_id in [
            Block::new(img.path(), true).unwrap().id(),
            dev.id(),
            Block::new(img.path(), true)
                .unwrap()
                .with_id("a-very-long-disk-id-cut-at-20")
                .id(),
        ] {
            let text = String::from_utf8_lossy(&dev_id).into_owned();
            for leak in [
                format!("{:x}", meta.ino()),
                meta.ino().to_string(),
                format!("{:x}{:x}", meta.dev(), meta.ino()),
            ] {
                assert!(!text.contains(&leak), "id {text:?} contains {leak}");
            }
        }
        assert_eq!(
            &Block::new(img.path(), true)
                .unwrap()
                .with_id("a-very-long-disk-id-cut-at-20")
                .id(),
            b"a-very-long-disk-id-"
        );
    }
}

/// The request handler of the worker, driven synchronously by the fuzz targets in fuzz/ (feature `fuzzing`).
#[cfg(feature = "fuzzing")]
pub(super) mod fuzz {
    use super::{Block, Disk, GuestMemoryMmap, RawChain, CHUNK, SECTOR_SIZE};

    /// What [`Block`]'s worker serves requests with, built as `activate` builds it.
    pub struct BlockHarness(Disk);

    impl BlockHarness {
        pub fn new(block: &Block) -> std::io::Result<Self> {
            Ok(Self(Disk {
                file: block.file.try_clone()?,
                read_only: block.read_only,
                capacity_bytes: block.capacity * SECTOR_SIZE,
                id: block.id,
                buf: vec![0u8; CHUNK],
            }))
        }

        /// Serve one request chain; returns the used length the worker would report.
        pub fn handle(&mut self, mem: &GuestMemoryMmap, chain: RawChain) -> u32 {
            self.0.handle(mem, chain)
        }
    }
}
