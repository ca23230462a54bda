//! `agentguard audit`: every agent identity, and the rights RBAC gives it that matter to
//! agentguard — destructive verbs on the resources worth guarding, and the escape routes around
//! the webhook (impersonation, tokens and pods of other ServiceAccounts, RBAC escalation, writes
//! to webhook configurations, policies, agentguard's namespace or the agent's own label).
//!
//! The API server is asked, one `SubjectAccessReview` per (identity, verb, resource, namespace),
//! rather than RBAC objects being read and evaluated here: the authorizer chain is the only
//! ground truth (aggregated ClusterRoles, `escalate`/`bind` semantics, wildcard and subresource
//! matching, authorizers other than RBAC such as webhooks or Node), and a re-implementation
//! would drift from it silently. The cost is request count, kept down by asking cluster-wide
//! first and per namespace only for what is not allowed cluster-wide, at most
//! [`CONCURRENCY`] at a time.
//!
//! Who is an agent comes from [`crate::cluster::caches::agent_set`], the function the webhook uses.
//! Everything but [`run`]'s requests is pure: the plan of access reviews, severities, the
//! findings made of the answers, table and JSON rendering and the exit code: [`checks`] is the
//! plan, [`report`] the findings and their rendering; this module asks the API server.

pub mod checks;
pub mod report;

pub use checks::*;
pub use report::*;

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::Client;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::commands::options::EngineArgs;
use crate::engine::api::{AgentPolicy, ClusterAgentPolicy};
use crate::engine::policy::PolicySet;

/// Access reviews in flight at once.
pub const CONCURRENCY: usize = 16;

/// Where agentguard runs when `--self-namespace` is not given: the namespace the README installs
/// the chart into.
pub const DEFAULT_SELF_NAMESPACE: &str = "agentguard-system";

/// `agentguard audit` flags. The engine flags are `serve`'s, so the same environment yields the
/// same agents.
#[derive(Args, Debug)]
pub struct AuditArgs {
    /// Kubeconfig file (default: KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (default: the current one).
    #[arg(long, env = "AGENTGUARD_AUDIT_CONTEXT")]
    pub context: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', env = "AGENTGUARD_AUDIT_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Exit 1 when a finding has at least this severity (`none`: never).
    #[arg(long, env = "AGENTGUARD_AUDIT_FAIL_ON", value_enum, default_value_t = FailOn::Critical)]
    pub fail_on: FailOn,
    /// agentguard's own ServiceAccount (in `--self-namespace`), whose rights are reported beside
    /// the agents' (a guard's credentials are worth stealing too).
    #[arg(long, env = "AGENTGUARD_SELF_SERVICE_ACCOUNT", default_value = "agentguard")]
    pub self_service_account: String,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FailOn {
    None,
    Medium,
    High,
    Critical,
}

impl FailOn {
    fn threshold(self) -> Option<Severity> {
        match self {
            FailOn::None => None,
            FailOn::Medium => Some(Severity::Medium),
            FailOn::High => Some(Severity::High),
            FailOn::Critical => Some(Severity::Critical),
        }
    }
}

/// Exit codes: findings at or above the threshold, and an audit that could not be completed.
pub const EXIT_FINDINGS: u8 = 1;
pub const EXIT_ERROR: u8 = 2;

/// The SubjectAccessReview for one ask.
pub fn review(identity: &Identity, check: &Check, ask: &Ask) -> SubjectAccessReview {
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: identity.user().map(str::to_owned),
            groups: Some(identity.groups.clone()),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(ask.verb.to_owned()),
                group: Some(check.resource.group.to_owned()),
                resource: Some(check.resource.resource.to_owned()),
                subresource: (!check.resource.subresource.is_empty())
                    .then(|| check.resource.subresource.to_owned()),
                namespace: ask.namespace.clone(),
                name: check.name.clone(),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// `agentguard audit`: prints the report; the exit code says whether the threshold was reached
/// (1) or the cluster could not be audited (2).
pub async fn run(args: AuditArgs) -> ExitCode {
    let AuditArgs { kubeconfig, context, output, fail_on, self_service_account, engine } = args;
    let report = match audit(kubeconfig, context, &self_service_account, &engine).await {
        Ok(report) => report,
        Err(e) => {
            eprintln!("audit failed: {e:#}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match output {
        Output::Table => {
            print!("{}", report.table());
            println!("{}", report.summary());
        }
        Output::Json => {
            println!("{:#}", report.json());
            // stdout stays one JSON document.
            eprintln!("{}", report.summary());
        }
    }
    ExitCode::from(report.exit_code(fail_on))
}

async fn client(kubeconfig: Option<PathBuf>, context: Option<String>) -> Result<Client> {
    let options = KubeConfigOptions { context, ..Default::default() };
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(&path).with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &options).await?
        }
        None if options.context.is_some() => kube::Config::from_kubeconfig(&options).await?,
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// Policies of one kind; none when agentguard's CRDs are not installed.
async fn list_policies<K>(api: Api<K>, plural: &str) -> Result<Vec<K>>
where
    K: Clone + serde::de::DeserializeOwned + fmt::Debug,
{
    match api.list(&ListParams::default()).await {
        Ok(list) => Ok(list.items),
        Err(kube::Error::Api(status)) if status.is_not_found() => {
            tracing::warn!(plural, "agentguard's CRDs are not installed: no policies");
            Ok(Vec::new())
        }
        Err(e) => Err(e).with_context(|| format!("listing {plural}")),
    }
}

async fn audit(
    kubeconfig: Option<PathBuf>,
    context: Option<String>,
    self_service_account: &str,
    engine: &EngineArgs,
) -> Result<Report> {
    let config = engine.config()?;
    let self_namespace = config.self_namespace.clone().unwrap_or_else(|| DEFAULT_SELF_NAMESPACE.into());
    let client = client(kubeconfig, context).await?;
    let (namespaces, service_accounts, cluster_policies, agent_policies) = tokio::try_join!(
        async {
            Api::<Namespace>::all(client.clone())
                .list_metadata(&ListParams::default())
                .await
                .context("listing namespaces")
        },
        async {
            Api::<ServiceAccount>::all(client.clone())
                .list_metadata(&ListParams::default())
                .await
                .context("listing serviceaccounts")
        },
        list_policies(Api::<ClusterAgentPolicy>::all(client.clone()), "clusteragentpolicies"),
        list_policies(Api::<AgentPolicy>::all(client.clone()), "agentpolicies"),
    )?;
    let (policies, _problems) = PolicySet::compile(&cluster_policies, &agent_policies);
    let namespaces: Vec<ObjectMeta> = namespaces.items.into_iter().map(|n| n.metadata).collect();
    let service_accounts: Vec<ObjectMeta> = service_accounts.items.into_iter().map(|s| s.metadata).collect();
    let set = crate::cluster::caches::agent_set(&policies, &config, &namespaces, &service_accounts);
    let mut identities = agents(&set, &service_accounts, &policies, &config);
    let mut plan: Vec<Vec<Check>> =
        identities.iter().map(|i| checks(i, &self_namespace, &config.self_name_prefix)).collect();
    // agentguard's own rights, asked last and reported apart.
    identities.push(Identity::service_account(&self_namespace, self_service_account, vec![Why::Agentguard]));
    plan.push(own_checks());
    let names: Vec<String> = namespaces.iter().filter_map(|n| n.name.clone()).collect();

    let api = Api::<SubjectAccessReview>::all(client);
    let ask_all = |asks: Vec<Ask>| {
        let (api, identities, plan) = (&api, &identities, &plan);
        futures::stream::iter(asks)
            .map(move |ask| async move {
                let sar = review(&identities[ask.identity], &plan[ask.identity][ask.check], &ask);
                let answer = api
                    .create(&PostParams::default(), &sar)
                    .await
                    .context("creating a SubjectAccessReview (the auditor needs create on subjectaccessreviews)")?;
                let status = answer.status.unwrap_or_default();
                if let Some(error) = status.evaluation_error.filter(|e| !e.is_empty()) {
                    tracing::warn!(%error, verb = ask.verb, identity = %identities[ask.identity].identity, "access review evaluation error");
                }
                anyhow::Ok((ask, status.allowed))
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect::<Vec<_>>()
    };
    let mut answers = ask_all(first_round(&plan)).await?;
    let second = second_round(&plan, &answers, &names);
    answers.extend(ask_all(second).await?);
    answers.sort();
    let mut report = report(identities, &plan, &answers, &set.namespaces, names.len());
    report.own = report.agents.pop();
    Ok(report)
}

#[cfg(test)]
mod tests;
