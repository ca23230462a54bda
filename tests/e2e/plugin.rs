//! `kubectl agentguard`: the binary run by real kubectl as a plugin (a `kubectl-agentguard`
//! link on PATH): `why` names the policy and rule, `approve` approves a held delete, `freeze`
//! stops one agent's writes and `unfreeze` lifts it; and the audit trail, the log and `pending`
//! say which credential made an agent's change.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::scenarios::{deployment, namespace};
use crate::world::{World, accepts, must, rejects};

/// Runs `kubectl agentguard ARGS` as the identity of `kubeconfig`, with `stdin` as its input.
pub(crate) fn plugin(w: &World, kubeconfig: &Path, args: &[&str], stdin: &str) -> Result<Output> {
    let dir = tempfile::tempdir()?;
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_agentguard"), dir.path().join("kubectl-agentguard"))?;
    let path = std::env::join_paths(
        std::iter::once(dir.path().to_owned())
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )?;
    let mut child = Command::new(&w.plane.kubectl)
        .env("KUBECONFIG", kubeconfig)
        .env("PATH", path)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .arg("agentguard")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running kubectl agentguard")?;
    use std::io::Write;
    child.stdin.take().context("stdin")?.write_all(stdin.as_bytes())?;
    Ok(child.wait_with_output()?)
}

pub(crate) fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

pub fn approve_and_why(w: &World) -> Result<()> {
    let ns = namespace(w, "plugin-approve")?;
    deployment(w, &ns, "web")?;

    let why = must(plugin(w, &w.plane.admin, &["why", "deployment/web", "-n", &ns], "")?)?;
    for needle in [
        "DELETE by an agent:\n  ClusterAgentPolicy \"e2e-workloads\", rule \"workloads\": RequireApproval, for every agent\n    approvers: users alice; groups sre",
        "→ any agent's DELETE is held for approval",
        "UPDATE by an agent:\n  ClusterAgentPolicy \"e2e-workloads\", rule \"workloads\": RequireApproval",
    ] {
        ensure!(why.contains(needle), "`why` lacks {needle:?}:\n{why}");
    }
    println!("  why: {}", why.lines().find(|l| l.contains("rule")).unwrap_or_default().trim());

    // Nothing is held yet: nothing to approve.
    let none = plugin(w, &w.alice, &["approve", "deployment/web", "-n", &ns, "--yes"], "")?;
    ensure!(!none.status.success() && text(&none).contains("holds no request"), "{}", text(&none));

    rejects(
        w.plane.kubectl(&w.editor, &["delete", "deployment", "web", "-n", &ns]),
        "the agent's delete",
        "requires approval",
    )?;
    // The Event is written off the request path: wait for approve to find it. Answering "n"
    // writes nothing.
    let started = Instant::now();
    let declined = loop {
        let out = plugin(w, &w.alice, &["approve", "deploy/web", "-n", &ns], "n\n")?;
        if !text(&out).contains("holds no request") {
            break out;
        }
        ensure!(started.elapsed() < Duration::from_secs(15), "the held delete never showed: {}", text(&out));
        std::thread::sleep(Duration::from_millis(250));
    };
    let shown = text(&declined);
    ensure!(!declined.status.success() && shown.contains("not approved"), "{shown}");
    ensure!(
        shown.contains("held at") && shown.contains("for system:serviceaccount:agents:editor"),
        "{shown}"
    );
    ensure!(shown.contains("requires approval under ClusterAgentPolicy \"e2e-workloads\""), "{shown}");
    ensure!(
        shown.contains("from: credential-id=JTI="),
        "the held request does not say its credential:\n{shown}"
    );
    rejects(
        w.plane.kubectl(&w.editor, &["delete", "deployment", "web", "-n", &ns]),
        "the agent's delete after a declined approval",
        "requires approval",
    )?;

    // mallory is no approver: the webhook refuses her approval as any other.
    let refused = plugin(w, &w.mallory, &["approve", "deployment/web", "-n", &ns, "--yes"], "")?;
    ensure!(!refused.status.success() && text(&refused).contains("is not an approver"), "{}", text(&refused));

    let approved = must(plugin(w, &w.alice, &["approve", "deployment/web", "-n", &ns, "--yes"], "")?)?;
    ensure!(approved.contains(&format!("approved: deployments.apps web -n {ns}")), "{approved}");
    println!("  {}", approved.lines().last().unwrap_or_default());
    accepts(w.plane.kubectl(&w.editor, &["delete", "deployment", "web", "-n", &ns]), "the approved delete")?;

    // The record of the approved delete says which credential made it.
    let records: Value = serde_json::from_str(&must(
        w.plane.kubectl(&w.plane.admin, &["get", "agentchanges", "-n", "agentguard-system", "-o", "json"]),
    )?)?;
    let record = records["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["spec"]["target"]["namespace"] == ns.as_str() && r["spec"]["target"]["name"] == "web")
        .context("no record of the approved delete")?;
    let credential = record["spec"]["attribution"]["credentialId"].as_str().unwrap_or_default();
    ensure!(credential.starts_with("JTI="), "no credential id in the record: {record}");
    ensure!(record["spec"]["attribution"].get("podName").is_none(), "a token not bound to a pod names one");
    // …and so does the decision's log line.
    let log = std::fs::read_to_string(w.plane.dir.path().join("agentguard.log"))?;
    let logged = log.lines().any(|l| {
        l.contains(&format!("\"namespace\":\"{ns}\""))
            && l.contains(&format!("\"attribution\":\"credential-id={credential}\""))
    });
    ensure!(logged, "no log line of {ns} carries credential-id={credential}");
    println!("  record and log: credential-id={credential}");
    Ok(())
}

/// Deletes a freeze policy however the scenario ends: a frozen agent would fail every later one.
struct Thaw<'a>(&'a World);

