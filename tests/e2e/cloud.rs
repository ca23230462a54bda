//! Cloud resources (examples/cloud/): the example policy and objects against the cloud
//! controllers' CRDs, and every change that arms a controller to delete the cloud resource behind
//! an object held as that DELETE when an agent makes it, while harmless changes and humans pass.
//!
//! Crossplane's CRD is the real one, from the Go module `hack/k8s-binaries.sh` pins
//! (`CROSSPLANE_AWS_CRDS`). The ACK s3-controller and Config Connector modules are not served by
//! the Go module proxy the project builds from: their CRDs are stand-ins with the real group,
//! version, kind, plural and scope and a schema for the fields the examples use, unless
//! `ACK_S3_CRDS` / `CONFIG_CONNECTOR_CRDS` name a folder holding the real ones
//! (`config/crd/bases` of the s3-controller module; `config/crds/resources`, or `crds` in older
//! releases, of k8s-config-connector).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::world::{World, accepts, must, rejects};

/// A refusal of a change judged as the DELETE it arms names the rule with that reason appended.
const POLICY: &str = "ClusterAgentPolicy \"cloud-resources\", rule \"cloud-buckets";
const ACK: &str = "buckets.s3.services.k8s.aws";
const CNRM: &str = "storagebuckets.storage.cnrm.cloud.google.com";
const CROSSPLANE: &str = "buckets.s3.aws.upbound.io";
const ACK_ARMED: &str = "the services.k8s.aws/deletion-policy annotation no longer retains the AWS resource";
const CNRM_ARMED: &str =
    "the cnrm.cloud.google.com/deletion-policy annotation no longer abandons the cloud resource";
const CROSSPLANE_ARMED: &str = "spec.deletionPolicy/managementPolicies no longer keep the external resource";

const ACK_STAND_IN: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: buckets.s3.services.k8s.aws}
spec:
  group: s3.services.k8s.aws
  names: {kind: Bucket, listKind: BucketList, plural: buckets, singular: bucket}
  scope: Namespaced
  versions:
    - name: v1alpha1
      served: true
      storage: true
      subresources: {status: {}}
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [name]
              properties:
                name: {type: string}
            status: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#;

const CNRM_STAND_IN: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: storagebuckets.storage.cnrm.cloud.google.com}
spec:
  group: storage.cnrm.cloud.google.com
  names: {kind: StorageBucket, plural: storagebuckets, singular: storagebucket, categories: [gcp]}
  scope: Namespaced
  versions:
    - name: v1beta1
      served: true
      storage: true
      subresources: {status: {}}
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                location: {type: string, default: US}
                storageClass: {type: string}
                uniformBucketLevelAccess: {type: boolean}
                versioning:
                  type: object
                  required: [enabled]
                  properties:
                    enabled: {type: boolean}
            status: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A CRD file, by one of its known names, from the folder named by `var`, if that is set.
fn crd_from(var: &str, files: &[&str]) -> Result<Option<PathBuf>> {
    let Some(dir) = std::env::var_os(var) else { return Ok(None) };
    let path = files.iter().map(|f| Path::new(&dir).join(f)).find(|p| p.is_file());
    let path =
        path.with_context(|| format!("{var}={} holds none of {files:?}", Path::new(&dir).display()))?;
    Ok(Some(path))
}

/// The three CRDs (server-side apply, as the chart test does: no last-applied copy of a 100 kB
/// CRD) and the example policy; waits until the CRDs are Established. Idempotent: each scenario
/// calls it.
fn setup(w: &World) -> Result<()> {
    let admin = &w.plane.admin;
    let crossplane = PathBuf::from(
        std::env::var_os("CROSSPLANE_AWS_CRDS")
            .context("CROSSPLANE_AWS_CRDS is not set: eval \"$(hack/k8s-binaries.sh)\"")?,
    )
    .join("s3.aws.upbound.io_buckets.yaml");
    let mut files = vec![crossplane];
    let mut stand_ins = Vec::new();
    let cnrm = [
        "apiextensions.k8s.io_v1_customresourcedefinition_storagebuckets.storage.cnrm.cloud.google.com.yaml",
        "storage_v1beta1_storagebucket.yaml",
    ];
    for (var, names, stand_in) in [
        ("ACK_S3_CRDS", &["s3.services.k8s.aws_buckets.yaml"][..], ACK_STAND_IN),
        ("CONFIG_CONNECTOR_CRDS", &cnrm[..], CNRM_STAND_IN),
    ] {
        match crd_from(var, names)? {
            Some(path) => files.push(path),
            None => stand_ins.push(stand_in),
        }
    }
    for file in &files {
        must(w.plane.kubectl(
            admin,
            &["apply", "--server-side", "--force-conflicts", "-f", &file.to_string_lossy()],
        ))?;
    }
    for stand_in in stand_ins {
        must(w.plane.kubectl_stdin(admin, &["apply", "--server-side", "-f", "-"], Some(stand_in)))?;
    }
    must(w.plane.kubectl(
        admin,
        &["wait", "--for", "condition=established", "--timeout=60s", "crd", ACK, CNRM, CROSSPLANE],
    ))?;
    let policy = root().join("examples/cloud/policy.yaml");
    must(w.plane.kubectl(admin, &["apply", "-f", &policy.to_string_lossy()]))?;
    Ok(())
}

