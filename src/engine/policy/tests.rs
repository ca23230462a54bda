//! Decision tables for the engine and the approval protocol.

use serde_json::{Value, json};

use super::identity::StaticDirectory;
use super::*;
use crate::engine::api::{AGENT_NAMESPACE_LABEL, APPROVE_ANNOTATION};

const NOW: &str = "2026-11-26T12:00:00Z";

fn now() -> Timestamp {
    NOW.parse().unwrap()
}

fn cluster_policy(name: &str, spec: Value) -> ClusterAgentPolicy {
    serde_json::from_value(json!({
        "apiVersion": "agentguard.io/v1alpha1", "kind": "ClusterAgentPolicy",
        "metadata": {"name": name}, "spec": spec
    }))
    .unwrap()
}

fn agent_policy(ns: &str, name: &str, spec: Value) -> AgentPolicy {
    serde_json::from_value(json!({
        "apiVersion": "agentguard.io/v1alpha1", "kind": "AgentPolicy",
        "metadata": {"name": name, "namespace": ns}, "spec": spec
    }))
    .unwrap()
}

/// A policy on apps/deployments with the given action and mode.
fn deployments_policy(name: &str, action: &str, mode: &str) -> ClusterAgentPolicy {
    let mut spec = json!({
        "action": action, "mode": mode,
        "rules": [{"name": "workloads", "operations": ["DELETE", "UPDATE"],
                   "resources": [{"apiGroups": ["apps"], "resources": ["deployments"]}]}]
    });
    if action == "RequireApproval" {
        spec["approval"] =
            json!({"approvers": {"users": ["alice"], "groups": ["sre"]}, "ttl": "1h", "maxTtl": "24h"});
    }
    cluster_policy(name, spec)
}

fn set(cluster: Vec<ClusterAgentPolicy>, namespaced: Vec<AgentPolicy>) -> PolicySet {
    let (set, problems) = PolicySet::compile(&cluster, &namespaced);
    assert!(problems.is_empty(), "{problems:?}");
    set
}

fn directory() -> StaticDirectory {
    let mut dir = StaticDirectory::default();
    let l = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    dir.service_accounts.insert(("agents".into(), "coder".into()), l(&[("agentguard.io/agent", "true")]));
    dir.service_accounts.insert(("agents".into(), "ci".into()), l(&[]));
    dir.service_accounts.insert(("web".into(), "deployer".into()), l(&[("team", "web")]));
    dir.namespaces.insert("prod".into(), l(&[("env", "prod")]));
    dir.namespaces.insert("dev".into(), l(&[("env", "dev")]));
    dir.namespaces.insert("bots".into(), l(&[(AGENT_NAMESPACE_LABEL, "true")]));
    dir
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Who {
    LabelledAgent,
    AgentNamespace,
    AgentByUsername,
    UnlabelledServiceAccount,
    Human,
}

fn requester(who: Who) -> Requester {
    let (user, groups): (&str, &[&str]) = match who {
        Who::LabelledAgent => ("system:serviceaccount:agents:coder", &["system:serviceaccounts"]),
        Who::AgentNamespace => ("system:serviceaccount:bots:anything", &["system:serviceaccounts"]),
        Who::AgentByUsername => ("oidc:claude", &["oidc:users"]),
        Who::UnlabelledServiceAccount => ("system:serviceaccount:agents:ci", &["system:serviceaccounts"]),
        Who::Human => ("alice", &["sre"]),
    };
    let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
    Requester::resolve(user, &groups, &directory(), ("agentguard.io/agent", "true"))
}

fn config() -> Config {
    Config {
        agent_usernames: vec!["oidc:claude".into()],
        approval_keys: approval::Keys::fixed_for_tests(),
        ..Config::default()
    }
}

/// The ticket agentguard issues at `issued` for deleting `old`, or for changing it into `new`.
fn ticket(old: &Value, new: Option<&Value>, issued: &str) -> String {
    let (op, digest) = match new {
        None => (approval::Op::Delete, crate::engine::diff::state_digest(old)),
        Some(new) => (approval::Op::Update, Change::between(old, new).digest),
    };
    let uid = old["metadata"]["uid"].as_str().unwrap();
    let subject = approval::Subject { uid, op, digest: &digest };
    let keys = approval::Keys::fixed_for_tests();
    approval::Ticket::issue(&keys, &subject, issued.parse().unwrap(), SignedDuration::from_hours(1))
        .unwrap()
        .value()
}

fn deployment(replicas: i64) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "prod", "labels": {"app": "web"}, "uid": "u1",
                     "resourceVersion": "7", "generation": 2,
                     "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update",
                                        "time": "2026-11-26T09:00:00Z", "fieldsV1": {"f:spec": {}}}]},
        "spec": {"replicas": replicas}
    })
}

fn with_approval(mut obj: Value, value: &str, set_at: &str) -> Value {
    obj["metadata"]["annotations"] = json!({APPROVE_ANNOTATION: value});
    obj["metadata"]["managedFields"].as_array_mut().unwrap().push(json!({
        "manager": "kubectl-annotate", "operation": "Update", "time": set_at,
        "fieldsV1": {"f:metadata": {"f:annotations": {format!("f:{APPROVE_ANNOTATION}"): {}}}}
    }));
    obj
}

