//! What the chart's alerts and dashboard may query: the series agentguard exports (every
//! family recorded once) and the API server's webhook series, and the metric names a PromQL
//! expression reads.

use std::collections::BTreeSet;

use agentguard::engine::policy::{Allowed, Decision};
use agentguard::metrics::Metrics;

/// The API server series the chart reads (checked against a live kube-apiserver by the chart
/// test).
pub const API_SERVER_SERIES: &[&str] = &[
    "apiserver_admission_webhook_admission_duration_seconds_bucket",
    "apiserver_admission_webhook_rejection_count",
    "apiserver_admission_webhook_request_total",
];

/// Series names of a Prometheus text exposition: the sample lines' names.
pub fn exposed(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Every series agentguard exports, with each labelled family recorded once; fails if a family
/// (a `# TYPE` line) still has no sample, so a new family cannot slip past the checks.
pub fn agentguard_series() -> BTreeSet<String> {
    let m = Metrics::default();
    m.decided(&Decision::allow(Allowed::NotAgent), "configmaps", "alice", false);
    m.set_breaker("cluster/churn", "system:serviceaccount:agents:coder", true);
    m.breaker_refused("cluster/churn", "system:serviceaccount:agents:coder");
    let text = m.encode();
    let series = exposed(&text);
    for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = family.split(' ').next().unwrap_or_default();
        assert!(
            series.iter().any(|s| s.starts_with(name)),
            "family {name} has no sample: record it in agentguard_series()\n{text}"
        );
    }
    series
}

/// PromQL keywords and aggregation operators: not metric names even without a `(` after them.
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

/// Metric names a PromQL expression reads: identifiers outside strings, label matchers, range
/// brackets and label lists that are neither functions, keywords nor numbers. Grafana's
/// `$variables` are skipped.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Skips from an opening `open` to just past its matching `close`, over strings.
    let skip = |mut i: usize, open: char, close: char| -> usize {
        let mut depth = 0;
        while i < chars.len() {
            match chars[i] {
                q @ ('"' | '\'' | '`') => i = skip_string(&chars, i, q) - 1,
                c if c == open => depth += 1,
                c if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        i
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_string(&chars, i, c),
            '{' => i = skip(i, '{', '}'),
            '[' => i = skip(i, '[', ']'),
            '$' => {
                i += 1;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
            c if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) => {
                // A number, possibly with an exponent or a duration unit: never a name.
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let call = chars.get(next) == Some(&'(');
                if LABEL_LISTS.contains(&word.as_str()) && call {
                    i = skip(next, '(', ')');
                } else if !call && !KEYWORDS.contains(&word.to_lowercase().as_str()) {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// Index just past the string literal opened by `quote` at `start`.
fn skip_string(chars: &[char], start: usize, quote: char) -> usize {
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' if quote != '`' => i += 2,
            c if c == quote => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// Names `expr` reads that are not in `known`.
pub fn unknown_names(expr: &str, known: &BTreeSet<String>) -> Vec<String> {
    metric_names(expr).into_iter().filter(|n| !known.contains(n)).collect()
}
