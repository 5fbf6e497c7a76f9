//! Checking and adapting an OCI runtime spec sent by the host before libcontainer sees it.
//!
//! The host's spec describes the container as a runc host would run it; inside the guest some parts
//! mean something else (namespace paths of the host, cgroup paths of the host, hooks that live on the
//! host). `prepare_spec` refuses what is broken or hostile with an error naming the field, and rewrites
//! what must point into the guest.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType, LinuxResources, Process, Spec};

use super::path::{clean_absolute, resolve_in_root};

/// A spec the agent will not run, with the reason.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("invalid OCI spec JSON: {0}")]
    Json(String),
    #[error(
        "unknown namespace type {0:?} (known: pid, network, mount, ipc, uts, user, cgroup, time)"
    )]
    UnknownNamespace(String),
    #[error("namespace {0:?} is listed twice")]
    DuplicateNamespace(String),
    #[error("the spec has no process")]
    NoProcess,
    #[error("process.args is empty")]
    NoArgs,
    #[error("process.cwd {0:?} must be an absolute path")]
    RelativeCwd(PathBuf),
    #[error("rootfs {0:?} does not exist or is not a directory")]
    MissingRootfs(PathBuf),
    #[error("the spec names no rootfs (root.path) and the request names no rootfs storage")]
    NoRootfs,
    #[error("rootfs path: {0}")]
    RootfsPath(super::path::PathError),
    #[error("mount destination {dest:?}: {err}")]
    MountDestination {
        dest: PathBuf,
        err: super::path::PathError,
    },
    #[error("bind mount source {0:?} does not exist in the guest")]
    MissingBindSource(PathBuf),
    #[error("bind mount source {0:?} must be an absolute path")]
    RelativeBindSource(PathBuf),
    #[error("resource limit {field} = {value} is out of range: {why}")]
    Limit {
        field: &'static str,
        value: String,
        why: String,
    },
    #[error("rlimit {name}: soft limit {soft} is above hard limit {hard}")]
    Rlimit { name: String, soft: u64, hard: u64 },
    #[error("sysctl {key:?}: {why}")]
    Sysctl { key: String, why: &'static str },
    #[error("linux.rootfsPropagation {0:?} is not one of shared, slave, private, unbindable (with or without an r prefix)")]
    RootfsPropagation(String),
}

/// The annotation containerd's CRI puts on every container it creates; `sandbox` marks the pod's own
/// (pause) container, the owner of the pod's namespaces.
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

const KNOWN_NAMESPACES: &[&str] = &[
    "pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time",
];

/// Where the pod's shared namespaces live in the guest (bind-mounted namespace files).
#[derive(Debug, Clone)]
pub struct PodNamespaces {
    pub ipc: PathBuf,
    pub uts: PathBuf,
    /// The pod's pid namespace, for containers that share it (Kubernetes' `shareProcessNamespace`).
    pub pid: PathBuf,
}

/// What `prepare_spec` needs to know about the guest.
#[derive(Debug, Clone)]
pub struct PrepareContext<'a> {
    pub container_id: &'a str,
    /// Mount point of the storage that holds the rootfs, when the request names one.
    pub rootfs_storage: Option<&'a Path>,
    pub pod: &'a PodNamespaces,
    /// The cgroup (relative to the cgroup2 root) that the container gets.
    pub cgroup_path: &'a str,
    /// Number of online CPUs and memory nodes, for cpuset checks.
    pub online_cpus: usize,
    pub online_mems: usize,
}

/// Parses spec JSON, checking namespace names before serde so the error names the namespace.
pub fn parse_spec(json: &[u8]) -> Result<Spec, SpecError> {
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| SpecError::Json(e.to_string()))?;
    if let Some(nss) = v
        .get("linux")
        .and_then(|l| l.get("namespaces"))
        .and_then(|n| n.as_array())
    {
        let mut seen = HashSet::new();
        for ns in nss {
            let t = ns.get("type").and_then(|t| t.as_str()).unwrap_or_default();
            if !KNOWN_NAMESPACES.contains(&t) {
                return Err(SpecError::UnknownNamespace(t.to_string()));
            }
            if !seen.insert(t.to_string()) {
                return Err(SpecError::DuplicateNamespace(t.to_string()));
            }
        }
    }
    serde_json::from_value(v).map_err(|e| SpecError::Json(e.to_string()))
}

