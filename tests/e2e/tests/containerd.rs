//! containerd 1.6 (Debian's package) runs containers in capsa microVMs through
//! `containerd-shim-capsa-v2`: `ctr run` prints the container's output and passes its exit code on,
//! `ctr task exec` works, and kill + delete leave no VMM, shim or sandbox directory behind, also when
//! virtiofsd is killed under a running task (the VM is stopped, the task exits) and when the whole guest
//! freezes (SIGKILL kills the VM after `rpc_timeout_secs`); four pods started at once all come up with the
//! default timeouts. Fault tests compare a [`leak_snapshot`] (processes, mounts, sandbox dirs, sockets,
//! cgroups) before and after.
//! Gated on CAPSA_E2E=1 (the nested test host, or a host with hardware virtualisation) and on
//! `containerd`/`ctr` being installed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use capsa_e2e::cri::pids_of;
use capsa_e2e::leaks::{leak_snapshot, settled_snapshot, LeakSnapshot};
use capsa_e2e::{e2e_enabled, workspace_root, Inputs};

const IMAGE: &str = "docker.io/library/busybox:capsa";
const RUNTIME: &str = "io.containerd.capsa.v2";
/// `ctr run` of a throw-away container with capsa's runtime (image, id and command follow).
const RUN_RM: [&str; 6] = [
    "run",
    "--rm",
    "--snapshotter",
    "native",
    "--runtime",
    RUNTIME,
];

struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Containerd {
    fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("-a")
            .arg(&self.sock)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr")
    }

    /// `ctr run --rm` of the busybox image with capsa's runtime: `flags` go before the image, `cmd` after the id.
    fn run_rm(&self, flags: &[&str], id: &str, cmd: &[&str]) -> Output {
        let mut args = RUN_RM.to_vec();
        args.extend_from_slice(flags);
        args.extend_from_slice(&[IMAGE, id]);
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }

    /// `ctr run -d` of the busybox image with capsa's runtime: `flags` go before the image.
    fn run_detached(&self, flags: &[&str], id: &str, cmd: &[&str]) -> Output {
        let mut args = vec!["run", "-d", "--snapshotter", "native", "--runtime", RUNTIME];
        args.extend_from_slice(flags);
        args.extend_from_slice(&[IMAGE, id]);
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("capsa-run")
    }

    /// What this containerd's capsa sandboxes leave on the host.
    fn leaks(&self) -> LeakSnapshot {
        leak_snapshot(self.dir.path(), &self.state_dir())
    }

    /// Waits (up to 20 s: teardown ends after containerd's delete returns) for the host to be back to
    /// `before`; panics with both snapshots if it is not.
    fn assert_nothing_left(&self, before: &LeakSnapshot) {
        let after = settled_snapshot(
            self.dir.path(),
            &self.state_dir(),
            before,
            Duration::from_secs(20),
        );
        assert_eq!(&after, before, "left behind (right: before, left: after)");
    }

    /// `ctr events` written to `log` until the returned child is killed.
    fn follow_events(&self, log: &Path) -> Child {
        Command::new("ctr")
            .arg("-a")
            .arg(&self.sock)
            .arg("events")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log).expect("events log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("ctr events")
    }

    /// Kills (SIGKILL) and deletes container `id`, task first; fails the test when either is refused.
    fn kill_and_delete(&self, id: &str) {
        let o = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        assert!(o.status.success(), "kill {id}: {}", text(&o));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let o = self.ctr(&["task", "rm", id]);
            if o.status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "task rm {id}: {}", text(&o));
            std::thread::sleep(Duration::from_millis(300));
        }
        let o = self.ctr(&["container", "rm", id]);
        assert!(o.status.success(), "container rm {id}: {}", text(&o));
    }
}

