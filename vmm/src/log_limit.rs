//! Rate limiting for log lines a guest can trigger at will (bad descriptors, bad register accesses, bad
//! packets): one token bucket per call site, shared by every device instance that reaches it.
//!
//! Use [`guest_warn!`](crate::guest_warn) and [`guest_error!`](crate::guest_error) instead of `warn!` /
//! `error!` wherever the guest decides how often the line is logged. A call site logs at most
//! [`BURST`] lines at once and [`PER_SECOND`] a second after that; the lines it swallows are counted and
//! reported in one `K similar messages suppressed` line just before the next line it lets through.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines a call site may log back to back.
pub const BURST: u32 = 5;
/// Lines a call site may log per second once its burst is spent.
pub const PER_SECOND: u32 = 1;

#[derive(Debug)]
struct Bucket {
    /// Tokens left, in units of 1/PER_SECOND second, i.e. whole lines.
    tokens: u32,
    /// When the next token is added (None until first used).
    refill_at: Option<Instant>,
    suppressed: u64,
}

/// A token bucket for one log call site.
#[derive(Debug)]
pub struct LogLimiter {
    bucket: Mutex<Bucket>,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl LogLimiter {
    /// A full bucket (usable in a `static`).
    pub const fn new() -> Self {
        Self {
            bucket: Mutex::new(Bucket {
                tokens: BURST,
                refill_at: None,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may be logged now: `Some(k)` with the number of lines suppressed since the last
    /// one logged, or `None` (the line is counted as suppressed).
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    /// [`allow`](Self::allow) at a given moment (tests).
    pub fn allow_at(&self, now: Instant) -> Option<u64> {
        // A poisoned lock only means another thread panicked while logging: the counters are still sane.
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let period = Duration::from_secs(1) / PER_SECOND;
        match b.refill_at {
            None => b.refill_at = Some(now + period),
            Some(mut at) => {
                while at <= now && b.tokens < BURST {
                    b.tokens += 1;
                    at += period;
                }
                if b.tokens == BURST && at <= now {
                    at = now + period;
                }
                b.refill_at = Some(at);
            }
        }
        if b.tokens == 0 {
            b.suppressed = b.suppressed.saturating_add(1);
            return None;
        }
        b.tokens -= 1;
        Some(std::mem::take(&mut b.suppressed))
    }
}

/// `tracing::warn!` for a line the guest can trigger repeatedly: rate-limited per call site.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {
        $crate::guest_log!(::tracing::Level::WARN, $($arg)+)
    };
}

/// `tracing::error!` for a line the guest can trigger repeatedly: rate-limited per call site.
#[macro_export]
macro_rules! guest_error {
    ($($arg:tt)+) => {
        $crate::guest_log!(::tracing::Level::ERROR, $($arg)+)
    };
}

/// The implementation of [`guest_warn!`] and [`guest_error!`].
#[doc(hidden)]
#[macro_export]
macro_rules! guest_log {
    ($level:expr, $($arg:tt)+) => {{
        static LIMITER: $crate::log_limit::LogLimiter = $crate::log_limit::LogLimiter::new();
        if let Some(suppressed) = LIMITER.allow() {
            if suppressed > 0 {
                ::tracing::event!(
                    $level,
                    at = concat!(file!(), ":", line!()),
                    "{suppressed} similar messages suppressed"
                );
            }
            ::tracing::event!($level, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Arc;

    #[test]
    fn burst_then_one_per_second_with_the_suppressed_count() {
        let l = LogLimiter::new();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(l.allow_at(t0), Some(0));
        }
        // A flood within the same second: all suppressed.
        for i in 0..1000u32 {
            assert_eq!(l.allow_at(t0 + Duration::from_micros(u64::from(i))), None);
        }
        // After a second one more line, carrying the count.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(l.allow_at(t1), Some(1000));
        assert_eq!(l.allow_at(t1), None);
        assert_eq!(l.allow_at(t1 + Duration::from_millis(999)), None);
        assert_eq!(l.allow_at(t1 + Duration::from_secs(1)), Some(2));
        // A quiet spell refills the burst, no more.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..BURST {
            assert_eq!(l.allow_at(t2), Some(0));
        }
        assert_eq!(l.allow_at(t2), None);
    }

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn flood(n: usize) {
        for i in 0..n {
            crate::guest_warn!(i, "test: hostile guest line");
        }
    }

    #[test]
    fn the_macro_logs_the_burst_and_then_one_suppression_line() {
        let out = Capture::default();
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            flood(100);
            // The bucket refills one line a second; wait for it.
            std::thread::sleep(Duration::from_millis(1100));
            flood(1);
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let hostile = lines
            .iter()
            .filter(|l| l.contains("test: hostile guest line"))
            .count();
        assert_eq!(hostile, BURST as usize + 1, "{text}");
        let suppressed: Vec<&&str> = lines
            .iter()
            .filter(|l| l.contains("similar messages suppressed"))
            .collect();
        assert_eq!(suppressed.len(), 1, "{text}");
        assert!(
            suppressed[0].contains(&format!("{} similar messages suppressed", 100 - BURST)),
            "{text}"
        );
        assert!(suppressed[0].contains("log_limit.rs"), "{text}");
        // The suppression line comes right before the line that was let through.
        let at = lines
            .iter()
            .position(|l| l.contains("similar messages suppressed"))
            .unwrap();
        assert!(lines[at + 1].contains("i=0"), "{text}");
    }
}
