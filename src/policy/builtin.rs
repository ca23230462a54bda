//! Built-in rules that need no policy: agents may not loosen their own brakes, and only listed
//! approvers may write approvals. A user cannot forget or misconfigure these.

use jiff::{SignedDuration, Timestamp};

use crate::api::{AGENT_NAMESPACE_LABEL, Action, GROUP, Mode};
use crate::approval::{self, Grant, Stamp};

use super::{Config, Directory, Facts, Operation, PolicySet, Requester};

/// Rule names, as shown in denials.
pub const APPROVAL_RULE: &str = "approval-annotation";
pub const POLICIES_RULE: &str = "agentguard-policies";
pub const CRDS_RULE: &str = "agentguard-crds";
pub const SELF_RULE: &str = "agentguard-self";
pub const AGENT_LABEL_RULE: &str = "agent-label";
pub const AGENT_NAMESPACE_RULE: &str = "agent-namespace-label";
pub const AGENT_IDENTITY_RULE: &str = "agent-identity";

/// Checks a CREATE or UPDATE that sets, changes or refreshes the approval annotation.
/// `Ok(true)`: a valid approval was written; `Ok(false)`: the request writes no approval
/// (removing one is always allowed); `Err`: why the write is refused.
pub(super) fn approval_write(
    facts: &Facts<'_>,
    requester: &Requester,
    agent: bool,
    policies: &PolicySet,
    directory: &dyn Directory,
    now: Timestamp,
) -> Result<bool, String> {
    if !matches!(facts.operation, Operation::Create | Operation::Update { .. }) {
        return Ok(false);
    }
    let Some(new) = facts.object.and_then(Stamp::of) else {
        return Ok(false);
    };
    let old = facts.old_object.and_then(Stamp::of);
    // The same value and the same managedFields time: the request does not touch the approval.
    if old.as_ref() == Some(&new) {
        return Ok(false);
    }
    if agent {
        return Err(format!(
            "agents may not set, change or refresh the {} annotation (they may remove it); a human approver must set it",
            crate::api::APPROVE_ANNOTATION
        ));
    }
    let grant =
        Grant::parse(new.value).map_err(|e| format!("the approval {:?} is malformed: {e}", new.value))?;

    // The enforced RequireApproval policies this approval would satisfy.
    let mut covering = Vec::new();
    let mut probe = |operation: Operation| {
        let probe = Facts { operation, ..facts.clone() };
        for m in policies
            .matching(&probe, directory, |p| p.mode == Mode::Enforce && p.action == Action::RequireApproval)
        {
            if m.escape.is_none() && !covering.iter().any(|p: &&super::CompiledPolicy| p.id == m.policy.id) {
                covering.push(m.policy);
            }
        }
    };
    if grant.delete {
        probe(Operation::Delete);
    }
    if !grant.updates.is_empty() {
        probe(Operation::Update { patch: None });
    }
    if covering.is_empty() {
        return Err(format!(
            "no enforced RequireApproval policy covers {:?} of this object, so there is nothing to approve",
            new.value
        ));
    }
    for policy in &covering {
        match &policy.approval {
            Some(a) if a.approves(requester) => {}
            Some(a) => {
                return Err(format!(
                    "{} is not an approver under {} (approvers: {})",
                    requester.username,
                    policy.id,
                    a.describe()
                ));
            }
            None => return Err(format!("{} names no approvers", policy.id)),
        }
    }
    let max_ttl: SignedDuration = covering
        .iter()
        .filter_map(|p| p.approval.as_ref().map(|a| a.lifetime.max_ttl))
        .min()
        .unwrap_or_default();
    approval::validate_new(new.value, max_ttl, now)?;
    Ok(true)
}

/// Agents' changes to agentguard itself, its policies and the markers that make them agents.
pub(super) fn self_protection(
    facts: &Facts<'_>,
    policies: &PolicySet,
    directory: &dyn Directory,
    config: &Config,
) -> Option<(&'static str, String)> {
    // Minting a token for a ServiceAccount that is not an agent is becoming someone the brakes
    // do not hold (`edit` allows it in the agent's namespaces).
    if facts.operation == Operation::Create
        && facts.group.is_empty()
        && facts.resource == "serviceaccounts"
        && facts.subresource == "token"
    {
        let labels = directory.service_account_labels(facts.namespace, facts.name);
        let agent_namespace = directory
            .namespace_labels(facts.namespace)
            .is_some_and(|l| l.get(AGENT_NAMESPACE_LABEL).map(String::as_str) == Some("true"));
        if !agent_namespace && !policies.labels_make_agent(facts.namespace, labels.as_ref(), config) {
            return Some((
                AGENT_IDENTITY_RULE,
                format!(
                    "agents may not create tokens for ServiceAccount {}/{}, which is not an agent: it would act without brakes",
                    facts.namespace, facts.name
                ),
            ));
        }
    }
    if facts.group == GROUP {
        return Some((POLICIES_RULE, "agents may not create, change or delete agentguard policies".into()));
    }
    if facts.group == "apiextensions.k8s.io"
        && facts.resource == "customresourcedefinitions"
        && facts.name.ends_with(&format!(".{GROUP}"))
    {
        return Some((CRDS_RULE, "agents may not change agentguard's CustomResourceDefinitions".into()));
    }
    if let Some(ns) = config.self_namespace.as_deref().filter(|ns| *ns == facts.namespace) {
        return Some((SELF_RULE, format!("agents may not touch anything in agentguard's namespace {ns:?}")));
    }
    let cluster_scoped_self = facts.namespace.is_empty()
        && matches!(facts.group, "admissionregistration.k8s.io" | "rbac.authorization.k8s.io")
        && facts.name.starts_with(&config.self_name_prefix);
    if cluster_scoped_self {
        return Some((SELF_RULE, "agents may not change agentguard's webhook configurations or RBAC".into()));
    }
    // Any subresource: writes through `namespaces/status` or `/finalize` store labels too.
    if !matches!(facts.operation, Operation::Update { .. }) || !facts.group.is_empty() {
        return None;
    }
    let old = Facts::labels(facts.old_object);
    let new = Facts::labels(facts.object);
    let label = |l: &Option<super::Labels>, key: &str| l.as_ref().and_then(|l| l.get(key).cloned());
    match facts.resource {
        "serviceaccounts" => {
            let key = &config.agent_label.0;
            if label(&old, key) != label(&new, key) {
                return Some((
                    AGENT_LABEL_RULE,
                    format!("agents may not change the {key} label of a ServiceAccount"),
                ));
            }
            if old != new && policies.labels_make_agent(facts.namespace, old.as_ref(), config) {
                return Some((
                    AGENT_LABEL_RULE,
                    "agents may not change the labels of an agent ServiceAccount".into(),
                ));
            }
            None
        }
        "namespaces" if label(&old, AGENT_NAMESPACE_LABEL) != label(&new, AGENT_NAMESPACE_LABEL) => Some((
            AGENT_NAMESPACE_RULE,
            format!("agents may not change the {AGENT_NAMESPACE_LABEL} label of a Namespace"),
        )),
        _ => None,
    }
}
