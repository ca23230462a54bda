//! The plan of `agentguard audit`: who the agents are, the rights worth asking about for each
//! (destructive verbs on guarded resources, routes around the webhook), their severities, and
//! the access reviews to ask, cluster-wide first and per namespace only where needed. Pure.

use std::collections::BTreeSet;
use std::fmt;

use kube::api::ObjectMeta;
use serde::Serialize;

use crate::cluster::webhook::AgentSet;
use crate::engine::api::GROUP;
use crate::engine::policy::identity::service_account_name;
use crate::engine::policy::{Config, PolicySet};

/// How bad a right is for agentguard's guarantees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Deletes and updates of ordinary resources: what policies exist to guard.
    Medium,
    /// Losing data or whole environments, or acting as another ServiceAccount.
    High,
    /// Bypassing or disabling agentguard, or granting oneself anything.
    Critical,
}

impl Severity {
    pub(super) fn name(self) -> &'static str {
        match self {
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

/// A resource as RBAC names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resource {
    pub group: &'static str,
    pub resource: &'static str,
    pub subresource: &'static str,
}

pub(super) const fn res(group: &'static str, resource: &'static str) -> Resource {
    Resource { group, resource, subresource: "" }
}

pub(super) const fn sub(group: &'static str, resource: &'static str, subresource: &'static str) -> Resource {
    Resource { group, resource, subresource }
}

impl fmt::Display for Resource {
    /// `deployments.apps`, `pods/exec`, `secrets`; `*.*` is a rule on every resource of every group.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.resource)?;
        if !self.subresource.is_empty() {
            write!(f, "/{}", self.subresource)?;
        }
        if !self.group.is_empty() {
            write!(f, ".{}", self.group)?;
        }
        Ok(())
    }
}

pub(super) const RBAC: &str = "rbac.authorization.k8s.io";
pub(super) const WRITE: &[&str] = &["create", "update", "patch", "delete"];
pub(super) const DELETE: &[&str] = &["delete", "deletecollection"];
pub(super) const UPDATE: &[&str] = &["update", "patch"];
/// Kubernetes 1.32+: deleting an object that cannot be read (`ignoreStoreReadErrorWithClusterBreakingPotential`).
pub(super) const UNSAFE_DELETE: &[&str] = &["unsafe-delete-ignore-read-errors"];

/// Resources whose deletion is checked: (resource, cluster-scoped, deleting it is `high`).
pub(super) const DESTRUCTIVE: &[(Resource, bool, bool)] = &[
    (res("*", "*"), false, true),
    (res("", "namespaces"), true, true),
    (res("", "persistentvolumes"), true, true),
    (res("apiextensions.k8s.io", "customresourcedefinitions"), true, true),
    (res("", "persistentvolumeclaims"), false, true),
    (res("", "secrets"), false, true),
    (res("apps", "statefulsets"), false, true),
    (res("apps", "deployments"), false, false),
    (res("", "services"), false, false),
    (res("", "configmaps"), false, false),
];

/// Creating any of these runs a pod, as any ServiceAccount of the namespace; exec uses one.
pub(super) const RUNS_PODS: &[Resource] = &[
    res("", "pods"),
    sub("", "pods", "exec"),
    res("apps", "deployments"),
    res("apps", "statefulsets"),
    res("apps", "daemonsets"),
    res("apps", "replicasets"),
    res("batch", "jobs"),
    res("batch", "cronjobs"),
];

/// What agentguard itself runs from in its namespace.
pub(super) const SELF_NAMESPACE_WRITES: &[Resource] = &[
    res("", "configmaps"),
    res("", "pods"),
    res("", "services"),
    res("apps", "deployments"),
    res("", "serviceaccounts"),
    res(RBAC, "rolebindings"),
];

/// Subresources of a Namespace whose writes store its labels.
pub(super) const NAMESPACE_LABEL_SUBRESOURCES: &[&str] = &["status", "finalize"];

/// Where a check asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// A cluster-scoped resource: one review without a namespace.
    Cluster,
    /// A namespaced resource: cluster-wide first (a ClusterRoleBinding), then in each namespace
    /// for the verbs not allowed cluster-wide (RoleBindings).
    EachNamespace,
    /// One namespace only.
    Namespace(String),
}

