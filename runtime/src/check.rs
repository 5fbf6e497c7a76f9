//! Host capability checks (`capsa check`, like `kata-runtime check`).
//!
//! Every probe reads from a path in [`CheckInputs`], so tests can point them at fake `/proc` content.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::artifacts::Artifacts;

/// `KVM_GET_API_VERSION` = `_IO(KVMIO, 0x00)`.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
/// The only KVM API version Linux has ever shipped.
pub const KVM_API_VERSION: i32 = 12;

/// Outcome of one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Present and usable.
    Ok,
    /// Informational: not needed by capsa, reported for completeness.
    Info,
    /// capsa runs, but something is degraded (slow guests, a missing optional feature).
    Warn,
    /// capsa cannot run VMs.
    Fail,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Info => "info",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckItem {
    pub name: String,
    pub status: Status,
    pub detail: String,
}

/// How KVM runs guests on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Acceleration {
    /// Intel VT-x.
    Vmx,
    /// AMD-V.
    Svm,
    /// `/dev/kvm` works but the CPU has no virtualisation extensions: a nested or emulating KVM.
    Emulated,
    /// No usable KVM.
    None,
}

/// cgroup layout of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupMode {
    V1,
    V2,
    Hybrid,
    None,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub acceleration: Acceleration,
    pub cgroups: CgroupMode,
    pub items: Vec<CheckItem>,
    /// False when capsa cannot start VMs on this host.
    pub can_run: bool,
}

impl CheckReport {
    fn push(&mut self, name: &str, status: Status, detail: impl Into<String>) {
        self.items.push(CheckItem {
            name: name.to_owned(),
            status,
            detail: detail.into(),
        });
    }

    /// Human-readable rendering, one probe per line.
    pub fn render(&self) -> String {
        let width = self.items.iter().map(|i| i.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for i in &self.items {
            out.push_str(&format!(
                "[{:>4}] {:<width$}  {}\n",
                i.status.label(),
                i.name,
                i.detail
            ));
        }
        out.push_str(if self.can_run {
            "capsa can run on this host\n"
        } else {
            "capsa CANNOT run on this host\n"
        });
        out
    }
}

/// Where the probes read from.
#[derive(Debug, Clone)]
pub struct CheckInputs {
    pub dev_kvm: PathBuf,
    pub cpuinfo: PathBuf,
    pub mounts: PathBuf,
    /// `/sys/module`: used to name the KVM module (kvm_intel, kvm_amd, kvm_pvm).
    pub sys_module: PathBuf,
    pub dev_tun: PathBuf,
    pub artifacts: Artifacts,
    /// Probe AF_VSOCK with a real socket (off in tests).
    pub probe_vsock: bool,
}

impl CheckInputs {
    /// The real host paths.
    pub fn host(artifacts: Artifacts) -> Self {
        CheckInputs {
            dev_kvm: "/dev/kvm".into(),
            cpuinfo: "/proc/cpuinfo".into(),
            mounts: "/proc/self/mounts".into(),
            sys_module: "/sys/module".into(),
            dev_tun: "/dev/net/tun".into(),
            artifacts,
            probe_vsock: true,
        }
    }
}

/// Finds `vmx`/`svm` among the `flags` lines of `/proc/cpuinfo`.
pub fn cpu_virtualisation(cpuinfo: &str) -> Option<Acceleration> {
    for line in cpuinfo.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        if key.trim() != "flags" {
            continue;
        }
        for flag in value.split_whitespace() {
            match flag {
                "vmx" => return Some(Acceleration::Vmx),
                "svm" => return Some(Acceleration::Svm),
                _ => {}
            }
        }
    }
    None
}

/// Reads the cgroup layout from `/proc/self/mounts` content.
pub fn cgroup_mode(mounts: &str) -> CgroupMode {
    let (mut v1, mut v2) = (false, false);
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (_src, _target, fstype) = (fields.next(), fields.next(), fields.next());
        match fstype {
            Some("cgroup") => v1 = true,
            Some("cgroup2") => v2 = true,
            _ => {}
        }
    }
    match (v1, v2) {
        (true, true) => CgroupMode::Hybrid,
        (true, false) => CgroupMode::V1,
        (false, true) => CgroupMode::V2,
        (false, false) => CgroupMode::None,
    }
}

/// Opens a KVM device and asks its API version.
pub fn kvm_api_version(dev: &Path) -> std::io::Result<i32> {
    let f = fs::OpenOptions::new().read(true).write(true).open(dev)?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int; `f` stays open.
    let v = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if v < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

/// Whether the kernel offers AF_VSOCK sockets.
pub fn af_vsock_supported() -> bool {
    // SAFETY: plain socket(2); the descriptor is closed right away.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return false;
    }
    // SAFETY: `fd` is a descriptor we own.
    unsafe { libc::close(fd) };
    true
}

fn kvm_module(sys_module: &Path) -> Option<&'static str> {
    ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .into_iter()
        .find(|m| sys_module.join(m).exists())
}

