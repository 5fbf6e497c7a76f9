//! CPUID as KVM actually holds it for each vCPU after the VMM's filtering.

use capsa_vmm::arch::cpuid;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;

#[test]
fn every_vcpu_gets_its_apic_id_and_the_hypervisor_bit() {
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let n = 5u8;
    for id in 0..n {
        let vcpu = vm.create_vcpu(u64::from(id)).unwrap();
        vcpu.set_cpuid2(&cpuid::for_vcpu(&supported, id, n).unwrap())
            .unwrap();
        let got = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
        let entries = got.as_slice();
        let leaf = |f: u32, i: u32| {
            entries
                .iter()
                .find(|e| e.function == f && e.index == i)
                .copied()
        };
        let l1 = leaf(1, 0).expect("leaf 1");
        assert_eq!(l1.ebx >> 24, u32::from(id), "initial APIC ID of vCPU {id}");
        assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor bit");
        assert_eq!(l1.ecx & (1 << 5), 0, "VMX hidden");
        assert_ne!(l1.edx & (1 << 28), 0, "HTT with {n} logical processors");
        let l0 = leaf(0, 0).expect("leaf 0");
        if l0.eax >= 0xb {
            let smt = leaf(0xb, 0).expect("leaf 0xb.0");
            let core = leaf(0xb, 1).expect("leaf 0xb.1");
            assert_eq!((smt.ebx, smt.edx), (1, u32::from(id)));
            assert_eq!(
                (core.eax, core.ebx, core.edx),
                (3, u32::from(n), u32::from(id))
            );
            assert_eq!((core.ecx >> 8) & 0xff, 2, "core level");
        }
    }
}
