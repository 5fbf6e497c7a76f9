use std::sync::Arc;

use super::allowlists::allowlist;
use super::*;

#[test]
fn every_filter_builds_in_on_and_log_modes_and_off_builds_none() {
    for mode in [SeccompMode::On, SeccompMode::Log] {
        let filters = Filters::build(mode).unwrap().expect("filters");
        assert_eq!(filters.mode(), mode);
        for kind in ThreadKind::ALL {
            let programs = filters.programs(kind);
            assert!(!programs.is_empty(), "{kind:?}");
            // The kernel takes at most 4096 instructions per program.
            for p in programs {
                assert!(!p.is_empty() && p.len() < 4096, "{kind:?}: {}", p.len());
            }
        }
        assert_eq!(filters.programs(ThreadKind::Launcher).len(), 2);
    }
    assert!(Filters::build(SeccompMode::Off).unwrap().is_none());
}

#[test]
fn the_launcher_allows_everything_a_worker_does() {
    let pid = std::process::id();
    let launcher = allowlist(ThreadKind::Launcher, pid).unwrap();
    for worker in ThreadKind::WORKERS {
        let w = allowlist(worker, pid).unwrap();
        for nr in 0..512 {
            if w.contains(nr) {
                assert!(launcher.contains(nr), "{worker:?}: syscall {nr}");
            }
            if w.allows_any_args(nr) {
                assert!(launcher.allows_any_args(nr), "{worker:?}: syscall {nr}");
            }
        }
    }
}

#[test]
fn what_no_thread_may_do() {
    let pid = std::process::id();
    for kind in ThreadKind::ALL {
        let a = allowlist(kind, pid).unwrap();
        for nr in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_openat2,
            libc::SYS_ptrace,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_mount,
            libc::SYS_setuid,
        ] {
            assert!(!a.contains(nr), "{kind:?} allows syscall {nr}");
        }
        // Sockets only in the vsock worker (Unix ones) and the launcher that starts it.
        let sockets = matches!(kind, ThreadKind::Vsock | ThreadKind::Launcher);
        assert_eq!(a.contains(libc::SYS_socket), sockets, "{kind:?}");
        assert!(!a.allows_any_args(libc::SYS_socket), "{kind:?}");
        assert!(!a.allows_any_args(libc::SYS_ioctl), "{kind:?}");
        assert!(!a.allows_any_args(libc::SYS_mmap), "{kind:?}");
        assert!(!a.allows_any_args(libc::SYS_mprotect), "{kind:?}");
        assert_eq!(
            a.contains(libc::SYS_clone),
            kind == ThreadKind::Launcher,
            "{kind:?}"
        );
    }
}

/// Forks; the child installs `kind`'s filter and runs `probe`, then exits 0. Returns the child's wait status.
fn in_filtered_child(mode: SeccompMode, kind: ThreadKind, probe: fn()) -> libc::c_int {
    // Built before the fork: the child only installs them (no allocation after fork in a threaded process).
    let filters = Filters::build(mode).unwrap().expect("filters");
    // SAFETY: the child calls only async-signal-safe functions (prctl/seccomp through apply, the probe's raw
    // syscalls, _exit) and never returns into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = match filters.apply(kind) {
            Ok(()) => {
                probe();
                0
            }
            Err(_) => 99,
        };
        // SAFETY: _exit ends the child without running the parent's destructors or atexit handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid);
    status
}

fn open_inet_socket() {
    // SAFETY: a plain syscall; the fd (if any) is leaked by a process that exits right after.
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
}

fn exec_true() {
    let argv: [*const libc::c_char; 2] = [c"/bin/true".as_ptr(), std::ptr::null()];
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: NUL-terminated argv/envp arrays of C strings that outlive the call.
    unsafe { libc::execve(argv[0], argv.as_ptr(), envp.as_ptr()) };
}

fn allowed_calls() {
    // SAFETY: plain syscalls on this process's own state.
    unsafe {
        libc::getpid();
        libc::write(2, b"".as_ptr().cast(), 0);
        libc::syscall(
            libc::SYS_futex,
            std::ptr::null::<u32>(),
            libc::FUTEX_WAKE,
            0,
        );
    }
}

fn killed_by_sigsys(status: libc::c_int) -> bool {
    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
}

#[test]
fn a_forbidden_syscall_kills_the_process_with_sigsys() {
    for (kind, probe) in [
        (ThreadKind::Vcpu, open_inet_socket as fn()),
        (ThreadKind::Vcpu, exec_true),
        (ThreadKind::Blk, open_inet_socket),
        (ThreadKind::Vsock, open_inet_socket),
        (ThreadKind::Main, exec_true),
    ] {
        let status = in_filtered_child(SeccompMode::On, kind, probe);
        assert!(killed_by_sigsys(status), "{kind:?}: status {status:#x}");
    }
}

