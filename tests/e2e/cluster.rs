//! A throwaway Kubernetes control plane on loopback: etcd, kube-apiserver and
//! kube-controller-manager built from their Go modules (`hack/k8s-binaries.sh`), certificates
//! made per run, and kubectl as the client. The controller-manager makes it a control plane that
//! really deletes: the garbage collector, the namespace controller, ServiceAccount tokens, the
//! aggregated `edit`/`admin` roles and the workload controllers run as in a real cluster (no
//! kubelet or scheduler runs, so Pods stay Pending). Dropping [`ControlPlane`] stops exactly the
//! processes it started and removes its directory.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};

/// Binaries from `hack/k8s-binaries.sh`, named by environment variables.
pub struct Binaries {
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub etcd: PathBuf,
    pub kubectl: PathBuf,
}

impl Binaries {
    pub fn from_env() -> Result<Self> {
        let get = |var: &str| -> Result<PathBuf> {
            let path = PathBuf::from(std::env::var(var).with_context(|| {
                format!("{var} is not set: run the end-to-end tests through hack/test.sh, or eval \"$(hack/k8s-binaries.sh)\"")
            })?);
            anyhow::ensure!(path.is_file(), "{var}={} does not exist", path.display());
            Ok(path)
        };
        Ok(Self {
            kube_apiserver: get("KUBE_APISERVER")?,
            kube_controller_manager: get("KUBE_CONTROLLER_MANAGER")?,
            etcd: get("ETCD")?,
            kubectl: get("KUBECTL")?,
        })
    }
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A port that was free a moment ago. Another process may take it before the one it is handed to
/// binds it: [`ControlPlane::start`] retries on that race, and agentguard's own ports are bound by
/// a process that exits at once if they are taken.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The run's certificate authority: signs the API server's, agentguard's and users' certificates.
pub struct Pki {
    ca_params: CertificateParams,
    ca_key: KeyPair,
    pub ca_pem: String,
}

impl Pki {
    pub fn new() -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, "agentguard-e2e-ca");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self { ca_pem: cert.pem(), ca_params: params, ca_key: key })
    }

    /// The CA's private key (PEM): the controller-manager signs approved CSRs with it.
    pub fn ca_key_pem(&self) -> String {
        self.ca_key.serialize_pem()
    }

    /// A serving certificate for 127.0.0.1, and for the `kubernetes` Service's first address
    /// (10.0.0.1 of `--service-cluster-ip-range`) that pods on a node reach it by: (cert PEM, key PEM).
    pub fn serving(&self) -> Result<(String, String)> {
        let names = ["127.0.0.1", "localhost", "10.0.0.1", "kubernetes.default.svc"];
        let mut params = CertificateParams::new(names.map(String::from).to_vec())?;
        params.distinguished_name.push(DnType::CommonName, "127.0.0.1");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate: the API server reads the user from CN and groups from O.
    pub fn client(&self, user: &str, groups: &[&str]) -> Result<(String, String)> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, user);
        for g in groups {
            params.distinguished_name.push(DnType::OrganizationName, *g);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

pub struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
    /// The program and arguments it was started with, to start it again ([`Process::restart`]).
    program: std::ffi::OsString,
    args: Vec<std::ffi::OsString>,
}

impl Process {
    /// The process id (to read its memory and CPU from /proc: the scale scenario).
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process (SIGKILL: no goodbye to its clients), waits `down`, and starts it
    /// again with the same program and arguments (same ports, same data), its log appended.
    pub fn restart(&mut self, down: Duration) -> Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("killed {}", self.name);
        std::thread::sleep(down);
        let log = std::fs::OpenOptions::new().append(true).open(&self.log)?;
        self.child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} again", self.name))?;
        eprintln!("started {} again", self.name);
        Ok(())
    }

    /// An error if the process has exited, with the end of its log ([`lost_a_port`] tells
    /// whether it could not bind a port).
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            return Err(EarlyExit {
                port_taken: log.to_lowercase().contains("address already in use"),
                message: format!("{} exited early ({status}):\n{}", self.name, tail(&self.log, 30)),
            }
            .into());
        }
        Ok(())
    }

    /// How it exited, if it has (it is reaped either way when dropped).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Ends it as a crash would (SIGKILL, no shutdown), for tests of whoever must notice.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("stopped {}", self.name);
    }
}