impl Drop for Thaw<'_> {
    fn drop(&mut self) {
        let _ = self.0.plane.kubectl(
            &self.0.plane.admin,
            &["delete", "clusteragentpolicies", "-l", "agentguard.io/freeze=true", "--ignore-not-found"],
        );
    }
}

pub fn freeze_and_unfreeze(w: &World) -> Result<()> {
    let ns = namespace(w, "plugin-freeze")?;
    must(w.plane.kubectl(&w.plane.admin, &["create", "configmap", "c", "-n", &ns]))?;
    let label = |who: &Path, i: u32| {
        w.plane.kubectl(who, &["label", "configmap", "c", "-n", &ns, &format!("n={i}"), "--overwrite"])
    };
    accepts(label(&w.editor, 0), "the editor's write before the freeze")?;

    let _thaw = Thaw(w);
    let asked = Instant::now();
    let frozen =
        must(plugin(w, &w.plane.admin, &["freeze", "agents/editor", "--reason", "e2e emergency stop"], "")?)?;
    let returned = Instant::now();
    ensure!(frozen.contains("frozen: system:serviceaccount:agents:editor"), "{frozen}");
    // The agent's next write is refused; measured from `freeze` returning to the refusal.
    let mut i = 1;
    let refusal = loop {
        let out = label(&w.editor, i);
        if !out.status.success() {
            break String::from_utf8_lossy(&out.stderr).into_owned();
        }
        ensure!(returned.elapsed() < Duration::from_secs(10), "the frozen agent still writes after 10s");
        i += 1;
    };
    let latency = returned.elapsed();
    ensure!(refusal.contains("is frozen (agentguard freeze): e2e emergency stop"), "{refusal}");
    ensure!(latency < Duration::from_secs(1), "first refusal {latency:?} after freeze returned");
    println!(
        "  freeze took {:.0} ms; the frozen agent's first refused write ended {:.0} ms after it returned ({} admitted before)",
        (returned - asked).as_secs_f64() * 1000.0,
        latency.as_secs_f64() * 1000.0,
        i - 1
    );
    // Deletes too, and an approval cannot lift a Deny.
    rejects(
        w.plane.kubectl(&w.editor, &["delete", "configmap", "c", "-n", &ns]),
        "the frozen agent's delete",
        "is frozen",
    )?;
    // Another agent, a ServiceAccount that is no agent, and a human are untouched.
    accepts(label(&w.agent, 100), "another agent's write")?;
    accepts(label(&w.helper, 101), "a controller's write")?;
    accepts(label(&w.mallory, 102), "a human's write")?;

    let out = must(plugin(w, &w.plane.admin, &["unfreeze", "agents/editor"], "")?)?;
    ensure!(out.contains("unfrozen: system:serviceaccount:agents:editor"), "{out}");
    let lifted = unfrozen(w, &label)?;
    println!("  unfrozen: admitted again {:.0} ms after unfreeze returned", lifted.as_secs_f64() * 1000.0);
    let again = plugin(w, &w.plane.admin, &["unfreeze", "agents/editor"], "")?;
    ensure!(!again.status.success() && text(&again).contains("is not frozen"), "{}", text(&again));

    // Without waiting for the status: how long the stored policy takes to refuse.
    let out = must(plugin(w, &w.plane.admin, &["freeze", "agents/editor", "--no-wait"], "")?)?;
    ensure!(out.contains("frozen (stored, not confirmed)"), "{out}");
    let stored = Instant::now();
    let mut admitted = 0;
    while label(&w.editor, 300 + admitted).status.success() {
        ensure!(stored.elapsed() < Duration::from_secs(10), "the frozen agent still writes after 10s");
        admitted += 1;
    }
    let in_force = stored.elapsed();
    ensure!(in_force < Duration::from_secs(1), "the stored freeze took {in_force:?} to refuse");
    println!(
        "  freeze --no-wait: first refused write ended {:.0} ms after the policy was stored ({admitted} admitted before)",
        in_force.as_secs_f64() * 1000.0
    );
    must(plugin(w, &w.plane.admin, &["unfreeze", "agents/editor"], "")?)?;
    unfrozen(w, &label)?;
    Ok(())
}

