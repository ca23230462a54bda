//! The world every end-to-end run starts from: a control plane, agentguard serving it, and the
//! identities that act in it (two agents, a controller, an approver, a non-approver).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::cluster::{self, Binaries, ControlPlane, Process, free_port, spawn};

/// Everything a scenario needs: the control plane, agentguard, and who is who.
/// Fields drop in order: agentguard stops before the control plane it watches.
pub struct World {
    pub agentguard: Agentguard,
    pub plane: ControlPlane,
    /// `system:serviceaccount:agents:coder`, labelled as an agent, bound to cluster-admin
    /// (the overly broad credentials agentguard exists to put brakes on).
    pub agent: PathBuf,
    /// `system:serviceaccount:agents:editor`, labelled as an agent, with the real (aggregated)
    /// `edit` ClusterRole bound only in the namespaces a scenario grants it
    /// ([`World::grant_edit`]): what an agent gets in a real cluster.
    pub editor: PathBuf,
    /// An unlabelled ServiceAccount with the same rights: a controller, not an agent.
    pub helper: PathBuf,
    /// `alice` in group `sre`: an approver.
    pub alice: PathBuf,
    /// `mallory` with the real `edit` ClusterRole cluster-wide, not an approver.
    pub mallory: PathBuf,
}

pub struct Agentguard {
    /// Behind a lock so that whoever holds the world can ask whether agentguard still runs.
    process: std::sync::Mutex<Process>,
    pub admin: String,
    /// The `/validate` URL (HTTPS, certificate from the plane's CA).
    pub webhook: String,
}

