//! `agentguard freeze` / `unfreeze`: the emergency stop. A freeze is an ordinary
//! ClusterAgentPolicy, `agentguard-freeze-<hash of the agent>` (or `agentguard-freeze-all`),
//! that denies every CREATE, DELETE, UPDATE and CONNECT of every resource to the agent it names
//! (or to every agent); Deny beats every other action, approvals included. Being a policy, it takes
//! effect the moment agentguard's policy cache sees it, on every replica, needs no restart, and
//! is audited like any policy; agents cannot remove it (the built-in rule
//! `agentguard-policies`). `freeze` returns once agentguard reports the policy Ready (its
//! status is written on a periodic pass, so that wait is longer than the policy takes to apply;
//! `--no-wait` returns once the policy is stored).
//!
//! CREATE reaches agentguard for agents only (the `agents` webhook's matchConditions select them,
//! so no one else pays for it) and is judged only by rules that name it: the freeze's do, so a
//! frozen agent creates nothing, and every other agent's CREATE is admitted as before.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::engine::api::{ClusterAgentPolicy, ClusterAgentPolicySpec};

/// Label on every freeze policy, so `kubectl get cap -l agentguard.io/freeze` lists them.
pub const FREEZE_LABEL: &str = "agentguard.io/freeze";
/// Annotations: whom the freeze stops and why.
pub const SUBJECT_ANNOTATION: &str = "agentguard.io/freeze-subject";
pub const REASON_ANNOTATION: &str = "agentguard.io/freeze-reason";

/// How long `freeze` waits for agentguard to report the policy in force.
const READY_WITHIN: Duration = Duration::from_secs(15);

#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("who").required(true).args(["agent", "all"]))]
pub struct FreezeArgs {
    /// The agent: a ServiceAccount as NAMESPACE/NAME, or a username.
    pub agent: Option<String>,
    /// Every agent.
    #[arg(long)]
    pub all: bool,
    /// Why, shown to the agent in every refusal.
    #[arg(long)]
    pub reason: Option<String>,
    /// Return once the policy is stored, without waiting for agentguard to report it Ready.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("who").required(true).args(["agent", "all"]))]
pub struct UnfreezeArgs {
    /// The agent, as given to `freeze`.
    pub agent: Option<String>,
    /// Lift `freeze --all` (a freeze of one agent is lifted by naming it).
    #[arg(long)]
    pub all: bool,
}

/// The username an agent argument stands for: `NS/NAME` is that ServiceAccount.
pub fn username(agent: &str) -> Result<String> {
    let username = match agent.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            format!("system:serviceaccount:{ns}:{name}")
        }
        Some(_) => bail!("{agent:?} is neither NAMESPACE/NAME nor a username"),
        None => agent.to_owned(),
    };
    let service_account = crate::engine::policy::identity::service_account_name(&username).is_some();
    if username.is_empty() || username.chars().any(char::is_control) {
        bail!("{agent:?} is not a username");
    }
    if username.starts_with("system:") && !service_account {
        bail!(
            "{agent:?} is a reserved identity, which no policy may name (only ServiceAccounts among system:…)"
        );
    }
    Ok(username)
}

/// The freeze policy's name: one per agent, stable, whatever characters the username has.
pub fn policy_name(username: Option<&str>) -> String {
    match username {
        None => "agentguard-freeze-all".into(),
        Some(u) => {
            let digest: String =
                Sha256::digest(u.as_bytes()).iter().take(6).map(|b| format!("{b:02x}")).collect();
            format!("agentguard-freeze-{digest}")
        }
    }
}

