//! agentguard's own webhook configuration on the real API server: Kubernetes never sends its
//! writes to a webhook, so agentguard watches it and restores any change — or the deleted
//! object — within a second, with a Warning Event and a metric. And the CEL literals it writes
//! for policy-named usernames are accepted by the API server and select exactly those users.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use agentguard::cluster::webhook::cel_string;

use crate::world::{World, accepts, must, rejects};

const NS: &str = "e2e-tamper";
/// The bound each restore is held to here (agentguard aims at well under a second; kubectl's
/// own start-up is in the measurement).
const RESTORE_LIMIT: Duration = Duration::from_secs(2);

fn configuration(w: &World) -> Option<Value> {
    let out = w
        .plane
        .kubectl(&w.plane.admin, &["get", "validatingwebhookconfiguration", "agentguard", "-o", "json"]);
    out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
}

fn agents_webhook(vwc: &Value) -> &Value {
    vwc["webhooks"]
        .as_array()
        .and_then(|list| list.iter().find(|h| h["name"] == "agents.agentguard.io"))
        .unwrap_or(&Value::Null)
}

/// Whether the configuration is agentguard's again: both webhooks, fail closed, the agreed
/// timeout, no selector, and the world's agent in the agents condition.
fn restored(vwc: &Value) -> bool {
    let agents = agents_webhook(vwc);
    let webhooks = vwc["webhooks"].as_array().map_or(0, Vec::len);
    let empty = |v: &Value| v.is_null() || v.as_object().is_some_and(|o| o.is_empty());
    webhooks == 2
        && agents["failurePolicy"] == "Fail"
        && agents["timeoutSeconds"] == 5
        && empty(&agents["objectSelector"])
        && empty(&agents["namespaceSelector"])
        && agents["matchConditions"].as_array().is_some_and(|c| {
            c.len() == 2
                && c[1]["expression"]
                    .as_str()
                    .is_some_and(|e| e.contains("system:serviceaccount:agents:coder"))
        })
}

fn restored_total(w: &World) -> Result<f64> {
    let metrics = w.agentguard.metrics()?;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("agentguard_webhook_configuration_restored_total "))
        .and_then(|v| v.trim().parse().ok())
        .context("agentguard_webhook_configuration_restored_total is not exported")
}

