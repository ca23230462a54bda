//! Policy unit tests for `agentguard check --test`, in the spirit of `kyverno test` and
//! `gator verify`: a test file names policy files and AdmissionReview files with the decision
//! each must get, and the run reports every case and fails when one does not hold.
//!
//! ```yaml
//! policies: [../policies/demo.yaml]     # relative to the test file
//! now: 2026-11-26T12:10:00Z             # optional: the clock approvals are judged against
//! cases:
//!   - name: an agent's delete is held
//!     review: ../reviews/01-agent-deletes-deployment.json
//!     expect: held                      # allowed | warned | approved | held | denied | refused
//!     messageContains: [kubectl annotate]
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use jiff::Timestamp;
use serde::Deserialize;
use serde_json::Value;

use crate::commands::options::EngineArgs;
use crate::engine::admission::{self, Snapshot};
use crate::engine::api::{AgentPolicy, ClusterAgentPolicy};
use crate::engine::approval::Keys;
use crate::engine::policy::identity::StaticDirectory;
use crate::engine::policy::{Config, PolicySet, Verdict};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TestFile {
    pub policies: Vec<PathBuf>,
    #[serde(default)]
    pub now: Option<Timestamp>,
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub review: PathBuf,
    pub expect: Expect,
    /// Fragments the denial message or the warnings must contain.
    #[serde(default)]
    pub message_contains: Vec<String>,
}

/// The decision a case expects, as `Decision::outcome` names it (`refused`: malformed input).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    Allowed,
    Warned,
    Approved,
    Held,
    Denied,
    Refused,
}

/// The result of one case.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub name: String,
    pub passed: bool,
    /// What was decided, and why the case failed if it did.
    pub detail: String,
}

