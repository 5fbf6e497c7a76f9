//! The test-host runner's own tests. Each boots the nested test host (about 10 s under TCG), so they run only
//! with CAPSA_TESTHOST_TESTS=1 (`make e2e` sets it). The first one builds the image if the cache has none.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_capsa-testhost");

fn enabled() -> bool {
    if std::env::var("CAPSA_TESTHOST_TESTS").as_deref() == Ok("1") {
        return true;
    }
    eprintln!("skipped: set CAPSA_TESTHOST_TESTS=1 to boot the nested test host");
    false
}

fn runner(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("run")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

fn run(args: &[&str]) -> (Output, Duration) {
    let start = Instant::now();
    let out = runner(args)
        .stdin(Stdio::null())
        .output()
        .expect("running capsa-testhost");
    let elapsed = start.elapsed();
    eprintln!(
        "---- runner stderr ({:.1} s) ----\n{}",
        elapsed.as_secs_f64(),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, elapsed)
}

/// The QEMU pid the runner announced on stderr.
fn qemu_pid(stderr: &str) -> Option<u32> {
    let rest = stderr.split("(qemu pid ").nth(1)?;
    rest.split(',').next()?.trim().parse().ok()
}

fn is_running_qemu(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.contains("qemu-system"))
}

fn leftover_temp_dirs(runner_pid: u32) -> Vec<String> {
    let mut left = Vec::new();
    for e in std::fs::read_dir(std::env::temp_dir())
        .expect("temp dir")
        .flatten()
    {
        let p = e.path().join("runner.pid");
        if std::fs::read_to_string(&p).is_ok_and(|s| s.trim() == runner_pid.to_string()) {
            left.push(e.path().display().to_string());
        }
    }
    left
}

#[test]
fn uname_kvm_cwd_and_env_come_from_inside() {
    if !enabled() {
        return;
    }
    let script = "uname -r; test -c /dev/kvm && echo kvm-dev-ok; \
        echo quit | qemu-system-x86_64 -M none -accel kvm -display none -nodefaults -monitor stdio \
          >/dev/null 2>&1 && echo kvm-api-ok; \
        pwd; echo \"env=$CAPSA_TESTHOST_PROBE/$CAPSA_TESTHOST\"";
    let (out, _) = run(&[
        "--env",
        "CAPSA_TESTHOST_PROBE=hello world",
        "--",
        "sh",
        "-c",
        script,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stdout: {stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    assert!(
        !lines.is_empty() && lines[0].ends_with("-amd64"),
        "uname -r inside: {stdout}"
    );
    assert_ne!(lines[0], host_release.trim(), "uname -r came from the host");
    assert!(
        lines.contains(&"kvm-dev-ok"),
        "no /dev/kvm inside: {stdout}"
    );
    assert!(
        lines.contains(&"kvm-api-ok"),
        "QEMU inside cannot use KVM: {stdout}"
    );
    assert!(
        lines.contains(&env!("CARGO_MANIFEST_DIR")),
        "cwd inside differs: {stdout}"
    );
    assert!(
        lines.contains(&"env=hello world/1"),
        "environment not passed: {stdout}"
    );
}

#[test]
fn failing_command_fails_the_run_with_its_status() {
    if !enabled() {
        return;
    }
    let (out, _) = run(&["--", "sh", "-c", "echo to-stderr >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&out.stderr).contains("to-stderr"));
}

#[test]
fn hung_command_is_stopped_at_the_timeout() {
    if !enabled() {
        return;
    }
    let child = runner(&["--timeout", "20", "--", "sleep", "1000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let runner_pid = child.id();
    let start = Instant::now();
    let out = child.wait_with_output().expect("wait");
    let elapsed = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "---- runner stderr ({:.1} s) ----\n{stderr}",
        elapsed.as_secs_f64()
    );
    assert_eq!(out.status.code(), Some(124));
    assert!(
        stderr.contains("command started"),
        "the command never started"
    );
    assert!(
        stderr.contains("timeout: the command did not finish within 20 s"),
        "no timeout message"
    );
    // Boot (10-25 s under load) + the 20 s limit.
    assert!(elapsed < Duration::from_secs(80), "took {elapsed:?}");
    let pid = qemu_pid(&stderr).expect("qemu pid on stderr");
    assert!(!is_running_qemu(pid), "QEMU {pid} still runs");
    assert!(
        leftover_temp_dirs(runner_pid).is_empty(),
        "temporary directory left behind"
    );
}

#[test]
fn sigterm_stops_qemu_and_cleans_up() {
    if !enabled() {
        return;
    }
    let mut child = runner(&["--", "sleep", "1000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let runner_pid = child.id();
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(pid) = qemu_pid(&line) {
                let _ = tx.send(pid);
            }
            all += &line;
            all.push('\n');
        }
        all
    });
    let pid = rx
        .recv_timeout(Duration::from_secs(600))
        .expect("QEMU started");
    std::thread::sleep(Duration::from_secs(3)); // mid-boot
    assert!(is_running_qemu(pid));
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(runner_pid as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    let stderr = reader.join().expect("reader");
    eprintln!("---- runner stderr ----\n{stderr}");
    assert_eq!(status.code(), Some(143));
    assert!(!is_running_qemu(pid), "QEMU {pid} still runs");
    assert!(
        leftover_temp_dirs(runner_pid).is_empty(),
        "temporary directory left behind"
    );
}

#[test]
fn ten_mib_of_output_arrive_complete() {
    if !enabled() {
        return;
    }
    const SIZE: usize = 10 * 1024 * 1024;
    let script = format!(
        "head -c {SIZE} /dev/urandom >/tmp/blob && sha256sum </tmp/blob >&2 && \
         s=$(date +%s%N) && cat /tmp/blob && e=$(date +%s%N) && echo \"guest-ms=$(( (e - s) / 1000000 ))\" >&2"
    );
    let (out, _) = run(&["--", "sh", "-c", &script]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout.len(), SIZE, "stdout incomplete");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let inside = stderr
        .lines()
        .find_map(|l| l.strip_suffix("  -").map(str::to_owned))
        .expect("sha256 from inside");
    let tmp = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(tmp.path(), &out.stdout).expect("write");
    let host = Command::new("sha256sum")
        .arg(tmp.path())
        .output()
        .expect("sha256sum");
    let host = String::from_utf8_lossy(&host.stdout);
    assert_eq!(
        host.split_whitespace().next(),
        Some(inside.as_str()),
        "checksum differs"
    );
    if let Some(ms) = stderr.lines().find_map(|l| l.strip_prefix("guest-ms=")) {
        if let Ok(ms) = ms.trim().parse::<f64>() {
            eprintln!(
                "timing: 10 MiB of stdout streamed in {ms} ms ({:.1} MiB/s)",
                10_000.0 / ms.max(1.0)
            );
        }
    }
}

#[test]
fn missing_share_is_a_clear_error() {
    // No boot needed: bad input fails before QEMU starts.
    let out = runner(&["--share", "/nonexistent/capsa", "--", "true"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot share /nonexistent/capsa"));
}

#[test]
fn crashed_test_host_is_reported() {
    if !enabled() {
        return;
    }
    let (out, _) = run(&[
        "--",
        "sh",
        "-c",
        "echo about-to-crash; echo c >/proc/sysrq-trigger; sleep 100",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        stderr.contains("died while the command ran"),
        "no clear message"
    );
    assert!(stderr.contains("kernel panicked"), "panic not recognised");
    assert!(
        !stderr.contains("retrying"),
        "retried after the command had started"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "about-to-crash\n",
        "output before the crash lost"
    );
}
