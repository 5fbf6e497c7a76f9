//! VM configuration: command-line flags and the JSON file (`--config`), flags overriding the file.

use std::path::{Path, PathBuf};

use clap::Parser;
use serde::{Deserialize, Serialize};

use crate::layout::MAX_VCPUS;
pub use crate::seccomp::SeccompMode;

pub use crate::devices::legacy::DEFAULT_CONSOLE_LIMIT;

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

/// Longest virtio-blk id (VIRTIO_BLK_T_GET_ID answers 20 bytes, NUL-padded).
pub const DISK_ID_MAX_LEN: usize = 20;

/// One virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    /// The id the guest reads (VIRTIO_BLK_T_GET_ID, `/sys/block/vdX/serial`), 1..=20 printable ASCII
    /// bytes; default `capsa-vdX` after the disk's name. Never derived from the host file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl std::str::FromStr for DiskConfig {
    type Err = String;

    /// `PATH[,readonly][,id=ID]` (options in any order)
    fn from_str(s: &str) -> Result<Self, String> {
        let mut path = s;
        let (mut readonly, mut id) = (false, None);
        while let Some((p, opt)) = path.rsplit_once(',') {
            match opt {
                "readonly" | "ro" => readonly = true,
                _ if opt.starts_with("id=") => id = Some(opt["id=".len()..].to_string()),
                _ if !opt.contains('/') => {
                    return Err(format!("unknown disk option {opt:?} (readonly, id=ID)"))
                }
                // A comma inside the path.
                _ => break,
            }
            path = p;
        }
        if path.is_empty() {
            return Err("empty disk path".into());
        }
        let config = Self {
            path: PathBuf::from(path),
            readonly,
            id,
        };
        config.check_id()?;
        Ok(config)
    }
}

impl DiskConfig {
    /// Checks the id, if one is given.
    pub fn check_id(&self) -> Result<(), String> {
        let Some(id) = &self.id else {
            return Ok(());
        };
        if id.is_empty() || id.len() > DISK_ID_MAX_LEN {
            return Err(format!(
                "disk id must be 1..={DISK_ID_MAX_LEN} bytes, not {} ({id:?})",
                id.len()
            ));
        }
        if id.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
            return Err(format!(
                "disk id {id:?} must be printable ASCII without spaces"
            ));
        }
        Ok(())
    }
}

/// Longest virtio-fs tag: the config space's `tag` field is 36 bytes (NUL-padded, not NUL-terminated when full).
pub const FS_TAG_MAX_LEN: usize = 36;
/// Default number of virtio-fs request queues (besides the high-priority queue).
pub const DEFAULT_FS_QUEUES: u16 = 1;
/// Default size of each virtio-fs queue.
pub const DEFAULT_FS_QUEUE_SIZE: u16 = 1024;
/// Most virtio-fs request queues (virtiofsd serves one thread per queue; keep it small).
pub const MAX_FS_QUEUES: u16 = 16;

fn default_console_limit() -> u64 {
    DEFAULT_CONSOLE_LIMIT
}

fn default_fs_queues() -> u16 {
    DEFAULT_FS_QUEUES
}

fn default_fs_queue_size() -> u16 {
    DEFAULT_FS_QUEUE_SIZE
}

/// One virtio-fs device backed by a vhost-user backend (virtiofsd) listening on `socket`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The tag the guest mounts (`mount -t virtiofs <tag> <dir>`), 1..=36 bytes.
    pub tag: String,
    /// The backend's vhost-user Unix socket.
    pub socket: PathBuf,
    /// Request queues (1..=16).
    #[serde(default = "default_fs_queues")]
    pub queues: u16,
    /// Size of each queue (a power of two, 2..=32768).
    #[serde(default = "default_fs_queue_size")]
    pub queue_size: u16,
}

impl std::str::FromStr for FsConfig {
    type Err = String;

