//! What the engine decides, as typed values with stable, actionable messages.

use std::fmt;

use jiff::Timestamp;

use crate::engine::api::{APPROVE_ANNOTATION, Action, Mode};
use crate::engine::approval::Refusal;
use crate::engine::diff::Change;

/// Which policy object decided.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyId {
    /// `None` for a ClusterAgentPolicy.
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            None => write!(f, "ClusterAgentPolicy {:?}", self.name),
            Some(ns) => write!(f, "AgentPolicy {ns}/{:?}", self.name),
        }
    }
}

/// The outcome of one admission review.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub verdict: Verdict,
    /// Returned to the client as AdmissionResponse warnings (Warn-mode policies).
    pub warnings: Vec<String>,
    /// Audit-mode findings: logged and counted, never shown to the client.
    pub audits: Vec<String>,
    /// The Warn and Audit findings as values, one per dry-run policy that would have refused.
    pub dry_runs: Vec<DryRun>,
    /// Whether the requester is an agent. False for everyone else, who only reaches a
    /// decision by writing an approval.
    pub agent: bool,
    /// Churn budgets an admitted request spends: one per enforced policy with a churn limit
    /// that matched it.
    pub churn: Vec<ChurnBudget>,
}

/// A policy's churn limit: at most `max_operations` guarded operations per agent per `window`.
#[derive(Clone, Debug, PartialEq)]
pub struct ChurnBudget {
    pub policy: PolicyId,
    pub max_operations: u32,
    pub window: jiff::SignedDuration,
    pub scope: crate::engine::api::ChurnScope,
    /// Whose count this request spends (see [`crate::engine::api::ChurnScope`]): a username,
    /// `namespace:NS`, or `*` for the whole policy. Empty in a compiled policy.
    pub subject: String,
}

/// What a Warn- or Audit-mode policy would have done had it been enforced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DryRun {
    pub mode: Mode,
    pub policy: PolicyId,
    /// `Deny` or `RequireApproval`: dry-run policies that would admit are not reported.
    pub action: Action,
}

impl Decision {
    pub fn allow(why: Allowed) -> Self {
        Self::new(Verdict::Allow(why))
    }

    pub fn deny(denial: Denial) -> Self {
        Self::new(Verdict::Deny(Box::new(denial)))
    }

    fn new(verdict: Verdict) -> Self {
        Self {
            verdict,
            warnings: Vec::new(),
            audits: Vec::new(),
            dry_runs: Vec::new(),
            agent: false,
            churn: Vec::new(),
        }
    }

    /// The action of the enforced policy (or built-in rule, or unmatched default) that decided;
    /// `None` when nothing judged the request (not an agent, not a guarded operation, no change,
    /// no policy matched and the default admits).
    pub fn action(&self) -> Option<Action> {
        match &self.verdict {
            Verdict::Deny(d) => Some(d.reason.action()),
            Verdict::Allow(Allowed::ByPolicy { .. }) => Some(Action::Allow),
            Verdict::Allow(Allowed::Approved { .. } | Allowed::BySession { .. }) => {
                Some(Action::RequireApproval)
            }
            Verdict::Allow(_) => None,
        }
    }

    pub fn allowed(&self) -> bool {
        matches!(self.verdict, Verdict::Allow(_))
    }

