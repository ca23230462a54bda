//! The ValidatingWebhookConfiguration agentguard keeps current, so the API server only calls it
//! for requests that can concern an agent or an approval.
//!
//! Two webhooks, both `failurePolicy: Fail`:
//!
//! * `agents.agentguard.io` — CREATE/UPDATE/DELETE/CONNECT on everything, narrowed by `matchConditions`
//!   to the exact agent identities the caches know (labelled ServiceAccounts, every
//!   ServiceAccount of an agent namespace by prefix, configured and policy-named users and
//!   groups). When agentguard is down only these requests fail; nobody else is ever called.
//! * `approvals.agentguard.io` — CREATE/UPDATE whose object sets or changes
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
//! Leases and events never reach either webhook. [`desired`] is pure; [`Registrar::keep_current`]
//! applies it with server-side apply whenever the agent set or the CA bundle changes.

use std::collections::{BTreeMap, BTreeSet};
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
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::api::{Api, ObjectMeta, Patch, PatchParams};

use crate::api::{AGENT_NAMESPACE_LABEL, APPROVE_ANNOTATION};
use crate::index::Caches;
use crate::policy::{Config, Facts, PolicySet};

/// Everyone the `agents` webhook must see.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentSet {
    pub usernames: BTreeSet<String>,
    /// Namespaces whose every ServiceAccount is an agent.
    pub namespaces: BTreeSet<String>,
    pub groups: BTreeSet<String>,
}

impl AgentSet {
    pub fn is_empty(&self) -> bool {
        self.usernames.is_empty() && self.namespaces.is_empty() && self.groups.is_empty()
    }

    pub fn extend(&mut self, other: &AgentSet) {
        self.usernames.extend(other.usernames.iter().cloned());
        self.namespaces.extend(other.namespaces.iter().cloned());
        self.groups.extend(other.groups.iter().cloned());
    }

    pub fn contains_all(&self, other: &AgentSet) -> bool {
        other.usernames.is_subset(&self.usernames)
            && other.namespaces.is_subset(&self.namespaces)
            && other.groups.is_subset(&self.groups)
    }

    /// One key per identity, as stored in [`AHEAD_ANNOTATION`].
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
pub fn marked_agents(facts: &Facts<'_>, policies: &PolicySet, config: &Config) -> AgentSet {
    let mut set = AgentSet::default();
    if !facts.group.is_empty() || !facts.subresource.is_empty() {
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
    Url(String),
    Service { namespace: String, name: String, port: i32 },
}

#[derive(Clone, Debug)]
pub struct Settings {
    /// Name of the ValidatingWebhookConfiguration.
    pub name: String,
    pub endpoint: Endpoint,
    /// PEM CA bundle file, re-read on every pass so certificate rotation propagates.
    pub ca_file: PathBuf,
    pub timeout_seconds: i32,
    /// Namespaces never sent to agentguard (kube-system, kube-node-lease, its own): RBAC, not
    /// the webhook, keeps agents out of them.
    pub excluded_namespaces: Vec<String>,
}

const NOT_LEASES_OR_EVENTS: &str = "!(request.resource.group == 'coordination.k8s.io' && request.resource.resource == 'leases') && request.resource.resource != 'events'";

fn cel_list(items: &BTreeSet<String>) -> String {
    let quoted: Vec<String> =
        items.iter().map(|s| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))).collect();
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

/// The condition selecting writes of the approval annotation.
pub fn approval_write_condition() -> String {
    let a = APPROVE_ANNOTATION;
    format!(
        "object != null && has(object.metadata) && has(object.metadata.annotations) && '{a}' in object.metadata.annotations \
         && (oldObject == null || !has(oldObject.metadata.annotations) || !('{a}' in oldObject.metadata.annotations) \
         || oldObject.metadata.annotations['{a}'] != object.metadata.annotations['{a}'])"
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

/// The `approvals` webhook's condition: approval writes, or writes that can mark an agent.
pub fn guard_condition(keys: &BTreeSet<String>) -> String {
    format!("({}) || ({})", approval_write_condition(), agent_label_condition(keys))
}

/// The whole configuration for `set`; `label_keys` are the labels that can make an agent.
pub fn desired(
    settings: &Settings,
    ca_bundle: &[u8],
    set: &AgentSet,
    label_keys: &BTreeSet<String>,
) -> ValidatingWebhookConfiguration {
    let client_config = WebhookClientConfig {
        ca_bundle: Some(ByteString(ca_bundle.to_vec())),
        url: match &settings.endpoint {
            Endpoint::Url(url) => Some(url.clone()),
            Endpoint::Service { .. } => None,
        },
        service: match &settings.endpoint {
            Endpoint::Url(_) => None,
            Endpoint::Service { namespace, name, port } => Some(ServiceReference {
                namespace: namespace.clone(),
                name: name.clone(),
                port: Some(*port),
                path: Some("/validate".into()),
            }),
        },
    };
    let rule = |operations: &[&str]| RuleWithOperations {
        api_groups: Some(vec!["*".into()]),
        api_versions: Some(vec!["*".into()]),
        operations: Some(operations.iter().map(|o| o.to_string()).collect()),
        resources: Some(vec!["*/*".into()]),
        scope: Some("*".into()),
    };
    let condition = |name: &str, expression: String| MatchCondition { name: name.into(), expression };
    let webhook = |name: &str, operations: &[&str], conditions: Vec<MatchCondition>| ValidatingWebhook {
        name: name.into(),
        admission_review_versions: vec!["v1".into()],
        client_config: client_config.clone(),
        failure_policy: Some("Fail".into()),
        match_policy: Some("Equivalent".into()),
        rules: Some(vec![rule(operations)]),
        // Events are written for real requests only.
        side_effects: "NoneOnDryRun".into(),
        timeout_seconds: Some(settings.timeout_seconds),
        match_conditions: Some(conditions),
        namespace_selector: Some(LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "kubernetes.io/metadata.name".into(),
                operator: "NotIn".into(),
                values: Some(settings.excluded_namespaces.clone()),
            }]),
            match_labels: None,
        }),
        ..Default::default()
    };
    ValidatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(settings.name.clone()),
            labels: Some([("app.kubernetes.io/managed-by".to_string(), "agentguard".to_string())].into()),
            ..Default::default()
        },
        webhooks: Some(vec![
            webhook(
                "agents.agentguard.io",
                &["CREATE", "UPDATE", "DELETE", "CONNECT"],
                vec![
                    condition("not-leases-or-events", NOT_LEASES_OR_EVENTS.into()),
                    condition("agents", agent_condition(set)),
                ],
            ),
            webhook(
                "approvals.agentguard.io",
                &["CREATE", "UPDATE"],
                vec![
                    condition("not-leases-or-events", NOT_LEASES_OR_EVENTS.into()),
                    condition("writes-approval-or-agent-label", guard_condition(label_keys)),
                ],
            ),
        ]),
    }
}

