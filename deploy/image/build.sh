#!/usr/bin/env bash
# deploy/image/build.sh (`make image`): the agent's container image, localhost/bpfsync:<version>.
#
# No registry image can be pulled on our machines, so the image starts from a Debian root made
# here:
#   1. the base: mmdebstrap makes a bookworm root holding the OS side of the agent (python3,
#      python3-venv, libbpf1, ca-certificates); the tarball is cached in .cache/image/, and
#      `podman import` turns it into localhost/bpfsync-base:<the tarball's hash>,
#   2. the agent: a wheel of this repository's working tree (src/ as it is now, with the BPF
#      objects and generated gRPC code that `make bpf proto` built), and the list of its
#      dependencies pinned to the versions in the host's .venv (the ones the tests ran),
#   3. `podman build` of deploy/image/Containerfile on that base: the dependencies from PyPI in a
#      venv at /opt/bpfsync (one layer), the wheel (another), entrypoint `bpfsync`.
# Run from the Makefile (`make image`), which builds the venv, BPF objects and gRPC code first.
# Needs root. Network: Debian's mirror (the base, once a week) and PyPI (when the dependencies
# change). Prints the image's tag, size and the build's time on its last line.
#
# Environment knobs:
#   BPFSYNC_IMAGE        the tag (default localhost/bpfsync:<version from pyproject.toml>)
#   IMAGE_REBUILD_BASE=1 rebuild the cached base tarball (it is also rebuilt when 7 days old)
#   IMAGE_NO_CACHE=1     build every layer again (podman build --no-cache)
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "$0")" && pwd)
repo=$(git -C "$here" rev-parse --show-toplevel)
cd "$repo"
t_start=$EPOCHREALTIME
secs_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
say() { echo "image: $*"; }

[ "$(id -u)" -eq 0 ] || { echo "image: needs root (podman, mmdebstrap)" >&2; exit 1; }

# Our podman settings (runc; no default ulimits), unless the caller brings their own.
export CONTAINERS_CONF=${CONTAINERS_CONF:-$here/containers.conf}
podman=(podman --runtime runc)

version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
tag=${BPFSYNC_IMAGE:-localhost/bpfsync:$version}
cache=$repo/.cache/image
mkdir -p "$cache"

# One build at a time (two test runs, or make image while a test builds): the second waits,
# then finds everything cached.
exec {lock}>"$cache/build.lock"
flock "$lock"

# Builds killed by SIGKILL (no trap ran) leave their directories: under the lock, every one is.
find "$cache" -maxdepth 1 -name 'build.*' -type d -exec rm -rf --one-file-system {} +
# Our temporary files: removed at the end, whatever happened. In .cache (the same file system as
# the cache), not /tmp: the base tarball is moved into place, never copied.
work=$(mktemp -d "$cache/build.XXXXXX")
cleanup() { rm -rf --one-file-system "$work"; }
trap cleanup EXIT

[ -x .venv/bin/python ] || { echo "image: no .venv: run \`make venv\` (make image does)" >&2; exit 1; }

