//! The network side: the HTTPS webhook port (axum + rustls, see [`tls`]) and the plain admin
//! port (`/livez`, `/readyz`, `/metrics`). The webhook handler only glues the steps together:
//! read the body, [`crate::engine::admission::decode`], [`actions::decide`], [`actions::plan`],
//! [`actions::carry_out`], answer. It decides nothing and does no side effect itself.

pub mod tls;

use crate::request::actions;
pub use crate::request::actions::{AppState, Charge, Cluster, Recorder, Register, Spend, StaticCluster};

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
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
        move |state: State<Arc<AppState>>, headers: HeaderMap, body: Body| {
            validate(state, route, headers, body)
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

/// Whether `headers` say the body is JSON, as the API server always sends it (any parameters,
/// such as a charset, are JSON's anyway).
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    let essence = value.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
}

async fn validate(
    State(state): State<Arc<AppState>>,
    route: Route,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
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
    let decision = match actions::decide(&state, &request, route).await {
        Ok(decision) => decision,
        Err(refusal) => return json(StatusCode::OK, &refusal.response(&request.uid)),
    };
    let plan = actions::plan(&state, &request, &decision);
    if let Err(refusal) = actions::carry_out(&state, &request, plan).await {
        return json(StatusCode::OK, &refusal.response(&request.uid));
    }
    actions::observe(&state, &request, &decision, started);
    json(StatusCode::OK, &admission::respond(&request.uid, &decision))
}

#[cfg(test)]
mod tests;
