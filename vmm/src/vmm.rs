//! The VMM: builds the VM from a [`VmConfig`] and runs it until the guest or the host stops it.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use tracing::{debug, info, warn};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::Killable;

use crate::arch::{boot, cpuid, mptable, regs};
use crate::bus::{Bus, SharedDevice};
use crate::config::{ConfigError, VmConfig};
use crate::devices::legacy::boot_timer::BootTimes;
use crate::devices::legacy::{BootTimer, Cmos, Ignored, SerialDevice, I8042};
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use crate::devices::GuestMemoryMmap;
use crate::layout::*;
use crate::seccomp::{Policy, SeccompError, SeccompMode, ThreadKind};
use crate::vcpu::{install_kick_handler, kick_signal, Vcpu, VmEvent};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    Memory { mib: u64, reason: String },
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("vCPU setup: {0}")]
    Regs(#[from] regs::RegsError),
    #[error("CPUID: {0}")]
    Cpuid(#[from] cpuid::CpuidError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error("device bus: {0}")]
    Bus(#[from] crate::bus::BusError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("virtio device {name}: {reason}")]
    Device { name: String, reason: String },
    #[error("vCPU {vcpu}: {message}")]
    Vcpu { vcpu: u8, message: String },
    #[error("vCPU threads did not stop within {0:?}")]
    StopTimeout(Duration),
    #[error("seccomp: {0}")]
    Seccomp(#[from] SeccompError),
}

impl Error {
    /// The process exit status for this error (docs/interfaces.md): 2 for bad configuration, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) => 2,
            _ => 1,
        }
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// How the VM ended when it ended normally (exit status 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest wrote 0xfe to the i8042 command port (Linux `reboot=k` reboot/poweroff).
    GuestReset,
    /// KVM_EXIT_SHUTDOWN (triple fault) or a KVM shutdown/reset system event.
    GuestShutdown,
    /// A vCPU halted and nothing can wake it (only without an in-kernel irqchip).
    GuestHalted,
    /// [`Vmm::stop_flag`] was set (SIGTERM/SIGINT in the binary).
    Stopped,
}

/// Knobs for embedding the VMM (tests, tools); [`Vmm::new`] uses the defaults.
#[derive(Default)]
pub struct VmmOptions {
    /// Guest serial output; default: `config.console_log` or stdout.
    pub serial_out: Option<Box<dyn Write + Send>>,
    /// Feed the VMM's stdin to the guest's serial port (when stdin is not /dev/null).
    pub serial_input: bool,
    /// Where the BOOT_TIMER line goes; default stderr.
    pub boot_timer_out: Option<Box<dyn Write + Send>>,
    /// More virtio devices, after the configured ones.
    pub extra_virtio_devices: Vec<crate::virtio_wiring::NamedDevice>,
    /// Process start, for the boot timer; default: when the VMM was created.
    pub process_start: Option<Instant>,
    /// The flag that stops the VM (see [`Vmm::stop_flag`]); pass one to have signal handlers in place before
    /// the VM is built. Default: a new flag.
    pub stop_flag: Option<Arc<AtomicBool>>,
    /// Test hook (debug builds only): once every filter is in place, the main thread makes a forbidden
    /// syscall (socket(AF_INET)), so with seccomp on the process dies by SIGSYS.
    #[cfg(debug_assertions)]
    pub seccomp_selftest: bool,
}

pub struct Vmm {
    config: VmConfig,
    // Kept so KVM objects outlive the vCPUs.
    _kvm: Kvm,
    _vm: VmFd,
    mem: GuestMemoryMmap,
    vcpus: Vec<VcpuFd>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    serial: Arc<Mutex<SerialDevice>>,
    serial_input: bool,
    events_tx: Sender<VmEvent>,
    events_rx: Receiver<VmEvent>,
    stop_requested: Arc<AtomicBool>,
    times: Arc<BootTimes>,
    /// The full command line given to the kernel.
    cmdline: String,
    entry: boot::EntryPoint,
    vsock_uds: Option<PathBuf>,
    #[cfg(debug_assertions)]
    seccomp_selftest: bool,
}

/// How long to keep kicking vCPU threads before giving up on them.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

impl Vmm {
    pub fn new(config: VmConfig) -> Result<Self, Error> {
        Self::with_options(
            config,
            VmmOptions {
                serial_input: true,
                ..Default::default()
            },
        )
    }

    pub fn with_options(config: VmConfig, options: VmmOptions) -> Result<Self, Error> {
        let times = BootTimes::new(options.process_start.unwrap_or_else(Instant::now));
        config.validate()?;
        let vsock_uds = config.vsock.as_ref().map(|v| v.uds.clone());

        let kvm = Kvm::new().map_err(kvm_err("cannot open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;

        let mem_size = config.memory_bytes();
        // A vhost-user backend (virtio-fs) maps guest memory too: then it is one shared memfd.
        let mem = crate::memory::create(&ram_ranges(mem_size), config.needs_shared_memory())
            .map_err(|e| Error::Memory {
                mib: config.memory_mib,
                reason: e.to_string(),
            })?;
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| Error::Memory {
                    mib: config.memory_mib,
                    reason: e.to_string(),
                })?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the mapping belongs to `mem`, which the Vmm keeps alive as long as the VM exists.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let (events_tx, events_rx) = channel();
        let mut pio = Bus::new();
        let mut mmio = Bus::new();

        // COM1, interrupt through an irqfd on GSI 4.
        let serial_out: Box<dyn Write + Send> = match options.serial_out {
            Some(out) => out,
            None => match &config.console_log {
                Some(path) => Box::new(
                    OpenOptions::new()
                        .create(true)
                        .write(true)
                        .truncate(true)
                        .open(path)
                        .map_err(io_err(format!(
                            "cannot open console log {}",
                            path.display()
                        )))?,
                ),
                None => Box::new(std::io::stdout()),
            },
        };
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            serial_irq,
            serial_out,
            config.console_limit,
        )));
        pio.insert(serial.clone(), u64::from(COM1_PORT), 8)?;

        let reset_tx = Mutex::new(events_tx.clone());
        let i8042 = I8042::new(Box::new(move || {
            let _ = reset_tx.lock().map(|tx| tx.send(VmEvent::Reset));
        }));
        pio.insert(Arc::new(Mutex::new(i8042)), u64::from(I8042_PORT), 5)?;
        let timer_out = options
            .boot_timer_out
            .unwrap_or_else(|| Box::new(std::io::stderr()));
        pio.insert(
            Arc::new(Mutex::new(BootTimer::new(times.clone(), timer_out))),
            u64::from(BOOT_TIMER_PORT),
            1,
        )?;
        pio.insert(Arc::new(Mutex::new(Cmos::new())), u64::from(CMOS_PORT), 2)?;
        for (name, base, len) in [
            ("post-code", 0x80u64, 1u64),
            ("com2", 0x2f8, 8),
            ("com3", 0x3e8, 8),
            ("com4", 0x2e8, 8),
            ("pci-config", 0xcf8, 8),
        ] {
            pio.insert(Arc::new(Mutex::new(Ignored::new(name))), base, len)?;
        }

        // virtio-mmio devices: the configured ones, then any extra.
        let mut devices = crate::virtio_wiring::create_devices(&config)?;
        devices.extend(crate::devices::virtio::fs::create_devices(&config)?);
        devices.extend(crate::virtio_wiring::create_net_devices(&config)?);
        devices.extend(options.extra_virtio_devices);
        let mut cmdline = config.cmdline.clone();
        for (i, (name, device)) in devices.into_iter().enumerate() {
            let base = VIRTIO_MMIO_BASE + i as u64 * MMIO_WINDOW_SIZE;
            let gsi = VIRTIO_GSI_BASE + i as u32;
            if gsi > MAX_GSI {
                return Err(ConfigError::Invalid("too many virtio devices".into()).into());
            }
            let transport = MmioTransport::new(mem.clone(), device).map_err(|e| Error::Device {
                name: name.clone(),
                reason: e.to_string(),
            })?;
            for (queue, evt) in transport.queue_events().iter().enumerate() {
                vm.register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                    queue as u32,
                )
                .map_err(kvm_err("KVM_IOEVENTFD"))?;
            }
            vm.register_irqfd(transport.interrupt_event(), gsi)
                .map_err(kvm_err("KVM_IRQFD (virtio)"))?;
            let shared: SharedDevice = Arc::new(Mutex::new(transport));
            mmio.insert(shared, base, MMIO_WINDOW_SIZE)?;
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(&format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
            info!("virtio {name} at {base:#x} GSI {gsi}");
        }

        let entry = boot::load(
            &mem,
            mem_size,
            &config.kernel,
            config.initrd.as_deref(),
            &cmdline,
        )?;
        debug!("kernel entry {:#x} ({:?})", entry.addr, entry.mode);
        mptable::setup(&mem, config.vcpus)?;

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let msr_list = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
        for id in 0..config.vcpus {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let cpuid = cpuid::for_vcpu(&supported, id, config.vcpus)?;
            fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            regs::setup_msrs(&fd, msr_list.as_slice())?;
            regs::setup_fpu(&fd)?;
            regs::setup_lapic(&fd)?;
            if id == 0 {
                regs::setup_boot_vcpu(&fd, &mem, entry)?;
            }
            vcpus.push(fd);
        }

        Ok(Self {
            config,
            _kvm: kvm,
            _vm: vm,
            mem,
            vcpus,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            serial,
            serial_input: options.serial_input,
            events_tx,
            events_rx,
            stop_requested: options.stop_flag.unwrap_or_default(),
            times,
            cmdline,
            entry,
            vsock_uds,
            #[cfg(debug_assertions)]
            seccomp_selftest: options.seccomp_selftest,
        })
    }

    /// Setting this flag stops the VM (`run` returns [`ExitReason::Stopped`]); signal-safe.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop_requested.clone()
    }

    /// The kernel command line, with the virtio-mmio device list appended.
    pub fn kernel_cmdline(&self) -> &str {
        &self.cmdline
    }

    pub fn entry_point(&self) -> boot::EntryPoint {
        self.entry
    }

    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Runs the VM until the guest stops, a vCPU fails or the stop flag is set.
    ///
    /// With seccomp on (`config.seccomp`), every thread installs its filter before the guest runs: the vCPU
    /// and serial input threads as they start, the main thread once they are all started, and device workers
    /// as the guest activates devices (see [`crate::seccomp`]).
    pub fn run(mut self) -> Result<ExitReason, Error> {
        install_kick_handler().map_err(io_err("cannot install the vCPU kick signal handler"))?;
        let policy = Policy::start(self.config.seccomp)?;
        match self.config.seccomp {
            SeccompMode::On => info!("seccomp filters on"),
            SeccompMode::Log => warn!(
                "seccomp in LOG mode: syscalls outside the filters are allowed (the kernel logs them, audit \
                 type=1326): capsa-vmm is not confined"
            ),
            SeccompMode::Off => warn!(
                "seccomp is OFF: capsa-vmm runs with no syscall filter; a guest that escapes into the VMM has \
                 every syscall the process may make"
            ),
        }
        let stop_vcpus = Arc::new(AtomicBool::new(false));
        // vCPUs wait here until the main thread has its filter (or gave up).
        let gate = Arc::new(StartGate::default());
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let mut failure = None;
        for (id, fd) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let vcpu = Vcpu {
                id: id as u8,
                fd,
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                stop: stop_vcpus.clone(),
                events: self.events_tx.clone(),
                times: self.times.clone(),
            };
            let (gate, policy) = (gate.clone(), policy.clone());
            match std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    gate.wait();
                    if let Some(policy) = &policy {
                        if let Err(e) = policy.enter(ThreadKind::Vcpu) {
                            let _ = vcpu.events.send(VmEvent::Error {
                                vcpu: vcpu.id,
                                message: e.to_string(),
                            });
                            return;
                        }
                    }
                    vcpu.run()
                }) {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    failure = Some(io_err(format!("cannot start vCPU {id} thread"))(e));
                    break;
                }
            }
        }
        if self.serial_input && failure.is_none() {
            start_stdin_thread(self.serial.clone(), policy.clone());
        }
        if failure.is_none() {
            if let Some(policy) = &policy {
                failure = policy.enter(ThreadKind::Main).err().map(Error::from);
            }
        }
        #[cfg(debug_assertions)]
        if self.seccomp_selftest && failure.is_none() {
            warn!("seccomp self-test: the main thread calls socket(AF_INET), which its filter forbids");
            // SAFETY: a plain syscall; with the filter on, the kernel kills the process before it returns.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            warn!("seccomp self-test: socket(AF_INET) returned {fd}: the filter did not stop it");
        }
        if failure.is_some() {
            stop_vcpus.store(true, Ordering::Release);
        }
        gate.open();

        let outcome = match failure {
            Some(e) => Err(e),
            None => self.wait_for_event(),
        };
        let stopped = stop_threads(&stop_vcpus, threads);
        self.remove_vsock_socket();
        self.report_console_drops();
        let reason = outcome?;
        stopped?;
        info!("VM stopped: {reason:?}");
        Ok(reason)
    }

    fn wait_for_event(&self) -> Result<ExitReason, Error> {
        loop {
            if self.stop_requested.load(Ordering::Acquire) {
                return Ok(ExitReason::Stopped);
            }
            match self.events_rx.recv_timeout(Duration::from_millis(20)) {
                Ok(VmEvent::Reset) => return Ok(ExitReason::GuestReset),
                Ok(VmEvent::Shutdown) => return Ok(ExitReason::GuestShutdown),
                Ok(VmEvent::Halted) => return Ok(ExitReason::GuestHalted),
                Ok(VmEvent::Error { vcpu, message }) => return Err(Error::Vcpu { vcpu, message }),
                Err(RecvTimeoutError::Timeout) => {}
                // We hold a sender ourselves, so this does not happen; treat it as a stop.
                Err(RecvTimeoutError::Disconnected) => return Ok(ExitReason::Stopped),
            }
        }
    }

    /// One line at exit if guest console output went over `--console-limit`.
    fn report_console_drops(&self) {
        let Ok(serial) = self.serial.lock() else {
            return;
        };
        let stats = serial.console_stats();
        let dropped = stats.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            warn!(
                limit = self.config.console_limit,
                written = stats.written.load(Ordering::Relaxed),
                dropped,
                "guest console output over the limit was dropped"
            );
        }
    }

    fn remove_vsock_socket(&mut self) {
        if let Some(path) = self.vsock_uds.take() {
            match std::fs::remove_file(&path) {
                Ok(()) => debug!("removed {}", path.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warn!("cannot remove {}: {e}", path.display()),
            }
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.remove_vsock_socket();
    }
}

/// Holds the vCPU threads until the main thread has installed its own filter (or given up).
#[derive(Default)]
struct StartGate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl StartGate {
    fn wait(&self) {
        let Ok(mut open) = self.open.lock() else {
            return;
        };
        while !*open {
            open = match self.opened.wait(open) {
                Ok(g) => g,
                Err(_) => return,
            };
        }
    }

    fn open(&self) {
        if let Ok(mut open) = self.open.lock() {
            *open = true;
        }
        self.opened.notify_all();
    }
}

/// Tells the vCPU threads to stop, kicks them out of KVM_RUN until they do, and joins them.
fn stop_threads(stop: &AtomicBool, threads: Vec<JoinHandle<()>>) -> Result<(), Error> {
    stop.store(true, Ordering::Release);
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        let running: Vec<&JoinHandle<()>> = threads.iter().filter(|t| !t.is_finished()).collect();
        if running.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return Err(Error::StopTimeout(STOP_TIMEOUT));
        }
        for t in running {
            if let Err(e) = t.kill(kick_signal()) {
                debug!("kick: {e}");
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for t in threads {
        if t.join().is_err() {
            warn!("a vCPU thread panicked");
        }
    }
    Ok(())
}

/// Whether fd 0 is /dev/null (or closed), in which case the guest gets no serial input.
fn stdin_is_null() -> bool {
    // SAFETY: fstat/stat only write into the zeroed structs we pass.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(0, &mut st) != 0 {
            return true;
        }
        let mut null: libc::stat = std::mem::zeroed();
        let path = c"/dev/null";
        libc::stat(path.as_ptr(), &mut null) == 0
            && st.st_rdev == null.st_rdev
            && st.st_ino == null.st_ino
    }
}

fn start_stdin_thread(serial: Arc<Mutex<SerialDevice>>, policy: Option<Arc<Policy>>) {
    if stdin_is_null() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("serial-stdin".into())
        .spawn(move || {
            if let Some(policy) = &policy {
                if let Err(e) = policy.enter(ThreadKind::SerialStdin) {
                    warn!("no serial input: {e}");
                    return;
                }
            }
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 64];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        debug!("stdin: {e}");
                        return;
                    }
                };
                let mut pending = &buf[..n];
                while !pending.is_empty() {
                    let taken = serial
                        .lock()
                        .map(|mut s| s.enqueue_input(pending))
                        .unwrap_or(0);
                    pending = &pending[taken..];
                    if !pending.is_empty() {
                        // The guest has not drained the FIFO yet.
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        });
    if let Err(e) = spawned {
        warn!("no serial input: {e}");
    }
}
