//! The ValidatingWebhookConfiguration agentguard keeps current, so the API server only calls it
//! for requests that can concern an agent or an approval.
//!
//! Two webhooks, both `failurePolicy: Fail`, each on its own path, neither excluding a namespace:
//!
//! * `agents.agentguard.io` ([`AGENTS_PATH`]; a request on it is judged as an agent's) —
//!   CREATE/UPDATE/DELETE/CONNECT on everything, narrowed by `matchConditions`
//!   to the exact agent identities the caches know (labelled ServiceAccounts, every
//!   ServiceAccount of an agent namespace by prefix, configured and policy-named users and
//!   groups). When agentguard is down only these requests fail; nobody else is ever called.
//! * `approvals.agentguard.io` ([`APPROVALS_PATH`]) — CREATE/UPDATE whose object sets or changes
//!   `agentguard.io/approve`, or changes a label that can make a ServiceAccount or Namespace an
//!   agent, whoever sends them (CEL on object and oldObject, so ordinary updates never leave the
//!   API server).
//!
//! A new agent is registered *before* its label is stored: when the `approvals` webhook sees a
//! write that marks an agent, [`Registrar::ensure`] adds it to the `agents` condition and only
//! then is the write admitted. No window opens between the label and the registration, and no
//! unlabelled identity is ever sent to agentguard (the guarantee a `failurePolicy: Ignore`
//! catch-all would have given up). Identities registered ahead of the caches are kept in an
//! annotation with a lapse time, so another replica whose caches lag cannot drop them, and every
//! write carries the resourceVersion it was computed from.
//!
//! Leases and events (in their own groups only) never reach either webhook. [`desired`] is pure;
//! [`Registrar::keep_current`] applies it with server-side apply whenever the agent set or the
//! CA bundle changes, and watches the object: Kubernetes never sends writes of webhook
//! configurations to webhooks, so any change by someone else to any field [`differences`]
//! compares, or the object's deletion, is undone within a second and reported (a Warning Event,
//! a metric, a warning in the log).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use jiff::{SignedDuration, Timestamp};

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MatchCondition, RuleWithOperations, ServiceReference, ValidatingWebhook, ValidatingWebhookConfiguration,
    WebhookClientConfig,
};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};

use crate::cluster::caches::Caches;
use crate::cluster::events::{Events, Record};
use crate::engine::api::{AGENT_NAMESPACE_LABEL, APPROVE_ANNOTATION};
use crate::engine::policy::{Config, Facts, PolicySet};
use crate::metrics::Metrics;

pub use crate::engine::policy::identity::AgentSet;

/// One key per identity, as stored in [`AHEAD_ANNOTATION`].
trait AheadKeys {
    fn keys(&self) -> impl Iterator<Item = String> + '_;
    fn insert_key(&mut self, key: &str);
}

impl AheadKeys for AgentSet {
    fn keys(&self) -> impl Iterator<Item = String> + '_ {
        let users = self.usernames.iter().map(|u| format!("user:{u}"));
        let namespaces = self.namespaces.iter().map(|n| format!("namespace:{n}"));
        users.chain(namespaces).chain(self.groups.iter().map(|g| format!("group:{g}")))
    }

    fn insert_key(&mut self, key: &str) {
        if let Some(u) = key.strip_prefix("user:") {
            self.usernames.insert(u.to_owned());
        } else if let Some(n) = key.strip_prefix("namespace:") {
            self.namespaces.insert(n.to_owned());
        } else if let Some(g) = key.strip_prefix("group:") {
            self.groups.insert(g.to_owned());
        }
    }
}

/// The agents a write of a ServiceAccount or Namespace makes, judged on the labels it stores:
/// what must be registered before the write is admitted. Empty for every other write.
///
/// Through any subresource too: a write of `namespaces/status` or `namespaces/finalize` stores
/// the whole Namespace, labels included. A subresource whose object is something else (a
/// `serviceaccounts/token` TokenRequest) stores no labels on the account and marks nobody.
pub fn marked_agents(facts: &Facts<'_>, policies: &PolicySet, config: &Config) -> AgentSet {
    let mut set = AgentSet::default();
    let kind = match facts.resource {
        "serviceaccounts" => "ServiceAccount",
        "namespaces" => "Namespace",
        _ => return set,
    };
    let stores_the_object = facts.subresource.is_empty()
        || facts.object.and_then(|o| o.get("kind")).and_then(serde_json::Value::as_str) == Some(kind);
    if !facts.group.is_empty() || !stores_the_object {
        return set;
    }
    let labels = Facts::labels(facts.object);
    match facts.resource {
        "serviceaccounts" if policies.labels_make_agent(facts.namespace, labels.as_ref(), config) => {
            set.usernames.insert(format!("system:serviceaccount:{}:{}", facts.namespace, facts.name));
        }
        "namespaces"
            if labels.as_ref().and_then(|l| l.get(AGENT_NAMESPACE_LABEL)).map(String::as_str)
                == Some("true") =>
        {
            set.namespaces.insert(facts.name.to_owned());
        }
        _ => {}
    }
    set
}

/// Identities registered ahead of the caches, with the time each lapses (by then the caches
/// have long seen the label, or the write was refused after all and the entry is rightly gone).
pub const AHEAD_ANNOTATION: &str = "agentguard.io/registered-ahead";
const AHEAD_FOR: SignedDuration = SignedDuration::from_secs(60);

/// The raw [`AHEAD_ANNOTATION`] of a configuration.
fn ahead_listed(vwc: &ValidatingWebhookConfiguration) -> Option<&String> {
    vwc.metadata.annotations.as_ref()?.get(AHEAD_ANNOTATION)
}

/// The entries of [`AHEAD_ANNOTATION`] still in force at `now`.
fn ahead(vwc: Option<&ValidatingWebhookConfiguration>, now: Timestamp) -> BTreeMap<String, Timestamp> {
    vwc.and_then(|v| v.metadata.annotations.as_ref()?.get(AHEAD_ANNOTATION))
        .and_then(|json| serde_json::from_str::<BTreeMap<String, Timestamp>>(json).ok())
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, lapses)| *lapses > now)
        .collect()
}

/// Where the API server reaches agentguard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// The base URL of agentguard's webhook port (`https://host:8443`); a trailing `/validate`
    /// is accepted and means the same. Each webhook gets its own path under it.
    Url(String),
    Service {
        namespace: String,
        name: String,
        port: i32,
    },
}

/// The path of the `agents` webhook: every request on it is judged as an agent's.
pub const AGENTS_PATH: &str = "/validate/agents";
/// The path of the `approvals` webhook.
pub const APPROVALS_PATH: &str = "/validate/approvals";
/// The path both webhooks shared before each had its own; still answered, judged from the
/// caches alone.
pub const LEGACY_PATH: &str = "/validate";

/// `path` under the base URL `base`.
fn url_at(base: &str, path: &str) -> String {
    let base = base.trim_end_matches('/');
    let base = base.strip_suffix(LEGACY_PATH).unwrap_or(base);
    format!("{base}{path}")
}

impl Endpoint {
    fn client_config(&self, path: &str, ca_bundle: &[u8]) -> WebhookClientConfig {
        WebhookClientConfig {
            ca_bundle: Some(ByteString(ca_bundle.to_vec())),
            url: match self {
                Endpoint::Url(base) => Some(url_at(base, path)),
                Endpoint::Service { .. } => None,
            },
            service: match self {
                Endpoint::Url(_) => None,
                Endpoint::Service { namespace, name, port } => Some(ServiceReference {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    port: Some(*port),
                    path: Some(path.into()),
                }),
            },
        }
    }
}

#[derive(Clone, Debug)]
pub struct Settings {
    /// Name of the ValidatingWebhookConfiguration.
    pub name: String,
    pub endpoint: Endpoint,
    /// PEM CA bundle file, re-read on every pass so certificate rotation propagates.
    pub ca_file: PathBuf,
    pub timeout_seconds: i32,
    /// Create the configuration when it has never been seen. Off when an installer (the Helm
    /// chart) creates it: a replica starting before Helm's write would otherwise win the race
    /// and fail the install. A configuration seen and then deleted is recreated either way.
    pub create_absent: bool,
    /// agentguard's own namespace, whose leases agents' writes must reach it.
    pub self_namespace: Option<String>,
}

/// Kubernetes' own components never reach the `approvals` webhook: the deployment controller
/// copies a Deployment's annotations, an approval included, onto its ReplicaSets, and must
/// neither pay a webhook call nor be blocked while agentguard is down. (What they copy is inert:
/// a ticket approves only the object it was issued for.)
const NOT_CLUSTER_COMPONENTS: &str = "!request.userInfo.username.startsWith('system:serviceaccount:kube-system:') && !request.userInfo.username.startsWith('system:node:') && !(request.userInfo.username in ['system:kube-controller-manager', 'system:kube-scheduler'])";

/// Leases and events never reach agentguard — only in their real groups: a custom resource
/// named `events` or `leases` in any other group is guarded like any other.
const NOT_LEASES_OR_EVENTS: &str = "!(request.resource.group == 'coordination.k8s.io' && request.resource.resource == 'leases') && !(request.resource.group in ['', 'events.k8s.io'] && request.resource.resource == 'events')";

