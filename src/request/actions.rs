//! What admitting a request makes agentguard do, in one place, with the fail-closed rules
//! written once. The engine's review is pure; everything here may wait on the API server.
//!
//! [`decide`] reviews the request and, for an agent's DELETE (or a human's approval of one),
//! looks up what it would take with it and reviews it again with that.
//! [`plan`] then says, purely, what admitting it requires: the audit record, the churn budgets
//! to charge, the agents to register, the Events to leave. [`carry_out`] does it in this order:
//!
//! 1. the record is checked against the live object, so a request that did not come from the
//!    API server gets neither a record nor a charge;
//! 2. a break-glass session's use is counted (a session that is closed, spent or cannot be
//!    counted admits nothing), then churn budgets are charged (a limit that cannot be counted is
//!    not waived);
//! 3. the record is written (no record, no change: the way back exists before the change);
//! 4. newly marked agents are registered with the API server (an unregistered agent would be
//!    unguarded);
//! 5. Events are queued (never for a dry run).
//!
//! A step that cannot be done refuses the request: [`Refusal::Unavailable`] (503, "retry")
//! when agentguard could not do what admitting requires, [`Refusal::Forbidden`] when a churn
//! limit or a session is spent.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use futures::future::BoxFuture;
use jiff::Timestamp;
use serde_json::Value;

use crate::cluster::breaker::Tripped;
use crate::cluster::caches::Caches;
use crate::cluster::events::{Events, Record};
use crate::engine::admission::{self, AdmissionRequest, Route, Snapshot};
use crate::engine::api::AgentChange;
use crate::engine::policy::Config;
use crate::engine::policy::identity::{AgentSet, StaticDirectory};
use crate::engine::policy::{ChurnBudget, Collateral, Decision, Directory, PolicySet, Reason, Verdict};
use crate::metrics::{Metrics, policy_label};

/// What the webhook decides from. Implemented by the live caches and by fixed test data.
pub trait Cluster: Send + Sync + 'static {
    fn policies(&self) -> Arc<PolicySet>;
    fn directory(&self) -> &dyn Directory;
    fn ready(&self) -> bool;
    /// How long ago the API server last vouched for this view (see
    /// [`crate::cluster::freshness`]); a fixed view is always current.
    fn view_age(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

impl Cluster for Caches {
    fn policies(&self) -> Arc<PolicySet> {
        Caches::policies(self)
    }
    fn directory(&self) -> &dyn Directory {
        self
    }
    fn ready(&self) -> bool {
        Caches::ready(self)
    }
    fn view_age(&self) -> std::time::Duration {
        Caches::view_age(self)
    }
}

/// A fixed cluster: for router tests and offline evaluation.
pub struct StaticCluster {
    pub policies: Arc<PolicySet>,
    pub directory: StaticDirectory,
}

impl Cluster for StaticCluster {
    fn policies(&self) -> Arc<PolicySet> {
        self.policies.clone()
    }
    fn directory(&self) -> &dyn Directory {
        &self.directory
    }
    fn ready(&self) -> bool {
        true
    }
}

/// Registers an agent with the API server before the write that marks it is admitted.
pub trait Register: Send + Sync + 'static {
    fn ensure<'a>(&'a self, marked: &'a AgentSet) -> BoxFuture<'a, anyhow::Result<()>>;
    /// Whether the webhook configuration has been brought up to date (readiness waits for it).
    fn current(&self) -> bool;
}

impl Register for crate::cluster::webhook::Registrar {
    fn ensure<'a>(&'a self, marked: &'a AgentSet) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(crate::cluster::webhook::Registrar::ensure(self, marked))
    }
    fn current(&self) -> bool {
        crate::cluster::webhook::Registrar::current(self)
    }
}

/// Spends churn budgets (see [`crate::cluster::breaker`]).
pub trait Charge: Send + Sync + 'static {
    fn charge<'a>(
        &'a self,
        agent: &'a str,
        budgets: &'a [ChurnBudget],
        dry_run: bool,
    ) -> BoxFuture<'a, anyhow::Result<Option<Tripped>>>;
}

impl Charge for crate::cluster::breaker::Breaker {
    fn charge<'a>(
        &'a self,
        agent: &'a str,
        budgets: &'a [ChurnBudget],
        dry_run: bool,
    ) -> BoxFuture<'a, anyhow::Result<Option<Tripped>>> {
        Box::pin(crate::cluster::breaker::Breaker::charge(self, agent, budgets, dry_run))
    }
}

