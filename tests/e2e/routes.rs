//! Routes around the brakes: each scenario tries one class of route to destruction as an agent,
//! with kubectl and a real ServiceAccount token, and checks the refusal, its reason, and that the
//! object is unchanged or still there — waiting for the real garbage collector where the route
//! is a cascade. Policies a scenario needs are its own (`e2e-routes-*`, narrowed to its
//! namespaces or names) and are deleted when it ends, however it ends.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::scenarios::namespace;
use crate::world::{World, accepts, must, rejects};

/// The reason of the Warning Event agentguard leaves when it restores its tampered-with webhook
/// configuration.
const TAMPER_REASON: &str = "WebhookConfigurationRestored";

/// How long a cascade is given to happen (the garbage collector acts within seconds).
const GC_WAIT: Duration = Duration::from_secs(60);

/// Objects a scenario made outside its own namespaces (policies, CRDs, …): deleted by the admin
/// when the scenario ends, however it ends.
struct Leftovers<'w> {
    w: &'w World,
    /// `kubectl delete` arguments, one object each.
    objects: Vec<Vec<String>>,
}

impl<'w> Leftovers<'w> {
    fn new(w: &'w World) -> Self {
        Self { w, objects: Vec::new() }
    }

    /// Creates or updates `object` as the admin; it is deleted when the scenario ends.
    fn apply(&mut self, object: &Value) -> Result<()> {
        let kind = object["kind"].as_str().context("an object without a kind")?;
        let name = object["metadata"]["name"].as_str().context("an object without a name")?;
        let mut delete = vec![kind.to_owned(), name.to_owned()];
        if let Some(ns) = object["metadata"]["namespace"].as_str() {
            delete.extend(["-n".to_owned(), ns.to_owned()]);
        }
        self.objects.push(delete);
        apply(self.w, object)
    }

    /// Applies a policy and waits until agentguard reports it Ready (so it is in force).
    fn policy(&mut self, policy: Value) -> Result<()> {
        self.apply(&policy)?;
        ready(self.w, &policy)
    }

    /// A CustomResourceDefinition of a namespaced `kind` in group `e2e.example.com`, established.
    fn crd(&mut self, plural: &str, kind: &str) -> Result<()> {
        let name = format!("{plural}.e2e.example.com");
        self.apply(&json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": name},
            "spec": {
                "group": "e2e.example.com",
                "scope": "Namespaced",
                "names": {"plural": plural, "singular": kind.to_lowercase(), "kind": kind},
                "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema":
                    {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]
            }
        }))?;
        admin(self.w, &["wait", "--for=condition=established", "--timeout=30s", &format!("crd/{name}")])
            .map(drop)
    }
}

impl Drop for Leftovers<'_> {
    fn drop(&mut self) {
        for object in self.objects.iter().rev() {
            let mut args: Vec<&str> = vec!["delete"];
            args.extend(object.iter().map(String::as_str));
            args.extend(["--ignore-not-found", "--wait=false"]);
            let _ = self.w.plane.kubectl(&self.w.plane.admin, &args);
        }
    }
}

/// Waits until agentguard reports `policy` Ready (so it is in force).
fn ready(w: &World, policy: &Value) -> Result<()> {
    let target = format!(
        "{}/{}",
        policy["kind"].as_str().unwrap_or_default().to_lowercase(),
        policy["metadata"]["name"].as_str().unwrap_or_default()
    );
    let mut args = vec!["wait", "--for=condition=Ready", "--timeout=30s", &target];
    if let Some(ns) = policy["metadata"]["namespace"].as_str() {
        args.extend(["-n", ns]);
    }
    admin(w, &args).map(drop)
}

/// A ClusterAgentPolicy that holds what its `rules` match for an approver in group `sre`
/// (`action` RequireApproval) or refuses it outright (`Deny`).
fn cluster_policy(name: &str, action: &str, rules: Value) -> Value {
    let mut spec = json!({"action": action, "rules": rules});
    if action == "RequireApproval" {
        spec["approval"] = json!({"approvers": {"groups": ["sre"]}});
    }
    json!({
        "apiVersion": "agentguard.io/v1alpha1",
        "kind": "ClusterAgentPolicy",
        "metadata": {"name": name},
        "spec": spec
    })
}

/// A rule guarding `operations` of `group`/`resource`; `extra` adds fields (names, selectors …).
fn rule(name: &str, operations: &[&str], group: &str, resource: &str, extra: Value) -> Value {
    let mut rule = json!({
        "name": name,
        "operations": operations,
        "resources": [{"apiGroups": [group], "resources": [resource]}],
    });
    if let (Some(rule), Some(extra)) = (rule.as_object_mut(), extra.as_object()) {
        rule.extend(extra.clone());
    }
    rule
}

fn admin(w: &World, args: &[&str]) -> Result<String> {
    must(w.plane.kubectl(&w.plane.admin, args))
}

