//! The pod's cgroup for the VMM and virtiofsd (Kata's `sandbox_cgroup_only`): the sandbox spec's
//! `linux.cgroupsPath`, or capsa's own `capsa/<sandbox id>` when there is none (`capsa run`).
//!
//! Both forms containerd writes are understood: cgroupfs (`/kubepods/besteffort/pod<uid>/<id>`) and
//! systemd (`<slice>:<prefix>:<name>`, expanded the way runc's systemd driver lays it out on disk:
//! `kubepods-besteffort.slice` → `kubepods.slice/kubepods-besteffort.slice`, unit `<prefix>-<name>.scope`).
//! The node's hierarchies are read from `/proc/self/mounts`: the unified (v2) hierarchy when it is the only
//! one, else every v1 hierarchy (hybrid nodes keep their controllers in v1). Directories capsa created are
//! removed when the VM ends; a process joins by writing `0` to `cgroup.procs` before its exec
//! ([`PodCgroup::procs_files`]), so everything the VMM allocates is charged to the pod from the start.

use std::path::{Component, Path, PathBuf};

use super::JailError;

/// Where the VMM goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CgroupPlacement {
    /// Left where the caller is (no cgroup of its own).
    Inherit,
    /// The sandbox's `linux.cgroupsPath` (either form).
    SpecPath(String),
    /// `capsa/<sandbox id>` under each hierarchy (for `capsa run`); failing to create it only warns.
    #[default]
    Own,
}

/// `linux.cgroupsPath` → a path relative to each hierarchy's root. Refuses `..` and empty paths.
pub fn parse_cgroups_path(s: &str) -> Result<PathBuf, JailError> {
    let bad = |reason: &str| {
        Err(JailError::CgroupsPath {
            path: s.to_owned(),
            reason: reason.to_owned(),
        })
    };
    let rel = if !s.starts_with('/') && s.matches(':').count() == 2 {
        let mut parts = s.splitn(3, ':');
        let (slice, prefix, name) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        if name.is_empty() {
            return bad("systemd form without a unit name");
        }
        let slice = if slice.is_empty() {
            "system.slice"
        } else {
            slice
        };
        let mut p = match expand_slice(slice) {
            Some(p) => p,
            None => return bad("bad systemd slice name"),
        };
        let unit = if name.ends_with(".slice") {
            match expand_slice(name) {
                Some(_) => name.to_owned(),
                None => return bad("bad systemd slice name"),
            }
        } else if prefix.is_empty() {
            format!("{name}.scope")
        } else {
            format!("{prefix}-{name}.scope")
        };
        p.push(unit);
        p
    } else {
        PathBuf::from(s.trim_start_matches('/'))
    };
    if rel.as_os_str().is_empty() {
        return bad("empty (the root cgroup)");
    }
    for c in rel.components() {
        match c {
            Component::Normal(n) if !n.as_encoded_bytes().contains(&b'\n') => {}
            Component::CurDir => {}
            _ => return bad("must not contain '..' or newlines"),
        }
    }
    Ok(rel)
}

/// `a-b-c.slice` → `a.slice/a-b.slice/a-b-c.slice`; `-.slice` → the root.
fn expand_slice(slice: &str) -> Option<PathBuf> {
    let stem = slice.strip_suffix(".slice")?;
    if stem == "-" {
        return Some(PathBuf::new());
    }
    if stem.is_empty() || stem.contains('/') || stem.starts_with('-') || stem.ends_with('-') {
        return None;
    }
    let mut p = PathBuf::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if part.is_empty() {
            return None;
        }
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        p.push(format!("{prefix}.slice"));
    }
    Some(p)
}

