//! The scale scenario: agentguard's memory and CPU with 10,000 ServiceAccounts in 2,000
//! Namespaces and 1,000 policies, on a real control plane. A documented run, not part of CI
//! (it takes a few minutes): `hack/scale.sh` (or `cargo test --test scale` with the
//! Kubernetes binaries' variables set). Prints resident memory after each stage and the CPU
//! agentguard spent taking in the policies.
//!
//! With `--agents N[,N…]` it measures registration instead ([`registration`]): with N − 1
//! individually labelled agents registered, the time from labelling the Nth until its DELETE is
//! held, and the size of the webhook configuration and of its `agents` condition.

#[allow(dead_code)]
#[path = "e2e/cluster.rs"]
mod cluster;
#[allow(dead_code)]
#[path = "e2e/world.rs"]
mod world;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use cluster::ControlPlane;
use world::{must, start_agentguard};

const NAMESPACES: usize = 2_000;
const SERVICE_ACCOUNTS_PER_NAMESPACE: usize = 5;
/// One agent in every this many namespaces (each is registered with the API server).
const AGENT_EVERY: usize = 20;
const POLICIES: usize = 1_000;
/// Objects per `kubectl create`.
const BATCH: usize = 500;

/// Resident memory (VmRSS) in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

fn metric(admin: &str, name: &str) -> Result<f64> {
    let (_, body) = world::http_get(&format!("{admin}/metrics"))?;
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no {name}"))
}

fn create(plane: &ControlPlane, items: &[String]) -> Result<()> {
    for chunk in items.chunks(BATCH) {
        let list = format!("apiVersion: v1\nkind: List\nitems:\n{}", chunk.join(""));
        must(plane.kubectl_stdin(&plane.admin, &["create", "-f", "-", "-o", "name"], Some(&list)))?;
    }
    Ok(())
}