/// Spends uses of break-glass sessions (see [`crate::cluster::sessions`]).
pub trait Spend: Send + Sync + 'static {
    fn spend<'a>(
        &'a self,
        spend: &'a crate::engine::session::Grant,
        dry_run: bool,
    ) -> BoxFuture<'a, anyhow::Result<Option<crate::cluster::sessions::Spent>>>;
}

impl Spend for crate::cluster::sessions::Sessions {
    fn spend<'a>(
        &'a self,
        spend: &'a crate::engine::session::Grant,
        dry_run: bool,
    ) -> BoxFuture<'a, anyhow::Result<Option<crate::cluster::sessions::Spent>>> {
        Box::pin(crate::cluster::sessions::Sessions::spend(self, spend, dry_run))
    }
}

/// Writes audit-trail records (see [`crate::cluster::trail`]).
pub trait Recorder: Send + Sync + 'static {
    fn settings(&self) -> &crate::cluster::trail::Settings;
    /// Checks the record's prior object against the live object before anything is spent or
    /// written for the request (see [`crate::cluster::trail::Trail::verify`]).
    fn verify<'a>(
        &'a self,
        _record: &'a mut crate::engine::api::AgentChange,
        _prior: Option<&'a Value>,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn write<'a>(&'a self, record: &'a crate::engine::api::AgentChange) -> BoxFuture<'a, anyhow::Result<()>>;
}

impl Recorder for crate::cluster::trail::Trail {
    fn settings(&self) -> &crate::cluster::trail::Settings {
        &self.settings
    }
    fn verify<'a>(
        &'a self,
        record: &'a mut crate::engine::api::AgentChange,
        prior: Option<&'a Value>,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(crate::cluster::trail::Trail::verify(self, record, prior))
    }
    fn write<'a>(&'a self, record: &'a crate::engine::api::AgentChange) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(crate::cluster::trail::Trail::write(self, record))
    }
}

/// Shared state of both ports.
pub struct AppState {
    pub cluster: Arc<dyn Cluster>,
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub clock: fn() -> Timestamp,
    /// Set on shutdown so `/readyz` fails before the listener closes.
    pub shutting_down: AtomicBool,
    pub events: Events,
    /// None when agentguard does not manage its webhook configuration.
    pub registrar: Option<Arc<dyn Register>>,
    /// None without a namespace of its own to keep counts in: churn limits are not enforced.
    pub breaker: Option<Arc<dyn Charge>>,
    /// None without a namespace of its own: no session admits anything.
    pub sessions: Option<Arc<dyn Spend>>,
    /// None when recording is off.
    pub trail: Option<Arc<dyn Recorder>>,
    /// What an agent's DELETE would take with it (see [`crate::cluster::ownership`]). None: cascades are
    /// not looked up (offline tests only).
    pub ownership: Option<Arc<dyn crate::cluster::ownership::Lookup>>,
    /// `--max-staleness`: the `agents` webhook answers HTTP 503 from a view older than this.
    pub max_staleness: crate::cluster::freshness::Bound,
    /// Requests that may be making their API calls at once (`--max-inflight-api-requests`).
    pub api_slots: ApiSlots,
}

/// How many requests may be making API calls (the blast radius, the record, the churn charge,
/// registering an agent) at once, and how long one waits for its turn before it is refused: a
/// flood of agents' changes queues here instead of piling calls onto the API server, and is
/// refused quickly rather than at the API server's timeout. Decisions from the caches alone
/// (held, denied, allowed without a record) never wait for a slot.
///
/// Agents' requests under way at once, waiting for a slot or not, are bounded too
/// ([`ApiSlots::enter`]): past [`UNDER_WAY_PER_SLOT`] times the slots, the next is refused
/// before its body is even read, so a flood that outruns the CPU costs little per request
/// past the bound and those already in are answered within the API server's timeout.
#[derive(Clone)]
pub struct ApiSlots {
    slots: Arc<tokio::sync::Semaphore>,
    under_way: Arc<tokio::sync::Semaphore>,
    pub limit: usize,
    pub wait: std::time::Duration,
}

