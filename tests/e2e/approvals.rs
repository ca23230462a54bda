//! Approvals beyond one annotation, on the real API server: a policy that needs two distinct
//! approvers (each writes an approval naming themselves; nobody counts twice, an agent never),
//! recorded in the audit trail with both; and break-glass sessions, which admit exactly what
//! they scope until spent, ended or closed, and which agents can neither open nor change.

use anyhow::{Context, Result, ensure};

use crate::plugin::{plugin, text};
use crate::scenarios::{deployment, exists, namespace};
use crate::tickets::ticket_in;
use crate::trail::record;
use crate::world::{World, accepts, must, rejects};

/// The key `agentguard.io/approve.<…>` a user's own approval goes under, as agentguard names it.
fn key_of(w: &World, ns: &str, name: &str, user: &str) -> Result<String> {
    let annotations: serde_json::Value = serde_json::from_str(&must(w.plane.kubectl(
        &w.plane.admin,
        &["get", "deployment", name, "-n", ns, "-o", "jsonpath={.metadata.annotations}"],
    ))?)?;
    annotations
        .as_object()
        .into_iter()
        .flatten()
        .find(|(k, v)| {
            k.starts_with("agentguard.io/approve.")
                && v.as_str().is_some_and(|v| v.ends_with(&format!(".{user}")))
        })
        .map(|(k, _)| k.clone())
        .with_context(|| format!("no approval naming {user} on {ns}/{name}: {annotations}"))
}

