//! The approval protocol: tickets agentguard issues in its denials, and whether the ticket an
//! approver stored in `agentguard.io/approve` covers a request.
//!
//! A denial that a human may approve carries a ticket; the approver writes it on the object:
//!
//! ```text
//! value   = op "." ticket [ "." approver ]     e.g.  delete.AQAAAABpL...
//! op      = "delete" | "update"
//! approver = the username of whoever wrote the value (checked when it is written); required
//!           where a policy needs several approvers (`minApprovers`), each under a key of their
//!           own ([`key_for`])
//! ticket  = base64url, no padding, of 77 bytes:
//!           version (1) | issued-at, Unix seconds (8, big-endian) | ttl, seconds (4)
//!           | digest (32) | mac (32)
//! digest  = SHA-256 of what the human reviews: for a DELETE the object's state
//!           ([`crate::engine::diff::state_digest`]) and what the delete would take with it
//!           ([`crate::engine::policy::effects::delete_digest`]), for an UPDATE the exact change
//!           ([`crate::engine::diff::Change`])
//! mac     = HMAC-SHA256(key, "agentguard.io/approve v1" | len(uid) | uid | op | issued-at | ttl
//!           | digest), under a key only agentguard holds ([`Keys`])
//! ```
//!
//! So a ticket is valid only for the object (uid), the operation and the exact state or change it
//! was issued for, and only from issued-at to issued-at + ttl (ttl is the strictest covering
//! policy's, at most its `maxTtl`, fixed when issued). Nothing written later extends or creates
//! one: the lifetime is inside the MAC, and no other field of the object is read. Forging a ticket
//! means forging HMAC-SHA256; making two changes share one needs a SHA-256 collision: both at
//! least 2^128 work. Pure functions, no I/O: the keys come in through [`crate::engine::policy::Config`].

use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use jiff::{SignedDuration, Timestamp};
use serde_json::Value;
use sha2::Sha256;

use crate::engine::api::APPROVE_ANNOTATION;

/// Longest approver name a value may carry (a username).
const APPROVER_CHARS: usize = 256;

const VERSION: u8 = 1;
const TICKET_BYTES: usize = 1 + 8 + 4 + 32 + 32;
const MAC_CONTEXT: &[u8] = b"agentguard.io/approve v1";
/// How far in the future a ticket's issue time may be: the replicas' clocks may differ by this.
pub const CLOCK_SKEW: SignedDuration = SignedDuration::from_secs(60);

/// The operation an approval is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Delete,
    Update,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Delete => "delete",
            Op::Update => "update",
        }
    }

    fn byte(self) -> u8 {
        match self {
            Op::Delete => b'D',
            Op::Update => b'U',
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A 256-bit approval key. Its bytes are never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; 32]);

impl Key {
    pub const LEN: usize = 32;

    /// A key from exactly 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(Self(bytes.try_into().ok()?))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length.
        <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC accepts a 32-byte key")
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

/// The keys agentguard issues and checks tickets with: it signs with the current key and accepts
/// tickets under it or any previous one (a rotation's grace period). Clones share one slot, so
/// [`Keys::replace`] (a reloaded Secret) reaches every holder; each use reads one consistent set.
#[derive(Clone, Default)]
pub struct Keys(Arc<arc_swap::ArcSwapOption<(Key, Vec<Key>)>>);

impl Keys {
    pub fn new(current: Key, previous: Vec<Key>) -> Self {
        Self(Arc::new(arc_swap::ArcSwapOption::from_pointee((current, previous))))
    }

    /// No key: nothing can be issued or approved.
    pub fn none() -> Self {
        Self::default()
    }

    /// A fixed, public key for offline use (`check --test`) and tests. Never for a cluster.
    pub fn fixed_for_tests() -> Self {
        Self::new(Key(*b"agentguard check --test key, 32B"), Vec::new())
    }

    pub fn is_empty(&self) -> bool {
        self.0.load().is_none()
    }

    /// Puts `other`'s keys in place of these, for every clone.
    pub fn replace(&self, other: &Keys) {
        self.0.store(other.0.load_full());
    }

