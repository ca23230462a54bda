//! Attacks on the approvals beyond one annotation, as an agent would try them: claims removed
//! sideways while only their volumes are guarded (each must be judged as the volume's DELETE),
//! sessions used beyond their count or by another agent acting as the session's agent, and one
//! approver counting twice. Every route that is admitted is named in the failure.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::approvals::{admitted_soon, claim, volume};
use crate::scenarios::{exists, namespace};
use crate::world::{World, must};

const POLICY: &str = "e2e-attack-volumes";

fn stateful_set(ns: &str, name: &str, retention: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  \
         replicas: 1\n  serviceName: {name}\n  selector: {{matchLabels: {{app: {name}}}}}\n  \
         persistentVolumeClaimRetentionPolicy: {{{retention}}}\n  \
         template:\n    metadata: {{labels: {{app: {name}}}}}\n    \
         spec: {{containers: [{{name: db, image: 'postgres:17', volumeMounts: [{{name: data, mountPath: /data}}]}}]}}\n  \
         volumeClaimTemplates:\n    - metadata: {{name: data}}\n      spec: {{accessModes: [ReadWriteOnce], storageClassName: e2e-manual, \
         resources: {{requests: {{storage: 1Gi}}}}}}\n"
    )
}

/// Polls until the claim is gone (the data went with it), for at most `limit`.
fn claim_gone(w: &World, ns: &str, name: &str, limit: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if !exists(w, ns, "pvc", name) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    false
}

/// One route's outcome: refused (as it must be), or admitted (an open route).
fn route(
    w: &World,
    open: &mut Vec<String>,
    what: &str,
    out: std::process::Output,
    ns: &str,
    lost: &str,
) -> Result<()> {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        let gone = claim_gone(w, ns, lost, Duration::from_secs(30));
        let pv_phase = w
            .plane
            .kubectl(&w.plane.admin, &["get", "pvc", lost, "-n", ns, "-o", "jsonpath={.status.phase}"]);
        println!(
            "  OPEN: {what}: admitted; claim {ns}/{lost} {} ({})",
            if gone { "deleted by the controllers" } else { "still there after 30s" },
            String::from_utf8_lossy(&pv_phase.stdout)
        );
        open.push(format!("{what} (claim {lost} {})", if gone { "deleted" } else { "not yet deleted" }));
    } else if stderr.contains("requires approval")
        && stderr.contains(&format!("ClusterAgentPolicy \"{POLICY}"))
    {
        println!("  refused: {what}");
    } else {
        println!("  refused, but not as the volume's delete: {what}: {stderr}");
        open.push(format!("{what}: refused for another reason: {stderr}"));
    }
    Ok(())
}

