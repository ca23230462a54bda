//! Rule index: which rules can match a request, found by hash lookups on what is cheapest to know
//! of it, instead of a scan over every policy: the (resource, subresource) pair, then the
//! operation, then the literal prefix of the rules' name globs. What is left is checked in full
//! by `matching`; the index only ever leaves out rules that cannot match.
//!
//! Resource patterns follow Kubernetes webhook rules: `deployments` (no subresources),
//! `deployments/scale`, `deployments/*`, `*` (no subresources), `*/scale`, `*/*`. A rule is
//! filed under each operation class it can match: DELETE, CONNECT or CREATE when it guards it;
//! UPDATE when it guards replace or patch, or has an objectSelector (an update can take an object
//! out of it, which is guarded as an escape). Relabelling a Namespace out of a namespaceSelector
//! is found through `PolicySet::namespace_selector_rules`, not here. Within a class, a rule whose
//! every name glob starts with literal text is filed under those prefixes, so a request's name
//! picks the few rules it can match with one lookup per distinct prefix length.

use std::collections::HashMap;

use super::{CompiledRule, Operation};

/// (policy index, rule index).
pub(super) type RuleId = (usize, usize);

#[derive(Clone, Debug, Default)]
pub(super) struct ResourceIndex {
    /// resource → subresource ("" for the main resource) → rules.
    exact: HashMap<String, HashMap<String, ByOperation>>,
    /// `resource/*`
    any_subresource_of: HashMap<String, ByOperation>,
    /// `*/subresource`
    subresource_of_any: HashMap<String, ByOperation>,
    /// `*`
    any_resource: ByOperation,
    /// `*/*`
    everything: ByOperation,
}

/// The operation classes a rule can match, one list of rules each.
#[derive(Clone, Debug, Default)]
struct ByOperation([ByName; 4]);

const DELETE: usize = 0;
const UPDATE: usize = 1;
const CONNECT: usize = 2;
const CREATE: usize = 3;

fn class(operation: Operation) -> usize {
    match operation {
        Operation::Delete => DELETE,
        Operation::Update { .. } => UPDATE,
        Operation::Connect => CONNECT,
        Operation::Create => CREATE,
    }
}

/// Rules by the literal prefix of their name globs.
#[derive(Clone, Debug, Default)]
struct ByName {
    /// Literal prefix (the bytes before the first `*` or `?`) → rules with a glob starting so.
    by_prefix: HashMap<Box<[u8]>, Vec<RuleId>>,
    /// The distinct lengths of those prefixes, shortest first.
    prefix_lengths: Vec<usize>,
    /// Rules with no names, or a glob that starts with a wildcard: any name may match.
    any_name: Vec<RuleId>,
}

impl ByName {
    fn insert(&mut self, rule: &CompiledRule, id: RuleId) {
        let prefixes: Option<Vec<&[u8]>> = rule
            .names
            .patterns()
            .iter()
            .map(|glob| {
                let literal = glob.bytes().take_while(|b| *b != b'*' && *b != b'?').count();
                (literal > 0).then(|| &glob.as_bytes()[..literal])
            })
            .collect();
        match prefixes {
            Some(prefixes) if !prefixes.is_empty() => {
                for prefix in prefixes {
                    let list = self.by_prefix.entry(prefix.into()).or_default();
                    if list.last() != Some(&id) {
                        list.push(id);
                    }
                    if let Err(at) = self.prefix_lengths.binary_search(&prefix.len()) {
                        self.prefix_lengths.insert(at, prefix.len());
                    }
                }
            }
            _ => {
                if self.any_name.last() != Some(&id) {
                    self.any_name.push(id);
                }
            }
        }
    }

    /// Appends the rules a request for `name` may match (every rule when `any_name`: the name
    /// is not known, as for the objects a controller would delete).
    fn candidates(&self, name: &str, any_name: bool, out: &mut Vec<RuleId>) {
        out.extend_from_slice(&self.any_name);
        if any_name {
            for ids in self.by_prefix.values() {
                out.extend_from_slice(ids);
            }
            return;
        }
        let name = name.as_bytes();
        for &length in self.prefix_lengths.iter().take_while(|&&l| l <= name.len()) {
            if let Some(ids) = self.by_prefix.get(&name[..length]) {
                out.extend_from_slice(ids);
            }
        }
    }
}

impl ByOperation {
    fn insert(&mut self, rule: &CompiledRule, id: RuleId) {
        let classes = [
            (DELETE, rule.delete),
            (UPDATE, rule.replace || rule.patch || rule.object_selector.is_some()),
            (CONNECT, rule.connect),
            (CREATE, rule.create),
        ];
        for (class, matches) in classes {
            if matches {
                self.0[class].insert(rule, id);
            }
        }
    }

    fn candidates(&self, operation: Operation, name: &str, any_name: bool, out: &mut Vec<RuleId>) {
        self.0[class(operation)].candidates(name, any_name, out);
    }
}

impl ResourceIndex {
    pub(super) fn insert(&mut self, rule: &CompiledRule, id: RuleId) {
        for (_, resource, subresource) in &rule.resources {
            let list = match (resource.as_str(), subresource.as_deref()) {
                ("*", None) => &mut self.any_resource,
                ("*", Some("*")) => &mut self.everything,
                ("*", Some(sub)) => self.subresource_of_any.entry(sub.to_owned()).or_default(),
                (res, Some("*")) => self.any_subresource_of.entry(res.to_owned()).or_default(),
                (res, sub) => self
                    .exact
                    .entry(res.to_owned())
                    .or_default()
                    .entry(sub.unwrap_or_default().to_owned())
                    .or_default(),
            };
            list.insert(rule, id);
        }
    }

    /// Appends the rules that may match an `operation` of `name` (any name when `any_name`) of
    /// (`resource`, `subresource`); the caller deduplicates and checks each fully.
    pub(super) fn candidates(
        &self,
        operation: Operation,
        resource: &str,
        subresource: &str,
        name: &str,
        any_name: bool,
        out: &mut Vec<RuleId>,
    ) {
        let mut from = |list: &ByOperation| list.candidates(operation, name, any_name, out);
        if let Some(list) = self.exact.get(resource).and_then(|s| s.get(subresource)) {
            from(list);
        }
        if subresource.is_empty() {
            from(&self.any_resource);
        } else {
            if let Some(list) = self.any_subresource_of.get(resource) {
                from(list);
            }
            if let Some(list) = self.subresource_of_any.get(subresource) {
                from(list);
            }
        }
        from(&self.everything);
    }
}
