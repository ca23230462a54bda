//! Router tests: AdmissionReviews shaped as the API server sends them, through the real axum
//! router with `oneshot`.

use std::path::PathBuf;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use futures::future::BoxFuture;
use jiff::Timestamp;

use super::*;
use crate::cluster::breaker::Tripped;
use crate::cluster::events::Events;
use crate::engine::policy::identity::AgentSet;
use crate::engine::policy::{ChurnBudget, Config, Directory, PolicySet};
use crate::metrics::Metrics;

fn at_fixed_time() -> Timestamp {
    "2026-11-26T12:10:00Z".parse().unwrap()
}

pub(super) fn state(ready: bool) -> Arc<AppState> {
    struct NotReady;
    impl Cluster for NotReady {
        fn policies(&self) -> Arc<PolicySet> {
            Arc::default()
        }
        fn directory(&self) -> &dyn Directory {
            &()
        }
        fn ready(&self) -> bool {
            false
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let (cluster, namespaced, directory) =
        crate::commands::check::load_world(&[root.join("examples/policies/demo.yaml")]).unwrap();
    let (policies, problems) = PolicySet::compile(&cluster, &namespaced);
    assert!(problems.is_empty());
    let cluster: Arc<dyn Cluster> = if ready {
        Arc::new(StaticCluster { policies: Arc::new(policies), directory })
    } else {
        Arc::new(NotReady)
    };
    let config =
        Config { approval_keys: crate::engine::approval::Keys::fixed_for_tests(), ..Config::default() };
    let mut state = AppState::new(cluster, config, Arc::new(Metrics::default()));
    state.clock = at_fixed_time;
    Arc::new(state)
}

pub(super) fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/reviews").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

async fn post(state: Arc<AppState>, body: impl Into<Body>) -> (StatusCode, Value) {
    post_to(state, "/validate", body).await
}

async fn post_to(state: Arc<AppState>, path: &str, body: impl Into<Body>) -> (StatusCode, Value) {
    post_as(state, path, Some("application/json"), body).await
}

async fn post_as(
    state: Arc<AppState>,
    path: &str,
    content_type: Option<&str>,
    body: impl Into<Body>,
) -> (StatusCode, Value) {
    let mut request = Request::post(path);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let response = webhook_router(state).oneshot(request.body(body.into()).unwrap()).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn admit(review: &Value) -> Value {
    let (status, body) = post(state(true), review.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(body["kind"], "AdmissionReview");
    assert_eq!(body["response"]["uid"], review["request"]["uid"]);
    body["response"].clone()
}

#[tokio::test]
async fn fixtures_get_the_documented_answers() {
    // (fixture, allowed, fragments of status.message or warnings)
    let cases: &[(&str, bool, &[&str])] = &[
        (
            "01-agent-deletes-deployment.json",
            false,
            &[
                "requires approval under ClusterAgentPolicy \"protect-workloads\", rule \"workloads\"",
                "kubectl annotate deployments.apps web -n prod agentguard.io/approve=delete.",
            ],
        ),
        ("02-alice-approves-the-delete.json", true, &[]),
        ("03-mallory-tries-to-approve.json", false, &["mallory is not an approver"]),
        ("04-agent-deletes-approved-deployment.json", true, &[]),
        (
            "05-agent-scales-to-zero.json",
            false,
            &["spec.replicas: 3 → 0", "scale subresource carries no annotations"],
        ),
        (
            "06-agent-replaces-image.json",
            false,
            &[
                "UPDATE of deployments.apps",
                "spec.template.spec.containers[0].image: nginx:1.27 → nginx:1.28",
                "agentguard.io/approve=update.",
            ],
        ),
        ("07-agent-removes-its-agent-label.json", false, &["built-in rule \"agent-label\""]),
        ("08-agent-edits-configmap-warn-mode.json", true, &["[Warn mode, not enforced]"]),
        ("09-agent-deletes-volume-dry-run.json", false, &["never-delete-volumes", "Ask a human"]),
        ("10-human-deletes-deployment.json", true, &[]),
    ];
    for (name, allowed, fragments) in cases {
        let response = admit(&fixture(name)).await;
        assert_eq!(response["allowed"], json!(allowed), "{name}: {response}");
        let warnings: Vec<&str> =
            response["warnings"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let text =
            format!("{} {}", response["status"]["message"].as_str().unwrap_or_default(), warnings.join(" "));
        for f in *fragments {
            assert!(text.contains(f), "{name}: {text} lacks {f}");
        }
        if !allowed {
            assert_eq!(response["status"]["code"], 403, "{name}");
            assert_eq!(response["status"]["reason"], "Forbidden", "{name}");
        }
    }
}

#[tokio::test]
async fn dry_run_is_judged_like_the_real_request() {
    let mut dry = fixture("01-agent-deletes-deployment.json");
    dry["request"]["dryRun"] = json!(true);
    let real = fixture("01-agent-deletes-deployment.json");
    assert_eq!(admit(&dry).await, admit(&real).await);
}

#[tokio::test]
async fn an_agent_creating_an_object_with_an_approval_is_refused() {
    let mut review = fixture("04-agent-deletes-approved-deployment.json");
    let object = review["request"]["oldObject"].take();
    review["request"]["operation"] = json!("CREATE");
    review["request"]["object"] = object;
    review["request"]["options"] = json!({"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"});
    let response = admit(&review).await;
    assert_eq!(response["allowed"], false);
    assert!(response["status"]["message"].as_str().unwrap().contains("approval-annotation"));
}

#[tokio::test]
async fn malformed_input_is_refused_never_allowed() {
    let st = state(true);
    let (status, body) = post(st.clone(), "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["response"]["allowed"], false);
    assert!(body["response"]["status"]["message"].as_str().unwrap().contains("empty"));

    let (status, body) = post(st.clone(), "{{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["response"]["allowed"], false);

    let (status, body) =
        post(st.clone(), json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).to_string())
            .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["response"]["status"]["message"].as_str().unwrap().contains("no request"));

    // A readable uid gets a normal AdmissionReview answer, refused.
    let mut wrong = fixture("10-human-deletes-deployment.json");
    wrong["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let (status, body) = post(st.clone(), wrong.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["response"]["uid"], wrong["request"]["uid"]);
    assert_eq!(body["response"]["allowed"], false);

    let huge = vec![b' '; MAX_BODY_BYTES + 1];
    let (status, body) = post(st.clone(), huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["response"]["allowed"], false);

    let text = st.metrics.encode();
    assert!(text.contains("agentguard_malformed_reviews_total 5"), "{text}");
}

#[tokio::test]
async fn unsynced_caches_answer_with_an_error_for_failure_policy() {
    let (status, _) = post(state(false), fixture("01-agent-deletes-deployment.json").to_string()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

async fn get(router: Router, path: &str) -> (StatusCode, String) {
    let response = router.oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

#[tokio::test]
async fn admin_port_reports_readiness_and_metrics() {
    let st = state(true);
    assert_eq!(get(admin_router(st.clone()), "/livez").await.0, StatusCode::OK);
    assert_eq!(get(admin_router(st.clone()), "/readyz").await.0, StatusCode::OK);
    assert_eq!(get(admin_router(state(false)), "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);

    post(st.clone(), fixture("01-agent-deletes-deployment.json").to_string()).await;
    let (status, text) = get(admin_router(st.clone()), "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        text.contains(r#"agentguard_decisions_total{outcome="held",policy="cluster/protect-workloads",action="RequireApproval",mode="Enforce",resource="deployments",agent="system:serviceaccount:agents:coder",dry_run="false"} 1"#),
        "{text}"
    );
    assert!(text.contains("agentguard_review_duration_seconds_count 1"), "{text}");

    st.shutting_down.store(true, Ordering::Release);
    assert_eq!(get(admin_router(st), "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn events_are_left_for_real_requests_only() {
    let base = state(true);
    let (events, mut rx) = Events::channel(base.metrics.clone(), 16);
    let cluster = base.cluster.clone();
    let mut with_events = AppState::new(cluster, base.config.clone(), base.metrics.clone());
    with_events.clock = at_fixed_time;
    with_events.events = events;
    let st = Arc::new(with_events);

    post(st.clone(), fixture("01-agent-deletes-deployment.json").to_string()).await;
    let held = rx.try_recv().expect("an Event for the held delete");
    assert_eq!((held.reason, held.warning), ("ApprovalRequired", true));
    assert_eq!(held.regarding.kind.as_deref(), Some("Deployment"));
    assert_eq!(held.regarding.api_version.as_deref(), Some("apps/v1"));
    assert_eq!(held.regarding.name.as_deref(), Some("web"));
    assert_eq!(held.regarding.uid.as_deref(), Some("6f1c7a52-3b0e-4d7a-9a51-0c2d9e1f8b33"));
    assert!(held.note.contains("kubectl annotate deployments.apps web"));

    post(st.clone(), fixture("04-agent-deletes-approved-deployment.json").to_string()).await;
    assert_eq!(rx.try_recv().expect("an Event for the approved delete").reason, "Approved");

    let mut dry = fixture("01-agent-deletes-deployment.json");
    dry["request"]["dryRun"] = json!(true);
    post(st.clone(), dry.to_string()).await;
    post(st.clone(), fixture("10-human-deletes-deployment.json").to_string()).await;
    assert!(rx.try_recv().is_err(), "no Event for a dry run or a human's request");
}

#[tokio::test]
async fn a_held_change_is_carried_whole_and_claimed_approvals_are_not_reported_unread() {
    let base = state(true);
    let (events, mut rx) = Events::channel(base.metrics.clone(), 16);
    let mut with_events = AppState::new(base.cluster.clone(), base.config.clone(), base.metrics.clone());
    with_events.clock = at_fixed_time;
    with_events.events = events;
    let st = Arc::new(with_events);

    post(st.clone(), fixture("06-agent-replaces-image.json").to_string()).await;
    assert_eq!(rx.try_recv().expect("the held update").reason, "ApprovalRequired");
    let part = rx.try_recv().expect("the whole change");
    assert_eq!((part.reason, part.part), ("ApprovalChange", 0));
    assert!(
        part.note.starts_with("change ")
            && part
                .note
                .ends_with("part 1/1: spec.template.spec.containers[0].image: nginx:1.27 → nginx:1.28"),
        "{}",
        part.note
    );
    // An approval write is only reported once read back from the live object: without a
    // client to read it with, nothing is reported.
    let (_, body) = post(st.clone(), fixture("02-alice-approves-the-delete.json").to_string()).await;
    assert_eq!(body["response"]["allowed"], true);
    assert!(rx.try_recv().is_err(), "an unconfirmed approval was reported");
}

/// The demo world plus `extra` ClusterAgentPolicies (YAML), with the given side services.
fn state_with(
    extra: &str,
    breaker: Option<Arc<dyn Charge>>,
    trail: Option<Arc<dyn Recorder>>,
) -> Arc<AppState> {
    use serde::Deserialize as _;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let (mut cluster, namespaced, directory) =
        crate::commands::check::load_world(&[root.join("examples/policies/demo.yaml")]).unwrap();
    for doc in serde_yaml::Deserializer::from_str(extra).filter(|_| !extra.is_empty()) {
        cluster.push(crate::engine::api::ClusterAgentPolicy::deserialize(doc).unwrap());
    }
    let (policies, problems) = PolicySet::compile(&cluster, &namespaced);
    assert!(problems.is_empty(), "{problems:?}");
    let cluster = Arc::new(StaticCluster { policies: Arc::new(policies), directory });
    let config =
        Config { approval_keys: crate::engine::approval::Keys::fixed_for_tests(), ..Config::default() };
    let mut state = AppState::new(cluster, config, Arc::new(Metrics::default()));
    state.clock = at_fixed_time;
    state.breaker = breaker;
    state.trail = trail;
    Arc::new(state)
}

const CHURN_LIMITED: &str = "apiVersion: agentguard.io/v1alpha1\nkind: ClusterAgentPolicy\nmetadata: {name: churn}\n\
    spec:\n  action: Allow\n  churnLimit: {maxOperations: 2, window: 10m}\n  rules:\n  - name: any\n    \
    operations: [DELETE]\n    resources: [{apiGroups: [apps], resources: [deployments]}]\n";

/// A breaker that answers from a fixed count.
struct FixedCount(u32);

impl Charge for FixedCount {
    fn charge<'a>(
        &'a self,
        _: &'a str,
        budgets: &'a [ChurnBudget],
        _: bool,
    ) -> BoxFuture<'a, anyhow::Result<Option<Tripped>>> {
        let budget = budgets[0].clone();
        let tally = crate::cluster::breaker::Tally { count: self.0, window_start: at_fixed_time() };
        let tripped = tally.spent(&budget).then(|| Tripped {
            budget,
            tally,
            lease: "agentguard-churn-0000000000000000".into(),
            namespace: "agentguard-system".into(),
        });
        Box::pin(async move { Ok(tripped) })
    }
}

#[tokio::test]
async fn a_churn_limit_refuses_once_spent_and_is_never_waived() {
    // The approved delete of fixture 04 also matches the churn-limited Allow policy.
    let review = fixture("04-agent-deletes-approved-deployment.json");
    let within = state_with(CHURN_LIMITED, Some(Arc::new(FixedCount(1))), None);
    assert_eq!(post(within, review.to_string()).await.1["response"]["allowed"], true);
    let (_, spent) =
        post(state_with(CHURN_LIMITED, Some(Arc::new(FixedCount(2))), None), review.to_string()).await;
    assert_eq!(spent["response"]["allowed"], false);
    assert_eq!(spent["response"]["status"]["code"], 403);
    let message = spent["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("churn limit of ClusterAgentPolicy \"churn\" reached: 2 guarded operations"),
        "{message}"
    );
    // Without anywhere to count, the limit is not waived.
    let (_, uncounted) = post(state_with(CHURN_LIMITED, None, None), review.to_string()).await;
    assert_eq!(uncounted["response"]["allowed"], false);
    assert_eq!(uncounted["response"]["status"]["code"], 503);
}

/// A trail that keeps records in memory, or fails every write.
struct MemoryTrail {
    settings: crate::cluster::trail::Settings,
    records: std::sync::Mutex<Vec<crate::engine::api::AgentChange>>,
    fail: bool,
}

impl MemoryTrail {
    fn new(fail: bool) -> Arc<Self> {
        Arc::new(Self {
            settings: crate::cluster::trail::Settings {
                namespace: "agentguard-system".into(),
                max_object_bytes: 262_144,
                keep_secret_data: false,
                retention: std::time::Duration::from_secs(3600),
                max_records: 10,
            },
            records: Default::default(),
            fail,
        })
    }
}

impl Recorder for MemoryTrail {
    fn settings(&self) -> &crate::cluster::trail::Settings {
        &self.settings
    }
    fn write<'a>(&'a self, record: &'a crate::engine::api::AgentChange) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            anyhow::ensure!(!self.fail, "the API server is unreachable");
            self.records.lock().unwrap().push(record.clone());
            Ok(())
        })
    }
}

#[tokio::test]
async fn an_admitted_change_is_recorded_first_or_not_admitted() {
    let review = fixture("04-agent-deletes-approved-deployment.json");
    let trail = MemoryTrail::new(false);
    let (_, body) = post(state_with("", None, Some(trail.clone())), review.to_string()).await;
    assert_eq!(body["response"]["allowed"], true);
    let records = trail.records.lock().unwrap().clone();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].spec.requester, "system:serviceaccount:agents:coder");
    assert_eq!(records[0].spec.admission, "approved");

    let (_, body) = post(state_with("", None, Some(MemoryTrail::new(true))), review.to_string()).await;
    assert_eq!(body["response"]["allowed"], false);
    let message = body["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("could not record this change in its audit trail"), "{message}");

    // Held requests and dry runs leave no record.
    let trail = MemoryTrail::new(false);
    post(state_with("", None, Some(trail.clone())), fixture("01-agent-deletes-deployment.json").to_string())
        .await;
    post(
        state_with("", None, Some(trail.clone())),
        fixture("09-agent-deletes-volume-dry-run.json").to_string(),
    )
    .await;
    assert!(trail.records.lock().unwrap().is_empty());
}

/// A registrar that remembers what it was asked to register, or fails.
struct Registrations {
    asked: std::sync::Mutex<Vec<AgentSet>>,
    fail: bool,
}

impl Register for Registrations {
    fn ensure<'a>(&'a self, marked: &'a AgentSet) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            anyhow::ensure!(!self.fail, "the webhook configuration cannot be written");
            self.asked.lock().unwrap().push(marked.clone());
            Ok(())
        })
    }
    fn current(&self) -> bool {
        true
    }
}

#[tokio::test]
async fn marking_an_agent_is_admitted_only_once_it_is_registered() {
    let label = |labels: Value| {
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "newcomer", "namespace": "agents", "uid": "sa-1", "labels": labels}})
    };
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "mark-1",
            "kind": {"group": "", "version": "v1", "kind": "ServiceAccount"},
            "resource": {"group": "", "version": "v1", "resource": "serviceaccounts"},
            "name": "newcomer", "namespace": "agents", "operation": "UPDATE",
            "userInfo": {"username": "alice", "groups": ["sre", "system:authenticated"]},
            "object": label(json!({"agentguard.io/agent": "true"})),
            "oldObject": label(json!({})),
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "UpdateOptions"}
        }
    });
    for fail in [false, true] {
        let registrations = Arc::new(Registrations { asked: Default::default(), fail });
        let mut state = AppState::new(
            Arc::new(StaticCluster { policies: Arc::default(), directory: Default::default() }),
            Config::default(),
            Arc::new(Metrics::default()),
        );
        state.registrar = Some(registrations.clone());
        let (_, body) = post(Arc::new(state), review.to_string()).await;
        assert_eq!(body["response"]["allowed"], !fail, "{body}");
        if fail {
            let message = body["response"]["status"]["message"].as_str().unwrap();
            assert!(message.contains("could not register the new agent"), "{message}");
        } else {
            let asked = registrations.asked.lock().unwrap();
            assert_eq!(asked.len(), 1);
            assert!(asked[0].usernames.contains("system:serviceaccount:agents:newcomer"));
        }
    }
}

