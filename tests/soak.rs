//! The soak run (`hack/soak.sh`): agentguard on a real control plane under mixed traffic for a
//! given time — held, approved, denied and Warn-mode requests, audit records, churn charges,
//! agent labels and policies coming and going, humans' writes, and the serving certificate
//! replaced every few minutes — sampling agentguard's resident memory, open file descriptors
//! and threads. Fails on any unexpected answer, or when the end's figures exceed the start's by
//! more than the bounds below. `cargo test --test soak -- --duration SECONDS [--rotate SECONDS]`.
//! With `--flood SECONDS [--rate N]` it floods agentguard with agents' changes instead ([`flood`]).

#[allow(dead_code)]
#[path = "e2e/cluster.rs"]
mod cluster;
#[allow(dead_code)]
#[path = "e2e/world.rs"]
mod world;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use world::{World, approve_command, must};

/// Traffic runs this long before the first sample: caches filled, connections pooled, the
/// allocator's arenas grown to their working size.
const WARM_UP: Duration = Duration::from_secs(60);
/// Anonymous resident memory (the heap and stacks: what a leak grows) may grow by this much
/// from the first sample to the last, or by [`RSS_GROWTH_PERCENT`] of the first sample,
/// whichever is larger. The whole resident set is reported, not bounded: it also counts the
/// binary's pages, read in as code runs for the first time (a debug binary is large).
const RSS_GROWTH_BYTES: u64 = 16 << 20;
const RSS_GROWTH_PERCENT: u64 = 25;
/// Open files (sockets included) may grow by this many: a few pooled connections.
const FD_GROWTH: u64 = 8;
/// Threads may grow by this many: tokio's blocking pool starts threads for file reads (the
/// certificate's) and lets them go after 10 s idle.
const THREAD_GROWTH: u64 = 8;

const NS: &str = "soak";

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Duration,
    rss: u64,
    anon: u64,
    fds: u64,
    threads: u64,
}

