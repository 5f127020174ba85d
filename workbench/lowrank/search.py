"""Rank-allocation search as an Optuna study, in one process or in several worker processes.

Each trial proposes one relative ratio per group (module type or decoder
layer), scales the proposal to the parameter budget (``scale_to_budget``),
truncates the cached factors to the resulting ranks and measures the
objective. The study is the single source of truth: every process that runs
trials (the run's own process, or ``--workers N`` subprocesses, or other
machines sharing a PostgreSQL database) asks it for the next allocation, and
the run's process reads finished trials back from it to emit ``Trial``
events and to pick the best allocation.

Storage: a journal file (the default, in the run's folder; safe for several
local processes) or a database URL, opened as Optuna's RDB storage with
heartbeats: a trial whose process stops sending them is failed and queued
again (``RetryHeartbeatStaleTrialCallback``). A local worker that dies is
detected directly (its process id is recorded on the trial) and its trial is
queued again the same way.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass
from typing import Callable

from workbench.errors import RunError, UserError, check_cancel
from workbench.events import Progress, Trial

STUDY_SPACE_ATTR = "workbench_space"  # the search space a study was created with
STUDY_SETUP_ATTR = "workbench_setup"  # a hash of what its objective values depend on
MAX_OBJECTIVE = 1e12  # stands in for a diverged (infinite) objective, so samplers keep a finite value
POLL_SECONDS = 0.5


def quiet_optuna():
    """Keep Optuna's log lines and experimental-feature warnings out of the terminal (trials arrive as events)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def redact(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def database_url(storage: str) -> str:
    """``postgresql://`` with the PostgreSQL driver that is installed (SQLAlchemy 2.1 assumes psycopg 3)."""
    if not storage.startswith("postgresql://"):
        return storage
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + storage[len("postgresql://"):]
    return storage


# the driver SQLAlchemy uses for each scheme when the URL names none, and its package
_DRIVERS = {
    "postgresql": "pip install psycopg2-binary (PostgreSQL)",
    "mysql": "pip install mysqlclient (MySQL; or name another driver: mysql+pymysql:// with pip install pymysql)",
    "mariadb": "pip install mysqlclient (MariaDB; or mariadb+pymysql:// with pip install pymysql)",
    "oracle": "pip install oracledb (Oracle)",
    "mssql": "pip install pyodbc (SQL Server)",
}


def driver_hint(storage: str) -> str:
    """How to install the database driver for a storage URL's scheme (``mysql+pymysql://`` names its own)."""
    scheme = storage.split("://", 1)[0].lower()
    dialect, _, driver = scheme.partition("+")
    if driver:
        return f"pip install {driver} (the driver {scheme}:// names)"
    return _DRIVERS.get(dialect, f"install the SQLAlchemy driver for {dialect}:// databases")


def open_storage(storage: str, heartbeat: int = 60):
    """The Optuna storage for a database URL (RDB, with heartbeats) or a journal file path; UserError when unreachable."""
    optuna = quiet_optuna()
    if "://" not in storage:
        from optuna.storages.journal import JournalFileBackend

        path = os.path.abspath(os.path.expanduser(storage))
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(path))
        except OSError as exc:
            raise UserError(f"cannot open the study journal {path}: {exc.strerror or exc}",
                            "give a writable file path for the study (or leave storage out)") from None
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    url = database_url(storage)
    engine_kwargs = {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else {}
    try:
        return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
    except ImportError as exc:
        raise UserError(f"the database driver for {redact(storage)} is not installed ({exc})",
                        f"{driver_hint(storage)}, or use the default journal file") from None
    except Exception as exc:  # sqlalchemy's OperationalError, ArgumentError...: the database cannot be used
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot reach the study storage {redact(storage)}: {first}",
                        "check that the database server runs and the URL's user, password, host, port and database; "
                        "nothing was computed yet for the search, and a study's finished trials stay in its database") from None


def make_sampler(kind: str, seed: int):
    optuna = quiet_optuna()
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, deterministic_objective=True)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


def setup_hash(setup: dict) -> str:
    return hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:12]


