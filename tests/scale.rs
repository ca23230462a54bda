//! The scale scenario: agentguard's memory and CPU with 10,000 ServiceAccounts in 2,000
//! Namespaces and 1,000 policies, on a real control plane. A documented run, not part of CI
//! (it takes a few minutes): `hack/scale.sh` (or `cargo test --test scale` with the
//! Kubernetes binaries' variables set). Prints resident memory after each stage and the CPU
//! agentguard spent taking in the policies.

#[allow(dead_code)]
#[path = "e2e/cluster.rs"]
mod cluster;
#[allow(dead_code)]
#[path = "e2e/world.rs"]
mod world;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use cluster::{Binaries, ControlPlane};
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
    let bins = Binaries::from_env()?;
    let plane = ControlPlane::start(&bins)?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    must(plane.kubectl(
        &plane.admin,
        &["apply", "-f", &root.join("charts/agentguard/crds/crds.yaml").to_string_lossy()],
    ))?;
    must(plane.kubectl(
        &plane.admin,
        &["wait", "--for", "condition=established", "--timeout=60s", "--all", "crd"],
    ))?;
    must(plane.kubectl(&plane.admin, &["create", "namespace", "agentguard-system"]))?;
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
