//! AdmissionReviews built field by field with `arbitrary` (any operation, subresource, user and
//! groups, objects of any shape: Kubernetes-like, huge, or nested past serde_json's depth limit),
//! serialised to JSON and sent down the same path as `review_bytes`, so that the fuzzer spends
//! its time past decode, in the policy engine.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use serde_json::{Map, Value, json};

/// Strings the demo world and the engine give meaning to, so that fuzzed requests reach them.
const WORDS: &[&str] = &[
    "",
    "apps",
    "v1",
    "prod",
    "staging",
    "agents",
    "web",
    "prod-db",
    "deployments",
    "statefulsets",
    "persistentvolumeclaims",
    "persistentvolumes",
    "namespaces",
    "configmaps",
    "secrets",
    "pods",
    "serviceaccounts",
    "scale",
    "status",
    "finalize",
    "Deployment",
    "Scale",
    "Secret",
    "Namespace",
    "ServiceAccount",
    "metadata",
    "spec",
    "name",
    "namespace",
    "uid",
    "labels",
    "annotations",
    "replicas",
    "finalizers",
    "ownerReferences",
    "deletionTimestamp",
    "persistentVolumeReclaimPolicy",
    "persistentVolumeClaimRetentionPolicy",
    "whenDeleted",
    "Delete",
    "Retain",
    "app",
    "data",
    "agentguard.io/approve",
    "agentguard.io/agent",
    "true",
    "kubernetes.io/pvc-protection",
    "system:serviceaccount:agents:coder",
    "system:serviceaccount:prod:deployer",
    "alice",
    "mallory",
    "system:serviceaccounts",
    "system:serviceaccounts:agents",
    "system:authenticated",
    "sre",
    "system:masters",
    "system:serviceaccount:kube-system:generic-garbage-collector",
];

#[derive(Debug)]
struct Word(String);

impl<'a> Arbitrary<'a> for Word {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Word(if u.ratio(3, 4)? { (*u.choose(WORDS)?).to_owned() } else { String::arbitrary(u)? }))
    }
}

/// A JSON value; `Deep` and `Wide` make the nested and the huge ones in few input bytes.
#[derive(Arbitrary, Debug)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Word),
    Array(Vec<Json>),
    Object(Vec<(Word, Json)>),
    /// `depth` arrays or objects around a value (serde_json refuses more than 128 levels).
    Deep {
        depth: u8,
        objects: bool,
        inner: Box<Json>,
    },
    /// An array of `count` copies (nested, they make huge values).
    Wide {
        count: u8,
        item: Box<Json>,
    },
    /// A string of `len` × 64 characters.
    Long {
        len: u8,
        c: char,
    },
    Kube(Box<Object>),
}

/// Something shaped like a Kubernetes object, with a fixture's approval possibly on it.
#[derive(Arbitrary, Debug)]
struct Object {
    api_version: Word,
    kind: Word,
    name: Word,
    namespace: Option<Word>,
    uid: Option<Word>,
    labels: Vec<(Word, Word)>,
    annotations: Vec<(Word, Word)>,
    approval: Option<u8>,
    finalizers: Vec<Word>,
    deleting: bool,
    owners: Vec<Word>,
    spec: Option<Json>,
    status: Option<Json>,
    data: Option<Json>,
}

/// Approval values to plant: the fixtures' real ones (for other objects or states) and junk.
const APPROVALS: &[&str] = &[
    "delete.AQAAAABrCB9AAAAOEGwooBPIf2R-ZinZ13vbKZqbXeVZx4gxX3dFe03zK3t2PaLtTr_BEx-KfxJ7np67iTnMOY8gXhCjK36xnnpnAbk",
    "update.",
    "delete",
    ".",
    "approve",
];

impl Json {
    fn build(&self, budget: &mut usize) -> Value {
        // Bounds the size of what is built (about 16 bytes a unit), not its shape.
        if *budget == 0 {
            return Value::Null;
        }
        *budget -= 1;
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => json!(b),
            Json::Int(i) => json!(i),
            Json::Float(f) => json!(f),
            Json::Str(w) => json!(w.0),
            Json::Array(items) => Value::Array(items.iter().map(|i| i.build(budget)).collect()),
            Json::Object(fields) => {
                Value::Object(fields.iter().map(|(k, v)| (k.0.clone(), v.build(budget))).collect())
            }
            Json::Deep { depth, objects, inner } => {
                let mut v = inner.build(budget);
                for _ in 0..*depth {
                    if *budget == 0 {
                        break;
                    }
                    *budget -= 1;
                    // Not json!, which would copy `v` at every level.
                    v = if *objects {
                        Value::Object(Map::from_iter([("spec".into(), v)]))
                    } else {
                        Value::Array(vec![v])
                    };
                }
                v
            }
            Json::Wide { count, item } => {
                // Copies cost what the item cost: the budget bounds the whole value's size.
                let before = *budget;
                let item = item.build(budget);
                let size = (before - *budget).max(1);
                let count = usize::from(*count).min(*budget / size);
                *budget -= count * size;
                Value::Array(vec![item; count])
            }
            Json::Long { len, c } => {
                let len = (usize::from(*len) * 64).min(*budget * 16);
                *budget -= len / 16;
                Value::String(std::iter::repeat_n(*c, len).collect())
            }
            Json::Kube(o) => o.build(budget),
        }
    }
}

