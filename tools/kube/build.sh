#!/usr/bin/env bash
# Build the real Kubernetes binaries the tests need (kube-apiserver,
# kube-controller-manager, kubectl, kubelet, kube-scheduler, kube-proxy, etcd, helm,
# CoreDNS and KubeRay's operator) from the Go module proxy, using
# the wrapper modules next to this script. Only what is missing is built; each
# binary lands in
#     ${MEDDISTILL_CACHE:-$HOME/.cache/meddistill}/bin/<name>-<version>/<name>
# (outside the repository). When everything is cached this takes well under a
# second.
#
# Needs only Go (>= 1.26; with GOTOOLCHAIN=auto an older go fetches a newer
# toolchain from the proxy) and access to the Go module proxy. GOPATH and
# GOCACHE are left at their defaults so the module cache (~/go/pkg/mod) and the
# build cache (~/.cache/go-build) persist too.
#
# Output: progress goes to stderr; stdout gets one "name=/abs/path" line per
# binary (easy to parse from scripts and tests).
#
# Usage: tools/kube/build.sh [--check]    (--check: build nothing, exit 1 if
#                                          something is missing)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${MEDDISTILL_CACHE:-$HOME/.cache/meddistill}"
BIN_ROOT="$CACHE/bin"
CHECK_ONLY=0
[[ "${1:-}" == "--check" ]] && CHECK_ONLY=1

log() { printf '[kube-build] %s\n' "$*" >&2; }

# The single source of truth for versions is each wrapper's go.mod.
modver() { # modver <wrapper-dir> <module-path>
  awk -v m="$2" '($1 == m || ($1 == "require" && $2 == m)) && $0 !~ /=>/ {print ($1 == "require" ? $3 : $2); exit}' "$HERE/$1/go.mod"
}
K8S_VERSION="$(modver kubernetes k8s.io/kubernetes)"
ETCD_VERSION="$(modver etcd go.etcd.io/etcd/server/v3)"
HELM_VERSION="$(modver helm helm.sh/helm/v3)"
KUBERAY_VERSION="$(modver kuberay github.com/ray-project/kuberay/ray-operator)"
# CoreDNS's binary is keyed by its main.go too (the plugin list).
COREDNS_VERSION="$(modver coredns github.com/coredns/coredns)-$(sha256sum "$HERE/coredns/main.go" | cut -c1-8)"
for v in K8S_VERSION ETCD_VERSION HELM_VERSION KUBERAY_VERSION COREDNS_VERSION; do
  [[ -n "${!v}" ]] || { log "could not read $v from the wrapper go.mod files"; exit 2; }
done

bin_path() { # bin_path <name> <version>
  printf '%s/%s-%s/%s' "$BIN_ROOT" "$1" "$2" "$1"
}

declare -A VERSION_OF=(
  [kube-apiserver]="$K8S_VERSION"
  [kube-controller-manager]="$K8S_VERSION"
  [kubectl]="$K8S_VERSION"
  [kubelet]="$K8S_VERSION"
  [kube-scheduler]="$K8S_VERSION"
  [kube-proxy]="$K8S_VERSION"
  [coredns]="$COREDNS_VERSION"
  [etcd]="$ETCD_VERSION"
  [helm]="$HELM_VERSION"
  [kuberay-operator]="$KUBERAY_VERSION"
)
ORDER=(kube-apiserver kube-controller-manager kubectl kubelet kube-scheduler kube-proxy etcd helm kuberay-operator coredns)

missing() { # prints the names whose binary is absent
  local n
  for n in "${ORDER[@]}"; do
    [[ -x "$(bin_path "$n" "${VERSION_OF[$n]}")" ]] || echo "$n"
  done
  [[ -f "$(dirname "$(bin_path kuberay-operator "$KUBERAY_VERSION")")/crds/ray.io_rayjobs.yaml" ]] || echo "kuberay-crds"
}

print_paths() {
  local n
  for n in "${ORDER[@]}"; do
    echo "$n=$(bin_path "$n" "${VERSION_OF[$n]}")"
  done
}

if [[ -z "$(missing)" ]]; then
  log "all binaries cached under $BIN_ROOT (kubernetes $K8S_VERSION, etcd $ETCD_VERSION, helm $HELM_VERSION, kuberay $KUBERAY_VERSION)"
  print_paths
  exit 0
fi
if [[ $CHECK_ONLY == 1 ]]; then
  log "missing: $(missing | tr '\n' ' ')"
  exit 1
fi

command -v go >/dev/null || { log "go is not on PATH; install Go >= 1.26"; exit 2; }
mkdir -p "$BIN_ROOT"

# Serialise concurrent builders (two pytest sessions, CI shards, ...).
if command -v flock >/dev/null; then
  exec 9>"$BIN_ROOT/.build.lock"
  if ! flock -n 9; then
    log "another build holds $BIN_ROOT/.build.lock; waiting"
    flock 9
  fi
