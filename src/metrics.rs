//! Prometheus metrics: what agentguard decided, how fast, and whether its caches are trustworthy.
//! Served on the admin port; recording never blocks a request.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The API server's own webhook latency buckets, so both sides can be read on one scale.
const LATENCY_BUCKETS: [f64; 8] = [0.005, 0.025, 0.1, 0.5, 1.0, 2.5, 10.0, 25.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// allowed, warned, approved, held, denied
    pub outcome: String,
    /// Deciding policy (`cluster/NAME` or `NS/NAME`), or a built-in rule, or "".
    pub policy: String,
    pub resource: String,
    pub dry_run: String,
}

pub struct Metrics {
    registry: Registry,
    pub decisions: Family<DecisionLabels, Counter>,
    pub malformed: Counter,
    pub latency: Histogram,
    pub caches_ready: Gauge,
    pub policies: Gauge,
    pub policy_problems: Gauge,
    pub certificate_reloads: Counter,
    pub events_dropped: Counter,
    pub events_suppressed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("agentguard");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register("decisions", "Admission decisions", decisions.clone());
        let malformed = Counter::default();
        registry.register("malformed_reviews", "AdmissionReviews refused as malformed", malformed.clone());
        let latency = Histogram::new(LATENCY_BUCKETS);
        registry.register("review_duration_seconds", "Time to decide one AdmissionReview", latency.clone());
        let caches_ready = Gauge::default();
        registry.register("caches_ready", "1 when every cache has synced", caches_ready.clone());
        let policies = Gauge::default();
        registry.register("policies", "Policies currently compiled", policies.clone());
        let policy_problems = Gauge::default();
        registry.register(
            "policy_problems",
            "Problems found compiling the current policies",
            policy_problems.clone(),
        );
        let certificate_reloads = Counter::default();
        registry.register("certificate_reloads", "Serving certificate reloads", certificate_reloads.clone());
        let events_dropped = Counter::default();
        registry.register(
            "events_dropped",
            "Events dropped because the queue was full",
            events_dropped.clone(),
        );
        let events_suppressed = Counter::default();
        registry.register(
            "events_suppressed",
            "Events not sent: the same object and reason had one within the rate-limit window",
            events_suppressed.clone(),
        );
        Self {
            registry,
            decisions,
            malformed,
            latency,
            caches_ready,
            policies,
            policy_problems,
            certificate_reloads,
            events_dropped,
            events_suppressed,
        }
    }
}

impl Metrics {
    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
