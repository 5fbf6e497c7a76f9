//! Just enough of the i8042 keyboard controller for Linux's `reboot=k`: a write of 0xfe (pulse the reset line)
//! to the command port ends the VM. Registered at port 0x60 with length 5 (0x60 data, 0x64 status/command).

use tracing::{debug, trace};

use crate::devices::BusDevice;

const DATA: u64 = 0;
const COMMAND: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// Called when the guest asks for a reset.
pub type ResetCallback = Box<dyn FnMut() + Send>;

pub struct I8042 {
    on_reset: ResetCallback,
}

impl I8042 {
    pub fn new(on_reset: ResetCallback) -> Self {
        Self { on_reset }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status register: output buffer empty, input buffer empty, so drivers never wait on us.
        // Data port: nothing to read.
        trace!("i8042 read offset {offset}");
        data.fill(0);
        let _ = (DATA, offset);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND && data.first() == Some(&CMD_RESET_CPU) {
            debug!("i8042: guest requested a reset");
            (self.on_reset)();
        } else {
            trace!("i8042 write offset {offset} {data:?} ignored");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn only_fe_on_the_command_port_resets() {
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let mut dev = I8042::new(Box::new(move || {
            h.fetch_add(1, Ordering::SeqCst);
        }));
        dev.write(DATA, &[0xfe]);
        dev.write(COMMAND, &[0xd1]);
        dev.write(COMMAND, &[]);
        assert_eq!(hits.load(Ordering::SeqCst), 0);
        dev.write(COMMAND, &[0xfe]);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        let mut status = [0xffu8];
        dev.read(COMMAND, &mut status);
        assert_eq!(status, [0]);
    }
}
