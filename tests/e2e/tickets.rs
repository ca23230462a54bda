//! Approval tickets on the real API server: every route that revived, planted, collided or forged
//! an approval under the old protocol, tried again as an attacker would, and refused.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use crate::scenarios::{
    approve_command, deployment, events, exists, get_json, namespace, run_as, settled, wait_for_events,
};
use crate::world::{World, accepts, must, rejects};

/// The approval value (`delete.<ticket>` / `update.<ticket>`) a refusal prints.
pub fn ticket_in(refusal: &str) -> Result<String> {
    let start = refusal.find("agentguard.io/approve=").context("no approval value in the refusal")?
        + "agentguard.io/approve=".len();
    let value = refusal[start..].split_whitespace().next().context("empty approval value")?;
    Ok(value.to_owned())
}

/// The expiry a refusal names for its ticket (`— then retry before <time>`).
fn expiry_in(refusal: &str) -> Result<jiff::Timestamp> {
    let (_, rest) = refusal.split_once("then retry before ").context("no expiry in the refusal")?;
    let text = rest.split(|c: char| c.is_whitespace()).next().unwrap_or_default().trim_end_matches('.');
    text.parse().with_context(|| format!("expiry {text:?}"))
}

/// Where the harness planted approvals before agentguard was installed (see `world.rs`).
const PREINSTALL: &str = "e2e-preinstall";

fn delete<'a>(ns: &'a str, name: &'a str) -> [&'a str; 5] {
    ["delete", "deployment", name, "-n", ns]
}

