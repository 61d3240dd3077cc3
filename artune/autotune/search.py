"""The Optuna side of a tune (rank 0 only): studies, parameter sampling, pruning, resume.

One study per (backend, dtype, mode, message size), named ``backend|dtype|mode|nbytes``. Every
finished trial keeps its measurement record (or its skip record) in ``user_attrs``, so the
storage is also the measurement store: ``--resume`` rebuilds everything measured from it and
runs only what is missing. The storage is an SQLite file next to the profile
(``<out>.optuna.db``) unless an RDB URL is given. Optuna samples and prunes on in-memory copies
of the studies, and every finished trial is written through to the storage: half the Optuna
time of a CPU dry run (1.83 -> 0.92 s for 105 trials), a third per sampled trial (50 -> 16 ms,
benchmarked on this machine).

Parameter sets: the backend's defaults first; then every combination when the space fits in the
trial budget, else Optuna's TPE sampler (seeded). A parameter set whose slowest-rank median after
the first few repetitions is clearly slower than the best one so far is pruned
(``ClearlySlowerPruner``).

Imported by rank 0 of a tune only (Optuna is not needed to load or use a profile).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from artune.autotune.config import combinations, sqlite_path

__all__ = [
    "Store",
    "StoreExists",
    "StoreMismatch",
    "ClearlySlowerPruner",
    "params_key",
    "study_name",
    "combinations",
]

#: A parameter set is pruned when its early median exceeds the best so far by this fraction.
PRUNE_MARGIN = 0.5
_META_STUDY = "artune-meta"


class StoreExists(RuntimeError):
    """The storage already holds a tune and --resume was not given."""


class StoreMismatch(RuntimeError):
    """--resume on a storage made on another machine or with another kind of run."""


def params_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def study_name(backend: str, dtype: str, mode: str, nbytes: int) -> str:
    return f"{backend}|{dtype}|{mode}|{nbytes}"


class ClearlySlowerPruner(optuna.pruners.BasePruner):
    """Prune a trial whose latest intermediate value (slowest-rank median so far) is more than
    ``margin`` above the best completed value of its study (latency: lower is better)."""

    def __init__(self, margin: float = PRUNE_MARGIN) -> None:
        self.margin = margin

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        values = [t.value for t in done if t.value is not None]
        if not values:
            return False
        return trial.intermediate_values[step] > min(values) * (1 + self.margin)


@dataclass
class Resumed:
    """What a storage already holds."""

    measurements: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    #: study name -> parameter keys already finished there (measured, failed or pruned)
    done: dict[str, set[str]] = field(default_factory=dict)
    #: (backend, params key, dtype, nbytes) -> gate failure reason
    gate_failures: dict[tuple[str, str, str, int], str] = field(default_factory=dict)
    trials: int = 0


class Store:
    """Rank 0's handle on the Optuna storage of a tune."""

    def __init__(self, url: str, *, resume: bool, meta: dict[str, Any], seed: int = 0) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.url = url
        self.seed = seed
        path = sqlite_path(url)
        exists = path is not None and path.exists() and path.stat().st_size > 0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.storage = self._open(url)
        if path is None:
            exists = _META_STUDY in optuna.get_all_study_names(self.storage)
        if exists and not resume:
            where = str(path) if path is not None else url
            raise StoreExists(
                f"the tune storage {where} already exists: pass --resume to continue that tune, "
                f"or delete {'the file' if path is not None else 'its studies'} to start over"
            )
        self._check_meta(meta, resume and exists)
        self._studies: dict[str, optuna.Study] = {}  # working studies, in memory
        self._rdb: dict[str, optuna.Study] = {}  # the same studies in the storage
        self._pruner = ClearlySlowerPruner()

    @staticmethod
    def _open(url: str) -> optuna.storages.RDBStorage:
        storage = optuna.storages.RDBStorage(url)
        if url.startswith("sqlite"):
            # WAL + NORMAL: each trial is still its own committed transaction (a killed tune
            # keeps every finished trial), at a fraction of the fsync cost.
            from sqlalchemy import event

            engine = storage.engine

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()

            engine.dispose()
        return storage

    def close(self) -> None:
        """Fold an SQLite storage's write-ahead log into the database file and close it, so
        that a finished tune leaves one file (the -wal and -shm files go with the last
        connection). Without it the file alone would lack the trials still in the log."""
        if self.url.startswith("sqlite"):
            from sqlalchemy import text

            with contextlib.suppress(Exception), self.storage.engine.connect() as con:
                con.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
        self.storage.engine.dispose()

    def _check_meta(self, meta: dict[str, Any], resuming: bool) -> None:
        study = optuna.create_study(
            storage=self.storage, study_name=_META_STUDY, load_if_exists=True
        )
        if resuming:
            old = study.user_attrs
            diffs = [
                f"{k}: storage has {old.get(k)!r}, this run has {v!r}"
                for k, v in meta.items()
                if k in old and old.get(k) != v
            ]
            if diffs:
                raise StoreMismatch(
                    f"cannot --resume from {self.url}: it was made by a different run ("
                    + "; ".join(diffs)
                    + "). Use another --out (or --storage), or delete it to start over."
                )
        for k, v in meta.items():
            study.set_user_attr(k, v)

    # -- reading what is there ------------------------------------------------------------

    def load(self) -> Resumed:
        """Every finished trial of every study, as measurements / skips / done keys."""
        res = Resumed()
        for summary in self.storage.get_all_studies():
            name = summary.study_name
            if name == _META_STUDY:
                continue
            trials = self.storage.get_all_trials(summary._study_id, deepcopy=False)
            for t in trials:
                if t.state == TrialState.RUNNING:
                    # Left by a tune that was killed mid-trial: close it, it is measured again.
                    self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                    continue
                if t.state == TrialState.WAITING:
                    continue
                attrs = t.user_attrs
                key = params_key(dict(attrs.get("params", t.params)))
                if "measurement" in attrs:
                    res.measurements.append(dict(attrs["measurement"]))
                elif "skip" in attrs:
                    skip = dict(attrs["skip"])
                    res.skipped.append(skip)
                    if attrs.get("gate"):
                        gk = (skip["backend"], key, skip["dtype"], int(skip["nbytes"]))
                        res.gate_failures[gk] = skip["reason"]
                else:
                    continue  # a duplicate suggestion, or a trial from something else
                res.done.setdefault(name, set()).add(key)
                res.trials += 1
        return res

    # -- writing ------------------------------------------------------------------------

    def study(self, name: str) -> optuna.Study:
        """The working study ``name``: in memory, where Optuna samples and prunes (on an RDB
        every ``ask`` re-reads the study's trials: ~20-50 ms per trial, measured on this
        project's tunes), seeded with what the storage already holds for it; ``persist``
        writes each finished trial through to the storage."""
        study = self._studies.get(name)
        if study is None:
            study = optuna.create_study(
                storage=optuna.storages.InMemoryStorage(),
                study_name=name,
                direction="minimize",
                sampler=optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=3),
                pruner=self._pruner,
            )
            with contextlib.suppress(KeyError):  # nothing stored for it yet
                stored = self._stored(name, create=False)
                study.add_trials([t for t in stored.get_trials(deepcopy=False)
                                  if t.state.is_finished()])
            self._studies[name] = study
        return study

    def _stored(self, name: str, create: bool = True) -> optuna.Study:
        """Study ``name`` in the storage (created on first write)."""
        study = self._rdb.get(name)
        if study is None:
            if create:
                study = optuna.create_study(storage=self.storage, study_name=name,
                                            direction="minimize", load_if_exists=True)
            else:
                study = optuna.load_study(study_name=name, storage=self.storage)
            self._rdb[name] = study
        return study

    def persist(self, name: str, trial: optuna.trial.FrozenTrial) -> None:
        """Write a finished trial of the working study ``name`` to the storage (one write: a
        tune killed after it keeps it)."""
        self._stored(name).add_trial(trial)

    def add_measurement(self, name: str, record: dict[str, Any]) -> None:
        """Store a finished measurement of a fixed parameter set (one write)."""
        self._stored(name).add_trial(
            optuna.trial.create_trial(
                params={},
                distributions={},
                value=float(record["latency_us"]),
                user_attrs={"measurement": record, "params": record["params"]},
            )
        )

    def add_skip(self, name: str, skip: dict[str, Any], *, gate: bool = False) -> None:
        """Store a parameter set that was excluded (failed the gate, raised, unsupported)."""
        self._stored(name).add_trial(
            optuna.trial.create_trial(
                params={},
                distributions={},
                state=TrialState.FAIL,
                user_attrs={"skip": skip, "params": skip["params"], "gate": gate},
            )
        )