/// With only PersistentVolume DELETEs guarded, every route that removes a claim bound to a
/// volume whose data goes with the claim must be held as that volume's DELETE.
pub fn claims_lost_sideways_are_judged_as_their_volumes(w: &World) -> Result<()> {
    let ns = namespace(w, "attack-volumes")?;
    let mut objects = format!(
        "apiVersion: agentguard.io/v1alpha1\nkind: ClusterAgentPolicy\nmetadata: {{name: {POLICY}}}\nspec:\n  \
         action: RequireApproval\n  approval: {{approvers: {{groups: [sre]}}, reason: volumes hold data}}\n  \
         rules:\n    - name: volumes\n      operations: [DELETE]\n      resources: [{{apiGroups: [''], resources: [persistentvolumes]}}]\n\
         ---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: owner, namespace: {ns}}}\n"
    );
    let volumes = [
        ("e2e-atk-owned", "Delete", "owned"),
        ("e2e-atk-ghost", "Delete", "ghost"),
        ("e2e-atk-recycled", "Recycle", "recycled"),
        ("e2e-atk-flip", "Retain", "flip"),
        ("e2e-atk-dropped", "Delete", "data-dropped-0"),
        ("e2e-atk-scaled", "Delete", "data-scaled-0"),
    ];
    for (pv, reclaim, pvc) in volumes {
        objects.push_str(&format!("---\n{}", volume(pv, reclaim, &ns, pvc)));
        if !pvc.starts_with("data-") {
            objects.push_str(&format!("---\n{}", claim(&ns, pvc, pv)));
        }
    }
    objects.push_str(&format!("---\n{}", stateful_set(&ns, "dropped", "whenDeleted: Delete")));
    objects.push_str(&format!("---\n{}", stateful_set(&ns, "scaled", "whenScaled: Delete")));
    must(w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-f", "-"], Some(&objects)))?;
    let result = (|| -> Result<()> {
        must(w.plane.kubectl(
            &w.plane.admin,
            &["wait", "--for=condition=Ready", "--timeout=30s", &format!("clusteragentpolicy/{POLICY}")],
        ))?;
        let started = Instant::now();
        for (_, _, pvc) in volumes {
            while !exists(w, &ns, "pvc", pvc) && started.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(250));
            }
            must(w.plane.kubectl(
                &w.plane.admin,
                &["wait", "--for=jsonpath={.status.phase}=Bound", "--timeout=60s", "pvc", pvc, "-n", &ns],
            ))?;
        }
        // A human made the ConfigMap own the claim (and the StatefulSet controller made the
        // StatefulSet own its claim, whenDeleted: Delete).
        let owner_uid = must(w.plane.kubectl(
            &w.plane.admin,
            &["get", "configmap", "owner", "-n", &ns, "-o", "jsonpath={.metadata.uid}"],
        ))?;
        let owned = format!(
            r#"{{"metadata":{{"ownerReferences":[{{"apiVersion":"v1","kind":"ConfigMap","name":"owner","uid":"{}"}}]}}}}"#,
            owner_uid.trim()
        );
        must(
            w.plane
                .kubectl(&w.plane.admin, &["patch", "pvc", "owned", "-n", &ns, "--type=merge", "-p", &owned]),
        )?;
        must(w.plane.kubectl(
            &w.plane.admin,
            &[
                "wait",
                "--for=jsonpath={.metadata.ownerReferences[0].kind}=StatefulSet",
                "--timeout=60s",
                "pvc",
                "data-dropped-0",
                "-n",
                &ns,
            ],
        ))?;

        let mut open = Vec::new();
        // Control: the claim's own delete is held (the feature as shipped).
        let held = w.plane.kubectl(&w.editor, &["delete", "pvc", "owned", "-n", &ns, "--dry-run=server"]);
        ensure_refused(&held, "the claim's own delete (control)")?;
        // Control: arming the volume (Retain -> Delete) is held as its delete.
        let armed = w.plane.kubectl(
            &w.agent,
            &[
                "patch",
                "pv",
                "e2e-atk-flip",
                "--type=merge",
                "-p",
                r#"{"spec":{"persistentVolumeReclaimPolicy":"Delete"}}"#,
                "--dry-run=server",
            ],
        );
        ensure_refused(&armed, "arming the volume, Retain -> Delete (control)")?;

        // 1. Deleting the claim's owner: the garbage collector deletes the claim.
        route(
            w,
            &mut open,
            "deleting the ConfigMap that owns the claim",
            w.plane.kubectl(&w.editor, &["delete", "configmap", "owner", "-n", &ns]),
            &ns,
            "owned",
        )?;
        // 2. An ownerReference to an owner that does not exist: the collector deletes the claim.
        let ghost = r#"{"metadata":{"ownerReferences":[{"apiVersion":"v1","kind":"ConfigMap","name":"nobody","uid":"0b5e7a1c-6f9e-4a53-9d1e-000000000001"}]}}"#;
        route(
            w,
            &mut open,
            "adding an ownerReference to a missing owner to the claim",
            w.plane.kubectl(&w.editor, &["patch", "pvc", "ghost", "-n", &ns, "--type=merge", "-p", ghost]),
            &ns,
            "ghost",
        )?;
        // 3. A StatefulSet whose claims go with it (whenDeleted: Delete).
        route(
            w,
            &mut open,
            "deleting a StatefulSet whose retention whenDeleted is Delete",
            w.plane.kubectl(&w.editor, &["delete", "statefulset", "dropped", "-n", &ns, "--wait=false"]),
            &ns,
            "data-dropped-0",
        )?;
        // 4. Scaling down a StatefulSet whose claims go with removed replicas (whenScaled: Delete).
        route(
            w,
            &mut open,
            "scaling down a StatefulSet whose retention whenScaled is Delete",
            w.plane.kubectl(
                &w.editor,
                &[
                    "patch",
                    "statefulset",
                    "scaled",
                    "-n",
                    &ns,
                    "--type=merge",
                    "-p",
                    r#"{"spec":{"replicas":0}}"#,
                ],
            ),
            &ns,
            "data-scaled-0",
        )?;
        // 5. reclaimPolicy Recycle scrubs the volume (rm -rf) once its claim is gone.
        route(
            w,
            &mut open,
            "deleting a claim whose volume's reclaimPolicy is Recycle",
            w.plane.kubectl(&w.editor, &["delete", "pvc", "recycled", "-n", &ns, "--wait=false"]),
            &ns,
            "recycled",
        )?;
        // 6. Arming the volume with Recycle instead of Delete.
        let recycle = w.plane.kubectl(
            &w.agent,
            &[
                "patch",
                "pv",
                "e2e-atk-flip",
                "--type=merge",
                "-p",
                r#"{"spec":{"persistentVolumeReclaimPolicy":"Recycle"}}"#,
            ],
        );
        if recycle.status.success() {
            println!("  OPEN: setting a volume's reclaimPolicy Retain -> Recycle: admitted");
            open.push("setting a volume's reclaimPolicy Retain -> Recycle".into());
        } else {
            println!("  refused: Retain -> Recycle: {}", String::from_utf8_lossy(&recycle.stderr));
        }
        if !open.is_empty() {
            bail!(
                "{} route(s) lose a guarded volume's data without its approval: {}",
                open.len(),
                open.join("; ")
            );
        }
        Ok(())
    })();
    let _ = w.plane.kubectl(&w.plane.admin, &["delete", "clusteragentpolicy", POLICY]);
    for (pv, _, _) in volumes {
        let _ = w.plane.kubectl(&w.plane.admin, &["delete", "pv", pv, "--wait=false"]);
    }
    result
}