pub fn spawn(name: &'static str, command: Command, log: &Path) -> Result<Process> {
    let (program, args) =
        (command.get_program().to_owned(), command.get_args().map(|a| a.to_owned()).collect());
    Ok(Process { name, child: start_logged(name, command, log)?, log: log.to_owned(), program, args })
}

/// Starts `command` with no input and stdout and stderr written to `log`.
pub fn start_logged(name: &str, mut command: Command, log: &Path) -> Result<Child> {
    let out = std::fs::File::create(log)?;
    command
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {name}"))
}

/// A process of the control plane exited while it started: most often a port [`free_port`]
/// handed out was taken by someone else before the process bound it.
#[derive(Debug)]
struct EarlyExit {
    port_taken: bool,
    message: String,
}

impl std::fmt::Display for EarlyExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for EarlyExit {}

/// Whether `error` says a process could not bind a port [`free_port`] handed out.
pub fn lost_a_port(error: &anyhow::Error) -> bool {
    error.downcast_ref::<EarlyExit>().is_some_and(|e| e.port_taken)
}

/// Whole start-ups tried, each on fresh ports and a fresh directory, before giving up.
const START_ATTEMPTS: u32 = 4;

/// etcd, kube-apiserver and kube-controller-manager, stopped in the reverse of the order they
/// started (the controller-manager first, etcd last) before the directory is removed.
pub struct ControlPlane {
    /// In start order; [`Drop`] stops them last first.
    processes: Vec<Process>,
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub url: String,
    pub kubectl: PathBuf,
    pub admin: PathBuf,
    /// From the first attempt to a ready controller-manager, retries included.
    pub startup: Duration,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        while let Some(process) = self.processes.pop() {
            drop(process);
        }
    }
}

impl ControlPlane {
    /// Starts the control plane, again from scratch on new ports if a process exits early
    /// (`bind: address already in use` when a port was taken between [`free_port`] and the bind).
    pub fn start(bins: &Binaries) -> Result<Self> {
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            match Self::start_once(bins) {
                Ok(mut plane) => {
                    plane.startup = started.elapsed();
                    return Ok(plane);
                }
                Err(e) if attempt < START_ATTEMPTS && e.downcast_ref::<EarlyExit>().is_some() => {
                    let port = e.downcast_ref::<EarlyExit>().is_some_and(|x| x.port_taken);
                    eprintln!(
                        "control plane start {attempt} of {START_ATTEMPTS} failed{}, starting again on new ports: {e:#}",
                        if port { " (a port was taken)" } else { "" }
                    );
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn start_once(bins: &Binaries) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("agentguard-e2e-").tempdir()?;
        let path = |name: &str| dir.path().join(name);
        let pki = Pki::new()?;
        std::fs::write(path("ca.crt"), &pki.ca_pem)?;
        std::fs::write(path("ca.key"), pki.ca_key_pem())?;
        let (cert, key) = pki.serving()?;
        std::fs::write(path("apiserver.crt"), cert)?;
        std::fs::write(path("apiserver.key"), key)?;
        // Service-account tokens are signed with a key made for this run.
        let sa_key = KeyPair::generate()?;
        std::fs::write(path("sa.key"), sa_key.serialize_pem())?;
        std::fs::write(path("sa.pub"), sa_key.public_key_pem())?;

        let (client_port, peer_port, api_port) = (free_port(), free_port(), free_port());
        let mut etcd = Command::new(&bins.etcd);
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        etcd.args(["--name", "e2e", "--data-dir"])
            .arg(path("etcd"))
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("e2e={peer_url}")])
            .args(["--unsafe-no-fsync", "--log-level", "warn"]);
        let etcd = spawn("etcd", etcd, &path("etcd.log"))?;

        let mut api = Command::new(&bins.kube_apiserver);
        api.arg(format!("--etcd-servers={client_url}"))
            .arg(format!("--secure-port={api_port}"))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--tls-cert-file={}", path("apiserver.crt").display()))
            .arg(format!("--tls-private-key-file={}", path("apiserver.key").display()))
            .arg(format!("--client-ca-file={}", path("ca.crt").display()))
            .arg(format!("--cert-dir={}", path("certs").display()))
            .args(["--authorization-mode=Node,RBAC", "--service-cluster-ip-range=10.0.0.0/24"])
            .arg(format!("--service-account-key-file={}", path("sa.pub").display()))
            .arg(format!("--service-account-signing-key-file={}", path("sa.key").display()))
            .args(["--service-account-issuer=https://kubernetes.default.svc.cluster.local"])
            .args(["--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy"])
            // The `kubernetes` Service cannot point at a loopback address: skip its endpoints.
            .args(["--endpoint-reconciler-type=none", "--allow-privileged=false", "--profiling=false", "--v=1"]);
        let apiserver = spawn("kube-apiserver", api, &path("kube-apiserver.log"))?;

        let url = format!("https://127.0.0.1:{api_port}");
        let mut plane = Self {
            processes: vec![etcd, apiserver],
            pki,
            url,
            kubectl: bins.kubectl.clone(),
            admin: PathBuf::new(),
            startup: Duration::ZERO,
            dir,
        };
        plane.admin = plane.user_kubeconfig("admin", &["system:masters"])?;
        plane.wait_until("kube-apiserver ready", Duration::from_secs(120), "kube-apiserver.log", |p| {
            p.kubectl(&p.admin, &["get", "--raw", "/readyz"]).status.success()
        })?;
        plane.start_controller_manager(bins)?;
        Ok(plane)
    }

