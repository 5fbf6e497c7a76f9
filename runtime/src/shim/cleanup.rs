//! What `containerd-shim-capsa-v2 delete` does when the shim is gone: remove everything the container
//! and, if its shim died, its sandbox VM left on the host (VMM, sandbox directory, and the taps and tc
//! redirects in the pod's network namespace, so that containerd's CNI DEL finds the veth as CNI left it).

use std::path::{Path, PathBuf};

use super::bootstrap::{grouping, read_annotations, shim_address, socket_in_use};
use super::vm_sandbox::ROOTFS_IMAGE;
use crate::network::sandbox::netns_path_from_json;
use crate::sandboxes::process_cmdlines;

/// The sandbox directory a `capsa-vmm` command line (NUL-split) serves when it belongs to sandbox
/// `group`: its `--vsock-uds` is `<dir>/vsock.sock` with `dir` named `group`.
pub fn vmm_sandbox_dir(args: &[&[u8]], group: &str) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    if !args.first()?.ends_with(b"capsa-vmm") {
        return None;
    }
    let i = args.iter().position(|a| *a == b"--vsock-uds")?;
    let uds = Path::new(std::ffi::OsStr::from_bytes(args.get(i + 1)?));
    if uds.file_name()? != "vsock.sock" {
        return None;
    }
    let dir = uds.parent()?;
    (dir.is_absolute() && dir.file_name()? == group).then(|| dir.to_path_buf())
}

/// `capsa-vmm` processes of sandbox `group` under any state directory (the shim's `state_dir` comes
/// from CRI's ConfigPath option, which reaches `start` but not `delete`): (pid, sandbox directory).
pub fn find_sandbox_vmms(group: &str) -> Vec<(i32, PathBuf)> {
    process_cmdlines()
        .filter_map(|(pid, cmdline)| {
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            vmm_sandbox_dir(&args, group).map(|d| (pid, d))
        })
        .collect()
}

/// The pod network namespace the sandbox whose VM container `id` booted was plumbed into: the
/// `config.json` network namespace path of the sandbox container itself (`id` == `group`: CRI's
/// sandbox container, or a lone `ctr run` container). Other containers of a pod name
/// `/proc/<pid>/ns/net` of the shim's task pid, which is not the pod's namespace.
pub fn sandbox_netns(id: &str, group: &str, bundle: &Path) -> Option<PathBuf> {
    if id != group {
        return None;
    }
    netns_path_from_json(&std::fs::read(bundle.join("config.json")).ok()?)
}

/// Removes capsa's taps and ingress redirects from the namespace at `netns` (a missing namespace is
/// fine); returns what happened, for the log.
pub fn cleanup_pod_network(netns: &Path) -> String {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return format!("pod network {}: no runtime: {e}", netns.display()),
    };
    match rt.block_on(crate::network::cleanup_netns(netns)) {
        Ok(r) => format!(
            "pod network {}: removed taps {:?}, ingress qdiscs {:?}",
            netns.display(),
            r.taps_deleted,
            r.qdiscs_deleted
        ),
        Err(e) => format!("pod network {}: {e}", netns.display()),
    }
}