fn facts<'a>(operation: Operation, old: Option<&'a Value>, new: Option<&'a Value>) -> Facts<'a> {
    Facts {
        operation,
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

fn decide(policies: &PolicySet, who: Who, facts: &Facts<'_>) -> Decision {
    evaluate(facts, &requester(who), policies, &directory(), &config(), now())
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ApprovalState {
    None,
    Valid,
    Expired,
    /// An `update:` approval naming a different change (the object moved on since).
    Stale,
}

const OPERATIONS: [Operation; 4] = [
    Operation::Delete,
    Operation::Update { patch: Some(true) },
    Operation::Update { patch: Some(false) },
    Operation::Update { patch: None },
];
const WHO: [Who; 5] = [
    Who::LabelledAgent,
    Who::AgentNamespace,
    Who::AgentByUsername,
    Who::UnlabelledServiceAccount,
    Who::Human,
];

/// The whole table: operation × identity × action × mode × approval state.
#[test]
fn decision_table() {
    let mut rows = 0;
    for op in OPERATIONS {
        for who in WHO {
            for action in [None, Some("Deny"), Some("RequireApproval"), Some("Allow")] {
                for mode in ["Enforce", "Warn", "Audit"] {
                    for state in [
                        ApprovalState::None,
                        ApprovalState::Valid,
                        ApprovalState::Expired,
                        ApprovalState::Stale,
                    ] {
                        rows += 1;
                        check_row(op, who, action, mode, state);
                    }
                }
            }
        }
    }
    assert_eq!(rows, 4 * 5 * 4 * 3 * 4);
}

fn check_row(op: Operation, who: Who, action: Option<&str>, mode: &str, state: ApprovalState) {
    let policies = set(action.map(|a| deployments_policy("p", a, mode)).into_iter().collect(), vec![]);
    let is_update = matches!(op, Operation::Update { .. });
    let new = deployment(0);
    let bare_old = deployment(3);
    let target = is_update.then_some(&new);
    let value = match state {
        // Issued for another state of the object (another change, for an update).
        ApprovalState::Stale => {
            let mut moved = bare_old.clone();
            moved["spec"]["replicas"] = json!(4);
            let mut moved_new = new.clone();
            moved_new["spec"]["replicas"] = json!(1);
            ticket(&moved, is_update.then_some(&moved_new), "2026-11-26T11:30:00Z")
        }
        ApprovalState::Expired => ticket(&bare_old, target, "2026-11-26T10:59:59Z"),
        _ => ticket(&bare_old, target, "2026-11-26T11:30:00Z"),
    };
    let fresh = ticket(&bare_old, target, NOW);
    let old = match state {
        ApprovalState::None => bare_old,
        // The managedFields time is irrelevant now: set it anywhere.
        _ => with_approval(bare_old, &value, "2099-01-01T00:00:00Z"),
    };
    // The new object keeps the approval (as a patch would), so it is not an approval write.
    let new_obj = match state {
        ApprovalState::None => new,
        _ => {
            let mut n = new;
            n["metadata"]["annotations"] = old["metadata"]["annotations"].clone();
            n["metadata"]["managedFields"] = old["metadata"]["managedFields"].clone();
            n
        }
    };
    let f = match op {
        Operation::Delete => facts(op, Some(&old), None),
        _ => facts(op, Some(&old), Some(&new_obj)),
    };
    let d = decide(&policies, who, &f);
    let row = format!("{op:?} {who:?} {action:?} {mode} {state:?}: {d:?}");
    let agent = !matches!(who, Who::Human | Who::UnlabelledServiceAccount);
    assert_eq!(d.agent, agent, "{row}");
    if !agent {
        assert_eq!(d.verdict, Verdict::Allow(Allowed::NotAgent), "{row}");
        assert!(d.warnings.is_empty() && d.audits.is_empty() && d.dry_runs.is_empty(), "{row}");
        return;
    }
    let approved = state == ApprovalState::Valid;
    let would_refuse = match action {
        Some("Deny") => true,
        Some("RequireApproval") => !approved,
        _ => false,
    };
    match mode {
        "Enforce" => {
            match (action, would_refuse) {
                (_, true) => {
                    assert!(!d.allowed(), "{row}");
                    let msg = match &d.verdict {
                        Verdict::Deny(denial) => denial.to_string(),
                        _ => unreachable!(),
                    };
                    assert!(msg.contains("ClusterAgentPolicy \"p\", rule \"workloads\""), "{row}: {msg}");
                    assert!(msg.contains(&requester(who).username), "{msg}");
                    assert!(msg.contains(op.describe()), "{msg}");
                    assert!(msg.contains("deployments.apps \"web\" in namespace \"prod\""), "{msg}");
                    if action == Some("RequireApproval") {
                        let cmd = format!(
                            "kubectl annotate deployments.apps web -n prod {APPROVE_ANNOTATION}={fresh} --overwrite"
                        );
                        assert!(msg.contains(&cmd), "{msg}");
                        assert!(msg.contains("users alice; groups sre"), "{msg}");
                        let why = match state {
                            ApprovalState::None => "no approval is present".to_string(),
                            ApprovalState::Expired => {
                                "the approval expired at 2026-11-26T11:59:59Z".to_string()
                            }
                            ApprovalState::Stale if is_update => "a different change".to_string(),
                            ApprovalState::Stale => "changed after the delete was reviewed".to_string(),
                            ApprovalState::Valid => unreachable!(),
                        };
                        assert!(msg.contains(&why), "{msg}");
                    }
                    if is_update {
                        assert!(msg.contains("Attempted change: spec.replicas: 3 → 0"), "{msg}");
                    }
                }
                (Some("RequireApproval"), false) => assert!(
                    matches!(&d.verdict, Verdict::Allow(Allowed::Approved { expires, .. })
                        if *expires == "2026-11-26T12:30:00Z".parse::<Timestamp>().unwrap()),
                    "{row}"
                ),
                (Some("Allow"), false) => {
                    assert!(matches!(d.verdict, Verdict::Allow(Allowed::ByPolicy { .. })), "{row}")
                }
                _ => assert_eq!(d.verdict, Verdict::Allow(Allowed::Unmatched), "{row}"),
            }
            assert!(d.warnings.is_empty() && d.audits.is_empty() && d.dry_runs.is_empty(), "{row}");
        }
        dry_run => {
            assert!(d.allowed(), "dry-run policies never refuse: {row}");
            let (reported, silent) =
                if dry_run == "Warn" { (&d.warnings, &d.audits) } else { (&d.audits, &d.warnings) };
            assert!(silent.is_empty(), "{row}");
            if would_refuse {
                assert_eq!(reported.len(), 1, "{row}");
                let prefix = if dry_run == "Warn" {
                    "agentguard [Warn mode, not enforced]: ClusterAgentPolicy \"p\""
                } else {
                    "[Audit mode, not enforced] agentguard: "
                };
                assert!(reported[0].starts_with(prefix), "{row}");
                assert!(reported[0].len() < 256 || dry_run == "Audit", "{row}");
                let finding = DryRun {
                    mode: if dry_run == "Warn" { Mode::Warn } else { Mode::Audit },
                    policy: PolicyId { namespace: None, name: "p".into() },
                    action: if action == Some("Deny") { Action::Deny } else { Action::RequireApproval },
                };
                assert_eq!(d.dry_runs, [finding], "{row}");
            } else {
                assert!(reported.is_empty() && d.dry_runs.is_empty(), "{row}");
            }
        }
    }
}

#[test]
fn precedence_deny_beats_approval_beats_allow() {
    let policies = set(
        vec![
            deployments_policy("a-allow", "Allow", "Enforce"),
            deployments_policy("b-hold", "RequireApproval", "Enforce"),
            deployments_policy("c-deny", "Deny", "Enforce"),
        ],
        vec![],
    );
    let old = deployment(3);
    let d = decide(&policies, Who::LabelledAgent, &facts(Operation::Delete, Some(&old), None));
    match d.verdict {
        Verdict::Deny(denial) => {
            assert_eq!(denial.reason.policy().unwrap().name, "c-deny");
            assert_eq!(denial.reason.action(), Action::Deny);
        }
        other => panic!("{other:?}"),
    }
    let policies = set(
        vec![
            deployments_policy("z-hold", "RequireApproval", "Enforce"),
            deployments_policy("a-allow", "Allow", "Enforce"),
        ],
        vec![],
    );
    let d = decide(&policies, Who::LabelledAgent, &facts(Operation::Delete, Some(&old), None));
    assert!(matches!(&d.verdict, Verdict::Deny(x) if x.reason.action() == Action::RequireApproval), "{d:?}");
}

#[test]
fn several_approval_policies_take_the_strictest_lifetime() {
    let mut short = deployments_policy("short", "RequireApproval", "Enforce");
    short.spec.policy.approval.as_mut().unwrap().ttl = "10m".into();
    let policies = set(vec![deployments_policy("long", "RequireApproval", "Enforce"), short], vec![]);
    // The ticket a denial prints lives as long as the strictest policy allows.
    let bare = deployment(3);
    let d = decide(&policies, Who::LabelledAgent, &facts(Operation::Delete, Some(&bare), None));
    let Verdict::Deny(denial) = &d.verdict else { panic!("{d:?}") };
    let Reason::ApprovalRequired { expires, covering, approve_value, .. } = &denial.reason else { panic!() };
    assert_eq!(*expires, Some("2026-11-26T12:10:00Z".parse().unwrap()));
    // Each covering policy is listed once with its approvers.
    assert_eq!(covering.iter().map(|c| c.policy.name.as_str()).collect::<Vec<_>>(), ["long", "short"]);
    let text = denial.to_string();
    assert_eq!(text.matches("users alice; groups sre").count(), 2, "{text}");
    assert!(text.contains("an approver under every policy below runs"), "{text}");
    // Stored and used within its 10 minutes: approved; after: expired, whatever else was written.
    let approved = with_approval(deployment(3), approve_value, NOW);
    let later: Timestamp = "2026-11-26T12:09:00Z".parse().unwrap();
    let f = facts(Operation::Delete, Some(&approved), None);
    let run =
        |at: Timestamp| evaluate(&f, &requester(Who::LabelledAgent), &policies, &directory(), &config(), at);
    assert!(run(later).allowed());
    assert!(!run("2026-11-26T12:10:00Z".parse().unwrap()).allowed());
}

#[test]
fn unmatched_default_can_deny_and_allow_policies_make_exceptions() {
    let cfg = Config { unmatched: Action::Deny, ..config() };
    let old = deployment(3);
    let f = facts(Operation::Delete, Some(&old), None);
    let empty = PolicySet::default();
    let d = evaluate(&f, &requester(Who::LabelledAgent), &empty, &directory(), &cfg, now());
    assert!(matches!(&d.verdict, Verdict::Deny(x) if x.reason == Reason::Unmatched), "{d:?}");
    let allow = set(vec![deployments_policy("exception", "Allow", "Enforce")], vec![]);
    let d = evaluate(&f, &requester(Who::LabelledAgent), &allow, &directory(), &cfg, now());
    assert!(matches!(d.verdict, Verdict::Allow(Allowed::ByPolicy { .. })), "{d:?}");
}

#[test]
fn operations_narrow_to_replace_or_patch() {
    let policies = set(
        vec![cluster_policy(
            "patch-only",
            json!({
                "action": "Deny",
                "rules": [{"operations": ["PATCH"], "resources": [{"apiGroups": ["apps"], "resources": ["deployments"]}]}]
            }),
        )],
        vec![],
    );
    let (old, new) = (deployment(3), deployment(2));
    let patch = decide(
        &policies,
        Who::LabelledAgent,
        &facts(Operation::Update { patch: Some(true) }, Some(&old), Some(&new)),
    );
    let put = decide(
        &policies,
        Who::LabelledAgent,
        &facts(Operation::Update { patch: Some(false) }, Some(&old), Some(&new)),
    );
    let delete = decide(&policies, Who::LabelledAgent, &facts(Operation::Delete, Some(&old), None));
    // What Kubernetes sends in practice: an update of unknown kind, guarded by either narrowing.
    let unknown = decide(
        &policies,
        Who::LabelledAgent,
        &facts(Operation::Update { patch: None }, Some(&old), Some(&new)),
    );
    assert!(!patch.allowed());
    assert!(put.allowed());
    assert!(delete.allowed());
    assert!(!unknown.allowed());
}

#[test]
fn no_op_updates_pass() {
    let policies = set(vec![deployments_policy("p", "Deny", "Enforce")], vec![]);
    let old = deployment(3);
    let mut new = old.clone();
    new["metadata"]["resourceVersion"] = json!("8");
    let d = decide(
        &policies,
        Who::LabelledAgent,
        &facts(Operation::Update { patch: Some(true) }, Some(&old), Some(&new)),
    );
    assert_eq!(d.verdict, Verdict::Allow(Allowed::NoChange));
}

#[test]
fn resource_patterns_and_subresources() {
    let p = |resources: Value| {
        set(
            vec![cluster_policy(
                "p",
                json!({"action": "Deny",
                "rules": [{"operations": ["UPDATE", "DELETE"], "resources": [{"apiGroups": ["*"], "resources": resources}]}]}),
            )],
            vec![],
        )
    };
    let scale = |policies: &PolicySet| {
        let old = json!({"kind": "Scale", "metadata": {"name": "web"}, "spec": {"replicas": 3}});
        let new = json!({"kind": "Scale", "metadata": {"name": "web"}, "spec": {"replicas": 0}});
        let f = Facts {
            subresource: "scale",
            ..facts(Operation::Update { patch: Some(true) }, Some(&old), Some(&new))
        };
        decide(policies, Who::LabelledAgent, &f).allowed()
    };
    let main = |policies: &PolicySet| {
        let old = deployment(3);
        decide(policies, Who::LabelledAgent, &facts(Operation::Delete, Some(&old), None)).allowed()
    };
    for (resources, main_allowed, scale_allowed) in [
        (json!(["deployments"]), false, true),
        (json!(["deployments/scale"]), true, false),
        (json!(["deployments/*"]), true, false),
        (json!(["*"]), false, true),
        (json!(["*/scale"]), true, false),
        (json!(["*/*"]), false, false),
        (json!(["statefulsets", "statefulsets/scale"]), true, true),
    ] {
        let policies = p(resources.clone());
        assert_eq!(main(&policies), main_allowed, "{resources} main");
        assert_eq!(scale(&policies), scale_allowed, "{resources} scale");
    }
}

#[test]
fn scale_to_zero_is_held_with_a_diff_and_told_how_to_get_approval() {
    let policies = set(
        vec![cluster_policy(
            "scale",
            json!({"action": "RequireApproval",
            "approval": {"approvers": {"groups": ["sre"]}},
            "rules": [{"operations": ["UPDATE"], "resources": [{"apiGroups": ["apps"], "resources": ["deployments/scale"]}]}]}),
        )],
        vec![],
    );
    let old = json!({"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": "web", "namespace": "prod"}, "spec": {"replicas": 3}});
    let new = json!({"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": "web", "namespace": "prod"}, "spec": {"replicas": 0}});
    let f = Facts {
        subresource: "scale",
        ..facts(Operation::Update { patch: Some(true) }, Some(&old), Some(&new))
    };
    let d = decide(&policies, Who::LabelledAgent, &f);
    let Verdict::Deny(denial) = &d.verdict else { panic!("{d:?}") };
    let msg = denial.to_string();
    assert!(msg.contains("deployments.apps/scale \"web\""), "{msg}");
    assert!(msg.contains("spec.replicas: 3 → 0"), "{msg}");
    assert!(msg.contains("as an update of deployments.apps \"web\""), "{msg}");
}

#[test]
fn names_namespaces_and_selectors() {
    let policies = set(
        vec![cluster_policy(
            "prod-dbs",
            json!({"action": "Deny", "rules": [{
                "operations": ["DELETE"], "resources": [{"apiGroups": ["apps"], "resources": ["deployments"]}],
                "names": ["web", "db-*"], "namespaceSelector": {"matchLabels": {"env": "prod"}},
                "objectSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}
            }]}),
        )],
        vec![],
    );
    let allowed = |name: &str, ns: &str, labels: Value| {
        let mut obj = deployment(1);
        obj["metadata"]["labels"] = labels;
        let f = Facts { name, namespace: ns, ..facts(Operation::Delete, Some(&obj), None) };
        decide(&policies, Who::LabelledAgent, &f).allowed()
    };
    assert!(!allowed("web", "prod", json!({"app": "web"})));
    assert!(!allowed("db-orders", "prod", json!({"app": "db"})));
    assert!(allowed("api", "prod", json!({"app": "api"})), "name glob");
    assert!(allowed("web", "dev", json!({"app": "web"})), "namespaceSelector");
    assert!(allowed("web", "unknown", json!({"app": "web"})), "namespace missing from cache");
    assert!(allowed("web", "prod", json!({})), "objectSelector");
}

#[test]
fn agent_policies_apply_to_their_own_namespace_only() {
    let spec = json!({"action": "Deny", "rules": [{"operations": ["DELETE"],
        "resources": [{"apiGroups": [""], "resources": ["configmaps"]}]}]});
    let policies = set(vec![], vec![agent_policy("prod", "team", spec)]);
    let cm = json!({"metadata": {"name": "cfg"}});
    let f = |ns| Facts {
        group: "",
        resource: "configmaps",
        namespace: ns,
        name: "cfg",
        ..facts(Operation::Delete, Some(&cm), None)
    };
    let d = decide(&policies, Who::LabelledAgent, &f("prod"));
    assert!(
        matches!(&d.verdict, Verdict::Deny(x) if x.to_string().contains("AgentPolicy prod/\"team\"")),
        "{d:?}"
    );
    assert!(decide(&policies, Who::LabelledAgent, &f("dev")).allowed());
}

#[test]
fn subjects_select_agents_per_policy() {
    let policies = set(
        vec![cluster_policy(
            "web-team",
            json!({"action": "Deny",
            "subjects": {"serviceAccountSelector": {"matchLabels": {"team": "web"}}, "groups": ["ai-agents"]},
            "rules": [{"operations": ["DELETE"], "resources": [{"apiGroups": ["apps"], "resources": ["deployments"]}]}]}),
        )],
        vec![],
    );
    let old = deployment(3);
    let f = facts(Operation::Delete, Some(&old), None);
    let dir = directory();
    let run = |user: &str, groups: &[&str]| {
        let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        let r = Requester::resolve(user, &groups, &dir, ("agentguard.io/agent", "true"));
        evaluate(&f, &r, &policies, &dir, &config(), now()).allowed()
    };
    assert!(!run("system:serviceaccount:web:deployer", &[]), "selected by label");
    assert!(!run("bob", &["ai-agents"]), "selected by group");
    // The default-labelled agent is an agent, but this policy selects someone else.
    assert!(run("system:serviceaccount:agents:coder", &[]));
    assert!(run("alice", &["sre"]));
}

#[test]
fn relabelling_out_of_an_object_selector_is_guarded() {
    let policies = set(
        vec![cluster_policy(
            "protected",
            json!({"action": "Deny", "rules": [{"name": "protected-only",
            "operations": ["DELETE"], "resources": [{"apiGroups": ["apps"], "resources": ["deployments"]}],
            "objectSelector": {"matchLabels": {"protected": "true"}}}]}),
        )],
        vec![],
    );
    let mut old = deployment(3);
    old["metadata"]["labels"]["protected"] = json!("true");
    let mut unlabelled = old.clone();
    unlabelled["metadata"]["labels"] = json!({"app": "web"});
    let d = decide(
        &policies,
        Who::LabelledAgent,
        &facts(Operation::Update { patch: Some(true) }, Some(&old), Some(&unlabelled)),
    );
    let Verdict::Deny(denial) = &d.verdict else { panic!("{d:?}") };
    assert!(denial.to_string().contains("out of the rule's objectSelector"), "{denial}");
    // Other updates of the protected object are not guarded by a DELETE-only rule.
    let scaled = {
        let mut o = old.clone();
        o["spec"]["replicas"] = json!(1);
        o
    };
    assert!(
        decide(
            &policies,
            Who::LabelledAgent,
            &facts(Operation::Update { patch: Some(true) }, Some(&old), Some(&scaled))
        )
        .allowed()
    );
}

#[test]
fn adding_an_owner_is_guarded_by_delete_rules() {
    let policies = set(
        vec![cluster_policy(
            "no-delete",
            json!({"action": "Deny", "rules": [{
        "operations": ["DELETE"], "resources": [{"apiGroups": ["apps"], "resources": ["deployments"]}]}]}),
        )],
        vec![],
    );
    let old = deployment(3);
    let mut owned = old.clone();
    owned["metadata"]["ownerReferences"] =
        json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "cm-1"}]);
    let d = decide(
        &policies,
        Who::LabelledAgent,
        &facts(Operation::Update { patch: Some(true) }, Some(&old), Some(&owned)),
    );
    let Verdict::Deny(denial) = &d.verdict else { panic!("{d:?}") };
    assert!(denial.to_string().contains("garbage collector"), "{denial}");
}