    /// `tag=<tag>,socket=<path>[,queues=N][,queue-size=N]`
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut tag, mut socket) = (None, None);
        let mut queues = DEFAULT_FS_QUEUES;
        let mut queue_size = DEFAULT_FS_QUEUE_SIZE;
        for part in s.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("fs option {part:?} is not key=value"))?;
            let number = |what: &str| {
                value
                    .parse::<u16>()
                    .map_err(|e| format!("fs {what} {value:?}: {e}"))
            };
            match key {
                "tag" => tag = Some(value.to_string()),
                "socket" => socket = Some(PathBuf::from(value)),
                "queues" | "num_queues" => queues = number("queues")?,
                "queue-size" | "queue_size" => queue_size = number("queue-size")?,
                _ => {
                    return Err(format!(
                        "unknown fs option {key:?} (tag, socket, queues, queue-size)"
                    ))
                }
            }
        }
        let config = Self {
            tag: tag.ok_or("fs needs tag=<tag>")?,
            socket: socket.ok_or("fs needs socket=<path>")?,
            queues,
            queue_size,
        };
        config.check()?;
        Ok(config)
    }
}

impl FsConfig {
    /// Checks the values (not whether the socket exists: the device reports that when it connects).
    pub fn check(&self) -> Result<(), String> {
        if self.tag.is_empty() || self.tag.len() > FS_TAG_MAX_LEN {
            return Err(format!(
                "fs tag must be 1..={FS_TAG_MAX_LEN} bytes, not {} ({:?})",
                self.tag.len(),
                self.tag
            ));
        }
        if self.tag.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
            return Err(format!(
                "fs tag {:?} must be printable ASCII without spaces",
                self.tag
            ));
        }
        if self.socket.as_os_str().is_empty() {
            return Err("fs socket path is empty".into());
        }
        if self.queues == 0 || self.queues > MAX_FS_QUEUES {
            return Err(format!(
                "fs queues must be 1..={MAX_FS_QUEUES}, not {}",
                self.queues
            ));
        }
        if self.queue_size < 2 || !self.queue_size.is_power_of_two() {
            return Err(format!(
                "fs queue-size must be a power of two in 2..=32768, not {}",
                self.queue_size
            ));
        }
        Ok(())
    }
}

/// A unicast Ethernet address, written `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl std::str::FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("net mac {s:?} is not a MAC address like 52:54:00:12:34:56");
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut mac {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if mac[0] & 1 != 0 {
            return Err(format!("net mac {s:?} is a multicast address"));
        }
        if mac == [0; 6] {
            return Err(format!("net mac {s:?} is all zeros"));
        }
        Ok(Self(mac))
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl TryFrom<String> for MacAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

/// Smallest and largest MTU the guest can be given (IPv4's minimum, the field's maximum).
pub const MIN_NET_MTU: u32 = 68;
pub const MAX_NET_MTU: u32 = 65535;

/// One virtio-net device on a TAP interface: opened by name, or an inherited tap file descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// TAP interface to create or attach to (needs CAP_NET_ADMIN unless it exists and is the caller's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// Inherited descriptor already attached to a tap opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
    /// Guest MAC; a random locally administered one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// MTU offered to the guest (VIRTIO_NET_F_MTU), 68..=65535.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

impl std::str::FromStr for NetConfig {
    type Err = String;

    /// `tap=NAME[,mac=MAC][,mtu=N]` or `fd=N[,mac=MAC][,mtu=N]`
    fn from_str(s: &str) -> Result<Self, String> {
        let mut c = NetConfig {
            tap: None,
            fd: None,
            mac: None,
            mtu: None,
        };
        let mut seen = Vec::new();
        for part in s.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("net option {part:?} is not key=value"))?;
            if seen.contains(&key) {
                return Err(format!("net option {key:?} given twice"));
            }
            seen.push(key);
            match key {
                "tap" => c.tap = Some(value.to_string()),
                "fd" => {
                    c.fd = Some(
                        value
                            .parse()
                            .map_err(|e| format!("net fd {value:?}: {e}"))?,
                    )
                }
                "mac" => c.mac = Some(value.parse()?),
                "mtu" => {
                    c.mtu = Some(
                        value
                            .parse()
                            .map_err(|e| format!("net mtu {value:?}: {e}"))?,
                    )
                }
                _ => return Err(format!("unknown net option {key:?} (tap, fd, mac, mtu)")),
            }
        }
        c.check()?;
        Ok(c)
    }
}

