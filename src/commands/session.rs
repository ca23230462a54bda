//! `agentguard session open|close|list`: break-glass sessions ([`AgentSession`]). An approver
//! opens one for one agent, in one scope, for a while and a number of operations, instead of
//! approving object by object; deleting it (`close`) ends it at once. `open` fills in `openedBy`
//! from who the API server says the kubeconfig is (agentguard refuses any other opener), `list`
//! shows each session's uses as agentguard counts them.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, ListParams, PostParams};

use crate::engine::api::{AgentSession, AgentSessionSpec, SessionOpener, SessionOperation};

#[derive(Args, Debug)]
pub struct SessionArgs {
    #[command(subcommand)]
    pub command: SessionCommand,
}

#[derive(Subcommand, Debug)]
pub enum SessionCommand {
    /// Open a session: one agent may make up to --max operations in this scope until --ttl passes.
    Open(OpenArgs),
    /// Close a session at once (deletes it).
    Close {
        /// The session's name.
        name: String,
    },
    /// List sessions with their scope, uses and end.
    List {
        /// agentguard's namespace, where uses are counted.
        #[arg(long, default_value = "agentguard-system")]
        agentguard_namespace: String,
    },
}

#[derive(Args, Debug)]
pub struct OpenArgs {
    /// The session's name.
    pub name: String,
    /// The agent: a ServiceAccount as NAMESPACE/NAME, or a username.
    #[arg(long)]
    pub agent: String,
    /// The agent's credential: the `credential-id` its held request shows (`JTI=…`, in the
    /// denial's `[from: …]`, `pending` and the records). Only requests made with that token use
    /// the session.
    #[arg(long)]
    pub credential: String,
    /// A namespace it covers (repeat for more).
    #[arg(long = "namespace", short = 'n', required = true)]
    pub namespaces: Vec<String>,
    /// A resource it covers, as kubectl names it: configmaps, deployments.apps,
    /// deployments.apps/scale (repeat for more).
    #[arg(long = "resource", required = true)]
    pub resources: Vec<String>,
    /// An operation it covers: DELETE or UPDATE (repeat for both).
    #[arg(long = "operation", required = true, value_parser = ["DELETE", "UPDATE"])]
    pub operations: Vec<String>,
    /// At most this many operations.
    #[arg(long = "max", default_value_t = 10)]
    pub max_operations: u32,
    /// How long it stays open (every policy it stands in for caps it with its maxTtl).
    #[arg(long, default_value = "1h")]
    pub ttl: String,
    /// Why: recorded with every use.
    #[arg(long)]
    pub reason: String,
}

/// Who the kubeconfig's credentials are, as the API server sees them (SelfSubjectReview).
pub async fn whoami(client: &kube::Client) -> Result<SessionOpener> {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    let api: Api<SelfSubjectReview> = Api::all(client.clone());
    let review = api
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .context("asking the API server who this kubeconfig is (SelfSubjectReview)")?;
    let user = review.status.and_then(|s| s.user_info).context("the API server did not say who this is")?;
    Ok(SessionOpener {
        username: user.username.context("the API server named no username")?,
        groups: user.groups.unwrap_or_default(),
    })
}

/// The session `open` creates.
pub fn session(args: &OpenArgs, opener: SessionOpener) -> Result<AgentSession> {
    let operations = args
        .operations
        .iter()
        .map(|o| match o.as_str() {
            "DELETE" => Ok(SessionOperation::Delete),
            "UPDATE" => Ok(SessionOperation::Update),
            other => bail!("{other:?} is not an operation a session covers (DELETE, UPDATE)"),
        })
        .collect::<Result<Vec<_>>>()?;
    let spec = AgentSessionSpec {
        agent: crate::commands::freeze::username(&args.agent)?,
        credential_id: args.credential.clone(),
        namespaces: args.namespaces.clone(),
        resources: args.resources.clone(),
        operations,
        max_operations: args.max_operations,
        ttl: args.ttl.clone(),
        reason: args.reason.clone(),
        opened_by: opener,
    };
    Ok(AgentSession::new(&args.name, spec))
}