/// Cleans up after container `id` of `bundle`; returns what it did, for the log.
pub fn cleanup(
    id: &str,
    namespace: &str,
    containerd_address: &str,
    bundle: &Path,
    state_dir: &Path,
) -> Vec<String> {
    let mut done = Vec::new();
    let rootfs = bundle.join("rootfs");
    let t = rootfs.to_string_lossy().into_owned();
    match containerd_shim::mount::umount_recursive(Some(&t), libc::MNT_DETACH) {
        Ok(()) => done.push(format!("unmounted {t}")),
        Err(e) => done.push(format!("unmount {t}: {e}")),
    }
    let image = bundle.join(ROOTFS_IMAGE);
    if std::fs::remove_file(&image).is_ok() {
        done.push(format!("removed {}", image.display()));
    }
    let annotations = read_annotations(bundle).unwrap_or_default();
    let group = grouping(id, &annotations);
    let shim_alive = shim_address(containerd_address, namespace, &group)
        .map(|a| socket_in_use(&a))
        .unwrap_or(false);
    if !shim_alive && !group.is_empty() && !group.contains('/') && group != "." && group != ".." {
        let mut dirs: Vec<PathBuf> = vec![state_dir.join(&group)];
        for (pid, dir) in find_sandbox_vmms(&group) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            done.push(format!("killed orphaned VMM {pid} of {}", dir.display()));
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        if let Some(netns) = sandbox_netns(id, &group, bundle) {
            done.push(cleanup_pod_network(&netns));
        }
        // The VMM's jail (root directory, uid lock) under each run root, and the pod cgroup the VMM and
        // virtiofsd ran in (only the sandbox's own, never a container's; busy or absent ones stay).
        let mut run_roots: Vec<PathBuf> = dirs
            .iter()
            .filter_map(|d| d.parent())
            .map(Path::to_path_buf)
            .collect();
        run_roots.dedup();
        for run_root in &run_roots {
            done.extend(crate::jail::cleanup_sandbox(run_root, &group));
        }
        if id == group {
            let spec: Option<serde_json::Value> = std::fs::read(bundle.join("config.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let rel = match spec
                .as_ref()
                .and_then(|s| s["linux"]["cgroupsPath"].as_str())
            {
                Some(p) if !p.is_empty() => crate::jail::cgroup::parse_cgroups_path(p).ok(),
                _ => Some(Path::new("capsa").join(&group)),
            };
            if let Some(rel) = rel {
                let roots = crate::jail::cgroup::node_hierarchies();
                done.extend(crate::jail::cgroup::remove_leaf(&roots, &rel));
            }
        }
        for sandbox_dir in dirs.into_iter().filter(|d| d.exists()) {
            // Containers' rootfs and bind mounts under the share (virtio-fs mode) come off first:
            // removing the directory must never reach into a snapshot or a host file.
            let d = sandbox_dir.to_string_lossy().into_owned();
            match containerd_shim::mount::umount_recursive(Some(&d), libc::MNT_DETACH) {
                Ok(()) => done.push(format!("unmounted everything under {d}")),
                Err(e) => {
                    done.push(format!("unmount under {d}: {e}; not removing it"));
                    continue;
                }
            }
            match std::fs::remove_dir_all(&sandbox_dir) {
                Ok(()) => done.push(format!("removed {}", sandbox_dir.display())),
                Err(e) => done.push(format!("remove {}: {e}", sandbox_dir.display())),
            }
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleanup_removes_the_image_and_a_dead_shims_sandbox_dir() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        std::fs::write(
            bundle.join("config.json"),
            r#"{"annotations":{"io.kubernetes.cri.sandbox-id":"podx"}}"#,
        )
        .unwrap();
        std::fs::write(bundle.join(ROOTFS_IMAGE), b"img").unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(state.join("podx")).unwrap();
        std::fs::write(state.join("podx/console.log"), b"x").unwrap();
        let sock = dir.path().join("containerd.sock");
        let done = cleanup("c1", "test-ns", &sock.to_string_lossy(), &bundle, &state);
        assert!(!bundle.join(ROOTFS_IMAGE).exists(), "{done:?}");
        assert!(!state.join("podx").exists(), "{done:?}");
        assert!(state.exists(), "only the sandbox's own directory goes");
    }

    #[test]
    fn only_the_sandbox_containers_netns_is_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"linux":{"namespaces":[{"type":"network","path":"/var/run/netns/cni-x"}]}}"#,
        )
        .unwrap();
        assert_eq!(
            sandbox_netns("pod", "pod", dir.path()),
            Some(PathBuf::from("/var/run/netns/cni-x"))
        );
        assert_eq!(sandbox_netns("app", "pod", dir.path()), None);
        assert_eq!(sandbox_netns("pod", "pod", &dir.path().join("no")), None);
        // A namespace that is already gone (containerd removed it) is nothing to do.
        let msg = cleanup_pod_network(Path::new("/nonexistent/capsa-netns"));
        assert!(msg.contains("removed taps []"), "{msg}");
    }

    #[test]
    fn a_vmm_is_matched_to_its_sandbox_by_its_socket_path() {
        let args = |v: &[&'static str]| v.iter().map(|a| a.as_bytes()).collect::<Vec<_>>();
        let vmm = args(&[
            "/usr/libexec/capsa/capsa-vmm",
            "--kernel",
            "/k",
            "--vsock-uds",
            "/tmp/cri1/capsa/pod1/vsock.sock",
        ]);
        assert_eq!(
            vmm_sandbox_dir(&vmm, "pod1"),
            Some(PathBuf::from("/tmp/cri1/capsa/pod1"))
        );
        assert_eq!(vmm_sandbox_dir(&vmm, "pod2"), None);
        assert_eq!(vmm_sandbox_dir(&vmm, "capsa"), None);
        for other in [
            args(&["/bin/sleep", "--vsock-uds", "/x/pod1/vsock.sock"]),
            args(&["capsa-vmm", "--vsock-uds", "/x/pod1/other.sock"]),
            args(&["capsa-vmm", "--vsock-uds", "pod1/vsock.sock"]),
            args(&["capsa-vmm", "--vsock-uds"]),
            args(&["capsa-vmm"]),
            args(&[]),
        ] {
            assert_eq!(vmm_sandbox_dir(&other, "pod1"), None, "{other:?}");
        }
        assert!(find_sandbox_vmms("no-such-capsa-sandbox").is_empty());
    }

    #[test]
    fn vmm_lookup_finds_nothing_for_an_unknown_socket() {
        assert!(crate::sandboxes::find_vmm_pids("/nonexistent/capsa/vsock.sock").is_empty());
    }
}
