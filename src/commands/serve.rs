//! `agentguard serve`, wired top to bottom: certificates, Kubernetes client, caches, the two
//! ports, and an orderly shutdown (readiness fails first, then in-flight requests finish).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use tokio::net::TcpListener;
use tokio::sync::watch;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

use crate::cluster::caches::Caches;
use crate::cluster::certs::{self, SelfSigned};
use crate::commands::options::EngineArgs;
use crate::metrics::Metrics;
use crate::request::server::{self, AppState, tls};

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
    /// Offer HTTP/2 (ALPN `h2`) on the webhook port. The API server speaks HTTP/1.1 to a webhook
    /// reached through a Service or a non-loopback URL whatever is offered; `false` makes a
    /// loopback `--webhook-url` (tests, benchmarks) behave the same.
    #[arg(long, env = "AGENTGUARD_WEBHOOK_HTTP2", default_value_t = true, action = clap::ArgAction::Set)]
    pub webhook_http2: bool,
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
    /// Refuse agents' requests (HTTP 503, so the webhook's failurePolicy refuses them) and fail
    /// readiness while the API server has not answered for longer than this, e.g. `60s`.
    #[arg(long, env = "AGENTGUARD_MAX_STALENESS", default_value = "60s", value_parser = parse_staleness)]
    pub max_staleness: Duration,
    /// Requests that may be making API calls at once (records, churn charges, blast radius,
    /// registration); one that waits longer than a second for its turn is refused (503). Four
    /// times as many agents' requests may be under way at once; the next is refused at once.
    #[arg(long, env = "AGENTGUARD_MAX_INFLIGHT_API_REQUESTS", default_value_t = crate::request::actions::DEFAULT_API_SLOTS as u32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_inflight_api_requests: u32,
}

