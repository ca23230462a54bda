//! Built-in rules that need no policy: agents may not loosen their own brakes, and only listed
//! approvers may write approvals. A user cannot forget or misconfigure these.

use jiff::{SignedDuration, Timestamp};

use crate::engine::api::{AGENT_NAMESPACE_LABEL, Action, GROUP, Mode};
use crate::engine::approval::{self, Op, Refusal, Ticket};

use super::{Config, Directory, Facts, Operation, PolicySet, Requester};

/// Rule names, as shown in denials.
pub const APPROVAL_RULE: &str = "approval-annotation";
pub const POLICIES_RULE: &str = "agentguard-policies";
pub const CRDS_RULE: &str = "agentguard-crds";
pub const SELF_RULE: &str = "agentguard-self";
pub const AGENT_LABEL_RULE: &str = "agent-label";
pub const AGENT_NAMESPACE_RULE: &str = "agent-namespace-label";
pub const AGENT_IDENTITY_RULE: &str = "agent-identity";
pub const SESSION_RULE: &str = "agent-session";

/// What a write does to the approval annotation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Written {
    /// No approval written (none set, removed, or left as it is).
    Nothing,
    /// A valid approval of this object, by an approver.
    Approval,
    /// A value that is no approval of this object, written by someone who is not an agent: it
    /// can never approve anything, so it is admitted, with this warning. The deployment
    /// controller copies a Deployment's annotations onto its ReplicaSets, ticket included, and
    /// controllers must never be blocked by agentguard.
    Inert(String),
}

/// Checks a CREATE or UPDATE that sets or changes approval annotations; `Err` says why the
/// write is refused.
///
/// A valid approval is a ticket agentguard issued for this object (uid), still live, and for a
/// delete, for the state the object will be in; its writer is an approver under every enforced
/// RequireApproval policy that covers the operation on this object; a value that names an
/// approver names its writer. Agents may not set or change approvals at all. Anyone else writing
/// a value that is not a ticket for this object writes nothing that counts ([`Written::Inert`]);
/// a ticket for this object is refused unless its writer may approve.
pub(super) fn approval_write(
    facts: &Facts<'_>,
    requester: &Requester,
    agent: bool,
    policies: &PolicySet,
    directory: &dyn Directory,
    config: &Config,
    now: Timestamp,
) -> Result<Written, String> {
    if !matches!(facts.operation, Operation::Create | Operation::Update { .. }) {
        return Ok(Written::Nothing);
    }
    // Values left as they are write nothing, whatever else the request does. (Nothing else
    // about the object, managedFields included, bears on an approval's lifetime.)
    let written = approval::written(facts.old_object, facts.object);
    if written.is_empty() {
        return Ok(Written::Nothing);
    }
    if agent {
        return Err(format!(
            "agents may not set or change {} annotations (they may remove them); a human approver must set them",
            crate::engine::api::APPROVE_ANNOTATION
        ));
    }
    let mut outcome = Written::Nothing;
    for (key, value) in written {
        match one_approval(key, value, facts, requester, policies, directory, config, now)? {
            Written::Approval => outcome = Written::Approval,
            Written::Inert(why) if outcome == Written::Nothing => outcome = Written::Inert(why),
            _ => {}
        }
    }
    Ok(outcome)
}

