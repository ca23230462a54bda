//! Break-glass sessions ([`AgentSession`]): whether a session an approver opened stands in for
//! the approval a held request lacks.
//!
//! A session covers a request when it is for this agent and this agent's credential (the token
//! whose id its requests carry: anyone who can act as a ServiceAccount — impersonation, a pod,
//! a token of their own — shares its username, never that token), lists the request's namespace,
//! resource (with its subresource, if any) and operation, is neither closing nor expired, and its
//! opener is an approver under every policy that holds the request. It never stands in for a
//! policy that needs several approvers (one person opened it), nor for what a request amounts to
//! beyond itself (a cascade to guarded dependents, an object taken out of a policy's reach):
//! those still need their approval, object by object. How many operations it has admitted is
//! counted in the API server by the request path (see `cluster::sessions`), not here.

use jiff::{SignedDuration, Timestamp};

use crate::engine::api::{AgentSession, SessionOperation};
use crate::engine::approval::CLOCK_SKEW;
use crate::engine::policy::Requester;

/// What a covering session grants one request: the request path spends one of its uses (the
/// first of several covering sessions that has one left).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub name: String,
    pub uid: String,
    pub max_operations: u32,
    pub opener: String,
    pub reason: String,
    pub expires: Timestamp,
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (uid {}), opened by {}: {}", self.name, self.uid, self.opener, self.reason)
    }
}

/// A session as the engine reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct Session {
    pub name: String,
    pub uid: String,
    pub agent: String,
    /// The one credential (token) of the agent it covers.
    credential: String,
    namespaces: Vec<String>,
    resources: Vec<String>,
    operations: Vec<SessionOperation>,
    pub max_operations: u32,
    opened: Timestamp,
    ttl: SignedDuration,
    /// Who opened it, with the groups they had then: approver rights are judged on those.
    pub opener: Requester,
    pub reason: String,
    /// Deleted, waiting for finalizers: closed already.
    closing: bool,
}

/// What a request is, in a session's terms.
#[derive(Clone, Copy, Debug)]
pub struct Use<'a> {
    pub agent: &'a str,
    /// The request's credential id, when its credential names one.
    pub credential: Option<&'a str>,
    pub operation: SessionOperation,
    /// `configmaps`, `deployments.apps`, `deployments.apps/scale`.
    pub resource: &'a str,
    pub namespace: &'a str,
}

impl Session {
    /// The session as stored, or why it cannot be read as one (not created yet, a lifetime that
    /// is not a duration: the schema refuses both, so such a session covers nothing).
    pub fn of(s: &AgentSession) -> Result<Self, String> {
        let meta = &s.metadata;
        let name = meta.name.clone().unwrap_or_default();
        let opened = meta.creation_timestamp.as_ref().map(|t| t.0).ok_or("it has no creation time")?;
        let ttl = crate::engine::api::parse_duration(&s.spec.ttl)
            .and_then(|d| SignedDuration::try_from(d).ok())
            .ok_or_else(|| format!("ttl {:?} is not a duration", s.spec.ttl))?;
        Ok(Self {
            name,
            uid: meta.uid.clone().unwrap_or_default(),
            agent: s.spec.agent.clone(),
            credential: s.spec.credential_id.clone(),
            namespaces: s.spec.namespaces.clone(),
            resources: s.spec.resources.clone(),
            operations: s.spec.operations.clone(),
            max_operations: s.spec.max_operations,
            opened,
            ttl,
            opener: Requester {
                username: s.spec.opened_by.username.clone(),
                groups: s.spec.opened_by.groups.clone(),
                service_account: None,
                selected_as_agent: false,
                credential: None,
            },
            reason: s.spec.reason.clone(),
            closing: meta.deletion_timestamp.is_some(),
        })
    }

    /// What it grants a request it covers, ending when it closes under `max_ttl`.
    pub fn grant(&self, max_ttl: SignedDuration) -> Grant {
        Grant {
            name: self.name.clone(),
            uid: self.uid.clone(),
            max_operations: self.max_operations,
            opener: self.opener.username.clone(),
            reason: self.reason.clone(),
            expires: self.expires(max_ttl),
        }
    }

