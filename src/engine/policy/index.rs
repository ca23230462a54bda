//! Resource index: which rules can match a (resource, subresource) pair, found by hash lookups
//! instead of a scan over every policy. Patterns follow Kubernetes webhook rules: `deployments`
//! (no subresources), `deployments/scale`, `deployments/*`, `*` (no subresources), `*/scale`, `*/*`.

use std::collections::HashMap;

use super::CompiledRule;

/// (policy index, rule index).
pub(super) type RuleId = (usize, usize);

#[derive(Clone, Debug, Default)]
pub(super) struct ResourceIndex {
    /// resource → subresource ("" for the main resource) → rules.
    exact: HashMap<String, HashMap<String, Vec<RuleId>>>,
    /// `resource/*`
    any_subresource_of: HashMap<String, Vec<RuleId>>,
    /// `*/subresource`
    subresource_of_any: HashMap<String, Vec<RuleId>>,
    /// `*`
    any_resource: Vec<RuleId>,
    /// `*/*`
    everything: Vec<RuleId>,
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
            if list.last() != Some(&id) {
                list.push(id);
            }
        }
    }

    /// Appends the rules that may match; the caller deduplicates and checks each fully.
    pub(super) fn candidates(&self, resource: &str, subresource: &str, out: &mut Vec<RuleId>) {
        if let Some(ids) = self.exact.get(resource).and_then(|s| s.get(subresource)) {
            out.extend_from_slice(ids);
        }
        if subresource.is_empty() {
            out.extend_from_slice(&self.any_resource);
        } else {
            if let Some(ids) = self.any_subresource_of.get(resource) {
                out.extend_from_slice(ids);
            }
            if let Some(ids) = self.subresource_of_any.get(subresource) {
                out.extend_from_slice(ids);
            }
        }
        out.extend_from_slice(&self.everything);
    }
}
