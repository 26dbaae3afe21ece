#!/usr/bin/env bash
# LMX developer entry point.
#
#   ./lmx.sh serve [lmx serve args...]   bootstrap, then run the server
#   ./lmx.sh test  [pytest args...]      bootstrap, then run the test suite
#
# Bootstrap is idempotent and silent when there is nothing to do: it creates .venv, installs the
# project when pyproject.toml changed, installs OpenBLAS where it can, and fetches the bundled
# default model. `test` also installs chromium and prometheus (promtool) where it can. Set
# PYTHON to choose the interpreter used to create .venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
STAMP="$VENV/.lmx-installed"

say() { printf 'lmx.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

usage() {
    printf 'usage: %s serve [lmx serve args...]\n       %s test [pytest args...]\n' "$0" "$0" >&2
    exit 2
}

python_ok() {
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

pick_python() {
    if [[ -n "${PYTHON:-}" ]]; then
        python_ok "$PYTHON" || die "\$PYTHON=$PYTHON is not a working Python >= 3.11"
        printf '%s\n' "$PYTHON"
        return
    fi
    local candidate
    for candidate in python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
            printf '%s\n' "$candidate"
            return
        fi
    done
    die "no Python >= 3.11 found (tried python3.13 python3.12 python3.11 python3; set PYTHON=...)"
}

ensure_venv() {
    [[ -x "$VPY" ]] && return
    local py
    py="$(pick_python)"
    say "creating .venv with $py"
    "$py" -m venv "$VENV"
}

ensure_installed() {
    local want have=""
    want="$("$VPY" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$ROOT/pyproject.toml")"
    [[ -f "$STAMP" ]] && have="$(<"$STAMP")"
    [[ "$want" == "$have" ]] && return

    say "installing lmx and its dependencies into .venv"
    local pip=("$VPY" -m pip install -q --disable-pip-version-check -e)
    local log
    log="$(mktemp)"
    # mlx does not publish wheels for every platform; its failure is expected there, so hide
    # that attempt's output and only show errors from the fallback install.
    if (cd "$ROOT" && "${pip[@]}" '.[dev,mlx]') >"$log" 2>&1; then
        rm -f "$log"
    else
        say "installing with [dev,mlx] failed (no mlx for this platform? log: $log); retrying with [dev]"
        (cd "$ROOT" && "${pip[@]}" '.[dev]')
    fi
    printf '%s\n' "$want" >"$STAMP"
}

ensure_openblas() {
    # The mlx CPU wheel calls the system libblas.so.3, which on Debian is the slow reference BLAS
    # unless OpenBLAS is installed (it then takes over via update-alternatives). Only attempt it
    # where we can do so without prompting: Linux, root, Debian-style packaging.
    [[ "$(uname -s)" == Linux ]] || return 0
    [[ "$(id -u)" -eq 0 ]] || return 0
    command -v apt-get >/dev/null 2>&1 || return 0
    command -v dpkg >/dev/null 2>&1 || return 0
    if dpkg -s libopenblas0-pthread 2>/dev/null | grep -q '^Status: install ok installed'; then
        return 0
    fi
    say "installing libopenblas0-pthread (fast BLAS for MLX on CPU)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        libopenblas0-pthread; } >/dev/null 2>&1; then
        say "warning: could not install libopenblas0-pthread; MLX on CPU will use the slow reference BLAS"
    fi
    return 0
}

ensure_test_tools() {
    # The dashboard test drives Debian's chromium (no browser download by Playwright) and the
    # deploy test runs promtool from the prometheus package. Same rules as ensure_openblas:
    # only as root on Debian-style systems, quietly, and never fatal (those tests then skip).
    [[ "$(uname -s)" == Linux ]] || return 0
    [[ "$(id -u)" -eq 0 ]] || return 0
    command -v apt-get >/dev/null 2>&1 || return 0
    command -v dpkg >/dev/null 2>&1 || return 0
    local pkg missing=()
    for pkg in chromium prometheus; do
        dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$pkg")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    say "installing ${missing[*]} (headless browser and promtool for the tests)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        "${missing[@]}"; } >/dev/null 2>&1; then
        say "warning: could not install ${missing[*]}; the tests that need them will skip"
    fi
    return 0
}

bootstrap() {
    ensure_venv
    ensure_openblas
    ensure_installed
    "$VPY" -m lmx_supervisor.models.bundled_model >/dev/null
}

[[ $# -ge 1 ]] || usage
cmd="$1"
shift
case "$cmd" in
    serve)
        bootstrap
        # Stay in the caller's directory so relative paths in serve args mean what they say.
        exec "$VENV/bin/lmx" serve "$@"
        ;;
    test)
        bootstrap
        ensure_test_tools
        # Run from the repo root so pyproject's pytest settings (testpaths, filterwarnings) apply.
        cd "$ROOT"
        exec "$VPY" -m pytest "$@"
        ;;
    *)
        usage
        ;;
esac