/// Registers agents with the API server: keeps the configuration current from the caches, and
/// registers a newly marked agent on demand before its label is admitted.
pub struct Registrar {
    api: Api<ValidatingWebhookConfiguration>,
    caches: Arc<Caches>,
    config: Config,
    settings: Settings,
    /// The live object as last read or written. Held for a whole pass, so a replica's own
    /// writes never race each other.
    live: tokio::sync::Mutex<Live>,
    /// Set once the live configuration has matched the caches: until then the API server may
    /// hold an old CA bundle or agent list, so the replica does not report Ready.
    current: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Live {
    object: Option<ValidatingWebhookConfiguration>,
    read_at: Option<tokio::time::Instant>,
}

/// How many times a registration is retried when another replica wrote first.
const ATTEMPTS: usize = 5;

impl Registrar {
    pub fn new(client: kube::Client, caches: Arc<Caches>, config: Config, settings: Settings) -> Self {
        Self {
            api: Api::all(client),
            caches,
            config,
            settings,
            live: Default::default(),
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
        live.object = self.api.get_opt(&self.settings.name).await?;
        live.read_at = Some(tokio::time::Instant::now());
        Ok(())
    }

    async fn apply(&self, live: &mut Live, want: &ValidatingWebhookConfiguration) -> Result<(), kube::Error> {
        let params = PatchParams::apply("agentguard").force();
        let applied = self.api.patch(&self.settings.name, &params, &Patch::Apply(want)).await?;
        live.object = Some(applied);
        live.read_at = Some(tokio::time::Instant::now());
        Ok(())
    }

    /// Makes sure the `agents` webhook matches every identity of `marked` before returning: reads
    /// the live configuration, and writes it only if something is missing. Called on the write
    /// that marks an agent, which is refused if this fails.
    pub async fn ensure(&self, marked: &AgentSet) -> Result<()> {
        let mut live = self.live.lock().await;
        for _ in 0..ATTEMPTS {
            self.read(&mut live).await.context("reading the webhook configuration")?;
            let (current, set) = self.want(live.object.as_ref(), &AgentSet::default()).await?;
            if set.contains_all(marked) && live.object.as_ref().is_some_and(|l| !drifted(l, &current)) {
                return Ok(());
            }
            let (want, _) = self.want(live.object.as_ref(), marked).await?;
            match self.apply(&mut live, &want).await {
                Ok(()) => {
                    tracing::info!(agents = ?marked, "registered ahead of the caches");
                    return Ok(());
                }
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(e).context("writing the webhook configuration"),
            }
        }
        anyhow::bail!("the webhook configuration kept changing under {ATTEMPTS} attempts")
    }

    /// Keeps the configuration current. Every `every` it recomputes the desired configuration
    /// from the caches (in memory, cheap) and compares it with the live object it last read; it
    /// re-reads the live object every `resync` (anyone — a `helm upgrade`, a human — may change
    /// it), and applies only on a difference. Runs until dropped. Waits for the caches first: an
    /// incomplete agent list would let agents through.
    pub async fn keep_current(self: Arc<Self>, every: Duration, resync: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !self.caches.ready() {
                continue;
            }
            let mut live = self.live.lock().await;
            if live.read_at.is_none_or(|at| at.elapsed() >= resync)
                && let Err(e) = self.read(&mut live).await
            {
                tracing::warn!(error = %e, name = %self.settings.name, "cannot read the webhook configuration");
                continue;
            }
            let (want, set) = match self.want(live.object.as_ref(), &AgentSet::default()).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "cannot compute the webhook configuration");
                    continue;
                }
            };
            // A lapsed registered-ahead entry counts as drift too, so the annotation shrinks back.
            if live
                .object
                .as_ref()
                .is_some_and(|l| !drifted(l, &want) && ahead_listed(l) == ahead_listed(&want))
            {
                self.current.store(true, std::sync::atomic::Ordering::Release);
                continue;
            }
            match self.apply(&mut live, &want).await {
                Ok(()) => {
                    self.current.store(true, std::sync::atomic::Ordering::Release);
                    tracing::info!(
                    name = %self.settings.name,
                    agents = set.usernames.len(),
                    agent_namespaces = set.namespaces.len(),
                    agent_groups = set.groups.len(),
                    "webhook configuration updated"
                    )
                }
                // Someone wrote since the last read: read again on the next tick.
                Err(kube::Error::Api(e)) if e.code == 409 => live.read_at = None,
                Err(e) => {
                    tracing::warn!(error = %e, name = %self.settings.name, "cannot update the webhook configuration");
                    // Read it again, after a pause: it may be gone (uninstalled), or changed.
                    live.read_at = None;
                    drop(live);
                    tokio::time::sleep(resync).await;
                }
            }
        }
    }
}

