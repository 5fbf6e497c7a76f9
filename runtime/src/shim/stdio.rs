//! containerd's stdio (FIFOs, `file://` and `binary://` URIs, or nothing) ⇄ the agent's stream calls.
//!
//! - Output: `ReadStdout`/`ReadStderr` one chunk at a time, each chunk written whole before the next
//!   is asked for, so a slow reader on the host holds the container back instead of the shim
//!   buffering. An empty read is EOF: the FIFO is closed after the last byte. With no path the
//!   output is still drained (and dropped), so the container never blocks on it.
//! - Input: read the FIFO, `WriteStdin` until every byte is accepted (the agent may take fewer:
//!   backpressure), `CloseStdin` at EOF or shortly after containerd's `CloseIO`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::log_binary::LoggingBinary;
use super::sandbox::{Sandbox, SandboxError};

/// Largest chunk asked of the agent per read.
pub const READ_CHUNK: u32 = 128 * 1024;
/// Largest chunk sent to the agent per write.
pub const WRITE_CHUNK: usize = 64 * 1024;
/// After CloseIO, how long the stdin FIFO may stay silent before stdin is closed in the guest.
pub const CLOSE_GRACE: Duration = Duration::from_millis(300);

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("{0}")]
    BinaryUri(String),
    #[error("stdio URI {0:?} is not understood")]
    BadUri(String),
    #[error("stdin cannot be a logging binary ({0:?})")]
    BinaryStdin(String),
    #[error("a logging binary takes both output streams: stdout {stdout:?} and stderr {stderr:?} must name the same one (or stderr nothing)")]
    BinaryMismatch { stdout: String, stderr: String },
}

/// Where one stream goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    None,
    /// A FIFO or any path, opened as is.
    Path(PathBuf),
    /// `file://` URI: a regular file, appended to.
    File(PathBuf),
    /// `binary://` URI: a logging binary that gets stdout and stderr (see [`super::log_binary`]).
    Binary(LoggingBinary),
}

impl Target {
    pub fn parse(uri: &str) -> Result<Self, StdioError> {
        if uri.is_empty() {
            return Ok(Target::None);
        }
        if let Some(p) = uri.strip_prefix("file://") {
            return Ok(Target::File(PathBuf::from(p)));
        }
        if let Some(b) = LoggingBinary::parse(uri) {
            return b.map(Target::Binary).map_err(StdioError::BinaryUri);
        }
        if uri.contains("://") {
            return Err(StdioError::BadUri(uri.to_owned()));
        }
        Ok(Target::Path(PathBuf::from(uri)))
    }
}

/// The three streams of one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StdioConfig {
    pub stdin: Target,
    pub stdout: Target,
    pub stderr: Target,
    pub terminal: bool,
}