/// Waits until agentguard's memory has stopped growing (its watches have taken everything in).
fn settled_rss(pid: u32) -> Result<u64> {
    let mut last = rss_kib(pid)?;
    loop {
        std::thread::sleep(Duration::from_secs(3));
        let now = rss_kib(pid)?;
        if now <= last + 256 {
            return Ok(now);
        }
        last = now;
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--agents") {
        let counts = args
            .get(at + 1)
            .context("--agents needs a value")?
            .split(',')
            .map(|n| n.trim().parse::<usize>().with_context(|| format!("--agents {n}")))
            .collect::<Result<Vec<_>>>()?;
        return registration(&counts);
    }
    let plane = world::plane_with_crds()?;
    let agentguard = start_agentguard(&plane, "agentguard", true)?;
    let pid = agentguard.pid();
    let empty = settled_rss(pid)?;
    println!("empty cluster:                               RSS {}", mib(empty));

    let started = Instant::now();
    let namespaces: Vec<String> = (0..NAMESPACES)
        .map(|i| {
            let env = if i % 10 == 0 { "prod" } else { "dev" };
            format!(
                "- apiVersion: v1\n  kind: Namespace\n  metadata: {{name: scale-{i:04}, labels: {{env: {env}, team: t{}}}}}\n",
                i % 50
            )
        })
        .collect();
    create(&plane, &namespaces)?;
    let accounts: Vec<String> = (0..NAMESPACES)
        .flat_map(|i| {
            (0..SERVICE_ACCOUNTS_PER_NAMESPACE).map(move |j| {
                let agent = if i % AGENT_EVERY == 0 && j == 0 { ", labels: {agentguard.io/agent: \"true\"}" } else { "" };
                format!(
                    "- apiVersion: v1\n  kind: ServiceAccount\n  metadata: {{name: sa-{j}, namespace: scale-{i:04}{agent}}}\n"
                )
            })
        })
        .collect();
    create(&plane, &accounts)?;
    let with_accounts = settled_rss(pid)?;
    println!(
        "{} Namespaces, {} ServiceAccounts ({} agents): RSS {} (created in {:.0}s)",
        NAMESPACES,
        accounts.len(),
        NAMESPACES / AGENT_EVERY,
        mib(with_accounts),
        started.elapsed().as_secs_f64()
    );

    let compiles_before = metric(&agentguard.admin, "agentguard_policy_compiles_total")?;
    let cpu_before = cpu_seconds(pid)?;
    let started = Instant::now();
    let policies: Vec<String> = (0..POLICIES)
        .map(|i| {
            let rule = match i % 4 {
                0 => format!("namespaces: [scale-{:04}]", i % NAMESPACES),
                1 => "namespaceSelector: {matchLabels: {env: prod}}".to_owned(),
                2 => format!("objectSelector: {{matchLabels: {{app: app-{i}}}}}"),
                _ => "condition: \"object.spec.replicas == 0\"".to_owned(),
            };
            format!(
                "- apiVersion: agentguard.io/v1alpha1\n  kind: ClusterAgentPolicy\n  metadata: {{name: scale-{i:04}}}\n  spec:\n    \
                 action: RequireApproval\n    approval: {{approvers: {{groups: [sre]}}}}\n    rules:\n      - name: r\n        \
                 operations: [DELETE, UPDATE]\n        resources: [{{apiGroups: [apps], resources: [deployments, statefulsets]}}]\n        \
                 {rule}\n"
            )
        })
        .collect();
    create(&plane, &policies)?;
    while metric(&agentguard.admin, "agentguard_policies")? < POLICIES as f64 {
        ensure!(
            started.elapsed() < Duration::from_secs(300),
            "agentguard never compiled all {POLICIES} policies"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let with_policies = settled_rss(pid)?;
    let cpu = cpu_seconds(pid)? - cpu_before;
    let compiles = metric(&agentguard.admin, "agentguard_policy_compiles_total")? - compiles_before;
    println!(
        "+ {POLICIES} ClusterAgentPolicies:                  RSS {} (in force {:.0}s after the first was created; \
         {compiles:.0} compiles, {cpu:.2}s of agentguard CPU meanwhile, status writes included)",
        mib(with_policies),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Agents of the registration measurement: ten ServiceAccounts in each namespace.
const AGENTS_PER_NAMESPACE: usize = 10;
const PROBE_NS: &str = "reg-probe";

/// The `i`th agent (from 0): its namespace and name.
fn agent(i: usize) -> (String, String) {
    (format!("reg-{:04}", i / AGENTS_PER_NAMESPACE), format!("agent-{}", i % AGENTS_PER_NAMESPACE))
}

/// The configuration in force: the agents listed (over every agents webhook), the number of
/// agents webhooks, the whole object's size and the largest `agents` condition's.
fn configuration(plane: &ControlPlane) -> Result<(usize, usize, usize, usize)> {
    let object = must(
        plane.kubectl(&plane.admin, &["get", "validatingwebhookconfiguration", "agentguard", "-o", "json"]),
    )?;
    let object: serde_json::Value = serde_json::from_str(&object)?;
    let conditions: Vec<&str> = object["webhooks"]
        .as_array()
        .context("no webhooks")?
        .iter()
        .filter_map(|w| {
            w["matchConditions"].as_array()?.iter().find(|c| c["name"] == "agents")?["expression"].as_str()
        })
        .collect();
    let agents = conditions.iter().map(|c| c.matches("system:serviceaccount:reg-").count()).sum();
    let largest = conditions.iter().map(|c| c.len()).max().unwrap_or_default();
    Ok((agents, conditions.len(), serde_json::to_vec(&object)?.len(), largest))
}

/// What the API server answers to one `agents` condition listing the first `n` agents (a
/// server-side dry run of a configuration of its own).
fn one_condition(plane: &ControlPlane, n: usize) -> Result<String> {
    let users: Vec<String> = (0..n)
        .map(|i| {
            let (ns, name) = agent(i);
            format!("'system:serviceaccount:{ns}:{name}'")
        })
        .collect();
    let expression = format!("request.userInfo.username in [{}]", users.join(", "));
    let object = serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "one-condition"},
        "webhooks": [{"name": "agents.example.com", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                      "clientConfig": {"url": "https://127.0.0.1:1/validate"},
                      "rules": [{"apiGroups": ["*"], "apiVersions": ["*"], "operations": ["DELETE"], "resources": ["*/*"]}],
                      "matchConditions": [{"name": "agents", "expression": expression}]}]
    });
    let out = plane.kubectl_stdin(
        &plane.admin,
        &["create", "--dry-run=server", "-f", "-"],
        Some(&object.to_string()),
    );
    let text =
        String::from_utf8_lossy(if out.status.success() { &out.stdout } else { &out.stderr }).into_owned();
    // The API server quotes the whole expression back: keep its words.
    let text: String = text.split(&expression).collect::<Vec<_>>().join("<the expression>");
    Ok(format!("{} bytes: {}", expression.len(), text.trim()))
}

/// The API server's figures for its matchCondition evaluations of agentguard's webhooks: how
/// many, and the seconds they took in all.
fn match_condition_seconds(plane: &ControlPlane) -> Result<(f64, f64)> {
    let text = must(plane.kubectl(&plane.admin, &["get", "--raw", "/metrics"]))?;
    let (mut count, mut sum) = (0.0, 0.0);
    for line in
        text.lines().filter(|l| l.starts_with("apiserver_admission_match_condition_evaluation_seconds"))
    {
        let value = || line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or_default();
        if line.contains("_count{") && line.contains("agentguard.io") {
            count += value();
        } else if line.contains("_sum{") && line.contains("agentguard.io") {
            sum += value();
        }
    }
    Ok((count, sum))
}

/// `--agents N[,N…]`: for each N (ascending), N − 1 individually labelled agent ServiceAccounts
/// registered, then the Nth labelled with `kubectl label`: the time until that returns (the
/// agent registered before the label is stored) and until the new agent's DELETE is held
/// through the API server, and the configuration's size before and after. The agents already
/// labelled are created while agentguard is stopped and its configuration removed, so the
/// first configuration it writes on starting lists them all (registering them one by one through
/// the webhook would take hours at 10,000 and measure that, not the Nth); the Nth is marked
/// while it runs, as an operator would. Where the list no longer fits the API server, says
/// what the API server answered and what became of the Nth agent.
fn registration(counts: &[usize]) -> Result<()> {
    let plane = world::plane_with_crds()?;
    // Every agent's delete of the probe ConfigMap is held; the agents may delete ConfigMaps there.
    let setup = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {PROBE_NS}}}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: target, namespace: {PROBE_NS}}}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: delete-configmaps, namespace: {PROBE_NS}}}\n\
         rules: [{{apiGroups: [\"\"], resources: [configmaps], verbs: [get, delete]}}]\n---\n\
         apiVersion: agentguard.io/v1alpha1\nkind: ClusterAgentPolicy\nmetadata: {{name: hold}}\nspec:\n  action: RequireApproval\n  \
         approval: {{approvers: {{users: [alice]}}}}\n  rules:\n    - {{name: hold, operations: [DELETE], namespaces: [{PROBE_NS}], \
         resources: [{{apiGroups: [\"\"], resources: [configmaps]}}]}}\n"
    );
    must(plane.kubectl_stdin(&plane.admin, &["apply", "-f", "-"], Some(&setup)))?;
    let mut made = 0;
    let mut agentguard: Option<world::Agentguard> = None;
    for &n in counts {
        ensure!(n > made, "--agents must grow: {n} after {made}");
        // Stopped, and its configuration gone, so the agents before the Nth are created unseen.
        drop(agentguard.take());
        let _ = plane.kubectl(&plane.admin, &["delete", "validatingwebhookconfiguration", "agentguard"]);
        let started = Instant::now();
        let first_ns = made.div_ceil(AGENTS_PER_NAMESPACE);
        let namespaces: Vec<String> = (first_ns..n.div_ceil(AGENTS_PER_NAMESPACE))
            .map(|i| format!("- apiVersion: v1\n  kind: Namespace\n  metadata: {{name: reg-{i:04}}}\n"))
            .collect();
        create(&plane, &namespaces)?;
        let accounts: Vec<String> = (made..n)
            .map(|i| {
                let (ns, name) = agent(i);
                let label = if i + 1 < n { ", labels: {agentguard.io/agent: \"true\"}" } else { "" };
                format!("- apiVersion: v1\n  kind: ServiceAccount\n  metadata: {{name: {name}, namespace: {ns}{label}}}\n")
            })
            .collect();
        create(&plane, &accounts)?;
        made = n;
        let (ns, name) = agent(n - 1);
        must(plane.kubectl(
            &plane.admin,
            &[
                "create",
                "rolebinding",
                &format!("delete-configmaps-{ns}-{name}"),
                "-n",
                PROBE_NS,
                "--role=delete-configmaps",
                &format!("--serviceaccount={ns}:{name}"),
            ],
        ))?;
        println!(
            "registration: {} agents labelled and agent {n} unlabelled in {:.0}s",
            n - 1,
            started.elapsed().as_secs_f64()
        );
        let started = Instant::now();
        let replica = match start_agentguard(&plane, "agentguard", true) {
            Ok(a) => a,
            Err(e) => {
                println!("registration: agentguard never became ready with {} agents: {e:#}", n - 1);
                return Ok(());
            }
        };
        let (listed, webhooks, object, expression) = configuration(&plane)?;
        println!(
            "registration: agentguard ready in {:.1}s with {listed} agents listed in {webhooks} agents webhook(s): configuration \
             {object} bytes, largest agents condition {expression} bytes",
            started.elapsed().as_secs_f64()
        );
        println!("registration: one condition listing {} agents: {}", n - 1, one_condition(&plane, n - 1)?);
        let probe = plane.service_account_kubeconfig(&ns, &name)?;
        let delete =
            || plane.kubectl(&probe, &["delete", "configmap", "target", "-n", PROBE_NS, "--dry-run=server"]);
        ensure!(delete().status.success(), "agent {n}'s delete was refused before it was marked");
        let (count_before, seconds_before) = match_condition_seconds(&plane)?;
        let labelled = Instant::now();
        let out = plane.kubectl(
            &plane.admin,
            &["label", "serviceaccount", &name, "-n", &ns, "agentguard.io/agent=true"],
        );
        let label_took = labelled.elapsed();
        if !out.status.success() {
            println!(
                "registration: labelling agent {n} was refused after {:.0} ms: {}",
                label_took.as_secs_f64() * 1e3,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            agentguard = Some(replica);
            continue;
        }
        let held = loop {
            let out = delete();
            let text = String::from_utf8_lossy(&out.stderr).into_owned();
            if !out.status.success() && text.contains("requires approval") {
                break labelled.elapsed();
            }
            ensure!(out.status.success(), "agent {n}'s delete refused, not held: {text}");
            ensure!(
                labelled.elapsed() < Duration::from_secs(60),
                "agent {n}'s delete still admitted after 60 s"
            );
        };
        let (count_after, seconds_after) = match_condition_seconds(&plane)?;
        let (listed, webhooks, object, expression) = configuration(&plane)?;
        let evaluations = count_after - count_before;
        println!(
            "registration: agent {n}: `kubectl label` took {:.0} ms, its DELETE held {:.0} ms after the label was sent; \
             then {listed} agents listed in {webhooks} agents webhook(s), configuration {object} bytes, largest agents \
             condition {expression} bytes; \
             the API server's matchCondition evaluations meanwhile: {evaluations:.0}, {:.3} ms each on average",
            label_took.as_secs_f64() * 1e3,
            held.as_secs_f64() * 1e3,
            if evaluations > 0.0 { (seconds_after - seconds_before) / evaluations * 1e3 } else { 0.0 }
        );
        agentguard = Some(replica);
    }
    Ok(())
}
