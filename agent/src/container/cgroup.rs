//! A container's cgroup v2 directory: statistics, OOM kills, member pids, resource updates.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use capsa_proto::agent::{CgroupStats, CpuStats, IoDeviceStats, MemoryStats, PidsStats};

/// Root of the guest's cgroup v2 hierarchy.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// cgroup path (relative to the hierarchy root, as in the OCI spec) of a container.
pub fn container_cgroup(id: &str) -> String {
    format!("/capsa/{id}")
}

pub fn cgroup_dir(root: &Path, rel: &str) -> PathBuf {
    root.join(rel.trim_start_matches('/'))
}

/// `key value` lines (cpu.stat, memory.stat, memory.events) as a map.
pub fn flat_keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let k = it.next()?;
            let v = it.next()?.parse().ok()?;
            Some((k.to_string(), v))
        })
        .collect()
}

/// A single value file; "max" = 0 (unlimited).
fn single(dir: &Path, file: &str) -> u64 {
    std::fs::read_to_string(dir.join(file))
        .ok()
        .and_then(|s| {
            let s = s.trim();
            if s == "max" {
                Some(0)
            } else {
                s.parse().ok()
            }
        })
        .unwrap_or(0)
}

fn keyed(dir: &Path, file: &str) -> HashMap<String, u64> {
    std::fs::read_to_string(dir.join(file))
        .map(|s| flat_keyed(&s))
        .unwrap_or_default()
}

/// memory.events "oom_kill" (0 when the file is missing).
pub fn oom_kills(dir: &Path) -> u64 {
    keyed(dir, "memory.events")
        .get("oom_kill")
        .copied()
        .unwrap_or(0)
}

/// Pids in the cgroup and its children.
pub fn pids(dir: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    collect_pids(dir, &mut out, 0);
    out
}

fn collect_pids(dir: &Path, out: &mut Vec<i32>, depth: usize) {
    if let Ok(s) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if depth > 16 {
        return;
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_pids(&e.path(), out, depth + 1);
            }
        }
    }
}

/// Parses io.stat lines: `8:0 rbytes=1 wbytes=2 rios=3 wios=4 ...`.
pub fn parse_io_stat(text: &str) -> Vec<IoDeviceStats> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let Some(dev) = it.next() else { continue };
        let Some((maj, min)) = dev.split_once(':') else {
            continue;
        };
        let mut s = IoDeviceStats::new();
        s.major = maj.parse().unwrap_or(0);
        s.minor = min.parse().unwrap_or(0);
        for kv in it {
            if let Some((k, v)) = kv.split_once('=') {
                let v: u64 = v.parse().unwrap_or(0);
                match k {
                    "rbytes" => s.rbytes = v,
                    "wbytes" => s.wbytes = v,
                    "rios" => s.rios = v,
                    "wios" => s.wios = v,
                    _ => {}
                }
            }
        }
        out.push(s);
    }
    out
}

pub fn stats(dir: &Path) -> CgroupStats {
    let mut cpu = CpuStats::new();
    let c = keyed(dir, "cpu.stat");
    let g = |k: &str| c.get(k).copied().unwrap_or(0);
    cpu.usage_usec = g("usage_usec");
    cpu.user_usec = g("user_usec");
    cpu.system_usec = g("system_usec");
    cpu.nr_periods = g("nr_periods");
    cpu.nr_throttled = g("nr_throttled");
    cpu.throttled_usec = g("throttled_usec");

    let mut mem = MemoryStats::new();
    mem.usage_bytes = single(dir, "memory.current");
    mem.limit_bytes = single(dir, "memory.max");
    mem.max_usage_bytes = single(dir, "memory.peak");
    mem.swap_usage_bytes = single(dir, "memory.swap.current");
    mem.stat = keyed(dir, "memory.stat");
    mem.oom_kill = oom_kills(dir);

    let mut pids = PidsStats::new();
    pids.current = single(dir, "pids.current");
    pids.limit = single(dir, "pids.max");

    let mut out = CgroupStats::new();
    out.cpu = Some(cpu).into();
    out.memory = Some(mem).into();
    out.pids = Some(pids).into();
    out.io = std::fs::read_to_string(dir.join("io.stat"))
        .map(|s| parse_io_stat(&s))
        .unwrap_or_default();
    out
}

/// Applies new limits to a container's cgroup (UpdateContainer).
pub fn apply_resources(
    id: &str,
    resources: &oci_spec::runtime::LinuxResources,
) -> Result<(), String> {
    use libcgroups::common::{CgroupConfig, CgroupManager, ControllerOpt};
    let mgr = libcgroups::common::create_cgroup_manager(CgroupConfig {
        cgroup_path: PathBuf::from(container_cgroup(id)),
        systemd_cgroup: false,
        container_name: id.to_string(),
    })
    .map_err(|e| e.to_string())?;
    mgr.apply(&ControllerOpt {
        resources,
        disable_oom_killer: false,
        oom_score_adj: None,
        freezer_state: None,
    })
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_fake_cgroup() {
        let d = tempfile::tempdir().unwrap();
        let w = |f: &str, s: &str| std::fs::write(d.path().join(f), s).unwrap();
        w("cpu.stat", "usage_usec 100\nuser_usec 60\nsystem_usec 40\nnr_periods 5\nnr_throttled 2\nthrottled_usec 7\n");
        w("memory.current", "4096\n");
        w("memory.max", "max\n");
        w("memory.events", "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n");
        w("memory.stat", "anon 10\nfile 20\n");
        w("pids.current", "3\n");
        w("pids.max", "10\n");
        w(
            "io.stat",
            "254:0 rbytes=512 wbytes=1024 rios=1 wios=2 dbytes=0 dios=0\n",
        );
        w("cgroup.procs", "12\n13\n");
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/cgroup.procs"), "14\n").unwrap();
        let s = stats(d.path());
        assert_eq!(s.cpu.usage_usec, 100);
        assert_eq!(s.cpu.nr_throttled, 2);
        assert_eq!(s.memory.usage_bytes, 4096);
        assert_eq!(s.memory.limit_bytes, 0);
        assert_eq!(s.memory.oom_kill, 1);
        assert_eq!(s.memory.stat.get("file"), Some(&20));
        assert_eq!(s.pids.current, 3);
        assert_eq!(s.pids.limit, 10);
        assert_eq!(s.io.len(), 1);
        assert_eq!(
            (s.io[0].major, s.io[0].minor, s.io[0].wbytes),
            (254, 0, 1024)
        );
        let mut p = pids(d.path());
        p.sort();
        assert_eq!(p, vec![12, 13, 14]);
        assert_eq!(oom_kills(d.path()), 1);
        assert_eq!(oom_kills(&d.path().join("missing")), 0);
    }

    #[test]
    fn paths() {
        assert_eq!(container_cgroup("c1"), "/capsa/c1");
        assert_eq!(
            cgroup_dir(Path::new("/sys/fs/cgroup"), "/capsa/c1"),
            PathBuf::from("/sys/fs/cgroup/capsa/c1")
        );
    }
}
