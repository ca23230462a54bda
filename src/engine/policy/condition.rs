//! A rule's `condition`: a CEL expression over the request, compiled once per policy change with
//! the `cel` crate, evaluated only when everything else about the rule already matches.
//!
//! The cost is bounded by what CEL allows (no loops but comprehensions over the input, no
//! recursion) and by limits checked at compile time: the expression's length (4 KiB, the CRD
//! enforces it too), its nesting (the parser's depth limit), the variables it may name, and its
//! comprehensions (`all`, `exists`, `map`, `filter`…): at most [`MAX_COMPREHENSIONS`], nested at
//! most [`MAX_COMPREHENSION_DEPTH`] deep. So an evaluation costs at most a fixed multiple of the
//! square of the largest list in the request, whatever an agent puts in its object (which the API
//! server caps at 3 MiB): one comprehension inside another compares two containers lists, a third
//! level would cube an agent-chosen length.
//! Evaluation converts only the variables the expression names. Fail-safe: an error while
//! evaluating, or a result that is not a bool, counts as met, so the rule guards the request.

use std::sync::Arc;

use cel::{Context, Program, Value as Cel};
use serde_json::{Value, json};

use super::Facts;
use super::selector::Labels;

/// The AdmissionRequest as the API server sent it, as a condition's `request` shows it beyond
/// [`Facts`]. Implemented by the decoded request (`engine::admission`), so this module needs no
/// decoder.
pub trait SentRequest: std::fmt::Debug + Sync {
    /// `request` as ValidatingAdmissionPolicy shows it: `uid`, `kind`, `resource`,
    /// `subResource`, `requestKind`, `requestResource`, `requestSubResource`, `name`,
    /// `namespace`, `operation`, `userInfo` (`username`, `uid`, `groups`, `extra`), `dryRun`
    /// and, when sent, `options`.
    fn to_cel(&self) -> Value;
}

/// The variables a condition may name (those ValidatingAdmissionPolicy uses for the same data).
pub const VARIABLES: &[&str] = &["object", "oldObject", "request", "namespaceObject"];
const MAX_LENGTH: usize = 4096;
/// Comprehensions a condition may hold in all.
pub const MAX_COMPREHENSIONS: usize = 8;
/// How deep comprehensions may nest (one inside another is two).
pub const MAX_COMPREHENSION_DEPTH: usize = 2;

/// (comprehensions in all, deepest nesting) of an expression.
fn comprehensions(e: &cel::IdedExpr) -> (usize, usize) {
    use cel::common::ast::{EntryExpr, Expr};
    let mut children: Vec<&cel::IdedExpr> = Vec::new();
    let own = match &e.expr {
        Expr::Comprehension(c) => {
            children.extend([&c.iter_range, &c.accu_init, &c.loop_cond, &c.loop_step, &c.result]);
            1
        }
        Expr::Call(c) => {
            children.extend(c.target.as_deref());
            children.extend(c.args.iter());
            0
        }
        Expr::List(l) => {
            children.extend(l.elements.iter());
            0
        }
        Expr::Map(m) => {
            for entry in &m.entries {
                if let EntryExpr::MapEntry(me) = &entry.expr {
                    children.extend([&me.key, &me.value]);
                }
            }
            0
        }
        Expr::Struct(s) => {
            for entry in &s.entries {
                if let EntryExpr::StructField(f) = &entry.expr {
                    children.push(&f.value);
                }
            }
            0
        }
        Expr::Select(s) => {
            children.push(&s.operand);
            0
        }
        Expr::Unspecified | Expr::Ident(_) | Expr::Literal(_) => 0,
    };
    let (mut total, mut deepest) = (own, 0);
    for child in children {
        let (n, depth) = comprehensions(child);
        total += n;
        deepest = deepest.max(depth);
    }
    (total, deepest + own)
}

/// A compiled condition.
#[derive(Clone, Debug)]
pub struct Condition {
    source: String,
    program: Arc<Program>,
    names: Vec<&'static str>,
}

