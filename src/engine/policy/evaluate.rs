//! Deciding one request: approval writes, identities, built-in rules, then every operation the
//! request amounts to against the policies, the strictest outcome winning; a held request gets
//! its ticket and the change it would make.

use super::*;

/// Decides one admission request. Pure: the same arguments always give the same decision.
pub fn evaluate(
    facts: &Facts<'_>,
    requester: &Requester,
    policies: &PolicySet,
    directory: &dyn Directory,
    config: &Config,
    now: Timestamp,
) -> Decision {
    let agent = policies.is_agent(requester, config);
    Decision { agent, ..decide(agent, facts, requester, policies, directory, config, now) }
}

fn decide(
    agent: bool,
    facts: &Facts<'_>,
    requester: &Requester,
    policies: &PolicySet,
    directory: &dyn Directory,
    config: &Config,
    now: Timestamp,
) -> Decision {
    let deny = |reason: Reason, change: Option<Change>| {
        Decision::deny(Denial {
            reason,
            requester: requester.username.clone(),
            operation: facts.operation.describe().to_owned(),
            target: facts.target(),
            change,
        })
    };

    // 1. Approval writes, and sessions opened, are checked whoever sends them.
    let written = match builtin::approval_write(facts, requester, agent, policies, directory, config, now) {
        Err(detail) => return deny(Reason::Builtin { rule: builtin::APPROVAL_RULE, detail }, None),
        Ok(written) => written,
    };
    if let Err(detail) = builtin::session_opened(facts, requester, agent, policies) {
        return deny(Reason::Builtin { rule: builtin::SESSION_RULE, detail }, None);
    }
    if !agent {
        return match written {
            builtin::Written::Approval => Decision::allow(Allowed::ApprovalAccepted),
            builtin::Written::Nothing => Decision::allow(Allowed::NotAgent),
            builtin::Written::Inert(why) => {
                let mut decision = Decision::allow(Allowed::NotAgent);
                decision.warnings.push(format!("agentguard: {why}"));
                decision
            }
        };
    }

    // 2. Built-in rules: agents may not loosen their own brakes.
    if let Some((rule, detail)) = builtin::self_protection(facts, policies, directory, config) {
        return deny(Reason::Builtin { rule, detail }, None);
    }

    // 3. What the request does: DELETE, UPDATE and CONNECT as sent, and whatever else it
    // amounts to (an eviction, a cascade, finalizers removed, a controller armed to delete).
    let effects = effects::of(facts);
    // A CREATE that amounts to nothing else is judged only by rules naming CREATE, and never by
    // `--unmatched`: creating is not what the brakes are for, only what a freeze stops.
    let plain_create = facts.operation == Operation::Create && effects.len() == 1;
    if plain_create && !policies.guards_create {
        return Decision::allow(Allowed::NotGuarded);
    }
    let matches: Vec<Match<'_>> = effects
        .iter()
        // A CREATE as such is judged only by the rules that name CREATE (a freeze); otherwise
        // only by what it amounts to.
        .filter(|e| e.facts.operation != Operation::Create || policies.guards_create)
        .flat_map(|e| policies.matching_effect(e, directory, |p| p.applies_to(requester, agent)))
        .collect();
    if matches.is_empty() && plain_create {
        return Decision::allow(Allowed::NotGuarded);
    }
    if matches.is_empty() && config.unmatched == Action::Allow {
        // Nothing to judge, so the change need not be computed: the common case stays cheap.
        return Decision::allow(Allowed::Unmatched);
    }

    // 4. An UPDATE that changes nothing is harmless; any other is judged by what it changes.
    let change = match (facts.operation, facts.old_object, facts.object) {
        (Operation::Delete, ..) => None,
        (Operation::Update { .. }, Some(old), Some(new)) => {
            let change = Change::between(old, new);
            if change.is_empty() {
                return Decision::allow(Allowed::NoChange);
            }
            Some(change)
        }
        // An UPDATE without both objects cannot be diffed: judge it without a summary.
        (Operation::Update { .. }, ..) => None,
        (Operation::Create | Operation::Connect, ..) => None,
    };

    // 5. Policies.
    let judge = |ms: &[&Match<'_>]| -> Judgement {
        judge(ms, facts, change.as_ref(), &config.approval_keys, now, requester, directory)
    };

    let mut decision = {
        let enforced: Vec<&Match<'_>> = matches.iter().filter(|m| m.policy.mode == Mode::Enforce).collect();
        match judge(&enforced) {
            Judgement::Admit(Allowed::Unmatched) if plain_create => Decision::allow(Allowed::NotGuarded),
            Judgement::Admit(Allowed::Unmatched) if config.unmatched == Action::Deny => {
                deny(Reason::Unmatched, change.clone())
            }
            Judgement::Admit(why) => Decision::allow(why),
            Judgement::Refuse(reason) => deny(reason, change.clone()),
        }
    };
    // Dry-run policies: each judged alone, reported but never enforced.
    for (mode, out) in [(Mode::Warn, &mut decision.warnings), (Mode::Audit, &mut decision.audits)] {
        let mut seen: Vec<&PolicyId> = Vec::new();
        for m in matches.iter().filter(|m| m.policy.mode == mode) {
            if seen.contains(&&m.policy.id) {
                continue;
            }
            seen.push(&m.policy.id);
            let mine: Vec<&Match<'_>> = matches.iter().filter(|x| x.policy.id == m.policy.id).collect();
            if let Judgement::Refuse(reason) = judge(&mine) {
                decision.dry_runs.push(DryRun { mode, policy: m.policy.id.clone(), action: reason.action() });
                let denial = Denial {
                    reason,
                    requester: requester.username.clone(),
                    operation: facts.operation.describe().to_owned(),
                    target: facts.target(),
                    change: change.clone(),
                };
                out.push(match mode {
                    Mode::Warn => format!("agentguard [Warn mode, not enforced]: {}", denial.summary()),
                    _ => format!("[{mode:?} mode, not enforced] {denial}"),
                });
            }
        }
    }
    // 6. Churn budgets of the enforced policies that guard what was admitted: the breaker
    // charges them (with the API server, outside this pure function) before the answer goes out.
    if decision.allowed() {
        for m in matches.iter().filter(|m| m.policy.mode == Mode::Enforce) {
            if let Some(budget) = &m.policy.churn
                && !decision.churn.iter().any(|b| b.policy == budget.policy)
            {
                let subject = churn_subject(budget.scope, requester, directory);
                decision.churn.push(ChurnBudget { subject, ..budget.clone() });
            }
        }
    }
    decision
}