/// An approval lives as long as the ticket says, fixed when it was issued: after it, nothing
/// anyone writes on the object (another annotation, server-side apply with force, managedFields
/// times in 2099) brings it back.
pub fn expired_stays_expired(w: &World) -> Result<()> {
    let ns = namespace(w, "expiry")?;
    deployment(w, &ns, "web")?;
    // A namespace policy with the shortest lifetime the schema allows; the strictest applies.
    let policy = format!(
        "apiVersion: agentguard.io/v1alpha1\nkind: AgentPolicy\nmetadata: {{name: short, namespace: {ns}}}\nspec:\n  \
         action: RequireApproval\n  approval: {{approvers: {{groups: [sre]}}, ttl: 1m, maxTtl: 1m, reason: a minute only}}\n  \
         rules:\n    - name: workloads\n      operations: [DELETE, UPDATE]\n      \
         resources: [{{apiGroups: [apps], resources: [deployments]}}]\n"
    );
    must(w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-f", "-"], Some(&policy)))?;
    must(w.plane.kubectl(
        &w.plane.admin,
        &["wait", "--for=condition=Ready", "--timeout=30s", "agentpolicy/short", "-n", &ns],
    ))?;
    let denial = rejects(w.plane.kubectl(&w.agent, &delete(&ns, "web")), "the delete", "requires approval")?;
    // Each covering policy's approvers, once each, with its own reason.
    ensure!(denial.contains("an approver under every policy below runs"), "{denial}");
    ensure!(denial.contains("[ClusterAgentPolicy \"e2e-workloads\": users alice; groups sre]"), "{denial}");
    ensure!(
        denial.contains(&format!("[AgentPolicy {ns}/\"short\": groups sre (a minute only)]")),
        "{denial}"
    );
    let value = ticket_in(&denial)?;
    let expires = expiry_in(&denial)?;
    accepts(run_as(w, &w.alice, &approve_command(&denial)?), "alice's approval")?;
    accepts(
        w.plane.kubectl(&w.agent, &["delete", "deployment", "web", "-n", &ns, "--dry-run=server"]),
        "a delete within the ticket's minute",
    )?;
    let wait = expires.duration_since(jiff::Timestamp::now()).as_secs_f64().max(0.0) + 1.5;
    std::thread::sleep(Duration::from_secs_f64(wait));
    let expired = "the approval expired at";
    rejects(w.plane.kubectl(&w.agent, &delete(&ns, "web")), "a delete after expiry", expired)?;

    // Revival by an unrelated annotation, from someone who may edit but not approve.
    accepts(
        w.plane.kubectl(
            &w.mallory,
            &["annotate", "deployment", "web", "-n", &ns, "note=touched", "--overwrite"],
        ),
        "mallory's unrelated annotation",
    )?;
    rejects(w.plane.kubectl(&w.agent, &delete(&ns, "web")), "a delete after an unrelated annotate", expired)?;

    // Revival by server-side apply with force, restating the approval under a new manager.
    let apply = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": ns, "annotations": {"agentguard.io/approve": value}}});
    accepts(
        w.plane.kubectl_stdin(
            &w.mallory,
            &["apply", "--server-side", "--force-conflicts", "--field-manager=reviver", "-f", "-"],
            Some(&apply.to_string()),
        ),
        "server-side apply with force",
    )?;
    rejects(w.plane.kubectl(&w.agent, &delete(&ns, "web")), "a delete after a forced apply", expired)?;

    // Revival by managedFields times moved to 2099 with kubectl replace.
    let mut object = get_json(w, &ns, "deployment", "web")?;
    for entry in object["metadata"]["managedFields"].as_array_mut().into_iter().flatten() {
        entry["time"] = json!("2099-01-01T00:00:00Z");
    }
    let _ = w.plane.kubectl_stdin(&w.mallory, &["replace", "-f", "-"], Some(&object.to_string()));
    rejects(w.plane.kubectl(&w.agent, &delete(&ns, "web")), "a delete after edited managedFields", expired)?;

    // Writing the expired ticket again, even by an approver, is refused.
    must(
        w.plane
            .kubectl(&w.plane.admin, &["annotate", "deployment", "web", "-n", &ns, "agentguard.io/approve-"]),
    )?;
    let again = format!("agentguard.io/approve={value}");
    rejects(
        w.plane.kubectl(&w.alice, &["annotate", "deployment", "web", "-n", &ns, &again]),
        "re-writing an expired ticket",
        "expired",
    )?;
    ensure!(exists(w, &ns, "deployment", "web"), "the deployment is gone");
    Ok(())
}

/// An approval agentguard did not issue for this object approves nothing: written before it was
/// installed (the old grammar, or a fabricated ticket), written by hand, or a ticket for another
/// object copied over.
pub fn planted_or_copied(w: &World) -> Result<()> {
    rejects(
        w.plane.kubectl(&w.agent, &delete(PREINSTALL, "old-grammar")),
        "a delete under an approval planted before install",
        "the approval on the object is malformed",
    )?;
    rejects(
        w.plane.kubectl(&w.agent, &delete(PREINSTALL, "fabricated")),
        "a delete under a fabricated ticket",
        "the approval's ticket was not issued by agentguard for this object",
    )?;
    for name in ["old-grammar", "fabricated"] {
        ensure!(exists(w, PREINSTALL, "deployment", name), "{name} was deleted");
    }

    let ns = namespace(w, "planted")?;
    deployment(w, &ns, "a")?;
    deployment(w, &ns, "b")?;
    // A value that is no ticket for its object approves nothing, whoever writes it (controllers
    // copy annotations between objects): the writer is warned, and the agent stays held.
    let inert = accepts(
        w.plane
            .kubectl(&w.alice, &["annotate", "deployment", "a", "-n", &ns, "agentguard.io/approve=delete"]),
        "an approver writing a value without a ticket (inert)",
    )?;
    ensure!(inert.contains("approves nothing"), "alice was not warned: {inert}");
    let for_a = ticket_in(&rejects(
        w.plane.kubectl(&w.agent, &delete(&ns, "a")),
        "deleting a under a value without a ticket",
        "requires approval",
    )?)?;
    let copied = format!("agentguard.io/approve={for_a}");
    let inert = accepts(
        w.plane.kubectl(&w.alice, &["annotate", "deployment", "b", "-n", &ns, &copied]),
        "a ticket for a copied onto b (inert)",
    )?;
    ensure!(
        inert.contains("not a ticket agentguard issued for this object"),
        "alice was not warned: {inert}"
    );
    rejects(
        w.plane.kubectl(&w.agent, &delete(&ns, "b")),
        "deleting b under a's ticket",
        "requires approval",
    )?;
    // Created with an approval: no ticket can cover an object that did not exist. An agent may
    // not; anyone else's copy is inert.
    let manifest = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "born-approved", "namespace": ns, "annotations": {"agentguard.io/approve": for_a}}});
    rejects(
        w.plane.kubectl_stdin(&w.agent, &["create", "-f", "-"], Some(&manifest.to_string())),
        "an agent creating an object carrying an approval",
        "approval-annotation",
    )?;
    let created = accepts(
        w.plane.kubectl_stdin(&w.alice, &["create", "-f", "-"], Some(&manifest.to_string())),
        "alice creating an object carrying a copied approval (inert)",
    )?;
    ensure!(created.contains("approves nothing"), "alice was not warned: {created}");
    for name in ["a", "b"] {
        ensure!(exists(w, &ns, "deployment", name), "{name} was deleted");
    }
    Ok(())
}

