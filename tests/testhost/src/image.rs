//! The test-host image: built and cached by build-image.sh; this module finds and runs that script.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// Files every complete image directory holds.
pub const IMAGE_FILES: [&str; 3] = ["kernel", "initrd.img", "root.img"];

/// Where build-image.sh lives: `CAPSA_TESTHOST_DIR`, the crate's source directory, or
/// `tests/testhost` under the workspace root.
fn script_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CAPSA_TESTHOST_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let built_in = Path::new(env!("CARGO_MANIFEST_DIR"));
    if built_in.join("build-image.sh").is_file() {
        return Ok(built_in.to_path_buf());
    }
    let candidate = crate::workspace_root()?.join("tests/testhost");
    if candidate.join("build-image.sh").is_file() {
        return Ok(candidate);
    }
    bail!(
        "cannot find build-image.sh (looked in {} and under the workspace root; set CAPSA_TESTHOST_DIR)",
        built_in.display()
    )
}

/// Builds the image if the cache has no complete one for the current inputs, and returns its directory.
pub fn ensure_image() -> Result<PathBuf> {
    let script = script_dir()?.join("build-image.sh");
    let start = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| PathBuf::from(l.trim()))
        .context("build-image.sh printed no image directory")?;
    check_image(&dir)?;
    let _ = start;
    Ok(dir)
}

/// Checks that `dir` is a complete image directory.
pub fn check_image(dir: &Path) -> Result<()> {
    if !dir.join("complete").is_file() {
        bail!("{} is not a complete test-host image", dir.display());
    }
    for f in IMAGE_FILES {
        if !dir.join(f).is_file() {
            bail!("{} lacks {f}", dir.display());
        }
    }
    Ok(())
}
