//! The `agentguard.io/v1alpha1` API: `ClusterAgentPolicy` and `AgentPolicy`, the audit
//! trail's `AgentChange` records, and break-glass `AgentSession`s.
//!
//! This is the only place the policy schema lives. Everything that can be checked inside one
//! object is expressed here (enums, bounds, patterns, CEL `x-kubernetes-validations`), so the API
//! server refuses a broken policy at `kubectl apply` time. The CRD YAML is generated from these
//! types (`agentguard crds`) and the committed copy is tested against the generator.
//!
//! Nothing here evaluates a policy: [`crate::engine::policy`] compiles these types into its own index.

use std::collections::BTreeMap;

use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of agentguard's resources.
pub const GROUP: &str = "agentguard.io";
/// Default label marking a ServiceAccount as an AI agent (value `"true"`).
pub const AGENT_LABEL: &str = "agentguard.io/agent";
/// Label marking a Namespace whose every ServiceAccount is an agent (value `"true"`).
pub const AGENT_NAMESPACE_LABEL: &str = "agentguard.io/agent-namespace";
/// Annotation a human sets on the target object to approve an agent's operation.
pub const APPROVE_ANNOTATION: &str = "agentguard.io/approve";

/// Longest approval lifetime any policy may allow.
pub const MAX_APPROVAL_TTL: &str = "168h";

/// A policy that applies cluster-wide, narrowed by its rules' selectors.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agentguard.io",
    version = "v1alpha1",
    kind = "ClusterAgentPolicy",
    plural = "clusteragentpolicies",
    shortname = "cap",
    category = "agentguard",
    status = "PolicyStatus",
    doc = "Guards destructive operations (DELETE, UPDATE) made by AI agents, cluster-wide.",
    printcolumn = r#"{"name": "Action", "type": "string", "jsonPath": ".spec.action"}"#,
    printcolumn = r#"{"name": "Mode", "type": "string", "jsonPath": ".spec.mode"}"#,
    printcolumn = r#"{"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
pub struct ClusterAgentPolicySpec {
    #[serde(flatten)]
    pub policy: PolicySpec,
}

/// A policy that applies only to objects in its own namespace, so a team can guard its
/// namespace without cluster-admin rights.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agentguard.io",
    version = "v1alpha1",
    kind = "AgentPolicy",
    plural = "agentpolicies",
    namespaced,
    shortname = "agp",
    category = "agentguard",
    status = "PolicyStatus",
    doc = "Guards destructive operations (DELETE, UPDATE) made by AI agents in this namespace.",
    validation = Rule::new(
        "self.spec.rules.all(r, (!has(r.namespaces) || size(r.namespaces) == 0) && !has(r.namespaceSelector))"
    ).message("an AgentPolicy applies to its own namespace only: rules may not set namespaces or namespaceSelector"),
    validation = Rule::new(
        "!has(self.spec.subjects) || ((!has(self.spec.subjects.usernames) || size(self.spec.subjects.usernames) == 0) && (!has(self.spec.subjects.groups) || size(self.spec.subjects.groups) == 0))"
    ).message("an AgentPolicy's subjects are ServiceAccounts of its own namespace: use serviceAccountSelector, not usernames or groups"),
    printcolumn = r#"{"name": "Action", "type": "string", "jsonPath": ".spec.action"}"#,
    printcolumn = r#"{"name": "Mode", "type": "string", "jsonPath": ".spec.mode"}"#,
    printcolumn = r#"{"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
pub struct AgentPolicySpec {
    #[serde(flatten)]
    pub policy: PolicySpec,
}

/// The body shared by both policy kinds: who, what, what happens, and approval rules.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "self.action == 'RequireApproval' ? has(self.approval) : !has(self.approval)"
).message("approval must be set when action is RequireApproval, and only then"))]
#[x_kube(validation = Rule::new(
    "self.action != 'RequireApproval' || self.rules.all(r, !('CREATE' in r.operations))"
).message("a CREATE cannot be approved (there is no object yet to annotate): name CREATE with Deny or Allow, or in Warn or Audit mode"))]
pub struct PolicySpec {
    /// Who is an agent for this policy. Omitted: every identity agentguard treats as an agent
    /// (ServiceAccounts labelled `agentguard.io/agent: "true"` or living in an agent namespace,
    /// configured agents, and those any policy names). Set: exactly the identities listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subjects: Option<Subjects>,

