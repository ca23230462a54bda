#!/usr/bin/env bash
# Writes the Krew plugin manifest (plugins/agentguard.yaml) for one release, from the release
# archives themselves: each archive's sha256 is computed here, never typed in.
#
# Usage:
#   hack/krew-manifest.sh VERSION BASE_URL ARCHIVE...
#
# VERSION   the release tag, e.g. v0.1.0
# BASE_URL  where the archives are published; each archive's uri is BASE_URL/<file name>
# ARCHIVE   agentguard-VERSION-OS-ARCH.tar.gz, holding the `agentguard` binary at its root
#           (make one with: tar -czf agentguard-v0.1.0-linux-amd64.tar.gz -C target/release agentguard)
#
# Prints the manifest on stdout; the committed plugins/agentguard.yaml is a template until a
# release replaces it with this output.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,16p' "$0" >&2
  exit 2
fi
version=$1 base=${2%/}
shift 2
for archive in "$@"; do
  [[ -f $archive ]] || { echo "krew-manifest: no archive $archive" >&2; exit 1; }
done

cat <<YAML
apiVersion: krew.googlecontainertools.github.com/v1alpha2
kind: Plugin
metadata:
  name: agentguard
spec:
  version: ${version}
  shortDescription: Approve, explain and freeze AI agents' held Kubernetes changes
  description: |
    kubectl agentguard talks to agentguard, an admission webhook that holds destructive
    requests (DELETE, UPDATE) made by AI-agent ServiceAccounts until a human approves them.
    approve: approve the latest held request for an object, after showing the whole change.
    why: what protects an object (policies, rules, approvers, built-in rules).
    freeze/unfreeze: an emergency stop for one agent or every agent.
    pending: the requests waiting for approval.
  platforms:
YAML
for archive in "$@"; do
  file=$(basename "$archive")
  # agentguard-VERSION-OS-ARCH.tar.gz
  platform=${file#agentguard-"${version}"-}
  platform=${platform%.tar.gz}
  os=${platform%%-*} arch=${platform#*-}
  if [[ -z $os || -z $arch || $platform == "$file" ]]; then
    echo "krew-manifest: $file is not agentguard-${version}-OS-ARCH.tar.gz" >&2
    exit 1
  fi
  sha=$(sha256sum "$archive" | cut -d' ' -f1)
  cat <<YAML
    - selector:
        matchLabels: {os: ${os}, arch: ${arch}}
      uri: ${base}/${file}
      sha256: ${sha}
      bin: agentguard
      files:
        - {from: agentguard, to: .}
YAML
done
