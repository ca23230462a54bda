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

fn main() -> Result<()> {
    let exit = std::env::args().any(|a| a == "--exit");
    println!("Starting etcd, kube-apiserver and agentguard on 127.0.0.1 ...");
    let world = World::start()?;
    let admin = world.plane.admin.clone();
    println!(
        "Control plane ready in {:.1}s. Policies: e2e-workloads (deployments need approval), e2e-namespaces, e2e-config-trial (Warn).",
        world.plane.startup.as_secs_f64()
    );

    show(&world, "admin", &admin, &["create", "namespace", "demo"], None);
    show(&world, "admin", &admin, &["create", "deployment", "web", "-n", "demo", "--image=nginx:1.27"], None);
    let denial = show(&world, "agent", &world.agent, &["delete", "deployment", "web", "-n", "demo"], None);
    let command: Vec<String> = denial
        .split_once("runs: kubectl ")
        .and_then(|(_, rest)| rest.split_once(" — then retry"))
        .map(|(cmd, _)| cmd.split_whitespace().map(str::to_owned).collect())
        .context("the denial carries no approve command")?;
    let args: Vec<&str> = command.iter().map(String::as_str).collect();
    show(&world, "alice (sre, an approver)", &world.alice, &args, None);
    show(&world, "agent", &world.agent, &["delete", "deployment", "web", "-n", "demo"], None);
    show(
        &world,
        "agent",
        &world.agent,
        &["label", "serviceaccount", "coder", "-n", "agents", "agentguard.io/agent-"],
        None,
    );

    let token = std::fs::read_to_string(&world.agent)?
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: ").map(str::to_owned))
        .unwrap_or_default();
    println!("\nKeep going:");
    println!("  export KUBECONFIG={}          # cluster-admin", admin.display());
    println!("  kubectl --kubeconfig {} ...   # the agent", world.agent.display());
    println!("  kubectl --kubeconfig {} ...   # alice, an approver", world.alice.display());
    println!("  agent token: {token}");
    println!("  agentguard metrics: {}/metrics", world.agentguard.admin);
    if exit {
        return Ok(());
    }
    println!("\nPress Ctrl-C to stop everything and remove the temporary files.");
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(tokio::signal::ctrl_c())?;
    Ok(())
}
