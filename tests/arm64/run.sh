#!/usr/bin/env bash
# The aarch64 check (a 64-bit Raspberry Pi OS stand-in): build a Debian bookworm arm64 userland with debootstrap,
# run it under qemu-user-static, install edgellm there from wheels only (no compiler in the root, checked), then
# under emulation, for each CPU setting (Pi 5: cortex-a76, Pi 4: cortex-a72):
#   - the quant, ops, ternary and f32 tile kernel tests;
#   - tests/arm64/check_asm.py: the hot mat-vec loops are vectorized (NEON fmla / int16 lanes);
# and once (cortex-a76): `edgellm pull --compile` from a cold JIT cache (must say it compiles), then
# `edgellm run --temp 0` on the default model, whose text must equal the x86 run's, and `edgellm bench` without
# llama-cpp-python (edgellm alone, llama.cpp skipped with the reason), none of them printing a warning.
# Anything that does not work fails the script (no silent skip).
#
# usage: tests/arm64/run.sh        (as root: it installs debootstrap/qemu-user-static if missing, registers binfmt)
# env:   EDGELLM_ARM64_CACHE  cache dir (default ~/.cache/edgellm-arm64): the bootstrapped root and the installed
#                             dependencies as tarballs, the downloaded wheels; used when present and valid, rebuilt
#                             otherwise (the script never depends on it)
#        EDGELLM_ARM64_CPUS   CPU settings to check (default "cortex-a76 cortex-a72")
#        EDGELLM_ARM64_KEEP=1 keep the root (printed) instead of deleting it at exit
#        EDGELLM_ARM64_MIRROR Debian mirror (default: the host's apt source, else deb.debian.org)
#        PYTHON               the host Python with edgellm installed (default python3): builds the wheel, gives the
#                             x86 reference text and the default model's path
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=$(realpath -m "${EDGELLM_ARM64_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgellm-arm64}")
CPUS=${EDGELLM_ARM64_CPUS:-"cortex-a76 cortex-a72"}
PY=${PYTHON:-python3}
SUITE=bookworm
PYVER=3.11            # bookworm's python3, as on 64-bit Raspberry Pi OS
INCLUDE=python3,python3-venv
PROMPT="The three primary colors are"
NGEN=16
start=$(date +%s)
t0=$start

say() { echo "arm64: $*"; }
die() { echo "arm64: FAILED: $*" >&2; exit 1; }
lap() { local now; now=$(date +%s); say "$1 in $((now - t0)) s"; t0=$now; }

# Numba's target per CPU, as a real Pi gives it (LLVM reads the core from /proc/cpuinfo's "CPU part", the features
# from its "Features" line: Pi 5 "fp asimd aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimdrdm lrcpc dcpop
# asimddp", Pi 4 "fp asimd crc32"); under qemu-user the guest sees the host's /proc/cpuinfo, so we name them.
cpu_features() {
    case $1 in
        cortex-a76) echo "+fp-armv8,+neon,+aes,+sha2,+crc,+lse,+fullfp16,+rdm,+rcpc,+ccpp,+dotprod" ;;
        cortex-a72) echo "+fp-armv8,+neon,+crc" ;;
        *) die "unknown CPU setting $1 (known: cortex-a76, cortex-a72)" ;;
    esac
}
for cpu in $CPUS; do cpu_features "$cpu" >/dev/null; done

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mounts, binfmt registration)"
[ "$(uname -m)" = x86_64 ] || die "runs on an x86_64 host (it emulates aarch64); on a real Pi run the tests directly"
command -v "$PY" >/dev/null || die "no host Python $PY"
"$PY" -c "import edgellm" 2>/dev/null || die "$PY cannot import edgellm (install it: pip install -e .)"

# ---------------------------------------------------------------- host tools and binfmt
if ! command -v debootstrap >/dev/null || [ ! -x /usr/bin/qemu-aarch64-static ]; then
    say "installing debootstrap and qemu-user-static"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap qemu-user-static >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap qemu-user-static >/dev/null; } \
        || die "apt-get install debootstrap qemu-user-static"
fi
BINFMT=/proc/sys/fs/binfmt_misc
if [ ! -e $BINFMT/register ]; then
    mount -t binfmt_misc binfmt_misc $BINFMT || die "cannot mount binfmt_misc"
fi
if [ ! -e $BINFMT/qemu-aarch64 ]; then
    # Debian's entry (flags OPF: F opens the interpreter now, so it also runs inside the chroot)
    conf=/usr/lib/binfmt.d/qemu-aarch64.conf
    [ -f $conf ] || die "no $conf (qemu-user-static's binfmt entry)"
    cat $conf > $BINFMT/register || die "cannot register qemu-aarch64 with binfmt_misc"