fn apply(w: &World, object: &Value) -> Result<()> {
    must(w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-f", "-"], Some(&object.to_string()))).map(drop)
}

/// The object `kubectl get ARGS` names, as the admin sees it.
fn object(w: &World, args: &[&str]) -> Result<Value> {
    let args = [&["get"][..], args, &["-o", "json"]].concat();
    let out = w.plane.kubectl(&w.plane.admin, &args);
    ensure!(out.status.success(), "kubectl get {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Whether `kubectl get ARGS` finds the object.
fn exists(w: &World, args: &[&str]) -> bool {
    let mut get = vec!["get"];
    get.extend_from_slice(args);
    w.plane.kubectl(&w.plane.admin, &get).status.success()
}

/// Polls `done` every 200 ms until it holds; how long that took, or an error after `limit`.
fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if done()? {
            return Ok(started.elapsed());
        }
        ensure!(started.elapsed() < limit, "{what}: not after {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The request was refused by `policy`'s rule `rule` (a ClusterAgentPolicy); returns stderr.
/// The rule's name may be followed, inside the quotes, by what the request was judged as.
fn refused_by(out: Output, what: &str, policy: &str, rule: &str) -> Result<String> {
    let stderr = rejects(out, what, &format!("ClusterAgentPolicy \"{policy}\""))?;
    ensure!(
        [format!("rule \"{rule}\""), format!("rule \"{rule} (")].iter().any(|n| stderr.contains(n)),
        "{what} was refused, but not under rule {rule:?}: {stderr}"
    );
    Ok(stderr)
}

fn kubectl(w: &World, who: &Path, args: &[&str]) -> Output {
    w.plane.kubectl(who, args)
}

/// A ConfigMap made by the admin, owned by `owner` (name, uid) if given; returns its uid.
fn configmap(w: &World, ns: &str, name: &str, owner: Option<(&str, &str)>) -> Result<String> {
    let mut cm =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": ns}});
    if let Some((owner, uid)) = owner {
        cm["metadata"]["ownerReferences"] =
            json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": owner, "uid": uid}]);
    }
    create(w, &cm)
}

/// Creates `object` as the admin; returns its uid.
fn create(w: &World, object: &Value) -> Result<String> {
    let uid = must(w.plane.kubectl_stdin(
        &w.plane.admin,
        &["create", "-f", "-", "-o", "jsonpath={.metadata.uid}"],
        Some(&object.to_string()),
    ))?;
    Ok(uid.trim().to_owned())
}

/// Waits for the `default` ServiceAccount the controller-manager makes in `ns`: Pods need it.
fn default_service_account(w: &World, ns: &str) -> Result<()> {
    wait_for("the namespace's default ServiceAccount", Duration::from_secs(30), || {
        Ok(exists(w, &["serviceaccount", "default", "-n", ns]))
    })
    .map(drop)
}

/// A Pod (Pending for ever: no scheduler or kubelet runs).
fn pod(w: &World, ns: &str, name: &str) -> Result<()> {
    default_service_account(w, ns)?;
    create(
        w,
        &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
            "spec": {"containers": [{"name": "db", "image": "postgres:17"}]}}),
    )
    .map(drop)
}

/// The routes of one class, each tried even when one before it is open, so that one run reports
/// every open route.
#[derive(Default)]
struct Routes {
    tried: usize,
    open: Vec<String>,
}

impl Routes {
    fn check(&mut self, route: &str, attempt: impl FnOnce() -> Result<()>) {
        self.tried += 1;
        if let Err(e) = attempt() {
            self.open.push(format!("{route}: {e:#}"));
        }
    }

    fn done(self) -> Result<()> {
        let Self { tried, open } = self;
        ensure!(open.is_empty(), "{} of {tried} routes not closed:\n  {}", open.len(), open.join("\n  "));
        Ok(())
    }
}

/// Writes through `/status` and `/finalize` store metadata: unmarking an agent namespace (through
/// either), relabelling a StatefulSet out of an objectSelector, adding an owner to a guarded PVC
/// and relabelling a Namespace out of a namespaceSelector are each refused (the agent:
/// cluster-admin, which any `*/status` right would do). (`deployments/status` is not among them:
/// the API server keeps a Deployment's labels on a status write.)
pub fn subresources_carry_metadata(w: &World) -> Result<()> {
    let mut left = Leftovers::new(w);
    let marked = namespace(w, "routes-status-agents")?;
    admin(w, &["label", "namespace", &marked, "agentguard.io/agent-namespace=true"])?;
    let finalized = namespace(w, "routes-finalize-agents")?;
    admin(w, &["label", "namespace", &finalized, "agentguard.io/agent-namespace=true"])?;
    let selected = namespace(w, "routes-status-selected")?;
    admin(w, &["label", "namespace", &selected, "e2e-routes-status=guarded"])?;
    let ns = namespace(w, "routes-status")?;
    left.policy(cluster_policy(
        "e2e-routes-status",
        "Deny",
        json!([
            rule(
                "tier-db",
                &["DELETE"],
                "apps",
                "statefulsets",
                json!({"namespaces": [ns], "objectSelector": {"matchLabels": {"e2e-routes": "guarded"}}})
            ),
            rule("claims", &["DELETE"], "", "persistentvolumeclaims", json!({"namespaces": [ns]})),
            rule(
                "selected-config",
                &["DELETE"],
                "",
                "configmaps",
                json!({"namespaceSelector": {"matchLabels": {"e2e-routes-status": "guarded"}}})
            ),
        ]),
    ))?;
    create(
        w,
        &json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "db", "namespace": ns, "labels": {"e2e-routes": "guarded"}},
            "spec": {"replicas": 1, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
                "template": {"metadata": {"labels": {"app": "db"}},
                    "spec": {"containers": [{"name": "db", "image": "postgres:17"}]}}}}),
    )?;
    create(
        w,
        &json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data", "namespace": ns},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}),
    )?;
    let owner = configmap(w, &ns, "owner", None)?;
    let status_patch = |kind: &str, name: &str, ns: Option<&str>, patch: &str| {
        let mut args = vec!["patch", kind, name, "--subresource=status", "--type=merge", "-p", patch];
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        kubectl(w, &w.agent, &args)
    };

    let mut routes = Routes::default();
    routes.check("namespaces/finalize unmarking an agent namespace", || {
        let mut unmarked = object(w, &["namespace", &finalized])?;
        if let Some(labels) = unmarked["metadata"]["labels"].as_object_mut() {
            labels.remove("agentguard.io/agent-namespace");
        }
        rejects(
            w.plane.kubectl_stdin(
                &w.agent,
                &["replace", "--raw", &format!("/api/v1/namespaces/{finalized}/finalize"), "-f", "-"],
                Some(&unmarked.to_string()),
            ),
            "unmarking an agent namespace through namespaces/finalize",
            "built-in rule \"agent-namespace-label\"",
        )?;
        let labels = &object(w, &["namespace", &finalized])?["metadata"]["labels"];
        ensure!(labels["agentguard.io/agent-namespace"] == "true", "the label is gone: {labels}");
        Ok(())
    });
    routes.check("namespaces/status unmarking an agent namespace", || {
        let unmark = r#"{"metadata":{"labels":{"agentguard.io/agent-namespace":null}}}"#;
        rejects(
            status_patch("namespace", &marked, None, unmark),
            "unmarking an agent namespace through namespaces/status",
            "built-in rule \"agent-namespace-label\"",
        )?;
        let labels = &object(w, &["namespace", &marked])?["metadata"]["labels"];
        ensure!(labels["agentguard.io/agent-namespace"] == "true", "the label is gone: {labels}");
        Ok(())
    });
    routes.check("statefulsets/status relabelling out of an objectSelector", || {
        let denial = refused_by(
            status_patch("statefulset", "db", Some(&ns), r#"{"metadata":{"labels":{"e2e-routes":null}}}"#),
            "relabelling a StatefulSet out of an objectSelector through statefulsets/status",
            "e2e-routes-status",
            "tier-db",
        )?;
        ensure!(denial.contains("objectSelector"), "the refusal does not name the objectSelector: {denial}");
        let labels = &object(w, &["statefulset", "db", "-n", &ns])?["metadata"]["labels"];
        ensure!(labels["e2e-routes"] == "guarded", "the StatefulSet was relabelled: {labels}");
        Ok(())
    });
    routes.check("persistentvolumeclaims/status adding an owner", || {
        let own = json!({"metadata": {"ownerReferences":
            [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner}]}});
        refused_by(
            status_patch("pvc", "data", Some(&ns), &own.to_string()),
            "adding an owner to a guarded PVC through persistentvolumeclaims/status",
            "e2e-routes-status",
            "claims",
        )?;
        let meta = &object(w, &["pvc", "data", "-n", &ns])?["metadata"];
        ensure!(meta["ownerReferences"].is_null(), "the PVC got an owner: {meta}");
        Ok(())
    });
    routes.check("namespaces/status relabelling out of a namespaceSelector", || {
        let denial = refused_by(
            status_patch(
                "namespace",
                &selected,
                None,
                r#"{"metadata":{"labels":{"e2e-routes-status":null}}}"#,
            ),
            "relabelling a Namespace out of a namespaceSelector through namespaces/status",
            "e2e-routes-status",
            "selected-config",
        )?;
        ensure!(
            denial.contains("namespaceSelector"),
            "the refusal does not name the namespaceSelector: {denial}"
        );
        let labels = &object(w, &["namespace", &selected])?["metadata"]["labels"];
        ensure!(labels["e2e-routes-status"] == "guarded", "the Namespace was relabelled: {labels}");
        Ok(())
    });
    routes.done()
}

/// agentguard's own namespace, kube-system and a custom resource whose plural is `events` are
/// guarded for agents like any other place.
pub fn no_unguarded_corners(w: &World) -> Result<()> {
    let mut left = Leftovers::new(w);
    left.apply(&json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "e2e-routes-probe", "namespace": "agentguard-system"}, "data": {"k": "v"}}))?;
    left.crd("events", "Event")?;
    let ns = namespace(w, "routes-events")?;
    left.policy(cluster_policy(
        "e2e-routes-corners",
        "RequireApproval",
        json!([
            rule(
                "kube-system-config",
                &["DELETE"],
                "",
                "configmaps",
                json!({"namespaces": ["kube-system"], "names": ["e2e-routes-*"]})
            ),
            rule("custom-events", &["DELETE"], "e2e.example.com", "events", json!({"namespaces": [ns]})),
        ]),
    ))?;
    left.apply(&json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "e2e-routes-guarded", "namespace": "kube-system"}}))?;
    create(
        w,
        &json!({"apiVersion": "e2e.example.com/v1", "kind": "Event",
            "metadata": {"name": "launch", "namespace": ns}}),
    )?;

    let mut routes = Routes::default();
    routes.check("agentguard's namespace", || {
        let probe = ["configmap", "e2e-routes-probe", "-n", "agentguard-system"];
        rejects(
            kubectl(w, &w.agent, &[&["patch"][..], &probe, &["-p", r#"{"data":{"k":"w"}}"#]].concat()),
            "patching a ConfigMap in agentguard's namespace",
            "built-in rule \"agentguard-self\"",
        )?;
        rejects(
            kubectl(w, &w.agent, &[&["delete"][..], &probe].concat()),
            "deleting a ConfigMap in agentguard's namespace",
            "built-in rule \"agentguard-self\"",
        )?;
        let data = object(w, &probe)?["data"].clone();
        ensure!(data["k"] == "v", "the ConfigMap in agentguard's namespace changed: {data}");
        Ok(())
    });
    routes.check("kube-system", || {
        refused_by(
            kubectl(w, &w.agent, &["delete", "configmap", "e2e-routes-guarded", "-n", "kube-system"]),
            "deleting a guarded ConfigMap in kube-system",
            "e2e-routes-corners",
            "kube-system-config",
        )?;
        ensure!(exists(w, &["configmap", "e2e-routes-guarded", "-n", "kube-system"]), "it is gone");
        Ok(())
    });
    routes.check("a custom resource named events", || {
        refused_by(
            kubectl(w, &w.agent, &["delete", "events.e2e.example.com", "launch", "-n", &ns]),
            "deleting a guarded custom resource named `events`",
            "e2e-routes-corners",
            "custom-events",
        )?;
        ensure!(exists(w, &["events.e2e.example.com", "launch", "-n", &ns]), "the custom Event is gone");
        Ok(())
    });
    routes.done()
}

/// Changes to the agents webhook's objectSelector, failurePolicy and timeoutSeconds (which
/// Kubernetes never sends to a webhook) are undone by agentguard within seconds, with a Warning.
pub fn tampering_is_restored(w: &World) -> Result<()> {
    let vwc = object(w, &["validatingwebhookconfiguration", "agentguard"])?;
    let index = vwc["webhooks"]
        .as_array()
        .and_then(|hooks| hooks.iter().position(|h| h["name"] == "agents.agentguard.io"))
        .context("no agents.agentguard.io webhook")?;
    let original = vwc["webhooks"][index].clone();
    let timeout = if original["timeoutSeconds"] == 29 { 28 } else { 29 };
    let patch = |ops: Value| {
        admin(
            w,
            &["patch", "validatingwebhookconfiguration", "agentguard", "--type=json", "-p", &ops.to_string()],
        )
    };
    let mut routes = Routes::default();
    let mut took = Vec::new();
    for (field, value) in [
        ("objectSelector", json!({"matchLabels": {"e2e-routes": "never"}})),
        ("failurePolicy", json!("Ignore")),
        ("timeoutSeconds", json!(timeout)),
    ] {
        let path = format!("/webhooks/{index}/{field}");
        routes.check(&format!("a changed {field}"), || {
            patch(json!([{"op": "add", "path": path, "value": value}]))?;
            let restored = wait_for(&format!("{field} restored"), Duration::from_secs(5), || {
                let live = object(w, &["validatingwebhookconfiguration", "agentguard"])?;
                Ok(live["webhooks"][index][field] == original[field])
            });
            match restored {
                Ok(after) => {
                    took.push(format!("{field} in {:.1}s", after.as_secs_f64()));
                    ensure!(after < Duration::from_secs(3), "restored only after {after:?}");
                    Ok(())
                }
                Err(e) => {
                    // Put it back, so that the scenarios after this one still run guarded.
                    patch(match &original[field] {
                        Value::Null => json!([{"op": "remove", "path": path}]),
                        value => json!([{"op": "add", "path": path, "value": value}]),
                    })?;
                    bail!("agentguard left it in place: {e:#}")
                }
            }
        });
    }
    routes.check("the alarm", || {
        wait_for("a Warning Event about the tampering", Duration::from_secs(10), || {
            let events = admin(
                w,
                &[
                    "get",
                    "events.events.k8s.io",
                    "-A",
                    "-o",
                    "jsonpath={range .items[*]}{.type}/{.reason}{\"\\n\"}{end}",
                ],
            )?;
            Ok(events.lines().any(|l| l.starts_with("Warning/") && l.contains(TAMPER_REASON)))
        })
        .map(drop)
    });
    if !took.is_empty() {
        println!("  restored: {}", took.join(", "));
    }
    routes.done()
}

/// `pods/eviction` of a guarded Pod is judged as the Pod's DELETE (the agent: `edit`).
pub fn eviction_is_a_delete(w: &World) -> Result<()> {
    let mut left = Leftovers::new(w);
    let ns = namespace(w, "routes-eviction")?;
    left.policy(cluster_policy(
        "e2e-routes-eviction",
        "RequireApproval",
        json!([rule("pods", &["DELETE"], "", "pods", json!({"namespaces": [ns]}))]),
    ))?;
    pod(w, &ns, "worker")?;
    let eviction = json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "worker", "namespace": ns}});
    refused_by(
        w.plane.kubectl_stdin(
            &w.editor,
            &["create", "--raw", &format!("/api/v1/namespaces/{ns}/pods/worker/eviction"), "-f", "-"],
            Some(&eviction.to_string()),
        ),
        "evicting a guarded Pod",
        "e2e-routes-eviction",
        "pods",
    )?;
    ensure!(exists(w, &["pod", "worker", "-n", &ns]), "the evicted Pod is gone");
    Ok(())
}