/// Whose count a churn charge spends. Every ServiceAccount of an agent namespace shares the
/// namespace's count whatever the scope, so creating a fresh ServiceAccount there (which `edit`
/// allows) never brings a fresh budget.
pub(super) fn churn_subject(scope: ChurnScope, requester: &Requester, directory: &dyn Directory) -> String {
    let sa = requester.service_account.as_ref();
    let agent_namespace = sa.is_some_and(|sa| {
        directory.namespace_labels(&sa.namespace).is_some_and(|l| {
            l.get(crate::engine::api::AGENT_NAMESPACE_LABEL).map(String::as_str) == Some("true")
        })
    });
    match (scope, sa) {
        (ChurnScope::PerPolicy, _) => "*".to_owned(),
        (ChurnScope::PerNamespace, Some(sa)) => format!("namespace:{}", sa.namespace),
        (ChurnScope::PerAgent, Some(sa)) if agent_namespace => format!("namespace:{}", sa.namespace),
        _ => requester.username.clone(),
    }
}

/// What precedence makes of a set of matches.
enum Judgement {
    Admit(Allowed),
    Refuse(Reason),
}

/// Applies precedence to a set of matches: Deny > RequireApproval > Allow > unmatched.
fn judge(
    matches: &[&Match<'_>],
    facts: &Facts<'_>,
    change: Option<&Change>,
    keys: &approval::Keys,
    now: Timestamp,
    requester: &Requester,
    directory: &dyn Directory,
) -> Judgement {
    if let Some(m) = matches.iter().find(|m| m.policy.action == Action::Deny) {
        return Judgement::Refuse(Reason::Policy {
            policy: m.policy.id.clone(),
            rule: m.rule_name(),
            message: m.policy.message.clone(),
        });
    }
    let holds: Vec<&&Match<'_>> =
        matches.iter().filter(|m| m.policy.action == Action::RequireApproval).collect();
    if let Some(first) = holds.first() {
        let approvals: Vec<&CompiledApproval> =
            holds.iter().filter_map(|m| m.policy.approval.as_ref()).collect();
        if approvals.len() < holds.len() {
            // A RequireApproval policy without approvers cannot be satisfied: it denies.
            return Judgement::Refuse(Reason::Policy {
                policy: first.policy.id.clone(),
                rule: first.rule_name(),
                message: Some("this policy names no approvers, so nothing can approve it".into()),
            });
        }
        return hold(&holds, facts, change, keys, now, requester, directory);
    }
    if let Some(m) = matches.iter().find(|m| m.policy.action == Action::Allow) {
        return Judgement::Admit(Allowed::ByPolicy { policy: m.policy.id.clone(), rule: m.rule_name() });
    }
    Judgement::Admit(Allowed::Unmatched)
}

/// The open sessions that stand in for the approval `holds` need, soonest to end first (see
/// [`crate::engine::session`]): never where several approvers are needed, nor for what the request
/// amounts to beyond itself, and only those whose opener approves under every holding policy.
fn sessions_for(
    holds: &[&&Match<'_>],
    facts: &Facts<'_>,
    requester: &Requester,
    directory: &dyn Directory,
    need: usize,
    max_ttl: SignedDuration,
    now: Timestamp,
) -> Vec<crate::engine::session::Grant> {
    use crate::engine::api::SessionOperation;
    if need > 1 || holds.iter().any(|m| m.via.is_some() || m.escape.is_some()) {
        return Vec::new();
    }
    let operation = match facts.operation {
        Operation::Delete => SessionOperation::Delete,
        Operation::Update { .. } => SessionOperation::Update,
        Operation::Create | Operation::Connect => return Vec::new(),
    };
    let mut resource = facts.target().resource;
    if !facts.subresource.is_empty() {
        resource = format!("{resource}/{}", facts.subresource);
    }
    let request = crate::engine::session::Use {
        agent: &requester.username,
        credential: requester.credential.as_deref(),
        operation,
        resource: &resource,
        namespace: facts.namespace,
    };
    let mut grants: Vec<crate::engine::session::Grant> = directory
        .sessions(&requester.username)
        .into_iter()
        .filter(|s| {
            s.covers(&request, max_ttl, now)
                && holds.iter().all(|m| m.policy.approval.as_ref().is_some_and(|a| a.approves(&s.opener)))
        })
        .map(|s| s.grant(max_ttl))
        .collect();
    grants.sort_by(|a, b| (a.expires, &a.name).cmp(&(b.expires, &b.name)));
    grants
}

/// RequireApproval: admits when the stored tickets cover this object, operation and exact
/// state or change, from as many distinct approvers as the strictest policy needs; otherwise
/// refuses with a fresh ticket that would.
fn hold(
    holds: &[&&Match<'_>],
    facts: &Facts<'_>,
    change: Option<&Change>,
    keys: &approval::Keys,
    now: Timestamp,
    requester: &Requester,
    directory: &dyn Directory,
) -> Judgement {
    let first = holds[0];
    let mut covering: Vec<Covering> = Vec::new();
    let mut lifetime: Option<Lifetime> = None;
    let mut need = 1;
    for m in holds {
        let Some(a) = &m.policy.approval else { continue };
        need = need.max(a.min_approvers);
        // Every policy that holds the request must accept the approval: the strictest lifetime.
        lifetime = Some(match lifetime {
            None => a.lifetime,
            Some(l) => {
                Lifetime { ttl: l.ttl.min(a.lifetime.ttl), max_ttl: l.max_ttl.min(a.lifetime.max_ttl) }
            }
        });
        if !covering.iter().any(|c| c.policy == m.policy.id) {
            covering.push(Covering {
                policy: m.policy.id.clone(),
                approvers: a.describe(),
                reason: a.reason.clone(),
            });
        }
    }
    let lifetime = lifetime.unwrap_or(Lifetime { ttl: SignedDuration::ZERO, max_ttl: SignedDuration::ZERO });
    let uid =
        facts.old_object.and_then(|o| o.pointer("/metadata/uid")).and_then(Value::as_str).unwrap_or_default();
    let state;
    let (op, digest) = match facts.operation {
        Operation::Delete => {
            state = facts.old_object.map(|o| {
                let uid = o.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or_default();
                effects::delete_digest(&crate::engine::diff::state_digest(o), uid, facts.collateral)
            });
            (approval::Op::Delete, state.as_ref())
        }
        _ => (approval::Op::Update, change.map(|c| &c.digest)),
    };
    let whole = Target { subresource: String::new(), ..facts.target() };
    let unapprovable = if facts.subresource == "scale" {
        Some(format!(
            "The scale subresource carries no annotations, so an approval cannot be seen on it: make this \
             change as an update of {whole} itself (e.g. kubectl patch), which can be approved."
        ))
    } else if facts.operation == Operation::Create && facts.subresource == "eviction" {
        Some(format!(
            "An eviction carries no approval: a human may approve deleting {whole}, and then the pod is \
             deleted (kubectl delete), not evicted."
        ))
    } else if facts.operation == Operation::Create {
        Some(format!(
            "A CREATE carries no approval: {whole} does not exist yet, so there is nothing to annotate. A \
             human who may approve creates it instead."
        ))
    } else if facts.operation == Operation::Connect {
        Some(format!(
            "A connection carries no approval: a human who may approve runs this on {whole} instead."
        ))
    } else if let Some(Err(size)) = change.map(Change::reviewable) {
        let size = match change.is_some_and(|c| c.cut_short) {
            true => "more than that".to_owned(),
            false => format!("{size} bytes"),
        };
        Some(format!(
            "The change is too large to show an approver in full (at most {} KiB; this one is {size}), so \
             it cannot be approved: make it in smaller changes.",
            crate::engine::diff::REVIEWABLE_BYTES / 1024
        ))
    } else if uid.is_empty() || digest.is_none() {
        Some("The API server sent no prior object with a uid, so no approval can be bound to it.".into())
    } else if keys.is_empty() {
        Some(format!("Nothing can approve it now: {}.", approval::Refusal::NoKey))
    } else {
        None
    };
    let stored = facts.old_object.into_iter().flat_map(approval::annotations).map(|(_, v)| v);
    let refusal = match (&unapprovable, digest) {
        (None, Some(digest)) => {
            let subject = approval::Subject { uid, op, digest };
            let tally =
                approval::Tally::of(stored, keys, &subject, lifetime.max_ttl, now, &requester.username);
            match tally.expires {
                Some(expires) if tally.covers(need) => {
                    return Judgement::Admit(Allowed::Approved {
                        policy: first.policy.id.clone(),
                        rule: first.rule_name(),
                        approvals: tally.values,
                        approvers: tally.approvers,
                        expires,
                    });
                }
                _ => tally.refusal(need),
            }
        }
        _ => approval::Refusal::Absent,
    };
    let grants = sessions_for(holds, facts, requester, directory, need, lifetime.max_ttl, now);
    if !grants.is_empty() {
        return Judgement::Admit(Allowed::BySession {
            policy: first.policy.id.clone(),
            rule: first.rule_name(),
            grants,
        });
    }
    let ticket = match (&unapprovable, digest) {
        (None, Some(digest)) => approval::Ticket::issue(
            keys,
            &approval::Subject { uid, op, digest },
            now,
            lifetime.ttl.min(lifetime.max_ttl),
        ),
        _ => None,
    };
    Judgement::Refuse(Reason::ApprovalRequired {
        policy: first.policy.id.clone(),
        rule: first.rule_name(),
        covering,
        message: first.policy.message.clone(),
        refusal,
        approve_value: ticket.as_ref().map(approval::Ticket::value).unwrap_or_default(),
        expires: ticket.map(|t| t.expires(lifetime.max_ttl)),
        unapprovable,
        radius: (facts.operation == Operation::Delete)
            .then(|| effects::radius_summary(uid, facts.collateral))
            .flatten(),
        need,
    })
}
