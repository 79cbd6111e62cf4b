#!/usr/bin/env bash
# Install hub-gateway on a Debian-like gateway as a systemd service (docs/install.md).
#
#   sudo systemd/install.sh                  from a checkout: makes a kit for this machine (systemd/dist.sh,
#                                            wheels from PyPI) and installs it as below
#   sudo systemd/install.sh --offline FILE   from a kit made by `make dist` (FILE.tar.gz): no network at all
#
# Options:
#   --prefix DIR      where the virtualenv goes (default /opt/hub-gateway)
#   --venv-only       only PREFIX/venv: no user, /etc/hub-gateway or unit (needs no root; for a
#                     trial of a kit, or a host without systemd)
#   --check-platform  say whether this machine is supported, and change nothing
#
# Supported: x86_64 and aarch64 (64-bit) with Python 3.11 or newer: Debian 12 and 13, Raspberry
# Pi OS (64-bit). Not 32-bit ARM: awscrt publishes no wheel for it, and pip would try to compile
# it from source. Idempotent: re-running upgrades the code and keeps /etc/hub-gateway and the buffer.
set -euo pipefail

die() { echo "install.sh: $*" >&2; exit 1; }

offline="" prefix=/opt/hub-gateway venv_only="" check_only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --offline) [ $# -ge 2 ] || die "--offline needs the kit's file (hub-gateway-VERSION-PLATFORM-pyX.Y.tar.gz)"
                   offline="$(realpath "$2")"; shift 2 ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix="$2"; shift 2 ;;
        --venv-only) venv_only=1; shift ;;
        --check-platform) check_only=1; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
# The system's Python by default: a virtualenv made from a Python under /root or a home directory
# (pyenv, say) would not run as the service user.
python="${PYTHON:-$(command -v /usr/bin/python3 || command -v python3 || echo python3)}"

# ---- 1. The platform, before anything is changed ----------------------------------------------
machine="$(uname -m)"
case "$machine" in
    x86_64|aarch64) ;;
    armv6l|armv7l|armv8l|arm*)
        die "32-bit ARM ($machine) is not supported: awscrt, the C core of the AWS IoT client, publishes no
wheel for it, so pip would try to compile it from source (cmake, a C toolchain, an hour on a Pi,
and often a failure). Install a 64-bit OS: Raspberry Pi OS (64-bit) or Debian arm64 runs on a Pi 3,
4 or 5 and on most ARM gateways; then run this again." ;;
    *) die "$machine is not supported: hub-gateway installs on x86_64 and aarch64 (64-bit ARM)" ;;
esac
command -v "$python" >/dev/null || {
    [ -z "$offline" ] && [ -z "$check_only" ] && [ "$(id -u)" = 0 ] || die "no $python here (apt-get install python3)"
    apt-get update -qq && apt-get install -y -qq python3
}
# One call: a 64-bit kernel can run a 32-bit userland (Raspberry Pi OS 32-bit boots a 64-bit kernel
# on a Pi 4 or 5, so uname says aarch64 while Python's pointers are 32-bit). sysconfig's platform
# repeats the kernel's machine name; the pointer size is what tells the userland.
read -r py_platform py_bits py_version <<<"$("$python" -c \
    'import struct, sys, sysconfig; print(sysconfig.get_platform(), struct.calcsize("P") * 8, "%d.%d" % sys.version_info[:2])')"
case "$py_platform $py_bits" in
    "linux-x86_64 64"|"linux-aarch64 64") ;;
    *) die "$python is a $py_bits-bit program ($py_platform) on a $machine kernel: a 32-bit userland is not supported
(no awscrt wheel; pip would try to compile it). Install the 64-bit edition of the OS." ;;
esac
case "$py_version" in
    3.1[1-9]|3.[2-9][0-9]) ;;
    *) die "Python $py_version is too old: hub-gateway needs 3.11 or newer (Debian 12 has 3.11, Debian 13 has 3.13)" ;;
esac
glibc="$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')"
[ -n "$glibc" ] || die "no glibc found (getconf GNU_LIBC_VERSION): the wheels are built for glibc (manylinux); musl (Alpine) is not supported"
if [ -n "$check_only" ]; then
    echo "supported: $machine, Python $py_version, glibc $glibc"
    exit 0
fi
[ -n "$venv_only" ] || [ "$(id -u)" = 0 ] || die "run as root (sudo $0), or with --venv-only"

# ---- 2. The kit: the one given (offline), or one made now for this machine (online) -----------
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [ -z "$offline" ]; then
    checkout="$(cd "$(dirname "$0")/.." && pwd)"
    [ -f "$checkout/pyproject.toml" ] || die "run from a checkout, or give --offline KIT"
    if ! "$python" -c 'import ensurepip' 2>/dev/null; then
        [ "$(id -u)" = 0 ] || die "$python has no ensurepip: apt-get install python3-venv"
        apt-get update -qq && apt-get install -y -qq python3-venv
    fi
    echo "making an install kit for this machine from PyPI (wheels; nothing compiled)"
    PYTHON="$python" "$checkout/systemd/dist.sh" "manylinux_2_${glibc#2.}_$machine" "$py_version" "$work/kit" >/dev/null
    offline="$(ls "$work"/kit/*.tar.gz)"
fi
[ -f "$offline" ] || die "no kit at $offline"
mkdir "$work/unpacked"
tar -xzf "$offline" -C "$work/unpacked" || die "$offline is not a kit made by make dist (tar could not read it)"
src="$(find "$work/unpacked" -mindepth 1 -maxdepth 1 -type d | head -1)"
[ -n "$src" ] && [ -f "$src/MANIFEST" ] || die "$offline has no MANIFEST: not a kit made by make dist"
kit_value() { sed -n "s/^$1=//p" "$src/MANIFEST"; }
kit_machine="$(kit_value machine)" kit_python="$(kit_value python)" kit_glibc="$(kit_value glibc)"
version="$(kit_value version)"
[ "$kit_machine" = "$machine" ] ||
    die "$offline is for $kit_machine, this machine is $machine: make dist PLATFORM=manylinux_2_${glibc#2.}_$machine PYTHON_VERSION=$py_version"
