//! The network side: the HTTPS webhook port (axum + rustls, see [`tls`]) and the plain admin
//! port (`/livez`, `/readyz`, `/metrics`). Handlers only decode, call
//! [`crate::admission::review`] and encode; they never decide anything themselves.

pub mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use jiff::Timestamp;
use serde_json::Value;

use crate::admission::{self, MAX_BODY_BYTES, Malformed, Route, Snapshot};
use crate::breaker::Tripped;
use crate::events::{Events, Record};
use crate::index::Caches;
use crate::metrics::{Metrics, policy_label};
use crate::policy::identity::StaticDirectory;
use crate::policy::{ChurnBudget, Config, Decision, Directory, PolicySet, Reason, Verdict};
use crate::webhook::AgentSet;

/// What the webhook decides from. Implemented by the live caches and by fixed test data.
pub trait Cluster: Send + Sync + 'static {
    fn policies(&self) -> Arc<PolicySet>;
    fn directory(&self) -> &dyn Directory;
    fn ready(&self) -> bool;
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

impl Register for crate::webhook::Registrar {
    fn ensure<'a>(&'a self, marked: &'a AgentSet) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(crate::webhook::Registrar::ensure(self, marked))
    }
    fn current(&self) -> bool {
        crate::webhook::Registrar::current(self)
    }
}

/// Spends churn budgets (see [`crate::breaker`]).
pub trait Charge: Send + Sync + 'static {
    fn charge<'a>(
        &'a self,
        agent: &'a str,
        budgets: &'a [ChurnBudget],
        dry_run: bool,
    ) -> BoxFuture<'a, anyhow::Result<Option<Tripped>>>;
}

impl Charge for crate::breaker::Breaker {
    fn charge<'a>(
        &'a self,
        agent: &'a str,
        budgets: &'a [ChurnBudget],
        dry_run: bool,
    ) -> BoxFuture<'a, anyhow::Result<Option<Tripped>>> {
        Box::pin(crate::breaker::Breaker::charge(self, agent, budgets, dry_run))
    }
}

/// Writes audit-trail records (see [`crate::trail`]).
pub trait Recorder: Send + Sync + 'static {
    fn settings(&self) -> &crate::trail::Settings;
    /// Checks the record's prior object against the live object before anything is spent or
    /// written for the request (see [`crate::trail::Trail::verify`]).
    fn verify<'a>(
        &'a self,
        _record: &'a mut crate::api::AgentChange,
        _prior: Option<&'a Value>,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
    fn write<'a>(&'a self, record: &'a crate::api::AgentChange) -> BoxFuture<'a, anyhow::Result<()>>;
}

impl Recorder for crate::trail::Trail {
    fn settings(&self) -> &crate::trail::Settings {
        &self.settings
    }
    fn verify<'a>(
        &'a self,
        record: &'a mut crate::api::AgentChange,
        prior: Option<&'a Value>,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(crate::trail::Trail::verify(self, record, prior))
    }
    fn write<'a>(&'a self, record: &'a crate::api::AgentChange) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(crate::trail::Trail::write(self, record))
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
    /// None when recording is off.
    pub trail: Option<Arc<dyn Recorder>>,
    /// What an agent's DELETE would take with it (see [`crate::ownership`]). None: cascades are
    /// not looked up (offline tests only).
    pub ownership: Option<Arc<dyn crate::ownership::Lookup>>,
}

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
            trail: None,
            ownership: None,
        }
    }
}

/// The webhook port's routes: one path per webhook (see [`crate::webhook::desired`]), and the
/// path both shared before, answered as before for configurations an older agentguard wrote.
pub fn webhook_router(state: Arc<AppState>) -> Router {
    use crate::webhook::{AGENTS_PATH, APPROVALS_PATH, LEGACY_PATH};
    let on = |route: Route| move |state: State<Arc<AppState>>, body: Body| validate(state, route, body);
    Router::new()
        .route(AGENTS_PATH, post(on(Route::Agents)))
        .route(APPROVALS_PATH, post(on(Route::Approvals)))
        .route(LEGACY_PATH, post(on(Route::Shared)))
        .with_state(state)
}

/// The admin port's routes.
pub fn admin_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.shutting_down.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else if !state.cluster.ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced").into_response()
    } else if state.registrar.as_ref().is_some_and(|r| !r.current()) {
        (StatusCode::SERVICE_UNAVAILABLE, "webhook configuration not yet current").into_response()
    } else {
        "ok".into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics.encode(),
    )
        .into_response()
}