    fn set(&self) -> Option<Arc<(Key, Vec<Key>)>> {
        self.0.load_full()
    }
}

impl PartialEq for Keys {
    fn eq(&self, other: &Self) -> bool {
        self.set() == other.set()
    }
}

impl Eq for Keys {}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.set() {
            None => f.write_str("Keys(none)"),
            Some(k) => write!(f, "Keys(current + {} previous)", k.1.len()),
        }
    }
}

/// Lifetime limits of the policies that require an approval (the strictest of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    /// How long a ticket issued now lives (never more than `max_ttl`).
    pub ttl: SignedDuration,
    pub max_ttl: SignedDuration,
}

/// What a ticket binds: this object, this operation, this reviewed state or change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subject<'a> {
    pub uid: &'a str,
    pub op: Op,
    pub digest: &'a [u8; 32],
}

/// An approval ticket, as issued in a denial and stored in the annotation.
#[derive(Clone, PartialEq, Eq)]
pub struct Ticket {
    pub op: Op,
    /// Unix seconds.
    pub issued: i64,
    /// Seconds.
    pub ttl: u32,
    pub digest: [u8; 32],
    mac: [u8; 32],
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ticket({} issued {} ttl {}s)", self.op, self.issued, self.ttl)
    }
}

/// Why an annotation value is not a ticket at all.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GrammarError {
    #[error("expected `delete.<ticket>` or `update.<ticket>`, with the ticket the denial printed")]
    Shape,
    #[error("`{0}` is not an approvable operation: use `delete` or `update`")]
    UnknownOperation(String),
    #[error("the ticket is not one agentguard prints (base64url of {TICKET_BYTES} bytes, version {VERSION})")]
    BadTicket,
    #[error(
        "the approver named after the ticket must be a username (1 to {APPROVER_CHARS} printable characters)"
    )]
    BadApprover,
}

/// An approval value's parts: `op.ticket`, and the approver it names, if any. The ticket is
/// base64url, which has no `.`, so the first `.` after it starts the approver's name.
fn parts(value: &str) -> (&str, Option<&str>) {
    let value = value.trim();
    let Some((op, rest)) = value.split_once('.') else { return (value, None) };
    match rest.split_once('.') {
        Some((ticket, approver)) => (&value[..op.len() + 1 + ticket.len()], Some(approver)),
        None => (value, None),
    }
}

/// Who an approval value says wrote it (`op.ticket.approver`); `None` for a value that names
/// nobody. Only the write-time check makes this true: see the module doc.
pub fn approver(value: &str) -> Result<Option<&str>, GrammarError> {
    match parts(value).1 {
        None => Ok(None),
        Some(name)
            if !name.is_empty()
                && name.chars().count() <= APPROVER_CHARS
                && !name.chars().any(char::is_control) =>
        {
            Ok(Some(name))
        }
        Some(_) => Err(GrammarError::BadApprover),
    }
}

/// Whether `key` is an approval annotation: `agentguard.io/approve`, or
/// `agentguard.io/approve.<anything>` (one per approver, where several must approve).
pub fn is_key(key: &str) -> bool {
    key.strip_prefix(APPROVE_ANNOTATION).is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// The key an approver writes their own approval under: readable, and distinct per username (a
/// digest of the whole name ends it, as annotation names allow only 63 characters of a few kinds).
pub fn key_for(username: &str) -> String {
    use sha2::Digest as _;
    let digest = Sha256::digest(username.as_bytes());
    let hex: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    let readable: String = username
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '-' })
        .take(40)
        .collect();
    let readable = readable.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if readable.is_empty() {
        format!("{APPROVE_ANNOTATION}.{hex}")
    } else {
        format!("{APPROVE_ANNOTATION}.{readable}-{hex}")
    }
}

/// The approval annotations a write from `old` to `new` sets or changes, as (key, value).
pub fn written<'a>(old: Option<&'a Value>, new: Option<&'a Value>) -> Vec<(&'a str, &'a str)> {
    let before = |key: &str| old?.get("metadata")?.get("annotations")?.get(key)?.as_str();
    new.into_iter().flat_map(annotations).filter(|(k, v)| before(k) != Some(*v)).collect()
}

