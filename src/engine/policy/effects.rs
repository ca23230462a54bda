//! What a request does, whatever its verb: the operations it amounts to, each judged by the
//! policies as if it had been sent.
//!
//! ```text
//!  DELETE x                       ▸ DELETE x, and DELETE of each collateral object (cascade)
//!  CREATE pods/eviction           ▸ DELETE of the pod
//!  UPDATE x/status (metadata)     ▸ UPDATE x/status, and UPDATE x (labels, owners are stored)
//!  UPDATE removing finalizers     ▸ UPDATE x, and DELETE x (when x is being deleted)
//!  UPDATE arming a controller     ▸ UPDATE x, and DELETE of what the controller would delete
//!  CONNECT pods/exec              ▸ CONNECT pods/exec
//! ```
//!
//! Pure: the objects a cascade would take are found by the request path (it asks the API
//! server) and arrive as [`Collateral`]; everything else is read from the request itself.

use std::borrow::Cow;

use serde_json::Value;

use super::{Facts, Operation};

/// An object the request would destroy besides its own target, found by the request path: a
/// dependent the garbage collector would delete, an object inside a Namespace being deleted, a
/// custom resource of a CRD being deleted.
#[derive(Clone, Debug, PartialEq)]
pub struct Collateral {
    pub group: String,
    pub resource: String,
    /// Empty for cluster-scoped objects.
    pub namespace: String,
    pub name: String,
    /// Its metadata at least (labels are matched by objectSelectors).
    pub object: Value,
    /// How the request would take it, e.g. `owned by ConfigMap "owner"`.
    pub via: String,
    /// A type agentguard may not list, so what the request takes of it is not known: any object
    /// of it (any name; in any namespace when `namespace` is empty) is assumed taken.
    pub unseen: bool,
}

/// One operation a request amounts to.
#[derive(Clone, Debug)]
pub struct Effect<'a> {
    pub facts: Facts<'a>,
    /// Why the request amounts to this; `None` for the request as sent.
    pub via: Option<Cow<'a, str>>,
    /// The target's name is not known (the volumes a StatefulSet would delete): name globs are
    /// read in their most restrictive sense and match any name.
    pub any_name: bool,
    /// Nor is its namespace (a type agentguard may not list, cluster-wide): every namespace's
    /// policies and namespace lists are read as matching it.
    pub any_namespace: bool,
}

impl<'a> Effect<'a> {
    /// The request as sent.
    pub fn sent(facts: Facts<'a>) -> Self {
        Self { facts, via: None, any_name: false, any_namespace: false }
    }

    fn derived(facts: Facts<'a>, via: impl Into<Cow<'a, str>>) -> Self {
        Self { facts, via: Some(via.into()), any_name: false, any_namespace: false }
    }
}

/// Every operation `facts` amounts to, the request as sent first.
pub fn of<'a>(facts: &Facts<'a>) -> Vec<Effect<'a>> {
    let mut out = vec![Effect::sent(facts.clone())];
    match facts.operation {
        Operation::Delete => {
            if facts.group.is_empty() && facts.resource == "nodes" && facts.subresource.is_empty() {
                // The pod garbage collector deletes the pods bound to a Node that is gone.
                let pods = Facts {
                    group: "",
                    resource: "pods",
                    namespace: "",
                    name: "",
                    object: None,
                    old_object: None,
                    collateral: &[],
                    ..facts.clone()
                };
                out.push(Effect {
                    facts: pods,
                    via: Some("deleting a Node deletes the pods bound to it".into()),
                    any_name: true,
                    any_namespace: true,
                });
            }
            for c in facts.collateral {
                let f = Facts {
                    operation: Operation::Delete,
                    group: &c.group,
                    resource: &c.resource,
                    subresource: "",
                    namespace: if c.group.is_empty() && c.resource == "namespaces" {
                        &c.name
                    } else {
                        &c.namespace
                    },
                    name: &c.name,
                    object: None,
                    old_object: (!c.unseen).then_some(&c.object),
                    collateral: &[],
                    sent: facts.sent,
                };
                out.push(Effect {
                    any_name: c.unseen,
                    any_namespace: c.unseen && c.namespace.is_empty(),
                    ..Effect::derived(f, c.via.as_str())
                });
            }
        }
        Operation::Create
            if facts.group.is_empty() && facts.resource == "pods" && facts.subresource == "eviction" =>
        {
            // The pod itself, when the request path looked it up; otherwise judged unseen.
            let pod = facts.collateral.iter().find(|c| c.resource == "pods" && c.name == facts.name);
            let f = Facts {
                operation: Operation::Delete,
                subresource: "",
                object: None,
                old_object: pod.map(|c| &c.object),
                collateral: &[],
                ..facts.clone()
            };
            out.push(Effect::derived(f, "an eviction deletes the pod"));
        }
        Operation::Update { .. } => {
            if let (Some(old), Some(new)) = (facts.old_object, facts.object) {
                updates(facts, old, new, &mut out);
            }
        }
        Operation::Create | Operation::Connect => {}
    }
    out
}