fn json(status: StatusCode, body: &Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn malformed(state: &AppState, status: StatusCode, m: &Malformed) -> Response {
    state.metrics.malformed.inc();
    tracing::warn!(uid = m.uid.as_deref().unwrap_or_default(), error = %m, "refused malformed AdmissionReview");
    // Without a uid the API server cannot match an answer: say so with an HTTP error status.
    let status = if m.uid.is_some() { StatusCode::OK } else { status };
    json(status, &admission::refuse(m))
}

async fn validate(State(state): State<Arc<AppState>>, route: Route, body: Body) -> Response {
    let started = Instant::now();
    let bytes = match http_body_util::Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            let m =
                Malformed { uid: None, message: format!("the body is larger than {MAX_BODY_BYTES} bytes") };
            return malformed(&state, StatusCode::PAYLOAD_TOO_LARGE, &m);
        }
        Err(e) => {
            let m = Malformed { uid: None, message: format!("the body could not be read: {e}") };
            return malformed(&state, StatusCode::BAD_REQUEST, &m);
        }
    };
    let request = match admission::decode(&bytes) {
        Ok(r) => r,
        Err(m) => return malformed(&state, StatusCode::BAD_REQUEST, &m),
    };
    if !state.cluster.ready() {
        // An error status lets each webhook's failurePolicy decide: refused for agents, admitted
        // for everyone else. Guessing from half-synced caches could do either wrongly.
        return (StatusCode::SERVICE_UNAVAILABLE, "agentguard caches are not synced yet").into_response();
    }
    let policies = state.cluster.policies();
    // The snapshot borrows the directory, which is not Sync: decide before any await.
    let decide = |collateral: &[crate::policy::Collateral]| {
        let snapshot = Snapshot {
            policies: &policies,
            directory: state.cluster.directory(),
            config: &state.config,
            now: (state.clock)(),
            collateral,
        };
        admission::review_on(&request, route, &snapshot)
    };
    let mut decision = decide(&[]);
    // An agent's DELETE that would be admitted is judged again with what it would take with it;
    // so is a human's approval of a delete (its writer must approve for all of that too).
    if decision.allowed()
        && let Some(ownership) = &state.ownership
        && crate::ownership::needed(&request, decision.agent, &policies)
    {
        match ownership.collateral(&request, &policies).await {
            Ok(collateral) if collateral.is_empty() => {}
            Ok(collateral) => decision = decide(&collateral),
            Err(e) => {
                // Unknown blast radius: the DELETE (or its approval) fails closed.
                tracing::warn!(uid = %request.uid, error = format!("{e:#}"), "cannot look up what the delete cascades to; refusing");
                let message =
                    format!("agentguard could not find what this delete would take with it: {e:#}; retry");
                return json(StatusCode::OK, &admission::unavailable(&request.uid, &message));
            }
        }
    }
    // The audit record, checked against the live object before any budget is spent: a request
    // that did not come from the API server gets neither a record nor a charge.
    let mut audit = state
        .trail
        .as_ref()
        .and_then(|trail| crate::trail::record_for(&request, &decision, trail.settings(), (state.clock)()));
    if let (Some(trail), Some(record)) = (&state.trail, audit.as_mut())
        && let Err(e) = trail.verify(record, request.old_object.as_ref()).await
    {
        tracing::warn!(uid = %request.uid, error = format!("{e:#}"), "the request does not match the live object; refusing");
        let message = format!("agentguard could not check this change against the live object: {e:#}; retry");
        return json(StatusCode::OK, &admission::unavailable(&request.uid, &message));
    }
    if decision.allowed() && !decision.churn.is_empty() && state.breaker.is_none() {
        // A limit that cannot be counted is not waived: the agent is refused, loudly.
        let message = "agentguard: a churn limit applies, but agentguard has no namespace to count in (--self-namespace)";
        return json(StatusCode::OK, &admission::unavailable(&request.uid, message));
    }
    if decision.allowed()
        && !decision.churn.is_empty()
        && let Some(breaker) = &state.breaker
    {
        match breaker.charge(&request.user_info.username, &decision.churn, request.dry_run()).await {
            Ok(None) => {
                for budget in &decision.churn {
                    let policy = crate::metrics::policy_id_label(&budget.policy);
                    state.metrics.set_breaker(&policy, &request.user_info.username, false);
                }
            }
            Ok(Some(tripped)) => {
                let policy = crate::metrics::policy_id_label(&tripped.budget.policy);
                state.metrics.set_breaker(&policy, &request.user_info.username, true);
                state.metrics.breaker_refused(&policy, &request.user_info.username);
                tracing::warn!(uid = %request.uid, agent = %request.user_info.username, %tripped, "churn breaker refused");
                let message =
                    format!("agentguard: {} by {}: {tripped}", request.operation, request.user_info.username);
                return json(StatusCode::OK, &admission::forbid(&request.uid, &message));
            }
            Err(e) => {
                // Uncounted is unchecked: an agent's guarded operation fails closed.
                tracing::warn!(uid = %request.uid, error = format!("{e:#}"), "cannot charge the churn budget; refusing");
                let message = format!("agentguard could not check the churn limit: {e:#}; retry");
                return json(StatusCode::OK, &admission::unavailable(&request.uid, &message));
            }
        }
    }
    if let (Some(trail), Some(record)) = (&state.trail, &audit)
        && let Err(e) = trail.write(record).await
    {
        // No record, no change: the way back must exist before the change does.
        tracing::warn!(uid = %request.uid, error = format!("{e:#}"), "cannot record the change; refusing");
        let message = format!("agentguard could not record this change in its audit trail: {e:#}; retry");
        return json(StatusCode::OK, &admission::unavailable(&request.uid, &message));
    }
    if decision.allowed()
        && !request.dry_run()
        && let Some(registrar) = &state.registrar
    {
        let marked = crate::webhook::marked_agents(&request.facts(), &policies, &state.config);
        if !marked.is_empty()
            && let Err(e) = registrar.ensure(&marked).await
        {
            // Admitting the label unregistered would leave the new agent unguarded.
            tracing::warn!(uid = %request.uid, error = format!("{e:#}"), "cannot register a new agent; refusing the write");
            let message = format!(
                "agentguard could not register the new agent before admitting this write: {e:#}; retry"
            );
            return json(StatusCode::OK, &admission::unavailable(&request.uid, &message));
        }
    }
    record(&state, &request, &decision, started);
    // Never for dryRun: a dry run must leave no trace.
    if !request.dry_run() {
        for event in events_for(&request, &decision) {
            state.events.emit(event);
        }
    }
    json(StatusCode::OK, &admission::respond(&request.uid, &decision))
}