#[test]
fn relabelling_a_namespace_out_of_a_namespace_selector_is_guarded() {
    let policies = set(
        vec![cluster_policy(
            "prod",
            json!({"action": "Deny", "rules": [{
        "operations": ["DELETE"], "resources": [{"apiGroups": ["apps"], "resources": ["deployments"]}],
        "namespaceSelector": {"matchLabels": {"env": "prod"}}}]}),
        )],
        vec![],
    );
    let old = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod", "labels": {"env": "prod"}}});
    let new = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod", "labels": {"env": "dev"}}});
    let f = Facts {
        group: "",
        resource: "namespaces",
        namespace: "prod",
        name: "prod",
        ..facts(Operation::Update { patch: Some(true) }, Some(&old), Some(&new))
    };
    let d = decide(&policies, Who::LabelledAgent, &f);
    let Verdict::Deny(denial) = &d.verdict else { panic!("{d:?}") };
    assert!(denial.to_string().contains("namespaceSelector"), "{denial}");
    // Adding an unrelated label is fine.
    let mut other = old.clone();
    other["metadata"]["labels"]["team"] = json!("a");
    let f = Facts { object: Some(&other), ..f };
    assert!(decide(&policies, Who::LabelledAgent, &f).allowed());
}

#[test]
fn namespace_deletion_under_a_namespace_policy() {
    let policies = set(
        vec![cluster_policy(
            "namespaces",
            json!({"action": "RequireApproval",
        "approval": {"approvers": {"groups": ["sre"]}},
        "rules": [{"operations": ["DELETE"], "resources": [{"apiGroups": [""], "resources": ["namespaces"]}]}]}),
        )],
        vec![],
    );
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod", "uid": "n1"}});
    let f = Facts {
        group: "",
        resource: "namespaces",
        namespace: "prod",
        name: "prod",
        ..facts(Operation::Delete, Some(&ns), None)
    };
    let d = decide(&policies, Who::LabelledAgent, &f);
    let Verdict::Deny(denial) = &d.verdict else { panic!("{d:?}") };
    assert!(
        denial.to_string().contains(&format!(
            "kubectl annotate namespaces prod agentguard.io/approve={} --overwrite",
            ticket(&ns, None, NOW)
        )),
        "{denial}"
    );
}

mod builtins {
    use super::*;

