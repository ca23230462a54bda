//! The quick start: a throwaway control plane with agentguard installed, walking an agent's
//! delete through deny → approve → allow with real kubectl output. It then keeps running, with
//! the kubeconfigs printed, until Ctrl-C (or exits at once with `--exit`).
//!
//! agentguard runs as a child process here: before and after every step, on every wait and
//! while the demo idles, it is checked to be alive, and if it has died the demo says so with
//! the end of its log and fails, instead of going on to show requests refused for no visible
//! reason (the agents webhook fails closed). `--agentguard-dies` checks exactly that: it runs
//! the demo again with agentguard killed part-way (`--kill-agentguard-after N`, after the Nth
//! step) and fails unless that run stops there, says so, shows the log and exits non-zero.

// Shared with the end-to-end tests, which use more of them than the demo does.
#[allow(dead_code)]
#[path = "e2e/cluster.rs"]
mod cluster;
#[allow(dead_code)]
#[path = "e2e/world.rs"]
mod world;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail, ensure};
use world::World;

/// What `--agentguard-dies` looks for in the stopped demo's output.
const DIED: &str = "agentguard DIED";

/// Steps shown so far, and the one after which agentguard is killed (`--kill-agentguard-after`).
static STEPS: AtomicUsize = AtomicUsize::new(0);
static KILL_AFTER: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Fails the demo, loudly, when agentguard is no longer running. `when` says where the demo was.
fn alive(world: &World, when: &str) -> Result<()> {
    if let Err(e) = world.agentguard.check_alive() {
        let bar = "=".repeat(78);
        eprintln!(
            "\n{bar}\n{DIED} {when}. The demo stops here: from now on every request of the agent \
             would be refused because the webhook cannot be called, not because of a policy.\n{e:#}\n{bar}"
        );
        bail!("agentguard died {when}");
    }
    Ok(())
}

/// Counts a finished step and, when told to, kills agentguard after it (as a crash would).
fn step_done(world: &World) {
    if STEPS.fetch_add(1, Ordering::SeqCst) + 1 == KILL_AFTER.load(Ordering::SeqCst) {
        println!("\n(--kill-agentguard-after: killing agentguard now)");
        world.agentguard.kill();
    }
}

fn show(world: &World, who: &str, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let shown = format!("[{who}] $ kubectl {}", args.join(" "));
    alive(world, &format!("before `{shown}`"))?;
    println!("\n{shown}");
    let out = world.plane.kubectl_stdin(kubeconfig, args, stdin);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{}", text.trim_end());
    // A refusal printed above may be the webhook's absence rather than a decision.
    alive(world, &format!("during `{shown}`"))?;
    step_done(world);
    Ok(text)
}

