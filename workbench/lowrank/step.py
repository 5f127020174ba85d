"""The engine's runner for ``type = "lowrank"`` steps.

1. Budget: the decoder's linear parameters and the linears that may be
   compressed (value projections stay dense).
2. Allocation: ``uniform`` from the shapes alone; ``energy`` and ``search``
   from one dense pass that factorizes every linear once (statistics from the
   dense model: each layer sees the dense previous layer's outputs). The
   search truncates those cached factors in every trial.
3. Application: sequential, as the method prescribes: each layer's
   statistics are collected on the outputs of the already compressed layers.
   With ``finalists > 1`` the best trials are each applied this way and
   re-scored on the objective, the best of them is kept, and the step reports
   whether the sequential application changed their ranking.
4. The factorized linears stay two-layer modules (recorded for
   ``workbench.load``) or, with ``merge``, are multiplied back into plain ones.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from workbench.errors import RunError, check_cancel
from workbench.events import Log, WarningEvent

from . import search as S
from .allocation import Budget, energy_ranks, search_space, uniform_ranks
from .compress import LayerPass, apply_sequential, dense_factorizations, load_factors, restore, save_factors
from .family import METHODS
from .modules import structure_entry


def resume_hint(run_id: str) -> str:
    return f"finished trials are kept in the study; resume with: workbench search --resume {run_id}"


class LowRankRun:
    """One low-rank step of a run: the pieces shared by its stages."""

    def __init__(self, ctx, step):
        self.ctx = ctx
        self.index = ctx.index
        self.step = step
        self.loaded = ctx.loaded
        self.stage = f"lowrank:{ctx.index}"
        self.budget = Budget.of(self.loaded.adapter, pair_bias=METHODS[step.method].pair_bias)
        self.objective = None
        self.layers: list[dict] = []  # the per-layer report of the applied allocation

    def layer_pass(self, stage: str) -> LayerPass:
        c = self.ctx.spec.calibration
        return LayerPass(self.loaded, self.ctx.tokens, self.budget, self.step.method, batch_size=c.batch_size,
                         options={"asvd_alpha": self.step.asvd_alpha},
                         offload=c.offload_activations, emit=self.ctx.emit, stage=stage, cancel=self.ctx.cancel)

    # ------------------------------------------------------------ fingerprints
    def factors_fingerprint(self) -> dict:
        """What the factors depend on: the model as named (not its local path, so machines sharing a study
        agree), its dtype, the calibration token ids themselves, the method."""
        import hashlib

        from workbench import __version__

        tokens = self.ctx.tokens.contiguous()
        calibration = {"shape": list(tokens.shape), "sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest()}
        return {"model": self.ctx.spec.model.name, "dtype": str(self.loaded.dtype), "calibration": calibration,
                "method": self.step.method, "asvd_alpha": self.step.asvd_alpha, "workbench": __version__}

    def study_setup(self, space) -> dict:
        s = self.step
        return {"factors": self.factors_fingerprint(), "space": space.signature(), "retention": s.retention, "slack": s.slack,
                "objective": [s.objective_data, s.objective_chunks, s.objective_seqlen, s.kl_weight]}

    # ------------------------------------------------------------ stages
    def dense_factors(self, folder: Path | None) -> dict:
        """Every target's factors from the dense model; reused from ``folder`` when an earlier search saved them."""
        fingerprint = self.factors_fingerprint()
        path = folder / f"factors-{S.setup_hash(fingerprint)}.safetensors" if folder else None
        factors = load_factors(path, fingerprint) if path else None
        if factors is not None:
            self.ctx.emit(Log(message=f"reusing the factors of an earlier search: {path}"))
            return factors
        name = f"{self.stage}:statistics"
        layers = len(self.loaded.adapter.layers)
        with self.ctx.stage(name, f"Low-rank statistics and factorizations ({self.step.method})", total=layers):
            factors = dense_factorizations(self.layer_pass(name))
        if path:
            save_factors(path, factors, fingerprint)
        return factors

    def apply(self, ranks: dict[str, int], title: str):
        name = f"{self.stage}:apply"
        with self.ctx.stage(name, title, total=len(self.loaded.adapter.layers)):
            return apply_sequential(self.layer_pass(name), ranks, self.step.retention)

    def build_objective(self):
        from .objective import Objective, objective_tokens

        if self.objective is None:
            s = self.step
            tokens = objective_tokens(s.objective_data, self.loaded.tokenizer, s.objective_chunks, s.objective_seqlen)
            self.objective = Objective(self.loaded, tokens, s.kl_weight, self.ctx.spec.calibration.batch_size, self.ctx.cancel,
                                       resume_hint(self.ctx.run_id))
        return self.objective

    # ------------------------------------------------------------ search
    def search_folder(self) -> Path:
        storage = self.step.storage
        if storage and "://" not in storage:
            return Path(storage).expanduser().absolute().parent
        return Path(self.ctx.run_dir) / "search"

    def open_search(self) -> dict:
        """Open (create, join or resume) the study before any work, so a bad storage fails fast."""
        step, ctx = self.step, self.ctx
        space = search_space(self.budget, step.space, step.ratio_min, step.ratio_max)
        floor = self.budget.ranks_for(lambda t: step.ratio_min)
        self.budget.check_reachable(step.retention, floor, f"every ratio at ratio_min = {step.ratio_min}")
        folder = self.search_folder()
        storage_url = step.storage or str(folder / "study.journal")
        setup = self.study_setup(space)
        name = step.study or f"{ctx.spec.name}-{self.index}-{S.setup_hash(setup)}"
        study = S.open_study(S.open_storage(storage_url, step.heartbeat), name, space.signature(), setup, step.sampler, step.seed)
        marker = Path(ctx.run_dir) / "search" / "study.json"  # where this run's study is: read by --resume
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"storage": storage_url, "study": name}, indent=2) + "\n")
        ctx.emit(Log(message=f"study {name!r} in {S.redact(storage_url)}; "
                             f"watch it with: optuna-dashboard {S.redact(S.database_url(storage_url))}"))
        S.recover_orphans(study, include_unowned="://" not in storage_url)
        return {"space": space, "folder": folder, "storage": storage_url, "name": name, "study": study}

    def search(self, opened: dict, factors: dict) -> tuple[dict, dict]:
        """Run the study's remaining trials; apply its best allocation(s); return the ranks and the search report."""
        step, ctx = self.step, self.ctx
        study, space = opened["study"], opened["space"]
        stage = f"{self.stage}:search"
        reporter = S.TrialReporter(study, ctx.emit, stage, step.trials)
        with ctx.stage(stage, f"Rank search: {step.trials} trials ({step.sampler}, {step.space} space)", total=step.trials):
            reporter.poll()  # the finished trials of a resumed or shared study
            if step.workers == 1:
                setup = S.SearchSetup(self.budget, space, factors, self.build_objective(), step.retention, step.slack,
                                      self.loaded.dtype)

                def after():
                    S.recover_orphans(study)
                    reporter.poll()

                S.run_trials(study, setup.trial_function(S.worker_id()), step.trials, ctx.cancel, after, resume_hint(ctx.run_id))
            else:
                self.run_workers(opened, factors, reporter)
            reporter.poll()
        finalists = self.distinct_best(study, space, step.finalists)
        if not finalists:
            raise RunError(f"study {opened['name']!r} holds no finished trial", f"look at the workers' logs in {opened['folder']}")
        ranks, report = self.pick(finalists, space)
        report.update({"study": opened["name"], "storage": S.redact(opened["storage"]), "space": step.space,
                       "sampler": step.sampler, "trials": S.trial_states(study)["COMPLETE"]})
        return ranks, report

    def distinct_best(self, study, space, count: int) -> list:
        """The ``count`` best complete trials with distinct allocations (proposals that scale to the same ranks are one)."""
        chosen, seen = [], set()
        for trial in S.best_trials(study):
            allocation = tuple(sorted(space.ranks(self.budget, trial.user_attrs["ratios"]).items()))
            if allocation not in seen:
                seen.add(allocation)
                chosen.append(trial)
            if len(chosen) == count:
                break
        return chosen

    def pick(self, finalists: list, space) -> tuple[dict, dict]:
        """Apply each finalist sequentially and re-score it; keep the best. Returns its ranks and the ranking report."""
        objective = self.build_objective()  # dense reference logits: built while the model is still dense
        scored = []
        for position, trial in enumerate(finalists):
            ranks = space.ranks(self.budget, trial.user_attrs["ratios"])
            originals, layers = self.apply(ranks, f"Applying trial {trial.number} sequentially")
            measured = objective.measure()
            scored.append({"number": trial.number, "search_objective": trial.value, "sequential_objective": measured["objective"],
                           "perplexity": measured["perplexity"], "kl": measured["kl"], "ratios": trial.user_attrs["ratios"],
                           "ranks": ranks, "layers": layers, "originals": originals})
            self.ctx.emit(Log(message=f"trial {trial.number}: objective {trial.value:.4f} from dense statistics, "
                                      f"{measured['objective']:.4f} applied sequentially"))
            if position < len(finalists) - 1:
                restore(self.loaded.adapter, originals)
        best = min(scored, key=lambda s: (s["sequential_objective"], s["number"]))
        if best is not scored[-1]:
            restore(self.loaded.adapter, scored[-1]["originals"])
            _, best["layers"] = self.apply(best["ranks"], f"Applying trial {best['number']} sequentially")
        self.layers = best["layers"]
        ranking = [{k: s[k] for k in ("number", "search_objective", "sequential_objective", "perplexity", "kl")} for s in scored]
        report = {"best": {"number": best["number"], "objective": best["search_objective"],
                           "sequential_objective": best["sequential_objective"], "ratios": best["ratios"]},
                  "finalists": ranking, "kendall_tau": kendall_tau([s["search_objective"] for s in scored],
                                                                    [s["sequential_objective"] for s in scored])}
        return best["ranks"], report

    def run_workers(self, opened: dict, factors: dict, reporter) -> None:
        """Run the trials in ``workers`` subprocesses (one GPU each where there are GPUs) and relay their trials."""
        step, ctx = self.step, self.ctx
        folder, study = opened["folder"], opened["study"]
        fingerprint = self.factors_fingerprint()
        factors_path = folder / f"factors-{S.setup_hash(fingerprint)}.safetensors"
        if not factors_path.is_file():
            save_factors(factors_path, factors, fingerprint)
        device = torch.device(self.loaded.device)
        config = {"spec": ctx.spec.to_dict(), "step": self.index, "storage": opened["storage"], "study": opened["name"],
                  "factors": str(factors_path), "fingerprint": fingerprint, "device": device.type,
                  "batch_size": ctx.spec.calibration.batch_size, "workers": step.workers,
                  "ready": str(folder / f"ready-{ctx.run_id}")}
        config_path = folder / f"workers-{ctx.run_id}.json"
        shutil.rmtree(config["ready"], ignore_errors=True)   # a resumed search's workers wait for each other again
        config_path.write_text(json.dumps(config, default=str))
        gpus = [str(i) for i in range(torch.cuda.device_count())] if device.type == "cuda" else []
        threads = max(1, (os.cpu_count() or 1) // step.workers)
        procs = []
        for i in range(step.workers):
            env = dict(os.environ, WORKBENCH_WORKER_THREADS=str(threads))
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            log = open(folder / f"worker-{ctx.run_id}-{i}.log", "wb")
            procs.append((subprocess.Popen([sys.executable, "-m", "workbench.lowrank.search_worker", str(config_path), str(i)],
                                           stdout=log, stderr=subprocess.STDOUT, env=env), log))
        ctx.emit(Log(message=f"{step.workers} search workers started" + (f" on GPUs {', '.join(gpus)}" if gpus else "")))
        try:
            while True:
                check_cancel(ctx.cancel, resume_hint(ctx.run_id))
                S.recover_orphans(study)
                reporter.poll()
                if S.trial_states(study)["COMPLETE"] >= step.trials:
                    break
                if all(p.poll() is not None for p, _ in procs):
                    tail = (folder / f"worker-{ctx.run_id}-0.log").read_text(errors="replace").strip().splitlines()[-3:]
                    raise RunError(f"all {step.workers} search workers stopped before the study finished: {' | '.join(tail)}",
                                   f"finished trials are kept in the study; the logs are in {folder}; "
                                   f"fix the cause and resume with workbench search --resume {ctx.run_id}")
                time.sleep(S.POLL_SECONDS)
        finally:
            _stop(procs, graceful=sys.exc_info()[0] is None)
            shutil.rmtree(config["ready"], ignore_errors=True)


def _stop(procs: list, graceful: bool) -> None:
    """Let finished workers exit (they stop once the study is complete); terminate the rest."""
    deadline = time.monotonic() + (30 if graceful else 0)
    for proc, log in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def _structure(adapter, budget: Budget, ranks: dict[str, int]) -> dict:
    """The structure entry ``workbench.load`` needs: every factorized linear by its qualified name."""
    modules = {}
    for t in budget.targets:
        if ranks.get(t.key):
            modules[f"{adapter.layer_name(t.layer)}.{t.name}"] = {"rank": ranks[t.key], "out": t.out_features,
                                                                  "in": t.in_features, "bias": t.pair_bias}
    return structure_entry(modules)


def kendall_tau(a: list[float], b: list[float]) -> float | None:
    """Kendall's rank correlation of two orderings (1: same order, -1: reversed); None for fewer than two items."""
    n = len(a)
    if n < 2:
        return None
    score = 0
    for i in range(n):
        for j in range(i + 1, n):
            x, y = a[i] - a[j], b[i] - b[j]
            score += (x * y > 0) - (x * y < 0)
    return score / (n * (n - 1) / 2)


def run_step(ctx, step) -> dict:
    """The engine's runner for ``type = "lowrank"`` steps (``workbench.registry``)."""
    t0 = time.perf_counter()
    job = LowRankRun(ctx, step)
    budget = job.budget
    report: dict = {"type": "lowrank", "label": step.label(), "method": step.method, "allocation": step.allocation,
                    "retention": step.retention}
    search_report = None
    if step.allocation == "uniform":
        report["ratio"], ranks = uniform_ranks(budget, step.retention)
        _, job.layers = job.apply(ranks, f"Low-rank: {step.label()}")
    elif step.allocation == "energy":
        factors = job.dense_factors(None)
        report["energy"], ranks = energy_ranks(budget, {k: f.spectrum for k, f in factors.items()}, step.retention, step.energy)
        del factors
        _, job.layers = job.apply(ranks, f"Low-rank: {step.label()}")
    else:
        opened = job.open_search()
        factors = job.dense_factors(opened["folder"])
        ranks, search_report = job.search(opened, factors)
        report["search"] = search_report
    retained = budget.retained(ranks)
    report.update({"retained": retained, "params": {"dense": budget.total, "after": budget.params(ranks)},
                   "ranks": {k: r for k, r in ranks.items() if r}, "layers": job.layers})
    model = ctx.loaded.model
    if step.merge:
        from .merge import merge_lowrank

        report["merge"] = merged = merge_lowrank(model)
        if merged["dropped_bias"]:
            ctx.emit(WarningEvent(message=f"{len(merged['dropped_bias'])} merged linears lose their bias correction: "
                                          f"{merged['lost']}"))
    elif report["ranks"]:
        ctx.record_structure(_structure(ctx.loaded.adapter, budget, ranks))
    headline = {"retained": f"{retained:.2%} of the decoder's linear parameters ({budget.params(ranks):,} of {budget.total:,})"}
    if search_report:
        best = search_report["best"]
        headline["best trial"] = (f"#{best['number']} of {search_report['trials']}: objective {best['objective']:.3f} "
                                  f"(sequential {best['sequential_objective']:.3f})")
    elif "ratio" in report:
        headline["ratio"] = f"{report['ratio']:.4f}"
    else:
        headline["energy kept"] = f"{report['energy']:.4f}"
    report["headline"] = headline
    report["seconds"] = round(time.perf_counter() - t0, 3)
    ctx.emit(Log(message=f"{step.label()}: {headline['retained']}"))
    return report