fi
grep -q '^enabled' $BINFMT/qemu-aarch64 || die "binfmt entry qemu-aarch64 is disabled"
INTERP=$(sed -n 's/^interpreter //p' $BINFMT/qemu-aarch64)
FLAGS=$(sed -n 's/^flags: //p' $BINFMT/qemu-aarch64)
lap "host tools and binfmt ready"

# ---------------------------------------------------------------- work dir, cleanup
mounts_under() { awk -v r="$1" '$2 == r || index($2, r "/") == 1 {print $2}' /proc/mounts | sort -r; }
remove_work() {  # unmount what is mounted under a work dir, then delete it (never across a mount)
    local m
    for m in $(mounts_under "$1"); do umount "$m" 2>/dev/null || umount -l "$m" || true; done
    if [ -n "$(mounts_under "$1")" ]; then
        echo "arm64: still mounted under $1, not deleting it: $(mounts_under "$1" | tr '\n' ' ')" >&2
        return 1
    fi
    rm -rf --one-file-system "$1"
}
# work dirs of runs that were killed (their process is gone) are removed; running ones are left alone
for old in /tmp/edgellm-arm64.*; do
    [ -f "$old/pid" ] && ! kill -0 "$(cat "$old/pid")" 2>/dev/null && remove_work "$old" || true