/// One question about one identity: may it do any of `verbs` on `resource`, where?
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// Stable finding id (see docs/audit.md): `delete`, `update`, `impersonate`, ...
    pub id: &'static str,
    pub severity: Severity,
    pub verbs: &'static [&'static str],
    pub resource: Resource,
    /// One object only (the agent's own ServiceAccount or Namespace).
    pub name: Option<String>,
    pub scope: Scope,
    /// The right lets its holder act as another ServiceAccount of the namespace: no escape when
    /// every ServiceAccount there is an agent.
    pub becomes_service_account: bool,
}

/// Why an identity is an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Why {
    /// Its labels: the agent label, or a policy's `serviceAccountSelector`.
    Label,
    /// It lives in an agent namespace.
    AgentNamespace,
    /// `--agent-username` / `--agent-group`.
    Flag,
    /// A policy's `subjects.usernames` / `subjects.groups`.
    Policy,
    /// Not an agent: agentguard itself, whose own rights are reported beside the agents'.
    Agentguard,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Kind {
    ServiceAccount,
    User,
    Group,
}

/// An agent identity, and the subject its access reviews are asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    /// The username, or the group name for a group.
    pub identity: String,
    pub kind: Kind,
    /// A ServiceAccount's namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The groups the reviews are asked with.
    pub groups: Vec<String>,
    pub why: Vec<Why>,
}

impl Identity {
    pub(super) fn service_account(namespace: &str, name: &str, why: Vec<Why>) -> Self {
        Self {
            identity: format!("system:serviceaccount:{namespace}:{name}"),
            kind: Kind::ServiceAccount,
            namespace: Some(namespace.to_owned()),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
            why,
        }
    }

    /// The `user` of its reviews (none for a group).
    pub(super) fn user(&self) -> Option<&str> {
        (self.kind != Kind::Group).then_some(self.identity.as_str())
    }
}

/// Every agent identity to audit, in a stable order: ServiceAccounts (by namespace and name),
/// then other users, then groups. ServiceAccounts of agent namespaces are listed one by one.
pub fn agents(
    set: &AgentSet,
    service_accounts: &[ObjectMeta],
    policies: &PolicySet,
    config: &Config,
) -> Vec<Identity> {
    let policy_users: BTreeSet<&String> = policies.subject_usernames().collect();
    let policy_groups: BTreeSet<&String> = policies.subject_groups().collect();
    let named = |username: &String| {
        let mut why = Vec::new();
        if config.agent_usernames.contains(username) {
            why.push(Why::Flag);
        }
        if policy_users.contains(username) {
            why.push(Why::Policy);
        }
        why
    };
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    let mut sorted: Vec<(&str, &str, &ObjectMeta)> = service_accounts
        .iter()
        .map(|m| (m.namespace.as_deref().unwrap_or_default(), m.name.as_deref().unwrap_or_default(), m))
        .collect();
    sorted.sort_by_key(|&(ns, name, _)| (ns, name));
    for (ns, name, meta) in sorted {
        let mut why = Vec::new();
        if policies.labels_make_agent(ns, meta.labels.as_ref(), config) {
            why.push(Why::Label);
        }
        if set.namespaces.contains(ns) {
            why.push(Why::AgentNamespace);
        }
        let identity = Identity::service_account(ns, name, why);
        let by_name = named(&identity.identity);
        if set.namespaces.contains(ns) || set.usernames.contains(&identity.identity) {
            let mut identity = identity;
            identity.why.extend(by_name);
            identity.why.sort();
            seen.insert(identity.identity.clone());
            out.push(identity);
        }
    }
    for username in &set.usernames {
        if seen.contains(username) {
            continue;
        }
        // A ServiceAccount named by a flag or a policy that does not exist (yet): bindings to it may.
        out.push(match service_account_name(username) {
            Some((ns, name)) => Identity::service_account(ns, name, named(username)),
            None => Identity {
                identity: username.clone(),
                kind: Kind::User,
                namespace: None,
                groups: vec!["system:authenticated".into()],
                why: named(username),
            },
        });
    }
    for group in &set.groups {
        let mut why = Vec::new();
        if config.agent_groups.contains(group) {
            why.push(Why::Flag);
        }
        if policy_groups.contains(group) {
            why.push(Why::Policy);
        }
        out.push(Identity {
            identity: group.clone(),
            kind: Kind::Group,
            namespace: None,
            groups: vec![group.clone(), "system:authenticated".into()],
            why,
        });
    }
    out
}

