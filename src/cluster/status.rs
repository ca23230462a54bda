//! Policy status: a `Ready` condition and `observedGeneration` on every policy, so
//! `kubectl get clusteragentpolicies` shows at a glance which policies compiled cleanly and which
//! are enforced in their most restrictive reading because of a problem. Writes only on change.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::cluster::caches::Caches;
use crate::engine::api::{Condition, PolicyStatus};
use crate::engine::policy::{PolicyId, Problem};

/// The status a policy should carry, given the problems found compiling it. The transition time
/// is kept from `current` when the condition did not change.
pub fn desired(
    generation: Option<i64>,
    problems: &[&Problem],
    current: Option<&PolicyStatus>,
    now: Timestamp,
) -> PolicyStatus {
    let (status, reason, message) = if problems.is_empty() {
        ("True", "Accepted", "enforced as written".to_string())
    } else {
        let list: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        ("False", "Problems", format!("enforced in its most restrictive reading: {}", list.join("; ")))
    };
    let previous = current.and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    let last_transition_time = match previous {
        Some(c) if c.status == status && c.reason == reason => c.last_transition_time.clone(),
        _ => now.to_string(),
    };
    PolicyStatus {
        observed_generation: generation,
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_transition_time,
        }],
    }
}

/// Keeps every policy's status current, checking every `every`. Runs until dropped.
pub async fn keep_reported(client: kube::Client, caches: Arc<Caches>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let params = PatchParams::apply("agentguard-status").force();
    loop {
        tick.tick().await;
        // Ready must mean in force: a policy's new generation is reported once it is compiled.
        if !caches.ready() || caches.compile_pending() {
            continue;
        }
        let problems = caches.problems();
        let now = Timestamp::now();
        let for_id = |id: &PolicyId| problems.iter().filter(|p| p.policy == *id).collect::<Vec<_>>();
        for policy in caches.cluster_policies.state() {
            let id = PolicyId { namespace: None, name: policy.name_any() };
            let want = desired(policy.meta().generation, &for_id(&id), policy.status.as_ref(), now);
            if policy.status.as_ref() != Some(&want) {
                let api: Api<crate::engine::api::ClusterAgentPolicy> = Api::all(client.clone());
                write(&api, &id, &want, &params).await;
            }
        }
        for policy in caches.agent_policies.state() {
            let id = PolicyId { namespace: policy.namespace(), name: policy.name_any() };
            let want = desired(policy.meta().generation, &for_id(&id), policy.status.as_ref(), now);
            if policy.status.as_ref() != Some(&want) {
                let api: Api<crate::engine::api::AgentPolicy> =
                    Api::namespaced(client.clone(), id.namespace.as_deref().unwrap_or_default());
                write(&api, &id, &want, &params).await;
            }
        }
    }
}

async fn write<K>(api: &Api<K>, id: &PolicyId, status: &PolicyStatus, params: &PatchParams)
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    if let Err(e) = api.patch_status(&id.name, params, &Patch::Apply(&patch)).await {
        tracing::warn!(policy = %id, error = %e, "cannot write policy status");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_condition_reflects_problems_and_keeps_transition_time() {
        let t0: Timestamp = "2026-11-26T10:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-11-26T11:00:00Z".parse().unwrap();
        let ok = desired(Some(3), &[], None, t0);
        assert_eq!(ok.observed_generation, Some(3));
        assert_eq!(
            (ok.conditions[0].status.as_str(), ok.conditions[0].reason.as_str()),
            ("True", "Accepted")
        );
        // Unchanged condition: same transition time, so no write is needed.
        assert_eq!(desired(Some(3), &[], Some(&ok), t1), ok);
        let problem = Problem {
            policy: PolicyId { namespace: None, name: "p".into() },
            message: "approval.ttl \"x\" is not a duration".into(),
        };
        let bad = desired(Some(4), &[&problem], Some(&ok), t1);
        assert_eq!(bad.conditions[0].status, "False");
        assert!(bad.conditions[0].message.contains("most restrictive reading: approval.ttl"));
        assert_eq!(bad.conditions[0].last_transition_time, t1.to_string());
    }
}
