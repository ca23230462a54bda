//! The ownership view on the agent's path: what an agent's DELETE would take with it.
//!
//! A DELETE hands its object's dependents to the garbage collector (unless
//! `propagationPolicy: Orphan`), a Namespace's contents to the namespace controller, and a
//! CustomResourceDefinition's custom resources to the API server itself. agentguard judges such a
//! DELETE as the DELETE of each of those that a policy guards (see
//! [`crate::engine::policy::effects`]), so it must know them before it answers.
//!
//! Looked up, not cached: for every agent DELETE (and human approval of a delete) while some
//! policy guards DELETEs — a held DELETE shows it and its ticket is bound to it — with metadata-only lists of the resource types those policies name
//! (resolved through discovery, refreshed at most once a minute). What it costs per agent DELETE:
//! one list per guarded resource type in the namespace (cluster-wide for a cluster-scoped owner
//! or a CRD), and one metadata read per intermediate owner not already listed (a ReplicaSet
//! between a Deployment and its Pods). Nothing here decides: it returns [`Collateral`] for the
//! pure engine. An error fails the agent's request closed. A guarded type agentguard may not
//! list (Secrets, unless the chart is told to let it read them) is not an error: what the DELETE
//! takes of it is unseen, and judged as if it took any object of that type.
//!
//! Data goes too: a PersistentVolume with reclaimPolicy Delete bound to a claim the DELETE
//! removes is deleted by the PV controller with its storage, so it is part of what the DELETE
//! takes (one list of PersistentVolumes, only for a DELETE that removes claims or a Namespace).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::future::BoxFuture;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, ObjectMeta};
use kube::discovery::{Discovery, Scope, verbs};
use serde_json::{Value, json};

use crate::engine::admission::AdmissionRequest;
use crate::engine::policy::{Collateral, PolicySet};

/// How far up an ownerReference chain the view looks for the deleted object.
const MAX_DEPTH: usize = 8;
/// How long a discovery of the API's resource types is reused.
const DISCOVERY_FOR: Duration = Duration::from_secs(60);

/// What the request path asks of the ownership view.
pub trait Lookup: Send + Sync + 'static {
    fn collateral<'a>(
        &'a self,
        request: &'a AdmissionRequest,
        policies: &'a PolicySet,
    ) -> BoxFuture<'a, Result<Vec<Collateral>>>;
}

/// Whether an admitted request still needs the ownership view, when some policy guards DELETEs:
/// an agent's DELETE (judged with what it takes along), or a human's approval of a delete (whose
/// writer must be an approver for what the delete takes along too).
pub fn needed(request: &AdmissionRequest, agent: bool, policies: &PolicySet) -> bool {
    if policies.delete_guarded_resources().is_empty() {
        return false;
    }
    let approves_delete = || {
        crate::engine::approval::written(request.old_object.as_ref(), request.object.as_ref())
            .iter()
            .any(|(_, v)| v.trim_start().starts_with("delete."))
    };
    (agent && request.operation == "DELETE") || (!agent && request.operation == "UPDATE" && approves_delete())
}

/// Whether the DELETE hands its object's dependents to the garbage collector.
pub fn cascades(options: Option<&Value>) -> bool {
    let orphan = options.and_then(|o| o.get("propagationPolicy")).and_then(Value::as_str) == Some("Orphan")
        || options.and_then(|o| o.get("orphanDependents")).and_then(Value::as_bool) == Some(true);
    !orphan
}

/// A guarded resource type agentguard's role does not let it list (the chart's
/// `readableResources`, which leaves Secrets out unless `readSecrets`). What a DELETE would take
/// of it is unseen, and judged as if it took any object of that type (see
/// [`Collateral::unseen`]).
#[derive(Debug, thiserror::Error)]
#[error("agentguard may not list {resource}")]
struct Unreadable {
    resource: String,
}

