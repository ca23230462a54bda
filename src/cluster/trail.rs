//! The audit trail: an `AgentChange` record for every admitted agent DELETE or UPDATE of a guarded
//! object, written into agentguard's namespace *before* the change is admitted (no record, no
//! change), holding the object as it was, so `agentguard restore` can bring it back.
//!
//! Writing first means a record can describe a change that never happened: a later admission
//! step (another webhook, a quota, a conflict) may still refuse it. [`keep_checked`] looks at
//! each new record a few seconds later and marks it `Happened` or `NeverHappened` (or
//! `Unverified` where agentguard may not read the object, e.g. Secrets), fills in who set the
//! approval (from the `ApprovalRecorded` Event agentguard wrote once the approval was stored,
//! matched by its ticket), and deletes records past the retention period or beyond the count
//! limit, oldest first.
//!
//! A record is written only when the prior object the request carries is the live object: same
//! uid and resourceVersion, read back (metadata only) from the API server. A request that did not
//! come from the API server cannot invent a record for an object that does not exist or is not
//! in that state.

use std::time::Duration;

use anyhow::{Context, Result};
use jiff::Timestamp;
use k8s_openapi::api::events::v1::Event;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams, PostParams,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::engine::admission::AdmissionRequest;
use crate::engine::api::{AgentChange, AgentChangeSpec, AgentChangeStatus, ChangeTarget};
use crate::engine::diff::Change;
use crate::engine::policy::{Allowed, Decision, Verdict};

/// Label on every record: `pending` until checked, then `happened` or `never-happened`.
pub const OUTCOME_LABEL: &str = "agentguard.io/outcome";

/// What the trail keeps.
#[derive(Clone, Debug)]
pub struct Settings {
    /// agentguard's own namespace, where records live.
    pub namespace: String,
    /// Largest prior object kept, in bytes of JSON; a larger one is recorded without it.
    pub max_object_bytes: usize,
    /// Keep Secret `data`/`stringData` in records (off: the trail must not become a copy of
    /// every Secret an agent touched).
    pub keep_secret_data: bool,
    /// Records older than this are deleted.
    pub retention: Duration,
    /// At most this many records are kept; the oldest go first.
    pub max_records: usize,
}