/// Runs `agentguard ARGS` as the admin and prints it; retried for up to 5 s while `until`
/// does not hold (Events and records are written off the request path).
fn show_agentguard(world: &World, args: &[&str], until: impl Fn(&str) -> bool) -> Result<String> {
    let shown = format!("[admin] $ agentguard {}", args.join(" "));
    alive(world, &format!("before `{shown}`"))?;
    println!("\n{shown}");
    let started = std::time::Instant::now();
    loop {
        alive(world, &format!("while waiting for `{shown}`"))?;
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
            step_done(world);
            return Ok(text);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--agentguard-dies") {
        return agentguard_dies();
    }
    if let Some(n) = args.iter().position(|a| a == "--kill-agentguard-after").and_then(|i| args.get(i + 1)) {
        KILL_AFTER.store(n.parse().context("--kill-agentguard-after takes a step number")?, Ordering::SeqCst);
    }
    let exit = args.iter().any(|a| a == "--exit");
    println!("Starting etcd, kube-apiserver, kube-controller-manager and agentguard on 127.0.0.1 ...");
    let world = World::start()?;
    let admin = world.plane.admin.clone();
    println!(
        "Control plane ready in {:.1}s. Policies: e2e-workloads (deployments need approval), e2e-namespaces, e2e-config-trial (Warn).",
        world.plane.startup.as_secs_f64()
    );

    show(&world, "admin", &admin, &["create", "namespace", "demo"], None)?;
    show(
        &world,
        "admin",
        &admin,
        &["create", "deployment", "web", "-n", "demo", "--image=nginx:1.27"],
        None,
    )?;
    // The deployment controller writes its revision annotation at once: the agent acts on the
    // object as it then stays, as a human would review it.
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(30) {
        alive(&world, "while waiting for the deployment's revision")?;
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
    let denial = show(&world, "agent", &world.agent, &["delete", "deployment", "web", "-n", "demo"], None)?;
    let command: Vec<String> = denial
        .split_once("runs: kubectl ")
        .and_then(|(_, rest)| rest.split_once(" — then retry"))
        .map(|(cmd, _)| cmd.split_whitespace().map(str::to_owned).collect())
        .context("the denial carries no approve command")?;
    let args: Vec<&str> = command.iter().map(String::as_str).collect();
    show_agentguard(&world, &["pending", "-n", "demo"], |out| out.contains("approve:"))?;
    show(&world, "alice (sre, an approver)", &world.alice, &args, None)?;
    show(&world, "agent", &world.agent, &["delete", "deployment", "web", "-n", "demo"], None)?;
    // The audit trail: the record of that delete, with the Deployment as it was.
    show(&world, "admin", &admin, &["get", "agentchanges", "-n", "agentguard-system"], None)?;
    show(
        &world,
        "agent",
        &world.agent,
        &["label", "serviceaccount", "coder", "-n", "agents", "agentguard.io/agent-"],
        None,
    )?;
    // A Namespace's delete is held with its blast radius: what would go with it, before anyone approves.
    show(
        &world,
        "admin",
        &admin,
        &["create", "deployment", "api", "-n", "demo", "--image=nginx:1.27"],
        None,
    )?;
    let held = show(&world, "agent", &world.agent, &["delete", "namespace", "demo"], None)?;
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
        return alive(&world, "by the end of the walk-through");
    }
    println!("\nPress Ctrl-C to stop everything and remove the temporary files.");
    // Idle, but still watching: a cluster whose agentguard died is not what was printed above.
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            tokio::select! {
                stopped = &mut ctrl_c => return stopped.map_err(Into::into),
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {
                    alive(&world, "while the demo kept the cluster up")?;
                }
            }
        }
    })
}

/// Runs the demo again with agentguard killed after its third step (the agent's delete, refused
/// with the approve command), and checks that the demo notices at once: it fails, says agentguard
/// died, shows how it exited and its log, and shows no step after that.
fn agentguard_dies() -> Result<()> {
    let exe = std::env::current_exe()?;
    println!("Running the demo with agentguard killed after its third step ...");
    let out = std::process::Command::new(exe)
        .args(["--exit", "--kill-agentguard-after", "3"])
        .stdin(std::process::Stdio::null())
        .output()
        .context("running the demo")?;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("--- its output ---\n{stdout}\n--- its errors ---\n{stderr}\n---");
    ensure!(!out.status.success(), "the demo went on to succeed with agentguard dead ({})", out.status);
    ensure!(stdout.contains("requires approval under"), "the demo did not get as far as the agent's denial");
    ensure!(
        stderr.contains(&format!("{DIED} before `[admin] $ agentguard pending")),
        "the demo did not say that agentguard died, before the next step"
    );
    ensure!(stderr.contains("signal: 9"), "the demo did not say how agentguard exited");
    ensure!(stderr.contains("agentguard.log"), "the demo did not point at agentguard's log");
    // agentguard logs JSON lines: the tail shown is its log, not something else.
    ensure!(stderr.contains(r#""level":"#), "the demo did not show the end of agentguard's log");
    for later in ["[alice", "Keep going:"] {
        ensure!(!stdout.contains(later), "the demo went on to {later:?} with agentguard dead");
    }
    println!(
        "ok: the demo stopped at once, said agentguard died, showed its log and exited with {}",
        out.status
    );
    Ok(())
}
