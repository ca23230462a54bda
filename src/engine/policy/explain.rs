//! What protects one object: the policies and rules an agent's DELETE or UPDATE of it would
//! meet, and the built-in rule that would refuse it before any policy. Pure, and built on the
//! same matching the webhook uses (`matching_effect`), so `agentguard why` cannot disagree with
//! a decision about which rules apply.

use super::*;

/// One rule that applies to an operation on the object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Guard {
    pub policy: PolicyId,
    /// The rule's name, with how it applies when that is not the operation as sent.
    pub rule: String,
    pub action: Action,
    pub mode: Mode,
    /// Whom the policy covers, e.g. `every agent` or `usernames x`.
    pub subjects: String,
    /// Who may approve, for a RequireApproval policy.
    pub approvers: Option<String>,
    pub message: Option<String>,
}

/// What an agent's operation on one object meets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    /// `DELETE` or `UPDATE`.
    pub operation: &'static str,
    /// The built-in rule that refuses it before any policy: (rule, why).
    pub builtin: Option<(&'static str, String)>,
    /// Every rule that matches, in policy order, once each.
    pub guards: Vec<Guard>,
}

impl Explanation {
    /// The action enforced policies covering every agent would take (Deny > RequireApproval >
    /// Allow); `None` when none applies to every agent.
    pub fn strictest_for_any_agent(&self) -> Option<Action> {
        self.guards
            .iter()
            .filter(|g| g.mode == Mode::Enforce && g.subjects == EVERY_AGENT)
            .map(|g| g.action)
            .max()
    }
}

const EVERY_AGENT: &str = "every agent";

/// Explains an agent's `facts.operation` on the object `facts` describes. Every policy is
/// considered whoever its subjects are; each guard says whom it covers.
pub fn explain(
    facts: &Facts<'_>,
    policies: &PolicySet,
    directory: &dyn Directory,
    config: &Config,
) -> Explanation {
    let builtin = builtin::self_protection(facts, policies, directory, config);
    let mut guards: Vec<Guard> = Vec::new();
    for effect in effects::of(facts) {
        for m in policies.matching_effect(&effect, directory, |_| true) {
            let guard = Guard {
                policy: m.policy.id.clone(),
                rule: m.rule_name(),
                action: m.policy.action,
                mode: m.policy.mode,
                subjects: m.policy.subjects.describe(),
                approvers: m.policy.approval.as_ref().map(CompiledApproval::describe),
                message: m.policy.message.clone(),
            };
            if !guards.contains(&guard) {
                guards.push(guard);
            }
        }
    }
    Explanation { operation: facts.operation.describe(), builtin, guards }
}