fn updates<'a>(facts: &Facts<'a>, old: &'a Value, new: &'a Value, out: &mut Vec<Effect<'a>>) {
    let main = Facts { subresource: "", ..facts.clone() };
    let carries_object = !facts.subresource.is_empty()
        && old.get("kind").is_some()
        && old.get("kind") == new.get("kind")
        && old.get("kind").and_then(Value::as_str) != Some("Scale");
    if carries_object && stored_metadata_changes(old, new) {
        // Writes through /status and /finalize store labels, annotations and owners too.
        out.push(Effect::derived(
            main.clone(),
            format!("the {} subresource changes the object's metadata", facts.subresource),
        ));
    }
    if facts.group == "apps"
        && facts.resource == "statefulsets"
        && facts.subresource == "scale"
        && lowered(old, new, "/spec/replicas", 1)
    {
        // A Scale shows no retention policy: judged as if whenScaled were Delete.
        let volumes = Facts {
            operation: Operation::Delete,
            group: "",
            resource: "persistentvolumeclaims",
            subresource: "",
            name: "",
            object: None,
            old_object: None,
            collateral: &[],
            ..facts.clone()
        };
        out.push(Effect {
            facts: volumes,
            via: Some(
                "scaling a StatefulSet down through /scale may delete the volumes of the removed replicas (its retention policy is not shown)"
                    .into(),
            ),
            any_name: true,
            any_namespace: false,
        });
    }
    if facts.subresource.is_empty() || carries_object {
        let delete = Facts { operation: Operation::Delete, object: None, ..main.clone() };
        if completes_deletion(facts, old, new) {
            out.push(Effect::derived(delete.clone(), "removing finalizers completes the deletion"));
        }
        if let Some(why) = hands_to_garbage_collector(old, new) {
            out.push(Effect::derived(delete.clone(), why));
        }
        if let Some(why) = arms_deletion_of_itself(facts, old, new) {
            out.push(Effect::derived(delete, why));
        }
        for (group, resource, anywhere, why) in hands_others_to_controllers(facts, old, new) {
            // Which objects is not known from the request: any of that kind, in the object's
            // namespace (or in any, for a Node's pods).
            let others = Facts {
                operation: Operation::Delete,
                group,
                resource,
                subresource: "",
                namespace: if anywhere { "" } else { facts.namespace },
                name: "",
                object: None,
                old_object: None,
                collateral: &[],
                sent: facts.sent,
            };
            out.push(Effect {
                facts: others,
                via: Some(why.into()),
                any_name: true,
                any_namespace: anywhere,
            });
        }
    }
    volumes_of_claims(facts, old, out);
}

/// A claim's volume goes with it where its reclaimPolicy is Delete (or Recycle), which an
/// update does not show: each claim deletion an update amounts to is judged as its volume's
/// deletion too — the volume the claim names, or any volume where the claims are not known (a
/// StatefulSet's). Only volumes are judged by this; Retain volumes' claims may be held too.
fn volumes_of_claims<'a>(facts: &Facts<'a>, old: &'a Value, out: &mut Vec<Effect<'a>>) {
    let claims: Vec<(Option<&'a str>, String)> = out
        .iter()
        .filter(|e| {
            e.via.is_some()
                && e.facts.operation == Operation::Delete
                && e.facts.group.is_empty()
                && e.facts.resource == "persistentvolumeclaims"
        })
        .map(|e| {
            let own = !e.any_name && facts.group.is_empty() && facts.resource == "persistentvolumeclaims";
            let volume = if own {
                Some(old.pointer("/spec/volumeName").and_then(Value::as_str).unwrap_or_default())
            } else {
                None
            };
            (volume, e.via.as_deref().unwrap_or_default().to_owned())
        })
        .collect();
    for (volume, via) in claims {
        // An unbound claim takes no volume with it.
        if volume == Some("") {
            continue;
        }
        let f = Facts {
            operation: Operation::Delete,
            group: "",
            resource: "persistentvolumes",
            subresource: "",
            namespace: "",
            name: volume.unwrap_or_default(),
            object: None,
            old_object: None,
            collateral: &[],
            sent: facts.sent,
        };
        out.push(Effect {
            facts: f,
            via: Some(
                format!("{via}, and the claim's volume with it where its reclaimPolicy is Delete").into(),
            ),
            any_name: volume.is_none(),
            any_namespace: false,
        });
    }
}

/// Whether the metadata a policy can act on (labels, annotations, owners, finalizers) differs.
/// Fields every write touches (managedFields, resourceVersion) do not count.
fn stored_metadata_changes(old: &Value, new: &Value) -> bool {
    ["labels", "annotations", "ownerReferences", "finalizers"]
        .iter()
        .any(|field| old.pointer(&format!("/metadata/{field}")) != new.pointer(&format!("/metadata/{field}")))
}

fn strings(v: Option<&Value>) -> Vec<&str> {
    v.and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect()
}

/// An object being deleted that loses a finalizer: the last one gone completes the deletion,
/// and any one gone skips the cleanup it stood for. A Namespace's `spec.finalizers` (written
/// through `namespaces/finalize`) count too.
fn completes_deletion(facts: &Facts<'_>, old: &Value, new: &Value) -> bool {
    if old.pointer("/metadata/deletionTimestamp").is_none_or(Value::is_null) {
        return false;
    }
    let lost = |path: &str| {
        let after = strings(new.pointer(path));
        strings(old.pointer(path)).iter().any(|f| !after.contains(f))
    };
    lost("/metadata/finalizers")
        || (facts.group.is_empty() && facts.resource == "namespaces" && lost("/spec/finalizers"))
}

/// An ownerReference added or rewritten: the garbage collector deletes an object whose owner is
/// gone, or was never there (a reference to a missing kind/name counts as gone).
fn hands_to_garbage_collector(old: &Value, new: &Value) -> Option<&'static str> {
    let refs = |o: &Value| -> Vec<(String, String, String, String)> {
        o.pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|r| {
                let f = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
                (f("apiVersion"), f("kind"), f("name"), f("uid"))
            })
            .collect()
    };
    let before = refs(old);
    refs(new).iter().any(|r| !before.contains(r)).then_some(
        "an added or rewritten ownerReference hands the object's deletion to the garbage collector",
    )
}

