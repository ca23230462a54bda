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
    // Held until the command returns, so that the lines still queued are written before exit.
    let _flush_on_exit = init_tracing(&log)?;
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

/// rustls warns on every handshake whose client names the server by IP address in SNI (which
/// such clients should not send, and rustls then ignores): noise, one line per connection.
const QUIET_TARGETS: &str = "rustls::msgs::handshake=error";

/// Installs the global subscriber: lines go to stderr through a writer thread, so a request
/// never waits on the terminal or the container runtime's pipe, and are written in batches.
/// The returned guard flushes what is still queued when dropped.
pub fn init_tracing(log: &LogArgs) -> Result<tracing_appender::non_blocking::WorkerGuard> {
    let filter = log_filter(&log.log_filter)?;
    let stderr = std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr());
    // Not lossy: a full queue makes requests wait rather than drop a refusal's line.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("agentguard-log")
        .finish(stderr);
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    match log.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Plain => builder.init(),
    }
    Ok(guard)
}

/// The filter `--log-filter` asks for, with [`QUIET_TARGETS`] unless it names rustls itself.
fn log_filter(asked: &str) -> Result<tracing_subscriber::EnvFilter> {
    let filter = tracing_subscriber::EnvFilter::try_new(asked)
        .with_context(|| format!("invalid log filter {asked:?}"))?;
    if asked.contains("rustls") {
        return Ok(filter);
    }
    Ok(filter.add_directive(QUIET_TARGETS.parse().expect("a valid directive")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_handshake_warnings_are_quiet_unless_asked_for() {
        let shown = |asked: &str| log_filter(asked).unwrap().to_string();
        assert!(shown("info").contains("rustls::msgs::handshake=error"), "{}", shown("info"));
        assert!(shown("debug,kube=info").contains("rustls::msgs::handshake=error"));
        assert_eq!(shown("info,rustls=debug"), "rustls=debug,info");
        assert!(log_filter("info,=nonsense=").is_err());
    }
}