/// An AgentPolicy in `ns` holding deployments' deletes for two distinct approvers (alice and bob).
pub(crate) fn two_person_policy(w: &World, ns: &str) -> Result<()> {
    let policy = format!(
        "apiVersion: agentguard.io/v1alpha1\nkind: AgentPolicy\nmetadata: {{name: two-person, namespace: {ns}}}\nspec:\n  \
         action: RequireApproval\n  approval: {{approvers: {{users: [alice, bob]}}, minApprovers: 2, reason: the database}}\n  \
         rules:\n    - name: db\n      operations: [DELETE]\n      \
         resources: [{{apiGroups: [apps], resources: [deployments]}}]\n"
    );
    must(w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-f", "-"], Some(&policy)))?;
    must(w.plane.kubectl(
        &w.plane.admin,
        &["wait", "--for=condition=Ready", "--timeout=30s", "agentpolicy/two-person", "-n", ns],
    ))?;
    Ok(())
}

/// The ticket of the named approval command a denial prints where several must approve.
pub(crate) fn named_ticket(denial: &str) -> Result<String> {
    let start = denial.find("agentguard.io/approve.<you>=").context("no named approval command")?
        + "agentguard.io/approve.<you>=".len();
    Ok(denial[start..].split(".<username>").next().context("no ticket")?.to_owned())
}

pub fn two_distinct_approvers(w: &World) -> Result<()> {
    let ns = namespace(w, "two-person")?;
    deployment(w, &ns, "db")?;
    two_person_policy(w, &ns)?;
    // bob is in `sre` too, so he approves under the cluster's workload policy as well.
    let bob = w.plane.user_kubeconfig("bob", &["sre"])?;
    let delete = ["delete", "deployment", "db", "-n", ns.as_str()];

    let denial = rejects(w.plane.kubectl(&w.editor, &delete), "the agent's delete", "requires approval")?;
    ensure!(denial.contains("2 distinct approvers must approve (none yet): 2 more needed"), "{denial}");
    ensure!(denial.contains(&format!("kubectl agentguard approve deployments.apps/db -n {ns}")), "{denial}");
    let value = named_ticket(&denial)?;
    ensure!(ticket_in(&denial).is_err(), "a plain approval command is offered where two must approve");

    // One approval naming nobody cannot count among two: refused, with how to write it.
    let plain = format!("agentguard.io/approve={value}");
    rejects(
        w.plane.kubectl(&w.alice, &["annotate", "deployment", "db", "-n", &ns, &plain]),
        "alice's approval naming nobody",
        "each approval names its writer",
    )?;
    // Alice approves through the plugin (it names her, under her own key).
    let approved = loop_until_held(w, &w.alice, &ns)?;
    ensure!(approved.contains("approved: deployments.apps db"), "{approved}");
    let alice_key = key_of(w, &ns, "db", "alice")?;
    let denial =
        rejects(w.plane.kubectl(&w.editor, &delete), "the delete with one approval", "requires approval")?;
    ensure!(denial.contains("2 distinct approvers must approve (so far alice): 1 more needed"), "{denial}");

    // Nobody approves twice, nor in another's name; an agent never, a non-approver never.
    let again = format!("agentguard.io/approve.again={value}.alice");
    rejects(
        w.plane.kubectl(&w.alice, &["annotate", "deployment", "db", "-n", &ns, &again]),
        "alice's second approval",
        "alice has already approved this object",
    )?;
    let as_bob = format!("agentguard.io/approve.bob={value}.bob");
    rejects(
        w.plane.kubectl(&w.alice, &["annotate", "deployment", "db", "-n", &ns, &as_bob]),
        "alice's approval in bob's name",
        "an approval names its own writer",
    )?;
    let by_agent = format!("agentguard.io/approve.coder={value}.system:serviceaccount:agents:coder");
    rejects(
        w.plane.kubectl(&w.agent, &["annotate", "deployment", "db", "-n", &ns, &by_agent]),
        "the agent's own approval",
        "agents may not set or change",
    )?;
    let by_mallory = format!("agentguard.io/approve.mallory={value}.mallory");
    rejects(
        w.plane.kubectl(&w.mallory, &["annotate", "deployment", "db", "-n", &ns, &by_mallory]),
        "mallory's approval",
        "mallory is not an approver",
    )?;
    rejects(w.plane.kubectl(&w.editor, &delete), "the delete after refused approvals", "1 more needed")?;

    // Bob approves with the named command the denial printed.
    let by_bob = format!("agentguard.io/approve.bob={value}.bob");
    accepts(w.plane.kubectl(&bob, &["annotate", "deployment", "db", "-n", &ns, &by_bob]), "bob's approval")?;
    accepts(w.plane.kubectl(&w.editor, &delete), "the delete approved by alice and bob")?;
    ensure!(!exists(w, &ns, "deployment", "db"), "the approved delete did not happen");

    // The audit trail names both approvers, each from agentguard's own Event of their write.
    let record = record(w, &ns, "DELETE", "db")?;
    ensure!(record["spec"]["approvals"].as_array().map(Vec::len) == Some(2), "{record}");
    let approvers = &record["status"]["approvers"];
    ensure!(approvers == &serde_json::json!(["alice", "bob"]), "approvers {approvers} in {record}");
    println!(
        "  held with 0 then 1 of 2; refused: unnamed, twice, in another's name, agent, non-approver; admitted with alice ({alice_key}) and bob"
    );
    Ok(())
}

/// `kubectl agentguard approve deployment/db --yes` as `who`, once the held request's Event is
/// there (it is written off the request path).
fn loop_until_held(w: &World, who: &std::path::Path, ns: &str) -> Result<String> {
    let started = std::time::Instant::now();
    loop {
        let out = plugin(w, who, &["approve", "deployment/db", "-n", ns, "--yes"], "")?;
        if out.status.success() {
            return Ok(text(&out));
        }
        ensure!(
            text(&out).contains("holds no request") && started.elapsed() < std::time::Duration::from_secs(15),
            "{}",
            text(&out)
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// Polls `args` as the agent until the API server admits it (agentguard's cache has seen a new
/// session), for at most ten seconds.
pub(crate) fn admitted_soon(w: &World, who: &std::path::Path, args: &[&str]) -> Result<()> {
    let started = std::time::Instant::now();
    loop {
        let out = w.plane.kubectl(who, args);
        if out.status.success() {
            return Ok(());
        }
        ensure!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "never admitted: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The credential id (`JTI=…`) of the ServiceAccount token in `kubeconfig`, as the API server
/// puts it in `userInfo.extra`.
pub(crate) fn credential_of(kubeconfig: &std::path::Path) -> Result<String> {
    use base64::Engine as _;
    let text = std::fs::read_to_string(kubeconfig)?;
    let token = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .context("no token in the kubeconfig")?
        .trim_matches('"');
    let payload = token.split('.').nth(1).context("not a JWT")?;
    let claims: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?)?;
    Ok(format!("JTI={}", claims["jti"].as_str().context("no jti")?))
}

/// A break-glass session admits exactly what it scopes, as many times as it says, until it is
/// closed; agents can neither open, widen, extend nor reset one; each use is recorded.
pub fn sessions_admit_exactly_their_scope(w: &World) -> Result<()> {
    let ns = namespace(w, "session")?;
    let other = namespace(w, "session-other")?;
    // A session is for one agent's credential: the token `agents:editor` acts with.
    let credential = credential_of(&w.editor)?;
    let brief = namespace(w, "session-brief")?;
    for name in ["a", "b", "c"] {
        deployment(w, &ns, name)?;
    }
    deployment(w, &other, "x")?;
    deployment(w, &brief, "z")?;
    // A session of the shortest lifetime, checked at the end: it admits until it ends.
    must(plugin(
        w,
        &w.alice,
        &[
            "session",
            "open",
            "brief",
            "--agent",
            "agents/editor",
            "--credential",
            &credential,
            "-n",
            &brief,
            "--resource",
            "deployments.apps",
            "--operation",
            "DELETE",
            "--ttl",
            "1m",
            "--reason",
            "a minute",
        ],
        "",
    )?)?;
    let brief_ends = std::time::Instant::now() + std::time::Duration::from_secs(61);
    let brief_dry = ["delete", "deployment", "z", "-n", brief.as_str(), "--dry-run=server"];
    admitted_soon(w, &w.editor, &brief_dry)?;
    let delete = |name: &'static str| ["delete", "deployment", name, "-n", ns.as_str()];
    rejects(
        w.plane.kubectl(&w.editor, &delete("a")),
        "the agent's delete before a session",
        "requires approval",
    )?;

    // Agents never open one, even with cluster-admin.
    let opened_by_agent = format!(
        "apiVersion: agentguard.io/v1alpha1\nkind: AgentSession\nmetadata: {{name: mine}}\nspec:\n  \
         agent: system:serviceaccount:agents:editor\n  namespaces: [{ns}]\n  resources: [deployments.apps]\n  \
         operations: [DELETE]\n  maxOperations: 100\n  ttl: 1h\n  reason: self-service\n  \
         credentialId: {credential}\n  openedBy: {{username: system:serviceaccount:agents:coder, groups: [system:serviceaccounts, system:serviceaccounts:agents, system:authenticated]}}\n"
    );
    rejects(
        w.plane.kubectl_stdin(&w.agent, &["create", "-f", "-"], Some(&opened_by_agent)),
        "an agent opening a session",
        "agents may not",
    )?;
    // A human opens one only as themselves, and only as an approver.
    let as_bob = opened_by_agent.replace(
        "openedBy: {username: system:serviceaccount:agents:coder, groups: [system:serviceaccounts, system:serviceaccounts:agents, system:authenticated]}",
        "openedBy: {username: bob, groups: [sre, system:authenticated]}",
    );
    rejects(
        w.plane.kubectl_stdin(&w.alice, &["create", "-f", "-"], Some(&as_bob)),
        "alice opening a session in bob's name",
        "must be exactly who opens it",
    )?;
    must(w.plane.kubectl(
        &w.plane.admin,
        &["create", "clusterrolebinding", "e2e-dave", "--clusterrole=cluster-admin", "--user=dave"],
    ))?;
    let dave = w.plane.user_kubeconfig("dave", &["ops"])?;
    let by_dave = plugin(
        w,
        &dave,
        &[
            "session",
            "open",
            "daves",
            "--agent",
            "agents/editor",
            "--credential",
            &credential,
            "-n",
            &ns,
            "--resource",
            "deployments.apps",
            "--operation",
            "DELETE",
            "--reason",
            "x",
        ],
        "",
    )?;
    ensure!(
        !by_dave.status.success() && text(&by_dave).contains("dave is not an approver under any"),
        "{}",
        text(&by_dave)
    );

    // Alice opens one for the agent: deployments in one namespace, DELETE only, twice at most.
    let opened = must(plugin(
        w,
        &w.alice,
        &[
            "session",
            "open",
            "migrate",
            "--agent",
            "agents/editor",
            "--credential",
            &credential,
            "-n",
            &ns,
            "--resource",
            "deployments.apps",
            "--operation",
            "DELETE",
            "--max",
            "2",
            "--ttl",
            "10m",
            "--reason",
            "supervised migration",
        ],
        "",
    )?)?;
    ensure!(opened.contains("session migrate opened"), "{opened}");
    // A dry run is judged alike and spends nothing.
    let dry = ["delete", "deployment", "a", "-n", ns.as_str(), "--dry-run=server"];
    admitted_soon(w, &w.editor, &dry)?;
    accepts(w.plane.kubectl(&w.editor, &dry), "a second dry run")?;

    // Outside its scope: held as before.
    rejects(
        w.plane.kubectl(&w.editor, &["delete", "deployment", "x", "-n", &other]),
        "a delete in another namespace",
        "requires approval",
    )?;
    rejects(
        w.plane.kubectl(&w.editor, &["scale", "deployment", "b", "-n", &ns, "--replicas=0"]),
        "a scale (an UPDATE) under a DELETE session",
        "requires approval",
    )?;
    rejects(
        w.plane.kubectl(&w.agent, &["delete", "deployment", "b", "-n", &ns]),
        "another agent's delete",
        "requires approval",
    )?;
    // Another agent acting as it (impersonation: no credential of its own), or the agent with
    // another token of the same ServiceAccount: not the session's credential, held.
    rejects(
        w.plane.kubectl(
            &w.agent,
            &["delete", "deployment", "b", "-n", &ns, "--as=system:serviceaccount:agents:editor"],
        ),
        "another agent impersonating the session's agent",
        "requires approval",
    )?;
    let token = must(w.plane.kubectl(&w.plane.admin, &["create", "token", "editor", "-n", "agents"]))?;
    let token = format!("--token={}", token.trim());
    rejects(
        w.plane.kubectl(&w.editor, &["delete", "deployment", "b", "-n", &ns, &token]),
        "the session's agent with another token",
        "requires approval",
    )?;

    // Agents cannot widen, extend or reset it; nobody changes it.
    rejects(
        w.plane.kubectl(
            &w.agent,
            &["patch", "agentsession", "migrate", "--type=merge", "-p", r#"{"spec":{"maxOperations":100}}"#],
        ),
        "an agent widening the session",
        "never changed or extended",
    )?;
    rejects(
        w.plane.kubectl(&w.agent, &["label", "agentsession", "migrate", "note=mine"]),
        "an agent touching the session",
        "agents may not create, change or delete agentguard policies, sessions or records",
    )?;
    rejects(
        w.plane.kubectl(
            &w.alice,
            &["patch", "agentsession", "migrate", "--type=merge", "-p", r#"{"spec":{"ttl":"100h"}}"#],
        ),
        "extending the session",
        "never changed or extended",
    )?;

    // Within it: exactly two deletes.
    accepts(w.plane.kubectl(&w.editor, &delete("a")), "the first delete under the session")?;
    accepts(w.plane.kubectl(&w.editor, &delete("b")), "the second delete under the session")?;
    rejects(w.plane.kubectl(&w.editor, &delete("c")), "a third delete", "has admitted all 2 operations")?;
    let leases = must(w.plane.kubectl(
        &w.plane.admin,
        &["get", "leases", "-n", "agentguard-system", "-l", "agentguard.io/session-count", "-o", "name"],
    ))?;
    let lease = leases.lines().next().context("no session count lease")?.to_owned();
    rejects(
        w.plane.kubectl(&w.agent, &["delete", &lease, "-n", "agentguard-system"]),
        "an agent resetting the count",
        "agentguard",
    )?;
    let listed = must(plugin(w, &w.alice, &["session", "list"], "")?)?;
    ensure!(
        listed.contains("migrate: system:serviceaccount:agents:editor may DELETE deployments.apps")
            && listed.contains("used 2/2"),
        "{listed}"
    );

    // Each use is recorded with the session.
    let record = record(w, &ns, "DELETE", "a")?;
    let session = record["spec"]["session"].as_str().unwrap_or_default();
    ensure!(
        session.starts_with("migrate (uid ") && session.ends_with("opened by alice: supervised migration"),
        "{record}"
    );
    ensure!(record["spec"]["admission"] == "session", "{record}");

    // Closing ends it at once.
    must(plugin(
        w,
        &w.alice,
        &[
            "session",
            "open",
            "last",
            "--agent",
            "agents/editor",
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
            "--reason",
            "one more",
        ],
        "",
    )?)?;
    admitted_soon(w, &w.editor, &["delete", "deployment", "c", "-n", ns.as_str(), "--dry-run=server"])?;
    must(plugin(w, &w.alice, &["session", "close", "last"], "")?)?;
    let refused = w.plane.kubectl(&w.editor, &delete("c"));
    ensure!(!refused.status.success(), "a delete after the session was closed was admitted");
    ensure!(exists(w, &ns, "deployment", "c"), "c is gone");

    // A closed session's count goes with it (the session owns its Lease).
    must(plugin(w, &w.alice, &["session", "close", "migrate"], "")?)?;
    let started = std::time::Instant::now();
    let lease_name = lease.rsplit('/').next().unwrap_or_default();
    while exists(w, "agentguard-system", "lease", lease_name) {
        ensure!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "{lease} outlived its closed session by 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }

    // The one-minute session has ended: held again.
    std::thread::sleep(brief_ends.saturating_duration_since(std::time::Instant::now()));
    rejects(w.plane.kubectl(&w.editor, &brief_dry), "a delete after the session ended", "requires approval")?;
    println!(
        "  session: 2 deletes admitted, the 3rd refused; out of scope held; agent open/widen/reset refused; closed at once; ended after its ttl"
    );
    Ok(())
}

/// Deleting a claim whose volume's reclaimPolicy is Delete deletes the volume's data too: the
/// delete shows it in its blast radius and is judged as the volume's delete.
pub fn a_claims_delete_takes_its_volumes_data(w: &World) -> Result<()> {
    let ns = namespace(w, "data-loss")?;
    let objects = format!(
        "apiVersion: agentguard.io/v1alpha1\nkind: ClusterAgentPolicy\nmetadata: {{name: e2e-volumes}}\nspec:\n  \
         action: RequireApproval\n  approval: {{approvers: {{groups: [sre]}}, reason: volumes hold data}}\n  \
         rules:\n    - name: volumes\n      operations: [DELETE]\n      resources: [{{apiGroups: [''], resources: [persistentvolumes]}}]\n\
         ---\n{}---\n{}---\n{}---\n{}",
        volume("e2e-pv-delete", "Delete", &ns, "data"),
        volume("e2e-pv-retain", "Retain", &ns, "keep"),
        claim(&ns, "data", "e2e-pv-delete"),
        claim(&ns, "keep", "e2e-pv-retain"),
    );
    must(w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-f", "-"], Some(&objects)))?;
    must(w.plane.kubectl(
        &w.plane.admin,
        &["wait", "--for=condition=Ready", "--timeout=30s", "clusteragentpolicy/e2e-volumes"],
    ))?;
    // The PV controller binds them (and annotates the claims) first: the object reviewed is
    // the bound claim.
    for pvc in ["data", "keep"] {
        must(w.plane.kubectl(
            &w.plane.admin,
            &["wait", "--for=jsonpath={.status.phase}=Bound", "--timeout=30s", "pvc", pvc, "-n", &ns],
        ))?;
    }
    let result = (|| -> Result<()> {
        // Retained data outlives its claim: nothing to hold.
        accepts(
            w.plane.kubectl(&w.editor, &["delete", "pvc", "keep", "-n", &ns]),
            "deleting a claim whose volume is retained",
        )?;
        let denial = rejects(
            w.plane.kubectl(&w.editor, &["delete", "pvc", "data", "-n", &ns, "--wait=false"]),
            "deleting a claim whose volume is deleted with it",
            "requires approval",
        )?;
        ensure!(
            denial.contains("It would also delete: 1 persistentvolumes (e2e-pv-delete) with all their data (reclaimPolicy Delete)"),
            "{denial}"
        );
        ensure!(
            denial.contains(
                "ClusterAgentPolicy \"e2e-volumes\", rule \"volumes (judged as the operation it amounts to"
            ),
            "{denial}"
        );
        let approve = crate::world::approve_command(&denial)?;
        accepts(crate::scenarios::run_as(w, &w.alice, &approve), "alice's approval of the claim's delete")?;
        accepts(
            w.plane.kubectl(&w.editor, &["delete", "pvc", "data", "-n", &ns, "--wait=false"]),
            "the approved delete",
        )?;
        println!(
            "  a claim on a Delete volume: held, its radius names the volume and its data; a Retain claim: admitted"
        );
        Ok(())
    })();
    must(w.plane.kubectl(&w.plane.admin, &["delete", "clusteragentpolicy", "e2e-volumes"]))?;
    for pv in ["e2e-pv-delete", "e2e-pv-retain"] {
        let _ = w.plane.kubectl(&w.plane.admin, &["delete", "pv", pv, "--wait=false"]);
    }
    result
}

pub(crate) fn volume(name: &str, reclaim: &str, ns: &str, claim: &str) -> String {
    format!(
        "apiVersion: v1\nkind: PersistentVolume\nmetadata: {{name: {name}}}\nspec:\n  capacity: {{storage: 1Gi}}\n  \
         accessModes: [ReadWriteOnce]\n  persistentVolumeReclaimPolicy: {reclaim}\n  storageClassName: e2e-manual\n  \
         hostPath: {{path: /tmp/{name}}}\n  claimRef: {{namespace: {ns}, name: {claim}}}\n"
    )
}

pub(crate) fn claim(ns: &str, name: &str, volume: &str) -> String {
    format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  \
         accessModes: [ReadWriteOnce]\n  storageClassName: e2e-manual\n  volumeName: {volume}\n  \
         resources: {{requests: {{storage: 1Gi}}}}\n"
    )
}
