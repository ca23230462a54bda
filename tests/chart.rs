//! The Helm chart on a real control plane: rendered objects pass the API server's validation,
//! `helm install`/`upgrade`/`uninstall` work, agentguard runs with exactly the chart's RBAC,
//! and the fail-safe topology holds: with agentguard down an agent's delete is refused while a
//! human's and a controller's requests go through without waiting. No kubelet runs here, so the
//! chart's webhooks point at agentguard running as a local process (a `webhook.url` override).
//! The monitoring objects (ServiceMonitor, PrometheusRule, dashboard) pass the Prometheus
//! Operator's CRDs, and every alert reads a series agentguard or this API server exports. The
//! cert-manager mode's objects pass cert-manager's CRDs, and its CA injection names the
//! certificate the Deployment serves with.

#[allow(dead_code)]
#[path = "e2e/cluster.rs"]
mod cluster;
#[path = "support/monitoring.rs"]
mod monitoring;
#[allow(dead_code)]
#[path = "e2e/world.rs"]
mod world;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use cluster::{Binaries, ControlPlane, Process, free_port, spawn};
use monitoring::{API_SERVER_SERIES, agentguard_series, exposed, metric_names, unknown_names};
use serde::Deserialize;
use world::{accepts, approve_command, http_get, http_ok, must, rejects};

const NS: &str = "agentguard-system";

struct Setup {
    plane: ControlPlane,
    helm: PathBuf,
    root: PathBuf,
    webhook_port: u16,
}

