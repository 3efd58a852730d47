#!/usr/bin/env bash
# Offline checks of the Kubernetes package under deploy/k8s (no cluster, no kubectl, no Docker):
#   1. render every kustomization with tests/deploy/render.py (the kustomize subset we use);
#   2. validate every object against the Kubernetes JSON schemas, strict (kubernetes-validate),
#      plus cross checks (references, security settings, the amalgam CLI flags and ports);
#      where kubectl is installed, also compare render.py with `kubectl kustomize`; check
#      deploy/Dockerfile against the manifests and crates/cli/Cargo.toml (user, entrypoint, names);
#   3. print the containers' argv (tests/deploy/commands.py);
#   4. self-check: broken copies of the package (in a temp dir) must FAIL, each with its message.
#
#   tests/deploy/validate.sh                      # Kubernetes 1.30 and 1.33 schemas
#   K8S_VERSIONS="1.29 1.30 1.31" tests/deploy/validate.sh
#
# Needs python3 (with venv) and PyPI access on the first run: kubernetes-validate (which ships the
# schemas) and PyYAML go into a venv under ${TMPDIR:-/tmp}, reused on later runs.
set -euo pipefail
export PYTHONDONTWRITEBYTECODE=1
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
K8S_VERSIONS=${K8S_VERSIONS:-"1.30 1.33"}
KV_VERSION=${KV_VERSION:-1.37.0}
venv=${AMALGAM_DEPLOY_VENV:-${TMPDIR:-/tmp}/amalgam-deploy-venv}

if ! "$venv/bin/python" -c "import yaml, kubernetes_validate as k, sys; sys.exit(k.__version__ != '$KV_VERSION')" 2>/dev/null; then
  echo "== installing kubernetes-validate==$KV_VERSION and PyYAML into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION" PyYAML
fi
py="$venv/bin/python"

version_args=()
for v in $K8S_VERSIONS; do version_args+=(--k8s-version "$v"); done

# Where kubectl is installed (a client only; no cluster is contacted), its embedded kustomize must
# render the same objects as render.py.
kubectl_args=()
if command -v kubectl >/dev/null 2>&1; then
  kubectl_args=(--kubectl "$(command -v kubectl)")
  echo "== kubectl found: $(kubectl version --client 2>/dev/null | tr '\n' ' ')"
else
  echo "== kubectl not installed: render.py is not compared with kubectl kustomize"
fi

echo "== validate deploy/k8s (Kubernetes $K8S_VERSIONS)"
"$py" "$here/validate.py" --root "$repo/deploy/k8s" "${version_args[@]}" "${kubectl_args[@]}" \
  2> >(grep -v 'using a placeholder' >&2)

echo "== container argv (tests/deploy/commands.py, base)"
"$py" "$here/commands.py" "$repo/deploy/k8s/base" 2>/dev/null | tee "${TMPDIR:-/tmp}/amalgam-deploy-commands.$$"
n=$(grep -c '"argv"' "${TMPDIR:-/tmp}/amalgam-deploy-commands.$$")
rm -f "${TMPDIR:-/tmp}/amalgam-deploy-commands.$$"
if [ "$n" -ne 3 ]; then
  echo "FAIL: commands.py printed $n containers, expected 3 (etcd, coordinator, worker)" >&2
  exit 1
fi

echo "== self-check: broken copies must be rejected"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# expect_failure NAME FILE SED-EXPRESSION EXPECTED-MESSAGE
expect_failure() {
  local name=$1 file=$2 expr=$3 want=$4 out
  rm -rf "$scratch/k8s"
  cp -r "$repo/deploy/k8s" "$scratch/k8s"
  sed -i "$expr" "$scratch/k8s/$file"
  if cmp -s "$repo/deploy/k8s/$file" "$scratch/k8s/$file"; then
    echo "FAIL: self-check '$name': the sed expression changed nothing in $file" >&2
    exit 1
  fi
  if out=$("$py" "$here/validate.py" --root "$scratch/k8s" --k8s-version "${K8S_VERSIONS%% *}" 2>&1); then
    echo "FAIL: self-check '$name': a broken package passed validation" >&2
    echo "$out" >&2
    exit 1
  fi
  if ! grep -qF -- "$want" <<<"$out"; then
    echo "FAIL: self-check '$name': rejected, but without the expected message: $want" >&2
    echo "$out" >&2
    exit 1
  fi
  echo "ok: $name rejected: $(grep -F -m 1 -- "$want" <<<"$out")"
}
expect_failure "misspelled field" base/workers.yaml \
  's/restartPolicy: OnFailure/restartPolcy: OnFailure/' \
  "Additional properties are not allowed ('restartPolcy' was unexpected)"
expect_failure "wrong type" base/coordinator.yaml \
  's/backoffLimit: 4/backoffLimit: four/' \
  "'four' is not of type 'integer'"
expect_failure "CLI flag the coordinator does not have" base/coordinator.yaml \
  's/- --metrics-listen$/- --metrics-addr/' \
  "unknown or misplaced argument '--metrics-addr'"
expect_failure "worker arguments reordered under the cpu overlay's patch" base/workers.yaml \
  's/^            - cuda$/            - gpu/' \
  "test failed"
expect_failure "dangling ConfigMap reference" base/coordinator.yaml \
  's/name: amalgam-config$/name: amalgam-configuration/' \
  "uses missing ConfigMap amalgam-configuration"
expect_failure "kustomize feature render.py does not implement" base/kustomization.yaml \
  's/^resources:$/namePrefix: x-\nresources:/' \
  "unsupported key(s) ['namePrefix']"
echo "== deploy validation passed"