/// Fields that tell a controller to destroy the object's backing resource when the object goes,
/// flipped from keeping it to destroying it.
fn arms_deletion_of_itself(facts: &Facts<'_>, old: &Value, new: &Value) -> Option<&'static str> {
    let text = |o: &Value, path: &str| o.pointer(path).and_then(Value::as_str).map(str::to_ascii_lowercase);
    let annotation = |o: &Value, key: &str| {
        o.pointer("/metadata/annotations")
            .and_then(|a| a.get(key))
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase)
    };
    // The TTL-after-finished controller deletes a finished Job (and its pods) once the TTL
    // passes: setting or shortening it schedules the Job's deletion.
    if facts.group == "batch" && facts.resource == "jobs" {
        let ttl = |o: &Value| int(o, "/spec/ttlSecondsAfterFinished");
        if let Some(after) = ttl(new)
            && ttl(old).is_none_or(|before| after < before)
        {
            return Some("ttlSecondsAfterFinished makes the TTL controller delete the Job once it finishes");
        }
    }
    if facts.group.is_empty() && facts.resource == "services" {
        let lb = |o: &Value| text(o, "/spec/type").as_deref() == Some("loadbalancer");
        if lb(old) && !lb(new) {
            return Some(
                "leaving type LoadBalancer makes the cloud controller delete the load balancer and release its address",
            );
        }
    }
    // GitOps controllers delete what their new source no longer holds once pruning is on:
    // turning pruning on, or pointing a pruning Application or Kustomization elsewhere, is the
    // deletion of whatever it manages (as deleting it with its cascade would be).
    let changed = |paths: &[&str]| paths.iter().any(|p| old.pointer(p) != new.pointer(p));
    let flag = |o: &Value, path: &str| o.pointer(path).and_then(Value::as_bool) == Some(true);
    if facts.group == "argoproj.io" && facts.resource == "applications" {
        let prunes = |o: &Value| flag(o, "/spec/syncPolicy/automated/prune");
        if prunes(new) && (!prunes(old) || changed(&["/spec/source", "/spec/sources", "/spec/destination"])) {
            return Some(
                "automated pruning makes Argo CD delete what the Application's source no longer holds",
            );
        }
    }
    if facts.group == "kustomize.toolkit.fluxcd.io" && facts.resource == "kustomizations" {
        let prunes = |o: &Value| flag(o, "/spec/prune");
        if prunes(new)
            && (!prunes(old) || changed(&["/spec/path", "/spec/sourceRef", "/spec/targetNamespace"]))
        {
            return Some("spec.prune makes Flux delete what the Kustomization's source no longer holds");
        }
    }
    if facts.group.is_empty() && facts.resource == "persistentvolumes" {
        // Recycle scrubs the volume's data (`rm -rf`) once its claim is gone: as destructive.
        let deletes = |o: &Value| {
            matches!(text(o, "/spec/persistentVolumeReclaimPolicy").as_deref(), Some("delete" | "recycle"))
        };
        if !deletes(old) && deletes(new) {
            return Some(
                "persistentVolumeReclaimPolicy: Delete (or Recycle) deletes the volume's storage (or data) with it",
            );
        }
    }
    // AWS Controllers for Kubernetes: the resource's annotation decides, else the Namespace's
    // `<service>.services.k8s.aws/deletion-policy`, else the controller's `--deletion-policy`;
    // `retain` keeps the AWS resource. Unset, the resource follows a default this request cannot
    // see: leaving `retain`, or setting any other value where none or `retain` was, may arm it.
    let ack = |o: &Value| annotation(o, "services.k8s.aws/deletion-policy");
    let (before, after) = (ack(old), ack(new));
    let retains = |v: &Option<String>| v.as_deref() == Some("retain");
    let deletes = |v: &Option<String>| v.is_some() && !retains(v);
    if (retains(&before) && !retains(&after)) || (!deletes(&before) && deletes(&after)) {
        return Some("the services.k8s.aws/deletion-policy annotation no longer retains the AWS resource");
    }
    // Config Connector: `abandon` keeps the Google Cloud resource; the default deletes it.
    let cnrm =
        |o: &Value| annotation(o, "cnrm.cloud.google.com/deletion-policy").as_deref() == Some("abandon");
    if cnrm(old) && !cnrm(new) {
        return Some(
            "the cnrm.cloud.google.com/deletion-policy annotation no longer abandons the cloud resource",
        );
    }
    // Crossplane managed resources: armed when the external resource would be deleted with the
    // object after the change and kept before, with management policies enabled or disabled.
    if [true, false].into_iter().any(|on| !crossplane_deletes(old, on) && crossplane_deletes(new, on)) {
        return Some("spec.deletionPolicy/managementPolicies no longer keep the external resource");
    }
    None
}

/// Whether Crossplane deletes a managed resource's external resource when the object is deleted,
/// as crossplane-runtime's `ManagementPoliciesResolver::ShouldDelete` decides. With management
/// policies enabled: `deletionPolicy: Delete` (the default) with policies holding `Delete` or `*`,
/// or non-default policies holding `Delete`, whatever the deletionPolicy (so `Orphan` with
/// `[Observe, Delete]` deletes); no policies at all pause the resource. Disabled: any
/// deletionPolicy but `Orphan`, unless non-default policies make the reconciler refuse the object.
/// Absent policies are the CRDs' default, `["*"]`.
fn crossplane_deletes(o: &Value, policies_enabled: bool) -> bool {
    let orphan = o
        .pointer("/spec/deletionPolicy")
        .and_then(Value::as_str)
        .is_some_and(|p| p.eq_ignore_ascii_case("orphan"));
    let policies = o.pointer("/spec/managementPolicies").filter(|m| m.is_array()).map(|m| strings(Some(m)));
    let default = policies.as_ref().is_none_or(|p| !p.is_empty() && p.iter().all(|p| *p == "*"));
    let has = |action: &str| policies.iter().flatten().any(|p| p.eq_ignore_ascii_case(action));
    if !policies_enabled {
        return !orphan && (default || policies.as_ref().is_some_and(Vec::is_empty));
    }
    (!orphan && (default || has("delete") || has("*"))) || (!default && has("delete"))
}

fn int(o: &Value, path: &str) -> Option<i64> {
    o.pointer(path).and_then(Value::as_i64)
}

/// A count a controller keeps at most of something, lowered (absent is `default`): the
/// controller deletes what is over it.
fn lowered(old: &Value, new: &Value, path: &str, default: i64) -> bool {
    int(new, path).unwrap_or(default) < int(old, path).unwrap_or(default)
}

