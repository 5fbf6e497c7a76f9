//! Guest RAM: anonymous private memory, or one shared memfd (`MAP_SHARED`) when a vhost-user backend has to
//! map the same pages (virtio-fs through virtiofsd).

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress};

use crate::devices::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memfd_create: {0}")]
    Memfd(std::io::Error),
    #[error("cannot size the guest memory memfd to {size} bytes: {source}")]
    Truncate { size: u64, source: std::io::Error },
    #[error("{0}")]
    Mmap(#[from] vm_memory::mmap::FromRangesError),
}

/// Creates guest memory for `ranges` (sorted, non-overlapping). With `shared`, all ranges are consecutive
/// slices of one memfd mapped `MAP_SHARED`, so each region has a [`FileOffset`] a vhost-user backend can map.
pub fn create(
    ranges: &[(GuestAddress, usize)],
    shared: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    if !shared {
        return Ok(GuestMemoryMmap::from_ranges(ranges)?);
    }
    let total: u64 = ranges.iter().map(|r| r.1 as u64).sum();
    let file = Arc::new(memfd(c"capsa-guest-ram")?);
    file.set_len(total)
        .map_err(|source| MemoryError::Truncate {
            size: total,
            source,
        })?;
    let mut offset = 0u64;
    let mut with_files = Vec::with_capacity(ranges.len());
    for &(addr, len) in ranges {
        with_files.push((addr, len, Some(FileOffset::from_arc(file.clone(), offset))));
        offset += len as u64;
    }
    Ok(GuestMemoryMmap::from_ranges_with_files(with_files)?)
}

fn memfd(name: &std::ffi::CStr) -> Result<File, MemoryError> {
    // SAFETY: `name` is NUL-terminated; the returned descriptor is checked and then owned by the File.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn shared_memory_is_one_memfd_in_order() {
        let ranges = [
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x1_0000_0000), 0x20000),
        ];
        let mem = create(&ranges, true).unwrap();
        let regions: Vec<_> = mem.iter().collect();
        assert_eq!(regions.len(), 2);
        let f0 = regions[0].file_offset().unwrap();
        let f1 = regions[1].file_offset().unwrap();
        assert!(Arc::ptr_eq(f0.arc(), f1.arc()));
        assert_eq!((f0.start(), f1.start()), (0, 0x10000));
        assert_eq!(f0.file().metadata().unwrap().len(), 0x30000);
        // Writes through guest memory land in the file (MAP_SHARED).
        mem.write_obj(0xabcd_u32, GuestAddress(0x1_0000_0000))
            .unwrap();
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(f1.file(), &mut buf, 0x10000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xabcd);
    }

    #[test]
    fn private_memory_has_no_file() {
        let mem = create(&[(GuestAddress(0), 0x10000)], false).unwrap();
        assert!(mem.iter().all(|r| r.file_offset().is_none()));
    }
}
