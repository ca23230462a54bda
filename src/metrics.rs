//! Prometheus metrics: what agentguard decided, how fast, and whether its caches, certificate
//! and churn breakers are in a state to trust. Served on the admin port; recording never blocks
//! a request.
//!
//! Label values are bounded sets: policies, built-in rules, resources, and agents. Object names,
//! namespaces and the usernames of non-agents never become labels.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::engine::api::{Action, Mode};
use crate::engine::policy::{Allowed, Decision, PolicyId, Reason, Verdict};

/// The API server's own webhook latency buckets
/// (`apiserver_admission_webhook_admission_duration_seconds`), so both sides read on one scale.
const LATENCY_BUCKETS: [f64; 8] = [0.005, 0.025, 0.1, 0.5, 1.0, 2.5, 10.0, 25.0];

/// One series of `agentguard_decisions_total`.
///
/// Each review counts once with `mode="Enforce"` (the verdict applied), plus once per Warn- or
/// Audit-mode policy that would have refused it (`mode` = that mode, `outcome` = what it would
/// have done). Sum over `mode="Enforce"` to count reviews.
///
/// Cardinality: outcome (5) x action (4) x mode (3) x dry_run (2) x the policies that decide x
/// the resources guarded x the agents. `agent` is the requesting username only when the
/// requester is an agent, a bounded set the operator labels; everyone else is "".
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// allowed, warned, approved, held, denied
    pub outcome: String,
    /// Deciding policy (`cluster/NAME` or `NS/NAME`), or a built-in rule, or "".
    pub policy: String,
    /// Deny, RequireApproval, Allow, or none when nothing judged the request.
    pub action: String,
    /// Enforce, Warn or Audit.
    pub mode: String,
    pub resource: String,
    pub agent: String,
    pub dry_run: String,
}

/// One churn breaker: per policy with a churn limit, per agent (both bounded sets).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BreakerLabels {
    pub policy: String,
    pub agent: String,
}

