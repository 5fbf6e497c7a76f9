//! VM configuration: command-line flags and the JSON file (`--config`), flags overriding the file.

use std::path::{Path, PathBuf};

use clap::Parser;
use serde::{Deserialize, Serialize};

use crate::layout::MAX_VCPUS;

pub const DEFAULT_VCPUS: u8 = 1;
pub const DEFAULT_MEMORY_MIB: u64 = 128;
pub const MIN_MEMORY_MIB: u64 = 8;
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Most virtio devices: one MMIO window and one GSI each, GSIs 5..=23.
pub const MAX_VIRTIO_DEVICES: usize = 19;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: String,
        source: std::io::Error,
    },
    #[error("bad config file {path}: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("no kernel given (--kernel or \"kernel\" in the config file)")]
    MissingKernel,
    #[error("{what} {path}: {reason}")]
    BadFile {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// One virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
}

impl std::str::FromStr for DiskConfig {
    type Err = String;

    /// `PATH[,readonly]`
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, readonly) = match s.rsplit_once(',') {
            Some((p, "readonly")) | Some((p, "ro")) => (p, true),
            Some((_, opt)) if !opt.contains('/') => {
                return Err(format!("unknown disk option {opt:?} (only readonly)"))
            }
            _ => (s, false),
        };
        if path.is_empty() {
            return Err("empty disk path".into());
        }
        Ok(Self {
            path: PathBuf::from(path),
            readonly,
        })
    }
}

/// Hybrid vsock: the guest's CID and the host Unix socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    pub cid: u32,
    pub uds: PathBuf,
}

/// A complete, validated VM configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub vsock: Option<VsockConfig>,
    pub disks: Vec<DiskConfig>,
    pub rng: bool,
    /// Guest serial output file; `None` = the VMM's stdout.
    pub console_log: Option<PathBuf>,
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel (not validated).
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            vcpus: DEFAULT_VCPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            vsock: None,
            disks: vec![],
            rng: false,
            console_log: None,
        }
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }

    /// Number of virtio devices this configuration asks for.
    pub fn virtio_device_count(&self) -> usize {
        self.disks.len() + usize::from(self.vsock.is_some()) + usize::from(self.rng)
    }

    /// Checks values and that the input files exist.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            check_file("initrd", initrd)?;
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Invalid(format!(
                "vcpus must be 1..={MAX_VCPUS}, not {}",
                self.vcpus
            )));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::Invalid(format!(
                "memory_mib must be {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}, not {}",
                self.memory_mib
            )));
        }
        if let Some(v) = &self.vsock {
            if v.cid < 3 || v.cid == u32::MAX {
                return Err(ConfigError::Invalid(format!(
                    "vsock cid must be 3..{}, not {}",
                    u32::MAX,
                    v.cid
                )));
            }
            if v.uds.as_os_str().is_empty() {
                return Err(ConfigError::Invalid("vsock uds path is empty".into()));
            }
        }
        for d in &self.disks {
            check_file("disk", &d.path)?;
        }
        if self.virtio_device_count() > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::Invalid(format!(
                "at most {MAX_VIRTIO_DEVICES} virtio devices"
            )));
        }
        if self.cmdline.bytes().any(|b| !(0x20..0x7f).contains(&b)) {
            return Err(ConfigError::Invalid(
                "cmdline must be printable ASCII".into(),
            ));
        }
        Ok(())
    }
}

fn check_file(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    let bad = |reason: String| ConfigError::BadFile {
        what,
        path: path.display().to_string(),
        reason,
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Err(bad("is a directory".into())),
        Ok(_) => Ok(()),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// The JSON file: every key optional, unknown keys rejected.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub vcpus: Option<u8>,
    pub memory_mib: Option<u64>,
    pub vsock_cid: Option<u32>,
    pub vsock_uds: Option<PathBuf>,
    pub disks: Option<Vec<DiskConfig>>,
    pub rng: Option<bool>,
    pub console_log: Option<PathBuf>,
}

pub const HELP_AFTER: &str = r#"CONFIG FILE (--config FILE.json)
  A JSON object with any of these keys (unknown keys are an error); a flag given on the command line
  overrides the key, and any --disk flag replaces the whole "disks" list:
    kernel       string   path of an uncompressed vmlinux (PVH entry used when present) or a bzImage
    initrd       string   initrd/initramfs image
    cmdline      string   kernel command line (the VMM appends virtio_mmio.device=4K@<addr>:<irq> per device)
    vcpus        integer  1..=254 (default 1)
    memory_mib   integer  8..=1048576 (default 128)
    vsock_cid    integer  guest CID (>= 3); needs vsock_uds
    vsock_uds    string   host Unix socket for hybrid vsock; needs vsock_cid; removed when the VMM exits
    disks        array    [{"path": string, "readonly": bool (default false)}], virtio-blk vda, vdb, ...
    rng          bool     add a virtio-rng device
    console_log  string   file for the guest's serial output (default: stdout)
  Example:
    {"kernel": "/var/cache/capsa/vmlinux", "initrd": "/var/cache/capsa/initrd.img",
     "cmdline": "console=ttyS0 reboot=k panic=-1 quiet", "vcpus": 2, "memory_mib": 256,
     "vsock_cid": 3, "vsock_uds": "/run/capsa/pod1/vsock.sock",
     "disks": [{"path": "/run/capsa/pod1/rootfs.img", "readonly": true}], "rng": true}

EXIT STATUS
  0  the guest stopped itself (i8042 reset, e.g. `reboot=k` reboot/poweroff; triple fault) or SIGTERM/SIGINT
     stopped the VM
  1  runtime failure (KVM error, vCPU error, device failure)
  2  bad configuration or usage (missing kernel, bad flag, bad JSON)

The first write to I/O port 0x440 prints `BOOT_TIMER start_to_kernel_entry_us=<A> kernel_entry_to_agent_us=<B>`
on stderr. Logging: RUST_LOG (e.g. RUST_LOG=capsa_vmm=debug), to stderr."#;

/// Command-line flags.
#[derive(Clone, Debug, Default, Parser)]
#[command(name = "capsa-vmm", version, about = "capsa's KVM virtual machine monitor: one microVM per process",
          after_help = HELP_AFTER)]