/// Agents' requests that may be under way at once, per API-call slot.
pub const UNDER_WAY_PER_SLOT: usize = 4;

impl ApiSlots {
    pub fn new(limit: usize, wait: std::time::Duration) -> Self {
        let limit = limit.max(1);
        Self {
            slots: Arc::new(tokio::sync::Semaphore::new(limit)),
            under_way: Arc::new(tokio::sync::Semaphore::new(limit * UNDER_WAY_PER_SLOT)),
            limit,
            wait,
        }
    }

    /// Room for one more agent's request under way, or None: it is refused at once.
    pub fn enter(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.under_way.clone().try_acquire_owned().ok()
    }

    /// Slots taken now.
    pub fn in_use(&self) -> usize {
        self.limit - self.slots.available_permits()
    }

    /// A slot, or the refusal to answer with when none frees up within `wait`.
    pub async fn take(&self, metrics: &Metrics) -> Result<tokio::sync::OwnedSemaphorePermit, Refusal> {
        match tokio::time::timeout(self.wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                metrics.busy_refusals.inc();
                Err(Refusal::Unavailable(format!(
                    "agentguard is busy: {} requests are making API calls already and none finished within {:.1}s; retry",
                    self.limit,
                    self.wait.as_secs_f64()
                )))
            }
        }
    }
}

/// The default `--max-inflight-api-requests`.
pub const DEFAULT_API_SLOTS: usize = 32;
/// How long a request waits for a slot by default.
pub const DEFAULT_API_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

impl AppState {
    pub fn new(cluster: Arc<dyn Cluster>, config: Config, metrics: Arc<Metrics>) -> Self {
        let events = Events::disabled(metrics.clone());
        Self {
            cluster,
            config,
            metrics,
            clock: Timestamp::now,
            shutting_down: AtomicBool::new(false),
            events,
            registrar: None,
            breaker: None,
            sessions: None,
            trail: None,
            ownership: None,
            max_staleness: crate::cluster::freshness::Bound(crate::cluster::freshness::DEFAULT_MAX_STALENESS),
            api_slots: ApiSlots::new(DEFAULT_API_SLOTS, DEFAULT_API_WAIT),
        }
    }
}

/// Why a request is refused although the engine would admit it.
#[derive(Debug)]
pub enum Refusal {
    /// agentguard could not do what admitting the request requires: retry (HTTP 503).
    Unavailable(String),
    /// A churn limit is spent (HTTP 403).
    Forbidden(String),
}

impl Refusal {
    /// The AdmissionReview answer.
    pub fn response(&self, uid: &str) -> Value {
        match self {
            Refusal::Unavailable(message) => admission::unavailable(uid, message),
            Refusal::Forbidden(message) => admission::forbid(uid, message),
        }
    }
}

/// The engine's decision, with what a DELETE would take with it where that matters.
pub async fn decide(state: &AppState, request: &AdmissionRequest, route: Route) -> Result<Decision, Refusal> {
    let policies = state.cluster.policies();
    // The snapshot borrows the directory, which is not Sync: decide before any await.
    let review = |collateral: &[Collateral]| {
        let snapshot = Snapshot {
            policies: &policies,
            directory: state.cluster.directory(),
            config: &state.config,
            now: (state.clock)(),
            collateral,
        };
        admission::review_on(request, route, &snapshot)
    };
    let decision = review(&[]);
    // An agent's DELETE is judged again with what it would take with it (held, its denial shows
    // that and its ticket is bound to it); so is a human's approval of a delete (its writer must
    // approve for all of that too, and the ticket must be for that blast radius). Not a DELETE an
    // enforced Deny policy already refuses: Deny comes first whatever else matches, so the lists
    // of every guarded type (two API calls or more) could change nothing but its message.
    let denied_anyway = decision.agent
        && request.operation == "DELETE"
        && matches!(&decision.verdict, Verdict::Deny(d) if matches!(d.reason, Reason::Policy { .. }));
    if let Some(ownership) = &state.ownership
        && !denied_anyway
        && crate::cluster::ownership::needed(request, decision.agent, &policies)
    {
        let _slot = state.api_slots.take(&state.metrics).await?;
        return match ownership.collateral(request, &policies).await {
            Ok(collateral) if collateral.is_empty() => Ok(decision),
            Ok(collateral) => Ok(review(&collateral)),
            Err(e) => {
                // Unknown blast radius: the DELETE (or its approval) fails closed.
                tracing::warn!(uid = %request.uid, error = format!("{e:#}"), "cannot look up what the delete cascades to; refusing");
                Err(Refusal::Unavailable(format!(
                    "agentguard could not find what this delete would take with it: {e:#}; retry"
                )))
            }
        };
    }
    Ok(decision)
}

