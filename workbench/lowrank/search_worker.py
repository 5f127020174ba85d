"""A search worker process: ``python -m workbench.lowrank.search_worker CONFIG INDEX``.

Started by a low-rank step with ``workers > 1`` (one per GPU where there are
GPUs, through ``CUDA_VISIBLE_DEVICES``). It loads the model, the factors the
run saved beside the study and the objective chunks, joins the study and runs
trials until the study holds the step's number of complete trials. It reports
nothing itself: the run's process reads the trials back from the study.
Exit codes follow the CLI: 0 done, 2 bad input, 1 failure.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    from workbench.errors import WorkbenchError

    try:
        config_path, index = argv[0], int(argv[1])
        config = json.loads(Path(config_path).read_text())
    except (IndexError, ValueError, OSError) as exc:
        print(f"error: usage: python -m workbench.lowrank.search_worker CONFIG INDEX ({exc})", file=sys.stderr)
        return 2
    try:
        run_worker(config, index)
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def run_worker(config: dict, index: int) -> None:
    import torch

    from workbench.errors import UserError
    from workbench.models import load_model
    from workbench.spec import spec_from_dict

    from . import search as S
    from .allocation import Budget, search_space
    from .compress import load_factors
    from .family import METHODS
    from .objective import Objective, objective_tokens

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    threads = os.environ.get("WORKBENCH_WORKER_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    spec = spec_from_dict(config["spec"])
    step = spec.steps[config["step"]]
    loaded = load_model(spec.model.name, dtype=spec.model.dtype, device=config["device"],
                        trust_remote_code=spec.model.trust_remote_code)
    factors = load_factors(Path(config["factors"]), config["fingerprint"])
    if factors is None:
        raise UserError(f"the factors in {config['factors']} are missing or belong to other settings",
                        "start the search again from its run (workbench search --resume RUN)")
    budget = Budget.of(loaded.adapter, pair_bias=METHODS[step.method].pair_bias)
    space = search_space(budget, step.space, step.ratio_min, step.ratio_max)
    tokens = objective_tokens(step.objective_data, loaded.tokenizer, step.objective_chunks, step.objective_seqlen)
    with torch.no_grad():
        objective = Objective(loaded, tokens, step.kl_weight, config["batch_size"])
    storage = S.open_storage(config["storage"], step.heartbeat)
    study = S.quiet_optuna().load_study(study_name=config["study"], storage=storage)
    study.sampler = S.make_sampler(step.sampler, step.seed + 1009 * (index + 1) + len(study.get_trials(deepcopy=False)))
    setup = S.SearchSetup(budget, space, factors, objective, step.retention, step.slack, loaded.dtype)
    _wait_for_the_others(config, index)
    S.run_trials(study, setup.trial_function(S.worker_id()), step.trials)


def _wait_for_the_others(config: dict, index: int, patience: float = 120.0) -> None:
    """Start trials together: a worker that loaded first would otherwise take every trial of a short study.

    Each worker marks itself ready, then waits (at most ``patience`` seconds, so
    a worker that failed to start holds nobody up) until all have.
    """
    ready, workers = config.get("ready"), int(config.get("workers", 1))
    if not ready or workers < 2:
        return
    folder = Path(ready)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(index)).touch()
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline and sum(1 for _ in folder.iterdir()) < workers:
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
