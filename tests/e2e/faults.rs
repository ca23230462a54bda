//! `fault_*` scenarios: agentguard keeps refusing agents, and only agents, while what it depends
//! on fails or it is itself restarted. Each runs a second agentguard with a webhook configuration
//! of its own ([`Replica`]), or a control plane of its own, so the world's agentguard and the
//! scenarios after it are left as they were.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::world::{Agentguard, Launch, World, approve_command, must, start_agentguard_with};

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

/// What the API server calls in [`rolling_restart`] instead of one replica, as it calls a
/// Service: each new TCP connection (TLS passes through) goes to a replica picked at random among
/// those listed as ready, as kube-proxy's iptables mode picks, and on to the next one listed when
/// its port refuses it (counted: kube-proxy would have failed that call). `/readyz` is read every
/// 100 ms and a change is acted on [`ENDPOINTS_LAG`] later, as endpoints reach kube-proxy on every
/// node some time after the pod changed. Open connections stay where they are, as with kube-proxy.
struct Front {
    port: u16,
    backends: Arc<Mutex<Vec<Backend>>>,
    /// Connections no replica took: the API server saw them closed unanswered.
    unrouted: Arc<AtomicU32>,
    /// Connections refused by a replica still listed as ready: it stopped listening before
    /// readiness took it out.
    refused: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
}

struct Backend {
    name: &'static str,
    webhook: SocketAddr,
    admin: String,
    /// What the front acts on.
    ready: bool,
    /// A different answer of `/readyz`, and since when it has been given.
    changing: Option<(bool, Instant)>,
    connections: u32,
}

/// How long after `/readyz` changed the [`Front`] acts on it.
const ENDPOINTS_LAG: Duration = Duration::from_secs(1);

impl Backend {
    /// A replica that has just answered ready.
    fn of(name: &'static str, agentguard: &Agentguard) -> Result<Self> {
        let address = agentguard.webhook.trim_start_matches("https://").split('/').next().unwrap_or_default();
        Ok(Self {
            name,
            webhook: address.parse().with_context(|| format!("webhook address of {name}"))?,
            admin: agentguard.admin.clone(),
            ready: true,
            changing: None,
            connections: 0,
        })
    }
}

