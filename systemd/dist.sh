#!/usr/bin/env bash
# Build an offline install kit (`make dist`): the project and every dependency as wheels for one
# platform and Python, with install.sh, the unit, the example configs and the docs, in one tarball
# that `install.sh --offline FILE` installs with no network (docs/install.md).
#
#   systemd/dist.sh PLATFORM [PYTHON_VERSION] [OUT_DIR]
#   make dist PLATFORM=manylinux_2_36_aarch64                      # Debian 12, Raspberry Pi OS 64-bit (bookworm)
#   make dist PLATFORM=manylinux_2_41_aarch64 PYTHON_VERSION=3.13  # Debian 13 (trixie)
#
# PLATFORM is a pip platform tag: manylinux_2_NN_<arch> (the target's glibc 2.NN; wheels for any
# older glibc are taken too) or manylinux2014_<arch> (glibc 2.17), <arch> x86_64 or aarch64. Only
# wheels are downloaded (--only-binary=:all:); the few pure-Python dependencies published as source
# only get a wheel made here. A compiled dependency without a wheel for the platform fails the build
# here, not the install on the gateway. Needs PyPI and python3 with venv. install.sh uses it too,
# for this machine, so an install with network and one without take the same path.
set -euo pipefail

die() { echo "dist.sh: $*" >&2; exit 1; }

platform="${1:?usage: systemd/dist.sh PLATFORM [PYTHON_VERSION] [OUT_DIR]}"
py_version="${2:-3.11}"
out="${3:-dist}"
python="${PYTHON:-python3}"
src="$(cd "$(dirname "$0")/.." && pwd)"

case "$platform" in
    *_x86_64) machine=x86_64 ;;
    *_aarch64) machine=aarch64 ;;
    *_armv7l|*_armv6l) die "$platform: 32-bit ARM is not supported (awscrt publishes no wheel for it)" ;;
    *) die "$platform: give manylinux_2_NN_x86_64 or manylinux_2_NN_aarch64 (e.g. manylinux_2_36_aarch64)" ;;
esac
case "$platform" in
    manylinux_2_*) glibc_minor="${platform#manylinux_2_}"; glibc_minor="${glibc_minor%%_*}" ;;
    manylinux2014_*) glibc_minor=17 ;;
    *) die "$platform: only manylinux (glibc) platforms are supported" ;;
esac
[[ "$glibc_minor" =~ ^[0-9]+$ ]] && [ "$glibc_minor" -ge 17 ] || die "$platform: glibc 2.$glibc_minor is older than manylinux2014 (2.17)"
[[ "$py_version" =~ ^3\.[0-9]+$ ]] || die "PYTHON_VERSION $py_version: give major.minor, e.g. 3.11"
# pip takes a manylinux_2_NN tag literally; list every glibc from the target's down to 2.17.
platforms=()
for ((minor = glibc_minor; minor >= 17; minor--)); do platforms+=(--platform "manylinux_2_${minor}_${machine}"); done
platforms+=(--platform "manylinux2014_${machine}")

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$src/pyproject.toml")"
[ -n "$version" ] || die "no version in $src/pyproject.toml"
name="hub-gateway-$version-$platform-py$py_version"

build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
"$python" -m venv "$build/venv"
pip=("$build/venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip  # a recent pip: it knows the newest wheel tags
kit="$build/$name"
mkdir -p "$kit/wheels"
"${pip[@]}" wheel -q --no-deps -w "$kit/wheels" "$src"
project_wheel="$(ls "$kit"/wheels/hub_gateway-*.whl)"
# Some pure-Python dependencies are published as source only (chirpstack-api): find them by
# resolving for this machine, and make their wheels here. A wheel made here must be pure Python
# (*-none-any), since it goes to another machine; anything compiled must come as a wheel.
"${pip[@]}" download -q -d "$build/probe" --prefer-binary "$project_wheel"
mkdir -p "$build/pure"
for sdist in "$build"/probe/*.tar.gz "$build"/probe/*.zip; do
    [ -e "$sdist" ] || continue
    "${pip[@]}" wheel -q --no-deps -w "$build/pure" "$sdist"
done
for built in "$build"/pure/*.whl; do
    [ -e "$built" ] || continue
    case "$built" in
        *-none-any.whl) ;;
        *) die "$(basename "$built"): published as source only and not pure Python, so no wheel for $platform can be had" ;;
    esac
done
# The project's dependencies for the target, wheels only, and pip itself (install.sh bootstraps
# a venv from it when the gateway lacks python3-venv).
"${pip[@]}" download -q -d "$kit/wheels" --only-binary=:all: "${platforms[@]}" \
    --python-version "$py_version" --implementation cp --find-links "$build/pure" "$project_wheel" pip

install -D -m 0755 "$src/systemd/install.sh" "$kit/systemd/install.sh"
install -D -m 0644 "$src/systemd/hub-gateway.service" "$kit/systemd/hub-gateway.service"
install -D -m 0644 "$src/config/gateway.yaml" "$kit/config/gateway.yaml"
install -D -m 0644 "$src/config/devices/example.yaml" "$kit/config/devices/example.yaml"
mkdir -p "$kit/config/schema" "$kit/config/aws" "$kit/certs" "$kit/docs"
install -m 0644 "$src"/config/schema/*.json "$kit/config/schema/"
install -m 0644 "$src"/config/aws/* "$kit/config/aws/"
install -m 0644 "$src/certs/README.md" "$kit/certs/README.md"
install -m 0644 "$src/README.md" "$kit/README.md"
install -m 0644 "$src/docs/install.md" "$kit/docs/install.md"
cat >"$kit/MANIFEST" <<EOF
name=hub-gateway
version=$version
platform=$platform
machine=$machine
python=$py_version
glibc=2.$glibc_minor
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF

mkdir -p "$out"
tarball="$(cd "$out" && pwd)/$name.tar.gz"
tar -czf "$tarball" -C "$build" "$name"
wheels=$(find "$kit/wheels" -name '*.whl' | wc -l)
echo "$tarball: $wheels wheels for $machine, Python $py_version, glibc >= 2.$glibc_minor ($(du -h "$tarball" | cut -f1))"
echo "sha256 $(sha256sum "$tarball" | cut -d' ' -f1)"
echo "on the gateway: tar -xzf $name.tar.gz && sudo $name/systemd/install.sh --offline $name.tar.gz"
