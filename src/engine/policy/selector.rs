//! Label selectors and name globs, compiled once per policy change and matched allocation-free.

use std::collections::BTreeMap;

use crate::engine::api::{LabelSelector, SelectorOperator};

/// Labels of an object, as Kubernetes stores them.
pub type Labels = BTreeMap<String, String>;

/// A compiled label selector. An empty selector matches everything, as in Kubernetes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Selector {
    equals: Vec<(String, String)>,
    exprs: Vec<Expr>,
}

#[derive(Clone, Debug, PartialEq)]
enum Expr {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Selector {
    pub fn compile(selector: &LabelSelector) -> Self {
        let equals = selector.match_labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let exprs = selector
            .match_expressions
            .iter()
            .map(|e| match e.operator {
                SelectorOperator::In => Expr::In(e.key.clone(), e.values.clone()),
                SelectorOperator::NotIn => Expr::NotIn(e.key.clone(), e.values.clone()),
                SelectorOperator::Exists => Expr::Exists(e.key.clone()),
                SelectorOperator::DoesNotExist => Expr::DoesNotExist(e.key.clone()),
            })
            .collect();
        Self { equals, exprs }
    }

    /// A selector for one `key=value` label.
    pub fn label(key: &str, value: &str) -> Self {
        Self { equals: vec![(key.to_owned(), value.to_owned())], exprs: Vec::new() }
    }

    /// Whether `labels` satisfy the selector; `None` (no labels at all) behaves as an empty set.
    pub fn matches(&self, labels: Option<&Labels>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
        self.equals.iter().all(|(k, v)| get(k) == Some(v.as_str()))
            && self.exprs.iter().all(|e| match e {
                Expr::In(k, vs) => get(k).is_some_and(|v| vs.iter().any(|x| x == v)),
                // NotIn matches objects without the key, as in Kubernetes.
                Expr::NotIn(k, vs) => get(k).is_none_or(|v| vs.iter().all(|x| x != v)),
                Expr::Exists(k) => get(k).is_some(),
                Expr::DoesNotExist(k) => get(k).is_none(),
            })
    }

    /// The label keys the selector reads (a change to any of them may move an object in or out).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.equals.iter().map(|(k, _)| k.as_str()).chain(self.exprs.iter().map(|e| match e {
            Expr::In(k, _) | Expr::NotIn(k, _) | Expr::Exists(k) | Expr::DoesNotExist(k) => k.as_str(),
        }))
    }
}

/// A list of name globs: `*` matches any run of characters, `?` exactly one. Empty matches all.
/// Deliberately no character classes, so a glob can never fail to compile.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Globs(Vec<String>);

impl Globs {
    pub fn new(patterns: &[String]) -> Self {
        Self(patterns.to_vec())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn patterns(&self) -> &[String] {
        &self.0
    }

    pub fn matches(&self, name: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|p| glob_match(p.as_bytes(), name.as_bytes()))
    }
}

/// Iterative wildcard matching with single-star backtracking: linear in practice, never exponential.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::api::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn globs() {
        let cases = [
            ("prod-*", "prod-web", true),
            ("prod-*", "prod-", true),
            ("prod-*", "staging-web", false),
            ("*-db", "orders-db", true),
            ("*-db", "orders-db2", false),
            ("w?b", "web", true),
            ("w?b", "weeb", false),
            ("*a*b*c", "xxaxxbxxc", true),
            ("*a*b*c", "xxaxxcxxb", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("*", "", true),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(Globs::new(&[pattern.into()]).matches(name), want, "{pattern} vs {name}");
        }
        assert!(Globs::default().matches("anything"));
    }

    #[test]
    fn selectors_follow_kubernetes_semantics() {
        let sel = Selector::compile(&LabelSelector {
            match_labels: [("tier".to_string(), "prod".to_string())].into(),
            match_expressions: vec![
                LabelSelectorRequirement {
                    key: "team".into(),
                    operator: SelectorOperator::In,
                    values: vec!["a".into(), "b".into()],
                },
                LabelSelectorRequirement {
                    key: "legacy".into(),
                    operator: SelectorOperator::DoesNotExist,
                    values: vec![],
                },
            ],
        });
        assert!(sel.matches(Some(&labels(&[("tier", "prod"), ("team", "a")]))));
        assert!(!sel.matches(Some(&labels(&[("tier", "prod"), ("team", "c")]))));
        assert!(!sel.matches(Some(&labels(&[("tier", "prod"), ("team", "a"), ("legacy", "")]))));
        assert!(!sel.matches(None));
        assert!(Selector::default().matches(None));

        let not_in = Selector::compile(&LabelSelector {
            match_labels: Default::default(),
            match_expressions: vec![LabelSelectorRequirement {
                key: "env".into(),
                operator: SelectorOperator::NotIn,
                values: vec!["dev".into()],
            }],
        });
        assert!(not_in.matches(None), "NotIn matches a missing key");
        assert!(!not_in.matches(Some(&labels(&[("env", "dev")]))));
        assert_eq!(sel.keys().collect::<Vec<_>>(), ["tier", "team", "legacy"]);
    }
}