def open_study(storage, name: str, space_signature: list, setup: dict, sampler: str, seed: int):
    """Create the study or join an existing one; refuse a study made for another search space or setup.

    The sampler's seed is offset by the number of trials already in the study,
    so a resumed search or a second worker does not repeat the proposals of
    the first.
    """
    optuna = quiet_optuna()
    study = optuna.create_study(storage=storage, study_name=name, direction="minimize", load_if_exists=True)
    attrs = study.user_attrs
    digest = setup_hash(setup)
    if STUDY_SPACE_ATTR not in attrs:
        if study.get_trials(deepcopy=False):
            raise UserError(f"study {name!r} already exists and was not made by a workbench search",
                            "choose another study name (steps.N.study) or storage")
        study.set_user_attr(STUDY_SPACE_ATTR, space_signature)
        study.set_user_attr(STUDY_SETUP_ATTR, digest)
    elif attrs[STUDY_SPACE_ATTR] != space_signature:
        raise UserError(f"study {name!r} already exists with a different search space ({_describe(attrs[STUDY_SPACE_ATTR])}; "
                        f"this search: {_describe(space_signature)})",
                        "choose another study name (steps.N.study), or search the space the study was made for")
    elif attrs.get(STUDY_SETUP_ATTR) != digest:
        raise UserError(f"study {name!r} already exists for a different model, data or target (its objective values "
                        "cannot be compared with this search's)", "choose another study name (steps.N.study)")
    study.sampler = make_sampler(sampler, seed + len(study.get_trials(deepcopy=False)))
    return study


def _describe(signature: list) -> str:
    kind, names, low, high = signature
    return f"{kind}: {', '.join(names)} in [{low}, {high}]"


# --------------------------------------------------------------------------- trials


@dataclass
class SearchSetup:
    """What a trial needs: the budget, the space, the cached factors and the objective."""

    budget: object
    space: object
    factors: dict
    objective: object  # workbench.lowrank.objective.Objective
    retention: float
    slack: float
    dtype: object

    def __post_init__(self):
        """On a GPU with room for them, keep the factors there: a trial then moves no weights but the layers'."""
        import torch

        device = self.objective.device
        if device.type == "cuda":
            size = sum(t.numel() * t.element_size() for f in self.factors.values() for t in (f.left, f.right))
            if size < torch.cuda.mem_get_info(device)[0] // 2:
                self.factors = {key: f.to(device) for key, f in self.factors.items()}

    def replacements(self, ranks: dict[str, int]) -> Callable[[int], dict]:
        from .modules import LowRankLinear

        device = self.objective.device
        by_layer: dict[int, list] = collections.defaultdict(list)
        for t in self.budget.targets:
            if ranks.get(t.key):
                by_layer[t.layer].append(t)

        def build(index: int) -> dict:
            out = {}
            for t in by_layer.get(index, []):
                a, b, bias = self.factors[t.key].truncate(ranks[t.key])
                out[t.name] = LowRankLinear.from_factors(a.to(device), b.to(device), None if bias is None else bias.to(device),
                                                         dtype=self.dtype)
            return out

        return build

    def trial_function(self, owner: str):
        from .allocation import scale_to_budget

        optuna = quiet_optuna()

        def objective(trial) -> float:
            trial.set_user_attr("worker", owner)  # first: a dead worker's trial is found by this
            t0 = time.perf_counter()
            proposal = {n: trial.suggest_float(n, self.space.low, self.space.high) for n in self.space.names}
            ratios, ranks, retained = scale_to_budget(self.budget, self.space, proposal, self.retention)
            trial.set_user_attr("ratios", ratios)
            trial.set_user_attr("retained", retained)
            if not (self.retention - self.slack <= retained <= self.retention):
                raise optuna.TrialPruned(f"allocation retains {retained:.4f}, outside the budget")  # never evaluated
            key = allocation_key(ranks)
            trial.set_user_attr("allocation", key)
            earlier = next((t for t in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                            if t.user_attrs.get("allocation") == key), None)
            if earlier is not None:  # proposals that scale to the same ranks: the objective is deterministic, reuse it
                trial.set_user_attr("same_as", earlier.number)
                for name in ("perplexity", "kl"):
                    trial.set_user_attr(name, earlier.user_attrs[name])
                trial.set_user_attr("seconds", time.perf_counter() - t0)
                return earlier.value
            measured = self.objective.measure(self.replacements(ranks))
            trial.set_user_attr("perplexity", measured["perplexity"])
            trial.set_user_attr("kl", measured["kl"])
            trial.set_user_attr("seconds", time.perf_counter() - t0)
            value = measured["objective"]
            return value if math.isfinite(value) else MAX_OBJECTIVE

        return objective


