#!/usr/bin/env bash
# Installs what `make test`, `make demo` and `make bench` need on a fresh Debian 12 / Raspberry Pi OS machine:
# Debian packages via apt when root (else a clear message naming the missing ones), and a .venv with the project.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(softhsm2 swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config opensc mosquitto mosquitto-clients
              openssl libssl-dev gcc python3-dev systemd libtss2-tcti-pcap0)
# The command each package provides, to decide quickly whether anything is missing.
declare -A PROBE=([softhsm2]=softhsm2-util [swtpm]=swtpm [swtpm-tools]=swtpm_setup [tpm2-tools]=tpm2_readpublic
                  [opensc]=pkcs11-tool [mosquitto]=/usr/sbin/mosquitto [mosquitto-clients]=mosquitto_pub
                  [openssl]=openssl [gcc]=gcc [systemd]=systemd-analyze)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  probe=${PROBE[$pkg]:-}
  if [ -n "$probe" ]; then
    command -v "$probe" >/dev/null 2>&1 || [ -x "$probe" ] || missing+=("$pkg")
  else
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  fi
done

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "bootstrap: missing Debian packages: ${missing[*]}" >&2
    echo "bootstrap: run as root, or: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

PY=${PYTHON:-python3}
stamp=.venv/.installed
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi
