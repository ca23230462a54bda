//! The churn circuit breaker: a policy's `churnLimit` caps how many guarded operations one agent
//! may make per window. Once an agent has spent its budget, every further operation the policy
//! guards is refused until the window passes or a human resets the count.
//!
//! Counts live in the API server, one Lease per (policy, counted subject) in agentguard's
//! namespace — the subject is the agent, its agent namespace, or the whole policy, as the
//! policy's `churnLimit.scope` says (see [`ChurnBudget::subject`]) — so
//! all replicas share them. Every write carries the resourceVersion it was computed from: when
//! two replicas charge at once, one write fails with a conflict and is redone on the newer
//! count, so no operation is lost or counted twice. The window is fixed: it opens with the
//! first charged operation and closes `window` later.
//!
//! Within a process, the charges of one Lease are coalesced: one writer per Lease takes every
//! charge waiting for it and spends them in one write (see [`spend`]), so a flood of one agent's
//! changes costs one Lease write per round trip, not one per change, and three replicas
//! conflict a few times per second rather than on every change. The writer keeps the Lease it
//! last wrote and writes on it directly; only a refusal or a conflict reads the Lease again, so
//! a count a human reset is never refused from memory.
//!
//! Resetting needs no special tool, only rights agents must not have (agentguard's namespace):
//! `kubectl annotate lease NAME -n NAMESPACE agentguard.io/reset-churn=now --overwrite`
//! (the refusal message prints the exact command). The next charge opens a new window.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use crate::engine::policy::ChurnBudget;
use crate::metrics::policy_id_label;

pub const POLICY_ANNOTATION: &str = "agentguard.io/churn-policy";
pub const AGENT_ANNOTATION: &str = "agentguard.io/churn-agent";
pub const COUNT_ANNOTATION: &str = "agentguard.io/churn-count";
/// Set by a human to start a new window at once.
pub const RESET_ANNOTATION: &str = "agentguard.io/reset-churn";
pub const CHURN_LABEL: &str = "agentguard.io/churn";

/// How many times a charge is redone when another replica wrote first.
const ATTEMPTS: usize = 10;

/// The Lease holding one agent's count under one policy: a stable name from a digest, since
/// usernames and policy names together can exceed a name's length or contain `:`.
pub fn lease_name(budget: &ChurnBudget, agent: &str) -> String {
    let policy = policy_id_label(&budget.policy);
    let digest = Sha256::digest(format!("{policy}\n{agent}").as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("agentguard-churn-{hex}")
}

/// One agent's standing under one budget.
#[derive(Clone, Debug, PartialEq)]
pub struct Tally {
    pub count: u32,
    pub window_start: Timestamp,
}

impl Tally {
    /// What a Lease says at `now`: a lapsed window, a reset or no Lease at all start afresh.
    pub fn of(lease: Option<&Lease>, budget: &ChurnBudget, now: Timestamp) -> Self {
        let fresh = Tally { count: 0, window_start: now };
        let Some(lease) = lease else { return fresh };
        let annotations = lease.metadata.annotations.as_ref();
        if annotations.is_some_and(|a| a.contains_key(RESET_ANNOTATION)) {
            return fresh;
        }
        let count = annotations.and_then(|a| a.get(COUNT_ANNOTATION)).and_then(|c| c.parse().ok());
        let start = lease.spec.as_ref().and_then(|s| s.acquire_time.as_ref()).map(|t| t.0);
        match (count, start) {
            (Some(count), Some(start)) if now < start + budget.window => Tally { count, window_start: start },
            _ => fresh,
        }
    }

    pub fn spent(&self, budget: &ChurnBudget) -> bool {
        self.count >= budget.max_operations
    }
}

/// Why an operation was refused by the breaker.
#[derive(Clone, Debug, PartialEq)]
pub struct Tripped {
    pub budget: ChurnBudget,
    pub tally: Tally,
    pub lease: String,
    pub namespace: String,
}

impl std::fmt::Display for Tripped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let until = self.tally.window_start + self.budget.window;
        write!(
            f,
            "churn limit of {} reached: {} guarded operations since {} (limit {} per {:#}); \
             refused until {until}. A human can reset it: kubectl annotate lease {} -n {} {RESET_ANNOTATION}=now --overwrite",
            self.budget.policy,
            self.tally.count,
            self.tally.window_start,
            self.budget.max_operations,
            self.budget.window,
            self.lease,
            self.namespace,
        )
    }
}

/// How many of `n` charges waiting on one Lease `tally` leaves room for, and the tally after
/// them: the first ones are admitted in order, the rest find the budget spent.
pub fn spend(tally: &Tally, budget: &ChurnBudget, n: usize) -> (usize, Tally) {
    let room = usize::try_from(budget.max_operations.saturating_sub(tally.count)).unwrap_or(usize::MAX);
    let admitted = n.min(room);
    let count = tally.count.saturating_add(u32::try_from(admitted).unwrap_or(u32::MAX));
    (admitted, Tally { count, window_start: tally.window_start })
}

/// A pause before attempt `attempt + 1` at a Lease another replica wrote first: a random part of
/// 5 ms per attempt so far (the clock's nanoseconds are random enough to part two replicas).
fn backoff(attempt: usize) -> std::time::Duration {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    let ceiling = 5_000 * (attempt as u64 + 1);
    std::time::Duration::from_micros(u64::from(nanos) % ceiling)
}

/// One request's charge of one Lease, waiting for the Lease's writer.
struct Waiter {
    agent: String,
    budget: ChurnBudget,
    /// `Ok(None)`: spent; `Ok(Some)`: the budget was spent already; `Err`: not counted.
    reply: oneshot::Sender<Result<Option<Tripped>, String>>,
}

/// The charges waiting on one Lease, whether a writer is spending them, and the Lease as this
/// process last wrote it.
#[derive(Default)]
struct Queue {
    waiting: Vec<Waiter>,
    writing: bool,
    last: Option<Lease>,
}

struct Shared {
    api: Api<Lease>,
    namespace: String,
    queues: Mutex<HashMap<String, Queue>>,
}

/// Charges churn budgets against the Leases in agentguard's namespace.
pub struct Breaker {
    shared: Arc<Shared>,
}

impl Breaker {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        let shared = Shared {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            queues: Default::default(),
        };
        Self { shared: Arc::new(shared) }
    }

    /// Spends one operation of each budget for `agent`, or says which budget is spent. With
    /// `dry_run` nothing is written: the answer is what a real request would get.
    pub async fn charge(
        &self,
        agent: &str,
        budgets: &[ChurnBudget],
        dry_run: bool,
    ) -> Result<Option<Tripped>> {
        for budget in budgets {
            let tripped = match dry_run {
                true => self.shared.peek(agent, budget).await?,
                false => self.charge_one(agent, budget).await?,
            };
            if tripped.is_some() {
                return Ok(tripped);
            }
        }
        Ok(None)
    }

    /// Queues one charge on its Lease's writer (starting one if none is running) and waits.
    async fn charge_one(&self, agent: &str, budget: &ChurnBudget) -> Result<Option<Tripped>> {
        // Counted per subject; the agent is recorded as the last one to spend.
        let subject = if budget.subject.is_empty() { agent } else { budget.subject.as_str() };
        let name = lease_name(budget, subject);
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut queues = self.shared.queues.lock().unwrap_or_else(|e| e.into_inner());
            if queues.len() > 1024 {
                queues.retain(|_, q| q.writing || !q.waiting.is_empty());
            }
            let queue = queues.entry(name.clone()).or_default();
            queue.waiting.push(Waiter { agent: agent.to_owned(), budget: budget.clone(), reply });
            !std::mem::replace(&mut queue.writing, true)
        };
        if start {
            // A task of its own, not this request's: a request refused at its deadline must not
            // take the charges of others waiting on the same Lease down with it.
            tokio::spawn(self.shared.clone().write(name.clone()));
        }
        match answer.await {
            Ok(outcome) => outcome.map_err(anyhow::Error::msg),
            Err(_) => anyhow::bail!("the writer of lease {name} stopped before counting this charge"),
        }
    }
}

/// Clears a Lease's `writing` if its writer ends without finding its queue empty (it panicked),
/// so that the next charge starts another.
struct Writing<'a> {
    shared: &'a Shared,
    name: &'a str,
    done: bool,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut queues = self.shared.queues.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(queue) = queues.get_mut(self.name) {
            queue.writing = false;
        }
    }
}

impl Shared {
    /// What a charge would get, read from the API server, with nothing written.
    async fn peek(&self, agent: &str, budget: &ChurnBudget) -> Result<Option<Tripped>> {
        let subject = if budget.subject.is_empty() { agent } else { budget.subject.as_str() };
        let name = lease_name(budget, subject);
        let lease = self.api.get_opt(&name).await.with_context(|| format!("reading lease {name}"))?;
        let tally = Tally::of(lease.as_ref(), budget, Timestamp::now());
        Ok(tally.spent(budget).then(|| self.tripped(budget, tally, name)))
    }

    fn tripped(&self, budget: &ChurnBudget, tally: Tally, lease: String) -> Tripped {
        Tripped { budget: budget.clone(), tally, lease, namespace: self.namespace.clone() }
    }

    /// Lease `name`'s writer: spends what waits on it, a batch at a time, until nothing does.
    async fn write(self: Arc<Self>, name: String) {
        let mut writing = Writing { shared: &self, name: &name, done: false };
        loop {
            let (batch, last) = {
                let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
                let Some(queue) = queues.get_mut(&name) else {
                    writing.done = true;
                    return;
                };
                // Requests refused meanwhile (their deadline passed) are not charged.
                queue.waiting.retain(|w| !w.reply.is_closed());
                let Some(first) = queue.waiting.first() else {
                    // Cleared under the lock a new charge takes to see whether a writer runs.
                    queue.writing = false;
                    writing.done = true;
                    return;
                };
                // One batch, one budget: a policy edited meanwhile is spent by the next batch.
                let budget = first.budget.clone();
                let (batch, rest) =
                    std::mem::take(&mut queue.waiting).into_iter().partition(|w| w.budget == budget);
                queue.waiting = rest;
                (batch, queue.last.take())
            };
            let (outcome, last) = self.spend_batch(&name, &batch, last).await;
            if let Some(queue) = self.queues.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&name) {
                queue.last = last;
            }
            match outcome {
                Ok((admitted, tally)) => {
                    for (i, waiter) in batch.into_iter().enumerate() {
                        let tripped = (i >= admitted)
                            .then(|| self.tripped(&waiter.budget, tally.clone(), name.clone()));
                        let _gone = waiter.reply.send(Ok(tripped));
                    }
                }
                Err(e) => {
                    let message = format!("{e:#}");
                    for waiter in batch {
                        let _gone = waiter.reply.send(Err(message.clone()));
                    }
                }
            }
        }
    }

    /// Spends `batch` (one budget) on Lease `name`, starting from `last` (this process's last
    /// write of it) when there is one: how many were admitted, the tally the refused ones get,
    /// and the Lease to start from next time.
    async fn spend_batch(
        &self,
        name: &str,
        batch: &[Waiter],
        mut last: Option<Lease>,
    ) -> (Result<(usize, Tally)>, Option<Lease>) {
        let Some(first) = batch.first() else {
            return (Ok((0, Tally { count: 0, window_start: Timestamp::now() })), last);
        };
        let budget = &first.budget;
        let agent = batch.last().map_or(first.agent.as_str(), |w| w.agent.as_str());
        for attempt in 0..ATTEMPTS {
            let remembered = last.is_some();
            let lease = match last.take() {
                Some(lease) => Some(lease),
                None => match self.api.get_opt(name).await {
                    Ok(lease) => lease,
                    Err(e) => return (Err(e).with_context(|| format!("reading lease {name}")), None),
                },
            };
            let now = Timestamp::now();
            let tally = Tally::of(lease.as_ref(), budget, now);
            let (admitted, next) = spend(&tally, budget, batch.len());
            if admitted < batch.len() && remembered {
                // Refusals are only made from what the API server says now (a human may have
                // reset the count since this process wrote it).
                continue;
            }
            if admitted == 0 {
                return (Ok((0, tally)), lease);
            }
            let written = match lease {
                None => {
                    self.api
                        .create(&PostParams::default(), &self.lease(name, budget, agent, &next, None))
                        .await
                }
                Some(old) => {
                    let rv = old.metadata.resource_version.clone();
                    self.api
                        .replace(name, &PostParams::default(), &self.lease(name, budget, agent, &next, rv))
                        .await
                }
            };
            match written {
                Ok(lease) => return (Ok((admitted, next)), Some(lease)),
                // Another replica counted first, created it, or a human deleted it: read again,
                // after a pause of up to a few milliseconds per attempt so that replicas that
                // collided do not collide again.
                Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {
                    tokio::time::sleep(backoff(attempt)).await;
                    continue;
                }
                Err(e) => return (Err(e).with_context(|| format!("writing lease {name}")), None),
            }
        }
        (Err(anyhow::anyhow!("lease {name} kept changing under {ATTEMPTS} attempts")), None)
    }

    fn lease(
        &self,
        name: &str,
        budget: &ChurnBudget,
        agent: &str,
        tally: &Tally,
        rv: Option<String>,
    ) -> Lease {
        let policy = policy_id_label(&budget.policy);
        Lease {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(self.namespace.clone()),
                resource_version: rv,
                labels: Some(
                    [
                        ("app.kubernetes.io/managed-by".to_owned(), "agentguard".to_owned()),
                        (CHURN_LABEL.to_owned(), "true".to_owned()),
                    ]
                    .into(),
                ),
                annotations: Some(
                    [
                        (POLICY_ANNOTATION.to_owned(), policy),
                        (AGENT_ANNOTATION.to_owned(), agent.to_owned()),
                        (COUNT_ANNOTATION.to_owned(), tally.count.to_string()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(agent.to_owned()),
                acquire_time: Some(MicroTime(tally.window_start)),
                renew_time: Some(MicroTime(Timestamp::now())),
                lease_duration_seconds: i32::try_from(budget.window.as_secs()).ok(),
                ..Default::default()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::policy::PolicyId;
    use jiff::SignedDuration;

    fn budget() -> ChurnBudget {
        ChurnBudget {
            policy: PolicyId { namespace: None, name: "fail-safe".into() },
            max_operations: 3,
            window: SignedDuration::from_mins(10),
            scope: Default::default(),
            subject: "system:serviceaccount:agents:coder".into(),
        }
    }

    fn lease(count: &str, start: &str, reset: bool) -> Lease {
        let mut annotations: std::collections::BTreeMap<String, String> =
            [(COUNT_ANNOTATION.to_string(), count.to_string())].into();
        if reset {
            annotations.insert(RESET_ANNOTATION.into(), "now".into());
        }
        Lease {
            metadata: ObjectMeta { annotations: Some(annotations), ..Default::default() },
            spec: Some(LeaseSpec {
                acquire_time: Some(MicroTime(start.parse().unwrap())),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_window_counts_until_it_lapses_or_is_reset() {
        let now: Timestamp = "2026-11-27T10:05:00Z".parse().unwrap();
        let b = budget();
        assert_eq!(Tally::of(None, &b, now), Tally { count: 0, window_start: now });
        let open = lease("3", "2026-11-27T10:00:00Z", false);
        let tally = Tally::of(Some(&open), &b, now);
        assert_eq!(tally.count, 3);
        assert!(tally.spent(&b));
        assert!(!Tally { count: 2, ..tally.clone() }.spent(&b));
        // Ten minutes after it opened the window is over.
        let later: Timestamp = "2026-11-27T10:10:00Z".parse().unwrap();
        assert_eq!(Tally::of(Some(&open), &b, later), Tally { count: 0, window_start: later });
        let reset = lease("3", "2026-11-27T10:00:00Z", true);
        assert_eq!(Tally::of(Some(&reset), &b, now).count, 0);
        // A garbled count starts afresh rather than blocking forever.
        assert_eq!(Tally::of(Some(&lease("many", "2026-11-27T10:00:00Z", false)), &b, now).count, 0);
    }

    #[test]
    fn lease_names_are_stable_valid_and_distinct() {
        let b = budget();
        let a = lease_name(&b, "system:serviceaccount:agents:coder");
        assert_eq!(a, lease_name(&b, "system:serviceaccount:agents:coder"));
        assert_ne!(a, lease_name(&b, "system:serviceaccount:agents:other"));
        let team =
            ChurnBudget { policy: PolicyId { namespace: Some("team".into()), ..b.policy.clone() }, ..b };
        assert_ne!(a, lease_name(&team, "system:serviceaccount:agents:coder"));
        assert!(a.len() <= 63 && a.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
    }

    #[test]
    fn the_refusal_says_how_to_reset() {
        let tripped = Tripped {
            budget: budget(),
            tally: Tally { count: 3, window_start: "2026-11-27T10:00:00Z".parse().unwrap() },
            lease: "agentguard-churn-0123456789abcdef".into(),
            namespace: "agentguard-system".into(),
        };
        let text = tripped.to_string();
        assert!(
            text.contains("churn limit of ClusterAgentPolicy \"fail-safe\" reached: 3 guarded operations")
        );
        assert!(text.contains("refused until 2026-11-27T10:10:00Z"));
        assert!(text.contains(
            "kubectl annotate lease agentguard-churn-0123456789abcdef -n agentguard-system agentguard.io/reset-churn=now --overwrite"
        ));
    }

    #[test]
    fn a_batch_spends_what_is_left_in_order() {
        let b = budget();
        let start: Timestamp = "2026-11-27T10:00:00Z".parse().unwrap();
        let at = |count| Tally { count, window_start: start };
        assert_eq!(spend(&at(0), &b, 2), (2, at(2)));
        assert_eq!(spend(&at(1), &b, 5), (2, at(3)));
        assert_eq!(spend(&at(3), &b, 4), (0, at(3)));
        assert_eq!(spend(&at(7), &b, 1), (0, at(7)));
        assert_eq!(spend(&at(0), &b, 0), (0, at(0)));
    }

    /// Charges from two replicas against a fake API server holding one Lease.
    mod coalescing {
        use std::sync::Mutex;
        use std::time::Duration;

        use axum::http::{Method, Request, Response, StatusCode};
        use http_body_util::BodyExt;
        use serde_json::{Value, json};

        use super::*;

        #[derive(Default)]
        struct Server {
            lease: Option<Value>,
            version: u64,
            reads: usize,
            writes: usize,
            conflicts: usize,
        }

        fn status(code: u16) -> (StatusCode, Value) {
            let reason = if code == 404 { "NotFound" } else { "Conflict" };
            let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code});
            (StatusCode::from_u16(code).unwrap(), status)
        }

        /// A client of an API server holding at most one Lease, whose every write takes 10 ms
        /// (so charges arrive while one is under way) and honours the resourceVersion.
        fn client(server: Arc<Mutex<Server>>) -> kube::Client {
            let service = tower::service_fn(move |request: Request<kube::client::Body>| {
                let server = server.clone();
                async move {
                    let method = request.method().clone();
                    let body = request
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes().to_vec())
                        .unwrap_or_default();
                    if method != Method::GET {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    let mut s = server.lock().unwrap();
                    let (code, reply) = match method {
                        Method::GET => {
                            s.reads += 1;
                            s.lease.clone().map_or_else(|| status(404), |l| (StatusCode::OK, l))
                        }
                        _ => {
                            let mut lease: Value = serde_json::from_slice(&body).unwrap();
                            let precondition =
                                lease["metadata"]["resourceVersion"].as_str().map(str::to_owned);
                            let current = s.lease.as_ref().map(|_| s.version.to_string());
                            let fits = match method {
                                Method::POST => current.is_none(),
                                _ => current.is_some() && precondition == current,
                            };
                            if fits {
                                s.writes += 1;
                                s.version += 1;
                                lease["metadata"]["resourceVersion"] = json!(s.version.to_string());
                                s.lease = Some(lease.clone());
                                (StatusCode::OK, lease)
                            } else {
                                s.conflicts += 1;
                                status(if current.is_none() { 404 } else { 409 })
                            }
                        }
                    };
                    let mut response =
                        Response::new(kube::client::Body::from(serde_json::to_vec(&reply).unwrap()));
                    *response.status_mut() = code;
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            kube::Client::new(service, "default")
        }

        fn count(server: &Mutex<Server>) -> String {
            let s = server.lock().unwrap();
            s.lease.as_ref().unwrap()["metadata"]["annotations"][COUNT_ANNOTATION]
                .as_str()
                .unwrap()
                .to_owned()
        }

        #[tokio::test]
        async fn two_replicas_count_every_charge_once_in_few_writes_and_see_a_reset() {
            let server = Arc::new(Mutex::new(Server::default()));
            let replicas = [
                Breaker::new(client(server.clone()), "agentguard"),
                Breaker::new(client(server.clone()), "agentguard"),
            ];
            let b = ChurnBudget { max_operations: 150, ..budget() };
            let agent = "system:serviceaccount:agents:coder";
            let charges = (0..200).map(|i| replicas[i % 2].charge(agent, std::slice::from_ref(&b), false));
            let outcomes = futures::future::join_all(charges).await;
            let admitted = outcomes.iter().filter(|o| matches!(o, Ok(None))).count();
            let tripped: Vec<_> =
                outcomes.iter().filter_map(|o| o.as_ref().ok().and_then(Option::as_ref)).collect();
            let failed = outcomes.iter().find(|o| o.is_err());
            assert_eq!((admitted, tripped.len()), (150, 50), "first failure: {failed:?}");
            assert!(tripped.iter().all(|t| t.tally.count == 150 && t.lease == lease_name(&b, agent)));
            assert_eq!(count(&server), "150");
            let (writes, conflicts) = {
                let s = server.lock().unwrap();
                (s.writes, s.conflicts)
            };
            // One write per charge would be 150; coalesced, each replica writes once per round trip.
            assert!(writes <= 10, "{writes} writes, {conflicts} conflicts");

            // Spent, and known spent by both replicas from what they last wrote or read.
            assert!(replicas[0].charge(agent, std::slice::from_ref(&b), false).await.unwrap().is_some());
            // A human resets the count: neither replica refuses from memory.
            {
                let mut s = server.lock().unwrap();
                s.version += 1;
                let version = s.version.to_string();
                let lease = s.lease.as_mut().unwrap();
                lease["metadata"]["annotations"][RESET_ANNOTATION] = json!("now");
                lease["metadata"]["resourceVersion"] = json!(version);
            }
            for replica in &replicas {
                assert_eq!(replica.charge(agent, std::slice::from_ref(&b), false).await.unwrap(), None);
            }
            assert_eq!(count(&server), "2");
            // A dry run reads, and writes nothing.
            let writes = server.lock().unwrap().writes;
            assert_eq!(replicas[1].charge(agent, std::slice::from_ref(&b), true).await.unwrap(), None);
            assert_eq!(server.lock().unwrap().writes, writes);
        }

        #[tokio::test]
        async fn a_charge_whose_request_gave_up_is_not_counted() {
            let server = Arc::new(Mutex::new(Server::default()));
            let breaker = Breaker::new(client(server.clone()), "agentguard");
            let b = budget();
            let agent = "system:serviceaccount:agents:coder";
            // The first charge's write is under way when the second is queued and abandoned.
            let first = breaker.charge(agent, std::slice::from_ref(&b), false);
            let abandoned = async {
                tokio::time::sleep(Duration::from_millis(2)).await;
                let _ = tokio::time::timeout(
                    Duration::from_millis(1),
                    breaker.charge(agent, std::slice::from_ref(&b), false),
                )
                .await;
            };
            let (first, ()) = tokio::join!(first, abandoned);
            assert_eq!(first.unwrap(), None);
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(count(&server), "1");
            assert_eq!(breaker.charge(agent, std::slice::from_ref(&b), false).await.unwrap(), None);
            assert_eq!(count(&server), "2");
        }
    }
}
