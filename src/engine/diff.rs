//! Field-level change summaries: what an UPDATE would change, shown to the agent and to the human
//! who approves it, and the digest that binds an approval to exactly that change.
//!
//! Pure functions over JSON values. Fields that every write touches (managedFields,
//! resourceVersion, generation) and the approval annotations are not changes an approver
//! needs to see, so they are left out of both the change and its digest. Everything else is in
//! both: the denial may summarise ([`Change`]'s `Display`), but [`Change::full`] shows every entry
//! and the digest (full SHA-256) covers every entry, so an approval binds what the human can see.
//!
//! [`state_digest`] names the reviewed state of an object an agent wants to delete: the object
//! without what changes on its own or with the approval itself (bookkeeping, `status`).

use std::fmt::{self, Write as _};

use serde_json::Value;
use sha2::{Digest as _, Sha256};

/// Entries shown in a summary; [`Change::full`] and the digest always cover all of them.
const SHOWN_ENTRIES: usize = 12;
/// Largest change (as [`Change::full`] renders it) an approver can be shown in full, in the
/// Events `pending` reads; a larger one cannot be approved, only split.
pub const REVIEWABLE_BYTES: usize = 48 * 1024;
/// Longest rendering of one value in a summary.
const SHOWN_VALUE_CHARS: usize = 80;

/// One changed field.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldChange {
    /// Path such as `spec.template.spec.containers[0].image` or `metadata.labels["app"]`.
    pub path: String,
    pub old: Option<Value>,
    pub new: Option<Value>,
    /// Values that must not be shown (Secret data): rendered as `(redacted)`.
    pub redacted: bool,
}

/// Everything an UPDATE changes, up to what an approver could review.
///
/// Collecting stops once the entries' full rendering passes [`REVIEWABLE_BYTES`]: such a change
/// cannot be approved whatever follows, and an agent must not be able to make a replica hold
/// every leaf of a multi-megabyte object twice over (a body of a million changed array
/// elements once cost hundreds of MB and seconds).
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// Every entry, in path order; only the first ones when [`Change::cut_short`].
    pub fields: Vec<FieldChange>,
    /// SHA-256 naming this exact change: an update approval's ticket is bound to it.
    pub digest: [u8; 32],
    /// Collecting stopped past [`REVIEWABLE_BYTES`]: more may follow the entries kept.
    pub cut_short: bool,
    /// Bytes of the entries' full rendering, one line each ([`Change::full`]).
    bytes: usize,
}

impl Change {
    /// Compare the stored object with the object the update would store.
    pub fn between(old: &Value, new: &Value) -> Self {
        if old.get("kind").and_then(Value::as_str) == Some("Scale") {
            // A Scale's replicas is a plain int32 that Go omits when zero: scaling to zero
            // arrives as a missing field, and must read `3 → 0`, not `3 → (absent)`.
            let (mut old, mut new) = (old.clone(), new.clone());
            for scale in [&mut old, &mut new] {
                if let Some(spec) = scale.get_mut("spec").and_then(Value::as_object_mut) {
                    spec.entry("replicas").or_insert(Value::from(0));
                }
            }
            return Self::compare(&old, &new);
        }
        Self::compare(old, new)
    }