    /// What the policy guards. The policy matches a request when any rule matches it.
    #[schemars(length(min = 1, max = 32))]
    pub rules: Vec<MatchRule>,

    /// What happens to a matching request.
    pub action: Action,

    /// Enforce the action, or dry-run it: Warn admits with a warning kubectl prints, Audit admits
    /// silently and only records.
    #[serde(default)]
    pub mode: Mode,

    /// Who may approve and for how long an approval lives. Required with RequireApproval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,

    /// Churn breaker: at most `maxOperations` guarded operations per agent per `window`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub churn_limit: Option<ChurnLimit>,

    /// Extra text shown to the agent when this policy holds or denies its request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub message: Option<String>,
}

/// Identities the policy treats as agents: exactly those listed here (a policy without
/// `subjects` covers every identity agentguard treats as an agent). Kubernetes' reserved users
/// and groups (`system:…`, other than a named ServiceAccount) can never be subjects: naming
/// `system:authenticated` would make every human an agent, whom nobody could then approve for.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!has(self.groups) || self.groups.all(g, !g.startsWith('system:'))"
).message("reserved groups (system:…) cannot be subjects"))]
#[x_kube(validation = Rule::new(
    "!has(self.usernames) || self.usernames.all(u, !u.startsWith('system:') || u.matches('^system:serviceaccount:[a-z0-9]([-a-z0-9.]*[a-z0-9])?:[a-z0-9]([-a-z0-9.]*[a-z0-9])?$'))"
).message("reserved users (system:…) cannot be subjects, except a named ServiceAccount system:serviceaccount:NAMESPACE:NAME"))]
pub struct Subjects {
    /// ServiceAccounts whose labels match (ServiceAccounts in an agent namespace carry
    /// `agentguard.io/agent: "true"` implicitly). In an AgentPolicy: its own namespace's only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_selector: Option<LabelSelector>,
    /// Exact usernames (agents authenticating as users, e.g. through OIDC). ClusterAgentPolicy
    /// only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 256),
        inner(length(min = 1, max = 256), regex(pattern = r"^[^\x00-\x1f\x7f]+$"))
    )]
    pub usernames: Vec<String>,
    /// Any requester in one of these groups. ClusterAgentPolicy only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 256), regex(pattern = r"^[^\x00-\x1f\x7f]+$")))]
    pub groups: Vec<String>,
}

/// One set of requests the policy guards. Every field that is set must match.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MatchRule {
    /// Name shown in denials. Defaults to `rule-<index>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub name: Option<String>,

    /// Guarded operations. UPDATE covers both REPLACE (PUT) and PATCH; CREATE is seen only by
    /// rules that name it. Whatever the verb, a
    /// request is judged by what it does: an eviction, removing the finalizers of an object being
    /// deleted, arming a controller to delete, or a cascade is judged as the DELETE it amounts to.
    #[schemars(length(min = 1, max = 6))]
    pub operations: Vec<Operation>,

    /// Guarded resources.
    #[schemars(length(min = 1, max = 32))]
    pub resources: Vec<ResourceMatch>,

    /// Object name globs (`*` any run of characters, `?` one character). Empty: any name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 253)))]
    pub names: Vec<String>,

    /// Namespace globs. Empty: any namespace, and cluster-scoped objects. ClusterAgentPolicy only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 63)))]
    pub namespaces: Vec<String>,

    /// Labels of the object's namespace (of the Namespace itself when the object is one).
    /// Cluster-scoped objects other than Namespaces are not filtered by it.
    /// ClusterAgentPolicy only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,

    /// Labels of the object (the stored object for DELETE; old or new object for UPDATE, so a
    /// relabelling cannot take an object out of reach).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_selector: Option<LabelSelector>,

    /// A CEL expression the request must also meet, over `object` (null for a DELETE),
    /// `oldObject`, `request` (`operation`, `subresource`, `namespace`, `name`, `resource` with
    /// `group` and `resource`) and `namespaceObject` (`metadata.name` and `metadata.labels`),
    /// e.g. `object.spec.replicas == 0` to guard scaling to zero only. An expression that fails
    /// to evaluate (a missing field: use `has()`) or is not a bool guards the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub condition: Option<String>,
}

