//! Kubernetes Events on the object an agent tried to change: held, denied, approved, warned.
//! Emitted off the request path (a bounded queue the handler never waits on), never for dryRun,
//! and rate-limited per object, reason and part, so an agent in a loop cannot flood the API server.
//!
//! An Event that reports what a request claims to have written (an approval recorded) is not
//! trusted to the request: anyone who reaches the webhook port can send one. It is published only
//! once the live object, read back from the API server, carries that approval ([`Stored`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, ApiResource, DynamicObject};
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
    /// Tells apart several Events of one reason on one object sent together (the parts of a
    /// long change): each part is rate-limited on its own.
    pub part: u16,
    /// When set, the Event is published only once the live object carries this approval.
    pub stored: Option<Stored>,
}

impl Record {
    pub fn new(regarding: ObjectReference, warning: bool, reason: &'static str, note: String) -> Self {
        Self { regarding, warning, reason, note, part: 0, stored: None }
    }
}

/// An approval a request claims to write: checked against the live object before it is reported.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    pub resource: ApiResource,
    pub namespace: Option<String>,
    pub name: String,
    pub uid: String,
    /// The approval annotation written (`agentguard.io/approve` or one approver's own).
    pub key: String,
    pub value: String,
}

/// How long a claimed approval may take to be stored after it was admitted.
const STORED_WITHIN: Duration = Duration::from_secs(10);
/// Reads of the live object: every 100 ms for the first 2 s (the write lands within
/// milliseconds of the answer), then every second.
const STORED_POLL_FAST: Duration = Duration::from_millis(100);
const STORED_POLL_SLOW: Duration = Duration::from_secs(1);
const STORED_FAST_FOR: Duration = Duration::from_secs(2);
/// Claimed approvals checked at once; more are dropped (and counted), so a flood of requests
/// that did not come from the API server cannot turn into a flood of reads.
const STORED_AT_ONCE: usize = 16;

impl Stored {
    /// Whether the live object (same uid) carries the approval, polling until it is stored or
    /// `STORED_WITHIN` passes. A metadata-only read: no object contents are fetched.
    async fn confirmed(&self, client: &kube::Client) -> bool {
        let api: Api<DynamicObject> = match &self.namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &self.resource),
            None => Api::all_with(client.clone(), &self.resource),
        };
        let started = Instant::now();
        let deadline = started + STORED_WITHIN;
        loop {
            match api.get_metadata_opt(&self.name).await {
                Ok(Some(live)) => {
                    let meta = &live.metadata;
                    let value = meta.annotations.as_ref().and_then(|a| a.get(&self.key));
                    if meta.uid.as_deref() != Some(self.uid.as_str()) {
                        return false;
                    }
                    if value == Some(&self.value) {
                        return true;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, name = %self.name, "cannot read the object an approval was written on");
                    return false;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            let fast = started.elapsed() < STORED_FAST_FOR;
            tokio::time::sleep(if fast { STORED_POLL_FAST } else { STORED_POLL_SLOW }).await;
        }
    }
}

/// The handler's side: a non-blocking sender.
#[derive(Clone)]
pub struct Events {
    tx: Option<mpsc::Sender<Record>>,
    metrics: Arc<Metrics>,
    /// Reads back claimed approvals; without it, such Events are dropped.
    client: Option<kube::Client>,
    checking: Arc<tokio::sync::Semaphore>,
}

impl Events {
    /// Events that go nowhere (tests, offline use).
    pub fn disabled(metrics: Arc<Metrics>) -> Self {
        Self { tx: None, metrics, client: None, checking: checks() }
    }

