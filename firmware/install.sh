#!/usr/bin/env bash
# Install qso3-rpc-server on a board (Raspberry Pi OS / Jetson Linux), run ON the board as root,
# from a copy of firmware/build/aarch64 (made by `firmware/build.sh aarch64` on any machine):
#   scp -r firmware/build/aarch64 firmware/install.sh firmware/qso3-rpc.service pi@board:/tmp/qso3/
#   ssh pi@board sudo bash /tmp/qso3/install.sh [KEY] [TRACKER_HOST:PORT]
# The server listens on 127.0.0.1 (reach it through `ssh -L`). To listen on the network instead (a
# trusted LAN/VLAN only: see README.md, "Exposing the board"):
#   ssh pi@board sudo HOST=0.0.0.0 bash /tmp/qso3/install.sh [KEY] [TRACKER_HOST:PORT]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
KEY=${1:-rpi}
TRACKER=${2:-}
HOST=${HOST:-127.0.0.1}
[[ "$HOST" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || { echo "HOST must be an IPv4 address (e.g. 0.0.0.0 or the board's LAN address), not '$HOST'" >&2; exit 2; }
[[ "$KEY" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "KEY: letters, digits, '.', '_', '-' only" >&2; exit 2; }
[[ -z "$TRACKER" || "$TRACKER" =~ ^[A-Za-z0-9.-]+:[0-9]+$ ]] || { echo "TRACKER must be HOST:PORT" >&2; exit 2; }
SRC=$HERE/aarch64
[ -x "$SRC/qso3-rpc-server" ] || SRC=$HERE/build/aarch64
[ "$(uname -m)" = aarch64 ] || { echo "install.sh runs on the aarch64 board (this is $(uname -m))" >&2; exit 2; }
install -d /opt/qso3/lib /var/lib/qso3
install -m 755 "$SRC/qso3-rpc-server" /opt/qso3/
install -m 644 "$SRC"/lib/*.so /opt/qso3/lib/
id qso3 >/dev/null 2>&1 || useradd --system --home /var/lib/qso3 --shell /usr/sbin/nologin qso3
chown qso3: /var/lib/qso3
chmod 700 /var/lib/qso3
sed -e "s|@KEY@|$KEY|" -e "s|@TRACKER@|${TRACKER:+--tracker $TRACKER}|" -e "s|--host 127.0.0.1|--host $HOST|" \
  "$HERE/qso3-rpc.service" > /etc/systemd/system/qso3-rpc.service
systemctl daemon-reload
systemctl enable --now qso3-rpc.service
systemctl --no-pager status qso3-rpc.service | head -5
[ "$HOST" = 127.0.0.1 ] && echo "listening on 127.0.0.1:9090 only: from the host, ssh -N -L 9090:127.0.0.1:9090 $(hostname) (README: Exposing the board)"
true
