//! Loading the guest kernel, initrd and command line, and the boot-protocol structures around them:
//! PVH (`hvm_start_info` + memory map) for an ELF vmlinux with a PVH note, the 64-bit boot protocol (zero page
//! with an e820 map) for a bzImage or an ELF without one.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::devices::GuestMemoryMmap;
use crate::layout::*;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;
/// Offset of `startup_64` from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const INITRD_ALIGN: u64 = 0x1000;
/// `initrd_addr_max` of boot protocols older than 2.03, which leave the field zero.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot load kernel {path}: {source}")]
    LoadKernel {
        path: String,
        source: linux_loader::loader::Error,
    },
    #[error("cannot read initrd {path}: {source}")]
    Initrd {
        path: String,
        source: std::io::Error,
    },
    #[error("initrd of {size} bytes does not fit in guest memory below {limit:#x} above the kernel end {kernel_end:#x}")]
    InitrdTooLarge {
        size: u64,
        limit: u64,
        kernel_end: u64,
    },
    #[error("kernel command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line must be printable ASCII")]
    CmdlineInvalid,
    #[error("too many memory map entries")]
    TooManyE820Entries,
    #[error("writing boot structures into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// How the first vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, paging off, `ebx` = `hvm_start_info`.
    Pvh,
    /// 64-bit boot protocol: long mode with identity-mapped page tables, `rsi` = zero page.
    Long64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryPoint {
    pub addr: u64,
    pub mode: EntryMode,
}

/// A loaded kernel that still needs its boot structures.
struct LoadedKernel {
    entry: EntryPoint,
    result: KernelLoaderResult,
}

fn load_kernel_image(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: shown.clone(),
        source,
    })?;
    let mut magic = [0u8; 4];
    let is_elf = file.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
    file.seek(SeekFrom::Start(0))
        .map_err(|source| BootError::OpenKernel {
            path: shown.clone(),
            source,
        })?;
    let load_err = |source| BootError::LoadKernel {
        path: shown.clone(),
        source,
    };
    if is_elf {
        let result = Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY_START)))
            .map_err(load_err)?;
        let entry = match result.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => EntryPoint {
                addr: addr.raw_value(),
                mode: EntryMode::Pvh,
            },
            _ => EntryPoint {
                addr: result.kernel_load.raw_value(),
                mode: EntryMode::Long64,
            },
        };
        Ok(LoadedKernel { entry, result })
    } else {
        let result = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY_START)))
            .map_err(load_err)?;
        let addr = result.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET;
        Ok(LoadedKernel {
            entry: EntryPoint {
                addr,
                mode: EntryMode::Long64,
            },
            result,
        })
    }
}

/// The guest's memory map: (address, size, type).
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIGH_MEMORY_START - EBDA_START, E820_RESERVED),
    ];
    let low_end = low_ram_end(mem_size);
    if low_end > HIGH_MEMORY_START {
        map.push((HIGH_MEMORY_START, low_end - HIGH_MEMORY_START, E820_RAM));
    }
    if mem_size > MMIO_HOLE_START {
        map.push((MMIO_HOLE_END, mem_size - MMIO_HOLE_START, E820_RAM));
    }
    map
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, max: usize) -> Result<(), BootError> {
    if !cmdline.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(BootError::CmdlineInvalid);
    }
    // `max` counts the terminating NUL.
    if cmdline.len() + 1 > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: max.saturating_sub(1),
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))?;
    Ok(())
}

