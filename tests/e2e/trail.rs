//! The audit trail on the real API server: approved agent changes are recorded with the prior
//! object and the approver; `agentguard restore` brings a deleted Deployment back and rolls a
//! scale back; a change another webhook refused after agentguard admitted it is marked
//! `NeverHappened` and restore declines it.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::cluster::free_port;
use crate::world::{World, accepts, approve_command, must, rejects};

const NS: &str = "e2e-trail";
const LATER: &str = "e2e-trail-later";

fn agentguard(w: &World, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_agentguard"))
        .env("KUBECONFIG", &w.plane.admin)
        .args(args)
        .arg("--log-format=plain")
        .output()
        .expect("agentguard runs")
}

/// Held, approved by alice, then admitted: the agent's `args` go through.
fn approved(w: &World, args: &[&str]) -> Result<()> {
    let refusal = rejects(w.plane.kubectl(&w.editor, args), "the agent's first try", "requires approval")?;
    let approve = approve_command(&refusal)?;
    must(w.plane.kubectl(&w.alice, &approve.iter().map(String::as_str).collect::<Vec<_>>()))?;
    accepts(w.plane.kubectl(&w.editor, args), "the approved request")?;
    Ok(())
}

/// Waits for the checked record of `operation` on deployment `ns/name`.
pub(crate) fn record(w: &World, ns: &str, operation: &str, name: &str) -> Result<Value> {
    let started = Instant::now();
    loop {
        let list: Value = serde_json::from_str(&must(
            w.plane
                .kubectl(&w.plane.admin, &["get", "agentchanges", "-n", "agentguard-system", "-o", "json"]),
        )?)?;
        let found = list["items"].as_array().into_iter().flatten().find(|r| {
            r["spec"]["target"]["namespace"] == ns
                && r["spec"]["target"]["name"] == name
                && r["spec"]["operation"] == operation
                && r["status"]["outcome"].as_str().is_some_and(|o| !o.is_empty())
                // The checker writes the status, then the label: wait for both.
                && r["metadata"]["labels"]["agentguard.io/outcome"] != "pending"
        });
        if let Some(r) = found {
            return Ok(r.clone());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "no checked {operation} record for {name} among {}",
            list["items"]
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn replicas(w: &World, name: &str) -> Result<String> {
    must(
        w.plane.kubectl(
            &w.plane.admin,
            &["get", "deployment", name, "-n", NS, "-o", "jsonpath={.spec.replicas}"],
        ),
    )
}

pub fn records_and_restores(w: &World) -> Result<()> {
    must(w.plane.kubectl(&w.plane.admin, &["create", "namespace", NS]))?;
    w.grant_edit(NS)?;
    must(w.plane.kubectl(
        &w.plane.admin,
        &["create", "deployment", "web", "-n", NS, "--image=nginx:1.27", "--replicas=2"],
    ))?;

    // A scale (by patch: the scale subresource carries no approvals), approved and recorded,
    // then rolled back.
    approved(w, &["patch", "deployment", "web", "-n", NS, "-p", r#"{"spec":{"replicas":5}}"#])?;
    ensure!(replicas(w, "web")? == "5");
    let scaled = record(w, NS, "UPDATE", "web")?;
    ensure!(scaled["status"]["outcome"] == "Happened", "{scaled}");
    ensure!(scaled["status"]["approver"] == "alice", "approver: {}", scaled["status"]);
    ensure!(
        scaled["spec"]["change"].as_str().is_some_and(|c| c.contains("spec.replicas: 2 → 5")),
        "{scaled}"
    );
    let name = scaled["metadata"]["name"].as_str().context("record name")?;
    let out = must(agentguard(w, &["restore", name, "-n", "agentguard-system"]))?;
    ensure!(out.contains("rolled back"), "{out}");
    ensure!(replicas(w, "web")? == "2", "the scale was not rolled back");

    // A delete, approved and recorded, then re-created.
    approved(w, &["delete", "deployment", "web", "-n", NS])?;
    let deleted = record(w, NS, "DELETE", "web")?;
    ensure!(deleted["status"]["outcome"] == "Happened", "{deleted}");
    ensure!(deleted["spec"]["prior"]["spec"]["replicas"] == 2, "prior object: {}", deleted["spec"]["prior"]);
    let name = deleted["metadata"]["name"].as_str().context("record name")?;
    let dry = must(agentguard(w, &["restore", name, "-n", "agentguard-system", "--dry-run"]))?;
    ensure!(dry.contains("nothing written"), "{dry}");
    ensure!(!w.plane.kubectl(&w.plane.admin, &["get", "deployment", "web", "-n", NS]).status.success());
    let out = must(agentguard(w, &["restore", name, "-n", "agentguard-system"]))?;
    ensure!(out.contains("re-created") && out.contains("garbage-collected children"), "{out}");
    println!(
        "  $ agentguard restore {name} -n agentguard-system\n  {}",
        out.trim_end().replace('\n', "\n  ")
    );
    ensure!(replicas(w, "web")? == "2", "the deleted Deployment is not back as it was");
    println!(
        "  scale rolled back and delete undone from records; approver alice read from the trail; \
         a Deployment's record is {} bytes",
        deleted.to_string().len()
    );
    Ok(())
}

pub fn a_change_refused_later_is_marked(w: &World) -> Result<()> {
    // A second webhook that always fails, for objects labelled refuse=true: the API server calls
    // it beside agentguard, which admits (and records) before the request is refused.
    let ca = std::fs::read(w.plane.dir.path().join("ca.crt"))?;
    let refuser = format!(
        "apiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingWebhookConfiguration\nmetadata: {{name: e2e-refuser}}\n\
         webhooks:\n- name: refuser.e2e.test\n  admissionReviewVersions: [v1]\n  sideEffects: None\n  failurePolicy: Fail\n  \
         timeoutSeconds: 2\n  clientConfig: {{url: 'https://127.0.0.1:{}/refuse', caBundle: {}}}\n  \
         objectSelector: {{matchLabels: {{refuse: 'true'}}}}\n  \
         matchConditions: [{{name: not-dry-run, expression: '!request.dryRun'}}]\n  \
         rules: [{{apiGroups: [apps], apiVersions: ['*'], operations: [DELETE], resources: [deployments]}}]\n",
        free_port(),
        base64(&ca)
    );
    must(w.plane.kubectl(&w.plane.admin, &["create", "namespace", LATER]))?;
    w.grant_edit(LATER)?;
    must(w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-f", "-"], Some(&refuser)))?;
    must(
        w.plane
            .kubectl(&w.plane.admin, &["create", "deployment", "doomed", "-n", LATER, "--image=nginx:1.27"]),
    )?;
    must(w.plane.kubectl(&w.plane.admin, &["label", "deployment", "doomed", "-n", LATER, "refuse=true"]))?;
    crate::scenarios::settled(w, LATER, "doomed")?;
    // Approved up front, with the ticket of the agent's server-side dry run (which the refuser
    // lets through): the refuser answers every real delete of it, held or not.
    let args = ["delete", "deployment", "doomed", "-n", LATER];
    let dry = [&args[..], &["--dry-run=server"]].concat();
    let held = rejects(w.plane.kubectl(&w.editor, &dry), "the agent's dry run", "requires approval")?;
    let approve = approve_command(&held)?;
    must(w.plane.kubectl(&w.alice, &approve.iter().map(String::as_str).collect::<Vec<_>>()))?;
    rejects(w.plane.kubectl(&w.editor, &args), "the delete the other webhook refuses", "refuser.e2e.test")?;
    let phantom = record(w, LATER, "DELETE", "doomed")?;
    must(w.plane.kubectl(&w.plane.admin, &["delete", "validatingwebhookconfiguration", "e2e-refuser"]))?;
    ensure!(phantom["status"]["outcome"] == "NeverHappened", "{}", phantom["status"]);
    ensure!(
        phantom["metadata"]["labels"]["agentguard.io/outcome"] == "never-happened",
        "{}",
        phantom["metadata"]["labels"]
    );
    let name = phantom["metadata"]["name"].as_str().context("record name")?;
    let out = agentguard(w, &["restore", name, "-n", "agentguard-system"]);
    rejects(out, "restoring a change that never happened", "nothing to restore")?;
    println!("  a delete refused by a later webhook was recorded, then marked NeverHappened");
    Ok(())
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