    /// When it closes, with `max_ttl` (the strictest covering policy's) capping its own ttl.
    pub fn expires(&self, max_ttl: SignedDuration) -> Timestamp {
        self.opened.checked_add(self.ttl.min(max_ttl)).unwrap_or(Timestamp::MAX)
    }

    /// Whether it is open at `now` and its scope covers `request`.
    pub fn covers(&self, request: &Use<'_>, max_ttl: SignedDuration, now: Timestamp) -> bool {
        let opened = now.checked_add(CLOCK_SKEW).is_ok_and(|latest| self.opened <= latest);
        !self.closing
            && opened
            && now < self.expires(max_ttl)
            && !self.uid.is_empty()
            && self.agent == request.agent
            && !self.credential.is_empty()
            && request.credential == Some(self.credential.as_str())
            && self.operations.contains(&request.operation)
            && self.namespaces.iter().any(|n| n == request.namespace)
            && self.resources.iter().any(|r| r == request.resource)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn session(extra: serde_json::Value) -> AgentSession {
        let mut s = json!({
            "apiVersion": "agentguard.io/v1alpha1", "kind": "AgentSession",
            "metadata": {"name": "migrate", "uid": "s-1", "creationTimestamp": "2026-11-30T10:00:00Z"},
            "spec": {"agent": "system:serviceaccount:agents:coder", "credentialId": "JTI=1", "namespaces": ["prod"],
                     "resources": ["deployments.apps", "configmaps"], "operations": ["DELETE"],
                     "maxOperations": 3, "ttl": "30m", "reason": "migration",
                     "openedBy": {"username": "alice", "groups": ["sre"]}}
        });
        if let Some(meta) = extra.get("metadata") {
            for (k, v) in meta.as_object().unwrap() {
                s["metadata"][k] = v.clone();
            }
        }
        serde_json::from_value(s).unwrap()
    }

    fn at(t: &str) -> Timestamp {
        t.parse().unwrap()
    }

    #[test]
    fn a_session_covers_exactly_its_scope_while_open() {
        let s = Session::of(&session(json!({}))).unwrap();
        let hours = SignedDuration::from_hours(24);
        let ok = Use {
            agent: "system:serviceaccount:agents:coder",
            credential: Some("JTI=1"),
            operation: SessionOperation::Delete,
            resource: "deployments.apps",
            namespace: "prod",
        };
        assert!(s.covers(&ok, hours, at("2026-11-30T10:10:00Z")));
        // Outside its scope: another agent; the same agent with another credential (a token
        // another agent minted for it, or an impersonation, which carries none); another
        // operation, resource, subresource or namespace.
        for other in [
            Use { agent: "system:serviceaccount:agents:other", ..ok },
            Use { credential: Some("JTI=2"), ..ok },
            Use { credential: None, ..ok },
            Use { operation: SessionOperation::Update, ..ok },
            Use { resource: "statefulsets.apps", ..ok },
            Use { resource: "deployments.apps/scale", ..ok },
            Use { namespace: "dev", ..ok },
        ] {
            assert!(!s.covers(&other, hours, at("2026-11-30T10:10:00Z")), "{other:?}");
        }
        // Before it opened (beyond clock skew), at and after its end, and cut by a policy's maxTtl.
        assert!(!s.covers(&ok, hours, at("2026-11-30T09:58:00Z")));
        assert!(!s.covers(&ok, hours, at("2026-11-30T10:30:00Z")));
        assert!(!s.covers(&ok, SignedDuration::from_mins(5), at("2026-11-30T10:10:00Z")));
        // Deleted (finalizers pending): closed.
        let closing =
            Session::of(&session(json!({"metadata": {"deletionTimestamp": "2026-11-30T10:05:00Z"}})));
        assert!(!closing.unwrap().covers(&ok, hours, at("2026-11-30T10:10:00Z")));
        // Not created yet: no session.
        let mut unborn = session(json!({}));
        unborn.metadata.creation_timestamp = None;
        assert!(Session::of(&unborn).is_err());
    }
}