impl Front {
    fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let backends: Arc<Mutex<Vec<Backend>>> = Arc::default();
        let (unrouted, stop) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicBool::new(false)));
        let refused = Arc::new(AtomicU32::new(0));
        let (b, u, r, s) = (backends.clone(), unrouted.clone(), refused.clone(), stop.clone());
        std::thread::spawn(move || {
            let never_cut = Arc::new(AtomicBool::new(false));
            for client in listener.incoming() {
                if s.load(Ordering::Acquire) {
                    break;
                }
                let Ok(client) = client else { continue };
                let candidates: Vec<SocketAddr> = {
                    let backends = b.lock().unwrap_or_else(|e| e.into_inner());
                    let n = backends.len().max(1);
                    // Random enough, and no generator to depend on.
                    let first = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.subsec_nanos() as usize / 1000);
                    (0..backends.len())
                        .map(|k| &backends[(first + k) % n])
                        .filter(|b| b.ready)
                        .map(|b| b.webhook)
                        .collect()
                };
                let server = candidates.into_iter().find_map(|addr| {
                    let Ok(server) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
                        r.fetch_add(1, Ordering::AcqRel);
                        return None;
                    };
                    let mut backends = b.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(b) = backends.iter_mut().find(|b| b.webhook == addr) {
                        b.connections += 1;
                    }
                    Some(server)
                });
                let Some(server) = server else {
                    u.fetch_add(1, Ordering::AcqRel);
                    continue;
                };
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else { continue };
                    let (c, s) = (never_cut.clone(), s.clone());
                    std::thread::spawn(move || pump(from, to, &c, &s));
                }
            }
        });
        let (b, s) = (backends.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                let admins: Vec<String> =
                    b.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|b| b.admin.clone()).collect();
                for admin in admins {
                    let ready = crate::world::http_ok(&format!("{admin}/readyz"));
                    let mut backends = b.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(b) = backends.iter_mut().find(|b| b.admin == admin) {
                        b.changing = match b.changing {
                            _ if ready == b.ready => None,
                            Some((to, since)) if to == ready && since.elapsed() >= ENDPOINTS_LAG => {
                                b.ready = ready;
                                None
                            }
                            Some((to, since)) if to == ready => Some((to, since)),
                            _ => Some((ready, Instant::now())),
                        };
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Ok(Self { port, backends, unrouted, refused, stop })
    }

    /// Lists a replica that has just answered ready. One that stopped stays listed, and is left
    /// out once its failing readiness reaches the front.
    fn add(&self, backend: Backend) {
        self.backends.lock().unwrap_or_else(|e| e.into_inner()).push(backend);
    }

    /// How many connections each replica, past and present, was given, as `name N`.
    fn spread(&self) -> String {
        let backends = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        backends.iter().map(|b| format!("{} {}", b.name, b.connections)).collect::<Vec<_>>().join(", ")
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// One stream of traffic: what it met and its slowest answer.
#[derive(Default, Debug)]
struct Stream {
    tally: Tally,
    longest: Duration,
    /// Of the requests without an answer, those whose call ran into the webhook's timeout (a
    /// replica starved of CPU, not one going away).
    timed_out: u32,
    /// The first few refusals that name neither of the guarding policies.
    unexpected: Vec<String>,
}

impl Stream {
    /// Runs kubectl as `who`, counts the answer; (admitted, stderr).
    fn run(&mut self, kubectl: &std::path::Path, who: &std::path::Path, args: &[&str]) -> (bool, String) {
        let started = Instant::now();
        let (ok, err) = kubectl_at(kubectl, who, args);
        self.longest = self.longest.max(started.elapsed());
        self.tally.count(ok, &err);
        if err.contains("failed calling webhook") && err.contains("deadline exceeded") {
            self.timed_out += 1;
        }
        let expected = ["requires approval", "e2e-rolling-deny"].iter().any(|p| err.contains(p));
        if !ok && !expected && self.unexpected.len() < 3 {
            self.unexpected.push(err.trim().to_owned());
        }
        (ok, err)
    }

    /// Requests that went without an answer for another reason than the webhook's timeout: the
    /// connection they were on was cut, or none could be made.
    fn cut_off(&self) -> u32 {
        self.tally.no_answer - self.timed_out
    }

    /// Adds another thread's counts to these.
    fn add(&mut self, other: &Stream) {
        let (t, o) = (&mut self.tally, &other.tally);
        t.sent += o.sent;
        t.admitted += o.admitted;
        t.held += o.held;
        t.no_answer += o.no_answer;
        t.unavailable += o.unavailable;
        t.plane_down += o.plane_down;
        t.other += o.other;
        t.examples.extend(o.examples.iter().cloned());
        self.longest = self.longest.max(other.longest);
        self.timed_out += other.timed_out;
        self.unexpected.extend(other.unexpected.iter().cloned());
    }

    fn failed(&self) -> u32 {
        self.tally.sent - self.tally.admitted
    }
}

impl std::fmt::Display for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = &self.tally;
        write!(
            f,
            "{} sent, {} admitted, {} held or denied, {} without an answer from agentguard ({} of them timed out), \
             {} other; slowest {:.2}s",
            t.sent,
            t.admitted,
            t.held,
            t.no_answer,
            self.timed_out,
            t.unavailable + t.plane_down + t.other,
            secs(self.longest)
        )?;
        for refusal in &self.unexpected {
            write!(f, "\n    refused: {refusal}")?;
        }
        Ok(())
    }
}

/// The connections a stopped replica still had open when it stopped listening, from its log.
fn open_at_drain(log: &std::path::Path) -> Result<u32> {
    let text = std::fs::read_to_string(log)?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("draining connections"))
        .with_context(|| format!("{} does not say it stopped listening", log.display()))?;
    let count = line.split("\"open_connections\":").nth(1).unwrap_or_default();
    Ok(count.chars().take_while(char::is_ascii_digit).collect::<String>().parse()?)
}

/// The rolling restart's records: (operation, object name) → the outcome the check set (empty
/// until a replica has checked it and labelled it so).
fn rolling_records(w: &World) -> Result<std::collections::HashMap<(String, String), String>> {
    let list: serde_json::Value = serde_json::from_str(&must(
        w.plane.kubectl(&w.plane.admin, &["get", "agentchanges", "-n", "agentguard-system", "-o", "json"]),
    )?)?;
    Ok(list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["spec"]["target"]["namespace"] == ROLLING_NS)
        .map(|r| {
            let field = |f: &str| r.pointer(f).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
            // The checker writes the status, then the label.
            let labelled = r["metadata"]["labels"]["agentguard.io/outcome"] != "pending";
            let outcome = if labelled { field("/status/outcome") } else { String::new() };
            ((field("/spec/operation"), field("/spec/target/name")), outcome)
        })
        .collect())
}

