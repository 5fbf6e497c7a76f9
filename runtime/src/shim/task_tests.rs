//! Task service against a fake sandbox: state machine, error codes, event order, stdio.

use super::*;
use crate::shim::events::RecordedEvents;
use crate::shim::sandbox::ContainerStats;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One fake process: its output chunks and when it exits.
#[derive(Default)]
struct FakeProc {
    stdout: VecDeque<Vec<u8>>,
    stdin: Vec<u8>,
    stdin_closed: bool,
    exit: Option<u32>,
    started: bool,
}

#[derive(Default)]
struct FakeSandbox {
    procs: Mutex<HashMap<(String, String), FakeProc>>,
    exited: Notify,
    shut_down: AtomicUsize,
    gone: std::sync::atomic::AtomicBool,
    signals: Mutex<Vec<(String, String, u32, bool)>>,
    calls: Mutex<Vec<String>>,
    /// The agent answers nothing (until the VM is killed).
    hung: std::sync::atomic::AtomicBool,
    /// Reasons given to kill_vm.
    vm_kills: Mutex<Vec<String>>,
}

impl FakeSandbox {
    fn key(cid: &str, eid: &str) -> (String, String) {
        (cid.to_owned(), eid.to_owned())
    }
    fn set_exit(&self, cid: &str, eid: &str, code: u32) {
        if let Some(p) = self.procs.lock().unwrap().get_mut(&Self::key(cid, eid)) {
            p.exit = Some(code);
        }
        self.exited.notify_waiters();
    }
    fn push_stdout(&self, cid: &str, eid: &str, data: &[u8]) {
        self.procs
            .lock()
            .unwrap()
            .entry(Self::key(cid, eid))
            .or_default()
            .stdout
            .push_back(data.to_vec());
    }
    fn gone(&self) -> Result<(), SandboxError> {
        if self.gone.load(Ordering::SeqCst) {
            Err(SandboxError::VmGone("fake VM died".into()))
        } else {
            Ok(())
        }
    }
    /// What a call gets from a guest that is gone or hung.
    fn answer(&self) -> Result<(), SandboxError> {
        self.gone()?;
        if self.hung.load(Ordering::SeqCst) {
            Err(SandboxError::Unresponsive(
                "no answer from the fake agent within 1 s".into(),
            ))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Sandbox for FakeSandbox {
    async fn create_container(&self, req: ContainerRequest) -> Result<(), SandboxError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("create {}", req.container_id));
        self.procs
            .lock()
            .unwrap()
            .entry(Self::key(&req.container_id, ""))
            .or_default();
        Ok(())
    }
    async fn start_container(&self, cid: &str) -> Result<(), SandboxError> {
        self.gone()?;
        let mut m = self.procs.lock().unwrap();
        let p = m
            .get_mut(&Self::key(cid, ""))
            .ok_or_else(|| SandboxError::NotFound(cid.into()))?;
        p.started = true;
        Ok(())
    }
    async fn remove_container(&self, cid: &str) -> Result<(), SandboxError> {
        self.calls.lock().unwrap().push(format!("remove {cid}"));
        if self.hung.load(Ordering::SeqCst) {
            self.answer()?;
        }
        self.procs.lock().unwrap().retain(|(c, _), _| c != cid);
        Ok(())
    }
    async fn exec_process(&self, cid: &str, eid: &str, spec: Vec<u8>) -> Result<(), SandboxError> {
        self.gone()?;
        let v: serde_json::Value = serde_json::from_slice(&spec).unwrap();
        assert!(v["args"].is_array());
        let mut m = self.procs.lock().unwrap();
        let p = m.entry(Self::key(cid, eid)).or_default();
        p.started = true;
        Ok(())
    }
    async fn signal_process(
        &self,
        cid: &str,
        eid: &str,
        sig: u32,
        all: bool,
    ) -> Result<(), SandboxError> {
        self.answer()?;
        self.signals
            .lock()
            .unwrap()
            .push((cid.into(), eid.into(), sig, all));
        if sig == 9 || sig == 15 {
            self.set_exit(cid, eid, 128 + sig);
        }
        Ok(())
    }
    async fn wait_process(&self, cid: &str, eid: &str) -> Result<ExitInfo, SandboxError> {
        loop {
            let notified = self.exited.notified();
            self.gone()?;
            if let Some(code) = self
                .procs
                .lock()
                .unwrap()
                .get(&Self::key(cid, eid))
                .and_then(|p| p.exit)
            {
                return Ok(ExitInfo {
                    status: code,
                    exited_at_unix_ns: 1_700_000_000_000_000_000,
                    pid: 42,
                });
            }
            notified.await;
        }
    }
    async fn read_stdout(&self, cid: &str, eid: &str, _len: u32) -> Result<Vec<u8>, SandboxError> {
        loop {
            let notified = self.exited.notified();
            self.gone()?;
            {
                let mut m = self.procs.lock().unwrap();
                let p = m
                    .get_mut(&Self::key(cid, eid))
                    .ok_or_else(|| SandboxError::NotFound(cid.into()))?;
                if let Some(c) = p.stdout.pop_front() {
                    return Ok(c);
                }
                if p.exit.is_some() {
                    return Ok(Vec::new());
                }
            }
            notified.await;
        }
    }
    async fn read_stderr(&self, cid: &str, eid: &str, _len: u32) -> Result<Vec<u8>, SandboxError> {
        loop {
            let notified = self.exited.notified();
            self.gone()?;
            if self
                .procs
                .lock()
                .unwrap()
                .get(&Self::key(cid, eid))
                .map(|p| p.exit.is_some())
                .unwrap_or(true)
            {
                return Ok(Vec::new());
            }
            notified.await;
        }
    }
    async fn write_stdin(&self, cid: &str, eid: &str, data: &[u8]) -> Result<usize, SandboxError> {
        let mut m = self.procs.lock().unwrap();
        let p = m.entry(Self::key(cid, eid)).or_default();
        let take = data.len().min(7);
        p.stdin.extend_from_slice(&data[..take]);
        Ok(take)
    }
    async fn close_stdin(&self, cid: &str, eid: &str) -> Result<(), SandboxError> {
        let mut m = self.procs.lock().unwrap();
        m.entry(Self::key(cid, eid)).or_default().stdin_closed = true;
        Ok(())
    }
    async fn resize_pty(
        &self,
        cid: &str,
        eid: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), SandboxError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("resize {cid}/{eid} {rows}x{cols}"));
        Ok(())
    }
    async fn pause(&self, cid: &str) -> Result<(), SandboxError> {
        self.calls.lock().unwrap().push(format!("pause {cid}"));
        Ok(())
    }
    async fn resume(&self, cid: &str) -> Result<(), SandboxError> {
        self.calls.lock().unwrap().push(format!("resume {cid}"));
        Ok(())
    }
    async fn list_processes(&self, _cid: &str) -> Result<Vec<u32>, SandboxError> {
        Ok(vec![1, 7])
    }
    async fn update_container(&self, cid: &str, r: Vec<u8>) -> Result<(), SandboxError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("update {cid} {}", String::from_utf8_lossy(&r)));
        Ok(())
    }
    async fn stats(&self, _cid: &str) -> Result<ContainerStats, SandboxError> {
        Ok(ContainerStats {
            cpu_usage_usec: 1234,
            memory_usage_bytes: 5 << 20,
            memory_limit_bytes: 64 << 20,
            pids_current: 3,
            memory_stat: vec![("anon".into(), 4096)],
            ..Default::default()
        })
    }
    async fn next_oom_event(&self) -> Result<String, SandboxError> {
        Err(SandboxError::Unimplemented("oom".into()))
    }
    fn host_pid(&self) -> u32 {
        4242
    }
    async fn kill_vm(&self, reason: &str) {
        self.vm_kills.lock().unwrap().push(reason.to_owned());
        self.gone.store(true, Ordering::SeqCst);
        self.exited.notify_waiters();
    }
    async fn shutdown(&self) -> Result<(), SandboxError> {
        self.shut_down.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[derive(Default)]
struct FakeFactory {
    sandbox: Arc<FakeSandbox>,
    boots: Mutex<Vec<String>>,
}

#[async_trait]
impl SandboxFactory for FakeFactory {
    async fn boot(
        &self,
        id: &str,
        _first: &ContainerRequest,
    ) -> Result<Arc<dyn Sandbox>, SandboxError> {
        self.boots.lock().unwrap().push(id.to_owned());
        Ok(self.sandbox.clone())
    }
}

#[derive(Default)]
struct FakeMounter(Mutex<Vec<String>>);

#[async_trait]
impl RootfsMounter for FakeMounter {
    async fn mount(&self, mounts: &[api::Mount], target: &Path) -> Result<(), String> {
        self.0
            .lock()
            .unwrap()
            .push(format!("mount {} {}", mounts.len(), target.display()));
        Ok(())
    }
    async fn unmount(&self, target: &Path) -> Result<(), String> {
        self.0
            .lock()
            .unwrap()
            .push(format!("unmount {}", target.display()));
        Ok(())
    }
}

struct Harness {
    svc: TaskService,
    factory: Arc<FakeFactory>,
    events: Arc<RecordedEvents>,
    mounter: Arc<FakeMounter>,
    exit: Arc<ExitSignal>,
    dir: tempfile::TempDir,
}

fn harness() -> Harness {
    let factory = Arc::new(FakeFactory::default());
    let events = Arc::new(RecordedEvents::default());
    let mounter = Arc::new(FakeMounter::default());
    let exit = Arc::new(ExitSignal::default());
    let svc = TaskService::new(
        factory.clone(),
        events.clone(),
        mounter.clone(),
        exit.clone(),
    )
    .with_namespace("testns");
    Harness {
        svc,
        factory,
        events,
        mounter,
        exit,
        dir: tempfile::tempdir().unwrap(),
    }
}

fn ctx() -> TtrpcContext {
    TtrpcContext {
        mh: ttrpc::MessageHeader::default(),
        metadata: HashMap::new(),
        timeout_nano: 0,
        connection_data: Default::default(),
    }
}

fn code(e: ttrpc::Error) -> ttrpc::Code {
    match e {
        ttrpc::Error::RpcStatus(s) => s.code(),
        other => panic!("not a status: {other:?}"),
    }
}

impl Harness {
    fn bundle(&self, id: &str, annotations: serde_json::Value) -> String {
        let b = self.dir.path().join(id);
        std::fs::create_dir_all(b.join("rootfs")).unwrap();
        std::fs::write(
            b.join("config.json"),
            serde_json::json!({"ociVersion": "1.0.2", "process": {"args": ["sh"]}, "annotations": annotations})
                .to_string(),
        )
        .unwrap();
        b.to_string_lossy().into_owned()
    }

    async fn create(&self, id: &str, stdout: &str) -> TtrpcResult<api::CreateTaskResponse> {
        let bundle = self.bundle(id, serde_json::json!({}));
        self.svc
            .create(
                &ctx(),
                api::CreateTaskRequest {
                    id: id.into(),
                    bundle,
                    stdout: stdout.into(),
                    rootfs: vec![api::Mount {
                        type_: "overlay".into(),
                        source: "overlay".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )
            .await
    }

    async fn start(&self, id: &str, eid: &str) -> TtrpcResult<api::StartResponse> {
        self.svc
            .start(
                &ctx(),
                api::StartRequest {
                    id: id.into(),
                    exec_id: eid.into(),
                    ..Default::default()
                },
            )
            .await
    }

    async fn wait(&self, id: &str, eid: &str) -> api::WaitResponse {
        tokio::time::timeout(
            Duration::from_secs(5),
            self.svc.wait(
                &ctx(),
                api::WaitRequest {
                    id: id.into(),
                    exec_id: eid.into(),
                    ..Default::default()
                },
            ),
        )
        .await
        .expect("wait timed out")
        .unwrap()
    }

    async fn delete(&self, id: &str, eid: &str) -> TtrpcResult<api::DeleteResponse> {
        self.svc
            .delete(
                &ctx(),
                api::DeleteRequest {
                    id: id.into(),
                    exec_id: eid.into(),
                    ..Default::default()
                },
            )
            .await
    }

    async fn state(&self, id: &str, eid: &str) -> api::StateResponse {
        self.svc
            .state(
                &ctx(),
                api::StateRequest {
                    id: id.into(),
                    exec_id: eid.into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn lifecycle_events_come_in_containerds_order_and_output_is_complete() {
    let h = harness();
    let out = h.dir.path().join("stdout.log");
    let uri = format!("file://{}", out.display());
    let r = h.create("c1", &uri).await.unwrap();
    assert_eq!(r.pid, 4242);
    assert_eq!(h.factory.boots.lock().unwrap().as_slice(), ["c1"]);
    assert!(h.mounter.0.lock().unwrap()[0].starts_with("mount 1 "));
    assert_eq!(
        h.state("c1", "").await.status.enum_value(),
        Ok(Status::CREATED)
    );

    h.start("c1", "").await.unwrap();
    assert_eq!(
        h.state("c1", "").await.status.enum_value(),
        Ok(Status::RUNNING)
    );
    let sb = h.factory.sandbox.clone();
    sb.push_stdout("c1", "", b"hello\n");
    sb.push_stdout("c1", "", b"world\n");
    sb.set_exit("c1", "", 3);

    let w = h.wait("c1", "").await;
    assert_eq!(w.exit_status, 3);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "hello\nworld\n");
    let st = h.state("c1", "").await;
    assert_eq!(st.status.enum_value(), Ok(Status::STOPPED));
    assert_eq!(st.exit_status, 3);

    let d = h.delete("c1", "").await.unwrap();
    assert_eq!(d.exit_status, 3);
    assert_eq!(
        h.events.topics(),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    match &h.events.events()[2] {
        TaskEvent::Exit(e) => {
            assert_eq!(e.container_id, "c1");
            assert_eq!(e.id, "c1");
            assert_eq!(e.exit_status, 3);
        }
        other => panic!("{other:?}"),
    }
    assert!(h.mounter.0.lock().unwrap()[1].starts_with("unmount "));
    assert_eq!(
        sb.calls.lock().unwrap().as_slice(),
        ["create c1", "remove c1"]
    );

    // Shutdown with nothing left stops the VM and the shim.
    h.svc
        .shutdown(&ctx(), api::ShutdownRequest::default())
        .await
        .unwrap();
    assert_eq!(sb.shut_down.load(Ordering::SeqCst), 1);
    tokio::time::timeout(Duration::from_secs(1), h.exit.wait())
        .await
        .expect("shim exit signalled");
}

#[tokio::test]
async fn a_logging_binary_gets_the_output_the_arguments_and_the_container_id() {
    use std::os::unix::fs::PermissionsExt;
    let h = harness();
    let d = h.dir.path().display().to_string();
    let script = h.dir.path().join("logger");
    // containerd's contract: fd 3 = stdout, 4 = stderr, 5 = readiness (closed when ready).
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$CONTAINER_ID $CONTAINER_NAMESPACE $*\" > {d}/meta\nexec 5>&-\n\
             cat <&3 > {d}/out &\ncat <&4 > {d}/err\nwait\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let uri = format!("binary://{}?tag=web+1", script.display());
    h.create("c1", &uri).await.unwrap();
    h.start("c1", "").await.unwrap();
    let sb = h.factory.sandbox.clone();
    sb.push_stdout("c1", "", b"line one\n");
    sb.push_stdout("c1", "", b"line two\n");
    sb.set_exit("c1", "", 0);
    assert_eq!(h.wait("c1", "").await.exit_status, 0);
    // Wait returns once the output was delivered and the logging binary exited.
    let read = |f: &str| std::fs::read_to_string(h.dir.path().join(f)).unwrap();
    assert_eq!(read("out"), "line one\nline two\n");
    assert_eq!(read("err"), "");
    assert_eq!(read("meta"), "c1 testns tag web 1\n");
    h.delete("c1", "").await.unwrap();

    // A logging binary that does not exist fails the create, naming it.
    let e = h
        .create("c2", "binary:///no/such/logger")
        .await
        .unwrap_err();
    assert_eq!(code(e.clone()), ttrpc::Code::INVALID_ARGUMENT);
    assert!(format!("{e:?}").contains("/no/such/logger"), "{e:?}");
}

#[tokio::test]
async fn state_errors_use_containerds_codes() {
    let h = harness();
    h.create("c1", "").await.unwrap();
    assert_eq!(
        code(h.create("c1", "").await.unwrap_err()),
        ttrpc::Code::ALREADY_EXISTS
    );
    assert_eq!(
        code(h.start("nope", "").await.unwrap_err()),
        ttrpc::Code::NOT_FOUND
    );
    h.start("c1", "").await.unwrap();
    assert_eq!(
        code(h.start("c1", "").await.unwrap_err()),
        ttrpc::Code::FAILED_PRECONDITION
    );
    assert_eq!(
        code(h.delete("c1", "").await.unwrap_err()),
        ttrpc::Code::FAILED_PRECONDITION,
        "a running task cannot be deleted"
    );
    let e = h
        .svc
        .checkpoint(&ctx(), api::CheckpointTaskRequest::default())
        .await
        .unwrap_err();
    assert_eq!(code(e), ttrpc::Code::UNIMPLEMENTED);
    // Shutdown while a container is left does not stop anything.
    h.svc
        .shutdown(&ctx(), api::ShutdownRequest::default())
        .await
        .unwrap();
    assert_eq!(h.factory.sandbox.shut_down.load(Ordering::SeqCst), 0);
    // Kill, then a second kill of the finished process is NotFound.
    h.svc
        .kill(
            &ctx(),
            api::KillRequest {
                id: "c1".into(),
                signal: 9,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(h.wait("c1", "").await.exit_status, 137);
    let e = h
        .svc
        .kill(
            &ctx(),
            api::KillRequest {
                id: "c1".into(),
                signal: 9,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(e), ttrpc::Code::NOT_FOUND);
    // A bad stdio URI is refused at create.
    let bundle = h.bundle("c2", serde_json::json!({}));
    let e = h
        .svc
        .create(
            &ctx(),
            api::CreateTaskRequest {
                id: "c2".into(),
                bundle,
                stdout: "syslog://localhost".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(e), ttrpc::Code::INVALID_ARGUMENT);
}

#[tokio::test]
async fn exec_events_and_wait_are_per_process() {
    let h = harness();
    h.create("c1", "").await.unwrap();
    let spec = |args: &[&str]| {
        MessageField::some(Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
            value: serde_json::json!({"args": args, "cwd": "/"})
                .to_string()
                .into_bytes(),
            ..Default::default()
        })
    };
    let exec_req = |eid: &str| api::ExecProcessRequest {
        id: "c1".into(),
        exec_id: eid.into(),
        spec: spec(&["true"]),
        ..Default::default()
    };
    // Exec into a container that is not running is refused.
    assert_eq!(
        code(h.svc.exec(&ctx(), exec_req("e1")).await.unwrap_err()),
        ttrpc::Code::FAILED_PRECONDITION
    );
    h.start("c1", "").await.unwrap();
    h.svc.exec(&ctx(), exec_req("e1")).await.unwrap();
    assert_eq!(
        code(h.svc.exec(&ctx(), exec_req("e1")).await.unwrap_err()),
        ttrpc::Code::ALREADY_EXISTS
    );
    assert_eq!(
        h.state("c1", "e1").await.status.enum_value(),
        Ok(Status::CREATED)
    );
    h.start("c1", "e1").await.unwrap();
    let sb = h.factory.sandbox.clone();
    sb.set_exit("c1", "e1", 5);
    assert_eq!(h.wait("c1", "e1").await.exit_status, 5);
    // The init process still runs.
    assert_eq!(
        h.state("c1", "").await.status.enum_value(),
        Ok(Status::RUNNING)
    );
    assert_eq!(h.delete("c1", "e1").await.unwrap().exit_status, 5);
    assert_eq!(
        code(
            h.svc
                .state(
                    &ctx(),
                    api::StateRequest {
                        id: "c1".into(),
                        exec_id: "e1".into(),
                        ..Default::default()
                    }
                )
                .await
                .unwrap_err()
        ),
        ttrpc::Code::NOT_FOUND
    );
    sb.set_exit("c1", "", 0);
    h.wait("c1", "").await;
    h.delete("c1", "").await.unwrap();
    assert_eq!(
        h.events.topics(),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    match &h.events.events()[4] {
        TaskEvent::Exit(e) => assert_eq!((e.id.as_str(), e.exit_status), ("e1", 5)),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn containers_of_one_pod_share_the_vm_and_another_pod_is_refused() {
    let h = harness();
    let pod = serde_json::json!({"io.kubernetes.cri.sandbox-id": "pod1", "io.kubernetes.cri.container-type": "sandbox"});
    for id in ["pod1", "app"] {
        let bundle = h.bundle(id, pod.clone());
        h.svc
            .create(
                &ctx(),
                api::CreateTaskRequest {
                    id: id.into(),
                    bundle,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }
    assert_eq!(
        h.factory.boots.lock().unwrap().as_slice(),
        ["pod1"],
        "one VM"
    );
    let bundle = h.bundle(
        "other",
        serde_json::json!({"io.kubernetes.cri.sandbox-id": "pod2"}),
    );
    let e = h
        .svc
        .create(
            &ctx(),
            api::CreateTaskRequest {
                id: "other".into(),
                bundle,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(e), ttrpc::Code::FAILED_PRECONDITION);
}

#[tokio::test]
async fn a_dead_vm_ends_every_task_with_an_exit_event() {
    let h = harness();
    h.create("c1", "").await.unwrap();
    h.start("c1", "").await.unwrap();
    let sb = h.factory.sandbox.clone();
    sb.gone.store(true, Ordering::SeqCst);
    sb.exited.notify_waiters();
    let w = h.wait("c1", "").await;
    assert_eq!(w.exit_status, VM_GONE_EXIT_STATUS);
    assert_eq!(h.events.topics().last(), Some(&"/tasks/exit"));
    // Delete still works and cleans up.
    h.delete("c1", "").await.unwrap();
    assert!(h.svc.is_empty());
}

fn kill_req(id: &str, signal: u32) -> api::KillRequest {
    api::KillRequest {
        id: id.into(),
        signal,
        ..Default::default()
    }
}

#[tokio::test]
async fn sigkill_that_a_hung_guest_does_not_answer_kills_the_vm_and_ends_the_task() {
    let h = harness();
    h.create("c1", "").await.unwrap();
    h.start("c1", "").await.unwrap();
    let sb = h.factory.sandbox.clone();
    sb.hung.store(true, Ordering::SeqCst);
    // Another signal is only reported as not delivered: the VM stays, the task runs.
    let e = h.svc.kill(&ctx(), kill_req("c1", 15)).await.unwrap_err();
    assert_eq!(code(e), ttrpc::Code::DEADLINE_EXCEEDED);
    assert!(sb.vm_kills.lock().unwrap().is_empty());
    assert_eq!(
        h.state("c1", "").await.status.enum_value(),
        Ok(Status::RUNNING)
    );
    // SIGKILL ends it: the VM is killed, the task exits 137, once.
    h.svc.kill(&ctx(), kill_req("c1", 9)).await.unwrap();
    let kills = sb.vm_kills.lock().unwrap().clone();
    assert_eq!(kills.len(), 1, "{kills:?}");
    assert!(
        kills[0].contains("SIGKILL of container c1") && kills[0].contains("no answer"),
        "{kills:?}"
    );
    assert_eq!(h.wait("c1", "").await.exit_status, VM_GONE_EXIT_STATUS);
    h.delete("c1", "").await.unwrap();
    assert!(h.svc.is_empty());
    assert_eq!(
        h.events.topics(),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    h.svc
        .shutdown(&ctx(), api::ShutdownRequest::default())
        .await
        .unwrap();
    assert_eq!(sb.shut_down.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn delete_that_a_hung_guest_does_not_answer_kills_the_vm_and_succeeds() {
    let h = harness();
    h.create("c1", "").await.unwrap();
    h.start("c1", "").await.unwrap();
    let sb = h.factory.sandbox.clone();
    sb.set_exit("c1", "", 0);
    assert_eq!(h.wait("c1", "").await.exit_status, 0);
    sb.hung.store(true, Ordering::SeqCst);
    h.delete("c1", "").await.unwrap();
    let kills = sb.vm_kills.lock().unwrap().clone();
    assert!(
        kills.len() == 1 && kills[0].contains("delete of container c1"),
        "{kills:?}"
    );
    assert!(h.svc.is_empty());
    assert!(h
        .mounter
        .0
        .lock()
        .unwrap()
        .iter()
        .any(|m| m.starts_with("unmount ")));
    assert_eq!(h.events.topics().last(), Some(&"/tasks/delete"));
}

#[tokio::test]
async fn kill_of_a_created_task_reports_its_exit() {
    let h = harness();
    h.create("c1", "").await.unwrap();
    h.svc
        .kill(
            &ctx(),
            api::KillRequest {
                id: "c1".into(),
                signal: 15,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(h.wait("c1", "").await.exit_status, 143);
    h.delete("c1", "").await.unwrap();
    assert_eq!(
        h.events.topics(),
        ["/tasks/create", "/tasks/exit", "/tasks/delete"]
    );
}

#[tokio::test]
async fn pause_resume_update_stats_pids_resize() {
    let h = harness();
    h.create("c1", "").await.unwrap();
    h.start("c1", "").await.unwrap();
    h.svc
        .pause(
            &ctx(),
            api::PauseRequest {
                id: "c1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        h.state("c1", "").await.status.enum_value(),
        Ok(Status::PAUSED)
    );
    h.svc
        .resume(
            &ctx(),
            api::ResumeRequest {
                id: "c1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        h.state("c1", "").await.status.enum_value(),
        Ok(Status::RUNNING)
    );
    let e = h
        .svc
        .resume(
            &ctx(),
            api::ResumeRequest {
                id: "c1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(e), ttrpc::Code::FAILED_PRECONDITION);

    h.svc
        .update(
            &ctx(),
            api::UpdateTaskRequest {
                id: "c1".into(),
                resources: MessageField::some(Any {
                    type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
                        .into(),
                    value: br#"{"memory":{"limit":1048576}}"#.to_vec(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let stats = h
        .svc
        .stats(
            &ctx(),
            api::StatsRequest {
                id: "c1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let any = stats.stats.unwrap();
    assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
    let m =
        containerd_shim_protos::cgroups_v2::metrics::Metrics::parse_from_bytes(&any.value).unwrap();
    assert_eq!(m.cpu.usage_usec, 1234);
    assert_eq!(m.memory.usage, 5 << 20);
    assert_eq!(m.memory.usage_limit, 64 << 20);
    assert_eq!(m.memory.anon, 4096);
    assert_eq!(m.pids.current, 3);

    let pids = h
        .svc
        .pids(
            &ctx(),
            api::PidsRequest {
                id: "c1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        pids.processes.iter().map(|p| p.pid).collect::<Vec<_>>(),
        [1, 7]
    );
    h.svc
        .resize_pty(
            &ctx(),
            api::ResizePtyRequest {
                id: "c1".into(),
                width: 80,
                height: 24,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let calls = h.factory.sandbox.calls.lock().unwrap().clone();
    assert!(calls.contains(&"pause c1".to_string()));
    assert!(calls.contains(&"resume c1".to_string()));
    assert!(calls.contains(&r#"update c1 {"memory":{"limit":1048576}}"#.to_string()));
    assert!(calls.contains(&"resize c1/ 24x80".to_string()), "{calls:?}");
    assert_eq!(
        h.events.topics(),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/paused",
            "/tasks/resumed"
        ]
    );
}

#[tokio::test]
async fn stdin_fifo_reaches_the_guest_whole_and_is_closed() {
    let h = harness();
    let fifo = h.dir.path().join("stdin");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let bundle = h.bundle("c1", serde_json::json!({}));
    h.svc
        .create(
            &ctx(),
            api::CreateTaskRequest {
                id: "c1".into(),
                bundle,
                stdin: fifo.to_string_lossy().into_owned(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    h.start("c1", "").await.unwrap();
    let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 256) as u8).collect();
    let p = payload.clone();
    let f = fifo.clone();
    tokio::task::spawn_blocking(move || std::fs::write(f, p))
        .await
        .unwrap()
        .unwrap();
    let sb = h.factory.sandbox.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        {
            let m = sb.procs.lock().unwrap();
            let proc_ = &m[&("c1".to_string(), String::new())];
            if proc_.stdin_closed {
                assert_eq!(proc_.stdin, payload);
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "stdin never closed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn many_create_delete_cycles_leave_nothing() {
    let h = harness();
    for i in 0..20 {
        let id = format!("c{i}");
        let bundle = h.bundle(
            &id,
            serde_json::json!({"io.kubernetes.cri.sandbox-id": "pod"}),
        );
        h.svc
            .create(
                &ctx(),
                api::CreateTaskRequest {
                    id: id.clone(),
                    bundle,
                    rootfs: vec![api::Mount::default()],
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        h.start(&id, "").await.unwrap();
        h.factory.sandbox.set_exit(&id, "", 0);
        h.wait(&id, "").await;
        h.delete(&id, "").await.unwrap();
    }
    assert!(h.svc.is_empty());
    assert!(h.factory.sandbox.procs.lock().unwrap().is_empty());
    let m = h.mounter.0.lock().unwrap();
    assert_eq!(m.iter().filter(|s| s.starts_with("mount")).count(), 20);
    assert_eq!(m.iter().filter(|s| s.starts_with("unmount")).count(), 20);
}

#[tokio::test]
async fn a_rootfs_that_is_a_symlink_or_missing_is_refused_before_the_guest_sees_it() {
    let h = harness();
    // A symlink to `/`: refused, naming it, and nothing is created or left mounted.
    let bundle = h.bundle("c-link", serde_json::json!({}));
    let rootfs = std::path::Path::new(&bundle).join("rootfs");
    std::fs::remove_dir(&rootfs).unwrap();
    std::os::unix::fs::symlink("/", &rootfs).unwrap();
    let e = h
        .svc
        .create(
            &ctx(),
            api::CreateTaskRequest {
                id: "c-link".into(),
                bundle: bundle.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    let text = format!("{e:?}");
    assert!(text.contains("is a symlink (to /)"), "{text}");
    assert_eq!(code(e), ttrpc::Code::INVALID_ARGUMENT);
    // Missing: refused too.
    std::fs::remove_file(&rootfs).unwrap();
    let e = h
        .svc
        .create(
            &ctx(),
            api::CreateTaskRequest {
                id: "c-link".into(),
                bundle,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(e), ttrpc::Code::INVALID_ARGUMENT);
    // A healthy container is created right after.
    h.create("c-ok", "").await.unwrap();
}
