//! The network side: the HTTPS webhook port (axum + rustls, see [`tls`]) and the plain admin
//! port (`/livez`, `/readyz`, `/metrics`). The webhook handler only glues the steps together:
//! read the body, [`crate::engine::admission::decode`], [`actions::decide`], [`actions::plan`],
//! [`actions::carry_out`], answer. It decides nothing and does no side effect itself.

pub mod tls;

use crate::request::actions;
pub use crate::request::actions::{
    ApiSlots, AppState, Charge, Cluster, Recorder, Register, Spend, StaticCluster,
};

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::BodyExt;
use serde_json::Value;

use crate::engine::admission::{self, MAX_BODY_BYTES, Malformed, Route};

/// The webhook port's routes: one path per webhook (see [`crate::cluster::webhook::desired`]), and the
/// path both shared before, answered as before for configurations an older agentguard wrote.
pub fn webhook_router(state: Arc<AppState>) -> Router {
    use crate::cluster::webhook::{AGENTS_PATH, APPROVALS_PATH, LEGACY_PATH};
    let on = |route: Route| {
        move |state: State<Arc<AppState>>, query: RawQuery, headers: HeaderMap, body: Body| {
            validate(state, route, query, headers, body)
        }
    };
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
    } else if let Some(age) = stale(&state) {
        // Out of the Service's endpoints: the API server calls a replica that is current.
        let bound = state.max_staleness.0.as_secs();
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("view of the cluster is {}s old (max {bound}s)", age.as_secs()),
        )
            .into_response()
    } else if state.registrar.as_ref().is_some_and(|r| !r.current()) {
        (StatusCode::SERVICE_UNAVAILABLE, "webhook configuration not yet current").into_response()
    } else {
        "ok".into_response()
    }
}

/// The view's age when it is older than `--max-staleness`.
fn stale(state: &AppState) -> Option<std::time::Duration> {
    let age = state.cluster.view_age();
    state.max_staleness.stale(age).then_some(age)
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    state.metrics.view_age.set(state.cluster.view_age().as_secs_f64());
    state.metrics.api_requests_in_flight.set(state.api_slots.in_use() as i64);
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

/// Whether `headers` say the body is JSON, as the API server always sends it (any parameters,
/// such as a charset, are JSON's anyway).
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    let essence = value.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
}

/// Reads and drops a refused request's body (up to the largest body accepted, for at most a
/// second) without keeping it, so that the connection it came on stays usable: over HTTP/1.1,
/// the API server's, a body left unread ends the connection, and each refusal of a flood would
/// cost the API server a new TLS handshake with the replica that is already too busy.
async fn discard(mut body: Body) {
    let mut left = MAX_BODY_BYTES;
    let read = async {
        while let Some(Ok(frame)) = body.frame().await {
            left = left.saturating_sub(frame.data_ref().map_or(0, |d| d.len()));
            if left == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), read).await;
}

/// How long the API server waits for this call: the `timeout` it appends to the webhook's URL
/// (`?timeout=5s`, from the configuration's `timeoutSeconds`), or the chart's 5 s without one.
fn caller_timeout(query: Option<&str>) -> Duration {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("timeout="))
        .and_then(crate::engine::api::parse_duration)
        .filter(|t| !t.is_zero())
        .unwrap_or(Duration::from_secs(5))
}

/// How long agentguard works on one request before it refuses it itself: a fifth of the caller's
/// timeout (at least half a second) is left over, so that the answer, with a message saying
/// why, reaches the API server before it gives up waiting. Only the API calls an admitted
/// agent change needs (the blast radius, the record, the churn charge, registering an agent)
/// can take that long: the API server slow or out of reach.
pub fn deadline(caller_timeout: Duration) -> Duration {
    let margin = (caller_timeout / 5).max(Duration::from_millis(500));
    caller_timeout.saturating_sub(margin).max(Duration::from_millis(250))
}

async fn validate(
    State(state): State<Arc<AppState>>,
    route: Route,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let caller_timeout = caller_timeout(query.as_deref());
    // Agents' requests past the bound are refused before anything else is spent on them (an
    // error status: failurePolicy Fail refuses them); their bodies are read only to be dropped.
    // Approvals and label writes are not bounded.
    let _under_way = match route {
        Route::Agents => match state.api_slots.enter() {
            Some(permit) => Some(permit),
            None => {
                state.metrics.busy_refusals.inc();
                discard(body).await;
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "agentguard is busy: {} agents' requests are under way already; retry",
                        state.api_slots.limit * actions::UNDER_WAY_PER_SLOT
                    ),
                )
                    .into_response();
            }
        },
        _ => None,
    };
    // Not the API server, or not an AdmissionReview: say so before reading what was sent.
    if !is_json(&headers) {
        let got = match headers.get(header::CONTENT_TYPE) {
            Some(v) => format!("{:?}", String::from_utf8_lossy(v.as_bytes())),
            None => "missing".to_owned(),
        };
        let m =
            Malformed { uid: None, message: format!("the content type is {got}, expected application/json") };
        return malformed(&state, StatusCode::UNSUPPORTED_MEDIA_TYPE, &m);
    }
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
    // The agents webhook's requests are agents' by construction: judging them from a view the
    // API server has not vouched for within the bound could admit what a newer policy holds.
    // An error status lets failurePolicy: Fail refuse them. Everyone else's (approvals, label
    // writes) are judged as usual: holding them would not make the view fresher.
    if route == Route::Agents
        && let Some(age) = stale(&state)
    {
        state.metrics.stale_refusals.inc();
        tracing::warn!(
            uid = %request.uid,
            age_seconds = age.as_secs(),
            "refused an agent's request: the view of the cluster is older than --max-staleness"
        );
        let bound = state.max_staleness.0.as_secs();
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "agentguard has not heard from the API server for {}s (more than --max-staleness {bound}s): agents' requests are refused until it has",
                age.as_secs()
            ),
        )
            .into_response();
    }
    let work = async {
        let decision = actions::decide(&state, &request, route).await?;
        let plan = actions::plan(&state, &request, &decision);
        actions::carry_out(&state, &request, plan).await?;
        Ok::<_, actions::Refusal>(decision)
    };
    let limit = deadline(caller_timeout);
    let decision = match tokio::time::timeout(limit.saturating_sub(started.elapsed()), work).await {
        Ok(Ok(decision)) => decision,
        Ok(Err(refusal)) => return json(StatusCode::OK, &refusal.response(&request.uid)),
        Err(_) => {
            // Whatever was under way is dropped: a record written for a change refused here is
            // marked NeverHappened by the trail's checker, as for any later refusal.
            state.metrics.deadline_refusals.inc();
            tracing::warn!(
                uid = %request.uid,
                limit_ms = limit.as_millis() as u64,
                "refused: the API calls this request needs did not finish in time"
            );
            let refusal = actions::Refusal::Unavailable(format!(
                "agentguard could not finish the API calls this request needs within {:.1}s (the API server waits {}s): the API server is slow or out of reach; retry",
                limit.as_secs_f64(),
                caller_timeout.as_secs()
            ));
            return json(StatusCode::OK, &refusal.response(&request.uid));
        }
    };
    actions::observe(&state, &request, &decision, started);
    json(StatusCode::OK, &admission::respond(&request.uid, &decision))
}

#[cfg(test)]
mod tests;