/// The node's cgroup hierarchies to place processes in: the unified mount when there is no v1 hierarchy,
/// else the v1 mount points. From the text of `/proc/self/mounts`.
pub fn hierarchies(mounts: &str) -> Vec<PathBuf> {
    let (mut v1, mut v2) = (Vec::new(), Vec::new());
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let mnt = PathBuf::from(f[1].replace("\\040", " "));
        match f[2] {
            "cgroup2" => v2.push(mnt),
            "cgroup" => v1.push(mnt),
            _ => {}
        }
    }
    if v1.is_empty() {
        v2.truncate(1);
        v2
    } else {
        v1
    }
}

/// The pod's cgroup directories, one per hierarchy; those capsa created are removed on [`PodCgroup::remove`]
/// (and on drop).
#[derive(Debug, Default)]
pub struct PodCgroup {
    dirs: Vec<PathBuf>,
    /// Created by us, in creation order (parents first).
    created: Vec<PathBuf>,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JailError + 'a {
    move |source| JailError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

impl PodCgroup {
    /// Creates (if needed) `rel` under every hierarchy in `roots`.
    pub fn create(roots: &[PathBuf], rel: &Path) -> Result<PodCgroup, JailError> {
        if roots.is_empty() {
            return Err(JailError::Io {
                what: "cgroup hierarchy",
                path: PathBuf::from("/sys/fs/cgroup"),
                source: std::io::Error::other("no cgroup file system is mounted"),
            });
        }
        let mut cg = PodCgroup::default();
        for root in roots {
            let v2 = root.join("cgroup.controllers").exists();
            let cpuset_v1 = !v2 && root.join("cpuset.cpus").exists();
            let mut dir = root.clone();
            for c in rel.components() {
                let parent = dir.clone();
                dir.push(c);
                if dir.is_dir() {
                    continue;
                }
                if v2 {
                    // Let the new child use the parent's controllers (memory and cpu accounting). Best
                    // effort: a parent with processes of its own refuses (no internal processes).
                    if let Ok(ctrl) = std::fs::read_to_string(parent.join("cgroup.controllers")) {
                        let want: Vec<String> = ctrl
                            .split_whitespace()
                            .filter(|c| ["cpu", "memory", "pids", "io"].contains(c))
                            .map(|c| format!("+{c}"))
                            .collect();
                        if !want.is_empty() {
                            let _ = std::fs::write(
                                parent.join("cgroup.subtree_control"),
                                want.join(" "),
                            );
                        }
                    }
                }
                match std::fs::create_dir(&dir) {
                    Ok(()) => cg.created.push(dir.clone()),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => {
                        return Err(io_err("cannot create cgroup", &dir)(e));
                    }
                }
                if cpuset_v1 {
                    // A new v1 cpuset starts empty and refuses tasks: inherit the parent's.
                    for f in ["cpuset.cpus", "cpuset.mems"] {
                        let v = std::fs::read_to_string(parent.join(f))
                            .map_err(io_err("cannot read", &parent))?;
                        std::fs::write(dir.join(f), v.trim())
                            .map_err(io_err("cannot write cpuset of", &dir))?;
                    }
                }
            }
            cg.dirs.push(dir);
        }
        Ok(cg)
    }

    /// Keeps the directories on [`PodCgroup::remove`] (a parent shared by several sandboxes).
    pub fn keep(mut self) {
        self.created.clear();
    }