fn have(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The directory holding containerd-shim-capsa-v2 (built next to the test binaries' profile).
fn shim_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/containerd-xxxx → target/<profile>
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    for d in [profile, workspace_root().join("target/release")] {
        if d.join("containerd-shim-capsa-v2").exists() {
            return d;
        }
    }
    panic!("containerd-shim-capsa-v2 not built (cargo build --release -p capsa-runtime)");
}

/// containerd with capsa's shim for test `name`, or `None` (with the reason printed) when the real-guest suites
/// are off or a tool is missing; `tools` are needed besides containerd and ctr.
fn containerd_for(name: &str, tools: &[&str]) -> Option<Containerd> {
    if !e2e_enabled(name) {
        return None;
    }
    let missing: Vec<&str> = ["containerd", "ctr"]
        .iter()
        .chain(tools)
        .copied()
        .filter(|t| !have(t))
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "skipping {name}: {} not installed (apt-get install them)",
            missing.join(", ")
        );
        return None;
    }
    let inputs = Inputs::from_env();
    inputs.require();
    Some(start_containerd(&inputs))
}

fn start_containerd(inputs: &Inputs) -> Containerd {
    // Short paths: Unix socket paths are limited to 107 bytes.
    let dir = tempfile::Builder::new()
        .prefix("ctd")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let root = dir.path();
    let sock = root.join("c.sock");
    let capsa_cfg = root.join("capsa.toml");
    std::fs::write(
        &capsa_cfg,
        format!(
            "[hypervisor]\npath = \"{}\"\nkernel = \"{}\"\ninitrd = \"{}\"\ndefault_memory_mib = 256\n[runtime]\nlog_level = \"debug\"\nstate_dir = \"{}\"\n",
            inputs.vmm.display(),
            inputs.kernel.display(),
            inputs.initrd.display(),
            root.join("capsa-run").display()
        ),
    )
    .expect("write capsa config");
    let cfg = root.join("containerd.toml");
    std::fs::write(
        &cfg,
        format!(
            "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{1}\"\n[ttrpc]\n  address = \"{1}.ttrpc\"\n",
            root.display(),
            sock.display()
        ),
    )
    .expect("write containerd config");
    let path = format!(
        "{}:{}",
        shim_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = std::fs::File::create(root.join("containerd.log")).expect("log");
    let child = Command::new("containerd")
        .arg("-c")
        .arg(&cfg)
        .env("PATH", path)
        .env("CAPSA_CONFIG", &capsa_cfg)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn containerd");
    let c = Containerd { child, dir, sock };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.ctr(&["version"]).status.success() {
        assert!(Instant::now() < deadline, "containerd did not come up");
        std::thread::sleep(Duration::from_millis(200));
    }
    let tar = c.dir.path().join("busybox.tar");
    let st = Command::new("bash")
        .arg(workspace_root().join("tests/e2e/scripts/busybox-oci.sh"))
        .arg(&tar)
        .arg(IMAGE)
        .status()
        .expect("build busybox image");
    assert!(st.success(), "busybox image");
    let o = c.ctr(&["image", "import", &tar.to_string_lossy()]);
    assert!(
        o.status.success(),
        "import: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    c
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn parent_pid(pid: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PPid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn vmm_processes(needle: &str) -> usize {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read(e.path().join("cmdline"))
                        .map(|c| {
                            String::from_utf8_lossy(&c).contains("capsa-vmm")
                                && String::from_utf8_lossy(&c).contains(needle)
                        })
                        .unwrap_or(false)
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn ctr_run_exec_kill_delete_leave_nothing_behind() {
    let Some(c) = containerd_for("ctr_run_exec_kill_delete_leave_nothing_behind", &[]) else {
        return;
    };
    let run = |id: &str, cmd: &[&str]| c.run_rm(&[], id, cmd);
    let before = c.leaks();

    let o = run("e2e-echo", &["echo", "hello"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "hello",
        "{}",
        text(&o)
    );

    let o = run("e2e-exit", &["sh", "-c", "exit 3"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));

    // A cwd the image lacks is created, as runc does.
    let o = c.run_rm(&["--cwd", "/capsa/new/cwd"], "e2e-cwd", &["pwd"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "/capsa/new/cwd",
        "{}",
        text(&o)
    );

    // A long-running container: exec into it, then kill and delete it.
    let o = c.run_detached(&[], "e2e-long", &["sleep", "600"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "x1",
        "e2e-long",
        "echo",
        "from-exec",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "from-exec",
        "{}",
        text(&o)
    );
    let o = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "x2",
        "e2e-long",
        "sh",
        "-c",
        "exit 7",
    ]);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    c.kill_and_delete("e2e-long");

    // virtiofsd killed under a running task: the VM is stopped, the task exits (no wedge), and
    // delete works.
    let o = c.run_detached(&[], "e2e-fsd", &["sleep", "600"]);
    assert!(o.status.success(), "{}", text(&o));
    let sandbox_dir = c.state_dir().join("e2e-fsd");
    let fsd = pids_of("virtiofsd", &sandbox_dir.to_string_lossy());
    // With `--sandbox namespace` virtiofsd forks: kill the worker (the child) if there is one.
    let worker = fsd
        .iter()
        .copied()
        .find(|p| fsd.contains(&parent_pid(*p)))
        .or_else(|| fsd.first().copied())
        .unwrap_or_else(|| panic!("no virtiofsd for {}", sandbox_dir.display()));
    let killed = Instant::now();
    let o = Command::new("kill")
        .args(["-9", &worker.to_string()])
        .output()
        .expect("kill");
    assert!(o.status.success(), "{}", text(&o));
    let stopped_after = loop {
        let o = c.ctr(&["task", "ls"]);
        let line = String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| l.starts_with("e2e-fsd "))
            .map(str::to_owned)
            .unwrap_or_default();
        if line.contains("STOPPED") {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "e2e-fsd still {line:?} 30 s after virtiofsd was killed"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    eprintln!("virtiofsd killed: task STOPPED after {stopped_after:?}");
    let o = c.ctr(&["task", "rm", "e2e-fsd"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = c.ctr(&["container", "rm", "e2e-fsd"]);
    assert!(o.status.success(), "{}", text(&o));

    // Nothing left: no VMM, virtiofsd or shim, no mount, sandbox directory, socket or cgroup.
    c.assert_nothing_left(&before);
    let o = c.ctr(&["task", "ls", "-q"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).trim().is_empty(),
        "{}",
        text(&o)
    );
}

/// The state letter of /proc/PID/stat (R, S, T for stopped, Z for a zombie), `None` once the pid is gone.
fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
}

/// Waits up to `within` for a line of the `ctr events` log that contains every one of `needles`.
fn wait_event(log: &Path, needles: &[&str], within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    loop {
        let seen = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(l) = seen.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            return Some(l.to_owned());
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `rpc_timeout_secs` of the frozen-guest container (its own runtime config), short so the test is.
const FROZEN_RPC_TIMEOUT_SECS: u64 = 10;

/// A guest whose VMM is frozen (SIGSTOP: neither vCPUs nor devices run, the agent answers nothing) still
/// ends on `ctr task kill -s SIGKILL`: the shim waits `rpc_timeout_secs` for the agent, kills the VM and
/// reports exit 137; delete works, nothing is left, and a healthy container runs right after.
#[test]
fn a_frozen_guest_ends_cleanly() {
    let Some(c) = containerd_for("a_frozen_guest_ends_cleanly", &[]) else {
        return;
    };
    let before = c.leaks();
    let events_log = c.dir.path().join("events.log");
    let mut events = c.follow_events(&events_log);

    // A frozen guest.
    let cfg = c.dir.path().join("capsa-frozen.toml");
    let base = std::fs::read_to_string(c.dir.path().join("capsa.toml")).expect("capsa.toml");
    std::fs::write(
        &cfg,
        base.replacen(
            "[hypervisor]\n",
            &format!("[hypervisor]\nrpc_timeout_secs = {FROZEN_RPC_TIMEOUT_SECS}\n"),
            1,
        ),
    )
    .expect("write frozen config");
    let id = "e2e-frozen";
    let o = c.run_detached(
        &["--runtime-config-path", &cfg.to_string_lossy()],
        id,
        &["sleep", "1000"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let vsock = c.state_dir().join(id).join("vsock.sock");
    let vmms = pids_of("capsa-vmm", &vsock.to_string_lossy());
    assert_eq!(vmms.len(), 1, "one VMM for {id}: {vmms:?}");
    let vmm = vmms[0];
    // SAFETY: kill(2) of the VMM this test's containerd started.
    assert_eq!(unsafe { libc::kill(vmm, libc::SIGSTOP) }, 0, "SIGSTOP");
    let frozen = Instant::now();
    let o = c.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    let kill_took = frozen.elapsed();
    let state = proc_state(vmm);
    if state == Some('T') {
        // The shim did not kill it: a failure. Do not leave a stopped VMM behind.
        // SAFETY: as above.
        unsafe { libc::kill(vmm, libc::SIGKILL) };
        panic!(
            "the frozen VMM {vmm} is still stopped after ctr task kill ({kill_took:?}): {}",
            text(&o)
        );
    }
    assert!(o.status.success(), "kill of a frozen guest: {}", text(&o));
    let bound = Duration::from_secs(FROZEN_RPC_TIMEOUT_SECS + 15);
    let exit = wait_event(&events_log, &["/tasks/exit", id], bound);
    let exited_after = frozen.elapsed();
    let exit = exit.unwrap_or_else(|| {
        panic!(
            "no /tasks/exit for {id} within {bound:?} of SIGKILL; events:\n{}",
            std::fs::read_to_string(&events_log).unwrap_or_default()
        )
    });
    assert!(
        exit.contains("\"exit_status\":137"),
        "exit status is not 137: {exit}"
    );
    eprintln!(
        "frozen guest (rpc_timeout_secs = {FROZEN_RPC_TIMEOUT_SECS}): ctr task kill returned after {kill_took:?}, /tasks/exit 137 after {exited_after:?} (bound {bound:?}); VMM state after kill: {state:?}"
    );
    let o = c.ctr(&["task", "rm", id]);
    assert!(o.status.success(), "task rm: {}", text(&o));
    let o = c.ctr(&["container", "rm", id]);
    assert!(o.status.success(), "container rm: {}", text(&o));
    c.assert_nothing_left(&before);
    let log = std::fs::read_to_string(c.dir.path().join("containerd.log")).unwrap_or_default();
    assert!(
        log.contains("did not answer SIGKILL"),
        "the shim log does not give the reason the VM was killed"
    );

    let o = c.run_rm(&[], "e2e-after", &["echo", "healthy"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "healthy");
    c.assert_nothing_left(&before);
    let _ = events.kill();
    let _ = events.wait();
}

/// Four pods (`ctr run -d`, each its own sandbox VM) started at once all come up with the default timeouts;
/// prints how long each took (issue 12's measurement), then removes them and checks nothing is left.
#[test]
fn four_pods_started_at_once_all_come_up() {
    let Some(c) = containerd_for("four_pods_started_at_once_all_come_up", &[]) else {
        return;
    };
    let before = c.leaks();
    let ids = ["e2e-four-1", "e2e-four-2", "e2e-four-3", "e2e-four-4"];
    let started = Instant::now();
    let results: Vec<(&str, Duration, Output)> = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .iter()
            .map(|&id| {
                let c = &c;
                s.spawn(move || {
                    let t = Instant::now();
                    let o = c.run_detached(&[], id, &["sleep", "600"]);
                    (id, t.elapsed(), o)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("ctr run thread"))
            .collect()
    });
    for (id, took, o) in &results {
        eprintln!(
            "four pods at once: {id} up after {took:?} (ctr run -d status {:?})",
            o.status.code()
        );
    }
    eprintln!(
        "four pods at once: all returned after {:?}",
        started.elapsed()
    );
    for (id, _, o) in &results {
        assert!(o.status.success(), "{id}: {}", text(o));
    }
    let o = c.ctr(&["task", "ls"]);
    let listing = String::from_utf8_lossy(&o.stdout).into_owned();
    for id in ids {
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with(&format!("{id} ")) && l.contains("RUNNING")),
            "{id} is not running:\n{listing}"
        );
    }
    assert_eq!(
        vmm_processes(&c.state_dir().to_string_lossy()),
        4,
        "one VM per pod"
    );
    for id in ids {
        c.kill_and_delete(id);
    }
    c.assert_nothing_left(&before);
}

/// A container over its memory limit is killed in the guest: `ctr` sees exit 137 and containerd gets the
/// shim's TaskOOM event.
#[test]
fn an_oom_kill_reaches_containerd_as_a_task_oom_event() {
    let Some(c) = containerd_for("an_oom_kill_reaches_containerd_as_a_task_oom_event", &[]) else {
        return;
    };
    let events_log = c.dir.path().join("events.log");
    let mut events = c.follow_events(&events_log);
    let o = c.run_rm(
        &["--memory-limit", "16777216"],
        "e2e-oom",
        &["sh", "-c", "tail /dev/zero"],
    );
    assert_eq!(o.status.code(), Some(137), "{}", text(&o));
    // Events are published asynchronously; the OOM one may trail the exit.
    assert!(
        wait_event(
            &events_log,
            &["/tasks/oom", "e2e-oom"],
            Duration::from_secs(15)
        )
        .is_some(),
        "no /tasks/oom event for e2e-oom; events seen:\n{}",
        std::fs::read_to_string(&events_log).unwrap_or_default()
    );
    let _ = events.kill();
    let _ = events.wait();
}

/// Entries of /proc/self/mountinfo at or below `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|mp| Path::new(mp).starts_with(dir))
        .map(String::from)
        .collect()
}

/// Two containers of one pod (CRI's sandbox-id annotation, set through `ctr --annotation`) share one VM,
/// each with its own rootfs through the virtio-fs share; a host file bind mount reaches the guest; after
/// delete no VMM, sandbox directory or mount is left.
#[test]
fn two_containers_of_a_pod_each_see_their_own_rootfs() {
    let Some(c) = containerd_for("two_containers_of_a_pod_each_see_their_own_rootfs", &[]) else {
        return;
    };
    assert!(
        workspace_root().join("build/virtiofsd").exists(),
        "build/virtiofsd missing (make virtiofsd)"
    );
    let root = c.dir.path().to_path_buf();
    let before = mounts_under(&root);
    let hosts = root.join("hosts-src");
    std::fs::write(&hosts, "10.9.8.7 pod-host\n").expect("hosts file");
    let pod = "e2e-pod";
    let sandbox_id = format!("io.kubernetes.cri.sandbox-id={pod}");

    let o = c.ctr(&[
        "run",
        "-d",
        "--snapshotter",
        "native",
        "--runtime",
        RUNTIME,
        "--annotation",
        &sandbox_id,
        "--annotation",
        "io.kubernetes.cri.container-type=sandbox",
        IMAGE,
        pod,
        "sleep",
        "600",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let o = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "w1",
        pod,
        "sh",
        "-c",
        "echo one > /whoami",
    ]);
    assert!(o.status.success(), "{}", text(&o));

    // The second container joins the pod's shim and VM and gets its own rootfs and the host's file.
    let mount = format!(
        "type=bind,src={},dst=/etc/hosts,options=rbind:ro",
        hosts.display()
    );
    let o = c.run_rm(
        &[
            "--annotation",
            &sandbox_id,
            "--annotation",
            "io.kubernetes.cri.container-type=container",
            "--mount",
            &mount,
        ],
        "e2e-c2",
        &[
            "sh",
            "-c",
            "test ! -e /whoami && echo two > /whoami && cat /whoami /etc/hosts",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "two\n10.9.8.7 pod-host\n",
        "{}",
        text(&o)
    );
    assert_eq!(
        vmm_processes(&c.state_dir().to_string_lossy()),
        1,
        "the pod's containers must share one VM"
    );
    // The first container's rootfs is its own, and it survived the second's delete.
    let o = c.ctr(&["task", "exec", "--exec-id", "r1", pod, "cat", "/whoami"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "one\n", "{}", text(&o));

    let o = c.ctr(&["task", "kill", "-s", "SIGKILL", pod]);
    assert!(o.status.success(), "{}", text(&o));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = c.ctr(&["task", "rm", pod]);
        if o.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "task rm: {}", text(&o));
        std::thread::sleep(Duration::from_millis(300));
    }
    let o = c.ctr(&["container", "rm", pod]);
    assert!(o.status.success(), "{}", text(&o));
    std::thread::sleep(Duration::from_secs(1));
    let state = c.state_dir();
    assert_eq!(
        vmm_processes(&state.to_string_lossy()),
        0,
        "a capsa-vmm survived"
    );
    let left: Vec<_> = std::fs::read_dir(&state)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", state.display());
    assert_eq!(mounts_under(&root), before, "mounts left behind");
}

/// Debian's `docker-registry` (distribution 2.x) serving plain HTTP on a loopback port; killed on drop.
struct Registry {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_registry() -> Registry {
    let dir = tempfile::Builder::new()
        .prefix("reg")
        .tempdir_in("/tmp")
        .expect("registry tempdir");
    // A free port: bind port 0, note it, release it for the registry.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let cfg = dir.path().join("config.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        ),
    )
    .expect("write registry config");
    let log = std::fs::File::create(dir.path().join("registry.log")).expect("registry log");
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("registry log"))
        .stderr(log)
        .spawn()
        .expect("spawn docker-registry");
    let reg = Registry { child, addr, dir };
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(&reg.addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "docker-registry did not listen on {}: {}",
            reg.addr,
            std::fs::read_to_string(reg.dir.path().join("registry.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    reg
}

/// The busybox image pushed by skopeo to a local registry, pulled by containerd over plain HTTP into a
/// namespace of its own, runs in a capsa VM; no VMM is left afterwards.
#[test]
fn busybox_pulled_from_a_local_registry_runs_in_a_vm() {
    let Some(c) = containerd_for(
        "busybox_pulled_from_a_local_registry_runs_in_a_vm",
        &["docker-registry", "skopeo"],
    ) else {
        return;
    };
    let reg = start_registry();
    let image = format!("{}/busybox:capsa", reg.addr);

    // start_containerd left the OCI layout archive (oci-layout, index.json, blobs/) in its directory.
    let tar = c.dir.path().join("busybox.tar");
    let o = Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
        .arg(format!("oci-archive:{}", tar.display()))
        .arg(format!("docker://{image}"))
        .env("HOME", c.dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("run skopeo");
    assert!(o.status.success(), "skopeo copy: {}", text(&o));

    let ns = ["-n", "e2e-registry"];
    let mut args = ns.to_vec();
    args.extend([
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "native",
        &image,
    ]);
    let o = c.ctr(&args);
    assert!(o.status.success(), "pull: {}", text(&o));

    let mut args = ns.to_vec();
    args.extend(RUN_RM);
    args.extend([image.as_str(), "e2e-pulled", "echo", "pulled"]);
    let o = c.ctr(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "pulled",
        "{}",
        text(&o)
    );

    std::thread::sleep(Duration::from_secs(1));
    let state = c.state_dir();
    assert_eq!(
        vmm_processes(&state.to_string_lossy()),
        0,
        "a capsa-vmm survived"
    );
    let left: Vec<_> = std::fs::read_dir(&state)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", state.display());
}
