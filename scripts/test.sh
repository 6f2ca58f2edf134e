#!/usr/bin/env bash
# Runs every test: Rust unit, protocol and CLI tests, then the official Python SDK end to end.
# Installs what it needs (a Python venv with the pinned SDK in .venv). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy (every target, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test (unit, protocol, CLI)"
cargo test --workspace --locked

echo "== Python SDK compatibility (azure-iot-device, unmodified)"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt
cargo build --locked -p fleetgate
FLEETGATE_BIN="$PWD/target/debug/fleetgate" .venv/bin/python -m pytest -q tests/sdk
./scripts/bench --smoke  # benchmarks: every scenario tiny (seconds), no timing checks
./scripts/fuzz --smoke  # fuzzing: every cargo-fuzz target for 3 s from the checked-in seeds