/// Every approval annotation on `object`, as (key, value), in key order.
pub fn annotations(object: &Value) -> impl Iterator<Item = (&str, &str)> {
    object
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(|a| a.iter())
        .filter(|(k, _)| is_key(k))
        .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
}

fn mac_input(mac: &mut Hmac<Sha256>, uid: &str, op: Op, issued: i64, ttl: u32, digest: &[u8; 32]) {
    mac.update(MAC_CONTEXT);
    mac.update(&(uid.len() as u64).to_be_bytes());
    mac.update(uid.as_bytes());
    mac.update(&[op.byte()]);
    mac.update(&issued.to_be_bytes());
    mac.update(&ttl.to_be_bytes());
    mac.update(digest);
}

impl Ticket {
    /// Issues a ticket for `subject` at `now`, living `ttl` (whole seconds; at least one).
    /// `None` without a key.
    pub fn issue(keys: &Keys, subject: &Subject<'_>, now: Timestamp, ttl: SignedDuration) -> Option<Self> {
        let set = keys.set()?;
        let key = &set.0;
        let issued = now.as_second();
        let ttl = u32::try_from(ttl.as_secs().max(1)).unwrap_or(u32::MAX);
        let mut mac = key.mac();
        mac_input(&mut mac, subject.uid, subject.op, issued, ttl, subject.digest);
        Some(Self {
            op: subject.op,
            issued,
            ttl,
            digest: *subject.digest,
            mac: mac.finalize().into_bytes().into(),
        })
    }

    /// Parses an annotation value (an approver it names is not part of the ticket: see
    /// [`approver`]).
    pub fn parse(value: &str) -> Result<Self, GrammarError> {
        approver(value)?;
        let (op, ticket) = parts(value).0.split_once('.').ok_or(GrammarError::Shape)?;
        let op = match op {
            "delete" => Op::Delete,
            "update" => Op::Update,
            other => return Err(GrammarError::UnknownOperation(other.into())),
        };
        let bytes = URL_SAFE_NO_PAD.decode(ticket).map_err(|_| GrammarError::BadTicket)?;
        if bytes.len() != TICKET_BYTES || bytes[0] != VERSION {
            return Err(GrammarError::BadTicket);
        }
        let issued = i64::from_be_bytes(bytes[1..9].try_into().expect("8 bytes"));
        let ttl = u32::from_be_bytes(bytes[9..13].try_into().expect("4 bytes"));
        let digest = bytes[13..45].try_into().expect("32 bytes");
        let mac = bytes[45..77].try_into().expect("32 bytes");
        Ok(Self { op, issued, ttl, digest, mac })
    }

    /// The annotation value: `delete.<ticket>` or `update.<ticket>`.
    pub fn value(&self) -> String {
        let mut bytes = Vec::with_capacity(TICKET_BYTES);
        bytes.push(VERSION);
        bytes.extend_from_slice(&self.issued.to_be_bytes());
        bytes.extend_from_slice(&self.ttl.to_be_bytes());
        bytes.extend_from_slice(&self.digest);
        bytes.extend_from_slice(&self.mac);
        format!("{}.{}", self.op, URL_SAFE_NO_PAD.encode(bytes))
    }

    /// The annotation value naming its writer: `delete.<ticket>.<approver>`.
    pub fn named_value(&self, approver: &str) -> String {
        format!("{}.{approver}", self.value())
    }

    pub fn issued_at(&self) -> Timestamp {
        Timestamp::from_second(self.issued).unwrap_or(Timestamp::MAX)
    }

    /// When the ticket expires, capped by `max_ttl` (a policy may have been tightened since).
    pub fn expires(&self, max_ttl: SignedDuration) -> Timestamp {
        let ttl = SignedDuration::from_secs(i64::from(self.ttl)).min(max_ttl);
        self.issued_at().checked_add(ttl).unwrap_or(Timestamp::MAX)
    }

