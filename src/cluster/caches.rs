//! The in-memory picture of the cluster the webhook decides from, kept current by kube-runtime
//! reflectors: ServiceAccount and Namespace labels (metadata only, labels kept), the compiled
//! [`PolicySet`], rebuilt and swapped atomically within [`COMPILE_AFTER`] of a change of a
//! policy's spec (once for a whole burst of changes; status writes change nothing compiled), and
//! what RBAC lets agents become ([`Reach`]), recomputed within [`REACH_EVERY`] of any change.
//!
//! ```text
//!  watch ServiceAccounts (metadata) ──▶ Store ─┐
//!  watch Namespaces (metadata)      ──▶ Store ─┼─▶ Caches: Directory + ArcSwap<PolicySet>
//!  watch ClusterAgentPolicies ─┐               │                     + ArcSwap<Reach>
//!  watch AgentPolicies ────────┴─▶ compile ────┤
//!  watch Roles, ClusterRoles and bindings ──▶ reach
//!  watch AgentSessions ──▶ Store (read only when a request is held)
//! ```
//!
//! No API call is made on the request path. [`Caches::ready`] stays false until every watch has
//! listed once, so the webhook never judges from a half-filled cache; [`Caches::view_age`] says
//! how long ago the API server last vouched for what they hold (see [`freshness`]): a failed
//! watch starts over with a fresh list, and a heartbeat notices a silent partition. (Sessions
//! are not waited for: one not yet seen only leaves a request held, and a chart upgraded
//! without the session CRD must still become ready.)

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::{FutureExt, StreamExt, future::BoxFuture};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, ObjectMeta, PartialObjectMeta};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use tokio::time::Instant;

use crate::cluster::freshness::{self, Bound, Freshness};
use crate::engine::api::{AGENT_NAMESPACE_LABEL, AgentPolicy, AgentSession, ClusterAgentPolicy};
use crate::engine::policy::identity::AgentSet;
use crate::engine::policy::reach::{self, Rbac, Reach};
use crate::engine::policy::selector::Labels;
use crate::engine::policy::{Config, Directory, PolicySet, Problem};
use crate::metrics::Metrics;

/// How soon a change of RBAC, labels or policies is reflected in what agents can become.
pub const REACH_EVERY: Duration = Duration::from_millis(100);

/// How long policy changes are gathered before the whole set is compiled once for all of them:
/// creating a thousand policies compiles a few times, not a thousand.
pub const COMPILE_AFTER: Duration = Duration::from_millis(100);

/// Shared, read-mostly caches. Cheap to read from any request.
pub struct Caches {
    pub(crate) cluster_policies: Store<ClusterAgentPolicy>,
    pub(crate) agent_policies: Store<AgentPolicy>,
    service_accounts: Store<PartialObjectMeta<ServiceAccount>>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    roles: Store<Role>,
    cluster_roles: Store<ClusterRole>,
    role_bindings: Store<RoleBinding>,
    cluster_role_bindings: Store<ClusterRoleBinding>,
    sessions: Store<AgentSession>,
    policies: ArcSwap<PolicySet>,
    problems: ArcSwap<Vec<Problem>>,
    reach: ArcSwap<Reach>,
    /// Set by every watch event; the reach is recomputed when it was.
    changed: AtomicBool,
    /// Set while a policy change waits to be compiled (see [`Caches::compile_pending`]).
    compile_pending: AtomicBool,
    /// One reach computation at a time, each from the caches as they are when it starts.
    reach_lock: std::sync::Mutex<()>,
    config: Config,
    ready: AtomicBool,
    freshness: Arc<Freshness>,
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

    /// Whether a policy change waits to be compiled ([`COMPILE_AFTER`]): the policies in the
    /// reflector stores may then be ahead of what is in force, so their status must not say a
    /// new generation is.
    pub fn compile_pending(&self) -> bool {
        self.compile_pending.load(Ordering::Acquire)
    }

    /// How long ago the API server last vouched for the whole view (see [`freshness`]).
    pub fn view_age(&self) -> Duration {
        self.freshness.age()
    }

    /// What RBAC lets the agents become, as last computed.
    pub fn reach(&self) -> Arc<Reach> {
        self.reach.load_full()
    }