/// Removing the finalizers of an object being deleted completes its DELETE: judged as that
/// DELETE (the agent: `edit`).
pub fn finalizers_complete_a_delete(w: &World) -> Result<()> {
    let mut left = Leftovers::new(w);
    let ns = namespace(w, "routes-finalizers")?;
    left.policy(cluster_policy(
        "e2e-routes-finalizers",
        "RequireApproval",
        json!([rule(
            "held-config",
            &["DELETE"],
            "",
            "configmaps",
            json!({"namespaces": [ns], "names": ["held"]})
        )]),
    ))?;
    create(
        w,
        &json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "held", "namespace": ns, "finalizers": ["e2e.example.com/hold"]}}),
    )?;
    admin(w, &["delete", "configmap", "held", "-n", &ns, "--wait=false"])?;
    ensure!(
        !object(w, &["configmap", "held", "-n", &ns])?["metadata"]["deletionTimestamp"].is_null(),
        "the admin's delete did not mark the ConfigMap as being deleted"
    );
    let unhold = r#"[{"op":"remove","path":"/metadata/finalizers"}]"#;
    let result = refused_by(
        kubectl(w, &w.editor, &["patch", "configmap", "held", "-n", &ns, "--type=json", "-p", unhold]),
        "removing the finalizers of a guarded ConfigMap being deleted",
        "e2e-routes-finalizers",
        "held-config",
    )
    .and_then(|_| {
        let meta = object(w, &["configmap", "held", "-n", &ns])?["metadata"].clone();
        ensure!(meta["finalizers"] == json!(["e2e.example.com/hold"]), "the finalizers changed: {meta}");
        Ok(())
    });
    // Let the admin's delete finish either way.
    let _ =
        kubectl(w, &w.plane.admin, &["patch", "configmap", "held", "-n", &ns, "--type=json", "-p", unhold]);
    result
}

/// Deleting an unguarded owner whose dependents (directly, or two levels down, or the Pods a
/// ReplicaSet made) a DELETE rule guards is refused, and the real garbage collector — seen collecting an unguarded dependent
/// in the same namespace first — leaves them; with `--cascade=orphan` the owner goes and the
/// dependent stays (the agent: `edit`).
pub fn owner_cascades_are_judged(w: &World) -> Result<()> {
    let mut left = Leftovers::new(w);
    let ns = namespace(w, "routes-cascade")?;
    left.policy(cluster_policy(
        "e2e-routes-cascade",
        "RequireApproval",
        json!([
            rule(
                "dependents",
                &["DELETE"],
                "",
                "configmaps",
                json!({"namespaces": [ns], "names": ["dependent*"]})
            ),
            rule("pods", &["DELETE"], "", "pods", json!({"namespaces": [ns]})),
        ]),
    ))?;
    // Pods the real ReplicaSet controller makes (Pending: no scheduler runs).
    default_service_account(w, &ns)?;
    create(
        w,
        &json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "api", "namespace": ns},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "api"}},
                "template": {"metadata": {"labels": {"app": "api"}},
                    "spec": {"containers": [{"name": "api", "image": "nginx:1.27"}]}}}}),
    )?;
    let pods = || -> Result<usize> {
        Ok(admin(w, &["get", "pods", "-n", &ns, "-l", "app=api", "-o", "name"])?.lines().count())
    };
    wait_for("the ReplicaSet controller making 2 Pods", GC_WAIT, || Ok(pods()? == 2))?;
    let owner = configmap(w, &ns, "owner", None)?;
    configmap(w, &ns, "dependent", Some(("owner", &owner)))?;
    let root = configmap(w, &ns, "root", None)?;
    let middle = configmap(w, &ns, "middle", Some(("root", &root)))?;
    configmap(w, &ns, "dependent-deep", Some(("middle", &middle)))?;
    let orphaner = configmap(w, &ns, "orphaner", None)?;
    configmap(w, &ns, "dependent-orphan", Some(("orphaner", &orphaner)))?;
    let control = configmap(w, &ns, "control-owner", None)?;
    configmap(w, &ns, "control-dependent", Some(("control-owner", &control)))?;

    // The garbage collector is at work here: the admin's delete of the control owner takes its
    // dependent with it. Refused cascades are then given twice that time (at least 3 s).
    admin(w, &["delete", "configmap", "control-owner", "-n", &ns])?;
    let collected = wait_for("the garbage collector collecting an unguarded dependent", GC_WAIT, || {
        Ok(!exists(w, &["configmap", "control-dependent", "-n", &ns]))
    })?;
    println!("  the garbage collector collected the control dependent in {:.1}s", collected.as_secs_f64());
    let grace = (collected * 2).max(Duration::from_secs(3));
    let survives = |name: &str| -> Result<()> {
        let gone = wait_for(name, grace, || Ok(!exists(w, &["configmap", name, "-n", &ns])));
        ensure!(gone.is_err(), "the garbage collector deleted {name}");
        Ok(())
    };

    // A refused cascade leaves the dependent in place; an admitted one is reported with what the
    // garbage collector then did.
    let cascade = |owner: &str, dependent: &str, what: &str| -> Result<()> {
        let refused = refused_by(
            kubectl(w, &w.editor, &["delete", "configmap", owner, "-n", &ns]),
            what,
            "e2e-routes-cascade",
            "dependents",
        );
        match (refused, survives(dependent)) {
            (Ok(_), survived) => survived,
            (Err(e), Ok(())) => Err(e),
            (Err(e), Err(gone)) => Err(e.context(gone)),
        }
    };

    let mut routes = Routes::default();
    routes.check("deleting the owner of a guarded dependent", || {
        cascade("owner", "dependent", "deleting the owner of a guarded dependent")
    });
    routes.check("deleting the owner of the owner of a guarded dependent", || {
        cascade("root", "dependent-deep", "deleting the owner of the owner of a guarded dependent")
    });
    routes.check("deleting a ReplicaSet whose Pods are guarded", || {
        let refused = refused_by(
            kubectl(w, &w.editor, &["delete", "replicaset", "api", "-n", &ns]),
            "deleting a ReplicaSet whose Pods are guarded",
            "e2e-routes-cascade",
            "pods",
        );
        std::thread::sleep(grace);
        let remaining = pods()?;
        match refused {
            Ok(_) if remaining == 2 => Ok(()),
            Ok(_) => bail!("the refused delete still lost Pods: {remaining} of 2 left"),
            Err(e) => Err(e.context(format!("{remaining} of 2 Pods left"))),
        }
    });
    routes.check("deleting the owner with --cascade=orphan is admitted", || {
        accepts(
            kubectl(w, &w.editor, &["delete", "configmap", "orphaner", "-n", &ns, "--cascade=orphan"]),
            "deleting the owner, orphaning its dependents",
        )?;
        wait_for("the orphaning delete finished", GC_WAIT, || {
            Ok(!exists(w, &["configmap", "orphaner", "-n", &ns]))
        })?;
        survives("dependent-orphan")?;
        let meta = object(w, &["configmap", "dependent-orphan", "-n", &ns])?["metadata"].clone();
        ensure!(meta["ownerReferences"].is_null(), "the orphaned dependent still has owners: {meta}");
        Ok(())
    });
    routes.done()
}

