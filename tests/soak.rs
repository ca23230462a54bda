//! The soak run (`hack/soak.sh`): agentguard on a real control plane under mixed traffic for a
//! given time — held, approved, denied and Warn-mode requests, audit records, churn charges,
//! agent labels and policies coming and going, humans' writes, and the serving certificate
//! replaced every few minutes — sampling agentguard's resident memory, open file descriptors
//! and threads. Fails on any unexpected answer, or when the end's figures exceed the start's by
//! more than the bounds below. `cargo test --test soak -- --duration SECONDS [--rotate SECONDS]`.
//! With `--flood SECONDS [--rate N[,N…]] [--replicas R]` it floods agentguard with agents' changes
//! instead ([`flood`]).

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

/// CPU seconds (user + system) process `pid` has used.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')').context("malformed stat")?.1.split_whitespace().collect();
    Ok((fields[11].parse::<u64>()? + fields[12].parse::<u64>()?) as f64 / 100.0)
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

/// `--rate N[,N…]`: the flood's rates, one step each (1,000 a second by default).
fn rates() -> Result<Vec<u64>> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--rate") {
        None => Ok(vec![1000]),
        Some(at) => args
            .get(at + 1)
            .context("--rate needs a value")?
            .split(',')
            .map(|r| r.trim().parse::<u64>().with_context(|| format!("--rate {r}")))
            .collect(),
    }
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
        Some(seconds) => match rates() {
            Ok(rates) => flood(seconds, &rates, arg("--replicas").unwrap_or(1) as usize),
            Err(e) => Err(e),
        },
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
    /// Refused at once, too many agents' requests under way (HTTP 503 "agentguard is busy").
    Shed,
    /// Refused because its API calls did not finish before the deadline.
    Deadline,
    /// Refused because the churn count could not be written (other replicas kept changing it).
    Contended,
    /// No answer within [`GIVE_UP`], or the connection failed (counted as an error).
    Unanswered,
    /// Any other answer (counted as an error).
    Other,
}

/// The webhook timeout the flood's requests carry, as the API server's would: an answer later
/// than this is one the API server would have given up on.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);
/// An answer that has not come after this long never comes.
const GIVE_UP: Duration = Duration::from_secs(10);
/// Keep-alive HTTP/2 connections to each replica. The API server's webhook client multiplexes
/// its calls over HTTP/2 and opens another connection only when one's streams are all taken;
/// a few connections of a couple of hundred streams each carry everything a flood keeps open.
const CONNECTIONS: usize = 4;
/// The API-call slots a replica has by default (`--max-inflight-api-requests`).
const SLOTS: f64 = 32.0;

/// What one flood step saw.
struct Step {
    rate: u64,
    seconds: u64,
    replicas: usize,
    answers: Vec<(Answer, Duration)>,
    peak_slots: f64,
    /// How long one request sent right after the flood took to be admitted.
    after: Duration,
    records: usize,
    /// CPU seconds the flood's client and all the replicas spent during the step.
    cpu: (f64, f64),
}

impl Step {
    fn of(&self, a: Answer) -> usize {
        self.answers.iter().filter(|(x, _)| *x == a).count()
    }

    /// Admitted during the flood, and the one right after.
    fn admitted(&self) -> usize {
        self.of(Answer::Admitted) + 1
    }

    fn refused(&self) -> usize {
        self.of(Answer::Busy) + self.of(Answer::Shed) + self.of(Answer::Deadline) + self.of(Answer::Contended)
    }

