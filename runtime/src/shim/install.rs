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
    #[error("{path} is not valid TOML: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml_edit::TomlError>,
    },
    #[error("{path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
}

/// The table path of the CRI runtimes for a containerd config of `version`: containerd 1.6/1.7 (version 2)
/// and containerd 2.x (version 3).
fn runtimes_path(version: i64) -> Option<[&'static str; 4]> {
    match version {
        2 => Some([
            "plugins",
            "io.containerd.grpc.v1.cri",
            "containerd",
            "runtimes",
        ]),
        3 => Some([
            "plugins",
            "io.containerd.cri.v1.runtime",
            "containerd",
            "runtimes",
        ]),
        _ => None,
    }
}

/// The config's `version` (containerd reads a missing one as 1); an empty document is a fresh version 2.
fn config_version(doc: &toml_edit::DocumentMut, path: &Path) -> Result<i64, InstallError> {
    if doc.is_empty() {
        return Ok(2);
    }
    let version = match doc.get("version") {
        None => 1,
        Some(v) => v.as_integer().ok_or_else(|| InstallError::Unsupported {
            path: path.to_owned(),
            reason: format!("version = {} is not a number", v.to_string().trim()),
        })?,
    };
    if runtimes_path(version).is_none() {
        return Err(InstallError::Unsupported {
            path: path.to_owned(),
            reason: format!(
                "a containerd config of version {version}{}; capsa knows version 2 (containerd 1.6, 1.7) \
                 and version 3 (containerd 2.x)",
                if doc.get("version").is_none() { " (no version key)" } else { "" }
            ),
        });
    }
    Ok(version)
}

fn parse(existing: &str, path: &Path) -> Result<toml_edit::DocumentMut, InstallError> {
    existing
        .parse::<toml_edit::DocumentMut>()
        .map_err(|e| InstallError::Parse {
            path: path.to_owned(),
            source: Box::new(e),
        })
}

/// The implicit (header-less) parent tables down to `keys`, created as needed.
fn table_at<'a>(
    doc: &'a mut toml_edit::DocumentMut,
    keys: &[&str],
    path: &Path,
) -> Result<&'a mut toml_edit::Table, InstallError> {
    let mut t = doc.as_table_mut();
    for k in keys {
        let entry = t.entry(k).or_insert_with(|| {
            let mut n = toml_edit::Table::new();
            n.set_implicit(true);
            toml_edit::Item::Table(n)
        });
        t = entry
            .as_table_mut()
            .ok_or_else(|| InstallError::Unsupported {
                path: path.to_owned(),
                reason: format!("{k} is not a table"),
            })?;
    }
    Ok(t)
}

/// Adds capsa's runtime entry to a containerd config document (version 2 or 3), keeping everything
/// else as it was (comments and formatting too); `None` when the entry is already there.
pub fn add_runtime_entry(
    existing: &str,
    path: &Path,
    capsa_config: &Path,
) -> Result<Option<String>, InstallError> {
    let mut doc = parse(existing, path)?;
    let fresh = doc.is_empty();
    let version = config_version(&doc, path)?;
    if fresh {
        doc.insert("version", toml_edit::value(2));
    }
    let keys = runtimes_path(version).unwrap_or_default();
    let runtimes = table_at(&mut doc, &keys, path)?;
    if runtimes.contains_key(HANDLER) {
        return Ok(None);
    }
    let mut rt = toml_edit::Table::new();
    rt.decor_mut().set_prefix(format!(
        "\n# capsa: pods of RuntimeClass \"{HANDLER}\" run in capsa microVMs (written by `capsa install`)\n"
    ));
    rt.insert("runtime_type", toml_edit::value(RUNTIME_TYPE));
    let mut annotations = toml_edit::Array::new();
    annotations.push("capsa.io/*");
    rt.insert("pod_annotations", toml_edit::value(annotations));
    rt.insert("privileged_without_host_devices", toml_edit::value(true));
    let mut options = toml_edit::Table::new();
    options.insert(
        "ConfigPath",
        toml_edit::value(capsa_config.to_string_lossy().into_owned()),
    );
    rt.insert("options", toml_edit::Item::Table(options));
    runtimes.insert(HANDLER, toml_edit::Item::Table(rt));
    Ok(Some(doc.to_string()))
}

