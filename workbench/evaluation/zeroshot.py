"""Zero-shot accuracy through lm-evaluation-harness, on the model in memory.

The model is wrapped in lm-eval's own ``HFLM`` (``pretrained=model``), so a
compressed model is evaluated without saving and reloading it, and the numbers
are lm-eval's: its prompts, its log-likelihood scoring, its metrics (``acc``,
``acc_norm`` where the task defines it) and standard errors, equal to what its
command line gives for the exported checkpoint.

Task names:

- the bundled tasks (``BUNDLED_TASKS``): task files in ``tasks/`` over the
  JSONL sets shipped in ``workbench/assets/zeroshot``; nothing is downloaded.
  The lm-eval command line runs the same files with
  ``--include_path workbench/evaluation/tasks --tasks piqa_local``.
- ``lm_eval:NAME``: any task of lm-eval's registry (its data comes from the
  Hugging Face Hub, so it needs the network or a filled datasets cache).
- ``file:TASK.yaml``: a task file of one's own.

lm-eval and torch are imported inside the functions, so the spec validator can
use :func:`check_task_name`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from workbench.errors import Cancelled, UserError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
BUNDLED_TASKS = ("boolq", "piqa", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "copa", "siqa", "lambada_openai")
LOCAL_SUFFIX = "_local"  # bundled task files are named NAME_local, apart from lm-eval's own NAME
# stderr of perplexity-type metrics is bootstrapped; lm-eval's default (100,000 draws) takes minutes on LAMBADA
BOOTSTRAP_ITERS = 1000
_LM_EVAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-*]*$")
_HINT = (f"bundled tasks: {', '.join(BUNDLED_TASKS)}; lm_eval:NAME for another lm-eval task "
         f"(its data comes from the Hugging Face Hub); file:TASK.yaml for a task file")


def check_task_name(name: str, key: str = "evaluate.zeroshot") -> None:
    """Syntax and bundled names only (no lm-eval import); lm_eval: and file: tasks are looked up when the run starts."""
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{key}: an empty task name", _HINT)
    if name in BUNDLED_TASKS:
        return
    if name.startswith("file:"):
        if not name[len("file:"):].lower().endswith((".yaml", ".yml")):
            raise UserError(f"{key}: {name!r} is not a task file", "write file:PATH/TO/TASK.yaml (an lm-eval task file)")
        return
    if name.startswith("lm_eval:") and _LM_EVAL_NAME.match(name[len("lm_eval:"):]):
        return
    raise UserError(f"{key}: unknown zero-shot task {name!r}", _HINT)


@dataclass(frozen=True)
class TaskRef:
    """A user's task name and what lm-eval is asked to load for it."""

    name: str  # as the user wrote it; the metrics' dataset
    spec: str  # an lm-eval task name or a YAML path
    defaults: bool  # needs lm-eval's own task registry


def task_ref(name: str) -> TaskRef:
    check_task_name(name)
    if name in BUNDLED_TASKS:
        return TaskRef(name, name + LOCAL_SUFFIX, False)
    if name.startswith("file:"):
        path = Path(name[len("file:"):]).expanduser()
        if not path.is_file():
            raise UserError(f"zero-shot task file '{path}' does not exist", "give the path of an lm-eval task YAML file")
        return TaskRef(name, str(path.resolve()), False)
    return TaskRef(name, name[len("lm_eval:"):], True)


