//! 16550A UART (COM1) built on vm-superio's `Serial`, with its interrupt delivered through an irqfd.

use std::io::{self, Write};

use tracing::warn;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::BusDevice;

/// Raises the UART's interrupt line by writing to an eventfd that KVM knows as an irqfd.
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's serial output goes.
pub type SerialOutput = Box<dyn Write + Send>;

/// COM1 as a bus device.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, SerialOutput>,
    /// Log an output error once, not for every byte.
    output_failed: bool,
}

impl SerialDevice {
    pub fn new(interrupt: EventFd, out: SerialOutput) -> Self {
        Self {
            serial: Serial::new(EventFdTrigger::new(interrupt), out),
            output_failed: false,
        }
    }

    /// Queues host input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        match self.serial.enqueue_raw_bytes(input) {
            Ok(n) => n,
            Err(vm_superio::serial::Error::FullFifo) => 0,
            Err(e) => {
                warn!("serial input: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(off @ 0..=7), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.serial.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(off @ 0..=7), Some(&value)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        if let Err(e) = self.serial.write(off, value) {
            if !self.output_failed {
                warn!("serial output: {e:?}");
                self.output_failed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_thre_interrupt() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let sink = Sink::default();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(sink.clone()));
        // Enable the THR-empty interrupt (IER bit 1): it fires at once.
        dev.write(1, &[0x02]);
        assert_eq!(irq.read().unwrap(), 1);
        // IIR says "THR empty" (0x2); reading it acknowledges the interrupt.
        let mut iir = [0u8; 1];
        dev.read(2, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x02);
        // Each transmitted byte raises it again once acknowledged (what Linux's user-space output needs).
        dev.write(0, b"h");
        assert_eq!(irq.read().unwrap(), 1);
        dev.write(0, b"i");
        assert!(irq.read().is_err(), "not re-raised before the IIR read");
        dev.read(2, &mut iir);
        dev.write(0, b"!");
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(&*sink.0.lock().unwrap(), b"hi!");
        // Odd accesses are ignored.
        dev.write(100, &[1]);
        dev.write(0, &[]);
        let mut wide = [0xffu8; 4];
        dev.read(9, &mut wide);
        assert_eq!(wide, [0; 4]);
    }

    #[test]
    fn input_reaches_the_receive_buffer() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(io::sink()));
        dev.write(1, &[0x01]); // receive-data interrupt
        assert_eq!(dev.enqueue_input(b"ok"), 2);
        let mut b = [0u8; 1];
        dev.read(5, &mut b);
        assert_eq!(b[0] & 1, 1, "LSR data ready");
        dev.read(0, &mut b);
        assert_eq!(b[0], b'o');
        assert!(irq.read().unwrap() >= 1);
    }
}