/// What admitting `request` under `decision` requires: decided purely, done by [`carry_out`].
#[derive(Debug, Default)]
pub struct Plan {
    /// The audit record of an admitted agent change.
    pub record: Option<AgentChange>,
    /// The break-glass sessions that would admit the request: one use of the first with uses
    /// left is spent.
    pub sessions: Vec<crate::engine::session::Grant>,
    /// Churn budgets the admitted request spends.
    pub charge: Vec<ChurnBudget>,
    /// Identities the admitted write marks as agents.
    pub register: AgentSet,
    /// Events to leave on the object (none for a dry run).
    pub events: Vec<Record>,
}

pub fn plan(state: &AppState, request: &AdmissionRequest, decision: &Decision) -> Plan {
    let record = state.trail.as_ref().and_then(|trail| {
        crate::cluster::trail::record_for(request, decision, trail.settings(), (state.clock)())
    });
    let charge = if decision.allowed() { decision.churn.clone() } else { Vec::new() };
    let sessions = match &decision.verdict {
        Verdict::Allow(crate::engine::policy::Allowed::BySession { grants, .. }) => grants.clone(),
        _ => Vec::new(),
    };
    let register = if decision.allowed() && !request.dry_run() && state.registrar.is_some() {
        crate::cluster::webhook::marked_agents(&request.facts(), &state.cluster.policies(), &state.config)
    } else {
        AgentSet::default()
    };
    let events = if request.dry_run() { Vec::new() } else { events_for(request, decision) };
    Plan { record, sessions, charge, register, events }
}

/// Carries out `plan` in the order the module doc gives; the first step that fails refuses.
pub async fn carry_out(state: &AppState, request: &AdmissionRequest, plan: Plan) -> Result<(), Refusal> {
    let Plan { mut record, sessions: grants, charge, register, events } = plan;
    // Every step below may wait on the API server: take a slot (see [`ApiSlots`]).
    let calls = record.is_some() || !grants.is_empty() || !charge.is_empty() || !register.is_empty();
    let _slot = match calls {
        true => Some(state.api_slots.take(&state.metrics).await?),
        false => None,
    };
    let uid = &request.uid;
    let agent = &request.user_info.username;
    if let (Some(trail), Some(record)) = (&state.trail, record.as_mut())
        && let Err(e) = trail.verify(record, request.old_object.as_ref()).await
    {
        tracing::warn!(%uid, error = format!("{e:#}"), "the request does not match the live object; refusing");
        return Err(Refusal::Unavailable(format!(
            "agentguard could not check this change against the live object: {e:#}; retry"
        )));
    }
    if !grants.is_empty() {
        // A session whose uses cannot be counted admits nothing.
        let Some(sessions) = &state.sessions else {
            return Err(Refusal::Unavailable(
                "agentguard: a session would admit this, but agentguard has no namespace to count its uses in (--self-namespace)"
                    .into(),
            ));
        };
        let mut refusals = Vec::new();
        for grant in &grants {
            match sessions.spend(grant, request.dry_run()).await {
                Ok(None) => {
                    if let Some(record) = record.as_mut() {
                        record.spec.session = Some(grant.to_string());
                    }
                    refusals.clear();
                    break;
                }
                Ok(Some(spent)) => refusals.push(spent.to_string()),
                Err(e) => {
                    tracing::warn!(%uid, error = format!("{e:#}"), "cannot count the session's use; refusing");
                    return Err(Refusal::Unavailable(format!(
                        "agentguard could not count this use of session {:?}: {e:#}; retry",
                        grant.name
                    )));
                }
            }
        }
        if !refusals.is_empty() {
            let spent = refusals.join("; ");
            tracing::info!(%uid, %agent, %spent, "session refused");
            return Err(Refusal::Forbidden(format!(
                "agentguard: {} by {agent}: {spent}; the request needs an approval again",
                request.operation
            )));
        }
    }
    if !charge.is_empty() {
        // A limit that cannot be counted is not waived: the agent is refused, loudly.
        let Some(breaker) = &state.breaker else {
            return Err(Refusal::Unavailable(
                "agentguard: a churn limit applies, but agentguard has no namespace to count in (--self-namespace)"
                    .into(),
            ));
        };
        match breaker.charge(agent, &charge, request.dry_run()).await {
            Ok(None) => {
                for budget in &charge {
                    let policy = crate::metrics::policy_id_label(&budget.policy);
                    state.metrics.set_breaker(&policy, agent, false);
                }
            }
            Ok(Some(tripped)) => {
                let policy = crate::metrics::policy_id_label(&tripped.budget.policy);
                state.metrics.set_breaker(&policy, agent, true);
                state.metrics.breaker_refused(&policy, agent);
                tracing::warn!(%uid, %agent, %tripped, "churn breaker refused");
                return Err(Refusal::Forbidden(format!(
                    "agentguard: {} by {agent}: {tripped}",
                    request.operation
                )));
            }
            Err(e) => {
                // Uncounted is unchecked: an agent's guarded operation fails closed.
                tracing::warn!(%uid, error = format!("{e:#}"), "cannot charge the churn budget; refusing");
                return Err(Refusal::Unavailable(format!(
                    "agentguard could not check the churn limit: {e:#}; retry"
                )));
            }
        }
    }
    if let (Some(trail), Some(record)) = (&state.trail, &record)
        && let Err(e) = trail.write(record).await
    {
        // No record, no change: the way back must exist before the change does.
        tracing::warn!(%uid, error = format!("{e:#}"), "cannot record the change; refusing");
        return Err(Refusal::Unavailable(format!(
            "agentguard could not record this change in its audit trail: {e:#}; retry"
        )));
    }
    if !register.is_empty()
        && let Some(registrar) = &state.registrar
        && let Err(e) = registrar.ensure(&register).await
    {
        // Admitting the label unregistered would leave the new agent unguarded.
        tracing::warn!(%uid, error = format!("{e:#}"), "cannot register a new agent; refusing the write");
        return Err(Refusal::Unavailable(format!(
            "agentguard could not register the new agent before admitting this write: {e:#}; retry"
        )));
    }
    for event in events {
        state.events.emit(event);
    }
    Ok(())
}