/// A frozen agent creates nothing (`kubectl create`, or server-side apply of a new object), while
/// every other identity's CREATE, another agent's included, is admitted as before; once
/// unfrozen, it creates again.
pub fn freeze_stops_creates(w: &World) -> Result<()> {
    let ns = namespace(w, "plugin-freeze-create")?;
    let create = |who: &Path, name: &str| w.plane.kubectl(who, &["create", "configmap", name, "-n", &ns]);
    let exists =
        |name: &str| w.plane.kubectl(&w.plane.admin, &["get", "configmap", name, "-n", &ns]).status.success();
    accepts(create(&w.editor, "before"), "the editor's create before the freeze")?;

    let _thaw = Thaw(w);
    let frozen =
        must(plugin(w, &w.plane.admin, &["freeze", "agents/editor", "--reason", "e2e create stop"], "")?)?;
    ensure!(frozen.contains("frozen: system:serviceaccount:agents:editor"), "{frozen}");
    // Ready means every replica's cache has the policy: the first CREATE is refused.
    rejects(
        create(&w.editor, "during"),
        "the frozen agent's create",
        "is frozen (agentguard freeze): e2e create stop",
    )?;
    ensure!(!exists("during"), "the frozen agent's ConfigMap was stored");
    // Creating through server-side apply (a PATCH the API server admits as a CREATE).
    let manifest = format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: applied, namespace: {ns}}}\n");
    rejects(
        w.plane.kubectl_stdin(&w.editor, &["apply", "--server-side", "-f", "-"], Some(&manifest)),
        "the frozen agent's server-side apply of a new object",
        "is frozen",
    )?;
    ensure!(!exists("applied"), "the frozen agent's applied ConfigMap was stored");
    // Another agent, a ServiceAccount that is no agent, and a human create as before.
    accepts(create(&w.agent, "by-another-agent"), "another agent's create")?;
    accepts(create(&w.helper, "by-a-controller"), "a controller's create")?;
    accepts(create(&w.mallory, "by-a-human"), "a human's create")?;

    must(plugin(w, &w.plane.admin, &["unfreeze", "agents/editor"], "")?)?;
    let lifted = Instant::now();
    let mut attempt = 0;
    while !create(&w.editor, &format!("after-{attempt}")).status.success() {
        ensure!(
            lifted.elapsed() < Duration::from_secs(10),
            "the agent still cannot create 10s after unfreeze"
        );
        attempt += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(exists(&format!("after-{attempt}")), "the unfrozen agent's ConfigMap is not stored");
    println!(
        "  unfrozen: the agent creates again {:.0} ms after unfreeze returned",
        lifted.elapsed().as_secs_f64() * 1000.0
    );
    Ok(())
}

/// Waits until the editor's write is admitted again: how long an unfreeze took to apply.
fn unfrozen(w: &World, label: &dyn Fn(&Path, u32) -> Output) -> Result<Duration> {
    let lifted = Instant::now();
    // A new value each time: a write that changes nothing is admitted even to a frozen agent.
    for attempt in 1000.. {
        if label(&w.editor, attempt).status.success() {
            return Ok(lifted.elapsed());
        }
        ensure!(lifted.elapsed() < Duration::from_secs(10), "the agent is still frozen 10s after unfreeze");
        std::thread::sleep(Duration::from_millis(100));
    }
    unreachable!("the loop returns or fails")
}
