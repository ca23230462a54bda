//! `agentguard restore RECORD`: brings back the object an agent's recorded change removed or
//! altered — re-created after a DELETE, rolled back after an UPDATE — and says plainly what it
//! cannot bring back. It runs with the caller's credentials, so it can do only what they may.

use anyhow::{Context, Result, bail};
use clap::Args;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use serde_json::Value;

use crate::engine::api::{APPROVE_ANNOTATION, AgentChange};
use crate::engine::diff::Change;

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Name of the AgentChange record (`kubectl get agentchanges -n NAMESPACE`).
    pub record: String,
    /// agentguard's namespace, where the records are.
    #[arg(long, short = 'n', env = "AGENTGUARD_SELF_NAMESPACE", default_value = "agentguard-system")]
    pub namespace: String,
    /// Ask the API server to check the restore without making it.
    #[arg(long)]
    pub dry_run: bool,
}

/// What a restore will write, and what the operator must know it does not cover.
#[derive(Debug, PartialEq)]
pub enum Plan {
    /// Re-create the deleted object.
    Create { object: Value, notes: Vec<String> },
    /// Put the prior state back over the current object.
    Rollback { object: Value, subresource: String, notes: Vec<String> },
}

/// Server-assigned and lifecycle fields a re-created object must not carry.
const SERVER_FIELDS: [&str; 7] = [
    "uid",
    "resourceVersion",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "selfLink",
];

/// Plans the restore of `record` given the object that now has its name (for an UPDATE).
pub fn plan(record: &AgentChange, current: Option<&Value>) -> Result<Plan> {
    let spec = &record.spec;
    let target = &spec.target;
    let status = record.status.as_ref();
    if status.is_some_and(|s| s.outcome == "NeverHappened") {
        bail!(
            "nothing to restore: the change never happened ({})",
            status.and_then(|s| s.message.as_deref()).unwrap_or("a later admission step refused it")
        );
    }
    let Some(mut object) = spec.prior.clone() else {
        bail!(
            "cannot restore: the record holds no prior object ({})",
            spec.prior_omitted.as_deref().unwrap_or("not recorded")
        );
    };
    if let Some(why) = spec.prior_omitted.as_deref() {
        bail!("cannot restore: the prior object is incomplete ({why}); restore it from its source");
    }
    let mut notes = Vec::new();
    match spec.operation.as_str() {
        "DELETE" => {
            let meta = object
                .get_mut("metadata")
                .and_then(Value::as_object_mut)
                .context("the prior object has no metadata")?;
            for field in SERVER_FIELDS {
                meta.remove(field);
            }
            // A spent approval: writing it would need an approver, and it approves nothing now.
            if let Some(a) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
                a.remove(APPROVE_ANNOTATION);
            }
            if meta.remove("ownerReferences").is_some() {
                notes.push(
                    "it had owners: it comes back without ownerReferences, so the garbage collector leaves it alone; \
                     re-adopt it if its owner still exists"
                        .into(),
                );
            }
            if let Some(o) = object.as_object_mut() {
                o.remove("status");
            }
            notes.push(if target.kind == "Namespace" && target.group.is_empty() {
                "only the Namespace is restored: everything in it was deleted with it; restore those from their own records or sources".into()
            } else {
                "objects deleted with it (garbage-collected children such as ReplicaSets and Pods, a PVC's volume data) are not restored; controllers re-create what they own".into()
            });
            Ok(Plan::Create { object, notes })
        }
        "UPDATE" => {
            let current = current
                .context("the object no longer exists: restore its deletion from that record instead")?;
            let meta = |v: &Value, f: &str| {
                v.pointer(&format!("/metadata/{f}")).and_then(Value::as_str).map(str::to_owned)
            };
            if !target.uid.is_empty() && meta(current, "uid").as_deref() != Some(target.uid.as_str()) {
                bail!("a different object now has this name (uid changed): not rolling it back");
            }
            // The approval annotation stays as it is now: restoring an old one would be a new
            // approval, which only an approver may write.
            let current_approval =
                current.pointer(&format!("/metadata/annotations/{}", APPROVE_ANNOTATION.replace('/', "~1")));
            if let Some(m) = object.get_mut("metadata").and_then(Value::as_object_mut) {
                let annotations = m.entry("annotations").or_insert_with(|| serde_json::json!({}));
                if let Some(a) = annotations.as_object_mut() {
                    match current_approval {
                        Some(v) => a.insert(APPROVE_ANNOTATION.into(), v.clone()),
                        None => a.remove(APPROVE_ANNOTATION),
                    };
                }
            }
            let change = Change::between(current, &object);
            if change.is_empty() {
                bail!("nothing to restore: the object is already as it was before the change");
            }
            if meta(current, "resourceVersion").is_some_and(|rv| rv != target.resource_version) {
                notes.push(format!(
                    "this rolls back every change since the record, not only the agent's: {change}"
                ));
            }
            // Optimistic: if anyone writes in between, the API server refuses the rollback.
            if let Some(m) = object.get_mut("metadata").and_then(Value::as_object_mut) {
                m.insert("resourceVersion".into(), current["metadata"]["resourceVersion"].clone());
                m.remove("managedFields");
            }
            Ok(Plan::Rollback { object, subresource: target.subresource.clone(), notes })
        }
        other => bail!("cannot restore a {other} record"),
    }
}

