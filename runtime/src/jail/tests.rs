use super::*;

const UIDS: UidRange = UidRange {
    base: 1_900_100_000,
    count: 100,
};

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

struct Fixture {
    dir: tempfile::TempDir,
    run_root: PathBuf,
    sandbox_dir: PathBuf,
    kernel: PathBuf,
    disk: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let run_root = dir.path().join("run");
    let sandbox_dir = run_root.join("sb");
    std::fs::create_dir_all(sandbox_dir.join("shared")).unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, b"kernel").unwrap();
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644)).unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    Fixture {
        dir,
        run_root,
        sandbox_dir,
        kernel,
        disk,
    }
}

fn request<'a>(f: &'a Fixture, binary: &'a Path) -> JailRequest<'a> {
    JailRequest {
        run_root: &f.run_root,
        sandbox_id: "sb",
        binary,
        files: vec![
            JailFile {
                host: f.kernel.clone(),
                jail: PathBuf::from("/boot/kernel"),
                writable: false,
            },
            JailFile {
                host: f.disk.clone(),
                jail: PathBuf::from("/disks/0"),
                writable: true,
            },
        ],
        sandbox_dir: &f.sandbox_dir,
        masked: vec![f.sandbox_dir.join("shared")],
        devices: vec![
            PathBuf::from("/dev/urandom"),
            PathBuf::from("/dev/nonexistent"),
        ],
        max_threads: 40,
        // Larger than CONSOLE_LOG_MAX: the memfd of a 512 MiB guest must fit under RLIMIT_FSIZE.
        guest_memory_bytes: GUEST_MEMORY,
    }
}

const GUEST_MEMORY: u64 = 512 << 20;

#[test]
fn prepare_lays_out_the_root_rewrites_paths_and_cleans_up() {
    if !is_root() {
        eprintln!("skipped: needs root (chown)");
        return;
    }
    let f = fixture();
    let sleep = Path::new("/bin/sleep");
    let jail = Jail::prepare(&request(&f, sleep), UIDS).unwrap();
    assert!(UIDS.contains(jail.uid()));
    let root = root_dir(&f.run_root, "sb");
    assert_eq!(jail.root(), root);
    assert_eq!(jail.program(), Path::new("/sleep"));
    assert_eq!(jail.jail_path(&f.kernel), Path::new("/boot/kernel"));
    assert_eq!(jail.jail_path(&f.disk), Path::new("/disks/0"));
    // Sockets and the console log keep their host paths.
    let sock = f.sandbox_dir.join("vsock.sock");
    assert_eq!(jail.jail_path(&sock), sock);
    // Bind targets exist; nothing else of the host is there.
    assert!(root.join("sleep").is_file());
    assert!(root.join("boot/kernel").is_file());
    assert!(root.join("disks/0").is_file());
    assert!(root.join("dev").is_dir());
    assert!(under(&root, &f.sandbox_dir).is_dir());
    assert!(!root.join("etc").exists() && !root.join("proc").exists());
    // The writable disk belongs to the jail uid while the jail lives; the sandbox dir is the jail gid's.
    assert_eq!(std::fs::metadata(&f.disk).unwrap().uid(), jail.uid());
    let sd = std::fs::metadata(&f.sandbox_dir).unwrap();
    assert_eq!(
        (sd.uid(), sd.gid(), sd.mode() & 0o7777),
        (0, jail.gid(), 0o1770)
    );
    let lock = lock_dir(&f.run_root).join(jail.uid().to_string());
    assert!(lock.exists());
    drop(jail);
    assert!(!root.exists(), "jail root left behind");
    assert!(!lock.exists(), "uid lock left behind");
    assert!(
        !jail_dir(&f.run_root).exists(),
        "empty .jail directories left behind"
    );
    assert_eq!(
        std::fs::metadata(&f.disk).unwrap().uid(),
        0,
        "disk not given back"
    );
    drop(f.dir);
}