fn resource_name(ar: &ApiResource) -> String {
    if ar.group.is_empty() { ar.plural.clone() } else { format!("{}.{}", ar.plural, ar.group) }
}

/// The live view, asking the API server.
pub struct Ownership {
    client: kube::Client,
    /// The last discovery: when, for which set of CRDs, and what it found.
    discovered: tokio::sync::Mutex<Option<(Instant, String, Arc<Types>)>>,
    /// API calls made (lists, owner reads), for the log line each lookup leaves.
    calls: std::sync::atomic::AtomicU64,
}

/// A resource type and whether it is namespaced.
type Served = (ApiResource, bool);

/// The API's listable resource types, by (group, resource) and by (group, kind).
#[derive(Default)]
struct Types {
    by_resource: BTreeMap<(String, String), Served>,
    by_kind: HashMap<(String, String), Served>,
}

impl Ownership {
    pub fn new(client: kube::Client) -> Self {
        Self { client, discovered: Default::default(), calls: Default::default() }
    }

    /// The served resource types: rediscovered once a minute, and at once when a CRD was
    /// created, changed or deleted since (a CRD made a moment ago must not be unknown to the
    /// delete of it, or of the namespace holding its resources).
    async fn types(&self) -> Result<Arc<Types>> {
        let crds: Api<
            k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
        > = Api::all(self.client.clone());
        self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut versions: Vec<String> = crds
            .list_metadata(&ListParams::default())
            .await
            .context("listing CustomResourceDefinitions")?
            .items
            .into_iter()
            .map(|c| {
                format!(
                    "{}@{}",
                    c.metadata.name.unwrap_or_default(),
                    c.metadata.resource_version.unwrap_or_default()
                )
            })
            .collect();
        versions.sort();
        let fingerprint = versions.join(",");
        let mut slot = self.discovered.lock().await;
        if let Some((at, seen, types)) = slot.as_ref()
            && at.elapsed() < DISCOVERY_FOR
            && *seen == fingerprint
        {
            return Ok(types.clone());
        }
        let discovery =
            Discovery::new(self.client.clone()).run().await.context("discovering resource types")?;
        let mut types = Types::default();
        for group in discovery.groups() {
            for (ar, caps) in group.recommended_resources() {
                if ar.plural.contains('/') || !caps.supports_operation(verbs::LIST) {
                    continue;
                }
                let namespaced = matches!(caps.scope, Scope::Namespaced);
                types.by_kind.insert((ar.group.clone(), ar.kind.clone()), (ar.clone(), namespaced));
                types.by_resource.insert((ar.group.clone(), ar.plural.clone()), (ar, namespaced));
            }
        }
        let types = Arc::new(types);
        *slot = Some((Instant::now(), fingerprint, types.clone()));
        Ok(types)
    }

