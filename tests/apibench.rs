//! The benchmark through the real API server (docs/load-benchmark.md, "Through the API server"):
//! an agent's `DELETE …?dryRun=All` of a ConfigMap, sent by `wrk` with a ServiceAccount token to
//! kube-apiserver, measured three ways in the same run, round after round:
//!
//! * `none`: the same DELETE by an unlabelled ServiceAccount with the same rights. No webhook and
//!   no policy judges it (both only look at their matchConditions), so it is the API server's own
//!   cost of the request: the fairest "no admission" baseline.
//! * `agentguard`: the same DELETE by a labelled agent, refused by a `Deny` ClusterAgentPolicy
//!   through the `agents.agentguard.io` webhook.
//! * `vap`: the same DELETE by a third unlabelled ServiceAccount, refused by a
//!   ValidatingAdmissionPolicy and binding that match exactly that account deleting ConfigMaps in
//!   that namespace. agentguard's webhooks never see it.
//!
//! Run through `hack/bench-apiserver.sh` (release agentguard, installs wrk), not plain
//! `cargo test`. Environment: `AGENTGUARD_BIN` (the agentguard binary; default: the one cargo
//! built with this target), `APIBENCH_DURATION` (seconds per measurement, 10),
//! `APIBENCH_ROUNDS` (3), `APIBENCH_CONNECTIONS` (16), `APIBENCH_HTTP2` (`1`: offer HTTP/2, which
//! the API server then uses to this loopback webhook; by default only HTTP/1.1, what it uses
//! through a Service), `APIBENCH_AGENTGUARD_ARGS` (more `agentguard serve` flags,
//! space-separated, for trying the server's settings). `--smoke`:
//! one round of 2 s on 4 connections, every answer checked, no timing judged.

#[allow(dead_code)]
#[path = "e2e/cluster.rs"]
mod cluster;
#[allow(dead_code)]
#[path = "e2e/world.rs"]
mod world;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use cluster::ControlPlane;
use world::{Launch, must};

const NAMESPACE: &str = "bench";
const CLIENTS: &str = "bench-clients";
const TARGET: &str = "target";
const AGENT: &str = "agent";
const PLAIN: &str = "plain";
const VAP_JUDGED: &str = "vap-judged";

const MODES: [Mode; 3] = [Mode::None, Mode::Agentguard, Mode::Vap];

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Mode {
    None,
    Agentguard,
    Vap,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Agentguard => "agentguard",
            Mode::Vap => "vap",
        }
    }

    fn account(self) -> &'static str {
        match self {
            Mode::None => PLAIN,
            Mode::Agentguard => AGENT,
            Mode::Vap => VAP_JUDGED,
        }
    }

    /// The HTTP status every answer must have, and a fragment of its body.
    fn expected(self) -> (u16, &'static str) {
        match self {
            // Admitted: the dry-run DELETE succeeds (the body is a bare Status).
            Mode::None => (200, ""),
            Mode::Agentguard => (403, "ClusterAgentPolicy \\\"bench-deny\\\""),
            Mode::Vap => (403, "ValidatingAdmissionPolicy 'bench-deny'"),
        }
    }
}

