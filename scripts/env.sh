# Sourced by the other scripts: make (once) and enter the project's virtual environment.
# MEDDIFFFM_TORCH overrides the torch requirement (e.g. a CUDA build on a GPU machine).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEDDIFFFM_VENV:-$ROOT/.venv}"
EXTRAS="${1:-}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating virtual environment in $VENV" >&2
    python3 -m venv "$VENV"
fi
STAMP="$VENV/.meddifffm-installed${EXTRAS:+-$EXTRAS}"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    echo "installing MedDiffFM${EXTRAS:+ [$EXTRAS]} and its dependencies (first run only)" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    # pin torch first so that nothing pulls a multi-gigabyte CUDA build in its place
    "$VENV/bin/python" -m pip install -q "${MEDDIFFFM_TORCH:-torch==2.13.0}" >&2
    "$VENV/bin/python" -m pip install -q -e "$ROOT${EXTRAS:+[$EXTRAS]}" >&2
    touch "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
cd "$ROOT"