/// Parses a `Process` JSON (exec).
pub fn parse_process(json: &[u8]) -> Result<Process, SpecError> {
    let mut p: Process =
        serde_json::from_slice(json).map_err(|e| SpecError::Json(e.to_string()))?;
    check_process(&p)?;
    normalize_no_new_privileges(&mut p);
    Ok(p)
}

/// `noNewPrivileges: false` is the same as leaving it out (runc, Go's `omitempty`), but libcontainer takes
/// any value present as "set" and then installs the seccomp filter after dropping capabilities, where a
/// process without CAP_SYS_ADMIN may not: write it as absent.
fn normalize_no_new_privileges(p: &mut Process) {
    if p.no_new_privileges() == Some(false) {
        p.set_no_new_privileges(None);
    }
}

/// Sources of the bind mounts that ask for `rshared` or `rslave` propagation (Kubernetes' Bidirectional and
/// HostToContainer).
pub fn propagated_bind_sources(spec: &Spec) -> Vec<PathBuf> {
    spec.mounts()
        .iter()
        .flatten()
        .filter(|m| {
            let opts = m.options().as_deref().unwrap_or_default();
            let bind = m.typ().as_deref() == Some("bind")
                || opts.iter().any(|o| o == "bind" || o == "rbind");
            bind && opts.iter().any(|o| o == "rshared" || o == "rslave")
        })
        .filter_map(|m| m.source().clone())
        .collect()
}

/// Whether the spec is the pod's own container (CRI's sandbox, the pause).
pub fn is_pod_sandbox(spec: &Spec) -> bool {
    spec.annotations()
        .as_ref()
        .and_then(|a| a.get(CRI_CONTAINER_TYPE))
        .is_some_and(|t| t == "sandbox")
}

/// libcontainer knows `shared`, `slave`, `private` and `unbindable` and always applies them recursively to the
/// container's root; runc and containerd's CRI also write the `r` forms (`rshared` for a Bidirectional mount,
/// `rslave` for HostToContainer), which mean the same there: map them, refuse anything else by name.
fn normalize_rootfs_propagation(value: &str) -> Result<&'static str, SpecError> {
    Ok(match value {
        "shared" | "rshared" => "shared",
        "slave" | "rslave" => "slave",
        "private" | "rprivate" => "private",
        "unbindable" | "runbindable" => "unbindable",
        other => return Err(SpecError::RootfsPropagation(other.to_string())),
    })
}

pub fn check_process(p: &Process) -> Result<(), SpecError> {
    if p.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(SpecError::NoArgs);
    }
    if !p.cwd().is_absolute() {
        return Err(SpecError::RelativeCwd(p.cwd().clone()));
    }
    for r in p.rlimits().iter().flatten() {
        if r.soft() > r.hard() {
            return Err(SpecError::Rlimit {
                name: r.typ().to_string(),
                soft: r.soft(),
                hard: r.hard(),
            });
        }
    }
    Ok(())
}

/// Checks `spec` and rewrites it for the guest; returns the adapted spec with an absolute rootfs.
/// Takes the spec's `net.*` sysctls out and returns them as `/proc/sys` paths relative to it, with their values.
/// They belong to the pod's network namespace, which is the guest's own (the VM is the pod), where libcontainer
/// refuses them; the agent writes them itself, as Kubernetes sets them for the whole pod. Keys are checked:
/// `net.` first, `.` or `/` between non-empty parts, no `..`, values on one line.
pub fn take_net_sysctls(spec: &mut Spec) -> Result<Vec<(PathBuf, String)>, SpecError> {
    let Some(mut linux) = spec.linux().clone() else {
        return Ok(Vec::new());
    };
    let Some(mut sysctls) = linux.sysctl().clone() else {
        return Ok(Vec::new());
    };
    let net: Vec<String> = sysctls
        .keys()
        .filter(|k| k.starts_with("net.") || k.starts_with("net/"))
        .cloned()
        .collect();
    let mut out = Vec::with_capacity(net.len());
    for key in net {
        let value = sysctls.remove(&key).unwrap_or_default();
        let bad = |why| SpecError::Sysctl {
            key: key.clone(),
            why,
        };
        // runc's rule: every '.' separates path parts ('/' may too, for names that contain dots).
        let rel = key.replace('.', "/");
        let parts: Vec<&str> = rel.split('/').collect();
        if parts.iter().any(|p| {
            p.is_empty()
                || *p == ".."
                || !p
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        }) {
            return Err(bad(
                "not a sysctl name (letters, digits, '_' and '-' between dots)",
            ));
        }
        if value.contains(['\n', '\0']) {
            return Err(bad("the value must be one line"));
        }
        out.push((PathBuf::from(rel), value));
    }
    linux.set_sysctl(Some(sysctls));
    spec.set_linux(Some(linux));
    Ok(out)
}

