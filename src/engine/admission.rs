//! AdmissionReview in → decision → AdmissionResponse out.
//!
//! Three layers, as the data flows: [`decode`] turns bytes into a checked [`AdmissionRequest`]
//! (malformed input becomes a [`Malformed`] error, never a panic and never an admission);
//! [`review`] is synchronous, does no I/O and asks the pure policy engine; [`respond`] encodes
//! the decision. The axum handler in [`crate::request::server`] only glues these together.

use std::borrow::Cow;
use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::engine::policy::{
    self, Collateral, Config, Decision, Directory, Facts, Operation, PolicySet, Requester, Verdict,
};

/// Largest AdmissionReview accepted (the API server's own request limit is 3 MiB per object;
/// an AdmissionReview carries two objects plus framing).
pub const MAX_BODY_BYTES: usize = 7 * 1024 * 1024;

const API_VERSION: &str = "admission.k8s.io/v1";

/// The parts of an `admission.k8s.io/v1` AdmissionRequest agentguard reads.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    pub uid: String,
    pub kind: GroupVersionKind,
    pub resource: GroupVersionResource,
    #[serde(default)]
    pub sub_resource: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    pub operation: String,
    pub user_info: UserInfo,
    #[serde(default)]
    pub object: Option<Value>,
    #[serde(default)]
    pub old_object: Option<Value>,
    #[serde(default)]
    pub dry_run: Option<bool>,
    #[serde(default)]
    pub options: Option<Value>,
    /// The kind, resource and subresource as the client asked for them, when the API server
    /// converted the request to the version the webhook registered for (`matchPolicy:
    /// Equivalent`); kept only for conditions, which may read them.
    #[serde(default)]
    pub request_kind: Option<GroupVersionKind>,
    #[serde(default)]
    pub request_resource: Option<GroupVersionResource>,
    #[serde(default)]
    pub request_sub_resource: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct GroupVersionKind {
    #[serde(default)]
    pub group: String,
    pub version: String,
    pub kind: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct GroupVersionResource {
    #[serde(default)]
    pub group: String,
    pub version: String,
    pub resource: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct UserInfo {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub groups: Vec<String>,
    /// Authenticator-provided extras: a map of string lists. A value of another shape makes the
    /// review malformed (refused); `null` reads as no extras.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub extra: BTreeMap<String, Vec<String>>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Vec<String>>, D::Error> {
    Ok(Option::<BTreeMap<String, Vec<String>>>::deserialize(d)?.unwrap_or_default())
}

/// The `userInfo.extra` keys of a ServiceAccount token bound to a pod.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
pub const CREDENTIAL_ID_EXTRA: &str = "authentication.kubernetes.io/credential-id";

/// Longest attribution value kept: anything longer did not come from the API server's token
/// authenticator (names are at most 253 bytes), and is cut so a record or log line stays small.
const ATTRIBUTION_BYTES: usize = 256;

impl UserInfo {
    /// Where the credential came from, from `extra`: the first value of each key, control
    /// characters dropped and cut to a bounded length. `None` when none is present.
    pub fn attribution(&self) -> Option<crate::engine::api::Attribution> {
        let one = |key: &str| {
            let value = self.extra.get(key)?.first()?;
            let mut clean: String = value.chars().filter(|c| !c.is_control()).collect();
            if clean.len() > ATTRIBUTION_BYTES {
                let mut end = ATTRIBUTION_BYTES;
                while !clean.is_char_boundary(end) {
                    end -= 1;
                }
                clean.truncate(end);
            }
            (!clean.is_empty()).then_some(clean)
        };
        let attribution = crate::engine::api::Attribution {
            pod_name: one(POD_NAME_EXTRA),
            pod_uid: one(POD_UID_EXTRA),
            node_name: one(NODE_NAME_EXTRA),
            credential_id: one(CREDENTIAL_ID_EXTRA),
        };
        (!attribution.is_empty()).then_some(attribution)
    }
}

/// A request that cannot be judged. It is refused, with this message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed AdmissionReview: {message}")]
pub struct Malformed {
    /// The request's uid when it could be read: the answer is then a normal AdmissionReview.
    pub uid: Option<String>,
    pub message: String,
}

impl Malformed {
    fn new(uid: Option<&str>, message: impl Into<String>) -> Self {
        Self { uid: uid.filter(|u| !u.is_empty()).map(str::to_owned), message: message.into() }
    }
}

/// Decodes and checks an AdmissionReview body.
///
/// One pass over the bytes straight into [`AdmissionRequest`]: `object`, `oldObject` and
/// `options` become a `Value` each, nothing else is built, and no part is copied. Only when that
/// fails is the body read again, leniently, to find which check it fails and the uid to answer
/// (a refusal costs that second read; an admission never does).
pub fn decode(body: &[u8]) -> Result<AdmissionRequest, Malformed> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Malformed::new(None, "the request body is empty"));
    }
    let review = match serde_json::from_slice::<Object<Review<'_>>>(body) {
        Ok(Object(review)) => review,
        Err(e) => return Err(explain(body, &e)),
    };
    let request = review.request.map(|Object(r)| r);
    let uid = request.as_ref().map(|r| r.uid.as_str());
    let api_version = review.api_version.as_deref().unwrap_or_default();
    let kind = review.kind.as_deref().unwrap_or_default();
    if api_version != API_VERSION || kind != "AdmissionReview" {
        return Err(wrong_type(uid, api_version, kind));
    }
    let Some(request) = request else {
        return Err(Malformed::new(None, "the AdmissionReview has no request"));
    };
    check(request)
}

