//! `fault_*` scenarios: agentguard keeps refusing agents, and only agents, while what it depends
//! on fails. Each runs a second agentguard with a webhook configuration of its own
//! ([`Replica`]), so the world's agentguard and the scenarios after it are left as they were.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::world::{Agentguard, Launch, World, must, start_agentguard_with};

/// A TCP forwarder between agentguard and the API server that can be cut like a network
/// partition: while cut, nothing is forwarded either way and nothing is closed (connections stay
/// open and silent, new ones are accepted and never answered), so agentguard sees no error, only
/// silence. Restored, the bytes flow again.
pub struct Proxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let (cut, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (c, s) = (cut.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::Acquire) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(target) else { continue };
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else { continue };
                    let (c, s) = (c.clone(), s.clone());
                    std::thread::spawn(move || pump(from, to, &c, &s));
                }
            }
        });
        Ok(Self { port, cut, stop })
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::Release);
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::Release);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wakes the accept loop so that it sees the stop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, cut: &AtomicBool, stop: &AtomicBool) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Acquire) {
        if cut.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// A second agentguard that the API server calls through a webhook configuration of its own,
/// besides the world's: an agent's request is admitted only if both admit it. Dropped, the
/// process is killed first and its configuration deleted after (a live process would restore it).
pub struct Replica<'w> {
    w: &'w World,
    configuration: String,
    pub agentguard: Option<Agentguard>,
}

impl<'w> Replica<'w> {
    pub fn start(
        w: &'w World,
        name: &'static str,
        kubeconfig: Option<PathBuf>,
        args: &[&str],
    ) -> Result<Self> {
        let launch = Launch {
            webhook_configuration: Some(name.to_owned()),
            kubeconfig,
            args: args.iter().map(|a| a.to_string()).collect(),
            ..Launch::default()
        };
        let mut replica = Self { w, configuration: name.to_owned(), agentguard: None };
        replica.agentguard = Some(start_agentguard_with(&w.plane, name, &launch)?);
        Ok(replica)
    }

    pub fn get(&self) -> &Agentguard {
        self.agentguard.as_ref().expect("running")
    }
}

impl Drop for Replica<'_> {
    fn drop(&mut self) {
        drop(self.agentguard.take());
        let _ = self.w.plane.kubectl(
            &self.w.plane.admin,
            &["delete", "validatingwebhookconfiguration", &self.configuration, "--ignore-not-found"],
        );
    }
}

/// The admin's kubeconfig with the API server reached at `127.0.0.1:port` instead (its
/// certificate names 127.0.0.1, so TLS does not mind the port).
fn kubeconfig_through(w: &World, port: u16, name: &str) -> Result<PathBuf> {
    let admin = std::fs::read_to_string(&w.plane.admin)?;
    let through = admin.replace(&w.plane.url, &format!("https://127.0.0.1:{port}"));
    ensure!(through != admin, "the admin kubeconfig does not name {}", w.plane.url);
    let path = w.plane.dir.path().join(format!("{name}.kubeconfig"));
    std::fs::write(&path, through)?;
    Ok(path)
}