fn sample(pid: u32, at: Duration) -> Result<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = status.lines().find(|l| l.starts_with(name)).with_context(|| format!("no {name}"))?;
        Ok(line.split_whitespace().nth(1).context("no value")?.parse()?)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    Ok(Sample {
        at,
        rss: field("VmRSS:")? * 1024,
        anon: field("RssAnon:")? * 1024,
        fds,
        threads: field("Threads:")?,
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// What the run saw.
#[derive(Default)]
struct Counts {
    cycles: u64,
    held: u64,
    approved: u64,
    denied: u64,
    warned: u64,
    charged: u64,
    human: u64,
    labels: u64,
    policies: u64,
    rotations: u64,
    errors: Vec<String>,
}

impl Counts {
    fn error(&mut self, cycle: u64, what: impl std::fmt::Display) {
        let text = format!("cycle {cycle}: {what}");
        eprintln!("soak error: {text}");
        self.errors.push(text);
    }
}

const POLICIES: &str = r#"
apiVersion: agentguard.io/v1alpha1
kind: ClusterAgentPolicy
metadata: {name: soak-approve}
spec:
  action: RequireApproval
  approval: {approvers: {users: [alice]}, ttl: 10m}
  rules:
    - {name: approve, operations: [DELETE], namespaces: [soak], names: ["appr-*"], resources: [{apiGroups: [""], resources: [configmaps]}]}
---
apiVersion: agentguard.io/v1alpha1
kind: ClusterAgentPolicy
metadata: {name: soak-deny}
spec:
  action: Deny
  rules:
    - {name: deny, operations: [DELETE], namespaces: [soak], names: ["deny-*"], resources: [{apiGroups: [""], resources: [configmaps]}]}
---
apiVersion: agentguard.io/v1alpha1
kind: ClusterAgentPolicy
metadata: {name: soak-churn}
spec:
  action: Allow
  churnLimit: {maxOperations: 100000, window: 1h}
  rules:
    - {name: churn, operations: [DELETE], namespaces: [soak], names: ["churn-*"], resources: [{apiGroups: [""], resources: [configmaps]}]}
"#;

fn outcome(out: &std::process::Output) -> (bool, String) {
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

/// One round of every kind of traffic; unexpected answers are counted as errors.
fn cycle(w: &World, i: u64, c: &mut Counts) -> Result<()> {
    let k = |who: &std::path::Path, args: &[&str]| outcome(&w.plane.kubectl(who, args));
    let objects: String = ["appr", "deny", "churn", "warn"]
        .iter()
        .map(|p| {
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {p}-{i}, namespace: {NS}}}\n---\n")
        })
        .collect();
    must(w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-f", "-"], Some(&objects)))?;

    // Held, then approved by alice with the command the denial names, then admitted (recorded).
    let appr = format!("appr-{i}");
    let (ok, text) = k(&w.agent, &["delete", "configmap", &appr, "-n", NS]);
    if ok || !text.contains("soak-approve") {
        c.error(i, format!("the agent's delete of {appr} was not held: {text}"));
    } else {
        c.held += 1;
        let approve = approve_command(&text)?;
        let args: Vec<&str> = approve.iter().map(String::as_str).collect();
        let (ok, text) = k(&w.alice, &args);
        if !ok {
            c.error(i, format!("alice's approval was refused: {text}"));
        } else {
            let (ok, text) = k(&w.agent, &["delete", "configmap", &appr, "-n", NS]);
            if ok { c.approved += 1 } else { c.error(i, format!("the approved delete was refused: {text}")) }
        }
    }
    // Denied.
    let deny = format!("deny-{i}");
    let (ok, text) = k(&w.agent, &["delete", "configmap", &deny, "-n", NS]);
    if ok || !text.contains("is denied by ClusterAgentPolicy \"soak-deny\"") {
        c.error(i, format!("the agent's delete of {deny} was not denied: {text}"));
    } else {
        c.denied += 1;
    }
    // Allowed under a churn limit: charged and recorded.
    let churn = format!("churn-{i}");
    let (ok, text) = k(&w.agent, &["delete", "configmap", &churn, "-n", NS]);
    if ok {
        c.charged += 1
    } else {
        c.error(i, format!("the agent's delete of {churn} was refused: {text}"))
    }
    // Warn mode (the world's e2e-config-trial): admitted with a warning.
    let warn = format!("warn-{i}");
    let (ok, text) = k(&w.agent, &["label", "configmap", &warn, "-n", NS, "soak=warned"]);
    if ok && text.contains("Warn mode") {
        c.warned += 1;
    } else {
        c.error(i, format!("the agent's relabel of {warn} was not warned about: {text}"));
    }
    // A human's writes never reach agentguard.
    let human = format!("human-{i}");
    let (created, text) = k(&w.alice, &["create", "configmap", &human, "-n", NS]);
    let (deleted, text2) = k(&w.alice, &["delete", "configmap", &human, "-n", NS]);
    if created && deleted {
        c.human += 1
    } else {
        c.error(i, format!("a human's write failed: {text}{text2}"))
    }
    must(w.plane.kubectl(&w.plane.admin, &["delete", "configmap", &deny, &warn, "-n", NS, "--wait=false"]))?;

    // Label churn: an agent marked (registered before the mark is stored), then unmarked.
    if i.is_multiple_of(5) {
        let sa = format!("soak-agent-{i}");
        must(w.plane.kubectl(&w.plane.admin, &["create", "serviceaccount", &sa, "-n", NS]))?;
        must(w.plane.kubectl(
            &w.plane.admin,
            &["label", "serviceaccount", &sa, "-n", NS, "agentguard.io/agent=true"],
        ))?;
        must(w.plane.kubectl(&w.plane.admin, &["delete", "serviceaccount", &sa, "-n", NS]))?;
        c.labels += 1;
    }
    // Policy churn: a policy created, then deleted.
    if i % 5 == 2 {
        let name = format!("soak-temp-{i}");
        let policy = format!(
            "apiVersion: agentguard.io/v1alpha1\nkind: ClusterAgentPolicy\nmetadata: {{name: {name}}}\nspec:\n  action: Deny\n  \
             rules:\n    - {{name: t, operations: [DELETE], namespaces: [soak], names: [nothing-{i}], resources: [{{apiGroups: [\"\"], resources: [secrets]}}]}}\n"
        );
        must(w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-f", "-"], Some(&policy)))?;
        must(w.plane.kubectl(&w.plane.admin, &["delete", "clusteragentpolicy", &name]))?;
        c.policies += 1;
    }
    c.cycles += 1;
    Ok(())
}

/// A new serving certificate written over the files agentguard serves (as a Secret update
/// reaches a pod's volume), and its reload seen in the metrics.
fn rotate(w: &World) -> Result<()> {
    let reloads = |w: &World| w.agentguard.gauge("agentguard_certificate_reloads_total");
    let before = reloads(w)?;
    let dir = w.plane.dir.path();
    let (cert, key) = w.plane.pki.serving()?;
    // Key first, then the certificate: agentguard keeps the old pair until both match.
    for (name, pem) in [("agentguard.key", key), ("agentguard.crt", cert)] {
        let tmp = dir.join(format!("{name}.new"));
        std::fs::write(&tmp, pem)?;
        std::fs::rename(&tmp, dir.join(name))?;
    }
    let started = Instant::now();
    while reloads(w)? <= before {
        ensure!(started.elapsed() < Duration::from_secs(30), "the new certificate was not loaded within 30s");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn arg(name: &str) -> Option<u64> {
    let args: Vec<String> = std::env::args().collect();
    let at = args.iter().position(|a| a == name)?;
    args.get(at + 1)?.parse().ok()
}

fn run() -> Result<bool> {
    let duration = Duration::from_secs(arg("--duration").unwrap_or(3600));
    let rotate_every = Duration::from_secs(arg("--rotate").unwrap_or(180));
    let w = World::start()?;
    must(w.plane.kubectl(&w.plane.admin, &["create", "namespace", NS]))?;
    must(w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-f", "-"], Some(POLICIES)))?;
    let pid = w.agentguard.pid();
    let started = Instant::now();
    let mut counts = Counts::default();
    let mut samples: Vec<Sample> = Vec::new();
    let (mut next_sample, mut next_rotation) = (WARM_UP.min(duration / 2), rotate_every);
    let mut i = 0;
    println!(
        "soak: {}s of traffic, a certificate rotation every {}s",
        duration.as_secs(),
        rotate_every.as_secs()
    );
    while started.elapsed() < duration {
        if let Err(e) = cycle(&w, i, &mut counts) {
            counts.error(i, format!("{e:#}"));
        }
        i += 1;
        let now = started.elapsed();
        if now >= next_rotation {
            match rotate(&w) {
                Ok(()) => counts.rotations += 1,
                Err(e) => counts.error(i, format!("certificate rotation: {e:#}")),
            }
            next_rotation += rotate_every;
        }
        if now >= next_sample {
            let s = sample(pid, now)?;
            println!(
                "soak: {:>5.0}s  rss {:6.1} MiB  anon {:6.1} MiB  fds {:3}  threads {:3}  cycles {}  errors {}",
                now.as_secs_f64(),
                mib(s.rss),
                mib(s.anon),
                s.fds,
                s.threads,
                counts.cycles,
                counts.errors.len()
            );
            samples.push(s);
            next_sample = now + Duration::from_secs(30);
        }
    }
    let last = sample(pid, started.elapsed())?;
    samples.push(last);
    let first = samples[0];
    let peak = samples.iter().map(|s| s.rss).max().unwrap_or_default();
    let c = &counts;
    println!(
        "soak: {:.0}s, {} cycles: {} held, {} approved, {} denied, {} warned, {} charged, {} human writes, {} agents marked, \
         {} policies made and deleted, {} certificate rotations; {} errors",
        started.elapsed().as_secs_f64(),
        c.cycles,
        c.held,
        c.approved,
        c.denied,
        c.warned,
        c.charged,
        c.human,
        c.labels,
        c.policies,
        c.rotations,
        c.errors.len()
    );
    println!(
        "soak: from {:.0}s to {:.0}s: rss {:.1} → {:.1} MiB (peak {:.1}), anon {:.1} → {:.1} MiB, fds {} → {}, threads {} → {}",
        first.at.as_secs_f64(),
        last.at.as_secs_f64(),
        mib(first.rss),
        mib(last.rss),
        mib(peak),
        mib(first.anon),
        mib(last.anon),
        first.fds,
        last.fds,
        first.threads,
        last.threads
    );
    let records = must(
        w.plane.kubectl(&w.plane.admin, &["get", "agentchanges", "-n", "agentguard-system", "-o", "name"]),
    )?;
    let records = records.lines().filter(|l| !l.trim().is_empty()).count() as u64;
    println!("soak: {records} AgentChange records for {} admitted changes", c.approved + c.charged);
    let mut ok = true;
    let mut fail = |why: String| {
        println!("soak FAILED: {why}");
        ok = false;
    };
    if !c.errors.is_empty() {
        fail(format!("{} errors, the first: {}", c.errors.len(), c.errors[0]));
    }
    if records < c.approved + c.charged {
        fail(format!("{records} records for {} admitted changes", c.approved + c.charged));
    }
    let anon_bound = RSS_GROWTH_BYTES.max(first.anon * RSS_GROWTH_PERCENT / 100);
    if last.anon > first.anon + anon_bound {
        fail(format!(
            "anonymous memory grew {:.1} MiB (bound {:.1})",
            mib(last.anon - first.anon),
            mib(anon_bound)
        ));
    }
    if last.fds > first.fds + FD_GROWTH {
        fail(format!("open files grew from {} to {} (bound +{FD_GROWTH})", first.fds, last.fds));
    }
    if last.threads > first.threads + THREAD_GROWTH {
        fail(format!("threads grew from {} to {} (bound +{THREAD_GROWTH})", first.threads, last.threads));
    }
    if c.cycles == 0 {
        fail("no traffic ran".into());
    }
    Ok(ok)
}

fn main() {
    let result = match arg("--flood") {
        Some(seconds) => {
            flood(seconds, arg("--rate").unwrap_or(1000), arg("--replicas").unwrap_or(1) as usize)
        }
        None => run(),
    };
    match result {
        Ok(true) => println!("soak: ok"),
        Ok(false) => std::process::exit(1),
        Err(e) => {
            println!("soak FAILED: {e:#}");
            std::process::exit(1);
        }
    }
}

/// How one flood request ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Answer {
    /// Admitted: recorded and charged.
    Admitted,
    /// Refused for want of an API-call slot ("agentguard is busy").
    Busy,
    /// Refused because its API calls did not finish before the deadline.
    Deadline,
    /// Refused because the churn count could not be written (other replicas kept changing it).
    Contended,
    /// Anything else (counted as an error).
    Other,
}

/// `--flood SECONDS --rate N`: N agent DELETEs a second, sent straight to agentguard's webhook
/// port as AdmissionReviews (the API server on this machine cannot pass that many), each
/// admitted under an Allow policy with a churn limit, so each admission checks the live object,
/// charges the churn count and writes a record. Reports what was admitted, refused and how fast,
/// the most API-call slots seen taken, and whether every admitted change has its record.
fn flood(seconds: u64, rate: u64, replicas: usize) -> Result<bool> {
    use serde_json::{Value, json};
    let w = World::start()?;
    let ns = "flood";
    must(w.plane.kubectl(&w.plane.admin, &["create", "namespace", ns]))?;
    let policy = "apiVersion: agentguard.io/v1alpha1\nkind: ClusterAgentPolicy\nmetadata: {name: flood}\nspec:\n  action: Allow\n  \
                  churnLimit: {maxOperations: 100000, window: 1h}\n  rules:\n    - {name: flood, operations: [DELETE], namespaces: [flood], \
                  resources: [{apiGroups: [\"\"], resources: [configmaps]}]}\n";
    must(w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-f", "-"], Some(policy)))?;
    const OBJECTS: usize = 100;
    let items: Vec<Value> = (0..OBJECTS)
        .map(|i| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("c{i}"), "namespace": ns}}))
        .collect();
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    must(w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-f", "-"], Some(&list.to_string())))?;
    let live: Value = serde_json::from_str(&must(
        w.plane.kubectl(&w.plane.admin, &["get", "configmaps", "-n", ns, "-o", "json"]),
    )?)?;
    let live: Vec<Value> = live["items"]
        .as_array()
        .context("a list")?
        .iter()
        .filter(|o| o["metadata"]["name"].as_str().is_some_and(|n| n.starts_with('c')))
        .cloned()
        .collect();
    ensure!(live.len() == OBJECTS, "{} ConfigMaps listed", live.len());
    // The policy in force before the flood: one admitted delete through the API server.
    let started = Instant::now();
    while !w
        .plane
        .kubectl(&w.agent, &["delete", "configmap", "c0", "-n", ns, "--dry-run=server"])
        .status
        .success()
    {
        ensure!(started.elapsed() < Duration::from_secs(30), "the flood policy is not in force");
        std::thread::sleep(Duration::from_millis(200));
    }
    let review = |n: u64, old: &Value| {
        json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": format!("flood-{n}"),
                "kind": {"group": "", "version": "v1", "kind": "ConfigMap"},
                "resource": {"group": "", "version": "v1", "resource": "configmaps"},
                "name": old["metadata"]["name"], "namespace": ns, "operation": "DELETE",
                "userInfo": {"username": "system:serviceaccount:agents:coder",
                             "groups": ["system:serviceaccounts", "system:serviceaccounts:agents", "system:authenticated"]},
                "object": null, "oldObject": old,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "DeleteOptions"}, "dryRun": false
            }
        })
        .to_string()
    };
    let bodies: Vec<String> = (0..seconds * rate).map(|n| review(n, &live[n as usize % OBJECTS])).collect();
    // More replicas serve direct requests only; the requests go round-robin, as a Service would.
    let names = ["agentguard-2", "agentguard-3", "agentguard-4", "agentguard-5"];
    let more: Vec<world::Agentguard> = names
        .iter()
        .take(replicas.saturating_sub(1))
        .map(|name| world::start_agentguard(&w.plane, name, false))
        .collect::<Result<_>>()?;
    let urls: Vec<String> = std::iter::once(&w.agentguard)
        .chain(more.iter())
        .map(|a| format!("{}/agents?timeout=5s", a.webhook))
        .collect();
    let admins: Vec<String> =
        std::iter::once(&w.agentguard).chain(more.iter()).map(|a| a.admin.clone()).collect();
    let ca = std::fs::read(w.plane.dir.path().join("ca.crt"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    println!(
        "flood: {rate} agent DELETEs/s for {seconds}s, straight to {} agentguard replica(s), each recorded and charged if admitted",
        urls.len()
    );
    let (answers, peak_slots, after) = runtime.block_on(async move {
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
            .timeout(Duration::from_secs(10))
            .build()?;
        let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let sampler = {
            let sampling = sampling.clone();
            tokio::task::spawn_blocking(move || {
                // The most slots any one replica had taken.
                let mut peak = 0.0f64;
                while sampling.load(std::sync::atomic::Ordering::Acquire) {
                    for admin in &admins {
                        if let Ok((_, text)) = world::http_get(&format!("{admin}/metrics"))
                            && let Some(v) = text
                                .lines()
                                .find(|l| l.starts_with("agentguard_api_requests_in_flight "))
                                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                        {
                            peak = peak.max(v);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                peak
            })
        };
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut tasks = Vec::with_capacity(bodies.len());
        for (n, body) in bodies.into_iter().enumerate() {
            tick.tick().await;
            let (client, url) = (client.clone(), urls[n % urls.len()].clone());
            tasks.push(tokio::spawn(async move {
                let sent = Instant::now();
                let answer = match client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                {
                    Ok(r) => match r.json::<Value>().await {
                        Ok(v) if v["response"]["allowed"] == true => Answer::Admitted,
                        Ok(v) => match v["response"]["status"]["message"].as_str().unwrap_or_default() {
                            m if m.contains("agentguard is busy") => Answer::Busy,
                            m if m.contains("could not finish the API calls") => Answer::Deadline,
                            m if m.contains("could not check the churn limit") => Answer::Contended,
                            m => {
                                eprintln!("flood: unexpected answer: {m}");
                                Answer::Other
                            }
                        },
                        Err(e) => {
                            eprintln!("flood: unreadable answer: {e}");
                            Answer::Other
                        }
                    },
                    Err(e) => {
                        eprintln!("flood: request failed: {e}");
                        Answer::Other
                    }
                };
                (answer, sent.elapsed())
            }));
        }
        let mut answers = Vec::with_capacity(tasks.len());
        for t in tasks {
            answers.push(t.await?);
        }
        sampling.store(false, std::sync::atomic::Ordering::Release);
        let peak = sampler.await?;
        // At once afterwards: one more admitted, and how long it took.
        let sent = Instant::now();
        let body = review(u64::MAX, &live[1]);
        let r: Value = client
            .post(&urls[0])
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?
            .json()
            .await?;
        ensure!(r["response"]["allowed"] == true, "not admitted right after the flood: {r}");
        anyhow::Ok((answers, peak, sent.elapsed()))
    })?;
    let sent_for = answers.len() as f64 / rate as f64;
    let of = |a: Answer| answers.iter().filter(|(x, _)| *x == a).count();
    let slowest =
        |a: Answer| answers.iter().filter(|(x, _)| *x == a).map(|(_, d)| *d).max().unwrap_or_default();
    let mut sorted: Vec<Duration> = answers.iter().map(|(_, d)| *d).collect();
    sorted.sort();
    let p = |q: f64| sorted[((sorted.len() - 1) as f64 * q) as usize];
    let admitted = of(Answer::Admitted) + 1;
    println!(
        "flood: {} sent over {:.0}s: {} admitted ({:.0}/s), {} refused busy, {} refused at the deadline, {} refused for a contended churn count, {} other",
        answers.len(),
        sent_for,
        admitted - 1,
        (admitted - 1) as f64 / sent_for,
        of(Answer::Busy),
        of(Answer::Deadline),
        of(Answer::Contended),
        of(Answer::Other)
    );
    println!(
        "flood: answer times p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; slowest admitted {:.0} ms, slowest busy refusal {:.0} ms; \
         API-call slots taken at most {peak_slots} on a replica (limit 32); one admitted right after in {:.0} ms",
        p(0.5).as_secs_f64() * 1e3,
        p(0.99).as_secs_f64() * 1e3,
        p(1.0).as_secs_f64() * 1e3,
        slowest(Answer::Admitted).as_secs_f64() * 1e3,
        slowest(Answer::Busy).as_secs_f64() * 1e3,
        after.as_secs_f64() * 1e3
    );
    let records = must(w.plane.kubectl(
        &w.plane.admin,
        &[
            "get",
            "agentchanges",
            "-n",
            "agentguard-system",
            "-o",
            "jsonpath={range .items[*]}{.spec.target.namespace}{\"\\n\"}{end}",
        ],
    ))?;
    let records = records.lines().filter(|l| *l == ns).count();
    println!("flood: {records} records for {admitted} admitted changes (the dry run before leaves none)");
    let mut ok = true;
    if records < admitted {
        println!("flood FAILED: {} admitted changes have no record", admitted - records);
        ok = false;
    }
    if of(Answer::Other) > 0 {
        println!("flood FAILED: {} requests got an unexpected answer", of(Answer::Other));
        ok = false;
    }
    if peak_slots > 32.0 {
        println!("flood FAILED: {peak_slots} API-call slots taken (limit 32)");
        ok = false;
    }
    // Retention pages through all those records: a replica keeping at most 100 trims the rest.
    let all = |w: &World| -> Result<usize> {
        let out = must(
            w.plane
                .kubectl(&w.plane.admin, &["get", "agentchanges", "-n", "agentguard-system", "-o", "name"]),
        )?;
        Ok(out.lines().filter(|l| !l.trim().is_empty()).count())
    };
    let before = all(&w)?;
    let launch = world::Launch { args: vec!["--record-max=100".into()], ..world::Launch::default() };
    let trimmer = world::start_agentguard_with(&w.plane, "agentguard-retention", &launch)?;
    let started = Instant::now();
    let after = loop {
        let n = all(&w)?;
        if n <= 100 || started.elapsed() > Duration::from_secs(180) {
            break n;
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    drop(trimmer);
    println!(
        "flood: retention with --record-max=100: {before} records → {after} in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    if after > 100 {
        println!("flood FAILED: retention left {after} records (max 100)");
        ok = false;
    }
    if p(1.0) > Duration::from_secs(5) {
        println!("flood FAILED: an answer took {:.1}s, past the API server's 5 s", p(1.0).as_secs_f64());
        ok = false;
    }
    Ok(ok)
}