    fn report(&self) -> bool {
        let mut sorted: Vec<Duration> = self.answers.iter().map(|(_, d)| *d).collect();
        sorted.sort();
        let p = |q: f64| sorted[((sorted.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
        let slowest = |a: Answer| {
            self.answers
                .iter()
                .filter(|(x, _)| *x == a)
                .map(|(_, d)| *d)
                .max()
                .unwrap_or_default()
                .as_secs_f64()
                * 1e3
        };
        let sent_for = self.seconds as f64;
        let admitted = self.of(Answer::Admitted);
        println!(
            "flood: {}/s for {}s to {} replica(s): {} sent, {} admitted ({:.0}/s), {} refused busy at once, {} busy after \
             waiting for a slot, {} at the deadline, {} for a contended churn count, {} unanswered, {} other",
            self.rate,
            self.seconds,
            self.replicas,
            self.answers.len(),
            admitted,
            admitted as f64 / sent_for,
            self.of(Answer::Shed),
            self.of(Answer::Busy),
            self.of(Answer::Deadline),
            self.of(Answer::Contended),
            self.of(Answer::Unanswered),
            self.of(Answer::Other)
        );
        println!(
            "flood: answer times from the moment each was due p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; slowest admitted \
             {:.0} ms, slowest busy refusal {:.0} ms; API-call slots taken at most {} on a replica (limit {SLOTS}); \
             one admitted right after in {:.0} ms; {} records for {} admitted changes; CPU: client {:.0}s, agentguard {:.0}s",
            p(0.5),
            p(0.99),
            p(1.0),
            slowest(Answer::Admitted),
            slowest(Answer::Busy),
            self.peak_slots,
            self.after.as_secs_f64() * 1e3,
            self.records,
            self.admitted(),
            self.cpu.0,
            self.cpu.1
        );
        // The row of the table in docs/operations.md#floods.
        println!(
            "flood row: | {}/s for {} s, {} | {} ({:.0}/s) | {} busy at once, {} busy after a wait, {} at the deadline, \
             {} contended, {} unanswered | p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms | {} | {} for {} | {:.0} ms |",
            self.rate,
            self.seconds,
            if self.replicas == 1 { "1 replica".to_owned() } else { format!("{} replicas", self.replicas) },
            admitted,
            admitted as f64 / sent_for,
            self.of(Answer::Shed),
            self.of(Answer::Busy),
            self.of(Answer::Deadline),
            self.of(Answer::Contended),
            self.of(Answer::Unanswered),
            p(0.5),
            p(0.99),
            p(1.0),
            self.peak_slots,
            self.records,
            self.admitted(),
            self.after.as_secs_f64() * 1e3
        );
        let mut ok = true;
        let mut fail = |why: String| {
            println!("flood FAILED at {}/s: {why}", self.rate);
            ok = false;
        };
        if self.records < self.admitted() {
            fail(format!("{} admitted changes have no record", self.admitted() - self.records));
        }
        if self.of(Answer::Other) + self.of(Answer::Unanswered) > 0 {
            fail(format!(
                "{} requests got an unexpected answer or none",
                self.of(Answer::Other) + self.of(Answer::Unanswered)
            ));
        }
        if self.peak_slots > SLOTS {
            fail(format!("{} API-call slots taken (limit {SLOTS})", self.peak_slots));
        }
        if p(1.0) > WEBHOOK_TIMEOUT.as_secs_f64() * 1e3 {
            fail(format!("an answer took {:.1}s, past the webhook timeout", p(1.0) / 1e3));
        }
        ok
    }
}

/// ConfigMaps per namespace. Every agent DELETE lists the guarded types' objects in its
/// namespace (what the DELETE would take with it, [`agentguard::cluster::ownership`]), so a
/// flood's 60,000 objects in one namespace would measure those lists: with 60,000 ConfigMaps in
/// one namespace, no DELETE was admitted within the deadline.
const PER_NAMESPACE: usize = 100;

/// The namespaces of step `step` of `count` requests.
fn step_namespaces(step: usize, count: usize) -> Vec<String> {
    (0..count.div_ceil(PER_NAMESPACE)).map(|k| format!("flood-{step}-{k}")).collect()
}

/// `count` ConfigMaps (`PER_NAMESPACE` in each of `namespaces`), as the API server stored them.
fn flood_objects(w: &World, namespaces: &[String], count: usize) -> Result<Vec<serde_json::Value>> {
    use serde_json::{Value, json};
    let items: Vec<Value> = namespaces
        .iter()
        .map(|ns| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
        .collect();
    must(w.plane.kubectl_stdin(
        &w.plane.admin,
        &["create", "-f", "-", "-o", "name"],
        Some(&json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()),
    ))?;
    const BATCH: usize = 1000;
    let lists: Vec<String> = (0..count)
        .step_by(BATCH)
        .map(|from| {
            let items: Vec<Value> = (from..count.min(from + BATCH))
                .map(|i| {
                    json!({"apiVersion": "v1", "kind": "ConfigMap",
                           "metadata": {"name": format!("c{i}"), "namespace": namespaces[i / PER_NAMESPACE]}})
                })
                .collect();
            json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
        })
        .collect();
    // A few kubectl at once: one alone spends most of its time in its own decoding.
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..4)
            .map(|part| {
                let lists = &lists;
                s.spawn(move || -> Result<()> {
                    for list in lists.iter().skip(part).step_by(4) {
                        must(w.plane.kubectl_stdin(
                            &w.plane.admin,
                            &["create", "-f", "-", "-o", "name"],
                            Some(list),
                        ))?;
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker.join().map_err(|_| anyhow::anyhow!("a creating thread panicked"))??;
        }
        Ok(())
    })?;
    let live: Value = serde_json::from_str(&must(
        w.plane.kubectl(&w.plane.admin, &["get", "configmaps", "-A", "-o", "json"]),
    )?)?;
    let mut live: Vec<Value> = live["items"]
        .as_array()
        .context("a list")?
        .iter()
        .filter(|o| {
            o["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with('c') && n[1..].parse::<usize>().is_ok())
                && o["metadata"]["namespace"].as_str().is_some_and(|n| namespaces.iter().any(|x| x == n))
        })
        .cloned()
        .collect();
    ensure!(live.len() == count, "{} ConfigMaps listed, {count} made", live.len());
    live.sort_by_key(|o| o["metadata"]["name"].as_str().and_then(|n| n[1..].parse::<usize>().ok()));
    Ok(live)
}

fn review(n: u64, old: &serde_json::Value) -> String {
    let ns = &old["metadata"]["namespace"];
    serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": format!("flood-{}-{n}", ns.as_str().unwrap_or_default()),
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
}

async fn send(client: &reqwest::Client, url: &str, body: String) -> Answer {
    let answer = async {
        let r = client.post(url).header("content-type", "application/json").body(body).send().await?;
        let status = r.status();
        let text = r.text().await?;
        reqwest::Result::Ok((status, text))
    };
    let answer = match tokio::time::timeout(GIVE_UP, answer).await {
        Ok(Ok((status, text)))
            if status == reqwest::StatusCode::SERVICE_UNAVAILABLE && text.contains("agentguard is busy") =>
        {
            return Answer::Shed;
        }
        Ok(Ok((_, text))) => match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) => Ok(Ok(v)),
            Err(_) => {
                eprintln!("flood: unexpected answer: {text}");
                return Answer::Other;
            }
        },
        Ok(Err(e)) => Ok(Err(e)),
        Err(e) => Err(e),
    };
    match answer {
        Ok(Ok(v)) if v["response"]["allowed"] == true => Answer::Admitted,
        Ok(Ok(v)) => match v["response"]["status"]["message"].as_str().unwrap_or_default() {
            m if m.contains("agentguard is busy") => Answer::Busy,
            m if m.contains("could not finish the API calls") => Answer::Deadline,
            m if m.contains("could not check the churn limit") => Answer::Contended,
            m => {
                eprintln!("flood: unexpected answer: {m}");
                Answer::Other
            }
        },
        Ok(Err(e)) => {
            static SAID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            if SAID.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 5 {
                eprintln!("flood: request failed: {:#}", anyhow::Error::from(e));
            }
            Answer::Unanswered
        }
        Err(_) => Answer::Unanswered,
    }
}

/// `--flood SECONDS --rate N[,N…] [--replicas R]`: N agent DELETEs a second for SECONDS, sent
/// straight to agentguard's webhook port as AdmissionReviews (the API server on this machine
/// cannot pass that many), each of its own live ConfigMap under an Allow policy with a churn
/// limit, so each admission checks the live object, charges the churn count and writes a
/// record. Each rate is a step of its own, in its own namespace, one after the other on the
/// same replicas. The load is open-loop: requests are sent at a constant pace over a few
/// keep-alive HTTP/2 connections per replica whatever the answers do, and each answer's time
/// is counted from the moment its request was due. Reports what was admitted, refused and how
/// fast, the most API-call slots seen taken, whether every admitted change has its record, and
/// how fast a request right after each step is admitted.
fn flood(seconds: u64, rates: &[u64], replicas: usize) -> Result<bool> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let w = World::start()?;
    let steps: Vec<Vec<String>> =
        rates.iter().enumerate().map(|(i, rate)| step_namespaces(i, (seconds * rate) as usize)).collect();
    let policy = "apiVersion: agentguard.io/v1alpha1\nkind: ClusterAgentPolicy\nmetadata: {name: flood}\nspec:\n  action: Allow\n  \
                  churnLimit: {maxOperations: 100000, window: 1h}\n  rules:\n    - {name: flood, operations: [DELETE], namespaces: [\"flood-*\"], \
                  resources: [{apiGroups: [\"\"], resources: [configmaps]}]}\n";
    must(w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-f", "-"], Some(policy)))?;
    // More replicas serve direct requests only; the requests go round-robin, as a Service would.
    let names = ["agentguard-2", "agentguard-3", "agentguard-4", "agentguard-5"];
    let more: Vec<world::Agentguard> = names
        .iter()
        .take(replicas.saturating_sub(1))
        .map(|name| world::start_agentguard(&w.plane, name, false))
        .collect::<Result<_>>()?;
    let urls: Vec<String> = std::iter::once(&w.agentguard)
        .chain(more.iter())
        .map(|a| format!("{}/agents?timeout={}s", a.webhook, WEBHOOK_TIMEOUT.as_secs()))
        .collect();
    let pids: Vec<u32> = std::iter::once(&w.agentguard).chain(more.iter()).map(|a| a.pid()).collect();
    let admins: Arc<Vec<String>> =
        Arc::new(std::iter::once(&w.agentguard).chain(more.iter()).map(|a| a.admin.clone()).collect());
    let ca = reqwest::Certificate::from_pem(&std::fs::read(w.plane.dir.path().join("ca.crt"))?)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    // One client per connection: a client keeps one HTTP/2 connection to a host.
    let clients: Vec<Vec<reqwest::Client>> = {
        let _entered = runtime.enter();
        (0..urls.len())
            .map(|_| {
                (0..CONNECTIONS)
                    .map(|_| {
                        reqwest::Client::builder()
                            .add_root_certificate(ca.clone())
                            .http2_prior_knowledge()
                            .timeout(GIVE_UP)
                            .build()
                    })
                    .collect::<reqwest::Result<Vec<_>>>()
            })
            .collect::<reqwest::Result<_>>()?
    };
    let mut ok = true;
    for (rate, namespaces) in rates.iter().copied().zip(&steps) {
        ensure!(rate > 0, "a rate of 0");
        let count = (seconds * rate) as usize;
        let made = Instant::now();
        let live = flood_objects(&w, namespaces, count)?;
        let ns = &namespaces[0];
        println!(
            "flood: {count} ConfigMaps made in {} namespaces in {:.0}s",
            namespaces.len(),
            made.elapsed().as_secs_f64()
        );
        // The policy in force: one admitted dry-run delete through the API server.
        let started = Instant::now();
        while !w
            .plane
            .kubectl(&w.agent, &["delete", "configmap", "c0", "-n", ns, "--dry-run=server"])
            .status
            .success()
        {
            ensure!(started.elapsed() < Duration::from_secs(30), "the flood policy is not in force in {ns}");
            std::thread::sleep(Duration::from_millis(200));
        }
        let bodies: Vec<String> = live.iter().enumerate().map(|(n, old)| review(n as u64, old)).collect();
        let probe = review(u64::MAX, &live[0]);
        println!(
            "flood: {rate} agent DELETEs/s for {seconds}s, straight to {} agentguard replica(s) over {CONNECTIONS} HTTP/2 connections each",
            urls.len()
        );
        let (clients, urls, admins) = (&clients, &urls, admins.clone());
        let cpu = || -> Result<(f64, f64)> {
            let replicas: f64 = pids.iter().map(|&p| cpu_seconds(p)).sum::<Result<f64>>()?;
            Ok((cpu_seconds(std::process::id())?, replicas))
        };
        let cpu_before = cpu()?;
        let (answers, peak_slots, after) = runtime.block_on(async move {
            let sampling = Arc::new(AtomicBool::new(true));
            let sampler = {
                let sampling = sampling.clone();
                tokio::task::spawn_blocking(move || {
                    // The most slots any one replica had taken.
                    let mut peak = 0.0f64;
                    while sampling.load(Ordering::Acquire) {
                        for admin in admins.iter() {
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
            // Open loop: each request is sent when it is due, whatever the earlier ones' answers.
            let start = tokio::time::Instant::now();
            let mut tasks = Vec::with_capacity(bodies.len());
            for (n, body) in bodies.into_iter().enumerate() {
                let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
                tokio::time::sleep_until(due).await;
                let replica = n % urls.len();
                let client = clients[replica][(n / urls.len()) % CONNECTIONS].clone();
                let url = urls[replica].clone();
                tasks.push(tokio::spawn(async move { (send(&client, &url, body).await, due.elapsed()) }));
            }
            let mut answers = Vec::with_capacity(tasks.len());
            for t in tasks {
                answers.push(t.await?);
            }
            sampling.store(false, Ordering::Release);
            let peak = sampler.await?;
            // At once afterwards: how long until one more is admitted (sent again while refused).
            let sent = Instant::now();
            loop {
                let answer = send(&clients[0][0], &urls[0], probe.clone()).await;
                if answer == Answer::Admitted {
                    break;
                }
                println!(
                    "flood: {:.1}s after the flood, a request was refused: {answer:?}",
                    sent.elapsed().as_secs_f64()
                );
                ensure!(
                    sent.elapsed() < Duration::from_secs(120),
                    "nothing admitted for 2 minutes after the flood"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            anyhow::Ok((answers, peak, sent.elapsed()))
        })?;
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
        let records = records.lines().filter(|l| namespaces.iter().any(|n| n == l)).count();
        let cpu_after = cpu()?;
        let cpu = (cpu_after.0 - cpu_before.0, cpu_after.1 - cpu_before.1);
        let step = Step { rate, seconds, replicas: urls.len(), answers, peak_slots, after, records, cpu };
        ok &= step.report();
        if step.refused() == 0 {
            println!("flood: {rate}/s sustained: nothing refused");
        }
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
    Ok(ok)
}
