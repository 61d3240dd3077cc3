"""The Optuna side of a tune: storage, parameter search, pruning, resume (CPU, one process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest

from artune.autotune.search import (
    ClearlySlowerPruner,
    Search,
    Store,
    StoreExists,
    StoreMismatch,
    combinations,
    params_key,
    study_name,
)


def _rec(params: dict[str, Any], lat: float, nbytes: int = 4096) -> dict[str, Any]:
    return {"backend": "gloo", "params": params, "dtype": "bfloat16", "mode": "eager",
            "nbytes": nbytes, "rank_medians_us": [lat, lat], "latency_us": lat,
            "spread_us": 0.1, "reps": 5}


def _store(tmp_path: Path, resume: bool = False, **meta: Any) -> Store:
    return Store(f"sqlite:///{tmp_path / 'p.json.optuna.db'}", resume=resume,
                 meta={"fingerprint_id": "abc", **meta})


def test_combinations() -> None:
    assert combinations({}) == [{}]
    assert combinations({"a": [1, 2], "b": ["x"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]


def test_existing_storage_needs_resume(tmp_path: Path) -> None:
    _store(tmp_path).add_measurement("nccl|bfloat16|eager|4096", _rec({}, 10.0))
    with pytest.raises(StoreExists, match="--resume"):
        _store(tmp_path)
    res = _store(tmp_path, resume=True).load()
    assert res.measurements == [_rec({}, 10.0)] and res.trials == 1


def test_resume_refuses_another_machine(tmp_path: Path) -> None:
    _store(tmp_path)
    with pytest.raises(StoreMismatch, match="fingerprint_id"):
        Store(f"sqlite:///{tmp_path / 'p.json.optuna.db'}", resume=True,
              meta={"fingerprint_id": "other"})


def test_exhaustive_search_default_first_and_resume(tmp_path: Path) -> None:
    store = _store(tmp_path)
    name = study_name("gloo", "bfloat16", "eager", 4096)
    space = {"chunks": [1, 2, 4]}
    search = Search(store, name, space, {"chunks": 2}, budget=3)
    first = search.next()
    assert first == {"chunks": 2}
    search.finish(_rec(first, 10.0))
    second = search.next()
    assert second is not None
    search.fail({"backend": "gloo", "params": second, "dtype": "bfloat16", "mode": None,
                 "nbytes": 4096, "reason": "max abs error 1 > tol 0.1 at rank 1"}, gate=True)
    # Interrupted here: the third set was never measured.
    res = _store(tmp_path, resume=True).load()
    assert res.done[name] == {params_key(first), params_key(second)}
    assert [m["params"] for m in res.measurements] == [first]
    assert list(res.gate_failures.values()) == ["max abs error 1 > tol 0.1 at rank 1"]
    resumed = Search(_store(tmp_path, resume=True), name, space, {"chunks": 2}, 3,
                     res.done[name])
    third = resumed.next()
    assert third is not None and params_key(third) not in res.done[name]
    resumed.finish(_rec(third, 12.0))
    assert resumed.next() is None  # budget spent: 3 parameter sets, each measured once
    study = optuna.load_study(study_name=name, storage=store.storage)
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]


def test_sampled_search_respects_budget(tmp_path: Path) -> None:
    store = _store(tmp_path)
    space = {"a": list(range(6)), "b": list(range(6))}  # 36 sets, budget 5: TPE samples
    search = Search(store, "x|bfloat16|graph|4096", space, {"a": 0, "b": 0}, budget=5)
    seen = []
    while (p := search.next()) is not None:
        seen.append(params_key(p))
        search.finish(_rec(p, 10.0 + p["a"] + p["b"]))
    assert seen[0] == params_key({"a": 0, "b": 0})
    assert len(seen) == 5 and len(set(seen)) == 5


def test_pruner_prunes_clearly_slower_only(tmp_path: Path) -> None:
    study = optuna.create_study(direction="minimize", pruner=ClearlySlowerPruner(0.5))
    t = study.ask()
    t.report(10.0, 1)
    assert not t.should_prune()  # nothing completed yet
    study.tell(t, 10.0)
    slow, close = study.ask(), study.ask()
    slow.report(16.0, 1)
    close.report(14.0, 1)
    assert slow.should_prune() and not close.should_prune()


def test_default_outside_the_space_is_measured_first(tmp_path) -> None:
    """A backend whose default (ctas=32) is not among the listed choices must not crash Optuna."""
    from artune.autotune.search import Search, Store

    store = Store(f"sqlite:///{tmp_path / 's.db'}", meta={"k": "v"}, resume=False)
    search = Search(store, "nvrar|bfloat16|graph|4096", {"ctas": [1, 2, 4]}, {"ctas": 32}, 3)
    assert search.next() == {"ctas": 32}


def test_first_sets_come_before_the_sampler_in_order(tmp_path: Path) -> None:
    """An eager study starts from its graph study's best set, then the default (driver)."""
    store = _store(tmp_path)
    space = {"a": list(range(6)), "b": list(range(6))}  # 36 sets: not exhaustive at budget 4
    default, best = {"a": 0, "b": 0}, {"a": 5, "b": 3}
    search = Search(store, "x|bfloat16|eager|4096", space, default, budget=4,
                    first=[best, default])
    got = []
    while (params := search.next()) is not None:
        got.append(params)
        search.finish(_rec(params, 10.0 + len(got)))
    assert got[:2] == [best, default] and len(got) == 4
    assert len({params_key(p) for p in got}) == 4  # the sampler's picks are new sets


