//! `KIND/NAME` as kubectl takes it (`deployment/web`, `deploy/web`, `deployments.apps/web`,
//! `ns/prod`), resolved against the API server's discovery: shared by the commands that act on
//! one object (`approve`, `why`).

use anyhow::{Context, Result, bail};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::APIResource;
use kube::api::ApiResource;

/// One object named on the command line, its resource resolved.
#[derive(Clone, Debug)]
pub struct Target {
    pub resource: ApiResource,
    pub namespaced: bool,
    /// Empty for a cluster-scoped object.
    pub namespace: String,
    pub name: String,
}

impl Target {
    /// `deployments.apps web -n prod`, as `kubectl` and agentguard's messages name it.
    pub fn describe(&self) -> String {
        let resource = match self.resource.group.as_str() {
            "" => self.resource.plural.clone(),
            group => format!("{}.{group}", self.resource.plural),
        };
        match self.namespace.as_str() {
            "" => format!("{resource} {}", self.name),
            ns => format!("{resource} {} -n {ns}", self.name),
        }
    }

    pub fn api(&self, client: kube::Client) -> kube::Api<kube::api::DynamicObject> {
        if self.namespaced {
            kube::Api::namespaced_with(client, &self.namespace, &self.resource)
        } else {
            kube::Api::all_with(client, &self.resource)
        }
    }
}

/// Splits `KIND/NAME` into (kind, optional group, name): `deployments.apps/web` →
/// (`deployments`, `apps`, `web`).
pub fn split(object: &str) -> Result<(&str, Option<&str>, &str)> {
    let Some((kind, name)) = object.split_once('/').filter(|(k, n)| !k.is_empty() && !n.is_empty()) else {
        bail!("{object:?} is not KIND/NAME (e.g. deployment/web)");
    };
    if name.contains('/') {
        bail!("{object:?} is not KIND/NAME (e.g. deployment/web): the name has a '/'");
    }
    Ok(match kind.split_once('.') {
        Some((kind, group)) => (kind, Some(group), name),
        None => (kind, None, name),
    })
}

/// Whether `kind` names this resource the way kubectl accepts: plural, singular, kind or a short
/// name, case-insensitively. Subresources (`pods/log`) never match.
pub fn names(resource: &APIResource, kind: &str) -> bool {
    let kind = kind.to_ascii_lowercase();
    !resource.name.contains('/')
        && (resource.name == kind
            || resource.singular_name.to_ascii_lowercase() == kind
            || resource.kind.to_ascii_lowercase() == kind
            || resource.short_names.iter().flatten().any(|s| s.to_ascii_lowercase() == kind))
}

/// Resolves `object` (`KIND/NAME`) with discovery: the core group first, then every group at
/// its preferred version, the first resource that `names` matches winning, as in kubectl.
pub async fn resolve(client: &kube::Client, object: &str, namespace: Option<&str>) -> Result<Target> {
    let (kind, group, name) = split(object)?;
    let mut versions: Vec<(String, String)> = Vec::new(); // (group, group/version)
    if group.is_none_or(str::is_empty) {
        versions.push((String::new(), "v1".into()));
    }
    if group.is_none_or(|g| !g.is_empty()) {
        let groups = client.list_api_groups().await.context("listing the API groups")?;
        for g in groups.groups {
            if group.is_some_and(|wanted| wanted != g.name) {
                continue;
            }
            let Some(preferred) = g.preferred_version.or_else(|| g.versions.into_iter().next()) else {
                continue;
            };
            versions.push((g.name, preferred.group_version));
        }
    }
    for (group, group_version) in versions {
        let list = if group.is_empty() {
            client.list_core_api_resources("v1").await
        } else {
            client.list_api_group_resources(&group_version).await
        };
        // A group whose aggregated API server is down is skipped, as kubectl does.
        let Ok(list) = list else { continue };
        if let Some(r) = list.resources.iter().find(|r| names(r, kind)) {
            let version = group_version.rsplit('/').next().unwrap_or_default().to_owned();
            let resource = ApiResource {
                group: group.clone(),
                version,
                api_version: group_version.clone(),
                kind: r.kind.clone(),
                plural: r.name.clone(),
            };
            let namespace = match (r.namespaced, namespace) {
                (false, _) => String::new(),
                (true, Some(ns)) => ns.to_owned(),
                (true, None) => client.default_namespace().to_owned(),
            };
            return Ok(Target { resource, namespaced: r.namespaced, namespace, name: name.to_owned() });
        }
    }
    bail!(
        "the server has no resource type {kind:?}{}",
        group.map(|g| format!(" in group {g:?}")).unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_slash_name() {
        assert_eq!(split("deployment/web").unwrap(), ("deployment", None, "web"));
        assert_eq!(split("deployments.apps/web").unwrap(), ("deployments", Some("apps"), "web"));
        for bad in ["web", "/web", "deployment/", "a/b/c"] {
            assert!(split(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_resource_is_named_as_kubectl_names_it() {
        let deployments = APIResource {
            name: "deployments".into(),
            singular_name: "deployment".into(),
            kind: "Deployment".into(),
            short_names: Some(vec!["deploy".into()]),
            namespaced: true,
            ..Default::default()
        };
        for kind in ["deployments", "deployment", "Deployment", "deploy", "DEPLOY"] {
            assert!(names(&deployments, kind), "{kind}");
        }
        assert!(!names(&deployments, "deploys"));
        let scale =
            APIResource { name: "deployments/scale".into(), kind: "Scale".into(), ..Default::default() };
        assert!(!names(&scale, "deployments") && !names(&scale, "scale"));
    }
}