    fn compare(old: &Value, new: &Value) -> Self {
        let secret = old.get("kind").and_then(Value::as_str) == Some("Secret")
            && old.get("apiVersion").and_then(Value::as_str) == Some("v1");
        let mut walk = Walk { secret, fields: Vec::new(), bytes: 0 };
        walk.visit(&mut String::new(), Some(old), Some(new), 0);
        let cut_short = walk.bytes > REVIEWABLE_BYTES;
        let digest = digest(&walk.fields, cut_short);
        Self { fields: walk.fields, digest, cut_short, bytes: walk.bytes }
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// A short hex name of the change (the digest's first 6 bytes), to tell changes apart in
    /// messages. Not a security boundary: approvals are bound to the whole digest.
    pub fn id(&self) -> String {
        hex(&self.digest[..6])
    }

    /// Bytes of the full rendering, when it is within [`REVIEWABLE_BYTES`]; `Err` with the size
    /// when it is not (the size of the entries kept, when the change was cut short).
    pub fn reviewable(&self) -> Result<usize, usize> {
        // Counted while the change was collected: cut short exactly when past the limit.
        if self.cut_short { Err(self.bytes) } else { Ok(self.bytes) }
    }

    /// Every entry, one per line, values in full (Secret values stay redacted).
    pub fn full(&self) -> Vec<String> {
        self.fields.iter().map(FieldChange::line).collect()
    }
}

impl FieldChange {
    /// The entry as [`Change::full`] shows it.
    fn line(&self) -> String {
        format!(
            "{}: {} → {}",
            self.path,
            render_full(&self.old, self.redacted),
            render_full(&self.new, self.redacted)
        )
    }
}

fn render_full(v: &Option<Value>, redacted: bool) -> String {
    match v {
        None => "(absent)".into(),
        Some(_) if redacted => "(redacted)".into(),
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(other) => other.to_string(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// SHA-256 of the state of `object` a human reviews before approving its deletion: everything
/// but `metadata.resourceVersion`, `metadata.managedFields`, `metadata.generation`, the approval
/// annotations (so writing an approval, or a second approver's, does not make it stale) and `status` (which controllers
/// rewrite on their own; it is not what a human approves). Any other change after the review
/// gives another digest. Map keys are hashed in sorted order, so the digest does not depend on
/// how the object was serialised.
pub fn state_digest(object: &Value) -> [u8; 32] {
    let mut reviewed = object.clone();
    if let Some(o) = reviewed.as_object_mut() {
        o.remove("status");
        if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
            for field in ["resourceVersion", "managedFields", "generation"] {
                meta.remove(field);
            }
            if let Some(a) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
                a.retain(|k, _| !crate::engine::approval::is_key(k));
                if a.is_empty() {
                    meta.remove("annotations");
                }
            }
            // Metadata of bookkeeping alone is no reviewable state, as it is no change.
            if meta.is_empty() {
                o.remove("metadata");
            }
        }
    }
    let mut h = Sha256::new();
    h.update(b"agentguard state v1\n");
    canonical(&reviewed, &mut h);
    h.finalize().into()
}

/// Feeds an unambiguous encoding of `v` to the hash, map keys sorted.
fn canonical(v: &Value, h: &mut Sha256) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            h.update([b'{']);
            h.update((keys.len() as u64).to_be_bytes());
            for k in keys {
                canonical(&Value::String(k.clone()), h);
                canonical(&m[k], h);
            }
        }
        Value::Array(a) => {
            h.update([b'[']);
            h.update((a.len() as u64).to_be_bytes());
            for item in a {
                canonical(item, h);
            }
        }
        Value::String(s) => {
            h.update([b's']);
            h.update((s.len() as u64).to_be_bytes());
            h.update(s.as_bytes());
        }
        // -0.0 and 0.0 are equal JSON numbers (and no change to `Change::between`), but print
        // apart: the state would change where nothing reviewable did.
        Value::Number(n) if n.as_f64() == Some(0.0) && n.is_f64() => {
            h.update([b'v']);
            h.update(3u64.to_be_bytes());
            h.update(b"0.0");
        }
        other => {
            // null, booleans and other numbers: their JSON text is unambiguous.
            let text = other.to_string();
            h.update([b'v']);
            h.update((text.len() as u64).to_be_bytes());
            h.update(text.as_bytes());
        }
    }
}

/// `spec.replicas: 3 → 0; …`, bounded in length whatever the change.
impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.fields.iter().take(SHOWN_ENTRIES).enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {} → {}", c.path, render(&c.old, c.redacted), render(&c.new, c.redacted))?;
        }
        let hidden = self.fields.len().saturating_sub(SHOWN_ENTRIES);
        match (hidden, self.cut_short) {
            (0, false) => {}
            (_, false) => write!(f, "; … and {hidden} more")?,
            (_, true) => write!(f, "; … and more (over {} KiB in all)", REVIEWABLE_BYTES / 1024)?,
        }
        Ok(())
    }
}

fn render(v: &Option<Value>, redacted: bool) -> String {
    match v {
        None => "(absent)".into(),
        Some(_) if redacted => "(redacted)".into(),
        Some(Value::String(s)) if !s.is_empty() => truncate(s),
        Some(other) => truncate(&other.to_string()),
    }
}