fn ensure_refused(out: &std::process::Output, what: &str) -> Result<()> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        !out.status.success() && stderr.contains("requires approval"),
        "{what} was not held: {}{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    println!("  held: {what}");
    Ok(())
}

fn open_session(w: &World, name: &str, ns: &str, max: &str) -> Result<()> {
    let credential = crate::approvals::credential_of(&w.editor)?;
    must(crate::plugin::plugin(
        w,
        &w.alice,
        &[
            "session",
            "open",
            name,
            "--agent",
            "agents/editor",
            "--credential",
            &credential,
            "-n",
            ns,
            "--resource",
            "deployments.apps",
            "--operation",
            "DELETE",
            "--max",
            max,
            "--ttl",
            "10m",
            "--reason",
            "attack",
        ],
        "",
    )?)?;
    Ok(())
}

fn deployments_left(w: &World, ns: &str) -> Result<usize> {
    let names = must(w.plane.kubectl(&w.plane.admin, &["get", "deployments", "-n", ns, "-o", "name"]))?;
    Ok(names.lines().filter(|l| l.starts_with("deployment")).count())
}

/// A session's maxOperations holds against parallel deletes and a deletecollection.
pub fn session_uses_cannot_exceed_their_count(w: &World) -> Result<()> {
    let ns = namespace(w, "attack-session")?;
    for name in ["p1", "p2", "p3", "p4", "p5", "p6"] {
        crate::scenarios::deployment(w, &ns, name)?;
    }
    let mut open = Vec::new();
    // 1. Four deletes at once under a session of one use.
    open_session(w, "atk-parallel", &ns, "1")?;
    admitted_soon(w, &w.editor, &["delete", "deployment", "p1", "-n", &ns, "--dry-run=server"])?;
    let children: Vec<std::process::Child> = ["p1", "p2", "p3", "p4"]
        .iter()
        .map(|name| {
            std::process::Command::new(&w.plane.kubectl)
                .env("KUBECONFIG", &w.editor)
                .env_remove("KUBERNETES_SERVICE_HOST")
                .args(["delete", "deployment", *name, "-n", ns.as_str(), "--wait=false"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("kubectl runs")
        })
        .collect();
    let admitted = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("kubectl finishes"))
        .filter(|o| o.status.success())
        .count();
    let left = deployments_left(w, &ns)?;
    println!(
        "  parallel: {admitted} of 4 deletes admitted under a 1-use session; {left} of 6 deployments left"
    );
    if admitted > 1 || left < 5 {
        open.push(format!("{admitted} parallel deletes admitted under a session of 1 use"));
    }
    must(crate::plugin::plugin(w, &w.alice, &["session", "close", "atk-parallel"], "")?)?;
    // 2. A deletecollection under a session of one use, with the rest of the deployments.
    open_session(w, "atk-collection", &ns, "1")?;
    let remaining: Vec<String> = must(w.plane.kubectl(
        &w.plane.admin,
        &["get", "deployments", "-n", &ns, "-o", "jsonpath={.items[*].metadata.name}"],
    ))?
    .split_whitespace()
    .map(str::to_owned)
    .collect();
    let first = remaining.first().cloned().unwrap_or_default();
    admitted_soon(w, &w.editor, &["delete", "deployment", &first, "-n", &ns, "--dry-run=server"])?;
    let before = deployments_left(w, &ns)?;
    let raw = w
        .plane
        .kubectl(&w.editor, &["delete", "--raw", &format!("/apis/apps/v1/namespaces/{ns}/deployments")]);
    std::thread::sleep(Duration::from_secs(2));
    let after = deployments_left(w, &ns)?;
    println!(
        "  deletecollection: {} ; {before} -> {after} deployments under a 1-use session: {}",
        if raw.status.success() { "admitted" } else { "refused" },
        String::from_utf8_lossy(&raw.stderr).lines().next().unwrap_or_default()
    );
    if before.saturating_sub(after) > 1 {
        open.push(format!(
            "a deletecollection deleted {} deployments under a session of 1 use",
            before.saturating_sub(after)
        ));
    }
    let _ = crate::plugin::plugin(w, &w.alice, &["session", "close", "atk-collection"], "");
    if !open.is_empty() {
        bail!("{}", open.join("; "));
    }
    Ok(())
}

/// A session is for one agent; another agent that can act as that agent (`edit` lets it
/// impersonate the ServiceAccounts of its namespaces) must not get the session's admissions.
pub fn a_session_is_not_borrowed_by_another_agent(w: &World) -> Result<()> {
    let ns = namespace(w, "attack-borrow")?;
    must(w.plane.kubectl(&w.plane.admin, &["create", "serviceaccount", "worker", "-n", &ns]))?;
    must(w.plane.kubectl(
        &w.plane.admin,
        &["label", "serviceaccount", "worker", "-n", &ns, "agentguard.io/agent=true"],
    ))?;
    w.bind_edit(&ns, &ns, "worker")?;
    let worker = format!("system:serviceaccount:{ns}:worker");
    w.wait_for_registration(&worker, Duration::from_secs(30))?;
    for name in ["w1", "w2"] {
        crate::scenarios::deployment(w, &ns, name)?;
    }
    // The worker's own token: the credential the session is for.
    let worker_kc = w.plane.service_account_kubeconfig(&ns, "worker")?;
    let credential = crate::approvals::credential_of(&worker_kc)?;
    must(crate::plugin::plugin(
        w,
        &w.alice,
        &[
            "session",
            "open",
            "atk-worker",
            "--agent",
            &format!("{ns}/worker"),
            "--credential",
            &credential,
            "-n",
            &ns,
            "--resource",
            "deployments.apps",
            "--operation",
            "DELETE",
            "--max",
            "5",
            "--ttl",
            "10m",
            "--reason",
            "worker only",
        ],
        "",
    )?)?;
    let as_worker = format!("--as={worker}");
    // The session's own agent, with its own token: admitted (the session works).
    admitted_soon(w, &worker_kc, &["delete", "deployment", "w1", "-n", &ns, "--dry-run=server"])?;
    // The editor as itself: held.
    let own = w.plane.kubectl(&w.editor, &["delete", "deployment", "w1", "-n", &ns, "--dry-run=server"]);
    ensure_refused(&own, "the editor's own delete outside the worker's session")?;
    // The editor acting as the worker (edit lets it impersonate the namespace's ServiceAccounts).
    let borrowed = w.plane.kubectl(&w.editor, &["delete", "deployment", "w2", "-n", &ns, &as_worker]);
    let _ = crate::plugin::plugin(w, &w.alice, &["session", "close", "atk-worker"], "");
    if borrowed.status.success() {
        println!("  OPEN: the editor deleted w2 under the worker's session by impersonating the worker");
        bail!(
            "another agent (agents:editor) used the session opened for {worker} by impersonating it: w2 deleted"
        );
    }
    println!("  refused: {}", String::from_utf8_lossy(&borrowed.stderr));
    Ok(())
}

/// More ways to take a claim with its volume: a pod's generic ephemeral volume (the claim is
/// the pod's dependent) and a Namespace outside every namespace policy.
pub fn pods_and_namespaces_take_their_volumes_data(w: &World) -> Result<()> {
    let ns = namespace(w, "attack-eph")?;
    let bare = "attack-bare-ns";
    must(w.plane.kubectl(&w.plane.admin, &["create", "namespace", bare]))?;
    let mut objects = format!(
        "apiVersion: agentguard.io/v1alpha1\nkind: ClusterAgentPolicy\nmetadata: {{name: {POLICY}-2}}\nspec:\n  \
         action: RequireApproval\n  approval: {{approvers: {{groups: [sre]}}, reason: volumes hold data}}\n  \
         rules:\n    - name: volumes\n      operations: [DELETE]\n      resources: [{{apiGroups: [''], resources: [persistentvolumes]}}]\n"
    );
    objects.push_str(&format!("---\n{}", volume("e2e-atk-eph", "Delete", &ns, "app-data")));
    objects.push_str(&format!("---\n{}", volume("e2e-atk-bare", "Delete", bare, "keep")));
    objects.push_str(&format!("---\n{}", claim(bare, "keep", "e2e-atk-bare")));
    objects.push_str(&format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: app, namespace: {ns}}}\nspec:\n  containers: [{{name: app, image: 'busybox:1.36'}}]\n  \
         volumes:\n    - name: data\n      ephemeral:\n        volumeClaimTemplate:\n          spec: {{accessModes: [ReadWriteOnce], storageClassName: e2e-manual, resources: {{requests: {{storage: 1Gi}}}}}}\n"
    ));
    must(w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-f", "-"], Some(&objects)))?;
    let result = (|| -> Result<()> {
        must(w.plane.kubectl(
            &w.plane.admin,
            &["wait", "--for=condition=Ready", "--timeout=30s", &format!("clusteragentpolicy/{POLICY}-2")],
        ))?;
        let started = Instant::now();
        while !exists(w, &ns, "pvc", "app-data") && started.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(250));
        }
        for (space, pvc) in [(ns.as_str(), "app-data"), (bare, "keep")] {
            must(w.plane.kubectl(
                &w.plane.admin,
                &["wait", "--for=jsonpath={.status.phase}=Bound", "--timeout=60s", "pvc", pvc, "-n", space],
            ))?;
        }
        let mut open = Vec::new();
        route(
            w,
            &mut open,
            "deleting a pod whose generic ephemeral volume is bound to a Delete volume",
            w.plane.kubectl(&w.editor, &["delete", "pod", "app", "-n", &ns, "--wait=false"]),
            &ns,
            "app-data",
        )?;
        let out = w.plane.kubectl(&w.agent, &["delete", "namespace", bare, "--wait=false"]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            println!(
                "  OPEN: deleting a Namespace (no namespace policy) holding a claim on a Delete volume: admitted"
            );
            open.push("deleting a Namespace holding a claim on a Delete volume".to_owned());
        } else if stderr.contains("requires approval") && stderr.contains("e2e-atk-bare") {
            println!("  refused: deleting a Namespace holding a claim on a Delete volume");
        } else {
            open.push(format!("namespace delete refused for another reason: {stderr}"));
        }
        if !open.is_empty() {
            bail!("{}", open.join("; "));
        }
        Ok(())
    })();
    let _ = w.plane.kubectl(&w.plane.admin, &["delete", "clusteragentpolicy", &format!("{POLICY}-2")]);
    for pv in ["e2e-atk-eph", "e2e-atk-bare"] {
        let _ = w.plane.kubectl(&w.plane.admin, &["delete", "pv", pv, "--wait=false"]);
    }
    result
}

