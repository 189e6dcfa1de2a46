#!/usr/bin/env bash
# Build the MedDistill image on this machine without Docker or a registry, from the same steps as
# the Dockerfile (tools/image/install.sh; the run config is read from the Dockerfile's last stage),
# streamed into `ctr images import` by tools/image/oci.py. The one-node test cluster uses it; a hospital
# builds the Dockerfile instead (README: "Build the image").
#
# Layers, each cached under ${MEDDISTILL_CACHE:-~/.cache/meddistill}/image/ by what goes into it:
#   base  Debian bookworm (debootstrap minbase + python3) and the pod sandbox ("pause") image
#   deps  install.sh deps: every dependency in /opt/meddistill (several GiB; re-made only when
#         pyproject.toml or install.sh change)
#   app   install.sh app: the meddistill package from this checkout (seconds)
# Needs root (chroot, overlay mounts), debootstrap, gcc, and PyPI (or a warm pip cache).
#
# Each layer is a folder (its tar is streamed when imported, never stored); stdout: name=value lines
# naming the images, their run configs and their layers (FOLDER=DIGEST=SIZE).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE="${MEDDISTILL_CACHE:-$HOME/.cache/meddistill}"
OUT="$CACHE/image"
SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,wget,ca-certificates
log() { printf '[image-build] %s\n' "$*" >&2; }
hash_of() { cat "$@" | sha256sum | cut -c1-12; }

[[ $(id -u) == 0 ]] || { log "needs root (chroot and overlay mounts)"; exit 2; }
for t in debootstrap gcc python3 tar; do
  command -v $t >/dev/null || { log "$t is missing: apt-get install -y debootstrap gcc"; exit 2; }
done
mkdir -p "$OUT"
exec 9>"$OUT/.lock"; flock 9

# --- pause: the pod sandbox image (a static binary)
PAUSE_KEY="$(hash_of "$HERE/pause.c")"
PAUSE="$OUT/pause-$PAUSE_KEY"
if [[ ! -f "$PAUSE/layer.digest" ]]; then
  log "pause image"
  rm -rf "$PAUSE" && mkdir -p "$PAUSE/upper"
  gcc -Os -static -o "$PAUSE/upper/pause" "$HERE/pause.c"
  echo '{"Entrypoint": ["/pause"]}' > "$PAUSE/config.json"
  python3 "$HERE/oci.py" digest "$PAUSE/upper" > "$PAUSE/layer.digest"
fi

# --- base: Debian minbase with Python
BASE_KEY="$(printf '%s %s' "$SUITE" "$BASE_PACKAGES" | sha256sum | cut -c1-12)"
BASE="$OUT/base-$SUITE-$BASE_KEY"
if [[ ! -f "$BASE/layer.digest" ]]; then
  log "base: debootstrap $SUITE (about a minute)"
  rm -rf "$BASE" && mkdir -p "$BASE"
  debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$BASE/upper" http://deb.debian.org/debian >&2
  rm -rf "$BASE/upper/var/cache/apt/archives/"*.deb "$BASE/upper/var/lib/apt/lists/"*
  python3 "$HERE/oci.py" digest "$BASE/upper" > "$BASE/layer.digest"
fi

# --- the portable llama-cpp-python wheel (built on the host: the image has no compiler)
WHEEL="$(bash "$ROOT/tools/llama/build_wheel.sh")"

# A copy of what the Dockerfile COPYs into /src (never the working tree itself: pip writes build/ there).
stage_src() { # stage_src DIR
  mkdir -p "$1"
  (cd "$ROOT" && cp -r pyproject.toml setup.py README.md NOTICE meddistill operator jobs serve tools "$1"/)
  find "$1" -name __pycache__ -prune -exec rm -rf {} +
}

MOUNTS=()
cleanup() {
  local i
  for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do umount -l "${MOUNTS[$i]}" 2>/dev/null || true; done
  MOUNTS=()
}
trap cleanup EXIT
mnt() { mount "$@"; MOUNTS+=("${!#}"); }