/// Places the initrd as high as possible below `limit`, page-aligned; returns (address, size).
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    limit: u64,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let io_err = |source| BootError::Initrd {
        path: path.display().to_string(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let size = file.metadata().map_err(io_err)?.len();
    let too_large = BootError::InitrdTooLarge {
        size,
        limit,
        kernel_end,
    };
    let addr = match limit.checked_sub(size) {
        Some(top) => top & !(INITRD_ALIGN - 1),
        None => return Err(too_large),
    };
    if addr < kernel_end || addr < HIGH_MEMORY_START {
        return Err(too_large);
    }
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge {
        size,
        limit,
        kernel_end,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|e| match e {
            vm_memory::GuestMemoryError::IOError(io) => io_err(io),
            other => BootError::GuestMemory(other),
        })?;
    Ok((addr, size))
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let map = e820_map(mem_size);
    if map.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::TooManyE820Entries);
    }
    for (i, &(addr, size, kind)) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr,
            size,
            type_: kind,
            reserved: 0,
        };
        mem.write_obj(
            entry,
            GuestAddress(PVH_MEMMAP_START + (i * std::mem::size_of_val(&entry)) as u64),
        )?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))?;
    Ok(())
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    loaded: &KernelLoaderResult,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = loaded.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(mem_size);
    if map.len() > params.e820_table.len() {
        return Err(BootError::TooManyE820Entries);
    }
    for (slot, &(addr, size, kind)) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
    Ok(())
}

/// Loads the kernel (and initrd), writes the command line and the boot protocol's structures; returns where
/// the first vCPU starts.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<EntryPoint, BootError> {
    let loaded = load_kernel_image(mem, kernel)?;
    let mut max_cmdline = CMDLINE_MAX_SIZE;
    let mut initrd_limit = low_ram_end(mem_size);
    if let Some(hdr) = loaded.result.setup_header {
        if hdr.cmdline_size > 0 {
            max_cmdline = max_cmdline.min(hdr.cmdline_size as usize + 1);
        }
        let addr_max = if hdr.initrd_addr_max == 0 {
            DEFAULT_INITRD_ADDR_MAX
        } else {
            u64::from(hdr.initrd_addr_max)
        };
        initrd_limit = initrd_limit.min(addr_max + 1);
    }
    write_cmdline(mem, cmdline, max_cmdline)?;
    let kernel_end = loaded
        .result
        .kernel_end
        .max(loaded.result.kernel_load.raw_value());
    let initrd = match initrd {
        Some(path) => Some(load_initrd(mem, path, initrd_limit, kernel_end)?),
        None => None,
    };
    match loaded.entry.mode {
        EntryMode::Pvh => write_pvh_info(mem, mem_size, initrd)?,
        EntryMode::Long64 => write_zero_page(mem, mem_size, &loaded.result, cmdline.len(), initrd)?,
    }
    // The kernel image must lie in RAM (the loaders checked the writes), and the boot structures too.
    debug_assert!(mem.address_in_range(GuestAddress(ZERO_PAGE_START)));
    Ok(loaded.entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_small_and_large() {
        let small = e820_map(128 << 20);
        assert_eq!(
            small.last(),
            Some(&(HIGH_MEMORY_START, (128 << 20) - HIGH_MEMORY_START, E820_RAM))
        );
        let large = e820_map(6 << 30);
        assert_eq!(
            large[2],
            (
                HIGH_MEMORY_START,
                MMIO_HOLE_START - HIGH_MEMORY_START,
                E820_RAM
            )
        );
        assert_eq!(large[3], (MMIO_HOLE_END, 3 << 30, E820_RAM));
        let ram: u64 = large.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, (6 << 30) - (HIGH_MEMORY_START - EBDA_START));
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("initrd");
        std::fs::write(&p, vec![0xabu8; 5000]).unwrap();
        let (addr, size) = load_initrd(&mem, &p, 16 << 20, 2 << 20).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % INITRD_ALIGN, 0);
        assert!(addr + size <= 16 << 20 && addr + size > (16 << 20) - 2 * INITRD_ALIGN);
        let b: u8 = mem.read_obj(GuestAddress(addr + 4999)).unwrap();
        assert_eq!(b, 0xab);
        assert!(matches!(
            load_initrd(&mem, &p, 16 << 20, (16 << 20) - 4096),
            Err(BootError::InitrdTooLarge { .. })
        ));
    }

    #[test]
    fn cmdline_checks() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_cmdline(&mem, "console=ttyS0", 64).unwrap();
        let mut buf = [0u8; 14];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
        assert!(matches!(
            write_cmdline(&mem, "a\nb", 64),
            Err(BootError::CmdlineInvalid)
        ));
        assert!(matches!(
            write_cmdline(&mem, &"x".repeat(64), 64),
            Err(BootError::CmdlineTooLong { .. })
        ));
    }
}
