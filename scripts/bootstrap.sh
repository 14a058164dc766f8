# Sourced by scripts/run and scripts/test: makes .venv and installs the project into it.
# Reinstalls only when pyproject.toml changed since the last install.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

find_python() {
  local candidate
  for candidate in "${NODEPOOL_PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "error: Python 3.11 or newer is required (set NODEPOOL_PYTHON to one)" >&2
  return 1
}

bootstrap() {
  local extras="$1" stamp digest installed python
  if [ ! -x "$PY" ]; then
    python=$(find_python) || return 1
    echo "bootstrap: creating .venv with $python" >&2
    "$python" -m venv "$VENV" || return 1
    "$PY" -m pip install --quiet --upgrade pip >&2 || return 1
  fi
  stamp="$VENV/.nodepool-installed"
  digest=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
  installed=$(cat "$stamp" 2>/dev/null || true)
  # An install with the dev extras also serves a plain one.
  if [ "$installed" != "$extras $digest" ] && { [ -n "$extras" ] || [ "$installed" != "[dev] $digest" ]; }; then
    echo "bootstrap: installing nodepool$extras into .venv" >&2
    "$PY" -m pip install --quiet --disable-pip-version-check -e "$ROOT$extras" >&2 || return 1
    echo "$extras $digest" >"$stamp"
  fi
}
