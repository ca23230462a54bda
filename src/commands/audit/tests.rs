//! Unit tests of the audit plan, findings and rendering.

use super::*;
use crate::cluster::caches::tests::meta;
use crate::engine::api::{AGENT_LABEL, AGENT_NAMESPACE_LABEL};
use crate::engine::policy::Config;

fn policy_naming(usernames: &[&str], groups: &[&str]) -> PolicySet {
    let policy: ClusterAgentPolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "agentguard.io/v1alpha1", "kind": "ClusterAgentPolicy", "metadata": {"name": "p"},
        "spec": {
            "subjects": {"usernames": usernames, "groups": groups},
            "action": "Deny",
            "rules": [{"operations": ["DELETE"], "resources": [{"apiGroups": [""], "resources": ["secrets"]}]}]
        }
    }))
    .unwrap();
    PolicySet::compile(&[policy], &[]).0
}

fn sa(ns: &str, name: &str, why: &[Why]) -> Identity {
    Identity::service_account(ns, name, why.to_vec())
}

#[test]
fn agents_are_the_identities_the_webhook_guards() {
    let policies = policy_naming(&["oidc:bot", "system:serviceaccount:ci:ghost"], &["bots"]);
    let config = Config {
        agent_usernames: vec!["oidc:bot".into()],
        agent_groups: vec!["ai".into()],
        ..Config::default()
    };
    let namespaces = [meta(None, "sandbox", &[(AGENT_NAMESPACE_LABEL, "true")]), meta(None, "web", &[])];
    let service_accounts = [
        meta(Some("web"), "deployer", &[]),
        meta(Some("web"), "coder", &[(AGENT_LABEL, "true")]),
        meta(Some("sandbox"), "default", &[]),
        meta(Some("sandbox"), "labelled", &[(AGENT_LABEL, "true")]),
    ];
    let set = crate::cluster::caches::agent_set(&policies, &config, &namespaces, &service_accounts);
    let got = agents(&set, &service_accounts, &policies, &config);
    let summary: Vec<(&str, Kind, &[Why])> =
        got.iter().map(|i| (i.identity.as_str(), i.kind, i.why.as_slice())).collect();
    assert_eq!(
        summary,
        [
            ("system:serviceaccount:sandbox:default", Kind::ServiceAccount, &[Why::AgentNamespace][..]),
            (
                "system:serviceaccount:sandbox:labelled",
                Kind::ServiceAccount,
                &[Why::Label, Why::AgentNamespace]
            ),
            ("system:serviceaccount:web:coder", Kind::ServiceAccount, &[Why::Label]),
            ("oidc:bot", Kind::User, &[Why::Flag, Why::Policy]),
            // Named by a policy, not created yet: what is bound to it still counts.
            ("system:serviceaccount:ci:ghost", Kind::ServiceAccount, &[Why::Policy]),
            ("ai", Kind::Group, &[Why::Flag]),
            ("bots", Kind::Group, &[Why::Policy]),
        ]
    );
    assert_eq!(
        got[2].groups,
        ["system:serviceaccounts", "system:serviceaccounts:web", "system:authenticated"]
    );
    assert_eq!(got[2].user(), Some("system:serviceaccount:web:coder"));
    assert_eq!(got[3].groups, ["system:authenticated"]);
    assert_eq!(got[5].user(), None);
    assert_eq!(got[5].groups, ["ai", "system:authenticated"]);
}

fn find<'a>(checks: &'a [Check], id: &str, resource: &str) -> Vec<&'a Check> {
    checks.iter().filter(|c| c.id == id && c.resource.to_string() == resource).collect()
}