def test_working_studies_are_in_memory_and_written_through(tmp_path: Path) -> None:
    """Optuna samples and prunes in memory; each finished trial is written to the storage once,
    and a resumed study's working copy starts from what the storage holds (the pruner sees it)."""
    store = _store(tmp_path)
    name = study_name("nvrar", "bfloat16", "graph", 4096)
    space = {"a": list(range(6)), "b": list(range(6))}
    search = Search(store, name, space, {"a": 0, "b": 0}, budget=3)
    for lat in (10.0, 12.0, 30.0):
        params = search.next()
        assert params is not None
        search.finish(_rec(params, lat))
    storage = f"sqlite:///{tmp_path / 'p.json.optuna.db'}"
    stored = optuna.load_study(study_name=name, storage=storage).trials
    assert [t.value for t in stored] == [10.0, 12.0, 30.0]  # one row per finished trial

    resumed_store = _store(tmp_path, resume=True)
    res = resumed_store.load()
    again = Search(resumed_store, name, space, {"a": 0, "b": 0}, budget=4, done=res.done[name])
    assert len(resumed_store.study(name).trials) == 3  # the stored trials, in memory
    params = again.next()
    assert params is not None and params_key(params) not in res.done[name]
    assert again.report(16.0, 2) is True  # > 1.5 x the stored best (10): pruned


@pytest.mark.parametrize("budget", [3, 5, 12])
def test_sets_the_backend_does_not_admit_get_no_trial(tmp_path: Path, budget: int) -> None:
    """A combination the backend rejects (``admits``) is never handed out, costs no budget,
    and the search still ends: sampled (budget 3) or exhaustive (5, 12 >= the 4 admitted)."""
    store = _store(tmp_path)
    space = {"algo": ["one", "two"], "proto": ["ll", "lamport", "signal"]}

    def admit(p: dict[str, Any]) -> bool:
        return not ((p["algo"] == "one" and p["proto"] == "signal")
                    or (p["algo"] == "two" and p["proto"] == "lamport"))

    admitted = [c for c in combinations(space) if admit(c)]
    assert len(admitted) == 4
    search = Search(store, "nvrar|bfloat16|graph|4096", space, {"algo": "one", "proto": "ll"},
                    budget=min(budget, len(admitted)), admit=admit)
    seen = []
    while (params := search.next()) is not None:
        assert admit(params), params
        seen.append(params_key(params))
        search.finish(_rec(params, 10.0 + len(seen)))
        assert len(seen) <= len(admitted)
    assert len(seen) == len(set(seen)) == min(budget, len(admitted))