    /// kube-controller-manager with every default controller, each acting as its own
    /// ServiceAccount (as a real cluster runs it), signing CSRs and tokens with this run's keys.
    /// Ready once the clusterrole-aggregation controller has filled `edit` and the
    /// serviceaccount controller has made `default/default`: both run only after the
    /// controller-manager's informers synced.
    fn start_controller_manager(&mut self, bins: &Binaries) -> Result<()> {
        let path = |name: &str| self.dir.path().join(name);
        let kubeconfig = self.user_kubeconfig("system:kube-controller-manager", &[])?;
        let kubeconfig = kubeconfig.display();
        let mut kcm = Command::new(&bins.kube_controller_manager);
        kcm.arg(format!("--kubeconfig={kubeconfig}"))
            .arg(format!("--authentication-kubeconfig={kubeconfig}"))
            .arg(format!("--authorization-kubeconfig={kubeconfig}"))
            // This API server has no front-proxy CA to look up; /healthz needs no authentication.
            .arg("--authentication-skip-lookup")
            .args(["--bind-address=127.0.0.1", &format!("--secure-port={}", free_port())])
            .arg(format!("--cert-dir={}", path("controller-manager-certs").display()))
            .args(["--leader-elect=false", "--use-service-account-credentials", "--controllers=*"])
            .arg(format!("--service-account-private-key-file={}", path("sa.key").display()))
            .arg(format!("--root-ca-file={}", path("ca.crt").display()))
            .arg(format!("--cluster-signing-cert-file={}", path("ca.crt").display()))
            .arg(format!("--cluster-signing-key-file={}", path("ca.key").display()))
            .args(["--profiling=false", "--v=1"]);
        self.processes.push(spawn("kube-controller-manager", kcm, &path("kube-controller-manager.log"))?);
        self.wait_until(
            "kube-controller-manager running its controllers",
            Duration::from_secs(120),
            "kube-controller-manager.log",
            |p| {
                let edit = p.kubectl(&p.admin, &["get", "clusterrole", "edit", "-o", "jsonpath={.rules}"]);
                edit.status.success()
                    && !edit.stdout.trim_ascii().is_empty()
                    && p.kubectl(&p.admin, &["get", "serviceaccount", "default", "-n", "default"])
                        .status
                        .success()
            },
        )
    }