/// The `agents` webhook's first condition: leases and events stay in the API server, except
/// leases in agentguard's own namespace, which hold the churn and session counts: an agent with
/// rights there must not reset them unseen.
pub fn agents_scope_condition(self_namespace: Option<&str>) -> String {
    match self_namespace {
        None => NOT_LEASES_OR_EVENTS.to_owned(),
        Some(ns) => format!(
            "!(request.resource.group == 'coordination.k8s.io' && request.resource.resource == 'leases' && request.namespace != {}) && !(request.resource.group in ['', 'events.k8s.io'] && request.resource.resource == 'events')",
            cel_string(ns)
        ),
    }
}

/// `s` as a CEL string literal that denotes exactly `s`: single-quoted, with the backslash and
/// the single quote escaped, and every control character and every whitespace character but
/// the space written as `\uXXXX` (all of them lie in the Basic Multilingual Plane). Every
/// other character — a double quote, any script, emoji — is written as itself (CEL source is
/// UTF-8); only escapes every CEL implementation reads alike are used.
pub fn cel_string(s: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            c if c.is_control() || (c.is_whitespace() && c != ' ') => {
                // Writing into a String cannot fail.
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

fn cel_list(items: &BTreeSet<String>) -> String {
    let quoted: Vec<String> = items.iter().map(|s| cel_string(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// The CEL condition selecting exactly the agents of `set` (`false` when there are none).
pub fn agent_condition(set: &AgentSet) -> String {
    let mut parts = Vec::new();
    if !set.usernames.is_empty() {
        parts.push(format!("request.userInfo.username in {}", cel_list(&set.usernames)));
    }
    if !set.namespaces.is_empty() {
        let prefixes: BTreeSet<String> =
            set.namespaces.iter().map(|ns| format!("system:serviceaccount:{ns}:")).collect();
        parts.push(format!("{}.exists(p, request.userInfo.username.startsWith(p))", cel_list(&prefixes)));
    }
    if !set.groups.is_empty() {
        parts.push(format!(
            "(has(request.userInfo.groups) && request.userInfo.groups.exists(g, g in {}))",
            cel_list(&set.groups)
        ));
    }
    if parts.is_empty() { "false".into() } else { parts.join(" || ") }
}

/// The longest `agents` condition written into one webhook. The API server parses every
/// matchCondition with CEL's default limit of 100,000 code points and refuses the whole
/// configuration past it ("expression code point size exceeds limit"): about 2,300 agents'
/// usernames. A byte count never undercounts code points.
pub const MAX_CONDITION_BYTES: usize = 90_000;

/// The `agents` conditions selecting exactly the agents of `set`, one per agents webhook: the
/// whole [`agent_condition`] while it fits in [`MAX_CONDITION_BYTES`]; past that the usernames
/// are split over several conditions. The first also holds the agent namespaces and groups;
/// the others exclude them, so that no request matches two of the webhooks (each would be
/// recorded and charged again).
pub fn agent_conditions(set: &AgentSet) -> Vec<String> {
    let whole = agent_condition(set);
    if whole.len() <= MAX_CONDITION_BYTES {
        return vec![whole];
    }
    let rest = agent_condition(&AgentSet { usernames: BTreeSet::new(), ..set.clone() });
    let others = |users: &BTreeSet<String>| {
        let users = agent_condition(&AgentSet { usernames: users.clone(), ..AgentSet::default() });
        if rest == "false" { users } else { format!("({users}) && !({rest})") }
    };
    let mut chunks: Vec<BTreeSet<String>> = vec![BTreeSet::new()];
    // The first condition's size beyond its usernames, then each other one's.
    let mut room = MAX_CONDITION_BYTES.saturating_sub(rest.len() + 64);
    for user in &set.usernames {
        let cost = cel_string(user).len() + 2;
        let last = chunks.last_mut().expect("never empty");
        if cost > room && !last.is_empty() {
            chunks.push(BTreeSet::new());
            room = MAX_CONDITION_BYTES.saturating_sub(rest.len() + 96);
        }
        room = room.saturating_sub(cost);
        chunks.last_mut().expect("never empty").insert(user.clone());
    }
    let mut out = vec![agent_condition(&AgentSet { usernames: chunks.remove(0), ..set.clone() })];
    out.extend(chunks.iter().map(others));
    out
}

/// The name of the `n`th agents webhook (from 0): the first is [`AGENTS_WEBHOOK`].
pub fn agents_webhook(n: usize) -> String {
    if n == 0 { AGENTS_WEBHOOK.to_owned() } else { format!("agents-{}.agentguard.io", n + 1) }
}

/// Whether `name` is an agents webhook after the first, which come and go with the agent list.
fn more_agents_webhook(name: &str) -> bool {
    name.strip_prefix("agents-")
        .and_then(|n| n.strip_suffix(".agentguard.io"))
        .is_some_and(|n| n.parse::<usize>().is_ok_and(|n| n >= 2))
}

/// The condition selecting writes that set or change an approval annotation
/// (`agentguard.io/approve`, or `agentguard.io/approve.<approver>`; see
/// [`crate::engine::approval::is_key`]).
pub fn approval_write_condition() -> String {
    let a = APPROVE_ANNOTATION;
    format!(
        "object != null && has(object.metadata) && has(object.metadata.annotations) \
         && object.metadata.annotations.exists(k, (k == '{a}' || k.startsWith('{a}.')) \
         && (oldObject == null || !has(oldObject.metadata.annotations) || !(k in oldObject.metadata.annotations) \
         || oldObject.metadata.annotations[k] != object.metadata.annotations[k]))"
    )
}

/// The condition selecting writes that change one of `keys` on a ServiceAccount or Namespace:
/// the writes that can make (or unmake) an agent, sent to agentguard so it can register the
/// agent before the label is stored.
pub fn agent_label_condition(keys: &BTreeSet<String>) -> String {
    let value = |o: &str| {
        format!(
            "({o} != null && has({o}.metadata.labels) && k in {o}.metadata.labels ? {o}.metadata.labels[k] : '')"
        )
    };
    format!(
        "request.resource.group == '' && request.resource.resource in ['serviceaccounts', 'namespaces'] \
         && object != null && {}.exists(k, {} != {})",
        cel_list(keys),
        value("object"),
        value("oldObject")
    )
}

/// The condition selecting the opening of a break-glass session, whose opener agentguard checks.
pub const SESSION_OPENED: &str = "request.operation == 'CREATE' && request.resource.group == 'agentguard.io' && request.resource.resource == 'agentsessions'";

/// The `approvals` webhook's condition: approval writes, writes that can mark an agent, and
/// sessions opened.
pub fn guard_condition(keys: &BTreeSet<String>) -> String {
    format!("({}) || ({}) || ({SESSION_OPENED})", approval_write_condition(), agent_label_condition(keys))
}

/// The names of the two webhooks.
pub const AGENTS_WEBHOOK: &str = "agents.agentguard.io";
pub const APPROVALS_WEBHOOK: &str = "approvals.agentguard.io";
/// The matchConditions computed from the caches (the rest of the configuration is fixed).
const AGENTS_CONDITION: &str = "agents";
const GUARD_CONDITION: &str = "writes-approval-or-agent-label";

/// The whole configuration for `set`; `label_keys` are the labels that can make an agent.
///
/// Every field is set, to the value the API server would otherwise default it to where that
/// is what agentguard wants, so the live object can be compared with this one field by field.
/// Neither webhook excludes a namespace: the `agents` webhook selects agents by identity, so
/// kube-system and agentguard's own namespace are guarded for them like any other; the
/// `approvals` webhook selects writes of the approval annotation and of agent labels, which no
/// controller makes, so no namespace is a place to plant them unseen.
pub fn desired(
    settings: &Settings,
    ca_bundle: &[u8],
    set: &AgentSet,
    label_keys: &BTreeSet<String>,
) -> ValidatingWebhookConfiguration {
    let rule = |operations: &[&str]| RuleWithOperations {
        api_groups: Some(vec!["*".into()]),
        api_versions: Some(vec!["*".into()]),
        operations: Some(operations.iter().map(|o| o.to_string()).collect()),
        resources: Some(vec!["*/*".into()]),
        scope: Some("*".into()),
    };
    let condition = |name: &str, expression: String| MatchCondition { name: name.into(), expression };
    let webhook =
        |name: &str, path: &str, operations: &[&str], conditions: Vec<MatchCondition>| ValidatingWebhook {
            name: name.into(),
            admission_review_versions: vec!["v1".into()],
            client_config: settings.endpoint.client_config(path, ca_bundle),
            failure_policy: Some("Fail".into()),
            match_policy: Some("Equivalent".into()),
            rules: Some(vec![rule(operations)]),
            // Events are written for real requests only.
            side_effects: "NoneOnDryRun".into(),
            timeout_seconds: Some(settings.timeout_seconds),
            match_conditions: Some(conditions),
            namespace_selector: Some(LabelSelector::default()),
            object_selector: Some(LabelSelector::default()),
        };
    let agents = |n: usize, expression: String| {
        webhook(
            &agents_webhook(n),
            AGENTS_PATH,
            &["CREATE", "UPDATE", "DELETE", "CONNECT"],
            vec![
                condition("not-leases-or-events", agents_scope_condition(settings.self_namespace.as_deref())),
                condition(AGENTS_CONDITION, expression),
            ],
        )
    };
    let mut conditions = agent_conditions(set).into_iter();
    let mut webhooks = vec![
        agents(0, conditions.next().unwrap_or_else(|| "false".into())),
        webhook(
            APPROVALS_WEBHOOK,
            APPROVALS_PATH,
            &["CREATE", "UPDATE"],
            vec![
                condition("not-leases-or-events", NOT_LEASES_OR_EVENTS.into()),
                condition("not-cluster-components", NOT_CLUSTER_COMPONENTS.into()),
                condition(GUARD_CONDITION, guard_condition(label_keys)),
            ],
        ),
    ];
    // More agents than one condition can list: each further part in a webhook of its own, after
    // the approvals webhook so the first two stay where they always were.
    webhooks.extend(conditions.enumerate().map(|(i, expression)| agents(i + 1, expression)));
    ValidatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(settings.name.clone()),
            labels: Some([("app.kubernetes.io/managed-by".to_string(), "agentguard".to_string())].into()),
            ..Default::default()
        },
        webhooks: Some(webhooks),
    }
}

/// One field in which the live configuration differs from the wanted one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    /// `webhooks[NAME].FIELD`, or `webhooks` for the list itself.
    pub field: String,
    /// Only what a replica computes from its caches (the agent matchConditions) or reloads from
    /// a file (the CA bundle) differs: another replica ahead of this one may have written it.
    pub from_caches: bool,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.field)
    }
}

