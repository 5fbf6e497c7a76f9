//! Boot timer: one byte written to I/O port 0x440 tells the VMM the agent has started
//! (see docs/interfaces.md, "Boot timer"). Best effort: every failure is ignored.

/// The VMM's boot-timer port.
pub const BOOT_TIMER_PORT: u16 = 0x440;

/// Value written; the VMM only looks at the access, not the value.
const BOOT_TIMER_VALUE: u8 = 123;

/// Writes the boot-timer byte. Only call this inside the guest (as PID 1): on a host it would
/// poke a real I/O port.
pub fn signal_agent_started() {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: ioperm only changes this thread's I/O permission bitmap.
        let rc = unsafe { libc::ioperm(u64::from(BOOT_TIMER_PORT), 1, 1) };
        if rc == 0 {
            // SAFETY: access to exactly this port was just granted; `out` has no memory effects.
            unsafe {
                core::arch::asm!(
                    "out dx, al",
                    in("dx") BOOT_TIMER_PORT,
                    in("al") BOOT_TIMER_VALUE,
                    options(nomem, nostack, preserves_flags)
                );
            }
        } else {
            // No CAP_SYS_RAWIO or no port I/O: fall back to /dev/port (may not exist yet).
            use std::io::{Seek, SeekFrom, Write};
            if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open("/dev/port") {
                let _ = f
                    .seek(SeekFrom::Start(u64::from(BOOT_TIMER_PORT)))
                    .and_then(|_| f.write_all(&[BOOT_TIMER_VALUE]));
            }
        }
    }
}