    /// Kills `name` (etcd or kube-apiserver), leaves it down for `down`, starts it again on the
    /// same ports and data, and waits until the API server is ready again: the time from the
    /// kill to ready.
    pub fn restart(&mut self, name: &str, down: Duration) -> Result<Duration> {
        let started = Instant::now();
        let process = self
            .processes
            .iter_mut()
            .find(|p| p.name == name)
            .with_context(|| format!("no process {name}"))?;
        process.restart(down)?;
        self.wait_until(
            &format!("ready after restarting {name}"),
            Duration::from_secs(120),
            "kube-apiserver.log",
            |p| p.kubectl(&p.admin, &["get", "--raw", "/readyz"]).status.success(),
        )?;
        Ok(started.elapsed())
    }

    /// Polls `ready` until it holds; an error if a process exits first or `limit` passes.
    fn wait_until(
        &mut self,
        what: &str,
        limit: Duration,
        log: &str,
        ready: impl Fn(&Self) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            for process in &mut self.processes {
                process.check_running()?;
            }
            if ready(self) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = self.dir.path().join(log);
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                // A process that could not bind may keep running (the controller-manager's
                // serving port): start again on new ports.
                if text.to_lowercase().contains("address already in use") {
                    return Err(EarlyExit {
                        port_taken: true,
                        message: format!("not {what} after {limit:?}:\n{}", tail(&log, 30)),
                    }
                    .into());
                }
                bail!("not {what} after {limit:?}:\n{}", tail(&log, 30));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn write_kubeconfig(&self, name: &str, user: &str) -> Result<PathBuf> {
        let path = self.dir.path().join(format!("{name}.kubeconfig"));
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
             users:\n- name: {name}\n  user:\n{user}contexts:\n- name: e2e\n  context: {{cluster: e2e, user: {name}}}\ncurrent-context: e2e\n",
            self.url,
            self.dir.path().join("ca.crt").display(),
        );
        std::fs::write(&path, config)?;
        Ok(path)
    }

    /// A kubeconfig authenticating as `user` in `groups` by client certificate.
    pub fn user_kubeconfig(&self, user: &str, groups: &[&str]) -> Result<PathBuf> {
        let (cert, key) = self.pki.client(user, groups)?;
        // The identity is in the certificate; file and kubeconfig entry names are plain.
        let name: String = user
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '-' })
            .collect();
        let (cert_path, key_path) =
            (self.dir.path().join(format!("{name}.crt")), self.dir.path().join(format!("{name}.key")));
        std::fs::write(&cert_path, cert)?;
        std::fs::write(&key_path, key)?;
        self.write_kubeconfig(
            &name,
            &format!(
                "    client-certificate: {}\n    client-key: {}\n",
                cert_path.display(),
                key_path.display()
            ),
        )
    }

    /// A kubeconfig using a ServiceAccount token from `kubectl create token`.
    pub fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        let out = self.kubectl(&self.admin, &["create", "token", name, "-n", namespace, "--duration", "2h"]);
        anyhow::ensure!(out.status.success(), "create token: {}", String::from_utf8_lossy(&out.stderr));
        let token = String::from_utf8(out.stdout)?.trim().to_owned();
        self.write_kubeconfig(&format!("sa-{namespace}-{name}"), &format!("    token: {token}\n"))
    }

    pub fn kubectl(&self, kubeconfig: &Path, args: &[&str]) -> Output {
        self.kubectl_stdin(kubeconfig, args, None)
    }

    pub fn kubectl_stdin(&self, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(&self.kubectl);
        cmd.env("KUBECONFIG", kubeconfig).env_remove("KUBERNETES_SERVICE_HOST").args(args);
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("kubectl runs");
        if let Some(input) = stdin {
            use std::io::Write;
            let mut pipe = child.stdin.take().expect("piped stdin");
            pipe.write_all(input.as_bytes()).expect("write kubectl stdin");
        }
        child.wait_with_output().expect("kubectl finishes")
    }
}
