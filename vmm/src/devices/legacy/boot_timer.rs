//! Boot timer on I/O port 0x440: the guest agent writes one byte when it starts; the first write prints
//! `BOOT_TIMER start_to_kernel_entry_us=<A> kernel_entry_to_agent_us=<B>` (docs/interfaces.md).

use std::io::Write;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tracing::{trace, warn};

use crate::devices::BusDevice;

/// Timestamps shared between the VMM and the boot timer.
#[derive(Debug)]
pub struct BootTimes {
    /// When the VMM process started.
    pub process_start: Instant,
    /// When the first vCPU first entered KVM_RUN.
    pub kernel_entry: OnceLock<Instant>,
}

impl BootTimes {
    pub fn new(process_start: Instant) -> Arc<Self> {
        Arc::new(Self {
            process_start,
            kernel_entry: OnceLock::new(),
        })
    }
}

pub struct BootTimer {
    times: Arc<BootTimes>,
    out: Box<dyn Write + Send>,
    reported: Option<(Duration, Duration)>,
}

impl BootTimer {
    pub fn new(times: Arc<BootTimes>, out: Box<dyn Write + Send>) -> Self {
        Self {
            times,
            out,
            reported: None,
        }
    }

    /// The two durations printed, once the guest has written.
    pub fn reported(&self) -> Option<(Duration, Duration)> {
        self.reported
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if self.reported.is_some() || offset != 0 || data.is_empty() {
            trace!("boot timer: write ignored");
            return;
        }
        let now = Instant::now();
        let entry = *self.times.kernel_entry.get_or_init(|| now);
        let a = entry.saturating_duration_since(self.times.process_start);
        let b = now.saturating_duration_since(entry);
        self.reported = Some((a, b));
        let line = format!(
            "BOOT_TIMER start_to_kernel_entry_us={} kernel_entry_to_agent_us={}\n",
            a.as_micros(),
            b.as_micros()
        );
        if let Err(e) = self
            .out
            .write_all(line.as_bytes())
            .and_then(|_| self.out.flush())
        {
            warn!("boot timer: cannot print: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn prints_once_with_both_durations() {
        let start = Instant::now();
        let times = BootTimes::new(start);
        times
            .kernel_entry
            .set(start + Duration::from_millis(3))
            .unwrap();
        let sink = Sink::default();
        let mut t = BootTimer::new(times, Box::new(sink.clone()));
        std::thread::sleep(Duration::from_millis(5));
        t.write(0, &[1]);
        t.write(0, &[1]);
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out.lines().count(), 1);
        assert!(
            out.starts_with("BOOT_TIMER start_to_kernel_entry_us=3000 kernel_entry_to_agent_us=")
        );
        let (a, b) = t.reported().unwrap();
        assert_eq!(a, Duration::from_millis(3));
        assert!(b >= Duration::from_millis(2));
    }
}