/// Counts the decision and logs it: refusals and held requests at INFO, plain admissions at
/// DEBUG.
pub fn observe(state: &AppState, request: &AdmissionRequest, decision: &Decision, started: Instant) {
    let policy = policy_label(decision);
    let facts = request.facts();
    let resource = match facts.subresource {
        "" => facts.resource.to_owned(),
        sub => format!("{}/{sub}", facts.resource),
    };
    state.metrics.decided(decision, &resource, &request.user_info.username, request.dry_run());
    state.metrics.latency.observe(started.elapsed().as_secs_f64());
    let fields = (
        request.uid.as_str(),
        request.operation.as_str(),
        resource.as_str(),
        facts.namespace,
        facts.name,
        request.user_info.username.as_str(),
        request.dry_run(),
    );
    let (uid, operation, resource, namespace, name, user, dry_run) = fields;
    // Which pod, node and token the request came from (left out when the credential says nothing).
    let attribution = request.user_info.attribution().map(|a| a.to_string());
    let attribution = attribution.as_deref();
    match &decision.verdict {
        Verdict::Deny(denial) => tracing::info!(
            uid, operation, resource, namespace, name, user, attribution, dry_run, outcome = decision.outcome(),
            %policy, message = %denial, "refused"
        ),
        Verdict::Allow(why) if decision.outcome() != "allowed" || !decision.audits.is_empty() => {
            tracing::info!(
                uid, operation, resource, namespace, name, user, attribution, dry_run, outcome = decision.outcome(),
                %policy, reason = ?why, warnings = ?decision.warnings, audits = ?decision.audits, "admitted"
            )
        }
        Verdict::Allow(why) => tracing::debug!(
            uid, operation, resource, namespace, name, user, attribution, dry_run, reason = ?why, "admitted"
        ),
    }
}

