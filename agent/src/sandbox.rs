//! Sandbox lifecycle. For now: DestroySandbox's power-off.

use std::time::Duration;

use tokio::sync::mpsc;

/// Time between DestroySandbox's reply and the power-off, so the reply leaves the guest first.
pub const POWER_OFF_DELAY: Duration = Duration::from_millis(100);

/// What DestroySandbox does once it has replied.
#[derive(Debug, Clone)]
pub enum PowerOff {
    /// PID 1: kill everything, sync, reboot(RB_AUTOBOOT). With `reboot=k` the kernel resets
    /// through the i8042 and the VMM exits 0.
    Reboot,
    /// Not PID 1 (running on a host for tests): exit the agent process.
    Exit,
    /// In-process tests: send a message instead.
    Notify(mpsc::UnboundedSender<()>),
}

/// Schedules the power-off after [`POWER_OFF_DELAY`] and returns at once.
pub fn schedule_power_off(action: PowerOff) {
    tokio::spawn(async move {
        tokio::time::sleep(POWER_OFF_DELAY).await;
        match action {
            PowerOff::Reboot => {
                // Blocking syscalls, and the task never returns: leave the async workers alone.
                let _ = tokio::task::spawn_blocking(reboot_now).await;
            }
            PowerOff::Exit => {
                tracing::info!("DestroySandbox: not PID 1, exiting");
                std::process::exit(0);
            }
            PowerOff::Notify(tx) => {
                let _ = tx.send(());
            }
        }
    });
}

/// Terminates every other process, flushes file systems and resets the VM.
fn reboot_now() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;

    tracing::info!("DestroySandbox: powering off");
    // As PID 1, kill(-1) reaches every process but us.
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(20));
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    nix::unistd::sync();
    loop {
        // Only returns on failure; PID 1 must not exit, so keep trying.
        match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT) {
            Ok(never) => match never {},
            Err(e) => tracing::error!("reboot(RB_AUTOBOOT): {e}"),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