/// A webhook with the API server's defaults filled in, so that a field left unset and the same
/// field set to its default compare equal.
fn normalized(w: &ValidatingWebhook) -> ValidatingWebhook {
    let selector = |s: &Option<LabelSelector>| {
        let s = s.clone().unwrap_or_default();
        Some(LabelSelector {
            match_expressions: s.match_expressions.filter(|e| !e.is_empty()),
            match_labels: s.match_labels.filter(|l| !l.is_empty()),
        })
    };
    let mut client_config = w.client_config.clone();
    if let Some(service) = &mut client_config.service {
        service.port = Some(service.port.unwrap_or(443));
    }
    ValidatingWebhook {
        name: w.name.clone(),
        admission_review_versions: w.admission_review_versions.clone(),
        client_config,
        failure_policy: Some(w.failure_policy.clone().unwrap_or_else(|| "Fail".into())),
        match_policy: Some(w.match_policy.clone().unwrap_or_else(|| "Equivalent".into())),
        rules: Some(
            w.rules
                .iter()
                .flatten()
                .map(|r| RuleWithOperations {
                    scope: Some(r.scope.clone().unwrap_or_else(|| "*".into())),
                    ..r.clone()
                })
                .collect(),
        ),
        side_effects: w.side_effects.clone(),
        timeout_seconds: Some(w.timeout_seconds.unwrap_or(10)),
        match_conditions: Some(w.match_conditions.clone().unwrap_or_default()),
        namespace_selector: selector(&w.namespace_selector),
        object_selector: selector(&w.object_selector),
    }
}

/// Every field in which `live` differs from `want`: each webhook's every field (compared with
/// the API server's defaults filled in), and the webhooks' names and count. Empty when the
/// live configuration does exactly what agentguard wants. Metadata is not compared.
pub fn differences(
    live: &ValidatingWebhookConfiguration,
    want: &ValidatingWebhookConfiguration,
) -> Vec<Difference> {
    let (live, want) =
        (live.webhooks.as_deref().unwrap_or_default(), want.webhooks.as_deref().unwrap_or_default());
    let mut out = Vec::new();
    let names = |list: &[ValidatingWebhook]| list.iter().map(|w| w.name.clone()).collect::<Vec<_>>();
    let (mut live_names, mut want_names) = (names(live), names(want));
    live_names.sort();
    want_names.sort();
    if live_names != want_names {
        // Only agents webhooks past the first come or go: the agent list grew or shrank.
        let from_caches = live_names
            .iter()
            .filter(|n| !want_names.contains(n))
            .chain(want_names.iter().filter(|n| !live_names.contains(n)))
            .all(|n| more_agents_webhook(n));
        out.push(Difference { field: "webhooks".into(), from_caches });
    }
    for w in want {
        let Some(l) = live.iter().find(|l| l.name == w.name) else { continue };
        let (l, w) = (normalized(l), normalized(w));
        // Destructured so that a field added to the API cannot go uncompared.
        let ValidatingWebhook {
            name,
            admission_review_versions,
            client_config,
            failure_policy,
            match_conditions,
            match_policy,
            namespace_selector,
            object_selector,
            rules,
            side_effects,
            timeout_seconds,
        } = &w;
        let mut field = |differs: bool, field: &str, from_caches: bool| {
            if differs {
                out.push(Difference { field: format!("webhooks[{name}].{field}"), from_caches });
            }
        };
        field(&l.admission_review_versions != admission_review_versions, "admissionReviewVersions", false);
        // The CA bundle comes from a file each replica reloads on its own schedule.
        let ca_only =
            WebhookClientConfig { ca_bundle: client_config.ca_bundle.clone(), ..l.client_config.clone() }
                == *client_config;
        field(&l.client_config != client_config, "clientConfig", ca_only);
        field(&l.failure_policy != failure_policy, "failurePolicy", false);
        field(&l.match_policy != match_policy, "matchPolicy", false);
        field(&l.namespace_selector != namespace_selector, "namespaceSelector", false);
        field(&l.object_selector != object_selector, "objectSelector", false);
        field(&l.rules != rules, "rules", false);
        field(&l.side_effects != side_effects, "sideEffects", false);
        field(&l.timeout_seconds != timeout_seconds, "timeoutSeconds", false);
        if l.match_conditions != *match_conditions {
            // Only the expressions computed from the caches differ: same names, same order.
            let (lc, wc) = (
                l.match_conditions.as_deref().unwrap_or_default(),
                match_conditions.as_deref().unwrap_or_default(),
            );
            let from_caches = lc.len() == wc.len()
                && lc.iter().zip(wc).all(|(a, b)| {
                    a.name == b.name
                        && (a.expression == b.expression
                            || [AGENTS_CONDITION, GUARD_CONDITION].contains(&b.name.as_str()))
                });
            field(true, "matchConditions", from_caches);
        }
    }
    out
}

/// Registers agents with the API server: keeps the configuration current from the caches,
/// registers a newly marked agent on demand before its label is admitted, and restores the
/// configuration when anyone else changes or deletes it.
pub struct Registrar {
    api: Api<ValidatingWebhookConfiguration>,
    client: kube::Client,
    caches: Arc<Caches>,
    config: Config,
    settings: Settings,
    events: Events,
    metrics: Arc<Metrics>,
    /// The live object as last read, watched or written. Held for a whole pass, so a
    /// replica's own writes never race each other.
    live: tokio::sync::Mutex<Live>,
    /// Registrations waiting for the next write (see [`Registrar::ensure`]).
    queued: std::sync::Mutex<Queued>,
    /// Set once the live configuration has matched the caches: until then the API server may
    /// hold an old CA bundle or agent list, so the replica does not report Ready.
    current: std::sync::atomic::AtomicBool,
}

/// What one registration is told: every caller of a coalesced write gets the same outcome.
type Registered = Result<(), Arc<anyhow::Error>>;

/// Registrations made while a write was under way, answered together by the next one.
#[derive(Default)]
struct Queued {
    set: AgentSet,
    waiting: Vec<tokio::sync::oneshot::Sender<Registered>>,
}

#[derive(Default)]
struct Live {
    object: Option<ValidatingWebhookConfiguration>,
    read_at: Option<tokio::time::Instant>,
    /// The resourceVersion this replica last wrote, or last found to be what it wants. A live
    /// object with another one was written by someone else since.
    agreed: Option<String>,
    /// The metadata of the last object seen, kept when it is deleted.
    last_metadata: Option<ObjectMeta>,
    /// When someone else's change that only the caches could explain was first seen.
    foreign_since: Option<tokio::time::Instant>,
    /// Its Helm release deleted the configuration on uninstall: left alone until it reappears.
    released: bool,
}

impl Live {
    fn set(&mut self, object: Option<ValidatingWebhookConfiguration>) {
        if let Some(o) = &object {
            self.last_metadata = Some(o.metadata.clone());
            self.released = false;
        }
        self.object = object;
        self.read_at = Some(tokio::time::Instant::now());
    }

    fn version(&self) -> Option<&String> {
        self.object.as_ref()?.metadata.resource_version.as_ref()
    }
}

/// How many times a registration is retried when another replica wrote first.
const ATTEMPTS: usize = 5;
/// How long a change by someone else that only the caches could explain (an agent list another
/// replica computed from caches ahead of this one's) is given for this replica's caches to catch
/// up, before it is restored as tampering.
const CACHE_GRACE: Duration = Duration::from_millis(400);
/// The pause after a failed pass.
const ERROR_PAUSE: Duration = Duration::from_secs(1);
/// The Event reason of a restored configuration.
pub const RESTORED_REASON: &str = "WebhookConfigurationRestored";
const FIELD_MANAGER: &str = "agentguard";