/// A ServiceAccount no cache has seen labelled (its label just stored, the reflector behind):
/// the API server sent it through the `agents` webhook, whose conditions list exactly the
/// registered agents, so it is judged as an agent. The same request on any other path is judged
/// from the caches alone.
#[tokio::test]
async fn the_agents_path_judges_the_requester_an_agent_whatever_the_caches_say() {
    let mut review = fixture("01-agent-deletes-deployment.json");
    review["request"]["userInfo"] = json!({
        "username": "system:serviceaccount:prod:just-labelled",
        "groups": ["system:serviceaccounts", "system:serviceaccounts:prod", "system:authenticated"]
    });
    let (status, body) = post_to(state(true), "/validate/agents", review.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    let message = body["response"]["status"]["message"].as_str().unwrap_or_default();
    assert_eq!(body["response"]["allowed"], json!(false), "{body}");
    assert!(
        message.contains("requires approval under ClusterAgentPolicy \"protect-workloads\""),
        "{message}"
    );
    for path in ["/validate/approvals", "/validate"] {
        let (status, body) = post_to(state(true), path, review.to_string()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["response"]["allowed"], json!(true), "{path}: not an agent by the caches: {body}");
    }
    let (status, _) = post_to(state(true), "/validate/other", review.to_string()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// The refusal's HTTP status, `allowed` and message; every refusal must be an AdmissionReview
/// that admits nothing.
async fn refused(
    state: Arc<AppState>,
    content_type: Option<&str>,
    body: impl Into<Body>,
) -> (StatusCode, String) {
    let (status, body) = post_as(state, "/validate", content_type, body).await;
    assert_eq!(body["kind"], "AdmissionReview", "{body}");
    assert_eq!(body["response"]["allowed"], false, "{body}");
    assert_eq!(body["response"]["status"]["code"], 400, "{body}");
    (status, body["response"]["status"]["message"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_with_413_and_one_at_the_limit_is_read() {
    let st = state(true);
    let (status, message) =
        refused(st.clone(), Some("application/json"), vec![b' '; MAX_BODY_BYTES + 1]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(message.contains(&format!("the body is larger than {MAX_BODY_BYTES} bytes")), "{message}");
    // Exactly at the limit the body is read, and judged (here: empty).
    let (status, message) = refused(st, Some("application/json"), vec![b' '; MAX_BODY_BYTES]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message.contains("empty"), "{message}");
}

#[tokio::test]
async fn only_json_is_read() {
    let st = state(true);
    let review = fixture("10-human-deletes-deployment.json").to_string();
    for (content_type, shown) in [
        (None, "missing"),
        (Some("text/plain"), "\"text/plain\""),
        (Some("application/yaml"), "\"application/yaml\""),
        (Some("application/json-patch+json"), "\"application/json-patch+json\""),
        (Some("application/x-www-form-urlencoded"), "\"application/x-www-form-urlencoded\""),
    ] {
        let (status, message) = refused(st.clone(), content_type, review.clone()).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{content_type:?}");
        assert_eq!(
            message,
            format!("malformed AdmissionReview: the content type is {shown}, expected application/json")
        );
    }
    for content_type in ["application/json", "application/json; charset=utf-8", "Application/JSON"] {
        let (status, body) = post_as(st.clone(), "/validate", Some(content_type), review.clone()).await;
        assert_eq!(status, StatusCode::OK, "{content_type}");
        assert_eq!(body["response"]["allowed"], true, "{content_type}: {body}");
    }
}

#[tokio::test]
async fn truncated_or_foreign_json_is_refused_with_400() {
    let st = state(true);
    let review = fixture("01-agent-deletes-deployment.json").to_string();
    for cut in [1, review.len() / 2, review.len() - 1] {
        let (status, message) = refused(st.clone(), Some("application/json"), review[..cut].to_owned()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(message.contains("the body is not JSON"), "{cut}: {message}");
    }
    let (status, message) = refused(st.clone(), Some("application/json"), vec![0xff, 0xfe, b'{']).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message.contains("the body is not JSON"), "{message}");
    // JSON, but not an AdmissionReview.
    for body in ["null", "42", "\"AdmissionReview\"", "[]", "{}", r#"{"hello": "world"}"#] {
        let (status, message) = refused(st.clone(), Some("application/json"), body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            message.contains("expected apiVersion admission.k8s.io/v1 and kind AdmissionReview"),
            "{message}"
        );
    }
    // An AdmissionReview whose request is not a request.
    let mut review = fixture("01-agent-deletes-deployment.json");
    review["request"] = json!("delete everything");
    let (status, message) = refused(st, Some("application/json"), review.to_string()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message.contains("has no request"), "{message}");
}

#[tokio::test]
async fn a_wrong_api_version_or_kind_is_refused_to_its_uid() {
    let st = state(true);
    for (field, value) in
        [("apiVersion", "admission.k8s.io/v1beta1"), ("apiVersion", "v1"), ("kind", "AdmissionRequest")]
    {
        let mut review = fixture("10-human-deletes-deployment.json");
        review[field] = json!(value);
        // The uid is readable, so the API server gets an answer it can match: HTTP 200, refused.
        let (status, body) = post(st.clone(), review.to_string()).await;
        assert_eq!(status, StatusCode::OK, "{field}={value}");
        assert_eq!(body["response"]["uid"], review["request"]["uid"]);
        assert_eq!(body["response"]["allowed"], false);
        let message = body["response"]["status"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("{value:?}")), "{message}");
        // Without one, an HTTP error.
        review["request"].as_object_mut().unwrap().remove("uid");
        let (status, _) = refused(st.clone(), Some("application/json"), review.to_string()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{field}={value}");
    }
}

#[tokio::test]
async fn a_missing_or_empty_uid_is_refused_with_400() {
    let st = state(true);
    let mut review = fixture("10-human-deletes-deployment.json");
    review["request"].as_object_mut().unwrap().remove("uid");
    let (status, message) = refused(st.clone(), Some("application/json"), review.to_string()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message.contains("missing field `uid`"), "{message}");
    for uid in [json!(""), json!(7), json!(null)] {
        review["request"]["uid"] = uid.clone();
        let (status, body) = post(st.clone(), review.to_string()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uid}");
        assert_eq!(
            (body["response"]["uid"].clone(), body["response"]["allowed"].clone()),
            (json!(""), json!(false))
        );
    }
}

/// `depth` arrays around `null`.
fn nested(depth: usize) -> String {
    format!("{}null{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn deeply_nested_json_is_refused_not_a_stack_overflow() {
    let st = state(true);
    // Past serde_json's recursion limit (128), wherever the nesting is: refused as not JSON.
    let mut review = fixture("06-agent-replaces-image.json").to_string();
    review = review.replacen("\"spec\":", &format!("\"deep\": {}, \"spec\":", nested(100_000)), 1);
    for body in [nested(129), nested(1_000_000), review] {
        let (status, message) = refused(st.clone(), Some("application/json"), body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(message.contains("recursion limit exceeded"), "{message}");
    }
    // As deep as serde_json reads, in both objects of an update: judged as usual (its diff,
    // digest and policy walk are bounded).
    let mut review = fixture("06-agent-replaces-image.json");
    let deep: Value = serde_json::from_str(&nested(120)).unwrap();
    review["request"]["object"]["spec"]["deep"] = deep.clone();
    review["request"]["oldObject"]["spec"]["deep"] = json!([deep]);
    let response = admit(&review).await;
    assert_eq!(response["allowed"], false);
    assert!(response["status"]["message"].as_str().unwrap().contains("spec.deep"), "{response}");
    // A delete's ticket digests the whole object (engine::diff::state_digest).
    let mut review = fixture("01-agent-deletes-deployment.json");
    review["request"]["oldObject"]["spec"]["deep"] = deep;
    let response = admit(&review).await;
    assert_eq!(response["allowed"], false);
    assert!(
        response["status"]["message"].as_str().unwrap().contains("agentguard.io/approve=delete."),
        "{response}"
    );
}

/// A fixed view last vouched for `age` ago.
fn state_aged(age: std::time::Duration) -> Arc<AppState> {
    struct Aged(StaticCluster, std::time::Duration);
    impl Cluster for Aged {
        fn policies(&self) -> Arc<PolicySet> {
            self.0.policies()
        }
        fn directory(&self) -> &dyn Directory {
            self.0.directory()
        }
        fn ready(&self) -> bool {
            true
        }
        fn view_age(&self) -> std::time::Duration {
            self.1
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let (cluster, namespaced, directory) =
        crate::commands::check::load_world(&[root.join("examples/policies/demo.yaml")]).unwrap();
    let (policies, _) = PolicySet::compile(&cluster, &namespaced);
    let cluster = Aged(StaticCluster { policies: Arc::new(policies), directory }, age);
    let config =
        Config { approval_keys: crate::engine::approval::Keys::fixed_for_tests(), ..Config::default() };
    let mut state = AppState::new(Arc::new(cluster), config, Arc::new(Metrics::default()));
    state.clock = at_fixed_time;
    Arc::new(state)
}

#[tokio::test]
async fn a_view_older_than_the_bound_refuses_agents_only() {
    use std::time::Duration;
    let agent = fixture("01-agent-deletes-deployment.json").to_string();
    let approval = fixture("02-alice-approves-the-delete.json").to_string();

    // Within the bound (60 s by default): judged as usual.
    let fresh = state_aged(Duration::from_secs(60));
    let (status, body) = post_to(fresh.clone(), "/validate/agents", agent.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["response"]["allowed"], false, "held, as the fixture says");
    assert_eq!(get(admin_router(fresh.clone()), "/readyz").await.0, StatusCode::OK);

    // Past it: the agents webhook answers 503, so failurePolicy: Fail refuses the agent
    // without a decision from a view that may be out of date...
    let stale = state_aged(Duration::from_secs(61));
    let (status, body) = post_to(stale.clone(), "/validate/agents", agent).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, Value::Null, "no AdmissionReview: the API server's failurePolicy decides");
    // ...while an approver's write on the approvals webhook is judged as before.
    let (status, body) = post_to(stale.clone(), "/validate/approvals", approval).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["response"]["allowed"], true, "{body}");

    let (status, text) = get(admin_router(stale.clone()), "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(text.contains("61s old"), "{text}");
    let (_, text) = get(admin_router(stale), "/metrics").await;
    assert!(text.contains("agentguard_view_age_seconds 61.0"), "{text}");
    assert!(text.contains("agentguard_stale_refusals_total 1"), "{text}");
    let (_, text) = get(admin_router(fresh), "/metrics").await;
    assert!(text.contains("agentguard_stale_refusals_total 0"), "{text}");
}

#[test]
fn agentguard_answers_before_the_api_server_gives_up() {
    use std::time::Duration;
    let ms = Duration::from_millis;
    assert_eq!(caller_timeout(Some("timeout=5s")), Duration::from_secs(5));
    assert_eq!(caller_timeout(Some("a=b&timeout=10s")), Duration::from_secs(10));
    assert_eq!(caller_timeout(None), Duration::from_secs(5));
    assert_eq!(caller_timeout(Some("timeout=junk")), Duration::from_secs(5));
    assert_eq!(deadline(Duration::from_secs(5)), ms(4000));
    assert_eq!(deadline(Duration::from_secs(30)), ms(24000));
    assert_eq!(deadline(Duration::from_secs(1)), ms(500));
}

/// A blast-radius lookup that never answers (an API server that does not).
struct Hangs;

impl crate::cluster::ownership::Lookup for Hangs {
    fn collateral<'a>(
        &'a self,
        _: &'a crate::engine::admission::AdmissionRequest,
        _: &'a PolicySet,
    ) -> BoxFuture<'a, anyhow::Result<Vec<crate::engine::policy::Collateral>>> {
        Box::pin(futures::future::pending())
    }
}

/// The ready state at the fixed time, with a lookup that never answers.
fn with_hanging_lookup() -> Arc<AppState> {
    let base = state(true);
    let mut st = AppState::new(base.cluster.clone(), base.config.clone(), Arc::new(Metrics::default()));
    st.clock = at_fixed_time;
    st.ownership = Some(Arc::new(Hangs));
    Arc::new(st)
}

#[tokio::test]
async fn a_hung_api_call_is_refused_within_the_callers_timeout() {
    use std::time::Duration;
    let st = with_hanging_lookup();
    let started = std::time::Instant::now();
    let (status, body) = post_to(
        st.clone(),
        "/validate/agents?timeout=1s",
        fixture("01-agent-deletes-deployment.json").to_string(),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["response"]["allowed"], false);
    assert_eq!(body["response"]["status"]["code"], 503, "{body}");
    let message = body["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("could not finish the API calls"), "{message}");
    assert!(took >= Duration::from_millis(500) && took < Duration::from_secs(1), "{took:?}");
    let (_, text) = get(admin_router(st), "/metrics").await;
    assert!(text.contains("agentguard_deadline_refusals_total 1"), "{text}");
}

#[tokio::test]
async fn a_delete_a_deny_policy_refuses_is_answered_without_looking_up_its_blast_radius() {
    use std::time::Duration;
    let st = with_hanging_lookup();
    // Denied whatever it takes along: no lookup, so the lookup that never answers is not waited for.
    let started = std::time::Instant::now();
    let (_, body) = post_to(
        st.clone(),
        "/validate/agents?timeout=1s",
        fixture("09-agent-deletes-volume-dry-run.json").to_string(),
    )
    .await;
    assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
    assert_eq!(body["response"]["allowed"], false);
    assert_eq!(body["response"]["status"]["code"], 403, "{body}");
    assert!(body["response"]["status"]["message"].as_str().unwrap().contains("is denied by"), "{body}");
    // A held delete still waits for its blast radius (its ticket is bound to it).
    let (_, body) = post_to(
        st.clone(),
        "/validate/agents?timeout=1s",
        fixture("01-agent-deletes-deployment.json").to_string(),
    )
    .await;
    assert_eq!(body["response"]["status"]["code"], 503, "{body}");
}

#[tokio::test]
async fn when_every_api_slot_is_taken_requests_needing_one_are_refused_quickly_and_the_rest_decided() {
    use std::time::Duration;
    struct Nothing;
    impl crate::cluster::ownership::Lookup for Nothing {
        fn collateral<'a>(
            &'a self,
            _: &'a crate::engine::admission::AdmissionRequest,
            _: &'a PolicySet,
        ) -> BoxFuture<'a, anyhow::Result<Vec<crate::engine::policy::Collateral>>> {
            Box::pin(futures::future::ready(Ok(Vec::new())))
        }
    }
    let base = state(true);
    let mut st = AppState::new(base.cluster.clone(), base.config.clone(), Arc::new(Metrics::default()));
    st.clock = at_fixed_time;
    st.ownership = Some(Arc::new(Nothing));
    st.api_slots = ApiSlots::new(1, Duration::from_millis(200));
    let st = Arc::new(st);
    let agent_delete = fixture("01-agent-deletes-deployment.json").to_string();

    // A slot free: the delete's blast radius is looked up and it is held as the fixture says.
    let (_, body) = post_to(st.clone(), "/validate/agents", agent_delete.clone()).await;
    assert!(body["response"]["status"]["message"].as_str().unwrap().contains("requires approval"), "{body}");

    // The only slot taken (a flood's API calls under way): refused after the wait, not later.
    let slot = st.api_slots.take(&st.metrics).await.unwrap();
    let started = std::time::Instant::now();
    let (status, body) = post_to(st.clone(), "/validate/agents", agent_delete).await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["response"]["allowed"], false);
    assert_eq!(body["response"]["status"]["code"], 503, "{body}");
    assert!(body["response"]["status"]["message"].as_str().unwrap().contains("agentguard is busy"), "{body}");
    assert!(took >= Duration::from_millis(200) && took < Duration::from_secs(1), "{took:?}");
    // A decision from the caches alone (a scale to zero: no blast radius) does not wait.
    let started = std::time::Instant::now();
    let (_, body) =
        post_to(st.clone(), "/validate/agents", fixture("05-agent-scales-to-zero.json").to_string()).await;
    assert!(started.elapsed() < Duration::from_millis(200));
    assert!(body["response"]["status"]["message"].as_str().unwrap().contains("requires approval"), "{body}");
    let (_, text) = get(admin_router(st.clone()), "/metrics").await;
    assert!(text.contains("agentguard_busy_refusals_total 1"), "{text}");
    assert!(text.contains("agentguard_api_requests_in_flight 1"), "{text}");
    drop(slot);
    let (_, text) = get(admin_router(st.clone()), "/metrics").await;
    assert!(text.contains("agentguard_api_requests_in_flight 0"), "{text}");

    // As many agents' requests under way as the bound allows: the next is refused at once, with
    // an error status; an approval is not bounded.
    let under_way: Vec<_> =
        (0..crate::request::actions::UNDER_WAY_PER_SLOT).map(|_| st.api_slots.enter().unwrap()).collect();
    let started = std::time::Instant::now();
    let (status, _) =
        post_to(st.clone(), "/validate/agents", fixture("01-agent-deletes-deployment.json").to_string())
            .await;
    assert!(started.elapsed() < Duration::from_millis(200));
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _) =
        post_to(st.clone(), "/validate/approvals", fixture("01-agent-deletes-deployment.json").to_string())
            .await;
    assert_eq!(status, StatusCode::OK);
    drop(under_way);
    let (_, body) =
        post_to(st.clone(), "/validate/agents", fixture("01-agent-deletes-deployment.json").to_string())
            .await;
    assert!(body["response"]["status"]["message"].as_str().unwrap().contains("requires approval"), "{body}");
    let (_, text) = get(admin_router(st), "/metrics").await;
    assert!(text.contains("agentguard_busy_refusals_total 2"), "{text}");
}
