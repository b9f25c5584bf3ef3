#!/usr/bin/env bash
# Idempotent set-up: Debian packages, then .venv, then the project in it.
# A second run on a set-up machine checks and changes nothing (seconds).
set -euo pipefail
cd "$(dirname "$0")/.."

# bcc comes from Debian (the PyPI "bcc" is an unrelated package); kernel headers
# for bcc; a C compiler and Python's headers for the C head parser (and locales, to
# test it in a Turkish locale, whose case rules differ); the real servers, clients
# and browser the tests drive; valgrind, for bench.chain's instruction counts.
APT_PACKAGES=(
  bpfcc-tools python3-bpfcc libbpfcc linux-headers-amd64
  python3-venv python3-dev gcc libc6-dev ca-certificates curl wget jq openssl
  nginx-light wrk docker.io chromium openssh-server nodejs locales valgrind
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: missing Debian packages: ${missing[*]}; run as root: sudo make setup" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  # nginx-light's package starts a server on port 80, openssh-server one on
  # port 22 of every address; the tests run their own, on loopback.  Only a
  # service installed just now is stopped: one the machine already had is its own.
  for pair in nginx-light:nginx openssh-server:ssh; do
    pkg=${pair%%:*} service=${pair#*:}
    [[ " ${missing[*]} " == *" $pkg "* ]] || continue
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$service" 2>/dev/null; then
      systemctl disable --now "$service" >/dev/null 2>&1 || true
    fi
  done
fi

# A venv made from Debian's python so bcc's Python bindings (a Debian package) import.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
  echo "setup: creating .venv from /usr/bin/python3 with --system-site-packages"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi

stamp=.venv/.qtap-installed
stale=0
for f in pyproject.toml setup.py; do
  [ "$f" -nt "$stamp" ] && stale=1
done
# The compiled modules: missing, or older than their source (a built module
# shadows its .py, so an edit would otherwise not run).
build_state=$(/usr/bin/python3 qtap_devtools/compiled.py) || stale=1
if [ ! -f "$stamp" ] || [ "$stale" = 1 ]; then
  [ -f "$stamp" ] && echo "setup: $build_state"
  echo "setup: installing the project and its test dependencies into .venv, compiling its hot modules (about a minute)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
  touch "$stamp"
fi
echo "setup: ready"
