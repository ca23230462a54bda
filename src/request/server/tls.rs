//! HTTPS side of the webhook server.
//!
//! Owns: loading the serving certificate and private key from PEM files,
//! keeping the current pair in a lock-free slot that rustls consults on every
//! handshake, polling the files so a rotated Secret is picked up without a
//! restart or a dropped request, and the TLS accept loop with graceful
//! shutdown.
//!
//! Must not: know anything about admission, routes or policy (it serves
//! whatever `axum::Router` it is given); install a process-wide rustls crypto
//! provider (other TLS users in the process, such as the Kubernetes client,
//! choose their own); exit the process or treat a single bad connection as
//! fatal; log or expose private key material.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use rustls::InconsistentKeys;
use rustls::ServerConfig;
use rustls::crypto::ring;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::cluster::certs::leaf_not_after;

/// A client that opens a TCP connection but never finishes the handshake
/// must not hold a task (and a drain slot) forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Same for a client that connects but dribbles its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Accept errors (EMFILE, ENOBUFS, ...) are usually transient; pausing avoids
/// a hot loop while they last.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Where the serving certificate chain and its private key live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM file with the leaf certificate first, then any intermediates.
    pub cert: PathBuf,
    /// PEM file with the private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
}

/// Why a certificate/key pair could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not valid PEM: {source}", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("no certificate (BEGIN CERTIFICATE) found in PEM file {}", path.display())]
    NoCertificate { path: PathBuf },
    #[error(
        "no private key (BEGIN PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY) found in PEM file {}",
        path.display()
    )]
    NoPrivateKey { path: PathBuf },
    #[error(
        "unsupported or corrupt private key in {}: {source} (supported: ECDSA P-256/P-384, RSA, Ed25519)",
        path.display()
    )]
    UnsupportedKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("invalid leaf certificate in {}: {source}", path.display())]
    InvalidCertificate {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "private key in {} does not match the certificate in {}",
        key.display(),
        cert.display()
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
}

/// Current certificate, swappable at runtime.
///
/// rustls asks [`ResolvesServerCert::resolve`] once per handshake; the
/// `ArcSwap` makes that a lock-free load, and a reload only affects
/// handshakes that start after it. Established connections keep the key they
/// negotiated with.
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
    /// Last reload error message, so a file that stays broken is reported
    /// once per distinct problem instead of on every poll.
    last_failure: Mutex<Option<String>>,
}

impl CertResolver {
    /// Read and validate the files; fails if anything is wrong with them.
    pub fn load(files: &CertFiles) -> Result<Arc<Self>, Error> {
        let key = read_certified_key(files)?;
        log_loaded(files, &key, "certificate loaded");
        Ok(Arc::new(Self { current: ArcSwap::from_pointee(key), last_failure: Mutex::new(None) }))
    }

    /// Re-read the files; swap in the new key only if it parses, matches its
    /// certificate and differs from the current one. Returns `Ok(true)` when
    /// swapped, `Ok(false)` when the files hold the pair already in use.
    ///
    /// On error the current certificate stays in place (and keeps serving);
    /// a warning is logged the first time each distinct problem is seen.
    pub fn reload(&self, files: &CertFiles) -> Result<bool, Error> {
        let outcome = read_certified_key(files).map(|new| {
            // Chains are compared rather than keys: a key that matches an
            // identical leaf is the same key pair, whatever its PEM encoding.
            if self.current.load().cert == new.cert {
                return false;
            }
            log_loaded(files, &new, "certificate reloaded");
            self.current.store(Arc::new(new));
            true
        });
        let mut last_failure = self.last_failure.lock().unwrap_or_else(PoisonError::into_inner);
        match &outcome {
            Ok(_) => {
                if last_failure.take().is_some() {
                    info!(cert = %files.cert.display(), "certificate files are valid again");
                }
            }
            Err(err) => {
                let message = err.to_string();
                if last_failure.as_deref() == Some(message.as_str()) {
                    debug!(error = %err, "certificate files still invalid; keeping the current certificate");
                } else {
                    warn!(error = %err, "certificate reload failed; keeping the current certificate");
                    *last_failure = Some(message);
                }
            }
        }
        outcome
    }