/// Deleting a Namespace that holds a guarded object, or a CRD whose custom resources are
/// guarded, is refused (the agent: cluster-admin). The CRD is made after the Namespace's
/// refusal, whose judging looked the API's types up: a type served since then counts too.
pub fn namespace_and_crd_cascades_are_judged(w: &World) -> Result<()> {
    let mut left = Leftovers::new(w);
    // Named outside `e2e-*`, which the world's e2e-namespaces policy guards as a whole.
    let doomed = "routes-doomed";
    admin(w, &["create", "namespace", doomed])?;
    let ns = namespace(w, "routes-widgets")?;
    left.policy(cluster_policy(
        "e2e-routes-contents",
        "RequireApproval",
        json!([
            rule(
                "precious-config",
                &["DELETE"],
                "",
                "configmaps",
                json!({"namespaces": [doomed], "names": ["precious"]})
            ),
            rule(
                "precious-widgets",
                &["DELETE"],
                "e2e.example.com",
                "widgets",
                json!({"names": ["precious"]})
            ),
        ]),
    ))?;
    configmap(w, doomed, "precious", None)?;

    let mut routes = Routes::default();
    routes.check("deleting a Namespace holding a guarded object", || {
        refused_by(
            kubectl(w, &w.agent, &["delete", "namespace", doomed, "--wait=false"]),
            "deleting a Namespace holding a guarded ConfigMap",
            "e2e-routes-contents",
            "precious-config",
        )?;
        let phase = object(w, &["namespace", doomed])?["status"]["phase"].clone();
        ensure!(phase == "Active", "the namespace is {phase}");
        ensure!(exists(w, &["configmap", "precious", "-n", doomed]), "the guarded ConfigMap is gone");
        Ok(())
    });
    routes.check("deleting a CRD whose custom resources are guarded", || {
        left.crd("widgets", "Widget")?;
        create(
            w,
            &json!({"apiVersion": "e2e.example.com/v1", "kind": "Widget",
                "metadata": {"name": "precious", "namespace": ns}}),
        )?;
        refused_by(
            kubectl(w, &w.agent, &["delete", "crd", "widgets.e2e.example.com", "--wait=false"]),
            "deleting a CRD whose custom resources are guarded",
            "e2e-routes-contents",
            "precious-widgets",
        )?;
        let crd = object(w, &["crd", "widgets.e2e.example.com"])?;
        ensure!(crd["metadata"]["deletionTimestamp"].is_null(), "the CRD is being deleted");
        ensure!(exists(w, &["widgets.e2e.example.com", "precious", "-n", &ns]), "the guarded Widget is gone");
        Ok(())
    });
    routes.done()
}

/// Changes that arm a controller to delete later are judged as the deletion they arm: PVC
/// retention, a PV's reclaim policy, a rewritten ownerReference, the cloud controllers'
/// deletion policies. Changes beside them that arm nothing are admitted.
pub fn arming_a_deletion_is_judged(w: &World) -> Result<()> {
    let mut left = Leftovers::new(w);
    let ns = namespace(w, "routes-arming")?;
    left.policy(cluster_policy(
        "e2e-routes-arming",
        "RequireApproval",
        json!([
            rule("claims", &["DELETE"], "", "persistentvolumeclaims", json!({"namespaces": [ns]})),
            rule("volumes", &["DELETE"], "", "persistentvolumes", json!({"names": ["e2e-routes-*"]})),
            rule("config", &["DELETE"], "", "configmaps", json!({"namespaces": [ns]})),
        ]),
    ))?;
    create(
        w,
        &json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db", "namespace": ns},
            "spec": {"replicas": 1, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
                "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
                "template": {"metadata": {"labels": {"app": "db"}},
                    "spec": {"containers": [{"name": "db", "image": "postgres:17"}]}},
                "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec":
                    {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]}}),
    )?;
    left.apply(
        &json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "e2e-routes-pv"},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
            "storageClassName": "e2e-routes-none", "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": "/tmp/e2e-routes"}}}),
    )?;
    let parent = configmap(w, &ns, "parent", None)?;
    let other = configmap(w, &ns, "other", None)?;
    configmap(w, &ns, "child", Some(("parent", &parent)))?;
    create(
        w,
        &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bucket", "namespace": ns,
            "annotations": {"cnrm.cloud.google.com/deletion-policy": "abandon"}}}),
    )?;
    create(
        w,
        &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "table", "namespace": ns,
            "annotations": {"services.k8s.aws/deletion-policy": "retain"}}}),
    )?;

    let mut routes = Routes::default();
    routes.check("changes that arm nothing are admitted", || {
        accepts(
            kubectl(w, &w.editor, &["label", "statefulset", "db", "-n", &ns, "e2e-routes=checked"]),
            "a StatefulSet change that arms nothing",
        )?;
        accepts(
            kubectl(
                w,
                &w.editor,
                &["annotate", "configmap", "table", "-n", &ns, "e2e-routes/note=unrelated"],
            ),
            "an annotation that arms nothing",
        )
        .map(drop)
    });
    routes.check("StatefulSet PVC retention set to Delete", || {
        refused_by(
            kubectl(
                w,
                &w.editor,
                &[
                    "patch",
                    "statefulset",
                    "db",
                    "-n",
                    &ns,
                    "--type=merge",
                    "-p",
                    r#"{"spec":{"persistentVolumeClaimRetentionPolicy":{"whenDeleted":"Delete"}}}"#,
                ],
            ),
            "arming a StatefulSet to delete its guarded PVCs",
            "e2e-routes-arming",
            "claims",
        )?;
        let sts = object(w, &["statefulset", "db", "-n", &ns])?;
        let retention = &sts["spec"]["persistentVolumeClaimRetentionPolicy"];
        ensure!(retention["whenDeleted"] == "Retain", "the retention policy changed: {retention}");
        Ok(())
    });
    routes.check("PV reclaim policy set to Delete", || {
        refused_by(
            kubectl(
                w,
                &w.agent,
                &[
                    "patch",
                    "pv",
                    "e2e-routes-pv",
                    "--type=merge",
                    "-p",
                    r#"{"spec":{"persistentVolumeReclaimPolicy":"Delete"}}"#,
                ],
            ),
            "arming a guarded PV to be deleted with its claim",
            "e2e-routes-arming",
            "volumes",
        )?;
        let reclaim = object(w, &["pv", "e2e-routes-pv"])?["spec"]["persistentVolumeReclaimPolicy"].clone();
        ensure!(reclaim == "Retain", "the reclaim policy changed: {reclaim}");
        Ok(())
    });
    routes.check("an ownerReference rewritten to another owner", || {
        let rewrite = json!([
            {"op": "replace", "path": "/metadata/ownerReferences/0/name", "value": "other"},
            {"op": "replace", "path": "/metadata/ownerReferences/0/uid", "value": other},
        ]);
        refused_by(
            kubectl(
                w,
                &w.editor,
                &["patch", "configmap", "child", "-n", &ns, "--type=json", "-p", &rewrite.to_string()],
            ),
            "rewriting a guarded object's ownerReference",
            "e2e-routes-arming",
            "config",
        )?;
        let owners = object(w, &["configmap", "child", "-n", &ns])?["metadata"]["ownerReferences"].clone();
        ensure!(owners[0]["name"] == "parent", "the ownerReference changed: {owners}");
        Ok(())
    });
    routes.check("ACK deletion policy retain set to delete", || {
        refused_by(
            kubectl(
                w,
                &w.editor,
                &[
                    "annotate",
                    "configmap",
                    "table",
                    "-n",
                    &ns,
                    "services.k8s.aws/deletion-policy=delete",
                    "--overwrite",
                ],
            ),
            "setting ACK's deletion policy from retain to delete on a guarded object",
            "e2e-routes-arming",
            "config",
        )?;
        let table = object(w, &["configmap", "table", "-n", &ns])?["metadata"]["annotations"].clone();
        ensure!(
            table["services.k8s.aws/deletion-policy"] == "retain",
            "ACK's deletion policy changed: {table}"
        );
        Ok(())
    });
    routes.check("Config Connector abandon policy removed", || {
        refused_by(
            kubectl(
                w,
                &w.editor,
                &["annotate", "configmap", "bucket", "-n", &ns, "cnrm.cloud.google.com/deletion-policy-"],
            ),
            "removing Config Connector's abandon deletion policy from a guarded object",
            "e2e-routes-arming",
            "config",
        )?;
        let bucket = object(w, &["configmap", "bucket", "-n", &ns])?["metadata"]["annotations"].clone();
        ensure!(
            bucket["cnrm.cloud.google.com/deletion-policy"] == "abandon",
            "the abandon policy is gone: {bucket}"
        );
        Ok(())
    });
    routes.done()
}

