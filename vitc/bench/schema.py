"""The versioned JSON that ``vitc bench`` writes and ``vitc bench check`` reads (docs/bench.md documents it).

Bump SCHEMA_VERSION whenever a field changes meaning or disappears; adding fields is compatible.
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from vitc.bench.errors import BenchError

SCHEMA = "vitc.bench"
SCHEMA_VERSION = 1


def document(kind: str, fingerprint: dict, settings: dict, **body) -> dict:
    import vitc

    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "kind": kind,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "vitc_version": getattr(vitc, "__version__", "unknown"),
            "fingerprint": fingerprint, "settings": settings, **body}


def load(path: Path | str, kind: str = "bench") -> dict:
    """A stored result of ``kind``, refusing other schemas and versions with the reason."""
    path = Path(path)
    if not path.exists():
        raise BenchError(f"baseline {path} does not exist", "write one with: vitc bench ... --out results.json")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"baseline {path} is not readable JSON ({exc})", "write it again with vitc bench --out") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise BenchError(f"{path} is not a vitc bench result (schema {data.get('schema') if isinstance(data, dict) else None!r})",
                         "pass a file written by vitc bench --out")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise BenchError(f"{path} has schema version {data.get('schema_version')}, this vitc reads version {SCHEMA_VERSION}",
                         "re-create the baseline with this vitc version")
    if data.get("kind") != kind:
        raise BenchError(f"{path} holds a '{data.get('kind')}' result, not '{kind}'", "pass the JSON written by vitc bench --out")
    return data
