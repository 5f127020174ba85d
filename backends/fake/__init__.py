"""A worker that needs no torch: deterministic, realistic event streams for UI tests and benchmarks.

``workbench worker --fake`` answers every job the way the engine would, with
the same stages, events and summary layout, for a Llama-shaped model of
``--fake-layers`` layers: sparsities are exactly the targets and perplexities
follow a fixed formula, so a UI test can assert on them. Timing and failures
are configurable:

- ``--fake-delay S``: seconds per unit of work (a layer, a search trial, an evaluation window);
- ``--fake-fail KIND@N``: at unit N of the first compression step (or of the
  evaluation, for a job without steps): ``error`` (a failed run), ``oom``
  (an out-of-memory error), ``crash`` (the process kills itself, like the
  kernel's OOM killer), ``hang`` (stops working and ignores cancellation);
- ``--fake-noise``: every unit also writes to stdout from Python and from C,
  as careless libraries do (the protocol must survive it);
- ``--fake-stream N`` with ``--fake-rate R``: a run job emits just N progress
  events, R per second (0: as fast as possible), for throughput benchmarks.

Steps follow the engine's stages and events:

- ``prune``: stage ``prune:I``, one ``LayerDone`` per layer at the target;
- ``lowrank``: stage ``lowrank:I:apply`` with one ``LayerDone`` per layer,
  ``sparsity = target = 1 - retention`` and per linear a ``rank`` and the
  fraction ``retained`` (value projections stay dense); ``energy`` and
  ``search`` allocations first run ``lowrank:I:statistics`` (one progress
  event per layer), and ``search`` then ``lowrank:I:search``: ``trials``
  complete ``Trial`` events of ``--fake-delay`` seconds each, trial n with
  the objective ``trial_objective(n)`` and the ratios ``trial_ratios``; its
  step report holds ``search.best`` like the engine's. Finished trials are
  kept in a journal named by ``WORKBENCH_HOME/runs/RUN/search/study.json``
  (as the engine's study is), and a run whose step's ``storage`` is that
  journal reports them at once and runs only the rest (a resumed search);
- ``depth``: stage ``depth:I`` (a progress event per layer, as the scoring
  criteria do) that removes the layers just before the last one (the last
  ones for criterion ``last``); later steps see fewer layers;
- ``width``: stage ``width:I`` with one ``LayerDone`` per layer whose
  ``sparsity`` is the fraction of the layer's linear weights removed;
- ``vocab``: stage ``vocab:I`` (a progress event per layer) that keeps
  ``size`` tokens of the fake's 8256.

Each step is imitated by the function its type names in the step registry
(``workbench.registry``: ``fake``, in ``workbench.backends.fake.steps``), and
announced with the same ``StagePlan`` the engine emits, so a new step type
brings its fake with it and the conformance test holds both to one shape.

A run with ``export.save`` writes a folder holding only ``compression.json``
(see ``FakeRun.export``), under the engine's folder rules, so the UI can
evaluate the kept model.

Perplexity after the steps is ``compressed_perplexity`` of each step's
*effective sparsity*: the pruning target; ``1 - retention`` for low-rank;
the fraction of decoder layers removed for depth; the fraction of linear
weights removed for width; the fraction of all parameters removed for vocab.

While a run job computes, the fake GPU's free memory (hello's ``devices``,
and each ``pong``'s) drops by 1 GiB per finished unit of work (layer, trial,
evaluation window), down to 1 GiB, and comes back when the job ends.
"""

from .jobs import FakeJobs, FakeOptions, FakeRun
from .model import (DENSE_PPL, FAILURES, FAKE_GPU_MEMORY, GIB, HEADS, HIDDEN, KV_HEADS, LINEARS, MODULE_TYPES, VOCAB,
                    compressed_perplexity, dense_perplexity, trial_objective, trial_ratios)
from .preview import FAKE_DOCUMENT_TOKENS, FAKE_DOCUMENTS, FAKE_SEQLEN, FAKE_TOP, fake_preview

__all__ = ["FakeJobs", "FakeOptions", "FakeRun", "fake_preview", "dense_perplexity", "compressed_perplexity",
           "trial_objective", "trial_ratios", "FAKE_DOCUMENTS", "FAKE_DOCUMENT_TOKENS", "FAKE_SEQLEN", "FAKE_TOP",
           "DENSE_PPL", "FAILURES", "FAKE_GPU_MEMORY", "GIB", "HEADS", "HIDDEN", "KV_HEADS", "LINEARS", "MODULE_TYPES", "VOCAB"]
