//! Kubernetes Events on the object an agent tried to change: held, denied, approved, warned.
//! Emitted off the request path (a bounded queue the handler never waits on), never for dryRun,
//! and rate-limited per object and reason, so an agent in a loop cannot flood the API server.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::metrics::Metrics;

/// Longest note an Event may carry (the API allows 1 kB).
const NOTE_BYTES: usize = 1000;
/// One Event per object and reason per window; repeats are counted, not sent.
const PER_OBJECT_WINDOW: Duration = Duration::from_secs(10);
/// Pause between two Events: at most 20 a second from one replica.
const SPACING: Duration = Duration::from_millis(50);

/// One Event to publish.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub regarding: ObjectReference,
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// The handler's side: a non-blocking sender.
#[derive(Clone)]
pub struct Events {
    tx: Option<mpsc::Sender<Record>>,
    metrics: Arc<Metrics>,
}

impl Events {
    /// Events that go nowhere (tests, offline use).
    pub fn disabled(metrics: Arc<Metrics>) -> Self {
        Self { tx: None, metrics }
    }

    /// Events delivered to a receiver instead of the API server (tests).
    pub fn channel(metrics: Arc<Metrics>, capacity: usize) -> (Self, mpsc::Receiver<Record>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Self { tx: Some(tx), metrics }, rx)
    }

    /// Queues an Event; drops it (and counts the drop) when the queue is full.
    pub fn emit(&self, record: Record) {
        if let Some(tx) = &self.tx
            && tx.try_send(record).is_err()
        {
            self.metrics.events_dropped.inc();
        }
    }

    /// The sender and the worker future that publishes what it receives.
    pub fn start(
        client: kube::Client,
        metrics: Arc<Metrics>,
        instance: Option<String>,
    ) -> (Self, BoxFuture<'static, ()>) {
        let (tx, mut rx) = mpsc::channel::<Record>(1024);
        let recorder = Recorder::new(client, Reporter { controller: "agentguard".into(), instance });
        let worker_metrics = metrics.clone();
        let worker = async move {
            let mut last: HashMap<(String, &'static str), Instant> = HashMap::new();
            while let Some(record) = rx.recv().await {
                let key = (object_key(&record.regarding), record.reason);
                let now = Instant::now();
                last.retain(|_, at| now.duration_since(*at) < PER_OBJECT_WINDOW);
                if last.contains_key(&key) {
                    worker_metrics.events_suppressed.inc();
                    continue;
                }
                last.insert(key, now);
                let event = Event {
                    type_: if record.warning { EventType::Warning } else { EventType::Normal },
                    reason: record.reason.into(),
                    note: Some(truncate(&record.note)),
                    action: "Admission".into(),
                    secondary: None,
                };
                if let Err(e) = recorder.publish(&event, &record.regarding).await {
                    tracing::warn!(error = %e, reason = record.reason, "cannot publish an Event");
                }
                tokio::time::sleep(SPACING).await;
            }
        };
        (Self { tx: Some(tx), metrics }, worker.boxed())
    }
}

fn object_key(r: &ObjectReference) -> String {
    match &r.uid {
        Some(uid) => uid.clone(),
        None => format!("{:?}/{:?}/{:?}", r.kind, r.namespace, r.name),
    }
}

fn truncate(note: &str) -> String {
    if note.len() <= NOTE_BYTES {
        return note.to_owned();
    }
    let mut end = NOTE_BYTES - 3;
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &note[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_fit_the_api_limit() {
        let long = "é".repeat(2000);
        let t = truncate(&long);
        assert!(t.len() <= NOTE_BYTES && t.ends_with("..."));
        assert_eq!(truncate("short"), "short");
    }

    #[tokio::test]
    async fn a_full_queue_drops_instead_of_blocking() {
        let metrics = Arc::new(Metrics::default());
        let (tx, _rx) = mpsc::channel(1);
        let events = Events { tx: Some(tx), metrics: metrics.clone() };
        let record = Record {
            regarding: ObjectReference::default(),
            warning: true,
            reason: "Denied",
            note: String::new(),
        };
        events.emit(record.clone());
        events.emit(record);
        assert!(metrics.encode().contains("agentguard_events_dropped_total 1"));
    }
}
