//! `agentguard pending`: the requests waiting for a human, read back from the `ApprovalRequired`
//! Events agentguard writes on each held object (who asked, what, the command with its ticket
//! that approves it) and the `ApprovalChange` Events that carry the whole change, every entry in
//! full. Nothing extra is stored: a request drops off the list once an approval is recorded for
//! its object, or when it is older than `--since` (Events themselves expire with the API server's
//! event TTL).

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use serde::Serialize;

#[derive(Args, Debug)]
pub struct PendingArgs {
    /// Only this namespace (default: all).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// How far back a held request still counts as waiting, e.g. `1h`, `30m`.
    #[arg(long, default_value = "1h")]
    pub since: String,
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// One request waiting for approval.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Pending {
    pub namespace: String,
    pub kind: String,
    pub name: String,
    /// Who was held, as the API server authenticated them.
    pub requester: String,
    /// When it was last held.
    pub last_seen: Timestamp,
    /// How many times it was held (Event series count, at least 1).
    pub count: i32,
    /// The `kubectl annotate` command that approves it, when the note carries one.
    pub approve_command: Option<String>,
    /// agentguard's message (its change is a summary).
    pub message: String,
    /// The whole attempted change, one entry per line, when agentguard's Events carry it.
    pub change: Vec<String>,
    /// Where the request came from (`pod=… node=… credential-id=…`), when the note says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

fn when(event: &Event) -> Option<Timestamp> {
    event
        .series
        .as_ref()
        .map(|s| s.last_observed_time.0)
        .or_else(|| event.event_time.as_ref().map(|t| t.0))
        .or_else(|| event.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// The text between `start` and `end` in `note`.
fn between<'a>(note: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = note.find(start)? + start.len();
    let len = note[from..].find(end)?;
    Some(&note[from..from + len])
}

/// The waiting requests among `events`: per object, the latest `ApprovalRequired` newer than
/// `now - since` and newer than every approval recorded on it. Newest first.
pub fn pending(events: &[Event], now: Timestamp, since: SignedDuration) -> Vec<Pending> {
    let cutoff = now - since;
    // Keyed by the object's uid (a re-created object is a new one), else by its name.
    let mut held: BTreeMap<String, (Timestamp, &Event)> = BTreeMap::new();
    let mut approved: BTreeMap<String, Timestamp> = BTreeMap::new();
    // Per object, per change id: (latest time, parts by number, number of parts).
    type Parts<'a> = BTreeMap<String, (Timestamp, BTreeMap<usize, &'a str>, usize)>;
    let mut changes: BTreeMap<String, Parts<'_>> = BTreeMap::new();
    for event in events {
        if event.reporting_controller.as_deref() != Some("agentguard") {
            continue;
        }
        let (Some(regarding), Some(at)) = (event.regarding.as_ref(), when(event)) else { continue };
        let key = regarding.uid.clone().unwrap_or_else(|| {
            format!(
                "{}/{}/{}",
                regarding.kind.as_deref().unwrap_or_default(),
                regarding.namespace.as_deref().unwrap_or_default(),
                regarding.name.as_deref().unwrap_or_default()
            )
        });
        match event.reason.as_deref() {
            Some("ApprovalRequired") if held.get(&key).is_none_or(|(t, _)| *t < at) => {
                held.insert(key, (at, event));
            }
            Some("ApprovalRecorded" | "Approved") => {
                let latest = approved.entry(key).or_insert(at);
                *latest = (*latest).max(at);
            }
            Some("ApprovalChange") => {
                let Some((id, i, n, text)) = event.note.as_deref().and_then(part) else { continue };
                let entry =
                    changes.entry(key).or_default().entry(id.to_owned()).or_insert((at, BTreeMap::new(), n));
                entry.0 = entry.0.max(at);
                entry.1.insert(i, text);
            }
            _ => {}
        }
    }
    let mut out: Vec<Pending> = held
        .into_iter()
        .filter(|(key, (at, _))| *at >= cutoff && approved.get(key).is_none_or(|a| a < at))
        .map(|(key, (at, event))| {
            let regarding = event.regarding.clone().unwrap_or_default();
            let note = event.note.clone().unwrap_or_default();
            // The latest change sent for this object, when it arrived whole.
            let change = changes
                .get(&key)
                .and_then(|by_id| by_id.values().max_by_key(|(t, _, _)| *t))
                .filter(|(_, parts, n)| parts.len() == *n && parts.keys().copied().eq(1..=*n))
                .map(|(_, parts, _)| {
                    parts.values().copied().collect::<String>().lines().map(str::to_owned).collect()
                })
                .unwrap_or_default();
            Pending {
                namespace: regarding.namespace.unwrap_or_default(),
                kind: regarding.kind.unwrap_or_default(),
                name: regarding.name.unwrap_or_default(),
                requester: between(&note, " by ", " requires approval").unwrap_or_default().to_owned(),
                last_seen: at,
                count: event.series.as_ref().map_or(1, |s| s.count.max(1)),
                approve_command: between(&note, " runs: ", " — then retry").map(str::to_owned),
                from: between(&note, crate::cluster::events::FROM_PREFIX, "]").map(str::to_owned),
                message: note,
                change,
            }
        })
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.last_seen));
    out
}

