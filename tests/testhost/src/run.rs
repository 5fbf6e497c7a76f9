//! `capsa-testhost run`: boots the test host under QEMU TCG, runs one command inside it and returns its status.
//!
//! Host <-> test host plumbing (all under a private temporary directory, removed at the end):
//! - `job/` is shared over virtio-9p (tag `capsajob`): `job.sh` (cd, env, exec of the command), `shares`
//!   (the 9p tags and host paths the test host mounts at the same paths) and `nonce`.
//! - three virtio-serial ports, each connected to a Unix socket this runner listens on: `capsa.out` and
//!   `capsa.err` carry the command's stdout and stderr, each ended by the nonce; `capsa.ctl` carries
//!   `started` and `exit <status>`.
//! - the test host's serial console (kernel log) goes to `console.log`, QEMU's own messages to `qemu.log`;
//!   both are shown only when something goes wrong.

use std::ffi::OsString;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::Pid;

use crate::image;

pub const EXIT_TIMEOUT: i32 = 124;
pub const EXIT_TESTHOST_FAILED: i32 = 125;

const TEMP_PREFIX: &str = "capsa-testhost.";
/// Kernel command line of the test host. `norandmaps`: without address-space randomisation TCG reuses the
/// translated code of shared libraries across processes (300 execs of /bin/true: 22 s -> 3.7 s measured);
/// `mitigations=off`: the CPU is emulated anyway (~10% on a shell loop). Extra: `CAPSA_TESTHOST_APPEND`.
const CMDLINE: &str =
    "console=ttyS0 panic=-1 quiet loglevel=4 random.trust_cpu=on mitigations=off norandmaps";
/// Host variables forwarded into the test host besides `CAPSA_*`.
const FORWARDED: [&str; 2] = ["RUST_LOG", "RUST_BACKTRACE"];

#[derive(clap::Args)]
pub struct RunArgs {
    /// Stop the command after it ran this many seconds and exit with 124.
    #[arg(long, default_value_t = 3600, value_name = "SECS")]
    timeout: u64,
    /// Give up (exit 124) when the test host has not started the command after this many seconds.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    boot_timeout: u64,
    /// Memory of the test host (enough for several microVMs inside it).
    #[arg(long, default_value_t = 4096, value_name = "MIB")]
    memory: u64,
    /// vCPUs of the test host [default: the host's CPU count].
    #[arg(long, value_name = "N")]
    cpus: Option<usize>,
    /// Set K=V in the command's environment (CAPSA_*, RUST_LOG and RUST_BACKTRACE are forwarded anyway).
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Also make DIR visible inside at the same path [always: the git top-level dir of the current
    /// directory and the cargo target dir].
    #[arg(long = "share", value_name = "DIR")]
    share: Vec<PathBuf>,
    /// Use this image directory instead of the cached one (see `build-image`).
    #[arg(long, value_name = "DIR")]
    image: Option<PathBuf>,
    /// Also write the test host's console (kernel log) to FILE.
    #[arg(long, value_name = "FILE")]
    console_log: Option<PathBuf>,
    /// Print no progress or timing lines (errors are still printed).
    #[arg(long, short)]
    quiet: bool,
    /// The command and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<OsString>,
}

static SIGNALLED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNALLED.store(sig, Ordering::SeqCst);
}

fn install_signal_handlers() -> Result<()> {
    // No SA_RESTART: poll() returns EINTR and the main loop notices at once.
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores into an atomic.
        unsafe { sigaction(sig, &action) }
            .with_context(|| format!("installing a {sig} handler"))?;
    }
    Ok(())
}

/// Everything one boot needs, computed once.
struct Plan {
    image: PathBuf,
    shares: Vec<Share>,
    job_script: String,
    cpus: usize,
    memory: u64,
    qemu: OsString,
    quiet: bool,
    console_log: Option<PathBuf>,
}

