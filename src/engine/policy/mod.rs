//! The pure policy engine: (request facts, requester, policies, directory, clock) → decision.
//!
//! ```text
//!  api::{Cluster,}AgentPolicy ──compile──▶ PolicySet ─┐ (rebuilt on every policy change)
//!                                                     ▼
//!  Facts + Requester + Directory + now ──▶ evaluate() ──▶ Decision
//!      approval writes ▸ not an agent? ▸ built-in rules ▸ effects ▸ no-op update? ▸ policies
//! ```
//!
//! A request is judged by what it does, not by its verb ([`effects`]): every operation it
//! amounts to (an eviction's DELETE, a cascade's, finalizers removed, a controller armed to
//! delete, metadata stored through a subresource) is matched against the policies, and the
//! strictest outcome over all of them is the decision.
//!
//! Precedence among enforced policies that match: Deny beats RequireApproval beats Allow; ties
//! are broken by a fixed order (ClusterAgentPolicies before AgentPolicies, then by namespace and
//! name), so the same inputs always give the same decision and the same message. Warn and Audit
//! policies never change the verdict. Nothing here does I/O or reads the clock.

pub mod builtin;
pub mod decision;
pub mod effects;
pub mod identity;
mod index;
pub mod reach;
pub mod selector;

use std::collections::HashSet;

use jiff::{SignedDuration, Timestamp};
use serde_json::Value;

use crate::engine::api::{
    AGENT_LABEL, Action, AgentPolicy, ChurnScope, ClusterAgentPolicy, MatchRule, Mode, Operation as RuleOp,
    PolicySpec, parse_duration,
};
use crate::engine::approval::{self, Lifetime};
use crate::engine::diff::Change;

pub use decision::{
    Allowed, ChurnBudget, Covering, Decision, Denial, DryRun, PolicyId, Reason, Target, Verdict,
};
pub use effects::Collateral;
pub use identity::{Directory, Requester};
use index::ResourceIndex;
use selector::{Globs, Labels, Selector};

/// Engine settings that come from the deployment, not from policies.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Label (key, value) marking agent ServiceAccounts.
    pub agent_label: (String, String),
    /// Usernames and groups that are agents whatever the policies say.
    pub agent_usernames: Vec<String>,
    pub agent_groups: Vec<String>,
    /// What an agent's DELETE/UPDATE that no enforced policy matches gets: Allow or Deny.
    pub unmatched: Action,
    /// agentguard's own namespace: agents may not touch anything in it.
    pub self_namespace: Option<String>,
    /// Name prefix of agentguard's cluster-scoped objects (webhook configurations, RBAC).
    pub self_name_prefix: String,
    /// The keys approval tickets are issued and checked with (none: nothing can be approved).
    pub approval_keys: approval::Keys,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            agent_label: (AGENT_LABEL.into(), "true".into()),
            agent_usernames: Vec::new(),
            agent_groups: Vec::new(),
            unmatched: Action::Allow,
            self_namespace: None,
            self_name_prefix: "agentguard".into(),
            approval_keys: approval::Keys::none(),
        }
    }
}

/// The operation of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Create,
    /// `patch`: whether the update was sent as a PATCH, when the API server says so (options
    /// kind `PatchOptions`); `None` when it does not. Kubernetes (checked on 1.35) converts a
    /// patch's options to `UpdateOptions` before admission, so in practice it is `None`.
    Update {
        patch: Option<bool>,
    },
    Delete,
    Connect,
}

impl Operation {
    pub fn describe(self) -> &'static str {
        match self {
            Operation::Create => "CREATE",
            Operation::Update { patch: Some(true) } => "UPDATE (patch)",
            Operation::Update { patch: Some(false) } => "UPDATE (replace)",
            Operation::Update { patch: None } => "UPDATE",
            Operation::Delete => "DELETE",
            Operation::Connect => "CONNECT",
        }
    }
}

/// What the request is, as the engine needs it. Borrowed from the decoded AdmissionRequest.
#[derive(Clone, Debug)]
pub struct Facts<'a> {
    pub operation: Operation,
    pub group: &'a str,
    pub resource: &'a str,
    pub subresource: &'a str,
    /// Empty for cluster-scoped objects; for a Namespace, its own name.
    pub namespace: &'a str,
    pub name: &'a str,
    pub object: Option<&'a Value>,
    pub old_object: Option<&'a Value>,
    /// What a DELETE would take with it, as the request path found it (see [`effects`]); also
    /// the pod an eviction or a connection concerns, when it was looked up.
    pub collateral: &'a [Collateral],
}

