//! Where capsa finds the files it needs to start a VM: the `capsa-vmm` binary, the guest kernel and the
//! guest initrd.
//!
//! Order: an explicit path, then the environment (`CAPSA_VMM`, `CAPSA_KERNEL`, `CAPSA_INITRD`), then
//! next to the running executable (`capsa-vmm`) or the workspace's `build/guest/` when running from
//! `target/<profile>/`, then the installed locations under `/usr/libexec/capsa` and `/usr/share/capsa`.

use std::path::{Path, PathBuf};

/// Paths to the VMM binary, guest kernel and guest initrd (each may not exist: see [`Artifacts::missing`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Artifacts {
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Installed locations.
pub const INSTALLED_VMM: &str = "/usr/libexec/capsa/capsa-vmm";
pub const INSTALLED_KERNEL: &str = "/usr/share/capsa/vmlinux";
pub const INSTALLED_INITRD: &str = "/usr/share/capsa/initrd.img";

impl Artifacts {
    /// Locates the artifacts; `explicit` values win over every other source.
    pub fn locate(vmm: Option<PathBuf>, kernel: Option<PathBuf>, initrd: Option<PathBuf>) -> Self {
        let exe_dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        Self::locate_with(
            vmm,
            kernel,
            initrd,
            |k| std::env::var_os(k).map(PathBuf::from),
            exe_dir.as_deref(),
        )
    }

    /// [`Artifacts::locate`] with the environment and the executable's directory injected.
    pub fn locate_with(
        vmm: Option<PathBuf>,
        kernel: Option<PathBuf>,
        initrd: Option<PathBuf>,
        env: impl Fn(&str) -> Option<PathBuf>,
        exe_dir: Option<&Path>,
    ) -> Self {
        // target/<profile>/capsa → the workspace root is two levels up.
        let workspace_guest = exe_dir
            .and_then(|d| d.parent())
            .and_then(|d| d.parent())
            .map(|root| root.join("build/guest"));
        let pick = |explicit: Option<PathBuf>,
                    var: &str,
                    candidates: Vec<Option<PathBuf>>,
                    installed: &str| {
            explicit
                .or_else(|| env(var))
                .or_else(|| candidates.into_iter().flatten().find(|p| p.exists()))
                .unwrap_or_else(|| PathBuf::from(installed))
        };
        Artifacts {
            vmm: pick(
                vmm,
                "CAPSA_VMM",
                vec![exe_dir.map(|d| d.join("capsa-vmm"))],
                INSTALLED_VMM,
            ),
            kernel: pick(
                kernel,
                "CAPSA_KERNEL",
                vec![workspace_guest.as_ref().map(|d| d.join("vmlinux"))],
                INSTALLED_KERNEL,
            ),
            initrd: pick(
                initrd,
                "CAPSA_INITRD",
                vec![workspace_guest.as_ref().map(|d| d.join("initrd.img"))],
                INSTALLED_INITRD,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_then_env_then_neighbours_then_installed() {
        let dir = tempfile::tempdir().unwrap();
        let exe_dir = dir.path().join("target/release");
        std::fs::create_dir_all(&exe_dir).unwrap();
        std::fs::create_dir_all(dir.path().join("build/guest")).unwrap();
        std::fs::write(exe_dir.join("capsa-vmm"), b"").unwrap();
        std::fs::write(dir.path().join("build/guest/vmlinux"), b"").unwrap();

        let env = |k: &str| (k == "CAPSA_INITRD").then(|| PathBuf::from("/env/initrd"));
        let a = Artifacts::locate_with(None, None, None, env, Some(&exe_dir));
        assert_eq!(a.vmm, exe_dir.join("capsa-vmm"));
        assert_eq!(a.kernel, dir.path().join("build/guest/vmlinux"));
        assert_eq!(a.initrd, PathBuf::from("/env/initrd"));

        let a = Artifacts::locate_with(
            Some("/x/vmm".into()),
            None,
            None,
            |_| None,
            Some(Path::new("/nonexistent/a/b")),
        );
        assert_eq!(a.vmm, PathBuf::from("/x/vmm"));
        assert_eq!(a.kernel, PathBuf::from(INSTALLED_KERNEL));
        assert_eq!(a.initrd, PathBuf::from(INSTALLED_INITRD));
    }
}
