use super::*;
use crate::engine::policy::PolicyId;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};

fn settings() -> Settings {
    Settings {
        namespace: "agentguard-system".into(),
        max_object_bytes: 4096,
        keep_secret_data: false,
        retention: Duration::from_secs(3600),
        max_records: 3,
    }
}

fn request(
    operation: &str,
    kind: &str,
    group: &str,
    resource: &str,
    old: Value,
    dry_run: bool,
) -> AdmissionRequest {
    serde_json::from_value(json!({
        "uid": "0a1b2c3d-0000-4000-8000-000000000001",
        "kind": {"group": group, "version": "v1", "kind": kind},
        "resource": {"group": group, "version": "v1", "resource": resource},
        "name": "web",
        "namespace": "demo",
        "operation": operation,
        "userInfo": {"username": "system:serviceaccount:agents:coder"},
        "object": if operation == "UPDATE" { json!({"metadata": {"name": "web"}, "spec": {"replicas": 0}}) } else { Value::Null },
        "oldObject": old,
        "dryRun": dry_run
    }))
    .unwrap()
}

fn deployment() -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": "web", "namespace": "demo", "uid": "u-1", "resourceVersion": "41",
                        "managedFields": [{"manager": "kubectl"}]},
           "spec": {"replicas": 3}})
}

fn approved() -> Decision {
    Decision::allow(Allowed::Approved {
        policy: PolicyId { namespace: None, name: "fail-safe".into() },
        rule: "every-delete".into(),
        approvals: vec!["delete".into()],
        approvers: Vec::new(),
        expires: "2026-11-27T13:00:00Z".parse().unwrap(),
    })
}

fn now() -> Timestamp {
    "2026-11-27T12:00:00Z".parse().unwrap()
}

#[test]
fn an_approved_delete_is_recorded_with_the_object_it_removes() {
    let req = request("DELETE", "Deployment", "apps", "deployments", deployment(), false);
    let record = record_for(&req, &approved(), &settings(), now()).expect("recorded");
    let name = record.metadata.name.clone().unwrap();
    assert!(name.starts_with("delete-") && name.len() == "delete-".len() + 16, "{name}");
    // Items of one deletecollection share the request uid, never a record.
    let mut other = deployment();
    other["metadata"]["name"] = json!("api");
    other["metadata"]["uid"] = json!("u-2");
    let sibling = record_for(
        &request("DELETE", "Deployment", "apps", "deployments", other, false),
        &approved(),
        &settings(),
        now(),
    );
    assert_ne!(sibling.unwrap().metadata.name.unwrap(), name);
    assert_eq!(record.metadata.namespace.as_deref(), Some("agentguard-system"));
    assert_eq!(record.metadata.labels.as_ref().unwrap()[OUTCOME_LABEL], "pending");
    let spec = &record.spec;
    assert_eq!(spec.requester, "system:serviceaccount:agents:coder");
    assert_eq!((spec.admission.as_str(), spec.approval.as_deref()), ("approved", Some("delete")));
    assert_eq!(spec.policy, "ClusterAgentPolicy \"fail-safe\", rule \"every-delete\"");
    assert_eq!(spec.target.api_version, "apps/v1");
    assert_eq!((spec.target.uid.as_str(), spec.target.resource_version.as_str()), ("u-1", "41"));
    let prior = spec.prior.as_ref().unwrap();
    assert_eq!(prior["spec"]["replicas"], 3);
    assert!(prior["metadata"].get("managedFields").is_none(), "bookkeeping is not kept");
    assert_eq!(spec.prior_omitted, None);
}

#[test]
fn an_update_records_its_change() {
    let req = request("UPDATE", "Deployment", "apps", "deployments", deployment(), false);
    let allowed = Decision::allow(Allowed::ByPolicy {
        policy: PolicyId { namespace: Some("team".into()), name: "scaling".into() },
        rule: "r".into(),
    });
    let record = record_for(&req, &allowed, &settings(), now()).unwrap();
    assert_eq!(record.spec.admission, "allowed");
    assert!(
        record.spec.change.as_deref().unwrap().contains("spec.replicas: 3 → 0"),
        "{:?}",
        record.spec.change
    );
}

#[test]
fn only_real_policy_admitted_changes_are_recorded() {
    let req = request("DELETE", "Deployment", "apps", "deployments", deployment(), false);
    for why in [Allowed::NotAgent, Allowed::Unmatched, Allowed::NoChange, Allowed::ApprovalAccepted] {
        assert!(record_for(&req, &Decision::allow(why), &settings(), now()).is_none());
    }
    let dry = request("DELETE", "Deployment", "apps", "deployments", deployment(), true);
    assert!(record_for(&dry, &approved(), &settings(), now()).is_none(), "a dry run leaves no trace");
}

