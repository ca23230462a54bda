//! The command line: one module per subcommand (`serve`, `crds`, `check`, `pending`, `audit`,
//! `restore`, `approve`, `why`, `freeze`/`unfreeze`, `session`, `completions`), each owning its arguments;
//! this module parses them and dispatches. Every `serve` flag can also be set through an
//! environment variable, so the chart configures agentguard without templating arguments.
//!
//! Installed as `kubectl-agentguard` (a link or copy on PATH), the binary is a kubectl plugin:
//! `kubectl agentguard …` runs the same commands; only the name in help and usage changes.

pub mod approve;
pub mod audit;
pub mod check;
pub mod freeze;
pub mod options;
pub mod pending;
pub mod restore;
pub mod serve;
pub mod session;
pub mod target;
pub mod why;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

/// The file name kubectl looks for on PATH to run `kubectl agentguard`.
pub const PLUGIN_NAME: &str = "kubectl-agentguard";

#[derive(Parser, Debug)]
#[command(
    name = "agentguard",
    version,
    about = "Human-approved brakes on destructive Kubernetes changes made by AI agents",
    after_help = "Also a kubectl plugin: installed as kubectl-agentguard on PATH, run it as `kubectl agentguard pending`."
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
    #[command(
        after_help = "Example:\n  agentguard serve --self-namespace agentguard-system --webhook-url https://agentguard.agentguard-system.svc:443/validate"
    )]
    Serve(Box<serve::ServeArgs>),
    /// Print the CustomResourceDefinitions generated from the Rust types.
    #[command(after_help = "Example:\n  agentguard crds > charts/agentguard/crds/crds.yaml")]
    Crds,
    /// Evaluate policies offline against AdmissionReview files.
    #[command(after_help = "Example:\n  agentguard check --test examples/tests/demo.yaml")]
    Check(Box<check::CheckArgs>),
    /// List agent requests waiting for approval, with the command that approves each.
    #[command(after_help = "Example:\n  kubectl agentguard pending -n prod")]
    Pending(pending::PendingArgs),
    /// Approve the latest held request for one object, after showing the whole change.
    #[command(after_help = "Example:\n  kubectl agentguard approve deployment/web -n prod")]
    Approve(approve::ApproveArgs),
    /// Say what protects an object: the policies, rules and built-in rules an agent's DELETE and UPDATE meet.
    #[command(after_help = "Example:\n  kubectl agentguard why deployment/web -n prod")]
    Why(why::WhyArgs),
    /// Emergency stop: refuse every DELETE, UPDATE and CONNECT of one agent, or of all agents.
    #[command(
        after_help = "Examples:\n  kubectl agentguard freeze agents/coder --reason 'deleting namespaces in a loop'\n  kubectl agentguard freeze --all"
    )]
    Freeze(freeze::FreezeArgs),
    /// Lift a freeze.
    #[command(
        after_help = "Examples:\n  kubectl agentguard unfreeze agents/coder\n  kubectl agentguard unfreeze --all"
    )]
    Unfreeze(freeze::UnfreezeArgs),
    /// Break-glass sessions: let one agent make a bounded number of operations in one scope for a while.
    #[command(
        after_help = "Examples:\n  kubectl agentguard session open migrate --agent agents/coder --credential JTI=6e1f... -n prod --resource deployments.apps --operation DELETE --max 5 --ttl 30m --reason 'move to the new cluster'\n  kubectl agentguard session list\n  kubectl agentguard session close migrate"
    )]
    Session(session::SessionArgs),
    /// List agent identities and the rights RBAC gives them that matter (asks the API server).
    #[command(after_help = "Example:\n  agentguard audit -o json")]
    Audit(Box<audit::AuditArgs>),
    /// Bring back what a recorded agent change removed or altered (an AgentChange record).
    #[command(after_help = "Example:\n  agentguard restore delete-0123456789abcdef -n agentguard-system")]
    Restore(restore::RestoreArgs),
    /// Print a shell completion script.
    #[command(after_help = "Example:\n  agentguard completions bash > /etc/bash_completion.d/agentguard")]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Whether the binary was started as the kubectl plugin (its argv[0]'s file name).