pub fn prepare_spec(mut spec: Spec, ctx: &PrepareContext<'_>) -> Result<Spec, SpecError> {
    // Rootfs: the named storage's mount point, plus the spec's root.path when that is absolute
    // inside it... keep it simple: a storage replaces root.path; without one root.path must be an
    // absolute guest directory.
    let rootfs: PathBuf = match ctx.rootfs_storage {
        Some(mnt) => mnt.to_path_buf(),
        None => {
            let p = spec
                .root()
                .as_ref()
                .map(|r| r.path().clone())
                .ok_or(SpecError::NoRootfs)?;
            if p.as_os_str().is_empty() {
                return Err(SpecError::NoRootfs);
            }
            clean_absolute(&p).map_err(SpecError::RootfsPath)?
        }
    };
    // A rootfs that is itself a symlink would let whoever wrote it pick the root: refuse it.
    match std::fs::symlink_metadata(&rootfs) {
        Ok(md) if md.is_dir() => {}
        _ => return Err(SpecError::MissingRootfs(rootfs)),
    }
    let readonly = spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false);
    let root = oci_spec::runtime::RootBuilder::default()
        .path(rootfs.clone())
        .readonly(readonly)
        .build()
        .map_err(|e| SpecError::Json(e.to_string()))?;
    spec.set_root(Some(root));

    let mut process = spec.process().clone().ok_or(SpecError::NoProcess)?;
    check_process(&process)?;
    normalize_no_new_privileges(&mut process);
    spec.set_process(Some(process));
    let sandbox = is_pod_sandbox(&spec);

    // Mounts: destinations stay inside the rootfs; bind sources exist in the guest.
    for m in spec.mounts().iter().flatten() {
        let dest = m.destination();
        resolve_in_root(&rootfs, dest).map_err(|err| SpecError::MountDestination {
            dest: dest.clone(),
            err,
        })?;
        let is_bind = m.typ().as_deref() == Some("bind")
            || m.options()
                .iter()
                .flatten()
                .any(|o| o == "bind" || o == "rbind");
        if is_bind {
            let src = m.source().clone().unwrap_or_default();
            if !src.is_absolute() {
                return Err(SpecError::RelativeBindSource(src));
            }
            if std::fs::symlink_metadata(&src).is_err() {
                return Err(SpecError::MissingBindSource(src));
            }
        }
    }

    // Hooks name host binaries; they do not exist in the guest.
    spec.set_hooks(None);

    let mut linux = spec.linux().clone().unwrap_or_default();
    // Namespaces: the pod shares the guest's network namespace (the VM is the pod); ipc, uts and pid are
    // the pod's when the spec joins one (any path, as CRI sends), private when it asks for new ones. The
    // pod's own (sandbox) container asks for new ipc and uts namespaces, the ones its app containers then
    // join: here it gets the pod's, so what its spec sets there (the pod's ipc sysctls) reaches them.
    let mut namespaces: Vec<LinuxNamespace> = Vec::new();
    let mut shared_uts = false;
    for ns in linux.namespaces().iter().flatten() {
        let joins = ns
            .path()
            .as_ref()
            .is_some_and(|p| !p.as_os_str().is_empty())
            || (sandbox && matches!(ns.typ(), LinuxNamespaceType::Ipc | LinuxNamespaceType::Uts));
        let mut ns = ns.clone();
        match ns.typ() {
            LinuxNamespaceType::Network => continue,
            LinuxNamespaceType::Ipc if joins => ns.set_path(Some(ctx.pod.ipc.clone())),
            LinuxNamespaceType::Pid if joins => ns.set_path(Some(ctx.pod.pid.clone())),
            LinuxNamespaceType::Uts if joins => {
                shared_uts = true;
                ns.set_path(Some(ctx.pod.uts.clone()))
            }
            // Host namespace paths mean nothing here: a container gets fresh ones.
            _ => ns.set_path(None),
        };
        namespaces.push(ns);
    }
    linux.set_namespaces(Some(namespaces));
    if shared_uts {
        // The pod's hostname was set when the sandbox was created.
        spec.set_hostname(None);
        spec.set_domainname(None);
    }

    if let Some(res) = linux.resources() {
        check_resources(res, ctx.online_cpus, ctx.online_mems)?;
    }
    if let Some(p) = linux.rootfs_propagation().clone() {
        linux.set_rootfs_propagation(Some(normalize_rootfs_propagation(&p)?.to_string()));
    }
    linux.set_cgroups_path(Some(PathBuf::from(ctx.cgroup_path)));
    spec.set_linux(Some(linux));
    Ok(spec)
}

