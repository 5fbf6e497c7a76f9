//! capsa-vmm's seccomp filters, through the binary: every thread filtered while the guest runs, a forbidden
//! syscall kills the process with SIGSYS (debug builds' `--seccomp-selftest` hook), off and log modes.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn vmm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_capsa-vmm"));
    c.stdin(Stdio::null());
    c
}

fn hello_kernel(dir: &Path) -> String {
    let mut a = Asm::new();
    a.print("hello\n").reset().halt_forever();
    write_kernel(dir, "vmlinux", &pvh_kernel(&a.0))
        .display()
        .to_string()
}

// The two tests below need the `--seccomp-selftest` hook, which only debug builds carry: `make test`
// runs this file once more in the dev profile for them.
#[cfg(debug_assertions)]
#[test]
fn a_forbidden_syscall_once_filters_are_on_kills_the_vmm_with_sigsys() {
    let dir = tempfile::tempdir().unwrap();
    let k = hello_kernel(dir.path());
    let o = vmm()
        .args(["--kernel", &k, "--memory-mib", "32", "--seccomp-selftest"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.signal(),
        Some(libc::SIGSYS),
        "{:?}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    // Killed before the guest ran.
    assert!(o.stdout.is_empty());
}

#[cfg(debug_assertions)]
#[test]
fn off_and_log_let_the_forbidden_syscall_through_and_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let k = hello_kernel(dir.path());
    for (mode, warning) in [("off", "seccomp is OFF"), ("log", "seccomp in LOG mode")] {
        let o = vmm()
            .args(["--kernel", &k, "--memory-mib", "32", "--seccomp", mode])
            .arg("--seccomp-selftest")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{mode}: {err}");
        assert!(err.contains(warning), "{mode}: {err}");
        assert!(err.contains("the filter did not stop it"), "{mode}: {err}");
        assert_eq!(String::from_utf8_lossy(&o.stdout), "hello\n", "{mode}");
    }
    let o = vmm()
        .args(["--kernel", &k, "--seccomp", "maybe"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}

/// A release binary does not carry the debug-only self-test hook, and refuses a bad mode.
#[cfg(not(debug_assertions))]
#[test]
fn the_release_binary_has_no_selftest_hook() {
    let dir = tempfile::tempdir().unwrap();
    let k = hello_kernel(dir.path());
    let o = vmm()
        .args(["--kernel", &k, "--memory-mib", "32", "--seccomp-selftest"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--seccomp-selftest"), "{err}");
    let o = vmm()
        .args(["--kernel", &k, "--seccomp", "maybe"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}

/// `Seccomp:` and `Seccomp_filters:` of every thread of `pid`, by thread name.
fn thread_seccomp(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or("")
                .trim()
                .to_string()
        };
        out.push((field("Name:"), field("Seccomp:"), field("Seccomp_filters:")));
    }
    out.sort();
    out
}

#[test]
fn every_thread_runs_filtered_while_the_guest_runs_and_sigterm_still_stops_it() {
    let mut a = Asm::new();
    a.print("up\n").bytes(&[0xfa]).halt_forever();
    let dir = tempfile::tempdir().unwrap();
    let k = write_kernel(dir.path(), "vmlinux", &pvh_kernel(&a.0));
    let log = dir.path().join("console.log");
    let mut child = vmm()
        .args(["--kernel", k.to_str().unwrap(), "--memory-mib", "32"])
        .args([
            "--vcpus",
            "2",
            "--rng",
            "--console-log",
            log.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&log).unwrap_or_default() != "up\n" {
        assert!(Instant::now() < deadline, "guest never printed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // KVM's own worker (kvm-nx-lpage-recovery on newer kernels) is a kernel thread in the process: not ours.
    let threads: Vec<_> = thread_seccomp(child.id())
        .into_iter()
        .filter(|t| !t.0.starts_with("kvm-"))
        .collect();
    let names: Vec<&str> = threads.iter().map(|t| t.0.as_str()).collect();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        names,
        ["capsa-launcher", "capsa-vmm", "vcpu0", "vcpu1"],
        "{threads:?}"
    );
    for (name, mode, filters) in &threads {
        assert_eq!(mode, "2", "{name}: {threads:?}");
        let expected = if name == "capsa-launcher" { "2" } else { "1" };
        assert_eq!(filters, expected, "{name}: {threads:?}");
    }

    // SIGTERM (handled by whichever thread gets it) still means a clean stop, under the filters.
    let _ = std::fs::remove_file(&log);
    let mut child = vmm()
        .args(["--kernel", k.to_str().unwrap(), "--memory-mib", "32"])
        .args(["--console-log", log.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&log).unwrap_or_default() != "up\n" {
        assert!(Instant::now() < deadline, "guest never printed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}