fn objects() -> String {
    let account = |name: &str, agent: bool| {
        let labels = if agent { "\n  labels: {agentguard.io/agent: \"true\"}" } else { "" };
        format!(
            "---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {name}\n  namespace: {CLIENTS}{labels}\n"
        )
    };
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {NAMESPACE}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: {CLIENTS}}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: {TARGET}, namespace: {NAMESPACE}}}
data: {{setting: "on"}}
{agent}{plain}{vap}---
# The same narrow rights for all three: reading and deleting ConfigMaps here. Nothing that lets
# the agent act as another account, so agentguard treats only the labelled one as an agent.
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: configmaps, namespace: {NAMESPACE}}}
rules: [{{apiGroups: [""], resources: [configmaps], verbs: [get, list, delete]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: configmaps, namespace: {NAMESPACE}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: configmaps}}
subjects:
  - {{kind: ServiceAccount, name: {AGENT}, namespace: {CLIENTS}}}
  - {{kind: ServiceAccount, name: {PLAIN}, namespace: {CLIENTS}}}
  - {{kind: ServiceAccount, name: {VAP_JUDGED}, namespace: {CLIENTS}}}
---
apiVersion: agentguard.io/v1alpha1
kind: ClusterAgentPolicy
metadata: {{name: bench-deny}}
spec:
  action: Deny
  message: ConfigMaps in {NAMESPACE} are not for agents to delete.
  rules:
    - name: configmaps
      operations: [DELETE]
      resources: [{{apiGroups: [""], resources: [configmaps]}}]
      namespaces: [{NAMESPACE}]
---
# The same refusal as a ValidatingAdmissionPolicy: DELETE of ConfigMaps in {NAMESPACE}, by exactly
# that account, with a validation false for the request.
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: bench-deny}}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
      - {{apiGroups: [""], apiVersions: ["*"], operations: [DELETE], resources: [configmaps]}}
  matchConditions:
    - name: the-judged-account
      expression: request.userInfo.username == "system:serviceaccount:{CLIENTS}:{VAP_JUDGED}"
  validations:
    - expression: request.operation != "DELETE"
      message: ConfigMaps in {NAMESPACE} are not for this account to delete.
      reason: Forbidden
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: bench-deny}}
spec:
  policyName: bench-deny
  validationActions: [Deny]
  matchResources:
    namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {NAMESPACE}}}}}
"#,
        agent = account(AGENT, true),
        plain = account(PLAIN, false),
        vap = account(VAP_JUDGED, false),
    )
}

struct Settings {
    smoke: bool,
    duration: u64,
    rounds: usize,
    connections: u32,
    binary: Option<PathBuf>,
    /// Offer HTTP/2 on agentguard's webhook port (`APIBENCH_HTTP2=1`).
    http2: bool,
    serve_args: Vec<String>,
}

impl Settings {
    fn from_env() -> Result<Self> {
        let smoke = std::env::args().any(|a| a == "--smoke");
        let number = |var: &str, default: u64| -> Result<u64> {
            match std::env::var(var) {
                Ok(v) => v.parse().with_context(|| format!("{var}={v:?} is not a number")),
                Err(_) => Ok(default),
            }
        };
        let (duration, rounds, connections) = if smoke {
            (2, 1, 4)
        } else {
            (
                number("APIBENCH_DURATION", 10)?,
                number("APIBENCH_ROUNDS", 3)? as usize,
                number("APIBENCH_CONNECTIONS", 16)? as u32,
            )
        };
        ensure!(
            duration > 0 && rounds > 0 && connections > 0,
            "durations, rounds and connections must be positive"
        );
        Ok(Self {
            smoke,
            duration,
            rounds,
            connections,
            binary: std::env::var_os("AGENTGUARD_BIN").map(PathBuf::from),
            http2: std::env::var("APIBENCH_HTTP2").is_ok_and(|v| v == "1"),
            serve_args: std::env::var("APIBENCH_AGENTGUARD_ARGS")
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
        })
    }
}

/// One measurement: what wrk saw and what the API server counted meanwhile.
#[derive(Clone, Default)]
struct Sample {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: f64,
    /// Mean of `apiserver_request_duration_seconds` for these DELETEs, ms.
    server_ms: f64,
    /// Webhook calls to agentguard and their mean duration as the API server timed them, ms.
    webhook_calls: f64,
    webhook_ms: f64,
    /// Mean of the API server's whole validating admission step, ms.
    validate_ms: f64,
    /// LIST requests the API server served meanwhile (agentguard's ownership lookups, and the
    /// controllers' few).
    lists: f64,
    /// agentguard's own time per review (`agentguard_review_duration_seconds`), ms.
    review_ms: f64,
    /// The most connections from the API server to agentguard's webhook port open at once under
    /// the load (sampled every 100 ms), and how many were opened during it.
    connections: usize,
    new_connections: usize,
}