    /// Whether agentguard issued this ticket for the object `uid` (its operation, digest and
    /// lifetime as carried). Constant-time in the MAC.
    pub fn authentic(&self, keys: &Keys, uid: &str) -> bool {
        let Some(set) = keys.set() else { return false };
        std::iter::once(&set.0).chain(set.1.iter()).any(|key| {
            let mut mac = key.mac();
            mac_input(&mut mac, uid, self.op, self.issued, self.ttl, &self.digest);
            mac.verify_slice(&self.mac).is_ok()
        })
    }

    /// A short name for messages: the first MAC bytes, in hex.
    pub fn id(&self) -> String {
        self.mac[..6].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Why a stored approval does not cover a request, or an approval cannot be written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no approval is present")]
    Absent,
    #[error("the approval on the object is malformed: {0}")]
    Malformed(GrammarError),
    #[error("agentguard has no approval key loaded, so it can neither issue nor check tickets")]
    NoKey,
    #[error("the approval's ticket was not issued by agentguard for this object")]
    Foreign,
    #[error("the approval is for {approved}, not {wanted}")]
    WrongOperation { approved: Op, wanted: Op },
    #[error(
        "the object, or what its delete would take with it, changed after the delete was reviewed, so the approval no longer applies"
    )]
    StaleState,
    #[error("the approval is for a different change than this one")]
    OtherChange,
    #[error("the approval's ticket claims to be issued at {0}, in the future")]
    IssuedInFuture(Timestamp),
    #[error("the approval expired at {0}")]
    Expired(Timestamp),
    #[error("{}", too_few(*.need, .have))]
    TooFew { need: usize, have: Vec<String> },
}

fn too_few(need: usize, have: &[String]) -> String {
    let missing = need.saturating_sub(have.len());
    let so_far = if have.is_empty() { "none yet".to_owned() } else { format!("so far {}", have.join(", ")) };
    format!(
        "{need} distinct approvers must approve ({so_far}): {missing} more needed, each writing an approval that names them"
    )
}

/// The approval annotation's value on `object`, if it carries one.
pub fn annotation(object: &Value) -> Option<&str> {
    object.get("metadata")?.get("annotations")?.get(APPROVE_ANNOTATION)?.as_str()
}

/// Decides whether the stored approval `value` covers `subject` at `now`; on success returns
/// when it expires. `max_ttl` is the strictest covering policy's, as it is now.
pub fn check(
    value: Option<&str>,
    keys: &Keys,
    subject: &Subject<'_>,
    max_ttl: SignedDuration,
    now: Timestamp,
) -> Result<Timestamp, Refusal> {
    let value = value.ok_or(Refusal::Absent)?;
    let ticket = Ticket::parse(value).map_err(Refusal::Malformed)?;
    if keys.is_empty() {
        return Err(Refusal::NoKey);
    }
    if !ticket.authentic(keys, subject.uid) {
        return Err(Refusal::Foreign);
    }
    if ticket.op != subject.op {
        return Err(Refusal::WrongOperation { approved: ticket.op, wanted: subject.op });
    }
    let expires = live(&ticket, max_ttl, now)?;
    if &ticket.digest != subject.digest {
        return Err(match subject.op {
            Op::Delete => Refusal::StaleState,
            Op::Update => Refusal::OtherChange,
        });
    }
    Ok(expires)
}

/// What the approvals stored on an object amount to for one request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tally {
    /// The values that cover the request, in key order.
    pub values: Vec<String>,
    /// The distinct approvers those values name, in key order.
    pub approvers: Vec<String>,
    /// Whether a covering value names nobody: it counts only where one approval suffices.
    pub unnamed: bool,
    /// When the first counted approval expires.
    pub expires: Option<Timestamp>,
    /// Why the first value that does not cover the request does not.
    pub refusal: Option<Refusal>,
}