# run_layer DIR LOWERDIRS STEP: install.sh STEP in a chroot of LOWERDIRS + an overlay; the overlay's
# upper directory is the layer (DIR/upper, its digest in DIR/layer.digest).
run_layer() {
  local dir="$1" lower="$2" step="$3"
  rm -rf "$dir" && mkdir -p "$dir/upper" "$dir/work" "$dir/merged" "$dir/wheels"
  cp "$WHEEL" "$dir/wheels/"
  mnt -t overlay overlay -o "lowerdir=$lower,upperdir=$dir/upper,workdir=$dir/work" "$dir/merged"
  local m="$dir/merged"
  mkdir -p "$m/src" "$m/wheels" "$m/root/.cache/pip"
  stage_src "$dir/src"
  mnt --bind "$dir/src" "$m/src"
  mnt --bind "$dir/wheels" "$m/wheels"
  mkdir -p "$HOME/.cache/pip" && mnt --bind "$HOME/.cache/pip" "$m/root/.cache/pip"
  mnt -t proc proc "$m/proc"
  mnt --bind /dev "$m/dev"
  cp /etc/resolv.conf "$m/etc/resolv.conf"
  # This machine's CA bundle (a proxy's CA may sit in it) for the build only: a bind mount, not layer content.
  mnt --bind /etc/ssl/certs/ca-certificates.crt "$m/etc/ssl/certs/ca-certificates.crt"
  local pip_env=() v
  for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_DEFAULT_TIMEOUT HTTPS_PROXY HTTP_PROXY NO_PROXY; do
    [[ -n "${!v:-}" ]] && pip_env+=("$v=${!v}")
  done
  chroot "$m" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt "${pip_env[@]}" \
    SRC=/src WHEELS=/wheels sh /src/tools/image/install.sh "$step" >&2
  cleanup
  # Only what the step made: mount points, pip's cache and pyc files of the staging copy are not layer content.
  rm -rf "$dir/upper/src" "$dir/upper/wheels" "$dir/upper/root/.cache" "$dir/upper/proc" "$dir/upper/dev"
  if [[ -n "$(find "$dir/upper" -type c -print -quit)" ]]; then
    log "step '$step' deleted files of the layer below (overlay whiteouts): not supported"; exit 1
  fi
  rm -rf "$dir/work" "$dir/merged" "$dir/src" "$dir/wheels"
  python3 "$HERE/oci.py" digest "$dir/upper" > "$dir/layer.digest"
}

# --- deps: keyed by the dependency list (not the whole pyproject.toml: its tool settings change often)
REQUIREMENTS="$(python3 -c 'import sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb"))["project"]; print(p["dependencies"], p["optional-dependencies"]["s3"])' "$ROOT/pyproject.toml")"
DEPS_KEY="$(printf '%s\n%s\n%s\n' "$(cat "$BASE/layer.digest")" "$(basename "$WHEEL")" "$REQUIREMENTS" | cat - "$HERE/install.sh" | sha256sum | cut -c1-12)"
DEPS="$OUT/deps-$DEPS_KEY"
if [[ ! -f "$DEPS/layer.digest" ]]; then
  log "deps layer: install.sh deps (minutes; a warm pip cache helps)"
  start=$SECONDS
  run_layer "$DEPS" "$BASE/upper" deps
  log "deps layer: $(du -sh "$DEPS/upper" | cut -f1) in $((SECONDS - start))s"
fi

# --- app: keyed by the package's sources
APP_KEY="$( (cd "$ROOT" && find Dockerfile pyproject.toml setup.py README.md NOTICE meddistill operator jobs serve tools/image -type f \
  ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum) | cat - "$DEPS/layer.digest" | sha256sum | cut -c1-12)"
APP="$OUT/app-$APP_KEY"
if [[ ! -f "$APP/layer.digest" ]]; then
  log "app layer: install.sh app"
  run_layer "$APP" "$DEPS/upper:$BASE/upper" app
  # The run config (Env, User, WorkingDir, Entrypoint, Cmd) of the Dockerfile's last stage.
  python3 "$HERE/dockerfile_config.py" "$ROOT/Dockerfile" > "$APP/config.json"
fi

# Older builds go: each deps layer is several GiB.
for old in "$OUT"/deps-* "$OUT"/app-*; do
  [[ "$old" == "$DEPS" || "$old" == "$APP" ]] || rm -rf "$old"
done

VERSION="$(python3 -c 'import sys,tomllib; print(tomllib.load(open(sys.argv[1],"rb"))["project"]["version"])' "$ROOT/pyproject.toml")"
layer() { printf '%s=%s' "$1/upper" "$(cat "$1/layer.digest")"; }
# For tests/support/node_cluster.py (`oci.py write - ... | ctr images import -`).
echo "image=meddistill.local/meddistill:$VERSION-$APP_KEY"
echo "image_config=$APP/config.json"
echo "image_layers=$(layer "$BASE") $(layer "$DEPS") $(layer "$APP")"
echo "deps_image=meddistill.local/meddistill-deps:$DEPS_KEY"
echo "deps_layers=$(layer "$BASE") $(layer "$DEPS")"
echo "pause_image=meddistill.local/pause:$PAUSE_KEY"
echo "pause_config=$PAUSE/config.json"
echo "pause_layers=$(layer "$PAUSE")"
