//! The quick start: a throwaway control plane with agentguard installed, walking an agent's
//! delete through deny → approve → allow with real kubectl output. It then keeps running, with
//! the kubeconfigs printed, until Ctrl-C (or exits at once with `--exit`).

// Shared with the end-to-end tests, which use more of them than the demo does.
#[allow(dead_code)]
#[path = "e2e/cluster.rs"]
mod cluster;
#[allow(dead_code)]
#[path = "e2e/world.rs"]
mod world;

use std::path::Path;

use anyhow::{Context, Result};
use world::World;

fn show(world: &World, who: &str, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> String {
    println!("\n[{who}] $ kubectl {}", args.join(" "));
    let out = world.plane.kubectl_stdin(kubeconfig, args, stdin);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{}", text.trim_end());
    text
}

/// Runs `agentguard ARGS` as the admin and prints it; retried for up to 5 s while `until`
/// does not hold (Events and records are written off the request path).
fn show_agentguard(world: &World, args: &[&str], until: impl Fn(&str) -> bool) -> String {
    println!("\n[admin] $ agentguard {}", args.join(" "));
    let started = std::time::Instant::now();
    loop {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentguard"))
            .env("KUBECONFIG", &world.plane.admin)
            .args(args)
            .arg("--log-format=plain")
            .output();
        let text = out
            .map(|o| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)));
        let text = text.unwrap_or_else(|e| format!("cannot run agentguard: {e}"));
        if until(&text) || started.elapsed() > std::time::Duration::from_secs(5) {
            println!("{}", text.trim_end());
            return text;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn main() -> Result<()> {
    let exit = std::env::args().any(|a| a == "--exit");
    println!("Starting etcd, kube-apiserver, kube-controller-manager and agentguard on 127.0.0.1 ...");
    let world = World::start()?;
    let admin = world.plane.admin.clone();
    println!(
        "Control plane ready in {:.1}s. Policies: e2e-workloads (deployments need approval), e2e-namespaces, e2e-config-trial (Warn).",
        world.plane.startup.as_secs_f64()
    );

    show(&world, "admin", &admin, &["create", "namespace", "demo"], None);
    show(&world, "admin", &admin, &["create", "deployment", "web", "-n", "demo", "--image=nginx:1.27"], None);
    // The deployment controller writes its revision annotation at once: the agent acts on the
    // object as it then stays, as a human would review it.
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(30) {
        let revision = world.plane.kubectl(
            &admin,
            &[
                "get",
                "deployment",
                "web",
                "-n",
                "demo",
                "-o",
                r"jsonpath={.metadata.annotations.deployment\.kubernetes\.io/revision}",
            ],
        );
        if !revision.stdout.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let denial = show(&world, "agent", &world.agent, &["delete", "deployment", "web", "-n", "demo"], None);
    let command: Vec<String> = denial
        .split_once("runs: kubectl ")
        .and_then(|(_, rest)| rest.split_once(" — then retry"))
        .map(|(cmd, _)| cmd.split_whitespace().map(str::to_owned).collect())
        .context("the denial carries no approve command")?;
    let args: Vec<&str> = command.iter().map(String::as_str).collect();
    show_agentguard(&world, &["pending", "-n", "demo"], |out| out.contains("approve:"));
    show(&world, "alice (sre, an approver)", &world.alice, &args, None);
    show(&world, "agent", &world.agent, &["delete", "deployment", "web", "-n", "demo"], None);
    // The audit trail: the record of that delete, with the Deployment as it was.
    show(&world, "admin", &admin, &["get", "agentchanges", "-n", "agentguard-system"], None);
    show(
        &world,
        "agent",
        &world.agent,
        &["label", "serviceaccount", "coder", "-n", "agents", "agentguard.io/agent-"],
        None,
    );
    // A Namespace's delete is held with its blast radius: what would go with it, before anyone approves.
    show(&world, "admin", &admin, &["create", "deployment", "api", "-n", "demo", "--image=nginx:1.27"], None);
    let held = show(&world, "agent", &world.agent, &["delete", "namespace", "demo"], None);
    anyhow::ensure!(
        held.contains("It would also delete: 1 deployments.apps (api)"),
        "the namespace's delete does not show its blast radius:\n{held}"
    );

    // Kubeconfig paths only: the agent's bearer token stays in its file, out of terminals and logs.
    println!("\nKeep going:");
    println!("  export KUBECONFIG={}          # cluster-admin", admin.display());
    println!(
        "  kubectl --kubeconfig {} ...   # the agent (a ServiceAccount labelled as an agent)",
        world.agent.display()
    );
    println!("  kubectl --kubeconfig {} ...   # alice, an approver (group sre)", world.alice.display());
    println!(
        "  kubectl --kubeconfig {} ...   # mallory, edit everywhere, not an approver",
        world.mallory.display()
    );
    println!(
        "  This control plane has etcd, kube-apiserver and kube-controller-manager (garbage collection, \
         namespace deletion) but no node: pods stay Pending. `hack/demo.sh --cluster` runs the chart on a node."
    );
    println!("  agentguard metrics: {}/metrics", world.agentguard.admin);
    if exit {
        return Ok(());
    }
    println!("\nPress Ctrl-C to stop everything and remove the temporary files.");
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(tokio::signal::ctrl_c())?;
    Ok(())
}
