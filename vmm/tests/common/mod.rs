//! Helpers for the integration tests: tiny hand-assembled guests packed as a PVH vmlinux, a 64-bit ELF or a
//! bzImage, and a serial sink.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsa_vmm::{ExitReason, VmConfig, Vmm, VmmOptions};

pub const LOAD_ADDR: u64 = 0x10_0000;

/// Collects guest serial output.
#[derive(Clone, Default)]
pub struct Sink(pub Arc<Mutex<Vec<u8>>>);

impl Sink {
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }
}

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// x86 machine code, valid in 32-bit protected mode and (where noted) 64-bit mode.
#[derive(Default, Clone)]
pub struct Asm(pub Vec<u8>);

impl Asm {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// mov dx, port (32/64)
    pub fn mov_dx(&mut self, port: u16) -> &mut Self {
        self.bytes(&[0x66, 0xba]).bytes(&port.to_le_bytes())
    }
    /// mov al, imm8; out dx, al (32/64)
    pub fn out_dx_imm(&mut self, v: u8) -> &mut Self {
        self.bytes(&[0xb0, v, 0xee])
    }
    /// Writes `s` to COM1 (32/64; clobbers dx, al).
    pub fn print(&mut self, s: &str) -> &mut Self {
        self.mov_dx(0x3f8);
        for b in s.bytes() {
            self.out_dx_imm(b);
        }
        self
    }
    /// Sends the four bytes of eax to COM1, low first (32/64; clobbers dx, eax).
    pub fn print_eax(&mut self) -> &mut Self {
        self.mov_dx(0x3f8);
        for _ in 0..4 {
            self.bytes(&[0xee, 0xc1, 0xe8, 0x08]); // out dx, al; shr eax, 8
        }
        self
    }
    /// mov eax, [addr] (32-bit only)
    pub fn load32(&mut self, addr: u32) -> &mut Self {
        self.bytes(&[0xa1]).bytes(&addr.to_le_bytes())
    }
    /// mov dword [addr], imm (32-bit only)
    pub fn store32(&mut self, addr: u32, v: u32) -> &mut Self {
        self.bytes(&[0xc7, 0x05])
            .bytes(&addr.to_le_bytes())
            .bytes(&v.to_le_bytes())
    }
    /// mov eax, imm32 (32/64)
    pub fn mov_eax(&mut self, v: u32) -> &mut Self {
        self.bytes(&[0xb8]).bytes(&v.to_le_bytes())
    }
    /// mov ecx, imm32 (32/64)
    pub fn mov_ecx(&mut self, v: u32) -> &mut Self {
        self.bytes(&[0xb9]).bytes(&v.to_le_bytes())
    }
    pub fn cpuid(&mut self) -> &mut Self {
        self.bytes(&[0x0f, 0xa2])
    }
    /// i8042 reset: mov al, 0xfe; out 0x64, al
    pub fn reset(&mut self) -> &mut Self {
        self.bytes(&[0xb0, 0xfe, 0xe6, 0x64])
    }
    /// hlt; jmp back to hlt
    pub fn halt_forever(&mut self) -> &mut Self {
        self.bytes(&[0xf4, 0xeb, 0xfd])
    }
    /// The bytes of a `jne rel8` over the next `len` bytes.
    pub fn jne_over(&mut self, len: u8) -> &mut Self {
        self.bytes(&[0x75, len])
    }
}

fn elf(code: &[u8], pvh: bool, load_addr: u64) -> Vec<u8> {
    const CODE_OFFSET: usize = 0x1000;
    let phnum: u16 = if pvh { 2 } else { 1 };
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&load_addr.to_le_bytes()); // e_entry
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, phnum, 64, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    assert_eq!(f.len(), 64);
    let note_offset = 64 + 56 * phnum as usize;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes());
    note.extend_from_slice(&4u32.to_le_bytes());
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(load_addr as u32).to_le_bytes());
    let phdr = |f: &mut Vec<u8>, ty: u32, off: u64, addr: u64, size: u64| {
        f.extend_from_slice(&ty.to_le_bytes());
        f.extend_from_slice(&5u32.to_le_bytes()); // R+X
        for v in [off, addr, addr, size, size, 0x1000] {
            f.extend_from_slice(&v.to_le_bytes());
        }
    };
    phdr(&mut f, 1, CODE_OFFSET as u64, load_addr, code.len() as u64);
    if pvh {
        phdr(&mut f, 4, note_offset as u64, 0, note.len() as u64);
        f.extend_from_slice(&note);
    }
    f.resize(CODE_OFFSET, 0);
    f.extend_from_slice(code);
    f
}

/// An ELF vmlinux with a PVH entry note: `code` runs in 32-bit protected mode at [`LOAD_ADDR`].
pub fn pvh_kernel(code: &[u8]) -> Vec<u8> {
    elf(code, true, LOAD_ADDR)
}

/// An ELF without a PVH note: `code` runs in 64-bit long mode at [`LOAD_ADDR`].
pub fn elf64_kernel(code: &[u8]) -> Vec<u8> {
    elf(code, false, LOAD_ADDR)
}

/// A bzImage whose 64-bit entry (protected-mode code + 0x200) runs `code` in long mode.
pub fn bzimage_kernel(code: &[u8]) -> Vec<u8> {
    let setup_sects = 1u8;
    let setup_len = (setup_sects as usize + 1) * 512;
    let mut f = vec![0u8; setup_len];
    f[0x1f1] = setup_sects;
    f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&0x020du16.to_le_bytes());
    f[0x211] = 0x01; // LOADED_HIGH
    f[0x214..0x218].copy_from_slice(&(LOAD_ADDR as u32).to_le_bytes());
    f[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    f[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
    let mut kernel = vec![0x90u8; 0x200]; // 32-bit entry: unused
    kernel.extend_from_slice(code);
    f.extend_from_slice(&kernel);
    f
}

pub fn write_kernel(dir: &Path, name: &str, image: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, image).unwrap();
    p
}

pub fn config(kernel: &Path) -> VmConfig {
    let mut c = VmConfig::new(kernel);
    c.memory_mib = 32;
    // These tests run the VM on the test's own thread, which seccomp's main-thread filter would confine for
    // the rest of the test; the filters are tested through the binary (tests/cli.rs, tests/seccomp.rs).
    c.seccomp = capsa_vmm::config::SeccompMode::Off;
    c
}

/// Builds and runs a VM with serial output captured; gives up after `timeout`.
pub fn run_vm(
    config: VmConfig,
    options: VmmOptions,
    timeout: Duration,
) -> (Result<ExitReason, capsa_vmm::Error>, Sink) {
    let sink = Sink::default();
    let options = VmmOptions {
        serial_out: Some(Box::new(sink.clone())),
        ..options
    };
    let vmm = Vmm::with_options(config, options).expect("VM setup");
    let stop = vmm.stop_flag();
    let watchdog = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let result = vmm.run();
    drop(watchdog);
    (result, sink)
}