/// The record for an admitted request, or None when it needs none: only an agent's real
/// (not dry-run) DELETE or UPDATE admitted by an enforced policy is recorded.
pub fn record_for(
    request: &AdmissionRequest,
    decision: &Decision,
    settings: &Settings,
    now: Timestamp,
) -> Option<AgentChange> {
    let mut session = None;
    let (policy, admission, approvals) = match &decision.verdict {
        Verdict::Allow(Allowed::Approved { policy, rule, approvals, .. }) => {
            (format!("{policy}, rule {rule:?}"), "approved", approvals.clone())
        }
        Verdict::Allow(Allowed::BySession { policy, rule, grants }) => {
            // The session whose use is spent is set once it is (see `request::actions`).
            session = grants.first().map(ToString::to_string);
            (format!("{policy}, rule {rule:?}"), "session", Vec::new())
        }
        Verdict::Allow(Allowed::ByPolicy { policy, rule }) => {
            (format!("{policy}, rule {rule:?}"), "allowed", Vec::new())
        }
        _ => return None,
    };
    if request.dry_run() || !matches!(request.operation.as_str(), "DELETE" | "UPDATE") {
        return None;
    }
    let facts = request.facts();
    let old = request.old_object.as_ref();
    let change = match (request.operation.as_str(), old, request.object.as_ref()) {
        ("UPDATE", Some(old), Some(new)) => Some(Change::between(old, new).to_string()),
        _ => None,
    };
    let (prior, prior_omitted) = match old {
        None => (None, Some("the API server sent no prior object".to_owned())),
        Some(old) => prior(old, &request.kind.kind, &request.kind.group, settings),
    };
    let meta =
        |field: &str| old.and_then(|o| o.pointer(&format!("/metadata/{field}"))).and_then(Value::as_str);
    let group = &request.resource.group;
    let target = ChangeTarget {
        api_version: match group.as_str() {
            "" => request.resource.version.clone(),
            g => format!("{g}/{}", request.resource.version),
        },
        kind: request.kind.kind.clone(),
        resource: request.resource.resource.clone(),
        group: group.clone(),
        subresource: facts.subresource.to_owned(),
        // The API server names a Namespace's own namespace in its requests (through any
        // subresource too); the object is cluster-scoped all the same.
        namespace: if group.is_empty() && request.resource.resource == "namespaces" {
            String::new()
        } else {
            request.namespace.clone().unwrap_or_default()
        },
        name: facts.name.to_owned(),
        uid: meta("uid").unwrap_or_default().to_owned(),
        resource_version: meta("resourceVersion").unwrap_or_default().to_owned(),
    };
    let spec = AgentChangeSpec {
        requester: request.user_info.username.clone(),
        operation: request.operation.clone(),
        target,
        policy,
        admission: admission.to_owned(),
        approval: approvals.first().cloned(),
        approvals: if approvals.len() > 1 { approvals } else { Vec::new() },
        session,
        change,
        time: now.to_string(),
        prior,
        prior_omitted,
        attribution: request.user_info.attribution(),
    };
    // A deletecollection reviews every item under one request uid: the target is part of the name.
    let key =
        format!("{}\n{}\n{}\n{}", request.uid, spec.target.namespace, spec.target.name, spec.target.uid);
    let digest: String = Sha256::digest(key.as_bytes()).iter().take(8).map(|b| format!("{b:02x}")).collect();
    let mut record = AgentChange::new(&format!("{}-{digest}", request.operation.to_lowercase()), spec);
    record.metadata.namespace = Some(settings.namespace.clone());
    record.metadata.labels = Some(
        [
            ("app.kubernetes.io/managed-by".to_owned(), "agentguard".to_owned()),
            (OUTCOME_LABEL.to_owned(), "pending".to_owned()),
        ]
        .into(),
    );
    Some(record)
}

/// The prior object as recorded: bookkeeping stripped, Secret data dropped unless kept, and
/// nothing at all when it is over the size limit.
fn prior(old: &Value, kind: &str, group: &str, settings: &Settings) -> (Option<Value>, Option<String>) {
    let mut object = old.clone();
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
    let mut omitted = None;
    if group.is_empty()
        && kind == "Secret"
        && !settings.keep_secret_data
        && let Some(o) = object.as_object_mut()
        && (o.remove("data").is_some() | o.remove("stringData").is_some())
    {
        omitted = Some("Secret data is not recorded".to_owned());
    }
    let size = serde_json::to_vec(&object).map(|b| b.len()).unwrap_or(usize::MAX);
    if size > settings.max_object_bytes {
        return (
            None,
            Some(format!("the object is {size} bytes, over the {}-byte limit", settings.max_object_bytes)),
        );
    }
    (Some(object), omitted)
}

/// Writes records.
pub struct Trail {
    api: Api<AgentChange>,
    client: kube::Client,
    pub settings: Settings,
}

/// The API for the record's target, as a dynamic resource.
fn target_api(client: &kube::Client, target: &ChangeTarget) -> Api<DynamicObject> {
    let (group, version) = match target.api_version.split_once('/') {
        Some((g, v)) => (g.to_owned(), v.to_owned()),
        None => (String::new(), target.api_version.clone()),
    };
    let resource = ApiResource {
        group,
        version,
        api_version: target.api_version.clone(),
        kind: target.kind.clone(),
        plural: target.resource.clone(),
    };
    if target.namespace.is_empty() {
        Api::all_with(client.clone(), &resource)
    } else {
        Api::namespaced_with(client.clone(), &target.namespace, &resource)
    }
}

