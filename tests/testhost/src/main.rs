//! capsa-testhost: runs one command inside a nested test host (Debian's kernel under QEMU TCG with an emulated
//! AMD SVM + NPT), whose own KVM then boots capsa's microVMs at useful speed on machines without hardware
//! virtualisation. See tests/testhost/README.md.

mod image;
mod run;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "capsa-testhost",
    about = "Run a command inside capsa's nested test host"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the test-host image (or find it in the cache) and print its directory.
    BuildImage,
    /// Boot the test host, run CMD inside it (same cwd, workspace at the same path) and exit with its status.
    ///
    /// Exit status: the command's; 124 = timeout; 125 = the test host failed (did not boot, died, hung: no
    /// heartbeat for 90 s, or bad setup); 130/143 = interrupted by SIGINT/SIGTERM.
    Run(run::RunArgs),
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::BuildImage => match image::ensure_image() {
            Ok(dir) => {
                println!("{}", dir.display());
                0
            }
            Err(e) => {
                eprintln!("capsa-testhost: error: {e:#}");
                1
            }
        },
        Command::Run(args) => match run::run(args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("capsa-testhost: error: {e:#}");
                run::EXIT_TESTHOST_FAILED
            }
        },
    };
    std::process::exit(code);
}

/// The git top-level directory of the current directory, or the current directory itself.
pub(crate) fn workspace_root() -> Result<PathBuf> {
    let cwd = std::env::current_dir()?;
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--show-toplevel"])
        .stderr(std::process::Stdio::null())
        .output();
    if let Ok(out) = out {
        if out.status.success() {
            let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !s.is_empty() {
                return Ok(PathBuf::from(s));
            }
        }
    }
    Ok(cwd)
}