impl NetConfig {
    /// Checks the values (not whether the tap or fd works: the device reports that when it opens it).
    pub fn check(&self) -> Result<(), String> {
        match (&self.tap, self.fd) {
            (Some(_), Some(_)) => return Err("net takes either tap=NAME or fd=N, not both".into()),
            (None, None) => return Err("net needs tap=NAME or fd=N".into()),
            (Some(name), None) => {
                if !crate::devices::virtio::net::tap::valid_name(name) {
                    return Err(format!(
                        "net tap name {name:?} must be 1..=15 bytes without '/', ':', whitespace"
                    ));
                }
            }
            (None, Some(fd)) => {
                if fd < 3 {
                    return Err(format!(
                        "net fd must be an inherited descriptor >= 3, not {fd}"
                    ));
                }
            }
        }
        if let Some(mtu) = self.mtu {
            if !(MIN_NET_MTU..=MAX_NET_MTU).contains(&mtu) {
                return Err(format!(
                    "net mtu must be {MIN_NET_MTU}..={MAX_NET_MTU}, not {mtu}"
                ));
            }
        }
        Ok(())
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
    /// Most bytes of guest serial output written (to the file or stdout); the rest is dropped.
    #[serde(default = "default_console_limit")]
    pub console_limit: u64,
    /// virtio-fs devices (vhost-user); any of them makes guest memory a shared memfd.
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    /// virtio-net devices on TAP interfaces, after every other device.
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// Per-thread seccomp filters (default on).
    #[serde(default)]
    pub seccomp: SeccompMode,
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
            console_limit: DEFAULT_CONSOLE_LIMIT,
            fs: vec![],
            net: vec![],
            seccomp: SeccompMode::On,
        }
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }

    /// Number of virtio devices this configuration asks for.
    pub fn virtio_device_count(&self) -> usize {
        self.disks.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.rng)
            + self.fs.len()
            + self.net.len()
    }

    /// Whether guest memory must be shareable with another process (a vhost-user backend).
    pub fn needs_shared_memory(&self) -> bool {
        !self.fs.is_empty()
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
            d.check_id().map_err(ConfigError::Invalid)?;
        }
        for (i, fs) in self.fs.iter().enumerate() {
            fs.check().map_err(ConfigError::Invalid)?;
            if self.fs[..i].iter().any(|other| other.tag == fs.tag) {
                return Err(ConfigError::Invalid(format!(
                    "fs tag {:?} used twice",
                    fs.tag
                )));
            }
        }
        for (i, net) in self.net.iter().enumerate() {
            net.check().map_err(ConfigError::Invalid)?;
            let earlier = &self.net[..i];
            if net.tap.is_some() && earlier.iter().any(|o| o.tap == net.tap) {
                return Err(ConfigError::Invalid(format!(
                    "net tap {:?} used twice",
                    net.tap.as_deref().unwrap_or_default()
                )));
            }
            if net.fd.is_some() && earlier.iter().any(|o| o.fd == net.fd) {
                return Err(ConfigError::Invalid(format!(
                    "net fd {} used twice",
                    net.fd.unwrap_or_default()
                )));
            }
            if let Some(mac) = net
                .mac
                .filter(|m| earlier.iter().any(|o| o.mac == Some(*m)))
            {
                return Err(ConfigError::Invalid(format!("net mac {mac} used twice")));
            }
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
    pub console_limit: Option<u64>,
    pub fs: Option<Vec<FsConfig>>,
    pub net: Option<Vec<NetConfig>>,
    pub seccomp: Option<SeccompMode>,
}

