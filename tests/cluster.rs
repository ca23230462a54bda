//! The chart for real, on a one-node cluster: the test control plane (etcd, kube-apiserver,
//! kube-controller-manager) plus kube-scheduler and a node (kubelet, kube-proxy, containerd,
//! runc, CNI bridge; `support/node.rs`). `helm install` with the chart's defaults and only the
//! image overridden (built by `hack/image.sh` and imported into containerd): three replicas,
//! self-managed certificates, the PodDisruptionBudget, the hardened pod. The API server reaches
//! agentguard through its Service (kube-proxy's rules), agentguard reaches the API server through
//! the `kubernetes` Service. Then, with real kubectl and a real agent ServiceAccount token: an
//! agent's delete held and approved, a human's untouched, `kubectl rollout restart` under a stream
//! of agent and human requests, a replica killed and one deleted under the same stream, a drain
//! stopped by the PodDisruptionBudget, `helm upgrade` to a new image tag, `helm uninstall`.
//!
//! `-- --demo` walks only the deny → approve story with its commands printed, then keeps the
//! cluster up until Ctrl-C (or stops at once with `--exit`): `hack/demo.sh --cluster`.
//!
//! Needs root and the variables of `hack/k8s-binaries.sh`, `hack/node.sh` and `hack/image.sh`;
//! run through hack/test.sh. On a machine that cannot run a node it says why and skips.

#[allow(dead_code)]
#[path = "e2e/cluster.rs"]
mod cluster;
#[allow(dead_code)]
#[path = "support/node.rs"]
mod node;
#[allow(dead_code)]
#[path = "e2e/world.rs"]
mod world;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cluster::{Binaries, ControlPlane};
use node::{Node, NodeBinaries};
use world::{accepts, must, rejects};

const NS: &str = "agentguard-system";
const RELEASE: &str = "agentguard";
const SELECTOR: &str = "app.kubernetes.io/name=agentguard";
/// The chart's default memory limit (values.yaml `resources.limits.memory`: 256Mi).
const MEMORY_LIMIT: u64 = 256 * 1024 * 1024;

/// Fields drop in order: the node (its pods leave through the kubelet) before the control plane.
struct Cluster {
    node: Node,
    plane: ControlPlane,
    helm: PathBuf,
    image: String,
    /// Printing every command and its output (the demo).
    verbose: bool,
}

