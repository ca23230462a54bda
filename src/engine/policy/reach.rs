//! Who else an agent can be: the ServiceAccounts RBAC lets an agent act as.
//!
//! Whoever may impersonate a namespace's ServiceAccounts, mint their tokens, read or create
//! their token Secrets, run a pod or a workload there, or exec or attach into a pod there, can act
//! as any ServiceAccount of that namespace — the `edit` and `admin` roles grant all of these. An
//! agent acting as an unmarked ServiceAccount would leave the brakes behind, so every
//! ServiceAccount of a namespace an agent can act in is an agent too: the namespace is *reached*.
//! So, in turn, are the namespaces those ServiceAccounts can act in (the least fixed point from
//! the marked agents, so a grant removed is a reach removed).
//!
//! Read from the RBAC objects (Roles, ClusterRoles, and their bindings), not asked of the API
//! server: the answer must follow every binding change at once and cost nothing per request.
//! Other authorizers (webhook, Node, ABAC) are not seen; `agentguard audit` asks the API server
//! itself. Two things are reported rather than acted on:
//! - namespaces where marking every ServiceAccount an agent would put the cluster's own
//!   controllers or agentguard under brakes (kube-system, agentguard's namespace): withheld;
//! - agents RBAC lets impersonate users or groups, grant themselves any role (`escalate`,
//!   `bind`) or approve client certificates: no brake on ServiceAccounts can hold them, so
//!   their cluster-wide bindings reach nothing more, and they are named as beyond the brakes.

use std::collections::BTreeMap;

use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject};

use super::identity::{AgentSet, service_account_name};

/// Namespaces never reached, whatever RBAC says: the control plane's controllers act as
/// ServiceAccounts of kube-system.
pub const WITHHELD: &[&str] = &["kube-system", "kube-public", "kube-node-lease"];

/// The RBAC objects reach is read from.
#[derive(Clone, Copy, Default)]
pub struct Rbac<'a> {
    pub roles: &'a [&'a Role],
    pub cluster_roles: &'a [&'a ClusterRole],
    pub role_bindings: &'a [&'a RoleBinding],
    pub cluster_role_bindings: &'a [&'a ClusterRoleBinding],
}

/// What RBAC lets the agents become.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reach {
    /// Namespaces whose every ServiceAccount is an agent because an agent can act as them, each
    /// with the first grant found (`RoleBinding ns/name grants system:serviceaccount:...`).
    pub namespaces: BTreeMap<String, String>,
    /// Namespaces an agent can act in that are withheld (see [`WITHHELD`] and agentguard's own).
    pub withheld: BTreeMap<String, String>,
    /// Agents (binding subjects) that may impersonate users or groups or grant themselves any
    /// role, with the ClusterRoleBinding that lets them.
    pub beyond: BTreeMap<String, String>,
}

/// What a rule lets its holder become.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Becomes {
    Nothing,
    /// Any ServiceAccount of the namespace the rule applies in.
    ServiceAccounts,
    /// Anyone: impersonation of users or groups, or `escalate`/`bind` on roles.
    Anyone,
}

/// (group, resource, verbs) that let the holder act as a namespace's ServiceAccounts.
const ACTS_AS_SERVICE_ACCOUNTS: &[(&str, &str, &[&str])] = &[
    ("", "serviceaccounts", &["impersonate"]),
    ("", "serviceaccounts/token", &["create"]),
    // Token Secrets: created for any ServiceAccount, filled by the token controller, read back.
    ("", "secrets", &["get", "list", "watch", "create"]),
    ("", "pods", &["create"]),
    ("", "pods/exec", &["create", "get"]),
    ("", "pods/attach", &["create", "get"]),
    ("", "pods/ephemeralcontainers", &["update", "patch"]),
    ("", "replicationcontrollers", &["create", "update", "patch"]),
    ("", "podtemplates", &["create", "update", "patch"]),
    ("apps", "deployments", &["create", "update", "patch"]),
    ("apps", "replicasets", &["create", "update", "patch"]),
    ("apps", "statefulsets", &["create", "update", "patch"]),
    ("apps", "daemonsets", &["create", "update", "patch"]),
    ("batch", "jobs", &["create", "update", "patch"]),
    ("batch", "cronjobs", &["create", "update", "patch"]),
    // The kubelet's API: exec into any pod of the node (cluster-wide only).
    ("", "nodes/proxy", &["get", "create"]),
];