/// A policy may guard CONNECT to `pods/exec`, `pods/attach` and `pods/portforward`: admission
/// runs before the API server dials the kubelet, so the agent's `kubectl exec` (and a raw attach
/// or port-forward request) is refused by agentguard (the agent: `edit`).
pub fn connect_can_be_guarded(w: &World) -> Result<()> {
    let mut left = Leftovers::new(w);
    let ns = namespace(w, "routes-exec")?;
    let mut data_plane = rule("data-plane", &["CONNECT"], "", "pods/exec", json!({"namespaces": [ns]}));
    data_plane["resources"] =
        json!([{"apiGroups": [""], "resources": ["pods/exec", "pods/attach", "pods/portforward"]}]);
    left.policy(cluster_policy("e2e-routes-exec", "RequireApproval", json!([data_plane])))?;
    pod(w, &ns, "db")?;
    let mut routes = Routes::default();
    routes.check("kubectl exec", || {
        refused_by(
            kubectl(w, &w.editor, &["exec", "db", "-n", &ns, "--", "rm", "-rf", "/var/lib/postgresql/data"]),
            "kubectl exec into a guarded Pod",
            "e2e-routes-exec",
            "data-plane",
        )
        .map(drop)
    });
    for (subresource, query) in [("attach", "stdin=true&stdout=true"), ("portforward", "ports=5432")] {
        routes.check(&format!("pods/{subresource}"), || {
            let path = format!("/api/v1/namespaces/{ns}/pods/db/{subresource}?{query}");
            refused_by(
                w.plane.kubectl_stdin(&w.editor, &["create", "--raw", &path, "-f", "-"], Some("{}")),
                &format!("a CONNECT to pods/{subresource} of a guarded Pod"),
                "e2e-routes-exec",
                "data-plane",
            )
            .map(drop)
        });
    }
    routes.done()
}

/// Policy subjects cannot be turned against the cluster: an AgentPolicy naming every
/// authenticated user or another namespace's ServiceAccount, and a ClusterAgentPolicy naming a
/// reserved user or group, are refused at apply time. Applied with a server-side dry run: should
/// one be admitted, it is not stored (it would make the admin an agent).
pub fn policy_subjects_are_confined(w: &World) -> Result<()> {
    let ns = namespace(w, "routes-subjects")?;
    let spec = |subjects: Value| {
        json!({"action": "Allow", "mode": "Audit", "subjects": subjects,
            "rules": [rule("any", &["DELETE"], "", "configmaps", json!({}))]})
    };
    let namespaced = |subjects: Value| {
        json!({"apiVersion": "agentguard.io/v1alpha1", "kind": "AgentPolicy",
            "metadata": {"name": "e2e-routes-subjects", "namespace": ns}, "spec": spec(subjects)})
    };
    let cluster = |subjects: Value| {
        json!({"apiVersion": "agentguard.io/v1alpha1", "kind": "ClusterAgentPolicy",
            "metadata": {"name": "e2e-routes-subjects"}, "spec": spec(subjects)})
    };
    let dry_run = |policy: &Value| {
        w.plane.kubectl_stdin(
            &w.plane.admin,
            &["apply", "--dry-run=server", "-f", "-"],
            Some(&policy.to_string()),
        )
    };
    let other = "system:serviceaccount:agents:x";
    let mut routes = Routes::default();
    for (what, policy, value) in [
        (
            "an AgentPolicy naming every authenticated user",
            namespaced(json!({"groups": ["system:authenticated"]})),
            "system:authenticated",
        ),
        (
            "an AgentPolicy naming another namespace's ServiceAccount",
            namespaced(json!({"usernames": [other]})),
            other,
        ),
        (
            "a ClusterAgentPolicy naming the user system:masters",
            cluster(json!({"usernames": ["system:masters"]})),
            "system:masters",
        ),
        (
            "a ClusterAgentPolicy naming system:anonymous",
            cluster(json!({"usernames": ["system:anonymous"]})),
            "system:anonymous",
        ),
        (
            "a ClusterAgentPolicy naming the group system:masters",
            cluster(json!({"groups": ["system:masters"]})),
            "system:masters",
        ),
        (
            "a ClusterAgentPolicy naming every authenticated user",
            cluster(json!({"groups": ["system:authenticated"]})),
            "system:authenticated",
        ),
    ] {
        routes.check(what, || {
            let out = dry_run(&policy);
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            ensure!(!out.status.success(), "admitted");
            ensure!(
                stderr.contains("subjects") || stderr.contains(value),
                "refused, but not for its subjects: {stderr}"
            );
            Ok(())
        });
    }
    routes.check("an AgentPolicy selecting ServiceAccounts of its own namespace is admitted", || {
        accepts(
            dry_run(&namespaced(json!({"serviceAccountSelector": {"matchLabels": {"team": "bots"}}}))),
            "an AgentPolicy selecting ServiceAccounts of its own namespace",
        )
        .map(drop)
    });
    routes.done()
}

/// A churn budget counted per agent namespace is not reset by acting as a fresh ServiceAccount
/// of that namespace: the third delete, by a third new ServiceAccount, is refused.
pub fn churn_counts_per_agent_namespace(w: &World) -> Result<()> {
    let mut left = Leftovers::new(w);
    let ns = namespace(w, "routes-churn")?;
    admin(w, &["label", "namespace", &ns, "agentguard.io/agent-namespace=true"])?;
    let group = format!("--group=system:serviceaccounts:{ns}");
    admin(w, &["create", "rolebinding", "edit-everyone", "-n", &ns, "--clusterrole=edit", &group])?;
    let mut policy = cluster_policy(
        "e2e-routes-churn",
        "Allow",
        json!([rule("churn", &["DELETE"], "", "configmaps", json!({"namespaces": [ns]}))]),
    );
    policy["spec"]["churnLimit"] = json!({"maxOperations": 2, "window": "10m", "scope": "perNamespace"});
    left.policy(policy)?;
    for i in 0..3 {
        configmap(w, &ns, &format!("c{i}"), None)?;
    }
    for i in 0..3 {
        let sa = format!("worker-{i}");
        admin(w, &["create", "serviceaccount", &sa, "-n", &ns])?;
        let kubeconfig = w.plane.service_account_kubeconfig(&ns, &sa)?;
        let delete = kubectl(w, &kubeconfig, &["delete", "configmap", &format!("c{i}"), "-n", &ns]);
        if i < 2 {
            accepts(delete, &format!("delete {} by a fresh ServiceAccount, within the budget", i + 1))?;
        } else {
            rejects(delete, "the third delete, by a third fresh ServiceAccount", "churn limit")?;
        }
    }
    ensure!(exists(w, &["configmap", "c2", "-n", &ns]), "c2 is gone");
    Ok(())
}

/// One semantics for subjects: a policy without `subjects` covers every agent, including a user
/// who is an agent only because another policy names it; a policy with `subjects` covers
/// exactly those.
pub fn subjects_mean_one_thing(w: &World) -> Result<()> {
    let mut left = Leftovers::new(w);
    let ns = namespace(w, "routes-subject-scope")?;
    let bot = "e2e-routes-bot";
    admin(
        w,
        &["create", "rolebinding", "bot-edit", "-n", &ns, "--clusterrole=edit", &format!("--user={bot}")],
    )?;
    let mut named = cluster_policy(
        "e2e-routes-bot-only",
        "RequireApproval",
        json!([rule("bot-secrets", &["DELETE"], "", "secrets", json!({"namespaces": [ns]}))]),
    );
    named["spec"]["subjects"] = json!({"usernames": [bot]});
    left.policy(named)?;
    left.policy(cluster_policy(
        "e2e-routes-everyone",
        "RequireApproval",
        json!([rule("all-config", &["DELETE"], "", "configmaps", json!({"namespaces": [ns]}))]),
    ))?;
    w.wait_for_registration(bot, Duration::from_secs(30))?;
    let kubeconfig = w.plane.user_kubeconfig(bot, &[])?;
    configmap(w, &ns, "settings", None)?;
    for secret in ["bots", "editors"] {
        admin(w, &["create", "secret", "generic", secret, "-n", &ns, "--from-literal=k=v"])?;
    }

    let mut routes = Routes::default();
    routes.check("a policy without subjects covers a user named only in another policy", || {
        refused_by(
            kubectl(w, &kubeconfig, &["delete", "configmap", "settings", "-n", &ns]),
            "a delete by a user who is an agent through another policy's subjects",
            "e2e-routes-everyone",
            "all-config",
        )
        .map(drop)
    });
    routes.check("a policy with subjects covers them", || {
        refused_by(
            kubectl(w, &kubeconfig, &["delete", "secret", "bots", "-n", &ns]),
            "a delete by a policy's subject",
            "e2e-routes-bot-only",
            "bot-secrets",
        )
        .map(drop)
    });
    routes.check("a policy with subjects covers exactly them", || {
        accepts(
            kubectl(w, &w.editor, &["delete", "secret", "editors", "-n", &ns]),
            "a delete by an agent the policy does not name",
        )
        .map(drop)
    });
    routes.done()
}

