//! virtio-fs end to end: the runtime starts virtiofsd on `<sandbox dir>/shared`, capsa-vmm serves it to the
//! guest as a vhost-user virtio-fs device, the agent mounts it (AddStorages, driver virtio-fs) and runs
//! containers whose rootfs lives in the shared directory. Checks both directions (host file read in the
//! guest, guest write seen on the host), a file added and a directory mounted on the host after boot (the
//! second-container case), and that a dead virtiofsd stops the VM (the runtime kills the VMM) with nothing left.
//!
//! Gated on `CAPSA_E2E=1` like the other real-guest suites; needs `build/virtiofsd` (`make virtiofsd`) or
//! `CAPSA_VIRTIOFSD`, and Debian's busybox-static at /bin/busybox.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use capsa_e2e::{e2e_enabled, run_root, vm_config, workspace_root, Inputs};
use capsa_proto::agent::{self, Storage, StorageDriver};
use capsa_proto::agent_ttrpc::AgentServiceClient;
use capsa_runtime::virtiofsd::SharedFsConfig;
use capsa_runtime::vm::{StopPath, Vm};
use serde_json::{json, Value};

const GUEST_MNT: &str = "/run/capsa/shared";

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(60_000_000_000)
}

fn virtiofsd() -> PathBuf {
    let p = std::env::var_os("CAPSA_VIRTIOFSD")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("build/virtiofsd"));
    assert!(
        p.exists(),
        "virtiofsd {} missing (make virtiofsd)",
        p.display()
    );
    p
}

/// A busybox rootfs at `root`: /bin/busybox plus the applets used here.
fn busybox_rootfs(root: &Path) {
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir rootfs");
    }
    let bb = root.join("bin/busybox");
    std::fs::copy("/bin/busybox", &bb).expect("copy /bin/busybox (Debian's busybox-static)");
    for applet in ["sh", "cat", "echo", "ls", "stat"] {
        std::fs::hard_link(&bb, root.join("bin").join(applet)).expect("link applet");
    }
}

fn spec(args: &[&str], rootfs: &str) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/"
        },
        "root": {"path": rootfs, "readonly": false},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}]
        }
    })
}

/// Runs `args` in a container rooted at `rootfs` (a guest path): (stdout, stderr, exit status).
async fn run(
    c: &AgentServiceClient,
    id: &str,
    args: &[&str],
    rootfs: &str,
) -> (String, String, u32) {
    let mut r = agent::CreateContainerRequest::new();
    r.container_id = id.into();
    r.oci_spec_json = spec(args, rootfs).to_string().into_bytes();
    c.create_container(ctx(), &r)
        .await
        .unwrap_or_else(|e| panic!("CreateContainer {id}: {e:?}"));
    let mut r = agent::StartContainerRequest::new();
    r.container_id = id.into();
    c.start_container(ctx(), &r)
        .await
        .unwrap_or_else(|e| panic!("StartContainer {id}: {e:?}"));
    let mut outs = Vec::new();
    for stderr in [false, true] {
        let mut out = Vec::new();
        loop {
            let mut r = agent::ReadStreamRequest::new();
            r.container_id = id.into();
            r.len = 65536;
            let d = if stderr {
                c.read_stderr(ctx(), &r).await
            } else {
                c.read_stdout(ctx(), &r).await
            }
            .expect("read stream")
            .data;
            if d.is_empty() {
                break;
            }
            out.extend(d);
        }
        outs.push(String::from_utf8_lossy(&out).into_owned());
    }
    let mut r = agent::WaitProcessRequest::new();
    r.container_id = id.into();
    let status = c
        .wait_process(ctx(), &r)
        .await
        .expect("WaitProcess")
        .exit_status;
    let mut r = agent::RemoveContainerRequest::new();
    r.container_id = id.into();
    c.remove_container(ctx(), &r)
        .await
        .expect("RemoveContainer");
    let stderr = outs.pop().unwrap_or_default();
    let stdout = outs.pop().unwrap_or_default();
    (stdout, stderr, status)
}

