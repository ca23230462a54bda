//! The ValidatingWebhookConfiguration agentguard keeps current, so the API server only calls it
//! for requests that can concern an agent or an approval.
//!
//! Two webhooks, both `failurePolicy: Fail`:
//!
//! * `agents.agentguard.io` — CREATE/UPDATE/DELETE on everything, narrowed by `matchConditions`
//!   to the exact agent identities the caches know (labelled ServiceAccounts, every
//!   ServiceAccount of an agent namespace by prefix, configured and policy-named users and
//!   groups). When agentguard is down only these requests fail; nobody else is ever called.
//! * `approvals.agentguard.io` — CREATE/UPDATE whose object sets or changes
//!   `agentguard.io/approve`, whoever sends them (CEL on object and oldObject, so ordinary
//!   updates never leave the API server).
//!
//! Leases and events never reach either. [`desired`] is pure; [`keep_current`] applies it with
//! server-side apply whenever the agent set or the CA bundle changes.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MatchCondition, RuleWithOperations, ServiceReference, ValidatingWebhook, ValidatingWebhookConfiguration,
    WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::api::{Api, ObjectMeta, Patch, PatchParams};

use crate::api::APPROVE_ANNOTATION;
use crate::index::Caches;
use crate::policy::Config;

/// Everyone the `agents` webhook must see.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentSet {
    pub usernames: BTreeSet<String>,
    /// Namespaces whose every ServiceAccount is an agent.
    pub namespaces: BTreeSet<String>,
    pub groups: BTreeSet<String>,
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

/// The whole configuration for `set`.
pub fn desired(settings: &Settings, ca_bundle: &[u8], set: &AgentSet) -> ValidatingWebhookConfiguration {
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
                &["CREATE", "UPDATE", "DELETE"],
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
                    condition("writes-approval", approval_write_condition()),
                ],
            ),
        ]),
    }
}

/// Keeps the configuration current. Every `every` it recomputes the desired configuration from
/// the caches (in memory, cheap) and compares it with the live object it last read; it re-reads
/// the live object every `resync` (anyone — a `helm upgrade`, a human — may change it), and
/// applies only on a difference. Runs until dropped. Waits for the caches first: an incomplete
/// agent list would let agents through.
pub async fn keep_current(
    client: kube::Client,
    caches: Arc<Caches>,
    config: Config,
    settings: Settings,
    every: Duration,
    resync: Duration,
) {
    let api: Api<ValidatingWebhookConfiguration> = Api::all(client);
    let params = PatchParams::apply("agentguard").force();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut live: Option<ValidatingWebhookConfiguration> = None;
    let mut last_read = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        if !caches.ready() {
            continue;
        }
        let ca = match tokio::fs::read(&settings.ca_file).await {
            Ok(ca) => ca,
            Err(e) => {
                tracing::warn!(error = %e, file = %settings.ca_file.display(), "cannot read the webhook CA bundle");
                continue;
            }
        };
        let set = caches.agent_set(&config);
        let want = desired(&settings, &ca, &set);
        if live.is_none() || last_read.elapsed() >= resync {
            match api.get_opt(&settings.name).await {
                Ok(current) => {
                    live = current;
                    last_read = tokio::time::Instant::now();
                }
                Err(e) => {
                    tracing::warn!(error = %e, name = %settings.name, "cannot read the webhook configuration");
                    continue;
                }
            }
        }
        if live.as_ref().is_some_and(|l| !drifted(l, &want)) {
            continue;
        }
        match api.patch(&settings.name, &params, &Patch::Apply(&want)).await {
            Ok(applied) => {
                tracing::info!(
                    name = %settings.name,
                    agents = set.usernames.len(),
                    agent_namespaces = set.namespaces.len(),
                    agent_groups = set.groups.len(),
                    "webhook configuration updated"
                );
                live = Some(applied);
            }
            Err(e) => {
                tracing::warn!(error = %e, name = %settings.name, "cannot update the webhook configuration");
                // Read it again, after a pause: it may be gone (uninstalled), or changed under us.
                live = None;
                tokio::time::sleep(resync).await;
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
        let want = desired(&settings, b"CA", &set());
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
        assert!(
            helpers.contains(&approval_write_condition()),
            "_helpers.tpl drifted from approval_write_condition()"
        );
        let quoted = serde_json::to_string(NOT_LEASES_OR_EVENTS).unwrap();
        assert!(webhook.contains(&quoted), "webhook.yaml drifted from NOT_LEASES_OR_EVENTS");
    }

    #[test]
    fn configuration_fails_closed_and_skips_leases_and_events() {
        let settings = settings();
        let vwc = desired(&settings, b"CA", &set());
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
}