fn matches(list: &[String], want: &str) -> bool {
    list.iter().any(|v| v == "*" || v == want)
}

/// A rule's `resources` entry against `resource` (`pods/exec`): `*`, `*/exec`, `pods/*` and the
/// exact name match, as RBAC matches them.
fn resource_matches(list: &[String], resource: &str) -> bool {
    let (base, sub) = resource.split_once('/').unwrap_or((resource, ""));
    list.iter().any(|r| {
        r == "*"
            || r == resource
            || (!sub.is_empty() && (r == &format!("*/{sub}") || r == &format!("{base}/*")))
    })
}

fn becomes(rule: &PolicyRule) -> Becomes {
    let groups = rule.api_groups.as_deref().unwrap_or_default();
    let resources = rule.resources.as_deref().unwrap_or_default();
    let verbs = &rule.verbs;
    let grants = |group: &str, resource: &str, wanted: &[&str]| {
        matches(groups, group)
            && resource_matches(resources, resource)
            && wanted.iter().any(|v| matches(verbs, v))
    };
    let anyone = ["users", "groups", "uids", "userextras/*"]
        .iter()
        .any(|r| grants("", r, &["impersonate"]) || grants("authentication.k8s.io", r, &["impersonate"]))
        || ["roles", "clusterroles"]
            .iter()
            .any(|r| grants("rbac.authorization.k8s.io", r, &["escalate", "bind"]))
        // Approving requests for a client-certificate signer: a certificate for any user.
        || grants("certificates.k8s.io", "signers", &["approve"]);
    if anyone {
        return Becomes::Anyone;
    }
    if ACTS_AS_SERVICE_ACCOUNTS.iter().any(|(g, r, v)| grants(g, r, v)) {
        return Becomes::ServiceAccounts;
    }
    Becomes::Nothing
}

fn strongest<'r>(rules: impl IntoIterator<Item = &'r PolicyRule>) -> Becomes {
    rules.into_iter().map(becomes).max().unwrap_or(Becomes::Nothing)
}

/// The subject's name as a request would carry it, if `set` makes it an agent.
fn agent_subject(subject: &Subject, binding_namespace: &str, set: &AgentSet) -> Option<String> {
    let sa_namespace_has_agent = |ns: &str| {
        set.namespaces.contains(ns)
            || set.usernames.iter().any(|u| service_account_name(u).is_some_and(|(n, _)| n == ns))
    };
    match subject.kind.as_str() {
        "ServiceAccount" => {
            let ns = subject.namespace.as_deref().filter(|n| !n.is_empty()).unwrap_or(binding_namespace);
            let username = format!("system:serviceaccount:{ns}:{}", subject.name);
            (set.usernames.contains(&username) || set.namespaces.contains(ns)).then_some(username)
        }
        "User" => (set.usernames.contains(&subject.name)
            || service_account_name(&subject.name).is_some_and(|(ns, _)| set.namespaces.contains(ns)))
        .then(|| subject.name.clone()),
        "Group" => {
            let name = subject.name.as_str();
            let any_sa =
                !set.namespaces.is_empty() || set.usernames.iter().any(|u| service_account_name(u).is_some());
            let agent = set.groups.contains(name)
                || (name == "system:authenticated" && !set.is_empty())
                || (name == "system:serviceaccounts" && any_sa)
                || name.strip_prefix("system:serviceaccounts:").is_some_and(sa_namespace_has_agent);
            agent.then(|| format!("group {name}"))
        }
        _ => None,
    }
}