    /// Short label for logs and metrics.
    pub fn outcome(&self) -> &'static str {
        match &self.verdict {
            Verdict::Allow(Allowed::Approved { .. }) => "approved",
            Verdict::Allow(Allowed::BySession { .. }) => "session",
            Verdict::Allow(_) if !self.warnings.is_empty() => "warned",
            Verdict::Allow(_) => "allowed",
            Verdict::Deny(d) => match d.reason {
                Reason::ApprovalRequired { .. } => "held",
                _ => "denied",
            },
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Allow(Allowed),
    Deny(Box<Denial>),
}

/// Why a request was admitted.
#[derive(Clone, Debug, PartialEq)]
pub enum Allowed {
    /// The requester is not an agent (and wrote no approval it may not write).
    NotAgent,
    /// A human approver wrote a valid approval.
    ApprovalAccepted,
    /// The operation is not one agentguard guards (CREATE, CONNECT).
    NotGuarded,
    /// An UPDATE that changes nothing but bookkeeping fields.
    NoChange,
    /// No enforced policy matched and the unmatched default is Allow.
    Unmatched,
    /// An Allow policy matched and nothing stricter did.
    ByPolicy { policy: PolicyId, rule: String },
    /// A RequireApproval policy matched and break-glass sessions approvers opened cover the
    /// request: one use of the first with uses left is counted before the answer goes out.
    BySession { policy: PolicyId, rule: String, grants: Vec<crate::engine::session::Grant> },
    /// A RequireApproval policy matched and valid approvals cover the request: `approvals` are
    /// the values that counted, `approvers` whom they name (empty for one that names nobody).
    Approved {
        policy: PolicyId,
        rule: String,
        approvals: Vec<String>,
        approvers: Vec<String>,
        expires: Timestamp,
    },
}

impl fmt::Display for Allowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Allowed::NotAgent => f.write_str("the requester is not an agent"),
            Allowed::ApprovalAccepted => f.write_str("a listed approver wrote a valid approval"),
            Allowed::NotGuarded => f.write_str("agentguard does not guard this operation"),
            Allowed::NoChange => f.write_str("the update changes nothing but bookkeeping fields"),
            Allowed::Unmatched => f.write_str("no enforced policy matches"),
            Allowed::ByPolicy { policy, rule } => write!(f, "allowed by {policy}, rule {rule:?}"),
            Allowed::BySession { policy, rule, grants } => {
                write!(f, "admitted under session")?;
                if let Some(g) = grants.first() {
                    write!(f, " {g}; at most {} operations, until {}", g.max_operations, g.expires)?;
                }
                if grants.len() > 1 {
                    write!(f, " (or {} other sessions covering it)", grants.len() - 1)?;
                }
                write!(f, " for {policy}, rule {rule:?}")
            }
            Allowed::Approved { policy, rule, approvals, approvers, expires } => {
                let approval = approvals.first().map(String::as_str).unwrap_or_default();
                write!(f, "approved ({approval:?}")?;
                if approvals.len() > 1 {
                    write!(f, " and {} more", approvals.len() - 1)?;
                }
                if !approvers.is_empty() {
                    write!(f, ", by {}", approvers.join(", "))?;
                }
                write!(f, ", valid until {expires}) under {policy}, rule {rule:?}")
            }
        }
    }
}

/// A refusal, with everything the agent and a human need to act on it.
#[derive(Clone, Debug, PartialEq)]
pub struct Denial {
    pub reason: Reason,
    pub requester: String,
    /// `DELETE`, `UPDATE (patch)`, `UPDATE (replace)`, `CREATE`.
    pub operation: String,
    pub target: Target,
    /// For UPDATE: what the agent tried to change.
    pub change: Option<Change>,
}

/// The object a request is about.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Target {
    /// Resource as kubectl accepts it: `deployments.apps`, `configmaps`.
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
}

impl Target {
    /// `kubectl annotate` command that approves `value` on this object.
    pub fn annotate_command(&self, value: &str) -> String {
        let ns = if self.namespace.is_empty() || self.resource == "namespaces" {
            String::new()
        } else {
            format!(" -n {}", self.namespace)
        };
        format!(
            "kubectl annotate {} {}{ns} {APPROVE_ANNOTATION}={value} --overwrite",
            self.resource, self.name
        )
    }

    /// The same, for one of several approvers: the value names its writer, under a key of
    /// their own (`kubectl agentguard approve` fills both in).
    pub fn annotate_named_command(&self, value: &str) -> String {
        format!(
            "kubectl annotate {} {}{} {APPROVE_ANNOTATION}.<you>={value}.<username> --overwrite",
            self.resource,
            self.name,
            self.namespace_flag()
        )
    }

    /// The plugin command that shows the held change and writes the approval.
    pub fn approve_command(&self) -> String {
        format!("kubectl agentguard approve {}/{}{}", self.resource, self.name, self.namespace_flag())
    }