/// Whether the live object is the request's prior object: same uid, same resourceVersion and
/// the same content (its [`crate::engine::diff::state_digest`]).
pub fn matches_live(
    target: &ChangeTarget,
    prior: Option<&Value>,
    live: Option<&Value>,
) -> Result<(), String> {
    let Some(live) = live else {
        return Err(format!("{} {:?} does not exist", target.kind, target.name));
    };
    let meta =
        |v: &Value, f: &str| v.pointer(&format!("/metadata/{f}")).and_then(Value::as_str).map(str::to_owned);
    if target.uid.is_empty() || meta(live, "uid").as_deref() != Some(target.uid.as_str()) {
        return Err(format!("the live {} {:?} is another object (uid)", target.kind, target.name));
    }
    if meta(live, "resourceVersion").as_deref() != Some(target.resource_version.as_str()) {
        return Err(format!(
            "the live {} {:?} is at resourceVersion {}, not {}",
            target.kind,
            target.name,
            meta(live, "resourceVersion").as_deref().unwrap_or("?"),
            target.resource_version
        ));
    }
    // A subresource's object (a Scale) is not the stored object: uid and resourceVersion suffice.
    if target.subresource.is_empty()
        && prior.map(crate::engine::diff::state_digest) != Some(crate::engine::diff::state_digest(live))
    {
        return Err(format!("the live {} {:?} has other contents", target.kind, target.name));
    }
    Ok(())
}

impl Trail {
    pub fn new(client: kube::Client, settings: Settings) -> Self {
        Self { api: Api::namespaced(client.clone(), &settings.namespace), client, settings }
    }

    /// Checks the request's prior object against the live object: uid, resourceVersion and
    /// contents. Where agentguard may not read the kind (e.g. Secrets), the record is kept but
    /// marked unverified, which `restore` refuses to replay.
    pub async fn verify(&self, record: &mut AgentChange, prior: Option<&Value>) -> Result<()> {
        let target = &record.spec.target;
        let live = match target_api(&self.client, target).get_opt(&target.name).await {
            Ok(live) => live,
            Err(kube::Error::Api(e)) if e.code == 403 => {
                let why = format!(
                    "agentguard may not read {}, so the prior object was not checked against the live object",
                    target.resource
                );
                record.spec.prior_omitted = Some(match record.spec.prior_omitted.take() {
                    Some(before) => format!("{before}; {why}"),
                    None => why,
                });
                return Ok(());
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("reading {} {:?} to check the request against it", target.kind, target.name)
                });
            }
        };
        let live = live.map(serde_json::to_value).transpose().context("the live object as JSON")?;
        matches_live(target, prior, live.as_ref())
            .map_err(|why| anyhow::anyhow!("the request's prior object is not the live object ({why})"))
    }

    pub async fn write(&self, record: &AgentChange) -> Result<()> {
        match self.api.create(&PostParams::default(), record).await {
            Ok(_) => Ok(()),
            // The API server retried the same admission (same uid): already recorded.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e).context("writing the AgentChange record"),
        }
    }
}

/// What a check of the target says about a recorded change.
pub fn outcome(spec: &AgentChangeSpec, current: Option<&ObjectMeta>) -> (&'static str, String) {
    let same_object =
        current.filter(|m| spec.target.uid.is_empty() || m.uid.as_deref() == Some(spec.target.uid.as_str()));
    match (spec.operation.as_str(), same_object) {
        ("DELETE", None) => ("Happened", "the object is gone".into()),
        ("DELETE", Some(m)) if m.deletion_timestamp.is_some() => {
            ("Happened", "the object is being deleted (finalizers pending)".into())
        }
        ("DELETE", Some(_)) => {
            ("NeverHappened", "the object still exists: a later admission step refused the delete".into())
        }
        (_, None) => ("Happened", "the object changed and has since been deleted".into()),
        (_, Some(m)) if m.resource_version.as_deref() == Some(spec.target.resource_version.as_str()) => {
            ("NeverHappened", "the object is unchanged: a later admission step refused the update".into())
        }
        (_, Some(_)) => ("Happened", "the object changed after the record was written".into()),
    }
}