fn kubectl(bin: &Path, kubeconfig: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("kubectl runs")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

impl Cluster {
    fn admin(&self, args: &[&str]) -> Result<String> {
        must(self.plane.kubectl(&self.plane.admin, args)).map(|s| s.trim().to_owned())
    }

    /// kubectl as `who`, printed with its output in the demo.
    fn as_user(&self, who: &str, kubeconfig: &Path, args: &[&str]) -> Output {
        let out = self.plane.kubectl(kubeconfig, args);
        if self.verbose {
            println!("\n[{who}] $ kubectl {}", args.join(" "));
            println!("{}", text(&out).trim_end());
        }
        out
    }

    fn helm(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.helm).env("KUBECONFIG", &self.plane.admin).args(args).output()?;
        must(out)
    }

    fn image_values(&self, tag: &str) -> Vec<String> {
        let repository = self.image.rsplit_once(':').map_or(self.image.as_str(), |(r, _)| r);
        vec![
            "--set".into(),
            format!("image.repository={repository}"),
            "--set".into(),
            format!("image.tag={tag}"),
        ]
    }

    /// Names of agentguard's pods that are Ready.
    fn ready_pods(&self) -> Result<Vec<String>> {
        let out = self.admin(&[
            "get",
            "pods",
            "-n",
            NS,
            "-l",
            SELECTOR,
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.metadata.deletionTimestamp} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
        ])?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 2 && f[1] == "True").then(|| f[0].to_owned())
            })
            .collect())
    }

    fn wait_ready_pods(&self, n: usize, limit: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let ready = self.ready_pods()?;
            if ready.len() >= n {
                return Ok(started.elapsed());
            }
            let crashing = self
                .admin(&[
                    "get",
                    "pods",
                    "-n",
                    NS,
                    "-l",
                    SELECTOR,
                    "-o",
                    "jsonpath={.items[*].status.containerStatuses[*].restartCount}",
                ])?
                .split_whitespace()
                .any(|n| n.parse::<u32>().unwrap_or(0) >= 3);
            if started.elapsed() > limit || crashing {
                let pods = self.admin(&["get", "pods", "-n", NS, "-o", "wide"]).unwrap_or_default();
                let events =
                    self.admin(&["get", "events", "-n", NS, "--sort-by=.lastTimestamp"]).unwrap_or_default();
                bail!(
                    "{} of {n} agentguard pods Ready after {:?}:\n{pods}\n{events}\nkubelet:\n{}\ncontainers:\n{}",
                    ready.len(),
                    started.elapsed(),
                    self.node.log_tail("kubelet", 30),
                    self.node.pod_logs(NS, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits until kube-proxy routes agentguard's Service to `n` pods (the API server calls the
    /// webhook through it).
    fn wait_routed(&self, n: usize, limit: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let routed = self.node.routed_endpoints(NS, RELEASE, "webhook");
            if routed == n {
                return Ok(started.elapsed());
            }
            ensure!(
                started.elapsed() < limit,
                "kube-proxy routes the webhook Service to {routed} pods, not {n}, after {limit:?}:\n{}",
                self.node.log_tail("kube-proxy", 20)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until agentguard's webhook configuration names `username` as an agent.
    fn wait_for_agent(&self, username: &str) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let expr = self
                .admin(&[
                    "get",
                    "validatingwebhookconfiguration",
                    RELEASE,
                    "-o",
                    "jsonpath={.webhooks[*].matchConditions[*].expression}",
                ])
                .unwrap_or_default();
            if expr.contains(username) {
                return Ok(started.elapsed());
            }
            ensure!(started.elapsed() < Duration::from_secs(60), "{username} never registered: {expr}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The containerd id of a pod's agentguard container.
    fn container_id(&self, pod: &str) -> Result<String> {
        let id = self.admin(&[
            "get",
            "pod",
            pod,
            "-n",
            NS,
            "-o",
            "jsonpath={.status.containerStatuses[0].containerID}",
        ])?;
        id.strip_prefix("containerd://")
            .map(str::to_owned)
            .with_context(|| format!("{pod} has container {id:?}"))
    }
}

/// The approve command a denial carries (`kubectl annotate ...`), as kubectl's arguments. Read
/// from the message rather than built here, so that the test follows the message's format.
fn approve_command(denial: &str) -> Result<Vec<String>> {
    let start =
        denial.find("kubectl annotate").context("the denial carries no `kubectl annotate` command")?;
    let rest = &denial[start..];
    let end = rest.find(['—', '`', '\n', '"', '\'']).unwrap_or(rest.len());
    let command = rest[..end].trim().trim_end_matches(['.', ',', ';', ')']);
    Ok(command.split_whitespace().skip(1).map(str::to_owned).collect())
}

/// What a stream of requests saw.
#[derive(Debug, Default)]
struct Tally {
    agent_requests: u32,
    /// Agent deletes that were admitted: must stay 0.
    agent_admitted: u32,
    /// Refused by agentguard with its approve command: answered.
    agent_held: u32,
    /// Refused because the webhook could not be called (fail-closed): safe, but unanswered.
    agent_unreachable: u32,
    agent_other: Vec<String>,
    human_requests: u32,
    human_failed: Vec<String>,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "agent deletes {} (held by agentguard {}, refused fail-closed {}, other errors {}, wrongly admitted {}); human requests {} (failed {})",
            self.agent_requests,
            self.agent_held,
            self.agent_unreachable,
            self.agent_other.len(),
            self.agent_admitted,
            self.human_requests,
            self.human_failed.len()
        )
    }
}

/// Concurrent request loops of each kind in [`stream`].
const STREAMS: u32 = 2;

/// Agent deletes of the `keep-*` Deployments and human create+delete of Deployments in `demo`,
/// back to back in [`STREAMS`] loops of each, while `during` runs; then `settle` more.
fn stream<T>(
    c: &Cluster,
    agent: &Path,
    human: &Path,
    settle: Duration,
    during: impl FnOnce() -> Result<T>,
) -> Result<(T, Tally)> {
    let stop = AtomicBool::new(false);
    let kubectl_bin = c.plane.kubectl.clone();
    let admin = c.plane.admin.clone();
    let (result, tally) = std::thread::scope(|s| {
        let (stop, kubectl_bin, admin) = (&stop, &kubectl_bin, &admin);
        let agents: Vec<_> = (0..STREAMS)
            .map(|k| {
                s.spawn(move || {
                    let mut t = Tally::default();
                    let mut i = k;
                    while !stop.load(Ordering::SeqCst) {
                        let name = format!("keep-{}", i % 3);
                        i += 1;
                        t.agent_requests += 1;
                        let args = ["delete", "deployment", &name, "-n", "demo", "--wait=false"];
                        let out = kubectl(kubectl_bin, agent, &args);
                        let msg = text(&out);
                        if out.status.success() {
                            t.agent_admitted += 1;
                            eprintln!("WRONGLY ADMITTED agent delete of {name}: {msg}");
                            let image = "--image=localhost/none:0";
                            let args = ["create", "deployment", &name, "-n", "demo", image, "--replicas=0"];
                            let _ = kubectl(kubectl_bin, admin, &args);
                        } else if msg.contains("kubectl annotate") {
                            t.agent_held += 1;
                        } else if msg.contains("failed calling webhook") {
                            t.agent_unreachable += 1;
                        } else {
                            t.agent_other.push(msg);
                        }
                    }
                    t
                })
            })
            .collect();
        let humans: Vec<_> = (0..STREAMS)
            .map(|k| {
                s.spawn(move || {
                    let mut t = Tally::default();
                    let mut i = 0u32;
                    while !stop.load(Ordering::SeqCst) {
                        let name = format!("human-{k}-{i}");
                        i += 1;
                        let image = "--image=localhost/none:0";
                        for args in [
                            vec!["create", "deployment", &name, "-n", "demo", image, "--replicas=0"],
                            vec!["delete", "deployment", &name, "-n", "demo", "--wait=false"],
                        ] {
                            t.human_requests += 1;
                            let out = kubectl(kubectl_bin, human, &args);
                            if !out.status.success() {
                                t.human_failed.push(format!("{}: {}", args.join(" "), text(&out)));
                            }
                        }
                    }
                    t
                })
            })
            .collect();
        let result = during();
        std::thread::sleep(settle);
        stop.store(true, Ordering::SeqCst);
        let mut tally = Tally::default();
        for t in agents.into_iter().chain(humans).map(|h| h.join().expect("a request stream")) {
            tally.agent_requests += t.agent_requests;
            tally.agent_admitted += t.agent_admitted;
            tally.agent_held += t.agent_held;
            tally.agent_unreachable += t.agent_unreachable;
            tally.agent_other.extend(t.agent_other);
            tally.human_requests += t.human_requests;
            tally.human_failed.extend(t.human_failed);
        }
        (result, tally)
    });
    Ok((result?, tally))
}

fn check(tally: &Tally, what: &str) -> Result<()> {
    ensure!(
        tally.agent_admitted == 0,
        "{what}: {} agent deletes were admitted ({tally})",
        tally.agent_admitted
    );
    ensure!(tally.human_failed.is_empty(), "{what}: human requests failed: {:?}", tally.human_failed);
    ensure!(tally.agent_other.is_empty(), "{what}: agent requests failed otherwise: {:?}", tally.agent_other);
    ensure!(tally.agent_held > 0, "{what}: agentguard answered no agent request ({tally})");
    Ok(())
}

fn env_path(var: &str, script: &str) -> Result<PathBuf> {
    Ok(PathBuf::from(std::env::var(var).with_context(|| format!("{var} is not set: eval \"$({script})\""))?))
}

fn setup(verbose: bool) -> Result<Cluster> {
    let bins = Binaries::from_env()?;
    let node_bins = NodeBinaries::from_env()?;
    let helm = env_path("HELM", "hack/k8s-binaries.sh")?;
    let image = std::env::var("AGENTGUARD_IMAGE")
        .context("AGENTGUARD_IMAGE is not set: eval \"$(hack/image.sh)\"")?;
    let archives = [
        env_path("PAUSE_IMAGE_ARCHIVE", "hack/image.sh")?,
        env_path("AGENTGUARD_IMAGE_ARCHIVE", "hack/image.sh")?,
    ];
    let plane = ControlPlane::start(&bins)?;
    println!("control plane ready in {:.1}s", plane.startup.as_secs_f64());
    let node = Node::start(&plane, node_bins, &archives)?;
    let s = node.startup;
    println!(
        "node {} Ready in {:.1}s (containerd + image import {:.1}s, kubelet to Ready {:.1}s)",
        node.name,
        s.total.as_secs_f64(),
        s.runtime.as_secs_f64(),
        s.kubelet.as_secs_f64()
    );
    let images = node.ctr(&["images", "list"])?;
    for line in images.lines().filter(|l| l.starts_with(&image)) {
        let size = line.split_whitespace().nth(3).unwrap_or("?");
        let unit = line.split_whitespace().nth(4).unwrap_or("");
        println!("image {image} in containerd: {size} {unit}");
    }
    Ok(Cluster { node, plane, helm, image, verbose })
}

/// Installs the chart with its defaults and only the image overridden; returns the time to
/// three Ready pods.
fn install(c: &Cluster) -> Result<Duration> {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/agentguard");
    let tag = c.image.rsplit_once(':').map_or("latest", |(_, t)| t).to_owned();
    let started = Instant::now();
    let mut args: Vec<String> =
        ["install", RELEASE, &chart.to_string_lossy(), "-n", NS, "--create-namespace"]
            .map(String::from)
            .to_vec();
    args.extend(c.image_values(&tag));
    if c.verbose {
        println!("\n[admin] $ helm {}", args.join(" "));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    if let Err(e) = c.helm(&args) {
        // Who made what, when: the webhook configuration's writers and the pods' start.
        let webhook = c
            .admin(&[
                "get",
                "validatingwebhookconfiguration",
                RELEASE,
                "-o",
                "jsonpath={.metadata.creationTimestamp} {.metadata.managedFields[*].manager}",
            ])
            .unwrap_or_default();
        let pods = c
            .admin(&["get", "pods", "-n", NS, "-o", "jsonpath={.items[*].status.startTime}"])
            .unwrap_or_default();
        let deployment = c
            .admin(&["get", "deployment", RELEASE, "-n", NS, "-o", "jsonpath={.metadata.creationTimestamp}"])
            .unwrap_or_default();
        let what = format!(
            "{e:#}\nwebhook configuration created {webhook}; Deployment created {deployment}; pods started {pods}"
        );
        // A known race, not of this node's making: agentguard registers its webhook
        // configuration when it finds none, and a replica that starts before Helm has created
        // the chart's copy makes Helm's create fail. Said, then tried once more from scratch.
        let race = format!(
            "validatingwebhookconfigurations.admissionregistration.k8s.io \"{RELEASE}\" already exists"
        );
        ensure!(what.contains(&race), "{what}\n{}", c.node.pod_logs(NS, 15));
        println!(
            "note: helm install lost the race with agentguard registering its own webhook configuration:\n{what}"
        );
        c.helm(&["uninstall", RELEASE, "-n", NS, "--wait", "--timeout=120s"])?;
        let _ = c.admin(&["delete", "validatingwebhookconfiguration", RELEASE, "--ignore-not-found"]);
        c.helm(&args).context("helm install, tried again after losing the race")?;
        println!("note: helm install succeeded when tried again");
    }
    let ready = c.wait_ready_pods(3, Duration::from_secs(240))?;
    c.wait_routed(3, Duration::from_secs(60))?;
    let total = started.elapsed();
    println!(
        "helm install: 3 of 3 pods Ready and routed to {:.1}s after install ({:.1}s waiting for them)",
        total.as_secs_f64(),
        ready.as_secs_f64()
    );
    if c.verbose {
        println!("{}", c.admin(&["get", "pods,service,pdb", "-n", NS, "-o", "wide"])?);
    }
    Ok(total)
}

/// An agent ServiceAccount (`agents/coder`, labelled as an agent, `edit` in `demo`), a human
/// (`alice`, `edit` in `demo`), and three Deployments the stream's agent tries to delete.
fn people(c: &Cluster) -> Result<(PathBuf, PathBuf)> {
    for ns in ["agents", "demo"] {
        c.admin(&["create", "namespace", ns])?;
    }
    c.admin(&["create", "serviceaccount", "coder", "-n", "agents"])?;
    c.admin(&["label", "serviceaccount", "coder", "-n", "agents", "agentguard.io/agent=true"])?;
    c.admin(&[
        "create",
        "rolebinding",
        "coder-edit",
        "-n",
        "demo",
        "--clusterrole=edit",
        "--serviceaccount=agents:coder",
    ])?;
    c.admin(&["create", "rolebinding", "alice-edit", "-n", "demo", "--clusterrole=edit", "--user=alice"])?;
    let agent = c.plane.service_account_kubeconfig("agents", "coder")?;
    let alice = c.plane.user_kubeconfig("alice", &["developers"])?;
    let registered = c.wait_for_agent("system:serviceaccount:agents:coder")?;
    println!("agent agents/coder registered in {:.1}s", registered.as_secs_f64());
    for i in 0..3 {
        c.admin(&[
            "create",
            "deployment",
            &format!("keep-{i}"),
            "-n",
            "demo",
            "--image=localhost/none:0",
            "--replicas=0",
        ])?;
    }
    // RBAC is read from a cache: wait until it grants the new bindings.
    let started = Instant::now();
    for who in ["--as=system:serviceaccount:agents:coder", "--as=alice"] {
        while !c
            .plane
            .kubectl(&c.plane.admin, &["auth", "can-i", "delete", "deployments", "-n", "demo", who])
            .status
            .success()
        {
            ensure!(started.elapsed() < Duration::from_secs(20), "{who} has no edit rights in demo");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok((agent, alice))
}

/// An agent's delete of a Deployment with a running pod is held; an approver runs the command
/// from the denial; the retry is admitted and the Deployment goes. A human's delete is untouched.
fn deny_approve(c: &Cluster, agent: &Path, alice: &Path) -> Result<()> {
    let pause = std::env::var("PAUSE_IMAGE").unwrap_or_else(|_| "localhost/agentguard-pause:3.10".into());
    let out = c.as_user(
        "admin",
        &c.plane.admin,
        &["create", "deployment", "web", "-n", "demo", &format!("--image={pause}")],
    );
    must(out)?;
    c.admin(&["rollout", "status", "deployment/web", "-n", "demo", "--timeout=120s"])?;
    let denial = rejects(
        c.as_user("agent", agent, &["delete", "deployment", "web", "-n", "demo"]),
        "an agent's delete of a Deployment",
        "kubectl annotate",
    )?;
    let command = approve_command(&denial)?;
    let args: Vec<&str> = command.iter().map(String::as_str).collect();
    accepts(c.as_user("admin (an approver)", &c.plane.admin, &args), "the approve command from the denial")?;
    accepts(
        c.as_user("agent", agent, &["delete", "deployment", "web", "-n", "demo"]),
        "the agent's approved delete",
    )?;
    ensure!(
        !c.plane.kubectl(&c.plane.admin, &["get", "deployment", "web", "-n", "demo"]).status.success(),
        "the approved delete left the Deployment"
    );
    println!(
        "check an agent's delete is held, approved with the command from the denial, then admitted ... ok"
    );

    c.admin(&["create", "deployment", "site", "-n", "demo", "--image=localhost/none:0", "--replicas=0"])?;
    accepts(
        c.as_user("alice (a human)", alice, &["delete", "deployment", "site", "-n", "demo"]),
        "a human's delete",
    )?;
    println!("check a human's delete is untouched ... ok");
    Ok(())
}

/// The running containers are the hardened pod of the chart, seen from containerd's OCI spec.
fn hardened(c: &Cluster) -> Result<()> {
    let pods = c.ready_pods()?;
    for pod in &pods {
        let info: serde_json::Value =
            serde_json::from_str(&c.node.ctr(&["containers", "info", &c.container_id(pod)?])?)?;
        let spec = &info["Spec"];
        ensure!(spec["process"]["user"]["uid"] == 65532, "{pod} runs as {}", spec["process"]["user"]);
        ensure!(spec["root"]["readonly"] == true, "{pod}: root filesystem not read-only");
        ensure!(spec["process"]["noNewPrivileges"] == true, "{pod}: privilege escalation allowed");
        let caps = &spec["process"]["capabilities"];
        for set in ["bounding", "effective", "permitted"] {
            ensure!(
                caps[set].as_array().is_none_or(|a| a.is_empty()),
                "{pod}: capabilities left in {set}: {}",
                caps[set]
            );
        }
        ensure!(spec["linux"]["seccomp"].is_object(), "{pod}: no seccomp profile");
        ensure!(
            spec["linux"]["resources"]["memory"]["limit"].as_u64() == Some(MEMORY_LIMIT),
            "{pod}: memory limit {}",
            spec["linux"]["resources"]["memory"]["limit"]
        );
    }
    println!(
        "check the {} running containers are uid 65532, read-only root, no capabilities, seccomp, 256Mi memory limit ... ok",
        pods.len()
    );
    Ok(())
}

/// `kubectl rollout restart` under a stream of agent and human requests.
fn rollout(c: &Cluster, agent: &Path, alice: &Path) -> Result<Tally> {
    let (took, tally) = stream(c, agent, alice, Duration::from_secs(3), || {
        std::thread::sleep(Duration::from_secs(2));
        let started = Instant::now();
        c.admin(&["rollout", "restart", "deployment/agentguard", "-n", NS])?;
        c.admin(&["rollout", "status", "deployment/agentguard", "-n", NS, "--timeout=300s"])?;
        Ok(started.elapsed())
    })?;
    println!("rollout restart took {:.1}s; during it: {tally}", took.as_secs_f64());
    check(&tally, "rollout restart")?;
    println!(
        "check rollout restart under agent and human requests: no agent delete admitted, no human request failed ... ok"
    );
    Ok(tally)
}

/// One replica's container SIGKILLed, another pod deleted, under the stream; the kubelet
/// restarts the first, the ReplicaSet replaces the second.
fn kill_replicas(c: &Cluster, agent: &Path, alice: &Path) -> Result<Tally> {
    let pods = c.ready_pods()?;
    ensure!(pods.len() == 3, "expected 3 Ready pods, have {pods:?}");
    let restarts = |pod: &str| -> u64 {
        c.admin(&["get", "pod", pod, "-n", NS, "-o", "jsonpath={.status.containerStatuses[0].restartCount}"])
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    let before = restarts(&pods[0]);
    let (recovered, tally) = stream(c, agent, alice, Duration::from_secs(3), || {
        std::thread::sleep(Duration::from_secs(2));
        let started = Instant::now();
        c.node.ctr(&["tasks", "kill", "--signal", "SIGKILL", &c.container_id(&pods[0])?])?;
        c.admin(&["delete", "pod", &pods[1], "-n", NS, "--wait=false"])?;
        // Give the kubelet and the endpoints a moment to see both, then wait for three again.
        std::thread::sleep(Duration::from_secs(3));
        c.wait_ready_pods(3, Duration::from_secs(120))?;
        Ok(started.elapsed())
    })?;
    ensure!(restarts(&pods[0]) > before, "the kubelet did not restart the killed container of {}", pods[0]);
    // The liveness probe restarted nothing else under the stream.
    for pod in c.ready_pods()?.iter().filter(|p| **p != pods[0]) {
        ensure!(restarts(pod) == 0, "{pod} was restarted {} times", restarts(pod));
    }
    println!(
        "a replica killed and another deleted: 3 Ready again after {:.1}s; meanwhile: {tally}",
        recovered.as_secs_f64()
    );
    check(&tally, "replicas killed")?;
    println!(
        "check a killed replica is restarted, a deleted one replaced, no other restarted, requests answered meanwhile ... ok"
    );
    Ok(tally)
}

/// `kubectl drain` may evict one replica at a time (maxUnavailable 1): with the node cordoned
/// the evicted one cannot come back, so the PodDisruptionBudget refuses the next evictions.
fn pdb_holds(c: &Cluster) -> Result<()> {
    let out = c.plane.kubectl(
        &c.plane.admin,
        &[
            "drain",
            &c.node.name,
            "--pod-selector",
            SELECTOR,
            "--delete-emptydir-data",
            "--ignore-daemonsets",
            "--timeout=20s",
        ],
    );
    let msg = text(&out);
    let ready = c.ready_pods()?;
    c.admin(&["uncordon", &c.node.name])?;
    ensure!(!out.status.success(), "drain evicted every replica despite the PodDisruptionBudget: {msg}");
    ensure!(msg.contains("disruption budget"), "drain failed, but not on the PodDisruptionBudget: {msg}");
    ensure!(ready.len() >= 2, "only {} replicas Ready after the drain: {msg}", ready.len());
    c.wait_ready_pods(3, Duration::from_secs(120))?;
    println!("check the PodDisruptionBudget stops a drain with 2 of 3 replicas up ... ok");
    Ok(())
}

fn upgrade(c: &Cluster, agent: &Path) -> Result<()> {
    let new = format!("{}-upgrade", c.image);
    c.node.ctr(&["images", "tag", &c.image, &new])?;
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/agentguard");
    let tag = new.rsplit_once(':').map_or("latest", |(_, t)| t).to_owned();
    let started = Instant::now();
    let mut args: Vec<String> =
        ["upgrade", RELEASE, &chart.to_string_lossy(), "-n", NS].map(String::from).to_vec();
    args.extend(c.image_values(&tag));
    c.helm(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    c.admin(&["rollout", "status", "deployment/agentguard", "-n", NS, "--timeout=300s"])?;
    // The old pods are gone once their graceful shutdown is over.
    let waiting = Instant::now();
    loop {
        let images = c.admin(&[
            "get",
            "pods",
            "-n",
            NS,
            "-l",
            SELECTOR,
            "-o",
            "jsonpath={.items[*].spec.containers[0].image}",
        ])?;
        if images.split_whitespace().all(|i| i == new) {
            break;
        }
        ensure!(waiting.elapsed() < Duration::from_secs(90), "90s after the upgrade the pods run {images}");
        std::thread::sleep(Duration::from_millis(250));
    }
    c.wait_routed(3, Duration::from_secs(60))?;
    rejects(
        c.plane.kubectl(agent, &["delete", "deployment", "keep-0", "-n", "demo"]),
        "an agent's delete after the upgrade",
        "kubectl annotate",
    )?;
    println!(
        "check helm upgrade to {new} rolls every pod ({:.1}s) and agent deletes are still held ... ok",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn uninstall(c: &Cluster, agent: &Path) -> Result<()> {
    c.helm(&["uninstall", RELEASE, "-n", NS, "--wait", "--timeout=120s"])?;
    let started = Instant::now();
    loop {
        let webhook = c.plane.kubectl(&c.plane.admin, &["get", "validatingwebhookconfiguration", RELEASE]);
        let pods = c.admin(&["get", "pods", "-n", NS, "-o", "name"])?;
        if !webhook.status.success() && pods.is_empty() {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(90),
            "after helm uninstall: webhook configuration present={}, pods: {pods}",
            webhook.status.success()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let kinds = "all,secrets,configmaps,leases,roles,rolebindings,serviceaccounts,pdb,agentchanges";
    let left = c.admin(&["get", kinds, "-n", NS, "-o", "jsonpath={range .items[*]}{.kind}/{.metadata.name} {.metadata.labels.app\\.kubernetes\\.io/managed-by}{\"\\n\"}{end}"])?;
    let (mut helm_made, mut runtime_made) = (Vec::new(), Vec::new());
    for line in left.lines() {
        let (object, manager) = line.split_once(' ').unwrap_or((line, ""));
        match object {
            // Made by the API server and the controller-manager for every namespace.
            "ConfigMap/kube-root-ca.crt" | "ServiceAccount/default" => {}
            _ if manager == "agentguard" || object.starts_with("AgentChange/") => runtime_made.push(object),
            _ => helm_made.push(object),
        }
    }
    let cluster_wide =
        c.admin(&["get", "clusterroles,clusterrolebindings,validatingwebhookconfigurations", "-o", "name"])?;
    let cluster_left: Vec<&str> = cluster_wide.lines().filter(|l| l.contains("agentguard")).collect();
    accepts(
        c.plane.kubectl(agent, &["delete", "deployment", "keep-0", "-n", "demo"]),
        "an agent's delete after uninstall",
    )?;
    ensure!(
        helm_made.is_empty() && cluster_left.is_empty(),
        "helm uninstall left {helm_made:?} {cluster_left:?} behind"
    );
    println!(
        "check helm uninstall leaves no webhook configuration, pod or object of the chart's behind ... ok"
    );
    if !runtime_made.is_empty() {
        // Not the chart's: agentguard writes them while it runs, and nothing owns them.
        println!(
            "note: objects agentguard made at run time outlive helm uninstall: {}",
            runtime_made.join(", ")
        );
    }
    Ok(())
}

fn full() -> Result<u32> {
    let c = setup(false)?;
    install(&c)?;
    println!("check helm install with the chart's defaults runs 3 Ready replicas from the image ... ok");
    let mut passed = 1;
    hardened(&c)?;
    passed += 1;
    let (agent, alice) = people(&c)?;
    deny_approve(&c, &agent, &alice)?;
    passed += 2;
    rollout(&c, &agent, &alice)?;
    passed += 1;
    kill_replicas(&c, &agent, &alice)?;
    passed += 1;
    pdb_holds(&c)?;
    passed += 1;
    upgrade(&c, &agent)?;
    passed += 1;
    uninstall(&c, &agent)?;
    passed += 1;
    Ok(passed)
}

fn demo(exit: bool) -> Result<()> {
    println!(
        "Starting etcd, kube-apiserver, kube-controller-manager, kube-scheduler and a node (kubelet, kube-proxy, containerd) ..."
    );
    let c = setup(true)?;
    install(&c)?;
    let (agent, alice) = people(&c)?;
    deny_approve(&c, &agent, &alice)?;
    println!("\nKeep going:");
    println!("  export KUBECONFIG={}          # cluster-admin, an approver", c.plane.admin.display());
    println!("  kubectl --kubeconfig {} ...   # the agent agents/coder", agent.display());
    println!("  kubectl --kubeconfig {} ...   # alice, a human with edit in demo", alice.display());
    println!("  kubectl get pods -n {NS} -o wide");
    if exit {
        return Ok(());
    }
    println!("\nPress Ctrl-C to stop the cluster and remove everything it made.");
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(tokio::signal::ctrl_c())?;
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(reason) = node::unsupported() {
        println!("cluster: skipped: {reason}");
        println!("cluster: 0 passed, 0 failed, 1 skipped");
        return;
    }
    if args.iter().any(|a| a == "--demo") {
        if let Err(e) = demo(args.iter().any(|a| a == "--exit")) {
            eprintln!("demo failed: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    match full() {
        Ok(passed) => println!("cluster: {passed} passed, 0 failed"),
        Err(e) => {
            println!("cluster FAILED: {e:#}");
            println!("cluster: 0 passed, 1 failed");
            std::process::exit(1);
        }
    }
}