class Search:
    """The parameter sets to try for one study, and the Optuna trial of the current one.

    Usage (rank 0)::

        search = Search(store, name, space, default, budget, done)
        while (params := search.next()) is not None:
            ... measure; maybe search.report(value, step) / search.should_prune() ...
            search.finish(record) | search.fail(skip) | search.prune(skip)
    """

    def __init__(
        self,
        store: Store,
        name: str,
        space: dict[str, list[Any]],
        default: dict[str, Any],
        budget: int,
        done: Iterable[str] = (),
        first: list[dict[str, Any]] | None = None,
        admit: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        """``first``: parameter sets measured before any the sampler picks, in order (default:
        ``[default]``); each must be a legal value of ``space``. ``admit``: False for a
        combination of ``space`` that gets no trial (the backend's ``admits``)."""
        self.store = store
        self.name = name
        # A backend's default may lie outside the choices it lists for this size (a plan tuned
        # by hand); it is always measured first, so it must be a legal value of the space.
        space = {k: list(v) for k, v in space.items()}
        first = [default] if first is None else first
        for k, v in (kv for p in [default, *first] for kv in p.items()):
            if v not in space.setdefault(k, []):
                space[k].insert(0, v)
        self.space = space
        self.done = set(done)
        self.budget = budget
        self.dists: dict[str, optuna.distributions.BaseDistribution] = {
            k: optuna.distributions.CategoricalDistribution(v) for k, v in space.items()
        }
        self.admit = admit or (lambda params: True)
        combos = [c for c in combinations(space) if self.admit(c)]
        self.exhaustive = len(combos) <= budget
        heads = list({params_key(c): c for c in first}.values())
        ordered = heads + [c for c in combos if c not in heads]
        self._queue = [c for c in ordered if params_key(c) not in self.done]
        self._heads = {params_key(c) for c in heads}
        self._trial: optuna.Trial | None = None
        self._attempts = 0

    @property
    def remaining(self) -> int:
        return max(0, self.budget - len(self.done))

    def next(self) -> dict[str, Any] | None:
        """The next parameter set to measure, or None when the budget is spent."""
        if self.remaining <= 0:
            return None
        study = self.store.study(self.name)
        while True:
            self._attempts += 1
            head = self._head()
            # the sampler keeps proposing sets already measured or not admitted: walk the
            # remaining admitted combinations in order instead
            walk = self._attempts > 4 * self.budget
            if walk or self.exhaustive or (head is not None and params_key(head) in self._heads):
                if head is None:
                    return None
                study.enqueue_trial(self._queue.pop(0))
            trial = study.ask(self.dists)
            params = dict(trial.params)
            if params_key(params) in self.done or not self.admit(params):
                # TPE suggested a set measured already, or one the backend does not admit:
                # close it without a measurement.
                study.tell(trial, state=TrialState.PRUNED)
                continue
            trial.set_user_attr("params", params)
            self._trial = trial
            return params

    def _head(self) -> dict[str, Any] | None:
        """The first queued set not measured yet (those the sampler measured meanwhile are
        dropped from the front), or None."""
        while self._queue and params_key(self._queue[0]) in self.done:
            self._queue.pop(0)
        return self._queue[0] if self._queue else None

    def report(self, value: float, step: int) -> bool:
        """Report an intermediate slowest-rank median; True if the trial should be pruned."""
        assert self._trial is not None
        self._trial.report(value, step)
        return bool(self._trial.should_prune())

    def _close(self, params: dict[str, Any]) -> None:
        self.done.add(params_key(params))
        self._trial = None

    def finish(self, record: dict[str, Any]) -> None:
        assert self._trial is not None
        self._trial.set_user_attr("measurement", record)
        done = self.store.study(self.name).tell(self._trial, float(record["latency_us"]))
        self.store.persist(self.name, done)
        self._close(record["params"])

    def fail(self, skip: dict[str, Any], *, gate: bool = False, pruned: bool = False) -> None:
        assert self._trial is not None
        self._trial.set_user_attr("skip", skip)
        self._trial.set_user_attr("gate", gate)
        state = TrialState.PRUNED if pruned else TrialState.FAIL
        done = self.store.study(self.name).tell(self._trial, state=state)
        self.store.persist(self.name, done)
        self._close(skip["params"])
