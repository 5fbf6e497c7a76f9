//! Boots tiny hand-assembled guests on the host's /dev/kvm through each boot path.

mod common;

use std::time::Duration;

use capsa_vmm::arch::boot::EntryMode;
use capsa_vmm::{ExitReason, Vmm, VmmOptions};
use common::*;

const TIMEOUT: Duration = Duration::from_secs(60);

/// PVH: check `ebx` points at hvm_start_info (magic) and the command line pointer, print, reset.
fn pvh_hello() -> Vec<u8> {
    let mut a = Asm::new();
    // cmp dword [ebx], 0x336ec578 ; jne fail
    a.bytes(&[0x81, 0x3b]).bytes(&0x336e_c578u32.to_le_bytes());
    let mut ok = Asm::new();
    ok.print("hello").reset().halt_forever();
    a.jne_over(ok.0.len() as u8).bytes(&ok.0);
    a.print("bad start_info").reset().halt_forever();
    pvh_kernel(&a.0)
}

/// 64-bit: check `rsi` points at the zero page ("HdrS" at +0x202), print, reset.
fn long_mode_hello(image: fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
    let mut a = Asm::new();
    // cmp dword [rsi+0x202], "HdrS"
    a.bytes(&[0x81, 0xbe, 0x02, 0x02, 0x00, 0x00])
        .bytes(b"HdrS");
    let mut ok = Asm::new();
    ok.print("hello64").reset().halt_forever();
    a.jne_over(ok.0.len() as u8).bytes(&ok.0);
    a.print("bad zero page").reset().halt_forever();
    image(&a.0)
}

#[test]
fn pvh_guest_serial_output_and_i8042_reset() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_kernel(dir.path(), "vmlinux", &pvh_hello());
    let mut cfg = config(&kernel);
    cfg.cmdline = "console=ttyS0".into();
    let vmm = Vmm::with_options(cfg.clone(), VmmOptions::default()).unwrap();
    assert_eq!(vmm.entry_point().mode, EntryMode::Pvh);
    drop(vmm);
    let (result, out) = run_vm(cfg, VmmOptions::default(), TIMEOUT);
    assert_eq!(result.unwrap(), ExitReason::GuestReset);
    assert_eq!(out.text(), "hello");
}

#[test]
fn bzimage_guest_runs_in_long_mode() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_kernel(dir.path(), "bzImage", &long_mode_hello(bzimage_kernel));
    let cfg = config(&kernel);
    assert_eq!(
        Vmm::with_options(cfg.clone(), VmmOptions::default())
            .unwrap()
            .entry_point()
            .mode,
        EntryMode::Long64
    );
    let (result, out) = run_vm(cfg, VmmOptions::default(), TIMEOUT);
    assert_eq!(result.unwrap(), ExitReason::GuestReset);
    assert_eq!(out.text(), "hello64");
}

#[test]
fn elf_without_pvh_note_boots_in_long_mode() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_kernel(dir.path(), "vmlinux64", &long_mode_hello(elf64_kernel));
    let (result, out) = run_vm(config(&kernel), VmmOptions::default(), TIMEOUT);
    assert_eq!(result.unwrap(), ExitReason::GuestReset);
    assert_eq!(out.text(), "hello64");
}

#[test]
fn cpuid_seen_by_the_guest_has_hypervisor_bit_and_apic_id() {
    let mut a = Asm::new();
    a.mov_eax(1)
        .mov_ecx(0)
        .cpuid()
        .bytes(&[0x89, 0xc8])
        .print_eax(); // mov eax, ecx
    a.mov_eax(1)
        .mov_ecx(0)
        .cpuid()
        .bytes(&[0x89, 0xd8])
        .print_eax(); // mov eax, ebx
    a.mov_eax(0xb)
        .mov_ecx(1)
        .cpuid()
        .bytes(&[0x89, 0xd8])
        .print_eax(); // leaf 0xb core level: ebx
    a.reset().halt_forever();
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_kernel(dir.path(), "vmlinux", &pvh_kernel(&a.0));
    let mut cfg = config(&kernel);
    cfg.vcpus = 3;
    let (result, out) = run_vm(cfg, VmmOptions::default(), TIMEOUT);
    assert_eq!(result.unwrap(), ExitReason::GuestReset);
    let b = out.bytes();
    assert_eq!(b.len(), 12);
    let word = |i: usize| u32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().unwrap());
    assert_ne!(word(0) & (1 << 31), 0, "hypervisor bit");
    assert_eq!(word(1) >> 24, 0, "BSP APIC ID");
    assert_eq!((word(1) >> 16) & 0xff, 4, "addressable IDs for 3 cores");
    let max_basic_ok = word(2) == 3 || word(2) == 0;
    assert!(
        max_basic_ok,
        "leaf 0xb core level lists 3 logical processors, got {}",
        word(2)
    );
}

