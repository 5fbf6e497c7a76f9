//! capsa's runtime configuration (`/etc/capsa/configuration.toml`) and the per-pod sizing annotations.
//!
//! ```toml
//! [hypervisor]
//! path = "/usr/libexec/capsa/capsa-vmm"  # the VMM binary
//! kernel = "/usr/share/capsa/vmlinux"     # guest kernel (PVH vmlinux or bzImage)
//! initrd = "/usr/share/capsa/initrd.img"  # initrd carrying capsa-agent as /init
//! default_vcpus = 1
//! default_memory_mib = 256
//! max_vcpus = 8
//! max_memory_mib = 8192
//! kernel_params = ""                      # appended to the runtime's command line
//! debug_console = false                   # true: verbose guest kernel and agent, console in the shim log
//! rootfs_mode = "virtio-fs"               # or "block"; unset: virtio-fs when virtiofsd is found
//! virtiofsd = "/usr/libexec/capsa/virtiofsd"  # unset: the workspace's build/virtiofsd, then this
//! seccomp = true                          # capsa-vmm's per-thread seccomp filters; false (debugging only,
//!                                         # logged as a warning) or "log" (violations only logged)
//! jail = true                             # false: capsa-vmm runs as root, unconfined (debugging only)
//! jail_uid_base = 1900000000              # the jails' uids/gids: jail_uid_base .. +jail_uid_count
//! jail_uid_count = 65536
//! boot_timeout_secs = 60                  # VMM start → agent answers; the error shows the console's tail
//! virtiofsd_timeout_secs = 20             # virtiofsd start → its socket exists
//! stop_timeout_secs = 10                  # each step of a VM stop (DestroySandbox, SIGTERM, then SIGKILL)
//! rpc_timeout_secs = 30                   # deadline of every agent call but waits and output reads; a
//!                                         # SIGKILL (or delete) the agent does not answer in time kills the VM
//!
//! [runtime]
//! log_level = "info"
//! state_dir = "/run/capsa"                # one directory per sandbox under it
//! ```
//! Every key is optional.
//!
//! A pod's VM is sized like Kata's static sandbox resource management: the default size, plus the pod's
//! memory limits and CPU quota on top (containerd's CRI plugin annotates the sandbox with the kubelet's sum of
//! the containers' limits: `io.kubernetes.cri.sandbox-memory`, `-cpu-quota`, `-cpu-period`; a standalone
//! container brings its own `linux.resources`). Annotations `capsa.io/vcpus` and `capsa.io/memory` (MiB, or a
//! size with `Mi`/`Gi`/`M`/`G`) override the result for one pod. Whatever the source, a VM over
//! `max_vcpus`/`max_memory_mib` is refused with the numbers rather than cut down (a CPU quota over the
//! vCPU maximum only caps the pod's share, so that one is clamped with a warning).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default `boot_timeout_secs`: issue 12 saw a guest reach its agent after 26 s on the nested 2-core test
/// host with four pods starting at once (2-3 s alone), so the old fixed 30 s was too tight for a busy node.
pub const DEFAULT_BOOT_TIMEOUT_SECS: u64 = 60;
/// Default `virtiofsd_timeout_secs` (5 s failed under the same load).
pub const DEFAULT_VIRTIOFSD_TIMEOUT_SECS: u64 = 20;
/// Default `stop_timeout_secs`.
pub const DEFAULT_STOP_TIMEOUT_SECS: u64 = 10;
/// Default `rpc_timeout_secs`: an agent call (CreateContainer with its mounts, StartContainer) on a busy
/// 2-core node takes seconds, not tens of them; a guest that does not answer in 30 s is treated as hung.
pub const DEFAULT_RPC_TIMEOUT_SECS: u64 = 30;

/// Where the shim and `capsa run` look for the configuration unless told otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/capsa/configuration.toml";
/// Environment variable that names another configuration file.
pub const CONFIG_ENV: &str = "CAPSA_CONFIG";

pub const ANNOTATION_VCPUS: &str = "capsa.io/vcpus";
pub const ANNOTATION_MEMORY: &str = "capsa.io/memory";