[ "$kit_python" = "$py_version" ] ||
    die "$offline is for Python $kit_python, this machine has $py_version: make dist PLATFORM=$(kit_value platform) PYTHON_VERSION=$py_version"
[ "$(printf '%s\n' "$kit_glibc" "$glibc" | sort -V | head -1)" = "$kit_glibc" ] ||
    die "$offline needs glibc $kit_glibc or newer, this machine has $glibc: make dist PLATFORM=manylinux_2_${glibc#2.}_$machine PYTHON_VERSION=$py_version"
wheels="$src/wheels"

# ---- 3. The virtualenv, from the kit's wheels only --------------------------------------------
venv="$prefix/venv"
mkdir -p "$prefix"
if "$python" -c 'import ensurepip' 2>/dev/null; then
    "$python" -m venv "$venv"
else
    # Debian keeps ensurepip in python3-venv, which an offline gateway may lack: make the venv
    # without pip and run the kit's own pip wheel to install pip into it.
    "$python" -m venv --without-pip "$venv"
    pip_wheel="$(ls "$wheels"/pip-*.whl | head -1)"
    PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= "$venv/bin/python" "$pip_wheel/pip" install -q --no-index \
        --find-links "$wheels" pip
fi
# --no-index: pip never looks at the network; every wheel comes from the kit. PIP_CONFIG_FILE:
# a find-links in the host's pip.conf must not add wheels the kit does not have.
pip=(env PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= "$venv/bin/python" -m pip install -q --no-index
     --find-links "$wheels" --upgrade)
"${pip[@]}" pip
"${pip[@]}" "hub-gateway==$version"
installed="$("$venv/bin/hub-gateway" --version)"
echo "installed $installed in $venv"

if [ -n "$venv_only" ]; then
    echo "(--venv-only: no user, /etc/hub-gateway or systemd unit)"
    exit 0
fi

# ---- 4. The system: user, configuration, unit -------------------------------------------------
id hub-gateway >/dev/null 2>&1 ||
    useradd --system --home-dir /var/lib/hub-gateway --shell /usr/sbin/nologin hub-gateway
install -m 0644 "$src/README.md" "$prefix/README.md"
[ -f "$src/docs/install.md" ] && install -D -m 0644 "$src/docs/install.md" "$prefix/docs/install.md"
# The examples go beside the code, never into /etc/hub-gateway/devices: a device map there is
# taken for this site's, and the example's devices are not.
install -D -m 0644 "$src/config/gateway.yaml" "$prefix/examples/gateway.yaml"
install -D -m 0644 "$src/config/devices/example.yaml" "$prefix/examples/devices/example.yaml"
install -d -m 0755 "$prefix/examples/aws"
install -m 0644 "$src"/config/aws/* "$prefix/examples/aws/"

install -d -m 0755 /etc/hub-gateway /etc/hub-gateway/devices /etc/hub-gateway/schema
install -d -m 0750 -o root -g hub-gateway /etc/hub-gateway/certs
# The unit's StateDirectory would make it at the first start; made now, `check` as the service
# user passes before that start.
install -d -m 0750 -o hub-gateway -g hub-gateway /var/lib/hub-gateway  # as the unit's StateDirectoryMode
[ -e /etc/hub-gateway/gateway.yaml ] || install -m 0644 "$src/config/gateway.yaml" /etc/hub-gateway/gateway.yaml
install -m 0644 "$src"/config/schema/*.json /etc/hub-gateway/schema/
if cmp -s "$src/config/devices/example.yaml" /etc/hub-gateway/devices/example.yaml; then
    echo "warning: /etc/hub-gateway/devices/example.yaml is the shipped example (an earlier install.sh" \
         "copied it there): its devices are not this site's; delete it once this site's maps are written" >&2
fi

install -m 0644 "$src/systemd/hub-gateway.service" /etc/systemd/system/hub-gateway.service
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable hub-gateway.service
else
    echo "warning: systemd is not running here: the unit is installed but not enabled" >&2
fi

bin="$venv/bin/hub-gateway"
cat <<MSG

Next:
  1. Edit /etc/hub-gateway/gateway.yaml: gateway.id (the IoT thing name), tenant_id, site_id,
     cloud.endpoint (aws iot describe-endpoint --endpoint-type iot:Data-ATS).
  2. Write this site's device maps in /etc/hub-gateway/devices/*.yaml
     (an example: $prefix/examples/devices/example.yaml).
  3. The certificate. Put AmazonRootCA1.pem in /etc/hub-gateway/certs/, then either
       enrol by claim ($prefix/examples/aws/README.md), with the claim in /etc/hub-gateway/certs/:
         sudo $bin enroll -c /etc/hub-gateway/gateway.yaml --template hub-gateway \\
             --claim-cert /etc/hub-gateway/certs/claim.pem.crt --claim-key /etc/hub-gateway/certs/claim.private.pem.key
     or place the thing's certificate and key yourself:
         sudo install -m 0644 device.pem.crt /etc/hub-gateway/certs/
         sudo install -m 0600 -o hub-gateway private.pem.key /etc/hub-gateway/certs/
  4. Check, as the service user (the rights the daemon will have):
         sudo -u hub-gateway $bin check -c /etc/hub-gateway/gateway.yaml
  5. Start, and follow the log:
         sudo systemctl start hub-gateway && journalctl -u hub-gateway -f
MSG
