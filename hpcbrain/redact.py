"""Credentials never reach logs, MLflow params, config artifacts or checkpoints.

`redact_text` masks the password of a URL (``https://user:secret@host`` → ``https://user:***@host``)
and the value of an environment-style assignment whose name says it is secret
(``MLFLOW_TRACKING_PASSWORD=…``, ``export API_TOKEN=…``, ``AWS_SECRET_ACCESS_KEY=…``), as they
appear in `tracking.uri` and `slurm.setup` lines. `redacted` applies it to every string of a
config container. The job itself keeps the real values: only what is written or shown is masked.
"""
from __future__ import annotations

import re
from typing import Any

__all__ = ["redact_text", "redacted", "MASK"]

MASK = "***"
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]+:)([^@\s/]+)(@)")
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b([A-Z0-9_]*(?:PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ACCESS_?KEY)[A-Z0-9_]*)"
    r"(\s*=\s*)(\"[^\"]*\"|'[^']*'|\S+)")


def redact_text(text: str) -> str:
    text = _URL_PASSWORD.sub(rf"\1{MASK}\3", text)
    return _SECRET_ASSIGNMENT.sub(rf"\1\2{MASK}", text)


def redacted(value: Any) -> Any:
    """A copy of a plain container (dicts, lists, strings, numbers) with every string masked."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: redacted(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redacted(item) for item in value)
    return value
