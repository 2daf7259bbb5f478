#!/usr/bin/env bash
# Creates .venv and installs everything the project needs, then builds the ROS
# interfaces into it. Idempotent: when none of its inputs changed since the last
# successful run it returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
STAMP="$VENV/.setup-stamp"
PYTHON="${PYTHON:-python3}"

# Everything that changes what gets installed.
inputs_hash() {
  {
    cat setup.py setup.cfg requirements/*.txt tools/setup_venv.sh
    # (not ros_ws/build: the build writes package.xml and CMakeLists.txt copies there)
    find ros_ws \( -path ros_ws/build -o -path ros_ws/install -o -path ros_ws/log \) -prune -o \
      -type f \( -name package.xml -o -name CMakeLists.txt -o -name '*.msg' \
      -o -name '*.srv' -o -name '*.action' -o -name setup.py -o -name setup.cfg \
      -o -name '*.sh' \) -print 2>/dev/null | sort | xargs -r cat
    # share/refvlm_bringup/launch links each launch file; the ROS tools build from ../shared.
    find launch -type f ! -name '*.pyc' | sort
    find "${REFVLM_SHARED_DIR:-../shared}/ros" -type f -print0 2>/dev/null | sort -z | xargs -0 -r cat
  } | sha256sum | cut -d' ' -f1
}

hash="$(inputs_hash)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$hash" && -x "$VENV/bin/refvlm" ]]; then
  echo "setup: .venv is up to date"
  exit 0
fi

echo "setup: installing into $VENV (first run takes a few minutes)"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q --upgrade pip wheel
# tensorrt-rtx builds TensorRT engines without a GPU, so CI checks every exported graph.
pip install -q -c requirements/constraints.txt -e ".[ort-cpu,onnx,train,dev,tensorrt-rtx,mcp]" -r requirements/ros.txt
pip install -q --no-deps -c requirements/constraints.txt -r requirements/models.txt

# CPU-only torch: let torchvision import (see refvlm_core/torchvision_compat.py).
site_packages="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "import refvlm_core.torchvision_compat as m; m.install_import_hook()" \
  > "$site_packages/zz_refvlm_torchvision_compat.pth"

# ROS 2 interface and node packages (ros_ws/), when present.
if [[ -f ros_ws/build.sh ]]; then
  bash ros_ws/build.sh
fi

echo "$hash" > "$STAMP"
echo "setup: done"