/// Usernames with quotes, a backslash or a newline either are refused at apply time or render
/// into a webhook configuration the API server accepts: the odd user is guarded, a user whose
/// name lacks only the odd characters is not, and an agent marked afterwards is still registered.
pub fn odd_usernames_render(w: &World) -> Result<()> {
    let mut left = Leftovers::new(w);
    let ns = namespace(w, "routes-odd-names")?;
    configmap(w, &ns, "settings", None)?;
    let mut routes = Routes::default();
    for (n, odd) in [r#"e2e-routes "odd" \bot"#, "e2e-routes-line\nbreak"].into_iter().enumerate() {
        routes.check(&format!("the username {odd:?}"), || {
            let mut policy = cluster_policy(
                &format!("e2e-routes-odd-{n}"),
                "RequireApproval",
                json!([rule("odd-config", &["DELETE"], "", "configmaps", json!({"namespaces": [ns]}))]),
            );
            policy["spec"]["subjects"] = json!({"usernames": [odd]});
            if let Err(e) = left.apply(&policy) {
                println!("  {odd:?} refused at apply time: {}", format!("{e:#}").trim());
                return Ok(());
            }
            ready(w, &policy)?;
            let binding = format!("odd-{n}");
            admin(
                w,
                &[
                    "create",
                    "rolebinding",
                    &binding,
                    "-n",
                    &ns,
                    "--clusterrole=edit",
                    &format!("--user={odd}"),
                ],
            )?;
            let kubeconfig = w.plane.user_kubeconfig(odd, &[])?;
            let probe = ["delete", "configmap", "settings", "-n", &ns, "--dry-run=server"];
            wait_for("the odd user guarded", Duration::from_secs(30), || {
                Ok(!kubectl(w, &kubeconfig, &probe).status.success())
            })?;
            refused_by(
                kubectl(w, &kubeconfig, &probe),
                "the odd user's delete",
                &format!("e2e-routes-odd-{n}"),
                "odd-config",
            )?;
            // Exactly that user: the same name without its odd characters is no agent.
            let plain: String = odd.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
            admin(
                w,
                &[
                    "create",
                    "rolebinding",
                    &format!("plain-{n}"),
                    "-n",
                    &ns,
                    "--clusterrole=edit",
                    &format!("--user={plain}"),
                ],
            )?;
            accepts(
                kubectl(w, &w.plane.user_kubeconfig(&plain, &[])?, &probe),
                "the same delete by a user whose name differs only in the odd characters",
            )?;
            let after = format!("after-{n}");
            admin(w, &["create", "serviceaccount", &after, "-n", &ns])?;
            admin(w, &["label", "serviceaccount", &after, "-n", &ns, "agentguard.io/agent=true"])?;
            w.wait_for_registration(&format!("system:serviceaccount:{ns}:{after}"), Duration::from_secs(30))?;
            println!("  {odd:?} admitted, guarded, and the configuration still updates");
            Ok(())
        });
    }
    routes.done()
}

/// A denial under several policies names each once, with its own approvers and reason, even
/// when two rules of one policy match.
pub fn denial_names_each_policy_once(w: &World) -> Result<()> {
    let mut left = Leftovers::new(w);
    let ns = namespace(w, "routes-messages")?;
    let mut dba = cluster_policy(
        "e2e-routes-msg-dba",
        "RequireApproval",
        json!([
            rule("namespace-config", &["DELETE"], "", "configmaps", json!({"namespaces": [ns]})),
            rule("schema-config", &["DELETE"], "", "configmaps", json!({"names": ["e2e-routes-schema"]})),
        ]),
    );
    dba["spec"]["approval"] =
        json!({"approvers": {"users": ["e2e-routes-dba"]}, "reason": "the database team owns the schema"});
    left.policy(dba)?;
    let mut sre = cluster_policy(
        "e2e-routes-msg-sre",
        "RequireApproval",
        json!([rule("freeze", &["DELETE"], "", "configmaps", json!({"namespaces": [ns]}))]),
    );
    sre["spec"]["approval"] = json!({"approvers": {"groups": ["sre"]}, "reason": "platform change freeze"});
    left.policy(sre)?;
    configmap(w, &ns, "e2e-routes-schema", None)?;
    let denial = rejects(
        kubectl(w, &w.editor, &["delete", "configmap", "e2e-routes-schema", "-n", &ns]),
        "a delete two policies hold",
        "requires approval",
    )?;
    // The list of approvers: each covering policy once, with its approvers and its reason.
    let approvers = denial.rsplit_once("Approvers:").map_or(denial.as_str(), |(_, list)| list);
    for text in [
        "ClusterAgentPolicy \"e2e-routes-msg-dba\"",
        "ClusterAgentPolicy \"e2e-routes-msg-sre\"",
        "the database team owns the schema",
        "platform change freeze",
        "e2e-routes-dba",
    ] {
        let seen = approvers.matches(text).count();
        ensure!(seen == 1, "{text:?} is listed {seen} times, not once: {denial}");
    }
    ensure!(exists(w, &["configmap", "e2e-routes-schema", "-n", &ns]), "the ConfigMap is gone");
    Ok(())
}

/// `agentguard audit` reports an agent's rights to write `namespaces/status` and
/// `namespaces/finalize`, which reach agentguard's agent-namespace label.
pub fn audit_reports_status_rights(w: &World) -> Result<()> {
    let mut left = Leftovers::new(w);
    let ns = namespace(w, "routes-audit")?;
    admin(w, &["create", "serviceaccount", "relabeller", "-n", &ns])?;
    admin(w, &["label", "serviceaccount", "relabeller", "-n", &ns, "agentguard.io/agent=true"])?;
    left.apply(&json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "e2e-routes-status-writer"},
        "rules": [{"apiGroups": [""], "resources": ["namespaces/status", "namespaces/finalize"],
            "verbs": ["update", "patch"]}]}))?;
    left.apply(&json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "e2e-routes-status-writer"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "e2e-routes-status-writer"},
        "subjects": [{"kind": "ServiceAccount", "name": "relabeller", "namespace": ns}]}))?;
    let out = crate::audit::audit(&w.plane.admin, &["--output=json"]);
    let report: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("audit printed no JSON: {}", String::from_utf8_lossy(&out.stderr)))?;
    let identity = format!("system:serviceaccount:{ns}:relabeller");
    let agent = report["agents"]
        .as_array()
        .and_then(|agents| agents.iter().find(|a| a["identity"] == identity.as_str()))
        .with_context(|| format!("{identity} is not listed"))?;
    let resources: Vec<String> = agent["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|f| f["resources"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r.as_str().map(str::to_owned))
        .collect();
    for wanted in ["namespaces/status", "namespaces/finalize"] {
        ensure!(resources.iter().any(|r| r == wanted), "{wanted} is not reported: {}", agent["findings"]);
    }
    Ok(())
}

/// Becoming someone without brakes: an agent minting a token for a ServiceAccount that is not an
/// agent (as `edit` would let it do in its namespaces) is refused; a token for another agent is not.
pub fn tokens_for_identities_without_brakes_are_refused(w: &World) -> Result<()> {
    let denial = rejects(
        w.plane.kubectl(&w.agent, &["create", "token", "helper", "-n", "agents"]),
        "the agent minting a token for the unlabelled helper",
        "agent-identity",
    )?;
    ensure!(denial.contains("agents/helper"), "{denial}");
    let token = accepts(
        w.plane.kubectl(&w.agent, &["create", "token", "editor", "-n", "agents"]),
        "the agent minting a token for another agent",
    )?;
    ensure!(!token.trim().is_empty(), "no token");
    // People are untouched.
    accepts(
        w.plane.kubectl(&w.plane.admin, &["create", "token", "helper", "-n", "agents"]),
        "the admin minting a token for the helper",
    )?;
    // Nor may an agent delete an agent's account, to create it again without the mark.
    let spare = format!("spare-{}", std::process::id());
    admin(w, &["create", "serviceaccount", &spare, "-n", "agents"])?;
    admin(w, &["label", "serviceaccount", &spare, "-n", "agents", "agentguard.io/agent=true"])?;
    let denial = rejects(
        w.plane.kubectl(&w.agent, &["delete", "serviceaccount", &spare, "-n", "agents"]),
        "the agent deleting an agent's ServiceAccount",
        "agent-label",
    )?;
    ensure!(exists(w, &["serviceaccount", &spare, "-n", "agents"]), "the account is gone: {denial}");
    admin(w, &["delete", "serviceaccount", &spare, "-n", "agents"])?;
    Ok(())
}

/// Waits until the `agents` webhook routes the ServiceAccounts of `ns` to agentguard (`yes`) or
/// no longer does.
fn namespace_routed(w: &World, ns: &str, yes: bool) -> Result<Duration> {
    let prefix = format!("'system:serviceaccount:{ns}:'");
    wait_for(&format!("namespace {ns} routed: {yes}"), Duration::from_secs(10), || {
        let condition = admin(
            w,
            &[
                "get",
                "validatingwebhookconfiguration",
                "agentguard",
                "-o",
                "jsonpath={.webhooks[0].matchConditions[1].expression}",
            ],
        )?;
        Ok(condition.contains(&prefix) == yes)
    })
}

