//! `agentguard audit`: every agent identity, and the rights RBAC gives it that matter to
//! agentguard — destructive verbs on the resources worth guarding, and the escape routes around
//! the webhook (impersonation, tokens and pods of other ServiceAccounts, RBAC escalation, writes
//! to webhook configurations, policies, agentguard's namespace or the agent's own label).
//!
//! The API server is asked, one `SubjectAccessReview` per (identity, verb, resource, namespace),
//! rather than RBAC objects being read and evaluated here: the authorizer chain is the only
//! ground truth (aggregated ClusterRoles, `escalate`/`bind` semantics, wildcard and subresource
//! matching, authorizers other than RBAC such as webhooks or Node), and a re-implementation
//! would drift from it silently. The cost is request count, kept down by asking cluster-wide
//! first and per namespace only for what is not allowed cluster-wide, at most
//! [`CONCURRENCY`] at a time.
//!
//! Who is an agent comes from [`crate::cluster::caches::agent_set`], the function the webhook uses.
//! Everything but [`run`]'s requests is pure: the plan of access reviews, severities, the
//! findings made of the answers, table and JSON rendering and the exit code.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::Client;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::Serialize;

use crate::cluster::webhook::AgentSet;
use crate::commands::options::EngineArgs;
use crate::engine::api::{AgentPolicy, ClusterAgentPolicy, GROUP};
use crate::engine::policy::identity::service_account_name;
use crate::engine::policy::{Config, PolicySet};

/// Access reviews in flight at once.
pub const CONCURRENCY: usize = 16;

/// Where agentguard runs when `--self-namespace` is not given: the namespace the README installs
/// the chart into.
pub const DEFAULT_SELF_NAMESPACE: &str = "agentguard-system";

