"""workbench: compress large language models from a terminal.

Importing this package is cheap and never imports torch: the engine modules
(``workbench.engine``, ``workbench.models``, ...) are imported only by the
process that runs compression (the worker, or a headless run).
"""

__version__ = "0.1.0"


def load(path, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
    """Load a model saved by workbench (or any causal LM): ``(model, tokenizer)``.

    Rebuilds checkpoints whose structure a plain config cannot express
    (factorized low-rank layers, per-layer widths); see ``workbench.rebuild``.
    """
    from .models.loading import load as _load

    return _load(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
