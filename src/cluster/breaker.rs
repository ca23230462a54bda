//! The churn circuit breaker: a policy's `churnLimit` caps how many guarded operations one agent
//! may make per window. Once an agent has spent its budget, every further operation the policy
//! guards is refused until the window passes or a human resets the count.
//!
//! Counts live in the API server, one Lease per (policy, counted subject) in agentguard's
//! namespace — the subject is the agent, its agent namespace, or the whole policy, as the
//! policy's `churnLimit.scope` says (see [`ChurnBudget::subject`]) — so
//! all replicas share them. Each charge is a read and a write carrying the resourceVersion it
//! read: when two replicas charge at once, one write fails with a conflict and is redone on the
//! newer count, so no operation is lost or counted twice. The window is fixed: it opens with the
//! first charged operation and closes `window` later.
//!
//! Resetting needs no special tool, only rights agents must not have (agentguard's namespace):
//! `kubectl annotate lease NAME -n NAMESPACE agentguard.io/reset-churn=now --overwrite`
//! (the refusal message prints the exact command). The next charge opens a new window.

use std::sync::Arc;

use anyhow::{Context, Result};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use sha2::{Digest, Sha256};

use crate::engine::policy::ChurnBudget;
use crate::metrics::policy_id_label;

pub const POLICY_ANNOTATION: &str = "agentguard.io/churn-policy";
pub const AGENT_ANNOTATION: &str = "agentguard.io/churn-agent";
pub const COUNT_ANNOTATION: &str = "agentguard.io/churn-count";
/// Set by a human to start a new window at once.
pub const RESET_ANNOTATION: &str = "agentguard.io/reset-churn";
pub const CHURN_LABEL: &str = "agentguard.io/churn";

/// How many times a charge is redone when another replica wrote first.
const ATTEMPTS: usize = 10;

/// The Lease holding one agent's count under one policy: a stable name from a digest, since
/// usernames and policy names together can exceed a name's length or contain `:`.
pub fn lease_name(budget: &ChurnBudget, agent: &str) -> String {
    let policy = policy_id_label(&budget.policy);
    let digest = Sha256::digest(format!("{policy}\n{agent}").as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("agentguard-churn-{hex}")
}

/// One agent's standing under one budget.
#[derive(Clone, Debug, PartialEq)]
pub struct Tally {
    pub count: u32,
    pub window_start: Timestamp,
}

impl Tally {
    /// What a Lease says at `now`: a lapsed window, a reset or no Lease at all start afresh.
    pub fn of(lease: Option<&Lease>, budget: &ChurnBudget, now: Timestamp) -> Self {
        let fresh = Tally { count: 0, window_start: now };
        let Some(lease) = lease else { return fresh };
        let annotations = lease.metadata.annotations.as_ref();
        if annotations.is_some_and(|a| a.contains_key(RESET_ANNOTATION)) {
            return fresh;
        }
        let count = annotations.and_then(|a| a.get(COUNT_ANNOTATION)).and_then(|c| c.parse().ok());
        let start = lease.spec.as_ref().and_then(|s| s.acquire_time.as_ref()).map(|t| t.0);
        match (count, start) {
            (Some(count), Some(start)) if now < start + budget.window => Tally { count, window_start: start },
            _ => fresh,
        }
    }

    pub fn spent(&self, budget: &ChurnBudget) -> bool {
        self.count >= budget.max_operations
    }
}

/// Why an operation was refused by the breaker.
#[derive(Clone, Debug, PartialEq)]
pub struct Tripped {
    pub budget: ChurnBudget,
    pub tally: Tally,
    pub lease: String,
    pub namespace: String,
}

impl std::fmt::Display for Tripped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let until = self.tally.window_start + self.budget.window;
        write!(
            f,
            "churn limit of {} reached: {} guarded operations since {} (limit {} per {:#}); \
             refused until {until}. A human can reset it: kubectl annotate lease {} -n {} {RESET_ANNOTATION}=now --overwrite",
            self.budget.policy,
            self.tally.count,
            self.tally.window_start,
            self.budget.max_operations,
            self.budget.window,
            self.lease,
            self.namespace,
        )
    }
}