/// An operation a rule guards.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "UPPERCASE")]
pub enum Operation {
    /// Deleting an object (including each item of a deletecollection).
    Delete,
    /// Any update: replace (PUT) or patch.
    Update,
    /// An update sent as a full replacement (PUT).
    Replace,
    /// An update sent as a patch (JSON, merge, strategic merge or apply).
    Patch,
    /// Connecting to a pod (`pods/exec`, `pods/attach`, `pods/portforward`): the data plane, where
    /// `rm -rf` in a database pod is a deletion too. Only rules naming those subresources see it.
    Connect,
    /// Creating an object (or a subresource: a token request, a binding). Only rules that name it
    /// see a CREATE as such (an eviction is judged as its DELETE whatever the rule names). A
    /// CREATE leaves nothing to annotate, so it cannot be approved: name it with Deny (the
    /// emergency stop, `agentguard freeze`), Allow, or a Warn or Audit mode.
    Create,
}

/// API groups and resources a rule guards.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResourceMatch {
    /// API groups; `""` is the core group, `"*"` any group.
    #[schemars(length(min = 1, max = 32), inner(length(max = 253)))]
    pub api_groups: Vec<String>,
    /// Resources as Kubernetes webhook rules name them: `deployments`, `deployments/scale`,
    /// `*` (every resource, no subresources), `*/scale`, `*/*` (everything).
    #[schemars(
        length(min = 1, max = 32),
        inner(length(max = 128), regex(pattern = r"^(\*|[a-z0-9][a-z0-9.-]*)(/(\*|[a-z0-9][a-z0-9.-]*))?$"))
    )]
    pub resources: Vec<String>,
}

/// What happens to a matching request. Precedence: Deny > RequireApproval > Allow.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// An explicit exception: admit (only wins when nothing stricter matches).
    Allow,
    /// Hold the request until a listed approver annotates the object.
    RequireApproval,
    /// Refuse the request.
    Deny,
}

/// Whether a policy is enforced or dry-run.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Apply the action.
    #[default]
    Enforce,
    /// Admit, and tell the agent what would have happened (an AdmissionResponse warning).
    Warn,
    /// Admit silently; the decision is only logged and counted.
    Audit,
}

/// Approval rules of a RequireApproval policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("duration(self.ttl) <= duration(self.maxTtl)").message("ttl must not exceed maxTtl"))]
#[x_kube(validation = Rule::new("duration(self.maxTtl) <= duration('168h')").message("maxTtl must not exceed 168h"))]
#[x_kube(validation = Rule::new("duration(self.ttl) >= duration('1m')").message("ttl must be at least 1m"))]
pub struct Approval {
    /// Who may approve: only these identities may set `agentguard.io/approve`.
    pub approvers: Approvers,
    /// How long an approval ticket lives, counted from the denial that issued it (the strictest
    /// covering policy's applies).
    #[serde(default = "default_ttl")]
    #[schemars(regex(pattern = r"^([0-9]{1,6}(h|m|s))+$"), length(max = 32))]
    pub ttl: String,
    /// The longest an approval ticket may live, counted from its issue; shortening it also cuts
    /// outstanding tickets short.
    #[serde(default = "default_max_ttl")]
    #[schemars(regex(pattern = r"^([0-9]{1,6}(h|m|s))+$"), length(max = 32))]
    pub max_ttl: String,
    /// Why approval is needed, shown to the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub reason: Option<String>,
    /// How many distinct approvers must approve (2 is a two-person rule). Each writes an
    /// approval of their own that names them (`kubectl agentguard approve` does); nobody counts
    /// twice and an agent never counts. The most any covering policy asks for applies.
    #[serde(default = "default_min_approvers")]
    #[schemars(range(min = 1, max = 5))]
    pub min_approvers: u32,
}

fn default_min_approvers() -> u32 {
    1
}

fn default_ttl() -> String {
    "1h".into()
}

fn default_max_ttl() -> String {
    "24h".into()
}

/// Identities allowed to approve.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("size(self.users) + size(self.groups) > 0").message("name at least one approver user or group"))]
pub struct Approvers {
    #[serde(default)]
    #[schemars(length(max = 64), inner(length(max = 256)))]
    pub users: Vec<String>,
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub groups: Vec<String>,
}

/// The unusual-churn alarm: a per-agent budget of guarded operations.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ChurnLimit {
    /// Guarded operations one agent may make per window.
    #[schemars(range(min = 1, max = 100000))]
    pub max_operations: u32,
    /// Window length, e.g. `10m`.
    #[schemars(regex(pattern = r"^([0-9]{1,6}(h|m|s))+$"), length(max = 32))]
    pub window: String,
    /// Whose operations share one count.
    #[serde(default)]
    pub scope: ChurnScope,
}

