"""``subnets.parquet``: one row per evaluated subnet of a sweep (pyarrow, no MLflow).

A row is keyed by ``(trial_id, kind, step, spec_hash)``: the contract's (trial, step, spec
hash) plus the record *kind*, because a trial's final (fine-tuned) record may repeat the spec
and step of a search record yet carries different metrics. Kinds:

* ``search``    -- evaluated during a trial's search (metrics carry ``val_top1``);
* ``final``     -- a trial's finalized subnet, trained with the sweep's *search* recipe
  (``test_top1``, ``robust_top1``, latency);
* ``finetuned`` -- a grid cell's chosen subnet fine-tuned at the end of the sweep with the
  sweep's *final* recipe (same metrics as final): what the final fronts and ``pick`` use;
* ``unpruned``  -- the unpruned baseline (test, robust, latency; never on a front).

Besides the key and the record, a row carries its grid cell (``flops_target``, ``kd_weight``)
and, for trained records, how it was trained: ``recipe`` (a readable tag such as
``e10 cosine lr0.05 bs64 kd0.9``), ``recipe_hash``, ``init`` (``inherited`` / ``scratch``)
and ``robust_suite`` (the corruption suite's version), so a query needs no join and no JSON.

Adding a row whose key is already stored is a no-op, so re-reporting after a resume never
duplicates a subnet. The Parquet file is always rewritten atomically (temp file +
``os.replace``): a crash leaves the previous complete file, never a torn one.

A sweep's driver adds thousands of rows one step at a time, and rewriting the whole file for
each step costs O(rows) per step, O(rows^2) per sweep. With ``compact_every_s`` > 0 the store
instead appends each new row to a JSON-lines journal beside the file
(``subnets.parquet.journal``) and folds the journal into the Parquet file at most that often and
on :meth:`SubnetStore.flush`. Opening a store reads the file, then the journal (a torn last
line, from a crash in mid-write, is ignored), so no added row is lost either way.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..models import spec_hash

KINDS = ("search", "final", "finetuned", "unpruned")
KEY_FIELDS = ("trial_id", "kind", "step", "spec_hash")
# Metrics copied into their own columns so pandas/DuckDB queries need no JSON parsing;
# the ``metrics`` JSON column stays the complete record.
PROMOTED_METRICS = ("val_top1", "test_top1", "test_top5", "robust_top1", "latency_ms_b1_p50")
_JSON_FIELDS = ("spec", "metrics", "source")
# Columns derived from the record's source (how it was trained), filled by record_row.
TRAINING_COLUMNS = (("recipe", "recipe_tag"), ("recipe_hash", "recipe_hash"), ("init", "init"))

SCHEMA = pa.schema(
    [
        ("sweep_id", pa.string()),
        ("trial_id", pa.string()),
        ("kind", pa.string()),
        ("step", pa.int64()),
        ("spec_hash", pa.string()),
        ("method", pa.string()),
        ("flops_target", pa.float64()),
        ("kd_weight", pa.float64()),
        ("macs", pa.int64()),
        ("params", pa.int64()),
    ]
    + [(name, pa.float64()) for name in PROMOTED_METRICS]
    + [("recipe", pa.string()), ("recipe_hash", pa.string()), ("init", pa.string()), ("robust_suite", pa.int64())]
    + [
        ("spec", pa.string()),
        ("metrics", pa.string()),
        ("source", pa.string()),
        ("run_id", pa.string()),
        ("artifact_uri", pa.string()),
    ]
)


def row_key(row: dict[str, Any]) -> str:
    """The row's identity as one string, ``trial_id/kind/step/spec_hash``."""
    return "/".join(str(row[f]) for f in KEY_FIELDS)


#: The columns of a row flattened for a table (:func:`table_row`), besides its metrics and spec.
TABLE_COLUMNS = ("trial_id", "kind", "step", "method", "flops_target", "kd_weight", "recipe", "init", "macs", "params")