/// containerd's CRI plugin (1.6.x and later) puts the kubelet's pod resources (the sum of the containers'
/// limits, `LinuxPodSandboxConfig.resources`) on the sandbox spec under these keys; `0` means no limit.
pub const CRI_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
pub const CRI_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const CRI_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// Memory the guest kernel and agent need on top of what the containers may use.
pub const GUEST_BASE_MEMORY_MIB: u64 = 128;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad configuration {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("annotation {key}={value:?}: {reason}")]
    Annotation {
        key: String,
        value: String,
        reason: String,
    },
    #[error("VM too large: {0}")]
    TooLarge(String),
    #[error("configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HypervisorConfig {
    pub path: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub default_vcpus: u32,
    pub default_memory_mib: u64,
    pub max_vcpus: u32,
    pub max_memory_mib: u64,
    pub kernel_params: String,
    pub debug_console: bool,
    /// How containers' root file systems reach the guest; `None` = virtio-fs when virtiofsd is found.
    pub rootfs_mode: Option<RootfsMode>,
    /// The virtiofsd binary; `None` = [`default_virtiofsd`].
    pub virtiofsd: Option<PathBuf>,
    /// capsa-vmm's seccomp filters: `true` (default), `false` or `"log"`.
    pub seccomp: crate::vm::SeccompMode,
    /// Jail capsa-vmm (its own uid, no capabilities, its own root and mount/IPC namespaces, rlimits);
    /// `false` is for debugging only and is logged as a warning for every sandbox.
    pub jail: bool,
    /// First uid (and gid) of the jails' range; each live sandbox gets one of its own.
    pub jail_uid_base: u32,
    /// Size of the jails' uid range (how many sandboxes may run at once).
    pub jail_uid_count: u32,
    /// Seconds from starting the VMM to the agent's first answer before the boot is given up.
    pub boot_timeout_secs: u64,
    /// Seconds virtiofsd may take to create its socket.
    pub virtiofsd_timeout_secs: u64,
    /// Seconds for each step of stopping a VM (DestroySandbox, then after SIGTERM).
    pub stop_timeout_secs: u64,
    /// Deadline in seconds of each agent call except the open-ended ones (WaitProcess, output reads,
    /// GetOOMEvent). A SIGKILL of a task or a container delete the agent does not answer within it kills
    /// the VM, so kill, delete and shutdown never hang on a frozen guest.
    pub rpc_timeout_secs: u64,
}

/// How a container's root file system reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum RootfsMode {
    /// Bind-mounted under the sandbox's virtio-fs share (every container of a pod, and its bind mounts).
    #[serde(rename = "virtio-fs")]
    VirtioFs,
    /// Copied into an ext4 image on virtio-blk (the pod's first container only; no bind mounts).
    #[serde(rename = "block")]
    Block,
}

/// virtiofsd next to the workspace (`build/virtiofsd` when running from `target/<profile>/`), else the
/// installed one.
pub fn default_virtiofsd() -> PathBuf {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    default_virtiofsd_from(exe_dir.as_deref())
}

fn default_virtiofsd_from(exe_dir: Option<&Path>) -> PathBuf {
    let workspace = exe_dir
        .and_then(|d| d.parent())
        .and_then(|d| d.parent())
        .map(|root| root.join("build/virtiofsd"));
    let beside = exe_dir.map(|d| d.join("virtiofsd"));
    [workspace, beside]
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(crate::virtiofsd::INSTALLED_VIRTIOFSD))
}

impl HypervisorConfig {
    /// Applies the configured timeouts to a VM's configuration.
    pub fn apply_timeouts(&self, vm: &mut crate::vm::VmConfig) {
        vm.boot_timeout = std::time::Duration::from_secs(self.boot_timeout_secs);
        vm.stop_timeout = std::time::Duration::from_secs(self.stop_timeout_secs);
        if let Some(fs) = vm.shared_fs.as_mut() {
            fs.start_timeout = std::time::Duration::from_secs(self.virtiofsd_timeout_secs);
        }
    }