done
WORK=$(mktemp -d /tmp/edgellm-arm64.XXXXXX)
echo $$ > "$WORK/pid"
ROOT=$WORK/root
mkdir -p "$ROOT" "$CACHE"
cleanup() {
    local rc=$?
    # a step still running (interrupted or timed out) stops first: the emulated one with its whole process group
    if [ -n "${STEP:-}" ]; then kill -TERM -- "-$STEP" 2>/dev/null && sleep 3 || true; fi
    pkill -TERM -P $$ 2>/dev/null && sleep 2 || true
    if [ "${EDGELLM_ARM64_KEEP:-0}" = 1 ]; then
        local m
        for m in $(mounts_under "$ROOT"); do umount "$m" 2>/dev/null || umount -l "$m" || true; done
        rm -f "$WORK/pid"
        say "kept the root: $ROOT"
    else
        remove_work "$WORK" || true
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- the bootstrapped root (cached as a tarball)
mirror() {
    if [ -n "${EDGELLM_ARM64_MIRROR:-}" ]; then echo "$EDGELLM_ARM64_MIRROR"; return; fi
    local m
    m=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ && $2 ~ /debian\/?$/ {print $2; exit}')
    [ -n "$m" ] || m=$(awk '$1 == "deb" && $3 ~ /^bookworm$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    echo "${m:-http://deb.debian.org/debian}"
}
ROOT_TAR=$CACHE/$SUITE-arm64-minbase-$(echo "$INCLUDE" | tr ',' '-').tar
root_works() { chroot "$ROOT" /usr/bin/python3 -c "import ensurepip, venv" 2>/dev/null; }
if [ -f "$ROOT_TAR" ] && tar -xpf "$ROOT_TAR" -C "$ROOT" 2>/dev/null && root_works; then
    lap "root unpacked from the cache ($ROOT_TAR)"
else
    rm -rf --one-file-system "$ROOT" && mkdir -p "$ROOT"
    M=$(mirror)
    say "debootstrap $SUITE arm64 from $M (a few minutes) ..."
    debootstrap --arch=arm64 --variant=minbase --include=$INCLUDE $SUITE "$ROOT" "$M" > "$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap (log above)"; }
    root_works || die "the bootstrapped root cannot run python3 (binfmt: $INTERP, flags $FLAGS)"
    rm -rf "$ROOT"/var/cache/apt/archives/*.deb
    tar -cpf "$ROOT_TAR.part" -C "$ROOT" . && mv "$ROOT_TAR.part" "$ROOT_TAR" || say "could not cache the root (continuing)"
    lap "root bootstrapped"
fi
[ "$(chroot "$ROOT" /usr/bin/python3 -c 'import platform; print(platform.machine())')" = aarch64 ] \
    || die "python3 in the root is not aarch64"
[ "$(chroot "$ROOT" /usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = $PYVER ] \
    || die "the root's python3 is not $PYVER"

# ---------------------------------------------------------------- wheels only (downloaded on the host)
mkdir -p "$WORK/dist" "$ROOT/tmp/wheels"
# the wheel is built from a copy of the working tree's files (no stale build/ leftovers, no .venv)
mkdir -p "$WORK/src"
(cd "$REPO" && git ls-files -co --exclude-standard -z | tar -cf - --null --ignore-failed-read -T - 2>/dev/null) \
    | tar -xf - -C "$WORK/src" \
    || die "copying the source tree (git ls-files)"
"$PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$WORK/src" > "$WORK/wheel.log" 2>&1 \
    || { tail -20 "$WORK/wheel.log" >&2; die "building the edgellm wheel"; }
WHL=$(ls "$WORK"/dist/edgellm-*.whl)
# edgellm's dependencies as its wheel declares them, plus pytest: aarch64 / CPython 3.11 binary wheels only,
# resolved afresh each time; files already in the cache dir are not downloaded again, and only the files this
# resolution chose go into the root
mkdir -p "$CACHE/wheels"
# (bookworm's glibc is 2.36: every manylinux_2_17 .. 2_36 tag installs there; llguidance ships manylinux_2_31)
PLATFORMS=$(for v in $(seq 17 36); do printf -- "--platform manylinux_2_%s_aarch64 " "$v"; done)
"$PY" -m pip download --only-binary=:all: $PLATFORMS --platform manylinux2014_aarch64 \
    --python-version $PYVER --implementation cp --abi cp311 -d "$CACHE/wheels" "$WHL" pytest \
    > "$WORK/download.log" 2>&1 || { tail -20 "$WORK/download.log" >&2; die "pip download of aarch64 wheels (log above)"; }
sed -nE 's/^ *(Saved|File was already downloaded) (.*\.whl)$/\2/p' "$WORK/download.log" | grep -v '/edgellm-[^/]*$' \
    | while read -r f; do cp "$f" "$ROOT/tmp/wheels/"; done || true
rm -f "$CACHE"/wheels/edgellm-*.whl
[ "$(ls "$ROOT/tmp/wheels" | wc -l)" -gt 10 ] || { cat "$WORK/download.log" >&2; die "no aarch64 wheels collected"; }
cp "$WHL" "$ROOT/tmp/wheels/"
lap "wheels ready ($(ls "$ROOT"/tmp/wheels | wc -l) files)"

# the dependencies' venv is cached too, keyed on the root and the exact wheel files; edgellm itself is always
# installed afresh from this commit's wheel
pip_root() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root /opt/venv/bin/pip "$@"; }
deps_work() { chroot "$ROOT" /opt/venv/bin/python -c "import numba, numpy, llvmlite, tokenizers, gguf, typer, pytest" 2>/dev/null; }
VENV_TAR=$CACHE/venv-$( (basename "$ROOT_TAR"; ls "$ROOT/tmp/wheels" | grep -v '^edgellm-') | sha256sum | cut -c1-16).tar
if [ -f "$VENV_TAR" ] && tar -xpf "$VENV_TAR" -C "$ROOT" 2>/dev/null && deps_work \
        && pip_root install -q --no-index --no-deps --force-reinstall "/tmp/wheels/$(basename "$WHL")" > "$WORK/install.log" 2>&1; then
    say "dependencies from the cache ($VENV_TAR)"
else
    rm -rf "$ROOT/opt/venv"
    chroot "$ROOT" /usr/bin/python3 -m venv /opt/venv || die "python3 -m venv in the root"
    pip_root install -q --no-index --find-links /tmp/wheels edgellm pytest > "$WORK/install.log" 2>&1 \
        || { tail -30 "$WORK/install.log" >&2; die "pip install --no-index (wheels only) in the root (log above)"; }
    rm -f "$CACHE"/venv-*.tar
    tar -cpf "$VENV_TAR.part" -C "$ROOT" opt/venv && mv "$VENV_TAR.part" "$VENV_TAR" || say "could not cache the venv (continuing)"
fi
pip_root check > "$WORK/check.log" 2>&1 || { cat "$WORK/check.log" >&2; die "pip check in the root"; }
rm -rf "$ROOT/tmp/wheels"
lap "edgellm installed from wheels"

# no compiler anywhere in the root (a Pi user without build tools)
for c in gcc cc c++ g++ clang tcc; do
    if chroot "$ROOT" /bin/sh -c "command -v $c" >/dev/null 2>&1; then die "a compiler ($c) is present in the root"; fi
done
if ls "$ROOT"/usr/bin "$ROOT"/usr/local/bin "$ROOT"/opt/venv/bin 2>/dev/null | grep -Eq '(^|-)(gcc|g\+\+|clang)(-[0-9.]+)?$'; then
    die "a compiler binary is present in the root"
fi

# ---------------------------------------------------------------- tests, model, mounts
cp -r "$REPO/tests" "$ROOT/opt/tests"
MODEL=$("$PY" -c "from edgellm.runtime.fetch import pull; print(pull())") || die "the default model on the host"
mkdir -p "$ROOT/root/.cache/edgellm"
cp "$MODEL" "$ROOT/root/.cache/edgellm/"
mkdir -p "$ROOT/proc" "$ROOT/dev/shm"
mount -t proc proc "$ROOT/proc"
mount -t tmpfs -o size=256m tmpfs "$ROOT/dev/shm"
[ -c "$ROOT/dev/null" ] || die "no /dev/null in the root"

# run a command in the root under emulation with a CPU setting; stdout/stderr as the caller redirects them. It runs
# in a process group of its own that the shell waits for, so that INT/TERM (e.g. CI's timeout) reach the traps at
# once and cleanup stops the whole group (the command and what it started)
STEP=
in_root() {
    local cpu=$1 rc=0; shift
    setsid chroot "$ROOT" /usr/bin/env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
        EDGELLM_CACHE=/root/.cache/edgellm QEMU_CPU=max NUMBA_CPU_NAME="$cpu" NUMBA_CPU_FEATURES="$(cpu_features "$cpu")" \
        "$@" &
    STEP=$!
    wait "$STEP" || rc=$?
    STEP=
    return $rc
}

# ---------------------------------------------------------------- under emulation, per CPU setting
for cpu in $CPUS; do
    say "[$cpu] kernel tests (quants, ops, ternary, f32 tiles) ..."
    in_root "$cpu" /bin/sh -c "cd /opt/tests && python -m pytest -q -p no:cacheprovider test_quants.py test_ops.py test_ternary.py test_ftile.py" \
        || die "[$cpu] kernel tests"
    lap "[$cpu] kernel tests passed"
    in_root "$cpu" python /opt/tests/arm64/check_asm.py || die "[$cpu] the hot loops are not vectorized"
    lap "[$cpu] machine code checked"
done

# ---------------------------------------------------------------- a Pi user's first run, against x86
cpu=${CPUS%% *}
"$PY" -m edgellm.cli run --temp 0 -t 2 -n $NGEN -p "$PROMPT" > "$WORK/x86.txt" 2> "$WORK/x86.err" \
    || { cat "$WORK/x86.err" >&2; die "edgellm run on the host"; }
[ -s "$WORK/x86.txt" ] || die "the x86 run produced no text"
lap "x86 reference run"
# a cold JIT cache of its own (the kernel tests above filled the package's): what a new Pi user starts with
first_run() { in_root "$cpu" /usr/bin/env NUMBA_CACHE_DIR=/root/.cache/numba-first-run "$@"; }
first_run edgellm pull --compile > "$WORK/pull.out" 2> "$WORK/pull.err" \
    || { cat "$WORK/pull.err" >&2; die "[$cpu] edgellm pull --compile"; }
cat "$WORK/pull.err"
grep -q "compiling kernels, once" "$WORK/pull.err" || die "[$cpu] a cold JIT cache did not say it compiles kernels"
lap "[$cpu] edgellm pull --compile (cold JIT cache)"
first_run edgellm run --temp 0 -t 2 -n $NGEN -p "$PROMPT" > "$WORK/arm64.txt" 2> "$WORK/arm64.err" \
    || { cat "$WORK/arm64.err" >&2; die "[$cpu] edgellm run"; }
cat "$WORK/arm64.err"
lap "[$cpu] edgellm run (warm JIT cache)"
# `edgellm bench` where llama-cpp-python cannot be installed (no wheel, no compiler): edgellm alone, and why
first_run edgellm bench -p 4 -n 2 -r 1 --no-ceiling --json > "$WORK/bench.json" 2> "$WORK/bench.err" \
    || { cat "$WORK/bench.err" >&2; die "[$cpu] edgellm bench without llama-cpp-python"; }
grep -q "llama.cpp skipped: llama-cpp-python is not installed" "$WORK/bench.err" \
    || { cat "$WORK/bench.err" >&2; die "[$cpu] edgellm bench did not say why llama.cpp was skipped"; }
"$PY" -c "import json, sys; rows = json.load(open(sys.argv[1])); assert {r['backend'] for r in rows} == {'edgellm'} \
and len(rows) == 2 and all(r['avg_ts'] > 0 for r in rows), rows" "$WORK/bench.json" || die "[$cpu] edgellm bench rows"
lap "[$cpu] edgellm bench without llama-cpp-python (edgellm alone)"
failed=0
if cmp -s "$WORK/x86.txt" "$WORK/arm64.txt"; then
    say "greedy text identical to x86 ($NGEN tokens): $(head -c 200 "$WORK/arm64.txt" | tr '\n' ' ')"
else
    echo "x86:   $(cat "$WORK/x86.txt")" >&2
    echo "arm64: $(cat "$WORK/arm64.txt")" >&2
    echo "arm64: FAILED: [$cpu] greedy text differs from x86" >&2; failed=1
fi
if grep -q "compiling kernels" "$WORK/arm64.err"; then
    echo "arm64: FAILED: [$cpu] a warm JIT cache still says it compiles kernels" >&2; failed=1
fi
if grep -i "warning" "$WORK/pull.err" "$WORK/arm64.err" "$WORK/bench.err" >&2; then
    echo "arm64: FAILED: [$cpu] warnings on start (above)" >&2; failed=1
fi
[ $failed = 0 ] || exit 1
say "passed in $(( $(date +%s) - start )) s"