fn pid_alive(pid: u32) -> bool {
    // A zombie counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[tokio::test]
async fn shared_dir_over_virtio_fs() {
    if !e2e_enabled("shared_dir_over_virtio_fs") {
        return;
    }
    let inputs = Inputs::from_env();
    inputs.require();
    let root = run_root();
    let mut c = vm_config(&inputs, root.path(), 1, 256);
    c.shared_fs = Some(SharedFsConfig::new(virtiofsd()));
    let t0 = Instant::now();
    let vm = Vm::start(&c, "e2e-fs")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("agent ready after {:?}", vm.ready_after());
    let shared = vm.shared_dir().expect("shared dir").to_path_buf();
    let rootfs = shared.join("rootfs");
    busybox_rootfs(&rootfs);
    std::fs::write(rootfs.join("hello.txt"), "hello from the host\n").unwrap();

    let client = vm.agent().raw().clone();
    let mut s = Storage::new();
    s.driver = StorageDriver::STORAGE_DRIVER_VIRTIO_FS.into();
    s.source = capsa_runtime::virtiofsd::DEFAULT_TAG.into();
    s.fstype = "virtiofs".into();
    s.mount_point = GUEST_MNT.into();
    let mut r = agent::AddStoragesRequest::new();
    r.storages = vec![s];
    let t = Instant::now();
    client
        .add_storages(ctx(), &r)
        .await
        .unwrap_or_else(|e| panic!("AddStorages virtio-fs: {e:?}\n{}", vm.console_tail()));
    eprintln!("virtio-fs mounted in {:?}", t.elapsed());

    // Host → guest, and guest → host.
    let guest_rootfs = format!("{GUEST_MNT}/rootfs");
    let t = Instant::now();
    let (out, err, status) = run(
        &client,
        "c1",
        &[
            "sh",
            "-c",
            "cat /hello.txt && echo written in the guest > /from-guest.txt",
        ],
        &guest_rootfs,
    )
    .await;
    eprintln!("container c1 on virtio-fs ran in {:?}", t.elapsed());
    assert_eq!(
        (out.as_str(), status),
        ("hello from the host\n", 0),
        "stderr: {err}"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("from-guest.txt")).expect("guest's file on the host"),
        "written in the guest\n"
    );

    // A file the host adds after the mount (what a second container of a pod needs).
    std::fs::write(rootfs.join("late.txt"), "added after boot\n").unwrap();
    let (out, err, status) = run(&client, "c2", &["cat", "/late.txt"], &guest_rootfs).await;
    assert_eq!(
        (out.as_str(), status),
        ("added after boot\n", 0),
        "stderr: {err}"
    );

    // A directory mounted on the host under the shared dir after boot (how a pod's second container gets
    // its rootfs): virtiofsd's namespace must receive the mount.
    let src = root.path().join("late-mount-src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("m.txt"), "through a later mount\n").unwrap();
    let target = rootfs.join("mnt2");
    std::fs::create_dir_all(&target).unwrap();
    nix::mount::mount(
        Some(&src),
        &target,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .expect("bind mount under the shared dir");
    let (out, err, status) = run(&client, "c2m", &["cat", "/mnt2/m.txt"], &guest_rootfs).await;
    nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH).expect("umount");
    assert_eq!(
        (out.as_str(), status),
        ("through a later mount\n", 0),
        "stderr: {err}"
    );

    // A bigger file round trip (several requests through the queue).
    let big: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(rootfs.join("big.bin"), &big).unwrap();
    let t = Instant::now();
    let (out, err, status) = run(
        &client,
        "c3",
        &[
            "sh",
            "-c",
            "cat /big.bin > /big.copy && stat -c %s /big.copy",
        ],
        &guest_rootfs,
    )
    .await;
    eprintln!("4 MiB read + write through virtio-fs in {:?}", t.elapsed());
    assert_eq!((out.trim(), status), ("4194304", 0), "stderr: {err}");
    assert!(
        std::fs::read(rootfs.join("big.copy")).unwrap() == big,
        "copy differs"
    );

    let dir = vm.paths().dir.clone();
    let exit = vm.stop().await.expect("stop");
    eprintln!("stopped: {exit:?} after {:?} in total", t0.elapsed());
    assert_eq!(exit.path, StopPath::Clean, "{exit:?}");
    assert_eq!(exit.status.code(), Some(0), "{exit:?}");
    assert!(!dir.exists(), "sandbox dir {} left behind", dir.display());
    let left = Command::new("pgrep").arg("-x").arg("virtiofsd").output();
    if let Ok(o) = left {
        assert!(
            o.stdout.is_empty(),
            "virtiofsd left running: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
}

#[tokio::test]
async fn a_dead_virtiofsd_stops_the_vm() {
    if !e2e_enabled("a_dead_virtiofsd_stops_the_vm") {
        return;
    }
    let inputs = Inputs::from_env();
    inputs.require();
    let root = run_root();
    let mut c = vm_config(&inputs, root.path(), 1, 128);
    c.shared_fs = Some(SharedFsConfig::new(virtiofsd()));
    let vm = Vm::start(&c, "e2e-fs-kill")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let client = vm.agent().raw().clone();
    let mut s = Storage::new();
    s.driver = StorageDriver::STORAGE_DRIVER_VIRTIO_FS.into();
    s.source = capsa_runtime::virtiofsd::DEFAULT_TAG.into();
    s.fstype = "virtiofs".into();
    s.mount_point = GUEST_MNT.into();
    let mut r = agent::AddStoragesRequest::new();
    r.storages = vec![s];
    client.add_storages(ctx(), &r).await.expect("AddStorages");

    let pid = Command::new("pgrep")
        .args(["-x", "virtiofsd"])
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .and_then(|l| l.trim().parse::<i32>().ok())
        .expect("virtiofsd pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill virtiofsd");
    let killed = Instant::now();
    // The runtime watches virtiofsd: without it the guest's file accesses would block for ever, so the
    // VMM is killed at once, and reported.
    let vmm_pid = vm.pid();
    let deadline = killed + Duration::from_secs(10);
    while pid_alive(vmm_pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The exit watch reports it right after.
    let mut ended = vm.vmm_ended();
    while ended.is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        ended = vm.vmm_ended();
    }
    eprintln!(
        "virtiofsd killed: VMM gone after {:?}: {ended:?}",
        killed.elapsed()
    );
    assert!(
        ended.as_deref().is_some_and(|e| e.contains("SIGKILL")),
        "the VMM was not stopped after virtiofsd died: {ended:?}"
    );
    assert!(
        vm.agent().check().await.is_err(),
        "the agent must be gone with its VM"
    );
    // Stopping the dead VM still cleans up (and reaps virtiofsd).
    let dir = vm.paths().dir.clone();
    let exit = vm.stop().await.expect("stop");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&exit.status),
        Some(libc::SIGKILL),
        "{exit:?}"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
}
