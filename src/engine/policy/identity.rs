//! Who is asking: the requester of an AdmissionRequest, resolved against the cluster directory
//! (ServiceAccount and Namespace labels from the caches) into the facts policies match on.

use std::collections::{BTreeMap, BTreeSet};

use crate::engine::api::AGENT_NAMESPACE_LABEL;

use super::selector::Labels;

/// Read-only view of the cluster the engine needs: labels of ServiceAccounts and Namespaces.
/// Implemented by the reflector caches in production and by maps in tests.
pub trait Directory {
    fn service_account_labels(&self, namespace: &str, name: &str) -> Option<Labels>;
    fn namespace_labels(&self, namespace: &str) -> Option<Labels>;
    /// Whether an agent can act as this namespace's ServiceAccounts (see [`super::reach`]),
    /// which makes each of them an agent.
    fn reached_by_agents(&self, _namespace: &str) -> bool {
        false
    }
    /// The break-glass sessions opened for `agent` (see [`crate::engine::session`]).
    fn sessions(&self, _agent: &str) -> Vec<crate::engine::session::Session> {
        Vec::new()
    }
}

/// A directory that knows nothing (offline `check`, or tests that need no labels).
impl Directory for () {
    fn service_account_labels(&self, _: &str, _: &str) -> Option<Labels> {
        None
    }
    fn namespace_labels(&self, _: &str) -> Option<Labels> {
        None
    }
}

/// In-memory directory for tests and offline evaluation.
#[derive(Clone, Debug, Default)]
pub struct StaticDirectory {
    pub service_accounts: BTreeMap<(String, String), Labels>,
    pub namespaces: BTreeMap<String, Labels>,
    pub reached: BTreeSet<String>,
    pub sessions: Vec<crate::engine::session::Session>,
}

impl Directory for StaticDirectory {
    fn service_account_labels(&self, namespace: &str, name: &str) -> Option<Labels> {
        self.service_accounts.get(&(namespace.to_owned(), name.to_owned())).cloned()
    }
    fn namespace_labels(&self, namespace: &str) -> Option<Labels> {
        self.namespaces.get(namespace).cloned()
    }
    fn reached_by_agents(&self, namespace: &str) -> bool {
        self.reached.contains(namespace)
    }
    fn sessions(&self, agent: &str) -> Vec<crate::engine::session::Session> {
        self.sessions.iter().filter(|s| s.agent == agent).cloned().collect()
    }
}

/// Everyone the `agents` webhook must see.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentSet {
    pub usernames: BTreeSet<String>,
    /// Namespaces whose every ServiceAccount is an agent.
    pub namespaces: BTreeSet<String>,
    pub groups: BTreeSet<String>,
}

impl AgentSet {
    pub fn is_empty(&self) -> bool {
        self.usernames.is_empty() && self.namespaces.is_empty() && self.groups.is_empty()
    }

    pub fn extend(&mut self, other: &AgentSet) {
        self.usernames.extend(other.usernames.iter().cloned());
        self.namespaces.extend(other.namespaces.iter().cloned());
        self.groups.extend(other.groups.iter().cloned());
    }

    pub fn contains_all(&self, other: &AgentSet) -> bool {
        other.usernames.is_subset(&self.usernames)
            && other.namespaces.is_subset(&self.namespaces)
            && other.groups.is_subset(&self.groups)
    }
}

/// The requester as policies see it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Requester {
    pub username: String,
    pub groups: Vec<String>,
    /// For a ServiceAccount: its labels, plus the agent label when its namespace is an agent
    /// namespace or one an agent can act in (every ServiceAccount there is an agent, known to
    /// the cache yet or not).
    pub service_account: Option<ServiceAccount>,
    /// The API server already judged the requester an agent: the request came through the
    /// `agents` webhook, whose conditions list exactly the registered agents. A cache that has
    /// not yet seen the label cannot turn it back into a non-agent.
    pub selected_as_agent: bool,
    /// The credential the request was made with (`authentication.kubernetes.io/credential-id`
    /// in `userInfo.extra`: a token's JTI), when it names one. A break-glass session is pinned to
    /// one, since anyone who can act as a ServiceAccount shares its username.
    pub credential: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
}

/// Splits `system:serviceaccount:NS:NAME`.
pub fn service_account_name(username: &str) -> Option<(&str, &str)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, name) = rest.split_once(':')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains(':')).then_some((ns, name))
}

impl Requester {
    /// Resolves a username and groups against the directory. `agent_label` is the marker the
    /// agent-namespace rule implies.
    pub fn resolve(
        username: &str,
        groups: &[String],
        directory: &dyn Directory,
        agent_label: (&str, &str),
    ) -> Self {
        let service_account = service_account_name(username).map(|(ns, name)| {
            let mut labels = directory.service_account_labels(ns, name).unwrap_or_default();
            let agent_namespace = directory
                .namespace_labels(ns)
                .is_some_and(|l| l.get(AGENT_NAMESPACE_LABEL).map(String::as_str) == Some("true"))
                || directory.reached_by_agents(ns);
            if agent_namespace {
                labels.insert(agent_label.0.to_owned(), agent_label.1.to_owned());
            }
            ServiceAccount { namespace: ns.to_owned(), name: name.to_owned(), labels }
        });
        Self {
            username: username.to_owned(),
            groups: groups.to_vec(),
            service_account,
            selected_as_agent: false,
            credential: None,
        }
    }

    pub fn labels(&self) -> Option<&Labels> {
        self.service_account.as_ref().map(|sa| &sa.labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_usernames() {
        assert_eq!(service_account_name("system:serviceaccount:ns:coder"), Some(("ns", "coder")));
        assert_eq!(service_account_name("system:serviceaccount:ns"), None);
        assert_eq!(service_account_name("system:serviceaccount::x"), None);
        assert_eq!(service_account_name("alice"), None);
    }

    #[test]
    fn agent_namespaces_imply_the_agent_label() {
        let mut dir = StaticDirectory::default();
        dir.namespaces
            .insert("bots".into(), [(AGENT_NAMESPACE_LABEL.to_string(), "true".to_string())].into());
        let label = ("agentguard.io/agent", "true");
        let unknown_sa_in_agent_ns = Requester::resolve("system:serviceaccount:bots:new", &[], &dir, label);
        assert_eq!(
            unknown_sa_in_agent_ns.labels().and_then(|l| l.get("agentguard.io/agent")).map(String::as_str),
            Some("true")
        );
        let elsewhere = Requester::resolve("system:serviceaccount:web:default", &[], &dir, label);
        assert!(elsewhere.labels().unwrap().is_empty());
        assert!(Requester::resolve("alice", &[], &dir, label).service_account.is_none());
    }
}
