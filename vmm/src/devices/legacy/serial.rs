//! 16550A UART (COM1) built on vm-superio's `Serial`, with its interrupt delivered through an irqfd.
//!
//! The guest's output is capped ([`CappedOutput`]): after `limit` bytes one notice line is written and the
//! rest is counted and dropped, so a guest cannot fill the host's disk (or the tmpfs under /run) with console
//! output.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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

/// Default cap on the guest's console output: 1 MiB. The runtime keeps `console.log` under /run (a tmpfs,
/// so host RAM) for the pod's life; a quiet boot writes a few KiB and a verbose one ~100 KiB, so 1 MiB keeps
/// every boot and panic trace while bounding what a hostile guest can make the host store.
pub const DEFAULT_CONSOLE_LIMIT: u64 = 1 << 20;

/// How much console output went where.
#[derive(Debug, Default)]
pub struct ConsoleStats {
    /// Guest bytes passed to the output.
    pub written: AtomicU64,
    /// Guest bytes dropped because the limit was reached.
    pub dropped: AtomicU64,
}

/// The notice written once when the console limit is reached.
pub fn limit_notice(limit: u64) -> String {
    format!("[capsa-vmm: console log limit of {limit} bytes reached; further output dropped]\n")
}

/// A writer that passes at most `limit` bytes to `inner`, then writes one notice line and drops (and
/// counts) everything else. Writes never fail because of the limit, so the UART keeps working.
pub struct CappedOutput<W: Write> {
    inner: W,
    limit: u64,
    stats: Arc<ConsoleStats>,
    /// Whether the last byte passed on ended a line (the notice then needs no leading newline).
    at_line_start: bool,
    noticed: bool,
}

impl<W: Write> CappedOutput<W> {
    pub fn new(inner: W, limit: u64) -> Self {
        Self {
            inner,
            limit,
            stats: Arc::default(),
            at_line_start: true,
            noticed: false,
        }
    }

    /// Counters shared with whoever wants to report them.
    pub fn stats(&self) -> Arc<ConsoleStats> {
        self.stats.clone()
    }

    fn write_notice(&mut self) {
        self.noticed = true;
        let mut notice = String::new();
        if !self.at_line_start {
            notice.push('\n');
        }
        notice.push_str(&limit_notice(self.limit));
        if let Err(e) = self
            .inner
            .write_all(notice.as_bytes())
            .and_then(|()| self.inner.flush())
        {
            warn!(error = %e, "serial: cannot write the console limit notice");
        }
        warn!(
            limit = self.limit,
            "serial: guest console output reached its limit; further output dropped"
        );
    }
}

impl<W: Write> Write for CappedOutput<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.stats.written.load(Ordering::Relaxed);
        let room = self.limit.saturating_sub(written);
        // room < buf.len() <= usize::MAX, so the cast is lossless.
        let take = if room < buf.len() as u64 {
            room as usize
        } else {
            buf.len()
        };
        if take > 0 {
            let n = self.inner.write(&buf[..take])?;
            self.stats.written.fetch_add(n as u64, Ordering::Relaxed);
            if let Some(&last) = buf[..n].last() {
                self.at_line_start = last == b'\n';
            }
            if n < take {
                // A short write of the inner writer: let the caller retry the rest.
                return Ok(n);
            }
        }
        let over = buf.len() - take;
        if over > 0 {
            if !self.noticed {
                self.write_notice();
            }
            self.stats.dropped.fetch_add(over as u64, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// COM1 as a bus device.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, SerialOutput>,
    /// Log an output error once, not for every byte.
    output_failed: bool,
    stats: Arc<ConsoleStats>,
}

impl SerialDevice {
    /// COM1 writing the guest's output to `out`, at most `limit` bytes of it.
    pub fn new(interrupt: EventFd, out: SerialOutput, limit: u64) -> Self {
        let out = CappedOutput::new(out, limit);
        let stats = out.stats();
        Self {
            serial: Serial::new(EventFdTrigger::new(interrupt), Box::new(out)),
            output_failed: false,
            stats,
        }
    }

    /// Output counters (written and dropped guest bytes).
    pub fn console_stats(&self) -> Arc<ConsoleStats> {
        self.stats.clone()
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
        let mut dev = SerialDevice::new(
            irq.try_clone().unwrap(),
            Box::new(sink.clone()),
            DEFAULT_CONSOLE_LIMIT,
        );
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
        let mut dev = SerialDevice::new(
            irq.try_clone().unwrap(),
            Box::new(io::sink()),
            DEFAULT_CONSOLE_LIMIT,
        );
        dev.write(1, &[0x01]); // receive-data interrupt
        assert_eq!(dev.enqueue_input(b"ok"), 2);
        let mut b = [0u8; 1];
        dev.read(5, &mut b);
        assert_eq!(b[0] & 1, 1, "LSR data ready");
        dev.read(0, &mut b);
        assert_eq!(b[0], b'o');
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn output_is_capped_with_one_notice() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let sink = Sink::default();
        let mut dev = SerialDevice::new(irq, Box::new(sink.clone()), 10);
        let stats = dev.console_stats();
        // The guest writes 25 bytes through the transmit register, one at a time as Linux does.
        for &b in b"line one\nline two\nline 3\n" {
            dev.write(0, &[b]);
        }
        let want = format!(
            "line one\nl\n{}",
            "[capsa-vmm: console log limit of 10 bytes reached; further output dropped]\n"
        );
        assert_eq!(
            String::from_utf8(sink.0.lock().unwrap().clone()).unwrap(),
            want
        );
        assert_eq!(stats.written.load(Ordering::Relaxed), 10);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 15);
        // More output: still dropped and counted, no second notice.
        for _ in 0..1000 {
            dev.write(0, b"x");
        }
        assert_eq!(sink.0.lock().unwrap().len(), want.len());
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 1015);
    }

    #[test]
    fn capped_output_splits_a_write_at_the_limit() {
        let sink = Sink::default();
        let mut out = CappedOutput::new(sink.clone(), 4);
        assert_eq!(out.write(b"ab\n").unwrap(), 3);
        // The cut falls right after a newline: the notice needs none of its own.
        assert_eq!(out.write(b"c\ndef").unwrap(), 5);
        assert_eq!(
            String::from_utf8(sink.0.lock().unwrap().clone()).unwrap(),
            format!("ab\nc\n{}", limit_notice(4))
        );
        assert_eq!(out.stats().dropped.load(Ordering::Relaxed), 4);
        // A zero limit drops everything, with the notice first.
        let sink = Sink::default();
        let mut out = CappedOutput::new(sink.clone(), 0);
        out.write_all(b"hello").unwrap();
        assert_eq!(
            String::from_utf8(sink.0.lock().unwrap().clone()).unwrap(),
            limit_notice(0)
        );
        assert_eq!(out.stats().dropped.load(Ordering::Relaxed), 5);
    }
}