impl Condition {
    /// Compiles `source`; the error says what is wrong, for the policy's status.
    pub fn compile(source: &str) -> Result<Self, String> {
        if source.len() > MAX_LENGTH {
            return Err(format!("condition is {} bytes; at most {MAX_LENGTH}", source.len()));
        }
        let program = Program::compile(source).map_err(|e| format!("condition does not parse: {e}"))?;
        let (count, depth) = comprehensions(program.expression());
        if count > MAX_COMPREHENSIONS || depth > MAX_COMPREHENSION_DEPTH {
            return Err(format!(
                "condition holds {count} comprehensions nested {depth} deep; at most {MAX_COMPREHENSIONS}, nested \
                 {MAX_COMPREHENSION_DEPTH} deep, so that its cost stays bounded whatever the object holds"
            ));
        }
        let references = program.references();
        // The iteration variables of macros (`containers.map(c, c.image)`) are references too.
        let bound = bound_variables(source);
        let unknown: Vec<&str> = references
            .variables()
            .into_iter()
            .filter(|v| !VARIABLES.contains(v) && !bound.iter().any(|b| b == v))
            .collect();
        if !unknown.is_empty() {
            return Err(format!("condition names {unknown:?}; it may name only {}", VARIABLES.join(", ")));
        }
        let names = VARIABLES.iter().copied().filter(|v| references.has_variable(v)).collect();
        Ok(Self { source: source.to_owned(), program: Arc::new(program), names })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the request meets the condition (true on any error: the rule then guards it).
    /// A variable with no value (`object` of a DELETE, `namespaceObject` of a cluster-scoped
    /// object) is left undeclared, so naming it is an error, not a silent null.
    pub fn met(&self, facts: &Facts<'_>, namespace_labels: Option<&Labels>) -> bool {
        self.met_with(facts, namespace_labels, &mut Variables::default())
    }

    /// [`Condition::met`], converting each variable at most once into `variables`, which the
    /// caller keeps for every condition of the same operation: the conversion from JSON costs
    /// more than evaluating most expressions.
    pub fn met_with(
        &self,
        facts: &Facts<'_>,
        namespace_labels: Option<&Labels>,
        variables: &mut Variables,
    ) -> bool {
        let mut context = Context::default();
        for name in &self.names {
            let Some(at) = VARIABLES.iter().position(|v| v == name) else { continue };
            let converted = variables.0[at].get_or_insert_with(|| {
                let value = match *name {
                    "object" => facts.object.cloned(),
                    "oldObject" => facts.old_object.cloned(),
                    "request" => Some(request(facts)),
                    "namespaceObject" => namespace_labels
                        .map(|labels| json!({"metadata": {"name": facts.namespace, "labels": labels}})),
                    _ => None,
                };
                value.map(|v| cel::to_value(AsCel(&v)).map_err(|_| ()))
            });
            match converted {
                None => continue,
                // CEL values share their maps and lists: a clone is a reference count.
                Some(Ok(value)) => context.add_variable_from_value(*name, value.clone()),
                Some(Err(())) => return true,
            }
        }
        !matches!(self.program.execute(&context), Ok(Cel::Bool(false)))
    }
}

/// The variables of one operation as CEL values, converted on first use (in [`VARIABLES`]'
/// order): `None` not yet converted, `Some(None)` absent, `Some(Some(Err))` not convertible.
#[derive(Default)]
pub struct Variables([Option<Option<Result<Cel, ()>>>; 4]);

/// `request`: the AdmissionRequest as sent, with what names the operation (`operation`,
/// `resource`, `subResource`, `namespace`, `name`) taken from the operation being judged, which
/// differs from the one sent when a request is judged as what it amounts to (an eviction as its
/// pod's DELETE, a cascade as its dependents'). `kind` and `resource.version` then describe
/// another object, so they are left out; `requestKind`, `requestResource` and
/// `requestSubResource` always say what was sent. `subresource` is kept for conditions written
/// before `subResource` (ValidatingAdmissionPolicy's spelling) was added.
fn request(facts: &Facts<'_>) -> Value {
    let mut request = facts.sent.map(SentRequest::to_cel).unwrap_or_else(|| json!({}));
    let Some(fields) = request.as_object_mut() else { return request };
    let sent_resource = fields.get("resource");
    let same = sent_resource.is_some_and(|r| r["group"] == facts.group && r["resource"] == facts.resource);
    let mut resource = json!({"group": facts.group, "resource": facts.resource});
    if same && let Some(version) = sent_resource.and_then(|r| r.get("version")) {
        resource["version"] = version.clone();
    } else {
        fields.remove("kind");
    }
    fields.insert("resource".into(), resource);
    fields.insert("operation".into(), facts.operation.name().into());
    fields.insert("subResource".into(), facts.subresource.into());
    fields.insert("subresource".into(), facts.subresource.into());
    fields.insert("namespace".into(), facts.namespace.into());
    fields.insert("name".into(), facts.name.into());
    request
}

/// Names bound by macros: the first argument of `all`, `exists`, `exists_one`, `map`, `filter`.
fn bound_variables(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    for mac in ["all", "exists", "exists_one", "map", "filter"] {
        let needle = format!(".{mac}(");
        let mut rest = source;
        while let Some(at) = rest.find(&needle) {
            rest = &rest[at + needle.len()..];
            let name: String =
                rest.trim_start().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.push(name);
            }
        }
    }
    out
}

