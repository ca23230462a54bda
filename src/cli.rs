//! The command line: `serve`, `crds`, `check`, `audit`. Every `serve` flag can also be set through an
//! environment variable, so the chart configures agentguard without templating arguments.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use jiff::Timestamp;
use serde_json::Value;

use crate::admission::{self, Snapshot};
use crate::api::{AGENT_LABEL, Action, AgentPolicy, ClusterAgentPolicy};
use crate::policy::identity::StaticDirectory;
use crate::policy::{Config, PolicySet, Verdict};

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
    Serve(Box<ServeArgs>),
    /// Print the CustomResourceDefinitions generated from the Rust types.
    Crds,
    /// Evaluate policies offline against AdmissionReview files.
    Check(Box<CheckArgs>),
    /// List agent requests waiting for approval, with the command that approves each.
    Pending(crate::pending::PendingArgs),
    /// List agent identities and the rights RBAC gives them that matter (asks the API server).
    Audit(Box<crate::rbac_audit::AuditArgs>),
    /// Bring back what a recorded agent change removed or altered (an AgentChange record).
    Restore(crate::restore::RestoreArgs),
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

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address of the HTTPS webhook port.
    #[arg(long, env = "AGENTGUARD_WEBHOOK_ADDR", default_value = "0.0.0.0:8443")]
    pub webhook_addr: std::net::SocketAddr,
    /// Address of the admin port (/livez, /readyz, /metrics).
    #[arg(long, env = "AGENTGUARD_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: std::net::SocketAddr,
    /// PEM certificate chain served on the webhook port.
    #[arg(long, env = "AGENTGUARD_TLS_CERT", default_value = "/tls/tls.crt")]
    pub tls_cert: PathBuf,
    /// PEM private key of that certificate.
    #[arg(long, env = "AGENTGUARD_TLS_KEY", default_value = "/tls/tls.key")]
    pub tls_key: PathBuf,
    /// How often the certificate files are checked for changes, in seconds.
    #[arg(long, env = "AGENTGUARD_CERT_RELOAD_SECONDS", default_value_t = 5)]
    pub cert_reload_seconds: u64,
    /// PEM CA bundle: require every webhook client to present a certificate it signed (the API
    /// server's, set in its AdmissionConfiguration). Without it, any client may connect.
    #[arg(long, env = "AGENTGUARD_CLIENT_CA_FILE")]
    pub client_ca_file: Option<PathBuf>,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub webhook: WebhookArgs,
    #[command(flatten)]
    pub self_signed: SelfSignedArgs,
    #[command(flatten)]
    pub trail: TrailArgs,
    /// After SIGTERM, how long /readyz fails before the listener stops, in seconds.
    #[arg(long, env = "AGENTGUARD_SHUTDOWN_DELAY_SECONDS", default_value_t = 5)]
    pub shutdown_delay_seconds: u64,
    /// Longest wait for in-flight requests to finish on shutdown, in seconds.
    #[arg(long, env = "AGENTGUARD_DRAIN_SECONDS", default_value_t = 20)]
    pub drain_seconds: u64,
}

/// The audit trail of admitted agent changes (AgentChange records in `--self-namespace`).
#[derive(Args, Debug, Clone)]
pub struct TrailArgs {
    /// Do not record admitted agent changes.
    #[arg(long, env = "AGENTGUARD_NO_RECORDS")]
    pub no_records: bool,
    /// Largest prior object a record keeps, in bytes of JSON (larger ones are recorded without it).
    #[arg(long, env = "AGENTGUARD_RECORD_MAX_OBJECT_BYTES", default_value_t = 262_144, value_parser = clap::value_parser!(u64).range(1024..=1_000_000))]
    pub record_max_object_bytes: u64,
    /// Keep Secret data in records (off by default).
    #[arg(long, env = "AGENTGUARD_RECORD_SECRET_DATA")]
    pub record_secret_data: bool,
    /// How long records are kept, e.g. `720h`.
    #[arg(long, env = "AGENTGUARD_RECORD_RETENTION", default_value = "720h")]
    pub record_retention: String,
    /// Most records kept; the oldest are deleted first.
    #[arg(long, env = "AGENTGUARD_RECORD_MAX", default_value_t = 10_000)]
    pub record_max: usize,
}

