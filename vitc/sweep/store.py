"""The results folder of a sweep: ``sweep.json`` (what was asked), ``results.jsonl`` (one record
per line, appended and flushed as results arrive) and ``points/<id>/`` (each point's artifacts).

Records carry the schema version. A folder written by another schema version, or holding a
sweep of another model, space, targets or data, is refused before anything is written, so
results are never overwritten; the same sweep run again resumes, skipping finished work.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from vitc.errors import VitcError

SCHEMA_VERSION = 1
SETTINGS_FILE = "sweep.json"
RESULTS_FILE = "results.jsonl"
IDENTITY_KEYS = ("model", "space_sha256", "targets", "device", "data", "eval_size")


class Store:
    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.results = self.folder / RESULTS_FILE
        self.settings_path = self.folder / SETTINGS_FILE

    def point_dir(self, pid: str) -> Path:
        return self.folder / "points" / pid

    def read_settings(self) -> dict | None:
        if not self.settings_path.exists():
            return None
        try:
            settings = json.loads(self.settings_path.read_text())
        except (OSError, ValueError) as exc:
            raise VitcError(f"{self.settings_path} is not readable JSON", "pass another --out-dir; this one is not a sweep vitc wrote") from exc
        version = settings.get("schema") if isinstance(settings, dict) else None
        if version != SCHEMA_VERSION:
            raise VitcError(f"{self.folder} holds sweep results of schema version {version!r}, not {SCHEMA_VERSION}",
                            "pass another --out-dir (its results are left as they are)")
        return settings

    def check(self, settings: dict) -> dict | None:
        """Refuse (without writing) a folder of another sweep, another schema version, or not a sweep."""
        old = self.read_settings()
        if old is None:
            if self.folder.exists() and (not self.folder.is_dir() or any(self.folder.iterdir())):
                raise VitcError(f"{self.folder} is not empty and holds no sweep", "pass a new or empty --out-dir")
            return None
        differ = [k for k in IDENTITY_KEYS if old.get(k) != settings.get(k)]
        if differ:
            raise VitcError(f"{self.folder} holds another sweep (its {', '.join(differ)} differ)",
                            "pass another --out-dir, or the same settings to resume it")
        self.records()  # a results file of another schema version fails here, before anything is appended
        return old

    def open(self, settings: dict) -> bool:
        """Start or resume; True when resuming. Refuses folders of another sweep or version."""
        old = self.check(settings)
        if old is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            from vitc.artifacts import write_json

            write_json(self.settings_path, {"schema": SCHEMA_VERSION, **settings})
            return False
        return True

    def records(self) -> list[dict]:
        if not self.results.exists():
            return []
        out = []
        lines = self.results.read_text().splitlines()
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                if i == len(lines) - 1:
                    continue  # a line cut short by an interruption: that result is redone
                raise VitcError(f"{self.results} line {i + 1} is not JSON", "pass another --out-dir") from None
            if rec.get("schema") != SCHEMA_VERSION:
                raise VitcError(f"{self.results} line {i + 1} has schema version {rec.get('schema')!r}, not {SCHEMA_VERSION}",
                                "pass another --out-dir (its results are left as they are)")
            out.append(rec)
        return out

    def append(self, record: dict) -> None:
        import datetime as dt

        stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        line = json.dumps({"schema": SCHEMA_VERSION, **record, "at": stamp}, default=str)
        if self.results.exists():
            data = self.results.read_bytes()
            if data and not data.endswith(b"\n"):
                # the torn last line of an interrupted run: its result is being redone, drop the fragment
                os.truncate(self.results, data.rfind(b"\n") + 1)
        with open(self.results, "a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def load_results(folder: Path | str) -> tuple[dict, list[dict]]:
    """(settings, records) of a results folder, for the report."""
    store = Store(folder)
    if not Path(folder).is_dir():
        raise VitcError(f"{folder} is not a folder", "pass the --out-dir of a vitc sweep")
    settings = store.read_settings()
    if settings is None:
        raise VitcError(f"{folder} holds no sweep ({SETTINGS_FILE} is missing)", "pass the --out-dir of a vitc sweep")
    return settings, store.records()