/// The approver named by agentguard's `ApprovalRecorded` Event for exactly this approval (its
/// ticket is unique), which agentguard writes only once the approval is stored on the object.
pub fn approver(events: &[Event], approval: &str) -> Option<String> {
    let wanted = format!(" approved {approval:?}");
    events
        .iter()
        .filter(|e| {
            e.reason.as_deref() == Some("ApprovalRecorded")
                && e.reporting_controller.as_deref() == Some("agentguard")
        })
        .find_map(|e| Some(e.note.as_deref()?.strip_suffix(&wanted)?.to_owned()))
}

/// Records past `retention`, and beyond `max_records` counting from the newest: the ones to delete.
pub fn expired(
    records: &[ObjectMeta],
    now: Timestamp,
    retention: Duration,
    max_records: usize,
) -> Vec<String> {
    let cutoff = now - jiff::SignedDuration::try_from(retention).unwrap_or(jiff::SignedDuration::MAX);
    let mut by_age: Vec<(Timestamp, &str)> =
        records.iter().filter_map(|m| Some((m.creation_timestamp.as_ref()?.0, m.name.as_deref()?))).collect();
    by_age.sort_by_key(|(t, _)| std::cmp::Reverse(*t));
    by_age
        .iter()
        .enumerate()
        .filter(|(i, (t, _))| *i >= max_records || *t < cutoff)
        .map(|(_, (_, name))| (*name).to_owned())
        .collect()
}

/// How often retention is applied: it lists every record's metadata, so not on every pass.
const RETENTION_EVERY: Duration = Duration::from_secs(300);

/// Checks new records every `every` and applies retention every few minutes, on every replica
/// (the writes are idempotent, so replicas need no coordination). A record is checked once it
/// is `settle` old, so the change it describes has had time to land. Checking and retention run
/// side by side: after a flood, a replica's first check of thousands of records took minutes,
/// and retention must not wait for it.
pub async fn keep_checked(client: kube::Client, settings: Settings, every: Duration, settle: Duration) {
    let api: Api<AgentChange> = Api::namespaced(client.clone(), &settings.namespace);
    let checking = async {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = check_pass(&client, &api, settle).await {
                tracing::warn!(error = format!("{e:#}"), "cannot check the audit trail");
            }
        }
    };
    let retaining = async {
        loop {
            // A pass that failed is tried again at the next check's pace, not in five minutes.
            let wait = match retain(&client, &api, &settings).await {
                Ok(()) => RETENTION_EVERY,
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "cannot apply the audit trail's retention");
                    every
                }
            };
            tokio::time::sleep(wait).await;
        }
    };
    tokio::join!(checking, retaining);
}

/// Records listed per page by the retention pass.
const RETENTION_PAGE: u32 = 100;
/// Expired records the retention pass deletes at once.
const RETENTION_DELETES: usize = 8;

/// A page of records as retention reads it: names and ages, nothing else. The metadata list
/// the API server sends also carries each record's managedFields (about 1.5 KB a record);
/// decoded into `ObjectMeta` they became trees of values many times the page's size, a burst
/// the allocator kept and the soak saw as memory growing with the number of records.
#[derive(serde::Deserialize)]
struct AgePage {
    #[serde(default)]
    items: Vec<AgeItem>,
    #[serde(default)]
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ListMeta,
}

