#!/usr/bin/env bash
# The test command (README): every Rust suite, on a machine with only rustup.
# The registry's Redis tests start their own redis-server per test (a unix
# socket in a temporary directory, no TCP port, no persistence) and never use
# a system Redis; they only need the binary on PATH, installed here from
# Debian's packages when missing. Arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null; then
  echo "== installing redis-server (Debian package) for the registry's Redis tests"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi

exec cargo test "$@"
