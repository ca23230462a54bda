//! `agentguard audit` against the real API server: the rights it reports are the ones RBAC was
//! given, with their severity; identities that are not agents stay out; the exit code follows
//! `--fail-on` and tells an unreachable cluster apart.

use std::collections::BTreeSet;
use std::process::{Command, Output};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::world::{World, must};

const NS: &str = "e2e-audit";
const AGENT: &str = "system:serviceaccount:e2e-audit:auditee";
/// An agent group named on the command line, bound to `escalate` on roles.
const GROUP: &str = "e2e-audit-bots";

pub fn audit(kubeconfig: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agentguard"))
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .args(["--log-format=plain", "audit", "--self-namespace=agentguard-system"])
        .args(["--agent-group", GROUP])
        .args(args)
        .output()
        .expect("agentguard runs")
}

/// (check, severity, verbs, resources, scope, namespaces) of each finding, comparable as a set.
fn findings(agent: &Value) -> BTreeSet<String> {
    agent["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| {
            format!(
                "{} {} {} {} {} {}",
                f["check"].as_str().unwrap_or("?"),
                f["severity"].as_str().unwrap_or("?"),
                f["verbs"],
                f["resources"],
                f["scope"].as_str().unwrap_or("?"),
                f["namespaces"]
            )
        })
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

