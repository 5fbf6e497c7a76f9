//! `capsa run` against a real guest: a busybox rootfs directory and the busybox OCI image archive, stdout
//! and stderr separated, the container's exit code passed on, stdin forwarded, SIGTERM forwarded to the
//! container, and nothing left behind (sandbox dirs in /run/capsa, work dirs, VMM processes).
//! Gated on CAPSA_E2E=1 (the nested test host, or a host with hardware virtualisation).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use capsa_e2e::{busybox_rootfs, e2e_enabled, workspace_root, Inputs};

/// The `capsa` binary built with the test binaries' profile (else the release one).
fn capsa_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    for d in [profile, workspace_root().join("target/release")] {
        if d.join("capsa").exists() {
            return d.join("capsa");
        }
    }
    panic!("capsa not built (cargo build --release -p capsa-runtime)");
}

fn capsa(inputs: &Inputs, tmp: &Path) -> Command {
    let mut c = Command::new(capsa_bin());
    c.env("CAPSA_VMM", &inputs.vmm)
        .env("CAPSA_KERNEL", &inputs.kernel)
        .env("CAPSA_INITRD", &inputs.initrd)
        .env_remove("CAPSA_CONFIG")
        // The work directory (unpacked image, ext4 image) goes here, so the test can check it is gone.
        .env("TMPDIR", tmp);
    c
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Entries of /run/capsa that look like capsa run's sandboxes, capsa-vmm processes, work dirs in `tmp`.
fn leftovers(tmp: &Path) -> Vec<String> {
    let mut left: Vec<String> = std::fs::read_dir("/run/capsa")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("run-"))
                .map(|n| format!("/run/capsa/{n}"))
                .collect()
        })
        .unwrap_or_default();
    if let Ok(d) = std::fs::read_dir(tmp) {
        left.extend(
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("capsa-run-"))
                .map(|n| format!("work dir {n}")),
        );
    }
    if let Ok(d) = std::fs::read_dir("/proc") {
        for e in d.flatten() {
            if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
                let c = String::from_utf8_lossy(&c);
                if c.contains("capsa-vmm") && c.contains("/run/capsa/run-") {
                    left.push(format!("VMM process {}", e.file_name().to_string_lossy()));
                }
            }
        }
    }
    left
}

/// What every test here starts from: the guest inputs, a work dir with `tmp/` (capsa's TMPDIR) and a busybox
/// rootfs directory.
struct Setup {
    inputs: Inputs,
    dir: tempfile::TempDir,
    tmp: PathBuf,
    rootfs: PathBuf,
}

/// `None` when the end-to-end suites are not enabled here.
fn setup(test: &str) -> Option<Setup> {
    if !e2e_enabled(test) {
        return None;
    }
    let inputs = Inputs::from_env();
    inputs.require();
    let dir = tempfile::tempdir().expect("tempdir");
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let rootfs = busybox_rootfs(dir.path());
    Some(Setup {
        inputs,
        dir,
        tmp,
        rootfs,
    })
}

