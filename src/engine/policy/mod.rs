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
//!
//! This module holds the types; [`compile`] builds a [`PolicySet`], `matching` finds the rules
//! an operation meets, [`evaluate()`] decides, and [`effects`], [`builtin`], [`identity`],
//! [`reach`] and [`decision`] hold what each says.

pub mod builtin;
pub mod compile;
pub mod condition;
pub mod decision;
pub mod effects;
mod evaluate;
pub mod explain;
pub mod identity;
mod index;
mod matching;
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

#[cfg(test)]
use evaluate::churn_subject;
pub use evaluate::evaluate;
#[cfg(test)]
use matching::{LazyLabels, ObjectLabels, rule_matches};
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
    /// The operation as the API server names it.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Create => "CREATE",
            Operation::Update { .. } => "UPDATE",
            Operation::Delete => "DELETE",
            Operation::Connect => "CONNECT",
        }
    }

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
    /// The AdmissionRequest as the API server sent it, for what conditions read of it beyond the
    /// fields above (`request.userInfo`, `request.dryRun`, …). `None` for requests made up
    /// without one (`agentguard why`, tests): conditions naming those fields then guard.
    pub sent: Option<&'a dyn condition::SentRequest>,
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
    /// Distinct approvers needed (at least 1).
    min_approvers: usize,
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
        if self.min_approvers > 1 {
            parts.push(format!("{} distinct approvers needed", self.min_approvers));
        }
        parts.join("; ")
    }
}

#[derive(Clone, Debug)]
pub(crate) struct CompiledRule {
    name: String,
    delete: bool,
    connect: bool,
    /// Only rules naming CREATE see one (the freeze does); a CREATE that amounts to another
    /// operation (an eviction) is judged as that operation by the rules guarding it.
    create: bool,
    replace: bool,
    patch: bool,
    /// (api groups, resource, subresource) patterns; `*` is a wildcard in any position.
    resources: Vec<(Vec<String>, String, Option<String>)>,
    names: Globs,
    namespaces: Globs,
    namespace_selector: Option<Selector>,
    object_selector: Option<Selector>,
    condition: Option<condition::Condition>,
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
    /// Whether any rule names CREATE; when none does, a CREATE is admitted without a lookup.
    guards_create: bool,
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
}

#[cfg(test)]
mod tests;
