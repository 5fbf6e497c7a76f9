//! The `--seccomp on|off|log` switch.

use serde::{Deserialize, Serialize};

/// Whether and how the VMM's threads are filtered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// Filters installed; a syscall outside them kills the process (SIGSYS).
    #[default]
    On,
    /// No filters (debugging only: the VMM then has no syscall confinement).
    Off,
    /// Filters installed, but a syscall outside them is allowed and logged by the kernel (audit
    /// type=1326, `dmesg`): for finding what a filter misses.
    Log,
}

impl std::fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SeccompMode::On => "on",
            SeccompMode::Off => "off",
            SeccompMode::Log => "log",
        })
    }
}

impl std::str::FromStr for SeccompMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(SeccompMode::On),
            "off" => Ok(SeccompMode::Off),
            "log" => Ok(SeccompMode::Log),
            _ => Err(format!("seccomp mode {s:?} is not on, off or log")),
        }
    }
}