/// The checks asked about one identity. `webhook_configuration` names agentguard's own
/// ValidatingWebhookConfiguration.
pub fn checks(identity: &Identity, self_namespace: &str, webhook_configuration: &str) -> Vec<Check> {
    let mut out = Vec::new();
    let mut add = |id, severity, verbs, resource, scope: Scope| {
        out.push(Check { id, severity, verbs, resource, name: None, scope, becomes_service_account: false })
    };
    let each = || Scope::EachNamespace;
    for &(resource, cluster_scoped, high) in DESTRUCTIVE {
        let scope = if cluster_scoped { Scope::Cluster } else { Scope::EachNamespace };
        let delete = if high { Severity::High } else { Severity::Medium };
        add("delete", delete, DELETE, resource, scope.clone());
        add("update", Severity::Medium, UPDATE, resource, scope.clone());
        add("unsafe-delete", Severity::Critical, UNSAFE_DELETE, resource, scope);
    }
    let critical = Severity::Critical;
    add("impersonate", critical, &["impersonate"], res("", "users"), Scope::Cluster);
    add("impersonate", critical, &["impersonate"], res("", "groups"), Scope::Cluster);
    add("escalate", critical, &["escalate"], res(RBAC, "roles"), each());
    add("escalate", critical, &["escalate"], res(RBAC, "clusterroles"), Scope::Cluster);
    add("bind", critical, &["bind"], res(RBAC, "roles"), each());
    // A RoleBinding may reference a ClusterRole: `bind` on clusterroles counts per namespace too.
    add("bind", critical, &["bind"], res(RBAC, "clusterroles"), each());
    add("rbac-write", critical, WRITE, res(RBAC, "roles"), each());
    add("rbac-write", critical, WRITE, res(RBAC, "rolebindings"), each());
    add("rbac-write", critical, WRITE, res(RBAC, "clusterroles"), Scope::Cluster);
    add("rbac-write", critical, WRITE, res(RBAC, "clusterrolebindings"), Scope::Cluster);
    let admission = "admissionregistration.k8s.io";
    add("webhook-write", critical, WRITE, res(admission, "validatingwebhookconfigurations"), Scope::Cluster);
    add("webhook-write", critical, WRITE, res(admission, "mutatingwebhookconfigurations"), Scope::Cluster);
    add("policy-write", critical, WRITE, res(GROUP, "clusteragentpolicies"), Scope::Cluster);
    add("policy-write", critical, WRITE, res(GROUP, "agentpolicies"), each());
    let own = || Scope::Namespace(self_namespace.to_owned());
    add(
        "self-namespace",
        critical,
        &["get", "list", "create", "update", "patch", "delete"],
        res("", "secrets"),
        own(),
    );
    for &resource in SELF_NAMESPACE_WRITES {
        add("self-namespace", critical, WRITE, resource, own());
    }
    add("impersonate", critical, &["impersonate"], res("", "serviceaccounts"), each());
    add("token-create", Severity::High, &["create"], sub("", "serviceaccounts", "token"), each());
    for &resource in RUNS_PODS {
        add("pod-create", Severity::High, &["create"], resource, each());
    }
    // Status and finalize of a Namespace store its labels too: relabelling through them takes a
    // namespace out of a policy's namespaceSelector, or an agent namespace out of agentguard's sight.
    for subresource in NAMESPACE_LABEL_SUBRESOURCES {
        add("status-label", Severity::High, UPDATE, sub("", "namespaces", subresource), Scope::Cluster);
    }
    for check in &mut out {
        check.becomes_service_account = matches!(check.id, "token-create" | "pod-create")
            || (check.id == "impersonate" && check.resource.resource == "serviceaccounts");
    }
    // agentguard's own configuration, by name: a Role may grant it alone (resourceNames), which
    // the unnamed `webhook-write` check does not see. Its writes never reach a webhook; agentguard
    // restores them after the fact.
    out.push(Check {
        id: "own-webhook",
        severity: critical,
        verbs: &["update", "patch", "delete"],
        resource: res(admission, "validatingwebhookconfigurations"),
        name: Some(webhook_configuration.to_owned()),
        scope: Scope::Cluster,
        becomes_service_account: false,
    });
    if let (Kind::ServiceAccount, Some(ns)) = (identity.kind, &identity.namespace) {
        // Relabelling itself (or its agent namespace) would take the agent out of agentguard's sight.
        if identity.why.contains(&Why::Label) {
            let name = identity.identity.rsplit(':').next().map(str::to_owned);
            out.push(Check {
                id: "own-label",
                severity: critical,
                verbs: UPDATE,
                resource: res("", "serviceaccounts"),
                name,
                scope: Scope::Namespace(ns.clone()),
                becomes_service_account: false,
            });
        }
        if identity.why.contains(&Why::AgentNamespace) {
            let own = [res("", "namespaces")]
                .into_iter()
                .chain(NAMESPACE_LABEL_SUBRESOURCES.iter().map(|s| sub("", "namespaces", s)));
            for resource in own {
                out.push(Check {
                    id: "own-label",
                    severity: critical,
                    verbs: UPDATE,
                    resource,
                    name: Some(ns.clone()),
                    scope: Scope::Cluster,
                    becomes_service_account: false,
                });
            }
        }
    }
    out
}

