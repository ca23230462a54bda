//! What the fuzz targets share: the demo world (examples/policies/demo.yaml, compiled once), a
//! fixed clock, and the whole request path with the invariants every answer must keep.

use std::path::PathBuf;
use std::sync::LazyLock;

use agentguard::engine::admission::{self, Route, Snapshot};
use agentguard::engine::approval::Keys;
use agentguard::engine::policy::{Config, PolicySet};
use serde_json::Value;

/// The policies, directory and config of the demo, as the router tests use them.
pub struct World {
    pub policies: PolicySet,
    pub directory: agentguard::engine::policy::identity::StaticDirectory,
    pub config: Config,
}

pub static WORLD: LazyLock<World> = LazyLock::new(|| {
    let demo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/policies/demo.yaml");
    let (cluster, namespaced, directory) =
        agentguard::commands::check::load_world(&[demo]).expect("the demo world loads");
    let (policies, problems) = PolicySet::compile(&cluster, &namespaced);
    assert!(problems.is_empty(), "{problems:?}");
    World {
        policies,
        directory,
        config: Config { approval_keys: Keys::fixed_for_tests(), ..Config::default() },
    }
});

/// The time the example reviews' tickets were issued around.
pub fn now() -> jiff::Timestamp {
    "2026-11-26T12:10:00Z".parse().expect("a timestamp")
}

/// Sends `body` down decode → review → respond on every route and checks the answer: a
/// malformed review is refused (never allowed, HTTP-level uid only when one was read), a
/// judged one answers its own uid with the decision's verdict, and every answer is an
/// `admission.k8s.io/v1` AdmissionReview that serialises.
pub fn request_path(body: &[u8]) {
    // The server refuses a larger body (413) before decoding it (router test
    // `a_body_over_the_limit_is_refused_with_413_and_one_at_the_limit_is_read`): nothing here
    // is reached by one.
    if body.len() > admission::MAX_BODY_BYTES {
        return;
    }
    let world = &*WORLD;
    let request = match admission::decode(body) {
        Ok(request) => request,
        Err(malformed) => {
            let answer = admission::refuse(&malformed);
            assert_eq!(answer["response"]["allowed"], Value::Bool(false), "a malformed review was allowed");
            assert_eq!(answer["response"]["status"]["code"], 400);
            assert_eq!(answer["response"]["uid"], malformed.uid.as_deref().unwrap_or_default());
            assert_ne!(malformed.uid.as_deref(), Some(""), "an empty uid is no uid");
            envelope(&answer);
            return;
        }
    };
    assert!(!request.uid.is_empty(), "decode accepted an empty uid");
    assert!(!request.user_info.username.is_empty(), "decode accepted an empty username");
    let snapshot = Snapshot {
        policies: &world.policies,
        directory: &world.directory,
        config: &world.config,
        now: now(),
        collateral: &[],
    };
    for route in [Route::Shared, Route::Agents, Route::Approvals] {
        let decision = admission::review_on(&request, route, &snapshot);
        let answer = admission::respond(&request.uid, &decision);
        assert_eq!(answer["response"]["uid"], request.uid.as_str());
        assert_eq!(answer["response"]["allowed"], Value::Bool(decision.allowed()));
        if !decision.allowed() {
            assert_eq!(answer["response"]["status"]["code"], 403);
        }
        envelope(&answer);
    }
}

fn envelope(answer: &Value) {
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    // What the handler sends: it must read back as the same JSON.
    let text = answer.to_string();
    assert_eq!(&serde_json::from_str::<Value>(&text).expect("the answer is JSON"), answer);
}
