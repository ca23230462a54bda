//! The approval protocol: what `agentguard.io/approve` may say, when it was set, and whether it
//! covers a request.
//!
//! Grammar of the annotation value (whitespace around items is ignored):
//!
//! ```text
//! value   = grant *( "," grant ) [ ";" "expires=" RFC3339 ]
//! grant   = "delete" | "update:" digest
//! digest  = 16 lower-case hex digits, printed in the denial of the update it approves
//! ```
//!
//! Without `expires=` an approval lives for the policy's `ttl`, counted from the time the API
//! server recorded in the managedFields entry that owns the annotation. With it, it lives until
//! then, but never past `maxTtl` after it was set. An `update:` grant covers only the change
//! whose digest it names, so once that change is made (or the object changes otherwise) it no
//! longer applies to anything: no standing blank cheque. Pure functions, no I/O.

use std::fmt;

use jiff::{SignedDuration, Timestamp};
use serde_json::Value;

use crate::api::APPROVE_ANNOTATION;

/// A parsed approval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub delete: bool,
    /// Digests of the approved updates.
    pub updates: Vec<String>,
    pub expires: Option<Timestamp>,
}

/// Why an annotation value is not a valid approval.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GrammarError {
    #[error("`{0}` is not an approvable operation: use `delete` or `update:<digest>`")]
    UnknownGrant(String),
    #[error("`update` must name the change it approves: `update:<digest>`, digest as printed in the denial")]
    UpdateWithoutDigest,
    #[error("`{0}` is not a change digest (16 hex digits, as printed in the denial)")]
    BadDigest(String),
    #[error("`{0}` is not a valid expiry: use `expires=<RFC 3339 time>`, e.g. expires=2026-01-02T15:04:05Z")]
    BadExpiry(String),
    #[error("the approval names no operation")]
    Empty,
}

impl Grant {
    pub fn parse(value: &str) -> Result<Self, GrammarError> {
        let (grants, options) = match value.split_once(';') {
            Some((g, o)) => (g, Some(o.trim())),
            None => (value, None),
        };
        let mut grant = Grant { delete: false, updates: Vec::new(), expires: None };
        for item in grants.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item.split_once(':') {
                None if item == "delete" => grant.delete = true,
                None if item == "update" => return Err(GrammarError::UpdateWithoutDigest),
                Some(("update", digest)) => {
                    let digest = digest.trim();
                    if digest.len() != 16
                        || !digest.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                    {
                        return Err(GrammarError::BadDigest(digest.into()));
                    }
                    grant.updates.push(digest.into());
                }
                _ => return Err(GrammarError::UnknownGrant(item.into())),
            }
        }
        if !grant.delete && grant.updates.is_empty() {
            return Err(GrammarError::Empty);
        }
        if let Some(opt) = options {
            let at = opt
                .strip_prefix("expires=")
                .and_then(|t| t.trim().parse::<Timestamp>().ok())
                .ok_or_else(|| GrammarError::BadExpiry(opt.into()))?;
            grant.expires = Some(at);
        }
        Ok(grant)
    }

    fn covers(&self, wanted: Wanted<'_>) -> bool {
        match wanted {
            Wanted::Delete => self.delete,
            Wanted::Update { digest } => self.updates.iter().any(|d| d == digest),
        }
    }
}

/// The approval annotation as stored on an object: its value and when it was last written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stamp<'a> {
    pub value: &'a str,
    /// From the managedFields entry owning the annotation; `None` when no entry owns it.
    pub set_at: Option<Timestamp>,
}

impl<'a> Stamp<'a> {
    /// Reads the approval of `object`, if it carries one.
    pub fn of(object: &'a Value) -> Option<Self> {
        let meta = object.get("metadata")?;
        let value = meta.get("annotations")?.get(APPROVE_ANNOTATION)?.as_str()?;
        let owner_key = format!("f:{APPROVE_ANNOTATION}");
        // Several managers may share ownership (server-side apply): the latest write counts.
        let set_at = meta
            .get("managedFields")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|e| {
                e.pointer("/fieldsV1/f:metadata/f:annotations").and_then(|a| a.get(&owner_key)).is_some()
            })
            .filter_map(|e| e.get("time")?.as_str()?.parse::<Timestamp>().ok())
            .max();
        Some(Self { value, set_at })
    }
}

/// What a request needs approved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wanted<'a> {
    Delete,
    Update { digest: &'a str },
}

impl fmt::Display for Wanted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Wanted::Delete => f.write_str("delete"),
            Wanted::Update { digest } => write!(f, "update:{digest}"),
        }
    }
}

/// Lifetime limits of the policies that require the approval (the strictest of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    pub ttl: SignedDuration,
    pub max_ttl: SignedDuration,
}