    /// The cgroup directories (one per hierarchy).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// `cgroup.procs` of each directory: a process joins by writing `0` to each.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Removes the directories capsa created (deepest first); call once the processes in them are gone.
    pub fn remove(&mut self) {
        while let Some(dir) = self.created.pop() {
            let mut tries = 0;
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    // Exiting processes leave the cgroup a moment after they are reaped.
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 50 => {
                        tries += 1;
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) => {
                        tracing::debug!(cgroup = %dir.display(), error = %e, "cgroup not removed");
                        break;
                    }
                }
            }
        }
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Removes `rel`'s directory under each hierarchy if it exists and is empty (a dead shim's sandbox
/// cgroup; waits a little for killed processes to leave it). Returns what was removed.
pub fn remove_leaf(roots: &[PathBuf], rel: &Path) -> Vec<String> {
    let mut done = Vec::new();
    for root in roots {
        let dir = root.join(rel);
        if !dir.is_dir() {
            continue;
        }
        let mut cg = PodCgroup {
            dirs: vec![dir.clone()],
            created: vec![dir.clone()],
        };
        cg.remove();
        if !dir.exists() {
            done.push(format!("removed cgroup {}", dir.display()));
        }
    }
    done
}

/// The node's hierarchies, from `/proc/self/mounts`.
pub fn node_hierarchies() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| hierarchies(&m))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_form() {
        assert_eq!(
            parse_cgroups_path("/kubepods/besteffort/pod123/abc").unwrap(),
            Path::new("kubepods/besteffort/pod123/abc")
        );
        assert_eq!(
            parse_cgroups_path("/k8s.io/0123abcd").unwrap(),
            Path::new("k8s.io/0123abcd")
        );
        for bad in ["/", "", "/a/../b", "/a/b\nc"] {
            let e = parse_cgroups_path(bad).unwrap_err();
            assert!(e.to_string().contains("cgroupsPath"), "{e}");
        }
    }

    #[test]
    fn systemd_form() {
        assert_eq!(
            parse_cgroups_path("kubepods-besteffort-pod1234.slice:cri-containerd:abc").unwrap(),
            Path::new(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1234.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            parse_cgroups_path("system.slice:docker:x").unwrap(),
            Path::new("system.slice/docker-x.scope")
        );
        assert_eq!(
            parse_cgroups_path(":capsa:x").unwrap(),
            Path::new("system.slice/capsa-x.scope")
        );
        assert_eq!(
            parse_cgroups_path("-.slice::x").unwrap(),
            Path::new("x.scope")
        );
        for bad in [
            "a.slice:p:",
            "notaslice:p:x",
            "a--b.slice:p:x",
            "a-.slice:p:x",
        ] {
            assert!(parse_cgroups_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hierarchies_of_each_layout() {
        let v2 = "sysfs /sys sysfs rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
        assert_eq!(hierarchies(v2), [PathBuf::from("/sys/fs/cgroup")]);
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            hierarchies(hybrid),
            [
                PathBuf::from("/sys/fs/cgroup/cpu"),
                PathBuf::from("/sys/fs/cgroup/memory")
            ]
        );
        assert!(hierarchies("proc /proc proc rw 0 0\n").is_empty());
    }

    #[test]
    fn created_directories_are_removed_and_existing_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("h");
        std::fs::create_dir_all(root.join("kubepods")).unwrap();
        let mut cg =
            PodCgroup::create(std::slice::from_ref(&root), Path::new("kubepods/pod1/sb")).unwrap();
        assert_eq!(cg.dirs(), [root.join("kubepods/pod1/sb")]);
        assert_eq!(
            cg.procs_files(),
            [root.join("kubepods/pod1/sb/cgroup.procs")]
        );
        assert!(root.join("kubepods/pod1/sb").is_dir());
        cg.remove();
        assert!(!root.join("kubepods/pod1").exists());
        assert!(root.join("kubepods").is_dir());
    }

    #[test]
    fn a_dead_shims_leaf_is_removed() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("h");
        std::fs::create_dir_all(root.join("pods/sb")).unwrap();
        let done = remove_leaf(std::slice::from_ref(&root), Path::new("pods/sb"));
        assert_eq!(done.len(), 1, "{done:?}");
        assert!(!root.join("pods/sb").exists());
        assert!(root.join("pods").exists());
        assert!(remove_leaf(&[root], Path::new("pods/sb")).is_empty());
    }

    #[test]
    fn errors_name_the_path() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("not-a-dir");
        std::fs::write(&file, "").unwrap();
        let e = PodCgroup::create(std::slice::from_ref(&file), Path::new("x")).unwrap_err();
        assert!(
            e.to_string()
                .contains(&file.join("x").display().to_string()),
            "{e}"
        );
    }
}