impl Object {
    fn build(&self, budget: &mut usize) -> Value {
        // Its metadata costs its size too: unbudgeted, an object copied by `Wide` inside `Wide`
        // grew reviews to tens of megabytes from a kilobyte of input.
        let words = self.labels.iter().chain(&self.annotations).flat_map(|(k, v)| [k, v]);
        let words = words.chain(&self.finalizers).chain(&self.owners).chain([&self.name, &self.kind]);
        let cost: usize = words.map(|w| 1 + w.0.len() / 16).sum();
        *budget = budget.saturating_sub(cost);
        let pairs = |kv: &[(Word, Word)]| -> Map<String, Value> {
            kv.iter().map(|(k, v)| (k.0.clone(), json!(v.0))).collect()
        };
        let mut annotations = pairs(&self.annotations);
        if let Some(i) = self.approval {
            let value = APPROVALS[usize::from(i) % APPROVALS.len()];
            annotations.insert("agentguard.io/approve".into(), json!(value));
        }
        let mut metadata =
            json!({"name": self.name.0, "labels": pairs(&self.labels), "annotations": annotations});
        if let Some(ns) = &self.namespace {
            metadata["namespace"] = json!(ns.0);
        }
        if let Some(uid) = &self.uid {
            metadata["uid"] = json!(uid.0);
        }
        if !self.finalizers.is_empty() {
            metadata["finalizers"] = self.finalizers.iter().map(|f| json!(f.0)).collect();
        }
        if self.deleting {
            metadata["deletionTimestamp"] = json!("2026-11-26T12:00:00Z");
        }
        if !self.owners.is_empty() {
            metadata["ownerReferences"] = self
                .owners
                .iter()
                .map(|o| json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": o.0, "uid": o.0}))
                .collect();
        }
        let mut object = json!({"apiVersion": self.api_version.0, "kind": self.kind.0, "metadata": metadata});
        for (field, value) in [("spec", &self.spec), ("status", &self.status), ("data", &self.data)] {
            if let Some(v) = value {
                object[field] = v.build(budget);
            }
        }
        object
    }
}

#[derive(Arbitrary, Debug)]
enum Operation {
    Create,
    Update,
    Delete,
    Connect,
    Other(String),
}

#[derive(Arbitrary, Debug)]
struct Review {
    /// Breaks the envelope (apiVersion, kind) or the request's required fields when set.
    envelope: Option<(Word, Word)>,
    uid: Word,
    group: Word,
    version: Word,
    kind: Word,
    resource: Word,
    sub_resource: Option<Word>,
    name: Option<Word>,
    namespace: Option<Word>,
    operation: Operation,
    username: Option<Word>,
    groups: Vec<Word>,
    object: Option<Json>,
    old_object: Option<Json>,
    /// When set, `object` and `oldObject` are one object before and after `edit`.
    edit: Option<(Object, Json)>,
    dry_run: Option<bool>,
    options: Option<Word>,
    drop: Option<u8>,
}

impl Review {
    /// The review, its objects' values within `budget` (about 16 bytes a unit).
    fn build(&self, mut budget: usize) -> Value {
        let operation = match &self.operation {
            Operation::Create => "CREATE",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
            Operation::Connect => "CONNECT",
            Operation::Other(s) => s,
        };
        let mut request = json!({
            "uid": self.uid.0,
            "kind": {"group": self.group.0, "version": self.version.0, "kind": self.kind.0},
            "resource": {"group": self.group.0, "version": self.version.0, "resource": self.resource.0},
            "operation": operation,
            "userInfo": {"username": self.username.as_ref().map(|u| u.0.as_str()).unwrap_or("system:serviceaccount:agents:coder"),
                         "groups": self.groups.iter().map(|g| g.0.as_str()).collect::<Vec<_>>()},
        });
        let fields: [(&str, Option<Value>); 6] = [
            ("subResource", self.sub_resource.as_ref().map(|w| json!(w.0))),
            ("name", self.name.as_ref().map(|w| json!(w.0))),
            ("namespace", self.namespace.as_ref().map(|w| json!(w.0))),
            ("object", self.object.as_ref().map(|j| j.build(&mut budget))),
            ("oldObject", self.old_object.as_ref().map(|j| j.build(&mut budget))),
            ("dryRun", self.dry_run.map(Value::Bool)),
        ];
        for (k, v) in fields {
            if let Some(v) = v {
                request[k] = v;
            }
        }
        if let Some((object, edit)) = &self.edit {
            let old = object.build(&mut budget);
            let mut new = old.clone();
            if let (Some(n), Value::Object(changes)) = (new.as_object_mut(), edit.build(&mut budget)) {
                n.extend(changes);
            }
            request["oldObject"] = old;
            request["object"] = new;
        }
        if let Some(kind) = &self.options {
            request["options"] = json!({"kind": kind.0, "apiVersion": "meta.k8s.io/v1"});
        }
        if let Some(i) = self.drop {
            let keys: Vec<String> = request.as_object().unwrap().keys().cloned().collect();
            request.as_object_mut().unwrap().remove(&keys[usize::from(i) % keys.len()]);
        }
        let (api_version, kind) = match &self.envelope {
            Some((a, k)) => (a.0.as_str(), k.0.as_str()),
            None => ("admission.k8s.io/v1", "AdmissionReview"),
        };
        let mut review = json!({"apiVersion": api_version, "kind": kind});
        review["request"] = request;
        review
    }
}

/// Room for the objects' values: about 8 KB of JSON (a large Deployment), or, for one input in
/// 64, about a megabyte (as large as the largest objects the API server stores). Which one is
/// drawn from the whole input, not from a field the fuzzer could keep while it mutates, so the
/// megabyte reviews stay one in 64 however the corpus grows, and the rest keep the executions
/// per second up.
fn budget(input: &[u8]) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    input.hash(&mut hasher);
    if hasher.finish() % 64 == 0 { 20_000 } else { 500 }
}

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    let Ok(review) = Review::arbitrary_take_rest(Unstructured::new(input)) else { return };
    let body = serde_json::to_vec(&review.build(budget(input))).expect("serialises");
    agentguard_fuzz::request_path(&body);
});