/// Why an approval does not cover a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no approval is present")]
    Absent,
    #[error("the approval on the object is malformed: {0}")]
    Malformed(GrammarError),
    #[error("the approval `{approved}` does not cover `{wanted}`")]
    NotCovered { approved: String, wanted: String },
    #[error("the approval expired at {0}")]
    Expired(Timestamp),
    #[error("the time the approval was set cannot be read from managedFields, and it names no expiry")]
    NoSetTime,
}

/// Decides whether the approval stored on the object covers `wanted` at `now`; on success
/// returns when the approval expires.
pub fn check(
    stamp: Option<&Stamp<'_>>,
    wanted: Wanted<'_>,
    lifetime: Lifetime,
    now: Timestamp,
) -> Result<Timestamp, Refusal> {
    let stamp = stamp.ok_or(Refusal::Absent)?;
    let grant = Grant::parse(stamp.value).map_err(Refusal::Malformed)?;
    if !grant.covers(wanted) {
        return Err(Refusal::NotCovered { approved: stamp.value.into(), wanted: wanted.to_string() });
    }
    let expiry = expiry(&grant, stamp.set_at, lifetime).ok_or(Refusal::NoSetTime)?;
    if now >= expiry {
        return Err(Refusal::Expired(expiry));
    }
    Ok(expiry)
}

fn expiry(grant: &Grant, set_at: Option<Timestamp>, lifetime: Lifetime) -> Option<Timestamp> {
    let cap = |base: Timestamp, d: SignedDuration| base.checked_add(d).ok();
    match (grant.expires, set_at) {
        (Some(explicit), Some(set)) => Some(explicit.min(cap(set, lifetime.max_ttl)?)),
        // Written through agentguard's check, which bounded `expires` by maxTtl at that time.
        (Some(explicit), None) => Some(explicit),
        (None, Some(set)) => cap(set, lifetime.ttl),
        (None, None) => None,
    }
}