/// Other objects an update makes a controller delete, as (group, resource, in any namespace,
/// why): which ones is not known from the request.
fn hands_others_to_controllers(
    facts: &Facts<'_>,
    old: &Value,
    new: &Value,
) -> Vec<(&'static str, &'static str, bool, &'static str)> {
    let mut out = Vec::new();
    let retention = |o: &Value, when: &str| {
        o.pointer(&format!("/spec/persistentVolumeClaimRetentionPolicy/{when}")).and_then(Value::as_str)
            == Some("Delete")
    };
    match (facts.group, facts.resource) {
        ("apps", "statefulsets") => {
            if ["whenDeleted", "whenScaled"].iter().any(|when| !retention(old, when) && retention(new, when)) {
                out.push((
                    "",
                    "persistentvolumeclaims",
                    false,
                    "persistentVolumeClaimRetentionPolicy: Delete arms the StatefulSet controller to delete its volumes",
                ));
            }
            if retention(new, "whenScaled") && lowered(old, new, "/spec/replicas", 1) {
                out.push((
                    "",
                    "persistentvolumeclaims",
                    false,
                    "scaling down a StatefulSet whose whenScaled retention is Delete deletes the volumes of the removed replicas",
                ));
            }
        }
        ("apps", "deployments") if lowered(old, new, "/spec/revisionHistoryLimit", 10) => out.push((
            "apps",
            "replicasets",
            false,
            "a lower revisionHistoryLimit makes the Deployment controller delete old ReplicaSets (its rollback history)",
        )),
        ("batch", "cronjobs")
            if lowered(old, new, "/spec/successfulJobsHistoryLimit", 3)
                || lowered(old, new, "/spec/failedJobsHistoryLimit", 1) =>
        {
            out.push((
                "batch",
                "jobs",
                false,
                "a lower jobs history limit makes the CronJob controller delete finished Jobs",
            ))
        }
        ("", "nodes") => {
            let no_execute = |o: &Value| {
                o.pointer("/spec/taints")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter(|t| t.get("effect").and_then(Value::as_str) == Some("NoExecute"))
                    .map(|t| (t.get("key").cloned(), t.get("value").cloned()))
                    .collect::<Vec<_>>()
            };
            let before = no_execute(old);
            if no_execute(new).iter().any(|t| !before.contains(t)) {
                out.push((
                    "",
                    "pods",
                    true,
                    "a NoExecute taint makes the taint manager delete the node's pods that do not tolerate it",
                ));
            }
        }
        _ => {}
    }
    out
}

/// What a DELETE's approval is bound to: the object's state and, when the delete takes others
/// with it, the set of top-level objects it would take (each by kind, namespace, name and uid;
/// an object controlled by the deleted one or by another in the set is represented by its
/// controller, so pods a ReplicaSet replaces do not change it). A set that changes — an object
/// added, removed or replaced — gives another digest, so an approval shown one blast radius does
/// not cover another. Without collateral it is the state digest itself.
pub fn delete_digest(state: &[u8; 32], deleted_uid: &str, collateral: &[Collateral]) -> [u8; 32] {
    let top = top_level(deleted_uid, collateral);
    if top.is_empty() {
        return *state;
    }
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(b"agentguard.io/radius v1\0");
    hash.update(state);
    for (kind, namespace, name, uid) in top {
        for part in [kind.as_str(), namespace, name, uid] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part.as_bytes());
        }
    }
    hash.finalize().into()
}

fn uid_of(c: &Collateral) -> &str {
    c.object.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or_default()
}

/// Events come and go with every action on a namespace (agentguard's own among them): they are
/// not what an approver weighs, and would make every radius stale at once.
fn is_event(c: &Collateral) -> bool {
    c.resource == "events" && (c.group.is_empty() || c.group == "events.k8s.io")
}