pub const HELP_AFTER: &str = r#"CONFIG FILE (--config FILE.json)
  A JSON object with any of these keys (unknown keys are an error); a flag given on the command line
  overrides the key, and any --disk (--fs, --net) flag replaces the whole "disks" ("fs", "net") list:
    kernel       string   path of an uncompressed vmlinux (PVH entry used when present) or a bzImage
    initrd       string   initrd/initramfs image
    cmdline      string   kernel command line (the VMM appends virtio_mmio.device=4K@<addr>:<irq> per device)
    vcpus        integer  1..=254 (default 1)
    memory_mib   integer  8..=1048576 (default 128)
    vsock_cid    integer  guest CID (>= 3); needs vsock_uds
    vsock_uds    string   host Unix socket for hybrid vsock; needs vsock_cid; removed when the VMM exits
    disks        array    [{"path": string, "readonly": bool (default false), "id": string (default
                           "capsa-vdX")}], virtio-blk vda, vdb, ...
    rng          bool     add a virtio-rng device
    console_log  string   file for the guest's serial output (default: stdout)
    console_limit integer most bytes of guest serial output kept (default 1048576, see --console-limit)
    fs           array    [{"tag": string, "socket": string, "queues": int (default 1),
                           "queue_size": int (default 1024)}], virtio-fs through a vhost-user backend
    net          array    [{"tap": string | "fd": int, "mac": string, "mtu": int}], virtio-net (see --net)
    seccomp      string   "on" (default), "off" or "log": per-thread seccomp filters (see --seccomp)
  Example:
    {"kernel": "/var/cache/capsa/vmlinux", "initrd": "/var/cache/capsa/initrd.img",
     "cmdline": "console=ttyS0 reboot=k panic=-1 quiet", "vcpus": 2, "memory_mib": 256,
     "vsock_cid": 3, "vsock_uds": "/run/capsa/pod1/vsock.sock",
     "disks": [{"path": "/run/capsa/pod1/rootfs.img", "readonly": true}], "rng": true}

VIRTIO-FS (--fs tag=<tag>,socket=<path>[,queues=N][,queue-size=N])
  A virtio-fs device served by a vhost-user backend such as virtiofsd, which must already listen on <path>
  (e.g. `virtiofsd --socket-path <path> --shared-dir <dir>`). Guest memory then lives in a shared memfd that
  the backend maps. The guest mounts it with `mount -t virtiofs <tag> <dir>`. If the backend goes away
  while the VM runs, the device stops (logged) and the VM keeps running.

VIRTIO-NET (--net tap=NAME[,mac=MAC][,mtu=N] or --net fd=N[,mac=MAC][,mtu=N])
  A virtio-net device on a TAP interface; repeatable, one device each (eth0, eth1, ... in the guest).
  tap=NAME creates the tap, or attaches to an existing one (needs CAP_NET_ADMIN unless the tap is persistent
  and owned by the caller); a tap the VMM creates disappears when it exits. fd=N adopts an inherited
  descriptor already attached to a tap opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR (no privilege needed).
  mac=aa:bb:cc:dd:ee:ff is the guest's address (unicast; default: random, locally administered); mtu=N
  (68..=65535) is offered to the guest, whose stack then uses it. The host side (addresses, bridge, MTU of
  the tap) is the caller's job. Emulated in user space, one queue pair.

CONSOLE (--console-log FILE, --console-limit BYTES)
  The guest's COM1 output goes to FILE (truncated at start) or stdout. At most BYTES bytes of it are written
  (default 1048576); then one line "[capsa-vmm: console log limit of BYTES bytes reached; further output
  dropped]" is added, the rest is dropped, and the number of dropped bytes is logged (warn) when the VMM exits.
SECCOMP (--seccomp on|off|log)
  on (default): once the VM is built and before the guest runs, every thread installs a seccomp-bpf
  allowlist of its own (main/control thread, each vCPU, each device worker kind, serial input): KVM_RUN and
  a few tap/socket ioctls by number, no execve or fork, no open of new paths, sockets (Unix only) only in
  the vsock worker. A syscall outside the list kills the process with SIGSYS. log: the same filters, but a
  syscall outside them is allowed and logged by the kernel (dmesg, audit type=1326 with syscall=<nr>).
  off: no filters (debugging only; a warning is logged).

