//! `capsa install`: registers capsa with containerd (CRI runtime `capsa`, runtime_type
//! `io.containerd.capsa.v2`), links the shim into `$PATH` for `ctr run --runtime`, writes a default
//! `/etc/capsa/configuration.toml`, and prints the Kubernetes RuntimeClass.

use std::path::{Path, PathBuf};

/// The runtime handler name (CRI) and RuntimeClass name.
pub const HANDLER: &str = "capsa";
pub const RUNTIME_TYPE: &str = "io.containerd.capsa.v2";
pub const SHIM_BINARY: &str = "containerd-shim-capsa-v2";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is a containerd config of version 1; capsa needs version = 2")]
    OldConfig(PathBuf),
}

/// containerd's (version 2) runtime entry for capsa.
pub fn runtime_entry(capsa_config: &Path) -> String {
    format!(
        r#"
# capsa: pods of RuntimeClass "{HANDLER}" run in capsa microVMs (written by `capsa install`)
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{HANDLER}]
  runtime_type = "{RUNTIME_TYPE}"
  pod_annotations = ["capsa.io/*"]
  privileged_without_host_devices = true
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{HANDLER}.options]
  ConfigPath = "{}"
"#,
        capsa_config.display()
    )
}

/// What a capsa pod costs the node beyond its containers' own requests (the RuntimeClass's
/// `overhead.podFixed`, which the scheduler adds to every pod of the class and the kubelet to its cgroup).
///
/// Memory: the host PSS of capsa-vmm (guest pages the kernel and agent touched plus the VMM itself),
/// virtiofsd and the shim for a busybox pod, as `make bench` prints it ("host memory of one capsa pod"):
/// 65.7 MiB on 2026-11-27, rounded up to the next 16 MiB. CPU: the VMM's threads, virtiofsd and the shim
/// are idle while the guest is; 250m (Kata's figure) covers the guest kernel's own housekeeping on its
/// base vCPU and the host-side device work, and is not a measurement.
pub const OVERHEAD_MEMORY: &str = "80Mi";
pub const OVERHEAD_CPU: &str = "250m";

/// The RuntimeClass that sends pods to the `capsa` handler, with the per-pod overhead.
pub fn runtime_class_manifest() -> String {
    format!(
        "apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata:\n  name: {HANDLER}\nhandler: {HANDLER}\n\
         overhead:\n  podFixed:\n    memory: \"{OVERHEAD_MEMORY}\"\n    cpu: \"{OVERHEAD_CPU}\"\n"
    )
}

/// Adds capsa's runtime entry to a containerd config document; `None` when it is already there.
pub fn add_runtime_entry(
    existing: &str,
    path: &Path,
    capsa_config: &Path,
) -> Result<Option<String>, InstallError> {
    let header = format!("containerd.runtimes.{HANDLER}]");
    if existing.contains(&header) {
        return Ok(None);
    }
    let has_version_2 = existing
        .lines()
        .any(|l| l.trim().replace(' ', "") == "version=2");
    if !existing.trim().is_empty() && !has_version_2 {
        return Err(InstallError::OldConfig(path.to_owned()));
    }
    let mut doc = if existing.trim().is_empty() {
        "version = 2\n".to_owned()
    } else {
        existing.to_owned()
    };
    if !doc.ends_with('\n') {
        doc.push('\n');
    }
    doc.push_str(&runtime_entry(capsa_config));
    Ok(Some(doc))
}

/// A default configuration naming the installed artifacts.
pub fn default_config(vmm: &Path, kernel: &Path, initrd: &Path) -> String {
    format!(
        "# capsa runtime configuration (see docs/shim.md)\n[hypervisor]\npath = \"{}\"\nkernel = \"{}\"\ninitrd = \"{}\"\ndefault_vcpus = 1\ndefault_memory_mib = 256\ndebug_console = false\n\n[runtime]\nlog_level = \"info\"\nstate_dir = \"/run/capsa\"\n",
        vmm.display(),
        kernel.display(),
        initrd.display()
    )
}

/// What [`install`] did.
#[derive(Debug, Default)]
pub struct InstallReport {
    pub lines: Vec<String>,
}