#[test]
fn severities_follow_what_a_right_lets_an_agent_do() {
    let checks = checks(&sa("web", "coder", &[Why::Label]), "agentguard-system", "agentguard");
    let severity = |id: &str, resource: &str| {
        let found = find(&checks, id, resource);
        assert_eq!(found.len(), 1, "{id} {resource}: {found:?}");
        found[0].severity
    };
    use Severity::*;
    for (id, resource, want) in [
        ("delete", "namespaces", High),
        ("delete", "secrets", High),
        ("delete", "persistentvolumeclaims", High),
        ("delete", "customresourcedefinitions.apiextensions.k8s.io", High),
        ("delete", "*.*", High),
        ("delete", "deployments.apps", Medium),
        ("delete", "configmaps", Medium),
        ("update", "secrets", Medium),
        ("unsafe-delete", "persistentvolumes", Critical),
        ("impersonate", "users", Critical),
        ("impersonate", "serviceaccounts", Critical),
        ("escalate", "roles.rbac.authorization.k8s.io", Critical),
        ("bind", "clusterroles.rbac.authorization.k8s.io", Critical),
        ("rbac-write", "clusterrolebindings.rbac.authorization.k8s.io", Critical),
        ("webhook-write", "validatingwebhookconfigurations.admissionregistration.k8s.io", Critical),
        ("own-webhook", "validatingwebhookconfigurations.admissionregistration.k8s.io", Critical),
        ("status-label", "namespaces/status", High),
        ("status-label", "namespaces/finalize", High),
        ("policy-write", "agentpolicies.agentguard.io", Critical),
        ("self-namespace", "secrets", Critical),
        ("own-label", "serviceaccounts", Critical),
        ("token-create", "serviceaccounts/token", High),
        ("pod-create", "pods", High),
        ("pod-create", "jobs.batch", High),
    ] {
        assert_eq!(severity(id, resource), want, "{id} {resource}");
    }
    let own = find(&checks, "own-label", "serviceaccounts")[0];
    assert_eq!((own.name.as_deref(), &own.scope), (Some("coder"), &Scope::Namespace("web".into())));
    assert_eq!(
        find(&checks, "self-namespace", "pods")[0].scope,
        Scope::Namespace("agentguard-system".into())
    );
    assert_eq!(find(&checks, "delete", "namespaces")[0].scope, Scope::Cluster);
    assert_eq!(find(&checks, "delete", "secrets")[0].scope, Scope::EachNamespace);
    assert!(find(&checks, "pod-create", "pods/exec")[0].becomes_service_account);
    assert!(!find(&checks, "impersonate", "users")[0].becomes_service_account);
    assert!(find(&checks, "own-label", "namespaces").is_empty());

    // In an agent namespace, relabelling the namespace is the way out; users have no label.
    let in_sandbox =
        super::checks(&sa("sandbox", "default", &[Why::AgentNamespace]), "agentguard-system", "agentguard");
    for resource in ["namespaces", "namespaces/status", "namespaces/finalize"] {
        let own = find(&in_sandbox, "own-label", resource);
        assert_eq!((own[0].name.as_deref(), &own[0].scope), (Some("sandbox"), &Scope::Cluster), "{resource}");
        assert_eq!(own[0].verbs, UPDATE, "{resource}");
    }
    // Who could change agentguard's own webhook configuration, by its name.
    let own = find(&checks, "own-webhook", "validatingwebhookconfigurations.admissionregistration.k8s.io");
    assert_eq!((own[0].name.as_deref(), &own[0].scope), (Some("agentguard"), &Scope::Cluster));
    assert_eq!(own[0].verbs, ["update", "patch", "delete"]);
    assert!(find(&checks, "own-label", "namespaces/status").is_empty());
    assert!(find(&in_sandbox, "own-label", "serviceaccounts").is_empty());
    let user = Identity {
        identity: "oidc:bot".into(),
        kind: Kind::User,
        namespace: None,
        groups: vec![],
        why: vec![Why::Flag],
    };
    assert!(super::checks(&user, "agentguard-system", "agentguard").iter().all(|c| c.id != "own-label"));
}

fn check(
    id: &'static str,
    severity: Severity,
    verbs: &'static [&'static str],
    resource: Resource,
    scope: Scope,
) -> Check {
    Check { id, severity, verbs, resource, name: None, scope, becomes_service_account: id == "pod-create" }
}

#[test]
fn namespaces_are_asked_only_for_what_is_not_allowed_cluster_wide() {
    let plan = vec![vec![
        check("delete", Severity::High, DELETE, res("", "secrets"), Scope::EachNamespace),
        check("delete", Severity::High, DELETE, res("", "namespaces"), Scope::Cluster),
        check("self-namespace", Severity::Critical, WRITE, res("", "pods"), Scope::Namespace("ag".into())),
    ]];
    let first = first_round(&plan);
    assert_eq!(first.len(), 2 + 2 + 4);
    assert!(first[..4].iter().all(|a| a.namespace.is_none()));
    assert!(first[4..].iter().all(|a| a.namespace.as_deref() == Some("ag")));
    // Only `delete` on secrets is allowed cluster-wide; nothing cluster-scoped or pinned fans out.
    let answered: Vec<(Ask, bool)> =
        first.into_iter().map(|a| (a.clone(), a.check == 0 && a.verb == "delete")).collect();
    let second = second_round(&plan, &answered, &["a".into(), "b".into()]);
    let got: Vec<(usize, &str, Option<&str>)> =
        second.iter().map(|a| (a.check, a.verb, a.namespace.as_deref())).collect();
    assert_eq!(got, [(0, "deletecollection", Some("a")), (0, "deletecollection", Some("b"))]);
}

fn ask(check: usize, verb: &'static str, namespace: Option<&str>) -> Ask {
    Ask { identity: 0, check, verb, namespace: namespace.map(Into::into) }
}

