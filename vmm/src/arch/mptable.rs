//! Intel MultiProcessor Specification 1.4 tables, so a guest without ACPI finds every vCPU, the IOAPIC and the
//! ISA interrupt routing. The floating pointer and the configuration table sit together at the EBDA.

use vm_memory::{Bytes, GuestAddress};

use crate::devices::GuestMemoryMmap;
use crate::layout::{IOAPIC_ADDR, LAPIC_ADDR, MAX_GSI, MAX_VCPUS, MPTABLE_START};

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("MP table supports 1..={MAX_VCPUS} vCPUs, not {0}")]
    TooManyCpus(u8),
    #[error("cannot write the MP table into guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const SPEC_REVISION: u8 = 4;
/// Family 6, model 0x1a: what the processor entries claim (Linux reads the real CPUID anyway).
const CPU_SIGNATURE: u32 = (6 << 8) | (0xa << 4) | 5;
/// FPU and APIC present.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const ISA_BUS_ID: u8 = 0;

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_sub(*b))
}

/// The IOAPIC's ID: the first one after the vCPUs' APIC IDs.
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus
}

/// Builds the floating pointer followed by the configuration table, as they go at guest address `base`.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic = ioapic_id(num_cpus);
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;

    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }

    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;

    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;

    // ISA IRQ n -> IOAPIC pin n, for every pin (legacy devices and virtio-mmio GSIs); polarity and trigger
    // "conform to the bus" = active high, edge, which is what irqfd delivery gives.
    for irq in 0..=MAX_GSI as u8 {
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            ISA_BUS_ID,
            irq,
            ioapic,
            irq,
        ]);
        count += 1;
    }

    // LINT0 = ExtINT (the 8259 in virtual-wire mode), LINT1 = NMI, on every local APIC (0xff).
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_EXTINT,
        0,
        0,
        ISA_BUS_ID,
        0,
        0xff,
        0,
    ]);
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_NMI,
        0,
        0,
        ISA_BUS_ID,
        0,
        0xff,
        1,
    ]);
    count += 2;

    let table_len = HEADER_LEN + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(SPEC_REVISION);
    table.push(0); // checksum, below
    table.extend_from_slice(b"CAPSA   ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0u8; 4]); // extended table length, checksum, reserved
    debug_assert_eq!(table.len(), HEADER_LEN);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let table_addr = (base + FLOATING_POINTER_LEN as u64) as u32;
    let mut out = Vec::with_capacity(FLOATING_POINTER_LEN + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&table_addr.to_le_bytes());
    out.extend_from_slice(&[1, SPEC_REVISION, 0, 0, 0, 0, 0, 0]);
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `num_cpus` vCPUs at [`MPTABLE_START`].
pub fn setup(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build(num_cpus, MPTABLE_START)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn parse(bytes: &[u8]) -> (Vec<u8>, Vec<(u8, u8)>, u16) {
        // Floating pointer.
        assert_eq!(&bytes[0..4], b"_MP_");
        assert_eq!(sum(&bytes[0..16]), 0, "floating pointer checksum");
        assert_eq!(bytes[8], 1, "length in 16-byte units");
        let ptr = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as u64;
        assert_eq!(ptr, MPTABLE_START + 16);
        let t = &bytes[16..];
        assert_eq!(&t[0..4], b"PCMP");
        let len = u16::from_le_bytes([t[4], t[5]]) as usize;
        assert_eq!(len, t.len());
        assert_eq!(sum(&t[..len]), 0, "configuration table checksum");
        assert_eq!(
            u32::from_le_bytes(t[36..40].try_into().unwrap()),
            LAPIC_ADDR
        );
        let count = u16::from_le_bytes([t[34], t[35]]);
        let mut off = HEADER_LEN;
        let mut cpus = vec![];
        let mut ints = vec![];
        for _ in 0..count {
            match t[off] {
                ENTRY_PROCESSOR => {
                    cpus.push(t[off + 1]);
                    assert_eq!(t[off + 3] & CPU_ENABLED, CPU_ENABLED);
                    assert_eq!(t[off + 3] & CPU_BOOTSTRAP != 0, t[off + 1] == 0);
                    off += 20;
                }
                ENTRY_IO_INTERRUPT => {
                    ints.push((t[off + 5], t[off + 7]));
                    off += 8;
                }
                1 | 2 | 4 => off += 8,
                other => panic!("unknown entry type {other}"),
            }
        }
        assert_eq!(off, len, "entry count matches the table length");
        (cpus, ints, count)
    }

    #[test]
    fn one_processor_entry_per_vcpu() {
        for n in [1u8, 2, 7, 64, MAX_VCPUS] {
            let bytes = build(n, MPTABLE_START).unwrap();
            let (cpus, ints, _) = parse(&bytes);
            assert_eq!(cpus, (0..n).collect::<Vec<_>>());
            assert_eq!(ints.len(), 24);
            assert!(ints.iter().all(|(irq, pin)| irq == pin));
        }
    }

    #[test]
    fn bad_cpu_counts_are_rejected() {
        assert!(build(0, MPTABLE_START).is_err());
        assert!(build(255, MPTABLE_START).is_err());
    }

    #[test]
    fn written_to_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        setup(&mem, 4).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
