#!/usr/bin/env bash
# One-command environment set-up: creates .venv, installs the dependencies declared in
# pyproject.toml, builds MinkowskiEngine 0.5.4 (CPU; CUDA where a toolkit is present).
# Idempotent: a stamp keyed on the dependency spec makes a second run return in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
STAMP="$VENV/.setup-stamp"
ME_VERSION=0.5.4
KEY=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ]; then
    exit 0
fi
log() { printf '[setup] %s\n' "$*"; }

# 0. What the MinkowskiEngine build needs from the system: Python 3.11 with its headers and
#    venv, a C++ compiler. Missing ones are installed with apt when run as root, else named.
need() { echo "[setup] $1" >&2; exit 1; }
apt_install() {  # apt_install PACKAGE... : true when installed
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
    log "installing $* (apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
command -v "$PY" >/dev/null || need "needs Python 3.11: $PY not found (set PYTHON=/path/to/python3.11)"
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || need "needs Python 3.11: $PY is $("$PY" -V 2>&1) (set PYTHON=/path/to/python3.11)"
if [ ! -x "$VENV/bin/python" ] && ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
    apt_install python3.11-venv || need "$PY has no venv/ensurepip: install python3.11-venv"
fi
if ! "$PY" -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    apt_install python3.11-dev || need "MinkowskiEngine's build needs Python.h: install python3.11-dev"
fi
if ! command -v c++ >/dev/null; then
    apt_install build-essential || need "MinkowskiEngine's build needs a C++ compiler: install build-essential (g++)"
fi

# 1. System library MinkowskiEngine links against.
if ! { [ -e /usr/include/openblas/cblas.h ] || [ -e /usr/include/x86_64-linux-gnu/openblas-pthread/cblas.h ] || ls /usr/include/*/openblas*/cblas.h >/dev/null 2>&1; }; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        log "installing libopenblas-dev (apt)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas-dev >/dev/null
    else
        echo "[setup] MinkowskiEngine needs OpenBLAS headers: install libopenblas-dev (Debian/Ubuntu) and re-run." >&2
        exit 1
    fi
fi

# 2. Virtual environment.
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip install -q --disable-pip-version-check)
# This machine's pip config names local wheel folders that may not exist: drop that noise.
# The devkit pins numpy<2 and an older shapely; we install it --no-deps on purpose, so pip's
# resolver complaints about it are expected too.
quiet() { "$@" 2> >(grep -v "Location 'file:.*is ignored\|dependency resolver does not\|^nuscenes-devkit .* requires" >&2); }

# Dependency lists come from pyproject.toml: one source of truth.
deps() { "$VPY" - "$1" <<'PYEOF'
import sys, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
group = sys.argv[1]
print("\n".join(p["dependencies"] if group == "main" else p["optional-dependencies"][group]))
PYEOF
}

# 3. MinkowskiEngine: built against torch with numpy<2 and setuptools<60 (numpy.distutils).
if ! "$VPY" -c "import importlib.metadata as m; assert m.version('MinkowskiEngine') == '$ME_VERSION'" 2>/dev/null; then
    TORCH_SPEC=$(deps main | grep '^torch')
    log "building MinkowskiEngine $ME_VERSION (takes ~5 min on 2 cores)"
    quiet "${PIP[@]}" "$TORCH_SPEC" "numpy<2" wheel ninja
    # pip warns that torch wants a newer setuptools: expected, build time only.
    "${PIP[@]}" "setuptools<60" 2>&1 | grep -v "Location 'file:\|setuptools\|dependency resolver" || true
    if command -v nvcc >/dev/null && "$VPY" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        log "CUDA toolkit and GPU found: ME's setup.py will try the CUDA build"
    fi
    # ME's setup.py builds CPU-only when torch sees no CUDA device.
    MAX_JOBS=${MAX_JOBS:-$(nproc)} "$VPY" -m pip install --no-deps --no-build-isolation \
        "MinkowskiEngine==$ME_VERSION" > "$VENV/me-build.log" 2>&1 || true
    "$VPY" -c "import importlib.metadata as m; assert m.version('MinkowskiEngine') == '$ME_VERSION'" \
        || { echo "[setup] MinkowskiEngine build failed (log: $VENV/me-build.log)" >&2; exit 1; }
    quiet "${PIP[@]}" -U "setuptools>=77" "numpy>=2"
fi

# 4. Runtime + test dependencies (numpy 2), then the devkit reference without its numpy<2 pin.
log "installing dependencies from pyproject.toml"
mapfile -t MAIN < <(deps main)
mapfile -t TEST < <(deps test)
quiet "${PIP[@]}" "${MAIN[@]}" "${TEST[@]}"
mapfile -t DEVKIT < <(deps devkit)
quiet "${PIP[@]}" --no-deps "${DEVKIT[0]}"
quiet "${PIP[@]}" "${DEVKIT[@]:1}"

# 5. Check the result imports, then write the stamp.
"$VPY" -c "
from trainer.minkowski import ME
import zarr, dask, transformers, nuscenes, numpy
assert numpy.__version__.startswith('2'), numpy.__version__
print('[setup] ok: MinkowskiEngine', ME.__version__, 'zarr', zarr.__version__, 'numpy', numpy.__version__)
"
echo "$KEY" > "$STAMP"