impl StdioConfig {
    pub fn parse(
        stdin: &str,
        stdout: &str,
        stderr: &str,
        terminal: bool,
    ) -> Result<Self, StdioError> {
        let cfg = StdioConfig {
            stdin: Target::parse(stdin)?,
            stdout: Target::parse(stdout)?,
            // With a terminal there is one output stream.
            stderr: if terminal {
                Target::None
            } else {
                Target::parse(stderr)?
            },
            terminal,
        };
        if matches!(cfg.stdin, Target::Binary(_)) {
            return Err(StdioError::BinaryStdin(stdin.to_owned()));
        }
        // One logging binary takes both streams, as containerd sends the same URI for both.
        let paired = match (&cfg.stdout, &cfg.stderr) {
            (Target::Binary(_), err) => *err == Target::None || *err == cfg.stdout,
            (_, err) => !matches!(err, Target::Binary(_)),
        };
        if !paired {
            return Err(StdioError::BinaryMismatch {
                stdout: stdout.to_owned(),
                stderr: stderr.to_owned(),
            });
        }
        if let Target::Binary(b) = &cfg.stdout {
            b.check().map_err(StdioError::BinaryUri)?;
        }
        Ok(cfg)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// The running copies of one process's stdio.
pub struct Bridge {
    outputs: Vec<JoinHandle<()>>,
    stdin: Option<JoinHandle<()>>,
    close_stdin: Arc<Notify>,
}

impl Bridge {
    /// Starts copying. Call it once the process exists in the guest; `namespace` is containerd's, for a
    /// logging binary.
    pub fn spawn(
        sandbox: Arc<dyn Sandbox>,
        cid: &str,
        exec_id: &str,
        cfg: &StdioConfig,
        namespace: &str,
    ) -> Self {
        let mut outputs = Vec::new();
        if let Target::Binary(b) = &cfg.stdout {
            outputs.push(tokio::spawn(copy_to_logger(
                sandbox.clone(),
                cid.to_owned(),
                exec_id.to_owned(),
                b.clone(),
                namespace.to_owned(),
                !cfg.terminal,
            )));
        } else {
            outputs.push(tokio::spawn(copy_output(
                sandbox.clone(),
                cid.to_owned(),
                exec_id.to_owned(),
                Stream::Stdout,
                cfg.stdout.clone(),
            )));
        }
        if !cfg.terminal && !matches!(cfg.stdout, Target::Binary(_)) {
            outputs.push(tokio::spawn(copy_output(
                sandbox.clone(),
                cid.to_owned(),
                exec_id.to_owned(),
                Stream::Stderr,
                cfg.stderr.clone(),
            )));
        }
        let close_stdin = Arc::new(Notify::new());
        let stdin = match &cfg.stdin {
            Target::None | Target::Binary(_) => None,
            Target::Path(p) | Target::File(p) => Some(tokio::spawn(copy_input(
                sandbox,
                cid.to_owned(),
                exec_id.to_owned(),
                p.clone(),
                close_stdin.clone(),
            ))),
        };
        Bridge {
            outputs,
            stdin,
            close_stdin,
        }
    }

    /// containerd's CloseIO: finish forwarding stdin, then close it in the guest.
    pub fn close_stdin(&self) {
        self.close_stdin.notify_one();
    }

    /// A handle that does what [`Bridge::close_stdin`] does, for whoever serves CloseIO.
    pub fn stdin_closer(&self) -> Arc<Notify> {
        self.close_stdin.clone()
    }

    /// Waits until every output stream reached EOF, at most `timeout` (a process whose children
    /// keep its stdout open would otherwise hold its exit back forever).
    pub async fn wait_output(&mut self, timeout: Duration) -> bool {
        let all = futures_join_all(&mut self.outputs);
        tokio::time::timeout(timeout, all).await.is_ok()
    }

    /// Stops every copy (the process is deleted).
    pub fn abort(&mut self) {
        for h in self.outputs.drain(..) {
            h.abort();
        }
        if let Some(h) = self.stdin.take() {
            h.abort();
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.abort();
    }
}

async fn futures_join_all(handles: &mut Vec<JoinHandle<()>>) {
    for h in handles.iter_mut() {
        let _ = h.await;
    }
    handles.clear();
}

async fn open_output(target: &Target) -> std::io::Result<Option<tokio::fs::File>> {
    match target {
        Target::None => Ok(None),
        // Opening a FIFO for writing waits for its reader; containerd holds it open already.
        Target::Path(p) => tokio::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .await
            .map(Some),
        Target::File(p) => tokio::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(p)
            .await
            .map(Some),
        // Handled by `copy_to_logger`.
        Target::Binary(_) => Ok(None),
    }
}

/// Starts the logging binary and copies stdout (and stderr, without a terminal) into it; then gives it
/// [`super::log_binary::EXIT_GRACE`] to exit. If it cannot start, the output is drained and dropped so the
/// container never blocks on it.
async fn copy_to_logger(
    sandbox: Arc<dyn Sandbox>,
    cid: String,
    exec_id: String,
    binary: LoggingBinary,
    namespace: String,
    with_stderr: bool,
) {
    let logger = match binary.start(&cid, &namespace).await {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(%cid, %exec_id, binary = %binary.path.display(), error = %e,
                "cannot start the logging binary; dropping the output");
            None
        }
    };
    let (mut child, out, err) = match logger {
        Some(l) => (
            Some(l.child),
            Some(tokio::fs::File::from_std(l.stdout)),
            Some(tokio::fs::File::from_std(l.stderr)),
        ),
        None => (None, None, None),
    };
    // Each stream's file is closed when its copy ends: the logging binary then sees EOF on it.
    let pump = |stream: Stream, w: Option<tokio::fs::File>| {
        copy_stream(sandbox.clone(), cid.clone(), exec_id.clone(), stream, w)
    };
    if with_stderr {
        tokio::join!(pump(Stream::Stdout, out), pump(Stream::Stderr, err));
    } else {
        drop(err);
        pump(Stream::Stdout, out).await;
    }
    if let Some(child) = child.as_mut() {
        match tokio::time::timeout(super::log_binary::EXIT_GRACE, child.wait()).await {
            Ok(Ok(st)) if !st.success() => {
                tracing::warn!(%cid, %exec_id, status = %st, "the logging binary failed")
            }
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(%cid, %exec_id, "the logging binary did not exit after its input ended; killing it");
                let _ = child.kill().await;
            }
        }
    }
}

async fn copy_output(
    sandbox: Arc<dyn Sandbox>,
    cid: String,
    exec_id: String,
    stream: Stream,
    target: Target,
) {
    let out = match open_output(&target).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(%cid, %exec_id, ?stream, ?target, error = %e, "cannot open output; dropping it");
            None
        }
    };
    copy_stream(sandbox, cid, exec_id, stream, out).await;
}