impl Facts<'_> {
    fn is_namespace(&self) -> bool {
        self.group.is_empty() && self.resource == "namespaces" && self.subresource.is_empty()
    }

    fn target(&self) -> Target {
        let resource = if self.group.is_empty() {
            self.resource.to_owned()
        } else {
            format!("{}.{}", self.resource, self.group)
        };
        Target {
            resource,
            subresource: self.subresource.to_owned(),
            namespace: self.namespace.to_owned(),
            name: self.name.to_owned(),
        }
    }

    /// The labels an object carries (string values only).
    pub fn labels(object: Option<&Value>) -> Option<Labels> {
        let labels = object?.pointer("/metadata/labels")?.as_object()?;
        Some(labels.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect())
    }
}

/// A problem found while compiling a policy. The policy still takes effect, read in its most
/// restrictive sense, and the problem is reported (status, logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub policy: PolicyId,
    pub message: String,
}

/// A compiled policy.
#[derive(Clone, Debug)]
pub struct CompiledPolicy {
    pub id: PolicyId,
    pub action: Action,
    pub mode: Mode,
    subjects: Subjects,
    approval: Option<CompiledApproval>,
    message: Option<String>,
    rules: Vec<CompiledRule>,
    churn: Option<ChurnBudget>,
}

/// Whom a policy covers.
#[derive(Clone, Debug)]
enum Subjects {
    /// No `subjects`: every identity agentguard treats as an agent.
    Agents,
    /// Exactly these.
    Listed {
        service_accounts: Option<Selector>,
        /// An AgentPolicy's: only ServiceAccounts of its own namespace.
        namespace: Option<String>,
        usernames: Vec<String>,
        groups: Vec<String>,
    },
}

impl Subjects {
    fn usernames(&self) -> &[String] {
        match self {
            Subjects::Agents => &[],
            Subjects::Listed { usernames, .. } => usernames,
        }
    }

    fn groups(&self) -> &[String] {
        match self {
            Subjects::Agents => &[],
            Subjects::Listed { groups, .. } => groups,
        }
    }
}

#[derive(Clone, Debug)]
struct CompiledApproval {
    users: Vec<String>,
    groups: Vec<String>,
    lifetime: Lifetime,
    reason: Option<String>,
}

impl CompiledApproval {
    fn approves(&self, requester: &Requester) -> bool {
        self.users.contains(&requester.username) || requester.groups.iter().any(|g| self.groups.contains(g))
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.users.is_empty() {
            parts.push(format!("users {}", self.users.join(", ")));
        }
        if !self.groups.is_empty() {
            parts.push(format!("groups {}", self.groups.join(", ")));
        }
        parts.join("; ")
    }
}

#[derive(Clone, Debug)]
pub(crate) struct CompiledRule {
    name: String,
    delete: bool,
    connect: bool,
    replace: bool,
    patch: bool,
    /// (api groups, resource, subresource) patterns; `*` is a wildcard in any position.
    resources: Vec<(Vec<String>, String, Option<String>)>,
    names: Globs,
    namespaces: Globs,
    namespace_selector: Option<Selector>,
    object_selector: Option<Selector>,
}

/// How an UPDATE a rule does not guard would still escape it. (Handing an object to the garbage
/// collector is judged as its DELETE: see [`effects`].)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Escape {
    ObjectSelector,
    NamespaceSelector,
}

impl Escape {
    fn describe(self) -> &'static str {
        match self {
            Escape::ObjectSelector => "this change would take the object out of the rule's objectSelector",
            Escape::NamespaceSelector => {
                "this change would take the namespace's objects out of the rule's namespaceSelector"
            }
        }
    }
}

/// All policies, compiled and indexed by resource so one decision does not scan every policy.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    policies: Vec<CompiledPolicy>,
    cluster: ResourceIndex,
    namespaced: std::collections::HashMap<String, ResourceIndex>,
    /// Rules with a namespaceSelector, checked when a Namespace is relabelled.
    namespace_selector_rules: Vec<(usize, usize)>,
    /// Every identity some policy names, so "is this an agent?" is one lookup.
    subject_usernames: HashSet<String>,
    subject_groups: HashSet<String>,
    /// ServiceAccount selectors, each with the namespace it is confined to (an AgentPolicy's).
    subject_selectors: Vec<(Option<String>, Selector)>,
    /// (api groups, resource) of every rule guarding DELETE: what a cascade must be checked for.
    delete_resources: Vec<(Vec<String>, String)>,
}

struct Match<'p> {
    policy: &'p CompiledPolicy,
    rule: &'p CompiledRule,
    escape: Option<Escape>,
    /// The operation the request amounts to, when it is not the request as sent.
    via: Option<String>,
}

impl Match<'_> {
    fn rule_name(&self) -> String {
        let mut name = self.rule.name.clone();
        if let Some(e) = self.escape {
            name = format!("{name} ({})", e.describe());
        }
        if let Some(via) = &self.via {
            name = format!("{name} (judged as the operation it amounts to: {via})");
        }
        name
    }
}