fn main() -> Result<()> {
    let settings = Settings::from_env()?;
    let plane = world::plane_with_crds()?;
    must(plane.kubectl_stdin(&plane.admin, &["apply", "-f", "-"], Some(&objects())))?;

    // The API server speaks HTTP/1.1 to a webhook behind a Service (as the chart installs it),
    // HTTP/2 only to a loopback URL such as this one: offer what a cluster gets unless told.
    let mut args = vec!["--no-records".to_owned(), format!("--webhook-http2={}", settings.http2)];
    args.extend(settings.serve_args.iter().cloned());
    let launch = Launch {
        webhook_configuration: Some("agentguard".to_owned()),
        args,
        binary: settings.binary.clone(),
        ..Launch::default()
    };
    let agentguard = world::start_agentguard_with(&plane, "agentguard", &launch)?;
    let webhook_port: u16 = agentguard
        .webhook
        .rsplit(':')
        .next()
        .and_then(|rest| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .context("agentguard's webhook port")?;
    wait_for_agent(&plane, &format!("system:serviceaccount:{CLIENTS}:{AGENT}"))?;

    let dir = plane.dir.path().to_owned();
    let url = format!("{}/api/v1/namespaces/{NAMESPACE}/configmaps/{TARGET}?dryRun=All", plane.url);
    let mut scripts = BTreeMap::new();
    for mode in MODES {
        let token =
            must(plane.kubectl(
                &plane.admin,
                &["create", "token", mode.account(), "-n", CLIENTS, "--duration", "2h"],
            ))?;
        let token = token.trim().to_owned();
        // Until the policy, the binding and the agent's registration are in force everywhere.
        settle(&url, &token, mode)?;
        let script = dir.join(format!("{}.lua", mode.name()));
        std::fs::write(
            &script,
            format!("wrk.method = \"DELETE\"\nwrk.headers[\"Authorization\"] = \"Bearer {token}\"\n"),
        )?;
        scripts.insert(mode, script);
    }
    eprintln!("every account gets its expected answer: none 200, agentguard 403, vap 403");

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "wrk -t1 -c{} -d{}s --latency, DELETE https://127.0.0.1:PORT/api/v1/namespaces/{NAMESPACE}/configmaps/{TARGET}?dryRun=All \
         ({} cores, load average {}, agentguard {}, webhook over {}{})",
        settings.connections,
        settings.duration,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        settings.binary.as_ref().map_or("built with this target".to_owned(), |b| b.display().to_string()),
        if settings.http2 { "HTTP/2 (loopback URL, h2 offered)" } else { "HTTP/1.1 (as through a Service)" },
        if settings.serve_args.is_empty() {
            String::new()
        } else {
            format!(", {}", settings.serve_args.join(" "))
        },
    );
    println!();
    println!(
        "| round | mode | req/s | p50 ms | p99 ms | API server: request ms | validating admission ms | webhook calls, mean ms | agentguard's review ms | LISTs served | connections to agentguard: most open (opened) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut samples: BTreeMap<Mode, Vec<Sample>> = BTreeMap::new();
    let mut known = BTreeSet::new();
    for round in 0..settings.rounds {
        // Each round starts with another mode, so none profits from going first or last.
        for i in 0..MODES.len() {
            let mode = MODES[(round + i) % MODES.len()];
            let sample = measure(
                &plane,
                &agentguard,
                &settings,
                &url,
                &scripts[&mode],
                mode,
                webhook_port,
                &mut known,
            )?;
            agentguard.check_alive()?;
            println!(
                "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0}, {:.2} | {:.2} | {:.0} | {} ({}) |",
                round + 1,
                mode.name(),
                sample.rps,
                sample.p50_ms,
                sample.p99_ms,
                sample.server_ms,
                sample.validate_ms,
                sample.webhook_calls,
                sample.webhook_ms,
                sample.review_ms,
                sample.lists,
                sample.connections,
                sample.new_connections,
            );
            samples.entry(mode).or_default().push(sample);
        }
    }
    if settings.smoke {
        println!("\nsmoke run: every request got its expected answer; timings not judged");
        return Ok(());
    }
    let median = |mode: Mode, f: fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples[&mode].iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("\nMedians of {} rounds:\n", settings.rounds);
    println!("| mode | req/s | p50 ms | p99 ms | API server: request ms | webhook mean ms |");
    println!("|---|---|---|---|---|---|");
    for mode in MODES {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {} |",
            mode.name(),
            median(mode, |s| s.rps),
            median(mode, |s| s.p50_ms),
            median(mode, |s| s.p99_ms),
            median(mode, |s| s.server_ms),
            if mode == Mode::Agentguard {
                format!("{:.2}", median(mode, |s| s.webhook_ms))
            } else {
                "–".into()
            },
        );
    }
    let (a, v, n) = (Mode::Agentguard, Mode::Vap, Mode::None);
    println!();
    println!(
        "agentguard / vap:  req/s {:.2}, p50 {:.2}, p99 {:.2}",
        median(a, |s| s.rps) / median(v, |s| s.rps),
        median(a, |s| s.p50_ms) / median(v, |s| s.p50_ms),
        median(a, |s| s.p99_ms) / median(v, |s| s.p99_ms),
    );
    println!(
        "agentguard / none: req/s {:.2}, p50 {:.2}, p99 {:.2}",
        median(a, |s| s.rps) / median(n, |s| s.rps),
        median(a, |s| s.p50_ms) / median(n, |s| s.p50_ms),
        median(a, |s| s.p99_ms) / median(n, |s| s.p99_ms),
    );
    println!(
        "vap / none:        req/s {:.2}, p50 {:.2}, p99 {:.2}",
        median(v, |s| s.rps) / median(n, |s| s.rps),
        median(v, |s| s.p50_ms) / median(n, |s| s.p50_ms),
        median(v, |s| s.p99_ms) / median(n, |s| s.p99_ms),
    );
    // Ratios within each round (the three modes of a round are seconds apart).
    let per_round: Vec<String> = (0..settings.rounds)
        .map(|r| {
            let (a, v, n) = (&samples[&a][r], &samples[&v][r], &samples[&n][r]);
            format!(
                "{:.2}/{:.2} (p50 {:.2}/{:.2})",
                a.rps / v.rps,
                a.rps / n.rps,
                a.p50_ms / v.p50_ms,
                a.p50_ms / n.p50_ms
            )
        })
        .collect();
    println!("per round, req/s agentguard/vap / agentguard/none: {}", per_round.join(", "));
    Ok(())
}