impl Agentguard {
    /// The process id (to stop and continue it, and to read its memory).
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.process.lock().unwrap_or_else(|e| e.into_inner()).pid()
    }

    /// The value of an unlabelled series, e.g. `agentguard_view_age_seconds`.
    #[allow(dead_code)]
    pub fn gauge(&self, name: &str) -> Result<f64> {
        let text = self.metrics()?;
        let line = text
            .lines()
            .find(|l| l.split(' ').next() == Some(name))
            .with_context(|| format!("no {name} in the metrics"))?;
        Ok(line.rsplit(' ').next().unwrap_or_default().parse()?)
    }

    /// An error naming how agentguard exited, with the end of its log, once it is no longer
    /// running: a caller that goes on would show requests failing for no visible reason.
    pub fn check_alive(&self) -> Result<()> {
        let mut process = self.process.lock().unwrap_or_else(|e| e.into_inner());
        match process.exited() {
            None => Ok(()),
            Some(status) => bail!(
                "agentguard is not running: it exited ({status}). The last lines of its log ({}):\n{}",
                process.log().display(),
                cluster::tail(process.log(), 20)
            ),
        }
    }

    /// Stops agentguard as the kubelet does (SIGTERM) and waits for it to exit: how long that
    /// took and how it exited. An error if it is still running after `limit`.
    #[allow(dead_code)]
    pub fn terminate(&self, limit: Duration) -> Result<(Duration, std::process::ExitStatus)> {
        let started = Instant::now();
        let status = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status()?;
        ensure!(status.success(), "kill -TERM {} failed", self.pid());
        loop {
            if let Some(status) = self.process.lock().unwrap_or_else(|e| e.into_inner()).exited() {
                return Ok((started.elapsed(), status));
            }
            ensure!(started.elapsed() < limit, "agentguard still running {limit:?} after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills agentguard as a crash would (the demo's check that it notices).
    #[allow(dead_code)]
    pub fn kill(&self) {
        self.process.lock().unwrap_or_else(|e| e.into_inner()).kill();
    }

    pub fn metrics(&self) -> Result<String> {
        http_get(&format!("{}/metrics", self.admin)).map(|(_, body)| body)
    }

    /// Reviews decided: `agentguard_decisions_total` with `mode="Enforce"` (one per review; the
    /// other modes count dry-run policies' findings).
    pub fn decisions(&self) -> Result<f64> {
        Ok(self
            .metrics()?
            .lines()
            .filter(|l| l.starts_with("agentguard_decisions_total{") && l.contains(r#"mode="Enforce""#))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}

/// A plain HTTP/1.0 GET on loopback: (status line, body).
pub fn http_get(url: &str) -> Result<(String, String)> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").context("http URL")?;
    let (addr, path) = rest.split_once('/').map(|(a, p)| (a, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut stream = std::net::TcpStream::connect(addr)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    Ok((head.lines().next().unwrap_or_default().to_owned(), body.to_owned()))
}

pub fn http_ok(url: &str) -> bool {
    http_get(url).is_ok_and(|(status, _)| status.split(' ').nth(1) == Some("200"))
}

/// A control plane with agentguard's CRDs established and its own namespace (churn counts,
/// records and session counts live there): where every harness starts.
pub fn plane_with_crds() -> Result<ControlPlane> {
    let bins = Binaries::from_env()?;
    let plane = ControlPlane::start(&bins)?;
    eprintln!("control plane ready in {:.1}s at {}", plane.startup.as_secs_f64(), plane.url);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    must(plane.kubectl(
        &plane.admin,
        &["apply", "-f", &root.join("charts/agentguard/crds/crds.yaml").to_string_lossy()],
    ))?;
    // Every CRD the chart ships: a list of names would fall behind the generator.
    must(plane.kubectl(
        &plane.admin,
        &["wait", "--for", "condition=established", "--timeout=60s", "--all", "crd"],
    ))?;
    must(plane.kubectl(&plane.admin, &["create", "namespace", "agentguard-system"]))?;
    Ok(plane)
}

impl World {
    pub fn start() -> Result<Self> {
        let plane = plane_with_crds()?;
        let admin = plane.admin.clone();
        for args in [
            vec!["create", "namespace", "agents"],
            vec!["create", "serviceaccount", "coder", "-n", "agents"],
            vec!["label", "serviceaccount", "coder", "-n", "agents", "agentguard.io/agent=true"],
            vec!["create", "serviceaccount", "editor", "-n", "agents"],
            vec!["label", "serviceaccount", "editor", "-n", "agents", "agentguard.io/agent=true"],
            vec!["create", "serviceaccount", "helper", "-n", "agents"],
            vec![
                "create",
                "clusterrolebinding",
                "e2e-coder",
                "--clusterrole=cluster-admin",
                "--serviceaccount=agents:coder",
            ],
            vec![
                "create",
                "clusterrolebinding",
                "e2e-helper",
                "--clusterrole=cluster-admin",
                "--serviceaccount=agents:helper",
            ],
            vec!["create", "clusterrolebinding", "e2e-sre", "--clusterrole=cluster-admin", "--group=sre"],
            vec!["create", "clusterrolebinding", "e2e-mallory", "--clusterrole=edit", "--user=mallory"],
        ] {
            must(plane.kubectl(&admin, &args))?;
        }
        must(plane.kubectl_stdin(&admin, &["apply", "-f", "-"], Some(POLICIES)))?;
        // Approvals written before agentguard was installed (no webhook saw them).
        must(plane.kubectl_stdin(&admin, &["apply", "-f", "-"], Some(PLANTED_BEFORE_INSTALL)))?;

        let agentguard = start_agentguard(&plane, "agentguard", true)?;
        let agent = plane.service_account_kubeconfig("agents", "coder")?;
        let editor = plane.service_account_kubeconfig("agents", "editor")?;
        let helper = plane.service_account_kubeconfig("agents", "helper")?;
        let alice = plane.user_kubeconfig("alice", &["sre"])?;
        let mallory = plane.user_kubeconfig("mallory", &["devs"])?;
        let world = Self { plane, agentguard, agent, editor, helper, alice, mallory };
        world.wait_for_registration("system:serviceaccount:agents:coder", Duration::from_secs(60))?;
        world.wait_for_registration("system:serviceaccount:agents:editor", Duration::from_secs(60))?;
        Ok(world)
    }

    /// Binds the real `edit` ClusterRole to the ServiceAccount `sa_ns:sa` in `ns` and waits until
    /// the API server's authorizer sees it.
    pub fn bind_edit(&self, ns: &str, sa_ns: &str, sa: &str) -> Result<()> {
        let who = format!("{sa_ns}:{sa}");
        let (binding, subject) = (format!("edit-{sa_ns}-{sa}"), format!("--serviceaccount={who}"));
        must(self.plane.kubectl(
            &self.plane.admin,
            &["create", "rolebinding", &binding, "-n", ns, "--clusterrole=edit", &subject],
        ))?;
        let user = format!("--as=system:serviceaccount:{who}");
        let started = Instant::now();
        while !self
            .plane
            .kubectl(&self.plane.admin, &["auth", "can-i", "delete", "configmaps", "-n", ns, &user])
            .status
            .success()
        {
            ensure!(
                started.elapsed() < Duration::from_secs(10),
                "{who} has no edit rights in {ns} after 10s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Grants the `editor` agent the real `edit` ClusterRole in `ns`.
    pub fn grant_edit(&self, ns: &str) -> Result<()> {
        self.bind_edit(ns, "agents", "editor")
    }

    /// Waits until the webhook configuration names `username` as an agent.
    pub fn wait_for_registration(&self, username: &str, limit: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let out = self.plane.kubectl(
                &self.plane.admin,
                &[
                    "get",
                    "validatingwebhookconfiguration",
                    "agentguard",
                    "-o",
                    "jsonpath={.webhooks[0].matchConditions[1].expression}",
                ],
            );
            if out.status.success() && String::from_utf8_lossy(&out.stdout).contains(username) {
                return Ok(started.elapsed());
            }
            ensure!(started.elapsed() < limit, "{username} not registered as an agent after {limit:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Approvals no webhook saw: the old grammar with a far expiry, and a well-formed ticket
/// (version 1, a year long) that agentguard never issued.
const PLANTED_BEFORE_INSTALL: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: e2e-preinstall}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: old-grammar
  namespace: e2e-preinstall
  annotations: {agentguard.io/approve: "delete;expires=2099-01-01T00:00:00Z"}
spec:
  selector: {matchLabels: {app: old-grammar}}
  template:
    metadata: {labels: {app: old-grammar}}
    spec: {containers: [{name: web, image: "nginx:1.27"}]}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: fabricated
  namespace: e2e-preinstall
  annotations: {agentguard.io/approve: "delete.AQAAAABrDUMgAeEzgAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}
spec:
  selector: {matchLabels: {app: fabricated}}
  template:
    metadata: {labels: {app: fabricated}}
    spec: {containers: [{name: web, image: "nginx:1.27"}]}
"#;

const POLICIES: &str = r#"
apiVersion: agentguard.io/v1alpha1
kind: ClusterAgentPolicy
metadata: {name: e2e-workloads}
spec:
  action: RequireApproval
  approval: {approvers: {users: [alice], groups: [sre]}, ttl: 10m, maxTtl: 1h}
  rules:
    - name: workloads
      operations: [DELETE, UPDATE]
      resources: [{apiGroups: [apps], resources: [deployments, deployments/scale]}]
---
apiVersion: agentguard.io/v1alpha1
kind: ClusterAgentPolicy
metadata: {name: e2e-namespaces}
spec:
  action: RequireApproval
  approval: {approvers: {groups: [sre]}}
  rules:
    - name: namespaces
      operations: [DELETE]
      resources: [{apiGroups: [""], resources: [namespaces]}]
      names: ["e2e-*"]
---
apiVersion: agentguard.io/v1alpha1
kind: ClusterAgentPolicy
metadata: {name: e2e-config-trial}
spec:
  action: RequireApproval
  mode: Warn
  approval: {approvers: {groups: [sre]}}
  rules:
    - name: config
      operations: [UPDATE]
      resources: [{apiGroups: [""], resources: [configmaps]}]
"#;

/// How to start an agentguard beyond the world's defaults.
#[derive(Default, Clone)]
pub struct Launch {
    /// Keep this webhook configuration (registering the process's own URL); None: serve direct
    /// requests only.
    pub webhook_configuration: Option<String>,
    /// The URL it registers there; None: its own webhook port. Replicas behind one front
    /// register the front's.
    pub webhook_url: Option<String>,
    /// Reach the API server through this kubeconfig instead of the admin's.
    pub kubeconfig: Option<PathBuf>,
    /// More `serve` flags.
    pub args: Vec<String>,
    /// Run this agentguard binary instead of the one cargo built with the test (a release build
    /// under a dev-profile harness: the API-server benchmark). Without it, `AGENTGUARD_BIN`
    /// (the flood's `--release`), else cargo's.
    pub binary: Option<PathBuf>,
}

/// Starts an agentguard replica logging to `NAME.log`. Only the one that `registers` keeps the
/// webhook configuration (the API server can call one URL); the others serve direct requests.
pub fn start_agentguard(plane: &ControlPlane, name: &'static str, registers: bool) -> Result<Agentguard> {
    let launch =
        Launch { webhook_configuration: registers.then(|| "agentguard".to_owned()), ..Launch::default() };
    start_agentguard_with(plane, name, &launch)
}

/// [`start_agentguard`] with more say over how.
pub fn start_agentguard_with(
    plane: &ControlPlane,
    name: &'static str,
    launch: &Launch,
) -> Result<Agentguard> {
    let dir = plane.dir.path();
    if !dir.join("agentguard.crt").exists() {
        let (cert, key) = plane.pki.serving()?;
        std::fs::write(dir.join("agentguard.crt"), cert)?;
        std::fs::write(dir.join("agentguard.key"), key)?;
    }
    let mut attempt = 1;
    loop {
        match try_start_agentguard(plane, name, launch) {
            Err(e) if attempt < START_ATTEMPTS && cluster::lost_a_port(&e) => {
                eprintln!("{name} lost a port, starting again on new ports: {e:#}");
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// Starts tried before giving up when a port was taken between picking and binding it.
const START_ATTEMPTS: u32 = 4;

fn try_start_agentguard(plane: &ControlPlane, name: &'static str, launch: &Launch) -> Result<Agentguard> {
    let dir = plane.dir.path();
    let (webhook_port, admin_port) = (free_port(), free_port());
    let webhook = format!("https://127.0.0.1:{webhook_port}/validate");
    let binary = launch
        .binary
        .clone()
        .or_else(|| std::env::var_os("AGENTGUARD_BIN").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_agentguard")));
    let mut cmd = Command::new(binary);
    cmd.env("KUBECONFIG", launch.kubeconfig.as_ref().unwrap_or(&plane.admin))
        .arg("serve")
        .arg(format!("--webhook-addr=127.0.0.1:{webhook_port}"))
        .arg(format!("--admin-addr=127.0.0.1:{admin_port}"))
        .arg(format!("--tls-cert={}", dir.join("agentguard.crt").display()))
        .arg(format!("--tls-key={}", dir.join("agentguard.key").display()))
        .arg(format!("--webhook-ca-file={}", dir.join("ca.crt").display()))
        .args(["--self-namespace=agentguard-system", "--log-format=json"]);
    // Nothing to wait for behind no Service, unless the launch says otherwise.
    if !launch.args.iter().any(|a| a.starts_with("--shutdown-delay-seconds")) {
        cmd.arg("--shutdown-delay-seconds=0");
    }
    if let Some(configuration) = &launch.webhook_configuration {
        let url = launch.webhook_url.as_deref().unwrap_or(&webhook);
        cmd.arg(format!("--webhook-url={url}")).arg(format!("--webhook-configuration={configuration}"));
    }
    cmd.args(&launch.args);
    let mut process = spawn(name, cmd, &dir.join(format!("{name}.log")))?;
    let admin = format!("http://127.0.0.1:{admin_port}");
    let started = Instant::now();
    while !http_ok(&format!("{admin}/readyz")) {
        process.check_running()?;
        if started.elapsed() > Duration::from_secs(60) {
            bail!("{name} not ready after 60s:\n{}", cluster::tail(&dir.join(format!("{name}.log")), 40));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("{name} ready in {:.1}s", started.elapsed().as_secs_f64());
    Ok(Agentguard { process: std::sync::Mutex::new(process), admin, webhook })
}

/// Output of a command that must succeed.
pub fn must(out: Output) -> Result<String> {
    ensure!(
        out.status.success(),
        "command failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The request was admitted (kubectl succeeded); returns stdout + stderr.
pub fn accepts(out: Output, what: &str) -> Result<String> {
    must(out).with_context(|| format!("expected {what} to be admitted"))
}

/// The request was refused and the error contains `needle`; returns stderr.
pub fn rejects(out: Output, what: &str, needle: &str) -> Result<String> {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !out.status.success(),
        "expected {what} to be refused, but it was admitted: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    ensure!(stderr.contains(needle), "{what} was refused, but the error lacks {needle:?}: {stderr}");
    Ok(stderr)
}

/// The `kubectl annotate …` command a denial tells the human to run, as arguments.
pub fn approve_command(denial: &str) -> Result<Vec<String>> {
    let start = denial.find("runs: kubectl ").context("the denial names no approve command")?
        + "runs: kubectl ".len();
    let end = denial[start..].find(" — then retry").context("approve command not terminated")? + start;
    Ok(denial[start..end].split_whitespace().map(str::to_owned).collect())
}
