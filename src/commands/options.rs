//! Flags more than one command reads: who is an agent, and what an unmatched request gets.

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use crate::engine::api::{AGENT_LABEL, Action};
use crate::engine::policy::Config;

/// Settings of the policy engine shared by `serve` and `check`.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Label marking agent ServiceAccounts, as KEY=VALUE.
    #[arg(long, env = "AGENTGUARD_AGENT_LABEL", default_value_t = format!("{AGENT_LABEL}=true"))]
    pub agent_label: String,
    /// Usernames that are agents whatever the policies say (repeat or comma-separate).
    #[arg(long = "agent-username", env = "AGENTGUARD_AGENT_USERNAMES", value_delimiter = ',')]
    pub agent_usernames: Vec<String>,
    /// Groups whose members are agents (repeat or comma-separate).
    #[arg(long = "agent-group", env = "AGENTGUARD_AGENT_GROUPS", value_delimiter = ',')]
    pub agent_groups: Vec<String>,
    /// What an agent's DELETE/UPDATE that no enforced policy matches gets.
    #[arg(long, env = "AGENTGUARD_UNMATCHED", value_enum, default_value_t = Unmatched::Allow)]
    pub unmatched: Unmatched,
    /// agentguard's own namespace: agents may touch nothing in it.
    #[arg(long, env = "AGENTGUARD_SELF_NAMESPACE")]
    pub self_namespace: Option<String>,
    /// Name prefix of agentguard's webhook configurations and cluster RBAC objects.
    #[arg(long, env = "AGENTGUARD_SELF_NAME_PREFIX", default_value = "agentguard")]
    pub self_name_prefix: String,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Unmatched {
    Allow,
    Deny,
}

impl EngineArgs {
    pub fn config(&self) -> Result<Config> {
        let Self { agent_label, agent_usernames, agent_groups, unmatched, self_namespace, self_name_prefix } =
            self;
        let (key, value) = agent_label
            .split_once('=')
            .with_context(|| format!("--agent-label {agent_label:?} is not KEY=VALUE"))?;
        Ok(Config {
            agent_label: (key.to_owned(), value.to_owned()),
            agent_usernames: agent_usernames.clone(),
            agent_groups: agent_groups.clone(),
            unmatched: match unmatched {
                Unmatched::Allow => Action::Allow,
                Unmatched::Deny => Action::Deny,
            },
            self_namespace: self_namespace.clone(),
            self_name_prefix: self_name_prefix.clone(),
            // `serve` loads the cluster's key; offline commands use the fixed test key.
            approval_keys: crate::engine::approval::Keys::none(),
        })
    }
}