    /// Events delivered to a receiver instead of the API server (tests).
    pub fn channel(metrics: Arc<Metrics>, capacity: usize) -> (Self, mpsc::Receiver<Record>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Self { tx: Some(tx), metrics, client: None, checking: checks() }, rx)
    }

    /// Queues an Event; drops it (and counts the drop) when the queue is full. An Event about a
    /// claimed approval is queued only once the live object confirms it.
    pub fn emit(&self, mut record: Record) {
        let Some(tx) = &self.tx else { return };
        if let Some(stored) = record.stored.take() {
            let Some(client) = self.client.clone() else {
                tracing::debug!(
                    reason = record.reason,
                    "no client to confirm a claimed approval; Event dropped"
                );
                return;
            };
            let Ok(permit) = self.checking.clone().try_acquire_owned() else {
                tracing::warn!(name = %stored.name, "too many approvals being checked at once; Event dropped");
                self.metrics.events_dropped.inc();
                return;
            };
            let (tx, metrics) = (tx.clone(), self.metrics.clone());
            tokio::spawn(async move {
                let _permit = permit;
                if !stored.confirmed(&client).await {
                    tracing::warn!(
                        name = %stored.name, uid = %stored.uid,
                        "an admitted approval was never stored on the object (a request that did not come from the API server, or a write refused later); no Event"
                    );
                    return;
                }
                if tx.try_send(record).is_err() {
                    metrics.events_dropped.inc();
                }
            });
            return;
        }
        if tx.try_send(record).is_err() {
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
        let recorder = Recorder::new(client.clone(), Reporter { controller: "agentguard".into(), instance });
        let worker_metrics = metrics.clone();
        let worker = async move {
            let mut last: HashMap<(String, &'static str, u16), Instant> = HashMap::new();
            while let Some(record) = rx.recv().await {
                let key = (object_key(&record.regarding), record.reason, record.part);
                let now = Instant::now();
                last.retain(|_, at| now.duration_since(*at) < PER_OBJECT_WINDOW);
                // Each approval's Event is the trail's evidence of who wrote it (several
                // approvers approve one object within seconds): never suppressed. Only approvers'
                // valid, stored approvals get one, so they cannot flood.
                if last.contains_key(&key) && record.reason != "ApprovalRecorded" {
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
        (Self { tx: Some(tx), metrics, client: Some(client), checking: checks() }, worker.boxed())
    }
}

/// Bytes of change text per Event (the note also carries a short header).
const PART_BYTES: usize = 900;
/// The prefix of every part's note: `change <id> part <i>/<n>: `.
pub const PART_PREFIX: &str = "change ";

/// Opens where an agent's request came from at the end of a note: `[from: pod=… credential-id=…]`
/// (see [`crate::engine::api::Attribution`]).
pub const FROM_PREFIX: &str = "[from: ";

/// The whole change, as the notes of consecutive Events: `change <id> part <i>/<n>: <text>`,
/// the text being [`crate::engine::diff::Change::full`]'s lines joined by newlines, cut at character boundaries.
/// The engine refuses to issue a ticket for a change larger than the Events can carry.
pub fn change_parts(change: &crate::engine::diff::Change) -> Vec<String> {
    let text = change.full().join("\n");
    let mut chunks = Vec::new();
    let mut rest = text.as_str();
    while !rest.is_empty() {
        let mut end = rest.len().min(PART_BYTES);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        chunks.push(&rest[..end]);
        rest = &rest[end..];
    }
    let n = chunks.len();
    let id = change.id();
    chunks.iter().enumerate().map(|(i, c)| format!("{PART_PREFIX}{id} part {}/{n}: {c}", i + 1)).collect()
}

fn checks() -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(STORED_AT_ONCE))
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
    fn a_long_change_is_carried_whole_in_parts() {
        use serde_json::json;
        let old = json!({"data": (0..60).map(|i| (format!("k{i:02}"), json!("é".repeat(40)))).collect::<serde_json::Map<_, _>>()});
        let new = json!({"data": (0..60).map(|i| (format!("k{i:02}"), json!("ü".repeat(40)))).collect::<serde_json::Map<_, _>>()});
        let change = crate::engine::diff::Change::between(&old, &new);
        let parts = change_parts(&change);
        assert!(parts.len() > 1);
        let mut joined = String::new();
        for (i, p) in parts.iter().enumerate() {
            assert!(p.len() <= NOTE_BYTES, "{}", p.len());
            let head = format!("change {} part {}/{}: ", change.id(), i + 1, parts.len());
            joined.push_str(p.strip_prefix(&head).unwrap());
        }
        assert_eq!(joined, change.full().join("\n"));
    }

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
        let events = Events { tx: Some(tx), metrics: metrics.clone(), client: None, checking: checks() };
        let record = Record::new(ObjectReference::default(), true, "Denied", String::new());
        events.emit(record.clone());
        events.emit(record);
        assert!(metrics.encode().contains("agentguard_events_dropped_total 1"));
    }
}
