//! Logging: `tracing` to /dev/console when PID 1 (level from the kernel command line
//! `capsa.log=<level>`, default info), to stderr otherwise.

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::sync::Mutex;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

/// Kernel command-line key selecting the agent's log level.
pub const CMDLINE_LOG_KEY: &str = "capsa.log";

/// Default level when nothing is configured.
pub const DEFAULT_LEVEL: LevelFilter = LevelFilter::INFO;

/// Parses a level name (`off`, `error`, `warn`, `info`, `debug`, `trace`).
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    match s.trim().to_ascii_lowercase().as_str() {
        "off" => Some(LevelFilter::OFF),
        "error" => Some(LevelFilter::ERROR),
        "warn" | "warning" => Some(LevelFilter::WARN),
        "info" => Some(LevelFilter::INFO),
        "debug" => Some(LevelFilter::DEBUG),
        "trace" => Some(LevelFilter::TRACE),
        _ => None,
    }
}

/// Level selected on a kernel command line: the last `capsa.log=<level>` wins.
/// `Ok(None)`: not given; `Err(value)`: given but not a level.
pub fn level_from_cmdline(cmdline: &str) -> Result<Option<LevelFilter>, String> {
    let mut found = Ok(None);
    for word in cmdline.split_ascii_whitespace() {
        if let Some(v) = word
            .strip_prefix(CMDLINE_LOG_KEY)
            .and_then(|r| r.strip_prefix('='))
        {
            found = parse_level(v).map(Some).ok_or_else(|| v.to_string());
        }
    }
    found
}

/// Log timestamps: seconds since the guest kernel booted (CLOCK_BOOTTIME), like dmesg; the
/// guest's wall clock is not trustworthy this early.
struct BootTime;

impl FormatTime for BootTime {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let t = crate::guest_details::uptime_ns().unwrap_or(0);
        write!(
            w,
            "[{:5}.{:06}]",
            t / 1_000_000_000,
            (t % 1_000_000_000) / 1000
        )
    }
}

/// Installs the global subscriber. `console`: write to /dev/console (falls back to stderr).
/// Returns a warning to log once logging is up (e.g. a bad `capsa.log` value).
pub fn init(level: LevelFilter, console: bool) -> Option<String> {
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_timer(BootTime)
        .with_ansi(false)
        .with_target(false);
    let mut warning = None;
    let result = if console {
        match OpenOptions::new().write(true).open("/dev/console") {
            Ok(f) => builder.with_writer(Mutex::new(f)).try_init(),
            Err(e) => {
                warning = Some(format!("cannot open /dev/console ({e}), logging to stderr"));
                builder.with_writer(std::io::stderr).try_init()
            }
        }
    } else {
        builder.with_writer(std::io::stderr).try_init()
    };
    if let Err(e) = result {
        let _ = writeln!(std::io::stderr(), "capsa-agent: logging setup failed: {e}");
    }
    warning
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_level() {
        assert_eq!(level_from_cmdline("console=ttyS0 reboot=k quiet"), Ok(None));
        assert_eq!(
            level_from_cmdline("console=ttyS0 capsa.log=debug quiet"),
            Ok(Some(LevelFilter::DEBUG))
        );
        assert_eq!(
            level_from_cmdline("capsa.log=debug capsa.log=WARN"),
            Ok(Some(LevelFilter::WARN))
        );
        assert_eq!(
            level_from_cmdline("capsa.log=loud"),
            Err("loud".to_string())
        );
        // Other keys that merely start with the same text are not ours.
        assert_eq!(level_from_cmdline("capsa.logger=trace"), Ok(None));
        assert_eq!(
            level_from_cmdline("capsa.log=trace\n"),
            Ok(Some(LevelFilter::TRACE))
        );
    }

    #[test]
    fn level_names() {
        assert_eq!(parse_level("off"), Some(LevelFilter::OFF));
        assert_eq!(parse_level("Error"), Some(LevelFilter::ERROR));
        assert_eq!(parse_level("warning"), Some(LevelFilter::WARN));
        assert_eq!(parse_level(""), None);
    }
}