fn parse_staleness(text: &str) -> Result<Duration, String> {
    match crate::engine::api::parse_duration(text) {
        Some(d) if d >= Duration::from_secs(1) => Ok(d),
        Some(_) => Err("at least 1s".into()),
        None => Err(format!("{text:?} is not a duration such as 60s or 2m")),
    }
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
    pub fn settings(&self, self_namespace: Option<&str>) -> Result<Option<crate::cluster::trail::Settings>> {
        let (Some(namespace), false) = (self_namespace, self.no_records) else { return Ok(None) };
        let retention = crate::engine::api::parse_duration(&self.record_retention).with_context(|| {
            format!("--record-retention {:?} is not a duration such as 720h", self.record_retention)
        })?;
        Ok(Some(crate::cluster::trail::Settings {
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
    pub fn settings(&self) -> Result<Option<crate::cluster::webhook::Settings>> {
        use crate::cluster::webhook::{Endpoint, Settings};
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
            self_namespace: None,
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

pub async fn serve(args: ServeArgs) -> Result<()> {
    let ServeArgs {
        webhook_addr,
        admin_addr,
        tls_cert,
        tls_key,
        cert_reload_seconds,
        client_ca_file,
        webhook_http2,
        engine,
        webhook,
        self_signed,
        trail,
        shutdown_delay_seconds,
        drain_seconds,
        max_staleness,
        max_inflight_api_requests,
    } = args;
    let max_staleness = crate::cluster::freshness::Bound(max_staleness);
    let mut config = engine.config()?;
    let webhook_settings = webhook
        .settings()?
        .map(|s| crate::cluster::webhook::Settings { self_namespace: config.self_namespace.clone(), ..s });
    let trail_settings = trail.settings(config.self_namespace.as_deref())?;
    let metrics = Arc::new(Metrics::default());

    let client = kube::Client::try_default().await.context("building the Kubernetes client")?;
    let mut key_reload = None;
    config.approval_keys = match &config.self_namespace {
        Some(ns) => {
            let name = crate::cluster::approval_key::secret_name(&config.self_name_prefix);
            let api = Api::<Secret>::namespaced(client.clone(), ns);
            let keys = crate::cluster::approval_key::load_or_create(&api, &name)
                .await
                .context("loading the approval key")?;
            key_reload = Some(crate::cluster::approval_key::keep_current(
                api,
                name,
                keys.clone(),
                Duration::from_secs(30),
            ));
            keys
        }
        None => {
            tracing::warn!(
                "no --self-namespace: approval tickets are signed with a key of this process only"
            );
            crate::cluster::approval_key::ephemeral()?
        }
    };
    let key_reload = key_reload.map(tokio::spawn);

    // Certificates first: without them there is nothing to serve.
    let certs = match &self_signed.self_signed_secret {
        None => None,
        Some(secret) => {
            let cfg = SelfSigned {
                namespace: config
                    .self_namespace
                    .clone()
                    .context("--self-signed-secret needs --self-namespace")?,
                secret: secret.clone(),
                dns_names: self_signed.self_signed_dns_names.clone(),
                ips: self_signed.self_signed_ips.clone(),
                validity: Duration::from_secs(self_signed.self_signed_validity_seconds.max(60)),
                ca_validity: Duration::from_secs(self_signed.self_signed_ca_validity_seconds.max(60)),
                propagation: Duration::from_secs(self_signed.self_signed_propagation_seconds),
                cert_file: tls_cert.clone(),
                key_file: tls_key.clone(),
                ca_file: webhook.webhook_ca_file.clone(),
            };
            let api = Api::<Secret>::namespaced(client.clone(), &cfg.namespace);
            let bundle = certs::ensure(&api, &cfg).await.context("making the self-managed certificate")?;
            certs::write_files(&cfg, &bundle)?;
            Some((api, cfg, Duration::from_secs(self_signed.self_signed_check_seconds.max(1))))
        }
    };
    let cert_files = tls::CertFiles { cert: tls_cert, key: tls_key };
    let resolver = tls::CertResolver::load(&cert_files).context("loading the serving certificate")?;
    let tls_config = match &client_ca_file {
        None => tls::server_config(resolver.clone()),
        Some(ca) => tls::server_config_requiring_clients(resolver.clone(), ca)?,
    };
    let tls_config = if webhook_http2 { tls_config } else { tls::without_http2(tls_config) };
    metrics.certificate_loaded(resolver.not_after());

    let (caches, reflectors) = Caches::start(client.clone(), metrics.clone(), config.clone(), max_staleness);
    let (events, event_worker) = crate::cluster::events::Events::start(
        client.clone(),
        metrics.clone(),
        std::env::var("HOSTNAME").ok(),
    );
    let registrar = webhook_settings.map(|settings| {
        Arc::new(crate::cluster::webhook::Registrar::new(
            client.clone(),
            caches.clone(),
            config.clone(),
            settings,
            events.clone(),
            metrics.clone(),
        ))
    });
    let state = Arc::new(AppState {
        events,
        registrar: registrar.clone().map(|r| r as Arc<dyn server::Register>),
        trail: trail_settings.clone().map(|t| {
            Arc::new(crate::cluster::trail::Trail::new(client.clone(), t)) as Arc<dyn server::Recorder>
        }),
        ownership: Some(Arc::new(crate::cluster::ownership::Ownership::new(client.clone()))),
        breaker: config.self_namespace.as_deref().map(|ns| {
            Arc::new(crate::cluster::breaker::Breaker::new(client.clone(), ns)) as Arc<dyn server::Charge>
        }),
        sessions: config.self_namespace.as_deref().map(|ns| {
            Arc::new(crate::cluster::sessions::Sessions::new(client.clone(), ns)) as Arc<dyn server::Spend>
        }),
        max_staleness,
        api_slots: crate::request::actions::ApiSlots::new(
            max_inflight_api_requests as usize,
            crate::request::actions::DEFAULT_API_WAIT,
        ),
        ..AppState::new(caches.clone(), config.clone(), metrics.clone())
    });
    let event_worker = tokio::spawn(event_worker);
    let trail_checker = trail_settings.map(|t| {
        tokio::spawn(crate::cluster::trail::keep_checked(
            client.clone(),
            t,
            Duration::from_secs(5),
            Duration::from_secs(5),
        ))
    });
    let status = tokio::spawn(crate::cluster::status::keep_reported(client, caches, Duration::from_secs(2)));
    // Registration follows the caches: it starts only once they are synced.
    let registration = registrar.map(|registrar| {
        tokio::spawn(registrar.keep_current(Duration::from_millis(200), Duration::from_secs(5)))
    });

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let webhook = TcpListener::bind(webhook_addr).await.with_context(|| format!("binding {webhook_addr}"))?;
    let admin = TcpListener::bind(admin_addr).await.with_context(|| format!("binding {admin_addr}"))?;
    tracing::info!(%webhook_addr, %admin_addr, "listening");

    let reload = tokio::spawn(tls::watch(
        resolver.clone(),
        cert_files,
        Duration::from_secs(cert_reload_seconds.max(1)),
        shutdown_rx.clone(),
        {
            let metrics = metrics.clone();
            move |r: &tls::CertResolver| metrics.certificate_reloaded(r.not_after())
        },
    ));
    let reflectors = tokio::spawn(reflectors);
    let renewal = certs.map(|(api, cfg, every)| tokio::spawn(certs::keep_current(api, cfg, every)));
    let admin_server = {
        let mut rx = shutdown_rx.clone();
        let router = server::admin_router(state.clone());
        tokio::spawn(async move {
            axum::serve(admin, router)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                })
                .await
        })
    };
    let webhook_server = tokio::spawn(tls::serve(
        webhook,
        tls_config,
        server::webhook_router(state.clone()),
        shutdown_rx,
        Duration::from_secs(drain_seconds),
    ));

    wait_for_signal().await;
    tracing::info!(delay_seconds = shutdown_delay_seconds, "shutting down: failing readiness first");
    state.shutting_down.store(true, Ordering::Release);
    tokio::time::sleep(Duration::from_secs(shutdown_delay_seconds)).await;
    shutdown_tx.send_replace(true);
    webhook_server.await.context("webhook server task")?.context("webhook server")?;
    admin_server.await.context("admin server task")?.context("admin server")?;
    reload.abort();
    reflectors.abort();
    event_worker.abort();
    if let Some(r) = renewal {
        r.abort();
    }
    status.abort();
    if let Some(k) = key_reload {
        k.abort();
    }
    if let Some(t) = trail_checker {
        t.abort();
    }
    if let Some(r) = registration {
        r.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