/// The policy that freezes `username` (every agent when `None`).
pub fn policy(username: Option<&str>, reason: Option<&str>) -> Result<ClusterAgentPolicy> {
    let who = username.unwrap_or("every agent");
    let mut message = format!("{who} is frozen (agentguard freeze)");
    if let Some(reason) = reason {
        message.push_str(&format!(": {reason}"));
    }
    // The schema allows 512 characters.
    if message.chars().count() > 512 {
        message = message.chars().take(509).collect::<String>() + "...";
    }
    let spec: ClusterAgentPolicySpec = serde_json::from_value(json!({
        "subjects": username.map(|u| json!({"usernames": [u]})),
        "action": "Deny",
        "rules": [{
            "name": "freeze",
            "operations": ["CREATE", "DELETE", "UPDATE", "CONNECT"],
            "resources": [{"apiGroups": ["*"], "resources": ["*", "*/*"]}]
        }],
        "message": message,
    }))?;
    let mut policy = ClusterAgentPolicy::new(&policy_name(username), spec);
    policy.metadata.labels = Some(
        [
            ("app.kubernetes.io/managed-by".to_owned(), "agentguard".to_owned()),
            (FREEZE_LABEL.to_owned(), "true".to_owned()),
        ]
        .into(),
    );
    let mut annotations = std::collections::BTreeMap::from([(SUBJECT_ANNOTATION.to_owned(), who.to_owned())]);
    if let Some(reason) = reason {
        annotations.insert(REASON_ANNOTATION.to_owned(), reason.to_owned());
    }
    policy.metadata.annotations = Some(annotations);
    Ok(policy)
}

fn subject(agent: Option<&str>, all: bool) -> Result<Option<String>> {
    match (agent, all) {
        (_, true) => Ok(None),
        (Some(agent), false) => username(agent).map(Some),
        (None, false) => bail!("name an agent or pass --all"),
    }
}