#[test]
fn secrets_and_large_objects_are_recorded_without_what_must_not_be_kept() {
    let secret =
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "web"}, "data": {"k": "c2VjcmV0"}});
    let req = request("DELETE", "Secret", "", "secrets", secret, false);
    let record = record_for(&req, &approved(), &settings(), now()).unwrap();
    assert!(record.spec.prior.as_ref().unwrap().get("data").is_none());
    assert_eq!(record.spec.prior_omitted.as_deref(), Some("Secret data is not recorded"));
    let kept = Settings { keep_secret_data: true, ..settings() };
    assert_eq!(
        record_for(&req, &approved(), &kept, now()).unwrap().spec.prior.unwrap()["data"]["k"],
        "c2VjcmV0"
    );

    let big = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "web"}, "data": {"k": "x".repeat(5000)}});
    let req = request("DELETE", "ConfigMap", "", "configmaps", big, false);
    let record = record_for(&req, &approved(), &settings(), now()).unwrap();
    assert!(record.spec.prior.is_none());
    assert!(record.spec.prior_omitted.unwrap().contains("over the 4096-byte limit"));
}

#[test]
fn a_check_tells_changes_that_happened_from_ones_refused_later() {
    let req = request("DELETE", "Deployment", "apps", "deployments", deployment(), false);
    let delete = record_for(&req, &approved(), &settings(), now()).unwrap().spec;
    let meta = |uid: &str, rv: &str, deleting: bool| ObjectMeta {
        uid: Some(uid.into()),
        resource_version: Some(rv.into()),
        deletion_timestamp: deleting.then(|| Time(now())),
        ..Default::default()
    };
    assert_eq!(outcome(&delete, None).0, "Happened");
    assert_eq!(outcome(&delete, Some(&meta("u-1", "41", true))).0, "Happened");
    assert_eq!(outcome(&delete, Some(&meta("u-1", "41", false))).0, "NeverHappened");
    // Deleted and re-created under the same name: a new object, the delete happened.
    assert_eq!(outcome(&delete, Some(&meta("u-2", "50", false))).0, "Happened");
    let update = AgentChangeSpec { operation: "UPDATE".into(), ..delete };
    assert_eq!(outcome(&update, Some(&meta("u-1", "41", false))).0, "NeverHappened");
    assert_eq!(outcome(&update, Some(&meta("u-1", "42", false))).0, "Happened");
}

#[test]
fn the_approver_is_who_stored_this_very_approval() {
    let event = |note: &str, at: &str| Event {
        reason: Some("ApprovalRecorded".into()),
        reporting_controller: Some("agentguard".into()),
        note: Some(note.into()),
        event_time: Some(MicroTime(at.parse().unwrap())),
        ..Default::default()
    };
    let events = [
        event("bob approved \"delete.AAAA\"", "2026-11-27T11:00:00Z"),
        event("alice approved \"delete.BBBB\"", "2026-11-27T11:30:00Z"),
        // Written after the change: the Event waits until the approval is seen stored.
        event("carol approved \"delete.CCCC\"", "2026-11-27T12:30:00Z"),
    ];
    assert_eq!(approver(&events, "delete.BBBB").as_deref(), Some("alice"));
    assert_eq!(approver(&events, "delete.CCCC").as_deref(), Some("carol"));
    assert_eq!(approver(&events, "delete.DDDD"), None);
    assert_eq!(approver(&events[..0], "delete.AAAA"), None);
}

#[test]
fn a_record_is_written_only_for_the_live_object() {
    let target = ChangeTarget {
        api_version: "apps/v1".into(),
        kind: "Deployment".into(),
        resource: "deployments".into(),
        group: "apps".into(),
        subresource: String::new(),
        namespace: "prod".into(),
        name: "web".into(),
        uid: "u-1".into(),
        resource_version: "41".into(),
    };
    let object = |uid: &str, rv: &str, image: &str| {
        serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "prod", "uid": uid, "resourceVersion": rv,
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"template": {"spec": {"containers": [{"name": "web", "image": image}]}}},
            "status": {"replicas": 1}})
    };
    let prior = object("u-1", "41", "nginx:1.27");
    let mut live = object("u-1", "41", "nginx:1.27");
    live["status"]["replicas"] = serde_json::json!(2);
    live["metadata"]["managedFields"] = serde_json::json!([]);
    assert_eq!(matches_live(&target, Some(&prior), Some(&live)), Ok(()));
    assert!(matches_live(&target, Some(&prior), None).unwrap_err().contains("does not exist"));
    let other = object("u-2", "41", "nginx:1.27");
    assert!(matches_live(&target, Some(&prior), Some(&other)).unwrap_err().contains("another object"));
    let later = object("u-1", "42", "nginx:1.27");
    assert!(matches_live(&target, Some(&prior), Some(&later)).unwrap_err().contains("resourceVersion 42"));
    // Same uid and resourceVersion, other contents: a forged prior object.
    let forged = object("u-1", "41", "evil:latest");
    assert!(matches_live(&target, Some(&forged), Some(&live)).unwrap_err().contains("other contents"));
    let live = Some(&live);
    let no_uid = ChangeTarget { uid: String::new(), ..target };
    assert!(matches_live(&no_uid, Some(&prior), live).is_err());
}