    /// Starts the reflectors and the heartbeat. The returned future drives them until dropped.
    /// `config` says who is an agent (label, usernames, groups) and agentguard's own namespace;
    /// `max_staleness` sets the heartbeat's pace ([`Bound::heartbeat_every`]).
    pub fn start(
        client: Client,
        metrics: Arc<Metrics>,
        config: Config,
        max_staleness: Bound,
    ) -> (Arc<Self>, BoxFuture<'static, ()>) {
        let freshness = Arc::new(Freshness::new());
        let (sa_store, sa_writer) = reflector::store();
        let (ns_store, ns_writer) = reflector::store();
        let (cp_store, cp_writer) = reflector::store::<ClusterAgentPolicy>();
        let (ap_store, ap_writer) = reflector::store::<AgentPolicy>();
        let (role_store, role_writer) = reflector::store::<Role>();
        let (cr_store, cr_writer) = reflector::store::<ClusterRole>();
        let (rb_store, rb_writer) = reflector::store::<RoleBinding>();
        let (crb_store, crb_writer) = reflector::store::<ClusterRoleBinding>();
        let (session_store, session_writer) = reflector::store::<AgentSession>();
        let caches = Arc::new(Self {
            cluster_policies: cp_store.clone(),
            agent_policies: ap_store.clone(),
            service_accounts: sa_store.clone(),
            namespaces: ns_store.clone(),
            roles: role_store.clone(),
            cluster_roles: cr_store.clone(),
            role_bindings: rb_store.clone(),
            cluster_role_bindings: crb_store.clone(),
            sessions: session_store,
            policies: ArcSwap::from_pointee(PolicySet::default()),
            problems: ArcSwap::from_pointee(Vec::new()),
            reach: ArcSwap::from_pointee(Reach::default()),
            changed: AtomicBool::new(true),
            compile_pending: AtomicBool::new(false),
            reach_lock: std::sync::Mutex::new(()),
            config,
            ready: AtomicBool::new(false),
            freshness: freshness.clone(),
        });
        let restart = freshness::RESTART_FIRST;

        // Only labels are kept: the rest of the metadata would cost memory for nothing.
        // Every watch starts over with a fresh list when it fails (see [`freshness::relisting`]).
        let sa_watch = reflector::reflector(sa_writer, {
            let api = Api::<PartialObjectMeta<ServiceAccount>>::all(client.clone());
            freshness::relisting(restart, move || {
                watcher(api.clone(), watcher::Config::default()).modify(keep_labels_only).boxed()
            })
        });
        let ns_watch = reflector::reflector(ns_writer, {
            let api = Api::<PartialObjectMeta<Namespace>>::all(client.clone());
            freshness::relisting(restart, move || {
                watcher(api.clone(), watcher::Config::default()).modify(keep_labels_only).boxed()
            })
        });
        let cp_watch = reflector::reflector(cp_writer, {
            let api = Api::<ClusterAgentPolicy>::all(client.clone());
            freshness::relisting(restart, move || {
                watcher(api.clone(), watcher::Config::default()).modify(drop_bookkeeping).boxed()
            })
        })
        .map(|e| (Kind::Cluster, e.map(|e| Seen::of(&e))));
        let ap_watch = reflector::reflector(ap_writer, {
            let api = Api::<AgentPolicy>::all(client.clone());
            freshness::relisting(restart, move || {
                watcher(api.clone(), watcher::Config::default()).modify(drop_bookkeeping).boxed()
            })
        })
        .map(|e| (Kind::Namespaced, e.map(|e| Seen::of(&e))));

        let (compiled_tx, mut compiled_rx) = tokio::sync::watch::channel(false);
        let caches_for_watches = caches.clone();
        let compiler = {
            let caches = caches.clone();
            let metrics = metrics.clone();
            let (cp_reader, ap_reader) = (cp_store.clone(), ap_store.clone());
            let events = futures::stream::select(cp_watch, ap_watch);
            async move {
                let mut events = std::pin::pin!(events);
                let mut generations = Generations::default();
                let mut listed = [false, false];
                let mut coalesce = Coalesce::new(COMPILE_AFTER);
                loop {
                    let due = coalesce.due();
                    tokio::select! {
                        event = events.next() => match event {
                            None => break,
                            Some((kind, Err(e))) => {
                                caches.freshness.watch_failed(kind.watch());
                                tracing::warn!(error = %e, ?kind, "policy watch failed; listing again");
                            }
                            Some((kind, Ok(seen))) => {
                                if seen != Seen::Relisting {
                                    caches.freshness.watch_answered(kind.watch());
                                }
                                if seen == Seen::Listed {
                                    listed[kind as usize] = true;
                                }
                                // Compiling before both lists are complete would judge from a
                                // partial set of policies.
                                if generations.changes(kind, seen) && listed == [true, true] {
                                    caches.compile_pending.store(true, Ordering::Release);
                                    coalesce.changed(Instant::now());
                                }
                            }
                        },
                        () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {}
                    }
                    if coalesce.compile_now(Instant::now()) {
                        caches.recompile(&cp_reader, &ap_reader, &metrics);
                        // Only now: the status task must not see the old problems as current.
                        caches.compile_pending.store(false, Ordering::Release);
                        caches.changed.store(true, Ordering::Release);
                        compiled_tx.send_replace(true);
                    }
                }
            }
        };
        let readiness = {
            let caches = caches.clone();
            let metrics = metrics.clone();
            async move {
                // Writers live as long as their streams, so waiting cannot fail while we run.
                let _ = sa_store.wait_until_ready().await;
                let _ = ns_store.wait_until_ready().await;
                let _ = compiled_rx.wait_for(|compiled| *compiled).await;
                let _ = tokio::join!(
                    role_store.wait_until_ready(),
                    cr_store.wait_until_ready(),
                    rb_store.wait_until_ready(),
                    crb_store.wait_until_ready(),
                );
                // Who agents can become, computed from the synced caches, before any decision.
                caches.refresh_reach(&metrics);
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
        let rbac = futures::future::join4(
            rbac_watch(&client, role_writer, &caches, "roles"),
            rbac_watch(&client, cr_writer, &caches, "clusterroles"),
            rbac_watch(&client, rb_writer, &caches, "rolebindings"),
            rbac_watch(&client, crb_writer, &caches, "clusterrolebindings"),
        );
        let reach = {
            let caches = caches.clone();
            let metrics = metrics.clone();
            async move {
                let mut tick = tokio::time::interval(REACH_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if caches.ready() && caches.changed.load(Ordering::Acquire) {
                        caches.refresh_reach(&metrics);
                    }
                }
            }
        };
        let heartbeat = freshness::keep_heartbeat(client.clone(), freshness, max_staleness);
        let run = async move {
            tokio::join!(
                heartbeat,
                sa_watch.for_each(mark_changed(caches_for_watches.clone(), "serviceaccounts")),
                ns_watch.for_each(mark_changed(caches_for_watches, "namespaces")),
                compiler,
                rbac,
                reach,
                readiness,
                session_watch(&client, session_writer),
            );
        };
        (caches, run.boxed())
    }

    /// Every identity that is an agent now: what the `agents` webhook must see. Includes the
    /// namespaces agents can act in (the last computed [`Reach`]).
    pub fn agent_set(&self, config: &Config) -> AgentSet {
        let mut set = self.marked_agents(config);
        set.namespaces.extend(self.reach().namespaces.keys().cloned());
        set
    }

    /// The agents marked as such (labels, agent namespaces, usernames and groups).
    fn marked_agents(&self, config: &Config) -> AgentSet {
        let (namespaces, service_accounts) = (self.namespaces.state(), self.service_accounts.state());
        agent_set(
            &self.policies(),
            config,
            namespaces.iter().map(|ns| &ns.metadata),
            service_accounts.iter().map(|sa| &sa.metadata),
        )
    }

    /// The namespaces agents could act in if `extra` were agents too: what a write marking
    /// them must register before it is admitted.
    pub fn reach_with(&self, extra: &AgentSet) -> BTreeSet<String> {
        let mut base = self.marked_agents(&self.config);
        base.extend(extra);
        self.compute_reach(&base).namespaces.into_keys().collect()
    }

    fn compute_reach(&self, base: &AgentSet) -> Reach {
        let namespaces = self.namespaces.state();
        let (roles, cluster_roles) = (self.roles.state(), self.cluster_roles.state());
        let (role_bindings, cluster_role_bindings) =
            (self.role_bindings.state(), self.cluster_role_bindings.state());
        let roles: Vec<&Role> = roles.iter().map(AsRef::as_ref).collect();
        let cluster_roles: Vec<&ClusterRole> = cluster_roles.iter().map(AsRef::as_ref).collect();
        let role_bindings: Vec<&RoleBinding> = role_bindings.iter().map(AsRef::as_ref).collect();
        let cluster_role_bindings: Vec<&ClusterRoleBinding> =
            cluster_role_bindings.iter().map(AsRef::as_ref).collect();
        let rbac = Rbac {
            roles: &roles,
            cluster_roles: &cluster_roles,
            role_bindings: &role_bindings,
            cluster_role_bindings: &cluster_role_bindings,
        };
        let names = namespaces.iter().filter_map(|ns| ns.metadata.name.as_deref());
        reach::reach(base, names, rbac, self.config.self_namespace.as_deref())
    }

    /// Recomputes what the agents can become and says what changed.
    fn refresh_reach(&self, metrics: &Metrics) {
        // A poisoned lock only means an earlier computation panicked; the data is recomputed.
        let _one = self.reach_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.changed.store(false, Ordering::Release);
        let next = self.compute_reach(&self.marked_agents(&self.config));
        let before = self.reach();
        if *before == next {
            return;
        }
        for (ns, why) in next.namespaces.iter().filter(|(ns, _)| !before.namespaces.contains_key(*ns)) {
            tracing::info!(namespace = %ns, %why, "an agent can act as this namespace's ServiceAccounts: they are agents");
        }
        for ns in before.namespaces.keys().filter(|ns| !next.namespaces.contains_key(*ns)) {
            tracing::info!(namespace = %ns, "no agent can act as this namespace's ServiceAccounts any more");
        }
        for (ns, why) in next.withheld.iter().filter(|(ns, _)| !before.withheld.contains_key(*ns)) {
            tracing::warn!(namespace = %ns, %why, "an agent can act as this namespace's ServiceAccounts, which agentguard never treats as agents (the control plane's or its own): the agent can get around the brakes");
        }
        for (agent, why) in next.beyond.iter().filter(|(a, _)| !before.beyond.contains_key(*a)) {
            tracing::warn!(%agent, binding = %why, "RBAC lets this agent impersonate users or groups or grant itself any role: it can get around the brakes");
        }
        metrics.reached_namespaces.set(next.namespaces.len() as i64);
        metrics.agents_beyond_brakes.set((next.beyond.len() + next.withheld.len()) as i64);
        self.reach.store(Arc::new(next));
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
        metrics.policy_compiles.inc();
        tracing::debug!(policies = set.len(), problems = problems.len(), "policies compiled");
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Cluster = 0,
    Namespaced = 1,
}

impl Kind {
    /// The watch's name for [`Freshness`].
    fn watch(self) -> &'static str {
        match self {
            Kind::Cluster => "clusteragentpolicies",
            Kind::Namespaced => "agentpolicies",
        }
    }
}

/// A policy's namespace (none for a ClusterAgentPolicy) and name.
type Key = (Option<String>, String);

/// What a policy watch event says, reduced to what deciding to compile needs.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    /// A list starts (again, after a watch was lost): what was known may be gone.
    Relisting,
    /// A policy of the list in progress, with its `metadata.generation`.
    Listing(Key, Option<i64>),
    /// The list is complete.
    Listed,
    /// A policy was created or changed, spec or not.
    Applied(Key, Option<i64>),
    Deleted(Key),
}

impl Seen {
    fn of<K: Resource>(event: &watcher::Event<K>) -> Self {
        fn key<K: Resource>(object: &K) -> Key {
            let meta = object.meta();
            (meta.namespace.clone(), meta.name.clone().unwrap_or_default())
        }
        match event {
            watcher::Event::Init => Seen::Relisting,
            watcher::Event::InitApply(o) => Seen::Listing(key(o), o.meta().generation),
            watcher::Event::InitDone => Seen::Listed,
            watcher::Event::Apply(o) => Seen::Applied(key(o), o.meta().generation),
            watcher::Event::Delete(o) => Seen::Deleted(key(o)),
        }
    }
}

/// The `metadata.generation` of every policy seen. The API server raises it on every change of
/// a policy's spec and on none of its status (a subresource), labels or annotations: a policy
/// applied at the generation already seen compiles to what is compiled already. Status writes,
/// agentguard's own among them, are most of the events of a busy policy watch.
#[derive(Debug, Default)]
struct Generations(HashMap<(Kind, Key), Option<i64>>);

impl Generations {
    /// Records `seen` and says whether the policies compile differently since: at the end of a
    /// list, on a deletion, and when a policy is applied at a new generation (or at none: an
    /// API server that does not count is taken at its word each time).
    fn changes(&mut self, kind: Kind, seen: Seen) -> bool {
        match seen {
            Seen::Relisting => {
                self.0.retain(|(k, _), _| *k != kind);
                false
            }
            Seen::Listing(key, generation) => {
                self.0.insert((kind, key), generation);
                false
            }
            Seen::Listed => true,
            Seen::Applied(key, generation) => {
                let before = self.0.insert((kind, key), generation);
                generation.is_none() || before != Some(generation)
            }
            Seen::Deleted(key) => {
                self.0.remove(&(kind, key));
                true
            }
        }
    }
}

/// When to compile, from when policies change: the first change opens a window of `window`,
/// later ones within it are absorbed, and the one compile at its end takes them all in. Under a
/// steady stream of changes that is one compile per window, and every change is compiled within
/// a window of being made. Pure: the caller says what time it is.
#[derive(Debug)]
struct Coalesce {
    window: Duration,
    due: Option<Instant>,
}

impl Coalesce {
    fn new(window: Duration) -> Self {
        Self { window, due: None }
    }

