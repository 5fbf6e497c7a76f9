//! vCPU threads: run KVM_RUN, dispatch exits to the buses, report how the guest stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Once};
use std::time::Instant;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use tracing::{debug, trace, warn};

use crate::bus::Bus;
use crate::devices::legacy::boot_timer::BootTimes;

/// What makes the VMM stop.
#[derive(Debug)]
pub enum VmEvent {
    /// The guest pulsed the i8042 reset line.
    Reset,
    /// KVM_EXIT_SHUTDOWN (triple fault) or a shutdown/reset system event.
    Shutdown,
    /// A vCPU halted with no in-kernel irqchip to wake it (only without an irqchip).
    Halted,
    /// A vCPU failed.
    Error { vcpu: u8, message: String },
}

/// The signal that kicks vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler for the kick signal so it interrupts KVM_RUN instead of killing the process.
pub fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub stop: Arc<AtomicBool>,
    pub events: Sender<VmEvent>,
    pub times: Arc<BootTimes>,
}

impl Vcpu {
    /// Runs until told to stop or the guest stops; reports the reason on `events`.
    pub fn run(mut self) {
        let mut entered = false;
        while !self.stop.load(Ordering::Acquire) {
            if !entered && self.id == 0 {
                entered = true;
                let _ = self.times.kernel_entry.set(Instant::now());
            }
            let event = match self.fd.run() {
                Ok(VcpuExit::InternalError) => {
                    // SAFETY: KVM filled the `internal` member of the union for KVM_EXIT_INTERNAL_ERROR.
                    let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
                    let n = (internal.ndata as usize).min(internal.data.len());
                    Some(VmEvent::Error {
                        vcpu: self.id,
                        message: format!(
                            "KVM_EXIT_INTERNAL_ERROR, suberror {} ({}), data {:x?}",
                            internal.suberror,
                            internal_error_name(internal.suberror),
                            &internal.data[..n]
                        ),
                    })
                }
                Ok(exit) => handle_exit(self.id, exit, &self.pio, &self.mmio),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) => Some(VmEvent::Error {
                    vcpu: self.id,
                    message: format!("KVM_RUN failed: {e}"),
                }),
            };
            if let Some(event) = event {
                debug!("vcpu {}: {event:?}", self.id);
                // The receiver only goes away once the VMM is done with the vCPUs.
                let _ = self.events.send(event);
                break;
            }
        }
        trace!("vcpu {} thread done", self.id);
    }
}

fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        1 => "instruction emulation failed",
        2 => "simultaneous exceptions",
        3 => "event delivery failed",
        4 => "unexpected exit reason",
        _ => "unknown",
    }
}

fn handle_exit(id: u8, exit: VcpuExit<'_>, pio: &Bus, mmio: &Bus) -> Option<VmEvent> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !pio.read(u64::from(port), data) {
                trace!("vcpu {id}: read of unknown port {port:#x}");
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            if !pio.write(u64::from(port), data) {
                trace!("vcpu {id}: write of unknown port {port:#x} {data:x?}");
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                trace!("vcpu {id}: read of unknown MMIO {addr:#x}");
                data.fill(0);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !mmio.write(addr, data) {
                trace!("vcpu {id}: write of unknown MMIO {addr:#x} {data:x?}");
            }
        }
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
        VcpuExit::Hlt => return Some(VmEvent::Halted),
        VcpuExit::Shutdown => {
            // The guest reboots through the i8042 (reboot=k), so this is a triple fault. (On AMD, KVM has
            // already reset the vCPU by now: its registers would not say where it happened.)
            warn!("vcpu {id}: guest shutdown (triple fault?)");
            return Some(VmEvent::Shutdown);
        }
        VcpuExit::SystemEvent(kind, _) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => return Some(VmEvent::Shutdown),
            KVM_SYSTEM_EVENT_CRASH => {
                return Some(VmEvent::Error {
                    vcpu: id,
                    message: "guest crashed (KVM system event)".into(),
                })
            }
            other => crate::guest_warn!("vcpu {id}: ignoring system event {other}"),
        },
        VcpuExit::FailEntry(reason, cpu) => {
            return Some(VmEvent::Error {
                vcpu: id,
                message: format!(
                    "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on cpu {cpu}"
                ),
            })
        }
        VcpuExit::InternalError => {
            return Some(VmEvent::Error {
                vcpu: id,
                message: "KVM_EXIT_INTERNAL_ERROR".into(),
            })
        }
        other => {
            return Some(VmEvent::Error {
                vcpu: id,
                message: format!("unexpected vCPU exit {other:?}"),
            });
        }
    }
    None
}