/// The collateral not controlled by the deleted object or by other collateral, sorted.
fn top_level<'c>(
    deleted_uid: &str,
    collateral: &'c [Collateral],
) -> Vec<(String, &'c str, &'c str, &'c str)> {
    let inside: std::collections::HashSet<&str> =
        collateral.iter().map(uid_of).filter(|u| !u.is_empty()).chain([deleted_uid]).collect();
    let controlled = |c: &Collateral| {
        c.object.pointer("/metadata/ownerReferences").and_then(Value::as_array).into_iter().flatten().any(
            |r| {
                r.get("controller").and_then(Value::as_bool) == Some(true)
                    && r.get("uid").and_then(Value::as_str).is_some_and(|u| inside.contains(u))
            },
        )
    };
    let mut out: Vec<_> = collateral
        .iter()
        .filter(|c| !is_event(c))
        .filter(|c| c.unseen || !controlled(c))
        .map(|c| {
            let kind =
                if c.group.is_empty() { c.resource.clone() } else { format!("{}.{}", c.resource, c.group) };
            let name = if c.unseen { "*" } else { c.name.as_str() };
            (kind, c.namespace.as_str(), name, uid_of(c))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What a DELETE would take with it, for a human to read before approving: counts by kind, with
/// the names of the first few top-level objects and the kinds agentguard could not see.
pub fn radius_summary(deleted_uid: &str, collateral: &[Collateral]) -> Option<String> {
    if collateral.iter().all(is_event) {
        return None;
    }
    let mut by_kind: std::collections::BTreeMap<String, (usize, Vec<&str>, bool)> = Default::default();
    for c in collateral.iter().filter(|c| !is_event(c)) {
        let kind =
            if c.group.is_empty() { c.resource.clone() } else { format!("{}.{}", c.resource, c.group) };
        let entry = by_kind.entry(kind).or_default();
        if c.unseen {
            entry.2 = true;
        } else {
            entry.0 += 1;
        }
    }
    for (kind, _, name, _) in top_level(deleted_uid, collateral) {
        if let Some(entry) = by_kind.get_mut(&kind)
            && name != "*"
        {
            entry.1.push(name);
        }
    }
    const NAMES: usize = 5;
    let parts: Vec<String> = by_kind
        .into_iter()
        .map(|(kind, (count, names, unseen))| {
            let mut part = if count > 0 { format!("{count} {kind}") } else { format!("any {kind}") };
            if !names.is_empty() && count > 0 {
                let shown: Vec<&str> = names.iter().take(NAMES).copied().collect();
                let more = names.len().saturating_sub(NAMES);
                part.push_str(&format!(
                    " ({}{})",
                    shown.join(", "),
                    if more > 0 { format!(" and {more} more") } else { String::new() }
                ));
            }
            if unseen {
                part.push_str(if count > 0 {
                    " and any agentguard may not read"
                } else {
                    " (agentguard may not read them)"
                });
            }
            if kind == "persistentvolumes" {
                part.push_str(" with all their data (reclaimPolicy Delete)");
            }
            part
        })
        .collect();
    Some(parts.join(", "))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn facts<'a>(
        operation: Operation,
        (group, resource, subresource): (&'a str, &'a str, &'a str),
        old: Option<&'a Value>,
        new: Option<&'a Value>,
    ) -> Facts<'a> {
        Facts {
            operation,
            group,
            resource,
            subresource,
            namespace: "prod",
            name: "x",
            object: new,
            old_object: old,
            collateral: &[],
            sent: None,
        }
    }

    const UPDATE: Operation = Operation::Update { patch: None };

    fn derived(effects: &[Effect<'_>]) -> Vec<(Operation, String, String)> {
        effects[1..]
            .iter()
            .map(|e| {
                (
                    e.facts.operation,
                    format!("{}/{}", e.facts.resource, e.facts.subresource),
                    e.facts.name.into(),
                )
            })
            .collect()
    }

    #[test]
    fn a_plain_update_is_itself_only() {
        let old = json!({"kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "1"}});
        let new = json!({"kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "2"}});
        assert!(derived(&of(&facts(UPDATE, ("", "configmaps", ""), Some(&old), Some(&new)))).is_empty());
    }

    #[test]
    fn status_writes_that_change_metadata_are_updates_of_the_object() {
        let old = json!({"kind": "Namespace", "metadata": {"name": "x", "labels": {"a": "1"}}});
        let new = json!({"kind": "Namespace", "metadata": {"name": "x", "labels": {}}});
        let e = of(&facts(UPDATE, ("", "namespaces", "status"), Some(&old), Some(&new)));
        assert_eq!(derived(&e), [(UPDATE, "namespaces/".into(), "x".into())]);
        // A status-only write stays a status write; a scale carries no metadata of the object.
        let status =
            json!({"kind": "Namespace", "metadata": {"name": "x", "labels": {"a": "1"}}, "status": {}});
        assert!(
            derived(&of(&facts(UPDATE, ("", "namespaces", "status"), Some(&old), Some(&status)))).is_empty()
        );
        let mut touched = status.clone();
        touched["metadata"]["managedFields"] = json!([{"manager": "kube-controller-manager"}]);
        touched["metadata"]["resourceVersion"] = json!("12");
        let e = of(&facts(UPDATE, ("", "namespaces", "status"), Some(&old), Some(&touched)));
        assert!(derived(&e).is_empty(), "managedFields and resourceVersion change on every write");
        let s1 = json!({"kind": "Scale", "metadata": {"name": "x", "resourceVersion": "1"}});
        let s2 = json!({"kind": "Scale", "metadata": {"name": "x", "resourceVersion": "2"}});
        assert!(
            derived(&of(&facts(UPDATE, ("apps", "deployments", "scale"), Some(&s1), Some(&s2)))).is_empty()
        );
    }

    #[test]
    fn evictions_are_deletes_of_the_pod() {
        let e = of(&facts(Operation::Create, ("", "pods", "eviction"), None, None));
        assert_eq!(derived(&e), [(Operation::Delete, "pods/".into(), "x".into())]);
        assert!(derived(&of(&facts(Operation::Create, ("", "pods", "binding"), None, None))).is_empty());
    }

    #[test]
    fn removing_finalizers_of_an_object_being_deleted_is_its_delete() {
        let gone = "2026-11-26T12:00:00Z";
        let old = json!({"kind": "ConfigMap", "metadata": {"name": "x", "deletionTimestamp": gone, "finalizers": ["a", "b"]}});
        let new = json!({"kind": "ConfigMap", "metadata": {"name": "x", "deletionTimestamp": gone, "finalizers": ["b"]}});
        let e = of(&facts(UPDATE, ("", "configmaps", ""), Some(&old), Some(&new)));
        assert_eq!(derived(&e), [(Operation::Delete, "configmaps/".into(), "x".into())]);
        // Not being deleted: dropping a finalizer deletes nothing.
        let live = json!({"kind": "ConfigMap", "metadata": {"name": "x", "finalizers": ["a"]}});
        let none = json!({"kind": "ConfigMap", "metadata": {"name": "x"}});
        assert!(derived(&of(&facts(UPDATE, ("", "configmaps", ""), Some(&live), Some(&none)))).is_empty());
        // namespaces/finalize empties spec.finalizers.
        let ns_old = json!({"kind": "Namespace", "metadata": {"name": "x", "deletionTimestamp": gone}, "spec": {"finalizers": ["kubernetes"]}});
        let ns_new = json!({"kind": "Namespace", "metadata": {"name": "x", "deletionTimestamp": gone}, "spec": {"finalizers": []}});
        let e = of(&facts(UPDATE, ("", "namespaces", "finalize"), Some(&ns_old), Some(&ns_new)));
        assert_eq!(derived(&e), [(Operation::Delete, "namespaces/".into(), "x".into())]);
    }

    #[test]
    fn owner_references_added_or_rewritten_hand_deletion_to_the_collector() {
        let r = |name: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "name": name, "uid": "u1"});
        let old = json!({"kind": "Secret", "metadata": {"name": "x", "ownerReferences": [r("a")]}});
        let renamed = json!({"kind": "Secret", "metadata": {"name": "x", "ownerReferences": [r("gone")]}});
        let removed = json!({"kind": "Secret", "metadata": {"name": "x"}});
        let e = of(&facts(UPDATE, ("", "secrets", ""), Some(&old), Some(&renamed)));
        assert_eq!(derived(&e), [(Operation::Delete, "secrets/".into(), "x".into())]);
        assert!(derived(&of(&facts(UPDATE, ("", "secrets", ""), Some(&old), Some(&removed)))).is_empty());
        // Through /status, too.
        let e = of(&facts(UPDATE, ("", "persistentvolumeclaims", "status"), Some(&removed), Some(&old)));
        let kinds: Vec<Operation> = derived(&e).into_iter().map(|d| d.0).collect();
        assert_eq!(kinds, [UPDATE, Operation::Delete]);
    }

    #[test]
    fn arming_a_controller_is_the_delete_it_arms() {
        let pv = |p: &str| json!({"kind": "PersistentVolume", "metadata": {"name": "x"}, "spec": {"persistentVolumeReclaimPolicy": p}});
        let (retain, delete) = (pv("Retain"), pv("Delete"));
        let e = of(&facts(UPDATE, ("", "persistentvolumes", ""), Some(&retain), Some(&delete)));
        assert_eq!(derived(&e), [(Operation::Delete, "persistentvolumes/".into(), "x".into())]);
        // Recycle scrubs the data as surely.
        let recycle = pv("Recycle");
        let e = of(&facts(UPDATE, ("", "persistentvolumes", ""), Some(&retain), Some(&recycle)));
        assert_eq!(derived(&e), [(Operation::Delete, "persistentvolumes/".into(), "x".into())]);
        assert!(
            derived(&of(&facts(UPDATE, ("", "persistentvolumes", ""), Some(&delete), Some(&retain))))
                .is_empty()
        );

        let sts = |p: &str| json!({"kind": "StatefulSet", "metadata": {"name": "x"}, "spec": {"persistentVolumeClaimRetentionPolicy": {"whenDeleted": p}}});
        let (keep, drop) = (sts("Retain"), sts("Delete"));
        let e = of(&facts(UPDATE, ("apps", "statefulsets", ""), Some(&keep), Some(&drop)));
        assert_eq!(
            derived(&e),
            [
                (Operation::Delete, "persistentvolumeclaims/".into(), String::new()),
                (Operation::Delete, "persistentvolumes/".into(), String::new())
            ]
        );
        assert!(e[1].any_name && e[2].any_name);
        // A bound claim handed to the garbage collector takes its volume; an unbound one none.
        let pvc = |owners: Value, volume: &str| json!({"kind": "PersistentVolumeClaim", "metadata": {"name": "c", "ownerReferences": owners}, "spec": {"volumeName": volume}});
        let owner = json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "gone", "uid": "u"}]);
        let (bare, owned) = (pvc(json!([]), "pv-1"), pvc(owner.clone(), "pv-1"));
        let e = of(&facts(UPDATE, ("", "persistentvolumeclaims", ""), Some(&bare), Some(&owned)));
        assert_eq!(
            derived(&e),
            [
                (Operation::Delete, "persistentvolumeclaims/".into(), "x".into()),
                (Operation::Delete, "persistentvolumes/".into(), "pv-1".into())
            ]
        );
        let (bare, owned) = (pvc(json!([]), ""), pvc(owner, ""));
        let e = of(&facts(UPDATE, ("", "persistentvolumeclaims", ""), Some(&bare), Some(&owned)));
        assert_eq!(derived(&e).len(), 1);

        let ann = |k: &str, v: Option<&str>| {
            let mut o = json!({"kind": "Bucket", "metadata": {"name": "x", "annotations": {}}});
            if let Some(v) = v {
                o["metadata"]["annotations"][k] = json!(v);
            }
            o
        };
        for (key, keep, other) in [
            ("services.k8s.aws/deletion-policy", "retain", Some("delete")),
            ("services.k8s.aws/deletion-policy", "retain", None),
            ("cnrm.cloud.google.com/deletion-policy", "abandon", None),
        ] {
            let (old, new) = (ann(key, Some(keep)), ann(key, other));
            let e = of(&facts(UPDATE, ("s3.services.k8s.aws", "buckets", ""), Some(&old), Some(&new)));
            assert_eq!(derived(&e).len(), 1, "{key}: {other:?}");
            let e = of(&facts(UPDATE, ("s3.services.k8s.aws", "buckets", ""), Some(&new), Some(&old)));
            assert!(derived(&e).is_empty(), "{key}: protecting is not destroying");
        }

        let xp = |spec: Value| json!({"kind": "Instance", "metadata": {"name": "x"}, "spec": spec});
        let orphan = xp(json!({"deletionPolicy": "Orphan"}));
        let delete = xp(json!({"deletionPolicy": "Delete"}));
        let observe = xp(json!({"managementPolicies": ["Observe"]}));
        let all = xp(json!({"managementPolicies": ["*"]}));
        let rds = ("rds.aws.upbound.io", "instances", "");
        assert_eq!(derived(&of(&facts(UPDATE, rds, Some(&orphan), Some(&delete)))).len(), 1);
        assert_eq!(derived(&of(&facts(UPDATE, rds, Some(&observe), Some(&all)))).len(), 1);
        assert!(derived(&of(&facts(UPDATE, rds, Some(&delete), Some(&orphan)))).is_empty());
    }

    #[test]
    fn controllers_that_delete_on_an_update_are_the_deletes_they_make() {
        let obj = |kind: &str, spec: Value| json!({"kind": kind, "metadata": {"name": "x"}, "spec": spec});
        let case = |gr: (&'static str, &'static str), old: Value, new: Value| {
            let e = of(&facts(UPDATE, (gr.0, gr.1, ""), Some(&old), Some(&new)));
            let out: Vec<(String, String, bool, bool)> = e[1..]
                .iter()
                .map(|e| (e.facts.resource.to_owned(), e.facts.name.to_owned(), e.any_name, e.any_namespace))
                .collect();
            out
        };
        let this = |r: &str| vec![(r.to_owned(), "x".to_owned(), false, false)];
        let any = |r: &str, anywhere: bool| vec![(r.to_owned(), String::new(), true, anywhere)];

        // A Job's TTL set or shortened: the TTL controller deletes it. Lengthened: not.
        let job =
            |ttl: Option<i64>| obj("Job", ttl.map_or(json!({}), |t| json!({"ttlSecondsAfterFinished": t})));
        assert_eq!(case(("batch", "jobs"), job(None), job(Some(0))), this("jobs"));
        assert_eq!(case(("batch", "jobs"), job(Some(3600)), job(Some(60))), this("jobs"));
        assert!(case(("batch", "jobs"), job(Some(60)), job(Some(3600))).is_empty());
        // History limits lowered: the controllers delete Jobs and ReplicaSets over them.
        let cron = |n: i64| obj("CronJob", json!({"successfulJobsHistoryLimit": n}));
        assert_eq!(case(("batch", "cronjobs"), cron(3), cron(0)), any("jobs", false));
        assert!(case(("batch", "cronjobs"), cron(0), cron(3)).is_empty());
        let deploy =
            |n: Option<i64>| obj("Deployment", n.map_or(json!({}), |n| json!({"revisionHistoryLimit": n})));
        assert_eq!(case(("apps", "deployments"), deploy(None), deploy(Some(0))), any("replicasets", false));
        assert!(case(("apps", "deployments"), deploy(Some(2)), deploy(None)).is_empty());
        // A StatefulSet whose whenScaled retention is Delete, scaled down: its volumes go.
        let sts = |replicas: i64| {
            obj(
                "StatefulSet",
                json!({"replicas": replicas, "persistentVolumeClaimRetentionPolicy": {"whenScaled": "Delete"}}),
            )
        };
        let claims_and_volumes =
            [any("persistentvolumeclaims", false), any("persistentvolumes", false)].concat();
        assert_eq!(case(("apps", "statefulsets"), sts(3), sts(1)), claims_and_volumes);
        assert!(case(("apps", "statefulsets"), sts(1), sts(3)).is_empty());
        let scale = |n: i64| json!({"kind": "Scale", "metadata": {"name": "x"}, "spec": {"replicas": n}});
        let (three, one) = (scale(3), scale(1));
        let e = of(&facts(UPDATE, ("apps", "statefulsets", "scale"), Some(&three), Some(&one)));
        assert_eq!(
            derived(&e),
            [
                (Operation::Delete, "persistentvolumeclaims/".into(), String::new()),
                (Operation::Delete, "persistentvolumes/".into(), String::new())
            ]
        );
        assert!(
            derived(&of(&facts(UPDATE, ("apps", "statefulsets", "scale"), Some(&scale(1)), Some(&scale(3)))))
                .is_empty()
        );
        // A NoExecute taint added to a Node: its pods, in any namespace. NoSchedule: nothing.
        let node = |effect: Option<&str>| {
            obj("Node", json!({"taints": effect.map_or(json!([]), |e| json!([{"key": "k", "effect": e}]))}))
        };
        assert_eq!(case(("", "nodes"), node(None), node(Some("NoExecute"))), any("pods", true));
        assert!(case(("", "nodes"), node(None), node(Some("NoSchedule"))).is_empty());
        assert!(case(("", "nodes"), node(Some("NoExecute")), node(None)).is_empty());
        // A load balancer released.
        let svc = |t: &str| obj("Service", json!({"type": t}));
        assert_eq!(case(("", "services"), svc("LoadBalancer"), svc("ClusterIP")), this("services"));
        assert!(case(("", "services"), svc("ClusterIP"), svc("LoadBalancer")).is_empty());
        // GitOps pruning turned on, or a pruning source moved.
        let app = |prune: bool, path: &str| {
            obj(
                "Application",
                json!({"source": {"path": path}, "syncPolicy": {"automated": {"prune": prune}}}),
            )
        };
        assert_eq!(
            case(("argoproj.io", "applications"), app(false, "a"), app(true, "a")),
            this("applications")
        );
        assert_eq!(
            case(("argoproj.io", "applications"), app(true, "a"), app(true, "b")),
            this("applications")
        );
        assert!(case(("argoproj.io", "applications"), app(true, "a"), app(false, "b")).is_empty());
        let ks = |prune: bool, path: &str| obj("Kustomization", json!({"prune": prune, "path": path}));
        let flux = ("kustomize.toolkit.fluxcd.io", "kustomizations");
        assert_eq!(case(flux, ks(true, "./a"), ks(true, "./b")), this("kustomizations"));
        assert!(case(flux, ks(false, "./a"), ks(false, "./b")).is_empty());
    }

    fn dependent(resource: &str, name: &str, uid: &str, controller: Option<&str>) -> Collateral {
        let mut meta = json!({"name": name, "namespace": "prod", "uid": uid});
        if let Some(owner) = controller {
            meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs",
                "uid": owner, "controller": true}]);
        }
        Collateral {
            group: String::new(),
            resource: resource.into(),
            namespace: "prod".into(),
            name: name.into(),
            object: json!({"metadata": meta}),
            via: "in Namespace \"prod\"".into(),
            unseen: false,
        }
    }

    #[test]
    fn a_delete_is_bound_to_its_top_level_radius() {
        let state = [7; 32];
        let rs = Collateral { group: "apps".into(), ..dependent("replicasets", "rs", "rs1", None) };
        let radius = vec![
            rs.clone(),
            dependent("pods", "rs-a", "p1", Some("rs1")),
            dependent("configmaps", "cfg", "c1", None),
        ];
        let bound = delete_digest(&state, "ns1", &radius);
        assert_ne!(bound, state);
        // No collateral: the state alone, as before.
        assert_eq!(delete_digest(&state, "ns1", &[]), state);
        // A pod its ReplicaSet replaced: the same radius.
        let churned = vec![
            rs.clone(),
            dependent("pods", "rs-b", "p2", Some("rs1")),
            dependent("configmaps", "cfg", "c1", None),
        ];
        assert_eq!(delete_digest(&state, "ns1", &churned), bound);
        // An object added, or one replaced under the same name: another radius.
        let grown = [radius.clone(), vec![dependent("persistentvolumeclaims", "data", "v1", None)]].concat();
        assert_ne!(delete_digest(&state, "ns1", &grown), bound);
        let replaced = vec![
            rs,
            dependent("pods", "rs-a", "p1", Some("rs1")),
            dependent("configmaps", "cfg", "c2", None),
        ];
        assert_ne!(delete_digest(&state, "ns1", &replaced), bound);
        // What a human reads.
        let summary = radius_summary("ns1", &grown).unwrap();
        assert_eq!(
            summary,
            "1 configmaps (cfg), 1 persistentvolumeclaims (data), 1 pods, 1 replicasets.apps (rs)"
        );
        let unseen = Collateral {
            unseen: true,
            name: String::new(),
            object: Value::Null,
            ..dependent("secrets", "", "", None)
        };
        assert_eq!(radius_summary("ns1", &[unseen]).unwrap(), "any secrets (agentguard may not read them)");
        // A volume whose data goes with its claim says so.
        let volume =
            Collateral { namespace: String::new(), ..dependent("persistentvolumes", "pv-1", "v9", None) };
        assert_eq!(
            radius_summary("ns1", &[volume]).unwrap(),
            "1 persistentvolumes (pv-1) with all their data (reclaimPolicy Delete)"
        );
    }

    #[test]
    fn deleting_a_node_deletes_its_pods() {
        let node = json!({"kind": "Node", "metadata": {"name": "n1"}});
        let e = of(&facts(Operation::Delete, ("", "nodes", ""), Some(&node), None));
        assert_eq!(derived(&e), [(Operation::Delete, "pods/".into(), String::new())]);
        assert!(e[1].any_name && e[1].any_namespace);
    }

    #[test]
    fn an_ack_annotation_set_over_a_namespace_default_arms_the_delete() {
        // Unset, the Namespace's `s3.services.k8s.aws/deletion-policy: retain` or the
        // controller's default may keep the bucket: an explicit `delete` arms it.
        let bucket = |v: Option<&str>| {
            let mut o = json!({"kind": "Bucket", "metadata": {"name": "x", "annotations": {}}});
            if let Some(v) = v {
                o["metadata"]["annotations"]["services.k8s.aws/deletion-policy"] = json!(v);
            }
            o
        };
        let s3 = ("s3.services.k8s.aws", "buckets", "");
        let armed = |old: Option<&str>, new: Option<&str>| {
            let (old, new) = (bucket(old), bucket(new));
            derived(&of(&facts(UPDATE, s3, Some(&old), Some(&new)))).len() == 1
        };
        assert!(armed(None, Some("delete")));
        assert!(armed(Some("retain"), Some("DELETE")));
        assert!(armed(Some("retain"), None));
        assert!(!armed(Some("delete"), None), "back to the default keeps at least as much");
        assert!(!armed(Some("delete"), Some("Delete")));
        assert!(!armed(None, Some("retain")));
        assert!(!armed(None, None));
    }

    #[test]
    fn crossplane_policies_arm_the_delete_as_crossplane_runtime_decides() {
        let mr = |spec: Value| json!({"kind": "Bucket", "metadata": {"name": "x"}, "spec": spec});
        let s3 = ("s3.aws.upbound.io", "buckets", "");
        let armed = |old: Value, new: Value| {
            let (old, new) = (mr(old), mr(new));
            derived(&of(&facts(UPDATE, s3, Some(&old), Some(&new)))).len() == 1
        };
        let all = json!(["*"]);
        // Orphan with non-default policies that hold Delete deletes: the deletionPolicy is
        // ignored when the management policies are not the default.
        assert!(armed(
            json!({"deletionPolicy": "Orphan", "managementPolicies": all}),
            json!({"deletionPolicy": "Orphan", "managementPolicies": ["Observe", "Delete"]}),
        ));
        assert!(armed(
            json!({"deletionPolicy": "Orphan", "managementPolicies": all}),
            json!({"deletionPolicy": "Orphan", "managementPolicies": ["Observe", "Create", "Update", "LateInitialize", "Delete"]}),
        ));
        assert!(armed(
            json!({"deletionPolicy": "Orphan", "managementPolicies": all}),
            json!({"deletionPolicy": "Delete", "managementPolicies": all}),
        ));
        assert!(armed(
            json!({"deletionPolicy": "Delete", "managementPolicies": ["Observe", "Create", "Update", "LateInitialize"]}),
            json!({"deletionPolicy": "Delete", "managementPolicies": all}),
        ));
        // Unpausing (no policies) a resource whose deletionPolicy deletes.
        assert!(armed(
            json!({"deletionPolicy": "Delete", "managementPolicies": []}),
            json!({"deletionPolicy": "Delete", "managementPolicies": all}),
        ));
        // Kept before and after: Orphan with the default policies, or policies without Delete.
        assert!(!armed(
            json!({"deletionPolicy": "Orphan", "managementPolicies": all}),
            json!({"deletionPolicy": "Orphan", "managementPolicies": ["Observe"]}),
        ));
        assert!(!armed(
            json!({"deletionPolicy": "Orphan", "managementPolicies": ["Observe"]}),
            json!({"deletionPolicy": "Delete", "managementPolicies": ["Observe"]}),
        ));
        // Namespaced (Crossplane v2) managed resources have managementPolicies only.
        assert!(armed(json!({"managementPolicies": ["Observe"]}), json!({"managementPolicies": all})));
        assert!(!armed(
            json!({"managementPolicies": all}),
            json!({"managementPolicies": all, "forProvider": {}})
        ));
        // Protecting is not destroying.
        assert!(!armed(
            json!({"deletionPolicy": "Delete", "managementPolicies": all}),
            json!({"deletionPolicy": "Orphan", "managementPolicies": all}),
        ));
    }

    #[test]
    fn collateral_objects_are_deletes_of_their_own() {
        let dependent = Collateral {
            group: "apps".into(),
            resource: "deployments".into(),
            namespace: "prod".into(),
            name: "db".into(),
            object: json!({"metadata": {"name": "db", "labels": {"tier": "data"}}}),
            via: "in Namespace \"prod\"".into(),
            unseen: false,
        };
        let collateral = [dependent];
        let old = json!({"kind": "Namespace", "metadata": {"name": "prod"}});
        let f = Facts {
            collateral: &collateral,
            ..facts(Operation::Delete, ("", "namespaces", ""), Some(&old), None)
        };
        let e = of(&f);
        assert_eq!(derived(&e), [(Operation::Delete, "deployments/".into(), "db".into())]);
        assert_eq!(e[1].via.as_deref(), Some("in Namespace \"prod\""));
    }
}
