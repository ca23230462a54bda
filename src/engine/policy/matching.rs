//! Which rules match one operation a request amounts to: resource, name, namespace (list and
//! selector), object selector, and the updates that would take an object out of a rule's reach.

use super::*;

impl PolicySet {
    /// Rules that match one operation a request amounts to.
    pub(super) fn matching_effect<'p>(
        &'p self,
        effect: &effects::Effect<'_>,
        directory: &dyn Directory,
        mut policy_filter: impl FnMut(&CompiledPolicy) -> bool,
    ) -> Vec<Match<'p>> {
        let facts = &effect.facts;
        let mut candidates = Vec::new();
        let (op, res, sub, name, any_name) =
            (facts.operation, facts.resource, facts.subresource, facts.name, effect.any_name);
        self.cluster.candidates(op, res, sub, name, any_name, &mut candidates);
        if effect.any_namespace {
            for index in self.namespaced.values() {
                index.candidates(op, res, sub, name, any_name, &mut candidates);
            }
        } else if let Some(index) = self.namespaced.get(facts.namespace) {
            index.candidates(op, res, sub, name, any_name, &mut candidates);
        }
        let mut ns_labels = LazyLabels::new(facts.namespace, directory);
        let old_labels = Facts::labels(facts.old_object);
        let new_labels = Facts::labels(facts.object);
        let object_labels = ObjectLabels { old: old_labels.as_ref(), new: new_labels.as_ref() };
        if facts.is_namespace() && matches!(facts.operation, Operation::Update { .. }) {
            // Relabelling a Namespace can move other objects out of a namespaceSelector.
            candidates.extend(self.namespace_selector_rules.iter().copied());
        }
        candidates.sort_unstable();
        candidates.dedup();

        let mut variables = condition::Variables::default();
        let mut out = Vec::new();
        for (pi, ri) in candidates {
            let policy = &self.policies[pi];
            if !policy_filter(policy) {
                continue;
            }
            let rule = &policy.rules[ri];
            if let Some(escape) = rule_matches(rule, effect, &object_labels, &mut ns_labels, &mut variables) {
                out.push(Match { policy, rule, escape, via: effect.via.as_deref().map(str::to_owned) });
            }
        }
        out
    }
}

/// Namespace labels, fetched from the directory at most once per decision and only if needed.
pub(super) struct LazyLabels<'a> {
    namespace: &'a str,
    directory: &'a dyn Directory,
    labels: Option<Option<Labels>>,
}

impl<'a> LazyLabels<'a> {
    pub(super) fn new(namespace: &'a str, directory: &'a dyn Directory) -> Self {
        Self { namespace, directory, labels: None }
    }

    fn get(&mut self) -> Option<&Labels> {
        let (namespace, directory) = (self.namespace, self.directory);
        self.labels.get_or_insert_with(|| directory.namespace_labels(namespace)).as_ref()
    }
}

pub(super) struct ObjectLabels<'a> {
    pub(super) old: Option<&'a Labels>,
    pub(super) new: Option<&'a Labels>,
}

impl CompiledRule {
    fn resource_matches(&self, group: &str, resource: &str, subresource: &str) -> bool {
        self.resources.iter().any(|(groups, res, sub)| {
            groups.iter().any(|g| g == "*" || g == group)
                && (res == "*" || res == resource)
                && match sub {
                    None => subresource.is_empty(),
                    Some(s) => s == "*" || s == subresource,
                }
        })
    }

    fn guards(&self, op: Operation) -> bool {
        match op {
            Operation::Delete => self.delete,
            Operation::Connect => self.connect,
            Operation::Update { patch: Some(true) } => self.patch,
            Operation::Update { patch: Some(false) } => self.replace,
            // Replace and patch cannot be told apart: a rule guarding either guards it.
            Operation::Update { patch: None } => self.replace || self.patch,
            Operation::Create => self.create,
        }
    }
}

/// `Some(None)`: the rule guards the request. `Some(Some(escape))`: the rule does not guard this
/// operation, but the update would take something out of its reach. `None`: no match.
pub(super) fn rule_matches(
    rule: &CompiledRule,
    effect: &effects::Effect<'_>,
    objects: &ObjectLabels<'_>,
    ns_labels: &mut LazyLabels<'_>,
    variables: &mut condition::Variables,
) -> Option<Option<Escape>> {
    let (facts, any_name) = (&effect.facts, effect.any_name);
    let is_update = matches!(facts.operation, Operation::Update { .. });
    // A Namespace relabelling checked against rules guarding other resources.
    let namespace_escape = is_update
        && facts.is_namespace()
        && !rule.resource_matches(facts.group, facts.resource, facts.subresource);
    if namespace_escape {
        let sel = rule.namespace_selector.as_ref()?;
        let in_scope = rule.namespaces.matches(facts.name) && (rule.delete || rule.replace || rule.patch);
        let leaves = sel.matches(objects.old) && !sel.matches(objects.new);
        return (in_scope && leaves).then_some(Some(Escape::NamespaceSelector));
    }
    if !rule.resource_matches(facts.group, facts.resource, facts.subresource)
        || !(any_name || rule.names.matches(facts.name))
    {
        return None;
    }
    if !rule.namespaces.is_empty()
        && !effect.any_namespace
        && (facts.namespace.is_empty() || !rule.namespaces.matches(facts.namespace))
    {
        return None;
    }
    if let Some(sel) = &rule.namespace_selector {
        let ok = if facts.is_namespace() {
            sel.matches(objects.old) || (is_update && sel.matches(objects.new))
        } else if facts.namespace.is_empty() {
            true // Cluster-scoped objects are not filtered by a namespaceSelector.
        } else {
            sel.matches(ns_labels.get())
        };
        if !ok {
            return None;
        }
    }
    let (old_in, new_in) = match &rule.object_selector {
        None => (true, true),
        // An object the request does not show (an eviction's pod not looked up, the volumes a
        // StatefulSet would delete) is read in the most restrictive sense: it matches.
        Some(_) if objects.old.is_none() && objects.new.is_none() && facts.old_object.is_none() => {
            (true, true)
        }
        // A CREATE has only the new object, as Kubernetes' own objectSelector reads it.
        Some(sel) if facts.operation == Operation::Create => (false, sel.matches(objects.new)),
        Some(sel) => (sel.matches(objects.old), is_update && sel.matches(objects.new)),
    };
    if !old_in && !new_in {
        return None;
    }
    if rule.guards(facts.operation) {
        if let Some(condition) = &rule.condition
            && !condition.met_with(facts, ns_labels.get(), variables)
        {
            return None;
        }
        return Some(None);
    }
    if !is_update {
        return None;
    }
    if old_in && !new_in {
        return Some(Some(Escape::ObjectSelector));
    }
    None
}
