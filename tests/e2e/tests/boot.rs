//! Real guests: capsa-vmm boots the guest kernel + initrd, the runtime talks to capsa-agent over hybrid
//! vsock. Needs KVM that runs guests at speed: `make e2e` runs these inside the nested test host with
//! `CAPSA_E2E=1`; without it they are skipped.

use std::time::{Duration, Instant};

use capsa_e2e::{e2e_enabled, run_root, vm_config, Inputs};
use capsa_runtime::vm::{StopPath, Vm, VmError};

const MIB: u64 = 1 << 20;

#[tokio::test]
async fn boot_check_details_destroy() {
    if !e2e_enabled("boot_check_details_destroy") {
        return;
    }
    let inputs = Inputs::from_env();
    inputs.require();
    let root = run_root();
    let c = vm_config(&inputs, root.path(), 2, 256);
    let t0 = Instant::now();
    let vm = Vm::start(&c, "e2e-boot")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "agent ready after {:?} (spawn → first Check)",
        vm.ready_after()
    );
    assert!(vm.paths().dir.starts_with(root.path()));
    assert!(vm.paths().vsock.exists());

    vm.agent().check().await.expect("second Check");
    let d = vm.agent().guest_details().await.expect("GetGuestDetails");
    eprintln!("guest details: {d:?}");
    assert_eq!(d.online_cpus, 2, "{d:?}");
    // The kernel keeps some memory for itself; it never reports more than it was given.
    assert!(d.mem_total_bytes <= 256 * MIB, "{d:?}");
    assert!(d.mem_total_bytes >= 160 * MIB, "{d:?}");
    assert!(d.mem_available_bytes <= d.mem_total_bytes, "{d:?}");
    assert!(!d.kernel_release.is_empty(), "{d:?}");
    assert!(
        d.kernel_release
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit()),
        "kernel release {:?}",
        d.kernel_release
    );
    assert!(d.agent_is_init, "{d:?}");
    assert!(
        d.kernel_cmdline.contains("reboot=k") && d.kernel_cmdline.contains("panic=-1"),
        "{d:?}"
    );
    if let Some(t) = vm.boot_timer(Duration::from_secs(1)).await {
        eprintln!("{t:?}");
    } else {
        eprintln!("note: no BOOT_TIMER line from the VMM");
    }

    let dir = vm.paths().dir.clone();
    let exit = vm.stop().await.expect("stop");
    eprintln!("stopped: {exit:?} after {:?} in total", t0.elapsed());
    assert_eq!(
        exit.path,
        StopPath::Clean,
        "the VMM needed a signal after DestroySandbox: {exit:?}"
    );
    assert_eq!(exit.status.code(), Some(0), "{exit:?}");
    assert!(!dir.exists(), "sandbox dir {} left behind", dir.display());
}

#[tokio::test]
async fn four_vms_at_once() {
    if !e2e_enabled("four_vms_at_once") {
        return;
    }
    let inputs = Inputs::from_env();
    inputs.require();
    let root = run_root();
    let mems = [128u32, 160, 192, 224];
    let starts = mems.iter().enumerate().map(|(i, &mem)| {
        let mut c = vm_config(&inputs, root.path(), 1, mem);
        c.extra_cmdline = vec![format!("capsa.e2e_marker=vm{i}")];
        c.boot_timeout = Duration::from_secs(180);
        async move { Vm::start(&c, &format!("e2e-four-{i}")).await }
    });
    let results = futures::future::join_all(starts).await;
    let mut vms = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(vm) => vms.push(vm),
            Err(e) => errors.push(e.to_string()),
        }
    }
    assert!(
        errors.is_empty(),
        "VMs failed to start:\n{}",
        errors.join("\n\n")
    );

    // Every VM answers on its own socket, with its own memory size and marker.
    let mut totals = Vec::new();
    for (i, vm) in vms.iter().enumerate() {
        let d = vm.agent().guest_details().await.expect("GetGuestDetails");
        assert!(
            d.kernel_cmdline
                .split_whitespace()
                .any(|w| w == format!("capsa.e2e_marker=vm{i}")),
            "VM {i} answered with {d:?}"
        );
        assert!(
            d.mem_total_bytes <= u64::from(mems[i]) * MIB,
            "VM {i}: {d:?}"
        );
        totals.push(d.mem_total_bytes);
        eprintln!(
            "vm{i}: ready after {:?}, MemTotal {} MiB",
            vm.ready_after(),
            d.mem_total_bytes / MIB
        );
    }
    assert!(
        totals.windows(2).all(|w| w[0] < w[1]),
        "MemTotal {totals:?}"
    );

    let stops = vms.into_iter().map(|vm| async move {
        let dir = vm.paths().dir.clone();
        (vm.stop().await, dir)
    });
    for (exit, dir) in futures::future::join_all(stops).await {
        let exit = exit.expect("stop");
        assert_eq!(exit.status.code(), Some(0), "{exit:?}");
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn missing_kernel_fails_clearly() {
    if !e2e_enabled("missing_kernel_fails_clearly") {
        return;
    }
    let inputs = Inputs::from_env();
    let root = run_root();
    let mut c = vm_config(&inputs, root.path(), 1, 128);
    c.kernel = root.path().join("no-such-vmlinux");
    let err = Vm::start(&c, "e2e-nokernel").await.unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            VmError::MissingFile {
                what: "guest kernel",
                ..
            }
        ),
        "{msg}"
    );
    assert!(msg.contains("no-such-vmlinux"), "{msg}");
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
}

/// A kernel file that is not a kernel: the VMM itself refuses it (non-zero exit) and the error carries
/// its stderr.
#[tokio::test]
async fn bad_kernel_vmm_error_is_reported() {
    if !e2e_enabled("bad_kernel_vmm_error_is_reported") {
        return;
    }
    let inputs = Inputs::from_env();
    assert!(
        inputs.vmm.exists(),
        "CAPSA_VMM {} missing",
        inputs.vmm.display()
    );
    let root = run_root();
    let bogus = root.path().join("bogus-kernel");
    std::fs::write(&bogus, b"this is not a kernel image").unwrap();
    let mut c = vm_config(&inputs, root.path(), 1, 128);
    c.kernel = bogus.clone();
    // Only the VMM is under test here.
    c.initrd = None;
    c.boot_timeout = Duration::from_secs(20);
    let err = Vm::start(&c, "e2e-badkernel").await.unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, VmError::VmmExited { .. }), "{msg}");
    // interfaces.md: 2 = bad configuration; a corrupt image may also count as a load failure (1).
    assert!(
        msg.contains("exit status: 2") || msg.contains("exit status: 1"),
        "{msg}"
    );
    std::fs::remove_file(&bogus).unwrap();
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
}