#[test]
fn allowed_syscalls_pass_and_log_mode_only_logs() {
    let status = in_filtered_child(SeccompMode::On, ThreadKind::Vcpu, allowed_calls);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{status:#x}"
    );
    let status = in_filtered_child(SeccompMode::Log, ThreadKind::Vcpu, open_inet_socket);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{status:#x}"
    );
}

#[test]
fn a_worker_started_from_a_filtered_thread_gets_its_own_filter() {
    let policy: Arc<Policy> = Policy::start(SeccompMode::On).unwrap().expect("policy");
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    // A stand-in vCPU thread: filtered as one, it starts a worker (through the launcher) and joins it.
    let vcpu = std::thread::spawn(move || {
        policy.enter(ThreadKind::Vcpu).unwrap();
        let worker = spawn_filtered("test-rng", ThreadKind::Rng, move || {
            // SAFETY: gettid has no arguments and cannot fail.
            let tid = unsafe { libc::gettid() };
            let _ = tid_tx.send(tid);
            let _ = done_rx.recv();
            7
        })
        .unwrap();
        worker.join().unwrap()
    });
    let tid = tid_rx.recv().unwrap();
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    assert!(status.contains("Seccomp:\t2\n"), "{status}");
    // The launcher's two (inherited: clone3 → ENOSYS and the launcher's allowlist) and its own; not the
    // vCPU's.
    assert!(status.contains("Seccomp_filters:\t3\n"), "{status}");
    done_tx.send(()).unwrap();
    assert_eq!(vcpu.join().unwrap(), 7);
    // Without a policy on the calling thread it is a plain thread.
    let plain = spawn_filtered("test-plain", ThreadKind::Rng, || 8).unwrap();
    assert_eq!(plain.join().unwrap(), 8);
}

/// The rng and blk workers do real requests under their filters, started (through the launcher) from a
/// stand-in vCPU thread that also resets the devices: a missing syscall kills this test process (SIGSYS).
#[test]
fn rng_and_blk_workers_serve_under_their_filters() {
    use std::time::Duration;

    use crate::devices::virtio::block::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use crate::devices::virtio::rng::Rng;
    use crate::devices::virtio::test_utils::*;
    use crate::devices::virtio::{Block, VirtioDevice, VirtioInterrupt};

    const T: Duration = Duration::from_secs(5);
    // Opened at setup, as the VMM opens them before any filter.
    let img = tempfile::NamedTempFile::new().unwrap();
    img.as_file().set_len(1 << 20).unwrap();
    let mut blk = Block::new(img.path(), false).unwrap();
    let mut rng = Rng::new().unwrap();
    let irq = Arc::new(VirtioInterrupt::new().unwrap());
    let policy = Policy::start(SeccompMode::On).unwrap().expect("policy");

    let vcpu = std::thread::spawn(move || {
        policy.enter(ThreadKind::Vcpu).unwrap();
        let mem = test_mem();
        let mut b = Bump::new();

        let mut q = TestQueue::new(&mem, 0, 256);
        rng.activate(mem.clone(), irq.clone(), vec![q.device_side()])
            .unwrap();
        let a = b.alloc(64);
        let head = q.add(&[(a, 64, true)]);
        assert_eq!(q.wait_used(T), Some((u32::from(head), 64)));
        assert!(rng.reset());

        let mut q = TestQueue::new(&mem, 0x8000, 256);
        blk.activate(mem.clone(), irq.clone(), vec![q.device_side()])
            .unwrap();
        let request =
            |b: &mut Bump, q: &mut TestQueue<'_>, kind: u32, data: Option<(u64, bool)>| {
                let h = b.alloc(16);
                write_bytes(&mem, h, &kind.to_le_bytes());
                write_bytes(&mem, h + 8, &1u64.to_le_bytes());
                let st = b.alloc(1);
                write_bytes(&mem, st, &[0xff]);
                let mut descs = vec![(h, 16, false)];
                if let Some((addr, writable)) = data {
                    descs.push((addr, 512, writable));
                }
                descs.push((st, 1, true));
                q.add(&descs);
                q.wait_used(T).expect("request answered");
                read_bytes(&mem, st, 1)[0]
            };
        let out = b.alloc(512);
        write_bytes(&mem, out, &[0x5a; 512]);
        assert_eq!(
            request(&mut b, &mut q, VIRTIO_BLK_T_OUT, Some((out, false))),
            0
        );
        assert_eq!(request(&mut b, &mut q, VIRTIO_BLK_T_FLUSH, None), 0);
        let back = b.alloc(512);
        assert_eq!(
            request(&mut b, &mut q, VIRTIO_BLK_T_IN, Some((back, true))),
            0
        );
        assert_eq!(read_bytes(&mem, back, 512), vec![0x5a; 512]);
        assert!(blk.reset());
        // Dropping the devices (close) happens on the vCPU thread too.
        drop((blk, rng));
    });
    vcpu.join().expect("vCPU stand-in");
    let data = std::fs::read(img.path()).unwrap();
    assert_eq!(&data[512..1024], &[0x5a; 512][..]);
}