enum Outcome {
    /// The command ran and exited with this status.
    Exited(i32),
    /// The command ran out of time (true), or the boot did (false).
    Timeout(bool),
    Signalled(i32),
    /// The test host died (QEMU exited) without reporting a status.
    Died {
        started: bool,
    },
    /// The test host stopped sending its heartbeat while the command ran (stopped by the runner).
    Hung,
}

pub fn run(args: RunArgs) -> Result<i32> {
    install_signal_handlers()?;
    remove_stale_temp_dirs();
    let shares = shares(&args.share)?;
    let cwd = std::env::current_dir()?.canonicalize()?;
    if !shares
        .iter()
        .any(|s| !s.readonly && cwd.starts_with(&s.path))
    {
        bail!(
            "the current directory {} is not inside a shared directory ({}); add --share",
            cwd.display(),
            shares
                .iter()
                .map(|s| s.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let env = environment(&args.env)?;
    let command = args
        .command
        .iter()
        .map(|a| {
            a.to_str()
                .map(str::to_owned)
                .with_context(|| format!("argument {a:?} is not UTF-8"))
        })
        .collect::<Result<Vec<_>>>()?;
    let image = match &args.image {
        Some(dir) => {
            image::check_image(dir)?;
            dir.clone()
        }
        None => {
            let image = image::ensure_image();
            let sig = SIGNALLED.load(Ordering::SeqCst);
            if sig != 0 {
                eprintln!("capsa-testhost: interrupted by signal {sig}");
                return Ok(128 + sig);
            }
            image?
        }
    };
    let plan = Plan {
        image,
        shares,
        job_script: job_script(&cwd, &env, &command)?,
        cpus: args
            .cpus
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
            .max(1),
        memory: args.memory.max(512),
        qemu: std::env::var_os("CAPSA_TESTHOST_QEMU")
            .unwrap_or_else(|| "qemu-system-x86_64".into()),
        quiet: args.quiet,
        console_log: args.console_log.clone(),
    };
    let limits = (
        Duration::from_secs(args.boot_timeout),
        Duration::from_secs(args.timeout),
    );
    for attempt in 1..=2 {
        match boot_and_run(&plan, limits)? {
            Outcome::Exited(code) => return Ok(code),
            Outcome::Timeout(true) => {
                eprintln!(
                    "capsa-testhost: timeout: the command did not finish within {} s; stopped the test host",
                    args.timeout
                );
                return Ok(EXIT_TIMEOUT);
            }
            Outcome::Timeout(false) => {
                eprintln!(
                    "capsa-testhost: timeout: the test host did not start the command within {} s; stopped it",
                    args.boot_timeout
                );
                return Ok(EXIT_TIMEOUT);
            }
            Outcome::Signalled(sig) => {
                eprintln!("capsa-testhost: interrupted by signal {sig}; stopped the test host");
                return Ok(128 + sig);
            }
            Outcome::Died { started: false } if attempt == 1 => {
                eprintln!(
                    "capsa-testhost: the test host died before the command started; retrying once"
                );
            }
            Outcome::Died { .. } => return Ok(EXIT_TESTHOST_FAILED),
            Outcome::Hung => {
                eprintln!(
                    "capsa-testhost: the test host sent no heartbeat for {} s (hung); stopped it",
                    HEARTBEAT_LIMIT.as_secs()
                );
                return Ok(EXIT_TESTHOST_FAILED);
            }
        }
    }
    Ok(EXIT_TESTHOST_FAILED)
}

/// A host directory the test host mounts at the same path.
#[derive(Debug, Clone, PartialEq)]
struct Share {
    path: PathBuf,
    readonly: bool,
}

/// The directories shared with the test host, canonical, none inside another: the workspace root, the cargo
/// target dir, `--share` dirs and (read-only) the capsa cache, where cached build inputs live.
fn shares(extra: &[PathBuf]) -> Result<Vec<Share>> {
    let root = crate::workspace_root()?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let cache = std::env::var_os("CAPSA_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/capsa"), PathBuf::from);
    // (path, read-only, must exist)
    let mut wanted = vec![
        (root, false, true),
        (target, false, false),
        (cache, true, false),
    ];
    wanted.extend(extra.iter().map(|p| (p.clone(), false, true)));
    let mut all = Vec::new();
    for (p, readonly, required) in wanted {
        match p.canonicalize() {
            Ok(path) => all.push(Share { path, readonly }),
            Err(e) if required => bail!("cannot share {}: {e}", p.display()),
            Err(_) => {}
        }
    }
    // Outer directories first; a read-write share wins over a read-only one of the same path.
    all.sort_by_key(|s| (s.path.as_os_str().len(), s.readonly));
    let mut out: Vec<Share> = Vec::new();
    for s in all {
        let text = s
            .path
            .to_str()
            .with_context(|| format!("{} is not UTF-8", s.path.display()))?;
        if s.path == Path::new("/") || text.contains('\n') {
            bail!("refusing to share {text:?}");
        }
        if !out.iter().any(|o| s.path.starts_with(&o.path)) {
            out.push(s);
        }
    }
    Ok(out)
}

fn valid_name(k: &str) -> bool {
    let mut chars = k.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The command's environment: forwarded host variables, then `--env` (which wins).
fn environment(explicit: &[String]) -> Result<Vec<(String, String)>> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: String, v: String| {
        env.retain(|(ek, _)| *ek != k);
        env.push((k, v));
    };
    for (k, v) in std::env::vars_os() {
        let (Some(k), Some(v)) = (k.to_str(), v.to_str()) else {
            continue;
        };
        if (k.starts_with("CAPSA_") || FORWARDED.contains(&k)) && valid_name(k) {
            set(k.to_string(), v.to_string());
        }
    }
    for kv in explicit {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--env {kv:?}: expected K=V")
        };
        if !valid_name(k) {
            bail!("--env {kv:?}: {k:?} is not a valid variable name");
        }
        set(k.to_string(), v.to_string());
    }
    Ok(env)
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn job_script(cwd: &Path, env: &[(String, String)], command: &[String]) -> Result<String> {
    let cwd = cwd.to_str().context("the current directory is not UTF-8")?;
    let mut s = String::from("# written by capsa-testhost run\n");
    s += &format!("cd -- {} || exit 125\n", quote(cwd));
    s += "export CAPSA_TESTHOST=1\n";
    for (k, v) in env {
        s += &format!("export {k}={}\n", quote(v));
    }
    s += "exec";
    for a in command {
        s += " ";
        s += &quote(a);
    }
    s += "\n";
    Ok(s)
}

/// Removes temporary directories of runners that are gone (e.g. killed with SIGKILL).
fn remove_stale_temp_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with(TEMP_PREFIX) {
            continue;
        }
        let Ok(pid) = fs::read_to_string(e.path().join("runner.pid")) else {
            continue;
        };
        let Ok(pid) = pid.trim().parse::<i32>() else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

fn nonce() -> Result<String> {
    let mut b = [0u8; 16];
    fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(format!(
        "CAPSA-END-{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    ))
}

/// QEMU in its own process group; the group is killed when this is dropped.
struct Qemu {
    child: Child,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let pgid = Pid::from_raw(self.child.id() as i32);
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

enum Kind {
    Out,
    Err,
    Ctl,
}

/// One virtio-serial port's host end.
struct Port {
    kind: Kind,
    listener: UnixListener,
    conn: Option<UnixStream>,
    eof: bool,
    /// The nonce was seen (out/err): everything the command wrote has arrived.
    complete: bool,
    pending: Vec<u8>,
    bytes: u64,
}

impl Port {
    fn new(kind: Kind, path: &Path) -> Result<Port> {
        let listener =
            UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        listener.set_nonblocking(true)?;
        Ok(Port {
            kind,
            listener,
            conn: None,
            eof: false,
            complete: false,
            pending: Vec::new(),
            bytes: 0,
        })
    }
}

struct Sinks {
    stdout_ok: bool,
    stderr_ok: bool,
}

impl Sinks {
    fn write(&mut self, kind: &Kind, data: &[u8]) {
        let ok = match kind {
            Kind::Out => &mut self.stdout_ok,
            Kind::Err => &mut self.stderr_ok,
            Kind::Ctl => return,
        };
        if data.is_empty() || !*ok {
            return;
        }
        let res = match kind {
            Kind::Out => {
                let mut o = std::io::stdout().lock();
                o.write_all(data).and_then(|_| o.flush())
            }
            _ => {
                let mut o = std::io::stderr().lock();
                o.write_all(data).and_then(|_| o.flush())
            }
        };
        if res.is_err() {
            *ok = false; // e.g. a closed pipe: keep running (the status still counts), drop the output
        }
    }
}

/// A started test host that sends no heartbeat ("alive", every 5 s) for this long is hung.
const HEARTBEAT_LIMIT: Duration = Duration::from_secs(90);

/// What the ctl port said so far.
#[derive(Default)]
struct Ctl {
    started: Option<Instant>,
    last_alive: Option<Instant>,
    status: Option<i32>,
}

fn handle_data(port: &mut Port, data: &[u8], nonce: &[u8], sinks: &mut Sinks, ctl: &mut Ctl) {
    match port.kind {
        Kind::Ctl => {
            port.pending.extend_from_slice(data);
            while let Some(nl) = port.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = port.pending.drain(..=nl).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim();
                if line == "started" {
                    ctl.started.get_or_insert_with(Instant::now);
                    ctl.last_alive = Some(Instant::now());
                } else if line == "alive" {
                    ctl.last_alive = Some(Instant::now());
                } else if let Some(code) = line.strip_prefix("exit ") {
                    ctl.status = Some(code.trim().parse().unwrap_or(EXIT_TESTHOST_FAILED));
                }
            }
        }
        Kind::Out | Kind::Err => {
            if port.complete {
                return;
            }
            port.pending.extend_from_slice(data);
            if let Some(pos) = port.pending.windows(nonce.len()).position(|w| w == nonce) {
                sinks.write(&port.kind, &port.pending[..pos]);
                port.bytes += pos as u64;
                port.pending.clear();
                port.complete = true;
            } else {
                let keep = nonce.len() - 1;
                if port.pending.len() > keep {
                    let n = port.pending.len() - keep;
                    sinks.write(&port.kind, &port.pending[..n]);
                    port.bytes += n as u64;
                    port.pending.drain(..n);
                }
            }
        }
    }
}

/// Reads what is available on the port's connection (accepting it first if needed).
fn service(port: &mut Port, nonce: &[u8], sinks: &mut Sinks, ctl: &mut Ctl) -> Result<()> {
    if port.conn.is_none() {
        match port.listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(true)?;
                port.conn = Some(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    let mut buf = vec![0u8; 256 * 1024];
    while let Some(conn) = port.conn.as_mut() {
        match conn.read(&mut buf) {
            Ok(0) => {
                port.eof = true;
                break;
            }
            Ok(n) => handle_data(port, &buf[..n], nonce, sinks, ctl),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                port.eof = true;
                break;
            }
        }
    }
    Ok(())
}

/// The emulated CPU: AMD SVM with nested paging, so the test host's KVM runs guests at useful speed.
/// `CAPSA_TESTHOST_CPU` overrides it.
const DEFAULT_CPU: &str = "EPYC,+svm,+npt";

fn qemu_command(plan: &Plan, tmp: &Path) -> Command {
    // QEMU's option syntax: a ',' inside a value is written ',,'.
    let esc = |p: &Path| p.display().to_string().replace(',', ",,");
    let mut c = Command::new(&plan.qemu);
    let cpu = std::env::var("CAPSA_TESTHOST_CPU").unwrap_or_else(|_| DEFAULT_CPU.to_string());
    let accel = std::env::var("CAPSA_TESTHOST_ACCEL").unwrap_or_else(|_| "tcg".to_string());
    c.args(["-accel", &accel, "-cpu", &cpu])
        .args([
            "-smp",
            &plan.cpus.to_string(),
            "-m",
            &plan.memory.to_string(),
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(plan.image.join("kernel"))
        .arg("-initrd")
        .arg(plan.image.join("initrd.img"))
        .arg("-append")
        .arg(match std::env::var("CAPSA_TESTHOST_APPEND") {
            Ok(extra) => format!("{CMDLINE} {extra}"),
            Err(_) => CMDLINE.to_string(),
        })
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,readonly=on",
            esc(&plan.image.join("root.img"))
        ))
        .arg("-chardev")
        .arg(format!(
            "file,id=con,path={}",
            esc(&tmp.join("console.log"))
        ))
        .args([
            "-serial",
            "chardev:con",
            "-device",
            "virtio-serial-pci,id=vser",
            "-device",
            "virtio-rng-pci",
        ]);
    for (id, name) in [
        ("out", "capsa.out"),
        ("err", "capsa.err"),
        ("ctl", "capsa.ctl"),
    ] {
        c.arg("-chardev")
            .arg(format!(
                "socket,id={id},path={}",
                esc(&tmp.join(format!("{id}.sock")))
            ))
            .arg("-device")
            .arg(format!(
                "virtserialport,bus=vser.0,chardev={id},name={name}"
            ));
    }
    let mut fs9p = vec![("capsajob".to_string(), tmp.join("job"), "")];
    fs9p.extend(plan.shares.iter().enumerate().map(|(i, s)| {
        let ro = if s.readonly { ",readonly=on" } else { "" };
        (format!("capsa{i}"), s.path.clone(), ro)
    }));
    for (tag, path, ro) in fs9p {
        c.arg("-fsdev")
            .arg(format!(
                "local,id={tag},path={},security_model=none{ro}",
                esc(&path)
            ))
            .arg("-device")
            .arg(format!("virtio-9p-pci,fsdev={tag},mount_tag={tag}"));
    }
    c
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("TCG doesn't support requested feature"))
        .collect();
    kept[kept.len().saturating_sub(lines)..].join("\n")
}

fn report_death(tmp: &Path, started: bool, status: Option<std::process::ExitStatus>) {
    let console = fs::read_to_string(tmp.join("console.log")).unwrap_or_default();
    let why = if console.contains("Kernel panic") {
        "its kernel panicked"
    } else if console.contains("capsa-testhost: error:")
        || console.contains("capsa-testhost: initramfs:")
    {
        "its init failed"
    } else {
        "QEMU exited"
    };
    let when = if started {
        "while the command ran"
    } else {
        "before the command started"
    };
    let status = status.map(|s| format!("; QEMU {s}")).unwrap_or_default();
    eprintln!(
        "capsa-testhost: the test host died {when} without reporting a status ({why}{status})"
    );
    let console = tail(&tmp.join("console.log"), 40);
    let console = if console.trim().is_empty() {
        "(empty)".to_string()
    } else {
        console
    };
    eprintln!("---- test-host console (last 40 lines) ----\n{console}");
    let q = tail(&tmp.join("qemu.log"), 20);
    if !q.trim().is_empty() {
        eprintln!("---- QEMU ----\n{q}");
    }
    eprintln!("----");
}

/// Boots the test host once and runs the job; `limits` = (boot, command) time limits.
fn boot_and_run(plan: &Plan, limits: (Duration, Duration)) -> Result<Outcome> {
    let tmpdir = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempdir()
        .context("creating a temporary directory")?;
    let tmp = tmpdir.path();
    fs::write(tmp.join("runner.pid"), std::process::id().to_string())?;
    let job = tmp.join("job");
    fs::create_dir(&job)?;
    let nonce = nonce()?;
    fs::write(job.join("nonce"), &nonce)?;
    fs::write(job.join("job.sh"), &plan.job_script)?;
    let shares: String = plan
        .shares
        .iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                "capsa{i} {} {}\n",
                if s.readonly { "ro" } else { "rw" },
                s.path.display()
            )
        })
        .collect();
    fs::write(job.join("shares"), shares)?;
    let mut ports = [
        Port::new(Kind::Out, &tmp.join("out.sock"))?,
        Port::new(Kind::Err, &tmp.join("err.sock"))?,
        Port::new(Kind::Ctl, &tmp.join("ctl.sock"))?,
    ];

    let qemu_log = fs::File::create(tmp.join("qemu.log"))?;
    let mut cmd = qemu_command(plan, tmp);
    cmd.stdin(Stdio::null())
        .stdout(qemu_log.try_clone()?)
        .stderr(qemu_log)
        .process_group(0);
    // SAFETY: prctl is async-signal-safe; QEMU dies with this runner even if the runner is SIGKILLed.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let start = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", plan.qemu.to_string_lossy()))?;
    let mut qemu = Qemu { child };
    if !plan.quiet {
        eprintln!(
            "capsa-testhost: booting the test host (qemu pid {}, {} vCPUs, {} MiB)",
            qemu.child.id(),
            plan.cpus,
            plan.memory
        );
    }

    let nonce = nonce.into_bytes();
    let mut sinks = Sinks {
        stdout_ok: true,
        stderr_ok: true,
    };
    let mut ctl = Ctl::default();
    let mut announced = false;
    let outcome = loop {
        let sig = SIGNALLED.load(Ordering::SeqCst);
        if sig != 0 {
            break Outcome::Signalled(sig);
        }
        let now = Instant::now();
        let deadline = match ctl.started {
            Some(t) => t + limits.1,
            None => start + limits.0,
        };
        if now >= deadline {
            break Outcome::Timeout(ctl.started.is_some());
        }
        if let Some(alive) = ctl.last_alive {
            if ctl.status.is_none() && now.duration_since(alive) > HEARTBEAT_LIMIT {
                break Outcome::Hung;
            }
        }
        {
            let mut fds: Vec<PollFd> = ports
                .iter()
                .filter(|p| !p.eof)
                .map(|p| match &p.conn {
                    Some(c) => PollFd::new(c.as_fd(), PollFlags::POLLIN),
                    None => PollFd::new(p.listener.as_fd(), PollFlags::POLLIN),
                })
                .collect();
            let wait = (deadline - now).min(Duration::from_millis(200));
            let ms = u16::try_from(wait.as_millis()).unwrap_or(200);
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e).context("poll"),
            }
        }
        for p in ports.iter_mut().filter(|p| !p.eof) {
            service(p, &nonce, &mut sinks, &mut ctl)?;
        }
        if let (Some(t), false) = (ctl.started, announced) {
            announced = true;
            if !plan.quiet {
                eprintln!(
                    "capsa-testhost: test host up, command started {:.1} s after QEMU start",
                    (t - start).as_secs_f64()
                );
            }
        }
        if let Some(code) = ctl.status {
            if ports[0].complete && ports[1].complete {
                break Outcome::Exited(code);
            }
        }
        if let Some(status) = qemu.child.try_wait()? {
            // QEMU is gone: take what its sockets still hold, then judge.
            for p in ports.iter_mut() {
                if let Some(c) = p.conn.as_mut() {
                    let _ = c.set_nonblocking(false);
                    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                }
                while !p.eof && p.conn.is_some() {
                    let before = (p.bytes, p.pending.len());
                    service(p, &nonce, &mut sinks, &mut ctl)?;
                    if (p.bytes, p.pending.len()) == before && !p.eof {
                        break;
                    }
                }
            }
            // Without the nonce, the held-back tail is output too.
            let mut incomplete = false;
            for p in ports.iter_mut().take(2).filter(|p| !p.complete) {
                let rest = std::mem::take(&mut p.pending);
                p.bytes += rest.len() as u64;
                sinks.write(&p.kind, &rest);
                incomplete = true;
            }
            match ctl.status {
                Some(code) => {
                    if incomplete {
                        eprintln!(
                            "capsa-testhost: warning: the command's output may be incomplete"
                        );
                    }
                    break Outcome::Exited(code);
                }
                None => {
                    report_death(tmp, ctl.started.is_some(), Some(status));
                    break Outcome::Died {
                        started: ctl.started.is_some(),
                    };
                }
            }
        }
    };
    let ran = ctl
        .started
        .map(|t| t.elapsed().as_secs_f64())
        .unwrap_or_default();
    drop(qemu); // kills the process group and reaps QEMU
    if let Outcome::Timeout(_) | Outcome::Hung = outcome {
        eprintln!(
            "---- test-host console (last 20 lines) ----\n{}\n----",
            tail(&tmp.join("console.log"), 20)
        );
    }
    if let Some(path) = &plan.console_log {
        if let Err(e) = fs::copy(tmp.join("console.log"), path) {
            eprintln!(
                "capsa-testhost: warning: cannot write {}: {e}",
                path.display()
            );
        }
    }
    if let (Outcome::Exited(code), false) = (&outcome, plan.quiet) {
        eprintln!(
            "capsa-testhost: command exited with status {code} after {ran:.1} s ({} bytes stdout, {} bytes stderr)",
            ports[0].bytes, ports[1].bytes
        );
    }
    drop(ports);
    tmpdir.close().context("removing the temporary directory")?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(kind: Kind) -> (Port, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let p = Port::new(kind, &dir.path().join("s.sock")).unwrap();
        (p, dir)
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        let script = job_script(
            Path::new("/w"),
            &[("K".into(), "v'1".into())],
            &["echo".into(), "$x".into()],
        )
        .unwrap();
        assert!(script.contains("cd -- '/w' || exit 125\n"));
        assert!(script.contains("export K='v'\\''1'\n"));
        assert!(script.ends_with("exec 'echo' '$x'\n"));
    }

    #[test]
    fn variable_names_are_checked() {
        assert!(valid_name("CAPSA_X1") && valid_name("_a"));
        assert!(!valid_name("") && !valid_name("1A") && !valid_name("A-B") && !valid_name("A B"));
        assert!(environment(&["NOEQUALS".into()]).is_err());
        assert!(environment(&["BAD-NAME=1".into()]).is_err());
        let env = environment(&["A=1".into(), "A=2=3".into()]).unwrap();
        assert_eq!(
            env.iter().filter(|(k, _)| k == "A").collect::<Vec<_>>(),
            [&("A".into(), "2=3".into())]
        );
    }

    #[test]
    fn nonce_split_across_reads_ends_the_stream() {
        let (mut p, _d) = port(Kind::Ctl);
        p.kind = Kind::Out;
        let nonce = b"CAPSA-END-0123456789abcdef";
        let mut sinks = Sinks {
            stdout_ok: false,
            stderr_ok: false, // count only, print nothing
        };
        let mut ctl = Ctl::default();
        handle_data(&mut p, b"hello CAPSA-END-0123", nonce, &mut sinks, &mut ctl);
        assert!(!p.complete);
        handle_data(&mut p, b"456789abcdef", nonce, &mut sinks, &mut ctl);
        assert!(p.complete);
        assert_eq!(p.bytes, 6);
    }

    #[test]
    fn ctl_lines_give_start_and_status() {
        let (mut p, _d) = port(Kind::Ctl);
        let mut sinks = Sinks {
            stdout_ok: true,
            stderr_ok: true,
        };
        let mut ctl = Ctl::default();
        handle_data(&mut p, b"started\nexit 4", b"x", &mut sinks, &mut ctl);
        assert!(ctl.started.is_some() && ctl.status.is_none());
        handle_data(&mut p, b"2\n", b"x", &mut sinks, &mut ctl);
        assert_eq!(ctl.status, Some(42));
    }
}