pub struct Metrics {
    registry: Registry,
    pub decisions: Family<DecisionLabels, Counter>,
    pub malformed: Counter,
    pub latency: Histogram,
    pub caches_ready: Gauge,
    pub view_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub stale_refusals: Counter,
    pub deadline_refusals: Counter,
    pub busy_refusals: Counter,
    pub api_requests_in_flight: Gauge,
    pub policies: Gauge,
    pub policy_problems: Gauge,
    pub policy_compiles: Counter,
    pub reached_namespaces: Gauge,
    pub agents_beyond_brakes: Gauge,
    pub certificate_reloads: Counter,
    pub certificate_expiry: Gauge,
    pub breaker_tripped: Family<BreakerLabels, Gauge>,
    pub breaker_refusals: Family<BreakerLabels, Counter>,
    pub events_dropped: Counter,
    pub events_suppressed: Counter,
    pub webhook_configuration_restored: Counter,
    pub webhook_configuration_restore_failures: Counter,
    pub webhook_configuration_update_failures: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("agentguard");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register("decisions", "Admission decisions", decisions.clone());
        let malformed = Counter::default();
        registry.register("malformed_reviews", "AdmissionReviews refused as malformed", malformed.clone());
        let latency = Histogram::new(LATENCY_BUCKETS);
        registry.register("review_duration_seconds", "Time to decide one AdmissionReview", latency.clone());
        let caches_ready = Gauge::default();
        registry.register("caches_ready", "1 when every cache has synced", caches_ready.clone());
        let view_age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "view_age_seconds",
            "Seconds since the API server last vouched for the caches (heartbeat, list or watch event), as of the scrape",
            view_age.clone(),
        );
        let stale_refusals = Counter::default();
        registry.register(
            "stale_refusals",
            "Agents' requests answered HTTP 503 because the view of the cluster was older than --max-staleness",
            stale_refusals.clone(),
        );
        let busy_refusals = Counter::default();
        registry.register(
            "busy_refusals",
            "Requests refused because every API-call slot (--max-inflight-api-requests) stayed taken for the wait",
            busy_refusals.clone(),
        );
        let api_requests_in_flight = Gauge::default();
        registry.register(
            "api_requests_in_flight",
            "Requests making their API calls now (record, churn charge, blast radius, registration), as of the scrape",
            api_requests_in_flight.clone(),
        );
        let deadline_refusals = Counter::default();
        registry.register(
            "deadline_refusals",
            "Requests agentguard refused itself because the API calls they needed did not finish before the API server's timeout",
            deadline_refusals.clone(),
        );
        let policies = Gauge::default();
        registry.register("policies", "Policies currently compiled", policies.clone());
        let reached_namespaces = Gauge::default();
        registry.register(
            "reached_namespaces",
            "Namespaces whose ServiceAccounts are agents because RBAC lets an agent act as them",
            reached_namespaces.clone(),
        );
        let agents_beyond_brakes = Gauge::default();
        registry.register(
            "agents_beyond_brakes",
            "Agents RBAC lets get around the brakes: impersonating users or groups, granting themselves any role, or acting as ServiceAccounts of kube-system or agentguard's namespace",
            agents_beyond_brakes.clone(),
        );
        let policy_problems = Gauge::default();
        registry.register(
            "policy_problems",
            "Problems found compiling the current policies",
            policy_problems.clone(),
        );
        let policy_compiles = Counter::default();
        registry.register(
            "policy_compiles",
            "Times the policies were compiled (once per burst of changes to their specs)",
            policy_compiles.clone(),
        );
        let certificate_reloads = Counter::default();
        registry.register("certificate_reloads", "Serving certificate reloads", certificate_reloads.clone());
        let certificate_expiry = Gauge::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "notAfter of the serving certificate in use, as unix seconds (0 if unreadable)",
            certificate_expiry.clone(),
        );
        let breaker_tripped = Family::<BreakerLabels, Gauge>::default();
        registry.register(
            "breaker_tripped",
            "1 while an agent's churn breaker is tripped under a policy, else 0",
            breaker_tripped.clone(),
        );
        let breaker_refusals = Family::<BreakerLabels, Counter>::default();
        registry.register(
            "breaker_refusals",
            "Requests refused because the agent's churn breaker was tripped",
            breaker_refusals.clone(),
        );
        let events_dropped = Counter::default();
        registry.register(
            "events_dropped",
            "Events dropped because the queue was full",
            events_dropped.clone(),
        );
        let events_suppressed = Counter::default();
        registry.register(
            "events_suppressed",
            "Events not sent: the same object and reason had one within the rate-limit window",
            events_suppressed.clone(),
        );
        let webhook_configuration_restored = Counter::default();
        registry.register(
            "webhook_configuration_restored",
            "Times agentguard restored its webhook configuration after someone else changed or deleted it",
            webhook_configuration_restored.clone(),
        );
        let webhook_configuration_restore_failures = Counter::default();
        registry.register(
            "webhook_configuration_restore_failures",
            "Attempts to restore the webhook configuration after someone else changed or deleted it that failed",
            webhook_configuration_restore_failures.clone(),
        );
        let webhook_configuration_update_failures = Counter::default();
        registry.register(
            "webhook_configuration_update_failures",
            "Attempts to bring the webhook configuration up to date with the caches that failed (the API server refused the write, or could not be reached)",
            webhook_configuration_update_failures.clone(),
        );
        Self {
            registry,
            decisions,
            malformed,
            latency,
            caches_ready,
            view_age,
            stale_refusals,
            deadline_refusals,
            busy_refusals,
            api_requests_in_flight,
            policies,
            policy_problems,
            policy_compiles,
            reached_namespaces,
            agents_beyond_brakes,
            certificate_reloads,
            certificate_expiry,
            breaker_tripped,
            breaker_refusals,
            events_dropped,
            events_suppressed,
            webhook_configuration_restored,
            webhook_configuration_restore_failures,
            webhook_configuration_update_failures,
        }
    }
}