# --- tools ---------------------------------------------------------------------------------------
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
if [ ${#missing[@]} -gt 0 ]; then
	say "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y -qq "${missing[@]}" ||
		{ apt-get update -qq && apt-get install -y -qq "${missing[@]}"; }
fi

# --- 1. the base ---------------------------------------------------------------------------------
# minbase: Essential packages and apt (apt stays, so an operator can add a debugging tool to a
# derived image). No Recommends (mmdebstrap's default). Documentation, man pages and locales are
# never unpacked (the copyright files are kept); the dpkg setting stays in the root, so packages
# installed later obey it too. The suites are those of a Debian 12 install (main, updates,
# security), as in tests/fresh/fresh-check.sh.
# bpftool is not included: the agent needs only libbpf.so.1 (it loads its BPF objects itself).
# merged-usr hook: /bin, /lib, /sbin as symlinks into /usr made by mmdebstrap, as Debian's own
# container images have it; without it bookworm's init-system-helpers pulls in usrmerge, which
# needs perl (50 MB of the image).
# shellcheck disable=SC2054 # (the commas are mmdebstrap's list of packages)
base_args=(--variant=minbase --include=python3,python3-venv,libbpf1,ca-certificates
	--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
	--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
	--dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
	--dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/lintian/*'
	bookworm)
mirrors=("deb http://deb.debian.org/debian bookworm main"
	"deb http://deb.debian.org/debian bookworm-updates main"
	"deb http://deb.debian.org/debian-security bookworm-security main")
# The tarball is keyed by mmdebstrap's arguments and rebuilt after 7 days so the image follows
# Debian's security updates; mmdebstrap's cleanup leaves no apt lists or .debs in it.
base_tar=$cache/base-$(printf '%s\n' "${base_args[@]}" "${mirrors[@]}" | sha256sum | cut -c1-12).tar
t0=$EPOCHREALTIME
if [ "${IMAGE_REBUILD_BASE:-0}" != 1 ] && [ -n "$(find "$base_tar" -mtime -7 2>/dev/null)" ]; then
	say "reusing $base_tar"
else
	say "making the base root with mmdebstrap"
	mkdir -p "$work/tmp"
	# Its own mount namespace: mmdebstrap (root mode) mounts /proc, /sys, /dev in its temporary
	# chroot, and killed half-way those would stay mounted on the host.
	# (Its output, which its hooks print even with --quiet, only when it fails.)
	TMPDIR=$work/tmp unshare --mount --propagation private -- \
		mmdebstrap --quiet --format=tar "${base_args[@]}" "$work/base.tar" "${mirrors[@]}" \
		>"$work/mmdebstrap.log" 2>&1 || {
		cat "$work/mmdebstrap.log" >&2
		echo "image: mmdebstrap failed" >&2
		exit 1
	}
	mv "$work/base.tar" "$base_tar"
	# Tarballs made with other arguments (an older version of this script) are never used again.
	find "$cache" -maxdepth 1 -name 'base-*.tar' ! -path "$base_tar" -delete
fi
# Tagged by the tarball's content, so a rebuilt tarball makes a new base (and the layers above
# it are built again) while an unchanged one is imported once.
base_img=localhost/bpfsync-base:$(sha256sum "$base_tar" | cut -c1-12)
if ! "${podman[@]}" image exists "$base_img"; then
	say "importing $base_img"
	"${podman[@]}" import --quiet "$base_tar" "$base_img" >/dev/null
fi
t_base=$(secs_since "$t0")

# --- 2. the agent's wheel and its dependencies ---------------------------------------------------
t0=$EPOCHREALTIME
ctx=$work/context
mkdir -p "$ctx/wheels" "$work/stage"
# The package must carry what `make bpf proto` built (git does not track it): without the tracer
# the agent would poll only, without the gRPC code it would not start.
for f in src/bpfsync/bpf/trace.bpf.o src/bpfsync/bpf/probe_fexit.bpf.o \
	src/bpfsync/transport/_proto/bpfsync_pb2.py src/bpfsync/transport/_proto/bpfsync_pb2_grpc.py; do
	[ -s "$f" ] || { echo "image: $f is missing: run \`make bpf proto\` (make image does)" >&2; exit 1; }
done
# A copy of the tree to build from: setuptools writes build/ and *.egg-info where it builds, and
# other builds or editors must not see those appear in the work tree (or race ours).
tar -C "$repo" --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' -cf - \
	pyproject.toml README.md src | tar -C "$work/stage" -xf -
# SOURCE_DATE_EPOCH: the wheel's zip timestamps come from it, so the same source gives the same
# wheel byte for byte, and podman's layer cache (keyed by what COPY brings) is hit on a rebuild.
# --no-build-isolation: the host's .venv has setuptools and wheel; no download needed.
# (Its output, setuptools' deprecation warnings included, only when it fails.)
SOURCE_DATE_EPOCH=$(git log -1 --format=%ct) PIP_DISABLE_PIP_VERSION_CHECK=1 \
	.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$ctx/wheels" \
	"$work/stage" >"$work/wheel.log" 2>&1 || {
	cat "$work/wheel.log" >&2
	echo "image: building the wheel failed" >&2
	exit 1
}
# The runtime dependencies as pyproject.toml names them (no extras: the agent needs none), and the
# versions the host's .venv holds as constraints: the image runs what the tests ran. Constraints
# only pin what gets installed, so the dev tools in the venv change nothing.
python3 - "$ctx/requirements.txt" <<'EOF'
import sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
open(sys.argv[1], "w").write("".join(d + "\n" for d in deps))
EOF
.venv/bin/python -m pip freeze --exclude-editable --disable-pip-version-check | grep -v '^#' \
	>"$ctx/constraints.txt"
t_wheel=$(secs_since "$t0")

# --- 3. the image --------------------------------------------------------------------------------
t0=$EPOCHREALTIME
revision=$(git rev-parse --short=12 HEAD)
if [ -n "$(git status --porcelain -- pyproject.toml src)" ]; then revision=$revision-dirty; fi
old_id=$("${podman[@]}" image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
build_args=(--runtime runc --network host --layers --pull=never
	--build-arg "BASE=$base_img" --build-arg "VERSION=$version" --build-arg "REVISION=$revision"
	-f "$here/Containerfile" -t "$tag")
if [ "${IMAGE_NO_CACHE:-0}" = 1 ]; then build_args+=(--no-cache); fi
# The host's CA bundle for pip, at a path of its own for the build's RUN steps only: it is
# never in a layer, and the root's ca-certificates package keeps its own bundle.
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
	build_args+=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro)
fi
# --network host: the RUN steps reach PyPI through the host's network and proxy settings (podman
# passes the proxy variables on); no bridge or firewall rules are set up for a build.
# --pull=never: the base is local, and no registry is ever asked (none is reachable here).
podman build "${build_args[@]}" "$ctx" >"$work/build.log" 2>&1 || {
	cat "$work/build.log" >&2
	echo "image: podman build failed" >&2
	exit 1
}
new_id=$("${podman[@]}" image inspect --format '{{.Id}}' "$tag")
# The image this build replaced, unless a container still uses it: each source change would
# otherwise leave an untagged image behind. Its layers shared with the new image stay.
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
	"${podman[@]}" rmi "$old_id" >/dev/null 2>&1 || true
fi
# Likewise older bases (a tarball rebuilt a week later): removed once no image is built on them.
for img in $("${podman[@]}" images --format '{{.Repository}}:{{.Tag}}' localhost/bpfsync-base); do
	if [ "$img" != "$base_img" ]; then "${podman[@]}" rmi "$img" >/dev/null 2>&1 || true; fi
done
t_image=$(secs_since "$t0")

size=$("${podman[@]}" image inspect --format '{{.Size}}' "$tag" |
	awk '{ printf "%.0f MB", $1 / 1e6 }')
say "base ${t_base} s, wheel ${t_wheel} s, podman build ${t_image} s"
say "built $tag (${new_id:0:12}, revision $revision, $size) in $(secs_since "$t_start") s"
