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
    let ns = "e2e-stale";
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
