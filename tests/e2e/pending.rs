//! `agentguard pending` on the real API server: a held request is listed with who, what and the
//! command that approves it; running that command takes it off the list.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::world::{World, must, rejects};

const NS: &str = "e2e-pending";

fn pending(w: &World, output: &str) -> Result<String> {
    must(
        Command::new(env!("CARGO_BIN_EXE_agentguard"))
            .env("KUBECONFIG", &w.plane.admin)
            .args(["pending", "-n", NS, "-o", output, "--log-format=plain"])
            .output()?,
    )
}

/// Polls `pending -o json` until `done` holds (Events are written off the request path).
fn wait_for(w: &World, what: &str, done: impl Fn(&[Value]) -> bool) -> Result<Vec<Value>> {
    let started = Instant::now();
    loop {
        let items: Vec<Value> = serde_json::from_str(&pending(w, "json")?)?;
        if done(&items) {
            return Ok(items);
        }
        ensure!(started.elapsed() < Duration::from_secs(15), "{what}: still {items:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

pub fn lists_held_requests_until_approved(w: &World) -> Result<()> {
    must(w.plane.kubectl(&w.plane.admin, &["create", "namespace", NS]))?;
    w.grant_edit(NS)?;
    must(w.plane.kubectl(&w.plane.admin, &["create", "deployment", "web", "-n", NS, "--image=nginx:1.27"]))?;
    rejects(
        w.plane.kubectl(&w.editor, &["delete", "deployment", "web", "-n", NS]),
        "the agent's delete",
        "requires approval",
    )?;
    let items = wait_for(w, "the held delete is not listed", |items| !items.is_empty())?;
    ensure!(items.len() == 1, "one request is waiting, listed {items:?}");
    let item = &items[0];
    ensure!(item["requester"] == "system:serviceaccount:agents:editor", "requester: {item}");
    ensure!(item["kind"] == "Deployment" && item["name"] == "web", "object: {item}");
    let command = item["approveCommand"].as_str().context("no approve command")?;
    let table = pending(w, "table")?;
    ensure!(table.contains(&format!("  approve: {command}")), "the table lacks the command:\n{table}");

    let args: Vec<&str> = command.split_whitespace().collect();
    ensure!(args[0] == "kubectl", "not a kubectl command: {command}");
    must(w.plane.kubectl(&w.alice, &args[1..]))?;
    wait_for(w, "the approved request is still listed", |items| items.is_empty())?;
    println!("  listed with `{command}`; gone once alice ran it");
    Ok(())
}