impl TrailArgs {
    /// None when recording is off or there is no namespace to record into.
    pub fn settings(&self, self_namespace: Option<&str>) -> Result<Option<crate::trail::Settings>> {
        let (Some(namespace), false) = (self_namespace, self.no_records) else { return Ok(None) };
        let retention = crate::api::parse_duration(&self.record_retention).with_context(|| {
            format!("--record-retention {:?} is not a duration such as 720h", self.record_retention)
        })?;
        Ok(Some(crate::trail::Settings {
            namespace: namespace.to_owned(),
            max_object_bytes: usize::try_from(self.record_max_object_bytes)?,
            keep_secret_data: self.record_secret_data,
            retention,
            max_records: self.record_max,
        }))
    }
}

/// How agentguard registers itself with the API server. Without `--webhook-url` or
/// `--webhook-service` it leaves the webhook configuration alone.
#[derive(Args, Debug, Clone)]
pub struct WebhookArgs {
    /// Name of the ValidatingWebhookConfiguration agentguard keeps current.
    #[arg(long, env = "AGENTGUARD_WEBHOOK_CONFIGURATION", default_value = "agentguard")]
    pub webhook_configuration: String,
    /// Reach the webhook port at this base URL (clusters without in-cluster networking, tests):
    /// the `agents` webhook is called at BASE/validate/agents, the `approvals` webhook at
    /// BASE/validate/approvals. A trailing `/validate` is accepted and ignored.
    #[arg(long, env = "AGENTGUARD_WEBHOOK_URL", conflicts_with = "webhook_service")]
    pub webhook_url: Option<String>,
    /// Reach the webhook through this Service, as NAMESPACE/NAME:PORT (paths
    /// /validate/agents and /validate/approvals).
    #[arg(long, env = "AGENTGUARD_WEBHOOK_SERVICE")]
    pub webhook_service: Option<String>,
    /// PEM CA bundle the API server verifies the webhook's certificate with.
    #[arg(long, env = "AGENTGUARD_WEBHOOK_CA_FILE", default_value = "/tls/ca.crt")]
    pub webhook_ca_file: PathBuf,
    /// API server timeout for one webhook call, in seconds.
    #[arg(long, env = "AGENTGUARD_WEBHOOK_TIMEOUT_SECONDS", default_value_t = 5, value_parser = clap::value_parser!(i32).range(1..=30))]
    pub webhook_timeout_seconds: i32,
    /// Create the configuration if it has never been seen (`false` when an installer such as
    /// the Helm chart creates it; one seen and then deleted is recreated either way).
    #[arg(long, env = "AGENTGUARD_CREATE_WEBHOOK_CONFIGURATION", default_value_t = true, action = clap::ArgAction::Set)]
    pub create_webhook_configuration: bool,
}

impl WebhookArgs {
    /// None when agentguard leaves the webhook configuration alone.
    pub fn settings(&self) -> Result<Option<crate::webhook::Settings>> {
        use crate::webhook::{Endpoint, Settings};
        let Self {
            webhook_configuration,
            webhook_url,
            webhook_service,
            webhook_ca_file,
            webhook_timeout_seconds,
            create_webhook_configuration,
        } = self;
        let endpoint = match (webhook_url, webhook_service) {
            (Some(url), _) => Endpoint::Url(url.clone()),
            (None, Some(service)) => {
                let parse = || -> Option<Endpoint> {
                    let (namespace, rest) = service.split_once('/')?;
                    let (name, port) = rest.split_once(':')?;
                    Some(Endpoint::Service {
                        namespace: namespace.into(),
                        name: name.into(),
                        port: port.parse().ok()?,
                    })
                };
                parse()
                    .with_context(|| format!("--webhook-service {service:?} is not NAMESPACE/NAME:PORT"))?
            }
            (None, None) => return Ok(None),
        };
        Ok(Some(Settings {
            name: webhook_configuration.clone(),
            endpoint,
            ca_file: webhook_ca_file.clone(),
            timeout_seconds: *webhook_timeout_seconds,
            create_absent: *create_webhook_configuration,
        }))
    }
}