impl PolicySet {
    /// Compiles every policy. Never fails: problems are returned beside the set.
    pub fn compile(cluster: &[ClusterAgentPolicy], namespaced: &[AgentPolicy]) -> (Self, Vec<Problem>) {
        let mut problems = Vec::new();
        let mut entries: Vec<(PolicyId, &PolicySpec)> = cluster
            .iter()
            .map(|p| (PolicyId { namespace: None, name: name_of(&p.metadata) }, &p.spec.policy))
            .chain(namespaced.iter().map(|p| {
                let ns = p.metadata.namespace.clone().unwrap_or_default();
                (PolicyId { namespace: Some(ns), name: name_of(&p.metadata) }, &p.spec.policy)
            }))
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));

        let mut set = PolicySet::default();
        for (id, spec) in entries {
            let policy = compile_policy(id, spec, &mut problems);
            let pi = set.policies.len();
            for (ri, rule) in policy.rules.iter().enumerate() {
                let index = match &policy.id.namespace {
                    None => &mut set.cluster,
                    Some(ns) => set.namespaced.entry(ns.clone()).or_default(),
                };
                index.insert(rule, (pi, ri));
                if rule.delete {
                    for (groups, resource, sub) in &rule.resources {
                        let entry = (groups.clone(), resource.clone());
                        if sub.is_none() && !set.delete_resources.contains(&entry) {
                            set.delete_resources.push(entry);
                        }
                    }
                }
                if rule.namespace_selector.is_some() {
                    set.namespace_selector_rules.push((pi, ri));
                }
            }
            set.subject_usernames.extend(policy.subjects.usernames().iter().cloned());
            set.subject_groups.extend(policy.subjects.groups().iter().cloned());
            if let Subjects::Listed { service_accounts: Some(sel), namespace, .. } = &policy.subjects {
                set.subject_selectors.push((namespace.clone(), sel.clone()));
            }
            set.policies.push(policy);
        }
        (set, problems)
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    pub fn policies(&self) -> impl Iterator<Item = &CompiledPolicy> {
        self.policies.iter()
    }

    /// (api groups, resource) patterns of the rules that guard DELETE (`*` a wildcard): the
    /// resource types a DELETE's cascade is looked up in.
    pub fn delete_guarded_resources(&self) -> &[(Vec<String>, String)] {
        &self.delete_resources
    }

    /// Usernames some policy names as agents.
    pub fn subject_usernames(&self) -> impl Iterator<Item = &String> {
        self.subject_usernames.iter()
    }

    /// Groups some policy names as agents.
    pub fn subject_groups(&self) -> impl Iterator<Item = &String> {
        self.subject_groups.iter()
    }

    /// Every label key whose change can make a ServiceAccount or Namespace an agent (or stop
    /// it being one): the agent label, the agent-namespace label and the keys of policies'
    /// subject selectors. Writes changing these are the ones agentguard must see first.
    pub fn agent_label_keys(&self, config: &Config) -> std::collections::BTreeSet<String> {
        let mut keys: std::collections::BTreeSet<String> =
            [config.agent_label.0.clone(), crate::engine::api::AGENT_NAMESPACE_LABEL.to_owned()].into();
        keys.extend(self.subject_selectors.iter().flat_map(|(_, s)| s.keys()).map(str::to_owned));
        keys
    }

    /// Whether the requester is an agent for agentguard at all: marked by the agent label (or an
    /// agent namespace), configured as one, or named by any policy's subjects.
    pub fn is_agent(&self, requester: &Requester, config: &Config) -> bool {
        let (key, value) = &config.agent_label;
        requester.selected_as_agent
            || requester.labels().is_some_and(|l| l.get(key) == Some(value))
            || config.agent_usernames.contains(&requester.username)
            || requester.groups.iter().any(|g| config.agent_groups.contains(g))
            || self.subject_usernames.contains(&requester.username)
            || requester.groups.iter().any(|g| self.subject_groups.contains(g))
            || requester
                .service_account
                .as_ref()
                .is_some_and(|sa| self.selectors_match(&sa.namespace, Some(&sa.labels)))
    }

    /// Whether a ServiceAccount of `namespace` with these labels is an agent under any selector.
    pub fn labels_make_agent(&self, namespace: &str, labels: Option<&Labels>, config: &Config) -> bool {
        let (key, value) = &config.agent_label;
        labels.is_some_and(|l| l.get(key) == Some(value)) || self.selectors_match(namespace, labels)
    }

    fn selectors_match(&self, namespace: &str, labels: Option<&Labels>) -> bool {
        labels.is_some()
            && self
                .subject_selectors
                .iter()
                .any(|(ns, s)| ns.as_deref().is_none_or(|ns| ns == namespace) && s.matches(labels))
    }

    /// Rules that match the request's object, resource and operation, in policy order.
    #[cfg(test)]
    fn matching<'p>(
        &'p self,
        facts: &Facts<'_>,
        directory: &dyn Directory,
        policy_filter: impl FnMut(&CompiledPolicy) -> bool,
    ) -> Vec<Match<'p>> {
        let effect = effects::Effect::sent(facts.clone());
        self.matching_effect(&effect, directory, policy_filter)
    }

    /// Rules that match one operation a request amounts to.
    fn matching_effect<'p>(
        &'p self,
        effect: &effects::Effect<'_>,
        directory: &dyn Directory,
        mut policy_filter: impl FnMut(&CompiledPolicy) -> bool,
    ) -> Vec<Match<'p>> {
        let facts = &effect.facts;
        let mut candidates = Vec::new();
        self.cluster.candidates(facts.resource, facts.subresource, &mut candidates);
        if effect.any_namespace {
            for index in self.namespaced.values() {
                index.candidates(facts.resource, facts.subresource, &mut candidates);
            }
        } else if let Some(index) = self.namespaced.get(facts.namespace) {
            index.candidates(facts.resource, facts.subresource, &mut candidates);
        }
        let mut ns_labels = LazyLabels::new(facts.namespace, directory);
        let old_labels = Facts::labels(facts.old_object);
        let new_labels = Facts::labels(facts.object);
        let object_labels = ObjectLabels { old: old_labels.as_ref(), new: new_labels.as_ref() };
        if facts.is_namespace() && matches!(facts.operation, Operation::Update { .. }) {
            // Relabelling a Namespace can move other objects out of a namespaceSelector.
            candidates.extend(self.namespace_selector_rules.iter().copied());
        }
        candidates.sort_unstable();
        candidates.dedup();

        let mut out = Vec::new();
        for (pi, ri) in candidates {
            let policy = &self.policies[pi];
            if !policy_filter(policy) {
                continue;
            }
            let rule = &policy.rules[ri];
            if let Some(escape) = rule_matches(rule, effect, &object_labels, &mut ns_labels) {
                out.push(Match { policy, rule, escape, via: effect.via.as_deref().map(str::to_owned) });
            }
        }
        out
    }
}