pub fn reports_granted_rights(w: &World) -> Result<()> {
    let admin = &w.plane.admin;
    let kubectl = |args: &[&str]| must(w.plane.kubectl(admin, args));
    kubectl(&["create", "namespace", NS])?;
    kubectl(&["create", "serviceaccount", "auditee", "-n", NS])?;
    kubectl(&["label", "serviceaccount", "auditee", "-n", NS, "agentguard.io/agent=true"])?;
    kubectl(&["create", "role", "deleter", "-n", NS, "--verb=delete", "--resource=deployments.apps"])?;
    kubectl(&[
        "create",
        "rolebinding",
        "deleter",
        "-n",
        NS,
        "--role=deleter",
        &format!("--serviceaccount={NS}:auditee"),
    ])?;
    kubectl(&["create", "clusterrole", "e2e-audit-impersonator", "--verb=impersonate", "--resource=users"])?;
    kubectl(&[
        "create",
        "clusterrolebinding",
        "e2e-audit-impersonator",
        "--clusterrole=e2e-audit-impersonator",
        &format!("--serviceaccount={NS}:auditee"),
    ])?;
    kubectl(&[
        "create",
        "clusterrole",
        "e2e-audit-escalator",
        "--verb=escalate",
        "--resource=roles.rbac.authorization.k8s.io",
    ])?;
    kubectl(&[
        "create",
        "clusterrolebinding",
        "e2e-audit-escalator",
        "--clusterrole=e2e-audit-escalator",
        &format!("--group={GROUP}"),
    ])?;
    // Routes around the webhook: relabelling Namespaces through their status, and writing
    // agentguard's own webhook configuration granted by name.
    kubectl(&["create", "clusterrole", "e2e-audit-status", "--verb=patch", "--resource=namespaces/status"])?;
    kubectl(&[
        "create",
        "clusterrole",
        "e2e-audit-webhook",
        "--verb=update,patch",
        "--resource=validatingwebhookconfigurations.admissionregistration.k8s.io",
        "--resource-name=agentguard",
    ])?;
    for role in ["e2e-audit-status", "e2e-audit-webhook"] {
        kubectl(&[
            "create",
            "clusterrolebinding",
            role,
            &format!("--clusterrole={role}"),
            &format!("--group={GROUP}"),
        ])?;
    }
    // Not an agent, whatever it may do.
    kubectl(&["create", "serviceaccount", "bystander", "-n", NS])?;
    kubectl(&[
        "create",
        "clusterrolebinding",
        "e2e-audit-bystander",
        "--clusterrole=cluster-admin",
        &format!("--serviceaccount={NS}:bystander"),
    ])?;

    let out = audit(admin, &["--output=json", "--fail-on=critical"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!("audit printed no JSON: {}{stderr}", String::from_utf8_lossy(&out.stdout))
    })?;
    ensure!(
        out.status.code() == Some(1),
        "critical findings, --fail-on=critical: exit {:?}; {stderr}",
        out.status
    );
    ensure!(stderr.contains("audit: ") && stderr.contains(" critical, "), "no summary line: {stderr}");
    let agents = report["agents"].as_array().context("agents")?;
    let by_identity = |name: &str| agents.iter().find(|a| a["identity"] == name);
    // agentguard's own ServiceAccount is audited beside the agents, apart from them.
    let own = &report["agentguard"];
    ensure!(
        own["identity"] == "system:serviceaccount:agentguard-system:agentguard",
        "agentguard itself: {own}"
    );
    ensure!(own["why"] == serde_json::json!(["agentguard"]), "{own}");
    ensure!(stderr.contains("agentguard itself ("), "no own line in the summary: {stderr}");

    let agent = by_identity(AGENT).context("the labelled ServiceAccount is not listed")?;
    ensure!(agent["kind"] == "ServiceAccount" && agent["why"] == serde_json::json!(["label"]), "{agent}");
    let want = set(&[
        r#"impersonate critical ["impersonate"] ["users"] cluster []"#,
        r#"delete medium ["delete"] ["deployments.apps"] namespaces ["e2e-audit"]"#,
    ]);
    ensure!(findings(agent) == want, "the agent's findings:\n{:#?}\nwanted:\n{want:#?}", findings(agent));

    let group = by_identity(GROUP).context("the --agent-group is not listed")?;
    ensure!(group["kind"] == "Group" && group["why"] == serde_json::json!(["flag"]), "{group}");
    let want = set(&[
        r#"escalate critical ["escalate"] ["roles.rbac.authorization.k8s.io"] cluster []"#,
        r#"status-label high ["patch"] ["namespaces/status"] cluster []"#,
        r#"own-webhook critical ["update","patch"] ["validatingwebhookconfigurations.admissionregistration.k8s.io"] cluster []"#,
    ]);
    ensure!(findings(group) == want, "the group's findings: {:#?}", findings(group));

    // The world's cluster-admin agent has every right that matters, cluster-wide.
    let coder =
        by_identity("system:serviceaccount:agents:coder").context("the world's agent is not listed")?;
    for check in [
        "impersonate",
        "rbac-write",
        "webhook-write",
        "policy-write",
        "self-namespace",
        "own-label",
        "own-webhook",
        "unsafe-delete",
    ] {
        ensure!(
            coder["findings"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|f| f["check"] == check && f["severity"] == "critical"),
            "cluster-admin agent lacks a critical {check} finding"
        );
    }
    for name in
        [format!("system:serviceaccount:{NS}:bystander"), "system:serviceaccount:agents:helper".into()]
    {
        ensure!(by_identity(&name).is_none(), "{name} is not an agent but is listed");
    }

    // The table: one row per finding, and the summary.
    let out = audit(admin, &["--fail-on=none"]);
    let table = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.code() == Some(0), "--fail-on=none: exit {:?}\n{table}", out.status);
    // Columns are separated by at least two spaces; none holds two in a row.
    let rows: Vec<Vec<&str>> = table
        .lines()
        .filter(|l| l.starts_with(AGENT))
        .map(|l| l.split("  ").map(str::trim).filter(|c| !c.is_empty()).collect())
        .collect();
    let namespace = format!("namespace {NS}");
    let want = [
        [AGENT, "critical", "cluster-wide", "impersonate: impersonate users"],
        [AGENT, "medium", namespace.as_str(), "delete: delete deployments.apps"],
    ];
    ensure!(rows == want, "the agent's table rows: {rows:#?}\n{table}");
    ensure!(table.lines().last().is_some_and(|l| l.starts_with("audit: ")), "no summary line:\n{table}");

    // A cluster that cannot be reached is exit 2, not a clean bill of health.
    let unreachable = w.plane.dir.path().join("unreachable.kubeconfig");
    std::fs::write(
        &unreachable,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: x\n  cluster: {server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}\n\
         users:\n- name: x\n  user: {token: x}\ncontexts:\n- name: x\n  context: {cluster: x, user: x}\ncurrent-context: x\n",
    )?;
    let out = audit(&unreachable, &["--fail-on=none"]);
    ensure!(
        out.status.code() == Some(2),
        "unreachable cluster: exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