@contextmanager
def _quiet_lm_eval():
    """lm-eval logs every request at INFO and warns about an in-memory model; keep the run's output to our events."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    # lm-eval bootstraps perplexity-type standard errors in a forked multiprocessing pool; forking a process that
    # runs torch's threads (and the worker's) can deadlock, so the single-process path is used (the same seeds,
    # hence the same numbers)
    multiproc = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        logger.setLevel(level)
        if multiproc is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = multiproc


def _hub_failure(exc: BaseException) -> bool:
    """Whether loading failed because the Hugging Face Hub could not be reached (or offline mode forbade it)."""
    from workbench.models import exception_chain

    names = {cls.__name__ for e in exception_chain(exc) for cls in type(e).__mro__}
    return bool(names & {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "DatasetNotFoundError",
                         "ConnectError"})


def load_tasks(names: list[str]) -> dict[str, dict]:
    """The lm-eval tasks for each name, ``{name: {leaf task name: Task}}`` (several leaves for a group).

    Loading a task reads its data, so an unknown name, a missing file or an
    unreachable hub is reported here, before the model is evaluated. Tasks
    hold the requests of their last evaluation: load them again for another.
    """
    from lm_eval.tasks import TaskManager

    refs = [task_ref(n) for n in names]
    with _quiet_lm_eval():
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=any(r.defaults for r in refs))
        out: dict[str, dict] = {}
        for ref in refs:
            try:
                out[ref.name] = manager.load([ref.spec])["tasks"]
            except KeyError:
                raise UserError(f"unknown zero-shot task {ref.name!r}: lm-eval has no task {ref.spec!r}", _HINT) from None
            except Exception as exc:
                if _hub_failure(exc):
                    raise UserError(f"zero-shot task {ref.name!r} needs its data from the Hugging Face Hub, which could not be reached",
                                    f"use a bundled task ({', '.join(BUNDLED_TASKS)}), "
                                    "or go online / unset HF_DATASETS_OFFLINE once to cache it") from None
                raise UserError(f"cannot load zero-shot task {ref.name!r}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                                "check the task file (an lm-eval task YAML)") from None
    return out


def lm_eval_version() -> str:
    import lm_eval

    return getattr(lm_eval, "__version__", "unknown")


def _in_memory_lm(model, tokenizer, batch_size: int, progress: Callable | None, cancel: Callable | None, adapter=None):
    """lm-eval's HFLM over the model as it is, reporting progress and honouring cancel between chunks of requests.

    Requests are scored in chunks of ``CHUNK`` (lm-eval sorts and batches
    within each); the scores do not depend on the chunking. With an
    ``adapter`` (:class:`workbench.evaluation.tta.Adapter`) the documents
    are taken in batches of ``adapter.config.batch``: the adapter steps on
    the batch's choices (their summed log-likelihoods make the label
    distribution), then lm-eval scores the batch's requests as usual.
    """
    from lm_eval.models.huggingface import HFLM

    class InMemoryLM(HFLM):
        CHUNK = 512

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            if adapter is not None:
                return self._adapted(requests)
            out = []
            for start in range(0, len(requests), self.CHUNK):
                if cancel is not None and cancel():
                    raise Cancelled("zero-shot evaluation cancelled", "the metrics so far are kept in the run history")
                out.extend(super().loglikelihood(requests[start:start + self.CHUNK], disable_tqdm=True))
                if progress is not None:
                    progress(len(out), len(requests))
            return out

        def _adapted(self, requests):
            docs: dict = {}
            for i, r in enumerate(requests):
                docs.setdefault((r.task_name, r.doc_id), []).append(i)
            groups = list(docs.values())
            out: list = [None] * len(requests)
            done = 0
            for start in range(0, len(groups), adapter.config.batch):
                if cancel is not None and cancel():
                    raise Cancelled("zero-shot evaluation cancelled", "the metrics so far are kept in the run history")
                batch = groups[start:start + adapter.config.batch]
                adapter.adapt([lambda g=g: self.choice_scores([requests[i].args for i in g]) for g in batch if len(g) > 1])
                flat = [i for g in batch for i in g]
                for i, scored in zip(flat, super().loglikelihood([requests[i] for i in flat], disable_tqdm=True)):
                    out[i] = scored
                adapter.end_batch()
                done += len(flat)
                if progress is not None:
                    progress(done, len(requests))
            return out

        def choice_scores(self, pairs):
            """Summed log-probability of each (context, continuation), with gradients, in one right-padded forward."""
            from .icl import continuation_logprobs

            rows, spans = [], []
            for context, continuation in pairs:
                ctx, cont = (self._encode_pair(context, continuation) if context
                             else ([self.prefix_token_id], self.tok_encode(continuation)))
                full = (ctx + cont)[-(self.max_length + 1):]
                rows.append(full[:-1])
                spans.append((len(rows) - 1, len(full) - 1 - len(cont), cont))
            return continuation_logprobs(self.model, rows, spans, self.model.device)

    return InMemoryLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")


@contextmanager
def _lm_eval_seeds():
    """The random seeds lm-eval's command line sets (0 for random, 1234 for numpy and torch), the caller's state restored after."""
    import random

    import numpy as np
    import torch
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED

    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        random.seed(DEFAULT_RANDOM_SEED)
        np.random.seed(DEFAULT_OTHER_SEED)
        torch.manual_seed(DEFAULT_OTHER_SEED)
        try:
            yield
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])


def evaluate_tasks(model, tokenizer, names: list[str], limit: int | None = None, batch_size: int = 4,
                   progress: Callable[[str, int, int], None] | None = None, cancel: Callable[[], bool] | None = None,
                   tasks: dict[str, dict] | None = None, adaptations: list | None = None) -> list[dict]:
    """Zero-shot accuracy of ``model`` (already on its device) on each task; one dict per metric.

    Each task goes through lm-eval's ``evaluate`` with the settings its
    ``simple_evaluate`` and command line use (n-shot from the task file, else
    0; their seeds), without the environment report they also collect (a
    ``git`` call and torch's environment survey, per call).

    Each dict: ``name`` (acc, acc_norm, perplexity...), ``dataset`` (the task
    as named, or ``NAME/SUBTASK`` for a group), ``value``, ``stderr``,
    ``samples`` (documents evaluated), ``limit`` and ``extra`` (lm-eval's
    version, the task's own name and version, n-shot, higher_is_better).
    ``progress(task, done, total)`` is called as requests are scored.
    ``tasks`` takes what :func:`load_tasks` returned, to load them only once.
    ``adaptations`` (:class:`workbench.evaluation.tta.TTAConfig`, default
    none) evaluates every task once per test-time adaptation mode, as
    ``NAME+MODE`` (seed 0), with the seconds per document and the ratio to
    the plain evaluation in ``extra``.
    """
    from .tta_settings import TTAConfig

    results: list[dict] = []
    plain: dict[str, float] = {}
    for k, tta in enumerate(sorted(adaptations or [TTAConfig()], key=lambda t: t.mode != "none")):
        loaded = tasks if k == 0 and tasks is not None else None  # a Task keeps its last requests: load anew
        results += _evaluate_tasks(model, tokenizer, names, limit, batch_size, progress, cancel, loaded, tta, plain)
    return results


def _evaluate_tasks(model, tokenizer, names, limit, batch_size, progress, cancel, tasks, tta, plain: dict) -> list[dict]:
    """Every task once, with one adaptation mode (``plain`` collects the unadapted seconds per document by task)."""
    from lm_eval.defaults import DEFAULT_OTHER_SEED
    from lm_eval.evaluator import evaluate

    from .tta import Adapter

    loaded = tasks if tasks is not None else load_tasks(names)
    version = lm_eval_version()
    results: list[dict] = []
    with _quiet_lm_eval():
        for name in names:
            for leaf, task in loaded[name].items():
                dataset = name if len(loaded[name]) == 1 else f"{name}/{leaf}"

                def report(done, total, dataset=dataset):
                    if progress is not None:
                        progress(dataset, done, total)

                if task.get_config("num_fewshot") is None:
                    task.set_config(key="num_fewshot", value=0)
                task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
                started = time.perf_counter()
                with Adapter(model, tta, seed=0) if tta.mode != "none" else nullcontext() as adapter:
                    lm = _in_memory_lm(model, tokenizer, batch_size, report, cancel, adapter)
                    with _lm_eval_seeds():
                        out = evaluate(lm=lm, task_dict={"tasks": {leaf: task}, "groups": {}, "group_map": {}}, limit=limit,
                                       bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False)
                metrics = _metrics(out, leaf, dataset, limit, version)
                docs = (out.get("n-samples") or {}).get(leaf, {}).get("effective") or 1
                per_doc = (time.perf_counter() - started) / docs
                if tta.mode == "none":
                    plain[dataset] = per_doc
                for m in metrics:
                    m["extra"].update({"tta": tta.mode, "seconds_per_query": per_doc,
                                       "time_ratio": per_doc / plain[dataset] if dataset in plain else None})
                    if tta.mode != "none":
                        m["dataset"] = f"{dataset}+{tta.mode}"
                        m["extra"]["tta_settings"] = tta.settings()
                        m["extra"]["tta_steps_taken"] = adapter.steps_taken
                results.extend(metrics)
    return results


def _metrics(out: dict, leaf: str, dataset: str, limit: int | None, version: str) -> list[dict]:
    values = out["results"][leaf]
    samples = (out.get("n-samples") or {}).get(leaf, {}).get("effective")
    higher = (out.get("higher_is_better") or {}).get(leaf, {})
    metrics = []
    for key, value in values.items():
        metric, sep, filt = key.partition(",")
        if not sep or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        stderr = values.get(f"{metric}_stderr,{filt}")
        metrics.append({
            "name": metric, "dataset": dataset, "value": float(value),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            "samples": samples, "limit": limit,
            "extra": {"kind": "zeroshot", "lm_eval": version, "task": leaf, "filter": filt,
                      "task_version": (out.get("versions") or {}).get(leaf),
                      "num_fewshot": (out.get("n-shot") or {}).get(leaf, 0),
                      "higher_is_better": higher.get(metric)},
        })
    return metrics