/// Copies one stream of a process into `out` (or drains it) until EOF, then flushes and closes `out`.
async fn copy_stream<W: AsyncWrite + Unpin>(
    sandbox: Arc<dyn Sandbox>,
    cid: String,
    exec_id: String,
    stream: Stream,
    mut out: Option<W>,
) {
    let read = || {
        let (sandbox, cid, exec_id) = (sandbox.clone(), cid.clone(), exec_id.clone());
        async move {
            match stream {
                Stream::Stdout => sandbox.read_stdout(&cid, &exec_id, READ_CHUNK).await,
                Stream::Stderr => sandbox.read_stderr(&cid, &exec_id, READ_CHUNK).await,
            }
        }
    };
    if let Err(e) = pump_output(read, out.as_mut()).await {
        tracing::debug!(%cid, %exec_id, ?stream, error = %e, "output copy ended");
    }
    if let Some(mut f) = out {
        let _ = f.flush().await;
    }
}

/// Copies chunks from `read` to `out` (or drops them) until an empty chunk (EOF) or an error.
pub async fn pump_output<F, Fut, W>(mut read: F, mut out: Option<&mut W>) -> Result<u64, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<u8>, SandboxError>>,
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    loop {
        let chunk = read().await.map_err(|e| e.to_string())?;
        if chunk.is_empty() {
            return Ok(total);
        }
        total += chunk.len() as u64;
        if let Some(w) = out.as_deref_mut() {
            if let Err(e) = w.write_all(&chunk).await {
                // The reader went away (containerd closed the FIFO): keep draining so the
                // container does not block on a full pipe.
                tracing::debug!(error = %e, "output reader gone; discarding the rest");
                out = None;
            }
        }
    }
}

async fn copy_input(
    sandbox: Arc<dyn Sandbox>,
    cid: String,
    exec_id: String,
    path: PathBuf,
    close: Arc<Notify>,
) {
    // Opening a FIFO for reading waits for a writer; CloseIO before that means "no input".
    let file = tokio::select! {
        f = tokio::fs::File::open(&path) => f,
        _ = close.notified() => {
            let _ = sandbox.close_stdin(&cid, &exec_id).await;
            return;
        }
    };
    let file = match file {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(%cid, %exec_id, path = %path.display(), error = %e, "cannot open stdin");
            let _ = sandbox.close_stdin(&cid, &exec_id).await;
            return;
        }
    };
    let write = |data: Vec<u8>| {
        let sandbox = sandbox.clone();
        let cid = cid.clone();
        let exec_id = exec_id.clone();
        async move { sandbox.write_stdin(&cid, &exec_id, &data).await }
    };
    if let Err(e) = pump_input(file, write, close).await {
        tracing::debug!(%cid, %exec_id, error = %e, "stdin copy ended");
    }
    if let Err(e) = sandbox.close_stdin(&cid, &exec_id).await {
        tracing::debug!(%cid, %exec_id, error = %e, "close stdin");
    }
}

