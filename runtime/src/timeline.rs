//! The pod-start timeline: one `tracing` event per step of starting a sandbox and its containers, each with
//! a wall-clock timestamp, so a benchmark (capsa-cri-bench) can line them up with its own CRI calls.
//!
//! Every event has target [`TARGET`], level INFO, the message `pod-start step` and the fields `sandbox`,
//! `step`, `unix_us` (microseconds since the Unix epoch) and, for container steps, `container`. In the shim's
//! log (containerd's) such a line reads
//! `... INFO capsa_timeline: pod-start step sandbox=<id> step=vmm_spawned unix_us=1764427200123456`.
//!
//! Steps, in the order a pod starts: `shim_start` (containerd ran `containerd-shim-capsa-v2 start`),
//! `shim_serving` (the long-running shim listens), `boot_begin` (the sandbox's first Create reached the
//! shim), `virtiofsd_ready`, `jail_ready`, `vmm_spawned`, `kernel_entry` and `agent_started` (from the
//! VMM's boot timer, relative to the spawn), `agent_ready` (the agent's ready notification and first
//! answer), `sandbox_created` (CreateSandbox and the guest network done), then per container
//! `container_created` and `container_started`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The `tracing` target of the timeline's events.
pub const TARGET: &str = "capsa_timeline";

/// The environment variable through which `start` hands its own start time (microseconds since the epoch)
/// to the long-running shim it spawns.
pub const SHIM_START_ENV: &str = "CAPSA_TIMELINE_SHIM_START_US";

/// Microseconds since the Unix epoch (0 for a clock before it).
pub fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Logs sandbox step `step` as happening now.
pub fn step(sandbox: &str, step: &str) {
    step_at(sandbox, step, SystemTime::now());
}

/// Logs sandbox step `step` as having happened at `at`.
pub fn step_at(sandbox: &str, step: &str, at: SystemTime) {
    tracing::info!(target: "capsa_timeline", sandbox = %sandbox, step = %step, unix_us = unix_us(at), "pod-start step");
}

/// Logs container step `step` of container `container` in `sandbox` as happening now.
pub fn container_step(sandbox: &str, container: &str, step: &str) {
    tracing::info!(target: "capsa_timeline", sandbox = %sandbox, container = %container, step = %step,
        unix_us = unix_us(SystemTime::now()), "pod-start step");
}

/// `at` moved by `us` microseconds.
pub fn plus_us(at: SystemTime, us: u64) -> SystemTime {
    at + Duration::from_micros(us)
}

/// One parsed timeline event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub sandbox: String,
    pub container: Option<String>,
    pub step: String,
    pub unix_us: u64,
}

/// Parses a log line holding a timeline event (anything before the target is ignored); `None` otherwise.
pub fn parse(line: &str) -> Option<Event> {
    let at = line.find(&format!("{TARGET}:"))?;
    let rest = &line[at + TARGET.len() + 1..];
    let (mut sandbox, mut container, mut step, mut us) = (None, None, None, None);
    for word in rest.split_whitespace() {
        let Some((k, v)) = word.split_once('=') else {
            continue;
        };
        let v = v.trim_matches('"');
        match k {
            "sandbox" => sandbox = Some(v.to_owned()),
            "container" => container = Some(v.to_owned()),
            "step" => step = Some(v.to_owned()),
            "unix_us" => us = v.parse().ok(),
            _ => {}
        }
    }
    Some(Event {
        sandbox: sandbox?,
        container,
        step: step?,
        unix_us: us?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The events as the shim's own log format (tracing_subscriber's fmt, no colours) writes them parse back.
    #[test]
    fn events_written_by_the_shims_formatter_parse_back() {
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || w.clone())
            .finish();
        let at = UNIX_EPOCH + Duration::from_micros(1_764_427_200_123_456);
        tracing::subscriber::with_default(sub, || {
            step_at("pod-1", "vmm_spawned", at);
            container_step("pod-1", "c-2", "container_started");
            tracing::info!(
                sandbox = "pod-1",
                step = "x",
                unix_us = 5,
                "not the timeline"
            );
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let events: Vec<Event> = text.lines().filter_map(parse).collect();
        assert_eq!(events.len(), 2, "{text}");
        assert_eq!(
            events[0],
            Event {
                sandbox: "pod-1".into(),
                container: None,
                step: "vmm_spawned".into(),
                unix_us: 1_764_427_200_123_456,
            }
        );
        assert_eq!(events[1].container.as_deref(), Some("c-2"));
        assert_eq!(events[1].step, "container_started");
        assert!(events[1].unix_us > 1_764_427_200_123_456);
    }

    #[test]
    fn other_lines_do_not_parse() {
        assert_eq!(parse("INFO capsa_runtime::vm: VM ready sandbox=x"), None);
        assert_eq!(
            parse("INFO capsa_timeline: pod-start step sandbox=x step=y"),
            None
        );
        assert_eq!(
            parse("INFO capsa_timeline: pod-start step sandbox=x step=y unix_us=12")
                .map(|e| e.unix_us),
            Some(12)
        );
    }
}