pub async fn freeze(args: &FreezeArgs) -> Result<()> {
    let username = subject(args.agent.as_deref(), args.all)?;
    let policy = policy(username.as_deref(), args.reason.as_deref())?;
    let name = policy.metadata.name.clone().unwrap_or_default();
    let client = kube::Client::try_default().await.context("building the Kubernetes client")?;
    let api: Api<ClusterAgentPolicy> = Api::all(client);
    let params = PatchParams::apply("agentguard-freeze").force();
    let stored =
        api.patch(&name, &params, &Patch::Apply(&policy)).await.context("writing the freeze policy")?;
    let generation = stored.metadata.generation;
    let who = username.as_deref().unwrap_or("every agent");
    if args.no_wait {
        println!("frozen (stored, not confirmed): {who} (ClusterAgentPolicy {name:?})");
        return Ok(());
    }
    // In force once agentguard has compiled this generation (its Ready condition says so).
    let started = Instant::now();
    loop {
        let live = api.get(&name).await.context("reading the freeze policy back")?;
        let status = live.status.unwrap_or_default();
        let ready = status.observed_generation.is_some() && status.observed_generation >= generation;
        if ready && status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True") {
            println!(
                "frozen: {who} (ClusterAgentPolicy {name:?}); lift with: agentguard unfreeze {}",
                lift(args)
            );
            return Ok(());
        }
        if started.elapsed() > READY_WITHIN {
            eprintln!(
                "warning: ClusterAgentPolicy {name:?} is stored, but agentguard has not reported it Ready \
                 within {}s: is agentguard running?",
                READY_WITHIN.as_secs()
            );
            println!("frozen (not yet confirmed): {who} (ClusterAgentPolicy {name:?})");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn lift(args: &FreezeArgs) -> String {
    match (&args.agent, args.all) {
        (Some(agent), false) => agent.clone(),
        _ => "--all".into(),
    }
}

pub async fn unfreeze(args: &UnfreezeArgs) -> Result<()> {
    let username = subject(args.agent.as_deref(), args.all)?;
    let name = policy_name(username.as_deref());
    let client = kube::Client::try_default().await.context("building the Kubernetes client")?;
    let api: Api<ClusterAgentPolicy> = Api::all(client);
    let who = username.as_deref().unwrap_or("every agent");
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => {
            println!("unfrozen: {who} (ClusterAgentPolicy {name:?} deleted)");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 404 => {
            bail!("{who} is not frozen (no ClusterAgentPolicy {name:?})")
        }
        Err(e) => Err(e).context("deleting the freeze policy"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::policy::{
        Config, Facts, Operation, PolicySet, Verdict, evaluate, identity::Requester,
    };

    #[test]
    fn agents_are_named_as_service_accounts_or_usernames() {
        assert_eq!(username("agents/coder").unwrap(), "system:serviceaccount:agents:coder");
        assert_eq!(username("oidc:claude").unwrap(), "oidc:claude");
        assert_eq!(
            username("system:serviceaccount:agents:coder").unwrap(),
            "system:serviceaccount:agents:coder"
        );
        for bad in ["", "a/b/c", "/x", "system:admin", "system:masters", "a\nb"] {
            assert!(username(bad).is_err(), "{bad:?}");
        }
        let a = policy_name(Some("system:serviceaccount:agents:coder"));
        assert!(a.starts_with("agentguard-freeze-") && a.len() == "agentguard-freeze-".len() + 12, "{a}");
        assert_ne!(a, policy_name(Some("system:serviceaccount:agents:editor")));
        assert_eq!(policy_name(None), "agentguard-freeze-all");
    }

    fn decide(policy: &ClusterAgentPolicy, who: &str, operation: Operation) -> Verdict {
        let (set, problems) = PolicySet::compile(std::slice::from_ref(policy), &[]);
        assert!(problems.is_empty(), "{problems:?}");
        let object = json!({"metadata": {"name": "web", "uid": "u", "labels": {"a": "b"}}});
        let new = json!({"metadata": {"name": "web", "uid": "u", "labels": {"a": "c"}}});
        let facts = Facts {
            operation,
            group: "apps",
            resource: "deployments",
            subresource: "",
            namespace: "prod",
            name: "web",
            object: matches!(operation, Operation::Update { .. } | Operation::Create).then_some(&new),
            old_object: (operation != Operation::Create).then_some(&object),
            collateral: &[],
            sent: None,
        };
        let mut requester = Requester::resolve(who, &[], &(), ("agentguard.io/agent", "true"));
        requester.selected_as_agent = who.contains("agents:");
        evaluate(&facts, &requester, &set, &(), &Config::default(), "2026-11-27T12:00:00Z".parse().unwrap())
            .verdict
    }

    #[test]
    fn a_freeze_denies_the_named_agent_every_write_and_no_one_else() {
        let coder = "system:serviceaccount:agents:coder";
        let p = policy(Some(coder), Some("runaway loop")).unwrap();
        assert_eq!(p.metadata.annotations.as_ref().unwrap()[REASON_ANNOTATION], "runaway loop");
        for op in [Operation::Create, Operation::Delete, Operation::Update { patch: None }] {
            match decide(&p, coder, op) {
                Verdict::Deny(d) => {
                    assert!(d.to_string().contains("is frozen (agentguard freeze): runaway loop"), "{d}")
                }
                other => panic!("{op:?} by the frozen agent: {other:?}"),
            }
            assert!(matches!(decide(&p, "system:serviceaccount:agents:editor", op), Verdict::Allow(_)));
            assert!(matches!(decide(&p, "alice", op), Verdict::Allow(_)));
        }
        // --all: every agent, still no human.
        let all = policy(None, None).unwrap();
        assert!(all.spec.policy.subjects.is_none());
        assert!(matches!(
            decide(&all, "system:serviceaccount:agents:editor", Operation::Delete),
            Verdict::Deny(_)
        ));
        assert!(matches!(decide(&all, "alice", Operation::Delete), Verdict::Allow(_)));
        assert!(matches!(
            decide(&all, "system:serviceaccount:agents:editor", Operation::Create),
            Verdict::Deny(_)
        ));
        assert!(matches!(decide(&all, "alice", Operation::Create), Verdict::Allow(_)));
    }

    #[test]
    fn a_freeze_leaves_other_agents_creates_alone_even_when_unmatched_requests_are_denied() {
        let coder = "system:serviceaccount:agents:coder";
        let (set, _) = PolicySet::compile(&[policy(Some(coder), None).unwrap()], &[]);
        let new = json!({"metadata": {"name": "web", "labels": {"a": "b"}}});
        let facts = Facts {
            operation: Operation::Create,
            group: "apps",
            resource: "deployments",
            subresource: "",
            namespace: "prod",
            name: "web",
            object: Some(&new),
            old_object: None,
            collateral: &[],
            sent: None,
        };
        let config = Config { unmatched: crate::engine::api::Action::Deny, ..Config::default() };
        let now = "2026-11-27T12:00:00Z".parse().unwrap();
        let mut editor = Requester::resolve("system:serviceaccount:agents:editor", &[], &(), ("x", "y"));
        editor.selected_as_agent = true;
        let d = evaluate(&facts, &editor, &set, &(), &config, now);
        assert!(d.agent && d.allowed(), "another agent's CREATE, with --unmatched=Deny: {d:?}");
        let mut frozen = Requester::resolve(coder, &[], &(), ("x", "y"));
        frozen.selected_as_agent = true;
        assert!(!evaluate(&facts, &frozen, &set, &(), &config, now).allowed());
    }
}
