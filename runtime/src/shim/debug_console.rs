//! `debug_console = true` in `/etc/capsa/configuration.toml`: the guest kernel logs at loglevel 7, the agent
//! at debug, and every line of the guest's serial console is copied into the shim's log (target
//! `guest_console`), so a pod that misbehaves can be read from containerd's log without entering the VM.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::AsyncReadExt;

/// Kernel command-line words that make the guest verbose.
pub const DEBUG_CMDLINE: [&str; 2] = ["loglevel=7", "capsa.log=debug"];

/// Longest console line kept whole; a guest that never writes a newline is cut into lines of this size.
const MAX_LINE: usize = 4096;

/// Takes the complete lines out of `pending` (and a MAX_LINE-byte piece when a line grows past that).
pub fn take_lines(pending: &mut Vec<u8>) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let cut = match pending.iter().position(|&b| b == b'\n') {
            Some(i) if i < MAX_LINE => i + 1,
            _ if pending.len() >= MAX_LINE => MAX_LINE,
            _ => break,
        };
        let line: Vec<u8> = pending.drain(..cut).collect();
        lines.push(String::from_utf8_lossy(&line).trim_end().to_string());
    }
    lines
}

/// Follows `console_log` (the VMM's `--console-log` file) into the log until the file is gone (the sandbox
/// directory is removed when the VM ends).
pub fn follow(sandbox: String, console_log: PathBuf) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut file = loop {
            match tokio::fs::File::open(&console_log).await {
                Ok(f) => break f,
                Err(_) if console_log.parent().is_some_and(|d| d.exists()) => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(_) => return,
            }
        };
        let mut pending = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            match file.read(&mut buf).await {
                Ok(0) => {
                    if !console_log.exists() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(n) => {
                    pending.extend_from_slice(&buf[..n]);
                    for line in take_lines(&mut pending) {
                        tracing::info!(target: "guest_console", sandbox = %sandbox, "{line}");
                    }
                }
                Err(_) => break,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_and_bounded() {
        let mut p = b"one\ntwo\r\nthree".to_vec();
        assert_eq!(take_lines(&mut p), ["one", "two"]);
        assert_eq!(p, b"three");
        p.extend_from_slice(b"\n");
        assert_eq!(take_lines(&mut p), ["three"]);
        assert!(p.is_empty());
        // No newline from a hostile guest: cut at MAX_LINE, the rest waits.
        let mut p = vec![b'x'; MAX_LINE * 2 + 10];
        let lines = take_lines(&mut p);
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|l| l.len() == MAX_LINE));
        assert_eq!(p.len(), 10);
    }

    #[tokio::test]
    async fn follower_ends_when_the_file_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, "hello\n").unwrap();
        let task = follow("sb".into(), path.clone());
        tokio::time::sleep(Duration::from_millis(300)).await;
        std::fs::remove_file(&path).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("follower still running after the console log was removed")
            .unwrap();
    }
}
