//! `agentguard approve KIND/NAME`: approves the latest request agentguard holds for one object.
//! It reads the held request back from agentguard's Events (as `pending` does), shows the whole
//! change, asks, and writes the ticket of the latest denial into `agentguard.io/approve` with a
//! plain merge patch: exactly what the `kubectl annotate` command of the denial does, so the
//! webhook checks the approver and the ticket as for any other approval. Where a policy needs
//! several approvers, it writes the approval naming this kubeconfig's user (as the API server
//! says: SelfSubjectReview) under that user's own key.

use std::io::{BufRead, Write};

use anyhow::{Context, Result, bail};
use clap::Args;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

use crate::commands::pending::{self, Pending};
use crate::commands::target;
use crate::engine::api::APPROVE_ANNOTATION;

#[derive(Args, Debug)]
pub struct ApproveArgs {
    /// The held object, as KIND/NAME (e.g. deployment/web).
    pub object: String,
    /// The object's namespace (default: the kubeconfig's).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Approve without asking for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// Held requests older than the longest approval lifetime any policy may give cannot be
/// approved any more.
const LOOK_BACK_HOURS: i64 = 168;

/// The latest request waiting for approval on this object.
pub fn held_for<'a>(items: &'a [Pending], kind: &str, namespace: &str, name: &str) -> Option<&'a Pending> {
    // `pending` lists newest first.
    items.iter().find(|p| p.kind == kind && p.namespace == namespace && p.name == name)
}

/// How a held request is approved: the ticket, and whether each approver must name themselves
/// under a key of their own (a policy needs several approvers).
#[derive(Debug, PartialEq, Eq)]
pub struct Ticket<'a> {
    pub value: &'a str,
    pub named: bool,
}

/// The approval value in a denial's `kubectl annotate` command.
pub fn ticket(command: &str) -> Option<Ticket<'_>> {
    let plain = format!("{APPROVE_ANNOTATION}=");
    let named = format!("{APPROVE_ANNOTATION}.<you>=");
    command.split_whitespace().find_map(|word| {
        if let Some(value) = word.strip_prefix(plain.as_str()) {
            return Some(Ticket { value, named: false }).filter(|t| !t.value.is_empty());
        }
        let value = word.strip_prefix(named.as_str())?.strip_suffix(".<username>")?;
        Some(Ticket { value, named: true }).filter(|t| !t.value.is_empty())
    })
}

/// What the approver is shown before confirming.
pub fn summary(p: &Pending) -> String {
    let object = match p.namespace.as_str() {
        "" => format!("{} {}", p.kind, p.name),
        ns => format!("{} {ns}/{}", p.kind, p.name),
    };
    let mut out = format!("{object} held at {} for {}\n", p.last_seen, p.requester);
    if let Some(from) = &p.from {
        out.push_str(&format!("  from: {from}\n"));
    }
    out.push_str(&format!("  {}\n", p.message));
    if !p.change.is_empty() {
        out.push_str("  change:\n");
        for line in &p.change {
            out.push_str(&format!("    {line}\n"));
        }
    }
    out
}

pub async fn run(args: &ApproveArgs) -> Result<()> {
    let client = kube::Client::try_default().await.context("building the Kubernetes client")?;
    let target = target::resolve(&client, &args.object, args.namespace.as_deref()).await?;
    // Events of a cluster-scoped object live in the default namespace: look everywhere.
    let events: Api<Event> = match target.namespace.as_str() {
        "" => Api::all(client.clone()),
        ns => Api::namespaced(client.clone(), ns),
    };
    let params = ListParams::default().fields("reportingController=agentguard");
    let events = events.list(&params).await.context("listing agentguard's Events")?.items;
    let items = pending::pending(&events, Timestamp::now(), SignedDuration::from_hours(LOOK_BACK_HOURS));
    let Some(held) = held_for(&items, &target.resource.kind, &target.namespace, &target.name) else {
        bail!(
            "agentguard holds no request for {}: no agent's request for it waits for approval \
             (none was held, or it was approved since)",
            target.describe()
        );
    };
    print!("{}", summary(held));
    let Some(ticket) = held.approve_command.as_deref().and_then(ticket) else {
        bail!("this request cannot be approved by annotation (see the message above)");
    };
    // Where several must approve, each approval names its writer under a key of their own.
    let (key, value) = if ticket.named {
        let me = crate::commands::session::whoami(&client).await?.username;
        (crate::engine::approval::key_for(&me), format!("{}.{me}", ticket.value))
    } else {
        (APPROVE_ANNOTATION.to_owned(), ticket.value.to_owned())
    };
    if !args.yes {
        print!("Approve this for {}? [y/N] ", held.requester);
        std::io::stdout().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer).context("reading the answer")?;
        if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
            bail!("not approved");
        }
    }
    let patch = json!({"metadata": {"annotations": {key.as_str(): value}}});
    target
        .api(client)
        .patch(&target.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("writing the approval on {}", target.describe()))?;
    println!("approved: {} ({key}={value}); the agent may retry now", target.describe());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(name: &str, at: &str, command: Option<&str>) -> Pending {
        Pending {
            namespace: "prod".into(),
            kind: "Deployment".into(),
            name: name.into(),
            requester: "system:serviceaccount:agents:coder".into(),
            last_seen: at.parse().unwrap(),
            count: 1,
            approve_command: command.map(str::to_owned),
            message: "agentguard: DELETE … requires approval".into(),
            change: vec!["spec.replicas: 3 → 0".into()],
            from: Some("credential-id=JTI=1".into()),
        }
    }

    #[test]
    fn the_ticket_comes_from_the_latest_denial_of_that_object() {
        let cmd =
            "kubectl annotate deployments.apps web -n prod agentguard.io/approve=delete.AQAA --overwrite";
        let items =
            [item("web", "2026-11-27T12:00:00Z", Some(cmd)), item("api", "2026-11-27T11:00:00Z", None)];
        let held = held_for(&items, "Deployment", "prod", "web").unwrap();
        assert_eq!(
            held.approve_command.as_deref().and_then(ticket),
            Some(Ticket { value: "delete.AQAA", named: false })
        );
        let several = "kubectl agentguard approve deployments.apps/web -n prod (or: kubectl annotate \
                       deployments.apps web -n prod agentguard.io/approve.<you>=delete.AQAA.<username> --overwrite)";
        assert_eq!(ticket(several), Some(Ticket { value: "delete.AQAA", named: true }));
        assert!(held_for(&items, "Deployment", "other", "web").is_none());
        assert!(held_for(&items, "StatefulSet", "prod", "web").is_none());
        assert_eq!(ticket("kubectl annotate x y agentguard.io/approve= --overwrite"), None);
        let shown = summary(held);
        assert!(
            shown.starts_with(
                "Deployment prod/web held at 2026-11-27T12:00:00Z for system:serviceaccount:agents:coder\n"
            ),
            "{shown}"
        );
        assert!(
            shown.contains("  from: credential-id=JTI=1\n") && shown.contains("    spec.replicas: 3 → 0\n"),
            "{shown}"
        );
    }
}