impl Setup {
    fn helm(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.helm).env("KUBECONFIG", &self.plane.admin).args(args).output()?;
        must(out)
    }

    fn admin(&self, args: &[&str]) -> Result<String> {
        must(self.plane.kubectl(&self.plane.admin, args))
    }

    /// The chart's defaults (self-managed certificates), pointed at the local process.
    fn chart_values(&self) -> Vec<String> {
        vec![
            "--set".into(),
            format!("webhook.url=https://127.0.0.1:{}/validate", self.webhook_port),
            "--set".into(),
            "defaultPolicy.approvers.groups={sre}".into(),
        ]
    }

    /// agentguard as a local process, authenticated as the chart's ServiceAccount.
    fn start_agentguard(&self, kubeconfig: &Path, admin_port: u16) -> Result<Process> {
        let dir = self.plane.dir.path();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentguard"));
        cmd.env("KUBECONFIG", kubeconfig)
            .arg("serve")
            .arg(format!("--webhook-addr=127.0.0.1:{}", self.webhook_port))
            .arg(format!("--admin-addr=127.0.0.1:{admin_port}"))
            .arg(format!("--tls-cert={}", dir.join("agentguard.crt").display()))
            .arg(format!("--tls-key={}", dir.join("agentguard.key").display()))
            .arg(format!("--webhook-url=https://127.0.0.1:{}/validate", self.webhook_port))
            .arg(format!("--webhook-ca-file={}", dir.join("agentguard-ca.crt").display()))
            // Its own certificates, as the chart runs it, but short-lived so one rotation
            // happens during the test.
            .args(["--self-signed-secret=agentguard-tls", "--self-signed-ip=127.0.0.1"])
            .args([
                "--self-signed-validity-seconds=60",
                "--self-signed-check-seconds=1",
                "--cert-reload-seconds=1",
            ])
            .args(["--self-signed-ca-validity-seconds=90", "--self-signed-propagation-seconds=5"])
            .args([&format!("--self-namespace={NS}"), "--shutdown-delay-seconds=0", "--log-format=json"]);
        let mut process = spawn("agentguard", cmd, &dir.join("agentguard.log"))?;
        let started = Instant::now();
        while !http_ok(&format!("http://127.0.0.1:{admin_port}/readyz")) {
            process.check_running()?;
            if started.elapsed() > Duration::from_secs(60) {
                bail!("agentguard not ready:\n{}", cluster::tail(&dir.join("agentguard.log"), 40));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(process)
    }

    fn wait_for_agent(&self, username: &str) -> Result<()> {
        let started = Instant::now();
        loop {
            let expr = self.admin(&[
                "get",
                "validatingwebhookconfiguration",
                "agentguard",
                "-o",
                "jsonpath={.webhooks[0].matchConditions[1].expression}",
            ])?;
            if expr.contains(username) {
                return Ok(());
            }
            ensure!(started.elapsed() < Duration::from_secs(30), "{username} never registered: {expr}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn decode_base64(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(text.trim()).unwrap_or_default()
}

/// `(alert, expr)` of every rule in the rendered PrometheusRule(s).
fn alerts(rendered: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(rendered) {
        let doc = serde_json::Value::deserialize(doc)?;
        if doc["kind"] != "PrometheusRule" {
            continue;
        }
        for group in doc["spec"]["groups"].as_array().into_iter().flatten() {
            for rule in group["rules"].as_array().into_iter().flatten() {
                let name = rule["alert"].as_str().context("a rule without an alert name")?;
                let expr = rule["expr"].as_str().context("a rule without an expr")?;
                out.push((name.to_owned(), expr.to_owned()));
            }
        }
    }
    Ok(out)
}

/// The rendered cert-manager.io object `kind`/`name`.
fn cert_manager_doc(rendered: &str, kind: &str, name: &str) -> Result<serde_json::Value> {
    docs(rendered)?
        .into_iter()
        .find(|d| {
            d["apiVersion"] == "cert-manager.io/v1" && d["kind"] == kind && d["metadata"]["name"] == name
        })
        .with_context(|| format!("no {kind} {name} rendered"))
}

fn docs(rendered: &str) -> Result<Vec<serde_json::Value>> {
    Ok(serde_yaml::Deserializer::from_str(rendered)
        .map(serde_json::Value::deserialize)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|d| !d.is_null())
        .collect())
}

/// In the chart rendered with its defaults: a rolling update never leaves fewer replicas serving
/// (one new pod Ready before an old one stops), a drain takes one at a time, and a stopping pod's
/// grace period outlasts readiness failing and the drain (agentguard's own settings, read from
/// the container). Returns the grace period.
fn check_rolling_update(rendered: &str) -> Result<i64> {
    let docs = docs(rendered)?;
    let find = |kind: &str| {
        docs.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == "agentguard").cloned()
    };
    let deployment = find("Deployment").context("no Deployment")?;
    let strategy = &deployment["spec"]["strategy"];
    ensure!(
        strategy["type"] == "RollingUpdate"
            && strategy["rollingUpdate"]["maxUnavailable"] == 0
            && strategy["rollingUpdate"]["maxSurge"] == 1,
        "update strategy: {strategy}"
    );
    let pdb = find("PodDisruptionBudget").context("no PodDisruptionBudget")?;
    ensure!(pdb["spec"]["maxUnavailable"] == 1, "PodDisruptionBudget: {}", pdb["spec"]);
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    ensure!(container["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness: {container}");
    let env = |name: &str| -> Result<i64> {
        container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str()?.parse().ok())
            .with_context(|| format!("the container sets no number {name}"))
    };
    let (delay, drain) = (env("AGENTGUARD_SHUTDOWN_DELAY_SECONDS")?, env("AGENTGUARD_DRAIN_SECONDS")?);
    ensure!(delay >= 1, "readiness fails only {delay}s before the listener closes");
    let grace = pod["terminationGracePeriodSeconds"].as_i64().context("no terminationGracePeriodSeconds")?;
    ensure!(grace > delay + drain, "grace period {grace}s, shutdown delay {delay}s + drain {drain}s");
    Ok(grace)
}

/// In the chart rendered with cert-manager: the webhook configuration's `inject-ca-from` names a
/// rendered Certificate for the Service's DNS name, whose Secret is the one the Deployment
/// mounts, issued through rendered Issuers down to a self-signed one. Returns the Issuers seen.
fn check_cert_manager_wiring(rendered: &str) -> Result<usize> {
    let docs = docs(rendered)?;
    let find = |kind: &str, name: &str| {
        docs.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name).cloned()
    };
    let vwc = find("ValidatingWebhookConfiguration", "agentguard").context("no webhook configuration")?;
    let inject = vwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        .as_str()
        .context("the webhook configuration has no cert-manager.io/inject-ca-from")?;
    let (ns, name) = inject.split_once('/').context("inject-ca-from is not namespace/name")?;
    ensure!(ns == NS, "inject-ca-from names namespace {ns}, the release is in {NS}");
    let cert = cert_manager_doc(rendered, "Certificate", name)?;
    ensure!(cert["metadata"]["namespace"] == NS, "Certificate {name} is not in {NS}");

    let deployment = find("Deployment", "agentguard").context("no Deployment")?;
    let mounted: Vec<&str> = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["secret"]["secretName"].as_str())
        .collect();
    let secret = cert["spec"]["secretName"].as_str().context("the Certificate has no secretName")?;
    ensure!(mounted == [secret], "the Deployment mounts {mounted:?}, Certificate {name} writes {secret}");

    for webhook in vwc["webhooks"].as_array().context("no webhooks")? {
        let service = &webhook["clientConfig"]["service"];
        let dns = format!(
            "{}.{}.svc",
            service["name"].as_str().unwrap_or_default(),
            service["namespace"].as_str().unwrap_or_default()
        );
        ensure!(
            cert["spec"]["dnsNames"].as_array().into_iter().flatten().any(|n| n == dns.as_str()),
            "Certificate {name} does not cover {dns}, which {} calls",
            webhook["name"]
        );
    }

    // issuerRef chain: each Issuer is rendered; a CA Issuer's Secret is a rendered CA Certificate.
    let (mut issuer_ref, mut seen) = (cert["spec"]["issuerRef"].clone(), 0);
    loop {
        ensure!(issuer_ref["kind"] == "Issuer", "issuerRef {issuer_ref} is not a namespaced Issuer");
        let issuer_name = issuer_ref["name"].as_str().context("issuerRef without a name")?;
        let issuer = cert_manager_doc(rendered, "Issuer", issuer_name)?;
        seen += 1;
        ensure!(seen <= 4, "the issuerRef chain does not end in a self-signed Issuer");
        if issuer["spec"].get("selfSigned").is_some() {
            return Ok(seen);
        }
        let ca_secret =
            issuer["spec"]["ca"]["secretName"].as_str().context("an Issuer neither CA nor self-signed")?;
        let ca = docs
            .iter()
            .find(|d| d["kind"] == "Certificate" && d["spec"]["secretName"] == ca_secret)
            .with_context(|| {
                format!("no Certificate writes {ca_secret}, which Issuer {issuer_name} signs with")
            })?;
        ensure!(ca["spec"]["isCA"] == true, "the Certificate writing {ca_secret} is not a CA");
        issuer_ref = ca["spec"]["issuerRef"].clone();
    }
}