/// The AdmissionReview as [`decode`] reads it. Its fields are optional so that a missing one is
/// refused with the same message as a wrong one.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Review<'a> {
    #[serde(default, borrow)]
    api_version: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(default)]
    request: Option<Object<AdmissionRequest>>,
}

/// A struct read only from a JSON object: serde's derive also takes an array of the fields in
/// their order, which no API server sends.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Fields<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Fields(std::marker::PhantomData)).map(Object)
    }
}

fn wrong_type(uid: Option<&str>, api_version: &str, kind: &str) -> Malformed {
    Malformed::new(
        uid,
        format!(
            "expected apiVersion {API_VERSION} and kind AdmissionReview, got {api_version:?} and {kind:?}"
        ),
    )
}

/// Why [`decode`] could not read `body` (`error`), as precisely as a lenient reading tells: not
/// JSON, not an AdmissionReview, no request, or a request that is invalid, with its uid when it
/// has one. Whatever the lenient reading finds, the answer is a refusal: a body the typed reading
/// refused (a field given twice, say) is refused as invalid.
fn explain(body: &[u8], error: &serde_json::Error) -> Malformed {
    let value: Value = match serde_json::from_slice(body) {
        Ok(value) => value,
        Err(e) => return Malformed::new(None, format!("the body is not JSON: {e}")),
    };
    let uid = value.pointer("/request/uid").and_then(Value::as_str);
    let api_version = value.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default();
    if api_version != API_VERSION || kind != "AdmissionReview" {
        return wrong_type(uid, api_version, kind);
    }
    if !value.get("request").is_some_and(Value::is_object) {
        return Malformed::new(uid, "the AdmissionReview has no request");
    }
    Malformed::new(uid, format!("the request is invalid: {error}"))
}

/// The checks a decoded request must pass before it is judged.
fn check(request: AdmissionRequest) -> Result<AdmissionRequest, Malformed> {
    if request.uid.is_empty() {
        return Err(Malformed::new(None, "request.uid is empty"));
    }
    let uid = Some(request.uid.as_str());
    let needs_old = match request.operation.as_str() {
        "CREATE" | "CONNECT" => false,
        "UPDATE" | "DELETE" => true,
        other => return Err(Malformed::new(uid, format!("unknown operation {other:?}"))),
    };
    if needs_old && !request.old_object.as_ref().is_some_and(Value::is_object) {
        return Err(Malformed::new(uid, format!("{} without oldObject", request.operation)));
    }
    if request.operation == "UPDATE" && !request.object.as_ref().is_some_and(Value::is_object) {
        return Err(Malformed::new(uid, "UPDATE without object"));
    }
    if request.user_info.username.is_empty() {
        return Err(Malformed::new(uid, "request.userInfo.username is empty"));
    }
    Ok(request)
}

impl AdmissionRequest {
    pub fn dry_run(&self) -> bool {
        self.dry_run.unwrap_or(false)
    }

    /// UPDATE by PATCH or by PUT, told apart by the options kind the API server sends.
    pub fn operation(&self) -> Operation {
        match self.operation.as_str() {
            "CREATE" => Operation::Create,
            "DELETE" => Operation::Delete,
            "CONNECT" => Operation::Connect,
            _ => Operation::Update {
                patch: match self.options.as_ref().and_then(|o| o.get("kind")).and_then(Value::as_str) {
                    Some("PatchOptions") => Some(true),
                    // The API server also sends UpdateOptions for patches, so this proves nothing.
                    _ => None,
                },
            },
        }
    }

