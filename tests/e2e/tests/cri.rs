//! Pods through containerd's CRI (runtime.v1) with runtime handler `capsa`, then the same pod under `runc`:
//! RunPodSandbox, two containers, StartContainer, ContainerStatus exit codes, ExecSync, the container
//! logs containerd writes, StopPodSandbox, RemovePodSandbox. Both handlers must give the same stdout and
//! exit codes; `uname -r` must differ (the guest kernel vs the test host's), which proves the pod ran in
//! the VM. Gated on CAPSA_E2E=1 and containerd being installed; containerd, shims, VMMs, mounts and the
//! temporary directory are removed at the end, on failure too.

use std::time::Duration;

use capsa_e2e::cri::{
    container_config, containerd_available, log_lines, pod_config, CriContainerd,
};
use capsa_e2e::{e2e_enabled, Inputs};

/// What one pod run observed.
#[derive(Debug, PartialEq)]
struct PodRun {
    /// stdout lines of container "one" from its CRI log (kernel release removed).
    one_stdout: Vec<String>,
    one_stderr: Vec<String>,
    one_exit: i32,
    two_exit: i32,
    exec_stdout: String,
    exec_stderr: String,
    exec_exit: i32,
    /// `uname -r` inside the pod.
    kernel: String,
    /// `nproc` and MemTotal (KiB) seen by container two.
    cpus: u32,
    mem_total_kib: u64,
    /// `capsa list --json` while the pod ran (capsa only).
    listed: Option<serde_json::Value>,
    /// `capsa metrics` while the pod ran (capsa only).
    metrics: String,
}