#[derive(serde::Deserialize)]
struct AgeItem {
    metadata: AgeMeta,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct AgeMeta {
    name: Option<String>,
    creation_timestamp: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

async fn retain(client: &kube::Client, api: &Api<AgentChange>, settings: &Settings) -> Result<()> {
    let mut metas: Vec<ObjectMeta> = Vec::new();
    let mut params =
        ListParams::default().labels("app.kubernetes.io/managed-by=agentguard").limit(RETENTION_PAGE);
    loop {
        let request = kube::core::Request::new(api.resource_url()).list_metadata(&params)?;
        let page: AgePage = client.request(request).await?;
        metas.extend(page.items.into_iter().map(|i| ObjectMeta {
            name: i.metadata.name,
            creation_timestamp: i.metadata.creation_timestamp,
            ..ObjectMeta::default()
        }));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    // A few deletes at once: after a flood, one at a time trimmed about 60 records a second.
    use futures::StreamExt;
    let deletes =
        futures::stream::iter(expired(&metas, Timestamp::now(), settings.retention, settings.max_records))
            .map(|name| async move {
                match api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => tracing::info!(record = %name, "audit record expired"),
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e).context("deleting an expired record"),
                }
                Ok(())
            })
            .buffer_unordered(RETENTION_DELETES);
    futures::pin_mut!(deletes);
    while let Some(deleted) = deletes.next().await {
        deleted?;
    }
    Ok(())
}

async fn check_pass(client: &kube::Client, api: &Api<AgentChange>, settle: Duration) -> Result<()> {
    let now = Timestamp::now();
    let settle = jiff::SignedDuration::try_from(settle).unwrap_or_default();
    // A page at a time: after a flood thousands of records are pending, each with its objects.
    let mut params = ListParams::default().labels(&format!("{OUTCOME_LABEL}=pending")).limit(CHECK_PAGE);
    loop {
        let page = api.list(&params).await?;
        let next = page.metadata.continue_.clone().filter(|c| !c.is_empty());
        check_page(client, api, page.items, now, settle).await?;
        match next {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(()),
        }
    }
}

/// Pending records listed per page by a check pass.
const CHECK_PAGE: u32 = 100;

async fn check_page(
    client: &kube::Client,
    api: &Api<AgentChange>,
    records: Vec<AgentChange>,
    now: Timestamp,
    settle: jiff::SignedDuration,
) -> Result<()> {
    for record in records {
        let Some(name) = record.metadata.name.clone() else { continue };
        let created = record.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or(now);
        if now - settle < created {
            continue;
        }
        let spec = &record.spec;
        let target = &spec.target;
        let current = match target_api(client, target).get_metadata_opt(&target.name).await {
            Ok(current) => Some(current),
            // agentguard may not read this kind (Secrets, kinds left out of its role): say so.
            Err(kube::Error::Api(e)) if e.code == 403 => None,
            Err(e) => return Err(e).with_context(|| format!("reading {}", target.name)),
        };
        let (outcome, message) = match &current {
            Some(current) => outcome(spec, current.as_ref().map(|m| &m.metadata)),
            None => (
                "Unverified",
                format!("agentguard may not read {} objects, so it cannot tell", target.resource),
            ),
        };
        let approvals: Vec<&String> = if spec.approvals.is_empty() {
            spec.approval.iter().collect()
        } else {
            spec.approvals.iter().collect()
        };
        // A value that names its approver says who (the webhook admitted it only from them, and
        // the record's prior object, checked against the live one, carries it); one that names
        // nobody is found in agentguard's Event of its write.
        let named = |a: &str| crate::engine::approval::approver(a).ok().flatten().map(str::to_owned);
        let mut events = Vec::new();
        if approvals.iter().any(|a| named(a).is_none()) && !target.uid.is_empty() {
            let api: Api<Event> = Api::namespaced(client.clone(), &target.namespace);
            let fields = format!("regarding.uid={},reason=ApprovalRecorded", target.uid);
            if let Ok(list) = api.list(&ListParams::default().fields(&fields)).await {
                events = list.items;
            }
        }
        let approvers: Vec<String> =
            approvals.iter().filter_map(|a| named(a).or_else(|| approver(&events, a))).collect();
        let status = AgentChangeStatus {
            outcome: outcome.to_owned(),
            approver: approvers.first().cloned(),
            approvers: if approvers.len() > 1 { approvers } else { Vec::new() },
            checked_at: Some(now.to_string()),
            message: Some(message),
        };
        let params = PatchParams::default();
        api.patch_status(&name, &params, &Patch::Merge(json!({"status": status}))).await?;
        let label = match outcome {
            "Happened" => "happened",
            "Unverified" => "unverified",
            _ => "never-happened",
        };
        api.patch(&name, &params, &Patch::Merge(json!({"metadata": {"labels": {OUTCOME_LABEL: label}}})))
            .await?;
        tracing::info!(record = %name, outcome, "audit record checked");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