/// Runs every case of one test file.
///
/// Tickets are issued and checked under [`Keys::fixed_for_tests`], so a test file's reviews can
/// carry approvals (`delete.<ticket>`) that `check --reviews` printed for the same `now`.
pub fn run_file(path: &Path, config: &Config) -> Result<Vec<Outcome>> {
    let config = &Config { approval_keys: Keys::fixed_for_tests(), ..config.clone() };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: TestFile =
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let policy_paths: Vec<PathBuf> = file.policies.iter().map(|p| base.join(p)).collect();
    let (cluster, namespaced, directory) = load_world(&policy_paths)?;
    let (policies, problems) = PolicySet::compile(&cluster, &namespaced);
    for p in &problems {
        tracing::warn!(policy = %p.policy, problem = %p.message, "policy problem");
    }
    let snapshot = Snapshot {
        policies: &policies,
        directory: &directory,
        config,
        now: file.now.unwrap_or_else(Timestamp::now),
        collateral: &[],
    };
    file.cases
        .iter()
        .map(|case| {
            let review_path = base.join(&case.review);
            let body =
                std::fs::read(&review_path).with_context(|| format!("reading {}", review_path.display()))?;
            // Reviews may be YAML too: normalise to JSON bytes as the API server sends them.
            let value: serde_json::Value = serde_yaml::from_slice(&body)
                .with_context(|| format!("parsing {}", review_path.display()))?;
            let (got, text) = match admission::decode(&serde_json::to_vec(&value)?) {
                Err(m) => ("refused", m.to_string()),
                Ok(request) => {
                    let decision = admission::review(&request, &snapshot);
                    let mut text = match &decision.verdict {
                        Verdict::Deny(d) => d.to_string(),
                        Verdict::Allow(why) => why.to_string(),
                    };
                    for w in &decision.warnings {
                        text.push_str("\n  warning: ");
                        text.push_str(w);
                    }
                    (decision.outcome(), text)
                }
            };
            let want = format!("{:?}", case.expect).to_lowercase();
            let missing: Vec<&String> =
                case.message_contains.iter().filter(|m| !text.contains(m.as_str())).collect();
            let passed = got == want && missing.is_empty();
            let detail = if passed {
                format!("{got}: {text}")
            } else if got != want {
                format!("expected {want}, got {got}: {text}")
            } else {
                format!("{got}, but the message lacks {missing:?}: {text}")
            };
            Ok(Outcome { name: case.name.clone(), passed, detail })
        })
        .collect()
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// YAML/JSON files with ClusterAgentPolicies, AgentPolicies, and the ServiceAccounts and
    /// Namespaces whose labels matter.
    #[arg(long = "policies", short = 'p', required_unless_present = "tests", requires = "reviews", num_args = 1..)]
    pub policies: Vec<PathBuf>,
    /// AdmissionReview files (JSON or YAML) to judge.
    #[arg(long = "reviews", short = 'r', requires = "policies", num_args = 1..)]
    pub reviews: Vec<PathBuf>,
    /// Test files with expected decisions (see `check` in docs/operations.md); exits 1 when a case fails.
    #[arg(long = "test", short = 't', num_args = 1..)]
    pub tests: Vec<PathBuf>,
    /// Evaluate as of this time (RFC 3339); defaults to now.
    #[arg(long)]
    pub now: Option<Timestamp>,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// Reads every YAML document (JSON is YAML) of a file.
fn documents(path: &PathBuf) -> Result<Vec<Value>> {
    use serde::Deserialize as _;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = Value::deserialize(doc).with_context(|| format!("parsing {}", path.display()))?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// Policies and the directory (ServiceAccounts, Namespaces) described by YAML/JSON files.
pub fn load_world(paths: &[PathBuf]) -> Result<(Vec<ClusterAgentPolicy>, Vec<AgentPolicy>, StaticDirectory)> {
    let (mut cluster, mut namespaced) = (Vec::new(), Vec::new());
    let mut directory = StaticDirectory::default();
    for path in paths {
        for doc in documents(path)? {
            let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default().to_owned();
            let name = doc.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_owned();
            let labels = || -> Result<std::collections::BTreeMap<String, String>> {
                let labels = doc.pointer("/metadata/labels").cloned().unwrap_or(Value::Null);
                if labels.is_null() {
                    return Ok(Default::default());
                }
                serde_json::from_value(labels)
                    .with_context(|| format!("labels of {kind} {name:?} in {}", path.display()))
            };
            match kind.as_str() {
                "ClusterAgentPolicy" => cluster.push(
                    serde_json::from_value::<ClusterAgentPolicy>(doc)
                        .with_context(|| format!("ClusterAgentPolicy {name:?} in {}", path.display()))?,
                ),
                "AgentPolicy" => namespaced.push(
                    serde_json::from_value::<AgentPolicy>(doc)
                        .with_context(|| format!("AgentPolicy {name:?} in {}", path.display()))?,
                ),
                "ServiceAccount" => {
                    let ns = doc.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("default");
                    directory.service_accounts.insert((ns.to_owned(), name.clone()), labels()?);
                }
                "Namespace" => {
                    let labels = labels()?;
                    directory.namespaces.insert(name, labels);
                }
                other => bail!("{}: unexpected kind {other:?} among policies", path.display()),
            }
        }
    }
    Ok((cluster, namespaced, directory))
}

/// `agentguard check`: prints one line per review; exits non-zero only on unreadable input.
pub fn check(args: &CheckArgs) -> Result<()> {
    // Offline, tickets are issued and checked under a fixed, public test key.
    let config =
        Config { approval_keys: crate::engine::approval::Keys::fixed_for_tests(), ..args.engine.config()? };
    if !args.tests.is_empty() {
        let (mut passed, mut failed) = (0, 0);
        for file in &args.tests {
            for o in run_file(file, &config)? {
                let status = if o.passed { "PASS" } else { "FAIL" };
                println!("{status} {}: {}", file.display(), o.name);
                if o.passed {
                    passed += 1;
                } else {
                    failed += 1;
                    println!("  {}", o.detail);
                }
            }
        }
        println!("check: {passed} passed, {failed} failed");
        anyhow::ensure!(failed == 0, "{failed} policy test case(s) failed");
        return Ok(());
    }
    let (cluster, namespaced, directory) = load_world(&args.policies)?;
    let (policies, problems) = PolicySet::compile(&cluster, &namespaced);
    for p in &problems {
        println!("PROBLEM {}: {}", p.policy, p.message);
    }
    let now = args.now.unwrap_or_else(Timestamp::now);
    let snapshot =
        Snapshot { policies: &policies, directory: &directory, config: &config, now, collateral: &[] };
    for path in &args.reviews {
        for doc in documents(path)? {
            let body = serde_json::to_vec(&doc)?;
            let line = match admission::decode(&body) {
                Err(m) => format!("REFUSED {}: {m}", path.display()),
                Ok(request) => {
                    let decision = admission::review(&request, &snapshot);
                    let head = format!(
                        "{} {} ({})",
                        decision.outcome().to_uppercase(),
                        path.display(),
                        request.user_info.username
                    );
                    let mut line = match &decision.verdict {
                        Verdict::Deny(denial) => format!("{head}\n  {denial}"),
                        Verdict::Allow(why) => format!("{head}\n  {why}"),
                    };
                    for w in decision.warnings.iter().chain(&decision.audits) {
                        line.push_str(&format!("\n  warning: {w}"));
                    }
                    line
                }
            };
            println!("{line}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/tests/demo.yaml")
    }

    #[test]
    fn the_example_tests_pass() {
        let outcomes = run_file(&example(), &Config::default()).unwrap();
        assert_eq!(outcomes.len(), 12);
        for o in &outcomes {
            assert!(o.passed, "{}: {}", o.name, o.detail);
        }
    }

    #[test]
    fn a_wrong_expectation_fails_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
        let file = dir.path().join("wrong.yaml");
        std::fs::write(
            &file,
            format!(
                "policies: [{}]\nnow: 2026-11-26T12:10:00Z\ncases:\n  - name: wrongly expected\n    review: {}\n    expect: allowed\n  - name: message\n    review: {}\n    expect: held\n    messageContains: [no such text]\n",
                examples.join("policies/demo.yaml").display(),
                examples.join("reviews/01-agent-deletes-deployment.json").display(),
                examples.join("reviews/01-agent-deletes-deployment.json").display(),
            ),
        )
        .unwrap();
        let outcomes = run_file(&file, &Config::default()).unwrap();
        assert!(
            !outcomes[0].passed && outcomes[0].detail.starts_with("expected allowed, got held"),
            "{:?}",
            outcomes[0]
        );
        assert!(
            !outcomes[1].passed && outcomes[1].detail.contains("lacks [\"no such text\"]"),
            "{:?}",
            outcomes[1]
        );
    }
}