fn namespace(w: &World, name: &str) -> Result<String> {
    let ns = format!("e2e-{name}");
    must(w.plane.kubectl(&w.plane.admin, &["create", "namespace", &ns]))?;
    Ok(ns)
}

/// An example object from examples/cloud/, renamed to `name`.
fn sample(file: &str, name: &str) -> Result<String> {
    let text = std::fs::read_to_string(root().join("examples/cloud").join(file))?;
    let from = text
        .lines()
        .find_map(|l| l.strip_prefix("  name: "))
        .with_context(|| format!("{file} names no object"))?
        .to_owned();
    Ok(text.replacen(&format!("  name: {from}\n"), &format!("  name: {name}\n"), 1))
}

/// Validates `manifest` against the CRD's schema (server-side dry run, strict field validation)
/// and creates it as the admin.
fn create(w: &World, ns: &str, manifest: &str) -> Result<()> {
    let admin = &w.plane.admin;
    must(w.plane.kubectl_stdin(
        admin,
        &["create", "-n", ns, "--dry-run=server", "--validate=strict", "-f", "-"],
        Some(manifest),
    ))
    .context("the example does not validate against the CRD")?;
    must(w.plane.kubectl_stdin(admin, &["create", "-n", ns, "-f", "-"], Some(manifest)))?;
    Ok(())
}

