//! Entering a pod network namespace without moving the caller's threads.
//!
//! `setns(2)` changes the namespace of the *calling thread* only, so the work is done on a dedicated
//! std thread that enters the namespace, runs a current-thread tokio runtime with its own rtnetlink
//! connection (the netlink socket belongs to the namespace it was created in), and exits afterwards.
//! Sockets and tap fds created there stay bound to the pod namespace after the thread is gone.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::sched::{setns, CloneFlags};
use tracing::{debug, warn};

use super::NetworkError;

/// The rtnetlink handle given to a closure run by [`run_in_netns`]; it talks to the pod namespace.
pub type NetlinkHandle = rtnetlink::Handle;

/// Opens `path` and checks that it is a network namespace (nsfs, `NS_GET_NSTYPE` == `CLONE_NEWNET`).
pub fn open_netns(path: &Path) -> Result<File, NetworkError> {
    let file = File::open(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            NetworkError::NetnsNotFound {
                path: path.to_path_buf(),
            }
        } else {
            NetworkError::NetnsOpen {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    let fs = nix::sys::statfs::fstatfs(&file).map_err(|e| NetworkError::NetnsOpen {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    // The field's integer type differs between libc flavours; the magic fits in 32 bits.
    if fs.filesystem_type().0 as u64 != libc::NSFS_MAGIC as u64 {
        return Err(NetworkError::NotANetns {
            path: path.to_path_buf(),
            reason: "not a namespace file (not on nsfs; is the netns still mounted?)".into(),
        });
    }
    // SAFETY: NS_GET_NSTYPE takes no argument and only returns the namespace type of the fd, which
    // stays open (borrowed from `file`) for the duration of the call.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), libc::NS_GET_NSTYPE) };
    if kind < 0 {
        return Err(NetworkError::NotANetns {
            path: path.to_path_buf(),
            reason: format!("NS_GET_NSTYPE failed: {}", io::Error::last_os_error()),
        });
    }
    if kind != libc::CLONE_NEWNET {
        return Err(NetworkError::NotANetns {
            path: path.to_path_buf(),
            reason: format!("a namespace of type {kind:#x}, not CLONE_NEWNET"),
        });
    }
    Ok(file)
}

/// Runs `f` inside the network namespace at `netns` (e.g. `/var/run/netns/cni-...`) and returns its
/// result.
///
/// `f` runs on a fresh std thread that has entered the namespace, under a current-thread tokio
/// runtime, and gets an rtnetlink handle connected inside the namespace. The calling thread (and every
/// other thread of the process) never changes namespace; awaiting the result does not block the
/// caller's executor. If the returned future is dropped before completion, `f` still runs to the end
/// on its thread and its result is dropped.
pub async fn run_in_netns<F, Fut, T>(netns: &Path, f: F) -> Result<T, NetworkError>
where
    F: FnOnce(NetlinkHandle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetworkError>> + 'static,
    T: Send + 'static,
{
    run_in_netns_or_undo(netns, f, |_, _| async {}).await
}

/// [`run_in_netns`], but when the caller has stopped waiting by the time `f` succeeds (its future
/// was dropped), `undo` gets the undeliverable result, still inside the namespace, to take back
/// what `f` did.
pub(crate) async fn run_in_netns_or_undo<F, Fut, T, U, UFut>(
    netns: &Path,
    f: F,
    undo: U,
) -> Result<T, NetworkError>
where
    F: FnOnce(NetlinkHandle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetworkError>> + 'static,
    T: Send + 'static,
    U: FnOnce(NetlinkHandle, T) -> UFut + Send + 'static,
    UFut: Future<Output = ()> + 'static,
{
    let file = open_netns(netns)?;
    let path = netns.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread_path = path.clone();
    std::thread::Builder::new()
        .name("capsa-netns".into())
        .spawn(move || netns_thread(file, &thread_path, f, undo, tx))
        .map_err(|source| NetworkError::Thread {
            path: path.clone(),
            source,
        })?;
    rx.await
        .map_err(|_| NetworkError::ThreadPanicked { path })?
}

type Reply<T> = tokio::sync::oneshot::Sender<Result<T, NetworkError>>;

fn netns_thread<F, Fut, T, U, UFut>(file: File, path: &Path, f: F, undo: U, tx: Reply<T>)
where
    F: FnOnce(NetlinkHandle) -> Fut,
    Fut: Future<Output = Result<T, NetworkError>>,
    U: FnOnce(NetlinkHandle, T) -> UFut,
    UFut: Future<Output = ()>,
{
    if let Err(e) = setns(&file, CloneFlags::CLONE_NEWNET) {
        // The receiver is only gone when the caller stopped waiting: nobody to tell then.
        let _ = tx.send(Err(NetworkError::Setns {
            path: path.to_path_buf(),
            source: e.into(),
        }));
        return;
    }
    drop(file);
    debug!(netns = %path.display(), "entered network namespace");
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(source) => {
            let _ = tx.send(Err(NetworkError::Thread {
                path: path.to_path_buf(),
                source,
            }));
            return;
        }
    };
    rt.block_on(async move {
        let (connection, handle, _) = match rtnetlink::new_connection() {
            Ok(c) => c,
            Err(source) => {
                let _ = tx.send(Err(NetworkError::NetlinkSocket {
                    path: path.to_path_buf(),
                    source,
                }));
                return;
            }
        };
        let conn_task = tokio::spawn(connection);
        let result = f(handle.clone()).await;
        if let Err(Ok(value)) = tx.send(result) {
            warn!(netns = %path.display(), "caller stopped waiting; undoing the namespace work");
            undo(handle, value).await;
        }
        conn_task.abort();
    });
}