/// Charges churn budgets against the Leases in agentguard's namespace.
pub struct Breaker {
    api: Api<Lease>,
    namespace: String,
    /// One charge of a Lease at a time within this process: concurrent charges of one Lease
    /// would otherwise all read the same count and all but one retry, again and again (32
    /// agents' changes at once ran out of attempts); serialised here, only other replicas'
    /// writes make a charge retry.
    charging: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Breaker {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            charging: Default::default(),
        }
    }

    /// The lock of Lease `name`; locks nobody holds or waits for are dropped as the map grows.
    fn lock_of(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.charging.lock().unwrap_or_else(|e| e.into_inner());
        if locks.len() > 1024 {
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        locks.entry(name.to_owned()).or_default().clone()
    }

    /// Spends one operation of each budget for `agent`, or says which budget is spent. With
    /// `dry_run` nothing is written: the answer is what a real request would get.
    pub async fn charge(
        &self,
        agent: &str,
        budgets: &[ChurnBudget],
        dry_run: bool,
    ) -> Result<Option<Tripped>> {
        for budget in budgets {
            if let Some(tripped) = self.charge_one(agent, budget, dry_run).await? {
                return Ok(Some(tripped));
            }
        }
        Ok(None)
    }

    async fn charge_one(&self, agent: &str, budget: &ChurnBudget, dry_run: bool) -> Result<Option<Tripped>> {
        // Counted per subject; the agent is recorded as the last one to spend.
        let subject = if budget.subject.is_empty() { agent } else { budget.subject.as_str() };
        let name = lease_name(budget, subject);
        let lock = self.lock_of(&name);
        let _one_at_a_time = if dry_run { None } else { Some(lock.lock().await) };
        for _ in 0..ATTEMPTS {
            let lease = self.api.get_opt(&name).await.with_context(|| format!("reading lease {name}"))?;
            let now = Timestamp::now();
            let tally = Tally::of(lease.as_ref(), budget, now);
            if tally.spent(budget) {
                let namespace = self.namespace.clone();
                return Ok(Some(Tripped { budget: budget.clone(), tally, lease: name, namespace }));
            }
            if dry_run {
                return Ok(None);
            }
            let next = Tally { count: tally.count + 1, ..tally };
            let written = match lease {
                None => {
                    self.api
                        .create(&PostParams::default(), &self.lease(&name, budget, agent, &next, None))
                        .await
                }
                Some(old) => {
                    let rv = old.metadata.resource_version.clone();
                    self.api
                        .replace(&name, &PostParams::default(), &self.lease(&name, budget, agent, &next, rv))
                        .await
                }
            };
            match written {
                Ok(_) => return Ok(None),
                // Another replica counted first (or created it): redo on its count.
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(e).with_context(|| format!("writing lease {name}")),
            }
        }
        anyhow::bail!("lease {name} kept changing under {ATTEMPTS} attempts")
    }

    fn lease(
        &self,
        name: &str,
        budget: &ChurnBudget,
        agent: &str,
        tally: &Tally,
        rv: Option<String>,
    ) -> Lease {
        let policy = policy_id_label(&budget.policy);
        Lease {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(self.namespace.clone()),
                resource_version: rv,
                labels: Some(
                    [
                        ("app.kubernetes.io/managed-by".to_owned(), "agentguard".to_owned()),
                        (CHURN_LABEL.to_owned(), "true".to_owned()),
                    ]
                    .into(),
                ),
                annotations: Some(
                    [
                        (POLICY_ANNOTATION.to_owned(), policy),
                        (AGENT_ANNOTATION.to_owned(), agent.to_owned()),
                        (COUNT_ANNOTATION.to_owned(), tally.count.to_string()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(agent.to_owned()),
                acquire_time: Some(MicroTime(tally.window_start)),
                renew_time: Some(MicroTime(Timestamp::now())),
                lease_duration_seconds: i32::try_from(budget.window.as_secs()).ok(),
                ..Default::default()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::policy::PolicyId;
    use jiff::SignedDuration;

    fn budget() -> ChurnBudget {
        ChurnBudget {
            policy: PolicyId { namespace: None, name: "fail-safe".into() },
            max_operations: 3,
            window: SignedDuration::from_mins(10),
            scope: Default::default(),
            subject: "system:serviceaccount:agents:coder".into(),
        }
    }

    fn lease(count: &str, start: &str, reset: bool) -> Lease {
        let mut annotations: std::collections::BTreeMap<String, String> =
            [(COUNT_ANNOTATION.to_string(), count.to_string())].into();
        if reset {
            annotations.insert(RESET_ANNOTATION.into(), "now".into());
        }
        Lease {
            metadata: ObjectMeta { annotations: Some(annotations), ..Default::default() },
            spec: Some(LeaseSpec {
                acquire_time: Some(MicroTime(start.parse().unwrap())),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_window_counts_until_it_lapses_or_is_reset() {
        let now: Timestamp = "2026-11-27T10:05:00Z".parse().unwrap();
        let b = budget();
        assert_eq!(Tally::of(None, &b, now), Tally { count: 0, window_start: now });
        let open = lease("3", "2026-11-27T10:00:00Z", false);
        let tally = Tally::of(Some(&open), &b, now);
        assert_eq!(tally.count, 3);
        assert!(tally.spent(&b));
        assert!(!Tally { count: 2, ..tally.clone() }.spent(&b));
        // Ten minutes after it opened the window is over.
        let later: Timestamp = "2026-11-27T10:10:00Z".parse().unwrap();
        assert_eq!(Tally::of(Some(&open), &b, later), Tally { count: 0, window_start: later });
        let reset = lease("3", "2026-11-27T10:00:00Z", true);
        assert_eq!(Tally::of(Some(&reset), &b, now).count, 0);
        // A garbled count starts afresh rather than blocking forever.
        assert_eq!(Tally::of(Some(&lease("many", "2026-11-27T10:00:00Z", false)), &b, now).count, 0);
    }

    #[test]
    fn lease_names_are_stable_valid_and_distinct() {
        let b = budget();
        let a = lease_name(&b, "system:serviceaccount:agents:coder");
        assert_eq!(a, lease_name(&b, "system:serviceaccount:agents:coder"));
        assert_ne!(a, lease_name(&b, "system:serviceaccount:agents:other"));
        let team =
            ChurnBudget { policy: PolicyId { namespace: Some("team".into()), ..b.policy.clone() }, ..b };
        assert_ne!(a, lease_name(&team, "system:serviceaccount:agents:coder"));
        assert!(a.len() <= 63 && a.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
    }

    #[test]
    fn the_refusal_says_how_to_reset() {
        let tripped = Tripped {
            budget: budget(),
            tally: Tally { count: 3, window_start: "2026-11-27T10:00:00Z".parse().unwrap() },
            lease: "agentguard-churn-0123456789abcdef".into(),
            namespace: "agentguard-system".into(),
        };
        let text = tripped.to_string();
        assert!(
            text.contains("churn limit of ClusterAgentPolicy \"fail-safe\" reached: 3 guarded operations")
        );
        assert!(text.contains("refused until 2026-11-27T10:10:00Z"));
        assert!(text.contains(
            "kubectl annotate lease agentguard-churn-0123456789abcdef -n agentguard-system agentguard.io/reset-churn=now --overwrite"
        ));
    }
}
