#!/usr/bin/env bash
# tests/fresh/fresh-check.sh (`make fresh-check`): a fresh machine passes.
#
# Proves that the repository's own Makefile sets everything up on a Debian 12 machine that has
# accumulated nothing (no /lib/modules, no apt lists, no venv, no .cache):
#   1. a new Debian bookworm root from mmdebstrap (the tarball is cached in .cache/fresh/; the
#      root unpacked from it is new on every run),
#   2. a clean clone of the committed HEAD (never the working tree) at /srv/bpfsync in the root,
#   3. inside the root (chroot): `make setup`, `make vm-kernel`, a smoke `make test`
#      (ruff, mypy and lint-imports included), one boot of the test VM, `make demo`,
#   4. cleanup, whatever happened (also on ^C / SIGTERM): every process of the run killed, the root
#      removed; mounts and bpffs pins never reach the host (see "namespaces" below),
#   5. the time of each phase and one PASS/FAIL line (exit status 0 only on PASS).
#
# Needs root, network to deb.debian.org and PyPI. Disk: about 4 GB while it runs (the root).
# Environment knobs:
#   FRESH_PYTEST_ARGS   what `make test` runs inside (default: tests/core tests/cli
#                       tests/vm/test_runner.py -x -q)
#   FRESH_VM_BOOT=0     skip the VM boot phase
#   FRESH_REBUILD_BASE=1  rebuild the cached base tarball (it is also rebuilt when 7 days old)
#   FRESH_KEEP_ROOT=1   keep the root for inspection (processes are still killed)
#   FRESH_INCLUDE_UNCOMMITTED="PATH..."  apply the working tree's uncommitted changes to these
#                       paths on top of HEAD (to try a set-up fix before committing it)
#
# Namespaces: each phase that runs in the root runs in a mount namespace of its own (`unshare
# --mount`): the mounts of /proc, /sys, /dev and a private bpffs instance on the root's
# /sys/fs/bpf exist only there and vanish with the phase's last process. So a crash or SIGKILL of
# this script can never leave a mount on the host, `rm -rf` of the root can never walk into the
# host's /dev or /sys, and no pin made inside ever appears in the host's /sys/fs/bpf (where the
# other engineer's tests pin theirs). The test and demo phases also get a network namespace of
# their own with just loopback: their agents pick free loopback ports, which would otherwise race
# the host's test runs for the same ports. No pid namespace: bpf_get_current_pid_tgid() reports
# init-namespace pids, so the agent's own-write suppression would break under one.
set -euo pipefail
export LC_ALL=C # $EPOCHREALTIME and awk agree on the decimal point

self=$(readlink -f "$0")