impl Registrar {
    pub fn new(
        client: kube::Client,
        caches: Arc<Caches>,
        config: Config,
        settings: Settings,
        events: Events,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            api: Api::all(client.clone()),
            client,
            caches,
            config,
            settings,
            events,
            metrics,
            live: Default::default(),
            queued: Default::default(),
            current: Default::default(),
        }
    }

    /// Whether the configuration has been brought up to date at least once.
    pub fn current(&self) -> bool {
        self.current.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The configuration wanted now: the caches' agents, those registered ahead in `live` and
    /// not lapsed, and `extra` (registered ahead by this call).
    async fn want(
        &self,
        live: Option<&ValidatingWebhookConfiguration>,
        extra: &AgentSet,
    ) -> Result<(ValidatingWebhookConfiguration, AgentSet)> {
        let ca = tokio::fs::read(&self.settings.ca_file)
            .await
            .with_context(|| format!("reading the webhook CA bundle {}", self.settings.ca_file.display()))?;
        let now = Timestamp::now();
        let mut registered_ahead = ahead(live, now);
        let lapses = now + AHEAD_FOR;
        for key in extra.keys() {
            registered_ahead.insert(key, lapses);
        }
        let mut set = self.caches.agent_set(&self.config);
        for key in registered_ahead.keys() {
            set.insert_key(key);
        }
        let keys = self.caches.policies().agent_label_keys(&self.config);
        let mut want = desired(&self.settings, &ca, &set, &keys);
        if !registered_ahead.is_empty() {
            let json =
                serde_json::to_string(&registered_ahead).context("encoding the registered-ahead list")?;
            want.metadata.annotations = Some([(AHEAD_ANNOTATION.to_owned(), json)].into());
        }
        // A precondition: if anyone wrote since `live` was read, the write fails with a conflict
        // and is recomputed from the newer object instead of dropping what it added.
        want.metadata.resource_version = live.and_then(|l| l.metadata.resource_version.clone());
        Ok((want, set))
    }

    async fn read(&self, live: &mut Live) -> Result<(), kube::Error> {
        let object = self.api.get_opt(&self.settings.name).await?;
        live.set(object);
        Ok(())
    }

    /// Writes `want` with server-side apply (creating the object if it is gone). Apply never
    /// removes what other managers added — an extra webhook or matchCondition — so when the
    /// result still differs, its webhooks are replaced outright.
    async fn write(&self, live: &mut Live, want: &ValidatingWebhookConfiguration) -> Result<(), kube::Error> {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let mut written = self.api.patch(&self.settings.name, &params, &Patch::Apply(want)).await?;
        if !differences(&written, want).is_empty() {
            written.webhooks = want.webhooks.clone();
            let params = PostParams { dry_run: false, field_manager: Some(FIELD_MANAGER.into()) };
            written = self.api.replace(&self.settings.name, &params, &written).await?;
        }
        live.agreed = written.metadata.resource_version.clone();
        live.foreign_since = None;
        live.set(Some(written));
        Ok(())
    }

    /// Makes sure the `agents` webhook matches every identity of `marked` before returning: reads
    /// the live configuration, and writes it only if something is missing. Called on the write
    /// that marks an agent, which is refused if this fails.
    ///
    /// Concurrent registrations are coalesced: each is queued, and whoever next holds the live
    /// object registers everything queued by then in one read and at most one write, and tells
    /// every caller in that batch the outcome. A thousand agents labelled at once cost a few
    /// writes of the configuration, not a thousand (each write carries the whole agent list).
    pub async fn ensure(&self, marked: &AgentSet) -> Result<()> {
        // What the new agent can act as is registered with it: RBAC may already let it.
        let mut marked = marked.clone();
        marked.namespaces.extend(self.caches.reach_with(&marked));
        // A batch whose writer was cancelled (its request went away) is queued again.
        for _ in 0..ATTEMPTS {
            let (told, outcome) = tokio::sync::oneshot::channel();
            {
                let mut queued = self.queued.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                queued.set.extend(&marked);
                queued.waiting.push(told);
            }
            {
                let mut live = self.live.lock().await;
                // Empty when an earlier holder took this registration with its own: its outcome
                // has been sent already.
                let batch = std::mem::take(
                    &mut *self.queued.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
                );
                if !batch.waiting.is_empty() {
                    let result =
                        self.register(&mut live, &batch.set, batch.waiting.len()).await.map_err(Arc::new);
                    for caller in batch.waiting {
                        let _ = caller.send(result.clone());
                    }
                }
            }
            match outcome.await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => return Err(anyhow::anyhow!("{e:#}")),
                Err(_) => continue,
            }
        }
        anyhow::bail!("the registration's writer was cancelled {ATTEMPTS} times")
    }

    /// One read and, when something of `marked` is missing, one write (again on a conflict).
    async fn register(&self, live: &mut Live, marked: &AgentSet, callers: usize) -> Result<()> {
        for _ in 0..ATTEMPTS {
            self.read(live).await.context("reading the webhook configuration")?;
            let (current, set) = self.want(live.object.as_ref(), &AgentSet::default()).await?;
            if set.contains_all(marked)
                && live.object.as_ref().is_some_and(|l| differences(l, &current).is_empty())
            {
                return Ok(());
            }
            let (want, _) = self.want(live.object.as_ref(), marked).await?;
            match self.write(live, &want).await {
                Ok(()) => {
                    tracing::info!(agents = ?marked, registrations = callers, "registered ahead of the caches");
                    return Ok(());
                }
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(e).context("writing the webhook configuration"),
            }
        }
        anyhow::bail!("the webhook configuration kept changing under {ATTEMPTS} attempts")
    }

    /// Keeps the configuration current and repairs it. Watches the one object, so any change
    /// by anyone (or its deletion) is seen at once; every `every` it also recomputes the desired
    /// configuration from the caches (in memory, cheap), and re-reads the live object every
    /// `resync` in case the watch lags. Compares the live object with the desired one, never
    /// with its own last write, so it cannot fight itself. Runs until dropped. Waits for the
    /// caches first: an incomplete agent list would let agents through.
    pub async fn keep_current(self: Arc<Self>, every: Duration, resync: Duration) {
        use futures::StreamExt;
        use kube::runtime::{WatchStreamExt, watcher};

        let selector = format!("metadata.name={}", self.settings.name);
        let mut changes =
            watcher(self.api.clone(), watcher::Config::default().fields(&selector)).default_backoff().boxed();
        // Objects listed since the watch (re)started; the listing is complete at `InitDone`.
        let mut listing: Option<Option<ValidatingWebhookConfiguration>> = None;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let seen = tokio::select! {
                _ = tick.tick() => None,
                change = changes.next() => match change {
                    Some(Ok(watcher::Event::Apply(o))) => Some(Some(o)),
                    Some(Ok(watcher::Event::Delete(_))) => Some(None),
                    Some(Ok(watcher::Event::Init)) => { listing = Some(None); continue }
                    Some(Ok(watcher::Event::InitApply(o))) => { listing = Some(Some(o)); continue }
                    Some(Ok(watcher::Event::InitDone)) => listing.take(),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, name = %self.settings.name, "watching the webhook configuration");
                        continue;
                    }
                    None => {
                        tracing::warn!(name = %self.settings.name, "the webhook configuration watch ended; polling");
                        changes = futures::stream::pending().boxed();
                        continue;
                    }
                },
            };
            let mut live = self.live.lock().await;
            let watched = seen.is_some();
            if let Some(object) = seen {
                live.set(object);
            }
            if !self.caches.ready() {
                continue;
            }
            match watched {
                true => {}
                false if live.read_at.is_none_or(|at| at.elapsed() >= resync) => {
                    if let Err(e) = self.read(&mut live).await {
                        tracing::warn!(error = %e, name = %self.settings.name, "cannot read the webhook configuration");
                        continue;
                    }
                }
                false => {}
            }
            if let Err(e) = self.reconcile(&mut live).await {
                self.metrics.webhook_configuration_update_failures.inc();
                tracing::warn!(error = format!("{e:#}"), name = %self.settings.name, "cannot keep the webhook configuration");
                // Read it again before the next attempt, after a pause: it may have changed, or
                // agentguard may have lost its rights to it (an uninstall in progress).
                live.read_at = None;
                drop(live);
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }

    /// One comparison of the live object with the desired one, and the write that follows a
    /// difference: an update when the caches moved, a loud restore when someone else changed
    /// or deleted the configuration.
    async fn reconcile(&self, live: &mut Live) -> Result<()> {
        if live.released && live.object.is_none() {
            return Ok(());
        }
        if live.object.is_none() && live.last_metadata.is_none() && !self.settings.create_absent {
            // Its installer has not written it yet.
            return Ok(());
        }
        let (mut want, set) = self.want(live.object.as_ref(), &AgentSet::default()).await?;
        if live.object.is_none() {
            // Recreated as its installer left it: Helm still owns it, so upgrades and uninstall go on.
            let helm = live.last_metadata.iter().flat_map(|m| m.annotations.iter().flatten());
            let helm: BTreeMap<String, String> = helm
                .filter(|(k, _)| k.starts_with("meta.helm.sh/"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if !helm.is_empty() {
                want.metadata.annotations.get_or_insert_with(Default::default).extend(helm);
            }
        }
        let changed = match &live.object {
            Some(object) => differences(object, &want),
            None => {
                vec![Difference { field: "the whole configuration (deleted)".into(), from_caches: false }]
            }
        };
        // A lapsed registered-ahead entry is a difference too, so the annotation shrinks back.
        let ahead_lapsed = live.object.as_ref().is_some_and(|l| ahead_listed(l) != ahead_listed(&want));
        // Someone else wrote (or deleted) it since this replica last agreed with it.
        let foreign = live.agreed.is_some() && live.version() != live.agreed.as_ref();
        if changed.is_empty() {
            live.agreed = live.version().cloned();
            live.foreign_since = None;
            self.current.store(true, std::sync::atomic::Ordering::Release);
        } else if foreign {
            live.foreign_since.get_or_insert_with(tokio::time::Instant::now);
        }
        let foreign_for = live.foreign_since.map(|at| at.elapsed()).unwrap_or_default();
        let restore = match next_step(&changed, ahead_lapsed, foreign, foreign_for) {
            Step::Nothing | Step::Wait => return Ok(()),
            Step::Update => false,
            Step::Restore => true,
        };
        if restore && live.object.is_none() && self.uninstalling(live.last_metadata.as_ref()).await {
            tracing::info!(name = %self.settings.name, "the webhook configuration was deleted by its Helm release's uninstall: not recreated");
            live.agreed = None;
            live.released = true;
            return Ok(());
        }
        let before = live.object.clone();
        match self.write(live, &want).await {
            Ok(()) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {
                // Written meanwhile: compare again with what is there now.
                live.read_at = None;
                return Ok(());
            }
            Err(e) if restore => {
                // Tampered with and not repaired: the loudest case of all.
                self.metrics.webhook_configuration_restore_failures.inc();
                let fields = changed.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
                tracing::error!(error = %e, name = %self.settings.name, %fields, "webhook configuration changed by someone else and not restored");
                return Err(e).context("restoring the webhook configuration");
            }
            Err(e) => return Err(e).context("writing the webhook configuration"),
        }
        self.current.store(true, std::sync::atomic::Ordering::Release);
        if restore {
            self.restored(before.as_ref(), &changed, live.object.as_ref());
        } else {
            tracing::info!(
                name = %self.settings.name,
                agents = set.usernames.len(),
                agent_namespaces = set.namespaces.len(),
                agent_groups = set.groups.len(),
                "webhook configuration updated"
            );
        }
        Ok(())
    }

    /// Says loudly that the configuration was restored: a Warning Event on it, a counter and a
    /// warning in the log, naming the fields and who last wrote them.
    fn restored(
        &self,
        before: Option<&ValidatingWebhookConfiguration>,
        changed: &[Difference],
        after: Option<&ValidatingWebhookConfiguration>,
    ) {
        self.metrics.webhook_configuration_restored.inc();
        let fields = changed.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        let writers = before.map(writers).unwrap_or_default();
        tracing::warn!(name = %self.settings.name, %fields, writers = %writers, "webhook configuration changed by someone else: restored");
        let by = if writers.is_empty() {
            String::new()
        } else {
            format!(" (field managers other than agentguard: {writers})")
        };
        let name = &self.settings.name;
        let what = match before {
            None => {
                format!("agentguard recreated its webhook configuration {name}, deleted by someone else{by}.")
            }
            Some(_) => {
                format!("agentguard restored its webhook configuration {name}: someone changed {fields}{by}.")
            }
        };
        let note = format!(
            "{what} Only RBAC can stop such writes: `agentguard audit` lists who may update, patch or delete it."
        );
        self.events.emit(Record {
            regarding: ObjectReference {
                api_version: Some("admissionregistration.k8s.io/v1".into()),
                kind: Some("ValidatingWebhookConfiguration".into()),
                name: Some(self.settings.name.clone()),
                uid: after.and_then(|a| a.metadata.uid.clone()),
                ..Default::default()
            },
            warning: true,
            reason: RESTORED_REASON,
            note,
            part: 0,
            stored: None,
        });
    }

    /// Whether a deleted configuration was removed by `helm uninstall` of the release that
    /// installed it (Helm marks its release `uninstalling` before deleting anything): then it is
    /// not recreated, or agentguard would leave behind a webhook nobody answers. Anything else —
    /// no Helm release, a release still deployed, a release agentguard cannot read — is tampering.
    async fn uninstalling(&self, metadata: Option<&ObjectMeta>) -> bool {
        use k8s_openapi::api::core::v1::Secret;
        let annotations = metadata.and_then(|m| m.annotations.as_ref());
        let annotation = |key: &str| annotations.and_then(|a| a.get(key));
        let (Some(release), Some(namespace)) =
            (annotation("meta.helm.sh/release-name"), annotation("meta.helm.sh/release-namespace"))
        else {
            return false;
        };
        let secrets = Api::<Secret>::namespaced(self.client.clone(), namespace);
        let params = kube::api::ListParams::default().labels(&format!("owner=helm,name={release}"));
        match secrets.list_metadata(&params).await {
            Ok(list) => {
                let status = |s: &kube::core::PartialObjectMeta<Secret>| {
                    s.metadata.labels.as_ref().and_then(|l| l.get("status")).cloned().unwrap_or_default()
                };
                list.items.is_empty() || list.items.iter().any(|s| status(s) == "uninstalling")
            }
            Err(e) => {
                tracing::warn!(error = %e, %release, %namespace, "cannot read the Helm release: restoring the deleted webhook configuration");
                false
            }
        }
    }
}

/// What a pass does about the live configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// It is what agentguard wants.
    Nothing,
    /// Write what the caches now want (or let a lapsed registered-ahead entry go): quietly.
    Update,
    /// Someone else's change another replica's fresher caches may explain: give this replica's
    /// caches [`CACHE_GRACE`] to agree.
    Wait,
    /// Someone else changed or deleted it: restore it, loudly.
    Restore,
}

