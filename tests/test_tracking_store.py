"""subnets.parquet: de-duplication by key, persistence across reopen, atomic writes."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from rayprune import models
from rayprune.methods.base import SubnetRecord
from rayprune.tracking.store import SubnetStore, record_row, row_key

TINY = models.full_spec("cifar_resnet:tiny")


def record(width: int, step: int = 0, **metrics: float) -> dict:
    spec = models.with_widths(TINY, {"s2.b0.mid": width})
    return SubnetRecord.of(spec, metrics or {"val_top1": width / 100}, "uniform", step, ratio=width / 32).to_dict()


def rows(trial: str, kind: str = "search", step: int = 0, widths=(8, 16)) -> list[dict]:
    return [record_row(record(w, step), trial_id=trial, kind=kind, sweep_id="s", step=step) for w in widths]


def test_adding_the_same_rows_twice_stores_them_once(tmp_path):
    store = SubnetStore(tmp_path / "subnets.parquet")
    assert store.add(rows("t1")) == 2
    assert store.add(rows("t1")) == 0
    assert store.add(rows("t1", widths=(16, 24, 24))) == 1  # duplicates inside one batch count once
    assert len(store) == 3 and len(pq.read_table(store.path)) == 3


def test_key_distinguishes_trial_kind_and_step(tmp_path):
    store = SubnetStore(tmp_path / "subnets.parquet")
    store.add(rows("t1"))
    assert store.add(rows("t2")) == 2  # same specs, other trial
    assert store.add(rows("t1", step=1)) == 2  # same trial, later step
    assert store.add(rows("t1", kind="final")) == 2  # a final record may repeat a search record's spec/step
    assert len(store) == 8
    key = row_key(rows("t2")[0])
    assert key == f"t2/search/0/{models.spec_hash(models.with_widths(TINY, {'s2.b0.mid': 8}))}"
    assert key in store and store.get(key)["trial_id"] == "t2"


def test_reopening_restores_rows_exactly_and_keeps_deduplicating(tmp_path):
    path = tmp_path / "sweep" / "subnets.parquet"
    first = SubnetStore(path)
    first.add(rows("t1") + rows("t1", kind="final"))
    again = SubnetStore(path)
    assert again.rows() == first.rows()  # specs, metrics and source survive the JSON round trip
    assert again.rows()[0]["spec"] == models.with_widths(TINY, {"s2.b0.mid": 8})
    assert again.rows()[0]["source"] == {"ratio": 0.25}
    assert again.add(rows("t1")) == 0
    assert [r["kind"] for r in again.rows(kinds=["final"])] == ["final", "final"]
    assert len(again.rows(trial_id="t1")) == 4 and again.rows(trial_id="t9") == []


def test_file_has_query_friendly_columns_and_no_temp_files_are_left(tmp_path):
    store = SubnetStore(tmp_path / "subnets.parquet")
    store.add(rows("t1", widths=(8,)))
    store.add(
        [
            record_row(
                record(16, test_top1=0.9, robust_top1=0.7),
                trial_id="t1",
                kind="final",
                run_id="abc",
                artifact_uri="runs:/abc/subnet",
            )
        ]
    )
    table = pq.read_table(store.path).to_pydict()
    assert table["val_top1"] == [0.08, None]
    assert table["test_top1"] == [None, 0.9] and table["robust_top1"] == [None, 0.7]
    assert table["macs"][0] == models.macs(models.with_widths(TINY, {"s2.b0.mid": 8}))
    assert table["artifact_uri"] == [None, "runs:/abc/subnet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["subnets.parquet"]


def test_bad_rows_are_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="kind must be one of search, final, finetuned, unpruned"):
        record_row(record(8), trial_id="t", kind="best")
    with pytest.raises(ValueError, match="lacks macs, params"):
        record_row({"spec": TINY, "metrics": {}}, trial_id="t", kind="search")
