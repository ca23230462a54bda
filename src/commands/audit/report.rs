//! The findings of `agentguard audit` made of the access reviews' answers, and their rendering:
//! the table, the JSON document and the exit code. Pure.

use std::collections::{BTreeMap, BTreeSet};

use super::checks::*;
use super::{EXIT_FINDINGS, FailOn};

/// Where a finding holds.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Where {
    /// Every namespace (a ClusterRoleBinding), or a cluster-scoped resource.
    Cluster,
    Namespaces(Vec<String>),
}

/// Rights of one kind that an identity holds in one place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub check: &'static str,
    pub severity: Severity,
    pub verbs: Vec<&'static str>,
    pub resources: Vec<String>,
    pub scope: Where,
    pub note: Option<&'static str>,
}

pub(super) const IN_AGENT_NAMESPACE: &str =
    "only in agent namespaces, whose every ServiceAccount is an agent";

/// The findings for one identity, from the answers about its checks. Findings of the same check,
/// severity, verbs and scope are merged into one listing every resource; the most severe first.
pub fn findings(
    checks: &[Check],
    answers: &[(&Ask, bool)],
    agent_namespaces: &BTreeSet<String>,
) -> Vec<Finding> {
    // check → place → verbs allowed there.
    let mut allowed: BTreeMap<usize, BTreeMap<Option<&str>, BTreeSet<&'static str>>> = BTreeMap::new();
    for (ask, yes) in answers {
        if *yes {
            allowed
                .entry(ask.check)
                .or_default()
                .entry(ask.namespace.as_deref())
                .or_default()
                .insert(ask.verb);
        }
    }
    let mut raw: Vec<Finding> = Vec::new();
    for (index, places) in allowed {
        let check = &checks[index];
        let in_order = |verbs: &BTreeSet<&'static str>| -> Vec<&'static str> {
            check.verbs.iter().copied().filter(|v| verbs.contains(v)).collect()
        };
        // verbs → namespaces holding exactly those verbs, split by whether the namespace is an agent one.
        let mut by_verbs: BTreeMap<(Vec<&'static str>, bool), Vec<String>> = BTreeMap::new();
        for (place, verbs) in &places {
            match place {
                None => raw.push(Finding {
                    check: check.id,
                    severity: check.severity,
                    verbs: in_order(verbs),
                    resources: vec![check.resource.to_string()],
                    scope: Where::Cluster,
                    note: None,
                }),
                Some(ns) => {
                    let harmless = check.becomes_service_account && agent_namespaces.contains(*ns);
                    by_verbs.entry((in_order(verbs), harmless)).or_default().push((*ns).to_owned());
                }
            }
        }
        for ((verbs, harmless), namespaces) in by_verbs {
            raw.push(Finding {
                check: check.id,
                severity: if harmless { Severity::Medium } else { check.severity },
                verbs,
                resources: vec![check.resource.to_string()],
                scope: Where::Namespaces(namespaces),
                note: harmless.then_some(IN_AGENT_NAMESPACE),
            });
        }
    }
    let mut merged: Vec<Finding> = Vec::new();
    for f in raw {
        match merged.iter_mut().find(|m| {
            (m.check, m.severity, &m.verbs, &m.scope, m.note)
                == (f.check, f.severity, &f.verbs, &f.scope, f.note)
        }) {
            Some(m) => m.resources.extend(f.resources),
            None => merged.push(f),
        }
    }
    merged.sort_by_key(|f| std::cmp::Reverse(f.severity));
    merged
}

/// An audited identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentReport {
    pub identity: Identity,
    pub findings: Vec<Finding>,
}

/// The whole audit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub agents: Vec<AgentReport>,
    /// agentguard's own ServiceAccount: reported, never counted in the exit code.
    pub own: Option<AgentReport>,
    pub agent_namespaces: Vec<String>,
    pub namespaces: usize,
    pub access_reviews: usize,
}

impl Report {
    fn count(&self, severity: Severity) -> usize {
        self.agents.iter().flat_map(|a| &a.findings).filter(|f| f.severity == severity).count()
    }

    fn findings(&self) -> usize {
        self.agents.iter().map(|a| a.findings.len()).sum()
    }

    /// `audit: N agents, M findings (c critical, h high, m medium); R access reviews over K
    /// namespaces`, then agentguard's own findings when it was audited.
    pub fn summary(&self) -> String {
        let mut line = format!(
            "audit: {} agents, {} findings ({} critical, {} high, {} medium); {} access reviews over {} namespaces",
            self.agents.len(),
            self.findings(),
            self.count(Severity::Critical),
            self.count(Severity::High),
            self.count(Severity::Medium),
            self.access_reviews,
            self.namespaces,
        );
        if let Some(own) = &self.own {
            line.push_str(&format!(
                "; agentguard itself ({}): {} findings",
                own.identity.identity,
                own.findings.len()
            ));
        }
        line
    }