/// A delete approval covers the object as it was reviewed: the approver's own annotate keeps
/// it, any other change after the review makes it stale.
pub fn stale_delete(w: &World) -> Result<()> {
    let ns = namespace(w, "stale")?;
    deployment(w, &ns, "web")?;
    let denial = rejects(w.plane.kubectl(&w.agent, &delete(&ns, "web")), "the delete", "requires approval")?;
    let value = ticket_in(&denial)?;
    accepts(run_as(w, &w.alice, &approve_command(&denial)?), "alice's approval")?;
    accepts(
        w.plane.kubectl(&w.agent, &["delete", "deployment", "web", "-n", &ns, "--dry-run=server"]),
        "the approved delete, as a dry run",
    )?;
    must(w.plane.kubectl(&w.plane.admin, &["set", "image", "deployment/web", "web=nginx:1.28", "-n", &ns]))?;
    // The deployment controller answers the new template (revision annotation, a new ReplicaSet):
    // the agent retries on the object as it then stays.
    settled(w, &ns, "web")?;
    let stale = rejects(
        w.plane.kubectl(&w.agent, &delete(&ns, "web")),
        "a delete after the spec changed",
        "changed after the delete was reviewed",
    )?;
    // Nor can the stale ticket be written again.
    must(
        w.plane
            .kubectl(&w.plane.admin, &["annotate", "deployment", "web", "-n", &ns, "agentguard.io/approve-"]),
    )?;
    let again = format!("agentguard.io/approve={value}");
    rejects(
        w.plane.kubectl(&w.alice, &["annotate", "deployment", "web", "-n", &ns, &again]),
        "writing a stale ticket",
        "no longer in the state the delete was reviewed in",
    )?;
    // The refusal carried a fresh ticket for the object as it is now: that one works.
    accepts(run_as(w, &w.alice, &approve_command(&stale)?), "approving the fresh ticket")?;
    accepts(w.plane.kubectl(&w.agent, &delete(&ns, "web")), "the delete under a fresh ticket")?;
    ensure!(!exists(w, &ns, "deployment", "web"), "the approved delete did not delete");
    Ok(())
}

