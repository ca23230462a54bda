//! Compiling policies into a [`PolicySet`]: subjects, approvers, rules with their selectors and
//! globs, and the resource index. Never fails: a problem is reported and the policy is read in
//! its most restrictive sense.

use super::*;

impl PolicySet {
    /// Compiles every policy. Never fails: problems are returned beside the set.
    pub fn compile(cluster: &[ClusterAgentPolicy], namespaced: &[AgentPolicy]) -> (Self, Vec<Problem>) {
        let mut problems = Vec::new();
        let mut entries: Vec<(PolicyId, &PolicySpec)> = cluster
            .iter()
            .map(|p| (PolicyId { namespace: None, name: name_of(&p.metadata) }, &p.spec.policy))
            .chain(namespaced.iter().map(|p| {
                let ns = p.metadata.namespace.clone().unwrap_or_default();
                (PolicyId { namespace: Some(ns), name: name_of(&p.metadata) }, &p.spec.policy)
            }))
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));

        let mut set = PolicySet::default();
        for (id, spec) in entries {
            let policy = compile_policy(id, spec, &mut problems);
            let pi = set.policies.len();
            for (ri, rule) in policy.rules.iter().enumerate() {
                let index = match &policy.id.namespace {
                    None => &mut set.cluster,
                    Some(ns) => set.namespaced.entry(ns.clone()).or_default(),
                };
                index.insert(rule, (pi, ri));
                set.guards_create |= rule.create;
                if rule.delete {
                    for (groups, resource, sub) in &rule.resources {
                        let entry = (groups.clone(), resource.clone());
                        if sub.is_none() && !set.delete_resources.contains(&entry) {
                            set.delete_resources.push(entry);
                        }
                    }
                }
                if rule.namespace_selector.is_some() {
                    set.namespace_selector_rules.push((pi, ri));
                }
            }
            set.subject_usernames.extend(policy.subjects.usernames().iter().cloned());
            set.subject_groups.extend(policy.subjects.groups().iter().cloned());
            if let Subjects::Listed { service_accounts: Some(sel), namespace, .. } = &policy.subjects {
                set.subject_selectors.push((namespace.clone(), sel.clone()));
            }
            set.policies.push(policy);
        }
        (set, problems)
    }
}

fn name_of(meta: &kube::api::ObjectMeta) -> String {
    meta.name.clone().unwrap_or_default()
}

fn compile_policy(id: PolicyId, spec: &PolicySpec, problems: &mut Vec<Problem>) -> CompiledPolicy {
    let mut problem = |m: String| problems.push(Problem { policy: id.clone(), message: m });
    let subjects = match &spec.subjects {
        None => Subjects::Agents,
        Some(s) => {
            // The schema refuses these too; a policy stored before it did is read narrowly.
            let reserved = |name: &str| {
                name.starts_with("system:") && identity::service_account_name(name).is_none()
                    || name.chars().any(char::is_control)
            };
            let mut usernames: Vec<String> = Vec::new();
            for u in &s.usernames {
                let foreign = match (&id.namespace, identity::service_account_name(u)) {
                    (Some(own), Some((ns, _))) => ns != own,
                    (Some(_), None) => true,
                    (None, _) => false,
                };
                if reserved(u) || foreign {
                    problem(format!("subjects.usernames: {u:?} cannot be a subject of this policy; ignored"));
                } else {
                    usernames.push(u.clone());
                }
            }
            let mut groups: Vec<String> = Vec::new();
            for g in &s.groups {
                if g.starts_with("system:") || id.namespace.is_some() || g.chars().any(char::is_control) {
                    problem(format!("subjects.groups: {g:?} cannot be a subject of this policy; ignored"));
                } else {
                    groups.push(g.clone());
                }
            }
            Subjects::Listed {
                service_accounts: s.service_account_selector.as_ref().map(Selector::compile),
                namespace: id.namespace.clone(),
                usernames,
                groups,
            }
        }
    };
    let approval = spec.approval.as_ref().map(|a| {
        let mut duration = |field: &str, text: &str, fallback: SignedDuration| {
            parse_duration(text).and_then(|d| SignedDuration::try_from(d).ok()).unwrap_or_else(|| {
                problem(format!("approval.{field} {text:?} is not a duration; using {fallback:#}"));
                fallback
            })
        };
        let ttl = duration("ttl", &a.ttl, SignedDuration::from_hours(1));
        let max_ttl = duration("maxTtl", &a.max_ttl, ttl);
        CompiledApproval {
            users: a.approvers.users.clone(),
            groups: a.approvers.groups.clone(),
            lifetime: Lifetime { ttl: ttl.min(max_ttl), max_ttl },
            reason: a.reason.clone(),
            min_approvers: a.min_approvers.max(1) as usize,
        }
    });
    if spec.action == Action::RequireApproval && approval.is_none() {
        problem("RequireApproval without an approval block: nobody can approve, so it acts as Deny".into());
    }
    let churn = spec.churn_limit.as_ref().and_then(|c| {
        match parse_duration(&c.window).and_then(|d| SignedDuration::try_from(d).ok()) {
            Some(window) if window.is_positive() => Some(ChurnBudget {
                policy: id.clone(),
                max_operations: c.max_operations,
                window,
                scope: c.scope,
                subject: String::new(),
            }),
            _ => {
                problem(format!(
                    "churnLimit.window {:?} is not a duration; no churn limit applies",
                    c.window
                ));
                None
            }
        }
    });
    let namespaced = id.namespace.is_some();
    let rules =
        spec.rules.iter().enumerate().map(|(i, r)| compile_rule(i, r, namespaced, &mut problem)).collect();
    CompiledPolicy {
        churn,
        id,
        action: spec.action,
        mode: spec.mode,
        subjects,
        approval,
        message: spec.message.clone(),
        rules,
    }
}

