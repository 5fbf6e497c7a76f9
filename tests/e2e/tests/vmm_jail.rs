//! capsa-vmm's jail and the pod cgroup through containerd's CRI (issue 11, item 1), in one capsa pod with
//! a `cgroup_parent`. While the pod runs, every thread of its VMM must show a non-zero uid (the same on all
//! four ids), no capabilities in any set, `NoNewPrivs: 1`, `Seccomp: 2` (its own filter), a root directory that is not the host's (and
//! holds no `/etc`, `/proc` or `/usr`), mount, IPC, network and UTS namespaces of its own, and membership in the pod's
//! cgroup (the sandbox's `cgroupsPath` = `<cgroup_parent>/<pod id>`); virtiofsd must be in the same cgroup;
//! the container's stdout reaches its log and ExecSync works.
//!
//! Then the VMM dies by SIGSYS (issue 11, item 2: "a violation kills the process and is reported by the
//! runtime as the VM's death with the reason"): the test sends it `kill -SYS`, which the runtime cannot tell
//! from the kernel's seccomp kill (both are a death by SIGSYS as waitid(2) reports it; the filter itself
//! killing the VMM is covered by `cargo test -p capsa-vmm --test seccomp`, whose hook only debug builds carry).
//! The container must exit through containerd: CRI shows it exited with status 137 (128 + SIGKILL, what runc
//! reports for a task killed by a signal; the container's processes died with their VM, as if SIGKILLed),
//! `ctr task ls` shows its task STOPPED or no longer (CRI deletes a task once it has handled its exit), and
//! the shim's log (in containerd's) names SIGSYS and seccomp as the reason.
//! After RemovePodSandbox nothing is left: no VMM, no jail root, no uid lock, no host mount under the state
//! dir, no pod cgroup.
//!
//! Each check prints `JAILCHECK <name>: PASS|FAIL ...`; gated on CAPSA_E2E=1 and containerd being
//! installed; everything is removed at the end, on failure too.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capsa_e2e::cri::{
    container_config, containerd_available, log_lines, pids_of, pod_config, Cri, CriContainerd,
};
use capsa_e2e::{e2e_enabled, Inputs};

const TEST: &str = "vmm_jail_through_cri";
const CGROUP_PARENT: &str = "/capsa-e2e-jail";

#[derive(Default)]
struct Report {
    failures: Vec<String>,
    checks: usize,
}

impl Report {
    fn record(&mut self, name: &str, r: Result<String, String>) {
        self.checks += 1;
        match r {
            Ok(m) => eprintln!("JAILCHECK {name}: PASS {m}"),
            Err(m) => {
                eprintln!("JAILCHECK {name}: FAIL {m}");
                self.failures.push(format!("{name}: {m}"));
            }
        }
    }
}

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

/// Every thread of `pid`: uid non-zero and the same everywhere, no capabilities, no new privileges, a
/// seccomp filter.
fn check_threads(pid: i32) -> Result<String, String> {
    let dir = PathBuf::from(format!("/proc/{pid}/task"));
    let tids: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut uid = None;
    for tid in &tids {
        let st = std::fs::read_to_string(dir.join(tid).join("status"))
            .map_err(|e| format!("thread {tid}: {e}"))?;
        let ids: Vec<String> = status_field(&st, "Uid:")
            .split_whitespace()
            .map(String::from)
            .collect();
        if ids.len() != 4 || ids.iter().any(|u| u == "0" || *u != ids[0]) {
            return Err(format!("thread {tid}: Uid: {ids:?}"));
        }
        if *uid.get_or_insert_with(|| ids[0].clone()) != ids[0] {
            return Err(format!("thread {tid}: uid {} differs from {uid:?}", ids[0]));
        }
        let gids = status_field(&st, "Gid:");
        if gids.split_whitespace().any(|g| g == "0") {
            return Err(format!("thread {tid}: Gid: {gids}"));
        }
        for key in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            let v = status_field(&st, key);
            if v != "0000000000000000" {
                return Err(format!("thread {tid}: {key} {v}"));
            }
        }
        let nnp = status_field(&st, "NoNewPrivs:");
        if nnp != "1" {
            return Err(format!("thread {tid}: NoNewPrivs: {nnp}"));
        }
        // Seccomp filter mode on every thread (issue 11 item 2: each installs its own allowlist).
        let seccomp = status_field(&st, "Seccomp:");
        if seccomp != "2" {
            return Err(format!("thread {tid}: Seccomp: {seccomp}"));
        }
    }
    Ok(format!(
        "{} threads, uid {}, CapEff 0000000000000000, NoNewPrivs 1, Seccomp 2",
        tids.len(),
        uid.unwrap_or_default()
    ))
}