fi

export GOWORK=off
# go.sum is committed and complete, so builds are reproducible and never edit the repo.
export GOFLAGS="-mod=readonly -buildvcs=false"
export CGO_ENABLED="${CGO_ENABLED:-0}"

# go_build <wrapper-dir> <ldflags> <name:package>...
go_build() {
  local dir="$1" ldflags="$2"; shift 2
  local names=() pkgs=() spec n
  for spec in "$@"; do
    n="${spec%%:*}"
    [[ -x "$(bin_path "$n" "${VERSION_OF[$n]}")" ]] && continue
    names+=("$n"); pkgs+=("${spec#*:}")
  done
  [[ ${#names[@]} -gt 0 ]] || return 0
  local tmp; tmp="$(mktemp -d "$BIN_ROOT/.tmp-build.XXXXXX")"
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" RETURN
  log "building ${names[*]} (module tools/kube/$dir) with $(go version | awk '{print $3}') ..."
  log "  (a cold build takes minutes on few cores; it is cached afterwards)"
  local start=$SECONDS
  # One package: name the output file ourselves (go would call
  # go.etcd.io/etcd/server/v3 "server"); several: one shared go build into a dir.
  local out="$tmp/"
  [[ ${#pkgs[@]} -eq 1 ]] && out="$tmp/${names[0]}"
  ( cd "$HERE/$dir" && go build -trimpath -ldflags "$ldflags" -o "$out" "${pkgs[@]}" ) >&2 &
  local pid=$! ticker=0
  while kill -0 "$pid" 2>/dev/null; do
    sleep 2
    ticker=$((ticker + 2))
    (( ticker % 60 == 0 )) && log "  ... still building ${names[*]} ($((SECONDS - start))s)"
  done
  if ! wait "$pid"; then
    log "FAILED to build ${names[*]} after $((SECONDS - start))s"
    return 1
  fi
  for n in "${names[@]}"; do
    local dest; dest="$(bin_path "$n" "${VERSION_OF[$n]}")"
    mkdir -p "$(dirname "$dest")"
    mv -f "$tmp/$n" "$dest.tmp" && mv -f "$dest.tmp" "$dest"
  done
  log "built ${names[*]} in $((SECONDS - start))s"
}

k8s_ldflags() {
  local v="$K8S_VERSION" minor major pkg out="-s -w"
  major="${v#v}"; major="${major%%.*}"
  minor="${v#v*.}"; minor="${minor%%.*}"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    out+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    out+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  printf '%s' "$out"
}

go_build kubernetes "$(k8s_ldflags)" \
  kube-apiserver:k8s.io/kubernetes/cmd/kube-apiserver \
  kube-controller-manager:k8s.io/kubernetes/cmd/kube-controller-manager \
  kubectl:k8s.io/kubernetes/cmd/kubectl \
  kubelet:k8s.io/kubernetes/cmd/kubelet \
  kube-scheduler:k8s.io/kubernetes/cmd/kube-scheduler \
  kube-proxy:k8s.io/kubernetes/cmd/kube-proxy
# etcd's version is a constant in go.etcd.io/etcd/api/v3/version, nothing to stamp.
go_build etcd "-s -w" etcd:go.etcd.io/etcd/server/v3
go_build helm "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
  helm:helm.sh/helm/v3/cmd/helm
# KubeRay's controller, and beside it the CRDs of the same release (the tests install those, so the
# controller runs against its own schema).
go_build kuberay "-s -w" kuberay-operator:github.com/ray-project/kuberay/ray-operator
# CoreDNS with only the plugins a one-node cluster needs (main.go beside its go.mod), so cluster names
# resolve for Ray workers and submitters without the ~1,400 packages of a full build.
go_build coredns "-s -w" coredns:meddistill.local/tools/kube/coredns
kuberay_crds="$(dirname "$(bin_path kuberay-operator "$KUBERAY_VERSION")")/crds"
if [[ ! -f "$kuberay_crds/ray.io_rayjobs.yaml" ]]; then
  src="$(cd "$HERE/kuberay" && go list -m -f '{{.Dir}}' github.com/ray-project/kuberay/ray-operator)"
  mkdir -p "$kuberay_crds.tmp"
  cp "$src"/config/crd/bases/ray.io_{rayclusters,rayjobs,rayservices}.yaml "$kuberay_crds.tmp"/
  chmod 644 "$kuberay_crds.tmp"/*.yaml
  rm -rf "$kuberay_crds" && mv "$kuberay_crds.tmp" "$kuberay_crds"
fi

if [[ -n "$(missing)" ]]; then
  log "still missing after build: $(missing | tr '\n' ' ')"
  exit 1
fi
log "all binaries ready under $BIN_ROOT"
print_paths