fn compile_rule(
    i: usize,
    rule: &MatchRule,
    namespaced: bool,
    problem: &mut impl FnMut(String),
) -> CompiledRule {
    let name = rule.name.clone().unwrap_or_else(|| format!("rule-{i}"));
    let has = |op| rule.operations.contains(&op);
    let update = has(RuleOp::Update);
    if namespaced && (!rule.namespaces.is_empty() || rule.namespace_selector.is_some()) {
        problem(format!(
            "rule {name:?}: an AgentPolicy guards its own namespace only; namespaces and namespaceSelector are ignored"
        ));
    }
    let resources = rule
        .resources
        .iter()
        .flat_map(|m| {
            m.resources.iter().map(|r| {
                let (res, sub) = match r.split_once('/') {
                    Some((res, sub)) => (res.to_owned(), Some(sub.to_owned())),
                    None => (r.clone(), None),
                };
                (m.api_groups.clone(), res, sub)
            })
        })
        .collect();
    CompiledRule {
        name: name.clone(),
        delete: has(RuleOp::Delete),
        connect: has(RuleOp::Connect),
        create: has(RuleOp::Create),
        replace: update || has(RuleOp::Replace),
        patch: update || has(RuleOp::Patch),
        resources,
        names: Globs::new(&rule.names),
        namespaces: if namespaced { Globs::default() } else { Globs::new(&rule.namespaces) },
        namespace_selector: if namespaced {
            None
        } else {
            rule.namespace_selector.as_ref().map(Selector::compile)
        },
        object_selector: rule.object_selector.as_ref().map(Selector::compile),
        // A condition that does not compile is left out: the rule then guards more, not less.
        condition: rule.condition.as_deref().and_then(|source| {
            match super::condition::Condition::compile(source) {
                Ok(c) => Some(c),
                Err(e) => {
                    problem(format!("rule {name:?}: {e}; the rule applies without it"));
                    None
                }
            }
        }),
    }
}

impl CompiledPolicy {
    /// Whether the policy's subjects include the requester. `agent` is whether agentguard treats
    /// the requester as an agent at all: the same for every policy, worked out once per decision.
    pub(super) fn applies_to(&self, requester: &Requester, agent: bool) -> bool {
        match &self.subjects {
            Subjects::Agents => agent,
            Subjects::Listed { service_accounts, namespace, usernames, groups } => {
                let by_selector = service_accounts.as_ref().is_some_and(|sel| {
                    requester.service_account.as_ref().is_some_and(|sa| {
                        namespace.as_deref().is_none_or(|ns| ns == sa.namespace)
                            && sel.matches(Some(&sa.labels))
                    })
                });
                by_selector
                    || usernames.contains(&requester.username)
                    || requester.groups.iter().any(|g| groups.contains(g))
            }
        }
    }
}