/// The value of the unlabelled sample `name` in a text exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let started = Instant::now();
    let out = f();
    (out, started.elapsed())
}

fn run() -> Result<()> {
    let bins = Binaries::from_env()?;
    let helm =
        PathBuf::from(std::env::var("HELM").context("HELM is not set: eval \"$(hack/k8s-binaries.sh)\"")?);
    let monitoring_crds = PathBuf::from(
        std::env::var("PROMETHEUS_OPERATOR_CRDS")
            .context("PROMETHEUS_OPERATOR_CRDS is not set: eval \"$(hack/k8s-binaries.sh)\"")?,
    );
    let cert_manager_crds = PathBuf::from(
        std::env::var("CERT_MANAGER_CRDS")
            .context("CERT_MANAGER_CRDS is not set: eval \"$(hack/k8s-binaries.sh)\"")?,
    );
    let plane = ControlPlane::start(&bins)?;
    let setup =
        Setup { plane, helm, root: PathBuf::from(env!("CARGO_MANIFEST_DIR")), webhook_port: free_port() };
    let root = setup.root.clone();
    let chart_dir = root.join("charts/agentguard");
    let chart = chart_dir.to_string_lossy();

    // Rendered objects and the example policies pass the API server's own validation.
    setup.admin(&[
        "apply",
        "--server-side",
        "-f",
        &root.join("charts/agentguard/crds/crds.yaml").to_string_lossy(),
    ])?;
    setup.admin(&[
        "wait",
        "--for",
        "condition=established",
        "--timeout=60s",
        // Every CRD applied so far: a list of names would fall behind the generator.
        "--all",
        "crd",
    ])?;
    for crd in ["monitoring.coreos.com_prometheusrules.yaml", "monitoring.coreos.com_servicemonitors.yaml"] {
        setup.admin(&["apply", "--server-side", "-f", &monitoring_crds.join(crd).to_string_lossy()])?;
    }
    for crd in ["cert-manager.io_certificates.yaml", "cert-manager.io_issuers.yaml"] {
        setup.admin(&["apply", "--server-side", "-f", &cert_manager_crds.join(crd).to_string_lossy()])?;
    }
    setup.admin(&[
        "wait",
        "--for",
        "condition=established",
        "--timeout=60s",
        "crd/prometheusrules.monitoring.coreos.com",
        "crd/servicemonitors.monitoring.coreos.com",
        "crd/certificates.cert-manager.io",
        "crd/issuers.cert-manager.io",
    ])?;
    for ns in [NS, "team-a", "agents", "demo"] {
        setup.admin(&["create", "namespace", ns])?;
    }
    let mut template =
        vec!["template".to_string(), "agentguard".into(), chart.to_string(), "-n".into(), NS.into()];
    template.extend(setup.chart_values());
    let rendered = setup.helm(&template.iter().map(String::as_str).collect::<Vec<_>>())?;
    must(setup.plane.kubectl_stdin(
        &setup.plane.admin,
        &["apply", "--dry-run=server", "-f", "-"],
        Some(&rendered),
    ))
    .context("server-side validation of the rendered chart")?;
    setup
        .admin(&["apply", "--dry-run=server", "-f", &root.join("manifests/examples").to_string_lossy()])
        .context("server-side validation of manifests/examples")?;
    println!("check rendered chart and examples pass server-side validation ... ok");
    let grace = check_rolling_update(&rendered)?;
    println!("check rolling update: one pod at a time, new one Ready first, {grace}s grace period ... ok");

    // Monitoring: the objects pass their CRDs; alerts and dashboard read series that exist.
    let mut template_monitoring = template.clone();
    for set in ["serviceMonitor.enabled=true", "prometheusRule.enabled=true", "grafanaDashboard.enabled=true"]
    {
        template_monitoring.extend(["--set".to_string(), set.into()]);
    }
    for file in ["servicemonitor.yaml", "prometheusrule.yaml", "grafana-dashboard.yaml"] {
        template_monitoring.extend(["--show-only".to_string(), format!("templates/{file}")]);
    }
    let monitoring = setup.helm(&template_monitoring.iter().map(String::as_str).collect::<Vec<_>>())?;
    must(setup.plane.kubectl_stdin(
        &setup.plane.admin,
        &["apply", "--dry-run=server", "-f", "-"],
        Some(&monitoring),
    ))
    .context("server-side validation of the ServiceMonitor, PrometheusRule and dashboard ConfigMap")?;
    let alerts = alerts(&monitoring)?;
    let names: BTreeSet<&str> = alerts.iter().map(|(n, _)| n.as_str()).collect();
    for alert in [
        "AgentguardDown",
        "AgentguardWebhookErrors",
        "AgentguardSlowDecisions",
        "AgentguardCertificateExpiresSoon",
        "AgentguardBreakerTripped",
        "AgentguardCachesNotReady",
        "AgentguardViewStale",
    ] {
        ensure!(names.contains(alert), "the PrometheusRule has no {alert}: {names:?}");
    }
    let mut known = agentguard_series();
    known.extend(API_SERVER_SERIES.iter().map(|s| s.to_string()));
    known.insert("up".into());
    for (alert, expr) in &alerts {
        let unknown = unknown_names(expr, &known);
        ensure!(unknown.is_empty(), "{alert} reads {unknown:?}, which nothing exports: {expr}");
    }
    let dashboard = docs(&monitoring)?
        .into_iter()
        .find(|doc| doc["kind"] == "ConfigMap")
        .context("no dashboard ConfigMap rendered")?;
    ensure!(dashboard["metadata"]["labels"]["grafana_dashboard"] == "1", "the Grafana sidecar label");
    let shipped: serde_json::Value =
        serde_json::from_str(dashboard["data"]["agentguard.json"].as_str().context("no agentguard.json")?)?;
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(chart_dir.join("dashboards/agentguard.json"))?)?;
    ensure!(shipped == file, "the ConfigMap does not carry dashboards/agentguard.json");
    println!(
        "check {} alerts and the dashboard pass their CRDs and read exported series ... ok",
        alerts.len()
    );

    // cert-manager mode, as installed (webhooks on the Service): every object passes the API
    // server and cert-manager's CRDs, and the pieces name each other.
    let cert_manager =
        setup.helm(&["template", "agentguard", &chart, "-n", NS, "--set", "certManager.enabled=true"])?;
    must(setup.plane.kubectl_stdin(
        &setup.plane.admin,
        &["apply", "--dry-run=server", "-f", "-"],
        Some(&cert_manager),
    ))
    .context("server-side validation of the chart with certManager.enabled=true")?;
    let issuers = check_cert_manager_wiring(&cert_manager)?;
    // The CRDs' schema is enforced: a field outside it is refused, so the pass above means something.
    let mut bad = cert_manager_doc(&cert_manager, "Certificate", "agentguard-serving")?;
    bad["spec"]["privateKey"]["rotationPolicy"] = "Sometimes".into();
    let out = setup.plane.kubectl_stdin(
        &setup.plane.admin,
        &["apply", "--dry-run=server", "-f", "-"],
        Some(&serde_json::to_string(&bad)?),
    );
    ensure!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("rotationPolicy"),
        "cert-manager's Certificate CRD accepted rotationPolicy: Sometimes: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "check cert-manager mode: {issuers} Issuers and their Certificates pass cert-manager's CRDs; the injected CA is the served certificate's ... ok"
    );

    // Install.
    let dir = setup.plane.dir.path().to_owned();
    let mut install =
        vec!["install".to_string(), "agentguard".into(), chart.to_string(), "-n".into(), NS.into()];
    install.extend(setup.chart_values());
    let (out, took) = timed(|| setup.helm(&install.iter().map(String::as_str).collect::<Vec<_>>()));
    out?;
    println!("check helm install ({:.1}s) ... ok", took.as_secs_f64());
    for (kind, name, ns) in [
        ("deployment", "agentguard", NS),
        ("service", "agentguard", NS),
        ("serviceaccount", "agentguard", NS),
        ("poddisruptionbudget", "agentguard", NS),
        ("clusterrole", "agentguard", ""),
        ("clusterrolebinding", "agentguard", ""),
        ("validatingwebhookconfiguration", "agentguard", ""),
        ("clusteragentpolicy", "agentguard-default", ""),
    ] {
        let mut args = vec!["get", kind, name];
        if !ns.is_empty() {
            args.extend(["-n", ns]);
        }
        setup.admin(&args).with_context(|| format!("{kind}/{name} was not installed"))?;
    }
    let deployment: serde_json::Value =
        serde_json::from_str(&setup.admin(&["get", "deployment", "agentguard", "-n", NS, "-o", "json"])?)?;
    let pod = &deployment["spec"]["template"]["spec"];
    ensure!(deployment["spec"]["replicas"] == 3, "replicas");
    ensure!(
        pod["securityContext"]["runAsNonRoot"] == true
            && pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    );
    let container = &pod["containers"][0];
    ensure!(container["securityContext"]["readOnlyRootFilesystem"] == true);
    ensure!(container["securityContext"]["capabilities"]["drop"][0] == "ALL");
    ensure!(
        container["resources"]["limits"]["cpu"].is_null()
            && !container["resources"]["limits"]["memory"].is_null()
    );
    println!("check installed objects ... ok");

    // Identities.
    for args in [
        vec!["create", "serviceaccount", "coder", "-n", "agents"],
        vec!["create", "serviceaccount", "controller", "-n", "agents"],
        vec![
            "create",
            "clusterrolebinding",
            "coder",
            "--clusterrole=cluster-admin",
            "--serviceaccount=agents:coder",
        ],
        vec![
            "create",
            "clusterrolebinding",
            "controller",
            "--clusterrole=cluster-admin",
            "--serviceaccount=agents:controller",
        ],
        vec!["create", "clusterrolebinding", "sre", "--clusterrole=cluster-admin", "--group=sre"],
    ] {
        setup.admin(&args)?;
    }
    let agent = setup.plane.service_account_kubeconfig("agents", "coder")?;
    let controller = setup.plane.service_account_kubeconfig("agents", "controller")?;
    let alice = setup.plane.user_kubeconfig("alice", &["sre"])?;
    let as_chart = setup.plane.service_account_kubeconfig(NS, "agentguard")?;

    // agentguard with exactly the chart's RBAC.
    let admin_port = free_port();
    let mut agentguard = Some(setup.start_agentguard(&as_chart, admin_port)?);
    // Marked once agentguard runs: it registers the agent before the label is admitted.
    setup.admin(&["label", "serviceaccount", "coder", "-n", "agents", "agentguard.io/agent=true"])?;
    setup.wait_for_agent("system:serviceaccount:agents:coder")?;
    for name in ["a", "b", "c", "d"] {
        setup.admin(&["create", "deployment", name, "-n", "demo", "--image=nginx:1.27"])?;
    }
    setup.admin(&["create", "configmap", "settings", "-n", "demo"])?;
    rejects(
        setup.plane.kubectl(&agent, &["delete", "deployment", "a", "-n", "demo"]),
        "the agent's delete",
        "ClusterAgentPolicy \"agentguard-default\", rule \"every-delete\"",
    )?;
    let started = Instant::now();
    loop {
        let ready = setup.admin(&[
            "get",
            "clusteragentpolicy",
            "agentguard-default",
            "-o",
            "jsonpath={.status.conditions[0].status}",
        ])?;
        if ready == "True" {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(15),
            "policy status not written with the chart's RBAC:\n{}",
            cluster::tail(&dir.join("agentguard.log"), 20)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let started = Instant::now();
    while !setup
        .admin(&["get", "events.events.k8s.io", "-n", "demo", "-o", "jsonpath={.items[*].reason}"])?
        .contains("ApprovalRequired")
    {
        ensure!(
            started.elapsed() < Duration::from_secs(15),
            "no Event written with the chart's RBAC:\n{}",
            cluster::tail(&dir.join("agentguard.log"), 20)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The churn breaker keeps its counts in Leases in the release namespace.
    let churn = "apiVersion: agentguard.io/v1alpha1\nkind: ClusterAgentPolicy\nmetadata: {name: chart-churn}\nspec:\n  \
                 action: Allow\n  churnLimit: {maxOperations: 1, window: 1h}\n  rules:\n    - name: config\n      \
                 operations: [UPDATE]\n      namespaces: [demo]\n      resources: [{apiGroups: [\"\"], resources: [configmaps]}]\n";
    accepts(
        setup.plane.kubectl_stdin(&setup.plane.admin, &["apply", "-f", "-"], Some(churn)),
        "the churn policy",
    )?;
    setup.admin(&["wait", "--for=condition=Ready", "--timeout=30s", "clusteragentpolicy/chart-churn"])?;
    accepts(
        setup.plane.kubectl(&agent, &["label", "configmap", "settings", "-n", "demo", "first=1"]),
        "the agent's first update under a churn limit of 1",
    )?;
    rejects(
        setup.plane.kubectl(&agent, &["label", "configmap", "settings", "-n", "demo", "second=1"]),
        "the agent's second update",
        "churn limit of ClusterAgentPolicy \"chart-churn\" reached",
    )?;
    setup.admin(&["delete", "clusteragentpolicy", "chart-churn"])?;
    println!(
        "check agentguard runs with the chart's RBAC: guards, registers, writes policy status, Events and churn counts ... ok"
    );

    least_privilege(&setup, &agent, &alice)?;

    // Its own certificates rotate while agents keep sending requests: first the serving
    // certificate, then the CA (a new CA trusted beside the old, then signing): none fails.
    let secret_key = |key: &str| -> Result<String> {
        let b64 = setup.admin(&[
            "get",
            "secret",
            "agentguard-tls",
            "-n",
            NS,
            "-o",
            &format!("jsonpath={{.data.{key}}}"),
        ])?;
        Ok(String::from_utf8(decode_base64(&b64))?)
    };
    let first_cert = secret_key("tls\\.crt")?;
    let (started, mut requests) = (Instant::now(), 0);
    let (mut serving_rotated, mut issuer_at_two_cas, mut ca_rotated, mut after) = (false, None, false, 0);
    while after < 5 {
        let out =
            setup.plane.kubectl(&agent, &["delete", "deployment", "a", "-n", "demo", "--dry-run=server"]);
        rejects(out, &format!("agent request {requests} during rotation"), "agentguard-default")?;
        requests += 1;
        serving_rotated |= secret_key("tls\\.crt")? != first_cert;
        let issuer = secret_key("tls\\.issuer")?;
        if issuer_at_two_cas.is_none() && secret_key("ca\\.crt")?.matches("BEGIN CERTIFICATE").count() == 2 {
            issuer_at_two_cas = Some(issuer.clone());
        }
        ca_rotated |= issuer_at_two_cas.as_ref().is_some_and(|old| *old != issuer);
        if serving_rotated && ca_rotated {
            after += 1;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(150),
            "rotations not seen within 150s (serving {serving_rotated}, two CAs {}, CA {ca_rotated})",
            issuer_at_two_cas.is_some()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let served = std::fs::read_to_string(dir.join("agentguard.crt"))?;
    ensure!(served == secret_key("tls\\.crt")?, "the rotated certificate is not the one in use");
    ensure!(
        std::fs::read_to_string(dir.join("agentguard.log"))?.contains("certificate reloaded"),
        "the server never reloaded its certificate"
    );
    println!(
        "check self-managed serving certificate and CA rotated within {:.0}s; {requests} agent requests during it, all answered ... ok",
        started.elapsed().as_secs_f64()
    );

    // Its metrics after real reviews and a rotation: decisions by agent and action, and the
    // expiry of the certificate it serves now.
    let (_, text) = http_get(&format!("http://127.0.0.1:{admin_port}/metrics"))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    let expiry =
        sample(&text, "agentguard_certificate_expiry_timestamp_seconds").context("no expiry gauge")?;
    ensure!(
        expiry > now - 5.0 && expiry < now + 120.0,
        "certificate expiry {expiry} is not the 60s certificate in use (now {now})"
    );
    ensure!(sample(&text, "agentguard_certificate_reloads_total").unwrap_or_default() >= 1.0, "{text}");
    let held = r#"action="RequireApproval",mode="Enforce",resource="deployments",agent="system:serviceaccount:agents:coder""#;
    ensure!(
        text.lines()
            .any(|l| l.starts_with(r#"agentguard_decisions_total{outcome="held""#) && l.contains(held)),
        "no held decision counted for the agent:\n{text}"
    );
    println!(
        "check agentguard's metrics: decisions by agent and action, certificate expiry {:.0}s ahead ... ok",
        expiry - now
    );

    // agentguard down: agents refused, everyone else untouched and not slowed.
    drop(agentguard.take());
    let (out, agent_took) =
        timed(|| setup.plane.kubectl(&agent, &["delete", "deployment", "a", "-n", "demo"]));
    rejects(out, "the agent's delete while agentguard is down", "failed calling webhook")?;
    let (out, human_took) =
        timed(|| setup.plane.kubectl(&alice, &["delete", "deployment", "b", "-n", "demo"]));
    accepts(out, "a human's delete while agentguard is down")?;
    let (out, controller_took) =
        timed(|| setup.plane.kubectl(&controller, &["label", "configmap", "settings", "-n", "demo", "x=y"]));
    accepts(out, "a controller's update while agentguard is down")?;
    // Marking a new agent needs agentguard to register it first: refused, loudly, rather than
    // stored unguarded. Any other label on a ServiceAccount never reaches agentguard.
    setup.admin(&["create", "serviceaccount", "newcomer", "-n", "demo"])?;
    rejects(
        setup.plane.kubectl(
            &setup.plane.admin,
            &["label", "serviceaccount", "newcomer", "-n", "demo", "agentguard.io/agent=true"],
        ),
        "marking an agent while agentguard is down",
        "failed calling webhook",
    )?;
    accepts(
        setup
            .plane
            .kubectl(&setup.plane.admin, &["label", "serviceaccount", "newcomer", "-n", "demo", "team=web"]),
        "another label on a ServiceAccount while agentguard is down",
    )?;
    ensure!(human_took < Duration::from_secs(2) && controller_took < Duration::from_secs(2), "not slowed");
    ensure!(agent_took < Duration::from_secs(5), "the agent waited for a timeout: {agent_took:?}");
    println!(
        "check agentguard down: agent refused in {} ms, human delete {} ms, controller update {} ms (kubectl wall time) ... ok",
        agent_took.as_millis(),
        human_took.as_millis(),
        controller_took.as_millis()
    );

    // Restarted: guarding resumes.
    agentguard = Some(setup.start_agentguard(&as_chart, admin_port)?);
    rejects(
        setup.plane.kubectl(&agent, &["delete", "deployment", "a", "-n", "demo"]),
        "the agent's delete after restart",
        "agentguard-default",
    )?;
    println!("check restart resumes guarding ... ok");

    // The API server counted the outage under the names and labels the alerts read.
    let apiserver = setup.admin(&["get", "--raw", "/metrics"])?;
    let served = exposed(&apiserver);
    for (alert, expr) in &alerts {
        for name in metric_names(expr).into_iter().filter(|n| !n.starts_with("agentguard_") && n != "up") {
            ensure!(served.contains(&name), "{alert} reads {name}, which this API server does not export");
        }
    }
    for name in API_SERVER_SERIES {
        ensure!(served.contains(*name), "the API server does not export {name}");
    }
    ensure!(
        apiserver.lines().any(|l| l.starts_with("apiserver_admission_webhook_rejection_count{")
            && l.contains(r#"error_type="calling_webhook_error""#)
            && l.contains(r#"name="agents.agentguard.io""#)),
        "the outage is not in apiserver_admission_webhook_rejection_count"
    );
    println!("check the API server counted the outage as AgentguardWebhookErrors reads it ... ok");

    // helm upgrade keeps working, and the agent list survives (or is restored at once).
    let mut upgrade =
        vec!["upgrade".to_string(), "agentguard".into(), chart.to_string(), "-n".into(), NS.into()];
    upgrade.extend(setup.chart_values());
    upgrade.extend(["--set".into(), "replicas=2".into()]);
    setup.helm(&upgrade.iter().map(String::as_str).collect::<Vec<_>>())?;
    ensure!(
        setup.admin(&["get", "deployment", "agentguard", "-n", NS, "-o", "jsonpath={.spec.replicas}"])?
            == "2"
    );
    setup.wait_for_agent("system:serviceaccount:agents:coder")?;
    rejects(
        setup.plane.kubectl(&agent, &["delete", "deployment", "a", "-n", "demo"]),
        "the agent's delete after upgrade",
        "agentguard-default",
    )?;
    println!("check helm upgrade ... ok");

    // helm uninstall leaves no webhook configuration behind.
    setup.helm(&["uninstall", "agentguard", "-n", NS])?;
    let started = Instant::now();
    while setup
        .plane
        .kubectl(&setup.plane.admin, &["get", "validatingwebhookconfiguration", "agentguard"])
        .status
        .success()
    {
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "the webhook configuration outlived helm uninstall"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(agentguard.take());
    accepts(
        setup.plane.kubectl(&agent, &["delete", "deployment", "a", "-n", "demo"]),
        "a delete after uninstall",
    )?;
    println!("check helm uninstall removes the webhook configuration ... ok");
    Ok(())
}

/// agentguard's own token reads no Secret, and what that costs is what the chart says: an
/// agent's change to a Secret is recorded unverified, and a DELETE that may cascade into Secrets
/// a policy guards is judged as if it took them (unless it orphans its dependents).
fn least_privilege(setup: &Setup, agent: &Path, alice: &Path) -> Result<()> {
    let me = format!("--as=system:serviceaccount:{NS}:agentguard");
    let can = |verb: &str, what: &str, scope: &str| -> bool {
        setup.plane.kubectl(&setup.plane.admin, &["auth", "can-i", verb, what, scope, &me]).status.success()
    };
    for (verb, what, scope) in
        [("get", "secrets", "-n=demo"), ("list", "secrets", "-A"), ("watch", "secrets", "-A")]
    {
        ensure!(!can(verb, what, scope), "agentguard's ServiceAccount may {verb} {what} ({scope})");
    }
    for (verb, what) in [
        ("list", "configmaps"),
        ("list", "deployments.apps"),
        ("get", "persistentvolumes"),
        // A CRD's group the cluster served at install.
        ("list", "certificates.cert-manager.io"),
    ] {
        ensure!(can(verb, what, "-A"), "agentguard's ServiceAccount may not {verb} {what}");
    }

    // An approved change to a Secret: admitted, recorded, and marked unverified.
    setup.admin(&["create", "secret", "generic", "creds", "-n", "demo", "--from-literal=k=v"])?;
    let label = ["label", "secret", "creds", "-n", "demo", "rotated=1"];
    let refusal =
        rejects(setup.plane.kubectl(agent, &label), "the agent's Secret update", "requires approval")?;
    let approve = approve_command(&refusal)?;
    must(setup.plane.kubectl(alice, &approve.iter().map(String::as_str).collect::<Vec<_>>()))?;
    accepts(setup.plane.kubectl(agent, &label), "the agent's approved Secret update")?;
    let started = Instant::now();
    let outcome = loop {
        let outcomes = setup.admin(&[
            "get",
            "agentchanges",
            "-n",
            NS,
            "-o",
            "jsonpath={range .items[?(@.spec.target.name==\"creds\")]}{.status.outcome}:{.status.message}{\"\\n\"}{end}",
        ])?;
        if let Some(line) = outcomes.lines().find(|l| !l.starts_with(':') && !l.is_empty()) {
            break line.to_owned();
        }
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the Secret change was not checked: {outcomes:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    ensure!(
        outcome.starts_with("Unverified:") && outcome.contains("may not read secrets"),
        "the record of the Secret change: {outcome}"
    );

    // Secret deletes denied in demo: a DELETE whose garbage collection could reach Secrets is
    // judged as if it did, approved or not; orphaning its dependents, it goes.
    let deny = "apiVersion: agentguard.io/v1alpha1\nkind: ClusterAgentPolicy\nmetadata: {name: chart-keep-secrets}\n\
                spec:\n  action: Deny\n  rules:\n    - name: secrets\n      operations: [DELETE]\n      \
                namespaces: [demo]\n      resources: [{apiGroups: [\"\"], resources: [secrets]}]\n";
    accepts(setup.plane.kubectl_stdin(&setup.plane.admin, &["apply", "-f", "-"], Some(deny)), "the policy")?;
    setup.admin(&[
        "wait",
        "--for=condition=Ready",
        "--timeout=30s",
        "clusteragentpolicy/chart-keep-secrets",
    ])?;
    setup.admin(&["create", "configmap", "doomed", "-n", "demo"])?;
    rejects(
        setup.plane.kubectl(agent, &["delete", "configmap", "doomed", "-n", "demo"]),
        "the agent's delete that may cascade into Secrets",
        "unseen: agentguard may not read secrets",
    )?;
    // Orphaning its dependents, it is the ConfigMap's delete alone: held, approved, admitted.
    let delete = ["delete", "configmap", "doomed", "-n", "demo", "--cascade=orphan"];
    let refusal = rejects(setup.plane.kubectl(agent, &delete), "the orphaning delete", "requires approval")?;
    let approve = approve_command(&refusal)?;
    must(setup.plane.kubectl(alice, &approve.iter().map(String::as_str).collect::<Vec<_>>()))
        .context("approving the orphaning delete")?;
    accepts(setup.plane.kubectl(agent, &delete), "the approved delete that orphans its dependents")?;
    setup.admin(&["delete", "clusteragentpolicy", "chart-keep-secrets"])?;
    // Gone from agentguard's caches too (compiles are coalesced) before the next check relies on it.
    let started = Instant::now();
    loop {
        let out =
            setup.plane.kubectl(agent, &["delete", "deployment", "a", "-n", "demo", "--dry-run=server"]);
        if String::from_utf8_lossy(&out.stderr).contains("agentguard-default") {
            break;
        }
        ensure!(started.elapsed() < Duration::from_secs(10), "the deleted policy is still in force");
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "check agentguard reads no Secret: its change is recorded unverified, a delete that may cascade into guarded Secrets is judged as if it did ... ok"
    );
    Ok(())
}

fn main() {
    match run() {
        Ok(()) => println!("chart: 1 passed, 0 failed"),
        Err(e) => {
            println!("chart FAILED: {e:#}");
            println!("chart: 0 passed, 1 failed");
            std::process::exit(1);
        }
    }
}