fn truncate(s: &str) -> String {
    if s.chars().count() <= SHOWN_VALUE_CHARS {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(SHOWN_VALUE_CHARS - 1).collect();
    out.push('…');
    out
}

/// Paths that are never a change an approver needs to see, computed once.
static IGNORED: std::sync::LazyLock<[String; 3]> = std::sync::LazyLock::new(|| {
    ["metadata.managedFields".into(), "metadata.resourceVersion".into(), "metadata.generation".into()]
});

fn ignored(path: &str) -> bool {
    path.starts_with("metadata.") && IGNORED.iter().any(|p| p == path)
}

fn push_key(path: &mut String, key: &str) {
    let bare = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
    } else {
        // Writing to a String cannot fail.
        let _ = write!(path, "[{}]", Value::String(key.to_owned()));
    }
}

/// The comparison under way: the entries found so far and the bytes of their full rendering.
struct Walk {
    secret: bool,
    fields: Vec<FieldChange>,
    bytes: usize,
}

impl Walk {
    fn visit(&mut self, path: &mut String, old: Option<&Value>, new: Option<&Value>, depth: usize) {
        if self.bytes > REVIEWABLE_BYTES || old == new || ignored(path) {
            return;
        }
        let len = path.len();
        // An object or list that appears or disappears is shown field by field, so that e.g. a
        // first annotation is seen as that annotation (and the approval is still left out).
        let empty_object = Value::Object(Default::default());
        let empty_array = Value::Array(Vec::new());
        let absent_as_empty = |other: Option<&Value>| match other {
            Some(Value::Object(m)) if !m.is_empty() => Some(&empty_object),
            Some(Value::Array(a)) if !a.is_empty() => Some(&empty_array),
            _ => None,
        };
        let (old, new) = match (old, new) {
            (None, Some(_)) => (absent_as_empty(new).or(old), new),
            (Some(_), None) => (old, absent_as_empty(old).or(new)),
            pair => pair,
        };
        match (old, new) {
            (Some(Value::Object(a)), Some(Value::Object(b))) if depth < 32 => {
                let mut keys: Vec<&String> =
                    a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))).collect();
                keys.sort();
                let annotations = path == "metadata.annotations";
                for k in keys {
                    // Approvals are no change to approve (agents may not write them anyway).
                    if annotations && crate::engine::approval::is_key(k) {
                        continue;
                    }
                    push_key(path, k);
                    self.visit(path, a.get(k), b.get(k), depth + 1);
                    path.truncate(len);
                }
            }
            (Some(Value::Array(a)), Some(Value::Array(b))) if depth < 32 => {
                for i in 0..a.len().max(b.len()) {
                    let _ = write!(path, "[{i}]");
                    self.visit(path, a.get(i), b.get(i), depth + 1);
                    path.truncate(len);
                }
            }
            _ => {
                let redacted = self.secret && (path.starts_with("data") || path.starts_with("stringData"));
                let field =
                    FieldChange { path: path.clone(), old: old.cloned(), new: new.cloned(), redacted };
                self.bytes += field.line().len() + 1;
                self.fields.push(field);
            }
        }
    }
}

