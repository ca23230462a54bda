//! Cost of one policy decision as the number of policies grows (decode excluded), and with every
//! rule carrying a CEL condition.
//!
//! `cargo bench --bench policy` — results and the machine they came from are in docs/performance.md.

use std::hint::black_box;

use agentguard::engine::api::{AgentPolicy, ClusterAgentPolicy};
use agentguard::engine::policy::identity::StaticDirectory;
use agentguard::engine::policy::{Config, Facts, Operation, PolicySet, Requester, evaluate};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};

const RESOURCES: [(&str, &str); 20] = [
    ("apps", "deployments"),
    ("apps", "statefulsets"),
    ("apps", "daemonsets"),
    ("apps", "replicasets"),
    ("", "configmaps"),
    ("", "secrets"),
    ("", "services"),
    ("", "pods"),
    ("", "persistentvolumeclaims"),
    ("", "serviceaccounts"),
    ("batch", "jobs"),
    ("batch", "cronjobs"),
    ("networking.k8s.io", "ingresses"),
    ("networking.k8s.io", "networkpolicies"),
    ("rbac.authorization.k8s.io", "roles"),
    ("rbac.authorization.k8s.io", "rolebindings"),
    ("policy", "poddisruptionbudgets"),
    ("autoscaling", "horizontalpodautoscalers"),
    ("apps", "deployments/scale"),
    ("apps", "statefulsets/scale"),
];

/// Conditions as the policy library writes them: on the object, on who asks, on both.
const CONDITIONS: [&str; 3] = [
    "has(object.spec.replicas) && object.spec.replicas == 0",
    "request.userInfo.username.startsWith('system:serviceaccount:') && object.spec.replicas == 0",
    "!('authentication.kubernetes.io/pod-name' in request.userInfo.extra) && object.spec.replicas < oldObject.spec.replicas / 2",
];

fn spec(i: usize, conditions: bool) -> Value {
    let (group, resource) = RESOURCES[i % RESOURCES.len()];
    let action = ["Deny", "RequireApproval", "Allow"][i % 3];
    let mut spec = json!({
        "action": action,
        "rules": [{
            "name": format!("rule-{i}"),
            "operations": ["DELETE", "UPDATE"],
            "resources": [{"apiGroups": [group], "resources": [resource]}],
            "names": [format!("app-{}-*", i % 50)],
            "objectSelector": {"matchLabels": {"tier": format!("t{}", i % 4)}}
        }]
    });
    if conditions {
        spec["rules"][0]["condition"] = json!(CONDITIONS[i % CONDITIONS.len()]);
    }
    if action == "RequireApproval" {
        spec["approval"] = json!({"approvers": {"groups": ["sre"]}});
    }
    spec
}

/// `n` policies: a tenth cluster-wide, the rest AgentPolicies spread over 100 namespaces, plus
/// (from 100 up) two catch-all Warn policies, as a real cluster would have; with `conditions`,
/// every one of the `n` carries a condition.
fn policies(n: usize, conditions: bool) -> PolicySet {
    let mut cluster = Vec::new();
    let mut namespaced = Vec::new();
    for i in 0..n {
        if i % 10 == 0 {
            cluster.push(
                serde_json::from_value::<ClusterAgentPolicy>(json!({
                    "apiVersion": "agentguard.io/v1alpha1", "kind": "ClusterAgentPolicy",
                    "metadata": {"name": format!("cluster-{i}")}, "spec": spec(i, conditions)
                }))
                .unwrap(),
            );
        } else {
            namespaced.push(
                serde_json::from_value::<AgentPolicy>(json!({
                    "apiVersion": "agentguard.io/v1alpha1", "kind": "AgentPolicy",
                    "metadata": {"name": format!("team-{i}"), "namespace": format!("ns-{}", i % 100)},
                    "spec": spec(i, conditions)
                }))
                .unwrap(),
            );
        }
    }
    if n >= 100 {
        for name in ["warn-all-deletes", "warn-all-updates"] {
            cluster.push(
                serde_json::from_value(json!({
                    "apiVersion": "agentguard.io/v1alpha1", "kind": "ClusterAgentPolicy",
                    "metadata": {"name": name},
                    "spec": {"action": "Deny", "mode": "Warn", "rules": [{"operations": ["DELETE"],
                        "resources": [{"apiGroups": ["*"], "resources": ["*"]}], "names": ["nothing-*"]}]}
                }))
                .unwrap(),
            );
        }
    }
    let (set, problems) = PolicySet::compile(&cluster, &namespaced);
    assert!(problems.is_empty());
    set
}

fn deployment(name: &str, tier: &str, replicas: i64) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "ns-10", "labels": {"tier": tier, "app": "web"},
                     "resourceVersion": "42", "generation": 7},
        "spec": {"replicas": replicas, "template": {"spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}}}
    })
}

