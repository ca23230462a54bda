//! The command line: one module per subcommand (`serve`, `crds`, `check`, `pending`, `audit`,
//! `restore`), each owning its arguments; this module parses them and dispatches. Every `serve`
//! flag can also be set through an environment variable, so the chart configures agentguard
//! without templating arguments.

pub mod audit;
pub mod check;
pub mod options;
pub mod pending;
pub mod restore;
pub mod serve;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "agentguard",
    version,
    about = "Human-approved brakes on destructive Kubernetes changes made by AI agents"
)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the admission webhook.
    Serve(Box<serve::ServeArgs>),
    /// Print the CustomResourceDefinitions generated from the Rust types.
    Crds,
    /// Evaluate policies offline against AdmissionReview files.
    Check(Box<check::CheckArgs>),
    /// List agent requests waiting for approval, with the command that approves each.
    Pending(pending::PendingArgs),
    /// List agent identities and the rights RBAC gives them that matter (asks the API server).
    Audit(Box<audit::AuditArgs>),
    /// Bring back what a recorded agent change removed or altered (an AgentChange record).
    Restore(restore::RestoreArgs),
}

#[derive(Args, Debug)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, env = "AGENTGUARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json, global = true)]
    pub log_format: LogFormat,
    /// Log filter, in `tracing_subscriber::EnvFilter` syntax.
    #[arg(long, env = "AGENTGUARD_LOG", default_value = "info", global = true)]
    pub log_filter: String,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Json,
    Plain,
}

/// Sets up logging and runs the chosen command. Errors exit 1; `audit` chooses its own codes.
pub async fn run(cli: Cli) -> Result<ExitCode> {
    let Cli { log, command } = cli;
    init_tracing(&log)?;
    match command {
        Command::Crds => print!("{}", crate::engine::api::crds_yaml()),
        Command::Check(args) => check::check(&args)?,
        Command::Pending(args) => pending::run(&args).await?,
        Command::Restore(args) => restore::run(&args).await?,
        Command::Serve(args) => serve::serve(*args).await?,
        Command::Audit(args) => return Ok(audit::run(*args).await),
    }
    Ok(ExitCode::SUCCESS)
}

fn init_tracing(log: &LogArgs) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&log.log_filter)
        .with_context(|| format!("invalid log filter {:?}", log.log_filter))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match log.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Plain => builder.init(),
    }
    Ok(())
}
