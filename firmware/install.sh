#!/usr/bin/env bash
# Install qso3-rpc-server on a board (Raspberry Pi OS / Jetson Linux), run ON the board as root,
# from a copy of firmware/build/aarch64 (made by `firmware/build.sh aarch64` on any machine):
#   scp -r firmware/build/aarch64 firmware/install.sh firmware/qso3-rpc.service pi@board:/tmp/qso3/
#   ssh pi@board sudo bash /tmp/qso3/install.sh [KEY] [TRACKER_HOST:PORT]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
KEY=${1:-rpi}
TRACKER=${2:-}
SRC=$HERE/aarch64
[ -x "$SRC/qso3-rpc-server" ] || SRC=$HERE/build/aarch64
[ "$(uname -m)" = aarch64 ] || { echo "install.sh runs on the aarch64 board (this is $(uname -m))" >&2; exit 2; }
install -d /opt/qso3/lib /var/lib/qso3
install -m 755 "$SRC/qso3-rpc-server" /opt/qso3/
install -m 644 "$SRC"/lib/*.so /opt/qso3/lib/
id qso3 >/dev/null 2>&1 || useradd --system --home /var/lib/qso3 --shell /usr/sbin/nologin qso3
chown qso3: /var/lib/qso3
sed -e "s|@KEY@|$KEY|" -e "s|@TRACKER@|${TRACKER:+--tracker $TRACKER}|" "$HERE/qso3-rpc.service" \
  > /etc/systemd/system/qso3-rpc.service
systemctl daemon-reload
systemctl enable --now qso3-rpc.service
systemctl --no-pager status qso3-rpc.service | head -5