fn name_of(meta: &kube::api::ObjectMeta) -> String {
    meta.name.clone().unwrap_or_default()
}

fn compile_policy(id: PolicyId, spec: &PolicySpec, problems: &mut Vec<Problem>) -> CompiledPolicy {
    let mut problem = |m: String| problems.push(Problem { policy: id.clone(), message: m });
    let subjects = match &spec.subjects {
        None => Subjects::Agents,
        Some(s) => {
            // The schema refuses these too; a policy stored before it did is read narrowly.
            let reserved = |name: &str| {
                name.starts_with("system:") && identity::service_account_name(name).is_none()
                    || name.chars().any(char::is_control)
            };
            let mut usernames: Vec<String> = Vec::new();
            for u in &s.usernames {
                let foreign = match (&id.namespace, identity::service_account_name(u)) {
                    (Some(own), Some((ns, _))) => ns != own,
                    (Some(_), None) => true,
                    (None, _) => false,
                };
                if reserved(u) || foreign {
                    problem(format!("subjects.usernames: {u:?} cannot be a subject of this policy; ignored"));
                } else {
                    usernames.push(u.clone());
                }
            }
            let mut groups: Vec<String> = Vec::new();
            for g in &s.groups {
                if g.starts_with("system:") || id.namespace.is_some() || g.chars().any(char::is_control) {
                    problem(format!("subjects.groups: {g:?} cannot be a subject of this policy; ignored"));
                } else {
                    groups.push(g.clone());
                }
            }
            Subjects::Listed {
                service_accounts: s.service_account_selector.as_ref().map(Selector::compile),
                namespace: id.namespace.clone(),
                usernames,
                groups,
            }
        }
    };
    let approval = spec.approval.as_ref().map(|a| {
        let mut duration = |field: &str, text: &str, fallback: SignedDuration| {
            parse_duration(text).and_then(|d| SignedDuration::try_from(d).ok()).unwrap_or_else(|| {
                problem(format!("approval.{field} {text:?} is not a duration; using {fallback:#}"));
                fallback
            })
        };
        let ttl = duration("ttl", &a.ttl, SignedDuration::from_hours(1));
        let max_ttl = duration("maxTtl", &a.max_ttl, ttl);
        CompiledApproval {
            users: a.approvers.users.clone(),
            groups: a.approvers.groups.clone(),
            lifetime: Lifetime { ttl: ttl.min(max_ttl), max_ttl },
            reason: a.reason.clone(),
        }
    });
    if spec.action == Action::RequireApproval && approval.is_none() {
        problem("RequireApproval without an approval block: nobody can approve, so it acts as Deny".into());
    }
    let churn = spec.churn_limit.as_ref().and_then(|c| {
        match parse_duration(&c.window).and_then(|d| SignedDuration::try_from(d).ok()) {
            Some(window) if window.is_positive() => Some(ChurnBudget {
                policy: id.clone(),
                max_operations: c.max_operations,
                window,
                scope: c.scope,
                subject: String::new(),
            }),
            _ => {
                problem(format!(
                    "churnLimit.window {:?} is not a duration; no churn limit applies",
                    c.window
                ));
                None
            }
        }
    });
    let namespaced = id.namespace.is_some();
    let rules =
        spec.rules.iter().enumerate().map(|(i, r)| compile_rule(i, r, namespaced, &mut problem)).collect();
    CompiledPolicy {
        churn,
        id,
        action: spec.action,
        mode: spec.mode,
        subjects,
        approval,
        message: spec.message.clone(),
        rules,
    }
}