fn record(state: &AppState, request: &admission::AdmissionRequest, decision: &Decision, started: Instant) {
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
    match &decision.verdict {
        Verdict::Deny(denial) => tracing::info!(
            uid, operation, resource, namespace, name, user, dry_run, outcome = decision.outcome(), %policy,
            message = %denial, "refused"
        ),
        Verdict::Allow(why) if decision.outcome() != "allowed" || !decision.audits.is_empty() => {
            tracing::info!(
                uid, operation, resource, namespace, name, user, dry_run, outcome = decision.outcome(), %policy,
                reason = ?why, warnings = ?decision.warnings, audits = ?decision.audits, "admitted"
            )
        }
        Verdict::Allow(why) => tracing::debug!(
            uid, operation, resource, namespace, name, user, dry_run, reason = ?why, "admitted"
        ),
    }
}

/// The Events a decision leaves on its object: refusals (a held request's whole change too, in
/// parts), approvals used or written, and dry-run policy warnings. Plain admissions leave none.
/// An approval written is reported only once the API server has stored it (see
/// [`crate::events::Stored`]): the request alone proves nothing.
fn events_for(request: &admission::AdmissionRequest, decision: &Decision) -> Vec<Record> {
    use crate::policy::Allowed;
    let who = &request.user_info.username;
    let regarding = request.regarding();
    let one = |warning, reason, note| vec![Record::new(regarding.clone(), warning, reason, note)];
    match &decision.verdict {
        Verdict::Deny(d) => match d.reason {
            Reason::ApprovalRequired { .. } => {
                let mut out = one(true, "ApprovalRequired", d.to_string());
                let parts = d.change.as_ref().filter(|c| !c.is_empty()).map(crate::events::change_parts);
                for (i, note) in parts.into_iter().flatten().enumerate() {
                    let mut part = Record::new(regarding.clone(), true, "ApprovalChange", note);
                    part.part = u16::try_from(i).unwrap_or(u16::MAX);
                    out.push(part);
                }
                out
            }
            _ => one(true, "Denied", d.to_string()),
        },
        Verdict::Allow(why @ Allowed::Approved { .. }) => {
            one(false, "Approved", format!("{} by {who} admitted: {why}", request.operation))
        }
        Verdict::Allow(Allowed::ApprovalAccepted) => {
            let Some(object) = request.object.as_ref() else { return Vec::new() };
            let value = crate::approval::annotation(object).unwrap_or_default().to_owned();
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
            let stored =
                crate::events::Stored { resource, namespace: regarding.namespace.clone(), name, uid, value };
            let note = format!("{who} approved {:?}", stored.value);
            let mut record = Record::new(regarding, false, "ApprovalRecorded", note);
            record.stored = Some(stored);
            vec![record]
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
mod tests;