/// Whose operations a churn limit counts together.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub enum ChurnScope {
    /// One count per agent; every ServiceAccount of an agent namespace shares its namespace's
    /// count (a fresh ServiceAccount there must not bring a fresh budget).
    #[default]
    PerAgent,
    /// One count per namespace of the agent's ServiceAccount (per username for other agents).
    PerNamespace,
    /// One count for every agent the policy covers.
    PerPolicy,
}

/// A Kubernetes label selector, with the operator checked by the schema.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One `matchExpressions` entry.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "(self.operator == 'In' || self.operator == 'NotIn') ? size(self.values) > 0 : size(self.values) == 0"
).message("In and NotIn need values; Exists and DoesNotExist take none"))]
pub struct LabelSelectorRequirement {
    #[schemars(length(min = 1, max = 317))]
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(default)]
    #[schemars(length(max = 64), inner(length(max = 63)))]
    pub values: Vec<String>,
}

/// Label selector operators.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One admitted change an agent made to a guarded object, written by agentguard into its own
/// namespace before the change is admitted, with what the object was before it: the audit trail,
/// and what `agentguard restore` brings back. Records are immutable; only status is written after.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agentguard.io",
    version = "v1alpha1",
    kind = "AgentChange",
    plural = "agentchanges",
    namespaced,
    shortname = "agc",
    category = "agentguard",
    status = "AgentChangeStatus",
    doc = "An agent's admitted DELETE or UPDATE of a guarded object, with the object as it was before.",
    printcolumn = r#"{"name": "Operation", "type": "string", "jsonPath": ".spec.operation"}"#,
    printcolumn = r#"{"name": "Kind", "type": "string", "jsonPath": ".spec.target.kind"}"#,
    printcolumn = r#"{"name": "Namespace", "type": "string", "jsonPath": ".spec.target.namespace"}"#,
    printcolumn = r#"{"name": "Name", "type": "string", "jsonPath": ".spec.target.name"}"#,
    printcolumn = r#"{"name": "Requester", "type": "string", "jsonPath": ".spec.requester"}"#,
    printcolumn = r#"{"name": "Outcome", "type": "string", "jsonPath": ".status.outcome"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AgentChangeSpec {
    /// The agent, as the API server authenticated it.
    pub requester: String,
    /// `DELETE` or `UPDATE`.
    pub operation: String,
    pub target: ChangeTarget,
    /// The policy under which it was admitted (`ClusterAgentPolicy "x"`), and how.
    pub policy: String,
    /// `approved` (under an approval) or `allowed` (by an Allow policy).
    pub admission: String,
    /// The approval annotation's value, when admitted under one (the first, where several
    /// approvers had to approve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<String>,
    /// Every approval value that counted, where more than one did (`minApprovers`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<String>,
    /// The break-glass session it was admitted under: `NAME (uid UID), opened by USER: REASON`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The field-level change of an UPDATE, as shown to the approver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<String>,
    /// When agentguard admitted it (RFC 3339).
    pub time: String,
    /// The object before the change, without managedFields (and without Secret data unless
    /// agentguard was told to keep it). Absent when it was over the size limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserved_object")]
    pub prior: Option<serde_json::Value>,
    /// Why `prior` is absent or incomplete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior_omitted: Option<String>,
    /// Where the agent's credential came from, as the API server authenticated it (the token's
    /// `userInfo.extra`). Absent when the request carried none of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attribution: Option<Attribution>,
}

/// What a ServiceAccount token bound to a pod tells about the request's origin: the pod, its
/// node and the token's credential id (`authentication.kubernetes.io/…` in `userInfo.extra`).
/// A token made by `kubectl create token` carries only the credential id.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Attribution {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The token's id (`JTI=…`), which the API server's audit log also records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_id: Option<String>,
}

impl Attribution {
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// `pod=NAME pod-uid=UID node=NODE credential-id=ID`, the fields present only.
impl std::fmt::Display for Attribution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fields = [
            ("pod", &self.pod_name),
            ("pod-uid", &self.pod_uid),
            ("node", &self.node_name),
            ("credential-id", &self.credential_id),
        ];
        let mut first = true;
        for (key, value) in fields {
            if let Some(value) = value {
                write!(f, "{}{key}={value}", if first { "" } else { " " })?;
                first = false;
            }
        }
        Ok(())
    }
}

