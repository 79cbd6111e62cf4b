#!/usr/bin/env bash
# Install hub-gateway on a Debian-like gateway as a systemd service. Run as root from a
# checkout:  sudo systemd/install.sh
# Idempotent: re-running upgrades the code and keeps /etc/hub-gateway and the buffer.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "run as root (sudo $0)" >&2; exit 1; }
src="$(cd "$(dirname "$0")/.." && pwd)"
prefix=/opt/hub-gateway

command -v python3 >/dev/null || apt-get install -y python3
python3 -c 'import ensurepip' 2>/dev/null || { apt-get update -qq; apt-get install -y -qq python3-venv; }

id hub-gateway >/dev/null 2>&1 || useradd --system --home-dir /var/lib/hub-gateway --shell /usr/sbin/nologin hub-gateway

mkdir -p "$prefix"
python3 -m venv "$prefix/venv"
"$prefix/venv/bin/pip" install -q --upgrade pip
"$prefix/venv/bin/pip" install -q "$src"
install -m 0644 "$src/README.md" "$prefix/README.md"

install -d -m 0755 /etc/hub-gateway /etc/hub-gateway/devices /etc/hub-gateway/schema
install -d -m 0750 -o root -g hub-gateway /etc/hub-gateway/certs
[ -e /etc/hub-gateway/gateway.yaml ] || install -m 0644 "$src/config/gateway.yaml" /etc/hub-gateway/gateway.yaml
[ -n "$(ls -A /etc/hub-gateway/devices)" ] || install -m 0644 "$src/config/devices/example.yaml" /etc/hub-gateway/devices/
install -m 0644 "$src"/config/schema/*.json /etc/hub-gateway/schema/

install -m 0644 "$src/systemd/hub-gateway.service" /etc/systemd/system/hub-gateway.service
systemctl daemon-reload
systemctl enable hub-gateway.service
cat <<MSG
Installed. Next:
  1. put the thing's certificate, its key (unencrypted, chmod 600, chown hub-gateway) and AmazonRootCA1.pem in /etc/hub-gateway/certs/
  2. edit /etc/hub-gateway/gateway.yaml and /etc/hub-gateway/devices/*.yaml
  3. $prefix/venv/bin/hub-gateway check -c /etc/hub-gateway/gateway.yaml
  4. systemctl start hub-gateway && journalctl -u hub-gateway -f
MSG