/// Checks one approval value written under `key` (see [`approval_write`]).
#[allow(clippy::too_many_arguments)]
fn one_approval(
    key: &str,
    new: &str,
    facts: &Facts<'_>,
    requester: &Requester,
    policies: &PolicySet,
    directory: &dyn Directory,
    config: &Config,
    now: Timestamp,
) -> Result<Written, String> {
    let inert = |why: String| {
        Ok(Written::Inert(format!(
            "{key} {new:?} approves nothing: {why}. Approve with the command a denial (or agentguard pending) prints."
        )))
    };
    let (ticket, named) = match Ticket::parse(new).and_then(|t| Ok((t, approval::approver(new)?))) {
        Ok(parsed) => parsed,
        Err(e) => return inert(format!("it is malformed ({e})")),
    };
    let uid = facts
        .object
        .and_then(|o| o.pointer("/metadata/uid"))
        .and_then(serde_json::Value::as_str)
        .filter(|u| !u.is_empty() && facts.old_object.is_some());
    let Some(uid) = uid else {
        return inert("an approval is written on an existing object, not at its creation".into());
    };
    if config.approval_keys.is_empty() {
        return Err(approval::Refusal::NoKey.to_string());
    }
    if !ticket.authentic(&config.approval_keys, uid) {
        return inert("it is not a ticket agentguard issued for this object".into());
    }
    // An approval that names someone names its writer: nobody approves in another's name.
    if let Some(name) = named
        && name != requester.username
    {
        return Err(format!(
            "this approval names {name:?}, but {} is writing it: an approval names its own writer",
            requester.username
        ));
    }
    // Nobody approves twice: another approval on the object naming the writer already counts.
    if let Some(object) = facts.object
        && let Some((other, _)) = approval::annotations(object).find(|(k, v)| {
            *k != key && approval::approver(v).ok().flatten() == Some(requester.username.as_str())
        })
    {
        return Err(format!(
            "{} has already approved this object under {other}: each approver counts once (overwrite that \
             annotation to approve again)",
            requester.username
        ));
    }

    // The enforced RequireApproval policies this approval would satisfy. A delete covers what
    // it takes with it (the request path found it: `facts.collateral`). An update may be held
    // as the DELETE it amounts to (finalizers removed, a controller armed), which the ticket
    // alone does not tell: its writer must be an approver under the policies guarding either.
    let mut covering = Vec::new();
    let probes: &[Operation] = match ticket.op {
        Op::Delete => &[Operation::Delete],
        Op::Update => &[Operation::Update { patch: None }, Operation::Delete],
    };
    for operation in probes {
        let probe = Facts { operation: *operation, object: None, ..facts.clone() };
        let probe = match operation {
            Operation::Update { .. } => Facts { object: facts.object, ..probe },
            _ => probe,
        };
        for effect in super::effects::of(&probe) {
            let enforced_holds =
                |p: &super::CompiledPolicy| p.mode == Mode::Enforce && p.action == Action::RequireApproval;
            for m in policies.matching_effect(&effect, directory, enforced_holds) {
                if m.escape.is_none()
                    && !covering.iter().any(|p: &&super::CompiledPolicy| p.id == m.policy.id)
                {
                    covering.push(m.policy);
                }
            }
        }
    }
    if covering.is_empty() {
        return Err(format!(
            "no enforced RequireApproval policy covers {} of this object, so there is nothing to approve",
            ticket.op
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
    let need =
        covering.iter().filter_map(|p| p.approval.as_ref().map(|a| a.min_approvers)).max().unwrap_or(1);
    if need > 1 && named.is_none() {
        return Err(format!(
            "{need} distinct approvers must approve this, so each approval names its writer: write it as \
             {}.<you>={new}.{} (kubectl agentguard approve does this)",
            crate::engine::api::APPROVE_ANNOTATION,
            requester.username
        ));
    }
    let max_ttl: SignedDuration = covering
        .iter()
        .filter_map(|p| p.approval.as_ref().map(|a| a.lifetime.max_ttl))
        .min()
        .unwrap_or_default();
    // A delete's ticket is bound to the object's state and what the delete would take with it:
    // all it would cascade to, or nothing, for a delete that orphans its dependents (the approval
    // cannot tell which the agent sent; the retry is judged against the one it sends).
    let state = facts.object.map(crate::engine::diff::state_digest).unwrap_or_default();
    let cascading = super::effects::delete_digest(&state, uid, facts.collateral);
    let check = |state: &[u8; 32]| approval::check_new(new, &config.approval_keys, uid, state, max_ttl, now);
    check(&cascading)
        .or_else(|refusal| if refusal == Refusal::StaleState { check(&state) } else { Err(refusal) })
        .map_err(|refusal| match refusal {
        Refusal::StaleState => format!(
            "{refusal}: the object is no longer in the state the delete was reviewed in; have the agent retry for a fresh ticket"
        ),
        Refusal::Expired(_) | Refusal::IssuedInFuture(_) => {
            format!("{refusal}; have the agent retry for a fresh ticket")
        }
        other => other.to_string(),
    })?;
    Ok(Written::Approval)
}

/// Checks the creation of a break-glass session ([`crate::engine::api::AgentSession`]): only an
/// approver under some enforced RequireApproval policy opens one, and `openedBy` is exactly who
/// creates it (username and groups), so that what it may stand in for is judged on the opener's
/// real rights at every use. Agents never open one. (Its spec never changes after: the schema.)
pub(super) fn session_opened(
    facts: &Facts<'_>,
    requester: &Requester,
    agent: bool,
    policies: &PolicySet,
) -> Result<(), String> {
    if facts.operation != Operation::Create || facts.group != GROUP || facts.resource != "agentsessions" {
        return Ok(());
    }
    if agent {
        return Err("agents may not open sessions; an approver opens one for them".into());
    }
    let opener = facts.object.and_then(|o| o.pointer("/spec/openedBy"));
    let username = opener.and_then(|o| o.get("username")).and_then(serde_json::Value::as_str);
    let groups: Option<std::collections::BTreeSet<&str>> = opener
        .map(|o| o.get("groups").and_then(serde_json::Value::as_array).into_iter().flatten())
        .map(|g| g.filter_map(serde_json::Value::as_str).collect());
    let mine: std::collections::BTreeSet<&str> = requester.groups.iter().map(String::as_str).collect();
    if username != Some(requester.username.as_str()) || groups.as_ref() != Some(&mine) {
        return Err(format!(
            "a session's openedBy must be exactly who opens it: username {:?}, groups {:?} (kubectl agentguard session open fills it in)",
            requester.username, requester.groups
        ));
    }
    let approver_somewhere = policies.policies().any(|p| {
        p.mode == Mode::Enforce
            && p.action == Action::RequireApproval
            && p.approval.as_ref().is_some_and(|a| a.approves(requester))
    });
    if !approver_somewhere {
        return Err(format!(
            "{} is not an approver under any enforced RequireApproval policy, so may not open a session",
            requester.username
        ));
    }
    Ok(())
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
            .is_some_and(|l| l.get(AGENT_NAMESPACE_LABEL).map(String::as_str) == Some("true"))
            || directory.reached_by_agents(facts.namespace);
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
        return Some((
            POLICIES_RULE,
            "agents may not create, change or delete agentguard policies, sessions or records".into(),
        ));
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
    // Deleting an agent's ServiceAccount and creating it again without the mark unmarks it:
    // pods running as it get tokens of the new, unmarked account.
    if facts.operation == Operation::Delete
        && facts.group.is_empty()
        && facts.resource == "serviceaccounts"
        && facts.subresource.is_empty()
    {
        let labels = Facts::labels(facts.old_object)
            .or_else(|| directory.service_account_labels(facts.namespace, facts.name));
        if policies.labels_make_agent(facts.namespace, labels.as_ref(), config) {
            return Some((
                AGENT_LABEL_RULE,
                format!(
                    "agents may not delete agent ServiceAccount {}/{}: created again without its mark, it would act without brakes",
                    facts.namespace, facts.name
                ),
            ));
        }
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