    fn builtin_rule(d: &Decision) -> Option<&'static str> {
        match &d.verdict {
            Verdict::Deny(x) => match x.reason {
                Reason::Builtin { rule, .. } => Some(rule),
                _ => None,
            },
            _ => None,
        }
    }

    fn sa(labels: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "coder", "namespace": "agents", "labels": labels}})
    }

    fn sa_update<'a>(old: &'a Value, new: &'a Value) -> Facts<'a> {
        Facts {
            group: "",
            resource: "serviceaccounts",
            namespace: "agents",
            name: "coder",
            ..facts(Operation::Update { patch: Some(true) }, Some(old), Some(new))
        }
    }

    #[test]
    fn agents_cannot_touch_their_label_or_policies() {
        let none = PolicySet::default();
        let (labelled, plain) = (sa(json!({"agentguard.io/agent": "true"})), sa(json!({})));
        let d = decide(&none, Who::LabelledAgent, &sa_update(&labelled, &plain));
        assert_eq!(builtin_rule(&d), Some(builtin::AGENT_LABEL_RULE));
        let falsy = sa(json!({"agentguard.io/agent": "false"}));
        assert_eq!(
            builtin_rule(&decide(&none, Who::AgentNamespace, &sa_update(&labelled, &falsy))),
            Some(builtin::AGENT_LABEL_RULE)
        );
        // A human may.
        assert!(decide(&none, Who::Human, &sa_update(&labelled, &plain)).allowed());
        // Other labels of a non-agent ServiceAccount are not the brakes.
        let team = sa(json!({"team": "x"}));
        assert!(decide(&none, Who::LabelledAgent, &sa_update(&plain, &team)).allowed());

        let policy = json!({"metadata": {"name": "p"}});
        for op in [Operation::Create, Operation::Update { patch: Some(true) }, Operation::Delete] {
            let f = Facts {
                group: "agentguard.io",
                resource: "clusteragentpolicies",
                namespace: "",
                name: "p",
                ..facts(op, Some(&policy), Some(&policy))
            };
            assert_eq!(
                builtin_rule(&decide(&none, Who::LabelledAgent, &f)),
                Some(builtin::POLICIES_RULE),
                "{op:?}"
            );
            assert!(decide(&none, Who::Human, &f).allowed());
        }
        let crd = Facts {
            group: "apiextensions.k8s.io",
            resource: "customresourcedefinitions",
            namespace: "",
            name: "agentpolicies.agentguard.io",
            ..facts(Operation::Delete, Some(&policy), None)
        };
        assert_eq!(builtin_rule(&decide(&none, Who::LabelledAgent, &crd)), Some(builtin::CRDS_RULE));

        // Deleting an agent's account (to create it again unmarked) is refused; others are not.
        fn delete(old: &Value) -> Facts<'_> {
            Facts { operation: Operation::Delete, object: None, ..sa_update(old, old) }
        }
        let refused = decide(&none, Who::LabelledAgent, &delete(&labelled));
        assert_eq!(builtin_rule(&refused), Some(builtin::AGENT_LABEL_RULE));
        assert!(decide(&none, Who::LabelledAgent, &delete(&plain)).allowed());
        assert!(decide(&none, Who::Human, &delete(&labelled)).allowed());
    }

    #[test]
    fn labels_of_a_custom_selected_agent_are_protected() {
        let policies = set(
            vec![cluster_policy(
                "web",
                json!({"action": "Deny",
            "subjects": {"serviceAccountSelector": {"matchLabels": {"team": "web"}}},
            "rules": [{"operations": ["DELETE"], "resources": [{"apiGroups": ["apps"], "resources": ["deployments"]}]}]}),
            )],
            vec![],
        );
        let (old, new) = (sa(json!({"team": "web"})), sa(json!({"team": "none"})));
        assert_eq!(
            builtin_rule(&decide(&policies, Who::LabelledAgent, &sa_update(&old, &new))),
            Some(builtin::AGENT_LABEL_RULE)
        );
    }

    #[test]
    fn agent_namespace_label_and_agentguard_itself() {
        let none = PolicySet::default();
        let old = json!({"metadata": {"name": "bots", "labels": {AGENT_NAMESPACE_LABEL: "true"}}});
        let new = json!({"metadata": {"name": "bots", "labels": {}}});
        let f = Facts {
            group: "",
            resource: "namespaces",
            namespace: "bots",
            name: "bots",
            ..facts(Operation::Update { patch: Some(true) }, Some(&old), Some(&new))
        };
        assert_eq!(
            builtin_rule(&decide(&none, Who::AgentNamespace, &f)),
            Some(builtin::AGENT_NAMESPACE_RULE)
        );

        let cfg = Config { self_namespace: Some("agentguard-system".into()), ..config() };
        let obj = json!({"metadata": {"name": "agentguard"}});
        let in_self = Facts {
            namespace: "agentguard-system",
            name: "agentguard",
            ..facts(Operation::Delete, Some(&obj), None)
        };
        let d = evaluate(&in_self, &requester(Who::LabelledAgent), &none, &directory(), &cfg, now());
        assert_eq!(builtin_rule(&d), Some(builtin::SELF_RULE));
        let webhook = Facts {
            group: "admissionregistration.k8s.io",
            resource: "validatingwebhookconfigurations",
            namespace: "",
            name: "agentguard-agents",
            ..facts(Operation::Delete, Some(&obj), None)
        };
        let d = evaluate(&webhook, &requester(Who::LabelledAgent), &none, &directory(), &cfg, now());
        assert_eq!(builtin_rule(&d), Some(builtin::SELF_RULE));
    }

    fn approve_request<'a>(old: &'a Value, new: &'a Value) -> Facts<'a> {
        facts(Operation::Update { patch: Some(true) }, Some(old), Some(new))
    }

    #[test]
    fn approval_writes() {
        let policies = set(vec![deployments_policy("hold", "RequireApproval", "Enforce")], vec![]);
        let old = deployment(3);
        let delete_ticket = ticket(&old, None, NOW);
        let approved = with_approval(deployment(3), &delete_ticket, NOW);
        let mallory = |groups: &[&str]| {
            let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
            Requester::resolve("mallory", &groups, &directory(), ("agentguard.io/agent", "true"))
        };
        let run = |r: &Requester, new: &Value| {
            evaluate(&approve_request(&old, new), r, &policies, &directory(), &config(), now())
        };

        // An approver may; the approval is then accepted.
        assert_eq!(run(&requester(Who::Human), &approved).verdict, Verdict::Allow(Allowed::ApprovalAccepted));
        // A human who is not an approver may not.
        let d = run(&mallory(&["dev"]), &approved);
        assert_eq!(builtin_rule(&d), Some(builtin::APPROVAL_RULE));
        assert!(
            matches!(&d.verdict, Verdict::Deny(x) if x.to_string().contains("mallory is not an approver")),
            "{d:?}"
        );
        // Agents never may, not even through a group that approves.
        for who in [Who::LabelledAgent, Who::AgentNamespace, Who::AgentByUsername] {
            assert_eq!(
                builtin_rule(&run(&requester(who), &approved)),
                Some(builtin::APPROVAL_RULE),
                "{who:?}"
            );
        }
        // Whatever is not a live ticket agentguard issued for this object and state is refused
        // at write time, even from an approver.
        let refused = |value: &str, new: Value, needle: &str| {
            let d = run(&requester(Who::Human), &with_approval(new, value, NOW));
            assert!(
                matches!(&d.verdict, Verdict::Deny(x) if x.to_string().contains(needle)),
                "{value}: {d:?}"
            );
        };
        // A value that is no ticket for this object approves nothing, whoever writes it: a human's
        // (or a controller's: the deployment controller copies a Deployment's annotations onto
        // its ReplicaSets) is admitted with a warning, and never counts as an approval.
        let inert = |value: &str, who: &Requester| {
            let d = run(who, &with_approval(deployment(3), value, NOW));
            assert_eq!(d.verdict, Verdict::Allow(Allowed::NotAgent), "{value}: {d:?}");
            assert!(d.warnings.iter().any(|w| w.contains("approves nothing")), "{value}: {d:?}");
        };
        let mut other = deployment(3);
        other["metadata"]["uid"] = json!("u2");
        for value in ["delete", "update:0123456789abcdef", &ticket(&other, None, NOW)] {
            inert(value, &requester(Who::Human));
            inert(value, &mallory(&["dev"]));
        }
        // A ticket for this object is checked in full: who writes it, whether it is live, the state.
        refused(&delete_ticket, deployment(2), "no longer in the state the delete was reviewed in");
        refused(&ticket(&old, None, "2026-11-26T10:00:00Z"), deployment(3), "expired");
        refused(&ticket(&old, None, "2026-11-26T13:00:00Z"), deployment(3), "in the future");
        let mut unkeyed = config();
        unkeyed.approval_keys = approval::Keys::none();
        let d = evaluate(
            &approve_request(&old, &approved),
            &requester(Who::Human),
            &policies,
            &directory(),
            &unkeyed,
            now(),
        );
        assert!(!d.allowed(), "{d:?}");
        // An update ticket is checked for its origin now, and for its change when used.
        let update_ticket = ticket(&old, Some(&deployment(0)), NOW);
        assert_eq!(
            run(&requester(Who::Human), &with_approval(deployment(3), &update_ticket, NOW)).verdict,
            Verdict::Allow(Allowed::ApprovalAccepted)
        );
        // An approval nothing requires is refused: there is nothing to approve.
        let none = PolicySet::default();
        let d = evaluate(
            &approve_request(&old, &approved),
            &requester(Who::Human),
            &none,
            &directory(),
            &config(),
            now(),
        );
        assert!(
            matches!(&d.verdict, Verdict::Deny(x) if x.to_string().contains("nothing to approve")),
            "{d:?}"
        );
        // CREATE carrying an approval: no ticket can cover an object that did not exist. An agent
        // is refused; anyone else's copy (a controller creating a ReplicaSet) is inert.
        let create =
            Facts { operation: Operation::Create, old_object: None, ..approve_request(&old, &approved) };
        assert_eq!(
            builtin_rule(&decide(&policies, Who::LabelledAgent, &create)),
            Some(builtin::APPROVAL_RULE)
        );
        let d = decide(&policies, Who::Human, &create);
        assert_eq!(d.verdict, Verdict::Allow(Allowed::NotAgent), "{d:?}");
        assert!(d.warnings.iter().any(|w| w.contains("not at its creation")), "{d:?}");
    }

    #[test]
    fn two_person_rule() {
        let mut policy = deployments_policy("two-person", "RequireApproval", "Enforce");
        policy.spec.policy.approval.as_mut().unwrap().approvers.users.push("bob".into());
        policy.spec.policy.approval.as_mut().unwrap().min_approvers = 2;
        let policies = set(vec![policy], vec![]);
        let person =
            |name: &str| Requester::resolve(name, &[], &directory(), ("agentguard.io/agent", "true"));
        let old = deployment(3);
        let value = ticket(&old, None, NOW);
        let annotated = |pairs: &[(&str, String)]| {
            let mut obj = deployment(3);
            obj["metadata"]["annotations"] = pairs.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
            obj
        };
        let write = |who: &Requester, before: &Value, after: &Value| {
            evaluate(&approve_request(before, after), who, &policies, &directory(), &config(), now())
        };
        let refused_with = |d: &Decision, needle: &str| {
            assert!(
                matches!(&d.verdict, Verdict::Deny(x) if x.to_string().contains(needle)),
                "{needle}: {d:?}"
            );
        };
        let agent_delete =
            |obj: &Value| decide(&policies, Who::LabelledAgent, &facts(Operation::Delete, Some(obj), None));

        // Held: the denial says how many must approve and how.
        let d = agent_delete(&old);
        refused_with(&d, "2 distinct approvers must approve (none yet): 2 more needed");
        refused_with(&d, "kubectl agentguard approve deployments.apps/web -n prod");
        refused_with(&d, &format!("{APPROVE_ANNOTATION}.<you>={value}.<username>"));

        let alice_key = approval::key_for("alice");
        let bob_key = approval::key_for("bob");
        assert_ne!(alice_key, bob_key);
        let by_alice = annotated(&[(&alice_key, format!("{value}.alice"))]);
        // An approval that names nobody cannot be counted among several, so it is refused; one
        // naming someone else than its writer is refused.
        refused_with(
            &write(&person("alice"), &old, &annotated(&[(APPROVE_ANNOTATION, value.clone())])),
            "names its writer",
        );
        refused_with(
            &write(&person("alice"), &old, &annotated(&[(&alice_key, format!("{value}.bob"))])),
            "names \"bob\"",
        );
        // Alice approves; the agent is still held, told who approved and how many are missing.
        assert_eq!(
            write(&person("alice"), &old, &by_alice).verdict,
            Verdict::Allow(Allowed::ApprovalAccepted)
        );
        refused_with(
            &agent_delete(&by_alice),
            "2 distinct approvers must approve (so far alice): 1 more needed",
        );
        // Alice cannot count twice: a second approval of hers is refused, and two on the object
        // (however they got there) count once.
        let twice =
            annotated(&[(&alice_key, format!("{value}.alice")), (&bob_key, format!("{value}.alice"))]);
        refused_with(&write(&person("alice"), &by_alice, &twice), "already approved");
        refused_with(&agent_delete(&twice), "so far alice): 1 more needed");
        // Neither does the agent count, whatever a value says.
        let with_agent = annotated(&[
            (&alice_key, format!("{value}.alice")),
            (&bob_key, format!("{value}.system:serviceaccount:agents:coder")),
        ]);
        refused_with(&agent_delete(&with_agent), "1 more needed");
        // A non-approver's approval is refused at write time.
        let by_mallory =
            annotated(&[(&alice_key, format!("{value}.alice")), (&bob_key, format!("{value}.mallory"))]);
        refused_with(&write(&person("mallory"), &by_alice, &by_mallory), "mallory is not an approver");
        // Bob approves too (Alice's approval did not make his ticket stale): admitted, both recorded.
        let both = annotated(&[(&alice_key, format!("{value}.alice")), (&bob_key, format!("{value}.bob"))]);
        assert_eq!(
            write(&person("bob"), &by_alice, &both).verdict,
            Verdict::Allow(Allowed::ApprovalAccepted)
        );
        match agent_delete(&both).verdict {
            Verdict::Allow(Allowed::Approved { approvers, approvals, .. }) => {
                assert_eq!(approvers, ["alice", "bob"]);
                assert_eq!(approvals.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        // An agent may remove approvals but never add or change one.
        let d = decide(&policies, Who::LabelledAgent, &approve_request(&by_alice, &both));
        assert_eq!(builtin_rule(&d), Some(builtin::APPROVAL_RULE), "{d:?}");
        let d = decide(&policies, Who::LabelledAgent, &approve_request(&both, &by_alice));
        assert!(d.allowed(), "{d:?}");
    }

    fn session(opener: &str, groups: &[&str], extra: Value) -> crate::engine::session::Session {
        let mut spec = json!({
            "agent": "system:serviceaccount:agents:coder", "credentialId": "JTI=1", "namespaces": ["prod"],
            "resources": ["deployments.apps"], "operations": ["DELETE"], "maxOperations": 2,
            "ttl": "30m", "reason": "migration", "openedBy": {"username": opener, "groups": groups}
        });
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        let s: crate::engine::api::AgentSession = serde_json::from_value(json!({
            "apiVersion": "agentguard.io/v1alpha1", "kind": "AgentSession",
            "metadata": {"name": "migrate", "uid": "s-1", "creationTimestamp": "2026-11-26T11:50:00Z"},
            "spec": spec
        }))
        .unwrap();
        crate::engine::session::Session::of(&s).unwrap()
    }

    #[test]
    fn a_session_stands_in_for_approvals_within_its_scope_only() {
        let policies = set(vec![deployments_policy("hold", "RequireApproval", "Enforce")], vec![]);
        let with = |sessions: Vec<crate::engine::session::Session>| {
            let mut dir = directory();
            dir.sessions = sessions;
            dir
        };
        let old = deployment(3);
        let delete = facts(Operation::Delete, Some(&old), None);
        let judge = |who: Who, facts: &Facts<'_>, dir: &StaticDirectory| {
            // Requests made with the credential the sessions are pinned to.
            let mut r = requester(who);
            r.credential = Some("JTI=1".into());
            evaluate(facts, &r, &policies, dir, &config(), now())
        };
        let dir = with(vec![session("alice", &["sre"], json!({}))]);
        match judge(Who::LabelledAgent, &delete, &dir).verdict {
            Verdict::Allow(Allowed::BySession { grants, .. }) => {
                let g = &grants[0];
                assert_eq!(
                    (g.name.as_str(), g.uid.as_str(), g.max_operations, g.opener.as_str()),
                    ("migrate", "s-1", 2, "alice")
                );
                assert_eq!(g.expires, "2026-11-26T12:20:00Z".parse::<Timestamp>().unwrap());
            }
            other => panic!("{other:?}"),
        }
        let held = |who: Who, facts: &Facts<'_>, dir: &StaticDirectory| {
            let d = judge(who, facts, dir);
            assert!(
                matches!(&d.verdict, Verdict::Deny(x) if matches!(x.reason, Reason::ApprovalRequired { .. })),
                "{d:?}"
            );
        };
        // The same agent's name with another credential, or none (someone acting as it): held.
        for credential in [Some("JTI=2"), None] {
            let mut r = requester(Who::LabelledAgent);
            r.credential = credential.map(str::to_owned);
            let d = evaluate(&delete, &r, &policies, &dir, &config(), now());
            assert!(!d.allowed(), "{credential:?}: {d:?}");
        }
        // Another agent, another operation, another namespace: held as before.
        held(Who::AgentNamespace, &delete, &dir);
        let new = deployment(0);
        held(
            Who::LabelledAgent,
            &facts(Operation::Update { patch: Some(true) }, Some(&old), Some(&new)),
            &dir,
        );
        held(Who::LabelledAgent, &Facts { namespace: "dev", ..delete.clone() }, &dir);
        // Opened by someone who is not an approver under the holding policy: covers nothing.
        held(Who::LabelledAgent, &delete, &with(vec![session("mallory", &["dev"], json!({}))]));
        // Ended (opened 11:50 for 5 minutes; the clock says 12:00).
        held(Who::LabelledAgent, &delete, &with(vec![session("alice", &["sre"], json!({"ttl": "5m"}))]));
        // What the delete takes with it, guarded beyond itself, still needs its approval.
        let dependent = [crate::engine::policy::Collateral {
            group: "apps".into(),
            resource: "deployments".into(),
            namespace: "prod".into(),
            name: "web-2".into(),
            object: json!({"metadata": {"name": "web-2", "namespace": "prod"}}),
            via: "owned by Deployment \"web\"".into(),
            unseen: false,
        }];
        held(Who::LabelledAgent, &Facts { collateral: &dependent, ..delete.clone() }, &dir);
        // A policy that needs two approvers is never satisfied by one person's session.
        let mut two = deployments_policy("two", "RequireApproval", "Enforce");
        two.spec.policy.approval.as_mut().unwrap().min_approvers = 2;
        let strict = set(vec![two], vec![]);
        let d = evaluate(&delete, &requester(Who::LabelledAgent), &strict, &dir, &config(), now());
        assert!(!d.allowed(), "{d:?}");
        // Agents never open one.
        let opening = json!({"spec": {"openedBy": {"username": "system:serviceaccount:agents:coder", "groups": ["system:serviceaccounts"]}}});
        let create = Facts {
            operation: Operation::Create,
            group: "agentguard.io",
            resource: "agentsessions",
            namespace: "",
            name: "mine",
            object: Some(&opening),
            old_object: None,
            ..delete.clone()
        };
        assert!(!judge(Who::LabelledAgent, &create, &dir).allowed());
        // A human opens one only as themselves, and only as an approver somewhere.
        let by =
            |user: &str, groups: &[&str]| json!({"spec": {"openedBy": {"username": user, "groups": groups}}});
        let alice = by("alice", &["sre"]);
        let d = judge(Who::Human, &Facts { object: Some(&alice), ..create.clone() }, &dir);
        assert!(d.allowed(), "{d:?}");
        let as_bob = by("bob", &["sre"]);
        let d = judge(Who::Human, &Facts { object: Some(&as_bob), ..create.clone() }, &dir);
        assert_eq!(builtin_rule(&d), Some(builtin::SESSION_RULE), "{d:?}");
        let more_groups = by("alice", &["sre", "admins"]);
        let d = judge(Who::Human, &Facts { object: Some(&more_groups), ..create.clone() }, &dir);
        assert_eq!(builtin_rule(&d), Some(builtin::SESSION_RULE), "{d:?}");
        let mallory =
            Requester::resolve("mallory", &["dev".into()], &directory(), ("agentguard.io/agent", "true"));
        let as_mallory = by("mallory", &["dev"]);
        let d = evaluate(
            &Facts { object: Some(&as_mallory), ..create.clone() },
            &mallory,
            &policies,
            &dir,
            &config(),
            now(),
        );
        assert!(
            matches!(&d.verdict, Verdict::Deny(x) if x.to_string().contains("not an approver under any")),
            "{d:?}"
        );
    }

    #[test]
    fn agents_may_remove_an_approval_and_nothing_refreshes_one() {
        let policies = set(vec![deployments_policy("hold", "RequireApproval", "Enforce")], vec![]);
        let expired = ticket(&deployment(3), None, "2026-11-26T10:00:00Z");
        let approved = with_approval(deployment(3), &expired, "2026-11-26T10:01:00Z");
        let removed = deployment(3);
        let d = decide(&policies, Who::LabelledAgent, &approve_request(&approved, &removed));
        assert_eq!(d.verdict, Verdict::Allow(Allowed::NoChange));
        // Same value, newer managedFields time (another annotation, server-side apply with
        // force, an edited managedFields): no approval write, and the ticket stays expired.
        let refreshed = with_approval(deployment(3), &expired, "2099-01-01T00:00:00Z");
        for who in [Who::LabelledAgent, Who::Human] {
            let d = decide(&policies, who, &approve_request(&approved, &refreshed));
            assert_eq!(builtin_rule(&d), None, "{who:?}: {d:?}");
        }
        let d = decide(&policies, Who::LabelledAgent, &facts(Operation::Delete, Some(&refreshed), None));
        assert!(
            matches!(&d.verdict, Verdict::Deny(x) if x.to_string().contains("the approval expired at 2026-11-26T11:00:00Z")),
            "{d:?}"
        );
        // Untouched approval on an unrelated update: fine.
        let mut scaled = approved.clone();
        scaled["spec"]["replicas"] = json!(3);
        scaled["metadata"]["labels"]["x"] = json!("y");
        let d = decide(&set(vec![], vec![]), Who::LabelledAgent, &approve_request(&approved, &scaled));
        assert_eq!(d.verdict, Verdict::Allow(Allowed::Unmatched));
    }
}