pub async fn run(args: &SessionArgs) -> Result<()> {
    let client = kube::Client::try_default().await.context("building the Kubernetes client")?;
    let api: Api<AgentSession> = Api::all(client.clone());
    match &args.command {
        SessionCommand::Open(open) => {
            let opener = whoami(&client).await?;
            let session = session(open, opener)?;
            let created = api
                .create(&PostParams::default(), &session)
                .await
                .with_context(|| format!("opening session {:?}", open.name))?;
            let opened = created.metadata.creation_timestamp.map(|t| t.0.to_string()).unwrap_or_default();
            println!(
                "session {} opened at {opened} for {}: {} of {} in {}, at most {} operations, for {}; close it with `kubectl agentguard session close {}`",
                open.name,
                session.spec.agent,
                open.operations.join("/"),
                open.resources.join(", "),
                open.namespaces.join(", "),
                open.max_operations,
                open.ttl,
                open.name
            );
        }
        SessionCommand::Close { name } => {
            api.delete(name, &DeleteParams::default())
                .await
                .with_context(|| format!("closing session {name:?}"))?;
            println!("session {name} closed");
        }
        SessionCommand::List { agentguard_namespace } => {
            let sessions = api.list(&ListParams::default()).await.context("listing sessions")?.items;
            let leases: Api<Lease> = Api::namespaced(client.clone(), agentguard_namespace);
            let now = Timestamp::now();
            if sessions.is_empty() {
                println!("no sessions");
            }
            for s in &sessions {
                let uid = s.metadata.uid.clone().unwrap_or_default();
                let name = crate::cluster::sessions::lease_name(&uid);
                // Uses are counted by agentguard; a lease it may not read is shown as unknown.
                let used = match leases.get_opt(&name).await {
                    Ok(lease) => crate::cluster::sessions::uses(lease.as_ref()).to_string(),
                    Err(_) => "?".into(),
                };
                let ends = crate::engine::session::Session::of(s)
                    .map(|c| c.expires(jiff::SignedDuration::MAX))
                    .map(|end| if end <= now { format!("ended {end}") } else { format!("open until {end}") })
                    .unwrap_or_else(|e| format!("unreadable: {e}"));
                let spec = &s.spec;
                let ops: Vec<&str> = spec
                    .operations
                    .iter()
                    .map(|o| match o {
                        SessionOperation::Delete => "DELETE",
                        SessionOperation::Update => "UPDATE",
                    })
                    .collect();
                println!(
                    "{}: {} may {} {} in {}; used {used}/{}; {ends}; opened by {}: {}",
                    s.metadata.name.as_deref().unwrap_or_default(),
                    spec.agent,
                    ops.join("/"),
                    spec.resources.join(", "),
                    spec.namespaces.join(", "),
                    spec.max_operations,
                    spec.opened_by.username,
                    spec.reason
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_names_the_agent_and_the_opener() {
        let args = OpenArgs {
            name: "migrate".into(),
            agent: "agents/coder".into(),
            credential: "JTI=1".into(),
            namespaces: vec!["prod".into()],
            resources: vec!["deployments.apps".into()],
            operations: vec!["DELETE".into(), "UPDATE".into()],
            max_operations: 5,
            ttl: "30m".into(),
            reason: "migration".into(),
        };
        let opener = SessionOpener { username: "alice".into(), groups: vec!["sre".into()] };
        let s = session(&args, opener.clone()).unwrap();
        assert_eq!(s.spec.agent, "system:serviceaccount:agents:coder");
        assert_eq!(s.spec.operations, [SessionOperation::Delete, SessionOperation::Update]);
        assert_eq!(s.spec.opened_by, opener);
        assert_eq!(s.metadata.name.as_deref(), Some("migrate"));
    }
}