/// Copies `input` to `write` until EOF, or until `close` was signalled and the input stayed silent
/// for [`CLOSE_GRACE`]. Every byte read is delivered: partial acceptance is retried.
pub async fn pump_input<R, F, Fut>(
    mut input: R,
    mut write: F,
    close: Arc<Notify>,
) -> Result<u64, String>
where
    R: AsyncRead + Unpin,
    F: FnMut(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = Result<usize, SandboxError>>,
{
    let mut buf = vec![0u8; WRITE_CHUNK];
    let mut total = 0u64;
    let mut closing = false;
    loop {
        let n = if closing {
            match tokio::time::timeout(CLOSE_GRACE, input.read(&mut buf)).await {
                Ok(r) => r.map_err(|e| e.to_string())?,
                Err(_) => return Ok(total),
            }
        } else {
            tokio::select! {
                r = input.read(&mut buf) => r.map_err(|e| e.to_string())?,
                _ = close.notified() => { closing = true; continue; }
            }
        };
        if n == 0 {
            return Ok(total);
        }
        let mut off = 0;
        let mut idle = 0u32;
        while off < n {
            let accepted = write(buf[off..n].to_vec())
                .await
                .map_err(|e| e.to_string())?;
            if accepted == 0 {
                // The guest's pipe is full: back off, the bytes stay here.
                idle = (idle + 1).min(8);
                tokio::time::sleep(Duration::from_millis(1 << idle)).await;
                continue;
            }
            idle = 0;
            off += accepted.min(n - off);
        }
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    #[test]
    fn uris_parse() {
        assert_eq!(Target::parse("").unwrap(), Target::None);
        assert_eq!(
            Target::parse("/run/containerd/fifo/1/x-stdout").unwrap(),
            Target::Path("/run/containerd/fifo/1/x-stdout".into())
        );
        assert_eq!(
            Target::parse("file:///var/log/x.log").unwrap(),
            Target::File("/var/log/x.log".into())
        );
        assert!(matches!(
            Target::parse("binary:///usr/bin/logger?a=b"),
            Ok(Target::Binary(_))
        ));
        assert!(matches!(
            Target::parse("binary://not/absolute"),
            Err(StdioError::BinaryUri(_))
        ));
        // Both streams go to one logging binary; it must exist; stdin cannot be one.
        let c =
            StdioConfig::parse("", "binary:///bin/sh?x=1", "binary:///bin/sh?x=1", false).unwrap();
        assert!(matches!(c.stdout, Target::Binary(_)));
        assert!(StdioConfig::parse("", "binary:///bin/sh", "/e", false).is_err());
        assert!(StdioConfig::parse("", "/o", "binary:///bin/sh", false).is_err());
        assert!(StdioConfig::parse("binary:///bin/sh", "", "", false).is_err());
        let e = StdioConfig::parse("", "binary:///no/such/logger", "", false).unwrap_err();
        assert!(e.to_string().contains("/no/such/logger"), "{e}");
        assert!(Target::parse("http://x").is_err());
        let c = StdioConfig::parse("", "/o", "/e", true).unwrap();
        assert_eq!(c.stderr, Target::None, "a terminal has no stderr");
        let c = StdioConfig::parse("", "/o", "/e", false).unwrap();
        assert_eq!(c.stderr, Target::Path("/e".into()));
    }

    #[tokio::test]
    async fn output_is_copied_whole_in_order_until_eof() {
        let chunks: Arc<Mutex<VecDeque<Vec<u8>>>> = Arc::new(Mutex::new(
            (0..100u8).map(|i| vec![i; 1000 + i as usize]).collect(),
        ));
        let expected: Vec<u8> = chunks.lock().unwrap().iter().flatten().copied().collect();
        let mut out = Vec::new();
        let c = chunks.clone();
        let n = pump_output(
            move || {
                let next = c.lock().unwrap().pop_front().unwrap_or_default();
                async move { Ok(next) }
            },
            Some(&mut out),
        )
        .await
        .unwrap();
        assert_eq!(n as usize, expected.len());
        assert_eq!(out, expected);
    }

    #[tokio::test]
    async fn output_backpressure_reads_no_further_than_the_reader_takes() {
        // A pipe with a 4 KiB buffer that nobody reads: the pump must stop asking the agent for more.
        let (mut reader, mut writer) = tokio::io::duplex(4096);
        let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let r = reads.clone();
        let pump = tokio::spawn(async move {
            pump_output(
                move || {
                    r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    async move { Ok(vec![7u8; 1024]) }
                },
                Some(&mut writer),
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let asked = reads.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            asked <= 6,
            "asked the agent for {asked} chunks with a full pipe"
        );
        // Reading frees the pipe and the pump goes on.
        let mut buf = vec![0u8; 64 * 1024];
        let _ = reader.read(&mut buf).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(reads.load(std::sync::atomic::Ordering::SeqCst) > asked);
        pump.abort();
    }

    #[tokio::test]
    async fn output_errors_end_the_copy_and_a_gone_reader_keeps_draining() {
        let r = pump_output::<_, _, Vec<u8>>(
            || async { Err(SandboxError::VmGone("test".into())) },
            None,
        )
        .await;
        assert!(r.unwrap_err().contains("gone"));

        let (reader, mut writer) = tokio::io::duplex(16);
        drop(reader);
        let left = Arc::new(Mutex::new(5));
        let l = left.clone();
        let n = pump_output(
            move || {
                let mut left = l.lock().unwrap();
                let chunk = if *left > 0 { vec![1u8; 100] } else { vec![] };
                *left -= 1;
                async move { Ok(chunk) }
            },
            Some(&mut writer),
        )
        .await
        .unwrap();
        assert_eq!(n, 500, "everything drained although nobody reads");
    }

    #[tokio::test]
    async fn input_is_delivered_whole_despite_partial_acceptance() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let got = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (g, c) = (got.clone(), calls.clone());
        let n = pump_input(
            &data[..],
            move |chunk: Vec<u8>| {
                let g = g.clone();
                let call = c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    // Every third call the guest is full; otherwise it takes at most 1000 bytes.
                    if call % 3 == 2 {
                        return Ok(0);
                    }
                    let take = chunk.len().min(1000);
                    g.lock().unwrap().extend_from_slice(&chunk[..take]);
                    Ok(take)
                }
            },
            Arc::new(Notify::new()),
        )
        .await
        .unwrap();
        assert_eq!(n as usize, data.len());
        assert_eq!(*got.lock().unwrap(), data);
    }

    #[tokio::test]
    async fn close_io_ends_a_silent_stdin_after_the_grace() {
        // A writer that never closes: only CloseIO ends the copy.
        let (_keep_writer, reader) = tokio::io::duplex(64);
        let close = Arc::new(Notify::new());
        let c = close.clone();
        let started = std::time::Instant::now();
        let task = tokio::spawn(pump_input(reader, |_d: Vec<u8>| async { Ok(0) }, c));
        tokio::time::sleep(Duration::from_millis(50)).await;
        close.notify_one();
        let r = tokio::time::timeout(Duration::from_secs(3), task)
            .await
            .expect("stdin copy must end after CloseIO")
            .unwrap();
        assert_eq!(r.unwrap(), 0);
        assert!(started.elapsed() >= CLOSE_GRACE);
    }
}