#[test]
fn an_approved_update_does_not_approve_the_next_one() {
    let policies = set(vec![deployments_policy("hold", "RequireApproval", "Enforce")], vec![]);
    let v1 = deployment(3);
    let v2 = deployment(0);
    let value = ticket(&v1, Some(&v2), "2026-11-26T11:50:00Z");
    let approved = with_approval(v1, &value, "2026-11-26T11:50:00Z");
    let mut applied = v2.clone();
    applied["metadata"]["annotations"] = approved["metadata"]["annotations"].clone();
    applied["metadata"]["managedFields"] = approved["metadata"]["managedFields"].clone();
    let d = decide(
        &policies,
        Who::LabelledAgent,
        &facts(Operation::Update { patch: Some(true) }, Some(&approved), Some(&applied)),
    );
    assert!(d.allowed(), "{d:?}");
    // The next change starts from the updated object: the approval names another change.
    let mut v3 = applied.clone();
    v3["spec"]["replicas"] = json!(5);
    let d = decide(
        &policies,
        Who::LabelledAgent,
        &facts(Operation::Update { patch: Some(true) }, Some(&applied), Some(&v3)),
    );
    assert!(!d.allowed(), "{d:?}");
}

#[test]
fn compile_problems_are_reported_and_read_restrictively() {
    let mut p = deployments_policy("odd", "RequireApproval", "Enforce");
    p.spec.policy.approval.as_mut().unwrap().ttl = "forever".into();
    let ns = agent_policy(
        "prod",
        "team",
        json!({"action": "Deny", "rules": [{"operations": ["DELETE"],
        "resources": [{"apiGroups": ["apps"], "resources": ["deployments"]}], "namespaces": ["other"]}]}),
    );
    let (set, problems) = PolicySet::compile(&[p], &[ns]);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].message.contains("approval.ttl \"forever\""));
    assert!(problems[1].message.contains("ignored"));
    // The AgentPolicy still guards its own namespace.
    let old = deployment(3);
    let d = decide(&set, Who::LabelledAgent, &facts(Operation::Delete, Some(&old), None));
    assert!(matches!(&d.verdict, Verdict::Deny(x) if x.reason.action() == Action::Deny), "{d:?}");
}