#[test]
fn capsa_run_directory_and_image_archive() {
    let Some(Setup {
        inputs,
        dir,
        tmp,
        rootfs,
    }) = setup("capsa_run_directory_and_image_archive")
    else {
        return;
    };

    // A rootfs directory: stdout, stderr apart, exit code 3.
    let o = capsa(&inputs, &tmp)
        .arg("run")
        .arg(&rootfs)
        .args(["--", "sh", "-c", "echo hi; echo oops >&2; exit 3"])
        .stdin(Stdio::null())
        .output()
        .expect("run capsa");
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi\n", "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("oops"),
        "{}",
        text(&o)
    );
    assert_eq!(leftovers(&tmp), Vec::<String>::new());

    // The OCI image archive: stdin reaches the container, the guest kernel is not the host's.
    let tar = dir.path().join("busybox.tar");
    let st = Command::new("bash")
        .arg(workspace_root().join("tests/e2e/scripts/busybox-oci.sh"))
        .arg(&tar)
        .stdout(Stdio::null())
        .status()
        .expect("busybox-oci.sh");
    assert!(st.success());
    let mut child = capsa(&inputs, &tmp)
        .arg("run")
        .arg("--memory")
        .arg("200")
        .arg(&tar)
        .args([
            "--",
            "sh",
            "-c",
            "uname -r; wc -c; grep MemTotal /proc/meminfo",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn capsa");
    let input = vec![b'x'; 300_000];
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        stdin.write_all(&input).expect("write stdin");
    });
    let o = child.wait_with_output().expect("wait capsa");
    writer.join().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let lines: Vec<&str> = out.lines().collect();
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(lines.len(), 3, "{}", text(&o));
    assert_ne!(lines[0], host_kernel.trim(), "ran in the guest kernel");
    assert_eq!(
        lines[1].trim(),
        "300000",
        "all of stdin arrived: {}",
        text(&o)
    );
    let mem_kb: u64 = lines[2]
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        (100_000..=200 * 1024).contains(&mem_kb),
        "--memory 200 sizes the VM: {}",
        text(&o)
    );
    assert_eq!(leftovers(&tmp), Vec::<String>::new());

    // SIGTERM is forwarded to the container (which exits 5 on it); everything goes away.
    let mut child = capsa(&inputs, &tmp)
        .arg("run")
        .arg(&rootfs)
        .args([
            "--",
            "sh",
            "-c",
            "trap 'echo got-TERM; exit 5' TERM; echo ready; while :; do sleep 1; done",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn capsa");
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 6];
    std::io::Read::read_exact(&mut stdout, &mut first).expect("container's first output");
    assert_eq!(&first, b"ready\n");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let st = child.wait().expect("wait capsa");
    assert_eq!(rest, "got-TERM\n");
    assert_eq!(st.code(), Some(5));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(leftovers(&tmp), Vec::<String>::new());
}

/// Reads `master` until `want` (checked on the whole text so far) holds or 120 s pass; returns the text.
fn read_pty_until(master: &mut std::fs::File, what: &str, want: impl Fn(&str) -> bool) -> String {
    use std::os::fd::AsFd;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&seen).into_owned();
        if want(&text) {
            return text;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(
            !left.is_zero(),
            "no {what} on the terminal within 120 s; got {text:?}"
        );
        let mut fds = [nix::poll::PollFd::new(
            master.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = u16::try_from(left.as_millis().min(1000)).unwrap_or(1000);
        if nix::poll::poll(&mut fds, ms).unwrap_or(0) == 0 {
            continue;
        }
        match std::io::Read::read(master, &mut buf) {
            Ok(0) | Err(_) => panic!("terminal closed before {what}; got {text:?}"),
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// `capsa run -t` on a real pseudo-terminal: the container sees the terminal's size, a resize of the host
/// terminal (SIGWINCH) reaches it, no stray bytes appear, and the exit code comes back.
#[test]
fn capsa_run_tty_follows_the_terminal_size() {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::process::CommandExt as _;
    let Some(Setup {
        inputs,
        dir: _dir,
        tmp,
        rootfs,
    }) = setup("capsa_run_tty_follows_the_terminal_size")
    else {
        return;
    };

    let size = |rows, cols| nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size(24, 80)), None).expect("openpty");
    let slave: OwnedFd = pty.slave;
    let slave_fd = slave.as_raw_fd();
    let mut cmd = capsa(&inputs, &tmp);
    cmd.arg("run")
        .arg("-t")
        .arg(&rootfs)
        .args([
            "--",
            "sh",
            "-c",
            "echo size:$(stty size); while [ \"$(stty size)\" = '24 80' ]; do sleep 0.2; done; \
             echo size:$(stty size); exit 4",
        ])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap());
    // SAFETY: setsid and TIOCSCTTY in the child between fork and exec, on a descriptor it inherited.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::ioctl(slave_fd, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn capsa -t");
    drop(slave);
    let mut master = std::fs::File::from(pty.master);
    read_pty_until(&mut master, "the first size", |t| t.contains("size:24 80"));
    // Resizing the terminal sends SIGWINCH to capsa (the terminal's foreground process group).
    // SAFETY: TIOCSWINSZ reads one valid winsize.
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size(33, 77)) };
    assert_eq!(r, 0, "TIOCSWINSZ");
    let text = read_pty_until(&mut master, "the new size", |t| t.contains("size:33 77"));
    let st = child.wait().expect("wait capsa");
    assert_eq!(st.code(), Some(4), "{text:?}");
    assert!(
        !text.contains('\0'),
        "stray NUL bytes on the terminal: {text:?}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(leftovers(&tmp), Vec::<String>::new());
}
