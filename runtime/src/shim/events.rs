//! Task events to containerd. The task service calls [`EventSink::publish`] in the order the events
//! must arrive (TaskCreate → TaskStart → TaskExit → TaskDelete; TaskExecAdded → TaskExecStarted →
//! TaskExit); the sinks keep that order.

use std::sync::Mutex;

use async_trait::async_trait;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::events::task as ev;
use containerd_shim_protos::protobuf::MessageDyn;

pub const TOPIC_CREATE: &str = "/tasks/create";
pub const TOPIC_START: &str = "/tasks/start";
pub const TOPIC_EXIT: &str = "/tasks/exit";
pub const TOPIC_DELETE: &str = "/tasks/delete";
pub const TOPIC_OOM: &str = "/tasks/oom";
pub const TOPIC_EXEC_ADDED: &str = "/tasks/exec-added";
pub const TOPIC_EXEC_STARTED: &str = "/tasks/exec-started";
pub const TOPIC_PAUSED: &str = "/tasks/paused";
pub const TOPIC_RESUMED: &str = "/tasks/resumed";

/// A task event with its topic.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskEvent {
    Create(ev::TaskCreate),
    Start(ev::TaskStart),
    Exit(ev::TaskExit),
    Delete(ev::TaskDelete),
    Oom(ev::TaskOOM),
    ExecAdded(ev::TaskExecAdded),
    ExecStarted(ev::TaskExecStarted),
    Paused(ev::TaskPaused),
    Resumed(ev::TaskResumed),
}

impl TaskEvent {
    pub fn topic(&self) -> &'static str {
        match self {
            TaskEvent::Create(_) => TOPIC_CREATE,
            TaskEvent::Start(_) => TOPIC_START,
            TaskEvent::Exit(_) => TOPIC_EXIT,
            TaskEvent::Delete(_) => TOPIC_DELETE,
            TaskEvent::Oom(_) => TOPIC_OOM,
            TaskEvent::ExecAdded(_) => TOPIC_EXEC_ADDED,
            TaskEvent::ExecStarted(_) => TOPIC_EXEC_STARTED,
            TaskEvent::Paused(_) => TOPIC_PAUSED,
            TaskEvent::Resumed(_) => TOPIC_RESUMED,
        }
    }

    fn into_message(self) -> Box<dyn MessageDyn> {
        match self {
            TaskEvent::Create(e) => Box::new(e),
            TaskEvent::Start(e) => Box::new(e),
            TaskEvent::Exit(e) => Box::new(e),
            TaskEvent::Delete(e) => Box::new(e),
            TaskEvent::Oom(e) => Box::new(e),
            TaskEvent::ExecAdded(e) => Box::new(e),
            TaskEvent::ExecStarted(e) => Box::new(e),
            TaskEvent::Paused(e) => Box::new(e),
            TaskEvent::Resumed(e) => Box::new(e),
        }
    }
}

#[async_trait]
pub trait EventSink: Send + Sync + 'static {
    async fn publish(&self, event: TaskEvent);
}

/// Sends events to containerd's events service at `TTRPC_ADDRESS` (through containerd-shim's queue,
/// which forwards them one at a time, in order).
pub struct ContainerdEvents {
    publisher: RemotePublisher,
    namespace: String,
}

impl ContainerdEvents {
    pub fn new(publisher: RemotePublisher, namespace: impl Into<String>) -> Self {
        Self {
            publisher,
            namespace: namespace.into(),
        }
    }
}

#[async_trait]
impl EventSink for ContainerdEvents {
    async fn publish(&self, event: TaskEvent) {
        let topic = event.topic();
        let ctx = containerd_shim::Context::default();
        if let Err(e) = self
            .publisher
            .publish(ctx, topic, &self.namespace, event.into_message())
            .await
        {
            tracing::error!(topic, error = %e, "cannot publish event");
        }
    }
}

/// Records events (tests, and `capsa run`, which has no containerd).
#[derive(Default)]
pub struct RecordedEvents(pub Mutex<Vec<TaskEvent>>);

impl RecordedEvents {
    pub fn topics(&self) -> Vec<&'static str> {
        self.0
            .lock()
            .map(|v| v.iter().map(TaskEvent::topic).collect())
            .unwrap_or_default()
    }

    pub fn events(&self) -> Vec<TaskEvent> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

#[async_trait]
impl EventSink for RecordedEvents {
    async fn publish(&self, event: TaskEvent) {
        if let Ok(mut v) = self.0.lock() {
            v.push(event);
        }
    }
}
