"""The README's settings tables name every variable a user can set, server and client side."""

from __future__ import annotations

import re
from pathlib import Path

from nodepool.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]


def _variables_in_code() -> set[str]:
    found = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.__dataclass_fields__}
    sources = [*ROOT.glob("nodepool/**/*.py"), *ROOT.glob("pki/**/*.py"), *ROOT.glob("scripts/*")]
    for path in sources:
        if "/v1/" in str(path) or not path.is_file():
            continue
        found.update(re.findall(r"NODEPOOL_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    return found - {"NODEPOOL_TEST_POSTGRES_URL", "NODEPOOL_TEST_REDIS_URL"}


def test_every_variable_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = sorted(name for name in _variables_in_code() if f"`{name}`" not in readme)
    assert not missing, f"README.md does not list: {missing}"
