//! The churn breaker on the real API server: the budget trips and a human resets it with the
//! printed command; three replicas charging one budget at once count exactly.

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::world::{World, accepts, must, rejects, start_agentguard};

const NS: &str = "e2e-churn";

fn policy(name: &str, resource: &str, max: u32) -> String {
    format!(
        "apiVersion: agentguard.io/v1alpha1\nkind: ClusterAgentPolicy\nmetadata: {{name: {name}}}\nspec:\n  action: Allow\n  \
         churnLimit: {{maxOperations: {max}, window: 10m}}\n  rules:\n    - name: churn\n      operations: [DELETE]\n      \
         namespaces: [{NS}]\n      resources: [{{apiGroups: [\"\"], resources: [{resource}]}}]\n"
    )
}

fn apply_policy(w: &World, name: &str, resource: &str, max: u32) -> Result<()> {
    must(w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-f", "-"], Some(&policy(name, resource, max))))?;
    must(w.plane.kubectl(
        &w.plane.admin,
        &["wait", "--for=condition=Ready", "--timeout=30s", &format!("clusteragentpolicy/{name}")],
    ))?;
    Ok(())
}

fn lease_count(w: &World, lease: &str) -> Result<String> {
    must(w.plane.kubectl(
        &w.plane.admin,
        &[
            "get",
            "lease",
            lease,
            "-n",
            "agentguard-system",
            "-o",
            "jsonpath={.metadata.annotations.agentguard\\.io/churn-count}",
        ],
    ))
}

pub fn trips_and_resets(w: &World) -> Result<()> {
    must(w.plane.kubectl(&w.plane.admin, &["create", "namespace", NS]))?;
    w.grant_edit(NS)?;
    apply_policy(w, "e2e-churn", "configmaps", 3)?;
    for i in 0..6 {
        must(w.plane.kubectl(&w.plane.admin, &["create", "configmap", &format!("c{i}"), "-n", NS]))?;
    }
    for i in 0..3 {
        accepts(
            w.plane.kubectl(&w.editor, &["delete", "configmap", &format!("c{i}"), "-n", NS]),
            "a delete within the budget",
        )?;
    }
    let refused = rejects(
        w.plane.kubectl(&w.editor, &["delete", "configmap", "c3", "-n", NS]),
        "the fourth delete in the window",
        "churn limit of ClusterAgentPolicy \"e2e-churn\" reached: 3 guarded operations",
    )?;
    // A dry run gets the same answer and spends nothing.
    rejects(
        w.plane.kubectl(&w.editor, &["delete", "configmap", "c3", "-n", NS, "--dry-run=server"]),
        "a dry run past the budget",
        "churn limit",
    )?;
    let command = refused
        .split("A human can reset it: ")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .context("the refusal prints no reset command")?
        .trim()
        .trim_end_matches(['"', '.']);
    let args: Vec<&str> = command.split_whitespace().collect();
    ensure!(
        args.first() == Some(&"kubectl") && args.get(2) == Some(&"lease"),
        "odd reset command {command:?}"
    );
    let lease = args[3];
    ensure!(lease_count(w, lease)? == "3", "the Lease does not hold the count 3");
    // Agents get nowhere near the Lease in real clusters (no rights in agentguard's namespace);
    // the human runs the printed command.
    must(w.plane.kubectl(&w.plane.admin, &args[1..]))?;
    accepts(
        w.plane.kubectl(&w.editor, &["delete", "configmap", "c3", "-n", NS]),
        "a delete after the reset",
    )?;
    ensure!(lease_count(w, lease)? == "1", "the reset did not open a new window");
    accepts(
        w.plane.kubectl(&w.editor, &["delete", "configmap", "c4", "-n", NS, "--dry-run=server"]),
        "a dry run within the budget",
    )?;
    ensure!(lease_count(w, lease)? == "1", "a dry run was counted");
    // People are never counted.
    accepts(w.plane.kubectl(&w.alice, &["delete", "configmap", "c5", "-n", NS]), "a human's delete")?;
    ensure!(lease_count(w, lease)? == "1", "a human's delete was counted");
    println!("  budget of 3 tripped on the 4th delete; reset by `{command}`");
    Ok(())
}

/// Creates Secrets `s0`… in the namespace; returns each as stored. agentguard checks a
/// request's prior object against the live one, so the reviews must carry the real objects.
fn secrets(w: &World, n: usize) -> Result<Vec<Value>> {
    let _ = w.plane.kubectl(&w.plane.admin, &["create", "namespace", NS]);
    let items: Vec<Value> = (0..n)
        .map(|i| json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": format!("s{i}"), "namespace": NS}}))
        .collect();
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    must(w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-f", "-"], Some(&list.to_string())))?;
    (0..n)
        .map(|i| {
            let out = must(
                w.plane.kubectl(&w.plane.admin, &["get", "secret", &format!("s{i}"), "-n", NS, "-o", "json"]),
            )?;
            Ok(serde_json::from_str(&out)?)
        })
        .collect()
}

fn review(i: usize, old: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": format!("churn-{i}"),
            "kind": {"group": "", "version": "v1", "kind": "Secret"},
            "resource": {"group": "", "version": "v1", "resource": "secrets"},
            "name": format!("s{i}"),
            "namespace": NS,
            "operation": "DELETE",
            "userInfo": {
                "username": "system:serviceaccount:agents:coder",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:agents", "system:authenticated"]
            },
            "object": null,
            "oldObject": old,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "DeleteOptions"},
            "dryRun": false
        }
    })
}