fn compile_rule(
    i: usize,
    rule: &MatchRule,
    namespaced: bool,
    problem: &mut impl FnMut(String),
) -> CompiledRule {
    let name = rule.name.clone().unwrap_or_else(|| format!("rule-{i}"));
    let has = |op| rule.operations.contains(&op);
    let update = has(RuleOp::Update);
    if namespaced && (!rule.namespaces.is_empty() || rule.namespace_selector.is_some()) {
        problem(format!(
            "rule {name:?}: an AgentPolicy guards its own namespace only; namespaces and namespaceSelector are ignored"
        ));
    }
    let resources = rule
        .resources
        .iter()
        .flat_map(|m| {
            m.resources.iter().map(|r| {
                let (res, sub) = match r.split_once('/') {
                    Some((res, sub)) => (res.to_owned(), Some(sub.to_owned())),
                    None => (r.clone(), None),
                };
                (m.api_groups.clone(), res, sub)
            })
        })
        .collect();
    CompiledRule {
        name,
        delete: has(RuleOp::Delete),
        connect: has(RuleOp::Connect),
        replace: update || has(RuleOp::Replace),
        patch: update || has(RuleOp::Patch),
        resources,
        names: Globs::new(&rule.names),
        namespaces: if namespaced { Globs::default() } else { Globs::new(&rule.namespaces) },
        namespace_selector: if namespaced {
            None
        } else {
            rule.namespace_selector.as_ref().map(Selector::compile)
        },
        object_selector: rule.object_selector.as_ref().map(Selector::compile),
    }
}

impl CompiledPolicy {
    /// Whether the policy's subjects include the requester. `agent` is whether agentguard treats
    /// the requester as an agent at all: the same for every policy, worked out once per decision.
    fn applies_to(&self, requester: &Requester, agent: bool) -> bool {
        match &self.subjects {
            Subjects::Agents => agent,
            Subjects::Listed { service_accounts, namespace, usernames, groups } => {
                let by_selector = service_accounts.as_ref().is_some_and(|sel| {
                    requester.service_account.as_ref().is_some_and(|sa| {
                        namespace.as_deref().is_none_or(|ns| ns == sa.namespace)
                            && sel.matches(Some(&sa.labels))
                    })
                });
                by_selector
                    || usernames.contains(&requester.username)
                    || requester.groups.iter().any(|g| groups.contains(g))
            }
        }
    }
}

/// Namespace labels, fetched from the directory at most once per decision and only if needed.
struct LazyLabels<'a> {
    namespace: &'a str,
    directory: &'a dyn Directory,
    labels: Option<Option<Labels>>,
}

impl<'a> LazyLabels<'a> {
    fn new(namespace: &'a str, directory: &'a dyn Directory) -> Self {
        Self { namespace, directory, labels: None }
    }

    fn get(&mut self) -> Option<&Labels> {
        let (namespace, directory) = (self.namespace, self.directory);
        self.labels.get_or_insert_with(|| directory.namespace_labels(namespace)).as_ref()
    }
}

struct ObjectLabels<'a> {
    old: Option<&'a Labels>,
    new: Option<&'a Labels>,
}

impl CompiledRule {
    fn resource_matches(&self, group: &str, resource: &str, subresource: &str) -> bool {
        self.resources.iter().any(|(groups, res, sub)| {
            groups.iter().any(|g| g == "*" || g == group)
                && (res == "*" || res == resource)
                && match sub {
                    None => subresource.is_empty(),
                    Some(s) => s == "*" || s == subresource,
                }
        })
    }

    fn guards(&self, op: Operation) -> bool {
        match op {
            Operation::Delete => self.delete,
            Operation::Connect => self.connect,
            Operation::Update { patch: Some(true) } => self.patch,
            Operation::Update { patch: Some(false) } => self.replace,
            // Replace and patch cannot be told apart: a rule guarding either guards it.
            Operation::Update { patch: None } => self.replace || self.patch,
            Operation::Create => false,
        }
    }
}