#[test]
fn findings_merge_resources_group_namespaces_and_spare_agent_namespaces() {
    let checks = vec![
        check("delete", Severity::High, DELETE, res("", "secrets"), Scope::EachNamespace),
        check("delete", Severity::High, DELETE, res("", "persistentvolumeclaims"), Scope::EachNamespace),
        check("delete", Severity::Medium, DELETE, res("apps", "deployments"), Scope::EachNamespace),
        check("pod-create", Severity::High, &["create"], res("", "pods"), Scope::EachNamespace),
        check("impersonate", Severity::Critical, &["impersonate"], res("", "users"), Scope::Cluster),
    ];
    let answers = [
        (ask(0, "delete", None), true),
        (ask(0, "deletecollection", None), true),
        (ask(1, "delete", None), true),
        (ask(1, "deletecollection", None), true),
        (ask(2, "delete", None), false),
        (ask(2, "delete", Some("a")), true),
        (ask(2, "delete", Some("b")), true),
        (ask(2, "deletecollection", Some("b")), true),
        (ask(2, "delete", Some("c")), false),
        (ask(3, "create", Some("a")), true),
        (ask(3, "create", Some("sandbox")), true),
        (ask(4, "impersonate", None), false),
    ];
    let answers: Vec<(&Ask, bool)> = answers.iter().map(|(a, y)| (a, *y)).collect();
    let got = findings(&checks, &answers, &["sandbox".to_string()].into());
    let ns = |list: &[&str]| Where::Namespaces(list.iter().map(|s| s.to_string()).collect());
    let want = [
        Finding {
            check: "delete",
            severity: Severity::High,
            verbs: vec!["delete", "deletecollection"],
            resources: vec!["secrets".into(), "persistentvolumeclaims".into()],
            scope: Where::Cluster,
            note: None,
        },
        Finding {
            check: "pod-create",
            severity: Severity::High,
            verbs: vec!["create"],
            resources: vec!["pods".into()],
            scope: ns(&["a"]),
            note: None,
        },
        Finding {
            check: "delete",
            severity: Severity::Medium,
            verbs: vec!["delete"],
            resources: vec!["deployments.apps".into()],
            scope: ns(&["a"]),
            note: None,
        },
        Finding {
            check: "delete",
            severity: Severity::Medium,
            verbs: vec!["delete", "deletecollection"],
            resources: vec!["deployments.apps".into()],
            scope: ns(&["b"]),
            note: None,
        },
        Finding {
            check: "pod-create",
            severity: Severity::Medium,
            verbs: vec!["create"],
            resources: vec!["pods".into()],
            scope: ns(&["sandbox"]),
            note: Some(IN_AGENT_NAMESPACE),
        },
    ];
    assert_eq!(got, want);
}

fn sample() -> Report {
    let finding = |check, severity, verbs: &[&'static str], resources: &[&str], scope| Finding {
        check,
        severity,
        verbs: verbs.to_vec(),
        resources: resources.iter().map(|s| s.to_string()).collect(),
        scope,
        note: None,
    };
    let many: Vec<String> = ["a", "b", "c", "d", "e"].map(String::from).to_vec();
    Report {
        own: None,
        agents: vec![
            AgentReport {
                identity: sa("web", "coder", &[Why::Label]),
                findings: vec![
                    finding("impersonate", Severity::Critical, &["impersonate"], &["users"], Where::Cluster),
                    finding(
                        "delete",
                        Severity::Medium,
                        &["delete"],
                        &["deployments.apps"],
                        Where::Namespaces(many),
                    ),
                ],
            },
            AgentReport { identity: sa("sandbox", "default", &[Why::AgentNamespace]), findings: vec![] },
        ],
        agent_namespaces: vec!["sandbox".into()],
        namespaces: 7,
        access_reviews: 120,
    }
}

#[test]
fn exit_code_follows_the_threshold() {
    let report = sample();
    assert_eq!(report.exit_code(FailOn::Critical), EXIT_FINDINGS);
    assert_eq!(report.exit_code(FailOn::Medium), EXIT_FINDINGS);
    assert_eq!(report.exit_code(FailOn::None), 0);
    let mut mild = report.clone();
    mild.agents[0].findings.remove(0);
    assert_eq!(mild.exit_code(FailOn::Critical), 0);
    assert_eq!(mild.exit_code(FailOn::High), 0);
    assert_eq!(mild.exit_code(FailOn::Medium), EXIT_FINDINGS);
    mild.agents[0].findings.clear();
    assert_eq!(mild.exit_code(FailOn::Medium), 0);
}