impl Metrics {
    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts one review: its verdict, and what each dry-run policy would have done.
    pub fn decided(&self, decision: &Decision, resource: &str, username: &str, dry_run: bool) {
        let agent = if decision.agent { username } else { "" };
        let labels = |outcome: &str, policy: String, action: Option<Action>, mode: Mode| DecisionLabels {
            outcome: outcome.into(),
            policy,
            action: action.map_or_else(|| "none".into(), |a| format!("{a:?}")),
            mode: format!("{mode:?}"),
            resource: resource.into(),
            agent: agent.into(),
            dry_run: dry_run.to_string(),
        };
        let verdict = labels(decision.outcome(), policy_label(decision), decision.action(), Mode::Enforce);
        self.decisions.get_or_create(&verdict).inc();
        for finding in &decision.dry_runs {
            let outcome = match finding.action {
                Action::RequireApproval => "held",
                _ => "denied",
            };
            let labels =
                labels(outcome, policy_id_label(&finding.policy), Some(finding.action), finding.mode);
            self.decisions.get_or_create(&labels).inc();
        }
    }

    /// The serving certificate was first loaded.
    pub fn certificate_loaded(&self, not_after: Option<i64>) {
        self.certificate_expiry.set(not_after.unwrap_or(0));
    }

    /// Another serving certificate replaced the one in use.
    pub fn certificate_reloaded(&self, not_after: Option<i64>) {
        self.certificate_reloads.inc();
        self.certificate_loaded(not_after);
    }

    /// The churn breaker of `agent` under `policy` tripped (or was reset).
    pub fn set_breaker(&self, policy: &str, agent: &str, tripped: bool) {
        let labels = BreakerLabels { policy: policy.into(), agent: agent.into() };
        self.breaker_tripped.get_or_create(&labels).set(i64::from(tripped));
    }

    /// A request was refused because the churn breaker of `agent` under `policy` was tripped.
    pub fn breaker_refused(&self, policy: &str, agent: &str) {
        let labels = BreakerLabels { policy: policy.into(), agent: agent.into() };
        self.breaker_refusals.get_or_create(&labels).inc();
    }
}

/// The `policy` label of a decision: the deciding policy, `builtin/RULE`, or "".
pub fn policy_label(decision: &Decision) -> String {
    match &decision.verdict {
        Verdict::Deny(d) => match &d.reason {
            Reason::Builtin { rule, .. } => format!("builtin/{rule}"),
            other => other.policy().map(policy_id_label).unwrap_or_default(),
        },
        Verdict::Allow(
            Allowed::Approved { policy, .. }
            | Allowed::BySession { policy, .. }
            | Allowed::ByPolicy { policy, .. },
        ) => policy_id_label(policy),
        Verdict::Allow(_) => String::new(),
    }
}