    /// Deadline of one agent call (`rpc_timeout_secs`).
    pub fn rpc_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.rpc_timeout_secs)
    }

    /// The root file system mode to use and, for virtio-fs, the virtiofsd binary. An explicit
    /// `rootfs_mode = "virtio-fs"` without virtiofsd is an error; unset falls back to block.
    pub fn resolve_rootfs_mode(&self) -> Result<(RootfsMode, Option<PathBuf>), ConfigError> {
        let virtiofsd = self.virtiofsd.clone().unwrap_or_else(default_virtiofsd);
        match self.rootfs_mode {
            Some(RootfsMode::Block) => Ok((RootfsMode::Block, None)),
            Some(RootfsMode::VirtioFs) if !virtiofsd.exists() => Err(ConfigError::Invalid(format!(
                "hypervisor.rootfs_mode = \"virtio-fs\" but virtiofsd {} does not exist (set hypervisor.virtiofsd)",
                virtiofsd.display()
            ))),
            _ if virtiofsd.exists() => Ok((RootfsMode::VirtioFs, Some(virtiofsd))),
            _ => Ok((RootfsMode::Block, None)),
        }
    }
}

impl Default for HypervisorConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from(crate::artifacts::INSTALLED_VMM),
            kernel: PathBuf::from("/usr/share/capsa/vmlinux"),
            initrd: Some(PathBuf::from("/usr/share/capsa/initrd.img")),
            default_vcpus: 1,
            default_memory_mib: 256,
            max_vcpus: 8,
            max_memory_mib: 8192,
            kernel_params: String::new(),
            debug_console: false,
            rootfs_mode: None,
            virtiofsd: None,
            seccomp: crate::vm::SeccompMode::On,
            jail: true,
            jail_uid_base: crate::jail::DEFAULT_UID_BASE,
            jail_uid_count: crate::jail::DEFAULT_UID_COUNT,
            boot_timeout_secs: DEFAULT_BOOT_TIMEOUT_SECS,
            virtiofsd_timeout_secs: DEFAULT_VIRTIOFSD_TIMEOUT_SECS,
            stop_timeout_secs: DEFAULT_STOP_TIMEOUT_SECS,
            rpc_timeout_secs: DEFAULT_RPC_TIMEOUT_SECS,
        }
    }
}