/// JSON as Kubernetes' CEL sees it: whole numbers are `int` (so `object.spec.replicas == 0`
/// holds), not the unsigned integers a plain serialisation would make of them.
struct AsCel<'a>(&'a Value);

impl serde::Serialize for AsCel<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self.0 {
            Value::Null => serializer.serialize_unit(),
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => serializer.serialize_i64(i),
                (None, Some(u), _) => serializer.serialize_u64(u),
                (_, _, f) => serializer.serialize_f64(f.unwrap_or(f64::NAN)),
            },
            Value::String(s) => serializer.serialize_str(s),
            Value::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&AsCel(item))?;
                }
                seq.end()
            }
            Value::Object(fields) => {
                let mut map = serializer.serialize_map(Some(fields.len()))?;
                for (k, v) in fields {
                    map.serialize_entry(k, &AsCel(v))?;
                }
                map.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::policy::Operation;

    fn facts<'a>(old: Option<&'a Value>, new: Option<&'a Value>) -> Facts<'a> {
        Facts {
            operation: Operation::Update { patch: Some(true) },
            group: "apps",
            resource: "deployments",
            subresource: "",
            namespace: "prod",
            name: "web",
            object: new,
            old_object: old,
            collateral: &[],
            sent: None,
        }
    }

    #[test]
    fn a_condition_guards_exactly_what_it_says() {
        let zero = Condition::compile("object.spec.replicas == 0").unwrap();
        let (three, none) = (json!({"spec": {"replicas": 3}}), json!({"spec": {"replicas": 0}}));
        assert!(zero.met(&facts(Some(&three), Some(&none)), None));
        assert!(!zero.met(&facts(Some(&none), Some(&three)), None));
        let image = Condition::compile(
            "oldObject.spec.template.spec.containers[0].image != object.spec.template.spec.containers[0].image",
        )
        .unwrap();
        let with = |i: &str| json!({"spec": {"template": {"spec": {"containers": [{"image": i}]}}}});
        let (a, b) = (with("web:1"), with("web:2"));
        assert!(image.met(&facts(Some(&a), Some(&b)), None));
        assert!(!image.met(&facts(Some(&a), Some(&a)), None));
        let ns =
            Condition::compile("namespaceObject.metadata.labels.tier == 'prod' && request.name == 'web'")
                .unwrap();
        let prod: Labels = [("tier".to_string(), "prod".to_string())].into();
        assert!(ns.met(&facts(Some(&a), Some(&b)), Some(&prod)));
        let dev: Labels = [("tier".to_string(), "dev".to_string())].into();
        assert!(!ns.met(&facts(Some(&a), Some(&b)), Some(&dev)));
        // A label it needs and does not find: an error, so it guards.
        assert!(ns.met(&facts(Some(&a), Some(&b)), Some(&Labels::new())));
    }

    /// An agent's UPDATE of a Deployment, as the API server sends it (a ServiceAccount token
    /// bound to a pod, a dry run, a patch).
    fn sent() -> crate::engine::admission::AdmissionRequest {
        serde_json::from_value(json!({
            "uid": "req-1",
            "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
            "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
            "requestKind": {"group": "apps", "version": "v1beta2", "kind": "Deployment"},
            "name": "web",
            "namespace": "prod",
            "operation": "UPDATE",
            "userInfo": {
                "username": "system:serviceaccount:agents:coder",
                "uid": "sa-uid",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:agents"],
                "extra": {"authentication.kubernetes.io/pod-name": ["coder-7f"]}
            },
            "dryRun": true,
            "options": {"kind": "PatchOptions", "fieldManager": "kubectl-edit"}
        }))
        .unwrap()
    }

    #[test]
    fn comprehensions_are_bounded_in_number_and_depth() {
        let containers = "object.spec.template.spec.containers";
        // One inside another (an image changed: each new container against the old ones): fine.
        let nested =
            format!("{containers}.exists(c, !oldObject.{}.exists(o, o.image == c.image))", &containers[7..]);
        assert!(Condition::compile(&nested).is_ok(), "{nested}");
        // A third level would cube a length the agent chooses.
        let cubed =
            format!("{containers}.all(a, {containers}.all(b, {containers}.all(c, a.name != b.name)))");
        let e = Condition::compile(&cubed).unwrap_err();
        assert!(e.contains("nested 3 deep"), "{e}");
        // Side by side they add up: eight are fine, nine are not.
        let one = format!("{containers}.exists(c, c.name == 'x')");
        let eight = [one.as_str(); 8].join(" || ");
        assert!(Condition::compile(&eight).is_ok());
        let nine = [one.as_str(); 9].join(" || ");
        assert!(Condition::compile(&nine).unwrap_err().contains("holds 9 comprehensions"));
        // Inside lists, maps and calls too.
        let hidden = format!(
            "[{containers}.all(a, [{containers}.all(b, {{'k': {containers}.all(c, true)}})].size() > 0)].size() > 0"
        );
        assert!(Condition::compile(&hidden).unwrap_err().contains("nested 3 deep"));
    }

    #[test]
    fn request_carries_what_validating_admission_policy_shows() {
        let request = sent();
        let (old, new) = (json!({"spec": {"replicas": 3}}), json!({"spec": {"replicas": 2}}));
        let f = Facts { sent: Some(&request), ..facts(Some(&old), Some(&new)) };
        for (source, want) in [
            ("request.userInfo.username == 'system:serviceaccount:agents:coder'", true),
            ("request.userInfo.username == 'system:serviceaccount:agents:editor'", false),
            ("request.userInfo.uid == 'sa-uid'", true),
            ("'system:serviceaccounts:agents' in request.userInfo.groups", true),
            ("'sre' in request.userInfo.groups", false),
            ("request.userInfo.extra['authentication.kubernetes.io/pod-name'][0] == 'coder-7f'", true),
            ("request.userInfo.extra['authentication.kubernetes.io/pod-name'][0] == 'other'", false),
            ("request.dryRun", true),
            ("!request.dryRun", false),
            ("request.uid == 'req-1'", true),
            ("request.kind.kind == 'Deployment' && request.kind.version == 'v1'", true),
            ("request.requestKind.version == 'v1beta2'", true),
            ("request.resource.version == 'v1' && request.resource.resource == 'deployments'", true),
            ("request.requestResource.resource == 'deployments'", true),
            ("request.subResource == '' && request.requestSubResource == ''", true),
            ("request.operation == 'UPDATE' && request.namespace == 'prod' && request.name == 'web'", true),
            ("request.options.fieldManager == 'kubectl-edit'", true),
            ("request.operation == 'DELETE'", false),
        ] {
            let c = Condition::compile(source).unwrap();
            assert_eq!(c.met(&f, None), want, "{source}");
        }
    }

    #[test]
    fn request_names_the_operation_judged_and_what_was_sent() {
        let request = sent();
        let old = json!({"spec": {"replicas": 3}});
        // The same request judged as another operation (what it amounts to): the operation and
        // resource are the judged ones, the kind of the object sent is not claimed for it, and
        // who sent it and how stay.
        let pods = Facts {
            operation: Operation::Delete,
            group: "",
            resource: "pods",
            name: "",
            sent: Some(&request),
            ..facts(Some(&old), None)
        };
        for (source, want) in [
            ("request.operation == 'DELETE' && request.resource.resource == 'pods'", true),
            ("has(request.kind)", false),
            ("has(request.resource.version)", false),
            ("request.requestKind.kind == 'Deployment'", true),
            ("request.userInfo.username == 'system:serviceaccount:agents:coder'", true),
            ("request.dryRun", true),
        ] {
            assert_eq!(Condition::compile(source).unwrap().met(&pods, None), want, "{source}");
        }
        // Without the request as sent (`agentguard why`), what only it knows is an error: the
        // rule guards. What the facts know is still there.
        let bare = facts(Some(&old), None);
        let who = Condition::compile("request.userInfo.username == 'nobody'").unwrap();
        assert!(who.met(&bare, None));
        let op = Condition::compile("request.operation == 'DELETE'").unwrap();
        assert!(!op.met(&bare, None));
        // The spelling conditions used before `subResource`.
        let legacy = Condition::compile("request.subresource == 'scale'").unwrap();
        assert!(legacy.met(&Facts { subresource: "scale", ..bare.clone() }, None));
        assert!(!legacy.met(&bare, None));
    }

    #[test]
    fn conditions_sharing_converted_variables_judge_as_each_alone() {
        let request = sent();
        let (old, new) = (json!({"spec": {"replicas": 3}}), json!({"spec": {"replicas": 0}}));
        let f = Facts { sent: Some(&request), ..facts(Some(&old), Some(&new)) };
        let prod: Labels = [("tier".to_string(), "prod".to_string())].into();
        let mut shared = Variables::default();
        for (source, want) in [
            ("object.spec.replicas == 0", true),
            ("oldObject.spec.replicas == 0", false),
            ("object.spec.missing == 1", true),
            ("request.userInfo.uid == 'sa-uid' && object.spec.replicas == 1", false),
            ("namespaceObject.metadata.labels.tier == 'prod'", true),
            ("request.dryRun && oldObject.spec.replicas == 3", true),
        ] {
            let c = Condition::compile(source).unwrap();
            assert_eq!(c.met(&f, Some(&prod)), want, "{source} alone");
            assert_eq!(c.met_with(&f, Some(&prod), &mut shared), want, "{source} after the others");
        }
    }

    #[test]
    fn errors_and_non_bools_guard_and_bad_conditions_are_refused() {
        // A missing field, a string where a bool is due, a DELETE's null object: all met.
        for source in ["object.spec.missing == 1", "'yes'", "object.spec.replicas == 0"] {
            let c = Condition::compile(source).unwrap();
            let old = json!({"spec": {"replicas": 1}});
            assert!(c.met(&facts(Some(&old), None), None), "{source}");
        }
        assert!(Condition::compile("object.spec.replicas ==").is_err());
        assert!(Condition::compile("secret.data == 1").unwrap_err().contains("secret"));
        assert!(Condition::compile("object.spec.containers.map(c, c.image) != []").is_ok());
        assert!(Condition::compile("object.spec.containers.all(c, c.image == other)").is_err());
        assert!(Condition::compile(&"1 + ".repeat(2000)).is_err());
    }
}