/// `capsa ARGS --state-dir <the test's>`'s stdout.
fn capsa_operator(c: &CriContainerd, args: &[&str]) -> Result<Vec<u8>, String> {
    let out = std::process::Command::new(capsa_e2e::cri::shim_dir().join("capsa"))
        .args(args)
        .arg("--state-dir")
        .arg(&c.capsa_state)
        .output()
        .map_err(|e| format!("capsa {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "capsa {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out.stdout)
}

/// The pod's resources as the kubelet passes them (the sum of its containers' limits): 256 MiB and one
/// CPU. containerd turns them into the sandbox annotations that size a capsa VM: one vCPU and 128 MiB
/// for the guest on top, so 2 vCPUs and 384 MiB where an unsized pod gets 1 and 256.
fn pod_resources() -> k8s_cri::v1::LinuxContainerResources {
    k8s_cri::v1::LinuxContainerResources {
        memory_limit_in_bytes: 256 << 20,
        cpu_quota: 100_000,
        cpu_period: 100_000,
        ..Default::default()
    }
}

async fn run_pod(c: &CriContainerd, handler: &str) -> Result<PodRun, String> {
    let cri = c.client().await;
    let name = format!("pod-{handler}");
    let log_dir = c.log_dir(&name);
    let mut pod_cfg = pod_config(&name, &log_dir);
    if let Some(linux) = pod_cfg.linux.as_mut() {
        linux.resources = Some(pod_resources());
    }
    let pod = cri
        .run_pod(&pod_cfg, handler)
        .await
        .map_err(|e| format!("RunPodSandbox: {e}"))?;

    let result = async {
        let one = cri
            .run_container(
                &pod,
                &pod_cfg,
                container_config(
                    "one",
                    &[
                        "sh",
                        "-c",
                        "echo hello from one; uname -r; echo to-stderr >&2; exit 3",
                    ],
                ),
            )
            .await
            .map_err(|e| format!("container one: {e}"))?;
        let two = cri
            .run_container(
                &pod,
                &pod_cfg,
                container_config("two", &["sh", "-c", "echo two up; sleep 600"]),
            )
            .await
            .map_err(|e| format!("container two: {e}"))?;
        let one_exit = cri.wait_exit(&one, Duration::from_secs(120)).await?;
        let exec = cri
            .exec_sync(
                &two,
                &["sh", "-c", "echo exec-out; echo exec-err >&2; exit 2"],
            )
            .await
            .map_err(|e| format!("ExecSync: {e}"))?;
        // What runs as PID 1 in container two's pid namespace (the pod's pause) and which signals it handles,
        // printed to explain the StopContainer exit status below should it change.
        if let Ok(p1) = cri
            .exec_sync(
                &two,
                &[
                    "sh",
                    "-c",
                    "echo comm=$(cat /proc/1/comm) pidns=$(readlink /proc/1/ns/pid); grep -E 'SigIgn|SigCgt' /proc/1/status",
                ],
            )
            .await
        {
            eprintln!("{handler}: container two, PID 1: {}", String::from_utf8_lossy(&p1.stdout).replace('\n', " "));
        }
        let size = cri
            .exec_sync(&two, &["sh", "-c", "nproc; grep MemTotal /proc/meminfo"])
            .await
            .map_err(|e| format!("ExecSync nproc: {e}"))?;
        let size = String::from_utf8_lossy(&size.stdout).into_owned();
        let mut words = size.split_whitespace();
        let cpus = words.next().and_then(|w| w.parse().ok());
        let mem_total_kib = words.nth(1).and_then(|w| w.parse().ok());
        let (Some(cpus), Some(mem_total_kib)) = (cpus, mem_total_kib) else {
            return Err(format!("nproc / MemTotal: {size:?}"));
        };
        let (listed, metrics) = if handler == "capsa" {
            let list = capsa_operator(c, &["list", "--json"])?;
            let list = serde_json::from_slice(&list).map_err(|e| format!("capsa list: {e}"))?;
            let metrics = capsa_operator(c, &["metrics"])?;
            (Some(list), String::from_utf8_lossy(&metrics).into_owned())
        } else {
            (None, String::new())
        };
        let st = cri.status(&two).await.map_err(|e| e.to_string())?;
        if st.state != k8s_cri::v1::ContainerState::ContainerRunning as i32 {
            return Err(format!("container two is not running: {st:?}"));
        }
        // Stop the long-running one; CRI escalates to SIGKILL.
        cri.rt
            .clone()
            .stop_container(k8s_cri::v1::StopContainerRequest {
                container_id: two.clone(),
                timeout: 2,
            })
            .await
            .map_err(|e| format!("StopContainer: {e}"))?;
        let two_exit = cri.wait_exit(&two, Duration::from_secs(60)).await?;
        let log = log_dir.join("one.log");
        let mut one_stdout = log_lines(&log, "stdout");
        let kernel = if one_stdout.len() == 2 {
            one_stdout.remove(1)
        } else {
            String::new()
        };
        let two_log = log_lines(&log_dir.join("two.log"), "stdout");
        if two_log != ["two up"] {
            return Err(format!("two.log: {two_log:?}"));
        }
        Ok::<_, String>(PodRun {
            one_stdout,
            one_stderr: log_lines(&log, "stderr"),
            one_exit,
            two_exit,
            exec_stdout: String::from_utf8_lossy(&exec.stdout).into_owned(),
            exec_stderr: String::from_utf8_lossy(&exec.stderr).into_owned(),
            exec_exit: exec.exit_code,
            kernel,
            cpus,
            mem_total_kib,
            listed,
            metrics,
        })
    }
    .await;
    let removed = cri.remove_pod(&pod).await;
    let run = result?;
    removed.map_err(|e| format!("Stop/RemovePodSandbox: {e}"))?;
    Ok(run)
}

#[test]
fn cri_pod_under_capsa_and_runc() {
    if !e2e_enabled("cri_pod_under_capsa_and_runc")
        || !containerd_available("cri_pod_under_capsa_and_runc")
    {
        return;
    }
    let inputs = Inputs::from_env();
    inputs.require();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = CriContainerd::start(&inputs);
    // Both handlers run whatever happens to the first, so a capsa failure still shows runc's result.
    let capsa = rt.block_on(run_pod(&c, "capsa"));
    eprintln!("capsa: {capsa:?}");
    let runc = rt.block_on(run_pod(&c, "runc"));
    eprintln!("runc:  {runc:?}");
    // A pod whose limits need a VM over hypervisor.max_memory_mib (8 GiB) is refused at RunPodSandbox,
    // with the numbers, and leaves nothing behind (checked with the state dir below).
    let too_big = rt.block_on(async {
        let cri = c.client().await;
        let mut cfg = pod_config("pod-too-big", &c.log_dir("pod-too-big"));
        if let Some(linux) = cfg.linux.as_mut() {
            linux.resources = Some(k8s_cri::v1::LinuxContainerResources {
                memory_limit_in_bytes: 100 << 30,
                ..Default::default()
            });
        }
        cri.run_pod(&cfg, "capsa").await
    });
    let tail = c.log_tail();
    let runc = runc.unwrap_or_else(|e| panic!("pod under runc: {e}\n{tail}"));
    assert_eq!(runc.one_stdout, ["hello from one"]);
    assert_eq!(runc.one_exit, 3);
    assert_eq!(runc.exec_exit, 2);
    // The capsa pod's resources are gone even when it failed.
    let left: Vec<_> = std::fs::read_dir(&c.capsa_state)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in capsa's state dir: {left:?}");
    assert!(capsa_e2e::cri::pids_mentioning(&c.capsa_state.to_string_lossy()).is_empty());
    match too_big {
        Ok(id) => panic!("a pod of 100 GiB ran as {id}"),
        Err(e) => assert!(
            e.message().contains("pod's memory limit of 102400 MiB")
                && e.message().contains("max_memory_mib"),
            "{e:?}"
        ),
    }
    let capsa = capsa.unwrap_or_else(|e| panic!("pod under capsa: {e}\n{tail}"));
    // Sized from the pod's resources (see pod_resources): 2 vCPUs and a 384 MiB VM, of which the guest
    // kernel keeps some for itself; an unsized pod would show 1 and under 256 MiB.
    assert_eq!(capsa.cpus, 2, "{capsa:?}");
    // The operator's view of the running pod.
    let listed = capsa.listed.as_ref().and_then(|l| l.as_array().cloned());
    let listed = listed.unwrap_or_default();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let entry = &listed[0];
    assert_eq!(entry["pod"]["name"], "pod-capsa", "{entry}");
    assert_eq!(entry["pod"]["namespace"], "default", "{entry}");
    assert_eq!(entry["state"], "running", "{entry}");
    assert_eq!(entry["vcpus"], 2, "{entry}");
    assert_eq!(entry["memory_mib"], 384, "{entry}");
    assert!(entry["vmm_pid"].as_i64().is_some_and(|p| p > 1), "{entry}");
    // And its metrics: the VM's size, the agent answering, the guest's memory, the VMM's memory.
    let m = &capsa.metrics;
    let series = |name: &str| -> Option<f64> {
        m.lines()
            .find(|l| l.starts_with(name) && l.contains("pod=\"pod-capsa\""))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    assert_eq!(series("capsa_vm_vcpus{"), Some(2.0), "{m}");
    assert_eq!(
        series("capsa_vm_memory_bytes{"),
        Some(384.0 * 1048576.0),
        "{m}"
    );
    assert_eq!(series("capsa_agent_up{"), Some(1.0), "{m}");
    assert!(
        series("capsa_guest_memory_total_bytes{").is_some_and(|b| b > 256.0 * 1048576.0),
        "{m}"
    );
    assert!(
        series("capsa_process_resident_memory_bytes{").is_some_and(|b| b > 1048576.0),
        "{m}"
    );
    assert!(
        (300 * 1024..=384 * 1024).contains(&capsa.mem_total_kib),
        "{capsa:?}"
    );

    assert_eq!(capsa.one_stdout, ["hello from one"]);
    assert_eq!(capsa.one_stderr, ["to-stderr"]);
    assert_eq!(capsa.one_exit, 3);
    assert_eq!(capsa.exec_stdout, "exec-out\n");
    assert_eq!(capsa.exec_stderr, "exec-err\n");
    assert_eq!(capsa.exec_exit, 2);
    // StopContainer (SIGTERM, 2 s, SIGKILL) on `sh -c 'echo; sleep 600'`: the container shares the pod's pid
    // namespace (CRI's default), so its `sleep` is not a namespace's PID 1 and SIGTERM ends it: 143 under both.
    // (capsa gave 137 while the agent put each container in a pid namespace of its own.)
    assert_eq!(
        (capsa.two_exit, runc.two_exit),
        (143, 143),
        "{capsa:?} {runc:?}"
    );
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(runc.kernel, host_kernel.trim());
    assert_ne!(
        capsa.kernel, runc.kernel,
        "the capsa pod ran in the guest kernel"
    );
    assert!(!capsa.kernel.is_empty());
    let same = |r: &PodRun| {
        // (nproc and MemTotal differ by design: the VM's size against the test host's.)
        (
            r.one_stdout.clone(),
            r.one_stderr.clone(),
            r.one_exit,
            r.exec_stdout.clone(),
            r.exec_stderr.clone(),
            r.exec_exit,
        )
    };
    assert_eq!(same(&capsa), same(&runc), "runc and capsa agree");
    drop(c);
}