    /// A change at `now`.
    fn changed(&mut self, now: Instant) {
        self.due.get_or_insert(now + self.window);
    }

    /// When the next compile is due, if a change waits for one.
    fn due(&self) -> Option<Instant> {
        self.due
    }

    /// Whether to compile at `now`; a compile that is due is taken.
    fn compile_now(&mut self, now: Instant) -> bool {
        let due = self.due.is_some_and(|due| due <= now);
        if due {
            self.due = None;
        }
        due
    }
}

fn mark_changed<K>(
    caches: Arc<Caches>,
    cache: &'static str,
) -> impl FnMut(Result<watcher::Event<K>, watcher::Error>) -> futures::future::Ready<()> {
    move |event| {
        match event {
            Ok(event) => {
                if freshness::is_answer(&event) {
                    caches.freshness.watch_answered(cache);
                }
                caches.changed.store(true, Ordering::Release)
            }
            Err(e) => {
                caches.freshness.watch_failed(cache);
                tracing::warn!(error = %e, cache, "watch failed; listing again")
            }
        }
        futures::future::ready(())
    }
}

/// A reflector of one RBAC kind, keeping what [`reach`] reads (no annotations or managedFields).
fn rbac_watch<K>(
    client: &Client,
    writer: reflector::store::Writer<K>,
    caches: &Arc<Caches>,
    cache: &'static str,
) -> BoxFuture<'static, ()>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let api = Api::<K>::all(client.clone());
    let stream = freshness::relisting(freshness::RESTART_FIRST, move || {
        watcher(api.clone(), watcher::Config::default())
            .modify(|o: &mut K| {
                let meta = o.meta_mut();
                meta.annotations = None;
                meta.managed_fields = None;
            })
            .boxed()
    });
    reflector::reflector(writer, stream).for_each(mark_changed(caches.clone(), cache)).boxed()
}