fn limit_err(field: &'static str, value: impl ToString, why: impl Into<String>) -> SpecError {
    SpecError::Limit {
        field,
        value: value.to_string(),
        why: why.into(),
    }
}

/// Refuses limits a kernel would reject or that cannot let anything run.
pub fn check_resources(
    res: &LinuxResources,
    online_cpus: usize,
    online_mems: usize,
) -> Result<(), SpecError> {
    const MIB: i64 = 1 << 20;
    if let Some(mem) = res.memory() {
        let limit = mem.limit();
        if let Some(l) = limit {
            if l != -1 && l < 0 {
                return Err(limit_err(
                    "memory.limit",
                    l,
                    "must be -1 (unlimited) or positive",
                ));
            }
            if (0..MIB).contains(&l) {
                return Err(limit_err("memory.limit", l, "below the minimum of 1 MiB"));
            }
        }
        if let Some(s) = mem.swap() {
            if s < -1 {
                return Err(limit_err(
                    "memory.swap",
                    s,
                    "must be -1 (unlimited) or non-negative",
                ));
            }
            if let Some(l) = limit {
                if l > 0 && s >= 0 && s < l {
                    return Err(limit_err(
                        "memory.swap",
                        s,
                        format!(
                            "must not be below memory.limit {l} (swap counts memory plus swap)"
                        ),
                    ));
                }
            }
        }
        if let Some(r) = mem.reservation() {
            if r < -1 {
                return Err(limit_err(
                    "memory.reservation",
                    r,
                    "must be -1 or non-negative",
                ));
            }
        }
        if let Some(s) = mem.swappiness() {
            if s > 100 {
                return Err(limit_err("memory.swappiness", s, "must be 0 to 100"));
            }
        }
    }
    if let Some(cpu) = res.cpu() {
        if let Some(s) = cpu.shares() {
            if s != 0 && !(2..=262_144).contains(&s) {
                return Err(limit_err("cpu.shares", s, "must be 2 to 262144"));
            }
        }
        if let Some(p) = cpu.period() {
            if p != 0 && !(1_000..=1_000_000).contains(&p) {
                return Err(limit_err(
                    "cpu.period",
                    p,
                    "must be 1000 to 1000000 microseconds",
                ));
            }
        }
        if let Some(q) = cpu.quota() {
            if q != -1 && q != 0 && q < 1_000 {
                return Err(limit_err(
                    "cpu.quota",
                    q,
                    "must be -1 (unlimited) or at least 1000 microseconds",
                ));
            }
        }
        if let Some(cpus) = cpu.cpus() {
            check_cpuset("cpu.cpus", cpus, online_cpus)?;
        }
        if let Some(mems) = cpu.mems() {
            check_cpuset("cpu.mems", mems, online_mems)?;
        }
    }
    if let Some(p) = res.pids() {
        if p.limit() < -1 {
            return Err(limit_err(
                "pids.limit",
                p.limit(),
                "must be -1 (unlimited) or non-negative",
            ));
        }
    }
    Ok(())
}

/// Parses a cpuset list ("0-2,4") and checks every entry is below `online`.
pub fn check_cpuset(field: &'static str, list: &str, online: usize) -> Result<(), SpecError> {
    if list.trim().is_empty() {
        return Ok(());
    }
    for part in list.trim().split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part.trim(), part.trim()),
        };
        let lo: usize = lo.parse().map_err(|_| {
            limit_err(
                field,
                list,
                format!("{part:?} is not a CPU/node number or range"),
            )
        })?;
        let hi: usize = hi.parse().map_err(|_| {
            limit_err(
                field,
                list,
                format!("{part:?} is not a CPU/node number or range"),
            )
        })?;
        if lo > hi {
            return Err(limit_err(
                field,
                list,
                format!("range {part:?} is reversed"),
            ));
        }
        if hi >= online {
            return Err(limit_err(
                field,
                list,
                format!("{hi} is not online (this guest has {online})"),
            ));
        }
    }
    Ok(())
}