#[test]
fn index_finds_the_same_rules_as_a_scan() {
    // 300 policies over varied resources, operations, name globs (literal prefixes of several
    // lengths, leading wildcards, `?`), object selectors and namespaces; every lookup, for every
    // operation, name and namespace, with the name known or not, must agree with a scan.
    let resources =
        ["deployments", "statefulsets", "deployments/scale", "*", "*/scale", "configmaps", "secrets", "*/*"];
    let operations = [
        json!(["DELETE"]),
        json!(["UPDATE"]),
        json!(["PATCH"]),
        json!(["DELETE", "UPDATE"]),
        json!(["CONNECT"]),
        json!(["CREATE", "DELETE"]),
    ];
    let names = |i: usize| match i % 6 {
        0 => json!([]),
        1 => json!(["*-a"]),
        2 => json!(["n1?a", "zz*"]),
        3 => json!([format!("n{}*", i % 7)]),
        4 => json!([format!("n{}-a", i % 7), "n*"]),
        _ => json!([format!("n{}-*", i % 4)]),
    };
    let rule = |i: usize, group: &str| {
        let mut rule = json!({"operations": operations[i % operations.len()],
            "resources": [{"apiGroups": [group], "resources": [resources[i % resources.len()]]}],
            "names": names(i / 3)});
        if i.is_multiple_of(5) {
            rule["objectSelector"] = json!({"matchLabels": {"keep": "yes"}});
        }
        rule
    };
    let cluster: Vec<_> = (0..150)
        .map(|i| {
            let r = resources[i % resources.len()];
            let group = if r.starts_with("configmaps") || r.starts_with("secrets") { "" } else { "apps" };
            cluster_policy(&format!("c{i}"), json!({"action": "Deny", "rules": [rule(i, group)]}))
        })
        .collect();
    let namespaced: Vec<_> = (0..150)
        .map(|i| {
            agent_policy(
                &format!("ns{}", i % 10),
                &format!("a{i}"),
                json!({"action": "Deny", "rules": [rule(i + 1, "*")]}),
            )
        })
        .collect();
    let (set, _) = PolicySet::compile(&cluster, &namespaced);
    let (kept, dropped) = (
        json!({"metadata": {"name": "x", "labels": {"keep": "yes"}}}),
        json!({"metadata": {"name": "x", "labels": {"keep": "no"}}}),
    );
    let mut checked = (0, 0);
    for (group, resource, sub) in [
        ("apps", "deployments", ""),
        ("apps", "deployments", "scale"),
        ("", "configmaps", ""),
        ("apps", "statefulsets", "status"),
        ("batch", "jobs", ""),
    ] {
        for operation in [
            Operation::Delete,
            Operation::Update { patch: None },
            Operation::Update { patch: Some(true) },
            Operation::Connect,
            Operation::Create,
        ] {
            let (old, new) = match operation {
                Operation::Delete => (Some(&kept), None),
                Operation::Update { .. } => (Some(&kept), Some(&dropped)),
                _ => (None, Some(&kept)),
            };
            for ns in ["ns1", "ns3", "other", ""] {
                for name in ["n1-a", "n1xa", "n3", "n3-", "b-a", "zzz", "n", ""] {
                    for any_name in [false, true] {
                        let f = Facts {
                            group,
                            resource,
                            subresource: sub,
                            namespace: ns,
                            name,
                            ..facts(operation, old, new)
                        };
                        let effect = effects::Effect { any_name, ..effects::Effect::sent(f.clone()) };
                        let indexed: Vec<String> = set
                            .matching_effect(&effect, &(), |_| true)
                            .iter()
                            .map(|m| m.policy.id.name.clone())
                            .collect();
                        let (ol_old, ol_new) = (Facts::labels(old), Facts::labels(new));
                        let ol = ObjectLabels { old: ol_old.as_ref(), new: ol_new.as_ref() };
                        let mut lazy = LazyLabels::new(ns, &());
                        let scanned: Vec<String> = set
                            .policies()
                            .filter(|p| p.id.namespace.as_deref().is_none_or(|pns| pns == ns))
                            .flat_map(|p| p.rules.iter().map(move |r| (p, r)))
                            .filter(|(_, r)| {
                                rule_matches(r, &effect, &ol, &mut lazy, &mut Default::default()).is_some()
                            })
                            .map(|(p, _)| p.id.name.clone())
                            .collect();
                        assert_eq!(
                            indexed, scanned,
                            "{operation:?} {group}/{resource}/{sub} in {ns:?} named {name:?} (any name: {any_name})"
                        );
                        checked.0 += 1;
                        checked.1 += scanned.len();
                    }
                }
            }
        }
    }
    // The lookups found something to agree on, not only nothing.
    assert!(checked.1 > checked.0, "{checked:?}");
}

/// Issue-9 routes: a request is judged by what it does, whatever its verb or subresource.
mod routes {
    use super::*;

    fn policy(name: &str, action: &str, operations: Value, resources: Value) -> ClusterAgentPolicy {
        let mut spec = json!({"action": action,
            "rules": [{"name": name, "operations": operations, "resources": [resources]}]});
        if action == "RequireApproval" {
            spec["approval"] = json!({"approvers": {"groups": ["sre"]}});
        }
        cluster_policy(name, spec)
    }

    fn refused(d: &Decision) -> String {
        match &d.verdict {
            Verdict::Deny(denial) => denial.to_string(),
            Verdict::Allow(why) => panic!("admitted: {why:?}"),
        }
    }