#[test]
fn retention_drops_old_records_and_keeps_the_newest_few() {
    let record = |name: &str, at: &str| ObjectMeta {
        name: Some(name.into()),
        creation_timestamp: Some(Time(at.parse().unwrap())),
        ..Default::default()
    };
    let records = [
        record("a", "2026-11-27T10:00:00Z"), // older than the hour of retention
        record("b", "2026-11-27T11:10:00Z"),
        record("c", "2026-11-27T11:20:00Z"),
        record("d", "2026-11-27T11:30:00Z"),
        record("e", "2026-11-27T11:40:00Z"),
    ];
    let mut gone = expired(&records, now(), Duration::from_secs(3600), 3);
    gone.sort();
    assert_eq!(gone, ["a", "b"]);
}

#[test]
fn a_namespace_is_recorded_as_the_cluster_scoped_object_it_is() {
    // The API server sends a Namespace's requests with `namespace` set to its own name.
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo", "uid": "n1"}});
    let mut req = request("DELETE", "Namespace", "", "namespaces", ns, false);
    req.name = Some("demo".into());
    let record = record_for(&req, &approved(), &settings(), now()).unwrap();
    assert_eq!(record.spec.target.namespace, "", "{:?}", record.spec.target);
    assert_eq!(record.spec.target.name, "demo");
    let deployment = request("DELETE", "Deployment", "apps", "deployments", deployment(), false);
    assert_eq!(
        record_for(&deployment, &approved(), &settings(), now()).unwrap().spec.target.namespace,
        "demo"
    );
}

#[test]
fn the_record_says_which_pod_and_credential_made_the_change() {
    let mut req = request("DELETE", "Deployment", "apps", "deployments", deployment(), false);
    let record = record_for(&req, &approved(), &settings(), now()).unwrap();
    assert_eq!(record.spec.attribution, None, "no extra, no attribution");
    req.user_info.extra = [
        (crate::engine::admission::POD_NAME_EXTRA.to_owned(), vec!["coder-7d9f".to_owned()]),
        (crate::engine::admission::NODE_NAME_EXTRA.to_owned(), vec!["node-1".to_owned()]),
        (crate::engine::admission::CREDENTIAL_ID_EXTRA.to_owned(), vec!["JTI=0f3e".to_owned()]),
    ]
    .into();
    let record = record_for(&req, &approved(), &settings(), now()).unwrap();
    let a = record.spec.attribution.clone().expect("attributed");
    assert_eq!(
        (a.pod_name.as_deref(), a.pod_uid.as_deref(), a.node_name.as_deref(), a.credential_id.as_deref()),
        (Some("coder-7d9f"), None, Some("node-1"), Some("JTI=0f3e"))
    );
    // As stored: camelCase fields, absent ones left out.
    let stored = serde_json::to_value(&record.spec).unwrap();
    assert_eq!(
        stored["attribution"],
        json!({"podName": "coder-7d9f", "nodeName": "node-1", "credentialId": "JTI=0f3e"})
    );
}

#[test]
fn retention_reads_names_and_ages_from_a_metadata_page() {
    // A page as the API server sends it (PartialObjectMetadataList), managedFields and all.
    let page: AgePage = serde_json::from_value(json!({
        "kind": "PartialObjectMetadataList",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": "14467", "continue": "eyJ2IjoibWV0YS5rOHMuaW8vdjEifQ"},
        "items": [
            {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": {
                    "name": "delete-001601aabe31f65e",
                    "namespace": "agentguard-system",
                    "creationTimestamp": "2026-11-30T18:17:24Z",
                    "labels": {"agentguard.io/outcome": "happened"},
                    "managedFields": [{"fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:prior": {".": {}}}}}]
                }
            },
            {"metadata": {"name": "no-age"}}
        ]
    }))
    .expect("a metadata page");
    assert_eq!(page.metadata.continue_.as_deref(), Some("eyJ2IjoibWV0YS5rOHMuaW8vdjEifQ"));
    let first = &page.items[0].metadata;
    assert_eq!(first.name.as_deref(), Some("delete-001601aabe31f65e"));
    assert_eq!(
        first.creation_timestamp.as_ref().map(|t| t.0.to_string()).as_deref(),
        Some("2026-11-30T18:17:24Z")
    );
    assert!(page.items[1].metadata.creation_timestamp.is_none());
    // The last page has no continue token.
    let last: AgePage = serde_json::from_value(json!({"metadata": {}, "items": []})).expect("an empty page");
    assert!(last.metadata.continue_.is_none() && last.items.is_empty());
}