/// The vsock worker moves data both ways under its filter (started, as in the VMM, from a filtered stand-in
/// vCPU thread): a host-initiated and a guest-initiated connection, payload split over descriptors. A
/// syscall its allowlist lacks kills this test process (SIGSYS).
#[test]
fn vsock_worker_serves_under_its_filter() {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::Duration;

    use crate::devices::virtio::test_utils::*;
    use crate::devices::virtio::vsock::Vsock;
    use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};

    const T: Duration = Duration::from_secs(5);
    const CID: u64 = 3;
    // struct virtio_vsock_hdr: src_cid, dst_cid, src_port, dst_port, len, type, op, flags, buf_alloc,
    // fwd_cnt (little endian, packed).
    fn hdr(src_port: u32, dst_port: u32, len: u32, op: u16) -> Vec<u8> {
        let mut b = Vec::with_capacity(44);
        b.extend(CID.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(src_port.to_le_bytes());
        b.extend(dst_port.to_le_bytes());
        b.extend(len.to_le_bytes());
        b.extend(1u16.to_le_bytes());
        b.extend(op.to_le_bytes());
        b.extend(0u32.to_le_bytes());
        b.extend((1u32 << 20).to_le_bytes());
        b.extend(0u32.to_le_bytes());
        b
    }
    let field = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let (op_request, op_response, op_rw) = (1u16, 2u16, 5u16);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    // Bound at setup, before any filter, as the VMM does.
    let mut dev = Vsock::new(CID, &path).unwrap();
    let host_port = UnixListener::bind(format!("{}_5000", path.display())).unwrap();
    let mem = test_mem();
    let mut b = Bump::new();
    let mut rx = TestQueue::new(&mem, 0, 256);
    let mut tx = TestQueue::new(&mem, 0x1_0000, 256);
    let ev = TestQueue::new(&mem, 0x2_0000, 256);
    let irq = Arc::new(VirtioInterrupt::new().unwrap());
    let policy = Policy::start(SeccompMode::On).unwrap().expect("policy");
    let queues = vec![rx.device_side(), tx.device_side(), ev.device_side()];
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let vcpu = {
        let (mem, irq) = (mem.clone(), irq.clone());
        std::thread::spawn(move || {
            policy.enter(ThreadKind::Vcpu).unwrap();
            dev.activate(mem, irq, queues).unwrap();
            done_rx.recv().unwrap();
            assert!(dev.reset());
            // Dropped (socket file removed) on the unfiltered test thread, as the VMM's main thread does.
            dev
        })
    };
    let send = |tx: &mut TestQueue, b: &mut Bump, pkt: &[u8], split: usize| {
        let a = b.alloc(pkt.len() as u64);
        write_bytes(&mem, a, pkt);
        let (x, y) = pkt.split_at(split);
        tx.add(&[
            (a, x.len() as u32, false),
            (a + x.len() as u64, y.len() as u32, false),
        ]);
        tx.wait_used(T).expect("tx used");
    };
    let rx_bufs: Vec<u64> = (0..4)
        .map(|_| {
            let a = b.alloc(4096);
            rx.add(&[(a, 4096, true)]);
            a
        })
        .collect();
    let mut next_rx = 0usize;
    let mut recv = |rx: &mut TestQueue| {
        let (_, len) = rx.wait_used(T).expect("rx used");
        let a = rx_bufs[next_rx % rx_bufs.len()];
        next_rx += 1;
        let got = read_bytes(&mem, a, len as usize);
        rx.add(&[(a, 4096, true)]);
        got
    };

    // Guest → host port 5000 (socket, connect, sendmsg), and back (recvmsg).
    send(&mut tx, &mut b, &hdr(7000, 5000, 0, op_request), 44);
    let (mut s, _) = host_port.accept().unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    assert_eq!(field(&recv(&mut rx), 28) >> 16, u32::from(op_response));
    let mut pkt = hdr(7000, 5000, 11, op_rw);
    pkt.extend(b"hello, host");
    send(&mut tx, &mut b, &pkt, 50);
    let mut got = [0u8; 11];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello, host");
    s.write_all(b"hi guest").unwrap();
    let p = recv(&mut rx);
    assert_eq!(
        (field(&p, 28) >> 16, &p[44..]),
        (u32::from(op_rw), &b"hi guest"[..])
    );

    // Host → guest port 1024 (accept4, the CONNECT line, the OK line).
    let mut h = UnixStream::connect(&path).unwrap();
    h.write_all(b"CONNECT 1024\n").unwrap();
    let req = recv(&mut rx);
    assert_eq!(field(&req, 28) >> 16, u32::from(op_request));
    let local = field(&req, 16);
    send(&mut tx, &mut b, &hdr(1024, local, 0, op_response), 44);
    let mut line = [0u8; 3];
    h.set_read_timeout(Some(T)).unwrap();
    h.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"OK ");

    done_tx.send(()).unwrap();
    drop(vcpu.join().expect("vCPU stand-in"));
}