/// `change <id> part <i>/<n>: <text>` → (id, i, n, text).
fn part(note: &str) -> Option<(&str, usize, usize, &str)> {
    let rest = note.strip_prefix(crate::cluster::events::PART_PREFIX)?;
    let (id, rest) = rest.split_once(" part ")?;
    let (numbers, text) = rest.split_once(": ")?;
    let (i, n) = numbers.split_once('/')?;
    Some((id, i.parse().ok()?, n.parse().ok()?, text))
}

/// `1h5m`, `1m30s`, `42s`.
fn ago(d: SignedDuration) -> String {
    let s = d.as_secs().max(0);
    match s {
        3600.. => format!("{}h{}m", s / 3600, s % 3600 / 60),
        60.. => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{s}s"),
    }
}

/// The human view: one block per request, since commands and changes are too wide for columns.
pub fn table(items: &[Pending], now: Timestamp) -> String {
    if items.is_empty() {
        return "No requests are waiting for approval.\n".into();
    }
    let mut out = String::new();
    for p in items {
        let age = ago(now.duration_since(p.last_seen));
        let object = match p.namespace.as_str() {
            "" => format!("{} {}", p.kind, p.name),
            ns => format!("{} {ns}/{}", p.kind, p.name),
        };
        out.push_str(&format!("{object}  held {} ago ({}x) for {}\n", age, p.count, p.requester));
        if let Some(from) = &p.from {
            out.push_str(&format!("  from:    {from}\n"));
        }
        if !p.change.is_empty() {
            out.push_str("  change:\n");
            for line in &p.change {
                out.push_str(&format!("    {line}\n"));
            }
        } else if let Some((_, change)) = p.message.split_once("Attempted change: ") {
            out.push_str(&format!("  change:  {change}\n"));
        }
        match &p.approve_command {
            Some(command) => out.push_str(&format!("  approve: {command}\n")),
            None => out.push_str("  approve: (not approvable by annotation; see the message)\n"),
        }
    }
    out
}

