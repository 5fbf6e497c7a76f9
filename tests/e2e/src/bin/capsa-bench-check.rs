//! capsa-bench-check: fails `make bench` when a benchmark figure is missing or cannot be trusted.
//!
//! Usage: capsa-bench-check LOG FIGURE...
//! Reads the `BENCH <name>=<value> ok=<n>/<N>` lines of LOG (capsa_e2e::figures) and exits 1 when one of the
//! FIGUREs is missing, has no value, or rests on fewer than 80 % of its planned runs; prints every figure
//! with its counts either way.

use anyhow::Context as _;
use capsa_e2e::figures::{check, parse_log};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let log = args
        .next()
        .context("usage: capsa-bench-check LOG FIGURE...")?;
    let expected: Vec<String> = args.collect();
    let text = std::fs::read_to_string(&log).with_context(|| format!("read {log}"))?;
    let figures = parse_log(&text);
    println!("bench-check: {} figures in {log}", figures.len());
    for f in figures.values() {
        println!(
            "  {:40} {:>12} {:>3}/{:<3} {}",
            f.name,
            f.value.map_or("-".into(), |v| format!("{v:.2}")),
            f.ok,
            f.planned,
            f.problem().unwrap_or_default()
        );
    }
    let names: Vec<&str> = expected.iter().map(String::as_str).collect();
    match check(&figures, &names) {
        Ok(()) => {
            println!(
                "bench-check: all {} expected figures present, each from at least 80 % of its runs",
                names.len()
            );
            Ok(())
        }
        Err(problems) => {
            for p in &problems {
                println!("bench-check: FAILED {p}");
            }
            std::process::exit(1);
        }
    }
}