/// What a policy is compiled from is its spec (and its name, namespace, generation and status):
/// managedFields and annotations (`kubectl apply`'s copy of the whole object among them) would
/// only cost memory, per policy.
fn drop_bookkeeping<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.annotations = None;
    meta.managed_fields = None;
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

    fn reached_by_agents(&self, namespace: &str) -> bool {
        self.reach.load().namespaces.contains_key(namespace)
    }

    fn sessions(&self, agent: &str) -> Vec<crate::engine::session::Session> {
        self.sessions
            .state()
            .iter()
            .filter(|s| s.spec.agent == agent)
            .filter_map(|s| crate::engine::session::Session::of(s).ok())
            .collect()
    }
}

/// The reflector of break-glass sessions. A cluster without the session CRD (a chart upgraded
/// without its CRDs) keeps retrying, with backoff, and no session admits anything.
fn session_watch(client: &Client, writer: reflector::store::Writer<AgentSession>) -> BoxFuture<'static, ()> {
    let stream =
        watcher(Api::<AgentSession>::all(client.clone()), watcher::Config::default()).default_backoff();
    reflector::reflector(writer, stream)
        .for_each(|event| async move {
            if let Err(e) = event {
                tracing::warn!(error = %e, "session watch failed; retrying");
            }
        })
        .boxed()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::engine::api::AGENT_LABEL;

    pub(crate) fn meta(namespace: Option<&str>, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: namespace.map(Into::into),
            labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        }
    }

    fn policy_key(name: &str) -> Key {
        (Some("team".into()), name.into())
    }

    #[test]
    fn only_spec_changes_compile() {
        let mut generations = Generations::default();
        let mut seen = |kind, s| generations.changes(kind, s);
        // A list compiles once, at its end.
        assert!(!seen(Kind::Namespaced, Seen::Relisting));
        assert!(!seen(Kind::Namespaced, Seen::Listing(policy_key("a"), Some(1))));
        assert!(!seen(Kind::Namespaced, Seen::Listing(policy_key("b"), Some(4))));
        assert!(seen(Kind::Namespaced, Seen::Listed));
        // Status writes (and label or annotation edits) leave the generation as it was.
        assert!(!seen(Kind::Namespaced, Seen::Applied(policy_key("a"), Some(1))));
        assert!(!seen(Kind::Namespaced, Seen::Applied(policy_key("b"), Some(4))));
        // A new spec, a new policy, one without a generation, a deletion: each compiles.
        assert!(seen(Kind::Namespaced, Seen::Applied(policy_key("a"), Some(2))));
        assert!(!seen(Kind::Namespaced, Seen::Applied(policy_key("a"), Some(2))));
        assert!(seen(Kind::Namespaced, Seen::Applied(policy_key("c"), Some(1))));
        assert!(seen(Kind::Namespaced, Seen::Applied(policy_key("d"), None)));
        assert!(seen(Kind::Namespaced, Seen::Applied(policy_key("d"), None)));
        assert!(seen(Kind::Namespaced, Seen::Deleted(policy_key("b"))));
        // Recreated at generation 1 after the deletion, it is new again.
        assert!(seen(Kind::Namespaced, Seen::Applied(policy_key("b"), Some(1))));
        // The same name of the other kind is another policy.
        assert!(seen(Kind::Cluster, Seen::Applied(policy_key("a"), Some(2))));
        // A relist forgets what it does not list again: "c" applied afterwards is new.
        assert!(!seen(Kind::Namespaced, Seen::Relisting));
        assert!(!seen(Kind::Namespaced, Seen::Listing(policy_key("a"), Some(2))));
        assert!(seen(Kind::Namespaced, Seen::Listed));
        assert!(!seen(Kind::Namespaced, Seen::Applied(policy_key("a"), Some(2))));
        assert!(seen(Kind::Namespaced, Seen::Applied(policy_key("c"), Some(1))));
        assert!(!seen(Kind::Cluster, Seen::Applied(policy_key("a"), Some(2))));
    }

    /// Plays the compiler's loop over changes made at the given offsets: before each change,
    /// the compile due by then runs. Returns when each compile ran.
    fn compiles_for(changes: &[Duration]) -> Vec<Duration> {
        let start = Instant::now();
        let mut coalesce = Coalesce::new(COMPILE_AFTER);
        let mut compiles = Vec::new();
        let mut run_due = |coalesce: &mut Coalesce, now: Instant| {
            while let Some(due) = coalesce.due()
                && due <= now
            {
                assert!(!coalesce.compile_now(due - Duration::from_millis(1)), "not before it is due");
                assert!(coalesce.compile_now(due));
                compiles.push(due - start);
            }
        };
        for at in changes {
            run_due(&mut coalesce, start + *at);
            coalesce.changed(start + *at);
        }
        run_due(&mut coalesce, start + Duration::from_secs(3600));
        compiles
    }

    #[test]
    fn a_burst_of_policy_changes_compiles_once() {
        // A thousand policies created at once (an `apply -f` of a directory), their status
        // written as they are.
        assert_eq!(compiles_for(&[Duration::ZERO; 1000]), [COMPILE_AFTER]);
    }

    #[test]
    fn a_steady_stream_of_changes_compiles_once_per_window() {
        // A change every millisecond for two seconds: 2,000 changes, 20 compiles, the last one
        // taking in the last change.
        let changes: Vec<Duration> = (0..2000).map(Duration::from_millis).collect();
        let expected: Vec<Duration> = (1..=20).map(|n| COMPILE_AFTER * n).collect();
        assert_eq!(compiles_for(&changes), expected);
    }

    #[test]
    fn changes_apart_compile_each() {
        let second = Duration::from_secs(1);
        assert_eq!(compiles_for(&[Duration::ZERO, second]), [COMPILE_AFTER, second + COMPILE_AFTER]);
        assert!(compiles_for(&[]).is_empty());
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