fn check_root(pid: i32) -> Result<String, String> {
    let theirs = std::fs::metadata(format!("/proc/{pid}/root/")).map_err(|e| e.to_string())?;
    let ours = std::fs::metadata("/").map_err(|e| e.to_string())?;
    if (theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()) {
        return Err("the VMM's root is the host's /".into());
    }
    for p in ["etc", "proc", "usr", "sys", "home"] {
        if Path::new(&format!("/proc/{pid}/root/{p}")).exists() {
            return Err(format!("/{p} is visible in the jail"));
        }
    }
    for ns in ["mnt", "ipc", "net", "uts"] {
        let a = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).map_err(|e| e.to_string())?;
        let b = std::fs::read_link(format!("/proc/self/ns/{ns}")).map_err(|e| e.to_string())?;
        if a == b {
            return Err(format!(
                "the VMM shares the host's {ns} namespace ({})",
                a.display()
            ));
        }
    }
    let entries: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root/"))
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    Ok(format!(
        "own root (dev {} ino {}) holding {entries:?}, own mnt, ipc, net and uts namespaces",
        theirs.dev(),
        theirs.ino()
    ))
}

/// The cgroup path of `pid` on the unified hierarchy (`0::/path`), or of its memory controller on v1.
fn cgroup_of(pid: i32) -> Result<String, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).map_err(|e| e.to_string())?;
    let v1_memory = text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
        ctrl.split(',')
            .any(|c| c == "memory")
            .then(|| path.to_owned())
    });
    let v2 = text
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(String::from));
    v1_memory
        .or(v2)
        .ok_or_else(|| format!("no memory or unified cgroup in {text:?}"))
}