    async fn list(&self, ar: &ApiResource, namespace: Option<&str>) -> Result<Vec<ObjectMeta>> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let api: Api<DynamicObject> = match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, ar),
            None => Api::all_with(self.client.clone(), ar),
        };
        let list = match api.list_metadata(&ListParams::default()).await {
            Ok(list) => list,
            Err(kube::Error::Api(e)) if e.code == 403 => {
                return Err(Unreadable { resource: resource_name(ar) }.into());
            }
            Err(e) => return Err(e).with_context(|| format!("listing {}", resource_name(ar))),
        };
        Ok(list.items.into_iter().map(|o| o.metadata).collect())
    }

    async fn find(&self, request: &AdmissionRequest, policies: &PolicySet) -> Result<Vec<Collateral>> {
        let mut out = self.dependents(request, policies).await?;
        let lost = self.volumes_lost(request, &out).await?;
        out.extend(lost);
        Ok(out)
    }

    /// PersistentVolumes whose data the DELETE destroys: those with reclaimPolicy Delete bound
    /// to a claim it deletes (the claim itself, a Namespace's claims, claims among what it takes
    /// with it). The PV controller deletes such a volume, and the storage behind it, once its
    /// claim is gone: the DELETE is judged as the DELETE of each, and they are in its blast radius.
    async fn volumes_lost(
        &self,
        request: &AdmissionRequest,
        taken: &[Collateral],
    ) -> Result<Vec<Collateral>> {
        use k8s_openapi::api::core::v1::PersistentVolume;
        let facts = request.facts();
        let core = |resource: &str| {
            facts.group.is_empty() && facts.resource == resource && facts.subresource.is_empty()
        };
        let namespace = core("namespaces").then_some(facts.name);
        let mut claims: HashSet<(String, String)> = taken
            .iter()
            .filter(|c| c.group.is_empty() && c.resource == "persistentvolumeclaims" && !c.unseen)
            .map(|c| (c.namespace.clone(), c.name.clone()))
            .collect();
        if core("persistentvolumeclaims") {
            claims.insert((facts.namespace.to_owned(), facts.name.to_owned()));
        }
        if claims.is_empty() && namespace.is_none() {
            return Ok(Vec::new());
        }
        self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let via_unseen =
            "the volume of a claim it deletes, unseen: agentguard may not read persistentvolumes";
        let volumes =
            match Api::<PersistentVolume>::all(self.client.clone()).list(&ListParams::default()).await {
                Ok(list) => list.items,
                Err(kube::Error::Api(e)) if e.code == 403 => {
                    return Ok(vec![Collateral {
                        group: String::new(),
                        resource: "persistentvolumes".into(),
                        namespace: String::new(),
                        name: String::new(),
                        object: Value::Null,
                        via: via_unseen.into(),
                        unseen: true,
                    }]);
                }
                Err(e) => return Err(e).context("listing persistentvolumes"),
            };
        Ok(volumes
            .into_iter()
            .filter_map(|pv| {
                let spec = pv.spec.as_ref()?;
                // Recycle scrubs the volume (`rm -rf`) for the next claim: its data goes too.
                let reclaim = spec.persistent_volume_reclaim_policy.as_deref();
                if !matches!(reclaim, Some("Delete" | "Recycle")) {
                    return None;
                }
                let reclaim = reclaim.unwrap_or_default();
                let claim = spec.claim_ref.as_ref()?;
                let (ns, name) = (claim.namespace.clone()?, claim.name.clone()?);
                let bound = namespace == Some(ns.as_str()) || claims.contains(&(ns.clone(), name.clone()));
                bound.then(|| Collateral {
                    group: String::new(),
                    resource: "persistentvolumes".into(),
                    namespace: String::new(),
                    name: pv.metadata.name.clone().unwrap_or_default(),
                    object: json!({"metadata": pv.metadata}),
                    via: format!(
                        "the volume of PersistentVolumeClaim {ns}/{name}, reclaimPolicy {reclaim}: its data is deleted with the claim"
                    ),
                    unseen: false,
                })
            })
            .collect())
    }

    /// What the DELETE hands to the garbage collector, the namespace controller or the API server.
    async fn dependents(&self, request: &AdmissionRequest, policies: &PolicySet) -> Result<Vec<Collateral>> {
        let types = self.types().await?;
        let patterns = policies.delete_guarded_resources();
        let guards = |group: &str, resource: &str| {
            patterns.iter().any(|(groups, res)| {
                groups.iter().any(|g| g == "*" || g == group) && (res == "*" || res == resource)
            })
        };
        // Where volumes are guarded, the claims a DELETE takes must be seen, guarded or not: a
        // claim bound to a reclaimPolicy Delete volume takes its data along (`volumes_lost`).
        let volumes_guarded = guards("", "persistentvolumes");
        let guarded: Vec<(&(String, String), &Served)> = types
            .by_resource
            .iter()
            .filter(|((group, resource), _)| {
                guards(group, resource)
                    || (volumes_guarded && group.is_empty() && resource == "persistentvolumeclaims")
            })
            .collect();
        let facts = request.facts();
        let collateral = |ar: &ApiResource, meta: ObjectMeta, via: String| Collateral {
            group: ar.group.clone(),
            resource: ar.plural.clone(),
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            object: json!({"metadata": meta}),
            via,
            unseen: false,
        };
        // A guarded type agentguard may not list: whatever of it the request takes is assumed.
        let unseen = |ar: &ApiResource, namespace: Option<&str>, why: &str| Collateral {
            group: ar.group.clone(),
            resource: ar.plural.clone(),
            namespace: namespace.unwrap_or_default().to_owned(),
            name: String::new(),
            object: Value::Null,
            via: format!("{why}, unseen: agentguard may not read {}", resource_name(ar)),
            unseen: true,
        };
        let mut out = Vec::new();

        // A Namespace takes everything in it, whatever the propagation policy.
        if facts.group.is_empty() && facts.resource == "namespaces" {
            for (_, (ar, namespaced)) in guarded.iter().filter(|(_, (_, namespaced))| *namespaced) {
                debug_assert!(namespaced);
                let via = format!("in Namespace {:?}", facts.name);
                match self.list(ar, Some(facts.name)).await {
                    Ok(metas) => out.extend(metas.into_iter().map(|m| collateral(ar, m, via.clone()))),
                    Err(e) if e.is::<Unreadable>() => out.push(unseen(ar, Some(facts.name), &via)),
                    Err(e) => return Err(e),
                }
            }
            return Ok(out);
        }
        // A CRD takes its custom resources.
        if facts.group == "apiextensions.k8s.io" && facts.resource == "customresourcedefinitions" {
            let spec = facts.old_object.and_then(|o| o.get("spec"));
            let group = spec.and_then(|s| s.get("group")).and_then(Value::as_str).unwrap_or_default();
            let plural =
                spec.and_then(|s| s.pointer("/names/plural")).and_then(Value::as_str).unwrap_or_default();
            if let Some((_, (ar, _))) = guarded.iter().find(|((g, r), _)| g == group && r == plural) {
                let via = format!("a custom resource of CustomResourceDefinition {:?}", facts.name);
                match self.list(ar, None).await {
                    Ok(metas) => out.extend(metas.into_iter().map(|m| collateral(ar, m, via.clone()))),
                    Err(e) if e.is::<Unreadable>() => out.push(unseen(ar, None, &via)),
                    Err(e) => return Err(e),
                }
            }
            return Ok(out);
        }
        if !cascades(request.options.as_ref()) {
            return Ok(out);
        }
        // Dependents, through ownerReferences, transitively.
        let Some(uid) = facts.old_object.and_then(|o| o.pointer("/metadata/uid")).and_then(Value::as_str)
        else {
            return Ok(out);
        };
        let scope = (!facts.namespace.is_empty()).then_some(facts.namespace);
        let mut known: HashMap<String, ObjectMeta> = HashMap::new();
        let mut candidates = Vec::new();
        for (_, (ar, namespaced)) in &guarded {
            // A namespaced owner's dependents share its namespace; a cluster-scoped owner's may be
            // anywhere. Cluster-scoped objects never depend on namespaced ones.
            if scope.is_some() && !namespaced {
                continue;
            }
            let namespace = if *namespaced { scope } else { None };
            let metas = match self.list(ar, namespace).await {
                Ok(metas) => metas,
                Err(e) if e.is::<Unreadable>() => {
                    let via =
                        format!("a dependent of {} {:?} (garbage collector)", request.kind.kind, facts.name);
                    out.push(unseen(ar, namespace, &via));
                    continue;
                }
                Err(e) => return Err(e),
            };
            for meta in metas {
                if let Some(u) = &meta.uid {
                    known.insert(u.clone(), meta.clone());
                }
                candidates.push((ar.clone(), meta));
            }
        }
        let mut memo: HashMap<String, bool> = HashMap::new();
        for (ar, meta) in candidates {
            let mut seen = HashSet::new();
            if self.descends(&types, &meta, uid, &mut known, &mut memo, &mut seen, 0).await? {
                let via =
                    format!("a dependent of {} {:?} (garbage collector)", request.kind.kind, facts.name);
                out.push(collateral(&ar, meta, via));
            }
        }
        Ok(out)
    }

    /// Whether `meta` is owned, directly or through its owners, by the object with `uid`.
    #[allow(clippy::too_many_arguments)]
    fn descends<'a>(
        &'a self,
        types: &'a Types,
        meta: &'a ObjectMeta,
        uid: &'a str,
        known: &'a mut HashMap<String, ObjectMeta>,
        memo: &'a mut HashMap<String, bool>,
        seen: &'a mut HashSet<String>,
        depth: usize,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let refs = meta.owner_references.clone().unwrap_or_default();
            if refs.iter().any(|r| r.uid == uid) {
                return Ok(true);
            }
            if depth >= MAX_DEPTH {
                return Ok(false);
            }
            for r in refs {
                if !seen.insert(r.uid.clone()) {
                    continue;
                }
                if let Some(hit) = memo.get(&r.uid) {
                    if *hit {
                        return Ok(true);
                    }
                    continue;
                }
                let owner = match known.get(&r.uid) {
                    Some(m) => Some(m.clone()),
                    None => {
                        let group = r.api_version.split_once('/').map(|(g, _)| g).unwrap_or_default();
                        match types.by_kind.get(&(group.to_owned(), r.kind.clone())) {
                            // An owner of a kind the API does not serve cannot be followed.
                            None => None,
                            Some((ar, namespaced)) => {
                                let api: Api<DynamicObject> = match (namespaced, meta.namespace.as_deref()) {
                                    (true, Some(ns)) => Api::namespaced_with(self.client.clone(), ns, ar),
                                    _ => Api::all_with(self.client.clone(), ar),
                                };
                                self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                let got = api
                                    .get_metadata_opt(&r.name)
                                    .await
                                    .with_context(|| format!("reading owner {} {:?}", r.kind, r.name))?;
                                // Only the owner the reference names by uid counts.
                                got.map(|o| o.metadata).filter(|m| m.uid.as_deref() == Some(r.uid.as_str()))
                            }
                        }
                    }
                };
                let Some(owner) = owner else {
                    memo.insert(r.uid.clone(), false);
                    continue;
                };
                known.insert(r.uid.clone(), owner.clone());
                let hit = self.descends(types, &owner, uid, known, memo, seen, depth + 1).await?;
                memo.insert(r.uid.clone(), hit);
                if hit {
                    return Ok(true);
                }
            }
            Ok(false)
        })
    }
}

impl Lookup for Ownership {
    fn collateral<'a>(
        &'a self,
        request: &'a AdmissionRequest,
        policies: &'a PolicySet,
    ) -> BoxFuture<'a, Result<Vec<Collateral>>> {
        Box::pin(async move {
            let (started, before) = (Instant::now(), self.calls.load(std::sync::atomic::Ordering::Relaxed));
            let found = self.find(request, policies).await;
            let calls = self.calls.load(std::sync::atomic::Ordering::Relaxed) - before;
            tracing::info!(
                uid = %request.uid,
                calls,
                collateral = found.as_ref().map_or(0, Vec::len),
                took_ms = started.elapsed().as_millis() as u64,
                "looked up what an agent's delete would take with it"
            );
            found
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orphaning_stops_the_garbage_collector_cascade() {
        assert!(cascades(None));
        assert!(cascades(Some(&json!({"kind": "DeleteOptions", "propagationPolicy": "Background"}))));
        assert!(cascades(Some(&json!({"propagationPolicy": "Foreground"}))));
        assert!(!cascades(Some(&json!({"propagationPolicy": "Orphan"}))));
        assert!(!cascades(Some(&json!({"orphanDependents": true}))));
    }
}
