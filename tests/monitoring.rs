//! The chart's Grafana dashboard queries only series that exist: agentguard's own (as
//! `Metrics::encode` writes them) or the API server's. The PrometheusRule needs helm to render,
//! so the chart test checks it, against the live API server too.

#[path = "support/monitoring.rs"]
mod monitoring;

use std::collections::BTreeSet;

use monitoring::{API_SERVER_SERIES, agentguard_series, metric_names, unknown_names};
use serde_json::Value;

const DASHBOARD: &str = include_str!("../charts/agentguard/dashboards/agentguard.json");

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The series an operator watches: exported under these names, and each read by a panel.
const WATCHED: [&str; 7] = [
    "agentguard_decisions_total",
    "agentguard_review_duration_seconds_bucket",
    "agentguard_caches_ready",
    "agentguard_certificate_expiry_timestamp_seconds",
    "agentguard_breaker_tripped",
    "agentguard_breaker_refusals_total",
    "agentguard_events_dropped_total",
];

#[test]
fn promql_names_skip_functions_labels_strings_and_numbers() {
    let expr = r#"histogram_quantile(0.99, sum by (le, name) (rate(a_bucket{name=~"x\"y{z}", job!='b'}[$__rate_interval])))
        / on (pod) group_left (node) max without (instance) (b_total offset 5m) > 14 * 86400
        or absent(up{job="x"} == 1) unless count(c:recorded) > bool 1e3 and vector(0)"#;
    assert_eq!(metric_names(expr), names(&["a_bucket", "b_total", "c:recorded", "up"]));
    assert_eq!(metric_names("agentguard_caches_ready == 0"), names(&["agentguard_caches_ready"]));
    assert_eq!(metric_names("sum(rate(typo_total[5m]))"), names(&["typo_total"]));
}

#[test]
fn agentguard_series_are_sample_names() {
    let series = agentguard_series();
    for name in WATCHED {
        assert!(series.contains(name), "{name} not in {series:?}");
    }
    assert!(!series.contains("agentguard_decisions"), "a family name is not a series");
}

/// Every query of the dashboard: panel targets (rows included) and templating queries.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    fn panels<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            panels(&p["panels"], out);
        }
    }
    let mut all = Vec::new();
    panels(&dashboard["panels"], &mut all);
    let mut queries: Vec<String> = all
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .map(|t| t["expr"].as_str().expect("every target has an expr").to_owned())
        .collect();
    for var in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        if var["type"] == "query" {
            let query = var["query"]["query"].as_str().or(var["query"].as_str()).expect("query variable");
            // label_values(METRIC, LABEL): only the first argument is PromQL.
            let inner = query.strip_prefix("label_values(").and_then(|q| q.rsplit_once(','));
            queries.push(inner.map_or(query, |(metric, _)| metric).to_owned());
        }
    }
    queries
}

#[test]
fn dashboard_queries_read_only_exported_series() {
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is valid JSON");
    assert_eq!(dashboard["uid"], "agentguard");
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 10, "{queries:?}");
    let mut known = agentguard_series();
    known.extend(API_SERVER_SERIES.iter().map(|s| s.to_string()));
    let mut read = BTreeSet::new();
    for q in &queries {
        let unknown = unknown_names(q, &known);
        assert!(unknown.is_empty(), "the dashboard queries {unknown:?}, which nothing exports: {q}");
        read.extend(metric_names(q));
    }
    // The panels the dashboard promises.
    for &name in WATCHED.iter().chain(&["apiserver_admission_webhook_rejection_count"]) {
        assert!(read.contains(name), "no panel reads {name}");
    }
}