/// An agent with `edit` in a namespace can act as any of its ServiceAccounts: impersonate one,
/// mint its token, or run a pod as it. Each of them is an agent from the moment the binding is
/// stored, so their requests meet the same brakes; one of them can carry the reach on to where
/// it has `edit`; and once the agent's binding is gone, they are people's ServiceAccounts again.
pub fn acting_as_another_service_account_is_still_an_agent(w: &World) -> Result<()> {
    let mut leftovers = Leftovers::new(w);
    let ns = format!("e2e-become-{}", std::process::id());
    let next = format!("{ns}-next");
    for n in [&ns, &next] {
        admin(w, &["create", "namespace", n])?;
        leftovers.objects.push(vec!["namespace".into(), n.clone()]);
    }
    admin(w, &["create", "serviceaccount", "deployer", "-n", &ns])?;
    w.bind_edit(&next, &ns, "deployer")?;
    // Every ServiceAccount of the namespace may edit there: a team's usual grant.
    admin(
        w,
        &[
            "create",
            "rolebinding",
            "team-edit",
            "-n",
            &ns,
            "--clusterrole=edit",
            &format!("--group=system:serviceaccounts:{ns}"),
        ],
    )?;
    default_service_account(w, &ns)?;
    wait_for("the namespace's ServiceAccounts may edit there", Duration::from_secs(10), || {
        let who = format!("--as=system:serviceaccount:{ns}:default");
        Ok(kubectl(w, &w.plane.admin, &["auth", "can-i", "delete", "configmaps", "-n", &ns, &who])
            .status
            .success())
    })?;
    for n in [&ns, &next] {
        configmap(w, n, "precious", None)?;
    }
    leftovers.policy(cluster_policy(
        "e2e-routes-become",
        "Deny",
        json!([rule("keep", &["DELETE"], "", "configmaps", json!({"namespaces": [ns, next]}))]),
    ))?;
    let deployer = w.plane.service_account_kubeconfig(&ns, "deployer")?;
    // Before the agent has rights there, deployer is a controller's account like any other.
    namespace_routed(w, &ns, false)?;
    accepts(
        kubectl(w, &deployer, &["label", "configmap", "precious", "-n", &ns, "seen=before"]),
        "deployer's update before any agent can act as it",
    )?;

    w.grant_edit(&ns)?;
    let took = namespace_routed(w, &ns, true)?;
    namespace_routed(w, &next, true)?;
    println!(
        "    {ns}'s ServiceAccounts routed as agents {:.2}s after the agent's edit was bound",
        took.as_secs_f64()
    );
    let editor = &w.editor;
    for (what, out) in [
        (
            "the agent impersonating deployer",
            kubectl(
                w,
                editor,
                &[
                    "delete",
                    "configmap",
                    "precious",
                    "-n",
                    &ns,
                    &format!("--as=system:serviceaccount:{ns}:deployer"),
                ],
            ),
        ),
        (
            "the agent impersonating the default ServiceAccount",
            kubectl(
                w,
                editor,
                &[
                    "delete",
                    "configmap",
                    "precious",
                    "-n",
                    &ns,
                    &format!("--as=system:serviceaccount:{ns}:default"),
                ],
            ),
        ),
        ("deployer's own token", kubectl(w, &deployer, &["delete", "configmap", "precious", "-n", &ns])),
        (
            "deployer, where it has edit and the agent has none",
            kubectl(w, &deployer, &["delete", "configmap", "precious", "-n", &next]),
        ),
    ] {
        refused_by(out, what, "e2e-routes-become", "keep")?;
    }
    // A token the agent mints is for an agent now, and so is a ServiceAccount made afterwards.
    let token = accepts(
        kubectl(w, editor, &["create", "token", "deployer", "-n", &ns]),
        "the agent minting deployer's token",
    )?;
    ensure!(!token.trim().is_empty(), "no token");
    accepts(
        kubectl(w, editor, &["create", "serviceaccount", "fresh", "-n", &ns]),
        "the agent making a ServiceAccount",
    )?;
    refused_by(
        kubectl(
            w,
            editor,
            &[
                "delete",
                "configmap",
                "precious",
                "-n",
                &ns,
                &format!("--as=system:serviceaccount:{ns}:fresh"),
            ],
        ),
        "the agent impersonating the ServiceAccount it made",
        "e2e-routes-become",
        "keep",
    )?;
    for n in [&ns, &next] {
        ensure!(exists(w, &["configmap", "precious", "-n", n]), "precious is gone from {n}");
    }
    // People are untouched: the admin acting as deployer is still deployer, an agent now.
    accepts(
        kubectl(w, &w.plane.admin, &["label", "configmap", "precious", "-n", &ns, "by-admin=1"]),
        "the admin's update",
    )?;

    // The agent's binding removed: the namespaces are people's again.
    admin(w, &["delete", "rolebinding", "edit-agents-editor", "-n", &ns])?;
    namespace_routed(w, &ns, false)?;
    namespace_routed(w, &next, false)?;
    accepts(
        kubectl(w, &deployer, &["label", "configmap", "precious", "-n", &next, "after=1"]),
        "deployer's update once no agent can act as it",
    )?;

    // Marking an agent registers whom it can act as before the mark is stored: probed at once.
    admin(
        w,
        &[
            "create",
            "rolebinding",
            "team-edit",
            "-n",
            &next,
            "--clusterrole=edit",
            &format!("--group=system:serviceaccounts:{next}"),
        ],
    )?;
    default_service_account(w, &next)?;
    wait_for("next's ServiceAccounts may edit there", Duration::from_secs(10), || {
        let who = format!("--as=system:serviceaccount:{next}:default");
        Ok(kubectl(w, &w.plane.admin, &["auth", "can-i", "delete", "configmaps", "-n", &next, &who])
            .status
            .success())
    })?;
    admin(w, &["label", "serviceaccount", "deployer", "-n", &ns, "agentguard.io/agent=true"])?;
    refused_by(
        kubectl(
            w,
            &deployer,
            &[
                "delete",
                "configmap",
                "precious",
                "-n",
                &next,
                &format!("--as=system:serviceaccount:{next}:default"),
            ],
        ),
        "a newly marked agent impersonating, at once, an account where it has edit",
        "e2e-routes-become",
        "keep",
    )?;
    Ok(())
}

/// A CustomResourceDefinition standing in for a GitOps controller's (`group`, `kind`), with an
/// open schema: only the fields agentguard reads matter here.
fn stand_in_crd(left: &mut Leftovers<'_>, group: &str, plural: &str, kind: &str) -> Result<()> {
    let name = format!("{plural}.{group}");
    left.apply(&json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": name},
        "spec": {"group": group, "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.to_lowercase(), "kind": kind},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}
    }))?;
    admin(left.w, &["wait", "--for=condition=established", "--timeout=30s", &format!("crd/{name}")]).map(drop)
}

