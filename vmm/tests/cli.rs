//! The `capsa-vmm` binary and its configuration: flags, JSON, exit statuses, signals, console log, boot timer.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use capsa_vmm::{Cli, ConfigError, DiskConfig};
use clap::Parser;
use common::*;

fn vmm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_capsa-vmm"));
    c.stdin(Stdio::null());
    c
}

fn run(args: &[&str]) -> Output {
    vmm().args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn hello_kernel(dir: &Path) -> String {
    let mut a = Asm::new();
    a.print("hello\n").reset().halt_forever();
    write_kernel(dir, "vmlinux", &pvh_kernel(&a.0))
        .display()
        .to_string()
}

#[test]
fn help_documents_flags_json_schema_and_exit_statuses() {
    let o = run(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    let text = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "--kernel",
        "--vsock-uds",
        "--disk",
        "--console-log",
        "--config",
        "CONFIG FILE",
        "memory_mib",
        "Example",
        "EXIT STATUS",
    ] {
        assert!(text.contains(needle), "--help lacks {needle}");
    }
}

#[test]
fn missing_kernel_is_a_usage_error() {
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no kernel given"), "{}", stderr(&o));
    let o = run(&["--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("kernel /nonexistent/vmlinux") && e.lines().count() == 1,
        "{e}"
    );
}

#[test]
fn bad_flags_and_values_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let k = hello_kernel(dir.path());
    for args in [
        vec!["--bogus"],
        vec!["--kernel", &k, "--vcpus", "0"],
        vec!["--kernel", &k, "--vcpus", "255"],
        vec!["--kernel", &k, "--memory-mib", "1"],
        vec!["--kernel", &k, "--memory-mib", "lots"],
        vec!["--kernel", &k, "--vsock-cid", "3"],
        vec![
            "--kernel",
            &k,
            "--vsock-cid",
            "2",
            "--vsock-uds",
            "/tmp/x.sock",
        ],
        vec!["--kernel", &k, "--disk", "/nonexistent.img"],
        vec!["--kernel", &k, "--disk", "/a.img,rw"],
        vec!["--kernel", &k, "--config", "/nonexistent.json"],
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).is_empty());
    }
}

#[test]
fn bad_json_is_rejected_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let k = hello_kernel(dir.path());
    let cases = [
        ("{\"kernel\": ", "bad config file"),
        (
            &format!("{{\"kernel\": \"{k}\", \"vcpu\": 2}}") as &str,
            "unknown field `vcpu`",
        ),
        (
            &format!("{{\"kernel\": \"{k}\", \"vcpus\": 0}}"),
            "vcpus must be 1..=254",
        ),
        (
            &format!("{{\"kernel\": \"{k}\", \"vcpus\": 300}}"),
            "bad config file",
        ),
        (
            &format!("{{\"kernel\": \"{k}\", \"memory_mib\": \"big\"}}"),
            "bad config file",
        ),
        (
            &format!("{{\"kernel\": \"{k}\", \"vsock_uds\": \"/tmp/v.sock\"}}"),
            "vsock needs both",
        ),
    ];
    for (json, msg) in cases {
        let p = dir.path().join("c.json");
        std::fs::write(&p, json).unwrap();
        let o = run(&["--config", p.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2), "{json}");
        assert!(stderr(&o).contains(msg), "{json}: {}", stderr(&o));
    }
}

