#!/usr/bin/env bash
# Installs the Debian packages the test suite and benchmark drive for real.
# Idempotent: does nothing when every command is already there.
set -euo pipefail
need=()
command -v curl >/dev/null || need+=(curl)
command -v wrk >/dev/null || need+=(wrk)            # make bench: the load generator
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v promtool >/dev/null || need+=(prometheus)
command -v unshare >/dev/null || need+=(util-linux)
command -v ip >/dev/null || need+=(iproute2)
command -v mount >/dev/null || need+=(mount)  # sealed tests bind-mount their own resolv.conf
command -v setpriv >/dev/null || need+=(util-linux)
# tests/sealed/test_lock*.py: the egress lock installs its rules with nft, or iptables-restore.
command -v nft >/dev/null || need+=(nftables)
command -v iptables-restore >/dev/null || need+=(iptables)
command -v nsenter >/dev/null || need+=(util-linux)
# CONNECT tunnels (tests/e2e/test_connect_clients.py, bench/tunnel.py): real HTTPS_PROXY clients
# and the C forward proxy the tunnel section is measured against.
command -v wget >/dev/null || need+=(wget)
command -v node >/dev/null || need+=(nodejs)
command -v tinyproxy >/dev/null || need+=(tinyproxy)
# tests/e2e/test_image.py installs the wheel into a venv of the system Python (readable by the
# image's uid 65532, unlike pyenv's under /root).
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-system-deps: need ${need[*]} but not root; install them and re-run" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
