//! The scenarios, one fresh namespace each. Every check asserts what the API server answered.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

pub(crate) use crate::world::approve_command;
use crate::world::{World, accepts, must, rejects};

type Scenario = fn(&World) -> Result<()>;

pub const ALL: &[(&str, Scenario)] = &[
    ("agent_delete_is_held_until_an_approver_annotates", delete_held_then_approved),
    ("approval_expires_and_nothing_written_later_revives_it", crate::tickets::expired_stays_expired),
    ("a_planted_or_copied_approval_approves_nothing", crate::tickets::planted_or_copied),
    ("a_delete_approval_goes_stale_when_the_object_changes", crate::tickets::stale_delete),
    ("an_update_ticket_covers_exactly_one_change", crate::tickets::update_covers_one_change),
    ("forged_admission_reviews_leave_no_record_and_no_approval_event", crate::tickets::forged_reviews),
    ("only_approvers_may_approve", only_approvers_approve),
    ("replace_apply_patch_and_scale_are_held_with_a_diff", updates_held_with_diff),
    ("server_dry_run_gets_the_same_answer_and_consumes_nothing", dry_run),
    ("delete_all_and_deletecollection_refuse_every_guarded_item", delete_collection),
    ("agent_cannot_delete_a_guarded_namespace", namespace_delete),
    ("agent_cannot_loosen_its_own_brakes", self_protection),
    ("warn_mode_admits_with_a_kubectl_warning", warn_mode),
    ("humans_and_unlabelled_service_accounts_never_reach_the_webhook", not_called),
    ("controllers_reconcile_an_object_that_carries_an_approval", controllers_reconcile_approved_objects),
    ("a_newly_marked_agent_is_guarded_from_the_moment_the_mark_is_stored", labelled_later),
    ("invalid_policy_is_rejected_at_apply_time", invalid_policy),
    ("kubectl_get_shows_policies_ready", policies_ready),
    ("churn_breaker_trips_and_a_human_resets_it", crate::churn::trips_and_resets),
    ("churn_breaker_counts_exactly_across_three_replicas", crate::churn::three_replicas_share_the_count),
    ("pending_lists_held_requests_until_approved", crate::pending::lists_held_requests_until_approved),
    ("plugin_why_names_the_rule_and_approve_admits_the_retry", crate::plugin::approve_and_why),
    ("plugin_freeze_stops_one_agent_and_unfreeze_lifts_it", crate::plugin::freeze_and_unfreeze),
    ("plugin_freeze_stops_an_agents_creates", crate::plugin::freeze_stops_creates),
    ("audit_reports_each_agents_dangerous_rights", crate::audit::reports_granted_rights),
    ("audit_trail_records_and_restore_undoes_changes", crate::trail::records_and_restores),
    (
        "a_recorded_change_refused_later_is_marked_never_happened",
        crate::trail::a_change_refused_later_is_marked,
    ),
    ("route_status_writes_cannot_unmark_or_escape_selectors", crate::routes::subresources_carry_metadata),
    (
        "route_agentguard_namespace_kube_system_and_custom_events_are_guarded",
        crate::routes::no_unguarded_corners,
    ),
    ("route_webhook_configuration_tampering_is_restored", crate::routes::tampering_is_restored),
    ("route_eviction_is_judged_as_the_pods_delete", crate::routes::eviction_is_a_delete),
    (
        "route_tokens_for_identities_without_brakes_are_refused",
        crate::routes::tokens_for_identities_without_brakes_are_refused,
    ),
    ("route_blast_radius_is_shown_and_bound_to_the_approval", crate::routes::blast_radius_is_shown_and_bound),
    ("approvals_two_person_rule_needs_two_distinct_approvers", crate::approvals::two_distinct_approvers),
    (
        "approvals_a_session_admits_exactly_its_scope_until_closed",
        crate::approvals::sessions_admit_exactly_their_scope,
    ),
    (
        "approvals_a_claims_delete_shows_and_is_judged_as_its_volumes_data",
        crate::approvals::a_claims_delete_takes_its_volumes_data,
    ),
    (
        "attack_claims_lost_sideways_are_judged_as_their_volumes",
        crate::attack::claims_lost_sideways_are_judged_as_their_volumes,
    ),
    ("attack_session_uses_cannot_exceed_their_count", crate::attack::session_uses_cannot_exceed_their_count),
    (
        "attack_a_session_is_not_borrowed_by_another_agent",
        crate::attack::a_session_is_not_borrowed_by_another_agent,
    ),
    (
        "attack_pods_and_namespaces_take_their_volumes_data",
        crate::attack::pods_and_namespaces_take_their_volumes_data,
    ),
    ("attack_one_approver_never_counts_twice", crate::attack::one_approver_never_counts_twice),
    (
        "route_rule_conditions_guard_exactly_what_they_say",
        crate::routes::conditions_guard_exactly_what_they_say,
    ),
    (
        "route_updates_that_hand_destruction_to_a_controller_are_judged",
        crate::routes::controllers_handed_destruction_are_judged,
    ),
    (
        "route_acting_as_another_service_account_is_still_an_agent",
        crate::routes::acting_as_another_service_account_is_still_an_agent,
    ),
    ("route_removing_finalizers_is_judged_as_the_delete", crate::routes::finalizers_complete_a_delete),
    (
        "route_owner_delete_cascading_to_guarded_dependents_is_refused",
        crate::routes::owner_cascades_are_judged,
    ),
    (
        "route_namespace_and_crd_deletes_reaching_guarded_objects_are_refused",
        crate::routes::namespace_and_crd_cascades_are_judged,
    ),
    (
        "route_arming_a_controller_to_delete_is_judged_as_the_delete",
        crate::routes::arming_a_deletion_is_judged,
    ),
    ("route_connect_to_exec_attach_and_portforward_can_be_guarded", crate::routes::connect_can_be_guarded),
    ("route_policy_subjects_are_confined", crate::routes::policy_subjects_are_confined),
    ("route_churn_is_counted_per_agent_namespace", crate::routes::churn_counts_per_agent_namespace),
    ("route_subjects_mean_one_thing", crate::routes::subjects_mean_one_thing),
    ("route_odd_usernames_are_refused_or_render", crate::routes::odd_usernames_render),
    ("route_a_denial_names_each_covering_policy_once", crate::routes::denial_names_each_policy_once),
    ("route_audit_reports_status_and_finalize_rights", crate::routes::audit_reports_status_rights),
    ("cloud_examples_fit_their_crds_and_deletes_are_held", crate::cloud::examples),
    ("cloud_ack_annotation_leaving_retain_arms_a_delete", crate::cloud::ack),
    ("cloud_cnrm_annotation_leaving_abandon_arms_a_delete", crate::cloud::cnrm),
    ("cloud_crossplane_policies_that_stop_orphaning_arm_a_delete", crate::cloud::crossplane),
    ("no_unguarded_corners_and_the_webhook_configuration_is_restored", crate::tamper::scenario),
    (
        "fault_view_older_than_max_staleness_refuses_agents_until_the_api_server_answers",
        crate::faults::view_stale,
    ),
    ("fault_hung_agentguard_makes_agents_wait_the_timeout_and_nobody_else", crate::faults::hung),
    (
        "fault_apiserver_and_etcd_restarted_under_traffic_nothing_held_admitted",
        crate::faults::control_plane_restarts,
    ),
    (
        "fault_rolling_restart_of_three_replicas_under_load_admits_nothing_guarded_and_fails_no_human",
        crate::faults::rolling_restart,
    ),
    // Last: it leaves 1,000 agents behind.
    ("a_thousand_agents_in_a_hundred_namespaces_fit_the_webhook", thousand_agents),
    ("a_thousand_agents_labelled_at_once_share_few_configuration_writes", concurrent_registrations),
];