#[test]
fn json_and_flags_merge_with_flags_winning() {
    let dir = tempfile::tempdir().unwrap();
    let k = hello_kernel(dir.path());
    let disk = dir.path().join("d.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let json = dir.path().join("c.json");
    let text = serde_json::json!({
        "kernel": "/nonexistent", "cmdline": "console=ttyS0", "vcpus": 2, "memory_mib": 64, "rng": true,
        "disks": [{"path": "/nonexistent.img"}], "console_log": "/tmp/from-json.log",
        "console_limit": 4096
    });
    std::fs::write(&json, text.to_string()).unwrap();
    let cli = Cli::try_parse_from([
        "capsa-vmm",
        "--config",
        json.to_str().unwrap(),
        "--kernel",
        &k,
        "--memory-mib",
        "48",
        "--disk",
        &format!("{},readonly", disk.display()),
    ])
    .unwrap();
    let cfg = cli.into_config().unwrap();
    assert_eq!(cfg.kernel.display().to_string(), k);
    assert_eq!(cfg.memory_mib, 48);
    assert_eq!(cfg.vcpus, 2);
    assert_eq!(cfg.cmdline, "console=ttyS0");
    assert!(cfg.rng);
    assert_eq!(
        cfg.disks,
        vec![DiskConfig {
            path: disk.clone(),
            readonly: true,
            id: None
        }]
    );
    assert_eq!(
        cfg.console_log.as_deref(),
        Some(Path::new("/tmp/from-json.log"))
    );
    assert_eq!(cfg.console_limit, 4096);

    // Without --kernel the JSON's (missing) kernel is used and rejected.
    let cli = Cli::try_parse_from(["capsa-vmm", "--config", json.to_str().unwrap()]).unwrap();
    assert!(matches!(
        cli.into_config(),
        Err(ConfigError::BadFile { what: "kernel", .. })
    ));
}

#[test]
fn guest_reset_exits_0_with_output_in_the_console_log() {
    let dir = tempfile::tempdir().unwrap();
    let k = hello_kernel(dir.path());
    let log = dir.path().join("console.log");
    let o = run(&[
        "--kernel",
        &k,
        "--memory-mib",
        "32",
        "--vcpus",
        "2",
        "--console-log",
        log.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "hello\n");
    assert!(o.stdout.is_empty());
}

#[test]
fn console_log_is_capped_with_a_notice_and_the_drop_logged() {
    let dir = tempfile::tempdir().unwrap();
    let k = hello_kernel(dir.path());
    let log = dir.path().join("console.log");
    let o = run(&[
        "--kernel",
        &k,
        "--memory-mib",
        "32",
        "--console-log",
        log.to_str().unwrap(),
        "--console-limit",
        "3",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "hel\n[capsa-vmm: console log limit of 3 bytes reached; further output dropped]\n"
    );
    // Fields may be coloured: drop the escape sequences before looking for `dropped=3`.
    let e = stderr(&o);
    let mut plain = String::new();
    let mut in_escape = false;
    for c in e.chars() {
        match (in_escape, c) {
            (false, '\x1b') => in_escape = true,
            (false, c) => plain.push(c),
            (true, 'm') => in_escape = false,
            (true, _) => {}
        }
    }
    assert!(plain.contains("dropped=3"), "{e}");
    // Without the flag the default (1 MiB) applies.
    assert_eq!(
        Cli::try_parse_from(["capsa-vmm", "--kernel", &k])
            .unwrap()
            .into_config()
            .unwrap()
            .console_limit,
        1 << 20
    );
    assert!(Cli::try_parse_from(["capsa-vmm", "--console-limit", "-1"]).is_err());
}

#[test]
fn serial_output_goes_to_stdout_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let k = hello_kernel(dir.path());
    let o = run(&["--kernel", &k, "--memory-mib", "32"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hello\n");
}

#[test]
fn boot_timer_line_on_stderr() {
    let mut a = Asm::new();
    a.mov_dx(0x440)
        .out_dx_imm(1)
        .out_dx_imm(1)
        .reset()
        .halt_forever();
    let dir = tempfile::tempdir().unwrap();
    let k = write_kernel(dir.path(), "vmlinux", &pvh_kernel(&a.0));
    let o = run(&["--kernel", k.to_str().unwrap(), "--memory-mib", "32"]);
    assert_eq!(o.status.code(), Some(0));
    let e = stderr(&o);
    let lines: Vec<&str> = e.lines().filter(|l| l.starts_with("BOOT_TIMER ")).collect();
    assert_eq!(lines.len(), 1, "{e}");
    let fields: Vec<(&str, u64)> = lines[0]["BOOT_TIMER ".len()..]
        .split(' ')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k, v.parse().unwrap())
        })
        .collect();
    assert_eq!(fields[0].0, "start_to_kernel_entry_us");
    assert_eq!(fields[1].0, "kernel_entry_to_agent_us");
    assert!(fields[0].1 > 0 && fields[0].1 < 30_000_000);
}

/// Kills the VMM if the test fails before it exits.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn sigterm_and_sigint_stop_the_vm_with_status_0() {
    let mut a = Asm::new();
    a.print("up\n").bytes(&[0xfa]).halt_forever();
    let dir = tempfile::tempdir().unwrap();
    let k = write_kernel(dir.path(), "vmlinux", &pvh_kernel(&a.0));
    let log = dir.path().join("console.log");
    let uds = dir.path().join("vsock.sock");
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let _ = std::fs::remove_file(&log);
        let child = vmm()
            .args([
                "--kernel",
                k.to_str().unwrap(),
                "--memory-mib",
                "32",
                "--vcpus",
                "2",
            ])
            .args([
                "--console-log",
                log.to_str().unwrap(),
                "--vsock-cid",
                "3",
                "--vsock-uds",
                uds.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut child = KillOnDrop(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::fs::read_to_string(&log).unwrap_or_default() != "up\n" {
            assert!(Instant::now() < deadline, "guest never printed");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(uds.exists(), "vsock socket exists while the VM runs");
        unsafe { libc::kill(child.0.id() as i32, signal) };
        let stopped = Instant::now();
        let status = child.0.wait().unwrap();
        assert_eq!(status.code(), Some(0), "signal {signal}");
        assert!(stopped.elapsed() < Duration::from_secs(10));
        assert!(!uds.exists(), "vsock socket removed on exit");
    }
}

#[test]
fn unloadable_kernel_is_a_runtime_failure() {
    let dir = tempfile::tempdir().unwrap();
    let k = write_kernel(dir.path(), "garbage", &[0x42u8; 8192]);
    let o = run(&["--kernel", k.to_str().unwrap(), "--memory-mib", "32"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.starts_with("capsa-vmm: cannot load kernel") && e.lines().count() == 1,
        "{e}"
    );
}
