//! The in-memory picture of the cluster the webhook decides from, kept current by kube-runtime
//! reflectors: ServiceAccount and Namespace labels (metadata only, labels kept) and the compiled
//! [`PolicySet`], rebuilt and swapped atomically whenever a policy changes.
//!
//! ```text
//!  watch ServiceAccounts (metadata) ──▶ Store ─┐
//!  watch Namespaces (metadata)      ──▶ Store ─┼─▶ Caches: Directory + ArcSwap<PolicySet>
//!  watch ClusterAgentPolicies ─┐               │
//!  watch AgentPolicies ────────┴─▶ compile ────┘
//! ```
//!
//! No API call is made on the request path. [`Caches::ready`] stays false until every watch has
//! listed once, so the webhook never judges from a half-filled cache.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use futures::{FutureExt, StreamExt, future::BoxFuture};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, ObjectMeta, PartialObjectMeta};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};

use crate::api::{AGENT_NAMESPACE_LABEL, AgentPolicy, ClusterAgentPolicy};
use crate::metrics::Metrics;
use crate::policy::selector::Labels;
use crate::policy::{Config, Directory, PolicySet, Problem};
use crate::webhook::AgentSet;

/// Shared, read-mostly caches. Cheap to read from any request.
pub struct Caches {
    pub(crate) cluster_policies: Store<ClusterAgentPolicy>,
    pub(crate) agent_policies: Store<AgentPolicy>,
    service_accounts: Store<PartialObjectMeta<ServiceAccount>>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    policies: ArcSwap<PolicySet>,
    problems: ArcSwap<Vec<Problem>>,
    ready: AtomicBool,
}

impl Caches {
    /// The current policies.
    pub fn policies(&self) -> Arc<PolicySet> {
        self.policies.load_full()
    }

    /// Problems found compiling the current policies.
    pub fn problems(&self) -> Arc<Vec<Problem>> {
        self.problems.load_full()
    }

    /// True once every reflector has listed and the policies have been compiled once.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Starts the reflectors. The returned future drives them until dropped.
    pub fn start(client: Client, metrics: Arc<Metrics>) -> (Arc<Self>, BoxFuture<'static, ()>) {
        let (sa_store, sa_writer) = reflector::store();
        let (ns_store, ns_writer) = reflector::store();
        let (cp_store, cp_writer) = reflector::store::<ClusterAgentPolicy>();
        let (ap_store, ap_writer) = reflector::store::<AgentPolicy>();
        let caches = Arc::new(Self {
            cluster_policies: cp_store.clone(),
            agent_policies: ap_store.clone(),
            service_accounts: sa_store.clone(),
            namespaces: ns_store.clone(),
            policies: ArcSwap::from_pointee(PolicySet::default()),
            problems: ArcSwap::from_pointee(Vec::new()),
            ready: AtomicBool::new(false),
        });

        // Only labels are kept: the rest of the metadata would cost memory for nothing.
        let sa_watch = reflector::reflector(
            sa_writer,
            watcher(
                Api::<PartialObjectMeta<ServiceAccount>>::all(client.clone()),
                watcher::Config::default(),
            )
            .default_backoff()
            .modify(keep_labels_only),
        );
        let ns_watch = reflector::reflector(
            ns_writer,
            watcher(Api::<PartialObjectMeta<Namespace>>::all(client.clone()), watcher::Config::default())
                .default_backoff()
                .modify(keep_labels_only),
        );
        let cp_watch = reflector::reflector(
            cp_writer,
            watcher(Api::<ClusterAgentPolicy>::all(client.clone()), watcher::Config::default())
                .default_backoff(),
        )
        .map(|e| (Kind::Cluster, e.map(|e| Phase::of(&e))));
        let ap_watch = reflector::reflector(
            ap_writer,
            watcher(Api::<AgentPolicy>::all(client), watcher::Config::default()).default_backoff(),
        )
        .map(|e| (Kind::Namespaced, e.map(|e| Phase::of(&e))));

        let (compiled_tx, mut compiled_rx) = tokio::sync::watch::channel(false);
        let compiler = {
            let caches = caches.clone();
            let metrics = metrics.clone();
            let (cp_reader, ap_reader) = (cp_store.clone(), ap_store.clone());
            let mut listed = [false, false];
            futures::stream::select(cp_watch, ap_watch).for_each(move |(kind, event)| {
                match event {
                    Err(e) => tracing::warn!(error = %e, ?kind, "policy watch failed; retrying"),
                    // Mid-list events: wait for the list to finish before compiling.
                    Ok(Phase::Listing) => {}
                    Ok(phase) => {
                        if phase == Phase::Listed {
                            listed[kind as usize] = true;
                        }
                        if listed == [true, true] {
                            caches.recompile(&cp_reader, &ap_reader, &metrics);
                            compiled_tx.send_replace(true);
                        }
                    }
                }
                futures::future::ready(())
            })
        };
        let readiness = {
            let caches = caches.clone();
            async move {
                // Writers live as long as their streams, so waiting cannot fail while we run.
                let _ = sa_store.wait_until_ready().await;
                let _ = ns_store.wait_until_ready().await;
                let _ = compiled_rx.wait_for(|compiled| *compiled).await;
                caches.ready.store(true, Ordering::Release);
                metrics.caches_ready.set(1);
                tracing::info!(
                    service_accounts = caches.service_accounts.len(),
                    namespaces = caches.namespaces.len(),
                    policies = caches.policies().len(),
                    "caches synced"
                );
                futures::future::pending::<()>().await;
            }
        };
        let run = async move {
            tokio::join!(
                sa_watch.for_each(log_errors("serviceaccounts")),
                ns_watch.for_each(log_errors("namespaces")),
                compiler,
                readiness,
            );
        };
        (caches, run.boxed())
    }