/// Two-person rule: one approver counting twice (two keys in one write, a look-alike name, a
/// key spelled with another case) never makes two.
pub fn one_approver_never_counts_twice(w: &World) -> Result<()> {
    let ns = namespace(w, "attack-two")?;
    crate::scenarios::deployment(w, &ns, "db")?;
    crate::approvals::two_person_policy(w, &ns)?;
    let delete = ["delete", "deployment", "db", "-n", ns.as_str(), "--dry-run=server"];
    let denial = w.plane.kubectl(&w.editor, &delete);
    let denial = String::from_utf8_lossy(&denial.stderr).into_owned();
    let value = crate::approvals::named_ticket(&denial)?;
    let annotate = |who: &std::path::Path, pairs: &[String]| {
        let mut args: Vec<&str> = vec!["annotate", "deployment", "db", "-n", &ns, "--overwrite"];
        args.extend(pairs.iter().map(String::as_str));
        w.plane.kubectl(who, &args)
    };
    let mut open = Vec::new();
    let probe = |what: &str, out: std::process::Output| {
        if out.status.success() {
            println!("  written: {what}");
            true
        } else {
            println!(
                "  refused: {what}: {}",
                String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or_default()
            );
            false
        }
    };
    // 1. Two keys naming alice in one write.
    if probe(
        "alice's two approvals in one write",
        annotate(
            &w.alice,
            &[
                format!("agentguard.io/approve.a1={value}.alice"),
                format!("agentguard.io/approve.a2={value}.alice"),
            ],
        ),
    ) {
        open.push("alice wrote two approvals in one request".to_owned());
    }
    // 2. Alice's look-alike name (a zero-width space), beside her real one.
    probe("alice's approval", annotate(&w.alice, &[format!("agentguard.io/approve.alice={value}.alice")]));
    if probe(
        "alice's approval naming alice + U+200B",
        annotate(&w.alice, &[format!("agentguard.io/approve.alice2={value}.alice\u{200b}")]),
    ) {
        open.push("alice wrote an approval naming a look-alike of herself".to_owned());
    }
    // 3. Alice under a key spelled with a capital (not an approval key): must not count.
    probe(
        "alice's value under agentguard.io/Approve.alice3",
        annotate(&w.alice, &[format!("agentguard.io/Approve.alice3={value}.alice")]),
    );
    let out = w.plane.kubectl(&w.editor, &delete);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        open.push("the agent's delete was admitted with alice alone".to_owned());
    } else {
        // The capitalised key is an ordinary annotation: writing it changed the object, so the
        // reviewed state (and alice's approval with it) is stale; either way, held.
        anyhow::ensure!(stderr.contains("requires approval"), "{stderr}");
        let why = if stderr.contains("1 more needed") {
            "1 more needed"
        } else {
            "stale after the Approve.* write"
        };
        println!("  held with alice alone: {why}");
    }
    if !open.is_empty() {
        bail!("{}", open.join("; "));
    }
    Ok(())
}