/// Removes capsa's runtime entry from a containerd config document; `None` when it is not there.
pub fn remove_runtime_entry(existing: &str, path: &Path) -> Result<Option<String>, InstallError> {
    let mut doc = parse(existing, path)?;
    if doc.is_empty() {
        return Ok(None);
    }
    let version = config_version(&doc, path)?;
    let keys = runtimes_path(version).unwrap_or_default();
    let mut t = doc.as_table_mut();
    for k in keys {
        match t.get_mut(k).and_then(|i| i.as_table_mut()) {
            Some(n) => t = n,
            None => return Ok(None),
        }
    }
    Ok(t.remove(HANDLER).map(|_| doc.to_string()))
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

/// What [`uninstall`] removes.
pub struct UninstallPaths {
    pub containerd_config: PathBuf,
    pub capsa_config: PathBuf,
    pub shim_link_dir: PathBuf,
    /// Also remove capsa's own configuration file.
    pub purge: bool,
}

/// Undoes [`install`]: the runtime entry in containerd's config (everything else in it kept), the shim's
/// link (only if it is a symlink: a binary someone installed there is left alone), and with `purge`
/// capsa's configuration. Running sandboxes are not touched (their shims keep running until their pods
/// end; `capsa list` shows them).
pub fn uninstall(p: &UninstallPaths) -> Result<InstallReport, InstallError> {
    let mut r = InstallReport::default();
    match std::fs::read_to_string(&p.containerd_config) {
        Ok(existing) => match remove_runtime_entry(&existing, &p.containerd_config)? {
            Some(doc) => {
                std::fs::write(&p.containerd_config, doc)
                    .map_err(io("write", &p.containerd_config))?;
                r.lines.push(format!(
                    "removed runtime \"{HANDLER}\" from {}; restart containerd",
                    p.containerd_config.display()
                ));
            }
            None => r.lines.push(format!(
                "{} has no \"{HANDLER}\" runtime",
                p.containerd_config.display()
            )),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => r
            .lines
            .push(format!("no {}", p.containerd_config.display())),
        Err(e) => return Err(io("read", &p.containerd_config)(e)),
    }
    let link = p.shim_link_dir.join(SHIM_BINARY);
    match std::fs::symlink_metadata(&link) {
        Ok(m) if m.file_type().is_symlink() => {
            std::fs::remove_file(&link).map_err(io("remove", &link))?;
            r.lines.push(format!("removed {}", link.display()));
        }
        Ok(_) => r.lines.push(format!(
            "left {} (not a link capsa install made)",
            link.display()
        )),
        Err(_) => {}
    }
    if p.purge {
        match std::fs::remove_file(&p.capsa_config) {
            Ok(()) => r
                .lines
                .push(format!("removed {}", p.capsa_config.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove", &p.capsa_config)(e)),
        }
    } else if p.capsa_config.exists() {
        r.lines.push(format!(
            "kept {} (--purge removes it)",
            p.capsa_config.display()
        ));
    }
    r.lines.push(format!(
        "the RuntimeClass stays in the cluster: kubectl delete runtimeclass {HANDLER}"
    ));
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_2_configs_of_version_3_get_the_entry_under_their_own_plugin() {
        let cfg = Path::new("/etc/capsa/configuration.toml");
        let base = "version = 3\n\n# keep me\n[plugins.'io.containerd.cri.v1.images']\n  snapshotter = 'overlayfs'\n";
        let doc = add_runtime_entry(base, Path::new("c.toml"), cfg)
            .unwrap()
            .unwrap();
        assert!(
            doc.starts_with(base),
            "existing text kept as it was:\n{doc}"
        );
        let v: toml::Value = toml::from_str(&doc).unwrap();
        let rt = &v["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["capsa"];
        assert_eq!(rt["runtime_type"].as_str(), Some(RUNTIME_TYPE));
        assert!(add_runtime_entry(&doc, Path::new("c.toml"), cfg)
            .unwrap()
            .is_none());
        let removed = remove_runtime_entry(&doc, Path::new("c.toml"))
            .unwrap()
            .unwrap();
        let v: toml::Value = toml::from_str(&removed).unwrap();
        let capsa = v
            .get("plugins")
            .and_then(|p| p.get("io.containerd.cri.v1.runtime"))
            .and_then(|p| p.get("containerd"))
            .and_then(|p| p.get("runtimes"))
            .and_then(|p| p.get("capsa"));
        assert!(capsa.is_none(), "{removed}");
        assert!(removed.contains("# keep me"), "{removed}");
        assert!(remove_runtime_entry(&removed, Path::new("c.toml"))
            .unwrap()
            .is_none());
        // Version 1 (or none), unknown versions and broken TOML are refused, naming what is wrong.
        for (text, want) in [
            ("[plugins.cri]\n", "version 1 (no version key)"),
            ("version = 1\n", "version 1;"),
            ("version = 4\n", "version 4"),
            ("version = \"2\"\n", "is not a number"),
        ] {
            let e = add_runtime_entry(text, Path::new("c.toml"), cfg)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        assert!(matches!(
            add_runtime_entry("version = = 2", Path::new("c.toml"), cfg),
            Err(InstallError::Parse { .. })
        ));
    }

    #[test]
    fn uninstall_undoes_install_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let containerd_config = dir.path().join("containerd/config.toml");
        std::fs::create_dir_all(containerd_config.parent().unwrap()).unwrap();
        std::fs::write(&containerd_config, "version = 2\n# mine\n").unwrap();
        let shim = dir.path().join("containerd-shim-capsa-v2.real");
        std::fs::write(&shim, "").unwrap();
        let p = InstallPaths {
            containerd_config: containerd_config.clone(),
            capsa_config: dir.path().join("capsa/configuration.toml"),
            shim,
            shim_link_dir: dir.path().to_path_buf(),
            vmm: "/v".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
        };
        install(&p).unwrap();
        let u = UninstallPaths {
            containerd_config: containerd_config.clone(),
            capsa_config: p.capsa_config.clone(),
            shim_link_dir: dir.path().to_path_buf(),
            purge: false,
        };
        let r = uninstall(&u).unwrap();
        assert!(r.lines[0].starts_with("removed runtime"), "{:?}", r.lines);
        let left = std::fs::read_to_string(&containerd_config).unwrap();
        assert!(
            !left.contains(RUNTIME_TYPE) && left.contains("# mine"),
            "{left}"
        );
        assert!(!dir.path().join(SHIM_BINARY).exists());
        assert!(p.capsa_config.exists(), "kept without --purge");
        // Again: nothing to remove; --purge takes the configuration.
        let r = uninstall(&UninstallPaths { purge: true, ..u }).unwrap();
        assert!(r.lines[0].contains("has no"), "{:?}", r.lines);
        assert!(!p.capsa_config.exists());
    }

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
            Err(InstallError::Unsupported { .. })
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