    fn namespace_flag(&self) -> String {
        if self.namespace.is_empty() || self.resource == "namespaces" {
            String::new()
        } else {
            format!(" -n {}", self.namespace)
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.resource)?;
        if !self.subresource.is_empty() {
            write!(f, "/{}", self.subresource)?;
        }
        write!(f, " {:?}", self.name)?;
        if !self.namespace.is_empty() && self.resource != "namespaces" {
            write!(f, " in namespace {:?}", self.namespace)?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Reason {
    /// A Deny policy matched.
    Policy { policy: PolicyId, rule: String, message: Option<String> },
    /// A RequireApproval policy matched and no valid approval covers the request.
    ApprovalRequired {
        policy: PolicyId,
        rule: String,
        /// Every policy that requires approval here, once each, with its approvers and reason.
        covering: Vec<Covering>,
        message: Option<String>,
        refusal: Refusal,
        /// The annotation value (with its ticket) that approves exactly this request.
        approve_value: String,
        /// When the ticket in `approve_value` expires.
        expires: Option<Timestamp>,
        /// Set when approval cannot be given for this request (e.g. the scale subresource):
        /// how to make the change in an approvable way instead.
        unapprovable: Option<String>,
        /// For a DELETE that would take other objects with it: what, summarised. The ticket is
        /// bound to that set (see [`super::effects::delete_digest`]).
        radius: Option<String>,
        /// Distinct approvers needed (the most any covering policy asks for).
        need: usize,
    },
    /// A built-in rule (no policy needed) refused it.
    Builtin { rule: &'static str, detail: String },
    /// No policy matched and the unmatched default denies.
    Unmatched,
}

/// One policy that holds a request for approval: who may approve under it, and why it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Covering {
    pub policy: PolicyId,
    /// e.g. `users alice; groups sre`.
    pub approvers: String,
    pub reason: Option<String>,
}

impl fmt::Display for Covering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.policy, self.approvers)?;
        if let Some(r) = &self.reason {
            write!(f, " ({r})")?;
        }
        Ok(())
    }
}

impl Reason {
    pub fn policy(&self) -> Option<&PolicyId> {
        match self {
            Reason::Policy { policy, .. } | Reason::ApprovalRequired { policy, .. } => Some(policy),
            _ => None,
        }
    }

    pub fn action(&self) -> Action {
        match self {
            Reason::ApprovalRequired { .. } => Action::RequireApproval,
            _ => Action::Deny,
        }
    }
}

impl Denial {
    /// One line that fits in an AdmissionResponse warning (the API server truncates long ones).
    pub fn summary(&self) -> String {
        let what = match &self.reason {
            Reason::Policy { policy, rule, .. } => format!("{policy}, rule {rule:?}, would deny"),
            Reason::ApprovalRequired { policy, rule, .. } => {
                format!("{policy}, rule {rule:?}, would require approval for")
            }
            Reason::Builtin { rule, .. } => format!("built-in rule {rule:?} would deny"),
            Reason::Unmatched => "the unmatched default would deny".into(),
        };
        format!("{what} {} of {}", self.operation, self.target)
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Denial { reason, requester, operation, target, change } = self;
        write!(f, "agentguard: {operation} of {target} by {requester} ")?;
        match reason {
            Reason::Policy { policy, rule, message } => {
                write!(f, "is denied by {policy}, rule {rule:?}.")?;
                if let Some(m) = message {
                    write!(f, " {m}")?;
                }
            }
            Reason::ApprovalRequired {
                policy,
                rule,
                covering,
                message,
                refusal,
                approve_value,
                expires,
                unapprovable,
                radius,
                need,
            } => {
                write!(f, "requires approval under {policy}, rule {rule:?}: {refusal}.")?;
                if let Some(m) = message {
                    write!(f, " {m}")?;
                }
                if let Some(r) = radius {
                    write!(f, " It would also delete: {r}.")?;
                }
                match unapprovable {
                    Some(how) => write!(f, " {how}")?,
                    None if *need > 1 => {
                        let under = if covering.len() > 1 {
                            ", each an approver under every policy below"
                        } else {
                            ""
                        };
                        write!(
                            f,
                            " To approve, {need} distinct approvers are needed{under}; each runs: {} (or: {}) — then retry",
                            target.approve_command(),
                            target.annotate_named_command(approve_value)
                        )?;
                        if let Some(at) = expires {
                            write!(f, " before {at}")?;
                        }
                        f.write_str(".")?;
                    }
                    None => {
                        let who = if covering.len() > 1 {
                            "an approver under every policy below"
                        } else {
                            "an approver"
                        };
                        write!(
                            f,
                            " To approve, {who} runs: {} — then retry",
                            target.annotate_command(approve_value)
                        )?;
                        if let Some(at) = expires {
                            write!(f, " before {at}")?;
                        }
                        f.write_str(".")?;
                    }
                }
                f.write_str(" Approvers:")?;
                for c in covering {
                    write!(f, " [{c}]")?;
                }
                f.write_str(".")?;
            }
            Reason::Builtin { rule, detail } => {
                write!(f, "is denied by built-in rule {rule:?}: {detail}")?;
            }
            Reason::Unmatched => {
                write!(
                    f,
                    "is denied: no policy allows it and agentguard's default for unmatched agent requests is Deny."
                )?;
            }
        }
        if let Some(change) = change.as_ref().filter(|c| !c.is_empty()) {
            write!(f, " Attempted change: {change}")?;
        }
        Ok(())
    }
}
