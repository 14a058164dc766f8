"""Where the CA key passphrase comes from: a file or the environment, never argv."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pki.errors import PkiError

__all__ = ["PASSPHRASE_ENV", "PASSPHRASE_FILE_ENV", "read_ca_passphrase"]

# Names of environment variables, not secrets.
PASSPHRASE_ENV = "NODEPOOL_CA_PASSPHRASE"  # noqa: S105
PASSPHRASE_FILE_ENV = "NODEPOOL_CA_PASSPHRASE_FILE"  # noqa: S105


def read_ca_passphrase(
    file: Path | None = None, environ: Mapping[str, str] | None = None
) -> bytes | None:
    """The passphrase from ``file``, else ``$NODEPOOL_CA_PASSPHRASE_FILE``, else
    ``$NODEPOOL_CA_PASSPHRASE``; None when none is given (an unencrypted key)."""
    env = os.environ if environ is None else environ
    if file is None and env.get(PASSPHRASE_FILE_ENV):
        file = Path(env[PASSPHRASE_FILE_ENV])
    if file is not None:
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise PkiError(f"cannot read passphrase file {file}: {exc.strerror}") from None
        # Files made with echo end in a newline that is not part of the passphrase.
        passphrase = data.removesuffix(b"\n").removesuffix(b"\r")
        if not passphrase:
            raise PkiError(f"passphrase file {file} is empty")
        return passphrase
    value = env.get(PASSPHRASE_ENV)
    if value is None:
        return None
    if not value:
        raise PkiError(f"{PASSPHRASE_ENV} is set but empty")
    return value.encode()