EXIT STATUS
  0  the guest stopped itself (i8042 reset, e.g. `reboot=k` reboot/poweroff; triple fault) or SIGTERM/SIGINT
     stopped the VM
  1  runtime failure (KVM error, vCPU error, device failure)
  2  bad configuration or usage (missing kernel, bad flag, bad JSON)
  killed by SIGSYS: a thread made a syscall its seccomp filter does not allow (a VMM bug or an exploit)

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
    #[arg(long = "disk", value_name = "PATH[,readonly][,id=ID]")]
    pub disks: Vec<DiskConfig>,
    /// Add a virtio-rng device
    #[arg(long)]
    pub rng: bool,
    /// virtio-fs device through a vhost-user backend (virtiofsd), repeatable
    #[arg(
        long = "fs",
        value_name = "tag=TAG,socket=PATH[,queues=N][,queue-size=N]"
    )]
    pub fs: Vec<FsConfig>,
    /// virtio-net device on a TAP interface (by name or inherited fd), repeatable
    #[arg(long = "net", value_name = "tap=NAME|fd=N[,mac=MAC][,mtu=N]")]
    pub net: Vec<NetConfig>,
    /// File for the guest's serial output [default: stdout]
    #[arg(long, value_name = "FILE")]
    pub console_log: Option<PathBuf>,
    /// Most bytes of guest serial output written; then one notice line, the rest is dropped and counted
    /// [default: 1048576]
    #[arg(long, value_name = "BYTES")]
    pub console_limit: Option<u64>,
    /// Per-thread seccomp filters: on (a violation kills the VMM with SIGSYS), off, or log (violations
    /// allowed and logged by the kernel) [default: on]
    #[arg(long, value_name = "MODE")]
    pub seccomp: Option<SeccompMode>,
    /// JSON file with the same settings; flags override it
    #[arg(long, value_name = "FILE.json")]
    pub config: Option<PathBuf>,
    /// Test hook (debug builds only): once every filter is in place, the main thread makes a forbidden
    /// syscall, so the process must die by SIGSYS.
    #[cfg(debug_assertions)]
    #[arg(long, hide = true)]
    pub seccomp_selftest: bool,
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
        console_limit: cli
            .console_limit
            .or(file.console_limit)
            .unwrap_or(DEFAULT_CONSOLE_LIMIT),
        fs: if cli.fs.is_empty() {
            file.fs.unwrap_or_default()
        } else {
            cli.fs
        },
        net: if cli.net.is_empty() {
            file.net.unwrap_or_default()
        } else {
            cli.net
        },
        seccomp: cli.seccomp.or(file.seccomp).unwrap_or_default(),
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
                readonly: false,
                id: None
            }
        );
        assert_eq!(
            "/a.img,readonly".parse::<DiskConfig>().unwrap(),
            DiskConfig {
                path: "/a.img".into(),
                readonly: true,
                id: None
            }
        );
        assert_eq!(
            "/x,y/a.img,id=rootfs-1,ro".parse::<DiskConfig>().unwrap(),
            DiskConfig {
                path: "/x,y/a.img".into(),
                readonly: true,
                id: Some("rootfs-1".into())
            }
        );
        assert_eq!(
            "/a.img,readonly,id=01234567890123456789"
                .parse::<DiskConfig>()
                .unwrap()
                .id
                .as_deref(),
            Some("01234567890123456789")
        );
        for bad in [
            "/a.img,rw",
            ",readonly",
            "/a.img,id=",
            "/a.img,id=012345678901234567890",
            "/a.img,id=a b",
            "/a.img,id=\u{e9}",
        ] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn fs_flag_syntax() {
        assert_eq!(
            "tag=rootfs,socket=/run/capsa/p/fs.sock"
                .parse::<FsConfig>()
                .unwrap(),
            FsConfig {
                tag: "rootfs".into(),
                socket: "/run/capsa/p/fs.sock".into(),
                queues: 1,
                queue_size: 1024
            }
        );
        let c: FsConfig = "socket=/s,tag=t,queues=2,queue-size=256".parse().unwrap();
        assert_eq!((c.tag.as_str(), c.queues, c.queue_size), ("t", 2, 256));
        for bad in [
            "tag=t",
            "socket=/s",
            "tag=,socket=/s",
            "tag=t,socket=",
            "tag=t,socket=/s,queues=0",
            "tag=t,socket=/s,queues=17",
            "tag=t,socket=/s,queues=x",
            "tag=t,socket=/s,queue-size=1000",
            "tag=t,socket=/s,queue-size=65536",
            "tag=t,socket=/s,cache=auto",
            "tag=a b,socket=/s",
            "tag,socket=/s",
            "tag=0123456789012345678901234567890123456,socket=/s",
        ] {
            assert!(bad.parse::<FsConfig>().is_err(), "{bad} accepted");
        }
        // 36 bytes is the most the config space holds.
        assert!("tag=012345678901234567890123456789012345,socket=/s"
            .parse::<FsConfig>()
            .is_ok());
    }

    #[test]
    fn fs_from_json_and_flags() {
        let file: ConfigFile = serde_json::from_str(
            r#"{"kernel": "/k", "fs": [{"tag": "a", "socket": "/a.sock"},
                {"tag": "b", "socket": "/b.sock", "queues": 2, "queue_size": 128}]}"#,
        )
        .unwrap();
        let c = merge(file.clone(), Cli::default()).unwrap();
        assert_eq!(c.fs.len(), 2);
        assert_eq!((c.fs[0].queues, c.fs[0].queue_size), (1, 1024));
        assert_eq!((c.fs[1].queues, c.fs[1].queue_size), (2, 128));
        assert!(c.needs_shared_memory());
        assert_eq!(c.virtio_device_count(), 2);
        // A flag replaces the file's list.
        let cli = Cli::parse_from(["capsa-vmm", "--fs", "tag=c,socket=/c.sock"]);
        let c = merge(file, cli).unwrap();
        assert_eq!(c.fs.len(), 1);
        assert_eq!(c.fs[0].tag, "c");
        assert!(serde_json::from_str::<ConfigFile>(
            r#"{"fs": [{"tag": "a", "socket": "/a", "cache": "auto"}]}"#
        )
        .is_err());
        assert!(!VmConfig::new("/k").needs_shared_memory());
    }

    #[test]
    fn fs_validation() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("k");
        std::fs::write(&kernel, b"x").unwrap();
        let mut c = VmConfig::new(&kernel);
        let fs = |tag: &str| FsConfig {
            tag: tag.into(),
            socket: "/s".into(),
            queues: 1,
            queue_size: 1024,
        };
        c.fs = vec![fs("a"), fs("b")];
        c.validate().unwrap();
        c.fs = vec![fs("a"), fs("a")];
        assert!(c.validate().unwrap_err().to_string().contains("twice"));
        c.fs = vec![fs("")];
        assert!(c.validate().is_err());
        c.fs = vec![FsConfig {
            queue_size: 3,
            ..fs("a")
        }];
        assert!(c.validate().is_err());
    }

    #[test]
    fn net_flag_syntax() {
        assert_eq!(
            "tap=tap0".parse::<NetConfig>().unwrap(),
            NetConfig {
                tap: Some("tap0".into()),
                fd: None,
                mac: None,
                mtu: None
            }
        );
        let c: NetConfig = "tap=tap0,mac=52:54:00:AB:cd:0e,mtu=1500".parse().unwrap();
        assert_eq!(c.mac, Some(MacAddr([0x52, 0x54, 0, 0xab, 0xcd, 0x0e])));
        assert_eq!(c.mac.unwrap().to_string(), "52:54:00:ab:cd:0e");
        assert_eq!(c.mtu, Some(1500));
        let c: NetConfig = "fd=7,mtu=65535".parse().unwrap();
        assert_eq!((c.tap, c.fd, c.mtu), (None, Some(7), Some(65535)));
        assert_eq!("fd=3,mtu=68".parse::<NetConfig>().unwrap().mtu, Some(68));
        for (bad, names) in [
            ("tap=a,fd=3", "not both"),
            ("mac=52:54:00:12:34:56", "needs tap=NAME or fd=N"),
            ("tap=t,mac=zz:54:00:12:34:56", "mac"),
            ("tap=t,mac=52:54:00:12:34", "mac"),
            ("tap=t,mac=52:54:00:12:34:56:78", "mac"),
            ("tap=t,mac=5254.0012.3456", "mac"),
            ("tap=t,mac=052:54:00:12:34:5", "mac"),
            ("tap=t,mac=01:00:5e:00:00:01", "multicast"),
            ("tap=t,mac=ff:ff:ff:ff:ff:ff", "multicast"),
            ("tap=t,mac=00:00:00:00:00:00", "all zeros"),
            ("tap=t,mtu=67", "mtu"),
            ("tap=t,mtu=0", "mtu"),
            ("tap=t,mtu=65536", "mtu"),
            ("tap=t,mtu=x", "mtu"),
            ("fd=x", "fd"),
            ("fd=2", "fd"),
            ("fd=-1", "fd"),
            ("tap=", "tap name"),
            ("tap=0123456789abcdef", "tap name"),
            ("tap=a/b", "tap name"),
            ("tap=a b", "tap name"),
            ("tap=t,queues=2", "unknown net option"),
            ("tap=t,tap=u", "twice"),
            ("tap", "key=value"),
            ("", "key=value"),
        ] {
            let e = bad.parse::<NetConfig>().unwrap_err();
            assert!(e.contains(names), "{bad:?}: {e}");
        }
        // clap rejects a bad --net as a usage error (exit status 2).
        let e = Cli::try_parse_from(["capsa-vmm", "--net", "tap=a,fd=3"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("not both"), "{e}");
    }

    #[test]
    fn net_from_json_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("k");
        std::fs::write(&kernel, b"x").unwrap();
        let json = format!(
            r#"{{"kernel": {:?}, "rng": true, "net": [{{"tap": "tap0", "mac": "52:54:00:12:34:56", "mtu": 9000}},
                {{"fd": 5}}]}}"#,
            kernel.display().to_string()
        );
        let path = dir.path().join("c.json");
        std::fs::write(&path, &json).unwrap();
        let cli = Cli {
            config: Some(path.clone()),
            ..Default::default()
        };
        let c = cli.into_config().unwrap();
        assert_eq!(c.net.len(), 2);
        assert_eq!(c.net[0].tap.as_deref(), Some("tap0"));
        assert_eq!(
            c.net[0].mac,
            Some(MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]))
        );
        assert_eq!(c.net[0].mtu, Some(9000));
        assert_eq!((c.net[1].fd, c.net[1].mac), (Some(5), None));
        assert_eq!(c.virtio_device_count(), 3);
        // A flag replaces the file's list.
        let cli = Cli::parse_from([
            "capsa-vmm",
            "--config",
            path.to_str().unwrap(),
            "--net",
            "tap=x",
        ]);
        let c = cli.into_config().unwrap();
        assert_eq!(c.net.len(), 1);
        assert_eq!(c.net[0].tap.as_deref(), Some("x"));
        // The config round-trips through JSON.
        let back: VmConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);

        // Errors name the field and are configuration errors (exit status 2).
        let k = kernel.display().to_string();
        for (net, names) in [
            (r#"[{"tap": "a", "fd": 3}]"#, "not both"),
            (r#"[{"mac": "52:54:00:12:34:56"}]"#, "needs tap"),
            (r#"[{"tap": "a", "mtu": 70000}]"#, "mtu"),
            (r#"[{"tap": "a", "mtu": 10}]"#, "mtu"),
            (r#"[{"fd": 1}]"#, "fd"),
            (r#"[{"tap": "a", "mac": "bogus"}]"#, "mac"),
            (r#"[{"tap": "a", "mac": "33:33:00:00:00:01"}]"#, "multicast"),
            (r#"[{"tap": "a", "queues": 2}]"#, "queues"),
            (r#"[{"tap": "a"}, {"tap": "a"}]"#, "tap \"a\" used twice"),
            (r#"[{"fd": 4}, {"fd": 4}]"#, "fd 4 used twice"),
            (
                r#"[{"tap": "a", "mac": "52:54:00:00:00:01"}, {"tap": "b", "mac": "52:54:00:00:00:01"}]"#,
                "mac 52:54:00:00:00:01 used twice",
            ),
        ] {
            std::fs::write(&path, format!(r#"{{"kernel": {k:?}, "net": {net}}}"#)).unwrap();
            let cli = Cli {
                config: Some(path.clone()),
                ..Default::default()
            };
            let e = cli.into_config().unwrap_err();
            assert!(e.to_string().contains(names), "{net}: {e}");
            assert_eq!(crate::vmm::Error::from(e).exit_code(), 2, "{net}");
        }
        // Too many devices in all.
        let mut c = VmConfig::new(&kernel);
        c.net = (0..20)
            .map(|i| NetConfig {
                tap: Some(format!("t{i}")),
                fd: None,
                mac: None,
                mtu: None,
            })
            .collect();
        assert!(c.validate().unwrap_err().to_string().contains("at most"));
    }
}