    /// Every identity that is an agent now: what the `agents` webhook must see.
    pub fn agent_set(&self, config: &Config) -> AgentSet {
        let (namespaces, service_accounts) = (self.namespaces.state(), self.service_accounts.state());
        agent_set(
            &self.policies(),
            config,
            namespaces.iter().map(|ns| &ns.metadata),
            service_accounts.iter().map(|sa| &sa.metadata),
        )
    }

    fn recompile(
        &self,
        cluster: &Store<ClusterAgentPolicy>,
        namespaced: &Store<AgentPolicy>,
        metrics: &Metrics,
    ) {
        let cluster: Vec<ClusterAgentPolicy> = cluster.state().iter().map(|p| (**p).clone()).collect();
        let namespaced: Vec<AgentPolicy> = namespaced.state().iter().map(|p| (**p).clone()).collect();
        let (set, problems) = PolicySet::compile(&cluster, &namespaced);
        for p in &problems {
            tracing::warn!(policy = %p.policy, problem = %p.message, "policy problem");
        }
        metrics.policies.set(set.len() as i64);
        metrics.policy_problems.set(problems.len() as i64);
        tracing::info!(policies = set.len(), problems = problems.len(), "policies compiled");
        self.policies.store(Arc::new(set));
        self.problems.store(Arc::new(problems));
    }
}

/// Every identity that is an agent, computed from Namespace and ServiceAccount metadata alone.
/// Pure, so the webhook's caches and `agentguard audit` (which lists instead of watching) can
/// never disagree about who is an agent. ServiceAccounts of agent namespaces are covered by the
/// namespace, not listed one by one.
pub fn agent_set<'a>(
    policies: &PolicySet,
    config: &Config,
    namespaces: impl IntoIterator<Item = &'a ObjectMeta>,
    service_accounts: impl IntoIterator<Item = &'a ObjectMeta>,
) -> AgentSet {
    let namespaces: BTreeSet<String> =
        namespaces.into_iter().filter(|ns| is_agent_namespace(ns)).filter_map(|ns| ns.name.clone()).collect();
    let mut usernames: BTreeSet<String> = service_accounts
        .into_iter()
        .filter(|sa| {
            let ns = sa.namespace.as_deref().unwrap_or_default();
            !namespaces.contains(ns) && policies.labels_make_agent(ns, sa.labels.as_ref(), config)
        })
        .map(|sa| {
            format!(
                "system:serviceaccount:{}:{}",
                sa.namespace.as_deref().unwrap_or_default(),
                sa.name.as_deref().unwrap_or_default()
            )
        })
        .collect();
    usernames.extend(config.agent_usernames.iter().cloned());
    usernames.extend(policies.subject_usernames().cloned());
    let mut groups: BTreeSet<String> = config.agent_groups.iter().cloned().collect();
    groups.extend(policies.subject_groups().cloned());
    AgentSet { usernames, namespaces, groups }
}