/// 30 DELETEs against a budget of 10, sent all at once, a third to each of three replicas
/// sharing the count through the API server: exactly 10 are admitted.
pub fn three_replicas_share_the_count(w: &World) -> Result<()> {
    apply_policy(w, "e2e-churn-replicas", "secrets", 10)?;
    let live = secrets(w, 30)?;
    let replicas = [
        start_agentguard(&w.plane, "agentguard-2", false)?,
        start_agentguard(&w.plane, "agentguard-3", false)?,
    ];
    let urls = [w.agentguard.webhook.clone(), replicas[0].webhook.clone(), replicas[1].webhook.clone()];
    let ca = std::fs::read(w.plane.dir.path().join("ca.crt"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let started = std::time::Instant::now();
    let answers: Vec<Result<bool>> = runtime.block_on(async {
        let client =
            reqwest::Client::builder().add_root_certificate(reqwest::Certificate::from_pem(&ca)?).build()?;
        let requests = (0..30).map(|i| {
            let (client, url) = (client.clone(), urls[i % 3].clone());
            let review = review(i, &live[i]);
            async move {
                let body: Value =
                    client.post(&url).json(&review).send().await?.error_for_status()?.json().await?;
                let allowed = body["response"]["allowed"].as_bool().context("no verdict")?;
                if !allowed {
                    let message = body["response"]["status"]["message"].as_str().unwrap_or_default();
                    ensure!(message.contains("churn limit"), "refused for another reason: {message}");
                }
                Ok(allowed)
            }
        });
        anyhow::Ok(futures::future::join_all(requests).await)
    })?;
    let took = started.elapsed();
    let mut admitted = 0;
    for answer in answers {
        if answer? {
            admitted += 1;
        }
    }
    ensure!(admitted == 10, "{admitted} of 30 admitted against a budget of 10");
    let leases = must(w.plane.kubectl(
        &w.plane.admin,
        &["get", "leases", "-n", "agentguard-system", "-l", "agentguard.io/churn=true", "-o",
          "jsonpath={range .items[*]}{.metadata.annotations.agentguard\\.io/churn-policy}={.metadata.annotations.agentguard\\.io/churn-count}{\"\\n\"}{end}"],
    ))?;
    ensure!(
        leases.lines().any(|l| l == "cluster/e2e-churn-replicas=10"),
        "the shared count is not 10: {leases}"
    );
    println!(
        "  3 replicas, 30 concurrent DELETEs, budget 10: {admitted} admitted, 20 refused, Lease count 10 ({:.0} ms)",
        took.as_secs_f64() * 1000.0
    );
    Ok(())
}