/// Waits until agentguard's webhook configuration names `username` among the agents.
fn wait_for_agent(plane: &ControlPlane, username: &str) -> Result<()> {
    let started = Instant::now();
    loop {
        let out = plane.kubectl(
            &plane.admin,
            &[
                "get",
                "validatingwebhookconfiguration",
                "agentguard",
                "-o",
                "jsonpath={.webhooks[0].matchConditions}",
            ],
        );
        if out.status.success() && String::from_utf8_lossy(&out.stdout).contains(username) {
            return Ok(());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "{username} not registered as an agent after 60s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One DELETE with curl: (status, body).
fn once(url: &str, token: &str) -> Result<(u16, String)> {
    let out = Command::new("curl")
        .args(["-sS", "--insecure", "-X", "DELETE", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .args(["-w", "\n%{http_code}", url])
        .output()
        .context("running curl")?;
    ensure!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    let (body, code) = text.rsplit_once('\n').context("no status from curl")?;
    Ok((code.trim().parse()?, body.to_owned()))
}

/// Waits until `mode`'s account gets its expected answer ten times in a row (policies, bindings
/// and webhook configurations reach the API server's caches asynchronously).
fn settle(url: &str, token: &str, mode: Mode) -> Result<()> {
    let (status, fragment) = mode.expected();
    let started = Instant::now();
    let mut streak = 0;
    while streak < 10 {
        let (got, body) = once(url, token)?;
        if got == status && body.contains(fragment) {
            streak += 1;
            continue;
        }
        streak = 0;
        if started.elapsed() > Duration::from_secs(60) {
            bail!("{}: expected {status} with {fragment:?} after 60s, got {got}: {body:?}", mode.name());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// The API server's metrics, as admin.
fn scrape(plane: &ControlPlane) -> Result<String> {
    must(plane.kubectl(&plane.admin, &["get", "--raw", "/metrics"]))
}

/// Sum of the series of `name` whose labels include every one of `labels`.
fn sum(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// (count, sum) of a histogram over the series matching `labels`.
fn histogram(metrics: &str, name: &str, labels: &[&str]) -> (f64, f64) {
    (sum(metrics, &format!("{name}_count"), labels), sum(metrics, &format!("{name}_sum"), labels))
}

/// (count, sum) of agentguard's `agentguard_review_duration_seconds`: from reading the request
/// to the answer, its own API calls included.
fn review_time(agentguard: &world::Agentguard) -> Result<(f64, f64)> {
    let metrics = agentguard.metrics()?;
    let value = |name: &str| -> Result<f64> {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no {name} in agentguard's metrics"))
    };
    Ok((value("agentguard_review_duration_seconds_count")?, value("agentguard_review_duration_seconds_sum")?))
}

/// Remote ports of the established TCP connections to `port` on loopback (IPv4).
fn connections_to(port: u16) -> BTreeSet<u16> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
            let remote = u16::from_str_radix(fields.get(2)?.rsplit(':').next()?, 16).ok()?;
            (local == port && *fields.get(3)? == "01").then_some(remote)
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn measure(
    plane: &ControlPlane,
    agentguard: &world::Agentguard,
    settings: &Settings,
    url: &str,
    script: &Path,
    mode: Mode,
    webhook_port: u16,
    known: &mut BTreeSet<u16>,
) -> Result<Sample> {
    let deletes = ["resource=\"configmaps\"", "verb=\"DELETE\""];
    let webhook = ["name=\"agents.agentguard.io\"", "operation=\"DELETE\""];
    let validate = ["operation=\"DELETE\"", "type=\"validate\""];
    let before = scrape(plane)?;
    let reviews_before = review_time(agentguard)?;
    let wrk = Command::new("wrk")
        .arg("-t1")
        .arg(format!("-c{}", settings.connections))
        .arg(format!("-d{}s", settings.duration))
        .arg("--latency")
        .arg("-s")
        .arg(script)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running wrk (hack/bench-apiserver.sh installs it)")?;
    // The API server's connections to agentguard while the load lasts: the most open at once,
    // and every one seen (a connection not seen before was opened, with a TLS handshake).
    let (mut most, mut seen) = (0, BTreeSet::new());
    let deadline = Instant::now() + Duration::from_secs(settings.duration);
    while Instant::now() < deadline {
        let open = connections_to(webhook_port);
        most = most.max(open.len());
        seen.extend(open);
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = wrk.wait_with_output()?;
    let after = scrape(plane)?;
    let reviews_after = review_time(agentguard)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    ensure!(!text.contains("Socket errors"), "{}: socket errors under load:\n{text}", mode.name());
    let mut sample = parse_wrk(&text).with_context(|| format!("unreadable wrk output:\n{text}"))?;
    // Every answer must be the expected one: all 200 for none, all 403 for the refusals.
    let non_2xx = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .map_or(0.0, |v| v.trim().parse().unwrap_or(f64::NAN));
    let (status, _) = mode.expected();
    let expected_non_2xx = if status == 200 { 0.0 } else { sample.requests };
    ensure!(
        non_2xx == expected_non_2xx,
        "{}: {non_2xx} of {} answers were not 2xx, expected {expected_non_2xx}:\n{text}",
        mode.name(),
        sample.requests
    );
    let code = format!("code=\"{status}\"");
    let served = sum(&after, "apiserver_request_total", &[&deletes[..], &[code.as_str()]].concat())
        - sum(&before, "apiserver_request_total", &[&deletes[..], &[code.as_str()]].concat());
    // wrk counts the requests it completed; the API server may have answered a few more whose
    // answers arrived after wrk stopped reading.
    ensure!(
        served >= sample.requests,
        "{}: the API server answered {served} DELETEs with {status}, wrk saw {}",
        mode.name(),
        sample.requests
    );
    let mean = |(c1, s1): (f64, f64), (c0, s0): (f64, f64)| {
        if c1 > c0 { (s1 - s0) / (c1 - c0) * 1000.0 } else { 0.0 }
    };
    let name = "apiserver_request_duration_seconds";
    sample.server_ms = mean(histogram(&after, name, &deletes), histogram(&before, name, &deletes));
    let name = "apiserver_admission_webhook_admission_duration_seconds";
    let (w1, w0) = (histogram(&after, name, &webhook), histogram(&before, name, &webhook));
    sample.webhook_calls = w1.0 - w0.0;
    sample.webhook_ms = mean(w1, w0);
    // agentguard judges every agent's DELETE and nothing else.
    let judged = if mode == Mode::Agentguard {
        sample.webhook_calls >= sample.requests
    } else {
        sample.webhook_calls == 0.0
    };
    ensure!(
        judged,
        "{}: {} webhook calls to agentguard for {} DELETEs",
        mode.name(),
        sample.webhook_calls,
        sample.requests
    );
    sample.review_ms = mean(reviews_after, reviews_before);
    let name = "apiserver_admission_step_admission_duration_seconds";
    sample.validate_ms = mean(histogram(&after, name, &validate), histogram(&before, name, &validate));
    // agentguard's own calls on the request path: the ownership view lists the guarded resource
    // types in the namespace for every agent DELETE (src/cluster/ownership.rs).
    let lists = ["verb=\"LIST\""];
    sample.lists =
        sum(&after, "apiserver_request_total", &lists) - sum(&before, "apiserver_request_total", &lists);
    sample.connections = most;
    sample.new_connections = seen.difference(known).count();
    known.extend(seen);
    Ok(sample)
}

/// req/s, p50, p99 and the request count from wrk's `--latency` output.
fn parse_wrk(text: &str) -> Option<Sample> {
    let ms = |v: &str| -> Option<f64> {
        if let Some(n) = v.strip_suffix("us") {
            return Some(n.parse::<f64>().ok()? / 1000.0);
        }
        if let Some(n) = v.strip_suffix("ms") {
            return n.parse().ok();
        }
        if let Some(n) = v.strip_suffix('m') {
            return Some(n.parse::<f64>().ok()? * 60_000.0);
        }
        v.strip_suffix('s')?.parse::<f64>().ok().map(|s| s * 1000.0)
    };
    let mut sample = Sample::default();
    let (mut p50, mut p99, mut rps, mut requests) = (None, None, None, None);
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["50%", v] => p50 = ms(v),
            ["99%", v] => p99 = ms(v),
            ["Requests/sec:", v] => rps = v.parse().ok(),
            [n, "requests", "in", ..] => requests = n.parse().ok(),
            _ => {}
        }
    }
    sample.p50_ms = p50?;
    sample.p99_ms = p99?;
    sample.rps = rps?;
    sample.requests = requests?;
    Some(sample)
}