#[test]
fn several_vcpus_stop_cleanly_on_reset() {
    // The APs wait for INIT/SIPI inside KVM_RUN; the reset from the BSP must still end the VM (the APs are
    // kicked out of KVM_RUN by a signal and joined).
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_kernel(dir.path(), "vmlinux", &pvh_hello());
    let mut cfg = config(&kernel);
    cfg.vcpus = 4;
    let start = std::time::Instant::now();
    let (result, out) = run_vm(cfg, VmmOptions::default(), TIMEOUT);
    assert_eq!(result.unwrap(), ExitReason::GuestReset);
    assert_eq!(out.text(), "hello");
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[test]
fn stop_flag_ends_a_halted_guest() {
    let mut a = Asm::new();
    a.print("up").bytes(&[0xfa]).halt_forever(); // cli; hlt
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_kernel(dir.path(), "vmlinux", &pvh_kernel(&a.0));
    let (result, out) = run_vm(
        config(&kernel),
        VmmOptions::default(),
        Duration::from_secs(3),
    );
    assert_eq!(result.unwrap(), ExitReason::Stopped);
    assert_eq!(out.text(), "up");
}

#[test]
fn triple_fault_is_a_guest_shutdown() {
    // lidt with a zero-limit IDT, then ud2: no handler, double fault, triple fault.
    let mut a = Asm::new();
    a.print("x");
    // lidt [idtr] where idtr (6 zero bytes) sits right after the code
    let idtr = (LOAD_ADDR as u32) + 64;
    a.bytes(&[0x0f, 0x01, 0x1d])
        .bytes(&idtr.to_le_bytes())
        .bytes(&[0x0f, 0x0b])
        .halt_forever(); // ud2
    a.0.resize(64, 0x90);
    a.0.extend_from_slice(&[0u8; 6]);
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_kernel(dir.path(), "vmlinux", &pvh_kernel(&a.0));
    let (result, out) = run_vm(config(&kernel), VmmOptions::default(), TIMEOUT);
    assert_eq!(result.unwrap(), ExitReason::GuestShutdown);
    assert_eq!(out.text(), "x");
}

#[test]
fn unknown_ports_and_mmio_are_harmless() {
    // Read PCI config (all-ones), POST code write, read from unmapped MMIO (0), then print what was read.
    let mut a = Asm::new();
    a.mov_dx(0xcf8).mov_eax(0x8000_0000).bytes(&[0xef]); // out dx, eax
    a.mov_dx(0xcfc).bytes(&[0xed]); // in eax, dx
    a.print_eax();
    a.bytes(&[0xb0, 0x55, 0xe6, 0x80]); // out 0x80, al
    a.load32(0xe000_0000).print_eax();
    a.mov_dx(0x71)
        .bytes(&[0xec])
        .bytes(&[0x24, 0x80])
        .print_eax(); // in al, dx; and al, 0x80 (UIP)
    a.reset().halt_forever();
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_kernel(dir.path(), "vmlinux", &pvh_kernel(&a.0));
    let (result, out) = run_vm(config(&kernel), VmmOptions::default(), TIMEOUT);
    assert_eq!(result.unwrap(), ExitReason::GuestReset);
    let b = out.bytes();
    assert_eq!(&b[0..4], &[0xff; 4]);
    assert_eq!(&b[4..8], &[0; 4]);
    assert_eq!(b[8], 0);
}

#[test]
fn large_memory_has_the_mmio_hole_and_high_ram() {
    // 3.5 GiB: RAM above 4 GiB must be usable; the guest writes and reads back at 0x1_0000_0000 is not
    // reachable from 32-bit code, so check the host-side layout instead and that the guest still boots.
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_kernel(dir.path(), "vmlinux", &pvh_hello());
    let mut cfg = config(&kernel);
    cfg.memory_mib = 3584;
    let vmm = Vmm::with_options(
        cfg,
        VmmOptions {
            serial_out: Some(Box::new(Sink::default())),
            ..Default::default()
        },
    )
    .unwrap();
    use vm_memory::{Bytes, GuestAddress};
    let mem = vmm.guest_memory();
    assert!(mem.write_obj(7u8, GuestAddress(0xbfff_ffff)).is_ok());
    assert!(mem.write_obj(7u8, GuestAddress(0xc000_0000)).is_err());
    assert!(mem.write_obj(7u8, GuestAddress(0x1_1fff_ffff)).is_ok());
    assert!(mem.write_obj(7u8, GuestAddress(0x1_2000_0000)).is_err());
    assert_eq!(vmm.run().unwrap(), ExitReason::GuestReset);
}

/// The serial port's THR-empty interrupt reaches the guest: irqfd on GSI 4 -> in-kernel IOAPIC pin 4 -> LAPIC ->
/// the guest's IDT handler (what Linux needs for user-space console output).
#[test]
fn serial_thre_interrupt_is_delivered_to_the_guest() {
    const HANDLER: u32 = 0x400;
    const IDT: u32 = 0x800;
    const IDTR: u32 = 0x1000;
    const VECTOR: u32 = 0x30;
    let base = LOAD_ADDR as u32;
    let mut a = Asm::new();
    a.bytes(&[0xbc]).bytes(&0x8000u32.to_le_bytes()); // mov esp, 0x8000
    a.bytes(&[0xb0, 0xff, 0xe6, 0x21, 0xe6, 0xa1]); // mask both 8259s
    a.bytes(&[0x0f, 0x01, 0x1d])
        .bytes(&(base + IDTR).to_le_bytes()); // lidt
    a.store32(0xfee0_00f0, 0x1ff); // LAPIC spurious vector register: software enable
    a.store32(0xfec0_0000, 0x10 + 2 * 4)
        .store32(0xfec0_0010, VECTOR); // IOAPIC pin 4: vector, edge, unmasked
    a.store32(0xfec0_0000, 0x11 + 2 * 4).store32(0xfec0_0010, 0); // destination APIC 0
    a.mov_dx(0x3f9).out_dx_imm(0x02); // IER: THR empty
    a.bytes(&[0xfb]).halt_forever(); // sti; hlt
    assert!(a.0.len() < HANDLER as usize);
    let mut image = a.0.clone();
    image.resize(HANDLER as usize, 0x90);
    let mut h = Asm::new();
    h.print("I").reset().halt_forever();
    image.extend_from_slice(&h.0);
    image.resize(IDT as usize, 0x90);
    let mut idt = vec![0u8; 256 * 8];
    let handler = base + HANDLER;
    let gate = &mut idt[(VECTOR * 8) as usize..][..8];
    gate[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    gate[2..4].copy_from_slice(&8u16.to_le_bytes()); // code selector
    gate[5] = 0x8e; // present, 32-bit interrupt gate
    gate[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    image.extend_from_slice(&idt);
    image.extend_from_slice(&0x7ffu16.to_le_bytes());
    image.extend_from_slice(&(base + IDT).to_le_bytes());

    let dir = tempfile::tempdir().unwrap();
    let kernel = write_kernel(dir.path(), "vmlinux", &pvh_kernel(&image));
    let (result, out) = run_vm(
        config(&kernel),
        VmmOptions::default(),
        Duration::from_secs(20),
    );
    assert_eq!(out.text(), "I", "interrupt handler ran");
    assert_eq!(result.unwrap(), ExitReason::GuestReset);
}

#[test]
fn a_stop_requested_before_run_stops_at_once() {
    let mut a = Asm::new();
    a.bytes(&[0xfa]).halt_forever();
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_kernel(dir.path(), "vmlinux", &pvh_kernel(&a.0));
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let vmm = Vmm::with_options(
        config(&kernel),
        VmmOptions {
            stop_flag: Some(flag.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(std::sync::Arc::ptr_eq(&vmm.stop_flag(), &flag));
    let start = std::time::Instant::now();
    assert_eq!(vmm.run().unwrap(), ExitReason::Stopped);
    assert!(start.elapsed() < Duration::from_secs(5));
}
