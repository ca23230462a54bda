//! Router tests: AdmissionReviews shaped as the API server sends them, through the real axum
//! router with `oneshot`.

use std::path::PathBuf;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;
use crate::events::Events;

fn at_fixed_time() -> Timestamp {
    "2026-11-26T12:10:00Z".parse().unwrap()
}

fn state(ready: bool) -> Arc<AppState> {
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
        crate::cli::load_world(&[root.join("examples/policies/demo.yaml")]).unwrap();
    let (policies, problems) = PolicySet::compile(&cluster, &namespaced);
    assert!(problems.is_empty());
    let cluster: Arc<dyn Cluster> = if ready {
        Arc::new(StaticCluster { policies: Arc::new(policies), directory })
    } else {
        Arc::new(NotReady)
    };
    let mut state = AppState::new(cluster, Config::default(), Arc::new(Metrics::default()));
    state.clock = at_fixed_time;
    Arc::new(state)
}

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/reviews").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

async fn post(state: Arc<AppState>, body: impl Into<Body>) -> (StatusCode, Value) {
    let request =
        Request::post("/validate").header("content-type", "application/json").body(body.into()).unwrap();
    let response = webhook_router(state).oneshot(request).await.unwrap();
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
                "kubectl annotate deployments.apps web -n prod agentguard.io/approve=delete --overwrite",
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
                "agentguard.io/approve=update:",
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
    let mut with_events = AppState::new(cluster, Config::default(), base.metrics.clone());
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
