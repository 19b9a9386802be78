"""Which T1w image of a session to use when a lab's BIDS dataset has several (runs,
acquisitions, reconstructions): ``--bids-filter`` for `hpcbrain convert` and `hpcbrain bids-app`.

The filter is JSON, inline or in a file, in fMRIPrep's form ``{"t1w": {"acquisition": "mprage",
"run": 1}}`` or just the inner object. Keys are BIDS entities, long (acquisition, ceagent,
reconstruction, run, echo, part) or short (acq, ce, rec, run, echo, part); a value is a label, a
list of labels (any of them) or null (the entity must be absent). Labels compare as text after
dropping leading zeros of numbers, so ``"run": 1`` matches ``run-01``. Without a filter every
T1w image is kept (and two for one session are reported as a duplicate, naming the filter).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

ENTITY_NAMES = {"acquisition": "acq", "ceagent": "ce", "reconstruction": "rec", "run": "run",
                "echo": "echo", "part": "part", "acq": "acq", "ce": "ce", "rec": "rec"}
_ENTITY = re.compile(r"^([a-zA-Z]+)-([a-zA-Z0-9]+)$")


class BidsFilterError(ValueError):
    """A --bids-filter that cannot be read or names an unknown entity."""


def entities(path: str | Path) -> dict[str, str]:
    """BIDS entities of an image file name: ``sub-01_ses-02_run-1_T1w.nii.gz`` →
    {"sub": "01", "ses": "02", "run": "1"}."""
    name = Path(path).name.split(".")[0]
    found = {}
    for part in name.split("_")[:-1]:           # the last part is the suffix (T1w)
        match = _ENTITY.match(part)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def _canonical(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text.lstrip("0") or "0" if text.isdigit() else text


def load_filter(text: str | None) -> dict[str, list[str | None]] | None:
    """Parse a --bids-filter (JSON text or a path to a JSON file) into {short entity: allowed}."""
    if text is None:
        return None
    raw = Path(text).read_text() if not text.lstrip().startswith("{") and Path(text).is_file() \
        else text
    try:
        spec = json.loads(raw)
    except ValueError as exc:
        raise BidsFilterError(f"--bids-filter {text!r} is neither JSON nor a JSON file: "
                              f"{exc}") from None
    if not isinstance(spec, dict):
        raise BidsFilterError(f"--bids-filter must be a JSON object, got {type(spec).__name__}")
    if set(spec) == {"t1w"} and isinstance(spec["t1w"], dict):
        spec = spec["t1w"]
    allowed: dict[str, list[str | None]] = {}
    for key, value in spec.items():
        if key.lower() not in ENTITY_NAMES:
            raise BidsFilterError(f"--bids-filter: unknown entity {key!r}; use one of "
                                  f"{', '.join(sorted(set(ENTITY_NAMES) - set(ENTITY_NAMES.values())))}"
                                  f" (or their short forms)")
        values = value if isinstance(value, list) else [value]
        allowed[ENTITY_NAMES[key.lower()]] = [_canonical(v) for v in values]
    return allowed


def matches(path: str | Path, allowed: dict[str, list[str | None]] | None) -> bool:
    """Whether the image at `path` passes the filter (always, without one)."""
    if not allowed:
        return True
    found = entities(path)
    return all(_canonical(found.get(key)) in values for key, values in allowed.items())