impl HypervisorConfig {
    /// The jail settings for [`crate::vm::VmConfig::jail`].
    pub fn jail_config(&self) -> crate::jail::JailConfig {
        crate::jail::JailConfig {
            enabled: self.jail,
            uids: crate::jail::UidRange {
                base: self.jail_uid_base,
                count: self.jail_uid_count,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSection {
    pub log_level: String,
    pub state_dir: PathBuf,
}

impl Default for RuntimeSection {
    fn default() -> Self {
        Self {
            log_level: "info".into(),
            state_dir: PathBuf::from("/run/capsa"),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CapsaConfig {
    pub hypervisor: HypervisorConfig,
    pub runtime: RuntimeSection,
}

/// vCPUs and memory of one sandbox VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u64,
}

impl CapsaConfig {
    /// Parses a configuration document.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: CapsaConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(e),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Loads `path`; a missing file at the default location gives the defaults, a missing file that was
    /// asked for explicitly is an error.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p.to_owned(), true),
            None => match std::env::var_os(CONFIG_ENV) {
                Some(p) if !p.is_empty() => (PathBuf::from(p), true),
                _ => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
            },
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::from_toml(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(Self::default()),
            Err(source) => Err(ConfigError::Read { path, source }),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let h = &self.hypervisor;
        if h.default_vcpus == 0 || h.default_vcpus > h.max_vcpus {
            return Err(ConfigError::Invalid(format!(
                "hypervisor.default_vcpus = {} must be between 1 and max_vcpus = {}",
                h.default_vcpus, h.max_vcpus
            )));
        }
        if h.default_memory_mib < 64 || h.default_memory_mib > h.max_memory_mib {
            return Err(ConfigError::Invalid(format!(
                "hypervisor.default_memory_mib = {} must be between 64 and max_memory_mib = {}",
                h.default_memory_mib, h.max_memory_mib
            )));
        }
        h.jail_config().uids.validate().map_err(|e| {
            ConfigError::Invalid(format!("hypervisor.jail_uid_base/jail_uid_count: {e}"))
        })?;
        for (key, v) in [
            ("boot_timeout_secs", h.boot_timeout_secs),
            ("virtiofsd_timeout_secs", h.virtiofsd_timeout_secs),
            ("stop_timeout_secs", h.stop_timeout_secs),
            ("rpc_timeout_secs", h.rpc_timeout_secs),
        ] {
            if !(1..=3600).contains(&v) {
                return Err(ConfigError::Invalid(format!(
                    "hypervisor.{key} = {v} must be between 1 and 3600"
                )));
            }
        }
        match self.runtime.log_level.as_str() {
            "error" | "warn" | "info" | "debug" | "trace" => Ok(()),
            other => Err(ConfigError::Invalid(format!(
                "runtime.log_level = {other:?}: use error, warn, info, debug or trace"
            ))),
        }
    }

    /// Size of the VM for a sandbox whose spec carries `annotations` and `limits` (its `linux.resources`):
    /// the pod's limits from containerd's CRI sandbox annotations when present (else `limits`) are added
    /// on top of the default size, so they can actually be used inside the guest; `capsa.io/*`
    /// annotations override the result.
    pub fn vm_size(
        &self,
        annotations: &HashMap<String, String>,
        limits: ContainerLimits,
    ) -> Result<VmSize, ConfigError> {
        let (limits, whose) = match ContainerLimits::from_cri_sandbox(annotations)? {
            Some(pod) => (pod.or(limits), "pod's"),
            None => (limits, "container's"),
        };
        let h = &self.hypervisor;
        let mut size = VmSize {
            vcpus: h.default_vcpus,
            memory_mib: h.default_memory_mib,
        };
        let mut vcpus_annotated = false;
        let mut memory_annotated = false;
        if let Some(v) = annotations.get(ANNOTATION_VCPUS) {
            let n: u32 = v.trim().parse().map_err(|_| ConfigError::Annotation {
                key: ANNOTATION_VCPUS.into(),
                value: v.clone(),
                reason: "not a whole number of vCPUs".into(),
            })?;
            if n == 0 || n > h.max_vcpus {
                return Err(ConfigError::Annotation {
                    key: ANNOTATION_VCPUS.into(),
                    value: v.clone(),
                    reason: format!("must be between 1 and {}", h.max_vcpus),
                });
            }
            size.vcpus = n;
            vcpus_annotated = true;
        }
        if let Some(v) = annotations.get(ANNOTATION_MEMORY) {
            let mib = parse_mib(v).ok_or_else(|| ConfigError::Annotation {
                key: ANNOTATION_MEMORY.into(),
                value: v.clone(),
                reason: "not a size (MiB, or with a Mi/Gi/M/G suffix)".into(),
            })?;
            if !(64..=h.max_memory_mib).contains(&mib) {
                return Err(ConfigError::Annotation {
                    key: ANNOTATION_MEMORY.into(),
                    value: v.clone(),
                    reason: format!("must be between 64 and {} MiB", h.max_memory_mib),
                });
            }
            size.memory_mib = mib;
            memory_annotated = true;
        }
        if !memory_annotated {
            if let Some(bytes) = limits.memory_bytes {
                let mib = bytes.div_ceil(1 << 20);
                let want = GUEST_BASE_MEMORY_MIB.saturating_add(mib);
                // Refused, not cut: a smaller VM would OOM-kill the container below its own limit.
                if want > h.max_memory_mib {
                    return Err(ConfigError::TooLarge(format!(
                        "the {whose} memory limit of {mib} MiB needs a {want} MiB VM (the limit plus \
                         {GUEST_BASE_MEMORY_MIB} MiB for the guest), over hypervisor.max_memory_mib = {} MiB",
                        h.max_memory_mib
                    )));
                }
                size.memory_mib = want.max(size.memory_mib);
            }
        }
        if !vcpus_annotated {
            if let Some(cpus) = limits.cpus() {
                let want = h.default_vcpus.saturating_add(cpus);
                if want > h.max_vcpus {
                    // A CPU limit only caps the container's share: fewer vCPUs are still correct.
                    tracing::warn!(
                        want,
                        max_vcpus = h.max_vcpus,
                        "CPU limit wants more vCPUs than hypervisor.max_vcpus; using the maximum"
                    );
                }
                size.vcpus = want.min(h.max_vcpus);
            }
        }
        Ok(size)
    }

    /// Refuses a VM whose memory is more than the host has (`host_total_mib`, from /proc/meminfo):
    /// it could never be backed, and would push the node into swap or the OOM killer.
    pub fn check_host_memory(size: VmSize, host_total_mib: u64) -> Result<(), ConfigError> {
        if size.memory_mib > host_total_mib {
            return Err(ConfigError::TooLarge(format!(
                "a {} MiB VM is more than this host's {host_total_mib} MiB of memory",
                size.memory_mib
            )));
        }
        Ok(())
    }
}

/// The parts of a container's own resources that size its VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContainerLimits {
    pub memory_bytes: Option<u64>,
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
}

impl ContainerLimits {
    /// Whole CPUs the quota asks for, rounded up.
    pub fn cpus(&self) -> Option<u32> {
        match (self.cpu_quota, self.cpu_period) {
            (Some(q), Some(p)) if q > 0 && p > 0 => u32::try_from((q as u64).div_ceil(p))
                .ok()
                .filter(|c| *c > 0),
            _ => None,
        }
    }

    /// The pod's limits from containerd's CRI sandbox annotations; `None` when the spec has none of
    /// them (not a CRI sandbox, or a containerd that does not set them). A value that is not a number
    /// is an error naming the annotation.
    pub fn from_cri_sandbox(
        annotations: &HashMap<String, String>,
    ) -> Result<Option<Self>, ConfigError> {
        let number = |key: &str| -> Result<Option<i64>, ConfigError> {
            annotations
                .get(key)
                .map(|v| {
                    v.trim()
                        .parse::<i64>()
                        .map_err(|_| ConfigError::Annotation {
                            key: key.into(),
                            value: v.clone(),
                            reason: "not a whole number".into(),
                        })
                })
                .transpose()
        };
        let memory = number(CRI_SANDBOX_MEMORY)?;
        let quota = number(CRI_SANDBOX_CPU_QUOTA)?;
        let period = number(CRI_SANDBOX_CPU_PERIOD)?;
        if memory.is_none() && quota.is_none() && period.is_none() {
            return Ok(None);
        }
        Ok(Some(ContainerLimits {
            memory_bytes: memory.filter(|m| *m > 0).map(|m| m as u64),
            cpu_quota: quota.filter(|q| *q > 0),
            cpu_period: period.filter(|p| *p > 0).map(|p| p as u64),
        }))
    }

    /// These limits, with each one that is unset taken from `other`.
    pub fn or(self, other: Self) -> Self {
        let (cpu_quota, cpu_period) = if self.cpus().is_some() {
            (self.cpu_quota, self.cpu_period)
        } else {
            (other.cpu_quota, other.cpu_period)
        };
        ContainerLimits {
            memory_bytes: self.memory_bytes.or(other.memory_bytes),
            cpu_quota,
            cpu_period,
        }
    }

    /// Reads `linux.resources` of an OCI spec given as JSON.
    pub fn from_spec(spec: &serde_json::Value) -> Self {
        let r = &spec["linux"]["resources"];
        ContainerLimits {
            memory_bytes: r["memory"]["limit"]
                .as_i64()
                .filter(|l| *l > 0)
                .map(|l| l as u64),
            cpu_quota: r["cpu"]["quota"].as_i64(),
            cpu_period: r["cpu"]["period"].as_u64(),
        }
    }
}

/// `"512"` → 512, `"1Gi"`/`"1G"` → 1024, `"256Mi"`/`"256M"` → 256.
fn parse_mib(v: &str) -> Option<u64> {
    let v = v.trim();
    let (num, mult) = if let Some(n) = v.strip_suffix("Gi").or_else(|| v.strip_suffix('G')) {
        (n, 1024)
    } else if let Some(n) = v.strip_suffix("Mi").or_else(|| v.strip_suffix('M')) {
        (n, 1)
    } else {
        (v, 1)
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn full_document_parses() {
        let cfg = CapsaConfig::from_toml(
            r#"
            [hypervisor]
            path = "/opt/capsa/capsa-vmm"
            kernel = "/opt/capsa/vmlinux"
            initrd = "/opt/capsa/initrd.img"
            default_vcpus = 2
            default_memory_mib = 512
            debug_console = true
            seccomp = false
            [runtime]
            log_level = "debug"
            "#,
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(cfg.hypervisor.path, PathBuf::from("/opt/capsa/capsa-vmm"));
        assert_eq!(cfg.hypervisor.default_vcpus, 2);
        assert_eq!(cfg.hypervisor.default_memory_mib, 512);
        assert!(cfg.hypervisor.debug_console);
        assert_eq!(cfg.hypervisor.seccomp, crate::vm::SeccompMode::Off);
        assert_eq!(
            HypervisorConfig::default().seccomp,
            crate::vm::SeccompMode::On
        );
        assert_eq!(cfg.runtime.log_level, "debug");
        // untouched keys keep their defaults
        assert_eq!(cfg.runtime.state_dir, PathBuf::from("/run/capsa"));
        assert_eq!(cfg.hypervisor.max_vcpus, 8);
    }

    #[test]
    fn jail_keys() {
        let d = CapsaConfig::default().hypervisor;
        assert!(d.jail);
        assert_eq!(d.jail_config().uids.base, crate::jail::DEFAULT_UID_BASE);
        let cfg = CapsaConfig::from_toml(
            "[hypervisor]\njail = false\njail_uid_base = 3000000\njail_uid_count = 10\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let j = cfg.hypervisor.jail_config();
        assert!(!j.enabled);
        assert_eq!((j.uids.base, j.uids.count), (3_000_000, 10));
        for bad in [
            "jail_uid_base = 0",
            "jail_uid_base = 65000\njail_uid_count = 1000",
        ] {
            let e = CapsaConfig::from_toml(&format!("[hypervisor]\n{bad}\n"), Path::new("t.toml"))
                .unwrap_err();
            assert!(e.to_string().contains("jail_uid"), "{e}");
        }
    }

    #[test]
    fn rootfs_mode_and_virtiofsd() {
        let d = tempfile::tempdir().unwrap();
        let vfsd = d.path().join("virtiofsd");
        std::fs::write(&vfsd, "").unwrap();
        let parse = |extra: &str| {
            CapsaConfig::from_toml(&format!("[hypervisor]\n{extra}"), Path::new("t.toml"))
                .map(|c| c.hypervisor)
        };
        let h = parse(&format!("virtiofsd = {:?}", vfsd.to_str().unwrap())).unwrap();
        assert_eq!(h.rootfs_mode, None);
        assert_eq!(
            h.resolve_rootfs_mode().unwrap(),
            (RootfsMode::VirtioFs, Some(vfsd.clone()))
        );
        let h = parse(&format!(
            "rootfs_mode = \"block\"\nvirtiofsd = {:?}",
            vfsd.to_str().unwrap()
        ))
        .unwrap();
        assert_eq!(h.resolve_rootfs_mode().unwrap(), (RootfsMode::Block, None));
        // Not found: unset falls back to block, explicit virtio-fs is an error naming the path.
        let h = parse("virtiofsd = \"/no/virtiofsd\"").unwrap();
        assert_eq!(h.resolve_rootfs_mode().unwrap(), (RootfsMode::Block, None));
        let h = parse("rootfs_mode = \"virtio-fs\"\nvirtiofsd = \"/no/virtiofsd\"").unwrap();
        let e = h.resolve_rootfs_mode().unwrap_err();
        assert!(e.to_string().contains("/no/virtiofsd"), "{e}");
        assert!(parse("rootfs_mode = \"nfs\"").is_err());
        // The workspace's build/virtiofsd when running from target/<profile>/.
        let exe_dir = d.path().join("target/release");
        std::fs::create_dir_all(&exe_dir).unwrap();
        assert_eq!(
            default_virtiofsd_from(Some(&exe_dir)),
            PathBuf::from(crate::virtiofsd::INSTALLED_VIRTIOFSD)
        );
        std::fs::create_dir_all(d.path().join("build")).unwrap();
        std::fs::write(d.path().join("build/virtiofsd"), "").unwrap();
        assert_eq!(
            default_virtiofsd_from(Some(&exe_dir)),
            d.path().join("build/virtiofsd")
        );
    }

    #[test]
    fn empty_document_is_the_defaults() {
        let cfg = CapsaConfig::from_toml("", Path::new("t.toml")).unwrap();
        assert_eq!(cfg, CapsaConfig::default());
    }

    #[test]
    fn unknown_key_and_bad_values_are_refused_with_the_reason() {
        let e =
            CapsaConfig::from_toml("[hypervisor]\nvcpu = 2\n", Path::new("t.toml")).unwrap_err();
        assert!(e.to_string().contains("vcpu"), "{e}");
        let e = CapsaConfig::from_toml("[hypervisor]\ndefault_vcpus = 0\n", Path::new("t.toml"))
            .unwrap_err();
        assert!(e.to_string().contains("default_vcpus"), "{e}");
        let e = CapsaConfig::from_toml("[runtime]\nlog_level = \"loud\"\n", Path::new("t.toml"))
            .unwrap_err();
        assert!(e.to_string().contains("loud"), "{e}");
    }

    #[test]
    fn load_missing_default_is_defaults_but_missing_explicit_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        assert!(matches!(
            CapsaConfig::load(Some(&missing)),
            Err(ConfigError::Read { .. })
        ));
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[hypervisor]\ndefault_memory_mib = 300\n").unwrap();
        assert_eq!(
            CapsaConfig::load(Some(&p))
                .unwrap()
                .hypervisor
                .default_memory_mib,
            300
        );
    }

    #[test]
    fn annotations_override_defaults_within_bounds() {
        let cfg = CapsaConfig::default();
        let none = ContainerLimits::default();
        assert_eq!(
            cfg.vm_size(&ann(&[]), none).unwrap(),
            VmSize {
                vcpus: 1,
                memory_mib: 256
            }
        );
        assert_eq!(
            cfg.vm_size(
                &ann(&[(ANNOTATION_VCPUS, "4"), (ANNOTATION_MEMORY, "1Gi")]),
                none
            )
            .unwrap(),
            VmSize {
                vcpus: 4,
                memory_mib: 1024
            }
        );
        assert_eq!(
            cfg.vm_size(&ann(&[(ANNOTATION_MEMORY, "768")]), none)
                .unwrap()
                .memory_mib,
            768
        );
        for (k, v) in [
            (ANNOTATION_VCPUS, "0"),
            (ANNOTATION_VCPUS, "99"),
            (ANNOTATION_VCPUS, "two"),
            (ANNOTATION_MEMORY, "1Ti"),
            (ANNOTATION_MEMORY, "8"),
            (ANNOTATION_MEMORY, "99999999999999999999Gi"),
        ] {
            let e = cfg.vm_size(&ann(&[(k, v)]), none).unwrap_err();
            assert!(e.to_string().contains(k), "{k}={v}: {e}");
        }
    }

    #[test]
    fn container_limits_make_room_in_the_vm() {
        let cfg = CapsaConfig::default();
        let spec = serde_json::json!({"linux": {"resources": {
            "memory": {"limit": 512u64 << 20},
            "cpu": {"quota": 150000, "period": 100000}
        }}});
        let limits = ContainerLimits::from_spec(&spec);
        assert_eq!(limits.cpus(), Some(2));
        let size = cfg.vm_size(&ann(&[]), limits).unwrap();
        assert_eq!(size.memory_mib, GUEST_BASE_MEMORY_MIB + 512);
        assert_eq!(size.vcpus, 3);
        // an explicit annotation wins over the computed size
        let size = cfg
            .vm_size(&ann(&[(ANNOTATION_MEMORY, "300")]), limits)
            .unwrap();
        assert_eq!(size.memory_mib, 300);
        // Over the maximum: refused with the numbers, not cut down.
        let huge = ContainerLimits {
            memory_bytes: Some(1 << 40),
            ..Default::default()
        };
        let e = cfg.vm_size(&ann(&[]), huge).unwrap_err().to_string();
        assert!(
            e.contains("1048576 MiB") && e.contains("max_memory_mib = 8192"),
            "{e}"
        );
        let e = CapsaConfig::check_host_memory(size, 200)
            .unwrap_err()
            .to_string();
        assert!(e.contains("300 MiB VM") && e.contains("200 MiB"), "{e}");
        CapsaConfig::check_host_memory(size, 300).unwrap();
        // no limit set: -1 or absent
        let spec = serde_json::json!({"linux": {"resources": {"memory": {"limit": -1}}}});
        assert_eq!(
            ContainerLimits::from_spec(&spec),
            ContainerLimits::default()
        );
    }

    #[test]
    fn a_cri_pod_is_sized_from_containerds_sandbox_annotations() {
        let cfg = CapsaConfig::default();
        // The kubelet's sum of the containers' limits: 512 MiB and 1.5 CPUs.
        let pod = ann(&[
            (CRI_SANDBOX_MEMORY, "536870912"),
            (CRI_SANDBOX_CPU_QUOTA, "150000"),
            (CRI_SANDBOX_CPU_PERIOD, "100000"),
        ]);
        let size = cfg.vm_size(&pod, ContainerLimits::default()).unwrap();
        assert_eq!(
            size,
            VmSize {
                vcpus: 3,
                memory_mib: GUEST_BASE_MEMORY_MIB + 512
            }
        );
        // A pod without limits (containerd writes zeros) gets the default size.
        let unlimited = ann(&[
            (CRI_SANDBOX_MEMORY, "0"),
            (CRI_SANDBOX_CPU_QUOTA, "0"),
            (CRI_SANDBOX_CPU_PERIOD, "100000"),
        ]);
        assert_eq!(
            cfg.vm_size(&unlimited, ContainerLimits::default()).unwrap(),
            VmSize {
                vcpus: 1,
                memory_mib: 256
            }
        );
        // The sandbox spec's own linux.resources fill what the annotations leave unset.
        let spec_limits = ContainerLimits {
            memory_bytes: Some(64 << 20),
            cpu_quota: Some(100000),
            cpu_period: Some(100000),
        };
        let size = cfg
            .vm_size(&ann(&[(CRI_SANDBOX_MEMORY, "536870912")]), spec_limits)
            .unwrap();
        assert_eq!(
            (size.vcpus, size.memory_mib),
            (2, GUEST_BASE_MEMORY_MIB + 512)
        );
        // capsa.io annotations still override.
        let mut both = pod.clone();
        both.insert(ANNOTATION_MEMORY.into(), "300".into());
        both.insert(ANNOTATION_VCPUS.into(), "1".into());
        assert_eq!(
            cfg.vm_size(&both, ContainerLimits::default()).unwrap(),
            VmSize {
                vcpus: 1,
                memory_mib: 300
            }
        );
        // Over the maximum: refused with the numbers and whose limit it was.
        let e = cfg
            .vm_size(
                &ann(&[(CRI_SANDBOX_MEMORY, "107374182400")]),
                ContainerLimits::default(),
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pod's memory limit of 102400 MiB") && e.contains("max_memory_mib = 8192"),
            "{e}"
        );
        // Garbage in an annotation names the annotation.
        let e = cfg
            .vm_size(
                &ann(&[(CRI_SANDBOX_CPU_QUOTA, "lots")]),
                ContainerLimits::default(),
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(CRI_SANDBOX_CPU_QUOTA) && e.contains("lots"),
            "{e}"
        );
    }

    #[test]
    fn timeouts_are_configurable_and_bounded() {
        let path = Path::new("/etc/capsa/configuration.toml");
        let cfg = CapsaConfig::from_toml(
            "[hypervisor]\nboot_timeout_secs = 90\nvirtiofsd_timeout_secs = 7\nstop_timeout_secs = 3\nrpc_timeout_secs = 4\n",
            path,
        )
        .unwrap();
        let mut vm = crate::vm::VmConfig::new("vmm".into(), "k".into(), None);
        vm.shared_fs = Some(crate::virtiofsd::SharedFsConfig::new("virtiofsd".into()));
        cfg.hypervisor.apply_timeouts(&mut vm);
        assert_eq!(vm.boot_timeout, std::time::Duration::from_secs(90));
        assert_eq!(vm.stop_timeout, std::time::Duration::from_secs(3));
        assert_eq!(
            vm.shared_fs.unwrap().start_timeout,
            std::time::Duration::from_secs(7)
        );
        assert_eq!(
            cfg.hypervisor.rpc_timeout(),
            std::time::Duration::from_secs(4)
        );
        let d = CapsaConfig::default().hypervisor;
        assert_eq!(
            (
                d.boot_timeout_secs,
                d.virtiofsd_timeout_secs,
                d.rpc_timeout_secs
            ),
            (
                DEFAULT_BOOT_TIMEOUT_SECS,
                DEFAULT_VIRTIOFSD_TIMEOUT_SECS,
                DEFAULT_RPC_TIMEOUT_SECS
            )
        );
        for bad in [
            "boot_timeout_secs = 0",
            "rpc_timeout_secs = 0",
            "rpc_timeout_secs = 3601",
        ] {
            let e = CapsaConfig::from_toml(&format!("[hypervisor]\n{bad}\n"), path)
                .unwrap_err()
                .to_string();
            assert!(e.contains(bad), "{e}");
        }
    }
}