/// Checks an approval a human is writing now: the grammar, and an explicit expiry within
/// `max_ttl` from now.
pub fn validate_new(value: &str, max_ttl: SignedDuration, now: Timestamp) -> Result<Grant, String> {
    let grant = Grant::parse(value).map_err(|e| e.to_string())?;
    if let Some(at) = grant.expires {
        if at <= now {
            return Err(format!("expires={at} is in the past"));
        }
        let latest = now.checked_add(max_ttl).map_err(|e| e.to_string())?;
        if at > latest {
            return Err(format!(
                "expires={at} is later than the policy allows (at most {max_ttl:#} from now, {latest})"
            ));
        }
    }
    Ok(grant)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const DIGEST: &str = "0123456789abcdef";

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn hours(h: i64) -> SignedDuration {
        SignedDuration::from_hours(h)
    }

    fn lifetime() -> Lifetime {
        Lifetime { ttl: hours(1), max_ttl: hours(24) }
    }

    fn approved(value: &str, set_at: &str) -> Value {
        json!({"metadata": {
            "annotations": {APPROVE_ANNOTATION: value},
            "managedFields": [
                {"manager": "kube-controller-manager", "time": "2026-01-01T00:00:00Z",
                 "fieldsV1": {"f:spec": {"f:replicas": {}}}},
                {"manager": "kubectl-annotate", "operation": "Update", "time": set_at,
                 "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:agentguard.io/approve": {}}}}}
            ]
        }})
    }

    #[test]
    fn grammar() {
        assert_eq!(Grant::parse("delete").unwrap(), Grant { delete: true, updates: vec![], expires: None });
        assert_eq!(
            Grant::parse(&format!(" delete , update:{DIGEST} ;expires=2026-11-27T10:00:00Z")).unwrap(),
            Grant { delete: true, updates: vec![DIGEST.into()], expires: Some(t("2026-11-27T10:00:00Z")) }
        );
        assert_eq!(Grant::parse("update"), Err(GrammarError::UpdateWithoutDigest));
        assert_eq!(Grant::parse("update:xyz"), Err(GrammarError::BadDigest("xyz".into())));
        assert_eq!(Grant::parse("destroy"), Err(GrammarError::UnknownGrant("destroy".into())));
        assert_eq!(Grant::parse(""), Err(GrammarError::Empty));
        assert!(matches!(Grant::parse("delete;expires=tomorrow"), Err(GrammarError::BadExpiry(_))));
        assert!(matches!(Grant::parse("delete;ttl=1h"), Err(GrammarError::BadExpiry(_))));
    }

    #[test]
    fn set_time_comes_from_the_managed_fields_owner() {
        let obj = approved("delete", "2026-11-26T10:00:00Z");
        let stamp = Stamp::of(&obj).unwrap();
        assert_eq!(stamp.value, "delete");
        assert_eq!(stamp.set_at, Some(t("2026-11-26T10:00:00Z")));
        assert_eq!(Stamp::of(&json!({"metadata": {}})), None);
    }

    #[test]
    fn approval_table() {
        let set = "2026-11-26T10:00:00Z";
        let in_ttl = t("2026-11-26T10:30:00Z");
        let after_ttl = t("2026-11-26T11:00:00Z");
        let update = Wanted::Update { digest: DIGEST };
        let other_update = Wanted::Update { digest: "fedcba9876543210" };
        let obj = |v: &str| approved(v, set);
        let no_owner = json!({"metadata": {"annotations": {APPROVE_ANNOTATION: "delete"}}});
        let explicit_no_owner =
            json!({"metadata": {"annotations": {APPROVE_ANNOTATION: "delete;expires=2026-11-26T12:00:00Z"}}});
        type Case<'a> = (&'a str, Value, Wanted<'a>, Timestamp, Result<Timestamp, Refusal>);
        let cases: Vec<Case> = vec![
            ("valid delete", obj("delete"), Wanted::Delete, in_ttl, Ok(t("2026-11-26T11:00:00Z"))),
            (
                "expired at ttl",
                obj("delete"),
                Wanted::Delete,
                after_ttl,
                Err(Refusal::Expired(t("2026-11-26T11:00:00Z"))),
            ),
            (
                "update approval does not cover delete",
                obj(&format!("update:{DIGEST}")),
                Wanted::Delete,
                in_ttl,
                Err(Refusal::NotCovered { approved: format!("update:{DIGEST}"), wanted: "delete".into() }),
            ),
            (
                "delete approval does not cover update",
                obj("delete"),
                update,
                in_ttl,
                Err(Refusal::NotCovered { approved: "delete".into(), wanted: format!("update:{DIGEST}") }),
            ),
            (
                "update of the approved change",
                obj(&format!("update:{DIGEST}")),
                update,
                in_ttl,
                Ok(t("2026-11-26T11:00:00Z")),
            ),
            (
                "a different (stale) change",
                obj(&format!("update:{DIGEST}")),
                other_update,
                in_ttl,
                Err(Refusal::NotCovered {
                    approved: format!("update:{DIGEST}"),
                    wanted: "update:fedcba9876543210".into(),
                }),
            ),
            (
                "explicit expiry shortens",
                obj("delete;expires=2026-11-26T10:10:00Z"),
                Wanted::Delete,
                in_ttl,
                Err(Refusal::Expired(t("2026-11-26T10:10:00Z"))),
            ),
            (
                "explicit expiry extends up to maxTtl",
                obj("delete;expires=2026-11-26T20:00:00Z"),
                Wanted::Delete,
                after_ttl,
                Ok(t("2026-11-26T20:00:00Z")),
            ),
            (
                "explicit expiry capped at maxTtl",
                obj("delete;expires=2026-12-30T00:00:00Z"),
                Wanted::Delete,
                t("2026-11-27T10:00:00Z"),
                Err(Refusal::Expired(t("2026-11-27T10:00:00Z"))),
            ),
            (
                "malformed",
                obj("yes please"),
                Wanted::Delete,
                in_ttl,
                Err(Refusal::Malformed(GrammarError::UnknownGrant("yes please".into()))),
            ),
            ("no owner and no expiry", no_owner, Wanted::Delete, in_ttl, Err(Refusal::NoSetTime)),
            (
                "no owner, explicit expiry",
                explicit_no_owner,
                Wanted::Delete,
                in_ttl,
                Ok(t("2026-11-26T12:00:00Z")),
            ),
            ("absent", json!({"metadata": {}}), Wanted::Delete, in_ttl, Err(Refusal::Absent)),
        ];
        for (name, object, wanted, now, want) in cases {
            let got = check(Stamp::of(&object).as_ref(), wanted, lifetime(), now);
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn new_approvals_are_bounded_by_max_ttl() {
        let now = t("2026-11-26T10:00:00Z");
        assert!(validate_new("delete", hours(24), now).is_ok());
        assert!(validate_new("delete;expires=2026-11-27T09:00:00Z", hours(24), now).is_ok());
        let late = validate_new("delete;expires=2026-11-28T00:00:00Z", hours(24), now).unwrap_err();
        assert!(late.contains("later than the policy allows"), "{late}");
        let past = validate_new("delete;expires=2026-11-26T09:00:00Z", hours(24), now).unwrap_err();
        assert!(past.contains("in the past"), "{past}");
        assert!(validate_new("update", hours(24), now).unwrap_err().contains("must name the change"));
    }
}