/// `cluster/NAME` for a ClusterAgentPolicy, `NAMESPACE/NAME` for an AgentPolicy.
pub fn policy_id_label(id: &PolicyId) -> String {
    match &id.namespace {
        None => format!("cluster/{}", id.name),
        Some(ns) => format!("{ns}/{}", id.name),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::engine::approval::Refusal;
    use crate::engine::policy::{Denial, DryRun, Target};

    fn cluster(name: &str) -> PolicyId {
        PolicyId { namespace: None, name: name.into() }
    }

    fn denial(reason: Reason) -> Denial {
        Denial {
            reason,
            requester: "system:serviceaccount:agents:coder".into(),
            operation: "DELETE".into(),
            target: Target::default(),
            change: None,
        }
    }

    fn held(policy: PolicyId) -> Reason {
        Reason::ApprovalRequired {
            policy,
            rule: "r".into(),
            covering: Vec::new(),
            message: None,
            refusal: Refusal::Absent,
            approve_value: "delete".into(),
            expires: None,
            unapprovable: None,
            radius: None,
            need: 1,
        }
    }

    /// The sample lines of `text` for `name`, without the value.
    fn series(text: &str, name: &str) -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .map(|l| l.rsplit_once(' ').map_or(l, |(s, _)| s).to_owned())
            .collect()
    }

    #[test]
    fn decisions_carry_action_mode_and_agent() {
        let m = Metrics::default();
        let agent = "system:serviceaccount:agents:coder";
        let mut d = Decision::deny(denial(held(cluster("prod"))));
        d.agent = true;
        d.dry_runs.push(DryRun { mode: Mode::Warn, policy: cluster("strict"), action: Action::Deny });
        m.decided(&d, "deployments.apps", agent, false);
        // Not an agent (a human writing an approval): no username in the labels.
        m.decided(&Decision::allow(Allowed::ApprovalAccepted), "configmaps", "alice", true);
        let builtin =
            Decision::deny(denial(Reason::Builtin { rule: "self-protection", detail: String::new() }));
        m.decided(&builtin, "clusteragentpolicies.agentguard.io", "bob", false);
        let text = m.encode();
        let got: HashSet<String> = series(&text, "agentguard_decisions_total").into_iter().collect();
        let want: HashSet<String> = [
            format!(
                r#"agentguard_decisions_total{{outcome="held",policy="cluster/prod",action="RequireApproval",mode="Enforce",resource="deployments.apps",agent="{agent}",dry_run="false"}}"#
            ),
            format!(
                r#"agentguard_decisions_total{{outcome="denied",policy="cluster/strict",action="Deny",mode="Warn",resource="deployments.apps",agent="{agent}",dry_run="false"}}"#
            ),
            r#"agentguard_decisions_total{outcome="allowed",policy="",action="none",mode="Enforce",resource="configmaps",agent="",dry_run="true"}"#.into(),
            r#"agentguard_decisions_total{outcome="denied",policy="builtin/self-protection",action="Deny",mode="Enforce",resource="clusteragentpolicies.agentguard.io",agent="",dry_run="false"}"#.into(),
        ]
        .into();
        assert_eq!(got, want, "{text}");
    }

    #[test]
    fn certificate_expiry_follows_each_load() {
        let m = Metrics::default();
        m.certificate_loaded(Some(1_936_787_445));
        assert!(m.encode().contains("\nagentguard_certificate_expiry_timestamp_seconds 1936787445\n"));
        m.certificate_reloaded(Some(2_874_614_400));
        let text = m.encode();
        assert!(text.contains("\nagentguard_certificate_expiry_timestamp_seconds 2874614400\n"), "{text}");
        assert!(text.contains("\nagentguard_certificate_reloads_total 1\n"), "{text}");
        // Unreadable: 0, which an expiry alert reports rather than hides.
        m.certificate_loaded(None);
        assert!(m.encode().contains("\nagentguard_certificate_expiry_timestamp_seconds 0\n"));
    }

    #[test]
    fn breaker_state_and_refusals_per_policy_and_agent() {
        let m = Metrics::default();
        m.set_breaker("cluster/churn", "system:serviceaccount:agents:coder", true);
        m.set_breaker("cluster/churn", "system:serviceaccount:agents:other", true);
        m.set_breaker("cluster/churn", "system:serviceaccount:agents:other", false);
        m.breaker_refused("cluster/churn", "system:serviceaccount:agents:coder");
        m.breaker_refused("cluster/churn", "system:serviceaccount:agents:coder");
        let text = m.encode();
        for line in [
            r#"agentguard_breaker_tripped{policy="cluster/churn",agent="system:serviceaccount:agents:coder"} 1"#,
            r#"agentguard_breaker_tripped{policy="cluster/churn",agent="system:serviceaccount:agents:other"} 0"#,
            r#"agentguard_breaker_refusals_total{policy="cluster/churn",agent="system:serviceaccount:agents:coder"} 2"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
        assert!(!text.contains("agentguard_breaker_refusals_total{policy=\"cluster/churn\",agent=\"system:serviceaccount:agents:other\"}"));
    }

    #[test]
    fn action_of_a_decision() {
        let approved = Allowed::Approved {
            policy: cluster("p"),
            rule: "r".into(),
            approvals: vec!["delete".into()],
            approvers: Vec::new(),
            expires: jiff::Timestamp::UNIX_EPOCH,
        };
        let cases = [
            (Decision::allow(Allowed::NotAgent), None),
            (Decision::allow(Allowed::Unmatched), None),
            (
                Decision::allow(Allowed::ByPolicy { policy: cluster("p"), rule: "r".into() }),
                Some(Action::Allow),
            ),
            (Decision::allow(approved), Some(Action::RequireApproval)),
            (Decision::deny(denial(held(cluster("p")))), Some(Action::RequireApproval)),
            (Decision::deny(denial(Reason::Unmatched)), Some(Action::Deny)),
        ];
        for (decision, action) in cases {
            assert_eq!(decision.action(), action, "{decision:?}");
        }
    }
}