fn bench(c: &mut Criterion) {
    let mut directory = StaticDirectory::default();
    directory.service_accounts.insert(
        ("agents".into(), "coder".into()),
        [("agentguard.io/agent".to_string(), "true".to_string())].into(),
    );
    for i in 0..100 {
        directory.namespaces.insert(format!("ns-{i}"), [("team".to_string(), format!("t{i}"))].into());
    }
    let config = Config::default();
    let requester = Requester::resolve(
        "system:serviceaccount:agents:coder",
        &["system:serviceaccounts".into()],
        &directory,
        ("agentguard.io/agent", "true"),
    );
    let now = "2026-11-26T12:00:00Z".parse().unwrap();
    // An object no policy guards (most of an agent's requests), and one ClusterAgentPolicy
    // "cluster-0" guards (name app-0-*, tier t0), whose update is judged in full: diff included.
    let (old, new) = (deployment("app-10-web", "t2", 3), deployment("app-10-web", "t2", 0));
    let (guarded_old, guarded_new) = (deployment("app-0-web", "t0", 3), deployment("app-0-web", "t0", 0));
    let delete = Facts {
        operation: Operation::Delete,
        group: "apps",
        resource: "deployments",
        subresource: "",
        namespace: "ns-10",
        name: "app-10-web",
        object: None,
        old_object: Some(&old),
        collateral: &[],
        sent: None,
    };
    let update = Facts { operation: Operation::Update { patch: None }, object: Some(&new), ..delete.clone() };
    let guarded_update = Facts {
        name: "app-0-web",
        object: Some(&guarded_new),
        old_object: Some(&guarded_old),
        ..update.clone()
    };

    let mut group = c.benchmark_group("decision");
    for n in [1, 100, 1000] {
        let set = policies(n, false);
        group.bench_with_input(BenchmarkId::new("delete", n), &set, |b, set| {
            b.iter(|| evaluate(black_box(&delete), &requester, set, &directory, &config, now))
        });
        group.bench_with_input(BenchmarkId::new("update", n), &set, |b, set| {
            b.iter(|| evaluate(black_box(&update), &requester, set, &directory, &config, now))
        });
        group.bench_with_input(BenchmarkId::new("guarded-update", n), &set, |b, set| {
            let d = evaluate(&guarded_update, &requester, set, &directory, &config, now);
            assert!(!d.allowed(), "the guarded update must be refused: {d:?}");
            b.iter(|| evaluate(black_box(&guarded_update), &requester, set, &directory, &config, now))
        });
    }
    group.finish();

    // Every rule carries a condition. The request as the API server sends it, so conditions on
    // `request.userInfo` are evaluated, not failed. The 10 ClusterAgentPolicies that match
    // app-0-web in everything else evaluate their conditions: all false for 3 → 2 replicas,
    // true for 3 → 0.
    let sent: agentguard::engine::admission::AdmissionRequest = serde_json::from_value(json!({
        "uid": "bench", "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
        "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
        "name": "app-0-web", "namespace": "ns-10", "operation": "UPDATE",
        "userInfo": {"username": "system:serviceaccount:agents:coder", "uid": "sa-uid",
                     "groups": ["system:serviceaccounts"],
                     "extra": {"authentication.kubernetes.io/pod-name": ["coder-7f"]}}
    }))
    .unwrap();
    let to_two = deployment("app-0-web", "t0", 2);
    let condition_false = Facts { object: Some(&to_two), sent: Some(&sent), ..guarded_update.clone() };
    let condition_true = Facts { sent: Some(&sent), ..guarded_update.clone() };
    let unmatched_update = Facts { sent: Some(&sent), ..update.clone() };
    let mut group = c.benchmark_group("conditions");
    for n in [100, 1000] {
        let set = policies(n, true);
        group.bench_with_input(BenchmarkId::new("update", n), &set, |b, set| {
            b.iter(|| evaluate(black_box(&unmatched_update), &requester, set, &directory, &config, now))
        });
        group.bench_with_input(BenchmarkId::new("conditions-false", n), &set, |b, set| {
            let d = evaluate(&condition_false, &requester, set, &directory, &config, now);
            assert!(d.allowed(), "every condition is false for 3 → 2 replicas: {d:?}");
            b.iter(|| evaluate(black_box(&condition_false), &requester, set, &directory, &config, now))
        });
        group.bench_with_input(BenchmarkId::new("conditions-true", n), &set, |b, set| {
            let d = evaluate(&condition_true, &requester, set, &directory, &config, now);
            assert!(!d.allowed(), "the conditions hold for 3 → 0 replicas: {d:?}");
            b.iter(|| evaluate(black_box(&condition_true), &requester, set, &directory, &config, now))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