const ROLLING_NS: &str = "e2e-rolling";
const ROLLING_POLICIES: &str = r#"
apiVersion: agentguard.io/v1alpha1
kind: ClusterAgentPolicy
metadata: {name: e2e-rolling-recorded}
spec:
  action: Allow
  rules:
    - name: recorded
      operations: [UPDATE]
      namespaces: [e2e-rolling]
      names: ["rec-*"]
      resources: [{apiGroups: [""], resources: [configmaps]}]
---
apiVersion: agentguard.io/v1alpha1
kind: ClusterAgentPolicy
metadata: {name: e2e-rolling-approved}
spec:
  action: RequireApproval
  approval: {approvers: {users: [alice]}}
  rules:
    - name: approved
      operations: [DELETE]
      namespaces: [e2e-rolling]
      names: ["appr-*"]
      resources: [{apiGroups: [""], resources: [configmaps]}]
"#;

/// Three replicas behind a [`Front`], restarted one after another as a Deployment's rolling
/// update does (SIGTERM, exit, a new one started, the next only once it is ready), while agents
/// and a human keep writing: an agent's guarded deletes (a Deny and a RequireApproval policy) are
/// all refused; every change an Allow policy or alice's approval admits has its AgentChange
/// record; none of alice's requests fails, her approvals included (the `approvals` webhook); and
/// no request at all goes without an answer (a stopping replica drains what it took).
/// Runs on a control plane of its own, whose agentguard the three replicas replace.
pub fn rolling_restart(_: &World) -> Result<()> {
    const RECORDED: usize = 800;
    const APPROVED: usize = 200;
    const RECORDING: usize = 3;
    const FIRST: [&str; 3] = ["rolling-a", "rolling-b", "rolling-c"];
    const SECOND: [&str; 3] = ["rolling-a2", "rolling-b2", "rolling-c2"];
    let w = World::start()?;
    let ns = ROLLING_NS;
    must(w.plane.kubectl(&w.plane.admin, &["create", "namespace", ns]))?;
    crate::scenarios::deployment(&w, ns, "web")?;
    let names = std::iter::once("guarded".to_owned())
        .chain((0..RECORDED).map(|i| format!("rec-{i}")))
        .chain((0..APPROVED).map(|i| format!("appr-{i}")));
    let items: Vec<serde_json::Value> = names
        .map(|name| serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": ns}}))
        .collect();
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
    must(w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-f", "-"], Some(&list.to_string())))?;
    deny_configmaps(&w, ns, "e2e-rolling-deny", "guarded")?;
    must(w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-f", "-"], Some(ROLLING_POLICIES)))?;
    must(w.plane.kubectl(
        &w.plane.admin,
        &[
            "wait",
            "--for=condition=Ready",
            "--timeout=30s",
            "clusteragentpolicy/e2e-rolling-deny",
            "clusteragentpolicy/e2e-rolling-recorded",
            "clusteragentpolicy/e2e-rolling-approved",
        ],
    ))?;

    // The three replicas take over the world's webhook configuration, pointed at the front.
    w.agentguard.kill();
    let front = Front::start()?;
    let launch = Launch {
        webhook_configuration: Some("agentguard".to_owned()),
        webhook_url: Some(format!("https://127.0.0.1:{}/validate", front.port)),
        // Readiness fails this long before the listener closes (the chart's default is 5 s, for
        // endpoints to reach every node; the front acts on readiness 1 s late).
        args: vec!["--shutdown-delay-seconds=2".to_owned()],
        ..Launch::default()
    };
    let mut replicas = Vec::new();
    for name in FIRST {
        let replica = start_agentguard_with(&w.plane, name, &launch)?;
        front.add(Backend::of(name, &replica)?);
        replicas.push((name, replica));
    }
    enforced(&w, ns, "guarded", "e2e-rolling-deny")?;

    let stop = AtomicBool::new(false);
    let (kubectl, agent, alice) = (w.plane.kubectl.clone(), w.agent.clone(), w.alice.clone());
    let (mut figures, mut drained) = (Vec::new(), 0);
    let outcome = std::thread::scope(|scope| {
        let guarded = scope.spawn(|| {
            let mut stream = Stream::default();
            let targets = [["delete", "configmap", "guarded"], ["delete", "deployment", "web"]];
            for k in 0.. {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let [verb, kind, name] = targets[k % 2];
                stream.run(&kubectl, &agent, &[verb, kind, name, "-n", ns]);
                std::thread::sleep(Duration::from_millis(50));
            }
            stream
        });
        // Several at once, so that some are in flight whenever a replica stops.
        let recorded: Vec<_> = (0..RECORDING)
            .map(|t| {
                let (stop, kubectl, agent) = (&stop, &kubectl, &agent);
                scope.spawn(move || {
                    let (mut stream, mut admitted) = (Stream::default(), Vec::new());
                    for i in (t..RECORDED).step_by(RECORDING) {
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        let name = format!("rec-{i}");
                        let annotate = ["annotate", "configmap", &name, "-n", ns, "e2e=rolled"];
                        if stream.run(kubectl, agent, &annotate).0 {
                            admitted.push(name);
                        }
                    }
                    (stream, admitted)
                })
            })
            .collect();
        let approvals = scope.spawn(|| {
            let (mut agent_stream, mut human) = (Stream::default(), Stream::default());
            let (mut approved, mut unapproved) = (Vec::new(), Vec::new());
            for i in 0..APPROVED {
                let name = format!("appr-{i}");
                let delete = ["delete", "configmap", name.as_str(), "-n", ns];
                // The agent asks until agentguard holds the delete and says how to approve it.
                let denial = loop {
                    if stop.load(Ordering::Acquire) {
                        break None;
                    }
                    let (ok, err) = agent_stream.run(&kubectl, &agent, &delete);
                    if ok {
                        unapproved.push(name.clone());
                        break None;
                    }
                    if err.contains("requires approval") {
                        break Some(err);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                };
                let Some(command) = denial.and_then(|d| approve_command(&d).ok()) else { continue };
                let command: Vec<&str> = command.iter().map(String::as_str).collect();
                if !human.run(&kubectl, &alice, &command).0 {
                    continue;
                }
                // Approved: the agent's delete goes through, recorded.
                while !stop.load(Ordering::Acquire) {
                    let (ok, err) = agent_stream.run(&kubectl, &agent, &delete);
                    if ok {
                        approved.push(name.clone());
                        break;
                    }
                    if err.contains("NotFound") {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            (agent_stream, human, approved, unapproved)
        });
        let writes = scope.spawn(|| {
            let mut stream = Stream::default();
            for i in 0.. {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let name = format!("h{i}");
                stream.run(&kubectl, &alice, &["create", "configmap", &name, "-n", ns]);
                stream.run(&kubectl, &alice, &["delete", "configmap", &name, "-n", ns]);
            }
            stream
        });
        let restarts = (|| -> Result<()> {
            std::thread::sleep(Duration::from_secs(3));
            for slot in 0..replicas.len() {
                let (name, old) = &replicas[slot];
                // Summed floats: an empty sum prints as -0.
                let decided = old.decisions()? as u64;
                let (stopped, status) = old.terminate(Duration::from_secs(40))?;
                ensure!(status.success(), "{name} exited {status} after SIGTERM");
                let draining = open_at_drain(&w.plane.dir.path().join(format!("{name}.log")))?;
                drained += draining;
                let started = Instant::now();
                let replica = start_agentguard_with(&w.plane, SECOND[slot], &launch)?;
                let ready = started.elapsed();
                front.add(Backend::of(SECOND[slot], &replica)?);
                figures.push(format!(
                    "{name} ({decided} reviews decided, {draining} connections open when it stopped listening) exited 0 \
                     {:.2}s after SIGTERM; {} ready {:.2}s after it was started",
                    secs(stopped),
                    SECOND[slot],
                    secs(ready)
                ));
                replicas[slot] = (SECOND[slot], replica);
                std::thread::sleep(Duration::from_secs(2));
            }
            std::thread::sleep(Duration::from_secs(2));
            Ok(())
        })();
        stop.store(true, Ordering::Release);
        let guarded = guarded.join().expect("guarded deletes");
        let (mut stream, mut admitted) = (Stream::default(), Vec::new());
        for thread in recorded {
            let (s, a) = thread.join().expect("recorded changes");
            stream.add(&s);
            admitted.extend(a);
        }
        let recorded = (stream, admitted);
        let approvals = approvals.join().expect("approvals");
        let writes = writes.join().expect("human writes");
        restarts.map(|()| (guarded, recorded, approvals, writes))
    });
    for f in &figures {
        println!("  {f}");
    }
    // The replicas' logs go with the control plane: their ends are printed before the error.
    let with_logs = |e: anyhow::Error| {
        for name in FIRST.iter().chain(SECOND.iter()) {
            let log = w.plane.dir.path().join(format!("{name}.log"));
            println!("--- {name} (last 15 lines) ---\n{}", crate::cluster::tail(&log, 15));
        }
        e
    };
    let (guarded, (recorded, admitted), (approving, approver, approved, unapproved), writes) =
        outcome.map_err(with_logs)?;
    println!(
        "  front: connections per replica: {}; {} refused by a replica listed as ready, {} taken by none",
        front.spread(),
        front.refused.load(Ordering::Acquire),
        front.unrouted.load(Ordering::Acquire)
    );
    println!("  agent's guarded deletes: {guarded}");
    println!("  agent's changes an Allow policy admits: {recorded}");
    println!(
        "  agent's deletes under approval: {approving}; {} approved and done, {} admitted unapproved",
        approved.len(),
        unapproved.len()
    );
    println!("  alice's approvals: {approver}");
    println!("  alice's writes: {writes}");
    let checked = (|| -> Result<()> {
        // Readiness fails before the listener closes, so no new connection meets a closed port.
        let refused = front.refused.load(Ordering::Acquire) + front.unrouted.load(Ordering::Acquire);
        ensure!(refused == 0, "{refused} connections met a replica that had stopped listening");
        // The API server keeps one connection, on one replica at a time: the one it was on when
        // the restarts began was stopped with it open.
        ensure!(drained > 0, "no replica had a connection open when it stopped: nothing was drained");
        ensure!(
            guarded.tally.admitted == 0,
            "{} guarded agent deletes were admitted",
            guarded.tally.admitted
        );
        ensure!(unapproved.is_empty(), "agent deletes admitted without approval: {unapproved:?}");
        for (kind, name) in [("configmap", "guarded"), ("deployment", "web")] {
            ensure!(crate::scenarios::exists(&w, ns, kind, name), "the guarded {kind} {name} is gone");
        }
        ensure!(guarded.tally.held > 0 && !approved.is_empty() && !admitted.is_empty(), "too little traffic");
        ensure!(approver.failed() == 0, "alice's approvals failed: {:?}", approver.tally);
        ensure!(writes.failed() == 0, "alice's writes failed: {:?}", writes.tally);
        // A replica that stops finishes what it took and hands the rest on: no call of the API
        // server's is cut off, so agents' legitimate requests do not fail either. (A call that
        // runs into the webhook's 5 s timeout on a machine starved of CPU is another matter.)
        let cut_off = guarded.cut_off() + recorded.cut_off() + approving.cut_off();
        ensure!(cut_off == 0, "{cut_off} agent requests were cut off without an answer from agentguard");
        // Each record is checked a few seconds after it is written, by whichever replica runs
        // then: records of a stopped replica are checked by the others.
        let started = Instant::now();
        let records = loop {
            let records = rolling_records(&w)?;
            if records.values().all(|outcome| !outcome.is_empty()) {
                break records;
            }
            ensure!(
                started.elapsed() < Duration::from_secs(60),
                "records still unchecked after 60s: {records:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        };
        let checked_after = started.elapsed();
        let outcome = |operation: &str, name: &String| records.get(&(operation.to_owned(), name.clone()));
        let missing: Vec<&String> = admitted
            .iter()
            .filter(|n| outcome("UPDATE", n).is_none())
            .chain(approved.iter().filter(|n| outcome("DELETE", n).is_none()))
            .collect();
        let not_happened: Vec<&String> = admitted
            .iter()
            .filter(|n| outcome("UPDATE", n).is_some_and(|o| o != "Happened"))
            .chain(approved.iter().filter(|n| outcome("DELETE", n).is_some_and(|o| o != "Happened")))
            .collect();
        println!(
            "  AgentChange records: {} for {} admitted changes ({} updates, {} approved deletes), {} missing; \
             all checked {:.1}s after the traffic stopped, {} of the admitted ones not marked Happened",
            records.len(),
            admitted.len() + approved.len(),
            admitted.len(),
            approved.len(),
            missing.len(),
            secs(checked_after),
            not_happened.len()
        );
        ensure!(missing.is_empty(), "admitted agent changes without a record: {missing:?}");
        ensure!(not_happened.is_empty(), "admitted agent changes not marked Happened: {not_happened:?}");
        Ok(())
    })();
    checked.map_err(with_logs)?;
    drop(replicas);
    drop(front);
    drop(w);
    Ok(())
}
