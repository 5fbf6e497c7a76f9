//! Guest RAM: anonymous private memory, or one shared memfd (`MAP_SHARED`) when a vhost-user backend has to
//! map the same pages (virtio-fs through virtiofsd).
//!
//! Every region is mapped at a host address aligned to 2 MiB and, when private, marked `MADV_HUGEPAGE`.
//! KVM can only map a guest page with a 2 MiB entry when the guest and host addresses agree modulo 2 MiB
//! and the host page is a huge page; a plain `mmap` gives an arbitrary 4 KiB-aligned address, so every 4 KiB
//! of RAM the guest touches would be its own nested page fault (one VM exit each, the costliest thing there
//! is when the host is itself nested). QEMU aligns its RAM the same way. The mappings live as long as the
//! process: one capsa-vmm process is one VM.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

use crate::devices::GuestMemoryMmap;

/// Host alignment of every guest RAM mapping: the x86 huge-page size.
pub const HOST_ALIGN: usize = 2 << 20;
/// Inaccessible page kept on each side of a guest RAM mapping.
const GUARD: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memfd_create: {0}")]
    Memfd(std::io::Error),
    #[error("cannot size the guest memory memfd to {size} bytes: {source}")]
    Truncate { size: u64, source: std::io::Error },
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Mmap { size: usize, source: std::io::Error },
    #[error("guest memory region: {0}")]
    Region(#[from] vm_memory::mmap::MmapRegionError),
    #[error("guest memory region at {0:#x} overflows the address space")]
    InvalidRegion(u64),
    #[error("guest memory layout: {0}")]
    Collection(#[from] vm_memory::GuestRegionCollectionError),
}

/// Creates guest memory for `ranges` (sorted, non-overlapping). With `shared`, all ranges are consecutive
/// slices of one memfd mapped `MAP_SHARED`, so each region has a [`FileOffset`] a vhost-user backend can map.
pub fn create(
    ranges: &[(GuestAddress, usize)],
    shared: bool,
) -> Result<GuestMemoryMmap, MemoryError> {
    let file = if shared {
        let total: u64 = ranges.iter().map(|r| r.1 as u64).sum();
        let file = Arc::new(memfd(c"capsa-guest-ram")?);
        file.set_len(total)
            .map_err(|source| MemoryError::Truncate {
                size: total,
                source,
            })?;
        Some(file)
    } else {
        None
    };
    let mut offset = 0u64;
    let mut regions = Vec::with_capacity(ranges.len());
    for &(addr, len) in ranges {
        let file_offset = file
            .as_ref()
            .map(|f| FileOffset::from_arc(f.clone(), offset));
        offset += len as u64;
        regions.push(aligned_region(addr, len, file_offset)?);
    }
    Ok(GuestMemoryMmap::from_regions(regions)?)
}

/// Maps `len` bytes (anonymous private, or `MAP_SHARED` from `file_offset`) at a [`HOST_ALIGN`]ed host
/// address, for guest address `addr`.
fn aligned_region(
    addr: GuestAddress,
    len: usize,
    file_offset: Option<FileOffset>,
) -> Result<GuestRegionMmap<()>, MemoryError> {
    let mmap_err = |size| MemoryError::Mmap {
        size,
        source: std::io::Error::last_os_error(),
    };
    // The reservation leaves room for the alignment and a PROT_NONE guard page on each side. The guards also
    // keep the next mapping the kernel places below the guest memory from ending on a 2 MiB boundary: a
    // 2 MiB thread stack there would be 2 MiB-aligned and, with THP "always", cost 2 MiB of RSS at once.
    let reserve_len = len
        .checked_add(HOST_ALIGN + 2 * GUARD)
        .ok_or(MemoryError::InvalidRegion(addr.0))?;
    // SAFETY: a fresh PROT_NONE reservation at an address of the kernel's choosing; nothing else uses it.
    let reserve = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve_len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if reserve == libc::MAP_FAILED {
        return Err(mmap_err(reserve_len));
    }
    let start = reserve as usize;
    let aligned = (start + GUARD).next_multiple_of(HOST_ALIGN);
    let (flags, fd, off) = match &file_offset {
        Some(f) => (libc::MAP_SHARED, f.file().as_raw_fd(), f.start()),
        None => (
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        ),
    };
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: [aligned, aligned + len) lies inside the reservation made above, which this function owns;
    // MAP_FIXED replaces that part of it and nothing else.
    let mapped = unsafe {
        libc::mmap(
            aligned as *mut libc::c_void,
            len,
            prot,
            flags | libc::MAP_FIXED,
            fd,
            off as libc::off_t,
        )
    };
    let result = if mapped == libc::MAP_FAILED {
        Err(mmap_err(len))
    } else {
        Ok(())
    };
    // Give back the reservation outside the mapping and its guard pages (all of it when the mapping failed).
    let (keep_from, keep_to) = match result {
        Ok(()) => (aligned - GUARD, aligned + len + GUARD),
        Err(_) => (start, start),
    };
    // SAFETY: both ranges are parts of the reservation above that no mapping we hand out covers.
    unsafe {
        if keep_from > start {
            libc::munmap(start as *mut libc::c_void, keep_from - start);
        }
        if start + reserve_len > keep_to {
            libc::munmap(keep_to as *mut libc::c_void, start + reserve_len - keep_to);
        }
    }
    result?;
    if file_offset.is_none() {
        // Best effort: THP may be off on this host, which only costs speed.
        // SAFETY: advice on the mapping made above.
        unsafe { libc::madvise(mapped, len, libc::MADV_HUGEPAGE) };
    }
    let mut builder = MmapRegionBuilder::<()>::new(len)
        .with_mmap_prot(prot)
        .with_mmap_flags(flags);
    if let Some(f) = file_offset {
        builder = builder.with_file_offset(f);
    }
    // SAFETY: `mapped` is a live, page-aligned mapping of exactly `len` bytes that is never unmapped.
    let region = unsafe { builder.with_raw_mmap_pointer(mapped.cast()) }.build()?;
    GuestRegionMmap::new(region, addr).ok_or(MemoryError::InvalidRegion(addr.0))
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
    fn every_region_is_huge_page_aligned_on_the_host() {
        let ranges = [
            (GuestAddress(0), 3 << 20),
            (GuestAddress(0x1_0000_0000), 0x20000),
        ];
        for shared in [false, true] {
            let mem = create(&ranges, shared).unwrap();
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
            let perms_at = |a: usize| {
                maps.lines().find_map(|l| {
                    let (range, rest) = l.split_once(' ')?;
                    let (lo, hi) = range.split_once('-')?;
                    let (lo, hi) = (
                        usize::from_str_radix(lo, 16).ok()?,
                        usize::from_str_radix(hi, 16).ok()?,
                    );
                    (lo..hi).contains(&a).then(|| rest[..4].to_string())
                })
            };
            for r in mem.iter() {
                let host = r.as_ptr() as usize;
                assert_eq!(host % HOST_ALIGN, 0, "shared={shared}: {host:#x}");
                let len = r.len() as usize;
                assert_eq!(
                    perms_at(host - GUARD).as_deref(),
                    Some("---p"),
                    "guard below"
                );
                assert_eq!(perms_at(host + len).as_deref(), Some("---p"), "guard above");
            }
            // The whole region is usable, to its last byte.
            mem.write_obj(0x5a_u8, GuestAddress((3 << 20) - 1)).unwrap();
            assert_eq!(
                mem.read_obj::<u8>(GuestAddress((3 << 20) - 1)).unwrap(),
                0x5a
            );
            assert!(mem.write_obj(0_u8, GuestAddress(3 << 20)).is_err());
        }
    }

    #[test]
    fn private_memory_has_no_file() {
        let mem = create(&[(GuestAddress(0), 0x10000)], false).unwrap();
        assert!(mem.iter().all(|r| r.file_offset().is_none()));
    }
}