    /// The object the request is about, as an Event's `regarding`.
    pub fn regarding(&self) -> k8s_openapi::api::core::v1::ObjectReference {
        let facts = self.facts();
        let uid = [&self.old_object, &self.object]
            .into_iter()
            .find_map(|o| o.as_ref()?.pointer("/metadata/uid")?.as_str().map(str::to_owned));
        k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(match self.kind.group.as_str() {
                "" => self.kind.version.clone(),
                group => format!("{group}/{}", self.kind.version),
            }),
            kind: Some(self.kind.kind.clone()),
            name: Some(facts.name.to_owned()),
            namespace: self.namespace.clone().filter(|ns| !ns.is_empty()),
            uid,
            ..Default::default()
        }
    }

    pub fn facts(&self) -> Facts<'_> {
        let subresource = self.sub_resource.as_deref().unwrap_or_default();
        // Each item of a deletecollection arrives with an empty name (the API server reuses the
        // collection's attributes): the object's own name is the truth, or name globs could be
        // sidestepped by deleting through the collection.
        fn object_name(o: &Option<Value>) -> Option<&str> {
            o.as_ref()?.pointer("/metadata/name")?.as_str()
        }
        let name = match self.name.as_deref() {
            Some(n) if !n.is_empty() => n,
            _ => object_name(&self.old_object).or_else(|| object_name(&self.object)).unwrap_or_default(),
        };
        let is_namespace = self.resource.group.is_empty() && self.resource.resource == "namespaces";
        // A Namespace is its own namespace, whatever the request's namespace field says.
        let namespace = if is_namespace { name } else { self.namespace.as_deref().unwrap_or_default() };
        Facts {
            operation: self.operation(),
            group: &self.resource.group,
            resource: &self.resource.resource,
            subresource,
            namespace,
            name,
            object: self.object.as_ref(),
            old_object: self.old_object.as_ref(),
            collateral: &[],
            sent: Some(self),
        }
    }
}

/// `request` in conditions, as ValidatingAdmissionPolicy shows it.
impl policy::condition::SentRequest for AdmissionRequest {
    fn to_cel(&self) -> Value {
        let gvk = |k: &GroupVersionKind| json!({"group": k.group, "version": k.version, "kind": k.kind});
        let gvr = |r: &GroupVersionResource| json!({"group": r.group, "version": r.version, "resource": r.resource});
        let mut request = json!({
            "uid": self.uid,
            "kind": gvk(&self.kind),
            "resource": gvr(&self.resource),
            "subResource": self.sub_resource.as_deref().unwrap_or_default(),
            "requestKind": gvk(self.request_kind.as_ref().unwrap_or(&self.kind)),
            "requestResource": gvr(self.request_resource.as_ref().unwrap_or(&self.resource)),
            "requestSubResource": self
                .request_sub_resource
                .as_deref()
                .or(self.sub_resource.as_deref())
                .unwrap_or_default(),
            "name": self.name.as_deref().unwrap_or_default(),
            "namespace": self.namespace.as_deref().unwrap_or_default(),
            "operation": self.operation,
            "userInfo": {
                "username": self.user_info.username,
                "uid": self.user_info.uid,
                "groups": self.user_info.groups,
                "extra": self.user_info.extra,
            },
            "dryRun": self.dry_run(),
        });
        if let Some(options) = &self.options {
            request["options"] = options.clone();
        }
        request
    }
}

/// What a decision is made from: the caches' current state, the deployment's config, the clock.
pub struct Snapshot<'a> {
    pub policies: &'a PolicySet,
    pub directory: &'a dyn Directory,
    pub config: &'a Config,
    pub now: Timestamp,
    /// What the request would take with it, as the ownership view found it (empty until it is
    /// asked: see [`crate::cluster::ownership`]).
    pub collateral: &'a [Collateral],
}

/// The webhook the API server sent a request through: each has its own path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// `agents.agentguard.io`: its matchConditions list exactly the registered agents, so the
    /// API server has already judged the requester an agent.
    Agents,
    /// `approvals.agentguard.io`: approval-annotation and agent-label writes, by anyone.
    Approvals,
    /// The path both webhooks shared before (a configuration written by an older agentguard,
    /// offline `check`): the requester is judged from the caches alone.
    Shared,
}

