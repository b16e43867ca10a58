#!/usr/bin/env bash
# Set up bayespose in .venv/ at the repository root (idempotent: a second run only re-checks).
#
#   bash setup.sh            # Python environment: Scipion (pyworkflow, pwem, relion plugin), torch, bayespose
#   bash setup.sh --test     # the test set-up: also pytest, ruff and the tests' oracles (requirements-test.txt),
#                            # RELION 3.1 from the Debian package 'relion' (tests compare against it) and Xvfb
#                            # (package 'xvfb': the GUI smoke test opens Scipion's project window on it)
#                            # (--relion is the same option under its older name)
#
# Order matters: torch==2.13.0 first (on a CPU machine an unpinned torch pulls gigabytes of CUDA wheels), then
# the Scipion packages, then everything else resolved under Scipion's pins (constraints.txt).
set -euo pipefail
cd "$(dirname "$0")"

WITH_TESTS=0
for arg in "$@"; do
    case "$arg" in
        --test|--relion) WITH_TESTS=1 ;;
        -h|--help) sed -n 2,11p "$0"; exit 0 ;;
        *) echo "setup.sh: unknown option '$arg' (use --test or --help)" >&2; exit 2 ;;
    esac
done

# pyworkflow needs a Python (>= 3.10) whose tkinter works, even headless.
find_python() {
    for candidate in "${PYTHON:-}" python3 python3.11 python3.12 python3.10; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys, tkinter; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            echo "$candidate"; return 0
        fi
    done
    return 1
}

if [ ! -x .venv/bin/python ]; then
    PY=$(find_python) || { echo "setup.sh: need Python >= 3.10 with tkinter (Debian: apt-get install python3-tk), or set PYTHON=/path/to/python" >&2; exit 1; }
    echo "setup.sh: creating .venv with $PY ($($PY --version 2>&1))"
    "$PY" -m venv .venv
fi

STAMP=.venv/.bayespose-installed
WANT=$(cat requirements.txt constraints.txt pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
    echo "setup.sh: installing torch==2.13.0"
    "${PIP[@]}" torch==2.13.0
    echo "setup.sh: installing Scipion (pyworkflow, pwem, relion plugin) under its pins"
    "${PIP[@]}" -c constraints.txt scipion-pyworkflow scipion-em scipion-em-relion
    echo "setup.sh: installing the remaining requirements and bayespose (editable)"
    "${PIP[@]}" -c constraints.txt -r requirements.txt
    "${PIP[@]}" -c constraints.txt --no-deps -e .
    .venv/bin/python -c "import bayespose, bayespose.core, torch_ctf, healpy, starfile, cryosparc.dataset, pwem, pyworkflow, tkinter"
    echo "$WANT" > "$STAMP"
fi

if [ "$WITH_TESTS" = 1 ]; then  # the test set-up: pytest, ruff and the tests' independent oracles
    TEST_STAMP=.venv/.bayespose-test-installed
    TEST_WANT=$(cat requirements-test.txt constraints.txt | sha256sum | cut -c1-16)
    if [ ! -f "$TEST_STAMP" ] || [ "$(cat "$TEST_STAMP")" != "$TEST_WANT" ]; then
        echo "setup.sh: installing the test requirements (pytest, ruff, torch-fourier-slice)"
        .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -r requirements-test.txt
        echo "$TEST_WANT" > "$TEST_STAMP"
    fi
fi

if [ "$WITH_TESTS" = 1 ]; then
    APT=()
    command -v relion_project >/dev/null 2>&1 || APT+=(relion)
    command -v Xvfb >/dev/null 2>&1 || APT+=(xvfb)
    if [ "${#APT[@]}" -gt 0 ]; then
        echo "setup.sh: installing ${APT[*]} (Debian packages: RELION 3.1, the X virtual framebuffer)"
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${APT[@]}" >/dev/null
    fi
fi
echo "setup.sh: ready (.venv/bin/bayespose, .venv/bin/python)"
