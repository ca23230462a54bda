//! A webhook server for `hack/bench.sh`, without a cluster: either agentguard's own webhook
//! router or a do-nothing webhook, both served by agentguard's TLS stack
//! ([`agentguard::request::server::tls`]: tokio-rustls with ring, hyper, axum) with a fresh
//! self-signed ECDSA P-256 certificate, so that the difference between the two is what
//! agentguard does with a request.
//!
//! ```text
//! bench_webhook agentguard POLICIES.yaml   # the decisions of `agentguard check` over HTTPS
//! bench_webhook noop                       # read the body, take the uid, answer allowed
//! ```
//!
//! It listens on a free loopback port and prints `listening on ADDRESS` once it accepts
//! connections; it stops on SIGTERM or Ctrl-C. The agentguard side decides from the policies,
//! Namespaces and ServiceAccounts in the YAML files (as `agentguard check` does), logs like
//! `agentguard serve` (JSON on stderr, filter from `AGENTGUARD_LOG`), and does none of the
//! API calls `serve` may make for an admitted agent change (audit record, churn budget,
//! ownership lookup, Events). Its clock is fixed at the time the example reviews were written,
//! so their approvals are still valid.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentguard::engine::policy::{Config, PolicySet};
use agentguard::metrics::Metrics;
use agentguard::request::server::{self, AppState, StaticCluster, tls};
use anyhow::{Context, Result, bail};
use axum::body::Bytes;
use axum::http::header;
use axum::response::IntoResponse;

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let app = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["agentguard", ref policies @ ..] if !policies.is_empty() => {
            let log = agentguard::commands::LogArgs {
                log_format: agentguard::commands::LogFormat::Json,
                log_filter: std::env::var("AGENTGUARD_LOG").unwrap_or_else(|_| "info".into()),
            };
            let _flush_on_exit = agentguard::commands::init_tracing(&log)?;
            let paths: Vec<PathBuf> = policies.iter().map(PathBuf::from).collect();
            return run(agentguard_router(&paths)?).await;
        }
        ["noop"] => noop_router(),
        _ => bail!("usage: bench_webhook agentguard POLICIES.yaml... | bench_webhook noop"),
    };
    run(app).await
}

async fn run(app: axum::Router) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let files = self_signed(dir.path())?;
    let config = tls::server_config(tls::CertResolver::load(&files)?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("listening on {}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        stop.send_replace(true);
    });
    tls::serve(listener, config, app, stopped, Duration::from_secs(1)).await?;
    Ok(())
}

/// agentguard's webhook routes over the policies and identities of `paths`.
fn agentguard_router(paths: &[PathBuf]) -> Result<axum::Router> {
    let (cluster, namespaced, directory) = agentguard::commands::check::load_world(paths)?;
    let (policies, problems) = PolicySet::compile(&cluster, &namespaced);
    if let Some(p) = problems.first() {
        bail!("policy {}: {}", p.policy, p.message);
    }
    let cluster = Arc::new(StaticCluster { policies: Arc::new(policies), directory });
    // The key `agentguard check --test` signs with, which the example approvals were made with.
    let config =
        Config { approval_keys: agentguard::engine::approval::Keys::fixed_for_tests(), ..Config::default() };
    let mut state = AppState::new(cluster, config, Arc::new(Metrics::default()));
    state.clock = when_the_examples_were_written;
    Ok(server::webhook_router(Arc::new(state)))
}

fn when_the_examples_were_written() -> jiff::Timestamp {
    "2026-11-26T12:10:00Z".parse().expect("a valid timestamp")
}

/// The least a webhook can do: read the body, parse out the uid, answer allowed.
fn noop_router() -> axum::Router {
    #[derive(serde::Deserialize)]
    struct Review {
        request: Request,
    }
    #[derive(serde::Deserialize)]
    struct Request {
        uid: String,
    }
    async fn allow(body: Bytes) -> axum::response::Response {
        let Ok(review) = serde_json::from_slice::<Review>(&body) else {
            return axum::http::StatusCode::BAD_REQUEST.into_response();
        };
        let answer = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": {"uid": review.request.uid, "allowed": true},
        });
        ([(header::CONTENT_TYPE, "application/json")], answer.to_string()).into_response()
    }
    axum::Router::new().fallback(axum::routing::post(allow))
}

/// A self-signed certificate for `localhost` and 127.0.0.1, written where the TLS stack reads.
fn self_signed(dir: &std::path::Path) -> Result<tls::CertFiles> {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .context("generating a certificate")?;
    let files = tls::CertFiles { cert: dir.join("tls.crt"), key: dir.join("tls.key") };
    std::fs::write(&files.cert, certified.cert.pem())?;
    std::fs::write(&files.key, certified.signing_key.serialize_pem())?;
    Ok(files)
}
