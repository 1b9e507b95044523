#!/usr/bin/env bash
# The Debian packages some tests use: mosquitto-clients (real MQTT clients), haproxy (the
# load-balancer test), chromium (the dashboard test), python3-venv (make's .venv), iptables
# and iproute2 (the network partitions of tests/faults: iptables in network namespaces).
# Installs the missing ones with apt-get (sudo when not root). `make test` and `.ci/run`
# both call it. Outside CI a failed install is a warning: the tests that need a missing
# program are skipped and say so; under CI (CI set) it is an error.
set -uo pipefail
packages=(mosquitto-clients python3-venv haproxy chromium iptables iproute2)
missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed'; then
        missing+=("$pkg")
    fi
done
((${#missing[@]})) || exit 0
echo "installing Debian packages for the tests: ${missing[*]}" >&2
sudo=()
if [[ $(id -u) -ne 0 ]]; then sudo=(sudo -n); fi
export DEBIAN_FRONTEND=noninteractive
if "${sudo[@]}" apt-get update -qq && \
        "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
    exit 0
fi
if [[ -n "${CI:-}" ]]; then
    echo "error: could not install ${missing[*]} (CI needs them all)" >&2
    exit 1
fi
echo "warning: could not install ${missing[*]}: the tests that need them are skipped" \
     "(install them with: sudo apt-get install ${missing[*]})" >&2
exit 0