/// SHA-256 over every change, each field length-prefixed so no two changes encode alike.
/// Redacted old values are left out so the digest reveals nothing about a Secret the agent could
/// not read (the new values are the agent's own).
fn digest(fields: &[FieldChange], cut_short: bool) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"agentguard change v1\n");
    if cut_short {
        // Never approvable; marked so that it names nothing a whole change could be.
        h.update(b"cut short\n");
    }
    h.update((fields.len() as u64).to_be_bytes());
    let mut part = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    for c in fields {
        part(c.path.as_bytes());
        match (&c.old, c.redacted) {
            (_, true) => part(b"r"),
            (None, false) => part(b"a"),
            (Some(v), false) => part(format!("v{v}").as_bytes()),
        }
        match &c.new {
            None => part(b"a"),
            Some(v) => part(format!("v{v}").as_bytes()),
        }
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::api::APPROVE_ANNOTATION;
    use serde_json::json;

    fn deployment(replicas: i64, image: &str) -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "resourceVersion": "10", "generation": 3,
                         "labels": {"app.kubernetes.io/name": "web"},
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"replicas": replicas,
                     "template": {"spec": {"containers": [{"name": "web", "image": image}]}}}
        })
    }

    #[test]
    fn summarises_changed_fields_with_paths() {
        let change = Change::between(&deployment(3, "nginx:1.27"), &deployment(0, "nginx:1.28"));
        assert_eq!(
            change.to_string(),
            "spec.replicas: 3 → 0; spec.template.spec.containers[0].image: nginx:1.27 → nginx:1.28"
        );
        assert_eq!(change.id().len(), 12);
    }

    #[test]
    fn bookkeeping_fields_and_the_approval_are_not_changes() {
        let old = deployment(3, "a");
        let mut new = old.clone();
        new["metadata"]["resourceVersion"] = json!("11");
        new["metadata"]["generation"] = json!(4);
        new["metadata"]["managedFields"] = json!([{"manager": "kubectl-annotate"}]);
        new["metadata"]["annotations"] = json!({APPROVE_ANNOTATION: "delete.x"});
        assert!(Change::between(&old, &new).is_empty());
        // kubectl's last-applied copy is part of the object, so it is part of the change.
        new["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] = json!("{}");
        assert_eq!(Change::between(&old, &new).fields.len(), 1);
    }

    #[test]
    fn label_keys_with_dots_are_quoted_and_additions_shown() {
        let old = deployment(3, "a");
        let mut new = old.clone();
        new["metadata"]["labels"]["app.kubernetes.io/name"] = json!("api");
        new["metadata"]["labels"]["tier"] = json!("prod");
        assert_eq!(
            Change::between(&old, &new).to_string(),
            r#"metadata.labels["app.kubernetes.io/name"]: web → api; metadata.labels.tier: (absent) → prod"#
        );
    }

    #[test]
    fn digest_names_the_exact_change() {
        let base = deployment(3, "a");
        let a = Change::between(&base, &deployment(0, "a"));
        let b = Change::between(&base, &deployment(1, "a"));
        let a_again = Change::between(&base, &deployment(0, "a"));
        assert_ne!(a.digest, b.digest);
        assert_eq!(a.digest, a_again.digest);
        // Same end state from a different start is a different change.
        assert_ne!(a.digest, Change::between(&deployment(5, "a"), &deployment(0, "a")).digest);
    }

    #[test]
    fn scaling_to_zero_reads_as_zero() {
        let old = json!({"apiVersion": "autoscaling/v1", "kind": "Scale", "spec": {"replicas": 3}});
        let new = json!({"apiVersion": "autoscaling/v1", "kind": "Scale", "spec": {}});
        assert_eq!(Change::between(&old, &new).to_string(), "spec.replicas: 3 → 0");
    }

    #[test]
    fn secret_values_are_redacted() {
        let old = json!({"apiVersion": "v1", "kind": "Secret", "data": {"password": "c2VjcmV0"}});
        let new = json!({"apiVersion": "v1", "kind": "Secret", "data": {"password": "bmV3"}});
        let change = Change::between(&old, &new);
        assert_eq!(change.to_string(), "data.password: (redacted) → (redacted)");
    }

    #[test]
    fn summary_is_bounded() {
        let old = json!({"data": (0..40).map(|i| (format!("k{i:03}"), json!("x".repeat(500)))).collect::<serde_json::Map<_, _>>()});
        let new = json!({"data": (0..40).map(|i| (format!("k{i:03}"), json!("y".repeat(500)))).collect::<serde_json::Map<_, _>>()});
        let change = Change::between(&old, &new);
        let text = change.to_string();
        assert_eq!(change.fields.len(), 40);
        assert!(text.ends_with("; … and 28 more"), "{text}");
        assert!(text.chars().count() < 12 * 200, "{} chars", text.chars().count());
        // The full view hides nothing.
        let full = change.full();
        assert_eq!(full.len(), 40);
        assert!(full[39].starts_with("data.k039: ") && full[39].ends_with(&"y".repeat(500)), "{}", full[39]);
    }

    #[test]
    fn a_change_too_large_to_review_is_cut_short_not_held_whole() {
        let old = json!({"data": {"items": vec![0; 1_000_000]}});
        let new = json!({"data": {"items": vec![1; 1_000_000]}});
        let change = Change::between(&old, &new);
        assert!(change.cut_short);
        // Kept: just past what an approver could review, not a million entries.
        let kept: usize = change.full().iter().map(|l| l.len() + 1).sum();
        assert!(kept > REVIEWABLE_BYTES && kept < REVIEWABLE_BYTES + 100, "{kept} bytes kept");
        assert!(change.fields.len() < 3_000, "{} entries", change.fields.len());
        assert!(change.reviewable().is_err());
        assert!(change.to_string().ends_with("; … and more (over 48 KiB in all)"), "{change}");
        // What it changes beyond the cut does not matter: it can never be approved.
        let mut other = new.clone();
        other["data"]["items"][999_999] = json!(2);
        assert_eq!(Change::between(&old, &other).digest, change.digest);

        // A change just within the limit is whole, reviewable, and named apart from one cut short.
        let entries = |n: usize| json!({"data": (0..n).map(|i| (format!("k{i:04}"), json!("x".repeat(100)))).collect::<serde_json::Map<_, _>>()});
        let line = Change::between(&json!({}), &entries(1)).reviewable().expect("one entry");
        let fits = REVIEWABLE_BYTES / line;
        let within = Change::between(&json!({}), &entries(fits));
        assert!(!within.cut_short && within.reviewable().is_ok(), "{:?}", within.reviewable());
        assert_eq!(within.fields.len(), fits);
        let beyond = Change::between(&json!({}), &entries(fits + 10));
        assert!(beyond.cut_short && beyond.reviewable().is_err());
    }

    #[test]
    fn the_state_digest_ignores_bookkeeping_status_and_the_approval_only() {
        let base = deployment(3, "a");
        let d = state_digest(&base);
        let mut annotated = base.clone();
        annotated["metadata"]["resourceVersion"] = json!("11");
        annotated["metadata"]["managedFields"] = json!([{"manager": "kubectl-annotate"}]);
        annotated["metadata"]["annotations"] = json!({APPROVE_ANNOTATION: "delete.x"});
        annotated["status"] = json!({"readyReplicas": 3});
        assert_eq!(state_digest(&annotated), d);
        let mut relabelled = base.clone();
        relabelled["metadata"]["labels"]["tier"] = json!("prod");
        assert_ne!(state_digest(&relabelled), d);
        assert_ne!(state_digest(&deployment(2, "a")), d);
        let mut other_annotation = annotated.clone();
        other_annotation["metadata"]["annotations"]["note"] = json!("x");
        assert_ne!(state_digest(&other_annotation), d);
        // Types are part of the encoding: "3" is not 3.
        assert_ne!(state_digest(&json!({"a": "3"})), state_digest(&json!({"a": 3})));
        assert_ne!(state_digest(&json!({"a": ["b", "c"]})), state_digest(&json!({"a": ["bc"]})));
    }

    /// The state digest of `{"a": [1, 2.5, -3, true, null, "x"]}`, as computed before -0.0 was
    /// made 0.0 (by an independent implementation of the encoding).
    const STABLE_DIGEST: &str = "11bfdecaf576ab055f49c072bd9c83efd9c3ae4fac035f0b9000a8ffbe768349";

    /// Found by the `diff` fuzz target: `-0.0` and `0.0` are the same number to the change (so
    /// an update between them shows nothing to review) and must be to the state digest too.
    #[test]
    fn no_reviewable_change_is_no_new_state() {
        let negative: Value = serde_json::from_str(r#"{"spec": {"weight": -0.0, "tiny": -5e-555}}"#).unwrap();
        let positive: Value = serde_json::from_str(r#"{"spec": {"weight": 0.0, "tiny": 0e-5}}"#).unwrap();
        assert!(Change::between(&negative, &positive).is_empty());
        assert_eq!(state_digest(&negative), state_digest(&positive));
        // Still a number, not its text, and not the integer 0.
        assert_ne!(state_digest(&json!({"a": 0.0})), state_digest(&json!({"a": "0.0"})));
        assert_ne!(state_digest(&json!({"a": 0.0})), state_digest(&json!({"a": 0})));
        // Found by the same target: metadata holding bookkeeping alone is no state either.
        let bare = json!({"spec": {}});
        let bookkept = json!({"spec": {}, "metadata": {"resourceVersion": "1", "generation": 2}});
        assert!(Change::between(&bare, &bookkept).is_empty());
        assert_eq!(state_digest(&bare), state_digest(&bookkept));
        // Everything else keeps its digest.
        assert_eq!(
            hex(&state_digest(&json!({"a": [1, 2.5, -3, true, null, "x"]}))),
            STABLE_DIGEST,
            "the digest of objects without -0.0 changed: approvals issued before would go stale"
        );
    }
}