async fn suite(c: &CriContainerd, cri: &Cri, report: &mut Report, pods: &mut Vec<String>) {
    let mut cfg = pod_config("jail", &c.log_dir("jail"));
    std::fs::create_dir_all(c.log_dir("jail")).unwrap();
    if let Some(linux) = cfg.linux.as_mut() {
        linux.cgroup_parent = CGROUP_PARENT.into();
    }
    let pod = match cri.run_pod(&cfg, "capsa").await {
        Ok(p) => p,
        Err(e) => {
            report.record("run-pod", Err(e.to_string()));
            return;
        }
    };
    pods.push(pod.clone());
    let cid = match cri
        .run_container(
            &pod,
            &cfg,
            container_config("app", &["sh", "-c", "echo jailed-hello; exec sleep 600"]),
        )
        .await
    {
        Ok(id) => id,
        Err(e) => {
            report.record("run-container", Err(e.to_string()));
            return;
        }
    };
    let sandbox_dir = c.capsa_state.join(&pod);
    let vsock = sandbox_dir.join("vsock.sock");
    let vmms = pids_of("capsa-vmm", &vsock.to_string_lossy());
    let Some(&vmm) = vmms.first() else {
        report.record(
            "find-vmm",
            Err(format!("no capsa-vmm serving {}", vsock.display())),
        );
        return;
    };
    report.record(
        "find-vmm",
        if vmms.len() == 1 {
            Ok(format!("pid {vmm}"))
        } else {
            Err(format!("{vmms:?}"))
        },
    );
    report.record("threads", check_threads(vmm));
    report.record("root", check_root(vmm));
    let want = format!("{CGROUP_PARENT}/{pod}");
    report.record(
        "vmm-cgroup",
        cgroup_of(vmm).and_then(|cg| {
            if cg == want {
                Ok(cg)
            } else {
                Err(format!("in {cg}, want {want}"))
            }
        }),
    );
    let fs_sock = sandbox_dir.join("fs.sock");
    let vfsds = pids_of("virtiofsd", &fs_sock.to_string_lossy());
    report.record(
        "virtiofsd-cgroup",
        if vfsds.is_empty() {
            Err(format!("no virtiofsd serving {}", fs_sock.display()))
        } else {
            vfsds
                .iter()
                .map(|&p| {
                    cgroup_of(p).and_then(|cg| {
                        if cg == want {
                            Ok(format!("{p} in {cg}"))
                        } else {
                            Err(format!("virtiofsd {p} in {cg}, want {want}"))
                        }
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.join(", "))
        },
    );
    // The pod still works: stdout through the log, ExecSync.
    let log = c.log_dir("jail").join("app.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lines = Vec::new();
    while Instant::now() < deadline {
        lines = log_lines(&log, "stdout");
        if lines.iter().any(|l| l == "jailed-hello") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report.record(
        "stdout",
        if lines.iter().any(|l| l == "jailed-hello") {
            Ok("jailed-hello in the container log".into())
        } else {
            Err(format!("log lines {lines:?}"))
        },
    );
    report.record(
        "exec",
        match cri
            .exec_sync(
                &cid,
                &["sh", "-c", "echo exec-ok; cat /proc/self/cgroup >/dev/null"],
            )
            .await
        {
            Ok(r) if r.exit_code == 0 && String::from_utf8_lossy(&r.stdout).trim() == "exec-ok" => {
                Ok("exec-ok".into())
            }
            Ok(r) => Err(format!(
                "exit {} stdout {:?} stderr {:?}",
                r.exit_code,
                String::from_utf8_lossy(&r.stdout),
                String::from_utf8_lossy(&r.stderr)
            )),
            Err(e) => Err(e.to_string()),
        },
    );
    let uid_locks = |state: &Path| -> Vec<String> {
        std::fs::read_dir(state.join(".jail/uids"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let jail_root = c.capsa_state.join(".jail/roots").join(&pod);
    report.record(
        "jail-state-while-running",
        if jail_root.is_dir() && uid_locks(&c.capsa_state).len() == 1 {
            Ok(format!(
                "root {} and uid lock {:?}",
                jail_root.display(),
                uid_locks(&c.capsa_state)
            ))
        } else {
            Err(format!(
                "root {} exists: {}, locks {:?}",
                jail_root.display(),
                jail_root.is_dir(),
                uid_locks(&c.capsa_state)
            ))
        },
    );

    // The VMM dies by SIGSYS: the task exits through containerd, with the reason in the shim's log.
    // SAFETY: plain kill(2) of the VMM's pid, found above and checked alive by the checks just made.
    let killed = unsafe { libc::kill(vmm, libc::SIGSYS) };
    report.record(
        "sigsys-exit",
        if killed != 0 {
            Err(format!(
                "kill -SYS {vmm}: {}",
                std::io::Error::last_os_error()
            ))
        } else {
            match cri.wait_exit(&cid, Duration::from_secs(60)).await {
                Ok(137) => Ok("the container exited with status 137 (CRI ContainerStatus)".into()),
                Ok(code) => Err(format!("exit status {code}, want 137 (128 + SIGKILL)")),
                Err(e) => Err(e),
            }
        },
    );
    let tasks = c.ctr(&["-n", "k8s.io", "task", "ls"]);
    let tasks = String::from_utf8_lossy(&tasks.stdout).into_owned();
    report.record(
        "sigsys-task-stopped",
        // containerd's CRI plugin deletes a task once it has handled its exit: STOPPED, or already gone.
        match tasks.lines().find(|l| l.starts_with(&cid)) {
            Some(l) if l.split_whitespace().last() == Some("STOPPED") => Ok(l.trim().to_owned()),
            Some(l) => Err(format!("ctr task ls: {l:?}")),
            None => Ok(format!("task {cid} stopped and already deleted by CRI")),
        },
    );
    let log = std::fs::read_to_string(c.dir.join("containerd.log")).unwrap_or_default();
    report.record(
        "sigsys-shim-log",
        match log
            .lines()
            .find(|l| l.contains("the VM died") && l.contains(&pod))
        {
            Some(l) if l.contains("SIGSYS") && l.contains("seccomp") => Ok(l.trim().to_owned()),
            Some(l) => Err(format!("the shim's log names no SIGSYS/seccomp: {l}")),
            None => Err("no \"the VM died\" line for the pod in containerd's log".into()),
        },
    );

    // Remove the pod: nothing of the jail or the cgroup is left.
    if let Err(e) = cri.remove_pod(&pod).await {
        report.record("remove-pod", Err(e.to_string()));
        return;
    }
    pods.retain(|p| *p != pod);
    let deadline = Instant::now() + Duration::from_secs(20);
    let leftovers = loop {
        let mut left = Vec::new();
        if std::fs::metadata(format!("/proc/{vmm}")).is_ok() {
            left.push(format!("VMM {vmm} still running"));
        }
        if jail_root.exists() {
            left.push(format!("jail root {}", jail_root.display()));
        }
        let locks = uid_locks(&c.capsa_state);
        if !locks.is_empty() {
            left.push(format!("uid locks {locks:?}"));
        }
        let state = c.capsa_state.to_string_lossy().into_owned();
        let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&state))
            .map(String::from)
            .collect();
        if !mounts.is_empty() {
            left.push(format!("mounts {mounts:?}"));
        }
        let cg = Path::new("/sys/fs/cgroup").join(want.trim_start_matches('/'));
        if cg.exists() {
            left.push(format!("cgroup {}", cg.display()));
        }
        if left.is_empty() || Instant::now() > deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    report.record(
        "nothing-left",
        if leftovers.is_empty() {
            Ok("no VMM, jail root, uid lock, mount or pod cgroup".into())
        } else {
            Err(leftovers.join("; "))
        },
    );
}

#[test]
fn vmm_jail_through_cri() {
    if !e2e_enabled(TEST) || !containerd_available(TEST) {
        return;
    }
    let inputs = Inputs::from_env();
    inputs.require();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = CriContainerd::start(&inputs);
    let started = Instant::now();
    let mut report = Report::default();
    let mut pods = Vec::new();
    let run = rt.block_on(async {
        let cri = c.client().await;
        tokio::time::timeout(
            Duration::from_secs(240),
            suite(&c, &cri, &mut report, &mut pods),
        )
        .await
    });
    if run.is_err() {
        report.record("suite", Err("timed out after 240 s".into()));
    }
    if !pods.is_empty() {
        let cri = rt.block_on(c.client());
        for id in &pods {
            let _ = rt.block_on(cri.remove_pod(id));
        }
    }
    eprintln!("{TEST}: {:?} in all", started.elapsed());
    let tail = if report.failures.is_empty() {
        String::new()
    } else {
        c.log_tail()
    };
    drop(c);
    let _ = std::fs::remove_dir(
        Path::new("/sys/fs/cgroup").join(CGROUP_PARENT.trim_start_matches('/')),
    );
    assert!(
        report.failures.is_empty(),
        "{} check(s) failed:\n{}\n--- containerd log ---\n{tail}",
        report.failures.len(),
        report.failures.join("\n")
    );
    assert_eq!(report.checks, 12, "not every check ran");
}