/// Certificates agentguard makes and rotates itself (when cert-manager is not used).
#[derive(Args, Debug, Clone)]
pub struct SelfSignedArgs {
    /// Keep a CA and a serving certificate in this Secret of `--self-namespace`, and write them
    /// to `--tls-cert`, `--tls-key` and `--webhook-ca-file`.
    #[arg(long, env = "AGENTGUARD_SELF_SIGNED_SECRET")]
    pub self_signed_secret: Option<String>,
    /// DNS names of the serving certificate (repeat or comma-separate).
    #[arg(long = "self-signed-dns-name", env = "AGENTGUARD_SELF_SIGNED_DNS_NAMES", value_delimiter = ',')]
    pub self_signed_dns_names: Vec<String>,
    /// IP addresses of the serving certificate (repeat or comma-separate).
    #[arg(long = "self-signed-ip", env = "AGENTGUARD_SELF_SIGNED_IPS", value_delimiter = ',')]
    pub self_signed_ips: Vec<std::net::IpAddr>,
    /// Lifetime of a serving certificate, in seconds; renewed with a third left.
    #[arg(long, env = "AGENTGUARD_SELF_SIGNED_VALIDITY_SECONDS", default_value_t = 90 * 24 * 3600)]
    pub self_signed_validity_seconds: u64,
    /// Lifetime of the self-managed CA, in seconds; succeeded by a new one with a third left.
    #[arg(long, env = "AGENTGUARD_SELF_SIGNED_CA_VALIDITY_SECONDS", default_value_t = 10 * 365 * 24 * 3600)]
    pub self_signed_ca_validity_seconds: u64,
    /// How long a new CA is only trusted before it signs, in seconds (longer than the check).
    #[arg(long, env = "AGENTGUARD_SELF_SIGNED_PROPAGATION_SECONDS", default_value_t = 600)]
    pub self_signed_propagation_seconds: u64,
    /// How often the Secret is checked for renewal (or another replica's renewal), in seconds.
    #[arg(long, env = "AGENTGUARD_SELF_SIGNED_CHECK_SECONDS", default_value_t = 60)]
    pub self_signed_check_seconds: u64,
}

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
            approval_keys: crate::approval::Keys::none(),
        })
    }
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// YAML/JSON files with ClusterAgentPolicies, AgentPolicies, and the ServiceAccounts and
    /// Namespaces whose labels matter.
    #[arg(long = "policies", short = 'p', required_unless_present = "tests", requires = "reviews", num_args = 1..)]
    pub policies: Vec<PathBuf>,
    /// AdmissionReview files (JSON or YAML) to judge.
    #[arg(long = "reviews", short = 'r', requires = "policies", num_args = 1..)]
    pub reviews: Vec<PathBuf>,
    /// Test files with expected decisions (see `check` in the README); exits 1 when a case fails.
    #[arg(long = "test", short = 't', num_args = 1..)]
    pub tests: Vec<PathBuf>,
    /// Evaluate as of this time (RFC 3339); defaults to now.
    #[arg(long)]
    pub now: Option<Timestamp>,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// Reads every YAML document (JSON is YAML) of a file.