/// An update ticket covers one exact change: not another change, not a delete, not the change
/// after it.
pub fn update_covers_one_change(w: &World) -> Result<()> {
    let ns = namespace(w, "onechange")?;
    deployment(w, &ns, "web")?;
    let patch = |replicas: u32| {
        let body = format!(r#"{{"spec":{{"replicas":{replicas}}}}}"#);
        w.plane.kubectl(&w.agent, &["patch", "deployment", "web", "-n", &ns, "-p", &body])
    };
    let denial = rejects(patch(3), "scaling to 3", "spec.replicas: 1 → 3")?;
    ensure!(ticket_in(&denial)?.starts_with("update."), "{denial}");
    accepts(run_as(w, &w.alice, &approve_command(&denial)?), "alice's approval of 1 → 3")?;
    rejects(
        patch(4),
        "another change under that ticket",
        "the approval is for a different change than this one",
    )?;
    rejects(
        w.plane.kubectl(&w.agent, &delete(&ns, "web")),
        "a delete under it",
        "is for update, not delete",
    )?;
    accepts(patch(3), "the approved change")?;
    rejects(patch(1), "the change after it", "the approval is for a different change than this one")?;
    Ok(())
}

/// AdmissionReviews POSTed straight to agentguard's port, as anyone who reaches it could: the
/// answers leave no audit record and no "approved by" Event.
pub fn forged_reviews(w: &World) -> Result<()> {
    let ns = namespace(w, "forged")?;
    deployment(w, &ns, "web")?;
    let live = get_json(w, &ns, "deployment", "web")?;
    let agent = json!({"username": "system:serviceaccount:agents:coder",
        "groups": ["system:serviceaccounts", "system:serviceaccounts:agents", "system:authenticated"]});
    let alice = json!({"username": "alice", "groups": ["sre", "system:authenticated"]});
    let review = |id: &str, operation: &str, user: &Value, old: &Value, new: Option<&Value>| {
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": format!("forged-{id}"),
            "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
            "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
            "name": old["metadata"]["name"], "namespace": ns, "operation": operation,
            "userInfo": user, "object": new, "oldObject": old,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": if operation == "DELETE" { "DeleteOptions" } else { "UpdateOptions" }},
            "dryRun": false}})
    };
    let ca = std::fs::read(w.plane.dir.path().join("ca.crt"))?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let client =
        reqwest::Client::builder().add_root_certificate(reqwest::Certificate::from_pem(&ca)?).build()?;
    let post = |body: Value| -> Result<Value> {
        runtime.block_on(async {
            let answer: Value = client
                .post(&w.agentguard.webhook)
                .json(&body)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            Ok(answer["response"].clone())
        })
    };
    let approved_with = |old: &Value, value: &str| {
        let mut old = old.clone();
        if !old["metadata"]["annotations"].is_object() {
            old["metadata"]["annotations"] = json!({});
        }
        old["metadata"]["annotations"]["agentguard.io/approve"] = json!(value);
        old
    };

    // 1. A held delete of an object that does not exist hands out a ticket for it…
    let mut ghost = live.clone();
    ghost["metadata"]["name"] = json!("ghost");
    ghost["metadata"]["uid"] = json!("00000000-0000-4000-8000-00000000f0f0");
    let held = post(review("1", "DELETE", &agent, &ghost, None))?;
    ensure!(held["allowed"] == false, "{held}");
    let ghost_ticket = ticket_in(held["status"]["message"].as_str().unwrap_or_default())?;
    // …but the "approved" delete carrying it is not recorded: the object is not live.
    let answer = post(review("2", "DELETE", &agent, &approved_with(&ghost, &ghost_ticket), None))?;
    ensure!(
        answer["allowed"] == false,
        "a forged approved delete of a missing object was admitted: {answer}"
    );
    ensure!(answer["status"]["message"].as_str().unwrap_or_default().contains("live object"), "{answer}");

    // 2. The real object's uid and resourceVersion, with other contents (what `restore` would
    // bring back): refused as well.
    let mut altered = live.clone();
    altered["spec"]["template"]["spec"]["containers"][0]["image"] = json!("attacker/backdoor:latest");
    let held = post(review("3", "DELETE", &agent, &altered, None))?;
    let altered_ticket = ticket_in(held["status"]["message"].as_str().unwrap_or_default())?;
    let answer = post(review("4", "DELETE", &agent, &approved_with(&altered, &altered_ticket), None))?;
    ensure!(answer["allowed"] == false, "a forged prior object was admitted: {answer}");
    ensure!(answer["status"]["message"].as_str().unwrap_or_default().contains("other contents"), "{answer}");

    // 3. "alice approved": a forged approval write with a genuine ticket for the live object.
    let held = post(review("5", "DELETE", &agent, &live, None))?;
    let real_ticket = ticket_in(held["status"]["message"].as_str().unwrap_or_default())?;
    let answer = post(review("6", "UPDATE", &alice, &live, Some(&approved_with(&live, &real_ticket))))?;
    ensure!(answer["allowed"] == true, "the forged approval write was judged differently: {answer}");
    // agentguard waits up to 10 s for the approval to be stored before it reports it.
    std::thread::sleep(Duration::from_secs(12));
    let seen = events(w, &ns, "{.reason}/{.regarding.name}")?;
    ensure!(
        !seen.lines().any(|l| l.starts_with("ApprovalRecorded")),
        "a forged approval left an Event: {seen}"
    );
    ensure!(
        get_json(w, &ns, "deployment", "web")?["metadata"]["annotations"]["agentguard.io/approve"].is_null(),
        "the object carries an approval"
    );

    // No record of any of it.
    let targets = must(w.plane.kubectl(
        &w.plane.admin,
        &[
            "get",
            "agentchanges",
            "-n",
            "agentguard-system",
            "-o",
            "jsonpath={range .items[*]}{.spec.target.namespace}{\"\\n\"}{end}",
        ],
    ))?;
    ensure!(!targets.lines().any(|l| l == ns), "a forged review left an AgentChange record");
    // A real approval on the same object is still reported.
    accepts(
        w.plane.kubectl(
            &w.alice,
            &["annotate", "deployment", "web", "-n", &ns, &format!("agentguard.io/approve={real_ticket}")],
        ),
        "alice's real approval",
    )?;
    wait_for_events(w, &ns, &["ApprovalRecorded/Deployment/web"])?;
    Ok(())
}