fn resource(record: &AgentChange) -> ApiResource {
    let target = &record.spec.target;
    let (group, version) = match target.api_version.split_once('/') {
        Some((g, v)) => (g.to_owned(), v.to_owned()),
        None => (String::new(), target.api_version.clone()),
    };
    ApiResource {
        group,
        version,
        api_version: target.api_version.clone(),
        kind: target.kind.clone(),
        plural: target.resource.clone(),
    }
}

pub async fn run(args: &RestoreArgs) -> Result<()> {
    let client = kube::Client::try_default().await.context("building the Kubernetes client")?;
    let records: Api<AgentChange> = Api::namespaced(client.clone(), &args.namespace);
    let record = records
        .get(&args.record)
        .await
        .with_context(|| format!("reading AgentChange {}/{}", args.namespace, args.record))?;
    let target = &record.spec.target;
    let api: Api<DynamicObject> = if target.namespace.is_empty() {
        Api::all_with(client, &resource(&record))
    } else {
        Api::namespaced_with(client, &target.namespace, &resource(&record))
    };
    let current = match (record.spec.operation.as_str(), target.subresource.as_str()) {
        ("UPDATE", "") => api.get_opt(&target.name).await?.map(serde_json::to_value).transpose()?,
        ("UPDATE", sub) => Some(serde_json::to_value(api.get_subresource(sub, &target.name).await?)?),
        _ => None,
    };
    let params = PostParams { dry_run: args.dry_run, ..Default::default() };
    let what = match target.namespace.as_str() {
        "" => format!("{} {}", target.kind, target.name),
        ns => format!("{} {ns}/{}", target.kind, target.name),
    };
    let suffix = if args.dry_run { " (server dry run: nothing written)" } else { "" };
    let notes = match plan(&record, current.as_ref())? {
        Plan::Create { object, notes } => {
            let object: DynamicObject = serde_json::from_value(object)?;
            api.create(&params, &object).await.with_context(|| format!("re-creating {what}"))?;
            println!("restored {what}: re-created as it was before {}{suffix}", args.record);
            notes
        }
        Plan::Rollback { object, subresource, notes } => {
            if subresource.is_empty() {
                let object: DynamicObject = serde_json::from_value(object)?;
                api.replace(&target.name, &params, &object)
                    .await
                    .with_context(|| format!("rolling back {what}"))?;
            } else {
                api.replace_subresource(&subresource, &target.name, &params, &object)
                    .await
                    .with_context(|| format!("rolling back {what} ({subresource})"))?;
            }
            println!("restored {what}: rolled back to its state before {}{suffix}", args.record);
            notes
        }
    };
    for note in notes {
        println!("note: {note}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::api::{AgentChangeSpec, AgentChangeStatus, ChangeTarget};
    use serde_json::json;

    fn record(operation: &str, prior: Value) -> AgentChange {
        AgentChange::new(
            "delete-1",
            AgentChangeSpec {
                requester: "system:serviceaccount:agents:coder".into(),
                operation: operation.into(),
                target: ChangeTarget {
                    api_version: "apps/v1".into(),
                    kind: "Deployment".into(),
                    resource: "deployments".into(),
                    group: "apps".into(),
                    namespace: "demo".into(),
                    name: "web".into(),
                    uid: "u-1".into(),
                    resource_version: "41".into(),
                    ..Default::default()
                },
                policy: "p".into(),
                admission: "approved".into(),
                approval: None,
                approvals: Vec::new(),
                session: None,
                change: None,
                time: "2026-11-27T12:00:00Z".into(),
                prior: Some(prior),
                prior_omitted: None,
                attribution: None,
            },
        )
    }

    fn web(replicas: i64, rv: &str) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "web", "namespace": "demo", "uid": "u-1", "resourceVersion": rv,
                            "annotations": {APPROVE_ANNOTATION: format!("update:{rv}")},
                            "creationTimestamp": "2026-11-01T00:00:00Z",
                            "ownerReferences": [{"kind": "Thing", "name": "x", "uid": "o", "apiVersion": "v1"}]},
               "spec": {"replicas": replicas}, "status": {"readyReplicas": replicas}})
    }

    #[test]
    fn a_delete_is_undone_by_re_creating_without_server_fields() {
        let Plan::Create { object, notes } = plan(&record("DELETE", web(3, "41")), None).unwrap() else {
            panic!()
        };
        assert_eq!(object["spec"]["replicas"], 3);
        for field in ["uid", "resourceVersion", "creationTimestamp", "ownerReferences"] {
            assert!(object["metadata"].get(field).is_none(), "{field} kept");
        }
        assert!(object.get("status").is_none());
        assert!(
            object["metadata"]["annotations"].get(APPROVE_ANNOTATION).is_none(),
            "a spent approval is not restored"
        );
        assert!(notes.iter().any(|n| n.contains("without ownerReferences")));
        assert!(notes.iter().any(|n| n.contains("garbage-collected children")));
    }

    #[test]
    fn an_update_is_rolled_back_over_the_current_version() {
        let current = web(0, "42");
        let Plan::Rollback { object, notes, .. } =
            plan(&record("UPDATE", web(3, "41")), Some(&current)).unwrap()
        else {
            panic!()
        };
        assert_eq!(object["spec"]["replicas"], 3);
        assert_eq!(object["metadata"]["resourceVersion"], "42", "an optimistic write over what is there now");
        assert_eq!(
            object["metadata"]["annotations"][APPROVE_ANNOTATION], "update:42",
            "the approval is left as it is"
        );
        assert!(notes[0].contains("spec.replicas: 0 → 3"), "{notes:?}");
        let err = plan(&record("UPDATE", web(3, "41")), Some(&web(3, "41"))).unwrap_err();
        assert!(err.to_string().contains("already as it was"));
        let mut other = web(0, "42");
        other["metadata"]["uid"] = json!("u-2");
        assert!(
            plan(&record("UPDATE", web(3, "41")), Some(&other))
                .unwrap_err()
                .to_string()
                .contains("different object")
        );
        assert!(plan(&record("UPDATE", web(3, "41")), None).is_err());
    }

    #[test]
    fn it_says_what_it_cannot_restore() {
        let mut never = record("DELETE", web(3, "41"));
        never.status = Some(AgentChangeStatus { outcome: "NeverHappened".into(), ..Default::default() });
        assert!(
            plan(&never, None)
                .unwrap_err()
                .to_string()
                .starts_with("nothing to restore: the change never happened")
        );
        let mut big = record("DELETE", web(3, "41"));
        big.spec.prior = None;
        big.spec.prior_omitted = Some("the object is 300000 bytes, over the 262144-byte limit".into());
        assert!(plan(&big, None).unwrap_err().to_string().contains("over the 262144-byte limit"));
        let mut secret = record("DELETE", json!({"metadata": {"name": "s"}}));
        secret.spec.prior_omitted = Some("Secret data is not recorded".into());
        assert!(plan(&secret, None).unwrap_err().to_string().contains("Secret data is not recorded"));
    }
}