def table_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row flattened for a table (an MLflow table artifact): its key, the columns of
    :data:`TABLE_COLUMNS`, one column per metric, the spec hash, the artifact URI, the spec as JSON."""
    flat = {"key": row_key(row), **{k: row.get(k) for k in TABLE_COLUMNS}}
    flat.update(row["metrics"])
    flat.update(spec_hash=row["spec_hash"], artifact_uri=row.get("artifact_uri"), spec=json.dumps(row["spec"]))
    return flat


def record_row(
    record: dict[str, Any],
    *,
    trial_id: str,
    kind: str,
    sweep_id: str = "",
    run_id: str | None = None,
    artifact_uri: str | None = None,
    step: int | None = None,
    flops_target: float | None = None,
    kd_weight: float | None = None,
) -> dict[str, Any]:
    """A store row from a ``SubnetRecord.to_dict()`` (spec, macs, params, metrics, method,
    step, source). ``step`` overrides the record's own step (fine-tunes keep the member's);
    ``flops_target``/``kd_weight`` name the grid cell the record belongs to."""
    if kind not in KINDS:
        raise ValueError(f"subnet row kind must be one of {', '.join(KINDS)}, got {kind!r}")
    missing = [f for f in ("spec", "macs", "params", "metrics") if f not in record]
    if missing:
        raise ValueError(f"subnet record lacks {', '.join(missing)}; pass SubnetRecord.to_dict()")
    source = dict(record.get("source") or {})
    suite = source.get("robust_suite")
    return {
        "sweep_id": sweep_id,
        "trial_id": str(trial_id),
        "kind": kind,
        "step": int(record.get("step", 0) if step is None else step),
        "spec_hash": spec_hash(record["spec"]),
        "method": str(record.get("method", "")),
        "flops_target": None if flops_target is None else float(flops_target),
        "kd_weight": None if kd_weight is None else float(kd_weight),
        "macs": int(record["macs"]),
        "params": int(record["params"]),
        **{column: source.get(key) for column, key in TRAINING_COLUMNS},
        "robust_suite": None if suite is None else int(suite),
        "spec": record["spec"],
        "metrics": {k: float(v) for k, v in record["metrics"].items()},
        "source": source,
        "run_id": run_id,
        "artifact_uri": artifact_uri,
    }


class SubnetStore:
    """The Parquet subnet registry of one sweep. Not thread-safe: only the sweep driver writes.

    ``compact_every_s``: 0 rewrites the file on every :meth:`add`; more journals the added rows
    and rewrites the file at most that often (see the module docstring) and on :meth:`flush`.
    """

    def __init__(self, path: str | Path, compact_every_s: float = 0.0) -> None:
        self.path = Path(path)
        self.journal = self.path.with_name(self.path.name + ".journal")
        self.compact_every_s = compact_every_s
        self._rows: list[dict[str, Any]] = []
        self._index: dict[str, int] = {}
        if self.path.exists():
            self._append(_decode(r) for r in pq.read_table(self.path).to_pylist())
        self._journaled = self._append(self._read_journal())  # rows not in the file yet
        self._compacted = time.monotonic()

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def add(self, rows: Iterable[dict[str, Any]]) -> int:
        """Append the rows whose key is new (also de-duplicating within ``rows``); returns how
        many were added. Rows look like :func:`record_row`'s output."""
        start = len(self._rows)
        added = self._append(rows)
        if not added:
            return 0
        if self.compact_every_s <= 0:
            self._write()
            return added
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.journal, "a+b") as f:
            torn = f.tell() > 0 and (f.seek(f.tell() - 1), f.read(1))[1] != b"\n"  # a crash cut the last line
            f.write(
                (("\n" if torn else "") + "".join(json.dumps(_encode(r)) + "\n" for r in self._rows[start:])).encode()
            )
        self._journaled += added
        if time.monotonic() - self._compacted >= self.compact_every_s:
            self.flush()
        return added

    def flush(self) -> None:
        """Fold the journal into the Parquet file (nothing to do when it is empty)."""
        if self._journaled or self.journal.exists():
            self._write()

    def _read_journal(self) -> list[dict[str, Any]]:
        if not self.journal.exists():
            return []
        rows = []
        for line in self.journal.read_text().splitlines():
            try:
                rows.append(_decode(json.loads(line)))
            except ValueError:  # a line torn by a crash in mid-write: its row was never acknowledged
                continue
        return rows

    def replace(self, row: dict[str, Any]) -> None:
        """Put ``row`` in place of the stored row with its key (a re-measurement of that subnet)
        and rewrite the file: rare, so no journal."""
        key = row_key(row)
        if key not in self._index:
            raise KeyError(f"no subnet row {key!r} to replace")
        self._rows[self._index[key]] = row
        self._write()

    def get(self, key: str) -> dict[str, Any] | None:
        """The row with :func:`row_key` ``key``, or None."""
        i = self._index.get(key)
        return None if i is None else self._rows[i]

    def rows(self, kinds: Iterable[str] | None = None, trial_id: str | None = None) -> list[dict[str, Any]]:
        """Rows in insertion order (``spec``/``metrics``/``source`` as dicts), optionally only
        some kinds and/or one trial."""
        wanted = None if kinds is None else set(kinds)
        return [
            r
            for r in self._rows
            if (wanted is None or r["kind"] in wanted) and (trial_id is None or r["trial_id"] == trial_id)
        ]

    def to_table(self) -> pa.Table:
        """All rows as an Arrow table with :data:`SCHEMA` (JSON columns as strings)."""
        return pa.Table.from_pylist([_encode(r) for r in self._rows], schema=SCHEMA)

    def _append(self, rows: Iterable[dict[str, Any]]) -> int:
        added = 0
        for row in rows:
            key = row_key(row)
            if key in self._index:
                continue
            self._index[key] = len(self._rows)
            self._rows.append(row)
            added += 1
        return added

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        try:
            pq.write_table(self.to_table(), tmp)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.journal.unlink(missing_ok=True)  # every journaled row is in the file now
        self._journaled = 0
        self._compacted = time.monotonic()


def _encode(row: dict[str, Any]) -> dict[str, Any]:
    out = {name: row.get(name) for name in SCHEMA.names}
    for name in PROMOTED_METRICS:
        out[name] = row["metrics"].get(name)
    for name in _JSON_FIELDS:
        out[name] = json.dumps(row[name], sort_keys=True)
    return out


def _decode(stored: dict[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in stored.items() if k not in PROMOTED_METRICS}
    for name in SCHEMA.names:  # a file written before a column existed
        if name not in PROMOTED_METRICS:
            row.setdefault(name, None)
    for name in _JSON_FIELDS:
        row[name] = json.loads(row[name])
    return row
