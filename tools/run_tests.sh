#!/usr/bin/env bash
# Runs the pytest suite in .venv with ROS 2 isolated to this machine: a ROS domain
# derived from the process id, localhost-only discovery, logs in a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( ($$ % 90) + 10 ))}"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_LOG_DIR="${ROS_LOG_DIR:-$(mktemp -d)}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python -m pytest "$@"
