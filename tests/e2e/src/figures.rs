//! Benchmark figures that cannot hide a failure (issue 15).
//!
//! Every figure a benchmark prints is one line
//! `BENCH <name>=<value> ok=<n>/<N> [free text]`: the value (`-` when no run produced one) and how many of
//! the runs it was planned over succeeded. `make bench` collects the lines of all its benchmarks and
//! `capsa-bench-check` fails when a figure it expects is missing, has no value, or rests on fewer than
//! [`MIN_OK_FRACTION`] of its runs.
//!
//! A benchmark whose runs keep failing (the nested test host's known instability: after one bad boot every
//! later one can fail the same way) stops early and exits with [`EXIT_HOST_UNHEALTHY`];
//! `tests/run-e2e.sh` then runs it again in a fresh test host (`CAPSA_E2E_HOST_RETRIES`).

use std::collections::BTreeMap;
use std::fmt;

/// Exit status of a benchmark that found the machine unusable (runs kept failing, or too few succeeded):
/// `tests/run-e2e.sh` replaces the test host and runs it again (EX_TEMPFAIL).
pub const EXIT_HOST_UNHEALTHY: i32 = 75;

/// Consecutive failed runs after which a benchmark gives up on the test host.
pub const MAX_FAILURES_IN_A_ROW: usize = 3;

/// A figure needs at least this fraction of its planned runs to have succeeded.
pub const MIN_OK_FRACTION: f64 = 0.8;

/// One printed figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    pub name: String,
    pub value: Option<f64>,
    pub ok: usize,
    pub planned: usize,
}

impl Figure {
    pub fn new(name: &str, value: Option<f64>, ok: usize, planned: usize) -> Self {
        Figure {
            name: name.to_owned(),
            value,
            ok,
            planned,
        }
    }

    /// Why the figure cannot be trusted, if it cannot.
    pub fn problem(&self) -> Option<String> {
        if self.value.is_none() {
            return Some(format!(
                "no value ({} of {} runs ok)",
                self.ok, self.planned
            ));
        }
        if self.planned == 0 {
            return Some("no runs were planned".into());
        }
        if (self.ok as f64) < MIN_OK_FRACTION * self.planned as f64 {
            return Some(format!(
                "only {} of {} runs ok (need {:.0} %)",
                self.ok,
                self.planned,
                MIN_OK_FRACTION * 100.0
            ));
        }
        None
    }

    /// Prints the `BENCH` line (stdout), with `note` after the counts.
    pub fn print(&self, note: &str) {
        println!("{self}{}{note}", if note.is_empty() { "" } else { " " });
    }
}

impl fmt::Display for Figure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.value {
            Some(v) => write!(f, "BENCH {}={v:.3}", self.name)?,
            None => write!(f, "BENCH {}=-", self.name)?,
        }
        write!(f, " ok={}/{}", self.ok, self.planned)
    }
}

/// Parses one `BENCH` line; `None` for any other line. A line without `ok=` counts as one run of one.
pub fn parse_line(line: &str) -> Option<Figure> {
    let rest = line.trim().strip_prefix("BENCH ")?;
    let mut words = rest.split_whitespace();
    let (name, value) = words.next()?.split_once('=')?;
    if name.is_empty() {
        return None;
    }
    let value = value.parse::<f64>().ok().filter(|v| v.is_finite());
    let (mut ok, mut planned) = (1, 1);
    for w in words {
        if let Some((n, m)) = w.strip_prefix("ok=").and_then(|c| c.split_once('/')) {
            ok = n.parse().ok()?;
            planned = m.parse().ok()?;
            break;
        }
    }
    Some(Figure {
        name: name.to_owned(),
        value,
        ok,
        planned,
    })
}

/// The figures in `log` by name (a later line of the same name replaces an earlier one: a benchmark run
/// again in a fresh test host prints them again).
pub fn parse_log(log: &str) -> BTreeMap<String, Figure> {
    log.lines()
        .filter_map(parse_line)
        .map(|f| (f.name.clone(), f))
        .collect()
}