/// What the agents of `base` can become, given every namespace and the RBAC objects.
/// `own_namespace` (agentguard's) is withheld with [`WITHHELD`].
pub fn reach<'n>(
    base: &AgentSet,
    namespaces: impl IntoIterator<Item = &'n str>,
    rbac: Rbac<'_>,
    own_namespace: Option<&str>,
) -> Reach {
    let namespaces: Vec<&str> = namespaces.into_iter().collect();
    let withheld = |ns: &str| WITHHELD.contains(&ns) || own_namespace == Some(ns);
    let role_rules = |ns: &str, kind: &str, name: &str| -> Becomes {
        match kind {
            "Role" => rbac
                .roles
                .iter()
                .find(|r| {
                    r.metadata.namespace.as_deref() == Some(ns) && r.metadata.name.as_deref() == Some(name)
                })
                .map_or(Becomes::Nothing, |r| strongest(r.rules.iter().flatten())),
            "ClusterRole" => rbac
                .cluster_roles
                .iter()
                .find(|r| r.metadata.name.as_deref() == Some(name))
                .map_or(Becomes::Nothing, |r| strongest(r.rules.iter().flatten())),
            _ => Becomes::Nothing,
        }
    };
    let mut set = base.clone();
    let mut out = Reach::default();
    // Each pass can only add; it ends when a pass adds nothing.
    loop {
        let mut grew = false;
        let mut reached = |ns: &str, why: &dyn Fn() -> String, set: &mut AgentSet, out: &mut Reach| {
            if set.namespaces.contains(ns) || out.withheld.contains_key(ns) {
                return;
            }
            if withheld(ns) {
                out.withheld.insert(ns.to_owned(), why());
            } else {
                set.namespaces.insert(ns.to_owned());
                out.namespaces.insert(ns.to_owned(), why());
                grew = true;
            }
        };
        for binding in rbac.role_bindings {
            let ns = binding.metadata.namespace.as_deref().unwrap_or_default();
            let Some(agent) = binding.subjects.iter().flatten().find_map(|s| agent_subject(s, ns, &set))
            else {
                continue;
            };
            // Within a namespace, escalating or binding roles there reaches that namespace too.
            if role_rules(ns, &binding.role_ref.kind, &binding.role_ref.name) != Becomes::Nothing {
                let name = binding.metadata.name.as_deref().unwrap_or_default();
                let why = || format!("RoleBinding {ns}/{name} lets {agent} act as its ServiceAccounts");
                reached(ns, &why, &mut set, &mut out);
            }
        }
        for binding in rbac.cluster_role_bindings {
            let Some(agent) = binding.subjects.iter().flatten().find_map(|s| agent_subject(s, "", &set))
            else {
                continue;
            };
            let name = binding.metadata.name.as_deref().unwrap_or_default();
            match role_rules("", &binding.role_ref.kind, &binding.role_ref.name) {
                Becomes::Nothing => {}
                Becomes::Anyone => {
                    out.beyond.entry(agent.clone()).or_insert_with(|| format!("ClusterRoleBinding {name}"));
                }
                Becomes::ServiceAccounts => {
                    let why =
                        || format!("ClusterRoleBinding {name} lets {agent} act as every ServiceAccount");
                    for ns in &namespaces {
                        reached(ns, &why, &mut set, &mut out);
                    }
                }
            }
        }
        if !grew {
            return out;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::rbac::v1::RoleRef;
    use kube::api::ObjectMeta;

    fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
        let v = |l: &[&str]| Some(l.iter().map(|s| s.to_string()).collect());
        PolicyRule {
            api_groups: v(groups),
            resources: v(resources),
            verbs: verbs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn cluster_role(name: &str, rules: Vec<PolicyRule>) -> ClusterRole {
        ClusterRole {
            metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
            rules: Some(rules),
            ..Default::default()
        }
    }

    fn subject(kind: &str, namespace: Option<&str>, name: &str) -> Subject {
        Subject {
            kind: kind.into(),
            name: name.into(),
            namespace: namespace.map(Into::into),
            ..Default::default()
        }
    }

    fn role_binding(ns: &str, name: &str, role: (&str, &str), subjects: Vec<Subject>) -> RoleBinding {
        RoleBinding {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: role.0.into(),
                name: role.1.into(),
            },
            subjects: Some(subjects),
        }
    }

    fn cluster_binding(name: &str, role: &str, subjects: Vec<Subject>) -> ClusterRoleBinding {
        ClusterRoleBinding {
            metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "ClusterRole".into(),
                name: role.into(),
            },
            subjects: Some(subjects),
        }
    }

    fn agents(usernames: &[&str]) -> AgentSet {
        AgentSet { usernames: usernames.iter().map(|s| s.to_string()).collect(), ..Default::default() }
    }

    fn keys(m: &BTreeMap<String, String>) -> Vec<&str> {
        m.keys().map(String::as_str).collect()
    }

    const NAMESPACES: &[&str] = &["agents", "web", "data", "kube-system", "agentguard", "other"];

    #[test]
    fn what_each_right_lets_the_holder_become() {
        use Becomes::*;
        for (r, want) in [
            (rule(&[""], &["serviceaccounts"], &["impersonate"]), ServiceAccounts),
            (rule(&[""], &["serviceaccounts/token"], &["create"]), ServiceAccounts),
            (rule(&[""], &["pods"], &["create"]), ServiceAccounts),
            (rule(&[""], &["pods/exec"], &["create"]), ServiceAccounts),
            (rule(&[""], &["pods/*"], &["create"]), ServiceAccounts),
            (rule(&[""], &["secrets"], &["get"]), ServiceAccounts),
            (rule(&["apps"], &["deployments"], &["patch"]), ServiceAccounts),
            (rule(&["*"], &["*"], &["create"]), ServiceAccounts),
            (rule(&["batch"], &["cronjobs"], &["*"]), ServiceAccounts),
            (rule(&[""], &["users"], &["impersonate"]), Anyone),
            (rule(&["certificates.k8s.io"], &["signers"], &["approve"]), Anyone),
            (rule(&[""], &["nodes/proxy"], &["get"]), ServiceAccounts),
            (rule(&["rbac.authorization.k8s.io"], &["clusterroles"], &["bind"]), Anyone),
            (rule(&["*"], &["*"], &["*"]), Anyone),
            // Reading, deleting and updating in place do not change who one is.
            (
                rule(
                    &[""],
                    &["pods", "configmaps", "services"],
                    &["get", "list", "watch", "delete", "update"],
                ),
                Nothing,
            ),
            (rule(&["apps"], &["deployments"], &["get", "delete"]), Nothing),
            (rule(&[""], &["pods/log"], &["get"]), Nothing),
            (rule(&["apps"], &["serviceaccounts"], &["impersonate"]), Nothing),
        ] {
            assert_eq!(becomes(&r), want, "{r:?}");
        }
    }

    #[test]
    fn an_agent_with_edit_in_a_namespace_reaches_it_and_on_from_there() {
        let edit = cluster_role("edit", vec![rule(&[""], &["serviceaccounts"], &["impersonate"])]);
        let view = cluster_role("view", vec![rule(&[""], &["pods"], &["get", "list"])]);
        let roles = [&edit, &view];
        let bindings = [
            role_binding(
                "web",
                "coder-edit",
                ("ClusterRole", "edit"),
                vec![subject("ServiceAccount", Some("agents"), "coder")],
            ),
            // web's deployer can act in data: reached through web.
            role_binding(
                "data",
                "deployer-edit",
                ("ClusterRole", "edit"),
                vec![subject("ServiceAccount", Some("web"), "deployer")],
            ),
            role_binding(
                "other",
                "coder-view",
                ("ClusterRole", "view"),
                vec![subject("ServiceAccount", Some("agents"), "coder")],
            ),
            role_binding(
                "kube-system",
                "oops",
                ("ClusterRole", "edit"),
                vec![subject("ServiceAccount", Some("agents"), "coder")],
            ),
        ];
        let refs: Vec<&RoleBinding> = bindings.iter().collect();
        let rbac = Rbac { cluster_roles: &roles, role_bindings: &refs, ..Default::default() };
        let base = agents(&["system:serviceaccount:agents:coder"]);
        let r = reach(&base, NAMESPACES.iter().copied(), rbac, Some("agentguard"));
        assert_eq!(keys(&r.namespaces), ["data", "web"]);
        assert!(r.namespaces["web"].contains("RoleBinding web/coder-edit"), "{r:?}");
        assert_eq!(keys(&r.withheld), ["kube-system"]);
        assert!(r.beyond.is_empty());

        // The grant removed, the reach goes with it: web's deployer alone does not keep data.
        let refs: Vec<&RoleBinding> = bindings[1..].iter().collect();
        let rbac = Rbac { cluster_roles: &roles, role_bindings: &refs, ..Default::default() };
        let r = reach(&base, NAMESPACES.iter().copied(), rbac, Some("agentguard"));
        assert!(r.namespaces.is_empty(), "{r:?}");
        // Nor does anything reach from no agent at all.
        let r = reach(
            &AgentSet::default(),
            NAMESPACES.iter().copied(),
            Rbac { cluster_roles: &roles, role_bindings: &refs, ..Default::default() },
            None,
        );
        assert_eq!(r, Reach::default());
    }

    #[test]
    fn subjects_that_include_an_agent() {
        let mut base = agents(&["system:serviceaccount:agents:coder", "oidc:bot"]);
        base.groups.insert("ai".into());
        let yes = [
            subject("ServiceAccount", Some("agents"), "coder"),
            subject("User", None, "system:serviceaccount:agents:coder"),
            subject("User", None, "oidc:bot"),
            subject("Group", None, "ai"),
            subject("Group", None, "system:serviceaccounts"),
            subject("Group", None, "system:serviceaccounts:agents"),
            subject("Group", None, "system:authenticated"),
        ];
        for s in &yes {
            assert!(agent_subject(s, "web", &base).is_some(), "{s:?}");
        }
        let no = [
            subject("ServiceAccount", Some("agents"), "helper"),
            // A RoleBinding's ServiceAccount subject without a namespace is in the binding's.
            subject("ServiceAccount", None, "coder"),
            subject("User", None, "alice"),
            subject("Group", None, "system:serviceaccounts:web"),
            subject("Group", None, "developers"),
        ];
        for s in &no {
            assert!(agent_subject(s, "web", &base).is_none(), "{s:?}");
        }
        assert!(agent_subject(&subject("ServiceAccount", None, "coder"), "agents", &base).is_some());
    }

    #[test]
    fn cluster_wide_grants_reach_everywhere_unless_the_agent_is_beyond_brakes() {
        let edit = cluster_role("edit", vec![rule(&[""], &["pods"], &["create"])]);
        let admin = cluster_role("cluster-admin", vec![rule(&["*"], &["*"], &["*"])]);
        let roles = [&edit, &admin];
        let bindings = [
            cluster_binding(
                "editor-everywhere",
                "edit",
                vec![subject("ServiceAccount", Some("agents"), "editor")],
            ),
            cluster_binding(
                "coder-admin",
                "cluster-admin",
                vec![subject("ServiceAccount", Some("agents"), "coder")],
            ),
        ];
        let editor = agents(&["system:serviceaccount:agents:editor"]);
        let only_editor: Vec<&ClusterRoleBinding> = bindings[..1].iter().collect();
        let rbac = Rbac { cluster_roles: &roles, cluster_role_bindings: &only_editor, ..Default::default() };
        let r = reach(&editor, NAMESPACES.iter().copied(), rbac, Some("agentguard"));
        assert_eq!(keys(&r.namespaces), ["agents", "data", "other", "web"]);
        assert_eq!(keys(&r.withheld), ["agentguard", "kube-system"]);

        let coder = agents(&["system:serviceaccount:agents:coder"]);
        let only_coder: Vec<&ClusterRoleBinding> = bindings[1..].iter().collect();
        let rbac = Rbac { cluster_roles: &roles, cluster_role_bindings: &only_coder, ..Default::default() };
        let r = reach(&coder, NAMESPACES.iter().copied(), rbac, Some("agentguard"));
        assert!(r.namespaces.is_empty(), "{r:?}");
        assert_eq!(r.beyond["system:serviceaccount:agents:coder"], "ClusterRoleBinding coder-admin");
    }
}