impl Tally {
    /// Judges every stored approval value against `subject` ([`check`] each). A value naming
    /// `requester` (the agent asking) never counts: nobody approves their own request.
    pub fn of<'a>(
        stored: impl IntoIterator<Item = &'a str>,
        keys: &Keys,
        subject: &Subject<'_>,
        max_ttl: SignedDuration,
        now: Timestamp,
        requester: &str,
    ) -> Self {
        let mut tally = Self::default();
        for value in stored {
            let expires = match check(Some(value), keys, subject, max_ttl, now) {
                Ok(expires) => expires,
                Err(refusal) => {
                    tally.refusal.get_or_insert(refusal);
                    continue;
                }
            };
            match approver(value) {
                Ok(Some(name)) if name == requester => continue,
                Ok(Some(name)) => {
                    if !tally.approvers.iter().any(|a| a == name) {
                        tally.approvers.push(name.to_owned());
                    }
                }
                Ok(None) => tally.unnamed = true,
                Err(_) => continue,
            }
            tally.values.push(value.to_owned());
            tally.expires = Some(tally.expires.map_or(expires, |e| e.min(expires)));
        }
        tally
    }

    /// Whether `need` distinct approvers approved: one approval of any kind suffices for one;
    /// more must each name a different approver.
    pub fn covers(&self, need: usize) -> bool {
        if need <= 1 { !self.values.is_empty() } else { self.approvers.len() >= need }
    }

    /// Why the stored approvals do not cover a request that needs `need` approvers.
    pub fn refusal(&self, need: usize) -> Refusal {
        if need > 1 && (!self.approvers.is_empty() || self.unnamed) {
            return Refusal::TooFew { need, have: self.approvers.clone() };
        }
        match &self.refusal {
            Some(refusal) => refusal.clone(),
            None if need > 1 => Refusal::TooFew { need, have: Vec::new() },
            None => Refusal::Absent,
        }
    }
}

fn live(ticket: &Ticket, max_ttl: SignedDuration, now: Timestamp) -> Result<Timestamp, Refusal> {
    let issued = ticket.issued_at();
    if now.checked_add(CLOCK_SKEW).is_ok_and(|latest| issued > latest) {
        return Err(Refusal::IssuedInFuture(issued));
    }
    let expires = ticket.expires(max_ttl);
    if now >= expires {
        return Err(Refusal::Expired(expires));
    }
    Ok(expires)
}