    fn on<'a>(resource: &'a str, subresource: &'a str, base: Facts<'a>) -> Facts<'a> {
        Facts { group: "", resource, subresource, name: "x", ..base }
    }

    #[test]
    fn metadata_written_through_status_is_judged_as_an_update_of_the_object() {
        // The agent-namespace label, dropped through namespaces/status.
        let old = json!({"kind": "Namespace", "metadata": {"name": "bots", "labels": {AGENT_NAMESPACE_LABEL: "true"}}});
        let new = json!({"kind": "Namespace", "metadata": {"name": "bots", "labels": {}}});
        let f = Facts {
            group: "",
            resource: "namespaces",
            subresource: "status",
            namespace: "bots",
            name: "bots",
            ..facts(Operation::Update { patch: Some(true) }, Some(&old), Some(&new))
        };
        let d = decide(&PolicySet::default(), Who::AgentNamespace, &f);
        assert!(refused(&d).contains(builtin::AGENT_NAMESPACE_RULE));

        // Relabelling a Deployment out of an objectSelector through deployments/status.
        let held = set(
            vec![cluster_policy(
                "keep",
                json!({"action": "Deny", "rules": [{"name": "kept", "operations": ["DELETE"],
                    "resources": [{"apiGroups": ["apps"], "resources": ["deployments"]}],
                    "objectSelector": {"matchLabels": {"keep": "yes"}}}]}),
            )],
            vec![],
        );
        let mut old = deployment(3);
        old["kind"] = json!("Deployment");
        old["metadata"]["labels"] = json!({"keep": "yes"});
        let mut new = old.clone();
        new["metadata"]["labels"] = json!({});
        let f = Facts {
            subresource: "status",
            ..facts(Operation::Update { patch: None }, Some(&old), Some(&new))
        };
        let denial = refused(&decide(&held, Who::LabelledAgent, &f));
        assert!(denial.contains("objectSelector") && denial.contains("status subresource"), "{denial}");
        // A status-only write is not an update of the object.
        let mut status = old.clone();
        status["status"] = json!({"replicas": 1});
        let f = Facts {
            subresource: "status",
            ..facts(Operation::Update { patch: None }, Some(&old), Some(&status))
        };
        assert!(decide(&held, Who::LabelledAgent, &f).allowed());

        // An ownerReference added to a guarded PVC through persistentvolumeclaims/status.
        let pvcs = set(
            vec![policy(
                "volumes",
                "Deny",
                json!(["DELETE"]),
                json!({"apiGroups": [""], "resources": ["persistentvolumeclaims"]}),
            )],
            vec![],
        );
        let old = json!({"kind": "PersistentVolumeClaim", "metadata": {"name": "x"}});
        let mut new = old.clone();
        new["metadata"]["ownerReferences"] =
            json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "o", "uid": "u"}]);
        let f = on(
            "persistentvolumeclaims",
            "status",
            facts(Operation::Update { patch: None }, Some(&old), Some(&new)),
        );
        assert!(refused(&decide(&pvcs, Who::LabelledAgent, &f)).contains("garbage collector"));
    }

    #[test]
    fn evictions_finalizers_and_armed_controllers_are_the_deletes_they_amount_to() {
        let pods = set(
            vec![policy(
                "pods",
                "RequireApproval",
                json!(["DELETE"]),
                json!({"apiGroups": [""], "resources": ["pods"]}),
            )],
            vec![],
        );
        let eviction = json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "x"}});
        let f = on("pods", "eviction", facts(Operation::Create, None, Some(&eviction)));
        let denial = refused(&decide(&pods, Who::LabelledAgent, &f));
        assert!(
            denial.contains("an eviction deletes the pod") && denial.contains("carries no approval"),
            "{denial}"
        );
        assert!(decide(&pods, Who::Human, &f).allowed());
        // Other CREATEs stay unguarded.
        let binding = on("pods", "binding", facts(Operation::Create, None, Some(&eviction)));
        assert!(decide(&pods, Who::LabelledAgent, &binding).allowed());

        let configmaps = set(
            vec![policy(
                "config",
                "Deny",
                json!(["DELETE"]),
                json!({"apiGroups": [""], "resources": ["configmaps"]}),
            )],
            vec![],
        );
        let gone = "2026-11-26T11:00:00Z";
        let old = json!({"kind": "ConfigMap", "metadata": {"name": "x", "deletionTimestamp": gone, "finalizers": ["e2e/hold"]}});
        let new = json!({"kind": "ConfigMap", "metadata": {"name": "x", "deletionTimestamp": gone}});
        let f = on("configmaps", "", facts(Operation::Update { patch: Some(true) }, Some(&old), Some(&new)));
        assert!(refused(&decide(&configmaps, Who::LabelledAgent, &f)).contains("removing finalizers"));

        let pvcs = set(
            vec![policy(
                "volumes",
                "Deny",
                json!(["DELETE"]),
                json!({"apiGroups": [""], "resources": ["persistentvolumeclaims"]}),
            )],
            vec![],
        );
        let sts = |p: &str| json!({"kind": "StatefulSet", "metadata": {"name": "db"}, "spec": {"persistentVolumeClaimRetentionPolicy": {"whenDeleted": p}}});
        let (keep, drop) = (sts("Retain"), sts("Delete"));
        let f = Facts {
            resource: "statefulsets",
            ..facts(Operation::Update { patch: None }, Some(&keep), Some(&drop))
        };
        assert!(
            refused(&decide(&pvcs, Who::LabelledAgent, &f)).contains("persistentVolumeClaimRetentionPolicy")
        );
        let f = Facts {
            resource: "statefulsets",
            ..facts(Operation::Update { patch: None }, Some(&drop), Some(&keep))
        };
        assert!(decide(&pvcs, Who::LabelledAgent, &f).allowed());
    }

    #[test]
    fn creates_are_judged_only_by_rules_that_name_create() {
        let deny = |selector: Value| {
            let mut p = policy(
                "no-new-secrets",
                "Deny",
                json!(["CREATE"]),
                json!({"apiGroups": [""], "resources": ["secrets"]}),
            );
            p.spec.policy.rules[0].object_selector = serde_json::from_value(selector).unwrap();
            p
        };
        let secret = json!({"kind": "Secret", "metadata": {"name": "x", "labels": {"tier": "prod"}}});
        let create = on("secrets", "", facts(Operation::Create, None, Some(&secret)));
        let with_deletes = |p: ClusterAgentPolicy| {
            let guard_deletes = policy(
                "secret-deletes",
                "Deny",
                json!(["DELETE", "UPDATE"]),
                json!({"apiGroups": [""], "resources": ["secrets"]}),
            );
            set(vec![p, guard_deletes], vec![])
        };
        let policies = with_deletes(deny(Value::Null));
        assert!(refused(&decide(&policies, Who::LabelledAgent, &create)).contains("no-new-secrets"));
        assert!(decide(&policies, Who::Human, &create).allowed());
        // Other resources, and the rule guarding DELETE and UPDATE only, do not see it.
        let configmap = on("configmaps", "", facts(Operation::Create, None, Some(&secret)));
        assert!(decide(&policies, Who::LabelledAgent, &configmap).allowed());
        let only_deletes = set(vec![], vec![]);
        assert!(decide(&only_deletes, Who::LabelledAgent, &create).allowed());
        // The objectSelector reads the object being created.
        let prod = with_deletes(deny(json!({"matchLabels": {"tier": "prod"}})));
        assert!(!decide(&prod, Who::LabelledAgent, &create).allowed());
        let dev = with_deletes(deny(json!({"matchLabels": {"tier": "dev"}})));
        assert!(decide(&dev, Who::LabelledAgent, &create).allowed());
        // Allow and Warn on CREATE admit; Warn says so.
        let mut warn = deny(Value::Null);
        warn.spec.policy.mode = crate::engine::api::Mode::Warn;
        let d = decide(&set(vec![warn], vec![]), Who::LabelledAgent, &create);
        assert!(d.allowed() && d.warnings.iter().any(|w| w.contains("no-new-secrets")), "{d:?}");
        // A CREATE that amounts to a DELETE (an eviction) is still judged as that DELETE.
        let pods = set(
            vec![
                deny(Value::Null),
                policy("pods", "Deny", json!(["DELETE"]), json!({"apiGroups": [""], "resources": ["pods"]})),
            ],
            vec![],
        );
        let eviction = json!({"kind": "Eviction", "metadata": {"name": "x"}});
        let evict = on("pods", "eviction", facts(Operation::Create, None, Some(&eviction)));
        assert!(refused(&decide(&pods, Who::LabelledAgent, &evict)).contains("an eviction deletes the pod"));
    }

    #[test]
    fn connections_are_guarded_only_where_a_policy_says() {
        let exec = set(
            vec![policy(
                "shell",
                "RequireApproval",
                json!(["CONNECT"]),
                json!({"apiGroups": [""], "resources": ["pods/exec"]}),
            )],
            vec![],
        );
        let options = json!({"kind": "PodExecOptions", "command": ["rm", "-rf", "/data"]});
        let f = on("pods", "exec", facts(Operation::Connect, None, Some(&options)));
        let denial = refused(&decide(&exec, Who::LabelledAgent, &f));
        assert!(denial.contains("shell") && denial.contains("connection carries no approval"), "{denial}");
        assert!(decide(&exec, Who::Human, &f).allowed());
        assert!(decide(&PolicySet::default(), Who::LabelledAgent, &f).allowed());
        let attach = on("pods", "attach", facts(Operation::Connect, None, Some(&options)));
        assert!(decide(&exec, Who::LabelledAgent, &attach).allowed(), "only pods/exec is named");
    }

    #[test]
    fn a_delete_is_judged_with_what_it_cascades_to() {
        let guarded = set(
            vec![policy(
                "data",
                "Deny",
                json!(["DELETE"]),
                json!({"apiGroups": ["apps"], "resources": ["statefulsets"]}),
            )],
            vec![],
        );
        let owner = json!({"kind": "ConfigMap", "metadata": {"name": "x"}});
        let dependent = Collateral {
            group: "apps".into(),
            resource: "statefulsets".into(),
            namespace: "prod".into(),
            name: "db".into(),
            object: json!({"metadata": {"name": "db"}}),
            via: "owned by ConfigMap \"x\"".into(),
            unseen: false,
        };
        let collateral = [dependent];
        let f = Facts {
            collateral: &collateral,
            ..on("configmaps", "", facts(Operation::Delete, Some(&owner), None))
        };
        let denial = refused(&decide(&guarded, Who::LabelledAgent, &f));
        assert!(denial.contains("owned by ConfigMap"), "{denial}");
        let alone = on("configmaps", "", facts(Operation::Delete, Some(&owner), None));
        assert!(decide(&guarded, Who::LabelledAgent, &alone).allowed());
    }

    #[test]
    fn what_a_delete_takes_of_an_unreadable_type_is_assumed_taken() {
        // Secrets agentguard may not list, guarded by name, namespace list, label and by a
        // policy of another namespace: the unseen cascade matches each in its strictest sense.
        let guarded = set(
            vec![cluster_policy(
                "named",
                json!({"action": "Deny", "rules": [{"operations": ["DELETE"], "names": ["prod-*"],
                    "namespaces": ["prod"], "objectSelector": {"matchLabels": {"tier": "data"}},
                    "resources": [{"apiGroups": [""], "resources": ["secrets"]}]}]}),
            )],
            vec![agent_policy(
                "team",
                "keys",
                json!({"action": "Deny", "rules": [{"operations": ["DELETE"],
                    "resources": [{"apiGroups": [""], "resources": ["secrets"]}]}]}),
            )],
        );
        let owner = json!({"kind": "Widget", "metadata": {"name": "w", "uid": "w1"}});
        let unseen = |namespace: &str| Collateral {
            group: String::new(),
            resource: "secrets".into(),
            namespace: namespace.into(),
            name: String::new(),
            object: Value::Null,
            via: "a dependent of Widget \"w\" (garbage collector), unseen: agentguard may not read secrets"
                .into(),
            unseen: true,
        };
        let judged = |collateral: &[Collateral], namespace: &'static str| {
            let f = Facts {
                group: "example.com",
                resource: "widgets",
                namespace,
                name: "w",
                collateral,
                ..facts(Operation::Delete, Some(&owner), None)
            };
            decide(&guarded, Who::LabelledAgent, &f)
        };
        let in_prod = [unseen("prod")];
        let denial = refused(&judged(&in_prod, "prod"));
        assert!(denial.contains("ClusterAgentPolicy \"named\""), "{denial}");
        assert!(denial.contains("agentguard may not read secrets"), "{denial}");
        // Elsewhere the namespace list does not match and the other namespace's policy is not in play.
        let in_dev = [unseen("dev")];
        assert!(judged(&in_dev, "dev").allowed());
        // A cluster-wide unseen cascade (a cluster-scoped owner) matches every namespace's rules.
        let anywhere = [unseen("")];
        let denial = refused(&judged(&anywhere, ""));
        assert!(denial.contains("named") || denial.contains("keys"), "{denial}");
        // Nothing unseen, nothing found: admitted.
        assert!(judged(&[], "prod").allowed());
    }

    #[test]
    fn a_policy_without_subjects_covers_every_agent_and_one_with_subjects_exactly_those() {
        let rule = json!([{"operations": ["DELETE"], "resources": [{"apiGroups": ["apps"], "resources": ["deployments"]}]}]);
        let policies = set(
            vec![
                cluster_policy("fail-safe", json!({"action": "Deny", "rules": rule})),
                // Names an OIDC agent, and guards something else.
                cluster_policy(
                    "oidc",
                    json!({"action": "Deny", "subjects": {"usernames": ["oidc:claude"]},
                    "rules": [{"operations": ["DELETE"], "resources": [{"apiGroups": [""], "resources": ["secrets"]}]}]}),
                ),
                cluster_policy(
                    "only-ci",
                    json!({"action": "Deny", "subjects": {"groups": ["ci-bots"]},
                    "rules": [{"operations": ["DELETE"], "resources": [{"apiGroups": [""], "resources": ["configmaps"]}]}]}),
                ),
            ],
            vec![],
        );
        let old = deployment(3);
        let f = facts(Operation::Delete, Some(&old), None);
        let dir = directory();
        let r = Requester::resolve("oidc:claude", &[], &dir, ("agentguard.io/agent", "true"));
        assert!(
            !evaluate(&f, &r, &policies, &dir, &config(), now()).allowed(),
            "the fail-safe policy covers it"
        );
        // A policy with subjects does not cover the default agents.
        let cm = json!({"metadata": {"name": "x"}});
        let f = on("configmaps", "", facts(Operation::Delete, Some(&cm), None));
        assert!(decide(&policies, Who::LabelledAgent, &f).allowed());
    }

    #[test]
    fn an_agent_policy_names_its_own_service_accounts_only() {
        let spec = json!({"action": "Deny",
            "subjects": {"serviceAccountSelector": {"matchLabels": {"team": "web"}},
                         "usernames": ["system:serviceaccount:other:x", "system:serviceaccount:web:y"],
                         "groups": ["system:authenticated"]},
            "rules": [{"operations": ["DELETE"], "resources": [{"apiGroups": ["apps"], "resources": ["deployments"]}]}]});
        let (policies, problems) = PolicySet::compile(&[], &[agent_policy("web", "p", spec)]);
        let text = format!("{problems:?}");
        assert!(
            text.contains("system:serviceaccount:other:x") && text.contains("system:authenticated"),
            "{text}"
        );
        assert!(!text.contains("system:serviceaccount:web:y"), "{text}");
        let mut dir = directory();
        dir.service_accounts.insert(
            ("elsewhere".into(), "deployer".into()),
            [("team".to_string(), "web".to_string())].into(),
        );
        let cfg = config();
        let is_agent = |user: &str, groups: &[&str]| {
            let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
            policies.is_agent(&Requester::resolve(user, &groups, &dir, ("agentguard.io/agent", "true")), &cfg)
        };
        assert!(is_agent("system:serviceaccount:web:deployer", &[]));
        assert!(is_agent("system:serviceaccount:web:y", &[]));
        assert!(!is_agent("system:serviceaccount:elsewhere:deployer", &[]), "another namespace's label");
        assert!(!is_agent("system:serviceaccount:other:x", &[]));
        assert!(!is_agent("alice", &["system:authenticated"]), "every human would be an agent");
    }

    #[test]
    fn churn_is_counted_per_agent_namespace_whatever_the_account() {
        let dir = directory();
        let who = |user: &str| Requester::resolve(user, &[], &dir, ("agentguard.io/agent", "true"));
        let fresh = who("system:serviceaccount:bots:fresh-1");
        assert_eq!(churn_subject(ChurnScope::PerAgent, &fresh, &dir), "namespace:bots");
        let coder = who("system:serviceaccount:agents:coder");
        assert_eq!(churn_subject(ChurnScope::PerAgent, &coder, &dir), "system:serviceaccount:agents:coder");
        assert_eq!(churn_subject(ChurnScope::PerNamespace, &coder, &dir), "namespace:agents");
        assert_eq!(churn_subject(ChurnScope::PerPolicy, &coder, &dir), "*");
        assert_eq!(churn_subject(ChurnScope::PerNamespace, &who("oidc:claude"), &dir), "oidc:claude");
    }

    #[test]
    fn an_update_held_as_the_delete_it_arms_can_be_approved_by_that_policys_approvers() {
        let pvs = set(
            vec![policy(
                "volumes",
                "RequireApproval",
                json!(["DELETE"]),
                json!({"apiGroups": [""], "resources": ["persistentvolumes"]}),
            )],
            vec![],
        );
        let pv = |p: &str| json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "x", "uid": "pv1", "managedFields": []}, "spec": {"persistentVolumeReclaimPolicy": p}});
        fn on_pv<'a>(old: &'a Value, new: &'a Value) -> Facts<'a> {
            Facts {
                group: "",
                resource: "persistentvolumes",
                namespace: "",
                name: "x",
                ..facts(Operation::Update { patch: None }, Some(old), Some(new))
            }
        }
        let (retain, delete) = (pv("Retain"), pv("Delete"));
        assert!(!decide(&pvs, Who::LabelledAgent, &on_pv(&retain, &delete)).allowed());
        // alice (group sre) writes the update ticket the denial printed.
        let approved = with_approval(retain.clone(), &ticket(&retain, Some(&delete), NOW), NOW);
        let d = decide(&pvs, Who::Human, &on_pv(&retain, &approved));
        assert_eq!(d.verdict, Verdict::Allow(Allowed::ApprovalAccepted), "{d:?}");
        // With the approval stored, the agent's change goes through.
        let mut armed = approved.clone();
        armed["spec"]["persistentVolumeReclaimPolicy"] = json!("Delete");
        assert!(decide(&pvs, Who::LabelledAgent, &on_pv(&approved, &armed)).allowed());
    }

    #[test]
    fn approving_a_delete_needs_an_approver_for_what_it_takes_with_it() {
        let policies = set(
            vec![
                cluster_policy(
                    "namespaces",
                    json!({"action": "RequireApproval", "approval": {"approvers": {"users": ["alice"]}},
                    "rules": [{"operations": ["DELETE"], "resources": [{"apiGroups": [""], "resources": ["namespaces"]}]}]}),
                ),
                cluster_policy(
                    "databases",
                    json!({"action": "RequireApproval", "approval": {"approvers": {"users": ["dba"]}},
                    "rules": [{"operations": ["DELETE"], "resources": [{"apiGroups": ["apps"], "resources": ["statefulsets"]}]}]}),
                ),
            ],
            vec![],
        );
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod", "uid": "ns1", "managedFields": []}});
        let value = ticket(&ns, None, NOW);
        let approved = with_approval(ns.clone(), &value, NOW);
        let db = Collateral {
            group: "apps".into(),
            resource: "statefulsets".into(),
            namespace: "prod".into(),
            name: "db".into(),
            object: json!({"metadata": {"name": "db", "namespace": "prod"}}),
            via: "in Namespace \"prod\"".into(),
            unseen: false,
        };
        let collateral = [db];
        let write = Facts {
            group: "",
            resource: "namespaces",
            namespace: "prod",
            name: "prod",
            collateral: &collateral,
            ..facts(Operation::Update { patch: Some(true) }, Some(&ns), Some(&approved))
        };
        let as_user = |user: &str| {
            let r = Requester::resolve(user, &[], &directory(), ("agentguard.io/agent", "true"));
            evaluate(&write, &r, &policies, &directory(), &config(), now())
        };
        let d = as_user("alice");
        assert!(
            refused(&d).contains("alice is not an approver under ClusterAgentPolicy \"databases\""),
            "{d:?}"
        );
        let alone = Facts { collateral: &[], ..write.clone() };
        let r = Requester::resolve("alice", &[], &directory(), ("agentguard.io/agent", "true"));
        assert!(evaluate(&alone, &r, &policies, &directory(), &config(), now()).allowed());
    }

    #[test]
    fn agents_may_not_mint_tokens_for_identities_without_brakes() {
        let request = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest"});
        let token_for = |ns: &'static str, name: &'static str| Facts {
            group: "",
            resource: "serviceaccounts",
            subresource: "token",
            namespace: ns,
            name,
            ..facts(Operation::Create, None, Some(&request))
        };
        let none = PolicySet::default();
        let d = decide(&none, Who::LabelledAgent, &token_for("agents", "ci"));
        assert!(refused(&d).contains(builtin::AGENT_IDENTITY_RULE));
        // Another agent, or any account of an agent namespace, is still held by the brakes.
        assert!(decide(&none, Who::LabelledAgent, &token_for("agents", "coder")).allowed());
        assert!(decide(&none, Who::LabelledAgent, &token_for("bots", "fresh")).allowed());
        assert!(decide(&none, Who::Human, &token_for("agents", "ci")).allowed());
    }
}