/// Checks that each of `expected` is in `figures` and trustworthy: one line per figure, `Err` listing the
/// problems.
pub fn check(figures: &BTreeMap<String, Figure>, expected: &[&str]) -> Result<(), Vec<String>> {
    let problems: Vec<String> = expected
        .iter()
        .filter_map(|name| match figures.get(*name) {
            None => Some(format!(
                "{name}: missing (its benchmark printed no such figure)"
            )),
            Some(f) => f.problem().map(|p| format!("{name}: {p}")),
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Counts failures in a row across every kind of run of a benchmark.
#[derive(Debug, Default)]
pub struct Health {
    in_a_row: usize,
}

impl Health {
    /// Records one run; `true` when the machine should be given up on.
    pub fn record(&mut self, ok: bool) -> bool {
        if ok {
            self.in_a_row = 0;
        } else {
            self.in_a_row += 1;
        }
        self.in_a_row >= MAX_FAILURES_IN_A_ROW
    }

    /// True once [`MAX_FAILURES_IN_A_ROW`] runs in a row failed.
    pub fn broken(&self) -> bool {
        self.in_a_row >= MAX_FAILURES_IN_A_ROW
    }

    /// Prints why the benchmark stops (the caller cleans up and exits with [`EXIT_HOST_UNHEALTHY`]).
    pub fn report(&self, program: &str) {
        println!(
            "{program}: {} runs in a row failed: this machine (test host) looks broken; exiting with status \
             {EXIT_HOST_UNHEALTHY} so that tests/run-e2e.sh runs the benchmark again in a fresh one",
            self.in_a_row
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_round_trips() {
        let f = Figure::new("boot_capsa_ms", Some(2032.5), 9, 10);
        let line = f.to_string();
        assert_eq!(line, "BENCH boot_capsa_ms=2032.500 ok=9/10");
        assert_eq!(parse_line(&format!("{line} (median)")), Some(f));
        let none = Figure::new("x", None, 0, 10);
        assert_eq!(none.to_string(), "BENCH x=- ok=0/10");
        assert_eq!(parse_line(&none.to_string()), Some(none));
    }

    #[test]
    fn other_lines_are_not_figures() {
        for l in [
            "",
            "BENCH",
            "BENCH =3",
            "  capsa run 1: ok",
            "BENCHx=1",
            "BENCH x",
        ] {
            assert_eq!(parse_line(l), None, "{l:?}");
        }
        assert_eq!(parse_line("BENCH x=1 ok=a/3"), None);
        // Old lines without counts are one run of one.
        assert_eq!(
            parse_line("BENCH stdout_throughput_mib_s=4.8 (100 MiB in 21 s)"),
            Some(Figure::new("stdout_throughput_mib_s", Some(4.8), 1, 1))
        );
    }

    #[test]
    fn missing_valueless_and_thin_figures_fail() {
        let log = "noise\nBENCH a=1 ok=10/10\nBENCH b=- ok=0/10\nBENCH c=2.0 ok=7/10\nBENCH d=3 ok=8/10\n\
                   BENCH e=nan ok=10/10\nBENCH f=1 ok=0/0\n";
        let figs = parse_log(log);
        assert_eq!(check(&figs, &["a", "d"]), Ok(()));
        let errs = check(&figs, &["a", "b", "c", "d", "e", "f", "g"]).unwrap_err();
        assert_eq!(errs.len(), 5, "{errs:?}");
        assert!(errs[0].starts_with("b: no value"), "{errs:?}");
        assert!(errs[1].contains("only 7 of 10 runs ok"), "{errs:?}");
        assert!(errs[2].starts_with("e: no value"), "{errs:?}");
        assert!(errs[3].starts_with("f: no runs"), "{errs:?}");
        assert!(errs[4].starts_with("g: missing"), "{errs:?}");
    }

    #[test]
    fn a_rerun_replaces_the_earlier_figure() {
        let figs = parse_log("BENCH a=- ok=1/10\nBENCH a=5 ok=10/10\n");
        assert_eq!(check(&figs, &["a"]), Ok(()));
    }

    #[test]
    fn health_gives_up_after_failures_in_a_row_only() {
        let mut h = Health::default();
        assert!(!h.record(false));
        assert!(!h.record(false));
        assert!(!h.record(true));
        assert!(!h.record(false));
        assert!(!h.record(false));
        assert!(!h.broken());
        assert!(h.record(false));
        assert!(h.broken());
    }
}