/// `Some(None)`: the rule guards the request. `Some(Some(escape))`: the rule does not guard this
/// operation, but the update would take something out of its reach. `None`: no match.
fn rule_matches(
    rule: &CompiledRule,
    effect: &effects::Effect<'_>,
    objects: &ObjectLabels<'_>,
    ns_labels: &mut LazyLabels<'_>,
) -> Option<Option<Escape>> {
    let (facts, any_name) = (&effect.facts, effect.any_name);
    let is_update = matches!(facts.operation, Operation::Update { .. });
    // A Namespace relabelling checked against rules guarding other resources.
    let namespace_escape = is_update
        && facts.is_namespace()
        && !rule.resource_matches(facts.group, facts.resource, facts.subresource);
    if namespace_escape {
        let sel = rule.namespace_selector.as_ref()?;
        let in_scope = rule.namespaces.matches(facts.name) && (rule.delete || rule.replace || rule.patch);
        let leaves = sel.matches(objects.old) && !sel.matches(objects.new);
        return (in_scope && leaves).then_some(Some(Escape::NamespaceSelector));
    }
    if !rule.resource_matches(facts.group, facts.resource, facts.subresource)
        || !(any_name || rule.names.matches(facts.name))
    {
        return None;
    }
    if !rule.namespaces.is_empty()
        && !effect.any_namespace
        && (facts.namespace.is_empty() || !rule.namespaces.matches(facts.namespace))
    {
        return None;
    }
    if let Some(sel) = &rule.namespace_selector {
        let ok = if facts.is_namespace() {
            sel.matches(objects.old) || (is_update && sel.matches(objects.new))
        } else if facts.namespace.is_empty() {
            true // Cluster-scoped objects are not filtered by a namespaceSelector.
        } else {
            sel.matches(ns_labels.get())
        };
        if !ok {
            return None;
        }
    }
    let (old_in, new_in) = match &rule.object_selector {
        None => (true, true),
        // An object the request does not show (an eviction's pod not looked up, the volumes a
        // StatefulSet would delete) is read in the most restrictive sense: it matches.
        Some(_) if objects.old.is_none() && objects.new.is_none() && facts.old_object.is_none() => {
            (true, true)
        }
        Some(sel) => (sel.matches(objects.old), is_update && sel.matches(objects.new)),
    };
    if !old_in && !new_in {
        return None;
    }
    if rule.guards(facts.operation) {
        return Some(None);
    }
    if !is_update {
        return None;
    }
    if old_in && !new_in {
        return Some(Some(Escape::ObjectSelector));
    }
    None
}

/// Decides one admission request. Pure: the same arguments always give the same decision.
pub fn evaluate(
    facts: &Facts<'_>,
    requester: &Requester,
    policies: &PolicySet,
    directory: &dyn Directory,
    config: &Config,
    now: Timestamp,
) -> Decision {
    let agent = policies.is_agent(requester, config);
    Decision { agent, ..decide(agent, facts, requester, policies, directory, config, now) }
}