fn check_file(report: &mut CheckReport, name: &str, path: &Path, executable: bool) {
    use std::os::unix::fs::PermissionsExt;
    match fs::metadata(path) {
        Ok(m) if !m.is_file() => report.push(
            name,
            Status::Fail,
            format!("{} is not a regular file", path.display()),
        ),
        Ok(m) if executable && m.permissions().mode() & 0o111 == 0 => report.push(
            name,
            Status::Fail,
            format!("{} is not executable", path.display()),
        ),
        Ok(m) => report.push(
            name,
            Status::Ok,
            format!("{} ({} bytes)", path.display(), m.len()),
        ),
        Err(e) => report.push(
            name,
            Status::Fail,
            format!(
                "{}: {e} (set CAPSA_VMM/CAPSA_KERNEL/CAPSA_INITRD or build them)",
                path.display()
            ),
        ),
    }
}

/// Runs every probe.
pub fn run(inputs: &CheckInputs) -> CheckReport {
    let mut report = CheckReport {
        acceleration: Acceleration::None,
        cgroups: CgroupMode::None,
        items: Vec::new(),
        can_run: true,
    };

    // KVM device and API.
    let kvm_ok = if !inputs.dev_kvm.exists() {
        report.push(
            "kvm device",
            Status::Fail,
            format!(
                "{} missing: load kvm_intel/kvm_amd or enable virtualisation",
                inputs.dev_kvm.display()
            ),
        );
        false
    } else {
        match kvm_api_version(&inputs.dev_kvm) {
            Ok(KVM_API_VERSION) => {
                report.push(
                    "kvm device",
                    Status::Ok,
                    format!(
                        "{} opens, API version {KVM_API_VERSION}",
                        inputs.dev_kvm.display()
                    ),
                );
                true
            }
            Ok(v) => {
                report.push(
                    "kvm device",
                    Status::Fail,
                    format!("KVM API version {v}, need {KVM_API_VERSION}"),
                );
                false
            }
            Err(e) => {
                report.push(
                    "kvm device",
                    Status::Fail,
                    format!("cannot use {}: {e}", inputs.dev_kvm.display()),
                );
                false
            }
        }
    };

    // Acceleration.
    let cpuinfo = fs::read_to_string(&inputs.cpuinfo).unwrap_or_default();
    let module = kvm_module(&inputs.sys_module);
    let module_note = module.map(|m| format!(", module {m}")).unwrap_or_default();
    report.acceleration = match (kvm_ok, cpu_virtualisation(&cpuinfo)) {
        (false, _) => Acceleration::None,
        (true, Some(a)) => a,
        (true, None) => Acceleration::Emulated,
    };
    match report.acceleration {
        Acceleration::Vmx | Acceleration::Svm => report.push(
            "acceleration",
            Status::Ok,
            format!(
                "hardware ({}{module_note})",
                if report.acceleration == Acceleration::Vmx {
                    "Intel VT-x"
                } else {
                    "AMD-V"
                }
            ),
        ),
        Acceleration::Emulated => report.push(
            "acceleration",
            Status::Warn,
            format!(
                "nested/emulated KVM (no vmx/svm in {}{module_note}): guests will be very slow; run inside the test host",
                inputs.cpuinfo.display()
            ),
        ),
        Acceleration::None => report.push("acceleration", Status::Fail, "no usable KVM"),
    }

    // vsock: capsa uses hybrid vsock over a Unix socket, so AF_VSOCK is optional.
    if inputs.probe_vsock {
        if af_vsock_supported() {
            report.push(
                "AF_VSOCK",
                Status::Info,
                "supported (not needed: capsa uses hybrid vsock over a Unix socket)",
            );
        } else {
            report.push(
                "AF_VSOCK",
                Status::Info,
                "not supported (not needed: capsa uses hybrid vsock over a Unix socket)",
            );
        }
    }

    // TUN for pod networking.
    match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&inputs.dev_tun)
    {
        Ok(_) => report.push(
            "tun device",
            Status::Ok,
            inputs.dev_tun.display().to_string(),
        ),
        Err(e) => report.push(
            "tun device",
            Status::Warn,
            format!(
                "{}: {e} (pod networking unavailable)",
                inputs.dev_tun.display()
            ),
        ),
    }

    // cgroups.
    let mounts = fs::read_to_string(&inputs.mounts).unwrap_or_default();
    report.cgroups = cgroup_mode(&mounts);
    match report.cgroups {
        CgroupMode::V2 => report.push("cgroups", Status::Ok, "v2 (unified)"),
        CgroupMode::V1 => report.push("cgroups", Status::Ok, "v1"),
        CgroupMode::Hybrid => report.push("cgroups", Status::Ok, "hybrid (v1 and v2)"),
        CgroupMode::None => report.push(
            "cgroups",
            Status::Warn,
            format!(
                "no cgroup file system mounted ({})",
                inputs.mounts.display()
            ),
        ),
    }

    // What a VM needs.
    check_file(&mut report, "capsa-vmm", &inputs.artifacts.vmm, true);
    check_file(&mut report, "guest kernel", &inputs.artifacts.kernel, false);
    check_file(&mut report, "guest initrd", &inputs.artifacts.initrd, false);

    report.can_run = report.items.iter().all(|i| i.status != Status::Fail);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPUINFO_INTEL: &str =
        "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de pse vmx sse\n\n";
    const CPUINFO_AMD: &str = "processor\t: 0\nflags\t\t: fpu svm sse\n";
    const CPUINFO_NONE: &str = "processor\t: 0\nflags\t\t: fpu vme hypervisor\nbugs\t\t: svmx\n";

    #[test]
    fn cpu_flags() {
        assert_eq!(cpu_virtualisation(CPUINFO_INTEL), Some(Acceleration::Vmx));
        assert_eq!(cpu_virtualisation(CPUINFO_AMD), Some(Acceleration::Svm));
        assert_eq!(cpu_virtualisation(CPUINFO_NONE), None);
        assert_eq!(cpu_virtualisation(""), None);
    }

    #[test]
    fn cgroups() {
        let v2 = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\nproc /proc proc rw 0 0\n";
        let v1 = "tmpfs /sys/fs/cgroup tmpfs ro 0 0\ncgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n";
        let hybrid = format!("{v1}cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n");
        assert_eq!(cgroup_mode(v2), CgroupMode::V2);
        assert_eq!(cgroup_mode(v1), CgroupMode::V1);
        assert_eq!(cgroup_mode(&hybrid), CgroupMode::Hybrid);
        assert_eq!(cgroup_mode("proc /proc proc rw 0 0\n"), CgroupMode::None);
    }

    fn fake_inputs(dir: &Path, cpuinfo: &str, mounts: &str) -> CheckInputs {
        fs::write(dir.join("cpuinfo"), cpuinfo).unwrap();
        fs::write(dir.join("mounts"), mounts).unwrap();
        fs::create_dir_all(dir.join("module/kvm_pvm")).unwrap();
        let vmm = dir.join("capsa-vmm");
        fs::write(&vmm, b"#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&vmm, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(dir.join("vmlinux"), b"k").unwrap();
        CheckInputs {
            dev_kvm: "/dev/kvm".into(),
            cpuinfo: dir.join("cpuinfo"),
            mounts: dir.join("mounts"),
            sys_module: dir.join("module"),
            dev_tun: dir.join("no-tun"),
            artifacts: Artifacts {
                vmm,
                kernel: dir.join("vmlinux"),
                initrd: dir.join("missing-initrd"),
            },
            probe_vsock: false,
        }
    }

    #[test]
    fn no_kvm_cannot_run() {
        let dir = tempfile::tempdir().unwrap();
        let mut inputs = fake_inputs(
            dir.path(),
            CPUINFO_INTEL,
            "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n",
        );
        inputs.dev_kvm = dir.path().join("no-kvm");
        let r = run(&inputs);
        assert!(!r.can_run);
        assert_eq!(r.acceleration, Acceleration::None);
        assert_eq!(r.cgroups, CgroupMode::V2);
        let kvm = r.items.iter().find(|i| i.name == "kvm device").unwrap();
        assert_eq!(kvm.status, Status::Fail);
        let tun = r.items.iter().find(|i| i.name == "tun device").unwrap();
        assert_eq!(tun.status, Status::Warn);
        let vmm = r.items.iter().find(|i| i.name == "capsa-vmm").unwrap();
        assert_eq!(vmm.status, Status::Ok);
        let initrd = r.items.iter().find(|i| i.name == "guest initrd").unwrap();
        assert_eq!(initrd.status, Status::Fail);
        assert!(r.render().contains("CANNOT run"));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["acceleration"], "none");
        assert_eq!(json["can_run"], false);
    }

    #[test]
    fn a_kvm_device_that_is_not_kvm_fails() {
        let dir = tempfile::tempdir().unwrap();
        let mut inputs = fake_inputs(dir.path(), CPUINFO_AMD, "");
        // A regular file answers no KVM ioctl.
        inputs.dev_kvm = dir.path().join("cpuinfo");
        let r = run(&inputs);
        assert_eq!(r.acceleration, Acceleration::None);
        assert!(!r.can_run);
        assert_eq!(r.cgroups, CgroupMode::None);
    }

    /// Runs against the real /dev/kvm when there is one (this machine has an emulating KVM).
    #[test]
    fn emulated_kvm_is_reported() {
        if kvm_api_version(Path::new("/dev/kvm")).is_err() {
            eprintln!("skipped: no usable /dev/kvm here");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let inputs = fake_inputs(dir.path(), CPUINFO_NONE, "");
        let r = run(&inputs);
        assert_eq!(r.acceleration, Acceleration::Emulated);
        let acc = r.items.iter().find(|i| i.name == "acceleration").unwrap();
        assert_eq!(acc.status, Status::Warn);
        assert!(acc.detail.contains("nested/emulated KVM"), "{}", acc.detail);
        assert!(acc.detail.contains("kvm_pvm"), "{}", acc.detail);
        let inputs = fake_inputs(dir.path(), CPUINFO_INTEL, "");
        assert_eq!(run(&inputs).acceleration, Acceleration::Vmx);
    }
}