    /// The certificate chain and key currently handed to new handshakes.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    /// Not-after of the current leaf certificate, as unix seconds; `None` if
    /// the validity field cannot be read.
    pub fn not_after(&self) -> Option<i64> {
        self.current.load().cert.first().and_then(|leaf| leaf_not_after(leaf))
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl fmt::Debug for CertResolver {
    // Hand-written so that no part of the signing key can end up in a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = self.current.load();
        f.debug_struct("CertResolver")
            .field("chain_len", &current.cert.len())
            .field("not_after", &current.cert.first().and_then(|leaf| leaf_not_after(leaf)))
            .finish_non_exhaustive()
    }
}

/// Poll `files` every `every` and reload the resolver when they change, until
/// `shutdown` turns true (or its sender is dropped). `on_reload` runs after
/// each swap (for metrics: this module knows nothing of them).
///
/// Polling rather than inotify: Kubernetes Secret volumes update by swapping a
/// `..data` symlink, which file watches on the visible paths do not see
/// reliably.
pub async fn watch(
    resolver: Arc<CertResolver>,
    files: CertFiles,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
    on_reload: impl Fn(&CertResolver) + Send + 'static,
) {
    let files = Arc::new(files);
    loop {
        tokio::select! {
            () = shutdown_requested(&mut shutdown) => break,
            () = tokio::time::sleep(every) => {}
        }
        // File reads and key parsing are blocking work; keep them off the
        // async workers. Errors are logged by `reload` itself.
        let (task_resolver, files) = (Arc::clone(&resolver), Arc::clone(&files));
        match tokio::task::spawn_blocking(move || task_resolver.reload(&files)).await {
            Ok(Ok(true)) => on_reload(&resolver),
            Ok(_) => {}
            Err(err) => warn!(error = %err, "certificate reload task failed"),
        }
    }
    debug!("certificate watcher stopped");
}

/// rustls server configuration that takes its certificate from `resolver`
/// and offers ALPN `h2` and `http/1.1`.
pub fn server_config(resolver: Arc<CertResolver>) -> Arc<ServerConfig> {
    // An explicit provider instead of the process default: with more than one
    // rustls backend compiled in, relying on the default can panic.
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        // Infallible: the ring provider ships cipher suites and key exchange
        // groups for every default protocol version.
        .expect("ring provider supports the default TLS versions")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // No session resumption: a resumed handshake skips the certificate, so a
    // client could keep "seeing" the pre-rotation certificate indefinitely,
    // and the API server's webhook client keeps long-lived connections and
    // does not resume anyway.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

/// `config` offering only HTTP/1.1 by ALPN. The API server's webhook client asks for HTTP/1.1
/// alone whenever the webhook is reached through a Service or a URL that is not on loopback (so
/// that its calls spread over replicas), and for HTTP/2 too only on loopback: this makes a
/// loopback webhook (tests, benchmarks) spoken to as a cluster's is.
pub fn without_http2(config: Arc<ServerConfig>) -> Arc<ServerConfig> {
    let mut config = Arc::unwrap_or_clone(config);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Like [`server_config`], but every client must present a certificate signed by a CA in the
/// PEM file `client_ca` (the API server's webhook client certificate, configured through its
/// AdmissionConfiguration kubeconfig). Read once at start.
pub fn server_config_requiring_clients(
    resolver: Arc<CertResolver>,
    client_ca: &Path,
) -> anyhow::Result<Arc<ServerConfig>> {
    use anyhow::Context as _;
    let pem = std::fs::read(client_ca).with_context(|| format!("reading {}", client_ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.with_context(|| format!("parsing {}", client_ca.display()))?;
        roots.add(cert).with_context(|| format!("a CA certificate in {}", client_ca.display()))?;
    }
    anyhow::ensure!(!roots.is_empty(), "{} holds no CA certificate", client_ca.display());
    let provider = Arc::new(ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .context("building the client certificate verifier")?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring provider supports the default TLS versions")
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Accept TLS connections on `listener` and serve `app` over HTTP/1.1 or
/// HTTP/2 until `shutdown` turns true (or its sender is dropped).
///
/// Then the listener is closed, so new connections are refused, open
/// connections are asked to finish their in-flight requests and close, and
/// whatever is still open after `drain` is cut. Failed handshakes and
/// connection errors are logged at debug level and never stop the loop.
/// Currently always returns `Ok`.
pub async fn serve(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    app: axum::Router,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) -> io::Result<()> {
    let acceptor = TlsAcceptor::from(config);
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();

    loop {
        tokio::select! {
            // Checked first so that no connection is accepted once shutdown
            // has been requested.
            biased;
            () = shutdown_requested(&mut shutdown) => break,
            // Reap finished connection tasks so the set does not grow.
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                if let Err(err) = joined && err.is_panic() {
                    warn!(error = %err, "connection task panicked");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    connections.spawn(serve_connection(
                        tcp,
                        peer,
                        acceptor.clone(),
                        http.clone(),
                        app.clone(),
                        // Taken before the handshake so the drain waits for
                        // this connection too.
                        graceful.watcher(),
                        shutdown.clone(),
                    ));
                }
                Err(err) => {
                    warn!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }

    drop(listener);
    info!(
        open_connections = graceful.count(),
        drain_secs = drain.as_secs_f64(),
        "shutting down: stopped accepting, draining connections"
    );
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        warn!(still_open = connections.len(), "drain period elapsed; closing remaining connections");
    }
    // Aborts only the stragglers left after the drain deadline.
    connections.shutdown().await;
    Ok(())
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    http: auto::Builder<TokioExecutor>,
    app: axum::Router,
    watcher: Watcher,
    mut shutdown: watch::Receiver<bool>,
) {
    // Webhook responses are small; don't let Nagle delay them.
    if let Err(err) = tcp.set_nodelay(true) {
        debug!(%peer, error = %err, "cannot set TCP_NODELAY");
    }
    let tls = tokio::select! {
        handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(err)) => {
                debug!(%peer, error = %err, "TLS handshake failed");
                return;
            }
            Err(_) => {
                debug!(%peer, "TLS handshake timed out");
                return;
            }
        },
        // No request has been received on this connection yet, so there is
        // nothing to drain: drop it.
        () = shutdown_requested(&mut shutdown) => return,
    };
    let connection = http.serve_connection(TokioIo::new(tls), TowerToHyperService::new(app));
    if let Err(err) = watcher.watch(connection).await {
        debug!(%peer, error = %err, "connection ended with an error");
    }
}

/// Resolves once `shutdown` is true. A dropped sender counts as shutdown too:
/// nobody could ever stop the caller otherwise.
async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    // `wait_for` looks at the current value first, so a shutdown requested
    // before this call is not missed.
    let _ = shutdown.wait_for(|&stop| stop).await;
}

fn read_file(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read { path: path.to_owned(), source })
}

fn read_certified_key(files: &CertFiles) -> Result<CertifiedKey, Error> {
    let cert_pem = read_file(&files.cert)?;
    let key_pem = read_file(&files.key)?;

    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| Error::Pem { path: files.cert.clone(), source })?;
    if chain.is_empty() {
        return Err(Error::NoCertificate { path: files.cert.clone() });
    }

    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|err| match err {
        pem::Error::NoItemsFound => Error::NoPrivateKey { path: files.key.clone() },
        source => Error::Pem { path: files.key.clone(), source },
    })?;
    let signing_key = ring::sign::any_supported_type(&key)
        .map_err(|source| Error::UnsupportedKey { path: files.key.clone(), source })?;

    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => {}
        // The key cannot report its public half, so there is nothing to
        // compare; the ring signers always can, so this is not expected.
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(Error::KeyMismatch { cert: files.cert.clone(), key: files.key.clone() });
        }
        // `keys_match` parses the leaf, so this reports a broken certificate.
        Err(source) => {
            return Err(Error::InvalidCertificate { path: files.cert.clone(), source });
        }
    }
    Ok(certified)
}