pub async fn run(args: &PendingArgs) -> Result<()> {
    let since = crate::engine::api::parse_duration(&args.since)
        .and_then(|d| SignedDuration::try_from(d).ok())
        .with_context(|| format!("--since {:?} is not a duration such as 1h or 30m", args.since))?;
    let client = kube::Client::try_default().await.context("building the Kubernetes client")?;
    let api: Api<Event> = match &args.namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let params = ListParams::default().fields("reportingController=agentguard");
    let events = api.list(&params).await.context("listing agentguard's Events")?.items;
    let now = Timestamp::now();
    let items = pending(&events, now, since);
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&items)?),
        Output::Table => print!("{}", table(&items, now)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    const NOTE: &str = "agentguard: DELETE of deployments.apps \"web\" in namespace \"demo\" by system:serviceaccount:agents:coder \
        requires approval under ClusterAgentPolicy \"p\", rule \"r\": no approval is present. To approve, an approver \
        runs: kubectl annotate deployments.apps web -n demo agentguard.io/approve=delete.AQAAAA --overwrite — then retry before \
        2026-11-27T13:00:00Z. Approvers: [ClusterAgentPolicy \"p\": groups sre].";

    fn event(reason: &str, uid: &str, at: &str) -> Event {
        Event {
            reason: Some(reason.into()),
            reporting_controller: Some("agentguard".into()),
            note: Some(NOTE.into()),
            event_time: Some(MicroTime(at.parse().unwrap())),
            regarding: Some(ObjectReference {
                kind: Some("Deployment".into()),
                namespace: Some("demo".into()),
                name: Some("web".into()),
                uid: Some(uid.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn held_requests_wait_until_approved_or_old() {
        let now: Timestamp = "2026-11-27T12:00:00Z".parse().unwrap();
        let hour = SignedDuration::from_hours(1);
        let held = [event("ApprovalRequired", "u1", "2026-11-27T11:50:00Z")];
        let items = pending(&held, now, hour);
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].requester, "system:serviceaccount:agents:coder");
        assert_eq!(
            items[0].approve_command.as_deref(),
            Some(
                "kubectl annotate deployments.apps web -n demo agentguard.io/approve=delete.AQAAAA --overwrite"
            )
        );
        // Approved since: gone. Held again after the approval: back.
        let mut events = held.to_vec();
        events.push(event("ApprovalRecorded", "u1", "2026-11-27T11:55:00Z"));
        assert!(pending(&events, now, hour).is_empty());
        events.push(event("ApprovalRequired", "u1", "2026-11-27T11:58:00Z"));
        assert_eq!(pending(&events, now, hour).len(), 1);
        // Older than --since: expired by itself.
        assert!(pending(&held, now, SignedDuration::from_mins(5)).is_empty());
        // Other controllers' Events are not ours to read.
        let mut foreign = event("ApprovalRequired", "u2", "2026-11-27T11:59:00Z");
        foreign.reporting_controller = Some("someone-else".into());
        assert!(pending(&[foreign], now, hour).is_empty());
    }

    #[test]
    fn the_table_shows_who_what_and_how_to_approve() {
        let now: Timestamp = "2026-11-27T12:00:00Z".parse().unwrap();
        let items = pending(
            &[event("ApprovalRequired", "u1", "2026-11-27T11:58:30Z")],
            now,
            SignedDuration::from_hours(1),
        );
        let text = table(&items, now);
        assert!(
            text.starts_with(
                "Deployment demo/web  held 1m30s ago (1x) for system:serviceaccount:agents:coder\n"
            ),
            "{text}"
        );
        assert!(text.contains("  approve: kubectl annotate deployments.apps web -n demo agentguard.io/approve=delete.AQAAAA --overwrite\n"));
        assert_eq!(table(&[], now), "No requests are waiting for approval.\n");
        assert_eq!(items[0].from, None);
    }

    #[test]
    fn where_the_request_came_from_is_read_back() {
        let now: Timestamp = "2026-11-27T12:00:00Z".parse().unwrap();
        let mut held = event("ApprovalRequired", "u1", "2026-11-27T11:58:30Z");
        held.note = Some(format!("{NOTE} [from: pod=coder-7d9f node=node-1 credential-id=JTI=0f3e]"));
        let items = pending(&[held], now, SignedDuration::from_hours(1));
        assert_eq!(items[0].from.as_deref(), Some("pod=coder-7d9f node=node-1 credential-id=JTI=0f3e"));
        assert!(items[0].approve_command.is_some());
        assert!(
            table(&items, now).contains("\n  from:    pod=coder-7d9f node=node-1 credential-id=JTI=0f3e\n")
        );
    }

    #[test]
    fn the_whole_change_is_read_back_from_its_parts() {
        let now: Timestamp = "2026-11-27T12:00:00Z".parse().unwrap();
        let part = |note: &str, at: &str| {
            let mut e = event("ApprovalChange", "u1", at);
            e.note = Some(note.into());
            e
        };
        let events = [
            event("ApprovalRequired", "u1", "2026-11-27T11:58:00Z"),
            part("change aaaa part 1/1: spec.replicas: 3 → 1", "2026-11-27T11:50:00Z"),
            part("change bbbb part 2/2: tail\nmetadata.labels.b: (absent) → y", "2026-11-27T11:58:01Z"),
            part("change bbbb part 1/2: metadata.labels.a: x → ", "2026-11-27T11:58:00Z"),
        ];
        let items = pending(&events, now, SignedDuration::from_hours(1));
        assert_eq!(items[0].change, ["metadata.labels.a: x → tail", "metadata.labels.b: (absent) → y"]);
        let text = table(&items, now);
        assert!(
            text.contains(
                "  change:\n    metadata.labels.a: x → tail\n    metadata.labels.b: (absent) → y\n"
            ),
            "{text}"
        );
        // A change missing a part is not shown as if it were whole.
        let incomplete = pending(&events[..3], now, SignedDuration::from_hours(1));
        assert!(incomplete[0].change.is_empty());
    }
}