impl Subjects {
    fn describe(&self) -> String {
        match self {
            Subjects::Agents => EVERY_AGENT.to_owned(),
            Subjects::Listed { service_accounts, namespace, usernames, groups } => {
                let mut parts = Vec::new();
                if service_accounts.is_some() {
                    parts.push(match namespace {
                        Some(ns) => format!("ServiceAccounts of {ns} matching its serviceAccountSelector"),
                        None => "ServiceAccounts matching its serviceAccountSelector".to_owned(),
                    });
                }
                if !usernames.is_empty() {
                    parts.push(format!("usernames {}", usernames.join(", ")));
                }
                if !groups.is_empty() {
                    parts.push(format!("groups {}", groups.join(", ")));
                }
                if parts.is_empty() {
                    "nobody (its subjects list no one)".to_owned()
                } else {
                    parts.join("; ")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::api::{AgentPolicy, ClusterAgentPolicy};
    use serde_json::json;

    fn set() -> PolicySet {
        let cluster: Vec<ClusterAgentPolicy> = serde_json::from_value(json!([
            {"apiVersion": "agentguard.io/v1alpha1", "kind": "ClusterAgentPolicy", "metadata": {"name": "hold"},
             "spec": {"action": "RequireApproval", "approval": {"approvers": {"users": ["alice"], "groups": ["sre"]}},
                      "rules": [{"name": "workloads", "operations": ["DELETE"],
                                 "resources": [{"apiGroups": ["apps"], "resources": ["deployments"]}]}]}},
            {"apiVersion": "agentguard.io/v1alpha1", "kind": "ClusterAgentPolicy", "metadata": {"name": "freeze-coder"},
             "spec": {"action": "Deny", "subjects": {"usernames": ["system:serviceaccount:agents:coder"]},
                      "rules": [{"name": "freeze", "operations": ["DELETE", "UPDATE", "CONNECT"],
                                 "resources": [{"apiGroups": ["*"], "resources": ["*", "*/*"]}]}]}},
            {"apiVersion": "agentguard.io/v1alpha1", "kind": "ClusterAgentPolicy", "metadata": {"name": "elsewhere"},
             "spec": {"action": "Deny", "rules": [{"operations": ["UPDATE"], "namespaces": ["other"],
                      "resources": [{"apiGroups": ["apps"], "resources": ["deployments"]}]}]}}
        ]))
        .unwrap();
        let namespaced: Vec<AgentPolicy> = serde_json::from_value(json!([
            {"apiVersion": "agentguard.io/v1alpha1", "kind": "AgentPolicy", "metadata": {"name": "team", "namespace": "prod"},
             "spec": {"action": "Deny", "mode": "Warn", "rules": [{"name": "web-only", "operations": ["UPDATE"], "names": ["web"],
                      "resources": [{"apiGroups": ["apps"], "resources": ["deployments"]}]}]}}
        ]))
        .unwrap();
        PolicySet::compile(&cluster, &namespaced).0
    }

    fn facts<'a>(operation: Operation, namespace: &'a str, name: &'a str, object: &'a Value) -> Facts<'a> {
        Facts {
            operation,
            group: "apps",
            resource: "deployments",
            subresource: "",
            namespace,
            name,
            object: matches!(operation, Operation::Update { .. }).then_some(object),
            old_object: Some(object),
            collateral: &[],
            sent: None,
        }
    }

    #[test]
    fn delete_and_update_each_name_their_rules() {
        let policies = set();
        let object = json!({"metadata": {"name": "web", "namespace": "prod", "uid": "u"}});
        let config = Config::default();
        let delete = explain(&facts(Operation::Delete, "prod", "web", &object), &policies, &(), &config);
        let names: Vec<(String, &str)> =
            delete.guards.iter().map(|g| (g.policy.name.clone(), g.rule.as_str())).collect();
        assert_eq!(names, [("freeze-coder".to_owned(), "freeze"), ("hold".to_owned(), "workloads")]);
        let hold = &delete.guards[1];
        assert_eq!(
            (hold.action, hold.approvers.as_deref()),
            (Action::RequireApproval, Some("users alice; groups sre"))
        );
        assert_eq!(delete.guards[0].subjects, "usernames system:serviceaccount:agents:coder");
        assert_eq!(delete.strictest_for_any_agent(), Some(Action::RequireApproval));
        assert_eq!(delete.builtin, None);

        let update = explain(
            &facts(Operation::Update { patch: None }, "prod", "web", &object),
            &policies,
            &(),
            &config,
        );
        let names: Vec<&str> = update.guards.iter().map(|g| g.policy.name.as_str()).collect();
        // "elsewhere" guards another namespace; "hold" guards DELETE only.
        assert_eq!(names, ["freeze-coder", "team"]);
        assert_eq!(update.guards[1].mode, Mode::Warn);
        assert_eq!(update.strictest_for_any_agent(), None, "a Warn policy enforces nothing");

        // Another name: the AgentPolicy's glob does not reach it.
        let api = explain(
            &facts(Operation::Update { patch: None }, "prod", "api", &object),
            &policies,
            &(),
            &config,
        );
        assert_eq!(api.guards.len(), 1);
    }

    #[test]
    fn built_in_rules_are_named() {
        let policies = set();
        let config = Config { self_namespace: Some("agentguard-system".into()), ..Config::default() };
        let object = json!({"metadata": {"name": "agentguard", "uid": "u"}});
        let e = explain(
            &facts(Operation::Delete, "agentguard-system", "agentguard", &object),
            &policies,
            &(),
            &config,
        );
        assert_eq!(e.builtin.as_ref().map(|(rule, _)| *rule), Some(builtin::SELF_RULE));
    }
}
