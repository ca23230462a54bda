//! Counting the uses of break-glass sessions ([`crate::engine::api::AgentSession`]) in the API
//! server, so every replica shares one count and no session admits more than `maxOperations`.
//!
//! Each use first reads the session itself (same uid, not being deleted): deleting it closes it
//! at once, whatever a replica's cache still holds. The count lives in a Lease in agentguard's
//! namespace named from the session's uid (agents may not touch that namespace; a session opened
//! again under the same name is a new session with a count of its own). A count is a read and a
//! write carrying the resourceVersion read, redone on a conflict, as the churn breaker's. The
//! session owns its Lease, so the garbage collector removes the count once the session is
//! deleted (closed).

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;
use kube::api::{Api, ObjectMeta, PostParams};
use sha2::{Digest, Sha256};

use crate::engine::api::AgentSession;
use crate::engine::session::Grant;

/// Annotations of a session's count Lease.
pub const SESSION_ANNOTATION: &str = "agentguard.io/session";
pub const COUNT_ANNOTATION: &str = "agentguard.io/session-uses";
pub const SESSION_LABEL: &str = "agentguard.io/session-count";

/// How many times a count is redone when another replica wrote first.
const ATTEMPTS: usize = 10;

/// Why a use was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Spent {
    #[error("session {0:?} is closed (deleted, or replaced by another of that name)")]
    Closed(String),
    #[error("session {session:?} has admitted all {max} operations it allows; an approver may open another")]
    Exhausted { session: String, max: u32 },
}

/// The Lease counting the session with this uid.
pub fn lease_name(uid: &str) -> String {
    let digest = Sha256::digest(uid.as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("agentguard-session-{hex}")
}

/// Uses recorded on a count Lease (none without one).
pub fn uses(lease: Option<&Lease>) -> u32 {
    lease.and_then(|l| l.metadata.annotations.as_ref()?.get(COUNT_ANNOTATION)?.parse().ok()).unwrap_or(0)
}

/// Counts session uses against Leases in agentguard's namespace.
pub struct Sessions {
    sessions: Api<AgentSession>,
    leases: Api<Lease>,
    namespace: String,
}

impl Sessions {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            sessions: Api::all(client.clone()),
            leases: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
        }
    }

    /// Spends one use of the session, or says why it cannot. With `dry_run` nothing is
    /// written: the answer is what a real request would get.
    pub async fn spend(&self, spend: &Grant, dry_run: bool) -> Result<Option<Spent>> {
        let live = self.sessions.get_opt(&spend.name).await.context("reading the session")?;
        let open = live.is_some_and(|s| {
            s.metadata.uid.as_deref() == Some(spend.uid.as_str()) && s.metadata.deletion_timestamp.is_none()
        });
        if !open {
            return Ok(Some(Spent::Closed(spend.name.clone())));
        }
        let name = lease_name(&spend.uid);
        for _ in 0..ATTEMPTS {
            let lease = self.leases.get_opt(&name).await.with_context(|| format!("reading lease {name}"))?;
            let used = uses(lease.as_ref());
            if used >= spend.max_operations {
                return Ok(Some(Spent::Exhausted { session: spend.name.clone(), max: spend.max_operations }));
            }
            if dry_run {
                return Ok(None);
            }
            let rv = lease.as_ref().and_then(|l| l.metadata.resource_version.clone());
            let next = self.lease(&name, spend, used + 1, rv.clone());
            let written = match rv {
                None => self.leases.create(&PostParams::default(), &next).await,
                Some(_) => self.leases.replace(&name, &PostParams::default(), &next).await,
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

    fn lease(&self, name: &str, spend: &Grant, used: u32, rv: Option<String>) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(self.namespace.clone()),
                resource_version: rv,
                owner_references: Some(vec![OwnerReference {
                    api_version: AgentSession::api_version(&()).into_owned(),
                    kind: AgentSession::kind(&()).into_owned(),
                    name: spend.name.clone(),
                    uid: spend.uid.clone(),
                    ..Default::default()
                }]),
                labels: Some(
                    [
                        ("app.kubernetes.io/managed-by".to_owned(), "agentguard".to_owned()),
                        (SESSION_LABEL.to_owned(), "true".to_owned()),
                    ]
                    .into(),
                ),
                annotations: Some(
                    [
                        (SESSION_ANNOTATION.to_owned(), format!("{} {}", spend.name, spend.uid)),
                        (COUNT_ANNOTATION.to_owned(), used.to_string()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            spec: Some(LeaseSpec { holder_identity: Some(spend.name.clone()), ..Default::default() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_per_session_uid_and_read_back() {
        assert_ne!(lease_name("uid-1"), lease_name("uid-2"));
        assert!(lease_name("uid-1").len() <= 63);
        assert_eq!(uses(None), 0);
        let lease = Lease {
            metadata: ObjectMeta {
                annotations: Some([(COUNT_ANNOTATION.to_owned(), "3".to_owned())].into()),
                ..Default::default()
            },
            spec: None,
        };
        assert_eq!(uses(Some(&lease)), 3);
        let spent = Spent::Exhausted { session: "m".into(), max: 2 };
        assert!(spent.to_string().contains("admitted all 2 operations"));
    }
}