/// Checks an approval a human is writing now on the object `uid`: a ticket agentguard issued
/// for this object, still live, and (for a delete) for the state the object is in.
/// `state` is the [`crate::engine::diff::state_digest`] of the object as it will be stored.
pub fn check_new(
    value: &str,
    keys: &Keys,
    uid: &str,
    state: &[u8; 32],
    max_ttl: SignedDuration,
    now: Timestamp,
) -> Result<Ticket, Refusal> {
    let ticket = Ticket::parse(value).map_err(Refusal::Malformed)?;
    if keys.is_empty() {
        return Err(Refusal::NoKey);
    }
    if !ticket.authentic(keys, uid) {
        return Err(Refusal::Foreign);
    }
    live(&ticket, max_ttl, now)?;
    if ticket.op == Op::Delete && &ticket.digest != state {
        return Err(Refusal::StaleState);
    }
    Ok(ticket)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6f0c2a4e-1d2b-4f4e-9a53-0d7c1f7b2a10";

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn mins(m: i64) -> SignedDuration {
        SignedDuration::from_mins(m)
    }

    fn keys() -> Keys {
        Keys::fixed_for_tests()
    }

    fn other_keys() -> Keys {
        Keys::new(Key::from_bytes(&[7; 32]).unwrap(), Vec::new())
    }

    const NOW: &str = "2026-11-26T10:00:00Z";

    fn issue(op: Op, digest: &[u8; 32]) -> Ticket {
        Ticket::issue(&keys(), &Subject { uid: UID, op, digest }, t(NOW), mins(60)).unwrap()
    }

    #[test]
    fn a_ticket_round_trips_and_covers_what_it_was_issued_for() {
        let digest = [1; 32];
        let ticket = issue(Op::Delete, &digest);
        let value = ticket.value();
        assert!(value.starts_with("delete.") && value.len() == "delete.".len() + 103, "{value}");
        assert_eq!(Ticket::parse(&value).unwrap(), ticket);
        let subject = Subject { uid: UID, op: Op::Delete, digest: &digest };
        let expires = check(Some(&value), &keys(), &subject, mins(120), t("2026-11-26T10:30:00Z"));
        assert_eq!(expires, Ok(t("2026-11-26T11:00:00Z")));
        // The policy's maxTtl, tightened since, caps it.
        let capped = check(Some(&value), &keys(), &subject, mins(10), t("2026-11-26T10:30:00Z"));
        assert_eq!(capped, Err(Refusal::Expired(t("2026-11-26T10:10:00Z"))));
    }

    #[test]
    fn refusals() {
        let digest = [1; 32];
        let value = issue(Op::Delete, &digest).value();
        let update = issue(Op::Update, &digest).value();
        let at = t("2026-11-26T10:30:00Z");
        let delete = Subject { uid: UID, op: Op::Delete, digest: &digest };
        type Case<'a> = (&'a str, Option<&'a str>, Keys, Subject<'a>, Timestamp, Refusal);
        let cases: Vec<Case> = vec![
            ("absent", None, keys(), delete, at, Refusal::Absent),
            ("old format", Some("delete"), keys(), delete, at, Refusal::Malformed(GrammarError::Shape)),
            (
                "unknown operation",
                Some("destroy.AAAA"),
                keys(),
                delete,
                at,
                Refusal::Malformed(GrammarError::UnknownOperation("destroy".into())),
            ),
            (
                "truncated",
                Some(&value[..40]),
                keys(),
                delete,
                at,
                Refusal::Malformed(GrammarError::BadTicket),
            ),
            ("other key", Some(&value), other_keys(), delete, at, Refusal::Foreign),
            ("no key", Some(&value), Keys::none(), delete, at, Refusal::NoKey),
            ("other object", Some(&value), keys(), Subject { uid: "other", ..delete }, at, Refusal::Foreign),
            (
                "other operation",
                Some(&update),
                keys(),
                delete,
                at,
                Refusal::WrongOperation { approved: Op::Update, wanted: Op::Delete },
            ),
            ("stale", Some(&value), keys(), Subject { digest: &[2; 32], ..delete }, at, Refusal::StaleState),
            (
                "other change",
                Some(&update),
                keys(),
                Subject { op: Op::Update, digest: &[2; 32], ..delete },
                at,
                Refusal::OtherChange,
            ),
            (
                "expired",
                Some(&value),
                keys(),
                delete,
                t("2026-11-26T11:00:00Z"),
                Refusal::Expired(t("2026-11-26T11:00:00Z")),
            ),
            (
                "issued in the future",
                Some(&value),
                keys(),
                delete,
                t("2026-11-26T09:58:59Z"),
                Refusal::IssuedInFuture(t(NOW)),
            ),
        ];
        for (name, value, keys, subject, now, want) in cases {
            assert_eq!(check(value, &keys, &subject, mins(120), now), Err(want), "{name}");
        }
        // Within the clock skew, a ticket from a replica whose clock runs ahead is fine.
        assert!(check(Some(&value), &keys(), &delete, mins(120), t("2026-11-26T09:59:30Z")).is_ok());
    }

    #[test]
    fn a_rotated_key_is_accepted_during_its_grace_period() {
        let digest = [1; 32];
        let value = issue(Op::Delete, &digest).value();
        let rotated =
            Keys::new(Key::from_bytes(&[9; 32]).unwrap(), vec![Key(*b"agentguard check --test key, 32B")]);
        let subject = Subject { uid: UID, op: Op::Delete, digest: &digest };
        assert!(check(Some(&value), &rotated, &subject, mins(120), t(NOW)).is_ok());
        let dropped = Keys::new(Key::from_bytes(&[9; 32]).unwrap(), Vec::new());
        assert_eq!(check(Some(&value), &dropped, &subject, mins(120), t(NOW)), Err(Refusal::Foreign));
        assert!(format!("{rotated:?}").contains("1 previous") && !format!("{rotated:?}").contains("57"));
    }

    #[test]
    fn new_approvals_must_be_issued_for_this_object_and_state() {
        let state = [1; 32];
        let value = issue(Op::Delete, &state).value();
        let now = t("2026-11-26T10:05:00Z");
        assert!(check_new(&value, &keys(), UID, &state, mins(60), now).is_ok());
        assert_eq!(check_new(&value, &keys(), "other", &state, mins(60), now), Err(Refusal::Foreign));
        assert_eq!(check_new(&value, &keys(), UID, &[2; 32], mins(60), now), Err(Refusal::StaleState));
        assert!(matches!(
            check_new(&value, &keys(), UID, &state, mins(60), t("2026-11-26T12:00:00Z")),
            Err(Refusal::Expired(_))
        ));
        assert_eq!(
            check_new("delete", &keys(), UID, &state, mins(60), now),
            Err(Refusal::Malformed(GrammarError::Shape))
        );
        // An update ticket is bound to its change, which is not known yet: only its origin is checked.
        let update = issue(Op::Update, &[3; 32]).value();
        assert!(check_new(&update, &keys(), UID, &state, mins(60), now).is_ok());
    }

    #[test]
    fn approvals_may_name_their_approver_under_keys_of_their_own() {
        let ticket = issue(Op::Delete, &[1; 32]);
        let named = ticket.named_value("alice@example.com");
        assert_eq!(Ticket::parse(&named), Ok(ticket.clone()));
        assert_eq!(approver(&named), Ok(Some("alice@example.com")));
        assert_eq!(approver(&ticket.value()), Ok(None));
        assert_eq!(approver(&format!("{}.", ticket.value())), Err(GrammarError::BadApprover));
        assert_eq!(Ticket::parse(&format!("{}.a\nb", ticket.value())), Err(GrammarError::BadApprover));
        // A name with dots keeps them all.
        assert_eq!(approver(&ticket.named_value("a.b.c")), Ok(Some("a.b.c")));
        let subject = Subject { uid: UID, op: Op::Delete, digest: &[1; 32] };
        assert!(check(Some(&named), &keys(), &subject, mins(60), t(NOW)).is_ok());

        assert!(is_key(APPROVE_ANNOTATION) && is_key("agentguard.io/approve.alice-1"));
        assert!(
            !is_key("agentguard.io/approver") && !is_key("agentguard.io/approvex.y") && !is_key("x/approve")
        );
        // Keys are valid annotation names, readable, and distinct per username.
        let name_ok = |key: &str| {
            let name = key.strip_prefix("agentguard.io/").unwrap();
            name.len() <= 63
                && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && name.chars().next().unwrap().is_ascii_alphanumeric()
                && name.chars().last().unwrap().is_ascii_alphanumeric()
        };
        let long = "x".repeat(300);
        for user in
            ["alice", "alice@example.com", "system:serviceaccount:ops:oncall", "日本", "-", long.as_str()]
        {
            let key = key_for(user);
            assert!(is_key(&key) && name_ok(&key), "{user}: {key}");
        }
        assert!(key_for("alice@example.com").starts_with("agentguard.io/approve.alice-example.com-"));
        assert_ne!(key_for("alice@x.com"), key_for("alice-x.com"));
    }

    #[test]
    fn a_tally_counts_distinct_approvers_never_the_requester() {
        let digest = [1; 32];
        let ticket = issue(Op::Delete, &digest);
        let subject = Subject { uid: UID, op: Op::Delete, digest: &digest };
        let tally = |values: &[String]| {
            Tally::of(values.iter().map(String::as_str), &keys(), &subject, mins(60), t(NOW), "agent")
        };
        let alice = ticket.named_value("alice");
        let bob = ticket.named_value("bob");
        let other = issue(Op::Delete, &[2; 32]).named_value("carol");
        let both = tally(&[alice.clone(), alice.clone(), bob.clone(), other, ticket.named_value("agent")]);
        assert_eq!(both.approvers, ["alice", "bob"]);
        assert!(both.covers(2) && !both.covers(3));
        assert_eq!(both.refusal(3), Refusal::TooFew { need: 3, have: vec!["alice".into(), "bob".into()] });
        assert!(both.refusal(3).to_string().contains("(so far alice, bob): 1 more needed"));
        let unnamed = tally(&[ticket.value()]);
        assert!(unnamed.covers(1) && !unnamed.covers(2));
        assert_eq!(tally(&[]).refusal(1), Refusal::Absent);
        assert_eq!(
            tally(&[issue(Op::Update, &digest).value()]).refusal(1),
            Refusal::WrongOperation { approved: Op::Update, wanted: Op::Delete }
        );
    }

    /// A small deterministic generator, so property tests need no extra crates and always replay.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn bytes<const N: usize>(&mut self) -> [u8; N] {
            std::array::from_fn(|_| self.next() as u8)
        }
    }

    #[test]
    fn property_any_tampering_is_refused() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..2000 {
            let digest: [u8; 32] = rng.bytes();
            let op = if rng.below(2) == 0 { Op::Delete } else { Op::Update };
            let uid = format!("uid-{}", rng.next());
            let issued = t(NOW).checked_add(SignedDuration::from_secs(rng.below(86_400) as i64)).unwrap();
            let ttl = SignedDuration::from_secs(60 + rng.below(7200) as i64);
            let subject = Subject { uid: &uid, op, digest: &digest };
            let ticket = Ticket::issue(&keys(), &subject, issued, ttl).unwrap();
            let value = ticket.value();
            let during = issued.checked_add(SignedDuration::from_secs(rng.below(60) as i64)).unwrap();
            assert!(check(Some(&value), &keys(), &subject, mins(24 * 60), during).is_ok());

            // Flip one bit anywhere in the ticket's bytes: never accepted.
            let mut bytes = URL_SAFE_NO_PAD.decode(value.split_once('.').unwrap().1).unwrap();
            let bit = rng.below((bytes.len() * 8) as u64) as usize;
            bytes[bit / 8] ^= 1 << (bit % 8);
            let tampered = format!("{op}.{}", URL_SAFE_NO_PAD.encode(&bytes));
            assert!(check(Some(&tampered), &keys(), &subject, mins(24 * 60), during).is_err(), "bit {bit}");

            // Relabel the operation: never accepted.
            let other_op = if op == Op::Delete { Op::Update } else { Op::Delete };
            let relabelled = format!("{other_op}.{}", value.split_once('.').unwrap().1);
            let as_other = Subject { op: other_op, ..subject };
            assert_eq!(
                check(Some(&relabelled), &keys(), &as_other, mins(24 * 60), during),
                Err(Refusal::Foreign)
            );

            // Another object, another state or change: never accepted.
            let other_uid = format!("{uid}x");
            assert_eq!(
                check(Some(&value), &keys(), &Subject { uid: &other_uid, ..subject }, mins(24 * 60), during),
                Err(Refusal::Foreign)
            );
            let mut other_digest = digest;
            other_digest[rng.below(32) as usize] ^= 1 + rng.below(255) as u8;
            assert!(
                check(
                    Some(&value),
                    &keys(),
                    &Subject { digest: &other_digest, ..subject },
                    mins(24 * 60),
                    during
                )
                .is_err()
            );

            // Expired, or issued beyond the clock skew in the future: never accepted.
            let after = ticket
                .expires(mins(24 * 60))
                .checked_add(SignedDuration::from_secs(rng.below(1000) as i64))
                .unwrap();
            assert!(matches!(
                check(Some(&value), &keys(), &subject, mins(24 * 60), after),
                Err(Refusal::Expired(_))
            ));
            let before = issued
                .checked_sub(CLOCK_SKEW)
                .unwrap()
                .checked_sub(SignedDuration::from_secs(1 + rng.below(1000) as i64))
                .unwrap();
            assert!(matches!(
                check(Some(&value), &keys(), &subject, mins(24 * 60), before),
                Err(Refusal::IssuedInFuture(_))
            ));
        }
    }

    #[test]
    fn property_parse_never_panics_on_garbage() {
        let mut rng = Rng(42);
        for _ in 0..5000 {
            let len = rng.below(140) as usize;
            let text: String = (0..len).map(|_| char::from(b' ' + rng.below(95) as u8)).collect();
            let _ = Ticket::parse(&text);
            let _ = Ticket::parse(&format!("delete.{text}"));
            let bytes: Vec<u8> = (0..rng.below(120)).map(|_| rng.next() as u8).collect();
            let _ = Ticket::parse(&format!("update.{}", URL_SAFE_NO_PAD.encode(bytes)));
        }
    }
}