/// Whether every ServiceAccount of this Namespace is an agent.
pub fn is_agent_namespace(namespace: &ObjectMeta) -> bool {
    namespace.labels.as_ref().and_then(|l| l.get(AGENT_NAMESPACE_LABEL)).map(String::as_str) == Some("true")
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Cluster = 0,
    Namespaced = 1,
}

/// Where a watch stands: compiling mid-list would judge from a partial set of policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Listing,
    Listed,
    Changed,
}

impl Phase {
    fn of<K>(event: &watcher::Event<K>) -> Self {
        match event {
            watcher::Event::Init | watcher::Event::InitApply(_) => Phase::Listing,
            watcher::Event::InitDone => Phase::Listed,
            watcher::Event::Apply(_) | watcher::Event::Delete(_) => Phase::Changed,
        }
    }
}

fn log_errors<T>(cache: &'static str) -> impl FnMut(Result<T, watcher::Error>) -> futures::future::Ready<()> {
    move |event| {
        if let Err(e) = event {
            tracing::warn!(error = %e, cache, "watch failed; retrying");
        }
        futures::future::ready(())
    }
}

fn keep_labels_only<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.annotations = None;
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
}

impl Directory for Caches {
    fn service_account_labels(&self, namespace: &str, name: &str) -> Option<Labels> {
        let object = self.service_accounts.get(&ObjectRef::new(name).within(namespace))?;
        Some(object.metadata.labels.clone().unwrap_or_default())
    }

    fn namespace_labels(&self, namespace: &str) -> Option<Labels> {
        let object = self.namespaces.get(&ObjectRef::new(namespace))?;
        Some(object.metadata.labels.clone().unwrap_or_default())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::AGENT_LABEL;

    pub(crate) fn meta(namespace: Option<&str>, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: namespace.map(Into::into),
            labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn agent_set_from_objects() {
        let policy: ClusterAgentPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "agentguard.io/v1alpha1", "kind": "ClusterAgentPolicy",
            "metadata": {"name": "p"},
            "spec": {
                "subjects": {"serviceAccountSelector": {"matchLabels": {"role": "bot"}},
                             "usernames": ["oidc:bot"], "groups": ["bots"]},
                "action": "Deny",
                "rules": [{"operations": ["DELETE"], "resources": [{"apiGroups": [""], "resources": ["secrets"]}]}]
            }
        }))
        .unwrap();
        let (policies, problems) = PolicySet::compile(&[policy], &[]);
        assert!(problems.is_empty(), "{problems:?}");
        let config = Config {
            agent_usernames: vec!["ci".into()],
            agent_groups: vec!["ai".into()],
            ..Config::default()
        };
        let namespaces = [meta(None, "sandbox", &[(AGENT_NAMESPACE_LABEL, "true")]), meta(None, "web", &[])];
        let service_accounts = [
            meta(Some("web"), "coder", &[(AGENT_LABEL, "true")]),
            meta(Some("web"), "selected", &[("role", "bot")]),
            meta(Some("web"), "deployer", &[]),
            // Covered by its namespace, so not listed by name.
            meta(Some("sandbox"), "anyone", &[(AGENT_LABEL, "true")]),
        ];
        let set = agent_set(&policies, &config, &namespaces, &service_accounts);
        fn strings(s: &BTreeSet<String>) -> Vec<&str> {
            s.iter().map(String::as_str).collect()
        }
        assert_eq!(
            strings(&set.usernames),
            ["ci", "oidc:bot", "system:serviceaccount:web:coder", "system:serviceaccount:web:selected"]
        );
        assert_eq!(strings(&set.namespaces), ["sandbox"]);
        assert_eq!(strings(&set.groups), ["ai", "bots"]);
    }
}