/// A fresh namespace `e2e-NAME`, where the `editor` agent has the real `edit` ClusterRole.
pub fn namespace(w: &World, name: &str) -> Result<String> {
    let ns = format!("e2e-{name}");
    must(w.plane.kubectl(&w.plane.admin, &["create", "namespace", &ns]))?;
    w.grant_edit(&ns)?;
    Ok(ns)
}

pub(crate) fn deployment(w: &World, ns: &str, name: &str) -> Result<()> {
    let manifest = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}}}\n\
         spec:\n  replicas: 1\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    \
         spec: {{containers: [{{name: web, image: 'nginx:1.27'}}]}}\n"
    );
    must(w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-f", "-"], Some(&manifest)))?;
    settled(w, ns, name)
}

/// Waits until the deployment controller has seen Deployment `name` as it is now (it writes the
/// `deployment.kubernetes.io/revision` annotation and the status), so that the object a scenario
/// acts on is the one a human would review, not one a controller is about to write.
pub(crate) fn settled(w: &World, ns: &str, name: &str) -> Result<()> {
    let started = Instant::now();
    loop {
        let d = get_json(w, ns, "deployment", name)?;
        let revision = &d["metadata"]["annotations"]["deployment.kubernetes.io/revision"];
        if revision.is_string() && d["status"]["observedGeneration"] == d["metadata"]["generation"] {
            return Ok(());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the deployment controller never saw {ns}/{name} as it is ({} writes by kube-system controllers \
             refused by agentguard)",
            controller_refusals(w)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `kubectl get events.events.k8s.io` in `ns`, one line per Event rendered by `fields`
/// (a jsonpath fragment such as `{.reason}`).
pub(crate) fn events(w: &World, ns: &str, fields: &str) -> Result<String> {
    let jsonpath = format!("jsonpath={{range .items[*]}}{fields}{{\"\\n\"}}{{end}}");
    must(w.plane.kubectl(&w.plane.admin, &["get", "events.events.k8s.io", "-n", ns, "-o", &jsonpath]))
}

pub(crate) fn exists(w: &World, ns: &str, kind: &str, name: &str) -> bool {
    w.plane.kubectl(&w.plane.admin, &["get", kind, name, "-n", ns]).status.success()
}

pub(crate) fn get_json(w: &World, ns: &str, kind: &str, name: &str) -> Result<Value> {
    let out = must(w.plane.kubectl(&w.plane.admin, &["get", kind, name, "-n", ns, "-o", "json"]))?;
    Ok(serde_json::from_str(&out)?)
}

pub(crate) fn run_as(w: &World, who: &std::path::Path, args: &[String]) -> std::process::Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    w.plane.kubectl(who, &args)
}

fn delete_held_then_approved(w: &World) -> Result<()> {
    let ns = namespace(w, "approve")?;
    deployment(w, &ns, "web")?;
    let denial = rejects(
        w.plane.kubectl(&w.editor, &["delete", "deployment", "web", "-n", &ns]),
        "the agent's delete",
        &format!("kubectl annotate deployments.apps web -n {ns} agentguard.io/approve=delete."),
    )?;
    ensure!(denial.contains("ClusterAgentPolicy \"e2e-workloads\", rule \"workloads\""), "{denial}");
    ensure!(denial.contains("system:serviceaccount:agents:editor"), "{denial}");
    ensure!(
        denial.contains("Approvers: [ClusterAgentPolicy \"e2e-workloads\": users alice; groups sre]"),
        "{denial}"
    );
    ensure!(exists(w, &ns, "deployment", "web"), "the held deployment is gone");
    accepts(run_as(w, &w.alice, &approve_command(&denial)?), "alice's approval")?;
    // The story is left as Events on the object: held, then the approval once it is stored…
    wait_for_events(w, &ns, &["ApprovalRequired/Deployment/web", "ApprovalRecorded/Deployment/web"])?;
    accepts(w.plane.kubectl(&w.editor, &["delete", "deployment", "web", "-n", &ns]), "the approved delete")?;
    ensure!(!exists(w, &ns, "deployment", "web"), "the approved delete did not delete");
    // …and the approved delete.
    wait_for_events(w, &ns, &["Approved/Deployment/web"])?;
    Ok(())
}

/// Waits up to 15 seconds for Events `reason/kind/name` in `ns`.
pub(crate) fn wait_for_events(w: &World, ns: &str, want: &[&str]) -> Result<()> {
    let started = Instant::now();
    loop {
        let seen = events(w, ns, "{.reason}/{.regarding.kind}/{.regarding.name}")?;
        if want.iter().all(|w| seen.lines().any(|l| l == *w)) {
            return Ok(());
        }
        ensure!(started.elapsed() < Duration::from_secs(15), "Events missing ({want:?}): {seen}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn only_approvers_approve(w: &World) -> Result<()> {
    let ns = namespace(w, "approvers")?;
    deployment(w, &ns, "web")?;
    let denial = rejects(
        w.plane.kubectl(&w.editor, &["delete", "deployment", "web", "-n", &ns]),
        "the delete",
        "requires approval",
    )?;
    let approve = approve_command(&denial)?;
    let annotate: Vec<&str> = approve.iter().map(String::as_str).collect();
    rejects(
        w.plane.kubectl(&w.editor, &annotate),
        "the agent approving itself with its own ticket",
        "built-in rule \"approval-annotation\"",
    )?;
    rejects(w.plane.kubectl(&w.mallory, &annotate), "mallory's approval", "mallory is not an approver")?;
    // A value without a ticket approves nothing, whoever writes it: the writer is told so, and
    // the agent's delete stays held.
    let inert = accepts(
        w.plane
            .kubectl(&w.alice, &["annotate", "deployment", "web", "-n", &ns, "agentguard.io/approve=delete"]),
        "a value without a ticket (inert)",
    )?;
    ensure!(inert.contains("approves nothing"), "alice was not warned: {inert}");
    rejects(
        w.plane.kubectl(&w.editor, &["delete", "deployment", "web", "-n", &ns]),
        "the delete under a value without a ticket",
        "malformed",
    )?;
    ensure!(exists(w, &ns, "deployment", "web"), "the held deployment is gone");
    Ok(())
}

fn updates_held_with_diff(w: &World) -> Result<()> {
    let ns = namespace(w, "updates")?;
    deployment(w, &ns, "web")?;

    let mut replaced = get_json(w, &ns, "deployment", "web")?;
    replaced["spec"]["template"]["spec"]["containers"][0]["image"] = "nginx:1.28".into();
    let denial = rejects(
        w.plane.kubectl_stdin(&w.editor, &["replace", "-f", "-"], Some(&replaced.to_string())),
        "kubectl replace",
        "spec.template.spec.containers[0].image: nginx:1.27 → nginx:1.28",
    )?;
    ensure!(denial.contains("UPDATE of deployments.apps \"web\""), "{denial}");

    let applied = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: {ns}, labels: {{app: web}}}}\n\
         spec:\n  replicas: 5\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    \
         spec: {{containers: [{{name: web, image: 'nginx:1.27'}}]}}\n"
    );
    rejects(
        w.plane.kubectl_stdin(&w.editor, &["apply", "-f", "-"], Some(&applied)),
        "kubectl apply",
        "spec.replicas: 1 → 5",
    )?;

    let pause = ["patch", "deployment", "web", "-n", &ns, "-p", r#"{"spec":{"paused":true}}"#];
    let denial =
        rejects(w.plane.kubectl(&w.editor, &pause), "kubectl patch", "spec.paused: (absent) → true")?;

    rejects(
        w.plane.kubectl(&w.editor, &["scale", "deployment", "web", "-n", &ns, "--replicas=0"]),
        "kubectl scale --replicas=0",
        "spec.replicas: 1 → 0",
    )?;

    // Approving the shown change admits exactly that change, and nothing after it.
    accepts(run_as(w, &w.alice, &approve_command(&denial)?), "alice's approval of the pause")?;
    accepts(w.plane.kubectl(&w.editor, &pause), "the approved patch")?;
    ensure!(
        get_json(w, &ns, "deployment", "web")?["spec"]["paused"] == true,
        "the approved patch was not applied"
    );
    rejects(
        w.plane.kubectl(
            &w.editor,
            &["patch", "deployment", "web", "-n", &ns, "-p", r#"{"spec":{"paused":false}}"#],
        ),
        "a second, different patch",
        "the approval is for a different change than this one",
    )?;
    Ok(())
}

fn denial_text(stderr: &str) -> &str {
    stderr.split_once("denied the request: ").map(|(_, m)| m.trim()).unwrap_or(stderr)
}

fn dry_run(w: &World) -> Result<()> {
    let ns = namespace(w, "dryrun")?;
    deployment(w, &ns, "web")?;
    let delete = ["delete", "deployment", "web", "-n", &ns];
    let dry = ["delete", "deployment", "web", "-n", &ns, "--dry-run=server"];
    let real_answer = rejects(w.plane.kubectl(&w.editor, &delete), "the delete", "requires approval")?;
    let dry_answer = rejects(w.plane.kubectl(&w.editor, &dry), "the dry-run delete", "requires approval")?;
    // The same answer, down to the ticket (issued a moment later, for the same state).
    let same = |answer: &str| -> Result<String> {
        let text = denial_text(answer);
        let ticket = crate::tickets::ticket_in(text)?;
        Ok(text.replace(&ticket, "TICKET").split(" — then retry").next().unwrap_or_default().to_owned())
    };
    ensure!(
        same(&real_answer)? == same(&dry_answer)?,
        "dry run answered differently:\n{real_answer}\n{dry_answer}"
    );

    // Approved ahead of the real attempt, with the ticket the agent's dry run printed.
    accepts(run_as(w, &w.alice, &approve_command(&dry_answer)?), "alice's approval")?;
    let value = crate::tickets::ticket_in(denial_text(&dry_answer))?;
    std::thread::sleep(Duration::from_millis(500));
    let count = |reason: &str| -> Result<usize> {
        let out = events(w, &ns, "{.reason}")?;
        Ok(out.lines().filter(|l| *l == reason).count())
    };
    let approved_before = count("Approved")?;
    accepts(w.plane.kubectl(&w.editor, &dry), "the approved dry-run delete")?;
    std::thread::sleep(Duration::from_millis(500));
    ensure!(count("Approved")? == approved_before, "the dry run left an Event");
    let after = get_json(w, &ns, "deployment", "web")?;
    ensure!(
        after["metadata"]["annotations"]["agentguard.io/approve"] == value.as_str(),
        "the dry run consumed the approval"
    );
    accepts(w.plane.kubectl(&w.editor, &delete), "the real delete after the dry run")?;
    Ok(())
}

fn delete_collection(w: &World) -> Result<()> {
    let ns = namespace(w, "collection")?;
    for name in ["a", "b", "c"] {
        deployment(w, &ns, name)?;
    }
    let all = w.plane.kubectl(&w.editor, &["delete", "deployments", "--all", "-n", &ns]);
    ensure!(!all.status.success(), "delete --all was admitted");
    let raw = w
        .plane
        .kubectl(&w.editor, &["delete", "--raw", &format!("/apis/apps/v1/namespaces/{ns}/deployments")]);
    ensure!(!raw.status.success(), "deletecollection was admitted: {}", String::from_utf8_lossy(&raw.stdout));
    let raw_error = String::from_utf8_lossy(&raw.stderr);
    ensure!(
        raw_error.contains("agentguard: DELETE of deployments.apps \"a\""),
        "deletecollection was refused, but not for the named item: {raw_error}"
    );
    for name in ["a", "b", "c"] {
        ensure!(exists(w, &ns, "deployment", name), "deployment {name} was deleted");
    }
    Ok(())
}

fn namespace_delete(w: &World) -> Result<()> {
    let ns = namespace(w, "namespace")?;
    let denial = rejects(
        w.plane.kubectl(&w.agent, &["delete", "namespace", &ns]),
        "deleting a namespace",
        "ClusterAgentPolicy \"e2e-namespaces\"",
    )?;
    ensure!(
        denial.contains(&format!("kubectl annotate namespaces {ns} agentguard.io/approve=delete.")),
        "{denial}"
    );
    let phase =
        must(w.plane.kubectl(&w.plane.admin, &["get", "namespace", &ns, "-o", "jsonpath={.status.phase}"]))?;
    ensure!(phase.trim() == "Active", "namespace phase is {phase}");
    Ok(())
}

fn self_protection(w: &World) -> Result<()> {
    rejects(
        w.plane
            .kubectl(&w.agent, &["label", "serviceaccount", "coder", "-n", "agents", "agentguard.io/agent-"]),
        "the agent removing its own label",
        "built-in rule \"agent-label\"",
    )?;
    rejects(
        w.plane.kubectl(&w.agent, &["delete", "clusteragentpolicy", "e2e-workloads"]),
        "the agent deleting a policy",
        "built-in rule \"agentguard-policies\"",
    )?;
    rejects(
        w.plane.kubectl(&w.agent, &["delete", "crd", "agentpolicies.agentguard.io"]),
        "the agent deleting a CRD",
        "built-in rule \"agentguard-crds\"",
    )?;
    let label = must(w.plane.kubectl(
        &w.plane.admin,
        &["get", "sa", "coder", "-n", "agents", "-o", "jsonpath={.metadata.labels}"],
    ))?;
    ensure!(label.contains("agentguard.io/agent"), "the label is gone: {label}");
    Ok(())
}

fn warn_mode(w: &World) -> Result<()> {
    let ns = namespace(w, "warn")?;
    must(w.plane.kubectl(
        &w.plane.admin,
        &["create", "configmap", "settings", "-n", &ns, "--from-literal=level=info"],
    ))?;
    let out = accepts(
        w.plane.kubectl(
            &w.editor,
            &["patch", "configmap", "settings", "-n", &ns, "-p", r#"{"data":{"level":"debug"}}"#],
        ),
        "a change under a Warn-mode policy",
    )?;
    ensure!(
        out.contains(
            "Warning: agentguard [Warn mode, not enforced]: ClusterAgentPolicy \"e2e-config-trial\""
        ),
        "{out}"
    );
    Ok(())
}

/// How many writes by the controller-manager's controllers agentguard has refused so far (its
/// log): there should be none.
pub(crate) fn controller_refusals(w: &World) -> usize {
    let log = std::fs::read_to_string(w.plane.dir.path().join("agentguard.log")).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains("\"refused\"") && l.contains("system:serviceaccount:kube-system:"))
        .count()
}

/// The controllers reconcile an object that carries an approval: the deployment controller
/// copies a Deployment's annotations, the approval among them, onto its ReplicaSet, and no
/// controller's write may be refused. An approved scale reaches the ReplicaSet.
fn controllers_reconcile_approved_objects(w: &World) -> Result<()> {
    let ns = namespace(w, "reconcile")?;
    deployment(w, &ns, "web")?;
    let scale = ["patch", "deployment", "web", "-n", &ns, "-p", r#"{"spec":{"replicas":3}}"#];
    let denial = rejects(w.plane.kubectl(&w.editor, &scale), "scaling to 3", "requires approval")?;
    accepts(run_as(w, &w.alice, &approve_command(&denial)?), "alice's approval")?;
    accepts(w.plane.kubectl(&w.editor, &scale), "the approved scale")?;
    let started = Instant::now();
    loop {
        let replicas = must(w.plane.kubectl(
            &w.plane.admin,
            &["get", "replicasets", "-n", &ns, "-l", "app=web", "-o", "jsonpath={.items[*].spec.replicas}"],
        ))?;
        if replicas.trim() == "3" {
            return Ok(());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the ReplicaSet has {replicas:?} replicas 30 s after the approved scale to 3; agentguard refused {} \
             writes by kube-system controllers",
            controller_refusals(w)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn not_called(w: &World) -> Result<()> {
    let ns = namespace(w, "notcalled")?;
    for name in ["by-alice", "by-helper"] {
        deployment(w, &ns, name)?;
    }
    must(w.plane.kubectl(&w.plane.admin, &["create", "configmap", "c", "-n", &ns]))?;
    let before = w.agentguard.decisions()?;
    accepts(w.plane.kubectl(&w.alice, &["delete", "deployment", "by-alice", "-n", &ns]), "alice's delete")?;
    accepts(
        w.plane.kubectl(&w.helper, &["delete", "deployment", "by-helper", "-n", &ns]),
        "the helper's delete",
    )?;
    accepts(
        w.plane.kubectl(&w.helper, &["label", "configmap", "c", "-n", &ns, "x=y"]),
        "the helper's update",
    )?;
    let after = w.agentguard.decisions()?;
    ensure!(after == before, "agentguard was called {} times for humans and controllers", after - before);
    // The counter does move for an agent, so the check above can fail.
    accepts(
        w.plane.kubectl(
            &w.agent,
            &["label", "configmap", "c", "-n", &ns, "x=z", "--overwrite", "--dry-run=server"],
        ),
        "the agent's update",
    )?;
    ensure!(w.agentguard.decisions()? > after, "an agent request was not counted");
    Ok(())
}

/// Marks agents three ways — a label added later, a ServiceAccount created with it, an agent
/// namespace — and probes each at once, with no retry: the mark is admitted only after the
/// identity is registered, so there is no window in which the new agent is unguarded.
fn labelled_later(w: &World) -> Result<()> {
    let ns = namespace(w, "late")?;
    deployment(w, &ns, "web")?;
    let probe = ["delete", "deployment", "web", "-n", &ns, "--dry-run=server"];
    let bind = |sa_ns: &str, sa: &str| w.bind_edit(&ns, sa_ns, sa);
    // The accounts live where no agent can act as them (an agent's own namespace would make
    // them agents from the start: see the route scenario on acting as another account).
    let accounts = "e2e-late-accounts";
    must(w.plane.kubectl(&w.plane.admin, &["create", "namespace", accounts]))?;
    let mut took = Vec::new();
    for i in 0..5 {
        let sa = format!("late-{i}");
        must(w.plane.kubectl(&w.plane.admin, &["create", "serviceaccount", &sa, "-n", accounts]))?;
        bind(accounts, &sa)?;
        let kubeconfig = w.plane.service_account_kubeconfig(accounts, &sa)?;
        accepts(w.plane.kubectl(&kubeconfig, &probe), "the unlabelled ServiceAccount's delete")?;
        let started = Instant::now();
        must(w.plane.kubectl(
            &w.plane.admin,
            &["label", "serviceaccount", &sa, "-n", accounts, "agentguard.io/agent=true"],
        ))?;
        took.push(started.elapsed().as_secs_f64());
        rejects(w.plane.kubectl(&kubeconfig, &probe), "the delete right after labelling", "agentguard")?;
    }
    println!(
        "  5 ServiceAccounts labelled and probed at once: all held; `kubectl label` took {:.2}-{:.2}s",
        took.iter().copied().fold(f64::MAX, f64::min),
        took.iter().copied().fold(0.0, f64::max)
    );

    let born = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: born-agent, labels: {agentguard.io/agent: 'true'}}\n";
    must(w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-n", accounts, "-f", "-"], Some(born)))?;
    bind(accounts, "born-agent")?;
    let kubeconfig = w.plane.service_account_kubeconfig(accounts, "born-agent")?;
    rejects(w.plane.kubectl(&kubeconfig, &probe), "a ServiceAccount created with the label", "agentguard")?;

    let bots = "e2e-late-bots";
    must(w.plane.kubectl(&w.plane.admin, &["create", "namespace", bots]))?;
    must(w.plane.kubectl(&w.plane.admin, &["create", "serviceaccount", "worker", "-n", bots]))?;
    bind(bots, "worker")?;
    let kubeconfig = w.plane.service_account_kubeconfig(bots, "worker")?;
    accepts(w.plane.kubectl(&kubeconfig, &probe), "the worker's delete before its namespace is marked")?;
    must(
        w.plane.kubectl(&w.plane.admin, &["label", "namespace", bots, "agentguard.io/agent-namespace=true"]),
    )?;
    rejects(
        w.plane.kubectl(&kubeconfig, &probe),
        "a ServiceAccount of a newly marked namespace",
        "agentguard",
    )?;
    Ok(())
}

fn invalid_policy(w: &World) -> Result<()> {
    let bad = "apiVersion: agentguard.io/v1alpha1\nkind: ClusterAgentPolicy\nmetadata: {name: e2e-broken}\n\
               spec:\n  action: RequireApproval\n  rules: [{operations: [DELETE], resources: [{apiGroups: [apps], resources: [deployments]}]}]\n";
    rejects(
        w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-f", "-"], Some(bad)),
        "a RequireApproval policy without approvers",
        "approval must be set when action is RequireApproval",
    )?;
    let bad_op = bad.replace("RequireApproval", "Deny").replace("DELETE", "DESTROY");
    rejects(
        w.plane.kubectl_stdin(&w.plane.admin, &["apply", "-f", "-"], Some(&bad_op)),
        "a policy with an unknown operation",
        "Unsupported value: \"DESTROY\"",
    )?;
    Ok(())
}

fn policies_ready(w: &World) -> Result<()> {
    let started = Instant::now();
    loop {
        let table = must(w.plane.kubectl(&w.plane.admin, &["get", "clusteragentpolicies"]))?;
        let row = table.lines().find(|l| l.starts_with("e2e-workloads ")).unwrap_or_default().to_owned();
        let columns: Vec<&str> = row.split_whitespace().collect();
        if columns.get(1..4) == Some(&["RequireApproval", "Enforce", "True"][..]) {
            // The category lists both kinds.
            let all = must(w.plane.kubectl(&w.plane.admin, &["get", "agentguard"]))?;
            ensure!(all.contains("clusteragentpolicy.agentguard.io/e2e-workloads"), "{all}");
            return Ok(());
        }
        ensure!(started.elapsed() < Duration::from_secs(15), "policy not shown Ready: {table}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn thousand_agents(w: &World) -> Result<()> {
    let mut objects = Vec::new();
    for n in 0..100 {
        objects.push(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("scale-{n:02}")}}));
        for a in 0..10 {
            objects.push(serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": format!("agent-{a}"), "namespace": format!("scale-{n:02}"),
                             "labels": {"agentguard.io/agent": "true"}}}));
        }
    }
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": objects}).to_string();
    let created = Instant::now();
    must(w.plane.kubectl_stdin(&w.plane.admin, &["create", "-f", "-"], Some(&list)))?;
    let registered =
        w.wait_for_registration("system:serviceaccount:scale-99:agent-9", Duration::from_secs(60))?;
    let expression = must(w.plane.kubectl(
        &w.plane.admin,
        &[
            "get",
            "validatingwebhookconfiguration",
            "agentguard",
            "-o",
            "jsonpath={.webhooks[0].matchConditions[1].expression}",
        ],
    ))?;
    let agents = expression.matches("system:serviceaccount:scale-").count();
    ensure!(agents == 1000, "{agents} of 1000 agents registered");
    let object = must(
        w.plane
            .kubectl(&w.plane.admin, &["get", "validatingwebhookconfiguration", "agentguard", "-o", "json"]),
    )?;
    println!(
        "  1,000 agents registered {:.1}s after creation ({:.1}s after the last object): agents matchCondition {} bytes, configuration {} bytes",
        created.elapsed().as_secs_f64(),
        registered.as_secs_f64(),
        expression.len(),
        object.len()
    );
    // One of them is guarded, through that large condition.
    w.bind_edit("scale-42", "scale-42", "agent-7")?;
    deployment(w, "scale-42", "web")?;
    let agent = w.plane.service_account_kubeconfig("scale-42", "agent-7")?;
    rejects(
        w.plane.kubectl(&agent, &["delete", "deployment", "web", "-n", "scale-42"]),
        "a delete by agent 1,000",
        "requires approval",
    )?;
    // The agents registered ahead of the caches are listed for a minute, then the list goes.
    let started = Instant::now();
    let settled = loop {
        let object = must(w.plane.kubectl(
            &w.plane.admin,
            &["get", "validatingwebhookconfiguration", "agentguard", "-o", "json"],
        ))?;
        if !object.contains("agentguard.io/registered-ahead") {
            break object;
        }
        ensure!(started.elapsed() < Duration::from_secs(120), "the registered-ahead list never lapsed");
        std::thread::sleep(Duration::from_secs(1));
    };
    ensure!(
        settled.matches("system:serviceaccount:scale-").count() >= 1000,
        "agents were dropped with the list"
    );
    println!("  once the registered-ahead list lapsed: configuration {} bytes", settled.len());
    Ok(())
}

/// 1,000 ServiceAccounts labelled as agents by 20 clients at once (each labelling the 10 of one
/// namespace after another, in 5 namespaces): every label write waits for its agent's
/// registration, and
/// concurrent registrations share configuration writes (counted by the configuration's
/// `metadata.generation`, which every change of its webhooks bumps). Prints the time and the
/// writes.
fn concurrent_registrations(w: &World) -> Result<()> {
    let namespaces: Vec<String> = (0..100).map(|n| format!("reg-{n:02}")).collect();
    let mut objects = Vec::new();
    for ns in &namespaces {
        objects.push(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}));
        for a in 0..10 {
            objects.push(serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": format!("agent-{a}"), "namespace": ns}}));
        }
    }
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": objects}).to_string();
    must(w.plane.kubectl_stdin(&w.plane.admin, &["create", "-f", "-"], Some(&list)))?;
    let generation = || -> Result<u64> {
        let out = must(w.plane.kubectl(
            &w.plane.admin,
            &["get", "validatingwebhookconfiguration", "agentguard", "-o", "jsonpath={.metadata.generation}"],
        ))?;
        out.trim().parse().with_context(|| format!("generation {out:?}"))
    };
    let before = generation()?;
    let started = Instant::now();
    let names: Vec<String> = (0..10).map(|a| format!("agent-{a}")).collect();
    let names = &names;
    let outcomes: Vec<Result<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = namespaces
            .chunks(5)
            .map(|chunk| {
                s.spawn(move || {
                    let mut out = String::new();
                    for ns in chunk {
                        let mut args = vec!["label", "serviceaccount", "-n", ns];
                        args.extend(names.iter().map(String::as_str));
                        args.push("agentguard.io/agent=true");
                        out += &must(w.plane.kubectl(&w.plane.admin, &args))?;
                    }
                    Ok(out)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))).collect()
    });
    let labelled = started.elapsed();
    let writes = generation()? - before;
    let failed: Vec<anyhow::Error> = outcomes.into_iter().filter_map(Result::err).collect();
    let expression = must(w.plane.kubectl(
        &w.plane.admin,
        &[
            "get",
            "validatingwebhookconfiguration",
            "agentguard",
            "-o",
            "jsonpath={.webhooks[0].matchConditions[1].expression}",
        ],
    ))?;
    // Each label write was admitted only once its agent was registered.
    let missing: Vec<String> = namespaces
        .iter()
        .flat_map(|ns| (0..10).map(move |a| format!("system:serviceaccount:{ns}:agent-{a}")))
        .filter(|u| !expression.contains(u.as_str()))
        .collect();
    println!(
        "  1,000 agents labelled by 20 concurrent clients in {:.1}s: {writes} configuration writes (generation {before} → {}), {} clients failed",
        labelled.as_secs_f64(),
        before + writes,
        failed.len()
    );
    for ns in &namespaces {
        let _ = w.plane.kubectl(&w.plane.admin, &["delete", "namespace", ns, "--wait=false"]);
    }
    if let Some(e) = failed.into_iter().next() {
        return Err(e.context("labelling a namespace's ServiceAccounts"));
    }
    ensure!(
        missing.is_empty(),
        "{} agents admitted but not registered, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    // One write per registration would be 1,000. How many share a write depends on how many
    // clients are waiting at once (488 and 677 writes in two runs on a loaded 2-core machine):
    // at least a tenth saved shows the coalescing without measuring the machine.
    ensure!(writes < 900, "1,000 concurrent registrations took {writes} configuration writes");
    Ok(())
}

/// Webhook latency as the API server measured it (not a pass/fail check).
pub fn report_latency(w: &World) {
    let Ok(metrics) = must(w.plane.kubectl(&w.plane.admin, &["get", "--raw", "/metrics"])) else { return };
    let (mut sum, mut count) = (0.0, 0.0);
    for line in metrics.lines() {
        let wanted = line.contains("name=\"agents.agentguard.io\"") && line.contains("operation=\"DELETE\"");
        if !wanted {
            continue;
        }
        let value: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        if line.starts_with("apiserver_admission_webhook_admission_duration_seconds_sum{") {
            sum += value;
        } else if line.starts_with("apiserver_admission_webhook_admission_duration_seconds_count{") {
            count += value;
        }
    }
    if count > 0.0 {
        println!(
            "agent DELETE through agents.agentguard.io: {count} calls, mean {:.2} ms (apiserver_admission_webhook_admission_duration_seconds)",
            sum / count * 1000.0
        );
    }
}

/// What the ownership view cost: each lookup of what an agent's DELETE (or a delete approval)
/// would take with it leaves a log line with its API calls and time.
pub fn report_ownership_lookups(w: &World) {
    let log = std::fs::read_to_string(w.plane.dir.path().join("agentguard.log")).unwrap_or_default();
    let lookups: Vec<(u64, u64)> = log
        .lines()
        .filter(|l| l.contains("looked up what an agent's delete would take with it"))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            let fields = v.get("fields").unwrap_or(&v);
            Some((fields.get("calls")?.as_u64()?, fields.get("took_ms")?.as_u64()?))
        })
        .collect();
    if let (Some(calls_min), Some(calls_max), Some(ms_max)) = (
        lookups.iter().map(|l| l.0).min(),
        lookups.iter().map(|l| l.0).max(),
        lookups.iter().map(|l| l.1).max(),
    ) {
        let ms_total: u64 = lookups.iter().map(|l| l.1).sum();
        println!(
            "ownership view: {} lookups, {calls_min}–{calls_max} API calls each, mean {} ms, max {ms_max} ms",
            lookups.len(),
            ms_total / lookups.len() as u64
        );
    }
}