fn log_loaded(files: &CertFiles, key: &CertifiedKey, message: &'static str) {
    let not_after = key.cert.first().and_then(|leaf| leaf_not_after(leaf));
    info!(
        cert = %files.cert.display(),
        chain_len = key.cert.len(),
        not_after,
        "{message}"
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    if not_after.is_some_and(|t| t < now) {
        warn!(cert = %files.cert.display(), not_after, "serving certificate has expired");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::certs::{
        DER_GENERALIZED_TIME, DER_INTEGER, DER_SEQUENCE, DER_UTC_TIME, asn1_time_to_unix, der_expect,
    };

    use std::collections::HashSet;

    use axum::Router;
    use axum::routing::get;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        SignatureAlgorithm,
    };
    use tokio::task::JoinHandle;

    struct Ca {
        params: CertificateParams,
        key: KeyPair,
        pem: String,
    }

    impl Ca {
        fn new(name: &str) -> Self {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let key = KeyPair::generate().unwrap();
            let pem = params.self_signed(&key).unwrap().pem();
            Self { params, key, pem }
        }

        fn issue(&self) -> Leaf {
            self.issue_with(KeyPair::generate().unwrap(), |_| {})
        }

        fn issue_with(&self, key: KeyPair, tweak: impl FnOnce(&mut CertificateParams)) -> Leaf {
            let mut params =
                CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
            tweak(&mut params);
            let cert = params.signed_by(&key, &Issuer::from_params(&self.params, &self.key)).unwrap();
            Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().to_vec(), key }
        }

        fn root(&self) -> reqwest::Certificate {
            reqwest::Certificate::from_pem(self.pem.as_bytes()).unwrap()
        }
    }

    struct Leaf {
        cert_pem: String,
        key_pem: String,
        der: Vec<u8>,
        key: KeyPair,
    }

    fn files_in(dir: &Path) -> CertFiles {
        CertFiles { cert: dir.join("tls.crt"), key: dir.join("tls.key") }
    }

    fn write(files: &CertFiles, cert_pem: &str, key_pem: &str) {
        std::fs::write(&files.cert, cert_pem).unwrap();
        std::fs::write(&files.key, key_pem).unwrap();
    }

    fn write_leaf(files: &CertFiles, leaf: &Leaf) {
        write(files, &leaf.cert_pem, &leaf.key_pem);
    }

    /// Fresh connection per request, so every request is a new handshake
    /// and sees the certificate that is current at that moment.
    fn client(cas: &[&Ca]) -> reqwest::Client {
        let mut builder = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .tls_info(true)
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(5));
        for ca in cas {
            builder = builder.add_root_certificate(ca.root());
        }
        builder.build().unwrap()
    }

    /// GET `path` and return the leaf certificate the server presented.
    async fn fetch_cert(client: &reqwest::Client, addr: SocketAddr, path: &str) -> Result<Vec<u8>, String> {
        let response = client.get(format!("https://{addr}{path}")).send().await.map_err(error_chain)?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(format!("status {}", response.status()));
        }
        let cert = response
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|info| info.peer_certificate())
            .map(<[u8]>::to_vec)
            .ok_or("no peer certificate")?;
        let body = response.text().await.map_err(error_chain)?;
        if body != "ok" && body != "slow" {
            return Err(format!("unexpected body {body:?}"));
        }
        Ok(cert)
    }

    fn error_chain(err: impl std::error::Error) -> String {
        let mut text = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }

    struct Server {
        addr: SocketAddr,
        stop: watch::Sender<bool>,
        task: JoinHandle<io::Result<()>>,
    }

    impl Server {
        /// Signals shutdown and waits for the serve loop to return cleanly.
        async fn shutdown(self) {
            self.stop.send(true).unwrap();
            self.task.await.unwrap().unwrap();
        }
    }

    async fn start(resolver: &Arc<CertResolver>, app: Router, drain: Duration) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        let config = server_config(Arc::clone(resolver));
        let task = tokio::spawn(serve(listener, config, app, stopped, drain));
        Server { addr, stop, task }
    }

    fn ok_app() -> Router {
        Router::new().route("/", get(|| async { "ok" }))
    }

    fn base64(data: &[u8]) -> String {
        const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    fn pem_encode(label: &str, der: &[u8]) -> String {
        let body = base64(der);
        let lines: Vec<&str> =
            body.as_bytes().chunks(64).map(|line| std::str::from_utf8(line).unwrap()).collect();
        format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
    }

    #[test]
    fn load_reports_what_is_wrong_with_which_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = files_in(dir.path());
        let ca = Ca::new("ca");
        let leaf = ca.issue();
        let other = ca.issue();

        let err = CertResolver::load(&files).unwrap_err();
        assert!(matches!(&err, Error::Read { path, .. } if *path == files.cert), "{err:?}");
        assert!(err.to_string().starts_with("cannot read "), "{err}");
        assert!(err.to_string().contains("tls.crt"), "{err}");

        std::fs::write(&files.cert, &leaf.cert_pem).unwrap();
        let err = CertResolver::load(&files).unwrap_err();
        assert!(
            matches!(&err, Error::Read { path, source } if *path == files.key && source.kind() == io::ErrorKind::NotFound),
            "{err:?}"
        );

        // A key where the certificate should be.
        write(&files, &leaf.key_pem, &leaf.key_pem);
        let err = CertResolver::load(&files).unwrap_err();
        assert!(matches!(&err, Error::NoCertificate { path } if *path == files.cert), "{err:?}");
        assert!(err.to_string().contains("no certificate"), "{err}");

        write(&files, &leaf.cert_pem, "not a key at all\n");
        let err = CertResolver::load(&files).unwrap_err();
        assert!(matches!(&err, Error::NoPrivateKey { path } if *path == files.key), "{err:?}");
        assert!(err.to_string().contains("no private key"), "{err}");

        write(&files, "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n", &leaf.key_pem);
        let err = CertResolver::load(&files).unwrap_err();
        assert!(matches!(&err, Error::Pem { path, .. } if *path == files.cert), "{err:?}");

        // Well-formed PEM around bytes that are no key.
        write(&files, &leaf.cert_pem, &pem_encode("PRIVATE KEY", b"definitely not PKCS#8"));
        let err = CertResolver::load(&files).unwrap_err();
        assert!(matches!(&err, Error::UnsupportedKey { path, .. } if *path == files.key), "{err:?}");

        write(&files, &pem_encode("CERTIFICATE", b"not DER"), &leaf.key_pem);
        let err = CertResolver::load(&files).unwrap_err();
        assert!(matches!(&err, Error::InvalidCertificate { path, .. } if *path == files.cert), "{err:?}");

        write(&files, &leaf.cert_pem, &other.key_pem);
        let err = CertResolver::load(&files).unwrap_err();
        assert!(
            matches!(&err, Error::KeyMismatch { cert, key } if *cert == files.cert && *key == files.key),
            "{err:?}"
        );
        assert!(err.to_string().contains("does not match"), "{err}");

        write_leaf(&files, &leaf);
        let resolver = CertResolver::load(&files).unwrap();
        assert_eq!(resolver.current().cert[0].as_ref(), leaf.der.as_slice());
    }

    #[tokio::test]
    async fn serves_every_supported_key_type() {
        let ca = Ca::new("ca");
        let client = client(&[&ca]);
        let algorithms: [(&str, &'static SignatureAlgorithm); 3] = [
            ("p256", &rcgen::PKCS_ECDSA_P256_SHA256),
            ("p384", &rcgen::PKCS_ECDSA_P384_SHA384),
            ("ed25519", &rcgen::PKCS_ED25519),
        ];
        let mut cases: Vec<(String, Leaf)> = algorithms
            .into_iter()
            .map(|(name, alg)| {
                let key = KeyPair::generate_for(alg).unwrap();
                (name.to_owned(), ca.issue_with(key, |_| {}))
            })
            .collect();

        // SEC1 ("EC PRIVATE KEY"): the ECPrivateKey inside rcgen's PKCS#8.
        let mut sec1 = ca.issue();
        let pkcs8 = sec1.key.serialize_der();
        let (info, _) = der_expect(DER_SEQUENCE, &pkcs8).unwrap();
        let (_version, rest) = der_expect(DER_INTEGER, info).unwrap();
        let (_algorithm, rest) = der_expect(DER_SEQUENCE, rest).unwrap();
        let (ec_private_key, _) = der_expect(0x04, rest).unwrap();
        sec1.key_pem = pem_encode("EC PRIVATE KEY", ec_private_key);
        cases.push(("sec1".to_owned(), sec1));

        for (name, leaf) in cases {
            let dir = tempfile::tempdir().unwrap();
            let files = files_in(dir.path());
            write_leaf(&files, &leaf);
            let resolver =
                CertResolver::load(&files).unwrap_or_else(|err| panic!("{name}: load failed: {err}"));
            let server = start(&resolver, ok_app(), Duration::from_secs(1)).await;
            let served = fetch_cert(&client, server.addr, "/")
                .await
                .unwrap_or_else(|err| panic!("{name}: request failed: {err}"));
            assert_eq!(served, leaf.der, "{name}");
            server.shutdown().await;
        }
    }

    #[tokio::test]
    async fn reload_swaps_to_a_new_ca() {
        let dir = tempfile::tempdir().unwrap();
        let files = files_in(dir.path());
        let (ca1, ca2) = (Ca::new("ca1"), Ca::new("ca2"));
        let (leaf1, leaf2) = (ca1.issue(), ca2.issue());
        write_leaf(&files, &leaf1);
        let resolver = CertResolver::load(&files).unwrap();
        let server = start(&resolver, ok_app(), Duration::from_secs(1)).await;
        let (only_ca1, only_ca2) = (client(&[&ca1]), client(&[&ca2]));

        assert_eq!(fetch_cert(&only_ca1, server.addr, "/").await.unwrap(), leaf1.der);
        let err = fetch_cert(&only_ca2, server.addr, "/").await.unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
        assert!(!resolver.reload(&files).unwrap(), "unchanged files swapped");

        write_leaf(&files, &leaf2);
        assert!(resolver.reload(&files).unwrap(), "new files not swapped");
        assert!(!resolver.reload(&files).unwrap(), "swapped twice");

        assert_eq!(fetch_cert(&only_ca2, server.addr, "/").await.unwrap(), leaf2.der);
        let err = fetch_cert(&only_ca1, server.addr, "/").await.unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");

        server.shutdown().await;
    }

    /// Lays the files out like a Kubernetes Secret volume: `tls.crt` and
    /// `tls.key` point through a `..data` symlink that an update swaps
    /// atomically to a new timestamped directory.
    #[cfg(unix)]
    fn publish_secret(root: &Path, version: usize, leaf: &Leaf) {
        let data_dir = format!("..v{version}");
        std::fs::create_dir(root.join(&data_dir)).unwrap();
        write_leaf(&files_in(&root.join(&data_dir)), leaf);
        let tmp_link = root.join("..data_tmp");
        std::os::unix::fs::symlink(&data_dir, &tmp_link).unwrap();
        std::fs::rename(&tmp_link, root.join("..data")).unwrap();
        if version == 0 {
            for name in ["tls.crt", "tls.key"] {
                std::os::unix::fs::symlink(format!("..data/{name}"), root.join(name)).unwrap();
            }
        }
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn no_request_fails_while_watch_rotates_the_certificate() {
        const REQUESTS: usize = 200;
        const ROTATIONS: usize = 5;
        let dir = tempfile::tempdir().unwrap();
        let files = files_in(dir.path());
        let (ca1, ca2) = (Ca::new("ca1"), Ca::new("ca2"));
        let leaves: Vec<Leaf> =
            (0..=ROTATIONS).map(|i| if i % 2 == 0 { ca1.issue() } else { ca2.issue() }).collect();
        publish_secret(dir.path(), 0, &leaves[0]);

        let resolver = CertResolver::load(&files).unwrap();
        let server = start(&resolver, ok_app(), Duration::from_secs(1)).await;
        let watcher = tokio::spawn(watch(
            Arc::clone(&resolver),
            files.clone(),
            Duration::from_millis(50),
            server.stop.subscribe(),
            |_: &CertResolver| {},
        ));

        let addr = server.addr;
        let requests = tokio::spawn(async move {
            let client = client(&[&ca1, &ca2]);
            let mut outcomes = Vec::with_capacity(REQUESTS);
            for _ in 0..REQUESTS {
                outcomes.push(fetch_cert(&client, addr, "/").await);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (client, outcomes)
        });
        for (version, leaf) in leaves.iter().enumerate().skip(1) {
            tokio::time::sleep(Duration::from_millis(130)).await;
            publish_secret(dir.path(), version, leaf);
        }
        let (client, outcomes) = requests.await.unwrap();

        let failures: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
        assert!(
            failures.is_empty(),
            "{} of {REQUESTS} requests failed, first: {}",
            failures.len(),
            failures[0]
        );
        let served: HashSet<&Vec<u8>> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
        assert!(served.len() >= 3, "only {} distinct certificates served during rotation", served.len());

        // The last rotation may land after the request stream ended.
        let last = &leaves[ROTATIONS].der;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while resolver.current().cert[0].as_ref() != last.as_slice() {
            assert!(tokio::time::Instant::now() < deadline, "watch never loaded the last rotation");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(&fetch_cert(&client, addr, "/").await.unwrap(), last);

        server.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(1), watcher)
            .await
            .expect("watch did not stop on shutdown")
            .unwrap();
        server.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_bad_new_file_keeps_the_old_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let files = files_in(dir.path());
        let ca = Ca::new("ca");
        let leaf1 = ca.issue();
        let leaf2 = ca.issue_with(KeyPair::generate().unwrap(), |params| {
            params.not_after = rcgen::date_time_ymd(2031, 5, 17);
        });
        write_leaf(&files, &leaf1);
        let resolver = CertResolver::load(&files).unwrap();
        let server = start(&resolver, ok_app(), Duration::from_secs(1)).await;
        let client = client(&[&ca]);

        write(&files, &leaf2.cert_pem, "garbage\n");
        let err = resolver.reload(&files).unwrap_err();
        assert!(matches!(err, Error::NoPrivateKey { .. }), "{err:?}");
        // Reported again (not swallowed) when it is still broken.
        let err = resolver.reload(&files).unwrap_err();
        assert!(matches!(err, Error::NoPrivateKey { .. }), "{err:?}");
        assert_eq!(fetch_cert(&client, server.addr, "/").await.unwrap(), leaf1.der);

        // New certificate, old key: half-finished rotation.
        write(&files, &leaf2.cert_pem, &leaf1.key_pem);
        let err = resolver.reload(&files).unwrap_err();
        assert!(matches!(err, Error::KeyMismatch { .. }), "{err:?}");
        assert_eq!(fetch_cert(&client, server.addr, "/").await.unwrap(), leaf1.der);

        // The watcher rides out the broken files and picks up the fixed ones,
        // reporting only the swap.
        let reloads = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&reloads);
        let watcher = tokio::spawn(watch(
            Arc::clone(&resolver),
            files.clone(),
            Duration::from_millis(20),
            server.stop.subscribe(),
            move |r: &CertResolver| seen.lock().unwrap().push(r.not_after()),
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(fetch_cert(&client, server.addr, "/").await.unwrap(), leaf1.der);
        write_leaf(&files, &leaf2);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let served = fetch_cert(&client, server.addr, "/").await.unwrap();
            if served == leaf2.der {
                break;
            }
            assert_eq!(served, leaf1.der);
            assert!(tokio::time::Instant::now() < deadline, "fixed files never loaded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A few more polls of the same files: no further swap is reported.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(*reloads.lock().unwrap(), [Some(1_936_742_400)]);

        server.stop.send(true).unwrap();
        watcher.await.unwrap();
        server.task.await.unwrap().unwrap();
    }

    /// App whose `/slow` handler flags `started`, then takes `delay`.
    fn slow_app(started: Arc<tokio::sync::Notify>, delay: Duration) -> Router {
        Router::new().route(
            "/slow",
            get(move || {
                let started = Arc::clone(&started);
                async move {
                    started.notify_one();
                    tokio::time::sleep(delay).await;
                    "slow"
                }
            }),
        )
    }

    async fn connection_refused_within(addr: SocketAddr, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if let Err(err) = TcpStream::connect(addr).await
                && err.kind() == io::ErrorKind::ConnectionRefused
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }

    #[tokio::test]
    async fn graceful_shutdown_finishes_in_flight_requests_and_refuses_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let files = files_in(dir.path());
        let ca = Ca::new("ca");
        let leaf = ca.issue();
        write_leaf(&files, &leaf);
        let resolver = CertResolver::load(&files).unwrap();
        let started = Arc::new(tokio::sync::Notify::new());
        let app = slow_app(Arc::clone(&started), Duration::from_millis(300));
        let server = start(&resolver, app, Duration::from_secs(5)).await;
        let client = client(&[&ca]);

        let addr = server.addr;
        let in_flight = tokio::spawn(async move { fetch_cert(&client, addr, "/slow").await });
        started.notified().await;
        server.stop.send(true).unwrap();

        assert!(
            connection_refused_within(addr, Duration::from_millis(200)).await,
            "still accepting connections after shutdown"
        );
        assert!(!in_flight.is_finished(), "slow request ended before the test could check the listener");
        assert_eq!(in_flight.await.unwrap().unwrap(), leaf.der);
        tokio::time::timeout(Duration::from_secs(1), server.task)
            .await
            .expect("serve did not return after draining")
            .unwrap()
            .unwrap();
        assert!(connection_refused_within(addr, Duration::from_millis(100)).await);
    }

    #[tokio::test]
    async fn drain_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let files = files_in(dir.path());
        let ca = Ca::new("ca");
        write_leaf(&files, &ca.issue());
        let resolver = CertResolver::load(&files).unwrap();
        let started = Arc::new(tokio::sync::Notify::new());
        let app = slow_app(Arc::clone(&started), Duration::from_secs(30));
        let server = start(&resolver, app, Duration::from_millis(200)).await;
        let client = client(&[&ca]);

        let addr = server.addr;
        let in_flight = tokio::spawn(async move { fetch_cert(&client, addr, "/slow").await });
        started.notified().await;
        let begin = tokio::time::Instant::now();
        server.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(2), server.task)
            .await
            .expect("serve ignored the drain deadline")
            .unwrap()
            .unwrap();
        assert!(begin.elapsed() >= Duration::from_millis(200));
        let outcome = tokio::time::timeout(Duration::from_secs(2), in_flight)
            .await
            .expect("cut connection was left hanging")
            .unwrap();
        assert!(outcome.is_err(), "request past the drain deadline succeeded");
    }

    #[tokio::test]
    async fn dropping_the_shutdown_sender_stops_serving() {
        let dir = tempfile::tempdir().unwrap();
        let files = files_in(dir.path());
        let ca = Ca::new("ca");
        write_leaf(&files, &ca.issue());
        let resolver = CertResolver::load(&files).unwrap();
        let server = start(&resolver, ok_app(), Duration::from_secs(1)).await;
        drop(server.stop);
        tokio::time::timeout(Duration::from_secs(1), server.task)
            .await
            .expect("serve kept running without a shutdown sender")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn failed_handshakes_do_not_stop_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let files = files_in(dir.path());
        let (ca, stranger) = (Ca::new("ca"), Ca::new("stranger"));
        let leaf = ca.issue();
        write_leaf(&files, &leaf);
        let resolver = CertResolver::load(&files).unwrap();
        let server = start(&resolver, ok_app(), Duration::from_secs(1)).await;

        // Plain HTTP on the TLS port, then a client that rejects the cert.
        let response = reqwest::Client::new().get(format!("http://{}/", server.addr)).send().await;
        assert!(response.is_err(), "plain HTTP was answered");
        assert!(fetch_cert(&client(&[&stranger]), server.addr, "/").await.is_err());
        assert_eq!(fetch_cert(&client(&[&ca]), server.addr, "/").await.unwrap(), leaf.der);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_client_ca_makes_client_certificates_mandatory() {
        let dir = tempfile::tempdir().unwrap();
        let files = files_in(dir.path());
        let server_ca = Ca::new("server ca");
        write_leaf(&files, &server_ca.issue());
        let resolver = CertResolver::load(&files).unwrap();
        let clients = Ca::new("api server clients");
        let ca_file = dir.path().join("clients.pem");
        std::fs::write(&ca_file, &clients.pem).unwrap();
        let config = server_config_requiring_clients(Arc::clone(&resolver), &ca_file).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(serve(listener, config, ok_app(), stopped, Duration::from_secs(1)));
        let url = format!("https://{addr}/");
        let with = |ca: &Ca| {
            let leaf = ca.issue_with(KeyPair::generate().unwrap(), |p| {
                p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            });
            let identity =
                reqwest::Identity::from_pem(format!("{}{}", leaf.cert_pem, leaf.key_pem).as_bytes()).unwrap();
            reqwest::Client::builder()
                .tls_built_in_root_certs(false)
                .add_root_certificate(server_ca.root())
                .identity(identity)
                .build()
                .unwrap()
        };
        assert!(client(&[&server_ca]).get(&url).send().await.is_err(), "no client certificate");
        assert!(with(&Ca::new("someone else")).get(&url).send().await.is_err(), "another CA");
        let answer = with(&clients).get(&url).send().await.unwrap();
        assert_eq!(answer.text().await.unwrap(), "ok");
        stop.send(true).unwrap();
        task.await.unwrap().unwrap();
        // A CA file without a certificate is an error, not an open door.
        std::fs::write(&ca_file, "").unwrap();
        assert!(server_config_requiring_clients(resolver, &ca_file).is_err());
    }

    #[tokio::test]
    async fn alpn_offers_h2_and_http1() {
        let dir = tempfile::tempdir().unwrap();
        let files = files_in(dir.path());
        let ca = Ca::new("ca");
        write_leaf(&files, &ca.issue());
        let resolver = CertResolver::load(&files).unwrap();
        let server = start(&resolver, ok_app(), Duration::from_secs(1)).await;

        let mut roots = rustls::RootCertStore::empty();
        let ca_der = CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap();
        roots.add(ca_der).unwrap();
        for (offered, expected) in [
            (vec![b"h2".to_vec(), b"http/1.1".to_vec()], b"h2".as_slice()),
            (vec![b"http/1.1".to_vec()], b"http/1.1".as_slice()),
        ] {
            let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            config.alpn_protocols = offered;
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let tcp = TcpStream::connect(server.addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let tls = connector.connect(name, tcp).await.unwrap();
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(expected));
        }
        server.shutdown().await;
    }

    #[tokio::test]
    async fn without_http2_a_client_offering_both_gets_http1() {
        let dir = tempfile::tempdir().unwrap();
        let files = files_in(dir.path());
        let ca = Ca::new("ca");
        write_leaf(&files, &ca.issue());
        let resolver = CertResolver::load(&files).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        let config = without_http2(server_config(Arc::clone(&resolver)));
        let task = tokio::spawn(serve(listener, config, ok_app(), stopped, Duration::from_secs(1)));
        let server = Server { addr, stop, task };

        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(b"http/1.1".as_slice()));
        drop(tls);
        server.shutdown().await;
    }

    #[test]
    fn not_after_reads_utc_and_generalized_time() {
        let ca = Ca::new("ca");
        let dir = tempfile::tempdir().unwrap();
        let files = files_in(dir.path());
        // Before 2050 certificates carry UTCTime, from 2050 GeneralizedTime.
        let cases = [
            (rcgen::date_time_ymd(2031, 5, 17) + time_of_day(), 1_936_787_445),
            (rcgen::date_time_ymd(2061, 2, 3), 2_874_614_400),
        ];
        for (not_after, expected) in cases {
            let leaf = ca.issue_with(KeyPair::generate().unwrap(), |params| {
                params.not_after = not_after;
            });
            write_leaf(&files, &leaf);
            let resolver = CertResolver::load(&files).unwrap();
            assert_eq!(resolver.not_after(), Some(expected));
        }
        assert_eq!(asn1_time_to_unix(DER_UTC_TIME, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(asn1_time_to_unix(DER_UTC_TIME, b"500101000000Z"), Some(-631_152_000));
        assert_eq!(asn1_time_to_unix(DER_UTC_TIME, b"501301000000Z"), None);
        assert_eq!(asn1_time_to_unix(DER_GENERALIZED_TIME, b"2030010100000Z"), None);
        assert_eq!(leaf_not_after(b"\x30\x03\x02\x01"), None);
    }

    /// 12:30:45 as an offset added to midnight.
    fn time_of_day() -> Duration {
        Duration::from_secs(12 * 3600 + 30 * 60 + 45)
    }

    #[test]
    fn debug_output_does_not_leak_the_key() {
        let ca = Ca::new("ca");
        let dir = tempfile::tempdir().unwrap();
        let files = files_in(dir.path());
        write_leaf(&files, &ca.issue());
        let resolver = CertResolver::load(&files).unwrap();
        let shown = format!("{resolver:?}");
        assert!(shown.starts_with("CertResolver { chain_len: 1, not_after: Some("), "{shown}");
    }

    /// A server answering the real webhook routes over the demo world, and a TLS client
    /// configuration trusting it.
    async fn webhook_server() -> (Server, Arc<rustls::ClientConfig>) {
        webhook_server_of(crate::request::server::tests::state(true)).await
    }

    async fn webhook_server_of(
        state: Arc<crate::request::actions::AppState>,
    ) -> (Server, Arc<rustls::ClientConfig>) {
        let dir = tempfile::tempdir().unwrap();
        let files = files_in(dir.path());
        let ca = Ca::new("ca");
        write_leaf(&files, &ca.issue());
        let resolver = CertResolver::load(&files).unwrap();
        let app = crate::request::server::webhook_router(state);
        let server = start(&resolver, app, Duration::from_secs(1)).await;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (server, Arc::new(config))
    }

    async fn connect(
        addr: SocketAddr,
        config: &Arc<rustls::ClientConfig>,
        alpn: &[u8],
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let mut config = rustls::ClientConfig::clone(config);
        config.alpn_protocols = vec![alpn.to_vec()];
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap()
    }

    /// POSTs fixture 01 (an agent deleting a protected Deployment) over HTTP/2 or HTTP/1.1 and
    /// checks that it is answered, and refused as the router tests expect.
    async fn review_over(addr: SocketAddr, config: &Arc<rustls::ClientConfig>, h2: bool) {
        use axum::body::Bytes;
        use http_body_util::{BodyExt, Full};
        let review = crate::request::server::tests::fixture("01-agent-deletes-deployment.json");
        let tls = connect(addr, config, if h2 { b"h2" } else { b"http/1.1" }).await;
        let request = axum::http::Request::post(if h2 { "https://localhost/validate" } else { "/validate" })
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(review.to_string())))
            .unwrap();
        let response = if h2 {
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
            tokio::spawn(connection);
            sender.send_request(request).await.unwrap()
        } else {
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
            tokio::spawn(connection);
            sender.send_request(request).await.unwrap()
        };
        let version = if h2 { axum::http::Version::HTTP_2 } else { axum::http::Version::HTTP_11 };
        assert_eq!(response.version(), version);
        assert_eq!(response.status(), axum::http::StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(answer["response"]["uid"], review["request"]["uid"]);
        assert_eq!(answer["response"]["allowed"], false, "{answer}");
    }

    /// Busy refusals come before the review is decoded. Over HTTP/1.1 (the API server's), a
    /// refusal answered with its body unread closed the connection (this test's third request
    /// failed); over HTTP/2 many refusals must not end the connection either. A flood is
    /// refused, not turned into reconnections.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn busy_refusals_keep_the_connection() {
        use axum::body::Bytes;
        use http_body_util::{BodyExt, StreamBody};
        use hyper::body::Frame;
        let state = crate::request::server::tests::state(true);
        let _all_under_way: Vec<_> = std::iter::from_fn(|| state.api_slots.enter()).collect();
        let (server, config) = webhook_server_of(state).await;
        let review = Bytes::from(
            crate::request::server::tests::fixture("01-agent-deletes-deployment.json").to_string(),
        );
        // The head first and the body a little later, as a large review arrives: the refusal is
        // made while the body is still on its way.
        let request = |uri: &str| {
            let review = review.clone();
            let body = StreamBody::new(futures::stream::once(Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok::<_, std::convert::Infallible>(Frame::data(review))
            })));
            axum::http::Request::post(uri)
                .header("host", "localhost")
                .header("content-type", "application/json")
                .body(body)
                .unwrap()
        };
        let tls = connect(server.addr, &config, b"h2").await;
        let (h2, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
        tokio::spawn(connection);
        for round in 0..11 {
            let refusals = (0..100).map(|_| {
                let mut h2 = h2.clone();
                let request = request("https://localhost/validate/agents");
                async move {
                    let response = h2.send_request(request).await?;
                    let status = response.status();
                    response.into_body().collect().await?;
                    Ok::<_, hyper::Error>(status)
                }
            });
            for (i, refusal) in futures::future::join_all(refusals).await.into_iter().enumerate() {
                let status = refusal.unwrap_or_else(|e| panic!("HTTP/2 refusal {}: {e}", round * 100 + i));
                assert_eq!(status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
            }
        }
        let tls = connect(server.addr, &config, b"http/1.1").await;
        let (mut h1, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
        let connection = tokio::spawn(connection);
        for i in 0..3 {
            let response = h1.send_request(request("/validate/agents")).await;
            let response = response.unwrap_or_else(|e| panic!("HTTP/1.1 refusal {i}: {e}"));
            assert_eq!(response.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
            response.into_body().collect().await.unwrap();
        }
        assert!(!connection.is_finished(), "the HTTP/1.1 connection was closed");
        server.shutdown().await;
    }

    #[tokio::test]
    async fn http1_and_http2_both_answer_a_review() {
        let (server, config) = webhook_server().await;
        review_over(server.addr, &config, true).await;
        review_over(server.addr, &config, false).await;
        server.shutdown().await;
    }

    /// A client that has shaken hands and then sends its request head a byte at a time, never
    /// ending it. Returns when the server closes the connection.
    async fn slow_loris(mut tls: impl tokio::io::AsyncWrite + Unpin, pause: Duration) {
        use tokio::io::AsyncWriteExt;
        let head = b"POST /validate HTTP/1.1\r\nhost: localhost\r\n";
        // Valid header lines, one after another: the head never ends and never turns invalid.
        let endless = head.iter().chain(b"x-slow: a\r\n".iter().cycle());
        for byte in endless {
            if tls.write_all(&[*byte]).await.is_err() || tls.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(pause).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_loris_clients_do_not_hold_up_a_review() {
        let (server, config) = webhook_server().await;
        let mut slow = JoinSet::new();
        for _ in 0..50 {
            let tls = connect(server.addr, &config, b"http/1.1").await;
            slow.spawn(slow_loris(tls, Duration::from_millis(20)));
        }
        // Every slow client is well into its head.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for h2 in [false, true] {
            let started = std::time::Instant::now();
            tokio::time::timeout(Duration::from_secs(2), review_over(server.addr, &config, h2))
                .await
                .unwrap_or_else(|_| panic!("no answer within 2 s (h2: {h2}) while 50 clients hang"));
            debug!(elapsed = ?started.elapsed(), h2, "answered");
        }
        assert!(slow.try_join_next().is_none(), "a slow client was let go: the test proved nothing");
        slow.abort_all();
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_request_head_that_never_ends_is_cut_off_after_the_header_read_timeout() {
        use tokio::io::AsyncReadExt;
        let (server, config) = webhook_server().await;
        let tls = connect(server.addr, &config, b"http/1.1").await;
        let (mut read, write) = tokio::io::split(tls);
        let started = std::time::Instant::now();
        let writer = tokio::spawn(slow_loris(write, Duration::from_millis(100)));
        let closed = tokio::time::timeout(HEADER_READ_TIMEOUT * 2, read.read(&mut [0; 1024])).await;
        assert!(closed.is_ok(), "the connection was still open after {:?}", HEADER_READ_TIMEOUT * 2);
        let elapsed = started.elapsed();
        assert!(
            elapsed >= HEADER_READ_TIMEOUT - Duration::from_secs(1)
                && elapsed < HEADER_READ_TIMEOUT + Duration::from_secs(3),
            "closed after {elapsed:?}"
        );
        writer.abort();
        server.shutdown().await;
    }

    #[tokio::test]
    async fn tls_garbage_is_dropped_without_affecting_others() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (server, config) = webhook_server().await;
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut garbage = JoinSet::new();
        for i in 0..20 {
            // Random bytes (xorshift), some starting like a TLS handshake record.
            let mut bytes: Vec<u8> = (0..4096)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            if i % 2 == 0 {
                bytes[..3].copy_from_slice(&[0x16, 0x03, 0x01]);
            }
            let mut tcp = TcpStream::connect(server.addr).await.unwrap();
            garbage.spawn(async move {
                // The server may close before all is written.
                let _ = tcp.write_all(&bytes).await;
                let _ = tcp.shutdown().await;
                let mut rest = Vec::new();
                tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut rest)).await.is_ok()
            });
        }
        review_over(server.addr, &config, false).await;
        while let Some(closed) = garbage.join_next().await {
            assert!(closed.unwrap(), "a garbage connection was left open");
        }
        review_over(server.addr, &config, true).await;
        server.shutdown().await;
    }
}
