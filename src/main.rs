//! The `agentguard` binary: install the TLS crypto provider, parse arguments, run. Started as
//! `kubectl-agentguard`, it is the same program as a kubectl plugin.

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    // Both rustls users (webhook server, Kubernetes client) need one process-wide provider.
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    agentguard::commands::run(agentguard::commands::parse()).await
}
