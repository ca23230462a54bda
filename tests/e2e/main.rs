//! End-to-end tests: the real kube-apiserver calls agentguard, driven by real kubectl with real
//! ServiceAccount tokens and client certificates. Run by `hack/test.sh` (which builds the
//! Kubernetes binaries); each scenario gets a fresh namespace and reports on its own.
//! `cargo test --test e2e -- NAME` runs the scenarios whose name contains NAME.

mod approvals;
mod attack;
mod audit;
mod churn;
mod cloud;
mod cluster;
mod faults;
mod pending;
mod plugin;
mod routes;
mod scenarios;
mod tamper;
mod tickets;
mod trail;
mod world;

use std::time::Instant;

use world::World;

fn main() {
    let world = match World::start() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("e2e setup failed: {e:#}");
            println!("e2e: 0 passed, 1 failed");
            std::process::exit(1);
        }
    };
    let filter = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    let (mut passed, mut failed) = (0, 0);
    for (name, scenario) in scenarios::ALL {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let started = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scenario(&world)));
        let secs = started.elapsed().as_secs_f64();
        match result {
            Ok(Ok(())) => {
                passed += 1;
                println!("scenario {name} ... ok ({secs:.1}s)");
            }
            Ok(Err(e)) => {
                failed += 1;
                println!("scenario {name} ... FAILED ({secs:.1}s)\n  {e:#}");
            }
            Err(_) => {
                failed += 1;
                println!("scenario {name} ... FAILED (panicked)");
            }
        }
        // Every later scenario would fail for this one reason, far from where it happened.
        if let Err(e) = world.agentguard.check_alive() {
            failed += 1;
            println!("agentguard died during scenario {name}; the remaining scenarios are not run.\n  {e:#}");
            break;
        }
    }
    scenarios::report_latency(&world);
    scenarios::report_ownership_lookups(&world);
    let refused = scenarios::controller_refusals(&world);
    if refused > 0 {
        println!(
            "agentguard refused {refused} writes by the controller-manager's controllers (see agentguard.log)"
        );
    }
    if failed > 0 {
        eprintln!(
            "--- agentguard log (last 40 lines) ---\n{}",
            cluster::tail(&world.plane.dir.path().join("agentguard.log"), 40)
        );
    }
    println!("e2e: {passed} passed, {failed} failed");
    drop(world);
    std::process::exit(if failed == 0 { 0 } else { 1 });
}
