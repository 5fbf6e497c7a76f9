//! Shared helpers for the end-to-end suites and the benchmark.
//!
//! The suites boot real guests and only run when `CAPSA_E2E=1` (set by `tests/e2e/run-suites.sh`, which
//! `make e2e` runs inside the nested test host). Inputs come from `CAPSA_VMM`, `CAPSA_KERNEL` and
//! `CAPSA_INITRD`, defaulting to `target/release/capsa-vmm`, `build/guest/vmlinux` and
//! `build/guest/initrd.img` under the workspace root; `CAPSA_E2E_CMDLINE` adds kernel command-line words.

use std::path::{Path, PathBuf};
use std::time::Duration;

use capsa_runtime::vm::VmConfig;

pub mod cni;
pub mod cri;
pub mod figures;
pub mod leaks;
pub mod netbench;
pub mod smaps;

/// The workspace root (the crate lives in `tests/e2e`).
pub fn workspace_root() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    p.canonicalize().unwrap_or(p)
}

/// True when the real-guest suites should run; otherwise prints why the test is skipped.
pub fn e2e_enabled(test: &str) -> bool {
    if std::env::var("CAPSA_E2E").as_deref() == Ok("1") {
        return true;
    }
    eprintln!(
        "SKIPPED {test}: set CAPSA_E2E=1 to boot real guests (`make e2e` runs the suites inside the nested test host)"
    );
    false
}

/// The VMM, guest kernel and initrd the suites boot.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl Inputs {
    pub fn from_env() -> Self {
        let root = workspace_root();
        let var = |k: &str, default: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join(default))
        };
        Inputs {
            vmm: var("CAPSA_VMM", "target/release/capsa-vmm"),
            kernel: var("CAPSA_KERNEL", "build/guest/vmlinux"),
            initrd: var("CAPSA_INITRD", "build/guest/initrd.img"),
        }
    }

    /// Panics with a clear message when an input is missing (the suites need all three).
    pub fn require(&self) -> &Self {
        for (what, p, how) in [
            ("CAPSA_VMM", &self.vmm, "cargo build --release -p capsa-vmm"),
            ("CAPSA_KERNEL", &self.kernel, "make guest-image"),
            ("CAPSA_INITRD", &self.initrd, "make guest-image"),
        ] {
            assert!(
                p.exists(),
                "{what}: {} does not exist (build it: {how})",
                p.display()
            );
        }
        self
    }
}

/// A short, private run root for sandbox directories (Unix socket paths must stay short).
pub fn run_root() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("capsa-e2e-")
        .tempdir_in("/tmp")
        .expect("cannot create a run root under /tmp")
}

/// A VM configuration for the suites.
pub fn vm_config(inputs: &Inputs, run_root: &Path, vcpus: u32, memory_mib: u32) -> VmConfig {
    let mut c = VmConfig::new(
        inputs.vmm.clone(),
        inputs.kernel.clone(),
        Some(inputs.initrd.clone()),
    );
    c.vcpus = vcpus;
    c.memory_mib = memory_mib;
    c.run_root = run_root.to_path_buf();
    // Nested virtualisation is slow and the suites may boot several guests at once.
    c.boot_timeout = Duration::from_secs(60);
    c.stop_timeout = Duration::from_secs(15);
    // Diagnostics, e.g. CAPSA_E2E_CMDLINE=loglevel=8 to see every kernel message on the console.
    if let Ok(extra) = std::env::var("CAPSA_E2E_CMDLINE") {
        c.extra_cmdline
            .extend(extra.split_whitespace().map(str::to_string));
    }
    c
}

/// Median of a non-empty sample.
pub fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    let n = values.len();
    if n == 0 {
        return Duration::ZERO;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2
    }
}

/// A busybox rootfs directory: /bin/busybox plus one hard link per applet.
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir rootfs");
    }
    let bb = root.join("bin/busybox");
    std::fs::copy("/bin/busybox", &bb).expect("copy /bin/busybox (Debian's busybox-static)");
    let list = std::process::Command::new(&bb)
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let l = root.join("bin").join(applet);
        if applet != "busybox" && !l.exists() {
            std::fs::hard_link(&bb, l).expect("link applet");
        }
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
        .expect("write rootfs /etc");
    std::fs::write(root.join("etc/group"), "root:x:0:\n").expect("write rootfs /etc");
    root
}

/// Copies a failed test's whole guest console to `$CAPSA_E2E_ARTIFACTS/<name>-console.log` when that variable
/// names a directory (the sandbox directory, and the console log with it, goes away with the VM).
pub fn keep_console(console_log: &Path, name: &str) {
    let Some(dir) = std::env::var_os("CAPSA_E2E_ARTIFACTS") else {
        return;
    };
    let to = Path::new(&dir).join(format!("{name}-console.log"));
    match std::fs::copy(console_log, &to) {
        Ok(_) => eprintln!("guest console kept in {}", to.display()),
        Err(e) => eprintln!("cannot keep the guest console in {}: {e}", to.display()),
    }
}

/// What every thread of process `pid` is doing: name, state, wait channel, current system call and kernel
/// stack (as far as /proc shows them). Printed when a suite fails, to tell a guest that stopped running (a
/// vCPU thread blocked in user space) from one that runs but does not answer.
pub fn thread_report(pid: u32) -> String {
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|e| format!("({}: {e})", p.display()))
    };
    let dir = PathBuf::from(format!("/proc/{pid}/task"));
    let mut tids: Vec<u32> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(e) => return format!("process {pid}: {e}"),
    };
    tids.sort_unstable();
    let mut out = String::new();
    for tid in tids {
        let t = dir.join(tid.to_string());
        let stat = read(t.join("stat"));
        // The state follows the parenthesised command name.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        out.push_str(&format!(
            "thread {tid} {} state {state} schedstat {} wchan {} syscall {}\n",
            read(t.join("comm")),
            read(t.join("schedstat")),
            read(t.join("wchan")),
            read(t.join("syscall")),
        ));
        for line in read(t.join("stack")).lines() {
            out.push_str("    ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_report_lists_every_thread_with_its_state() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let waiter = std::thread::Builder::new()
            .name("report-probe".into())
            .spawn(move || rx.recv())
            .unwrap();
        let me = std::process::id();
        // The probe thread soon blocks in a futex wait: sleeping, under its name.
        let probe_sleeps = |r: &str| r.lines().any(|l| l.contains(" report-probe state S "));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut r = thread_report(me);
        while !probe_sleeps(&r) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            r = thread_report(me);
        }
        assert!(r.contains(&format!("thread {me} ")), "{r}");
        assert!(probe_sleeps(&r), "{r}");
        drop(tx);
        waiter.join().unwrap().unwrap_err();
        assert!(thread_report(u32::MAX).starts_with(&format!("process {}", u32::MAX)));
    }

    #[test]
    fn median_of_odd_and_even() {
        let ms = Duration::from_millis;
        assert_eq!(median(&mut [ms(3), ms(1), ms(2)]), ms(2));
        assert_eq!(
            median(&mut [ms(4), ms(1), ms(2), ms(3)]),
            Duration::from_micros(2500)
        );
        assert_eq!(median(&mut []), Duration::ZERO);
    }

    #[test]
    fn defaults_under_workspace() {
        let root = workspace_root();
        assert!(root.join("Cargo.toml").exists(), "{}", root.display());
    }
}