/// A kubectl run: whether it succeeded, its wall time, and its stderr.
fn timed(w: &World, who: &std::path::Path, args: &[&str]) -> (bool, Duration, String) {
    let started = Instant::now();
    let out = w.plane.kubectl(who, args);
    (out.status.success(), started.elapsed(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// agentguard cut off from the API server while the API server still calls it: past
/// `--max-staleness` its agents webhook answers 503 and the agent is refused (failurePolicy:
/// Fail), a human's request is as fast as before, the metric and readiness say why; once the
/// API server answers again, agents are decided again.
pub fn view_stale(w: &World) -> Result<()> {
    const BOUND: Duration = Duration::from_secs(4);
    let ns = "e2e-view-age";
    must(w.plane.kubectl(&w.plane.admin, &["create", "namespace", ns]))?;
    must(w.plane.kubectl(&w.plane.admin, &["create", "configmap", "kept", "-n", ns]))?;
    for i in 0..40 {
        must(w.plane.kubectl(&w.plane.admin, &["create", "configmap", &format!("h{i}"), "-n", ns]))?;
    }
    let api: SocketAddr = w.plane.url.trim_start_matches("https://").parse().context("API server address")?;
    let proxy = Proxy::start(api)?;
    let kubeconfig = kubeconfig_through(w, proxy.port, "through-proxy")?;
    let replica = Replica::start(w, "agentguard-stale", Some(kubeconfig), &["--max-staleness=4s"])?;
    let stale = replica.get();
    // An agent's dry-run relabel of a ConfigMap: no enforced policy holds it (a Warn policy
    // warns), it needs no API call on agentguard's side (a DELETE would look up what it
    // cascades to, and wait out the partition: see `a_hung_api_call_is_refused_…`), so only a
    // refusal for a stale view stops it; dry runs change nothing however often admitted.
    let agent_write =
        ["label", "configmap", "kept", "-n", ns, "e2e=stale", "--overwrite", "--dry-run=server"];

    // Before the cut: the API server calls this replica for the agent, and it decides.
    let started = Instant::now();
    loop {
        let before = stale.decisions()?;
        let (ok, _, err) = timed(w, &w.agent, &agent_write);
        ensure!(ok, "the agent's dry-run relabel was refused before the cut: {err}");
        if stale.decisions()? > before {
            break;
        }
        ensure!(started.elapsed() < Duration::from_secs(30), "the API server never called agentguard-stale");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut human = Vec::new();
    for i in 0..3 {
        let (ok, took, err) = timed(w, &w.alice, &["delete", "configmap", &format!("h{i}"), "-n", ns]);
        ensure!(ok, "a human's delete failed before the cut: {err}");
        human.push(took);
    }
    let human_before = human.iter().max().copied().unwrap_or_default();

    proxy.cut();
    let cut_at = Instant::now();
    let mut admitted_while_cut = 0;
    let (refused_after, refusal) = loop {
        let (ok, _, err) = timed(w, &w.agent, &agent_write);
        let elapsed = cut_at.elapsed();
        if !ok {
            break (elapsed, err);
        }
        admitted_while_cut += 1;
        ensure!(
            elapsed < BOUND + Duration::from_secs(4),
            "the agent was still admitted {:.1}s after agentguard lost the API server (bound {BOUND:?})",
            secs(elapsed)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Not before the view could be older than the bound: the last heartbeat before the cut was
    // at most a quarter of the bound earlier.
    ensure!(
        refused_after + Duration::from_millis(500) >= BOUND - BOUND / 4,
        "refused {:.1}s after the cut, before the view could be {BOUND:?} old: {refusal}",
        secs(refused_after)
    );
    ensure!(
        // The API server's words for an HTTP 503 from a webhook.
        refusal.contains("failed calling webhook \"agents.agentguard.io\"")
            && refusal.contains("the server is currently unable to handle the request"),
        "the agent was refused, but not for want of an answer from the agents webhook: {refusal}"
    );
    ensure!(stale.gauge("agentguard_stale_refusals_total")? >= 1.0, "the refusal was not agentguard-stale's");
    let age = stale.gauge("agentguard_view_age_seconds")?;
    ensure!(age > secs(BOUND), "agentguard_view_age_seconds is {age} while cut off");
    let (status, text) = crate::world::http_get(&format!("{}/readyz", stale.admin))?;
    ensure!(
        status.contains("503") && text.contains("view of the cluster"),
        "readiness while cut: {status} {text}"
    );

    // Humans are not sent to the agents webhook: their requests take what they took before.
    let mut human_cut = Vec::new();
    for i in 3..13 {
        let (ok, took, err) = timed(w, &w.alice, &["delete", "configmap", &format!("h{i}"), "-n", ns]);
        ensure!(ok, "a human's delete failed while agentguard-stale was cut off: {err}");
        human_cut.push(took);
    }
    let human_cut_max = human_cut.iter().max().copied().unwrap_or_default();
    ensure!(
        human_cut_max < human_before + Duration::from_secs(1),
        "a human's delete took {:.2}s while cut off, {:.2}s before",
        secs(human_cut_max),
        secs(human_before)
    );
    // Still refused while the cut lasts.
    let (ok, _, _) = timed(w, &w.agent, &agent_write);
    ensure!(!ok, "the agent was admitted again while agentguard-stale was still cut off");

    proxy.restore();
    let restored_at = Instant::now();
    let decided_before = stale.decisions()?;
    let recovered_after = loop {
        let (ok, _, _) = timed(w, &w.agent, &agent_write);
        if ok && stale.decisions()? > decided_before {
            break restored_at.elapsed();
        }
        ensure!(
            restored_at.elapsed() < BOUND * 3,
            "agents still not decided {:.1}s after the API server was reachable again",
            secs(restored_at.elapsed())
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let age = stale.gauge("agentguard_view_age_seconds")?;
    ensure!(age <= secs(BOUND), "agentguard_view_age_seconds is {age} after the restore");
    ensure!(crate::world::http_ok(&format!("{}/readyz", stale.admin)), "not ready after the restore");
    println!(
        "  view_stale: bound {:.0}s; agent refused {:.2}s after the cut ({admitted_while_cut} dry-run relabels admitted before); \
         human deletes {:.2}s max while cut ({:.2}s max before); agents decided again {:.2}s after the restore",
        secs(BOUND),
        secs(refused_after),
        secs(human_cut_max),
        secs(human_before),
        secs(recovered_after)
    );
    drop(replica);
    must(w.plane.kubectl(&w.plane.admin, &["delete", "namespace", ns, "--wait=false"]))?;
    Ok(())
}

fn signal(pid: u32, signal: &str) -> Result<()> {
    let status =
        std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status()?;
    ensure!(status.success(), "kill -{signal} {pid} failed");
    Ok(())
}

/// agentguard hung (SIGSTOP: its sockets accept, nothing answers) rather than dead: each agent
/// request waits the webhook's `timeoutSeconds` (5 s, as the chart sets it) and is refused, the
/// object untouched; humans' requests take what they took before; after SIGCONT agents are
/// decided again.
pub fn hung(w: &World) -> Result<()> {
    const TIMEOUT: Duration = Duration::from_secs(5);
    let ns = "e2e-hung";
    must(w.plane.kubectl(&w.plane.admin, &["create", "namespace", ns]))?;
    must(w.plane.kubectl(&w.plane.admin, &["create", "configmap", "kept", "-n", ns]))?;
    for i in 0..20 {
        must(w.plane.kubectl(&w.plane.admin, &["create", "configmap", &format!("h{i}"), "-n", ns]))?;
    }
    let replica = Replica::start(w, "agentguard-hung", None, &["--webhook-timeout-seconds=5"])?;
    let hung = replica.get();
    let agent_write = ["label", "configmap", "kept", "-n", ns, "e2e=hung", "--overwrite", "--dry-run=server"];
    let started = Instant::now();
    loop {
        let before = hung.decisions()?;
        let (ok, _, err) = timed(w, &w.agent, &agent_write);
        ensure!(ok, "the agent's dry-run relabel was refused before the stop: {err}");
        if hung.decisions()? > before {
            break;
        }
        ensure!(started.elapsed() < Duration::from_secs(30), "the API server never called agentguard-hung");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut human_before = Duration::ZERO;
    for i in 0..3 {
        let (ok, took, err) = timed(w, &w.alice, &["delete", "configmap", &format!("h{i}"), "-n", ns]);
        ensure!(ok, "a human's delete failed before the stop: {err}");
        human_before = human_before.max(took);
    }

    signal(hung.pid(), "STOP")?;
    let outcome = (|| -> Result<(Vec<Duration>, Duration)> {
        let mut waits = Vec::new();
        for args in [
            &agent_write[..],
            &["delete", "configmap", "kept", "-n", ns][..],
            &["annotate", "configmap", "kept", "-n", ns, "e2e=hung"][..],
        ] {
            let (ok, took, err) = timed(w, &w.agent, args);
            ensure!(!ok, "the agent's {args:?} was admitted while agentguard-hung was stopped");
            ensure!(
                err.contains("failed calling webhook \"agents.agentguard.io\"")
                    && err.contains("deadline exceeded"),
                "the agent's {args:?} was refused, but not for the webhook's timeout: {err}"
            );
            ensure!(
                took + Duration::from_millis(500) >= TIMEOUT && took < TIMEOUT + Duration::from_secs(3),
                "the agent's {args:?} was refused after {:.2}s, not the webhook's {TIMEOUT:?}",
                secs(took)
            );
            waits.push(took);
        }
        ensure!(crate::scenarios::exists(w, ns, "configmap", "kept"), "the agent's delete went through");
        let mut human = Duration::ZERO;
        for i in 3..13 {
            let (ok, took, err) = timed(w, &w.alice, &["delete", "configmap", &format!("h{i}"), "-n", ns]);
            ensure!(ok, "a human's delete failed while agentguard-hung was stopped: {err}");
            human = human.max(took);
        }
        ensure!(
            human < human_before + Duration::from_secs(1),
            "a human's delete took {:.2}s while agentguard-hung was stopped, {:.2}s before",
            secs(human),
            secs(human_before)
        );
        Ok((waits, human))
    })();
    // Continued whatever happened, so that the process can be stopped for good.
    signal(hung.pid(), "CONT")?;
    let (waits, human) = outcome?;
    let continued = Instant::now();
    let decided_before = hung.decisions()?;
    let recovered = loop {
        let (ok, _, _) = timed(w, &w.agent, &agent_write);
        if ok && hung.decisions()? > decided_before {
            break continued.elapsed();
        }
        ensure!(continued.elapsed() < Duration::from_secs(15), "agents not decided 15s after SIGCONT");
        std::thread::sleep(Duration::from_millis(100));
    };
    let waits: Vec<String> = waits.iter().map(|d| format!("{:.2}s", secs(*d))).collect();
    println!(
        "  hung: agent requests refused after {} (timeoutSeconds 5); human deletes {:.2}s max while stopped ({:.2}s max before); agents decided again {:.2}s after SIGCONT",
        waits.join(", "),
        secs(human),
        secs(human_before),
        secs(recovered)
    );
    drop(replica);
    must(w.plane.kubectl(&w.plane.admin, &["delete", "namespace", ns, "--wait=false"]))?;
    Ok(())
}

/// What one side's traffic met while the control plane was restarted.
#[derive(Default, Debug)]
struct Tally {
    sent: u32,
    admitted: u32,
    /// Held or denied by agentguard's decision.
    held: u32,
    /// Refused because the API server could not get an answer from agentguard (failurePolicy).
    no_answer: u32,
    /// Refused by agentguard itself for want of the API server (503 AdmissionReview).
    unavailable: u32,
    /// Failed before any webhook: the API server or etcd down, or its authorizer not yet synced.
    plane_down: u32,
    /// Failed any other way.
    other: u32,
    /// The first few of those.
    examples: Vec<String>,
}

impl Tally {
    fn count(&mut self, ok: bool, stderr: &str) {
        self.sent += 1;
        if ok {
            self.admitted += 1;
        } else if stderr.contains("requires approval") || stderr.contains("denied the request") {
            self.held += 1;
        } else if stderr.contains("failed calling webhook") {
            self.no_answer += 1;
        } else if stderr.contains("agentguard") {
            self.unavailable += 1;
        } else if [
            "was refused - did you specify the right host or port",
            "connection refused",
            "etcdserver",
            "context deadline exceeded",
            "the server is currently unable",
            "Timeout",
            "timed out",
            "connection reset",
            "EOF",
            "too many requests",
            "TLS handshake",
            // A restarted API server answers before its RBAC authorizer has caught up.
            "cannot delete resource",
            "cannot create resource",
        ]
        .iter()
        .any(|s| stderr.contains(s))
        {
            self.plane_down += 1;
        } else {
            self.other += 1;
            if self.examples.len() < 5 {
                self.examples.push(stderr.trim().to_owned());
            }
        }
    }
}

fn kubectl_at(kubectl: &std::path::Path, kubeconfig: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(kubectl)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .args(args)
        .arg("--request-timeout=10s")
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Ok(out) => (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned()),
        Err(e) => (false, e.to_string()),
    }
}

/// Waits until the agent's dry-run delete of ConfigMap `name` in `ns` is refused under policy
/// `policy`: the time it took.
fn enforced(w: &World, ns: &str, name: &str, policy: &str) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let (ok, _, err) = timed(w, &w.agent, &["delete", "configmap", name, "-n", ns, "--dry-run=server"]);
        if !ok && err.contains(policy) {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "policy {policy} not enforced 30s after it was created (last answer: {})",
            if ok { "admitted".to_owned() } else { err }
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn deny_configmaps(w: &World, ns: &str, name: &str, object: &str) -> Result<()> {
    let policy = format!(
        "apiVersion: agentguard.io/v1alpha1\nkind: ClusterAgentPolicy\nmetadata: {{name: {name}}}\nspec:\n  action: Deny\n  \
         rules:\n    - name: one\n      operations: [DELETE]\n      namespaces: [{ns}]\n      names: [{object}]\n      \
         resources: [{{apiGroups: [\"\"], resources: [configmaps]}}]\n"
    );
    must(w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-f", "-"], Some(&policy)))?;
    Ok(())
}

/// kube-apiserver, then etcd, killed and started again on the same ports and data while an
/// agent keeps trying a held delete and a human keeps creating and deleting: no held request is
/// admitted, no human request is failed by agentguard (only by the control plane being down),
/// agentguard's watches come back (a policy created after each restart is enforced, its view
/// is current and it is ready). Runs on a control plane of its own.
pub fn control_plane_restarts(_: &World) -> Result<()> {
    let mut w = World::start()?;
    let ns = "e2e-restart";
    must(w.plane.kubectl(&w.plane.admin, &["create", "namespace", ns]))?;
    crate::scenarios::deployment(&w, ns, "web")?;
    for name in ["after-apiserver", "after-etcd"] {
        must(w.plane.kubectl(&w.plane.admin, &["create", "configmap", name, "-n", ns]))?;
    }
    let stop = AtomicBool::new(false);
    let (kubectl, agent, alice) = (w.plane.kubectl.clone(), w.agent.clone(), w.alice.clone());
    let mut figures = Vec::new();
    let (agents, humans, outcome) = std::thread::scope(|scope| {
        let agents = scope.spawn(|| {
            let mut tally = Tally::default();
            while !stop.load(Ordering::Acquire) {
                let (ok, err) = kubectl_at(
                    &kubectl,
                    &agent,
                    &["delete", "deployment", "web", "-n", ns, "--dry-run=server"],
                );
                tally.count(ok, &err);
                std::thread::sleep(Duration::from_millis(50));
            }
            tally
        });
        let humans = scope.spawn(|| {
            let mut tally = Tally::default();
            let mut i = 0;
            while !stop.load(Ordering::Acquire) {
                let name = format!("h{i}");
                let (ok, err) = kubectl_at(&kubectl, &alice, &["create", "configmap", &name, "-n", ns]);
                tally.count(ok, &err);
                let (ok, err) = kubectl_at(&kubectl, &alice, &["delete", "configmap", &name, "-n", ns]);
                // A delete after a failed create finds nothing: that is not the webhook's doing.
                tally.count(ok || err.contains("NotFound"), &err);
                i += 1;
            }
            tally
        });
        let outcome = (|| -> Result<()> {
            std::thread::sleep(Duration::from_secs(3));
            for (process, policy, object) in [
                ("kube-apiserver", "e2e-after-apiserver", "after-apiserver"),
                ("etcd", "e2e-after-etcd", "after-etcd"),
            ] {
                let back = w.plane.restart(process, Duration::from_secs(3))?;
                let since = Instant::now();
                deny_configmaps(&w, ns, policy, object)?;
                let enforced = enforced(&w, ns, object, policy)?;
                let ready = loop {
                    if crate::world::http_ok(&format!("{}/readyz", w.agentguard.admin)) {
                        break since.elapsed();
                    }
                    ensure!(
                        since.elapsed() < Duration::from_secs(60),
                        "agentguard not ready after {process} restarted"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                };
                let age = w.agentguard.gauge("agentguard_view_age_seconds")?;
                ensure!(age < 60.0, "agentguard's view is {age}s old after {process} restarted");
                figures.push(format!(
                    "{process}: API server ready {:.1}s after the kill (3s down), a policy created then enforced {:.2}s later, agentguard ready, view {age:.1}s old",
                    secs(back),
                    secs(enforced),
                ));
                let _ = ready;
                std::thread::sleep(Duration::from_secs(3));
            }
            Ok(())
        })();
        stop.store(true, Ordering::Release);
        (agents.join().expect("agent traffic"), humans.join().expect("human traffic"), outcome)
    });
    for f in &figures {
        println!("  {f}");
    }
    println!("  agent deletes (held): {agents:?}");
    println!("  human writes: {humans:?}");
    outcome?;
    ensure!(agents.admitted == 0, "{} held agent deletes were admitted", agents.admitted);
    ensure!(agents.held > 0, "agentguard held none of the agent's deletes");
    ensure!(agents.other == 0, "agent requests failed unexpectedly: {:?}", agents.examples);
    ensure!(
        humans.held == 0 && humans.no_answer == 0 && humans.unavailable == 0,
        "human requests were failed by agentguard: {humans:?}"
    );
    ensure!(humans.other == 0, "human requests failed unexpectedly: {:?}", humans.examples);
    ensure!(humans.admitted > 0, "no human request got through");
    // The world's own agentguard is still running.
    w.agentguard.decisions()?;
    drop(w);
    Ok(())
}