/// The step for `changed` (the live object against the wanted one), where `foreign` says the
/// live object is not one this replica wrote or agreed with, first seen `foreign_for` ago.
/// Comparing with what is wanted, never with its own last write, a replica cannot fight itself.
fn next_step(changed: &[Difference], ahead_lapsed: bool, foreign: bool, foreign_for: Duration) -> Step {
    if changed.is_empty() {
        return if ahead_lapsed { Step::Update } else { Step::Nothing };
    }
    if !foreign {
        return Step::Update;
    }
    if changed.iter().all(|d| d.from_caches) && foreign_for < CACHE_GRACE {
        return Step::Wait;
    }
    Step::Restore
}

/// The field managers other than agentguard that wrote the object, for the record.
fn writers(object: &ValidatingWebhookConfiguration) -> String {
    let mut managers: Vec<String> = object
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .filter(|m| m != FIELD_MANAGER)
        .collect();
    managers.sort();
    managers.dedup();
    managers.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            name: "agentguard".into(),
            endpoint: Endpoint::Url("https://127.0.0.1:8443/validate".into()),
            ca_file: PathBuf::new(),
            timeout_seconds: 5,
            create_absent: true,
            self_namespace: None,
        }
    }

    fn set() -> AgentSet {
        AgentSet {
            usernames: ["system:serviceaccount:agents:coder".to_string(), "o'brien".to_string()].into(),
            namespaces: ["bots".to_string()].into(),
            groups: ["ai-agents".to_string()].into(),
        }
    }

    fn keys() -> BTreeSet<String> {
        ["agentguard.io/agent".to_string(), AGENT_NAMESPACE_LABEL.to_string()].into()
    }

    #[test]
    fn agent_condition_lists_exact_identities() {
        assert_eq!(agent_condition(&AgentSet::default()), "false");
        assert_eq!(
            agent_condition(&set()),
            "request.userInfo.username in ['o\\'brien', 'system:serviceaccount:agents:coder'] || \
             ['system:serviceaccount:bots:'].exists(p, request.userInfo.username.startsWith(p)) || \
             (has(request.userInfo.groups) && request.userInfo.groups.exists(g, g in ['ai-agents']))"
        );
    }

    /// Every field of a webhook, changed one at a time, is a difference named after it;
    /// metadata and the API server's defaults are not.
    #[test]
    fn every_field_of_every_webhook_is_compared() {
        let settings = settings();
        let want = desired(&settings, b"CA", &set(), &keys());
        let field = |change: &dyn Fn(&mut ValidatingWebhook), index: usize| {
            let mut live = want.clone();
            change(&mut live.webhooks.as_mut().unwrap()[index]);
            differences(&live, &want)
        };
        let selector = || {
            Some(LabelSelector {
                match_labels: Some([("x".to_string(), "y".to_string())].into()),
                ..Default::default()
            })
        };
        type Change = Box<dyn Fn(&mut ValidatingWebhook)>;
        let cases: Vec<(&str, Change)> = vec![
            ("admissionReviewVersions", Box::new(|w| w.admission_review_versions.push("v1beta1".into()))),
            (
                "clientConfig",
                Box::new(|w| w.client_config.url = Some("https://evil.example/validate".into())),
            ),
            ("failurePolicy", Box::new(|w| w.failure_policy = Some("Ignore".into()))),
            (
                "matchConditions",
                Box::new(|w| w.match_conditions.as_mut().unwrap()[0].expression = "false".into()),
            ),
            ("matchPolicy", Box::new(|w| w.match_policy = Some("Exact".into()))),
            ("namespaceSelector", Box::new(move |w| w.namespace_selector = selector())),
            ("objectSelector", Box::new(move |w| w.object_selector = selector())),
            ("rules", Box::new(|w| w.rules.as_mut().unwrap()[0].operations = Some(vec!["CREATE".into()]))),
            ("sideEffects", Box::new(|w| w.side_effects = "None".into())),
            ("timeoutSeconds", Box::new(|w| w.timeout_seconds = Some(1))),
        ];
        for (name, change) in &cases {
            for (index, webhook) in [AGENTS_WEBHOOK, APPROVALS_WEBHOOK].into_iter().enumerate() {
                let found = field(change.as_ref(), index);
                assert_eq!(
                    found,
                    vec![Difference { field: format!("webhooks[{webhook}].{name}"), from_caches: false }],
                    "{name} of {webhook}"
                );
            }
        }
        // A matchCondition added (apply would never remove it) or renamed is not the caches' doing.
        let extra = field(
            &|w| {
                w.match_conditions
                    .as_mut()
                    .unwrap()
                    .push(MatchCondition { name: "x".into(), expression: "false".into() })
            },
            0,
        );
        assert!(!extra[0].from_caches);
        // Another replica's agent list, or CA bundle, may be ahead of this one's.
        let agents = field(&|w| w.match_conditions.as_mut().unwrap()[1].expression = "false".into(), 0);
        assert_eq!(
            agents,
            vec![Difference {
                field: "webhooks[agents.agentguard.io].matchConditions".into(),
                from_caches: true
            }]
        );
        assert!(
            field(&|w| w.client_config.ca_bundle = Some(ByteString(b"other".to_vec())), 1)[0].from_caches
        );
        // The webhooks' names and count.
        let mut live = want.clone();
        live.webhooks.as_mut().unwrap().pop();
        assert_eq!(differences(&live, &want)[0].field, "webhooks");
        let mut live = want.clone();
        let copy = live.webhooks.as_ref().unwrap()[0].clone();
        live.webhooks.as_mut().unwrap().push(ValidatingWebhook { name: "evil.example.com".into(), ..copy });
        assert_eq!(differences(&live, &want)[0].field, "webhooks");
        let mut live = want.clone();
        live.webhooks.as_mut().unwrap()[0].name = "renamed.agentguard.io".into();
        assert_eq!(differences(&live, &want)[0].field, "webhooks");

        // Not differences: metadata, and fields the API server defaults.
        let mut live = want.clone();
        live.metadata.resource_version = Some("42".into());
        live.metadata.annotations =
            Some([("meta.helm.sh/release-name".to_string(), "agentguard".to_string())].into());
        live.webhooks.as_mut().unwrap().reverse();
        for w in live.webhooks.as_mut().unwrap() {
            w.object_selector = None;
            w.namespace_selector =
                Some(LabelSelector { match_expressions: Some(vec![]), match_labels: None });
            w.rules.as_mut().unwrap()[0].scope = None;
        }
        assert_eq!(differences(&live, &want), vec![]);
        let service = Settings {
            endpoint: Endpoint::Service {
                namespace: "agentguard-system".into(),
                name: "agentguard".into(),
                port: 443,
            },
            ..settings
        };
        let want = desired(&service, b"CA", &set(), &keys());
        let mut live = want.clone();
        live.webhooks.as_mut().unwrap()[0].client_config.service.as_mut().unwrap().port = None;
        live.webhooks.as_mut().unwrap()[1].timeout_seconds = None;
        assert_eq!(differences(&live, &want)[0].field, "webhooks[approvals.agentguard.io].timeoutSeconds");
        assert_eq!(differences(&live, &want).len(), 1);
    }

    #[test]
    fn someone_elses_change_is_restored_and_the_caches_moving_only_updates() {
        let field =
            |from_caches| Difference { field: "webhooks[agents.agentguard.io].x".into(), from_caches };
        let now = Duration::ZERO;
        // Nothing to do, or a quiet update: the live object is this replica's own.
        assert_eq!(next_step(&[], false, false, now), Step::Nothing);
        assert_eq!(next_step(&[], false, true, now), Step::Nothing);
        assert_eq!(next_step(&[], true, false, now), Step::Update);
        assert_eq!(next_step(&[field(true)], false, false, now), Step::Update);
        assert_eq!(next_step(&[field(false)], false, false, now), Step::Update);
        // Someone else's: restored at once, unless only what fresher caches explain differs.
        assert_eq!(next_step(&[field(false)], false, true, now), Step::Restore);
        assert_eq!(next_step(&[field(true), field(false)], false, true, now), Step::Restore);
        assert_eq!(next_step(&[field(true)], false, true, now), Step::Wait);
        assert_eq!(next_step(&[field(true)], false, true, CACHE_GRACE), Step::Restore);
    }

    #[test]
    fn ten_thousand_agents_are_split_over_webhooks_each_matching_its_own() {
        let username = |i: usize| format!("system:serviceaccount:reg-{:04}:agent-{}", i / 10, i % 10);
        let many = AgentSet {
            usernames: (0..10_000).map(username).collect(),
            namespaces: ["team-ns".to_owned()].into(),
            groups: ["agents".to_owned()].into(),
        };
        let vwc = desired(&settings(), b"CA", &many, &keys());
        let webhooks = vwc.webhooks.unwrap();
        let agents: Vec<&ValidatingWebhook> =
            webhooks.iter().filter(|w| w.name != APPROVALS_WEBHOOK).collect();
        assert!(agents.len() >= 5, "{} agents webhooks", agents.len());
        assert_eq!(webhooks[0].name, AGENTS_WEBHOOK);
        assert_eq!(webhooks[1].name, APPROVALS_WEBHOOK);
        let conditions: Vec<&str> = agents
            .iter()
            .map(|w| {
                let c = w.match_conditions.as_ref().unwrap();
                assert_eq!(c[0].name, "not-leases-or-events");
                assert_eq!(w.client_config, webhooks[0].client_config);
                assert_eq!(w.rules, webhooks[0].rules);
                c.iter().find(|c| c.name == AGENTS_CONDITION).unwrap().expression.as_str()
            })
            .collect();
        assert!(conditions.iter().all(|c| c.len() <= MAX_CONDITION_BYTES));
        // Every agent in exactly one webhook, whoever it is; nobody else in any.
        let programs: Vec<cel::Program> =
            conditions.iter().map(|c| cel::Program::compile(c).unwrap()).collect();
        let matched = |user: &str, groups: &[&str]| {
            let mut context = cel::Context::default();
            context
                .add_variable(
                    "request",
                    serde_json::json!({"userInfo": {"username": user, "groups": groups}}),
                )
                .unwrap();
            programs.iter().filter(|p| p.execute(&context).unwrap() == cel::Value::Bool(true)).count()
        };
        for i in (0..10_000).step_by(397).chain([0, 9_999]) {
            assert_eq!(matched(&username(i), &[]), 1, "{}", username(i));
            assert_eq!(matched(&username(i), &["agents"]), 1, "{} in the agents group", username(i));
        }
        assert_eq!(matched("system:serviceaccount:team-ns:anyone", &[]), 1);
        assert_eq!(matched("alice", &["agents"]), 1);
        assert_eq!(matched("alice", &["people"]), 0);
        assert_eq!(matched("system:serviceaccount:reg-0000:agent-10", &[]), 0);
        // A part coming or going is the caches moving, not someone else's change.
        let fewer = desired(&settings(), b"CA", &AgentSet::default(), &keys());
        let changed = differences(&fewer, &desired(&settings(), b"CA", &many, &keys()));
        assert!(changed.iter().all(|d| d.from_caches), "{changed:?}");
        let mut renamed = fewer.clone();
        renamed.webhooks.as_mut().unwrap()[1].name = "agents-2.agentguard.io".into();
        assert!(differences(&renamed, &fewer).iter().any(|d| d.field == "webhooks" && !d.from_caches));
        // Below the limit, one condition as ever.
        assert_eq!(agent_conditions(&set()), vec![agent_condition(&set())]);
    }

    #[test]
    fn each_webhook_has_its_own_path_and_no_namespace_exclusion() {
        let vwc = desired(&settings(), b"CA", &set(), &keys());
        let webhooks = vwc.webhooks.unwrap();
        let urls: Vec<_> = webhooks.iter().map(|w| w.client_config.url.clone().unwrap()).collect();
        assert_eq!(
            urls,
            ["https://127.0.0.1:8443/validate/agents", "https://127.0.0.1:8443/validate/approvals"]
        );
        for w in &webhooks {
            assert_eq!(w.namespace_selector, Some(LabelSelector::default()));
            assert_eq!(w.object_selector, Some(LabelSelector::default()));
        }
        for base in
            ["https://h:8443", "https://h:8443/", "https://h:8443/validate", "https://h:8443/validate/"]
        {
            assert_eq!(url_at(base, AGENTS_PATH), "https://h:8443/validate/agents", "{base}");
        }
        let service = Settings {
            endpoint: Endpoint::Service {
                namespace: "agentguard-system".into(),
                name: "agentguard".into(),
                port: 443,
            },
            ..settings()
        };
        let webhooks = desired(&service, b"CA", &set(), &keys()).webhooks.unwrap();
        let paths: Vec<_> = webhooks
            .iter()
            .map(|w| w.client_config.service.as_ref().unwrap().path.clone().unwrap())
            .collect();
        assert_eq!(paths, [AGENTS_PATH, APPROVALS_PATH]);
    }

    /// `request.userInfo.username in [LITERAL]` as the API server's CEL would evaluate it.
    fn username_in(literals: &str, username: &str) -> bool {
        let request = serde_json::json!({"userInfo": {"username": username}});
        matches(
            &format!("request.userInfo.username in [{literals}]"),
            request,
            serde_json::Value::Null,
            serde_json::Value::Null,
        )
    }

    #[test]
    fn cel_literals_escape_quotes_backslashes_and_control_characters() {
        assert_eq!(cel_string("o'brien"), r"'o\'brien'");
        assert_eq!(cel_string("a\\b\"c"), r#"'a\\b"c'"#);
        assert_eq!(
            cel_string("line\nbreak\u{0}\u{7f}\u{85}\u{2028}"),
            r"'line\u000abreak\u0000\u007f\u0085\u2028'"
        );
        assert_eq!(cel_string("żółw 🐢 ok"), "'żółw 🐢 ok'");
        for s in [
            "",
            "'",
            "\\",
            "\\'",
            "'\\",
            "\n",
            "\r\n",
            "\t",
            "\u{1b}[31m",
            "x' || true || '",
            "x\\' || true || \\'",
        ] {
            assert!(username_in(&cel_string(s), s), "{s:?}");
            assert!(!username_in(&cel_string(s), &format!("{s}x")), "{s:?}");
        }
    }

    proptest::proptest! {
        /// Any string renders to a literal that compiles and denotes exactly it: the condition
        /// selects that username and no other.
        #[test]
        fn any_username_renders_to_a_literal_that_selects_exactly_it(s in ".*", other in ".*") {
            proptest::prop_assert!(username_in(&cel_string(&s), &s));
            proptest::prop_assert_eq!(username_in(&cel_string(&s), &other), s == other);
            let set = AgentSet { usernames: [s.clone(), other.clone()].into(), ..Default::default() };
            let condition = agent_condition(&set);
            let request = serde_json::json!({"userInfo": {"username": s}});
            proptest::prop_assert!(matches(&condition, request, serde_json::Value::Null, serde_json::Value::Null));
        }
    }

    #[test]
    fn the_chart_installs_the_same_conditions() {
        let helpers = include_str!("../../charts/agentguard/templates/_helpers.tpl");
        let webhook = include_str!("../../charts/agentguard/templates/webhook.yaml");
        // The chart starts with the default labels; agentguard adds policies' selector keys.
        assert!(helpers.contains(&guard_condition(&keys())), "_helpers.tpl drifted from guard_condition()");
        let quoted = serde_json::to_string(NOT_LEASES_OR_EVENTS).unwrap();
        assert!(webhook.contains(&quoted), "webhook.yaml drifted from NOT_LEASES_OR_EVENTS");
        let agents =
            agents_scope_condition(Some("RELEASE")).replace("'RELEASE'", "'{{ $.Release.Namespace }}'");
        let quoted = serde_json::to_string(&agents).unwrap();
        assert!(webhook.contains(&quoted), "webhook.yaml drifted from agents_scope_condition()");
        let quoted = serde_json::to_string(NOT_CLUSTER_COMPONENTS).unwrap();
        assert!(webhook.contains(&quoted), "webhook.yaml drifted from NOT_CLUSTER_COMPONENTS");
    }

    #[test]
    fn configuration_fails_closed_and_skips_leases_and_events() {
        let settings = settings();
        let vwc = desired(&settings, b"CA", &set(), &keys());
        let webhooks = vwc.webhooks.unwrap();
        assert_eq!(webhooks.len(), 2);
        for w in &webhooks {
            assert_eq!(w.failure_policy.as_deref(), Some("Fail"));
            assert_eq!(w.side_effects, "NoneOnDryRun");
            assert_eq!(w.client_config.ca_bundle.as_ref().unwrap().0, b"CA");
            let conditions = w.match_conditions.as_ref().unwrap();
            assert_eq!(conditions[0].expression, NOT_LEASES_OR_EVENTS);
            assert!(conditions.len() <= 64);
        }
        assert!(webhooks[1].match_conditions.as_ref().unwrap()[2].expression.contains(APPROVE_ANNOTATION));
    }

    /// The conditions evaluated as the API server would, on the variables it binds.
    fn matches(
        expression: &str,
        request: serde_json::Value,
        object: serde_json::Value,
        old: serde_json::Value,
    ) -> bool {
        let program = cel::Program::compile(expression).unwrap();
        let mut context = cel::Context::default();
        context.add_variable("request", request).unwrap();
        context.add_variable("object", object).unwrap();
        context.add_variable("oldObject", old).unwrap();
        program.execute(&context).unwrap() == cel::Value::Bool(true)
    }

    fn write(resource: &str) -> serde_json::Value {
        serde_json::json!({"operation": "UPDATE", "resource": {"group": "", "version": "v1", "resource": resource}})
    }

    fn labelled(labels: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"metadata": {"name": "coder", "labels": labels}})
    }

    #[test]
    fn guard_sees_writes_of_agent_labels_and_approvals_only() {
        use serde_json::{Value, json};
        let guard = guard_condition(&keys());
        let sa = write("serviceaccounts");
        let agent = json!({"agentguard.io/agent": "true"});
        // Marking an agent, by update or at creation; unmarking one.
        assert!(matches(&guard, sa.clone(), labelled(agent.clone()), labelled(json!({}))));
        assert!(matches(&guard, sa.clone(), labelled(agent.clone()), Value::Null));
        assert!(matches(&guard, sa.clone(), json!({"metadata": {"name": "coder"}}), labelled(agent.clone())));
        let agent_ns = json!({"agentguard.io/agent-namespace": "true"});
        assert!(matches(&guard, write("namespaces"), labelled(agent_ns.clone()), labelled(json!({}))));
        // Through a subresource too: `request.resource` names the resource, `subResource` is apart.
        let mut status = write("namespaces");
        status["subResource"] = json!("status");
        assert!(matches(&guard, status.clone(), labelled(agent_ns.clone()), labelled(json!({}))));
        assert!(matches(&guard, status, labelled(json!({})), labelled(agent_ns)));
        // Everything else stays in the API server: other labels, unchanged agents, other kinds.
        assert!(!matches(&guard, sa.clone(), labelled(json!({"team": "ml"})), labelled(json!({}))));
        assert!(!matches(&guard, sa.clone(), json!({"metadata": {"name": "coder"}}), Value::Null));
        let relabel = json!({"agentguard.io/agent": "true", "team": "ml"});
        assert!(!matches(&guard, sa.clone(), labelled(relabel), labelled(agent.clone())));
        assert!(!matches(&guard, write("configmaps"), labelled(agent.clone()), labelled(json!({}))));
        // A DELETE carries no object.
        assert!(!matches(&guard, sa, Value::Null, labelled(agent)));
        // Approvals still go through it.
        let approved = json!({"metadata": {"name": "web", "annotations": {APPROVE_ANNOTATION: "delete"}}});
        assert!(matches(&guard, write("configmaps"), approved.clone(), json!({"metadata": {"name": "web"}})));
        // So do one approver's own approvals among several, added or changed, but not others' left
        // as they are, nor annotations that merely look alike.
        let annotated = |pairs: Value| json!({"metadata": {"name": "web", "annotations": pairs}});
        let alice = format!("{APPROVE_ANNOTATION}.alice-1");
        let bob = format!("{APPROVE_ANNOTATION}.bob-2");
        let before = annotated(json!({APPROVE_ANNOTATION: "delete", alice.clone(): "delete.a.alice"}));
        let added = annotated(
            json!({APPROVE_ANNOTATION: "delete", alice.clone(): "delete.a.alice", bob.clone(): "delete.b.bob"}),
        );
        let changed = annotated(json!({APPROVE_ANNOTATION: "delete", alice.clone(): "delete.c.alice"}));
        assert!(matches(&guard, write("configmaps"), added.clone(), before.clone()));
        assert!(matches(&guard, write("configmaps"), changed, before.clone()));
        assert!(!matches(&guard, write("configmaps"), before.clone(), before.clone()));
        assert!(!matches(&guard, write("configmaps"), before.clone(), added));
        // Sessions opened go through it; changes to them (never allowed by the schema) need not.
        let mut session = write("agentsessions");
        session["resource"]["group"] = json!("agentguard.io");
        session["operation"] = json!("CREATE");
        assert!(matches(&guard, session.clone(), json!({"metadata": {"name": "s"}}), Value::Null));
        session["operation"] = json!("UPDATE");
        assert!(!matches(
            &guard,
            session,
            json!({"metadata": {"name": "s"}}),
            json!({"metadata": {"name": "s"}})
        ));
        let lookalike = annotated(json!({format!("{APPROVE_ANNOTATION}x"): "delete", "other": "x"}));
        assert!(!matches(&guard, write("configmaps"), lookalike, json!({"metadata": {"name": "web"}})));
    }

    #[test]
    fn kubernetes_own_components_never_reach_the_approvals_webhook() {
        let by = |user: &str| {
            let request = serde_json::json!({"userInfo": {"username": user}});
            matches(NOT_CLUSTER_COMPONENTS, request, serde_json::Value::Null, serde_json::Value::Null)
        };
        for component in [
            "system:serviceaccount:kube-system:deployment-controller",
            "system:kube-controller-manager",
            "system:kube-scheduler",
            "system:node:node-1",
        ] {
            assert!(!by(component), "{component}");
        }
        for other in ["alice", "system:serviceaccount:agents:coder", "system:serviceaccount:argo:controller"]
        {
            assert!(by(other), "{other}");
        }
    }

    #[test]
    fn only_real_leases_and_events_are_skipped() {
        let on = |group: &str, resource: &str| {
            let request =
                serde_json::json!({"resource": {"group": group, "version": "v1", "resource": resource}});
            matches(NOT_LEASES_OR_EVENTS, request, serde_json::Value::Null, serde_json::Value::Null)
        };
        assert!(!on("", "events"));
        assert!(!on("events.k8s.io", "events"));
        assert!(!on("coordination.k8s.io", "leases"));
        // Custom resources that share the names are guarded like any other.
        assert!(on("example.com", "events"));
        assert!(on("example.com", "leases"));
        assert!(on("", "leases"));
        assert!(on("apps", "deployments"));
        // Agents' writes of leases reach agentguard in its own namespace only (its counts live there).
        let agents = agents_scope_condition(Some("agentguard-system"));
        let lease_in = |namespace: &str| {
            let request = serde_json::json!({"namespace": namespace,
                "resource": {"group": "coordination.k8s.io", "version": "v1", "resource": "leases"}});
            matches(&agents, request, serde_json::Value::Null, serde_json::Value::Null)
        };
        assert!(lease_in("agentguard-system"));
        assert!(!lease_in("agents"));
        let event = serde_json::json!({"namespace": "agentguard-system",
            "resource": {"group": "", "version": "v1", "resource": "events"}});
        assert!(!matches(&agents, event, serde_json::Value::Null, serde_json::Value::Null));
    }

    #[test]
    fn a_write_marks_the_agents_its_labels_make() {
        use crate::engine::policy::Operation;
        use serde_json::json;
        let policies = PolicySet::default();
        let config = Config::default();
        fn facts<'a>(resource: &'a str, namespace: &'a str, object: &'a serde_json::Value) -> Facts<'a> {
            Facts {
                operation: Operation::Update { patch: None },
                group: "",
                resource,
                subresource: "",
                namespace,
                name: "coder",
                object: Some(object),
                old_object: None,
                collateral: &[],
                sent: None,
            }
        }
        let agent = labelled(json!({"agentguard.io/agent": "true"}));
        let plain = labelled(json!({"team": "ml"}));
        let marked = marked_agents(&facts("serviceaccounts", "ml", &agent), &policies, &config);
        assert_eq!(marked.usernames, BTreeSet::from(["system:serviceaccount:ml:coder".to_string()]));
        assert!(marked_agents(&facts("serviceaccounts", "ml", &plain), &policies, &config).is_empty());
        assert!(marked_agents(&facts("configmaps", "ml", &agent), &policies, &config).is_empty());
        let agent_ns = labelled(json!({AGENT_NAMESPACE_LABEL: "true"}));
        let marked = marked_agents(&facts("namespaces", "coder", &agent_ns), &policies, &config);
        assert_eq!(marked.namespaces, BTreeSet::from(["coder".to_string()]));
        // Through a subresource that stores the object, by the labels it stores.
        let mut status = facts("namespaces", "coder", &agent_ns);
        status.subresource = "status";
        let as_stored = json!({"kind": "Namespace", "metadata": {"name": "coder", "labels": {AGENT_NAMESPACE_LABEL: "true"}}});
        status.object = Some(&as_stored);
        assert_eq!(
            marked_agents(&status, &policies, &config).namespaces,
            BTreeSet::from(["coder".to_string()])
        );
        status.subresource = "finalize";
        assert_eq!(marked_agents(&status, &policies, &config).namespaces.len(), 1);
        // A subresource whose object is something else stores no labels on the account.
        let token = json!({"kind": "TokenRequest", "metadata": {"name": "coder", "labels": {"agentguard.io/agent": "true"}}});
        let mut request = facts("serviceaccounts", "ml", &token);
        request.subresource = "token";
        assert!(marked_agents(&request, &policies, &config).is_empty());
    }

    #[test]
    fn registered_ahead_entries_lapse() {
        let now: Timestamp = "2026-11-27T10:00:00Z".parse().unwrap();
        let mut vwc = desired(&settings(), b"CA", &set(), &keys());
        let entries = serde_json::json!({
            "user:system:serviceaccount:ml:coder": "2026-11-27T10:05:00Z",
            "namespace:bots": "2026-11-27T09:59:59Z",
        });
        vwc.metadata.annotations = Some([(AHEAD_ANNOTATION.to_string(), entries.to_string())].into());
        let live = ahead(Some(&vwc), now);
        assert_eq!(live.keys().collect::<Vec<_>>(), ["user:system:serviceaccount:ml:coder"]);
        let mut set = AgentSet::default();
        live.keys().for_each(|k| set.insert_key(k));
        assert_eq!(set.keys().collect::<Vec<_>>(), ["user:system:serviceaccount:ml:coder"]);
        // Garbage in the annotation registers nobody rather than failing the pass.
        vwc.metadata.annotations = Some([(AHEAD_ANNOTATION.to_string(), "{".to_string())].into());
        assert!(ahead(Some(&vwc), now).is_empty());
    }

    /// Concurrent registrations against a fake API server that counts reads and writes.
    mod coalescing {
        use std::sync::Mutex;

        use axum::http::{Request, Response, StatusCode};
        use http_body_util::BodyExt;
        use serde_json::{Value, json};

        use super::super::*;

        #[derive(Default)]
        struct Server {
            object: Option<Value>,
            version: u64,
            reads: usize,
            writes: usize,
            fail_writes: bool,
        }

        /// A client of an API server holding one ValidatingWebhookConfiguration, whose every write
        /// takes 20 ms (so registrations arrive while one is under way) and honours the
        /// resourceVersion precondition.
        fn client(server: Arc<Mutex<Server>>) -> kube::Client {
            let service = tower::service_fn(move |request: Request<kube::client::Body>| {
                let server = server.clone();
                async move {
                    let method = request.method().clone();
                    let body = request.into_body().collect().await.map(|b| b.to_bytes().to_vec());
                    let body = body.unwrap_or_default();
                    let (status, reply) = if method == "GET" {
                        let mut s = server.lock().unwrap();
                        s.reads += 1;
                        match &s.object {
                            Some(o) => (StatusCode::OK, o.clone()),
                            None => (
                                StatusCode::NOT_FOUND,
                                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                       "reason": "NotFound", "code": 404}),
                            ),
                        }
                    } else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let mut s = server.lock().unwrap();
                        s.writes += 1;
                        let mut object: Value = serde_json::from_slice(&body).unwrap();
                        let current = s.version.to_string();
                        let precondition = object["metadata"]["resourceVersion"].as_str().map(str::to_owned);
                        if s.fail_writes || precondition.is_some_and(|v| s.object.is_some() && v != current) {
                            let code = if s.fail_writes { 500 } else { 409 };
                            (
                                StatusCode::from_u16(code).unwrap(),
                                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code}),
                            )
                        } else {
                            s.version += 1;
                            object["metadata"]["resourceVersion"] = json!(s.version.to_string());
                            s.object = Some(object.clone());
                            (StatusCode::OK, object)
                        }
                    };
                    let mut response =
                        Response::new(kube::client::Body::from(serde_json::to_vec(&reply).unwrap()));
                    *response.status_mut() = status;
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            kube::Client::new(service, "default")
        }

        fn registrar(server: Arc<Mutex<Server>>, ca: &std::path::Path) -> Registrar {
            let client = client(server);
            let metrics = Arc::new(Metrics::default());
            // The caches are never started: they know no agent, so only what is registered
            // ahead is in the configuration.
            let bound = crate::cluster::freshness::Bound(crate::cluster::freshness::DEFAULT_MAX_STALENESS);
            let (caches, _never_run) =
                Caches::start(client.clone(), metrics.clone(), Config::default(), bound);
            let settings = Settings {
                name: "agentguard".into(),
                endpoint: Endpoint::Url("https://127.0.0.1:8443".into()),
                ca_file: ca.to_owned(),
                timeout_seconds: 5,
                create_absent: true,
                self_namespace: None,
            };
            Registrar::new(
                client,
                caches,
                Config::default(),
                settings,
                Events::disabled(metrics.clone()),
                metrics,
            )
        }

        fn agent(i: usize) -> AgentSet {
            AgentSet {
                usernames: [format!("system:serviceaccount:team-{i}:agent")].into(),
                ..Default::default()
            }
        }

        /// (reads, writes) so far.
        fn counts(server: &Mutex<Server>) -> (usize, usize) {
            let s = server.lock().unwrap();
            (s.reads, s.writes)
        }

        fn registered(server: &Mutex<Server>) -> String {
            let object = server.lock().unwrap().object.clone().unwrap();
            let vwc: ValidatingWebhookConfiguration = serde_json::from_value(object).unwrap();
            let agents = vwc.webhooks.unwrap().into_iter().find(|w| w.name == AGENTS_WEBHOOK).unwrap();
            agents
                .match_conditions
                .unwrap()
                .into_iter()
                .find(|c| c.name == AGENTS_CONDITION)
                .unwrap()
                .expression
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn concurrent_registrations_share_one_write() {
            let ca = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(ca.path(), "-----BEGIN CERTIFICATE-----\n").unwrap();
            let server = Arc::new(Mutex::new(Server::default()));
            let registrar = registrar(server.clone(), ca.path());

            // One alone: one read, one write.
            registrar.ensure(&agent(0)).await.unwrap();
            assert_eq!(counts(&server), (1, 1));

            // 100 at once: each is admitted only once it is in the configuration, and they take
            // two writes (the first caller's, then everyone queued behind it), not 100.
            let calls: Vec<_> = (1..=100).map(agent).collect();
            let results = futures::future::join_all(calls.iter().map(|a| registrar.ensure(a))).await;
            assert!(results.iter().all(Result::is_ok), "{results:?}");
            let (reads, writes) = counts(&server);
            assert!(writes - 1 <= 2, "100 concurrent registrations took {} writes", writes - 1);
            assert!(reads - 1 <= 2, "100 concurrent registrations took {} reads", reads - 1);
            let expression = registered(&server);
            for i in 0..=100 {
                assert!(
                    expression.contains(&format!("system:serviceaccount:team-{i}:agent")),
                    "agent {i} missing"
                );
            }

            // Already registered: a read, no write.
            registrar.ensure(&agent(7)).await.unwrap();
            assert_eq!(counts(&server).1, writes);

            // A failed write fails every registration of its batch: none is admitted unregistered.
            server.lock().unwrap().fail_writes = true;
            let calls: Vec<_> = (200..220).map(agent).collect();
            let results = futures::future::join_all(calls.iter().map(|a| registrar.ensure(a))).await;
            assert!(results.iter().all(Result::is_err), "{results:?}");
            assert!(!registered(&server).contains("team-200:"));
        }
    }
}