    /// 0, or [`EXIT_FINDINGS`] when a finding reaches the threshold.
    pub fn exit_code(&self, fail_on: FailOn) -> u8 {
        let worst = self.agents.iter().flat_map(|a| &a.findings).map(|f| f.severity).max();
        match (fail_on.threshold(), worst) {
            (Some(threshold), Some(worst)) if worst >= threshold => EXIT_FINDINGS,
            _ => 0,
        }
    }

    /// One row per finding (an agent without findings gets one row saying so), columns aligned;
    /// the finding, the one long column, comes last.
    pub fn table(&self) -> String {
        let mut rows: Vec<[String; 4]> = vec![["IDENTITY", "SEVERITY", "SCOPE", "FINDING"].map(String::from)];
        for agent in self.agents.iter().chain(&self.own) {
            let identity = &agent.identity.identity;
            if agent.findings.is_empty() {
                rows.push([identity.clone(), "-".into(), "-".into(), "no rights that matter".into()]);
            }
            for f in &agent.findings {
                let mut finding = format!("{}: {} {}", f.check, f.verbs.join(","), f.resources.join(", "));
                if let Some(note) = f.note {
                    finding.push_str(&format!(" ({note})"));
                }
                let scope = match &f.scope {
                    Where::Cluster => "cluster-wide".to_owned(),
                    Where::Namespaces(list) => describe_namespaces(list),
                };
                rows.push([identity.clone(), f.severity.name().into(), scope, finding]);
            }
        }
        let widths: Vec<usize> =
            (0..4).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
        let mut out = String::new();
        if !self.agent_namespaces.is_empty() {
            out.push_str(&format!(
                "agent namespaces (every ServiceAccount in them is an agent): {}\n",
                self.agent_namespaces.join(", ")
            ));
        }
        for row in rows {
            let line = format!(
                "{:w0$}  {:w1$}  {:w2$}  {}",
                row[0],
                row[1],
                row[2],
                row[3],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2]
            );
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    /// The JSON document of `--output json` (field names documented in docs/audit.md).
    pub fn json(&self) -> serde_json::Value {
        let agents: Vec<serde_json::Value> = self
            .agents
            .iter()
            .map(|a| {
                let mut value = serde_json::to_value(&a.identity).unwrap_or_default();
                value["findings"] = a
                    .findings
                    .iter()
                    .map(|f| {
                        let (scope, namespaces) = match &f.scope {
                            Where::Cluster => ("cluster", Vec::new()),
                            Where::Namespaces(list) => ("namespaces", list.clone()),
                        };
                        serde_json::json!({
                            "check": f.check,
                            "severity": f.severity,
                            "verbs": f.verbs,
                            "resources": f.resources,
                            "scope": scope,
                            "namespaces": namespaces,
                            "note": f.note,
                        })
                    })
                    .collect();
                value
            })
            .collect();
        let own = self.own.as_ref().map(|o| {
            let mut value = serde_json::to_value(&o.identity).unwrap_or_default();
            value["findings"] = o
                .findings
                .iter()
                .map(|f| serde_json::json!({"check": f.check, "severity": f.severity, "verbs": f.verbs, "resources": f.resources}))
                .collect();
            value
        });
        serde_json::json!({
            "agents": agents,
            "agentguard": own,
            "agentNamespaces": self.agent_namespaces,
            "summary": {
                "agents": self.agents.len(),
                "findings": self.findings(),
                "critical": self.count(Severity::Critical),
                "high": self.count(Severity::High),
                "medium": self.count(Severity::Medium),
                "namespaces": self.namespaces,
                "accessReviews": self.access_reviews,
            },
        })
    }
}

fn describe_namespaces(list: &[String]) -> String {
    const SHOWN: usize = 3;
    let noun = if list.len() == 1 { "namespace" } else { "namespaces" };
    let shown = list.iter().take(SHOWN).map(String::as_str).collect::<Vec<_>>().join(", ");
    match list.len().saturating_sub(SHOWN) {
        0 => format!("{noun} {shown}"),
        more => format!("{noun} {shown} +{more} more"),
    }
}

/// Assembles the report from the plan and every answer.
pub fn report(
    identities: Vec<Identity>,
    plan: &[Vec<Check>],
    answers: &[(Ask, bool)],
    agent_namespaces: &BTreeSet<String>,
    namespaces: usize,
) -> Report {
    let agents = identities
        .into_iter()
        .enumerate()
        .map(|(i, identity)| {
            let mine: Vec<(&Ask, bool)> =
                answers.iter().filter(|(a, _)| a.identity == i).map(|(a, y)| (a, *y)).collect();
            AgentReport { identity, findings: findings(&plan[i], &mine, agent_namespaces) }
        })
        .collect();
    Report {
        agents,
        own: None,
        agent_namespaces: agent_namespaces.iter().cloned().collect(),
        namespaces,
        access_reviews: answers.len(),
    }
}