/// Judges one request from the caches alone (see [`review_on`]). Synchronous and free of I/O.
pub fn review(request: &AdmissionRequest, snapshot: &Snapshot<'_>) -> Decision {
    review_on(request, Route::Shared, snapshot)
}

/// Judges one request that came through `route`. A request the API server sent to the `agents`
/// webhook is judged as an agent's, whatever a lagging cache says. Synchronous and free of I/O.
pub fn review_on(request: &AdmissionRequest, route: Route, snapshot: &Snapshot<'_>) -> Decision {
    let (key, value) = &snapshot.config.agent_label;
    let mut requester = Requester::resolve(
        &request.user_info.username,
        &request.user_info.groups,
        snapshot.directory,
        (key, value),
    );
    requester.selected_as_agent = route == Route::Agents;
    requester.credential = request.user_info.attribution().and_then(|a| a.credential_id);
    policy::evaluate(
        &Facts { collateral: snapshot.collateral, ..request.facts() },
        &requester,
        snapshot.policies,
        snapshot.directory,
        snapshot.config,
        snapshot.now,
    )
}

/// The AdmissionReview answering `uid` with `decision`.
pub fn respond(uid: &str, decision: &Decision) -> Value {
    let mut response = json!({"uid": uid, "allowed": decision.allowed()});
    if let Verdict::Deny(denial) = &decision.verdict {
        response["status"] = json!({"code": 403, "reason": "Forbidden", "message": denial.to_string()});
    }
    if !decision.warnings.is_empty() {
        response["warnings"] = json!(decision.warnings);
    }
    envelope(response)
}

/// The AdmissionReview refusing a malformed request.
pub fn refuse(malformed: &Malformed) -> Value {
    envelope(json!({
        "uid": malformed.uid.clone().unwrap_or_default(),
        "allowed": false,
        "status": {"code": 400, "reason": "BadRequest", "message": malformed.to_string()}
    }))
}

/// A refusal decided outside the policy engine (the churn breaker).
pub fn forbid(uid: &str, message: &str) -> Value {
    envelope(json!({
        "uid": uid,
        "allowed": false,
        "status": {"code": 403, "reason": "Forbidden", "message": message}
    }))
}

/// A refusal because agentguard could not do what admitting the request requires.
pub fn unavailable(uid: &str, message: &str) -> Value {
    envelope(json!({
        "uid": uid,
        "allowed": false,
        "status": {"code": 503, "reason": "ServiceUnavailable", "message": message}
    }))
}