def allocation_key(ranks: dict[str, int]) -> str:
    """A short name for an allocation: equal for proposals that scale to the same ranks."""
    return hashlib.sha256(json.dumps(sorted(ranks.items())).encode()).hexdigest()[:16]


def trial_states(study) -> collections.Counter:
    return collections.Counter(t.state.name for t in study.get_trials(deepcopy=False))


def _alive(owner: str) -> bool:
    """Whether a trial's owner may still be running: other machines are trusted (heartbeats cover them)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_orphans(study, include_unowned: bool = False) -> list[int]:
    """Fail the running trials of dead local processes and queue their allocations again; return their numbers.

    ``include_unowned`` also takes running trials that recorded no owner: only
    safe when no other process can be running trials (a journal file before
    this run's workers start).
    """
    optuna = quiet_optuna()
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    retry = RetryHeartbeatStaleTrialCallback(max_retry=3)
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = trial.user_attrs.get("worker")
        if (owner is None and not include_unowned) or (owner is not None and _alive(owner)):
            continue
        try:
            failed = study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            continue
        if trial.params:
            retry(study, failed)
        recovered.append(trial.number)
    return recovered


def run_trials(study, func, trials: int, cancel: Callable[[], bool] | None = None, after: Callable[[], None] | None = None,
               cancel_hint: str = "finished trials are kept in the study; resume with: workbench search --resume RUN") -> None:
    """Run trials in this process until the study holds ``trials`` complete ones.

    A trial starts only while complete plus running trials (of every process)
    fall short of the budget; otherwise this process waits for the others'
    running trials, which either complete or, when their process died, are
    failed and queued again (then run here).
    """
    import torch

    optuna = quiet_optuna()
    while True:
        check_cancel(cancel, cancel_hint)
        optuna.storages.fail_stale_trials(study)
        states = trial_states(study)
        if states["COMPLETE"] >= trials:
            return
        if states["PRUNED"] > 10 * trials:
            raise RunError("the search keeps proposing allocations outside the parameter budget",
                           "raise slack, or widen ratio_min and ratio_max")
        if states["COMPLETE"] + states["RUNNING"] < trials or states["WAITING"]:
            # the GP sampler fits its kernel with autograd; the engine runs under no_grad (the objective keeps to it)
            with torch.enable_grad():
                study.optimize(func, n_trials=1, gc_after_trial=False)
        else:
            time.sleep(POLL_SECONDS)
        if after is not None:
            after()


class TrialReporter:
    """Emits a ``Trial`` event for each trial that finished since the last poll, and the search's progress."""

    def __init__(self, study, emit, stage: str, trials: int):
        self.study = study
        self.emit = emit
        self.stage = stage
        self.trials = trials
        self.seen: set[int] = set()
        self.best = None

    def poll(self) -> None:
        optuna = quiet_optuna()
        done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)
        fresh = [t for t in self.study.get_trials(deepcopy=False, states=done) if t.number not in self.seen]
        for t in sorted(fresh, key=lambda t: t.number):
            self.seen.add(t.number)
            if t.state == optuna.trial.TrialState.COMPLETE and (self.best is None or t.value < self.best.value):
                self.best = t
            seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else 0.0
            self.emit(Trial(
                stage=self.stage, study=self.study.study_name, number=t.number, state=_STATE_NAMES[t.state.name],
                params=t.user_attrs.get("ratios", t.params), objective=t.value,
                metrics={k: t.user_attrs.get(k) for k in ("perplexity", "kl", "retained")}, seconds=seconds,
                best=self.best_summary()))
        if fresh:
            complete = sum(1 for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
            detail = f"best {self.best.value:.3f} (trial {self.best.number})" if self.best else ""
            self.emit(Progress(stage=self.stage, done=min(complete, self.trials), total=self.trials, detail=detail))

    def best_summary(self) -> dict:
        if self.best is None:
            return {}
        return {"number": self.best.number, "objective": self.best.value, "params": self.best.user_attrs.get("ratios", {})}


_STATE_NAMES = {"COMPLETE": "complete", "FAIL": "failed", "PRUNED": "pruned", "RUNNING": "running", "WAITING": "waiting"}


def best_trials(study, count: int | None = None) -> list:
    """The complete trials with the lowest objective, best first (the first ``count``, or all)."""
    optuna = quiet_optuna()
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return sorted(complete, key=lambda t: (t.value, t.number))[:count]