fn decide(
    agent: bool,
    facts: &Facts<'_>,
    requester: &Requester,
    policies: &PolicySet,
    directory: &dyn Directory,
    config: &Config,
    now: Timestamp,
) -> Decision {
    let deny = |reason: Reason, change: Option<Change>| {
        Decision::deny(Denial {
            reason,
            requester: requester.username.clone(),
            operation: facts.operation.describe().to_owned(),
            target: facts.target(),
            change,
        })
    };

    // 1. Approval writes are checked whoever sends them.
    let written = match builtin::approval_write(facts, requester, agent, policies, directory, config, now) {
        Err(detail) => return deny(Reason::Builtin { rule: builtin::APPROVAL_RULE, detail }, None),
        Ok(written) => written,
    };
    if !agent {
        return match written {
            builtin::Written::Approval => Decision::allow(Allowed::ApprovalAccepted),
            builtin::Written::Nothing => Decision::allow(Allowed::NotAgent),
            builtin::Written::Inert(why) => {
                let mut decision = Decision::allow(Allowed::NotAgent);
                decision.warnings.push(format!("agentguard: {why}"));
                decision
            }
        };
    }

    // 2. Built-in rules: agents may not loosen their own brakes.
    if let Some((rule, detail)) = builtin::self_protection(facts, policies, directory, config) {
        return deny(Reason::Builtin { rule, detail }, None);
    }

    // 3. What the request does: DELETE, UPDATE and CONNECT as sent, and whatever else it
    // amounts to (an eviction, a cascade, finalizers removed, a controller armed to delete).
    let effects = effects::of(facts);
    if facts.operation == Operation::Create && effects.len() == 1 {
        return Decision::allow(Allowed::NotGuarded);
    }
    let matches: Vec<Match<'_>> = effects
        .iter()
        // A CREATE is judged only by what it amounts to.
        .filter(|e| e.facts.operation != Operation::Create)
        .flat_map(|e| policies.matching_effect(e, directory, |p| p.applies_to(requester, agent)))
        .collect();
    if matches.is_empty() && config.unmatched == Action::Allow {
        // Nothing to judge, so the change need not be computed: the common case stays cheap.
        return Decision::allow(Allowed::Unmatched);
    }

    // 4. An UPDATE that changes nothing is harmless; any other is judged by what it changes.
    let change = match (facts.operation, facts.old_object, facts.object) {
        (Operation::Delete, ..) => None,
        (Operation::Update { .. }, Some(old), Some(new)) => {
            let change = Change::between(old, new);
            if change.is_empty() {
                return Decision::allow(Allowed::NoChange);
            }
            Some(change)
        }
        // An UPDATE without both objects cannot be diffed: judge it without a summary.
        (Operation::Update { .. }, ..) => None,
        (Operation::Create | Operation::Connect, ..) => None,
    };

    // 5. Policies.
    let judge =
        |ms: &[&Match<'_>]| -> Judgement { judge(ms, facts, change.as_ref(), &config.approval_keys, now) };

    let mut decision = {
        let enforced: Vec<&Match<'_>> = matches.iter().filter(|m| m.policy.mode == Mode::Enforce).collect();
        match judge(&enforced) {
            Judgement::Admit(Allowed::Unmatched) if config.unmatched == Action::Deny => {
                deny(Reason::Unmatched, change.clone())
            }
            Judgement::Admit(why) => Decision::allow(why),
            Judgement::Refuse(reason) => deny(reason, change.clone()),
        }
    };
    // Dry-run policies: each judged alone, reported but never enforced.
    for (mode, out) in [(Mode::Warn, &mut decision.warnings), (Mode::Audit, &mut decision.audits)] {
        let mut seen: Vec<&PolicyId> = Vec::new();
        for m in matches.iter().filter(|m| m.policy.mode == mode) {
            if seen.contains(&&m.policy.id) {
                continue;
            }
            seen.push(&m.policy.id);
            let mine: Vec<&Match<'_>> = matches.iter().filter(|x| x.policy.id == m.policy.id).collect();
            if let Judgement::Refuse(reason) = judge(&mine) {
                decision.dry_runs.push(DryRun { mode, policy: m.policy.id.clone(), action: reason.action() });
                let denial = Denial {
                    reason,
                    requester: requester.username.clone(),
                    operation: facts.operation.describe().to_owned(),
                    target: facts.target(),
                    change: change.clone(),
                };
                out.push(match mode {
                    Mode::Warn => format!("agentguard [Warn mode, not enforced]: {}", denial.summary()),
                    _ => format!("[{mode:?} mode, not enforced] {denial}"),
                });
            }
        }
    }
    // 6. Churn budgets of the enforced policies that guard what was admitted: the breaker
    // charges them (with the API server, outside this pure function) before the answer goes out.
    if decision.allowed() {
        for m in matches.iter().filter(|m| m.policy.mode == Mode::Enforce) {
            if let Some(budget) = &m.policy.churn
                && !decision.churn.iter().any(|b| b.policy == budget.policy)
            {
                let subject = churn_subject(budget.scope, requester, directory);
                decision.churn.push(ChurnBudget { subject, ..budget.clone() });
            }
        }
    }
    decision
}

/// Whose count a churn charge spends. Every ServiceAccount of an agent namespace shares the
/// namespace's count whatever the scope, so creating a fresh ServiceAccount there (which `edit`
/// allows) never brings a fresh budget.
fn churn_subject(scope: ChurnScope, requester: &Requester, directory: &dyn Directory) -> String {
    let sa = requester.service_account.as_ref();
    let agent_namespace = sa.is_some_and(|sa| {
        directory.namespace_labels(&sa.namespace).is_some_and(|l| {
            l.get(crate::engine::api::AGENT_NAMESPACE_LABEL).map(String::as_str) == Some("true")
        })
    });
    match (scope, sa) {
        (ChurnScope::PerPolicy, _) => "*".to_owned(),
        (ChurnScope::PerNamespace, Some(sa)) => format!("namespace:{}", sa.namespace),
        (ChurnScope::PerAgent, Some(sa)) if agent_namespace => format!("namespace:{}", sa.namespace),
        _ => requester.username.clone(),
    }
}

/// What precedence makes of a set of matches.
enum Judgement {
    Admit(Allowed),
    Refuse(Reason),
}

/// Applies precedence to a set of matches: Deny > RequireApproval > Allow > unmatched.
fn judge(
    matches: &[&Match<'_>],
    facts: &Facts<'_>,
    change: Option<&Change>,
    keys: &approval::Keys,
    now: Timestamp,
) -> Judgement {
    if let Some(m) = matches.iter().find(|m| m.policy.action == Action::Deny) {
        return Judgement::Refuse(Reason::Policy {
            policy: m.policy.id.clone(),
            rule: m.rule_name(),
            message: m.policy.message.clone(),
        });
    }
    let holds: Vec<&&Match<'_>> =
        matches.iter().filter(|m| m.policy.action == Action::RequireApproval).collect();
    if let Some(first) = holds.first() {
        let approvals: Vec<&CompiledApproval> =
            holds.iter().filter_map(|m| m.policy.approval.as_ref()).collect();
        if approvals.len() < holds.len() {
            // A RequireApproval policy without approvers cannot be satisfied: it denies.
            return Judgement::Refuse(Reason::Policy {
                policy: first.policy.id.clone(),
                rule: first.rule_name(),
                message: Some("this policy names no approvers, so nothing can approve it".into()),
            });
        }
        return hold(&holds, facts, change, keys, now);
    }
    if let Some(m) = matches.iter().find(|m| m.policy.action == Action::Allow) {
        return Judgement::Admit(Allowed::ByPolicy { policy: m.policy.id.clone(), rule: m.rule_name() });
    }
    Judgement::Admit(Allowed::Unmatched)
}

/// RequireApproval: admits when the stored ticket covers this object, operation and exact
/// state or change; otherwise refuses with a fresh ticket that would.
fn hold(
    holds: &[&&Match<'_>],
    facts: &Facts<'_>,
    change: Option<&Change>,
    keys: &approval::Keys,
    now: Timestamp,
) -> Judgement {
    let first = holds[0];
    let mut covering: Vec<Covering> = Vec::new();
    let mut lifetime: Option<Lifetime> = None;
    for m in holds {
        let Some(a) = &m.policy.approval else { continue };
        // Every policy that holds the request must accept the approval: the strictest lifetime.
        lifetime = Some(match lifetime {
            None => a.lifetime,
            Some(l) => {
                Lifetime { ttl: l.ttl.min(a.lifetime.ttl), max_ttl: l.max_ttl.min(a.lifetime.max_ttl) }
            }
        });
        if !covering.iter().any(|c| c.policy == m.policy.id) {
            covering.push(Covering {
                policy: m.policy.id.clone(),
                approvers: a.describe(),
                reason: a.reason.clone(),
            });
        }
    }
    let lifetime = lifetime.unwrap_or(Lifetime { ttl: SignedDuration::ZERO, max_ttl: SignedDuration::ZERO });
    let uid =
        facts.old_object.and_then(|o| o.pointer("/metadata/uid")).and_then(Value::as_str).unwrap_or_default();
    let state;
    let (op, digest) = match facts.operation {
        Operation::Delete => {
            state = facts.old_object.map(crate::engine::diff::state_digest);
            (approval::Op::Delete, state.as_ref())
        }
        _ => (approval::Op::Update, change.map(|c| &c.digest)),
    };
    let whole = Target { subresource: String::new(), ..facts.target() };
    let unapprovable = if facts.subresource == "scale" {
        Some(format!(
            "The scale subresource carries no annotations, so an approval cannot be seen on it: make this \
             change as an update of {whole} itself (e.g. kubectl patch), which can be approved."
        ))
    } else if facts.operation == Operation::Create && facts.subresource == "eviction" {
        Some(format!(
            "An eviction carries no approval: a human may approve deleting {whole}, and then the pod is \
             deleted (kubectl delete), not evicted."
        ))
    } else if facts.operation == Operation::Connect {
        Some(format!(
            "A connection carries no approval: a human who may approve runs this on {whole} instead."
        ))
    } else if let Some(Err(size)) = change.map(Change::reviewable) {
        Some(format!(
            "The change is too large to show an approver in full ({size} bytes; at most {} KiB), so it \
             cannot be approved: make it in smaller changes.",
            crate::engine::diff::REVIEWABLE_BYTES / 1024
        ))
    } else if uid.is_empty() || digest.is_none() {
        Some("The API server sent no prior object with a uid, so no approval can be bound to it.".into())
    } else if keys.is_empty() {
        Some(format!("Nothing can approve it now: {}.", approval::Refusal::NoKey))
    } else {
        None
    };
    let stored = facts.old_object.and_then(approval::annotation);
    let refusal = match (&unapprovable, digest) {
        (None, Some(digest)) => {
            let subject = approval::Subject { uid, op, digest };
            match approval::check(stored, keys, &subject, lifetime.max_ttl, now) {
                Ok(expires) => {
                    return Judgement::Admit(Allowed::Approved {
                        policy: first.policy.id.clone(),
                        rule: first.rule_name(),
                        approval: stored.unwrap_or_default().to_owned(),
                        expires,
                    });
                }
                Err(refusal) => refusal,
            }
        }
        _ => approval::Refusal::Absent,
    };
    let ticket = match (&unapprovable, digest) {
        (None, Some(digest)) => approval::Ticket::issue(
            keys,
            &approval::Subject { uid, op, digest },
            now,
            lifetime.ttl.min(lifetime.max_ttl),
        ),
        _ => None,
    };
    Judgement::Refuse(Reason::ApprovalRequired {
        policy: first.policy.id.clone(),
        rule: first.rule_name(),
        covering,
        message: first.policy.message.clone(),
        refusal,
        approve_value: ticket.as_ref().map(approval::Ticket::value).unwrap_or_default(),
        expires: ticket.map(|t| t.expires(lifetime.max_ttl)),
        unapprovable,
    })
}

#[cfg(test)]
mod tests;