fn envelope(response: Value) -> Value {
    // Built in place: serialising a struct holding the response would copy it.
    let mut review = serde_json::Map::with_capacity(3);
    review.insert("apiVersion".into(), API_VERSION.into());
    review.insert("kind".into(), "AdmissionReview".into());
    review.insert("response".into(), response);
    Value::Object(review)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review_json(request: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({"apiVersion": API_VERSION, "kind": "AdmissionReview", "request": request}))
            .unwrap()
    }

    fn base() -> Value {
        json!({
            "uid": "u-1", "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
            "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
            "name": "web", "namespace": "prod", "operation": "DELETE",
            "userInfo": {"username": "system:serviceaccount:agents:coder"},
            "oldObject": {"metadata": {"name": "web"}},
            "options": {"kind": "DeleteOptions", "apiVersion": "meta.k8s.io/v1"}
        })
    }

    #[test]
    fn malformed_reviews_are_refused_with_a_reason() {
        let mut wrong_op = base();
        wrong_op["operation"] = json!("EXPLODE");
        let mut no_old = base();
        no_old.as_object_mut().unwrap().remove("oldObject");
        let mut no_user = base();
        no_user["userInfo"] = json!({});
        let cases: Vec<(Vec<u8>, Option<&str>, &str)> = vec![
            (b"".to_vec(), None, "empty"),
            (b"   \n".to_vec(), None, "empty"),
            (b"{not json".to_vec(), None, "not JSON"),
            (b"[]".to_vec(), None, "expected apiVersion"),
            (serde_json::to_vec(&json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": base()})).unwrap(), Some("u-1"), "expected apiVersion"),
            (serde_json::to_vec(&json!({"apiVersion": API_VERSION, "kind": "AdmissionReview"})).unwrap(), None, "has no request"),
            (review_json(json!({"uid": "u-2"})), Some("u-2"), "request is invalid"),
            (review_json(wrong_op), Some("u-1"), "unknown operation"),
            (review_json(no_old), Some("u-1"), "DELETE without oldObject"),
            (review_json(no_user), Some("u-1"), "username is empty"),
        ];
        for (body, uid, needle) in cases {
            let err = decode(&body).unwrap_err();
            assert_eq!(err.uid.as_deref(), uid, "{err}");
            assert!(err.to_string().contains(needle), "{err} should mention {needle}");
            let answer = refuse(&err);
            assert_eq!(answer["response"]["allowed"], json!(false));
            assert_eq!(answer["response"]["uid"], json!(uid.unwrap_or_default()));
        }
    }

    #[test]
    fn what_only_a_foreign_sender_writes_is_refused() {
        let refused = |body: &[u8], uid: Option<&str>, needle: &str| {
            let err = decode(body).unwrap_err();
            assert_eq!(err.uid.as_deref(), uid, "{err}");
            assert!(err.to_string().contains(needle), "{err} should mention {needle}");
            assert_eq!(refuse(&err)["response"]["allowed"], json!(false));
        };
        let whole = String::from_utf8(review_json(base())).unwrap();
        // A field given twice, in the request or around it: which one counts is the sender's
        // guess, so neither does.
        for (from, to, uid) in [
            (r#""uid":"u-1""#, r#""uid":"u-1","uid":"u-2""#, "u-2"),
            (r#""operation":"DELETE""#, r#""operation":"CREATE","operation":"DELETE""#, "u-1"),
            (r#""username":"#, r#""username":"system:admin","username":"#, "u-1"),
            (r#""oldObject":"#, r#""oldObject":{},"oldObject":"#, "u-1"),
        ] {
            assert!(whole.contains(from), "{from}");
            refused(whole.replacen(from, to, 1).as_bytes(), Some(uid), "duplicate field");
        }
        let twice = whole.replacen(
            r#""kind":"AdmissionReview""#,
            r#""kind":"AdmissionReview","kind":"AdmissionReview""#,
            1,
        );
        refused(twice.as_bytes(), Some("u-1"), "duplicate field `kind`");
        // The fields as an array in their order, as serde would read them into a struct.
        let positional = serde_json::to_vec(&json!([API_VERSION, "AdmissionReview", base()])).unwrap();
        refused(&positional, None, "expected apiVersion");
        let mut positional_request = base();
        positional_request =
            json!(positional_request.as_object().unwrap().values().cloned().collect::<Vec<_>>());
        refused(&review_json(positional_request), None, "has no request");
        // An object that is no object.
        let mut update = base();
        update["operation"] = json!("UPDATE");
        for object in [json!("web"), json!([]), json!(null), json!(7)] {
            update["object"] = object.clone();
            refused(&review_json(update.clone()), Some("u-1"), "UPDATE without object");
        }
        for old in [json!("web"), json!([{"metadata": {}}]), json!(null)] {
            let mut delete = base();
            delete["oldObject"] = old.clone();
            refused(&review_json(delete), Some("u-1"), "DELETE without oldObject");
        }
    }

    #[test]
    fn escaped_strings_read_as_their_text() {
        let body = String::from_utf8(review_json(base()))
            .unwrap()
            .replacen(r#""apiVersion":"admission.k8s.io/v1""#, r#""apiVersion":"admission.k8s.io\/v1""#, 1)
            .replacen(r#""uid":"u-1""#, r#""uid":"u\u002d1""#, 1);
        assert!(body.contains(r"k8s.io\/v1") && body.contains(r"u\u002d1"), "{body}");
        assert_eq!(decode(body.as_bytes()).unwrap().uid, "u-1");
    }

    /// The request as it was decoded before [`decode`] read it in one pass: the whole body into a
    /// `Value`, then its `request` into the type.
    fn through_a_value(body: &[u8]) -> AdmissionRequest {
        let value: Value = serde_json::from_slice(body).unwrap();
        serde_json::from_value(value["request"].clone()).unwrap()
    }

    #[test]
    fn one_pass_reads_what_a_value_tree_read() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut bodies: Vec<_> = std::fs::read_dir(root.join("examples/reviews"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        bodies.push(root.join("benches/reviews/agent-updates-deployment-image.json"));
        assert!(bodies.len() > 10, "{bodies:?}");
        for path in bodies {
            let body = std::fs::read(&path).unwrap();
            let (now, then) = (decode(&body).unwrap(), through_a_value(&body));
            assert_eq!(format!("{now:?}"), format!("{then:?}"), "{}", path.display());
            assert!(now.old_object.is_some() || now.object.is_some(), "{}", path.display());
        }
    }

    #[test]
    fn extra_is_decoded_into_an_attribution() {
        let mut r = base();
        r["userInfo"]["extra"] = json!({
            POD_NAME_EXTRA: ["coder-7d9f"], POD_UID_EXTRA: ["9a1c-uid"], NODE_NAME_EXTRA: ["node-1"],
            CREDENTIAL_ID_EXTRA: ["JTI=0f3e", "ignored"], "other.example/key": ["x"]
        });
        let a = decode(&review_json(r)).unwrap().user_info.attribution().unwrap();
        assert_eq!(a.pod_name.as_deref(), Some("coder-7d9f"));
        assert_eq!(a.pod_uid.as_deref(), Some("9a1c-uid"));
        assert_eq!(a.node_name.as_deref(), Some("node-1"));
        assert_eq!(a.credential_id.as_deref(), Some("JTI=0f3e"));
        assert_eq!(a.to_string(), "pod=coder-7d9f pod-uid=9a1c-uid node=node-1 credential-id=JTI=0f3e");

        // Only a credential id (a token from `kubectl create token`).
        let mut r = base();
        r["userInfo"]["extra"] = json!({CREDENTIAL_ID_EXTRA: ["JTI=1"]});
        assert_eq!(
            decode(&review_json(r)).unwrap().user_info.attribution().unwrap().to_string(),
            "credential-id=JTI=1"
        );
        // No extra, null, empty lists, control characters only: no attribution.
        assert_eq!(decode(&review_json(base())).unwrap().user_info.attribution(), None);
        for extra in
            [json!(null), json!({}), json!({POD_NAME_EXTRA: []}), json!({POD_NAME_EXTRA: ["\n\u{7}"]})]
        {
            let mut r = base();
            r["userInfo"]["extra"] = extra.clone();
            assert_eq!(decode(&review_json(r)).unwrap().user_info.attribution(), None, "{extra}");
        }
        // Oversized and control characters: cut and cleaned, never trusted as they came.
        let mut r = base();
        r["userInfo"]["extra"] = json!({POD_NAME_EXTRA: [format!("a\nb{}", "é".repeat(300))]});
        let name = decode(&review_json(r)).unwrap().user_info.attribution().unwrap().pod_name.unwrap();
        assert!(name.starts_with("abé") && name.len() <= ATTRIBUTION_BYTES && !name.contains('\n'), "{name}");
    }

    #[test]
    fn malformed_extra_is_refused_not_admitted() {
        for extra in
            [json!("pod"), json!([1]), json!({POD_NAME_EXTRA: "coder"}), json!({POD_NAME_EXTRA: [7]})]
        {
            let mut r = base();
            r["userInfo"]["extra"] = extra.clone();
            let err = decode(&review_json(r)).unwrap_err();
            assert!(err.to_string().contains("request is invalid"), "{extra}: {err}");
            assert_eq!(refuse(&err)["response"]["allowed"], json!(false));
        }
    }

    #[test]
    fn patch_is_known_only_from_patch_options() {
        let mut r = base();
        r["operation"] = json!("UPDATE");
        r["object"] = json!({"metadata": {}});
        r["options"] = json!({"kind": "PatchOptions", "apiVersion": "meta.k8s.io/v1"});
        assert_eq!(
            decode(&review_json(r.clone())).unwrap().operation(),
            Operation::Update { patch: Some(true) }
        );
        r["options"] = json!({"kind": "UpdateOptions", "apiVersion": "meta.k8s.io/v1"});
        assert_eq!(decode(&review_json(r)).unwrap().operation(), Operation::Update { patch: None });
    }

    #[test]
    fn deletecollection_items_are_named_by_their_object() {
        let mut r = base();
        r["name"] = json!("");
        r["oldObject"] = json!({"metadata": {"name": "prod-db"}});
        let req = decode(&review_json(r)).unwrap();
        assert_eq!(req.facts().name, "prod-db");
    }

    #[test]
    fn a_namespace_is_its_own_namespace() {
        let mut r = base();
        r["resource"] = json!({"group": "", "version": "v1", "resource": "namespaces"});
        r["name"] = json!("prod");
        r.as_object_mut().unwrap().remove("namespace");
        let req = decode(&review_json(r)).unwrap();
        assert_eq!(req.facts().namespace, "prod");
    }
}