/// Whether the live configuration differs from `want` in anything agentguard decides.
pub fn drifted(live: &ValidatingWebhookConfiguration, want: &ValidatingWebhookConfiguration) -> bool {
    let (live, want) =
        (live.webhooks.as_deref().unwrap_or_default(), want.webhooks.as_deref().unwrap_or_default());
    live.len() != want.len()
        || want.iter().any(|w| {
            !live.iter().any(|l| {
                l.name == w.name
                    && l.match_conditions == w.match_conditions
                    && l.client_config == w.client_config
                    && l.rules == w.rules
                    && l.failure_policy == w.failure_policy
                    && l.timeout_seconds == w.timeout_seconds
                    && l.side_effects == w.side_effects
                    && l.namespace_selector == w.namespace_selector
            })
        })
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
            excluded_namespaces: vec![
                "kube-system".into(),
                "kube-node-lease".into(),
                "agentguard-system".into(),
            ],
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

    #[test]
    fn drift_is_seen_in_the_fields_agentguard_owns_only() {
        let settings = settings();
        let want = desired(&settings, b"CA", &set(), &keys());
        let mut live = want.clone();
        live.metadata.resource_version = Some("42".into());
        live.webhooks.as_mut().unwrap()[0].object_selector = Some(Default::default());
        assert!(!drifted(&live, &want));
        // e.g. a `helm upgrade` resetting the agent list to the chart's `false`.
        live.webhooks.as_mut().unwrap()[0].match_conditions.as_mut().unwrap()[1].expression = "false".into();
        assert!(drifted(&live, &want));
    }

    #[test]
    fn the_chart_installs_the_same_conditions() {
        let helpers = include_str!("../charts/agentguard/templates/_helpers.tpl");
        let webhook = include_str!("../charts/agentguard/templates/webhook.yaml");
        // The chart starts with the default labels; agentguard adds policies' selector keys.
        assert!(helpers.contains(&guard_condition(&keys())), "_helpers.tpl drifted from guard_condition()");
        let quoted = serde_json::to_string(NOT_LEASES_OR_EVENTS).unwrap();
        assert!(webhook.contains(&quoted), "webhook.yaml drifted from NOT_LEASES_OR_EVENTS");
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
        assert!(webhooks[1].match_conditions.as_ref().unwrap()[1].expression.contains(APPROVE_ANNOTATION));
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
        serde_json::json!({"resource": {"group": "", "version": "v1", "resource": resource}})
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
        assert!(matches(&guard, write("namespaces"), labelled(agent_ns), labelled(json!({}))));
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
        assert!(matches(&guard, write("configmaps"), approved, json!({"metadata": {"name": "web"}})));
    }

    #[test]
    fn a_write_marks_the_agents_its_labels_make() {
        use crate::policy::Operation;
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
}
