//! `agentguard serve`, wired top to bottom: certificates, Kubernetes client, caches, the two
//! ports, and an orderly shutdown (readiness fails first, then in-flight requests finish).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::sync::watch;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

use crate::certs::{self, SelfSigned};
use crate::cli::ServeArgs;
use crate::index::Caches;
use crate::metrics::Metrics;
use crate::server::{self, AppState, tls};

pub async fn serve(args: ServeArgs) -> Result<()> {
    let ServeArgs {
        webhook_addr,
        admin_addr,
        tls_cert,
        tls_key,
        cert_reload_seconds,
        client_ca_file,
        engine,
        webhook,
        self_signed,
        trail,
        shutdown_delay_seconds,
        drain_seconds,
    } = args;
    let mut config = engine.config()?;
    let webhook_settings = webhook.settings()?;
    let trail_settings = trail.settings(config.self_namespace.as_deref())?;
    let metrics = Arc::new(Metrics::default());

    let client = kube::Client::try_default().await.context("building the Kubernetes client")?;
    let mut key_reload = None;
    config.approval_keys = match &config.self_namespace {
        Some(ns) => {
            let name = crate::approval_key::secret_name(&config.self_name_prefix);
            let api = Api::<Secret>::namespaced(client.clone(), ns);
            let keys =
                crate::approval_key::load_or_create(&api, &name).await.context("loading the approval key")?;
            key_reload =
                Some(crate::approval_key::keep_current(api, name, keys.clone(), Duration::from_secs(30)));
            keys
        }
        None => {
            tracing::warn!(
                "no --self-namespace: approval tickets are signed with a key of this process only"
            );
            crate::approval_key::ephemeral()?
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
    metrics.certificate_loaded(resolver.not_after());

    let (caches, reflectors) = Caches::start(client.clone(), metrics.clone(), config.clone());
    let (events, event_worker) =
        crate::events::Events::start(client.clone(), metrics.clone(), std::env::var("HOSTNAME").ok());
    let registrar = webhook_settings.map(|settings| {
        Arc::new(crate::webhook::Registrar::new(
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
        trail: trail_settings
            .clone()
            .map(|t| Arc::new(crate::trail::Trail::new(client.clone(), t)) as Arc<dyn server::Recorder>),
        ownership: Some(Arc::new(crate::ownership::Ownership::new(client.clone()))),
        breaker: config
            .self_namespace
            .as_deref()
            .map(|ns| Arc::new(crate::breaker::Breaker::new(client.clone(), ns)) as Arc<dyn server::Charge>),
        ..AppState::new(caches.clone(), config.clone(), metrics.clone())
    });
    let event_worker = tokio::spawn(event_worker);
    let trail_checker = trail_settings.map(|t| {
        tokio::spawn(crate::trail::keep_checked(
            client.clone(),
            t,
            Duration::from_secs(5),
            Duration::from_secs(5),
        ))
    });
    let status = tokio::spawn(crate::status::keep_reported(client, caches, Duration::from_secs(2)));
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