pub struct InstallPaths {
    pub containerd_config: PathBuf,
    pub capsa_config: PathBuf,
    pub shim: PathBuf,
    pub shim_link_dir: PathBuf,
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InstallError {
    let path = path.to_owned();
    move |source| InstallError::Io { what, path, source }
}

pub fn install(p: &InstallPaths) -> Result<InstallReport, InstallError> {
    let mut r = InstallReport::default();
    let existing = match std::fs::read_to_string(&p.containerd_config) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io("read", &p.containerd_config)(e)),
    };
    match add_runtime_entry(&existing, &p.containerd_config, &p.capsa_config)? {
        Some(doc) => {
            if let Some(dir) = p.containerd_config.parent() {
                std::fs::create_dir_all(dir).map_err(io("create", dir))?;
            }
            std::fs::write(&p.containerd_config, doc).map_err(io("write", &p.containerd_config))?;
            r.lines.push(format!(
                "added runtime \"{HANDLER}\" ({RUNTIME_TYPE}) to {}; restart containerd",
                p.containerd_config.display()
            ));
        }
        None => r.lines.push(format!(
            "{} already has the \"{HANDLER}\" runtime",
            p.containerd_config.display()
        )),
    }
    if p.capsa_config.exists() {
        r.lines.push(format!("kept {}", p.capsa_config.display()));
    } else {
        if let Some(dir) = p.capsa_config.parent() {
            std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        }
        std::fs::write(
            &p.capsa_config,
            default_config(&p.vmm, &p.kernel, &p.initrd),
        )
        .map_err(io("write", &p.capsa_config))?;
        r.lines.push(format!("wrote {}", p.capsa_config.display()));
    }
    let link = p.shim_link_dir.join(SHIM_BINARY);
    if link != p.shim {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&p.shim, &link).map_err(io("symlink", &link))?;
        r.lines
            .push(format!("linked {} -> {}", link.display(), p.shim.display()));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_is_added_once_to_a_version_2_config_and_parses() {
        let cfg = Path::new("/etc/capsa/configuration.toml");
        let base = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"pause:3.6\"\n";
        let doc = add_runtime_entry(base, Path::new("c.toml"), cfg)
            .unwrap()
            .unwrap();
        let v: toml::Value = toml::from_str(&doc).unwrap();
        let rt = &v["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["capsa"];
        assert_eq!(rt["runtime_type"].as_str(), Some(RUNTIME_TYPE));
        assert_eq!(
            rt["options"]["ConfigPath"].as_str(),
            Some("/etc/capsa/configuration.toml")
        );
        assert_eq!(
            v["plugins"]["io.containerd.grpc.v1.cri"]["sandbox_image"].as_str(),
            Some("pause:3.6"),
            "existing settings kept"
        );
        assert!(add_runtime_entry(&doc, Path::new("c.toml"), cfg)
            .unwrap()
            .is_none());
        // Empty file: a fresh version-2 config.
        let fresh = add_runtime_entry("", Path::new("c.toml"), cfg)
            .unwrap()
            .unwrap();
        assert!(toml::from_str::<toml::Value>(&fresh).is_ok());
        // Version 1 configs use other table names: refuse rather than write a dead entry.
        assert!(matches!(
            add_runtime_entry("[plugins.cri]\n", Path::new("c.toml"), cfg),
            Err(InstallError::OldConfig(_))
        ));
    }

    #[test]
    fn install_writes_config_entry_and_link() {
        let dir = tempfile::tempdir().unwrap();
        let p = InstallPaths {
            containerd_config: dir.path().join("containerd/config.toml"),
            capsa_config: dir.path().join("capsa/configuration.toml"),
            shim: dir.path().join("bin/containerd-shim-capsa-v2"),
            shim_link_dir: dir.path().to_owned(),
            vmm: "/usr/libexec/capsa/capsa-vmm".into(),
            kernel: "/usr/share/capsa/vmlinux".into(),
            initrd: "/usr/share/capsa/initrd.img".into(),
        };
        install(&p).unwrap();
        let cfg = crate::shim::config::CapsaConfig::load(Some(&p.capsa_config)).unwrap();
        assert_eq!(
            cfg.hypervisor.kernel,
            PathBuf::from("/usr/share/capsa/vmlinux")
        );
        assert!(std::fs::read_to_string(&p.containerd_config)
            .unwrap()
            .contains(RUNTIME_TYPE));
        assert_eq!(
            std::fs::read_link(dir.path().join(SHIM_BINARY)).unwrap(),
            p.shim
        );
        // Idempotent.
        let r = install(&p).unwrap();
        assert!(r.lines[0].contains("already"), "{:?}", r.lines);
        assert!(runtime_class_manifest().contains("handler: capsa"));
    }

    #[test]
    fn runtime_class_carries_the_pod_overhead() {
        let m = runtime_class_manifest();
        let want = format!(
            "handler: capsa\noverhead:\n  podFixed:\n    memory: \"{OVERHEAD_MEMORY}\"\n    cpu: \"{OVERHEAD_CPU}\"\n"
        );
        assert!(m.ends_with(&want), "{m}");
    }
}