#[test]
fn table_and_summary() {
    let report = sample();
    assert_eq!(
        report.table(),
        "agent namespaces (every ServiceAccount in them is an agent): sandbox\n\
         IDENTITY                               SEVERITY  SCOPE                       FINDING\n\
         system:serviceaccount:web:coder        critical  cluster-wide                impersonate: impersonate users\n\
         system:serviceaccount:web:coder        medium    namespaces a, b, c +2 more  delete: delete deployments.apps\n\
         system:serviceaccount:sandbox:default  -         -                           no rights that matter\n"
    );
    assert_eq!(
        report.summary(),
        "audit: 2 agents, 2 findings (1 critical, 0 high, 1 medium); 120 access reviews over 7 namespaces"
    );
}

#[test]
fn json_field_names_are_stable() {
    let json = sample().json();
    assert_eq!(
        json["agents"][0],
        serde_json::json!({
            "identity": "system:serviceaccount:web:coder",
            "kind": "ServiceAccount",
            "namespace": "web",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:web", "system:authenticated"],
            "why": ["label"],
            "findings": [
                {"check": "impersonate", "severity": "critical", "verbs": ["impersonate"], "resources": ["users"],
                 "scope": "cluster", "namespaces": [], "note": null},
                {"check": "delete", "severity": "medium", "verbs": ["delete"], "resources": ["deployments.apps"],
                 "scope": "namespaces", "namespaces": ["a", "b", "c", "d", "e"], "note": null},
            ],
        })
    );
    assert_eq!(json["agents"][1]["why"], serde_json::json!(["agent-namespace"]));
    assert_eq!(json["agentNamespaces"], serde_json::json!(["sandbox"]));
    assert_eq!(
        json["summary"],
        serde_json::json!({"agents": 2, "findings": 2, "critical": 1, "high": 0, "medium": 1,
                           "namespaces": 7, "accessReviews": 120})
    );
}

#[test]
fn access_reviews_name_the_subject_and_the_attributes() {
    let identity = sa("web", "coder", &[Why::Label]);
    let checks = checks(&identity, "agentguard-system", "agentguard");
    let own = checks.iter().position(|c| c.id == "own-label").unwrap();
    let sar = review(
        &identity,
        &checks[own],
        &Ask { identity: 0, check: own, verb: "patch", namespace: Some("web".into()) },
    );
    let spec = serde_json::to_value(&sar.spec).unwrap();
    assert_eq!(
        spec,
        serde_json::json!({
            "user": "system:serviceaccount:web:coder",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:web", "system:authenticated"],
            "resourceAttributes": {"verb": "patch", "group": "", "resource": "serviceaccounts",
                                   "namespace": "web", "name": "coder"},
        })
    );
    let token = checks.iter().position(|c| c.id == "token-create").unwrap();
    let sar = review(
        &identity,
        &checks[token],
        &Ask { identity: 0, check: token, verb: "create", namespace: None },
    );
    let attributes = sar.spec.resource_attributes.unwrap();
    assert_eq!(
        (attributes.resource.as_deref(), attributes.subresource.as_deref()),
        (Some("serviceaccounts"), Some("token"))
    );
    assert_eq!(attributes.namespace, None);
    let group = Identity {
        identity: "bots".into(),
        kind: Kind::Group,
        namespace: None,
        groups: vec!["bots".into()],
        why: vec![],
    };
    assert_eq!(
        review(&group, &checks[token], &Ask { identity: 0, check: token, verb: "create", namespace: None })
            .spec
            .user,
        None
    );
}

#[test]
fn agentguards_own_rights_are_reported_beside_the_agents_and_never_fail_the_audit() {
    let own = sa("agentguard-system", "agentguard", &[Why::Agentguard]);
    let ids: Vec<&str> = own_checks().iter().map(|c| c.id).collect();
    for id in ["read-secrets", "rbac-write", "escalate", "bind", "impersonate", "webhook-write", "delete"] {
        assert!(ids.contains(&id), "{id} not asked");
    }
    let finding = Finding {
        check: "rbac-write",
        severity: Severity::Critical,
        verbs: vec!["create"],
        resources: vec!["clusterrolebindings".into()],
        scope: Where::Cluster,
        note: None,
    };
    let report = Report {
        agents: vec![AgentReport { identity: sa("web", "coder", &[Why::Label]), findings: vec![] }],
        own: Some(AgentReport { identity: own, findings: vec![finding] }),
        agent_namespaces: vec![],
        namespaces: 1,
        access_reviews: 10,
    };
    assert!(
        report.table().contains("system:serviceaccount:agentguard-system:agentguard  critical"),
        "{}",
        report.table()
    );
    assert!(report.summary().starts_with("audit: 1 agents, 0 findings"), "{}", report.summary());
    assert!(
        report
            .summary()
            .ends_with("agentguard itself (system:serviceaccount:agentguard-system:agentguard): 1 findings")
    );
    assert_eq!(report.json()["agentguard"]["findings"][0]["check"], "rbac-write");
    assert_eq!(report.exit_code(FailOn::Critical), 0, "agentguard's own rights are reported, not failed on");
}