/// Runs `tamper` as the admin, then waits for agentguard to restore the configuration; returns
/// how long that took from the moment the tampering write was stored.
fn restore_after(w: &World, what: &str, tamper: &[&str]) -> Result<Duration> {
    let out = w.plane.kubectl(&w.plane.admin, tamper);
    let stored = Instant::now();
    must(out).with_context(|| format!("tampering: {what}"))?;
    loop {
        if configuration(w).is_some_and(|v| restored(&v)) {
            return Ok(stored.elapsed());
        }
        ensure!(
            stored.elapsed() < RESTORE_LIMIT * 3,
            "{what}: not restored after {:?}: {:#}",
            stored.elapsed(),
            configuration(w).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The whole of "no unguarded corners", as one scenario.
pub fn scenario(w: &World) -> Result<()> {
    guarded_in_every_namespace(w).context("no namespace exclusion")?;
    custom_events_are_guarded(w).context("a custom resource named events")?;
    marked_through_a_subresource(w).context("an agent namespace marked through namespaces/status")?;
    restores_its_configuration(w).context("tamper repair")?;
    policy_usernames_render_to_literals_the_api_server_accepts(w).context("CEL literals")
}

/// kube-system and agentguard's own namespace reach the `agents` webhook like any other: the
/// built-in `agentguard-self` rule and the policies fire there.
fn guarded_in_every_namespace(w: &World) -> Result<()> {
    let admin = |args: &[&str]| must(w.plane.kubectl(&w.plane.admin, args));
    admin(&["create", "configmap", "e2e-probe", "-n", "agentguard-system"])?;
    rejects(
        w.plane.kubectl(&w.agent, &["delete", "configmap", "e2e-probe", "-n", "agentguard-system"]),
        "an agent's delete in agentguard's namespace",
        "agentguard-self",
    )?;
    rejects(
        w.plane.kubectl(&w.agent, &["label", "configmap", "e2e-probe", "-n", "agentguard-system", "x=y"]),
        "an agent's update in agentguard's namespace",
        "agentguard-self",
    )?;
    admin(&["create", "deployment", "e2e-probe", "--image=nginx:1.27", "-n", "kube-system"])?;
    let refused = w.plane.kubectl(&w.agent, &["delete", "deployment", "e2e-probe", "-n", "kube-system"]);
    admin(&["delete", "deployment", "e2e-probe", "-n", "kube-system"])?;
    admin(&["delete", "configmap", "e2e-probe", "-n", "agentguard-system"])?;
    rejects(refused, "an agent's delete in kube-system", "requires approval")?;
    Ok(())
}

/// Only the real leases and events skip the webhooks: a custom resource named `events` in
/// another group is guarded like any other.
fn custom_events_are_guarded(w: &World) -> Result<()> {
    let admin = |args: &[&str]| must(w.plane.kubectl(&w.plane.admin, args));
    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "events.e2e.agentguard.io"},
        "spec": {
            "group": "e2e.agentguard.io",
            "scope": "Namespaced",
            "names": {"plural": "events", "singular": "event", "kind": "Event"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                          "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]
        }
    });
    must(w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-f", "-"], Some(&crd.to_string())))?;
    admin(&["wait", "--for", "condition=established", "--timeout=60s", "crd/events.e2e.agentguard.io"])?;
    let policy = json!({
        "apiVersion": "agentguard.io/v1alpha1",
        "kind": "ClusterAgentPolicy",
        "metadata": {"name": "e2e-custom-events"},
        "spec": {"action": "Deny", "rules": [{"name": "custom-events", "operations": ["DELETE"], "namespaces": [NS_EVENTS],
                  "resources": [{"apiGroups": ["e2e.agentguard.io"], "resources": ["events"]}]}]}
    });
    admin(&["create", "namespace", NS_EVENTS])?;
    must(w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-f", "-"], Some(&policy.to_string())))?;
    admin(&["wait", "--for=condition=Ready", "--timeout=30s", "clusteragentpolicy/e2e-custom-events"])?;
    let object = json!({"apiVersion": "e2e.agentguard.io/v1", "kind": "Event", "metadata": {"name": "launch", "namespace": NS_EVENTS}});
    must(w.plane.kubectl_stdin(&w.plane.admin, &["create", "-f", "-"], Some(&object.to_string())))?;
    let refused =
        w.plane.kubectl(&w.agent, &["delete", "events.e2e.agentguard.io", "launch", "-n", NS_EVENTS]);
    admin(&["delete", "clusteragentpolicy", "e2e-custom-events"])?;
    rejects(refused, "an agent's delete of a custom resource named events", "e2e-custom-events")?;
    Ok(())
}

const NS_EVENTS: &str = "e2e-custom-events";
const NS_STATUS: &str = "e2e-status-marked";

/// A Namespace marked as an agent namespace through `namespaces/status` (which stores labels):
/// the `approvals` webhook sees the write, agentguard registers the namespace before admitting
/// it, and the namespace's ServiceAccounts are guarded from that moment.
fn marked_through_a_subresource(w: &World) -> Result<()> {
    let admin = |args: &[&str]| must(w.plane.kubectl(&w.plane.admin, args));
    admin(&["create", "namespace", NS_STATUS])?;
    admin(&["create", "serviceaccount", "bot", "-n", NS_STATUS])?;
    admin(&[
        "create",
        "rolebinding",
        "bot",
        "--clusterrole=edit",
        &format!("--serviceaccount={NS_STATUS}:bot"),
        "-n",
        NS_STATUS,
    ])?;
    admin(&["create", "deployment", "web", "--image=nginx:1.27", "-n", NS_STATUS])?;
    let bot = w.plane.service_account_kubeconfig(NS_STATUS, "bot")?;
    let mark = json!({"metadata": {"labels": {"agentguard.io/agent-namespace": "true"}}}).to_string();
    admin(&["patch", "namespace", NS_STATUS, "--subresource=status", "--type=merge", "-p", &mark])?;
    let labels = admin(&["get", "namespace", NS_STATUS, "-o", "jsonpath={.metadata.labels}"])?;
    ensure!(
        labels.contains("agentguard.io/agent-namespace"),
        "namespaces/status did not store the label: {labels}"
    );
    // At once: no wait for caches or a resync.
    rejects(
        w.plane.kubectl(&bot, &["delete", "deployment", "web", "-n", NS_STATUS]),
        "a delete by a ServiceAccount of a namespace just marked through its status",
        "requires approval",
    )?;
    let vwc = configuration(w).context("no webhook configuration")?;
    let expression = agents_webhook(&vwc)["matchConditions"][1]["expression"].as_str().unwrap_or_default();
    ensure!(
        expression.contains(&format!("system:serviceaccount:{NS_STATUS}:")),
        "not registered: {expression}"
    );
    // And an agent cannot unmark it the same way.
    let unmark = json!({"metadata": {"labels": {"agentguard.io/agent-namespace": null}}}).to_string();
    rejects(
        w.plane.kubectl(
            &w.agent,
            &["patch", "namespace", NS_STATUS, "--subresource=status", "--type=merge", "-p", &unmark],
        ),
        "an agent removing the agent-namespace label through namespaces/status",
        "agent-namespace-label",
    )?;
    Ok(())
}

fn restores_its_configuration(w: &World) -> Result<()> {
    ensure!(
        configuration(w).is_some_and(|v| restored(&v)),
        "the configuration is not agentguard's to begin with"
    );
    must(w.plane.kubectl(&w.plane.admin, &["create", "namespace", NS]))?;
    let before = restored_total(w)?;
    let patch = |p: Value| p.to_string();
    let selector = patch(
        json!([{"op": "add", "path": "/webhooks/0/objectSelector", "value": {"matchLabels": {"agentguard": "off"}}}]),
    );
    let ignore = patch(json!([{"op": "replace", "path": "/webhooks/0/failurePolicy", "value": "Ignore"}]));
    let timeout = patch(json!([{"op": "replace", "path": "/webhooks/0/timeoutSeconds", "value": 1}]));
    let vwc = ["validatingwebhookconfiguration", "agentguard"];
    let patched = |p: &str| {
        vec!["patch", vwc[0], vwc[1], "--type=json", "-p"]
            .into_iter()
            .chain([p])
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    // A condition added: server-side apply keeps what other managers add, so it is replaced.
    let condition = patch(
        json!([{"op": "add", "path": "/webhooks/0/matchConditions/-", "value": {"name": "off", "expression": "false"}}]),
    );
    // The agent list emptied: the kind of change another replica may make first, given a
    // moment for this replica's caches to agree before it counts as tampering.
    let nobody = patch(
        json!([{"op": "replace", "path": "/webhooks/0/matchConditions/1/expression", "value": "false"}]),
    );
    let cases: [(&str, Vec<String>); 6] = [
        ("an objectSelector on the agents webhook", patched(&selector)),
        ("failurePolicy Ignore", patched(&ignore)),
        ("another timeoutSeconds", patched(&timeout)),
        ("a matchCondition added", patched(&condition)),
        ("the agent list emptied", patched(&nobody)),
        ("the whole configuration deleted", vec!["delete".into(), vwc[0].into(), vwc[1].into()]),
    ];
    let mut took = Vec::new();
    for (what, args) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let elapsed = restore_after(w, what, &args)?;
        ensure!(elapsed <= RESTORE_LIMIT, "{what}: restored only after {elapsed:?}");
        took.push(format!("{what}: {} ms", elapsed.as_millis()));
        // Each restore is its own: the next tampering starts from the restored object.
        std::thread::sleep(Duration::from_millis(300));
    }
    println!("  restored: {}", took.join("; "));

    // Said loudly: one count per restore, and a Warning Event naming what was changed.
    let started = Instant::now();
    while restored_total(w)? < before + cases.len() as f64 {
        ensure!(
            started.elapsed() < Duration::from_secs(5),
            "agentguard_webhook_configuration_restored_total went from {before} to {}, not +{}",
            restored_total(w)?,
            cases.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let jsonpath =
        "jsonpath={range .items[*]}{.type} {.regarding.kind}/{.regarding.name}: {.note}{\"\\n\"}{end}";
    let events = loop {
        let events = must(w.plane.kubectl(
            &w.plane.admin,
            &[
                "get",
                "events.events.k8s.io",
                "-n",
                "default",
                "--field-selector",
                "reason=WebhookConfigurationRestored",
                "-o",
                jsonpath,
            ],
        ))?;
        if events.contains("objectSelector") && events.contains("deleted") {
            break events;
        }
        ensure!(started.elapsed() < Duration::from_secs(15), "no Warning Event names the changes: {events}");
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure!(
        events.lines().all(|l| l.starts_with("Warning ValidatingWebhookConfiguration/agentguard: ")),
        "{events}"
    );
    for line in events.lines() {
        println!("  event: {line}");
    }

    // The recreated configuration guards: the agent is held, a human is not.
    must(w.plane.kubectl(&w.plane.admin, &["create", "deployment", "web", "--image=nginx:1.27", "-n", NS]))?;
    rejects(
        w.plane.kubectl(&w.agent, &["delete", "deployment", "web", "-n", NS]),
        "the agent's delete after the configuration was recreated",
        "requires approval",
    )?;
    Ok(())
}

/// Usernames agentguard renders into CEL, and what the API server makes of them: every one is
/// accepted (control characters, quotes, backslashes, any script) and selects exactly itself.
const NASTY: &[&str] = &[
    "o'brien",
    "o\\'brien",
    "back\\slash\\",
    "double\"quote",
    "'; true || '",
    "x' || true || 'y",
    "żółw 🐢 ünïcödé",
    "tab\there",
    "new\nline",
    "cr\rlf\n",
    "nul\0byte",
    "bell\u{7}esc\u{1b}[31m",
    "del\u{7f}c1\u{85}",
    "sep\u{2028}\u{2029}nbsp\u{a0}bom\u{feff}",
    "\\u0041",
    "\\x41\\101",
];

const CEL_NS: &str = "e2e-cel";

fn policy_usernames_render_to_literals_the_api_server_accepts(w: &World) -> Result<()> {
    must(w.plane.kubectl(&w.plane.admin, &["create", "namespace", CEL_NS]))?;
    for name in ["a", "b"] {
        must(w.plane.kubectl(&w.plane.admin, &["create", "configmap", name, "-n", CEL_NS]))?;
    }

    // 1. A policy naming a user with a quote, a backslash and unicode: the configuration the API
    // server stores selects that user, and no other.
    let user = "o'brïen \"ai\\bot\"";
    let near = "o'brïen \"ai\\bot\"x";
    let policy = json!({
        "apiVersion": "agentguard.io/v1alpha1",
        "kind": "ClusterAgentPolicy",
        "metadata": {"name": "e2e-cel-user"},
        "spec": {
            "action": "Deny",
            "subjects": {"usernames": [user]},
            "rules": [{"name": "configmaps", "operations": ["DELETE"], "namespaces": [CEL_NS],
                       "resources": [{"apiGroups": [""], "resources": ["configmaps"]}]}]
        }
    });
    accepts(
        w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-f", "-"], Some(&policy.to_string())),
        "a policy naming a username with a quote and unicode",
    )?;
    let literal = cel_string(user);
    let started = Instant::now();
    loop {
        let vwc = configuration(w).context("no webhook configuration")?;
        let expression =
            agents_webhook(&vwc)["matchConditions"][1]["expression"].as_str().unwrap_or_default().to_owned();
        if expression.contains(&literal) {
            break;
        }
        ensure!(started.elapsed() < Duration::from_secs(10), "{literal} never stored: {expression}");
        std::thread::sleep(Duration::from_millis(100));
    }
    for (i, who) in [user, near].into_iter().enumerate() {
        must(w.plane.kubectl(
            &w.plane.admin,
            &[
                "create",
                "rolebinding",
                &format!("e2e-cel-{i}"),
                "--clusterrole=edit",
                &format!("--user={who}"),
                "-n",
                CEL_NS,
            ],
        ))?;
    }
    rejects(
        w.plane.kubectl(&w.plane.admin, &["--as", user, "delete", "configmap", "a", "-n", CEL_NS]),
        "the named user's delete",
        "e2e-cel-user",
    )?;
    accepts(
        w.plane.kubectl(&w.plane.admin, &["--as", near, "delete", "configmap", "a", "-n", CEL_NS]),
        "a delete by a user whose name only starts like it",
    )?;

    // 2. Strings no schema would admit, in a configuration of their own: the API server compiles
    // the literals, and a webhook that nothing answers (so a match fails closed) selects exactly
    // the users listed.
    let literals: Vec<String> = NASTY.iter().map(|s| cel_string(s)).collect();
    let probe = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "e2e-cel-literals"},
        "webhooks": [{
            "name": "literals.e2e.agentguard.io",
            "admissionReviewVersions": ["v1"],
            "clientConfig": {"url": "https://127.0.0.1:9/nothing-listens-here"},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "timeoutSeconds": 2,
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": CEL_NS}},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["DELETE"], "resources": ["configmaps"]}],
            "matchConditions": [{"name": "literals", "expression": format!("request.userInfo.username in [{}]", literals.join(", "))}]
        }]
    });
    let created = w.plane.kubectl_stdin(&w.plane.admin, &["create", "-f", "-"], Some(&probe.to_string()));
    accepts(created, "a configuration with every nasty literal")?;
    let stored = must(w.plane.kubectl(
        &w.plane.admin,
        &[
            "get",
            "validatingwebhookconfiguration",
            "e2e-cel-literals",
            "-o",
            "jsonpath={.webhooks[0].matchConditions[0].expression}",
        ],
    ))?;
    for literal in &literals {
        ensure!(stored.contains(literal.as_str()), "the API server stored {stored:?} without {literal}");
    }
    // The printable ones can be impersonated (HTTP headers carry no control characters).
    let result = (|| -> Result<()> {
        let printable =
            ["o'brien", "back\\slash\\", "double\"quote", "x' || true || 'y", "żółw 🐢 ünïcödé", "\\u0041"];
        for (i, who) in printable.into_iter().enumerate() {
            must(w.plane.kubectl(
                &w.plane.admin,
                &[
                    "create",
                    "rolebinding",
                    &format!("e2e-lit-{i}"),
                    "--clusterrole=edit",
                    &format!("--user={who}"),
                    "-n",
                    CEL_NS,
                ],
            ))?;
            rejects(
                w.plane.kubectl(
                    &w.plane.admin,
                    &["--as", who, "delete", "configmap", "b", "-n", CEL_NS, "--dry-run=server"],
                ),
                &format!("a delete by {who:?}, listed"),
                "literals.e2e.agentguard.io",
            )?;
            let other = format!("{who} ");
            must(w.plane.kubectl(
                &w.plane.admin,
                &[
                    "create",
                    "rolebinding",
                    &format!("e2e-lit-{i}-x"),
                    "--clusterrole=edit",
                    &format!("--user={other}"),
                    "-n",
                    CEL_NS,
                ],
            ))?;
            accepts(
                w.plane.kubectl(
                    &w.plane.admin,
                    &["--as", &other, "delete", "configmap", "b", "-n", CEL_NS, "--dry-run=server"],
                ),
                &format!("a delete by {other:?}, not listed"),
            )?;
        }
        Ok(())
    })();
    must(w.plane.kubectl(&w.plane.admin, &["delete", "validatingwebhookconfiguration", "e2e-cel-literals"]))?;
    must(w.plane.kubectl(&w.plane.admin, &["delete", "clusteragentpolicy", "e2e-cel-user"]))?;
    result
}