# --- inside a phase's namespaces (this script re-invoked by in_root via unshare) ---------------
if [ "${1:-}" = __in_root ]; then
	root=$2 net=$3 cmd=$4
	shift 4
	env_vars=("$@")
	# The root onto itself first: in the chroot "/" must be a mount point, as on a machine.
	# Otherwise `ip netns exec` and `ip -n` (tests/watch, tests/examples) fail with
	# '"mount --make-rslave /" failed: Invalid argument'.
	mount --bind "$root" "$root"
	# rbind: the root sees the host's submounts too (/dev/pts, /dev/shm) like a booted machine.
	# No --make-rslave needed: unshare --mount made every mount here private.
	mount --rbind /proc "$root/proc"
	mount --rbind /dev "$root/dev"
	# sysfs: a new instance rather than a bind of the host's, because sysfs shows the network
	# devices of the namespace that mounted it: with the host's, /sys/class/net/<veth> of a test
	# in the private network namespace does not exist (tests/watch reads its ifindex there).
	# Then the host's cgroup mounts, as on a booted machine.
	mount -t sysfs sysfs "$root/sys"
	if mountpoint -q /sys/fs/cgroup; then mount --rbind /sys/fs/cgroup "$root/sys/fs/cgroup"; fi
	# A new, empty bpffs instance, as a fresh machine has (systemd mounts it at boot): pins made
	# inside never show in the host's /sys/fs/bpf and die with this namespace.
	mount -t bpf bpf "$root/sys/fs/bpf"
	mount --bind -o ro /etc/resolv.conf "$root/etc/resolv.conf"
	# The host's CA bundle, which holds the TLS-inspecting proxy's CA: pip in a bare root fails
	# with CERTIFICATE_VERIFY_FAILED without it (apt is plain http and needs none). Mounted at a
	# path of its own, so the root's ca-certificates package keeps its own bundle.
	mount --bind -o ro /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/host-ca-certificates.crt"
	# The VM runner allows one VM at a time on this machine through a lock in /tmp
	# (tests/vm/runner.py); share the host's lock so our VM waits for the other engineer's.
	mount --bind /tmp/bpfsync-vm.lock "$root/tmp/bpfsync-vm.lock"
	if [ "$net" = private ]; then ip link set lo up; fi
	rc=0
	# env -i: nothing of the host's environment (its venv on PATH, MAKEFLAGS from an outer make,
	# HOME/.cache) leaks in; only what a fresh login would have, plus the CA bundle and proxy.
	chroot "$root" /usr/bin/env -i "${env_vars[@]}" /bin/bash -c "cd /srv/bpfsync && $cmd" || rc=$?
	# The pins a phase leaves behind (maps.debug/progs.debug come with every bpffs instance).
	left=$(find "$root/sys/fs/bpf" -mindepth 1 -maxdepth 1 ! -name maps.debug ! -name progs.debug \
		-printf '%f ' 2>/dev/null || true)
	if [ -n "$left" ]; then echo "fresh-check: WARNING: pins left in the root's bpffs: $left"; fi
	exit "$rc"
fi

# --- on the host ---------------------------------------------------------------------------------
[ "$(id -u)" -eq 0 ] || { echo "fresh-check: FAIL: needs root (chroot, mounts)" >&2; exit 1; }
repo=$(git -C "$(dirname "$self")" rev-parse --show-toplevel)
cache=$repo/.cache/fresh
# remove_run and cleanup compare paths with /proc/self/mountinfo, which escapes whitespace
case $cache in
*[[:space:]]*) echo "fresh-check: FAIL: whitespace in $cache" >&2; exit 1 ;;
esac
pytest_args=${FRESH_PYTEST_ARGS:-tests/core tests/cli tests/vm/test_runner.py -x -q}

# The base tarball: what mmdebstrap makes is the same for everyone, so it is cached (keyed by its
# arguments, rebuilt after 7 days so it follows Debian's updates). Only the tarball is cached:
# mmdebstrap's cleanup removes the apt lists and .debs, so a root unpacked from it has nothing.
# The suites are those of a Debian 12 install (main, updates, security).
base_args=(--variant=apt --include=ca-certificates,git,make,python3 bookworm)
mirrors=("deb http://deb.debian.org/debian bookworm main"
	"deb http://deb.debian.org/debian bookworm-updates main"
	"deb http://deb.debian.org/debian-security bookworm-security main")
base=$cache/base-$(printf '%s\n' "${base_args[@]}" "${mirrors[@]}" | sha256sum | cut -c1-12).tar

t_start=$EPOCHREALTIME
phase_names=() phase_secs=() phase_status=()
current=preflight phase_t0=$t_start phase_child=
commit=? root_size=? run=

# secs_since T0: seconds since T0 (an $EPOCHREALTIME), one decimal
secs_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