/// The object a change was made to.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ChangeTarget {
    pub api_version: String,
    pub kind: String,
    /// The resource (plural) in `group`, e.g. `deployments`.
    pub resource: String,
    #[serde(default)]
    pub group: String,
    /// Set when the change went through a subresource (`scale`, `status`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subresource: String,
    #[serde(default)]
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
    /// The object's resourceVersion before the change: an UPDATE that happened moved it.
    #[serde(default)]
    pub resource_version: String,
}

/// A break-glass session: for a while, one agent may make up to `maxOperations` DELETEs or
/// UPDATEs in one scope that RequireApproval policies would otherwise hold object by object.
/// Only an approver opens one (agentguard checks who creates it, and that `openedBy` is them);
/// nobody changes or extends one; deleting it closes it at once.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agentguard.io",
    version = "v1alpha1",
    kind = "AgentSession",
    plural = "agentsessions",
    shortname = "ags",
    category = "agentguard",
    doc = "A time-boxed, scoped, revocable approval of one agent's operations, opened by an approver.",
    printcolumn = r#"{"name": "Agent", "type": "string", "jsonPath": ".spec.agent"}"#,
    printcolumn = r#"{"name": "Operations", "type": "string", "jsonPath": ".spec.operations"}"#,
    printcolumn = r#"{"name": "Max", "type": "integer", "jsonPath": ".spec.maxOperations"}"#,
    printcolumn = r#"{"name": "TTL", "type": "string", "jsonPath": ".spec.ttl"}"#,
    printcolumn = r#"{"name": "Opened-By", "type": "string", "jsonPath": ".spec.openedBy.username"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("a session is never changed or extended: close it (kubectl delete) and open another"))]
#[x_kube(validation = Rule::new("duration(self.ttl) <= duration('168h')").message("ttl must not exceed 168h"))]
#[x_kube(validation = Rule::new("duration(self.ttl) >= duration('1m')").message("ttl must be at least 1m"))]
pub struct AgentSessionSpec {
    /// The one agent it is for, as the API server names it
    /// (`system:serviceaccount:NAMESPACE:NAME`).
    #[schemars(length(min = 1, max = 256))]
    pub agent: String,
    /// The agent's credential it is for: the `authentication.kubernetes.io/credential-id` its
    /// requests carry (a token's `JTI=…`, shown as `credential-id=` in the denial, in `pending`
    /// and in the records). Whoever else can act as the ServiceAccount (impersonation, a pod, a
    /// token of their own) shares its name but never this token, so cannot use the session.
    #[schemars(length(min = 1, max = 256))]
    pub credential_id: String,
    /// The namespaces whose objects it covers (no wildcard).
    #[schemars(
        length(min = 1, max = 16),
        inner(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))
    )]
    pub namespaces: Vec<String>,
    /// The resources it covers, as kubectl names them: `configmaps`, `deployments.apps`, or a
    /// subresource such as `deployments.apps/scale` (no wildcard).
    #[schemars(
        length(min = 1, max = 16),
        inner(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9][a-z0-9.-]*(/[a-z]+)?$"))
    )]
    pub resources: Vec<String>,
    /// The operations it covers.
    #[schemars(length(min = 1, max = 2))]
    pub operations: Vec<SessionOperation>,
    /// At most this many operations are admitted under it (every replica counts in one place).
    #[schemars(range(min = 1, max = 1000))]
    pub max_operations: u32,
    /// How long it is open, from its creation; every policy it stands in for caps it with its
    /// `maxTtl` too.
    #[schemars(regex(pattern = r"^([0-9]{1,6}(h|m|s))+$"), length(max = 32))]
    pub ttl: String,
    /// Why, in the records and Events of every use.
    #[schemars(length(min = 1, max = 512))]
    pub reason: String,
    /// Who opened it: must be who creates it (agentguard refuses anything else).
    pub opened_by: SessionOpener,
}

/// An operation a session may cover.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SessionOperation {
    #[serde(rename = "DELETE")]
    Delete,
    #[serde(rename = "UPDATE")]
    Update,
}

/// Who opened a session, as the API server authenticated them when they created it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SessionOpener {
    #[schemars(length(min = 1, max = 256))]
    pub username: String,
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub groups: Vec<String>,
}