/// Waits until the agent's DELETE of the object is held by the cloud policy (a new policy takes
/// effect once agentguard's watch has seen it); returns the denial.
fn held_delete(w: &World, ns: &str, resource: &str, name: &str) -> Result<String> {
    let started = Instant::now();
    loop {
        let out = w.plane.kubectl(&w.agent, &["delete", resource, name, "-n", ns, "--dry-run=server"]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() && stderr.contains(POLICY) {
            return Ok(stderr);
        }
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the agent's DELETE of {resource} {name} is not held by the cloud policy: {}{stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn annotation(w: &World, ns: &str, resource: &str, name: &str, key: &str) -> Result<String> {
    let jsonpath = format!("jsonpath={{.metadata.annotations.{}}}", key.replace('.', "\\."));
    must(w.plane.kubectl(&w.plane.admin, &["get", resource, name, "-n", ns, "-o", &jsonpath]))
}

/// The agent's change is refused as the DELETE it arms, naming the policy and the reason.
fn armed(w: &World, args: &[&str], what: &str, why: &str) -> Result<()> {
    let denial = rejects(w.plane.kubectl(&w.agent, args), what, POLICY)?;
    let reason = format!("(judged as the operation it amounts to: {why})");
    ensure!(denial.contains(&reason), "{what}: the refusal does not say {reason:?}: {denial}");
    Ok(())
}

pub fn examples(w: &World) -> Result<()> {
    setup(w)?;
    let ns = namespace(w, "cloud-examples")?;
    let crossplane = "e2e-cloud-examples";
    create(w, &ns, &sample("ack-bucket.yaml", "invoices")?)?;
    create(w, &ns, &sample("cnrm-storagebucket.yaml", "invoices")?)?;
    create(w, &ns, &sample("crossplane-bucket.yaml", crossplane)?)?;
    // What the CRDs default: Crossplane's managementPolicies are ["*"] (they keep nothing).
    let policies = must(w.plane.kubectl(
        &w.plane.admin,
        &["get", CROSSPLANE, crossplane, "-o", "jsonpath={.spec.deletionPolicy} {.spec.managementPolicies}"],
    ))?;
    ensure!(policies == r#"Orphan ["*"]"#, "Crossplane defaults: {policies}");

    for (resource, name) in [(ACK, "invoices"), (CNRM, "invoices"), (CROSSPLANE, crossplane)] {
        let denial = held_delete(w, &ns, resource, name)?;
        ensure!(denial.contains("kubectl annotate"), "{resource}: no approve command: {denial}");
        rejects(
            w.plane.kubectl(&w.agent, &["delete", resource, name, "-n", &ns]),
            &format!("the agent's DELETE of {resource}"),
            POLICY,
        )?;
        must(w.plane.kubectl(&w.plane.admin, &["get", resource, name, "-n", &ns]))
            .with_context(|| format!("the held {resource} is gone"))?;
    }
    Ok(())
}

pub fn ack(w: &World) -> Result<()> {
    setup(w)?;
    let ns = namespace(w, "cloud-ack")?;
    create(w, &ns, &sample("ack-bucket.yaml", "invoices")?)?;
    held_delete(w, &ns, ACK, "invoices")?;
    const KEY: &str = "services.k8s.aws/deletion-policy";
    armed(
        w,
        &["annotate", ACK, "invoices", "-n", &ns, &format!("{KEY}=delete"), "--overwrite"],
        "the agent setting the ACK deletion policy to delete",
        ACK_ARMED,
    )?;
    armed(
        w,
        &["annotate", ACK, "invoices", "-n", &ns, &format!("{KEY}-")],
        "the agent removing the ACK deletion policy",
        ACK_ARMED,
    )?;
    ensure!(annotation(w, &ns, ACK, "invoices", KEY)? == "retain", "the deletion policy changed");

    // Without its own annotation, a resource follows its Namespace's: an explicit `delete` arms it.
    must(w.plane.kubectl(
        &w.plane.admin,
        &["annotate", "namespace", &ns, "s3.services.k8s.aws/deletion-policy=retain"],
    ))?;
    let archive =
        sample("ack-bucket.yaml", "archive")?.replace(&format!("  annotations:\n    {KEY}: retain\n"), "");
    create(w, &ns, &archive)?;
    armed(
        w,
        &["annotate", ACK, "archive", "-n", &ns, &format!("{KEY}=delete")],
        "the agent overriding the Namespace's retain with delete",
        ACK_ARMED,
    )?;

    accepts(
        w.plane.kubectl(&w.agent, &["label", ACK, "invoices", "-n", &ns, "team=billing"]),
        "the agent labelling the bucket",
    )?;
    accepts(
        w.plane.kubectl(&w.agent, &["annotate", ACK, "archive", "-n", &ns, &format!("{KEY}=retain")]),
        "the agent retaining the bucket",
    )?;
    accepts(
        w.plane.kubectl(
            &w.alice,
            &["annotate", ACK, "invoices", "-n", &ns, &format!("{KEY}=delete"), "--overwrite"],
        ),
        "alice arming the deletion",
    )?;
    ensure!(annotation(w, &ns, ACK, "invoices", KEY)? == "delete", "alice's change was not stored");
    Ok(())
}

pub fn cnrm(w: &World) -> Result<()> {
    setup(w)?;
    let ns = namespace(w, "cloud-cnrm")?;
    create(w, &ns, &sample("cnrm-storagebucket.yaml", "invoices")?)?;
    held_delete(w, &ns, CNRM, "invoices")?;
    const KEY: &str = "cnrm.cloud.google.com/deletion-policy";
    armed(
        w,
        &["annotate", CNRM, "invoices", "-n", &ns, &format!("{KEY}=delete"), "--overwrite"],
        "the agent setting the Config Connector deletion policy to delete",
        CNRM_ARMED,
    )?;
    armed(
        w,
        &["annotate", CNRM, "invoices", "-n", &ns, &format!("{KEY}-")],
        "the agent removing the Config Connector deletion policy",
        CNRM_ARMED,
    )?;
    ensure!(annotation(w, &ns, CNRM, "invoices", KEY)? == "abandon", "the deletion policy changed");
    accepts(
        w.plane.kubectl(&w.agent, &["label", CNRM, "invoices", "-n", &ns, "team=billing"]),
        "the agent labelling the bucket",
    )?;
    accepts(
        w.plane.kubectl(
            &w.agent,
            &[
                "patch",
                CNRM,
                "invoices",
                "-n",
                &ns,
                "--type=merge",
                "-p",
                r#"{"spec":{"storageClass":"NEARLINE"}}"#,
            ],
        ),
        "the agent changing the bucket's storage class",
    )?;
    accepts(
        w.plane.kubectl(&w.plane.admin, &["annotate", CNRM, "invoices", "-n", &ns, &format!("{KEY}-")]),
        "the admin arming the deletion",
    )?;
    ensure!(annotation(w, &ns, CNRM, "invoices", KEY)?.is_empty(), "the admin's change was not stored");
    Ok(())
}

pub fn crossplane(w: &World) -> Result<()> {
    setup(w)?;
    let ns = namespace(w, "cloud-crossplane")?;
    let (orphaned, observed) = ("e2e-cloud-orphaned", "e2e-cloud-observed");
    create(w, &ns, &sample("crossplane-bucket.yaml", orphaned)?)?;
    held_delete(w, &ns, CROSSPLANE, orphaned)?;
    let patch = |who: &Path, name: &str, kind: &str, p: &str| {
        w.plane.kubectl(who, &["patch", CROSSPLANE, name, &format!("--type={kind}"), "-p", p])
    };
    let spec = |name: &str| {
        must(w.plane.kubectl(
            &w.plane.admin,
            &["get", CROSSPLANE, name, "-o", "jsonpath={.spec.deletionPolicy} {.spec.managementPolicies}"],
        ))
    };

    for (kind, p, what) in [
        ("merge", r#"{"spec":{"deletionPolicy":"Delete"}}"#, "deletionPolicy: Delete"),
        (
            "json",
            r#"[{"op":"remove","path":"/spec/deletionPolicy"}]"#,
            "deletionPolicy removed (defaults to Delete)",
        ),
        // Non-default management policies holding Delete delete, whatever the deletionPolicy.
        (
            "merge",
            r#"{"spec":{"managementPolicies":["Observe","Delete"]}}"#,
            "managementPolicies [Observe, Delete]",
        ),
    ] {
        let denial = rejects(patch(&w.agent, orphaned, kind, p), &format!("the agent's {what}"), POLICY)?;
        ensure!(denial.contains(CROSSPLANE_ARMED), "{what}: {denial}");
    }
    ensure!(spec(orphaned)? == r#"Orphan ["*"]"#, "the orphaned bucket changed: {}", spec(orphaned)?);

    // Kept by its management policies alone (the deletionPolicy defaults to Delete).
    let kept = sample("crossplane-bucket.yaml", observed)?.replace(
        "  deletionPolicy: Orphan\n",
        "  managementPolicies: [Observe, Create, Update, LateInitialize]\n",
    );
    create(w, &ns, &kept)?;
    held_delete(w, &ns, CROSSPLANE, observed)?;
    armed(
        w,
        &["patch", CROSSPLANE, observed, "--type=merge", "-p", r#"{"spec":{"managementPolicies":["*"]}}"#],
        "the agent's managementPolicies [*]",
        CROSSPLANE_ARMED,
    )?;

    // Harmless changes pass: a label, policies that still keep the bucket.
    accepts(
        w.plane.kubectl(&w.agent, &["label", CROSSPLANE, orphaned, "team=billing"]),
        "the agent labelling the bucket",
    )?;
    accepts(
        patch(&w.agent, observed, "merge", r#"{"spec":{"managementPolicies":["Observe"]}}"#),
        "the agent making the bucket observe-only",
    )?;
    accepts(
        patch(&w.agent, orphaned, "merge", r#"{"spec":{"forProvider":{"tags":{"team":"billing"}}}}"#),
        "the agent tagging the bucket",
    )?;
    // Humans may arm it.
    accepts(
        patch(&w.alice, orphaned, "merge", r#"{"spec":{"deletionPolicy":"Delete"}}"#),
        "alice's deletionPolicy: Delete",
    )?;
    accepts(
        patch(&w.plane.admin, observed, "merge", r#"{"spec":{"managementPolicies":["*"]}}"#),
        "the admin's managementPolicies [*]",
    )?;
    ensure!(spec(orphaned)? == r#"Delete ["*"]"#, "alice's change was not stored: {}", spec(orphaned)?);
    ensure!(spec(observed)? == r#"Delete ["*"]"#, "the admin's change was not stored: {}", spec(observed)?);
    Ok(())
}
