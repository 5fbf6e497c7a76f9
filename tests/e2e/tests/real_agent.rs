//! The runtime's agent client against the real `capsa-agent` binary running on this host (not as PID 1,
//! listening on a Unix socket): checks the two sides agree on the wire. Needs no KVM. The agent binary is
//! `CAPSA_AGENT`, else `target/{release,debug}/capsa-agent` under the workspace; skipped when absent.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use capsa_runtime::agent_client::{AgentAddress, AgentClient};

fn agent_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CAPSA_AGENT").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let root = capsa_e2e::workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    ["release", "debug"]
        .into_iter()
        .map(|p| target.join(p).join("capsa-agent"))
        .filter(|p| p.exists())
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// `agent` serving on the Unix socket `sock` (killed when the handle is dropped).
fn spawn_agent(agent: &std::path::Path, sock: &std::path::Path) -> tokio::process::Child {
    tokio::process::Command::new(agent)
        .arg("--listen")
        .arg(format!("unix://{}", sock.display()))
        .args(["--log-level", "warn"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", agent.display()))
}

#[tokio::test]
async fn check_details_destroy_against_capsa_agent() {
    let Some(agent) = agent_binary() else {
        eprintln!(
            "SKIPPED: no capsa-agent binary (cargo build -p capsa-agent, or set CAPSA_AGENT)"
        );
        return;
    };
    let root = capsa_e2e::run_root();
    let sock = root.path().join("agent.sock");
    let mut child = spawn_agent(&agent, &sock);

    let client =
        AgentClient::wait_ready(&AgentAddress::Unix(sock.clone()), Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    let d = client.guest_details().await.expect("GetGuestDetails");
    eprintln!("{d:?}");
    assert!(!d.kernel_release.is_empty());
    assert!(d.online_cpus >= 1);
    assert!(d.mem_total_bytes > 0);
    assert!(!d.agent_is_init);
    // DestroySandbox: the agent answers, then exits when it is not PID 1.
    client.destroy_sandbox().await.expect("DestroySandbox");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("capsa-agent still running 10 s after DestroySandbox")
        .unwrap();
    eprintln!("capsa-agent exited: {status}");
}

/// `wait_ready_notified`: a notification starts an attempt, a lost notifier falls back to polling, and with
/// nobody there it gives up at the deadline.
#[tokio::test]
async fn ready_notification_and_its_fallbacks() {
    let Some(agent) = agent_binary() else {
        eprintln!("SKIPPED: no capsa-agent binary");
        return;
    };
    let root = capsa_e2e::run_root();
    let sock = root.path().join("agent.sock");
    let _child = spawn_agent(&agent, &sock);
    let addr = AgentAddress::Unix(sock.clone());

    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(()).await.unwrap();
    let client = AgentClient::wait_ready_notified(&addr, Duration::from_secs(20), rx)
        .await
        .unwrap_or_else(|e| panic!("notified: {e}"));
    client.check().await.expect("Check");

    let (tx, rx) = tokio::sync::mpsc::channel(1);
    drop(tx);
    AgentClient::wait_ready_notified(&addr, Duration::from_secs(20), rx)
        .await
        .unwrap_or_else(|e| panic!("notifier gone: {e}"));

    let (_tx, rx) = tokio::sync::mpsc::channel(1);
    let nobody = AgentAddress::Unix(root.path().join("nobody.sock"));
    let started = std::time::Instant::now();
    let err = AgentClient::wait_ready_notified(&nobody, Duration::from_millis(600), rx)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not ready after"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "gave up late");
}