/// Whether a recorded change took effect: a later admission step can still refuse it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentChangeStatus {
    /// Empty until checked, then `Happened`, `NeverHappened` or `Unverified` (agentguard may not
    /// read the kind).
    #[serde(default)]
    pub outcome: String,
    /// Who set the approval, as agentguard saw it when it was written (its ApprovalRecorded
    /// Event on the object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approver: Option<String>,
    /// Every approver, in the order of `spec.approvals`, where several had to approve.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

fn preserved_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

/// Observed state of a policy.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A status condition (`Ready`).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    pub last_transition_time: String,
}

/// Parses the duration grammar the schema admits (`1h30m`, `90s`): digits followed by `h`, `m`
/// or `s`, repeated. Returns `None` for anything else.
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in text.chars() {
        match c {
            '0'..='9' => digits.push(c),
            'h' | 'm' | 's' if !digits.is_empty() => {
                let n: u64 = digits.parse().ok()?;
                let unit = match c {
                    'h' => 3600,
                    'm' => 60,
                    _ => 1,
                };
                total = total.checked_add(n.checked_mul(unit)?)?;
                digits.clear();
            }
            _ => return None,
        }
    }
    (digits.is_empty() && !text.is_empty()).then(|| std::time::Duration::from_secs(total))
}

/// The generated CRDs as one multi-document YAML stream (what `agentguard crds` prints).
pub fn crds_yaml() -> String {
    let docs = [ClusterAgentPolicy::crd(), AgentPolicy::crd(), AgentChange::crd(), AgentSession::crd()];
    docs.iter()
        .map(|crd| {
            // Serialising a CRD built from our own types cannot fail.
            serde_yaml::to_string(crd).expect("CRD serialises to YAML")
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Where the chart reads the CRDs from (relative to the repository root).
pub const CRDS_PATH: &str = "charts/agentguard/crds/crds.yaml";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        for bad in ["", "h", "1", "1d", "1.5h", "-1h", "1h 2m"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn committed_crds_match_the_generator() {
        let committed = include_str!("../../charts/agentguard/crds/crds.yaml");
        assert!(
            committed == crds_yaml(),
            "{CRDS_PATH} drifted from the Rust types: run `cargo run -- crds > {CRDS_PATH}`"
        );
    }

    /// The CEL rules of the committed CRDs, evaluated client-side as the API server would.
    mod cel {
        use kube::core::cel::{ErrorKind, Validator};
        use serde_json::{Value, json};

        fn schema(kind: &str) -> Value {
            use serde::Deserialize as _;
            let text = include_str!("../../charts/agentguard/crds/crds.yaml");
            serde_yaml::Deserializer::from_str(text)
                .map(|d| Value::deserialize(d).unwrap())
                .find(|crd| crd["spec"]["names"]["kind"] == kind)
                .map(|crd| crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone())
                .unwrap()
        }

        fn check(kind: &str, spec: Value) -> Result<(), String> {
            let object = json!({"apiVersion": "agentguard.io/v1alpha1", "kind": kind,
                                "metadata": {"name": "p", "namespace": "team"}, "spec": spec});
            Validator::new().validate(&schema(kind), &object, None).map_err(|errors| {
                // A rule the evaluator cannot run is a defect of ours, not a refusal.
                for e in errors.iter() {
                    assert_eq!(e.kind, ErrorKind::ValidationFailure, "{e:?}");
                }
                errors.iter().map(|e| e.message.clone()).collect::<Vec<_>>().join("; ")
            })
        }

        fn rule() -> Value {
            json!({"operations": ["DELETE"], "resources": [{"apiGroups": ["apps"], "resources": ["deployments"]}]})
        }

        fn hold(approval: Value) -> Value {
            json!({"action": "RequireApproval", "approval": approval, "rules": [rule()]})
        }

        #[test]
        fn valid_policies_pass() {
            for kind in ["ClusterAgentPolicy", "AgentPolicy"] {
                assert_eq!(check(kind, json!({"action": "Deny", "rules": [rule()]})), Ok(()));
                assert_eq!(
                    check(kind, hold(json!({"approvers": {"groups": ["sre"]}}))),
                    Ok(()),
                    "defaults apply"
                );
                let ok = hold(json!({"approvers": {"users": ["alice"]}, "ttl": "30m", "maxTtl": "168h"}));
                assert_eq!(check(kind, ok), Ok(()));
            }
            let selectors = json!({"action": "Deny", "rules": [{
                "operations": ["UPDATE"], "resources": [{"apiGroups": ["*"], "resources": ["*/scale", "pods", "*"]}],
                "namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]},
                "objectSelector": {"matchExpressions": [{"key": "keep", "operator": "Exists"}]}}]});
            assert_eq!(check("ClusterAgentPolicy", selectors), Ok(()));
            // CREATE with Deny: the freeze.
            let freeze = json!({"action": "Deny", "rules": [{"operations": ["CREATE", "DELETE", "UPDATE", "CONNECT"],
                "resources": [{"apiGroups": ["*"], "resources": ["*", "*/*"]}]}]});
            assert_eq!(check("ClusterAgentPolicy", freeze), Ok(()));
        }

        #[test]
        fn invalid_policies_are_refused_with_a_clear_message() {
            let cases = [
                (
                    json!({"action": "RequireApproval", "rules": [rule()]}),
                    "approval must be set when action is RequireApproval",
                ),
                (
                    json!({"action": "Deny", "approval": {"approvers": {"users": ["a"]}}, "rules": [rule()]}),
                    "and only then",
                ),
                (hold(json!({"approvers": {"users": [], "groups": []}})), "at least one approver"),
                (
                    hold(json!({"approvers": {"users": ["a"]}, "ttl": "2h", "maxTtl": "1h"})),
                    "ttl must not exceed maxTtl",
                ),
                (
                    hold(json!({"approvers": {"users": ["a"]}, "ttl": "1h", "maxTtl": "200h"})),
                    "maxTtl must not exceed 168h",
                ),
                (hold(json!({"approvers": {"users": ["a"]}, "ttl": "30s"})), "ttl must be at least 1m"),
                (
                    json!({"action": "RequireApproval", "approval": {"approvers": {"users": ["a"]}},
                    "rules": [rule(), {"operations": ["CREATE", "DELETE"],
                    "resources": [{"apiGroups": ["*"], "resources": ["*"]}]}]}),
                    "a CREATE cannot be approved",
                ),
                (
                    json!({"action": "Deny", "rules": [{"operations": ["DELETE"],
                    "resources": [{"apiGroups": ["apps"], "resources": ["deployments"]}],
                    "objectSelector": {"matchExpressions": [{"key": "a", "operator": "In", "values": []}]}}]}),
                    "In and NotIn need values",
                ),
            ];
            for (spec, message) in cases {
                let got = check("ClusterAgentPolicy", spec.clone());
                assert!(got.as_ref().is_err_and(|m| m.contains(message)), "{spec}: {got:?}");
            }
            let namespaced = json!({"action": "Deny", "rules": [{"operations": ["DELETE"],
                "resources": [{"apiGroups": ["apps"], "resources": ["deployments"]}], "namespaces": ["other"]}]});
            let got = check("AgentPolicy", namespaced.clone());
            assert!(got.as_ref().is_err_and(|m| m.contains("applies to its own namespace only")), "{got:?}");
            assert_eq!(check("ClusterAgentPolicy", namespaced), Ok(()));
        }

        #[test]
        fn reserved_and_foreign_subjects_are_refused() {
            let with = |subjects: Value| json!({"action": "Deny", "subjects": subjects, "rules": [rule()]});
            for (subjects, message) in [
                (json!({"groups": ["system:authenticated"]}), "reserved groups"),
                (json!({"groups": ["system:masters"]}), "reserved groups"),
                (json!({"usernames": ["system:anonymous"]}), "reserved users"),
                (json!({"usernames": ["system:kube-controller-manager"]}), "reserved users"),
                (json!({"usernames": ["system:serviceaccount:ns"]}), "reserved users"),
            ] {
                let got = check("ClusterAgentPolicy", with(subjects.clone()));
                assert!(got.as_ref().is_err_and(|m| m.contains(message)), "{subjects}: {got:?}");
            }
            let fine =
                json!({"usernames": ["oidc:claude", "system:serviceaccount:agents:coder"], "groups": ["ai"]});
            assert_eq!(check("ClusterAgentPolicy", with(fine.clone())), Ok(()));
            // An AgentPolicy is a tenant's object: its subjects are its own ServiceAccounts only.
            let got = check("AgentPolicy", with(fine));
            assert!(
                got.as_ref().is_err_and(|m| m.contains("ServiceAccounts of its own namespace")),
                "{got:?}"
            );
            let own = json!({"serviceAccountSelector": {"matchLabels": {"role": "bot"}}});
            assert_eq!(check("AgentPolicy", with(own)), Ok(()));
        }
    }
}
