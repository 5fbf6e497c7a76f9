//! The runtime's VM lifecycle against `capsa-fake-vmm` (hybrid vsock + a fake agent, no KVM): runs on
//! any machine, unlike the real-guest suites in `boot.rs`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use capsa_runtime::agent_client::{AgentAddress, AgentClient};
use capsa_runtime::vm::{StopPath, Vm, VmConfig, VmError};

fn fake_config(run_root: &Path, kernel: &Path, vcpus: u32, memory_mib: u32) -> VmConfig {
    let mut c = VmConfig::new(
        PathBuf::from(env!("CARGO_BIN_EXE_capsa-fake-vmm")),
        kernel.to_path_buf(),
        None,
    );
    c.vcpus = vcpus;
    c.memory_mib = memory_mib;
    c.run_root = run_root.to_path_buf();
    c.boot_timeout = Duration::from_secs(20);
    c.stop_timeout = Duration::from_secs(2);
    c
}

fn setup() -> (tempfile::TempDir, PathBuf) {
    let root = capsa_e2e::run_root();
    let kernel = root.path().join("vmlinux");
    std::fs::write(&kernel, b"fake").unwrap();
    (root, kernel)
}

#[tokio::test]
async fn start_details_stop() {
    let (root, kernel) = setup();
    let run = root.path().join("run");
    let c = fake_config(&run, &kernel, 2, 256);
    let vm = Vm::start(&c, "fake1").await.unwrap();
    assert!(vm.paths().vsock.exists());
    let d = vm.agent().guest_details().await.unwrap();
    assert_eq!(d.online_cpus, 2);
    assert!(d.mem_total_bytes < 256 << 20);
    assert!(d
        .kernel_cmdline
        .starts_with("console=ttyS0 reboot=k panic=-1 quiet"));
    let t = vm
        .boot_timer(Duration::from_secs(2))
        .await
        .expect("BOOT_TIMER line");
    assert_eq!(t.start_to_kernel_entry_us, 1000);
    // The agent only listens after the simulated 200 ms boot: readiness waited for it.
    assert!(
        vm.ready_after() >= Duration::from_millis(200),
        "{:?}",
        vm.ready_after()
    );
    let dir = vm.paths().dir.clone();
    let exit = vm.stop().await.unwrap();
    assert!(exit.status.success(), "{:?}", exit);
    assert_eq!(exit.path, StopPath::Clean);
    assert!(!dir.exists());
}

#[tokio::test]
async fn four_at_once_each_on_its_own_socket() {
    let (root, kernel) = setup();
    let run = root.path().join("run");
    let starts = (0..4u32).map(|i| {
        let mut c = fake_config(&run, &kernel, 1 + i % 2, 128 + 32 * i);
        c.extra_cmdline = vec![format!("capsa.marker=vm{i}")];
        async move { Vm::start(&c, &format!("fake4-{i}")).await }
    });
    let vms: Vec<Vm> = futures::future::join_all(starts)
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    for (i, vm) in vms.iter().enumerate() {
        let d = vm.agent().guest_details().await.unwrap();
        assert!(d.kernel_cmdline.contains(&format!("capsa.marker=vm{i}")));
        assert!(d.mem_total_bytes < u64::from(128 + 32 * i as u32) << 20);
    }
    for vm in vms {
        let dir = vm.paths().dir.clone();
        assert!(vm.stop().await.unwrap().status.success());
        assert!(!dir.exists());
    }
}

#[tokio::test]
async fn drop_kills_and_cleans_up() {
    let (root, kernel) = setup();
    let run = root.path().join("run");
    let c = fake_config(&run, &kernel, 1, 128);
    let vm = Vm::start(&c, "fakedrop").await.unwrap();
    let pid = vm.pid() as i32;
    let dir = vm.paths().dir.clone();
    drop(vm);
    assert!(!dir.exists());
    // The VMM dies (tokio reaps it in the background).
    for _ in 0..200 {
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("VMM {pid} survived the drop of its Vm");
}

#[tokio::test]
async fn missing_kernel_fails_cleanly() {
    let (root, _kernel) = setup();
    let run = root.path().join("run");
    let c = fake_config(&run, &root.path().join("no-kernel"), 1, 128);
    let err = Vm::start(&c, "fakemiss").await.unwrap_err();
    assert!(matches!(err, VmError::MissingFile { .. }), "{err}");
    assert!(err.to_string().contains("no-kernel"), "{err}");
    assert!(!run.join("fakemiss").exists());
}

#[tokio::test]
async fn escalation_sigterm_then_sigkill() {
    let (root, kernel) = setup();
    let run = root.path().join("run");
    let mut c = fake_config(&run, &kernel, 1, 128);
    c.stop_timeout = Duration::from_millis(500);
    c.extra_cmdline = vec!["capsa_fake.ignore_destroy".into()];
    let vm = Vm::start(&c, "faketerm").await.unwrap();
    c.extra_cmdline.push("capsa_fake.ignore_sigterm".into());
    let vm2 = Vm::start(&c, "fakekill").await.unwrap();
    let exit = vm.stop().await.unwrap();
    assert_eq!(exit.path, StopPath::Terminated);
    assert!(exit.status.success());
    let exit = vm2.stop().await.unwrap();
    assert_eq!(exit.path, StopPath::Killed);
    assert!(!exit.status.success());
    assert!(!run.join("faketerm").exists() && !run.join("fakekill").exists());
}

/// A frozen VMM (SIGSTOP: neither the guest nor the VMM runs) answers nothing and ignores SIGTERM: stop
/// SIGKILLs it after one stop timeout instead of three.
#[tokio::test]
async fn a_frozen_vmm_is_killed_after_one_stop_timeout() {
    let (root, kernel) = setup();
    let run = root.path().join("run");
    let mut c = fake_config(&run, &kernel, 1, 128);
    c.stop_timeout = Duration::from_secs(1);
    let vm = Vm::start(&c, "fakefrozen").await.unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(vm.pid()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let started = std::time::Instant::now();
    let exit = vm.stop().await.unwrap();
    let took = started.elapsed();
    assert_eq!(exit.path, StopPath::Killed, "{exit:?}");
    assert!(
        exit.destroy_error.is_some(),
        "a frozen agent cannot answer: {exit:?}"
    );
    assert!(took < Duration::from_millis(2500), "stop took {took:?}");
    assert!(!run.join("fakefrozen").exists());
}

#[tokio::test]
async fn wait_ready_gives_up_with_last_error() {
    let (root, _) = setup();
    let addr = AgentAddress::hybrid(root.path().join("nobody.sock"));
    let err = AgentClient::wait_ready(&addr, Duration::from_millis(200))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("not ready after"), "{msg}");
    assert!(msg.contains("does not exist"), "{msg}");
}