/// The Events a decision leaves on its object: refusals (a held request's whole change too, in
/// parts), approvals used or written, and dry-run policy warnings. Plain admissions leave none.
/// An approval written is reported only once the API server has stored it (see
/// [`crate::cluster::events::Stored`]): the request alone proves nothing.
fn events_for(request: &AdmissionRequest, decision: &Decision) -> Vec<Record> {
    use crate::engine::policy::Allowed;
    let who = &request.user_info.username;
    let regarding = request.regarding();
    // An agent's request says where it came from, at the note's end (a cut note loses it first).
    let from = match request.user_info.attribution() {
        Some(a) if decision.agent => format!(" {}{a}]", crate::cluster::events::FROM_PREFIX),
        _ => String::new(),
    };
    let one = |warning, reason, note: String| {
        vec![Record::new(regarding.clone(), warning, reason, format!("{note}{from}"))]
    };
    match &decision.verdict {
        Verdict::Deny(d) => match d.reason {
            Reason::ApprovalRequired { .. } => {
                let mut out = one(true, "ApprovalRequired", d.to_string());
                let parts =
                    d.change.as_ref().filter(|c| !c.is_empty()).map(crate::cluster::events::change_parts);
                for (i, note) in parts.into_iter().flatten().enumerate() {
                    let mut part = Record::new(regarding.clone(), true, "ApprovalChange", note);
                    part.part = u16::try_from(i).unwrap_or(u16::MAX);
                    out.push(part);
                }
                out
            }
            _ => one(true, "Denied", d.to_string()),
        },
        Verdict::Allow(why @ (Allowed::Approved { .. } | Allowed::BySession { .. })) => {
            one(false, "Approved", format!("{} by {who} admitted: {why}", request.operation))
        }
        Verdict::Allow(Allowed::ApprovalAccepted) => {
            let (Some(uid), Some(name)) = (regarding.uid.clone(), regarding.name.clone()) else {
                return Vec::new();
            };
            let resource = kube::api::ApiResource {
                group: request.kind.group.clone(),
                version: request.kind.version.clone(),
                api_version: regarding.api_version.clone().unwrap_or_default(),
                kind: request.kind.kind.clone(),
                plural: request.resource.resource.clone(),
            };
            // One Event per approval written (an approver may write one of several).
            crate::engine::approval::written(request.old_object.as_ref(), request.object.as_ref())
                .into_iter()
                .map(|(key, value)| {
                    let stored = crate::cluster::events::Stored {
                        resource: resource.clone(),
                        namespace: regarding.namespace.clone(),
                        name: name.clone(),
                        uid: uid.clone(),
                        key: key.to_owned(),
                        value: value.to_owned(),
                    };
                    let note = format!("{who} approved {:?}", stored.value);
                    let mut record = Record::new(regarding.clone(), false, "ApprovalRecorded", note);
                    record.stored = Some(stored);
                    record
                })
                .collect()
        }
        // Only for agents: an inert approval value a controller copied warns its writer, no more.
        Verdict::Allow(_) if decision.agent && !decision.warnings.is_empty() => one(
            true,
            "PolicyWarning",
            format!("{} by {who}: {}", request.operation, decision.warnings.join("; ")),
        ),
        Verdict::Allow(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::policy::{Denial, Target, builtin};

    #[test]
    fn an_agents_event_says_where_the_request_came_from() {
        let request: AdmissionRequest = serde_json::from_value(serde_json::json!({
            "uid": "u", "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
            "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
            "name": "web", "namespace": "prod", "operation": "DELETE",
            "userInfo": {"username": "system:serviceaccount:agents:coder",
                         "extra": {"authentication.kubernetes.io/credential-id": ["JTI=0f3e"]}},
            "oldObject": {"metadata": {"name": "web", "uid": "o"}}
        }))
        .unwrap();
        let mut decision = Decision::deny(Denial {
            reason: Reason::Builtin { rule: builtin::SELF_RULE, detail: "no".into() },
            requester: "system:serviceaccount:agents:coder".into(),
            operation: "DELETE".into(),
            target: Target::default(),
            change: None,
        });
        decision.agent = true;
        let events = events_for(&request, &decision);
        assert_eq!(events.len(), 1);
        assert!(events[0].note.ends_with(" [from: credential-id=JTI=0f3e]"), "{}", events[0].note);
        // Not an agent's request (a human's approval): nothing appended.
        decision.agent = false;
        assert!(!events_for(&request, &decision)[0].note.contains("[from: "));
    }
}