fn documents(path: &PathBuf) -> Result<Vec<Value>> {
    use serde::Deserialize as _;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = Value::deserialize(doc).with_context(|| format!("parsing {}", path.display()))?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// Policies and the directory (ServiceAccounts, Namespaces) described by YAML/JSON files.
pub fn load_world(paths: &[PathBuf]) -> Result<(Vec<ClusterAgentPolicy>, Vec<AgentPolicy>, StaticDirectory)> {
    let (mut cluster, mut namespaced) = (Vec::new(), Vec::new());
    let mut directory = StaticDirectory::default();
    for path in paths {
        for doc in documents(path)? {
            let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default().to_owned();
            let name = doc.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_owned();
            let labels = || -> Result<std::collections::BTreeMap<String, String>> {
                let labels = doc.pointer("/metadata/labels").cloned().unwrap_or(Value::Null);
                if labels.is_null() {
                    return Ok(Default::default());
                }
                serde_json::from_value(labels)
                    .with_context(|| format!("labels of {kind} {name:?} in {}", path.display()))
            };
            match kind.as_str() {
                "ClusterAgentPolicy" => cluster.push(
                    serde_json::from_value::<ClusterAgentPolicy>(doc)
                        .with_context(|| format!("ClusterAgentPolicy {name:?} in {}", path.display()))?,
                ),
                "AgentPolicy" => namespaced.push(
                    serde_json::from_value::<AgentPolicy>(doc)
                        .with_context(|| format!("AgentPolicy {name:?} in {}", path.display()))?,
                ),
                "ServiceAccount" => {
                    let ns = doc.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("default");
                    directory.service_accounts.insert((ns.to_owned(), name.clone()), labels()?);
                }
                "Namespace" => {
                    let labels = labels()?;
                    directory.namespaces.insert(name, labels);
                }
                other => bail!("{}: unexpected kind {other:?} among policies", path.display()),
            }
        }
    }
    Ok((cluster, namespaced, directory))
}

/// `agentguard check`: prints one line per review; exits non-zero only on unreadable input.
pub fn check(args: &CheckArgs) -> Result<()> {
    // Offline, tickets are issued and checked under a fixed, public test key.
    let config = Config { approval_keys: crate::approval::Keys::fixed_for_tests(), ..args.engine.config()? };
    if !args.tests.is_empty() {
        let (mut passed, mut failed) = (0, 0);
        for file in &args.tests {
            for o in crate::check::run_file(file, &config)? {
                let status = if o.passed { "PASS" } else { "FAIL" };
                println!("{status} {}: {}", file.display(), o.name);
                if o.passed {
                    passed += 1;
                } else {
                    failed += 1;
                    println!("  {}", o.detail);
                }
            }
        }
        println!("check: {passed} passed, {failed} failed");
        anyhow::ensure!(failed == 0, "{failed} policy test case(s) failed");
        return Ok(());
    }
    let (cluster, namespaced, directory) = load_world(&args.policies)?;
    let (policies, problems) = PolicySet::compile(&cluster, &namespaced);
    for p in &problems {
        println!("PROBLEM {}: {}", p.policy, p.message);
    }
    let now = args.now.unwrap_or_else(Timestamp::now);
    let snapshot =
        Snapshot { policies: &policies, directory: &directory, config: &config, now, collateral: &[] };
    for path in &args.reviews {
        for doc in documents(path)? {
            let body = serde_json::to_vec(&doc)?;
            let line = match admission::decode(&body) {
                Err(m) => format!("REFUSED {}: {m}", path.display()),
                Ok(request) => {
                    let decision = admission::review(&request, &snapshot);
                    let head = format!(
                        "{} {} ({})",
                        decision.outcome().to_uppercase(),
                        path.display(),
                        request.user_info.username
                    );
                    let mut line = match &decision.verdict {
                        Verdict::Deny(denial) => format!("{head}\n  {denial}"),
                        Verdict::Allow(why) => format!("{head}\n  {why}"),
                    };
                    for w in decision.warnings.iter().chain(&decision.audits) {
                        line.push_str(&format!("\n  warning: {w}"));
                    }
                    line
                }
            };
            println!("{line}");
        }
    }
    Ok(())
}

/// Sets up logging and runs the chosen command. Errors exit 1; `audit` chooses its own codes.
pub async fn run(cli: Cli) -> Result<ExitCode> {
    let Cli { log, command } = cli;
    init_tracing(&log)?;
    match command {
        Command::Crds => print!("{}", crate::api::crds_yaml()),
        Command::Check(args) => check(&args)?,
        Command::Pending(args) => crate::pending::run(&args).await?,
        Command::Restore(args) => crate::restore::run(&args).await?,
        Command::Serve(args) => crate::run::serve(*args).await?,
        Command::Audit(args) => return Ok(crate::rbac_audit::run(*args).await),
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