/// What agentguard's own ServiceAccount is asked about: the rights whose theft would hurt most.
/// Reading Secrets is reported, not hidden: the ownership view lists every resource type a
/// DELETE rule guards (see `readableResources` in the chart).
pub fn own_checks() -> Vec<Check> {
    let mut out = Vec::new();
    let mut add = |id, severity, verbs, resource, scope: Scope| {
        out.push(Check { id, severity, verbs, resource, name: None, scope, becomes_service_account: false })
    };
    let (critical, each) = (Severity::Critical, || Scope::EachNamespace);
    add("read-secrets", Severity::High, &["get", "list", "watch"], res("", "secrets"), each());
    for &(resource, cluster_scoped, _) in DESTRUCTIVE {
        let scope = if cluster_scoped { Scope::Cluster } else { Scope::EachNamespace };
        add("delete", Severity::High, DELETE, resource, scope);
    }
    add("impersonate", critical, &["impersonate"], res("", "users"), Scope::Cluster);
    add("impersonate", critical, &["impersonate"], res("", "groups"), Scope::Cluster);
    add("impersonate", critical, &["impersonate"], res("", "serviceaccounts"), each());
    add("escalate", critical, &["escalate"], res(RBAC, "clusterroles"), Scope::Cluster);
    add("bind", critical, &["bind"], res(RBAC, "clusterroles"), each());
    add("rbac-write", critical, WRITE, res(RBAC, "clusterroles"), Scope::Cluster);
    add("rbac-write", critical, WRITE, res(RBAC, "clusterrolebindings"), Scope::Cluster);
    add("rbac-write", critical, WRITE, res(RBAC, "rolebindings"), each());
    let admission = "admissionregistration.k8s.io";
    // Its own configuration is granted by name; any other is not its business.
    add("webhook-write", critical, WRITE, res(admission, "validatingwebhookconfigurations"), Scope::Cluster);
    add("webhook-write", critical, WRITE, res(admission, "mutatingwebhookconfigurations"), Scope::Cluster);
    out
}

/// One access review: identity and check indexes, verb, and namespace (`None`: cluster-wide, or
/// a cluster-scoped resource).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ask {
    pub identity: usize,
    pub check: usize,
    pub verb: &'static str,
    pub namespace: Option<String>,
}

/// The first round: every verb of every check, cluster-wide or in its one namespace.
pub fn first_round(plan: &[Vec<Check>]) -> Vec<Ask> {
    let mut out = Vec::new();
    for (identity, checks) in plan.iter().enumerate() {
        for (index, check) in checks.iter().enumerate() {
            let namespace = match &check.scope {
                Scope::Namespace(ns) => Some(ns.clone()),
                Scope::Cluster | Scope::EachNamespace => None,
            };
            for &verb in check.verbs {
                out.push(Ask { identity, check: index, verb, namespace: namespace.clone() });
            }
        }
    }
    out
}

/// The second round: per namespace, the namespaced verbs the first round did not allow.
pub fn second_round(plan: &[Vec<Check>], first: &[(Ask, bool)], namespaces: &[String]) -> Vec<Ask> {
    let mut out = Vec::new();
    for (ask, allowed) in first {
        if *allowed || plan[ask.identity][ask.check].scope != Scope::EachNamespace {
            continue;
        }
        for ns in namespaces {
            out.push(Ask { namespace: Some(ns.clone()), ..ask.clone() });
        }
    }
    out
}