/// Number of entries in a kernel cpu/node list file such as /sys/devices/system/cpu/online ("0-3").
pub fn count_online(path: &Path) -> usize {
    let Ok(s) = std::fs::read_to_string(path) else {
        return 1;
    };
    let mut max = 0usize;
    for part in s.trim().split(',') {
        let hi = part.rsplit('-').next().unwrap_or("0");
        if let Ok(h) = hi.trim().parse::<usize>() {
            max = max.max(h + 1);
        }
    }
    max.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base_json(rootfs: &Path) -> serde_json::Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["/bin/sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": rootfs, "readonly": true},
            "hostname": "box",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}
            ],
            "hooks": {"prestart": [{"path": "/usr/bin/host-only"}]},
            "linux": {
                "cgroupsPath": "/kubepods/host/path",
                "namespaces": [
                    {"type": "pid"}, {"type": "mount"},
                    {"type": "network", "path": "/proc/42/ns/net"},
                    {"type": "ipc", "path": "/proc/42/ns/ipc"},
                    {"type": "uts", "path": "/proc/42/ns/uts"}
                ],
                "resources": {"memory": {"limit": 67108864}, "pids": {"limit": 10},
                               "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0"}}
            }
        })
    }

    fn pod() -> PodNamespaces {
        PodNamespaces {
            ipc: "/run/capsa/sandbox/ns/ipc".into(),
            uts: "/run/capsa/sandbox/ns/uts".into(),
            pid: "/run/capsa/sandbox/ns/pid".into(),
        }
    }

    fn ctx<'a>(pod: &'a PodNamespaces, storage: Option<&'a Path>) -> PrepareContext<'a> {
        PrepareContext {
            container_id: "c1",
            rootfs_storage: storage,
            pod,
            cgroup_path: "/capsa/c1",
            online_cpus: 2,
            online_mems: 1,
        }
    }

    fn prepare(v: serde_json::Value, storage: Option<&Path>) -> Result<Spec, SpecError> {
        let pod = pod();
        let spec = parse_spec(v.to_string().as_bytes())?;
        prepare_spec(spec, &ctx(&pod, storage))
    }

    #[test]
    fn adapts_a_cri_like_spec() {
        let d = tempfile::tempdir().unwrap();
        let spec = prepare(base_json(d.path()), None).unwrap();
        assert_eq!(spec.root().as_ref().unwrap().path(), d.path());
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));
        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/capsa/c1"))
        );
        let nss = linux.namespaces().as_ref().unwrap();
        assert!(nss.iter().all(|n| n.typ() != LinuxNamespaceType::Network));
        let ipc = nss
            .iter()
            .find(|n| n.typ() == LinuxNamespaceType::Ipc)
            .unwrap();
        assert_eq!(
            ipc.path().as_deref(),
            Some(Path::new("/run/capsa/sandbox/ns/ipc"))
        );
        let pid = nss
            .iter()
            .find(|n| n.typ() == LinuxNamespaceType::Pid)
            .unwrap();
        assert_eq!(pid.path(), &None);
        // Joining the pod's UTS namespace drops the per-container hostname; hooks are dropped.
        assert_eq!(spec.hostname(), &None);
        assert!(spec.hooks().is_none());
    }

    #[test]
    fn net_sysctls_are_taken_out_and_checked() {
        let d = tempfile::tempdir().unwrap();
        let mut v = base_json(d.path());
        v["linux"]["sysctl"] = json!({
            "net.ipv4.ip_local_port_range": "1024 65000",
            "net.ipv4.conf.eth0/100.forwarding": "1",
            "kernel.shm_rmid_forced": "1"
        });
        let mut spec = parse_spec(v.to_string().as_bytes()).unwrap();
        let mut net = take_net_sysctls(&mut spec).unwrap();
        net.sort();
        assert_eq!(
            net,
            [
                (
                    PathBuf::from("net/ipv4/conf/eth0/100/forwarding"),
                    "1".to_string()
                ),
                (
                    PathBuf::from("net/ipv4/ip_local_port_range"),
                    "1024 65000".to_string()
                )
            ]
        );
        let left = spec.linux().as_ref().unwrap().sysctl().clone().unwrap();
        assert_eq!(left.keys().collect::<Vec<_>>(), ["kernel.shm_rmid_forced"]);
        for bad in ["net.ipv4..x", "net.ipv4/../../kernel/x", "net.a b", "net."] {
            let mut v = base_json(d.path());
            v["linux"]["sysctl"] = json!({ bad: "1" });
            let mut spec = parse_spec(v.to_string().as_bytes()).unwrap();
            let e = take_net_sysctls(&mut spec).unwrap_err();
            assert!(e.to_string().contains(bad), "{bad}: {e}");
        }
        let mut v = base_json(d.path());
        v["linux"]["sysctl"] = json!({ "net.core.somaxconn": "1\n2" });
        let mut spec = parse_spec(v.to_string().as_bytes()).unwrap();
        assert!(take_net_sysctls(&mut spec).is_err());
    }

    #[test]
    fn a_pid_namespace_path_joins_the_pods() {
        let d = tempfile::tempdir().unwrap();
        let mut v = base_json(d.path());
        // What CRI sends for a pod with shareProcessNamespace: the pause container's namespace on the host.
        v["linux"]["namespaces"] =
            json!([{"type": "pid", "path": "/proc/4242/ns/pid"}, {"type": "mount"}]);
        let spec = prepare(v, None).unwrap();
        let nss = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        let pid = nss
            .iter()
            .find(|n| n.typ() == LinuxNamespaceType::Pid)
            .unwrap();
        assert_eq!(
            pid.path().as_deref(),
            Some(Path::new("/run/capsa/sandbox/ns/pid"))
        );
    }

    #[test]
    fn private_uts_keeps_hostname_and_storage_replaces_root() {
        let d = tempfile::tempdir().unwrap();
        let mut v = base_json(Path::new("rootfs"));
        v["linux"]["namespaces"] = json!([{"type": "uts"}, {"type": "ipc"}]);
        let spec = prepare(v, Some(d.path())).unwrap();
        assert_eq!(spec.hostname().as_deref(), Some("box"));
        assert_eq!(spec.root().as_ref().unwrap().path(), d.path());
        let nss = spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap();
        assert!(nss.iter().all(|n| n.path().is_none()));
    }

    #[test]
    fn missing_rootfs_is_named() {
        let err = prepare(base_json(Path::new("/nonexistent/rootfs")), None).unwrap_err();
        assert!(matches!(err, SpecError::MissingRootfs(_)));
        assert!(err.to_string().contains("/nonexistent/rootfs"), "{err}");
        let mut v = base_json(Path::new("/x"));
        v["root"] = json!(null);
        assert!(matches!(prepare(v, None).unwrap_err(), SpecError::NoRootfs));
        let err = prepare(base_json(Path::new("relative")), None).unwrap_err();
        assert!(err.to_string().contains("not absolute"), "{err}");
    }

    #[test]
    fn rootfs_that_is_a_symlink_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/", d.path().join("root")).unwrap();
        let err = prepare(base_json(&d.path().join("root")), None).unwrap_err();
        assert!(matches!(err, SpecError::MissingRootfs(_)), "{err}");
    }

    #[test]
    fn unknown_and_duplicate_namespaces_are_named() {
        let d = tempfile::tempdir().unwrap();
        let mut v = base_json(d.path());
        v["linux"]["namespaces"] = json!([{"type": "pid"}, {"type": "bogus"}]);
        let err = prepare(v, None).unwrap_err();
        assert!(err.to_string().contains("\"bogus\""), "{err}");
        let mut v = base_json(d.path());
        v["linux"]["namespaces"] = json!([{"type": "pid"}, {"type": "pid"}]);
        assert!(matches!(
            prepare(v, None).unwrap_err(),
            SpecError::DuplicateNamespace(_)
        ));
    }

    #[test]
    fn mount_destinations_cannot_escape() {
        let d = tempfile::tempdir().unwrap();
        let mut v = base_json(d.path());
        v["mounts"] = json!([{"destination": "/../../etc", "type": "tmpfs", "source": "tmpfs"}]);
        let err = prepare(v, None).unwrap_err();
        assert!(matches!(err, SpecError::MountDestination { .. }), "{err}");
        assert!(err.to_string().contains("/../../etc"), "{err}");

        std::os::unix::fs::symlink("/etc", d.path().join("evil")).unwrap();
        let mut v = base_json(d.path());
        v["mounts"] = json!([{"destination": "/evil/x", "type": "tmpfs", "source": "tmpfs"}]);
        let err = prepare(v, None).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
    }

    #[test]
    fn bind_sources_must_exist() {
        let d = tempfile::tempdir().unwrap();
        let mut v = base_json(d.path());
        v["mounts"] = json!([{"destination": "/data", "type": "bind", "source": "/no/such/dir", "options": ["rbind"]}]);
        let err = prepare(v, None).unwrap_err();
        assert!(matches!(err, SpecError::MissingBindSource(_)), "{err}");
        let mut v = base_json(d.path());
        v["mounts"] =
            json!([{"destination": "/data", "source": d.path(), "options": ["bind", "ro"]}]);
        prepare(v, None).unwrap();
    }

    #[test]
    fn absurd_limits_are_named() {
        let d = tempfile::tempdir().unwrap();
        let cases = [
            (json!({"memory": {"limit": 100}}), "memory.limit"),
            (json!({"memory": {"limit": -5}}), "memory.limit"),
            (
                json!({"memory": {"limit": 67108864, "swap": 1048576}}),
                "memory.swap",
            ),
            (json!({"cpu": {"shares": 1}}), "cpu.shares"),
            (json!({"cpu": {"quota": 10}}), "cpu.quota"),
            (json!({"cpu": {"period": 5}}), "cpu.period"),
            (json!({"cpu": {"cpus": "0-63"}}), "cpu.cpus"),
            (json!({"cpu": {"cpus": "x"}}), "cpu.cpus"),
            (json!({"cpu": {"mems": "3"}}), "cpu.mems"),
            (json!({"pids": {"limit": -7}}), "pids.limit"),
        ];
        for (res, field) in cases {
            let mut v = base_json(d.path());
            v["linux"]["resources"] = res.clone();
            let err = prepare(v, None).unwrap_err();
            assert!(err.to_string().contains(field), "{res}: {err}");
        }
        let mut v = base_json(d.path());
        v["linux"]["resources"] = json!({"memory": {"limit": -1}, "pids": {"limit": -1}, "cpu": {"quota": -1, "cpus": "0-1"}});
        prepare(v, None).unwrap();
    }

    #[test]
    fn process_checks() {
        let d = tempfile::tempdir().unwrap();
        let mut v = base_json(d.path());
        v["process"]["args"] = json!([]);
        assert!(matches!(prepare(v, None).unwrap_err(), SpecError::NoArgs));
        let mut v = base_json(d.path());
        v["process"]["cwd"] = json!("relative");
        assert!(matches!(
            prepare(v, None).unwrap_err(),
            SpecError::RelativeCwd(_)
        ));
        let mut v = base_json(d.path());
        v["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "soft": 10, "hard": 5}]);
        let err = prepare(v, None).unwrap_err();
        assert!(err.to_string().contains("RLIMIT_NOFILE"), "{err}");
        let mut v = base_json(d.path());
        v.as_object_mut().unwrap().remove("process");
        assert!(matches!(
            prepare(v, None).unwrap_err(),
            SpecError::NoProcess
        ));
        assert!(parse_process(br#"{"args":["ls"],"cwd":"/","user":{"uid":0,"gid":0}}"#).is_ok());
        assert!(parse_process(br#"{"args":[],"cwd":"/"}"#).is_err());
        assert!(parse_process(b"not json").is_err());
    }

    #[test]
    fn cpuset_and_online_parsing() {
        assert!(check_cpuset("cpu.cpus", "0,1", 2).is_ok());
        assert!(check_cpuset("cpu.cpus", "1-0", 2).is_err());
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("online");
        std::fs::write(&f, "0-3\n").unwrap();
        assert_eq!(count_online(&f), 4);
        std::fs::write(&f, "0\n").unwrap();
        assert_eq!(count_online(&f), 1);
        std::fs::write(&f, "0-1,4-5\n").unwrap();
        assert_eq!(count_online(&f), 6);
    }
    #[test]
    fn the_pod_sandbox_container_gets_the_pods_ipc_and_uts() {
        let d = tempfile::tempdir().unwrap();
        let mut v = base_json(d.path());
        v["linux"]["namespaces"] = json!([
            {"type": "pid"}, {"type": "mount"}, {"type": "network", "path": "/proc/1/ns/net"},
            {"type": "ipc"}, {"type": "uts"}
        ]);
        v["linux"]["sysctl"] = json!({"kernel.shm_rmid_forced": "1", "fs.mqueue.msg_max": "100"});
        let ns_of = |spec: &Spec, t: LinuxNamespaceType| {
            spec.linux()
                .as_ref()
                .and_then(|l| l.namespaces().clone())
                .unwrap_or_default()
                .into_iter()
                .find(|n| n.typ() == t)
                .and_then(|n| n.path().clone())
        };
        // An ordinary container asking for new ipc/uts namespaces gets fresh ones and keeps its hostname.
        let plain = prepare(v.clone(), None).unwrap();
        assert_eq!(ns_of(&plain, LinuxNamespaceType::Ipc), None);
        assert_eq!(plain.hostname().as_deref(), Some("box"));
        // CRI's sandbox container: the pod's, so its ipc sysctls land where the app containers are.
        v["annotations"] = json!({CRI_CONTAINER_TYPE: "sandbox"});
        let sandbox = prepare(v.clone(), None).unwrap();
        assert_eq!(ns_of(&sandbox, LinuxNamespaceType::Ipc), Some(pod().ipc));
        assert_eq!(ns_of(&sandbox, LinuxNamespaceType::Uts), Some(pod().uts));
        assert_eq!(ns_of(&sandbox, LinuxNamespaceType::Pid), None);
        assert_eq!(
            sandbox.hostname(),
            &None,
            "the pod's hostname is set at CreateSandbox"
        );
        let sysctl = sandbox
            .linux()
            .as_ref()
            .and_then(|l| l.sysctl().clone())
            .unwrap();
        assert_eq!(
            sysctl.get("fs.mqueue.msg_max").map(String::as_str),
            Some("100")
        );
        // An app container is not the sandbox.
        v["annotations"] = json!({CRI_CONTAINER_TYPE: "container"});
        assert_eq!(
            ns_of(&prepare(v, None).unwrap(), LinuxNamespaceType::Ipc),
            None
        );
    }

    #[test]
    fn rootfs_propagation_r_forms_and_no_new_privileges_false() {
        let d = tempfile::tempdir().unwrap();
        for (given, want) in [
            ("rshared", "shared"),
            ("rslave", "slave"),
            ("rprivate", "private"),
            ("runbindable", "unbindable"),
            ("shared", "shared"),
            ("slave", "slave"),
        ] {
            let mut v = base_json(d.path());
            v["linux"]["rootfsPropagation"] = json!(given);
            let spec = prepare(v, None).unwrap();
            assert_eq!(
                spec.linux()
                    .as_ref()
                    .unwrap()
                    .rootfs_propagation()
                    .as_deref(),
                Some(want),
                "{given}"
            );
        }
        let mut v = base_json(d.path());
        v["linux"]["rootfsPropagation"] = json!("bogus");
        let e = prepare(v, None).unwrap_err();
        assert!(e.to_string().contains("\"bogus\""), "{e}");
        // noNewPrivileges false is written as absent; true stays.
        let mut v = base_json(d.path());
        v["process"]["noNewPrivileges"] = json!(false);
        let spec = prepare(v.clone(), None).unwrap();
        assert_eq!(spec.process().as_ref().unwrap().no_new_privileges(), None);
        v["process"]["noNewPrivileges"] = json!(true);
        let spec = prepare(v, None).unwrap();
        assert_eq!(
            spec.process().as_ref().unwrap().no_new_privileges(),
            Some(true)
        );
        let p = parse_process(br#"{"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "noNewPrivileges": false}"#).unwrap();
        assert_eq!(p.no_new_privileges(), None);
    }

    #[test]
    fn propagated_bind_sources_are_the_rshared_and_rslave_binds() {
        let d = tempfile::tempdir().unwrap();
        let mut v = base_json(d.path());
        v["mounts"] = json!([
            {"destination": "/a", "type": "bind", "source": "/s/a", "options": ["rbind", "rshared"]},
            {"destination": "/b", "source": "/s/b", "options": ["rbind", "rslave"]},
            {"destination": "/c", "type": "bind", "source": "/s/c", "options": ["rbind", "rprivate"]},
            {"destination": "/d", "type": "tmpfs", "source": "tmpfs", "options": ["rshared"]}
        ]);
        let spec = parse_spec(v.to_string().as_bytes()).unwrap();
        assert_eq!(
            propagated_bind_sources(&spec),
            vec![PathBuf::from("/s/a"), PathBuf::from("/s/b")]
        );
    }
}
