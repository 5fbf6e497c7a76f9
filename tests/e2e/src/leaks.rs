//! What sandboxes leave on the host, counted so a test can compare before and after a fault: capsa's
//! processes, mounts, sandbox directories, sockets and cgroups. One helper for every fault test.

use std::path::Path;

use crate::cri::pids_of;

/// The host-side traces of a test's containerd and capsa (see [`leak_snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeakSnapshot {
    /// Pids of capsa-vmm, virtiofsd and containerd-shim-capsa-v2 processes of this test.
    pub vmms: Vec<i32>,
    pub virtiofsds: Vec<i32>,
    pub shims: Vec<i32>,
    /// Mount points at or below the test's directory.
    pub mounts: Vec<String>,
    /// Entries of capsa's state directory (one per live sandbox).
    pub sandbox_dirs: Vec<String>,
    /// Bound Unix sockets below the test's directory or containerd's shim socket directory.
    pub sockets: Vec<String>,
    /// cgroup directories (up to three levels below /sys/fs/cgroup), but the shared parents
    /// ([`SHARED_CGROUP_PARENTS`]).
    pub cgroups: Vec<String>,
}

/// Where containerd 1.6 shims (capsa's too) bind their task sockets.
const SHIM_SOCKETS: &str = "/run/containerd/s/";

/// cgroup directories that stay by design once created: capsa's own parent (`capsa/<sandbox>` lives in it)
/// and the per-namespace parents containerd's cgroupsPath uses (`/default/<id>`, `/k8s.io/<id>`), which runc
/// leaves too. What is below them is counted.
pub const SHARED_CGROUP_PARENTS: [&str; 3] = ["capsa", "default", "k8s.io"];

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v.dedup();
    v
}

fn names(dir: &Path) -> Vec<String> {
    sorted(
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default(),
    )
}

fn cgroup_dirs(dir: &Path, depth: u32, out: &mut Vec<String>) {
    if depth == 0 {
        return;
    }
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            let p = e.path();
            if !SHARED_CGROUP_PARENTS.contains(&e.file_name().to_string_lossy().as_ref()) {
                out.push(p.to_string_lossy().into_owned());
            }
            cgroup_dirs(&p, depth - 1, out);
        }
    }
}

/// Counts what the test whose containerd keeps everything under `root` (its state, the bundles, capsa's
/// state directory `capsa_state`) has on the host. Tests run one at a time, so the shim socket directory and
/// the cgroup tree are the test's alone.
pub fn leak_snapshot(root: &Path, capsa_state: &Path) -> LeakSnapshot {
    let needle = root.to_string_lossy();
    let pids = |program: &str| {
        let mut v = pids_of(program, &needle);
        v.sort();
        v
    };
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| Path::new(p).starts_with(root))
        .collect();
    // /proc/net/unix: "Num RefCount Protocol Flags Type St Inode Path".
    let sockets = std::fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(7))
        .filter(|p| Path::new(p).starts_with(root) || p.starts_with(SHIM_SOCKETS))
        .map(String::from)
        .collect();
    let mut cgroups = Vec::new();
    cgroup_dirs(Path::new("/sys/fs/cgroup"), 3, &mut cgroups);
    LeakSnapshot {
        vmms: pids("capsa-vmm"),
        virtiofsds: pids("virtiofsd"),
        shims: pids("containerd-shim-capsa-v2"),
        mounts: sorted(mounts),
        sandbox_dirs: names(capsa_state),
        sockets: sorted(sockets),
        cgroups: sorted(cgroups),
    }
}

/// `leak_snapshot` until it equals `before` or `within` has passed (teardown finishes asynchronously after
/// containerd's delete returns); returns the last snapshot.
pub fn settled_snapshot(
    root: &Path,
    capsa_state: &Path,
    before: &LeakSnapshot,
    within: std::time::Duration,
) -> LeakSnapshot {
    let deadline = std::time::Instant::now() + within;
    loop {
        let now = leak_snapshot(root, capsa_state);
        if &now == before || std::time::Instant::now() >= deadline {
            return now;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}
