//! `agentguard why KIND/NAME`: what protects one object from agents. It reads the policies and
//! the object and asks the engine ([`crate::engine::policy::explain`]) which rules an agent's
//! DELETE and UPDATE of it would meet, with their action, mode, subjects and approvers, and which
//! built-in rule refuses it before any policy. Nothing is decided here: the matching is the
//! webhook's own.

use anyhow::{Context, Result};
use clap::Args;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams};
use serde_json::Value;

use crate::commands::target;
use crate::engine::api::{Action, AgentPolicy, ClusterAgentPolicy, Mode};
use crate::engine::policy::explain::{Explanation, explain};
use crate::engine::policy::identity::StaticDirectory;
use crate::engine::policy::{Config, Facts, Operation, PolicySet};

#[derive(Args, Debug)]
pub struct WhyArgs {
    /// The object, as KIND/NAME (e.g. deployment/web).
    pub object: String,
    /// The object's namespace (default: the kubeconfig's).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// agentguard's own namespace (its built-in rule refuses agents anything in it).
    #[arg(long, env = "AGENTGUARD_SELF_NAMESPACE", default_value = "agentguard-system")]
    pub self_namespace: String,
}

/// The report for one operation.
pub fn render(e: &Explanation) -> String {
    let mut out = format!("{} by an agent:\n", e.operation);
    if let Some((rule, detail)) = &e.builtin {
        out.push_str(&format!("  refused by the built-in rule {rule:?} before any policy: {detail}\n"));
    }
    if e.guards.is_empty() {
        out.push_str("  no policy rule matches (the webhook's --unmatched default applies: Allow unless set to Deny)\n");
    }
    for g in &e.guards {
        let mode = match g.mode {
            Mode::Enforce => String::new(),
            mode => format!(" [{mode:?} mode: not enforced]"),
        };
        out.push_str(&format!(
            "  {}, rule {:?}: {:?}{mode}, for {}\n",
            g.policy, g.rule, g.action, g.subjects
        ));
        if let Some(approvers) = &g.approvers {
            out.push_str(&format!("    approvers: {approvers}\n"));
        }
        if let Some(message) = &g.message {
            out.push_str(&format!("    message: {message}\n"));
        }
    }
    if e.builtin.is_none()
        && let Some(action) = e.strictest_for_any_agent()
    {
        let verdict = match action {
            Action::Deny => "refused",
            Action::RequireApproval => "held for approval",
            Action::Allow => "allowed",
        };
        out.push_str(&format!("  → any agent's {} is {verdict}\n", e.operation));
    }
    out
}

pub async fn run(args: &WhyArgs) -> Result<()> {
    let client = kube::Client::try_default().await.context("building the Kubernetes client")?;
    let target = target::resolve(&client, &args.object, args.namespace.as_deref()).await?;
    let object = target
        .api(client.clone())
        .get(&target.name)
        .await
        .with_context(|| format!("reading {}", target.describe()))?;
    let object = serde_json::to_value(&object)?;
    let cluster: Vec<ClusterAgentPolicy> = Api::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("listing ClusterAgentPolicies")?
        .items;
    let namespaced: Vec<AgentPolicy> =
        Api::all(client.clone()).list(&ListParams::default()).await.context("listing AgentPolicies")?.items;
    let (policies, problems) = PolicySet::compile(&cluster, &namespaced);
    // namespaceSelectors read the object's namespace's labels (a Namespace's own).
    let mut directory = StaticDirectory::default();
    let is_namespace = target.resource.group.is_empty() && target.resource.plural == "namespaces";
    let namespace = if is_namespace { target.name.as_str() } else { target.namespace.as_str() };
    if !namespace.is_empty() {
        let ns: Api<Namespace> = Api::all(client.clone());
        if let Some(ns) = ns.get_opt(namespace).await.context("reading the namespace")? {
            directory
                .namespaces
                .insert(namespace.to_owned(), ns.metadata.labels.unwrap_or_default().into_iter().collect());
        }
    }
    let config = Config { self_namespace: Some(args.self_namespace.clone()), ..Config::default() };
    println!("{} is protected as follows:", target.describe());
    for (operation, new) in [(Operation::Delete, None), (Operation::Update { patch: None }, Some(&object))] {
        let facts = facts(&target, namespace, &object, operation, new);
        print!("{}", render(&explain(&facts, &policies, &directory, &config)));
    }
    for problem in problems {
        println!(
            "note: {} does not compile cleanly and is read in its most restrictive sense: {}",
            problem.policy, problem.message
        );
    }
    Ok(())
}

/// The request an agent's `operation` of the object would be: the live object as prior state
/// (and, for an UPDATE, as the new one: which rules match depends on the object, not the edit).
fn facts<'a>(
    target: &'a target::Target,
    namespace: &'a str,
    object: &'a Value,
    operation: Operation,
    new: Option<&'a Value>,
) -> Facts<'a> {
    Facts {
        operation,
        group: &target.resource.group,
        resource: &target.resource.plural,
        subresource: "",
        namespace,
        name: &target.name,
        object: new,
        old_object: Some(object),
        collateral: &[],
        sent: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::policy::PolicyId;
    use crate::engine::policy::explain::Guard;

    #[test]
    fn the_report_names_policy_rule_action_and_approvers() {
        let e = Explanation {
            operation: "DELETE",
            builtin: None,
            guards: vec![Guard {
                policy: PolicyId { namespace: None, name: "protect-workloads".into() },
                rule: "workloads".into(),
                action: Action::RequireApproval,
                mode: Mode::Enforce,
                subjects: "every agent".into(),
                approvers: Some("users alice; groups sre".into()),
                message: None,
            }],
        };
        assert_eq!(
            render(&e),
            "DELETE by an agent:\n  ClusterAgentPolicy \"protect-workloads\", rule \"workloads\": RequireApproval, for every agent\n    approvers: users alice; groups sre\n  → any agent's DELETE is held for approval\n"
        );
        let none = Explanation {
            operation: "UPDATE",
            builtin: Some(("agentguard-self", "no".into())),
            guards: vec![],
        };
        assert!(render(&none).contains("refused by the built-in rule \"agentguard-self\""));
    }
}