/// Destruction handed to a controller by an update: each update below makes a controller of
/// kube-controller-manager (or a cloud or GitOps controller) delete objects a policy guards, so
/// it is judged as those deletes and refused; the same change by a person goes through.
pub fn controllers_handed_destruction_are_judged(w: &World) -> Result<()> {
    let mut left = Leftovers::new(w);
    let ns = namespace(w, "routes-handed")?;
    let node = format!("e2e-routes-node-{}", std::process::id());
    stand_in_crd(&mut left, "argoproj.io", "applications", "Application")?;
    stand_in_crd(&mut left, "kustomize.toolkit.fluxcd.io", "kustomizations", "Kustomization")?;
    let guarded = |name: &str, group: &str, resource: &str| {
        rule(name, &["DELETE"], group, resource, json!({"namespaces": [ns]}))
    };
    left.policy(cluster_policy(
        "e2e-routes-handed",
        "Deny",
        json!([
            guarded("jobs", "batch", "jobs"),
            guarded("history", "apps", "replicasets"),
            guarded("volumes", "", "persistentvolumeclaims"),
            guarded("pods", "", "pods"),
            guarded("load-balancers", "", "services"),
            guarded("apps", "argoproj.io", "applications"),
            guarded("kustomizations", "kustomize.toolkit.fluxcd.io", "kustomizations"),
        ]),
    ))?;
    let template = json!({"metadata": {"labels": {"app": "x"}},
        "spec": {"containers": [{"name": "x", "image": "busybox:1.37"}], "restartPolicy": "Never"}});
    create(
        w,
        &json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "report", "namespace": ns},
        "spec": {"template": template}}),
    )?;
    create(
        w,
        &json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "nightly", "namespace": ns},
        "spec": {"schedule": "0 3 * * *", "jobTemplate": {"spec": {"template": template}}}}),
    )?;
    create(
        w,
        &json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": ns},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}}}}),
    )?;
    create(
        w,
        &json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db", "namespace": ns},
        "spec": {"replicas": 2, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Delete"},
            "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": [{"name": "db", "image": "postgres:17"}]}},
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec":
                {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]}}),
    )?;
    create(
        w,
        &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "front", "namespace": ns},
        "spec": {"type": "LoadBalancer", "selector": {"app": "web"}, "ports": [{"port": 80}]}}),
    )?;
    left.apply(&json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}))?;
    create(
        w,
        &json!({"apiVersion": "argoproj.io/v1", "kind": "Application", "metadata": {"name": "shop", "namespace": ns},
        "spec": {"source": {"repoURL": "https://example.com/shop.git", "path": "prod"},
            "destination": {"namespace": "shop"}, "syncPolicy": {"automated": {"prune": false}}}}),
    )?;
    create(
        w,
        &json!({"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization", "metadata": {"name": "infra", "namespace": ns},
        "spec": {"prune": true, "path": "./prod", "sourceRef": {"kind": "GitRepository", "name": "infra"}}}),
    )?;

    let merge = |kind: &str, name: &str, patch: Value| -> Vec<String> {
        let mut args: Vec<String> = vec!["patch".into(), kind.into(), name.into()];
        if kind != "node" {
            args.extend(["-n".into(), ns.clone()]);
        }
        args.extend(["--type=merge".into(), "-p".into(), patch.to_string()]);
        args
    };
    let mut routes = Routes::default();
    let mut try_route = |what: &str, who: &Path, args: Vec<String>, rule: &str| {
        routes.check(what, || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            refused_by(kubectl(w, who, &args), what, "e2e-routes-handed", rule).map(drop)
        });
    };
    try_route(
        "a Job's ttlSecondsAfterFinished set (the TTL controller deletes it)",
        &w.editor,
        merge("job", "report", json!({"spec": {"ttlSecondsAfterFinished": 0}})),
        "jobs",
    );
    try_route(
        "a CronJob's history limit lowered (the CronJob controller deletes its Jobs)",
        &w.editor,
        merge("cronjob", "nightly", json!({"spec": {"successfulJobsHistoryLimit": 0}})),
        "jobs",
    );
    try_route(
        "a Deployment's revisionHistoryLimit lowered (old ReplicaSets deleted)",
        &w.editor,
        merge("deployment", "web", json!({"spec": {"revisionHistoryLimit": 0}})),
        "history",
    );
    try_route(
        "a StatefulSet with whenScaled Delete scaled down through /scale",
        &w.editor,
        vec![
            "scale".into(),
            "statefulset".into(),
            "db".into(),
            "-n".into(),
            ns.clone(),
            "--replicas=1".into(),
        ],
        "volumes",
    );
    try_route(
        "a StatefulSet with whenScaled Delete scaled down in its spec",
        &w.editor,
        merge("statefulset", "db", json!({"spec": {"replicas": 1}})),
        "volumes",
    );
    try_route(
        "a Service leaving type LoadBalancer (the load balancer is released)",
        &w.editor,
        merge("service", "front", json!({"spec": {"type": "ClusterIP"}})),
        "load-balancers",
    );
    try_route(
        "a NoExecute taint on a Node (the taint manager deletes its pods)",
        &w.agent,
        merge("node", &node, json!({"spec": {"taints": [{"key": "e2e", "effect": "NoExecute"}]}})),
        "pods",
    );
    try_route(
        "a Node deleted (its pods are deleted)",
        &w.agent,
        vec!["delete".into(), "node".into(), node.clone()],
        "pods",
    );
    try_route(
        "an Argo CD Application's automated pruning turned on",
        &w.agent,
        merge(
            "applications.argoproj.io",
            "shop",
            json!({"spec": {"syncPolicy": {"automated": {"prune": true}}}}),
        ),
        "apps",
    );
    try_route(
        "a pruning Flux Kustomization pointed at another path",
        &w.agent,
        merge("kustomizations.kustomize.toolkit.fluxcd.io", "infra", json!({"spec": {"path": "./empty"}})),
        "kustomizations",
    );
    routes.check("nothing changed", || {
        let get = |args: &[&str], path: &str| -> Result<Value> {
            Ok(object(w, args)?.pointer(path).cloned().unwrap_or(Value::Null))
        };
        ensure!(
            get(&["job", "report", "-n", &ns], "/spec/ttlSecondsAfterFinished")?.is_null(),
            "the Job's TTL was set"
        );
        ensure!(
            get(&["statefulset", "db", "-n", &ns], "/spec/replicas")? == 2,
            "the StatefulSet was scaled down"
        );
        ensure!(
            get(&["service", "front", "-n", &ns], "/spec/type")? == "LoadBalancer",
            "the Service type changed"
        );
        ensure!(exists(w, &["node", &node]), "the Node is gone");
        ensure!(
            get(&["kustomizations.kustomize.toolkit.fluxcd.io", "infra", "-n", &ns], "/spec/path")?
                == "./prod",
            "the Kustomization moved"
        );
        Ok(())
    });
    routes.check("a person's same change is untouched", || {
        accepts(
            kubectl(w, &w.plane.admin, &["scale", "statefulset", "db", "-n", &ns, "--replicas=1"]),
            "the admin scaling the StatefulSet down",
        )
        .map(drop)
    });
    routes.done()
}

/// A held Namespace delete shows what it would take with it, and its approval covers exactly
/// that: an object added before the agent retries voids it, a fresh approval of the new radius
/// admits it, and the namespace controller then deletes the lot.
pub fn blast_radius_is_shown_and_bound(w: &World) -> Result<()> {
    let mut left = Leftovers::new(w);
    let ns = format!("e2e-radius-{}", std::process::id());
    admin(w, &["create", "namespace", &ns])?;
    left.objects.push(vec!["namespace".into(), ns.clone()]);
    left.policy(cluster_policy(
        "e2e-routes-radius",
        "RequireApproval",
        json!([{"name": "everything", "operations": ["DELETE"], "namespaces": [ns],
            "resources": [{"apiGroups": ["*"], "resources": ["*"]}]}]),
    ))?;
    configmap(w, &ns, "settings", None)?;
    create(
        w,
        &json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data", "namespace": ns},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}),
    )?;
    create(
        w,
        &json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": ns},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}}}}),
    )?;
    // The Deployment's ReplicaSet and Pods exist (Pending: no node), controlled by it.
    wait_for("the Deployment's two pods", Duration::from_secs(30), || {
        Ok(admin(w, &["get", "pods", "-n", &ns, "-o", "name"])?.lines().count() == 2)
    })?;
    let delete = ["delete", "namespace", &ns, "--wait=false"];
    let held = rejects(kubectl(w, &w.agent, &delete), "the agent's namespace delete", "requires approval")?;
    for shown in [
        "It would also delete:",
        "configmaps (",
        "settings",
        "persistentvolumeclaims (data)",
        "deployments.apps (web)",
        "2 pods",
    ] {
        ensure!(held.contains(shown), "the held delete does not show {shown:?}: {held}");
    }
    let first: Vec<String> = crate::scenarios::approve_command(&held)?;
    must(crate::scenarios::run_as(w, &w.alice, &first)).context("alice approving the delete as shown")?;

    // The radius grows before the agent retries: the approval no longer covers it.
    configmap(w, &ns, "added-later", None)?;
    let again =
        rejects(kubectl(w, &w.agent, &delete), "the retry after the radius grew", "requires approval")?;
    ensure!(again.contains("changed after the delete was reviewed"), "{again}");
    ensure!(again.contains("added-later"), "the new radius is not shown: {again}");
    ensure!(exists(w, &["namespace", &ns]), "the namespace went on a stale approval");

    // Approved as it now is: admitted, and the namespace controller deletes it all.
    must(crate::scenarios::run_as(w, &w.alice, &crate::scenarios::approve_command(&again)?))?;
    accepts(kubectl(w, &w.agent, &delete), "the retry approved for the radius shown")?;
    wait_for("the namespace to go", GC_WAIT, || Ok(!exists(w, &["namespace", &ns])))?;
    Ok(())
}

/// A rule's CEL `condition` guards exactly what it says: switching a feature flag off is held,
/// other values are not; a condition that does not compile is reported in the policy's status
/// and the rule then guards every update it covers.
pub fn conditions_guard_exactly_what_they_say(w: &World) -> Result<()> {
    let mut left = Leftovers::new(w);
    let ns = namespace(w, "routes-condition")?;
    create(
        w,
        &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "flags", "namespace": ns},
        "data": {"payments": "on"}}),
    )?;
    let policy = |condition: &str| {
        cluster_policy(
            "e2e-routes-condition",
            "RequireApproval",
            json!([rule(
                "payments-off",
                &["UPDATE"],
                "",
                "configmaps",
                json!({"namespaces": [ns], "condition": condition})
            )]),
        )
    };
    left.policy(policy("object.data.payments == 'off'"))?;
    let set = |value: &str| {
        let patch = json!({"data": {"payments": value}}).to_string();
        kubectl(w, &w.editor, &["patch", "configmap", "flags", "-n", &ns, "--type=merge", "-p", &patch])
    };
    accepts(set("degraded"), "a value the condition does not cover")?;
    let held = refused_by(set("off"), "switching payments off", "e2e-routes-condition", "payments-off")?;
    ensure!(held.contains("requires approval"), "{held}");
    ensure!(object(w, &["configmap", "flags", "-n", &ns])?["data"]["payments"] == "degraded", "switched off");

    // A broken condition: the policy's status says so, and the rule guards without it.
    apply(w, &policy("object.data.payments =="))?;
    wait_for("the problem in the policy's status", Duration::from_secs(15), || {
        let status = object(w, &["clusteragentpolicy", "e2e-routes-condition"])?["status"].to_string();
        Ok(status.contains("condition does not parse"))
    })?;
    refused_by(
        set("on"),
        "any update under a rule whose condition is broken",
        "e2e-routes-condition",
        "payments-off",
    )?;
    Ok(())
}
