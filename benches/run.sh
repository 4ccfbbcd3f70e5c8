#!/usr/bin/env bash
# The benchmark command (README, "Benchmarks"): builds sluice in release mode
# and runs, in this order, the gateway benchmark (direct / nginx / sluice
# without and with plugins, against the simulated engine in zero-latency
# mode), the scale benchmark (10,000 idle streams; 1,000 tenants) and the
# plugin chain benchmark, each writing its section of BENCHMARKS.md.
# Installs nginx from Debian's packages when missing.
#
#   bash benches/run.sh           # the full run (about 10 minutes after the build)
#   bash benches/run.sh --quick   # a short smoke run that writes nothing
set -euo pipefail
cd "$(dirname "$0")/.."

quick=false
[ "${1:-}" = "--quick" ] && quick=true

if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  echo "== installing nginx (Debian package) for the gateway benchmark's baseline"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  # Only the binary is used: the bench runs its own nginx with its own config.
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
fi

if $quick; then
  cargo bench --bench gateway -- --rounds 1 --secs 0.5
  cargo bench --bench scale -- --streams 500 --tenants 50
  cargo bench --bench chain
else
  cargo bench --bench gateway -- --write BENCHMARKS.md
  cargo bench --bench scale -- --write BENCHMARKS.md
  cargo bench --bench chain -- --write BENCHMARKS.md
fi
