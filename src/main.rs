//! The `agentguard` binary: install the TLS crypto provider, parse arguments, run.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    // Both rustls users (webhook server, Kubernetes client) need one process-wide provider.
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    agentguard::commands::run(agentguard::commands::Cli::parse()).await
}
