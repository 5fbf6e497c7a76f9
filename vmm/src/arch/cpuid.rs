//! CPUID for each vCPU: KVM's supported set, with the hypervisor bit, per-vCPU APIC IDs and a consistent
//! topology (one socket, one thread per core, N cores), and the features a guest must not use hidden.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PERFMON: u32 = 0xa;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_ADDR_SIZES: u32 = 0x8000_0008;
const LEAF_EXT_APIC_ID: u32 = 0x8000_001e;

const ECX_VMX: u32 = 1 << 5;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("too many CPUID entries for KVM")]
    TooManyEntries,
}

/// Bits of an APIC ID needed to number `n` cores.
fn core_bits(n: u8) -> u32 {
    u32::from(n.max(1)).next_power_of_two().trailing_zeros()
}

fn topology_leaf(function: u32, subleaf: u32, apic_id: u8, num_cpus: u8) -> kvm_cpuid_entry2 {
    let (eax, ebx, level_type) = match subleaf {
        0 => (0, 1, LEVEL_TYPE_SMT),
        1 => (core_bits(num_cpus), u32::from(num_cpus), LEVEL_TYPE_CORE),
        _ => (0, 0, 0),
    };
    kvm_cpuid_entry2 {
        function,
        index: subleaf,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | subleaf,
        edx: u32::from(apic_id),
        ..Default::default()
    }
}

/// Rewrites KVM's supported CPUID entries for vCPU `apic_id` of `num_cpus`.
pub fn filter_entries(
    supported: &[kvm_cpuid_entry2],
    apic_id: u8,
    num_cpus: u8,
) -> Vec<kvm_cpuid_entry2> {
    let bits = core_bits(num_cpus);
    let max_basic = supported
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    let mut out: Vec<kvm_cpuid_entry2> = Vec::with_capacity(supported.len() + 6);
    for entry in supported {
        let mut e = *entry;
        match e.function {
            LEAF_FEATURES => {
                e.ecx |= ECX_HYPERVISOR;
                e.ecx &= !ECX_VMX;
                e.ebx = (e.ebx & 0x0000_ffff)
                    | (u32::from(apic_id) << 24)
                    | ((1u32 << bits).min(255) << 16);
                if num_cpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                let cache_type = e.eax & 0x1f;
                if cache_type != 0 {
                    let level = (e.eax >> 5) & 0x7;
                    let sharing = if level >= 3 { (1u32 << bits) - 1 } else { 0 };
                    let cores = ((1u32 << bits) - 1).min(63);
                    e.eax = (e.eax & 0x3fff) | (sharing.min(0xfff) << 14) | (cores << 26);
                }
            }
            // No performance counters for guests.
            LEAF_PERFMON => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            // EBX of subleaf 0 is the XSAVE area size for the features enabled in XCR0. KVM fills it for the
            // vCPU's reset XCR0 (x87|SSE) and, nested, does not always refresh it once the guest enables
            // every feature in EAX; Linux then warns "XSAVE consistency problem". The guest enables all of
            // them, so give the size for all of them (ECX) up front.
            LEAF_XSAVE if e.index == 0 => {
                e.ebx = e.ecx;
            }
            // Rebuilt below.
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => continue,
            LEAF_EXT_ADDR_SIZES => {
                e.ecx = (e.ecx & !0xf0ff) | (bits << 12) | (u32::from(num_cpus) - 1);
            }
            LEAF_EXT_APIC_ID => {
                e.eax = u32::from(apic_id);
                e.ebx = u32::from(apic_id) & 0xff; // core ID; 1 thread per core
                e.ecx = 0; // node 0, one node per processor
            }
            _ => {}
        }
        out.push(e);
    }
    let has = |f: u32| supported.iter().any(|e| e.function == f);
    for leaf in [LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2] {
        if max_basic >= leaf || has(leaf) {
            for subleaf in 0..3 {
                out.push(topology_leaf(leaf, subleaf, apic_id, num_cpus));
            }
        }
    }
    out
}

/// The CPUID to give vCPU `apic_id`.
pub fn for_vcpu(supported: &CpuId, apic_id: u8, num_cpus: u8) -> Result<CpuId, CpuidError> {
    let entries = filter_entries(supported.as_slice(), apic_id, num_cpus);
    CpuId::from_entries(&entries).map_err(|_| CpuidError::TooManyEntries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn xsave_size_covers_every_supported_feature() {
        let supported = vec![
            entry(0xd, 0, 0x7, 0x240, 0x340, 0),
            entry(0xd, 2, 0x100, 0x240, 0, 0),
        ];
        let out = filter_entries(&supported, 0, 1);
        let sub0 = out
            .iter()
            .find(|e| e.function == 0xd && e.index == 0)
            .unwrap();
        assert_eq!(sub0.ebx, 0x340);
        let sub2 = out
            .iter()
            .find(|e| e.function == 0xd && e.index == 2)
            .unwrap();
        assert_eq!(
            (sub2.eax, sub2.ebx),
            (0x100, 0x240),
            "component leaves untouched"
        );
    }

    #[test]
    fn topology_and_apic_ids() {
        let supported = vec![
            entry(0, 0, 0x1f, 0, 0, 0),
            entry(1, 0, 0x906ea, 0xff00_0800, ECX_VMX, 0),
            entry(4, 0, 0x121, 0, 0, 0),   // L1d
            entry(4, 3, 0x163, 0, 0, 0),   // L3
            entry(0xb, 0, 1, 2, 0x100, 7), // host topology, replaced
            entry(0xa, 0, 0x0704_0802, 0, 0, 0),
        ];
        for id in 0..6u8 {
            let out = filter_entries(&supported, id, 6);
            let leaf1 = out.iter().find(|e| e.function == 1).unwrap();
            assert_eq!(leaf1.ebx >> 24, u32::from(id));
            assert_eq!((leaf1.ebx >> 16) & 0xff, 8);
            assert_eq!(leaf1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
            assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
            assert_eq!(leaf1.ecx & ECX_VMX, 0);
            assert_ne!(leaf1.edx & EDX_HTT, 0);
            for leaf in [0xb, 0x1f] {
                let subs: Vec<_> = out.iter().filter(|e| e.function == leaf).collect();
                assert_eq!(subs.len(), 3);
                assert!(subs.iter().all(|e| e.edx == u32::from(id)));
                assert_eq!((subs[0].eax, subs[0].ebx, subs[0].ecx), (0, 1, 0x100));
                assert_eq!((subs[1].eax, subs[1].ebx, subs[1].ecx), (3, 6, 0x201));
                assert_eq!(subs[2].ecx >> 8 & 0xff, 0);
            }
            let l1d = out
                .iter()
                .find(|e| e.function == 4 && e.index == 0)
                .unwrap();
            assert_eq!(l1d.eax >> 26, 7);
            assert_eq!((l1d.eax >> 14) & 0xfff, 0);
            let l3 = out
                .iter()
                .find(|e| e.function == 4 && e.index == 3)
                .unwrap();
            assert_eq!((l3.eax >> 14) & 0xfff, 7);
            assert_eq!(out.iter().find(|e| e.function == 0xa).unwrap().eax, 0);
        }
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let supported = vec![entry(0, 0, 0xd, 0, 0, 0), entry(1, 0, 0, 0, 0, EDX_HTT)];
        let out = filter_entries(&supported, 0, 1);
        let leaf1 = out.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.edx & EDX_HTT, 0);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 1);
        assert_eq!(out.iter().filter(|e| e.function == 0xb).count(), 3);
        assert_eq!(out.iter().filter(|e| e.function == 0x1f).count(), 0);
    }
}