pub fn invoked_as_plugin(argv0: &std::ffi::OsStr) -> bool {
    std::path::Path::new(argv0).file_name().is_some_and(|f| f == PLUGIN_NAME)
}

/// Parses the process's arguments, exiting with clap's message on an error, as `Cli::parse`
/// does. As a kubectl plugin, usage and help say `kubectl agentguard`.
pub fn parse() -> Cli {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match parse_from(args) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    }
}

pub fn parse_from(args: Vec<std::ffi::OsString>) -> Result<Cli, clap::Error> {
    let mut command = Cli::command();
    if args.first().is_some_and(|a| invoked_as_plugin(a)) {
        command = command.bin_name("kubectl agentguard");
    }
    let matches = command.try_get_matches_from(args)?;
    Cli::from_arg_matches(&matches)
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
        Command::Approve(args) => approve::run(&args).await?,
        Command::Why(args) => why::run(&args).await?,
        Command::Freeze(args) => freeze::freeze(&args).await?,
        Command::Unfreeze(args) => freeze::unfreeze(&args).await?,
        Command::Session(args) => session::run(&args).await?,
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "agentguard", &mut std::io::stdout())
        }
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

    fn args(words: &[&str]) -> Vec<std::ffi::OsString> {
        words.iter().map(Into::into).collect()
    }

    #[test]
    fn the_plugin_name_runs_the_same_commands() {
        assert!(invoked_as_plugin("/usr/local/bin/kubectl-agentguard".as_ref()));
        assert!(invoked_as_plugin("kubectl-agentguard".as_ref()));
        assert!(!invoked_as_plugin("/usr/bin/agentguard".as_ref()));
        assert!(!invoked_as_plugin("kubectl-agentguard-old".as_ref()));
        for argv0 in ["agentguard", "/opt/bin/kubectl-agentguard"] {
            let cli = parse_from(args(&[argv0, "approve", "deployment/web", "-n", "prod", "--yes"])).unwrap();
            match cli.command {
                Command::Approve(a) => assert_eq!(
                    (a.object.as_str(), a.namespace.as_deref(), a.yes),
                    ("deployment/web", Some("prod"), true)
                ),
                other => panic!("{other:?}"),
            }
        }
        let help =
            parse_from(args(&["/opt/bin/kubectl-agentguard", "why", "--help"])).unwrap_err().to_string();
        assert!(help.contains("Usage: kubectl agentguard why"), "{help}");
        assert!(help.contains("Example:\n  kubectl agentguard why deployment/web -n prod"), "{help}");
        let help = parse_from(args(&["agentguard", "why", "--help"])).unwrap_err().to_string();
        assert!(help.contains("Usage: agentguard why"), "{help}");
    }

    #[test]
    fn freeze_needs_an_agent_or_all() {
        assert!(parse_from(args(&["agentguard", "freeze"])).is_err());
        assert!(parse_from(args(&["agentguard", "freeze", "agents/coder", "--all"])).is_err());
        assert!(parse_from(args(&["agentguard", "freeze", "--all", "--reason", "stop"])).is_ok());
        assert!(parse_from(args(&["agentguard", "unfreeze", "agents/coder"])).is_ok());
    }

    #[test]
    fn completions_cover_the_new_commands() {
        let mut out = Vec::new();
        clap_complete::generate(clap_complete::Shell::Bash, &mut Cli::command(), "agentguard", &mut out);
        let script = String::from_utf8(out).unwrap();
        for command in ["approve", "why", "freeze", "unfreeze", "pending"] {
            assert!(script.contains(command), "{command}");
        }
        Cli::command().debug_assert();
    }
}