/// `agentguard audit` flags. The engine flags are `serve`'s, so the same environment yields the
/// same agents.
#[derive(Args, Debug)]
pub struct AuditArgs {
    /// Kubeconfig file (default: KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (default: the current one).
    #[arg(long, env = "AGENTGUARD_AUDIT_CONTEXT")]
    pub context: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', env = "AGENTGUARD_AUDIT_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Exit 1 when a finding has at least this severity (`none`: never).
    #[arg(long, env = "AGENTGUARD_AUDIT_FAIL_ON", value_enum, default_value_t = FailOn::Critical)]
    pub fail_on: FailOn,
    /// agentguard's own ServiceAccount (in `--self-namespace`), whose rights are reported beside
    /// the agents' (a guard's credentials are worth stealing too).
    #[arg(long, env = "AGENTGUARD_SELF_SERVICE_ACCOUNT", default_value = "agentguard")]
    pub self_service_account: String,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

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
    fn name(self) -> &'static str {
        match self {
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FailOn {
    None,
    Medium,
    High,
    Critical,
}

impl FailOn {
    fn threshold(self) -> Option<Severity> {
        match self {
            FailOn::None => None,
            FailOn::Medium => Some(Severity::Medium),
            FailOn::High => Some(Severity::High),
            FailOn::Critical => Some(Severity::Critical),
        }
    }
}

/// Exit codes: findings at or above the threshold, and an audit that could not be completed.
pub const EXIT_FINDINGS: u8 = 1;
pub const EXIT_ERROR: u8 = 2;

/// A resource as RBAC names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resource {
    pub group: &'static str,
    pub resource: &'static str,
    pub subresource: &'static str,
}

const fn res(group: &'static str, resource: &'static str) -> Resource {
    Resource { group, resource, subresource: "" }
}

const fn sub(group: &'static str, resource: &'static str, subresource: &'static str) -> Resource {
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

const RBAC: &str = "rbac.authorization.k8s.io";
const WRITE: &[&str] = &["create", "update", "patch", "delete"];
const DELETE: &[&str] = &["delete", "deletecollection"];
const UPDATE: &[&str] = &["update", "patch"];
/// Kubernetes 1.32+: deleting an object that cannot be read (`ignoreStoreReadErrorWithClusterBreakingPotential`).
const UNSAFE_DELETE: &[&str] = &["unsafe-delete-ignore-read-errors"];

/// Resources whose deletion is checked: (resource, cluster-scoped, deleting it is `high`).
const DESTRUCTIVE: &[(Resource, bool, bool)] = &[
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
const RUNS_PODS: &[Resource] = &[
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
const SELF_NAMESPACE_WRITES: &[Resource] = &[
    res("", "configmaps"),
    res("", "pods"),
    res("", "services"),
    res("apps", "deployments"),
    res("", "serviceaccounts"),
    res(RBAC, "rolebindings"),
];

/// Subresources of a Namespace whose writes store its labels.
const NAMESPACE_LABEL_SUBRESOURCES: &[&str] = &["status", "finalize"];

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
    fn service_account(namespace: &str, name: &str, why: Vec<Why>) -> Self {
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
    fn user(&self) -> Option<&str> {
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

/// Where a finding holds.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Where {
    /// Every namespace (a ClusterRoleBinding), or a cluster-scoped resource.
    Cluster,
    Namespaces(Vec<String>),
}

/// Rights of one kind that an identity holds in one place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub check: &'static str,
    pub severity: Severity,
    pub verbs: Vec<&'static str>,
    pub resources: Vec<String>,
    pub scope: Where,
    pub note: Option<&'static str>,
}

const IN_AGENT_NAMESPACE: &str = "only in agent namespaces, whose every ServiceAccount is an agent";

/// The findings for one identity, from the answers about its checks. Findings of the same check,
/// severity, verbs and scope are merged into one listing every resource; the most severe first.
pub fn findings(
    checks: &[Check],
    answers: &[(&Ask, bool)],
    agent_namespaces: &BTreeSet<String>,
) -> Vec<Finding> {
    // check → place → verbs allowed there.
    let mut allowed: BTreeMap<usize, BTreeMap<Option<&str>, BTreeSet<&'static str>>> = BTreeMap::new();
    for (ask, yes) in answers {
        if *yes {
            allowed
                .entry(ask.check)
                .or_default()
                .entry(ask.namespace.as_deref())
                .or_default()
                .insert(ask.verb);
        }
    }
    let mut raw: Vec<Finding> = Vec::new();
    for (index, places) in allowed {
        let check = &checks[index];
        let in_order = |verbs: &BTreeSet<&'static str>| -> Vec<&'static str> {
            check.verbs.iter().copied().filter(|v| verbs.contains(v)).collect()
        };
        // verbs → namespaces holding exactly those verbs, split by whether the namespace is an agent one.
        let mut by_verbs: BTreeMap<(Vec<&'static str>, bool), Vec<String>> = BTreeMap::new();
        for (place, verbs) in &places {
            match place {
                None => raw.push(Finding {
                    check: check.id,
                    severity: check.severity,
                    verbs: in_order(verbs),
                    resources: vec![check.resource.to_string()],
                    scope: Where::Cluster,
                    note: None,
                }),
                Some(ns) => {
                    let harmless = check.becomes_service_account && agent_namespaces.contains(*ns);
                    by_verbs.entry((in_order(verbs), harmless)).or_default().push((*ns).to_owned());
                }
            }
        }
        for ((verbs, harmless), namespaces) in by_verbs {
            raw.push(Finding {
                check: check.id,
                severity: if harmless { Severity::Medium } else { check.severity },
                verbs,
                resources: vec![check.resource.to_string()],
                scope: Where::Namespaces(namespaces),
                note: harmless.then_some(IN_AGENT_NAMESPACE),
            });
        }
    }
    let mut merged: Vec<Finding> = Vec::new();
    for f in raw {
        match merged.iter_mut().find(|m| {
            (m.check, m.severity, &m.verbs, &m.scope, m.note)
                == (f.check, f.severity, &f.verbs, &f.scope, f.note)
        }) {
            Some(m) => m.resources.extend(f.resources),
            None => merged.push(f),
        }
    }
    merged.sort_by_key(|f| std::cmp::Reverse(f.severity));
    merged
}

/// An audited identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentReport {
    pub identity: Identity,
    pub findings: Vec<Finding>,
}

/// The whole audit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub agents: Vec<AgentReport>,
    /// agentguard's own ServiceAccount: reported, never counted in the exit code.
    pub own: Option<AgentReport>,
    pub agent_namespaces: Vec<String>,
    pub namespaces: usize,
    pub access_reviews: usize,
}

impl Report {
    fn count(&self, severity: Severity) -> usize {
        self.agents.iter().flat_map(|a| &a.findings).filter(|f| f.severity == severity).count()
    }

    fn findings(&self) -> usize {
        self.agents.iter().map(|a| a.findings.len()).sum()
    }

    /// `audit: N agents, M findings (c critical, h high, m medium); R access reviews over K
    /// namespaces`, then agentguard's own findings when it was audited.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "audit: {} agents, {} findings ({} critical, {} high, {} medium); {} access reviews over {} namespaces",
            self.agents.len(),
            self.findings(),
            self.count(Severity::Critical),
            self.count(Severity::High),
            self.count(Severity::Medium),
            self.access_reviews,
            self.namespaces,
        );
        if let Some(own) = &self.own {
            line.push_str(&format!(
                "; agentguard itself ({}): {} findings",
                own.identity.identity,
                own.findings.len()
            ));
        }
        line
    }

    /// 0, or [`EXIT_FINDINGS`] when a finding reaches the threshold.
    pub fn exit_code(&self, fail_on: FailOn) -> u8 {
        let worst = self.agents.iter().flat_map(|a| &a.findings).map(|f| f.severity).max();
        match (fail_on.threshold(), worst) {
            (Some(threshold), Some(worst)) if worst >= threshold => EXIT_FINDINGS,
            _ => 0,
        }
    }

    /// One row per finding (an agent without findings gets one row saying so), columns aligned;
    /// the finding, the one long column, comes last.
    pub fn table(&self) -> String {
        let mut rows: Vec<[String; 4]> = vec![["IDENTITY", "SEVERITY", "SCOPE", "FINDING"].map(String::from)];
        for agent in self.agents.iter().chain(&self.own) {
            let identity = &agent.identity.identity;
            if agent.findings.is_empty() {
                rows.push([identity.clone(), "-".into(), "-".into(), "no rights that matter".into()]);
            }
            for f in &agent.findings {
                let mut finding = format!("{}: {} {}", f.check, f.verbs.join(","), f.resources.join(", "));
                if let Some(note) = f.note {
                    finding.push_str(&format!(" ({note})"));
                }
                let scope = match &f.scope {
                    Where::Cluster => "cluster-wide".to_owned(),
                    Where::Namespaces(list) => describe_namespaces(list),
                };
                rows.push([identity.clone(), f.severity.name().into(), scope, finding]);
            }
        }
        let widths: Vec<usize> =
            (0..4).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
        let mut out = String::new();
        if !self.agent_namespaces.is_empty() {
            out.push_str(&format!(
                "agent namespaces (every ServiceAccount in them is an agent): {}\n",
                self.agent_namespaces.join(", ")
            ));
        }
        for row in rows {
            let line = format!(
                "{:w0$}  {:w1$}  {:w2$}  {}",
                row[0],
                row[1],
                row[2],
                row[3],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2]
            );
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    /// The JSON document of `--output json` (field names documented in docs/audit.md).
    pub fn json(&self) -> serde_json::Value {
        let agents: Vec<serde_json::Value> = self
            .agents
            .iter()
            .map(|a| {
                let mut value = serde_json::to_value(&a.identity).unwrap_or_default();
                value["findings"] = a
                    .findings
                    .iter()
                    .map(|f| {
                        let (scope, namespaces) = match &f.scope {
                            Where::Cluster => ("cluster", Vec::new()),
                            Where::Namespaces(list) => ("namespaces", list.clone()),
                        };
                        serde_json::json!({
                            "check": f.check,
                            "severity": f.severity,
                            "verbs": f.verbs,
                            "resources": f.resources,
                            "scope": scope,
                            "namespaces": namespaces,
                            "note": f.note,
                        })
                    })
                    .collect();
                value
            })
            .collect();
        let own = self.own.as_ref().map(|o| {
            let mut value = serde_json::to_value(&o.identity).unwrap_or_default();
            value["findings"] = o
                .findings
                .iter()
                .map(|f| serde_json::json!({"check": f.check, "severity": f.severity, "verbs": f.verbs, "resources": f.resources}))
                .collect();
            value
        });
        serde_json::json!({
            "agents": agents,
            "agentguard": own,
            "agentNamespaces": self.agent_namespaces,
            "summary": {
                "agents": self.agents.len(),
                "findings": self.findings(),
                "critical": self.count(Severity::Critical),
                "high": self.count(Severity::High),
                "medium": self.count(Severity::Medium),
                "namespaces": self.namespaces,
                "accessReviews": self.access_reviews,
            },
        })
    }
}

fn describe_namespaces(list: &[String]) -> String {
    const SHOWN: usize = 3;
    let noun = if list.len() == 1 { "namespace" } else { "namespaces" };
    let shown = list.iter().take(SHOWN).map(String::as_str).collect::<Vec<_>>().join(", ");
    match list.len().saturating_sub(SHOWN) {
        0 => format!("{noun} {shown}"),
        more => format!("{noun} {shown} +{more} more"),
    }
}

/// Assembles the report from the plan and every answer.
pub fn report(
    identities: Vec<Identity>,
    plan: &[Vec<Check>],
    answers: &[(Ask, bool)],
    agent_namespaces: &BTreeSet<String>,
    namespaces: usize,
) -> Report {
    let agents = identities
        .into_iter()
        .enumerate()
        .map(|(i, identity)| {
            let mine: Vec<(&Ask, bool)> =
                answers.iter().filter(|(a, _)| a.identity == i).map(|(a, y)| (a, *y)).collect();
            AgentReport { identity, findings: findings(&plan[i], &mine, agent_namespaces) }
        })
        .collect();
    Report {
        agents,
        own: None,
        agent_namespaces: agent_namespaces.iter().cloned().collect(),
        namespaces,
        access_reviews: answers.len(),
    }
}

/// The SubjectAccessReview for one ask.
pub fn review(identity: &Identity, check: &Check, ask: &Ask) -> SubjectAccessReview {
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: identity.user().map(str::to_owned),
            groups: Some(identity.groups.clone()),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(ask.verb.to_owned()),
                group: Some(check.resource.group.to_owned()),
                resource: Some(check.resource.resource.to_owned()),
                subresource: (!check.resource.subresource.is_empty())
                    .then(|| check.resource.subresource.to_owned()),
                namespace: ask.namespace.clone(),
                name: check.name.clone(),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// `agentguard audit`: prints the report; the exit code says whether the threshold was reached
/// (1) or the cluster could not be audited (2).
pub async fn run(args: AuditArgs) -> ExitCode {
    let AuditArgs { kubeconfig, context, output, fail_on, self_service_account, engine } = args;
    let report = match audit(kubeconfig, context, &self_service_account, &engine).await {
        Ok(report) => report,
        Err(e) => {
            eprintln!("audit failed: {e:#}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match output {
        Output::Table => {
            print!("{}", report.table());
            println!("{}", report.summary());
        }
        Output::Json => {
            println!("{:#}", report.json());
            // stdout stays one JSON document.
            eprintln!("{}", report.summary());
        }
    }
    ExitCode::from(report.exit_code(fail_on))
}

async fn client(kubeconfig: Option<PathBuf>, context: Option<String>) -> Result<Client> {
    let options = KubeConfigOptions { context, ..Default::default() };
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(&path).with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &options).await?
        }
        None if options.context.is_some() => kube::Config::from_kubeconfig(&options).await?,
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// Policies of one kind; none when agentguard's CRDs are not installed.
async fn list_policies<K>(api: Api<K>, plural: &str) -> Result<Vec<K>>
where
    K: Clone + serde::de::DeserializeOwned + fmt::Debug,
{
    match api.list(&ListParams::default()).await {
        Ok(list) => Ok(list.items),
        Err(kube::Error::Api(status)) if status.is_not_found() => {
            tracing::warn!(plural, "agentguard's CRDs are not installed: no policies");
            Ok(Vec::new())
        }
        Err(e) => Err(e).with_context(|| format!("listing {plural}")),
    }
}

async fn audit(
    kubeconfig: Option<PathBuf>,
    context: Option<String>,
    self_service_account: &str,
    engine: &EngineArgs,
) -> Result<Report> {
    let config = engine.config()?;
    let self_namespace = config.self_namespace.clone().unwrap_or_else(|| DEFAULT_SELF_NAMESPACE.into());
    let client = client(kubeconfig, context).await?;
    let (namespaces, service_accounts, cluster_policies, agent_policies) = tokio::try_join!(
        async {
            Api::<Namespace>::all(client.clone())
                .list_metadata(&ListParams::default())
                .await
                .context("listing namespaces")
        },
        async {
            Api::<ServiceAccount>::all(client.clone())
                .list_metadata(&ListParams::default())
                .await
                .context("listing serviceaccounts")
        },
        list_policies(Api::<ClusterAgentPolicy>::all(client.clone()), "clusteragentpolicies"),
        list_policies(Api::<AgentPolicy>::all(client.clone()), "agentpolicies"),
    )?;
    let (policies, _problems) = PolicySet::compile(&cluster_policies, &agent_policies);
    let namespaces: Vec<ObjectMeta> = namespaces.items.into_iter().map(|n| n.metadata).collect();
    let service_accounts: Vec<ObjectMeta> = service_accounts.items.into_iter().map(|s| s.metadata).collect();
    let set = crate::cluster::caches::agent_set(&policies, &config, &namespaces, &service_accounts);
    let mut identities = agents(&set, &service_accounts, &policies, &config);
    let mut plan: Vec<Vec<Check>> =
        identities.iter().map(|i| checks(i, &self_namespace, &config.self_name_prefix)).collect();
    // agentguard's own rights, asked last and reported apart.
    identities.push(Identity::service_account(&self_namespace, self_service_account, vec![Why::Agentguard]));
    plan.push(own_checks());
    let names: Vec<String> = namespaces.iter().filter_map(|n| n.name.clone()).collect();

    let api = Api::<SubjectAccessReview>::all(client);
    let ask_all = |asks: Vec<Ask>| {
        let (api, identities, plan) = (&api, &identities, &plan);
        futures::stream::iter(asks)
            .map(move |ask| async move {
                let sar = review(&identities[ask.identity], &plan[ask.identity][ask.check], &ask);
                let answer = api
                    .create(&PostParams::default(), &sar)
                    .await
                    .context("creating a SubjectAccessReview (the auditor needs create on subjectaccessreviews)")?;
                let status = answer.status.unwrap_or_default();
                if let Some(error) = status.evaluation_error.filter(|e| !e.is_empty()) {
                    tracing::warn!(%error, verb = ask.verb, identity = %identities[ask.identity].identity, "access review evaluation error");
                }
                anyhow::Ok((ask, status.allowed))
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect::<Vec<_>>()
    };
    let mut answers = ask_all(first_round(&plan)).await?;
    let second = second_round(&plan, &answers, &names);
    answers.extend(ask_all(second).await?);
    answers.sort();
    let mut report = report(identities, &plan, &answers, &set.namespaces, names.len());
    report.own = report.agents.pop();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::api::{AGENT_LABEL, AGENT_NAMESPACE_LABEL};

    use crate::cluster::caches::tests::meta;

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
        let in_sandbox = super::checks(
            &sa("sandbox", "default", &[Why::AgentNamespace]),
            "agentguard-system",
            "agentguard",
        );
        for resource in ["namespaces", "namespaces/status", "namespaces/finalize"] {
            let own = find(&in_sandbox, "own-label", resource);
            assert_eq!(
                (own[0].name.as_deref(), &own[0].scope),
                (Some("sandbox"), &Scope::Cluster),
                "{resource}"
            );
            assert_eq!(own[0].verbs, UPDATE, "{resource}");
        }
        // Who could change agentguard's own webhook configuration, by its name.
        let own =
            find(&checks, "own-webhook", "validatingwebhookconfigurations.admissionregistration.k8s.io");
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
        Check {
            id,
            severity,
            verbs,
            resource,
            name: None,
            scope,
            becomes_service_account: id == "pod-create",
        }
    }

    #[test]
    fn namespaces_are_asked_only_for_what_is_not_allowed_cluster_wide() {
        let plan = vec![vec![
            check("delete", Severity::High, DELETE, res("", "secrets"), Scope::EachNamespace),
            check("delete", Severity::High, DELETE, res("", "namespaces"), Scope::Cluster),
            check(
                "self-namespace",
                Severity::Critical,
                WRITE,
                res("", "pods"),
                Scope::Namespace("ag".into()),
            ),
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
                        finding(
                            "impersonate",
                            Severity::Critical,
                            &["impersonate"],
                            &["users"],
                            Where::Cluster,
                        ),
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
            review(
                &group,
                &checks[token],
                &Ask { identity: 0, check: token, verb: "create", namespace: None }
            )
            .spec
            .user,
            None
        );
    }

    #[test]
    fn agentguards_own_rights_are_reported_beside_the_agents_and_never_fail_the_audit() {
        let own = sa("agentguard-system", "agentguard", &[Why::Agentguard]);
        let ids: Vec<&str> = own_checks().iter().map(|c| c.id).collect();
        for id in ["read-secrets", "rbac-write", "escalate", "bind", "impersonate", "webhook-write", "delete"]
        {
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
            report.summary().ends_with(
                "agentguard itself (system:serviceaccount:agentguard-system:agentguard): 1 findings"
            )
        );
        assert_eq!(report.json()["agentguard"]["findings"][0]["check"], "rbac-write");
        assert_eq!(
            report.exit_code(FailOn::Critical),
            0,
            "agentguard's own rights are reported, not failed on"
        );
    }
}