pub struct Cli {
    /// Guest kernel: uncompressed vmlinux (PVH) or bzImage
    #[arg(long, value_name = "vmlinux|bzImage")]
    pub kernel: Option<PathBuf>,
    /// Initrd/initramfs image
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line
    #[arg(long, value_name = "STRING")]
    pub cmdline: Option<String>,
    /// Number of vCPUs (1..=254) [default: 1]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=254))]
    pub vcpus: Option<u8>,
    /// Guest memory in MiB [default: 128]
    #[arg(long, value_name = "M", value_parser = clap::value_parser!(u64).range(MIN_MEMORY_MIB..=MAX_MEMORY_MIB))]
    pub memory_mib: Option<u64>,
    /// Guest vsock CID (>= 3); needs --vsock-uds
    #[arg(long, value_name = "CID")]
    pub vsock_cid: Option<u32>,
    /// Host Unix socket for hybrid vsock; needs --vsock-cid
    #[arg(long, value_name = "PATH")]
    pub vsock_uds: Option<PathBuf>,
    /// virtio-blk disk (raw image), repeatable: vda, vdb, ...
    #[arg(long = "disk", value_name = "PATH[,readonly]")]
    pub disks: Vec<DiskConfig>,
    /// Add a virtio-rng device
    #[arg(long)]
    pub rng: bool,
    /// File for the guest's serial output [default: stdout]
    #[arg(long, value_name = "FILE")]
    pub console_log: Option<PathBuf>,
    /// JSON file with the same settings; flags override it
    #[arg(long, value_name = "FILE.json")]
    pub config: Option<PathBuf>,
}

impl Cli {
    /// Reads `--config` (if any), applies the flags over it, and validates the result.
    pub fn into_config(self) -> Result<VmConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => load_file(path)?,
            None => ConfigFile::default(),
        };
        let config = merge(file, self)?;
        config.validate()?;
        Ok(config)
    }
}

pub fn load_file(path: &Path) -> Result<ConfigFile, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: shown.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ConfigError::Json {
        path: shown,
        source,
    })
}

/// Flags over file values over defaults (not validated).
pub fn merge(file: ConfigFile, cli: Cli) -> Result<VmConfig, ConfigError> {
    let kernel = cli
        .kernel
        .or(file.kernel)
        .ok_or(ConfigError::MissingKernel)?;
    let vsock = match (
        cli.vsock_cid.or(file.vsock_cid),
        cli.vsock_uds.or(file.vsock_uds),
    ) {
        (Some(cid), Some(uds)) => Some(VsockConfig { cid, uds }),
        (None, None) => None,
        _ => {
            return Err(ConfigError::Invalid(
                "vsock needs both a CID and a Unix socket path".into(),
            ))
        }
    };
    Ok(VmConfig {
        kernel,
        initrd: cli.initrd.or(file.initrd),
        cmdline: cli.cmdline.or(file.cmdline).unwrap_or_default(),
        vcpus: cli.vcpus.or(file.vcpus).unwrap_or(DEFAULT_VCPUS),
        memory_mib: cli
            .memory_mib
            .or(file.memory_mib)
            .unwrap_or(DEFAULT_MEMORY_MIB),
        vsock,
        disks: if cli.disks.is_empty() {
            file.disks.unwrap_or_default()
        } else {
            cli.disks
        },
        rng: cli.rng || file.rng.unwrap_or(false),
        console_log: cli.console_log.or(file.console_log),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_flag_syntax() {
        assert_eq!(
            "/a.img".parse::<DiskConfig>().unwrap(),
            DiskConfig {
                path: "/a.img".into(),
                readonly: false
            }
        );
        assert_eq!(
            "/a.img,readonly".parse::<DiskConfig>().unwrap(),
            DiskConfig {
                path: "/a.img".into(),
                readonly: true
            }
        );
        assert!("/a.img,rw".parse::<DiskConfig>().is_err());
        assert!(",readonly".parse::<DiskConfig>().is_err());
    }
}