# reap MESSAGE [RUN]: kill every process of run RUN (default: this run) that is still alive:
# those carrying BPFSYNC_FRESH_RUN=<RUN's name> and those whose root is in RUN/root (in case one
# cleared its environment). Bash builtins only in the scan, so it never finds its own helpers.
reap() {
	local label=$1 r=${2:-$run} p pid kv rootlink found=() alive=() what=()
	local id=${r##*/} root=$r/root
	for p in /proc/[0-9]*; do
		pid=${p#/proc/}
		if [ "$pid" = $$ ]; then continue; fi
		rootlink=$(readlink "$p/root" 2>/dev/null) || continue
		if [ "$rootlink" = "$root" ] || [[ $rootlink == "$root"/* ]]; then
			found+=("$pid")
			continue
		fi
		while IFS= read -r -d '' kv; do
			if [ "$kv" = "BPFSYNC_FRESH_RUN=$id" ]; then found+=("$pid"); break; fi
		done 2>/dev/null <"$p/environ" || true
	done
	if [ ${#found[@]} -eq 0 ]; then return 0; fi
	for pid in "${found[@]}"; do
		what+=("$pid: $(tr '\0\n' '  ' 2>/dev/null <"/proc/$pid/cmdline" | cut -c1-100)")
	done
	echo "fresh-check: $label: killing ${#found[@]} process(es):"
	printf '  %s\n' "${what[@]}"
	kill -TERM "${found[@]}" 2>/dev/null || true
	for _ in $(seq 50); do # up to 5 s to exit on SIGTERM, then SIGKILL
		alive=()
		for pid in "${found[@]}"; do
			if [ -e "/proc/$pid" ]; then alive+=("$pid"); fi
		done
		if [ ${#alive[@]} -eq 0 ]; then return 0; fi
		sleep 0.1
	done
	kill -KILL "${alive[@]}" 2>/dev/null || true
	sleep 0.5
	return 0
}

# remove_run RUN: remove a run's directory, never across a mount. Nothing is ever mounted below
# it in this namespace (the phases mount in their own); check anyway: rm -rf across a bind mount
# would delete the host's files.
remove_run() {
	local mounted
	mounted=$(awk -v r="$1" '$5 == r || index($5, r "/") == 1 {print $5}' /proc/self/mountinfo)
	if [ -n "$mounted" ]; then
		echo "fresh-check: NOT removing $1, still mounted there: $mounted" >&2
		return 1
	fi
	rm -rf --one-file-system "$1"
}

cleanup() {
	local rc=$? t0=$EPOCHREALTIME
	trap - EXIT INT TERM
	set +e
	if [ -n "$phase_child" ]; then # interrupted (signal) in the middle of a phase
		kill -TERM "$phase_child" 2>/dev/null
		phase_names+=("$current") phase_secs+=("$(secs_since "$phase_t0")")
		phase_status+=("interrupted (exit $rc)")
		reap "stopping the interrupted phase $current"
	elif [ -n "$run" ]; then
		reap "WARNING: still running at the end"
	fi
	if [ -n "$run" ] && [ -d "$run" ]; then
		root_size=$(du -sh --one-file-system "$run/root" 2>/dev/null | cut -f1)
		if [ "${FRESH_KEEP_ROOT:-0}" = 1 ]; then
			echo "fresh-check: root kept at $run/root (FRESH_KEEP_ROOT=1): remove it with rm -rf $run"
		else
			remove_run "$run" || rc=1
		fi
	fi
	phase_names+=(cleanup) phase_secs+=("$(secs_since "$t0")") phase_status+=(ok)
	echo
	echo "fresh-check: phases"
	local i
	for i in "${!phase_names[@]}"; do
		printf '  %-10s %8s s  %s\n' "${phase_names[$i]}" "${phase_secs[$i]}" "${phase_status[$i]}"
	done
	local total
	total=$(secs_since "$t_start")
	if [ "$rc" -eq 0 ]; then
		echo "fresh-check: PASS in $total s (commit $commit, root $root_size)"
	else
		echo "fresh-check: FAIL in phase $current (exit $rc) after $total s" \
			"(commit $commit, root $root_size)"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT # (a shell that started us with SIGINT ignored, e.g. `cmd &`, keeps it so)
trap 'exit 143' TERM

# This run's directory: the root and temporary files; removed at the end.
mkdir -p "$cache"
run=$(mktemp -d "$cache/run.XXXXXX")
root=$run/root
# Held as long as this run lives: a later run's sweep (below) leaves this directory alone.
exec {run_lock}>"$run/.lock"
flock -n "$run_lock"
# Every process this run starts carries this variable (env -i inside the root sets it again):
# reap finds leftovers by it, and tests/fresh/conftest.py does not collect the fresh check
# inside a fresh check.
export BPFSYNC_FRESH_RUN=${run##*/}
ca=/etc/ssl/host-ca-certificates.crt # the host's bundle, as the root sees it (in_root mounts it)
root_env=(HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
	LANG=C.UTF-8 TERM=dumb PIP_CERT=$ca SSL_CERT_FILE=$ca REQUESTS_CA_BUNDLE=$ca
	BPFSYNC_FRESH_RUN=$BPFSYNC_FRESH_RUN)
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
	if [ -n "${!v:-}" ]; then root_env+=("$v=${!v}"); fi
done

# A run killed by SIGKILL (no trap runs) leaves its directory and maybe processes behind: sweep
# runs whose lock nobody holds (older than a minute: a run starting now may not have locked yet).
for stale in $(find "$cache" -maxdepth 1 -name 'run.*' -type d -mmin +1); do
	if [ "$stale" != "$run" ] && flock -n "$stale/.lock" true 2>/dev/null; then
		reap "sweeping the stale $stale" "$stale"
		if remove_run "$stale"; then echo "fresh-check: removed the stale $stale"; fi
	fi
done

# phase NAME CMD...: run and time one phase. CMD runs in the background and we `wait` for it: a
# trapped signal interrupts `wait` at once, while bash would run the trap only after a foreground
# command has finished (which can be minutes for `make setup`).
phase() {
	local name=$1 rc=0
	shift
	current=$name phase_t0=$EPOCHREALTIME
	echo
	echo "=== fresh-check: $name ($(date +%T)) ==="
	"$@" &
	phase_child=$!
	wait "$phase_child" || rc=$?
	phase_child=
	phase_names+=("$name") phase_secs+=("$(secs_since "$phase_t0")")
	if [ "$rc" -ne 0 ]; then
		phase_status+=("FAILED (exit $rc)")
		exit "$rc"
	fi
	phase_status+=(ok)
	reap "WARNING: left running by $name" # e.g. an agent the demo did not stop
}

# in_root [--private-net] CMD: run CMD with bash in the root's clone, in mount (and network)
# namespaces of its own.
in_root() {
	local net=host
	if [ "$1" = --private-net ]; then net=private; shift; fi
	local ns=(--mount --propagation private)
	if [ "$net" = private ]; then ns+=(--net); fi
	unshare "${ns[@]}" -- bash "$self" __in_root "$root" "$net" "$1" "${root_env[@]}"
}

host_tools() {
	local missing=()
	command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
	command -v unshare >/dev/null || missing+=(util-linux)
	command -v ip >/dev/null || missing+=(iproute2)
	if [ ${#missing[@]} -eq 0 ]; then return 0; fi
	echo "installing on the host: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y -qq "${missing[@]}" ||
		{ apt-get update -qq && apt-get install -y -qq "${missing[@]}"; }
}

make_base() {
	exec {lock}>"$cache/base.lock" # two checks at once build it once
	flock "$lock"
	if [ "${FRESH_REBUILD_BASE:-0}" != 1 ] && [ -n "$(find "$base" -mtime -7 2>/dev/null)" ]; then
		echo "reusing $base"
		return 0
	fi
	mkdir -p "$run/tmp"
	# Its own mount namespace: mmdebstrap (root mode) mounts /proc, /sys, /dev in its temporary
	# chroot; killed half-way, those would stay mounted on the host. Its temporary directory and
	# the tarball being written are in $run: removed at the end, whatever happened.
	TMPDIR=$run/tmp unshare --mount --propagation private -- \
		mmdebstrap --quiet --format=tar "${base_args[@]}" "$run/base.tar" "${mirrors[@]}"
	mv "$run/base.tar" "$base"
}

unpack() {
	mkdir "$root"
	tar -C "$root" --numeric-owner -xpf "$base"
	# The point of the check: nothing accumulated. Fail loudly if the base ever brings any.
	local f bad=()
	for f in usr/lib/modules root/.cache srv/bpfsync; do
		if [ -e "$root/$f" ]; then bad+=("/$f"); fi
	done
	if [ -n "$(find "$root/var/lib/apt/lists" -type f ! -name lock)" ]; then
		bad+=(/var/lib/apt/lists/*)
	fi
	if [ ${#bad[@]} -gt 0 ]; then echo "the base root is not fresh: ${bad[*]}" >&2; return 1; fi
	# Targets for in_root's bind mounts of single files.
	touch "$root/etc/ssl/host-ca-certificates.crt" "$root/tmp/bpfsync-vm.lock"
	touch /tmp/bpfsync-vm.lock # runner.py creates it the same way (open "a")
	du -sh "$root" | cut -f1 | sed 's/^/base root: /'
}

clone() {
	# A clean clone of the committed HEAD: uncommitted and untracked files (the working tree, the
	# host's .venv and .cache) are deliberately not there. --no-hardlinks: the root owns its copy.
	git clone --quiet --no-hardlinks "$repo" "$root/srv/bpfsync"
	git -C "$root/srv/bpfsync" log -1 --format='HEAD %h %s'
	# Opt-in, for trying a set-up fix before committing it: the uncommitted changes to the named
	# paths (e.g. FRESH_INCLUDE_UNCOMMITTED="Makefile tests/vm/fetch-kernel.sh") are applied on
	# top of HEAD, and the PASS/FAIL line says so.
	if [ -n "${FRESH_INCLUDE_UNCOMMITTED:-}" ]; then
		local paths
		read -ra paths <<<"$FRESH_INCLUDE_UNCOMMITTED"
		git -C "$repo" diff HEAD -- "${paths[@]}" >"$run/uncommitted.diff"
		if [ -s "$run/uncommitted.diff" ]; then
			git -C "$root/srv/bpfsync" apply "$run/uncommitted.diff"
			echo "applied the uncommitted changes to:" \
				"$(git -C "$root/srv/bpfsync" diff --name-only | xargs)"
		else
			echo "no uncommitted changes to: ${paths[*]}"
		fi
	fi
	local dirty
	dirty=$(git -C "$repo" status --porcelain | wc -l)
	if [ "$dirty" -gt 0 ]; then
		echo "note: $dirty uncommitted change(s) in $repo; the check runs the commit"
	fi
}

vm_boot() {
	# One boot of the test VM with the kernel `make vm-kernel` fetched: the guest's initramfs is
	# built from the root's /lib/modules, which a fresh machine does not have before vm-kernel.
	in_root --private-net 'ver=$(cat .cache/vm/version) &&
		out=$(.venv/bin/python tests/vm/runner.py uname -r) && echo "$out" &&
		grep -qxF "$ver" <<<"$(tr -d "\r" <<<"$out")"'
}

phase host-tools host_tools
phase base make_base
phase unpack unpack
phase clone clone
commit=$(git -C "$root/srv/bpfsync" rev-parse --short HEAD)
if [ -n "$(git -C "$root/srv/bpfsync" status --porcelain)" ]; then
	commit="$commit + uncommitted $(git -C "$root/srv/bpfsync" diff --name-only | xargs)"
fi
phase setup in_root 'make setup'
phase vm-kernel in_root 'make vm-kernel'
phase test in_root --private-net "make test PYTEST_ARGS='$pytest_args'"
if [ "${FRESH_VM_BOOT:-1}" != 0 ]; then phase vm-boot vm_boot; fi
phase demo in_root --private-net 'make demo'
current=cleanup