#[test]
fn errors_name_the_path() {
    if !is_root() {
        eprintln!("skipped: needs root (chown)");
        return;
    }
    let f = fixture();
    // A kernel other users cannot read.
    std::fs::set_permissions(&f.kernel, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = Jail::prepare(&request(&f, Path::new("/bin/sleep")), UIDS).unwrap_err();
    assert!(matches!(e, JailError::NotAccessible { .. }), "{e}");
    assert!(
        e.to_string().contains(&f.kernel.display().to_string()),
        "{e}"
    );
    // Nothing left: no root, no lock, the disk still root's.
    assert!(!root_dir(&f.run_root, "sb").exists());
    assert!(!lock_dir(&f.run_root).exists());
    assert_eq!(std::fs::metadata(&f.disk).unwrap().uid(), 0);
    // A missing kernel.
    std::fs::remove_file(&f.kernel).unwrap();
    let e = Jail::prepare(&request(&f, Path::new("/bin/sleep")), UIDS).unwrap_err();
    assert!(
        e.to_string().contains(&f.kernel.display().to_string()),
        "{e}"
    );
    // A VMM that is not an ELF binary.
    std::fs::write(&f.kernel, b"k").unwrap();
    std::fs::set_permissions(&f.kernel, std::fs::Permissions::from_mode(0o644)).unwrap();
    let script = f.dir.path().join("vmm.sh");
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let e = Jail::prepare(&request(&f, &script), UIDS).unwrap_err();
    assert!(e.to_string().contains(&script.display().to_string()), "{e}");
}

#[test]
fn stale_leftovers_of_a_dead_shim_are_cleaned() {
    let d = tempfile::tempdir().unwrap();
    let root = root_dir(d.path(), "dead");
    std::fs::create_dir_all(root.join("boot")).unwrap();
    std::fs::write(root.join("boot/kernel"), b"").unwrap();
    std::fs::create_dir_all(lock_dir(d.path())).unwrap();
    let lock = lock_dir(d.path()).join("1900000007");
    std::fs::write(&lock, "dead 12345\n").unwrap();
    let other = lock_dir(d.path()).join("1900000008");
    std::fs::write(&other, "alive 1\n").unwrap();
    let done = cleanup_sandbox(d.path(), "dead");
    assert_eq!(done.len(), 2, "{done:?}");
    assert!(!root.exists() && !lock.exists());
    assert!(other.exists(), "another sandbox's lock was removed");
    std::fs::remove_file(&other).unwrap();
    cleanup_sandbox(d.path(), "alive");
    assert!(
        !jail_dir(d.path()).exists(),
        "empty .jail directories left behind"
    );
}

fn status_field(pid: u32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

/// The real thing, with `/bin/sleep` standing in for the VMM: its own uid, no capabilities, no new
/// privileges, its own root holding only what was asked for, rlimits set.
#[test]
fn a_jailed_process_is_confined() {
    if !is_root() || std::fs::metadata("/proc/self/ns/mnt").is_err() {
        eprintln!("skipped: needs root");
        return;
    }
    let f = fixture();
    let sleep = Path::new("/bin/sleep");
    let mut jail = Jail::prepare(&request(&f, sleep), UIDS).unwrap();
    let mut cmd = std::process::Command::new(jail.program());
    cmd.arg("30");
    let enter = jail.pre_exec();
    use std::os::unix::process::CommandExt;
    // SAFETY: the jail's closure is async-signal-safe (see Jail::pre_exec).
    unsafe { cmd.pre_exec(enter) };
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => panic!("{}", jail.spawn_error(e)),
    };
    jail.spawned();
    let pid = child.id();
    // Wait for the exec (the comm changes to sleep).
    for _ in 0..200 {
        if std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
            == "sleep"
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let uid = jail.uid().to_string();
    assert_eq!(
        status_field(pid, "Uid:")
            .split_whitespace()
            .collect::<Vec<_>>(),
        [uid.as_str(); 4]
    );
    assert_eq!(
        status_field(pid, "Gid:")
            .split_whitespace()
            .collect::<Vec<_>>(),
        [uid.as_str(); 4]
    );
    assert_eq!(status_field(pid, "Groups:"), "");
    for key in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(status_field(pid, key), "0000000000000000", "{key}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    // Its root is the jail root, not the host's, in a mount and IPC namespace of its own.
    // (readlink shows "/" for a root in another mount namespace: compare the directories themselves.)
    let theirs = std::fs::metadata(format!("/proc/{pid}/root/")).unwrap();
    let ours = std::fs::metadata("/").unwrap();
    assert_ne!((theirs.dev(), theirs.ino()), (ours.dev(), ours.ino()));
    let jail_root = std::fs::metadata(jail.root()).unwrap();
    assert_eq!(
        (theirs.dev(), theirs.ino()),
        (jail_root.dev(), jail_root.ino())
    );
    for ns in ["mnt", "ipc", "net", "uts"] {
        assert_ne!(
            std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap(),
            std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap(),
            "{ns}"
        );
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    assert!(limit("Max open files").contains("4096 4096"), "{limits}");
    assert!(limit("Max processes").contains("40 40"), "{limits}");
    assert!(limit("Max core file size").contains("0 0"), "{limits}");
    // The guest memory's memfd (512 MiB, more than CONSOLE_LOG_MAX) is the largest file the VMM sizes here.
    const { assert!(GUEST_MEMORY > CONSOLE_LOG_MAX) };
    assert!(
        limit("Max file size").contains(&format!("{GUEST_MEMORY} {GUEST_MEMORY}")),
        "{limits}"
    );
    // What it sees under its root: only what was asked for.
    let seen = |p: &str| std::fs::metadata(format!("/proc/{pid}/root{p}"));
    assert!(seen("/boot/kernel").is_ok());
    assert_eq!(
        std::fs::read(format!("/proc/{pid}/root/boot/kernel")).unwrap(),
        b"kernel"
    );
    assert!(seen("/dev/urandom").is_ok());
    assert_eq!(seen("/dev/urandom").unwrap().uid(), jail.uid());
    assert!(seen("/dev/nonexistent").is_err());
    assert!(seen("/etc/passwd").is_err() && seen("/proc/1").is_err());
    let shared = format!("{}/shared", f.sandbox_dir.display());
    std::fs::write(f.sandbox_dir.join("shared/secret"), b"x").unwrap();
    assert!(
        seen(&format!("{shared}/secret")).is_err(),
        "shared dir not masked"
    );
    // A file the runtime creates in the sandbox directory afterwards is visible in the jail.
    std::fs::write(f.sandbox_dir.join("later"), b"y").unwrap();
    assert!(seen(&format!("{}/later", f.sandbox_dir.display())).is_ok());
    // No mount of the jail leaked into ours.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&jail.root().display().to_string()),
        "{mounts}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let root = jail.root().to_path_buf();
    drop(jail);
    assert!(!root.exists());
}

#[test]
fn a_failed_setup_step_is_named() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let f = fixture();
    let mut jail = Jail::prepare(&request(&f, Path::new("/bin/sleep")), UIDS).unwrap();
    // Break a bind source after preparing: the child's mount of it fails.
    std::fs::remove_file(&f.kernel).unwrap();
    let mut cmd = std::process::Command::new(jail.program());
    let enter = jail.pre_exec();
    use std::os::unix::process::CommandExt;
    // SAFETY: the jail's closure is async-signal-safe (see Jail::pre_exec).
    unsafe { cmd.pre_exec(enter) };
    let e = cmd.spawn().map(drop).unwrap_err();
    let e = jail.spawn_error(e);
    assert!(
        e.to_string()
            .contains(&format!("mount --bind {}", f.kernel.display())),
        "{e}"
    );
}
