"""The search objective: perplexity on fixed text chunks plus a weighted KL divergence to the dense model.

As in the reference code (Ji et al., 2024), ``objective = ppl + kl_weight *
KL``, where ``ppl`` is the perplexity of the compressed model on the chunks
and ``KL`` the divergence of the compressed model's next-token distribution
from the dense model's, summed over a chunk's positions and averaged over
chunks (PyTorch's ``kl_div`` with ``batchmean`` per chunk).

The chunks come from text the final evaluation never reads: the starts of
equal parts of the WikiText-2 validation split (the evaluation reads test), or
of the C4 validation documents after the first 1,100 (the ones perplexity on
``c4`` reads). The model runs layer by layer over the chunks, one decoder
layer on the device at a time, so a trial costs one forward pass and never
needs the whole model on the device. The dense model's log-probabilities are
computed once.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Callable

import torch
import torch.nn.functional as F

from workbench.data import corpora
from workbench.data.evaluation_text import C4_EVAL_DOCUMENTS
from workbench.errors import CANCEL_HINT, UserError
from workbench.layerwise import Captured, Resident, capture_inputs
from workbench.sweep import LayerSweep
from workbench.perplexity import _window_losses

from .modules import swapped


def objective_text(data: str) -> str:
    if data == "wikitext2":
        return corpora.wikitext2_text("valid")
    return " ".join(corpora.c4_documents("validation")[C4_EVAL_DOCUMENTS:])


def objective_tokens(data: str, tokenizer, chunks: int, seqlen: int) -> torch.Tensor:
    """``(chunks, seqlen)`` token ids: the first ``seqlen`` tokens of each of ``chunks`` equal parts of the objective text.

    Only the start of each part is tokenized (no special tokens), so a worker
    process gets its chunks in milliseconds; the chunks are the same in every
    process.
    """
    text = objective_text(data)
    part = len(text) // chunks
    rows = []
    for i in range(chunks):
        segment = text[i * part:(i + 1) * part]
        size = seqlen * 6
        while True:
            ids = tokenizer(segment[:size], add_special_tokens=False, verbose=False)["input_ids"]
            if len(ids) > seqlen or size >= len(segment):
                break
            size *= 2
        if len(ids) < seqlen:
            raise UserError(f"the {data} objective text is too short for {chunks} chunks of {seqlen} tokens",
                            "lower objective_chunks or objective_seqlen")
        rows.append(ids[:seqlen])
    return torch.tensor(rows, dtype=torch.long)


Replacements = Callable[[int], dict]  # decoder layer index -> {linear name in the layer: module on the device}


class Objective:
    """Measures ``perplexity + kl_weight * KL`` of the model with some linears swapped for factorized ones."""

    def __init__(self, loaded, tokens: torch.Tensor, kl_weight: float, batch_size: int = 8, cancel=None,
                 cancel_hint: str = CANCEL_HINT):
        self.adapter = loaded.adapter
        self.device = torch.device(loaded.device)
        self.kl_weight = kl_weight
        self.cancel = cancel
        self.cancel_hint = cancel_hint
        self.inputs = capture_inputs(self.adapter, tokens, self.device, batch_size, self.device)
        self.targets = [batch[:, 1:].to(self.device) for batch in torch.split(tokens, batch_size)]
        self.dense_logp = [F.log_softmax(logits.float(), -1) for logits in self._logits(None)]

    def _logits(self, replacements: Replacements | None) -> list[torch.Tensor]:
        captured = Captured(hidden=list(self.inputs.hidden), layer_args=self.inputs.layer_args)
        sweep = LayerSweep(self.adapter, device=self.device, store=self.device, cancel=self.cancel, captured=captured,
                           cancel_hint=self.cancel_hint)
        sweep.run(dense=True, within=(lambda i, layer: swapped(layer, replacements(i))) if replacements else None)
        with ExitStack() as stack:
            for module in [*self.adapter.post_layer_modules(), self.adapter.lm_head]:
                stack.enter_context(Resident(module, self.device))
            return [self.adapter.compute_logits(h) for h in captured.hidden]

    @torch.no_grad()
    def measure(self, replacements: Replacements | None = None) -> dict:
        """``{"objective", "perplexity", "kl"}`` of the model with ``replacements`` swapped in (the model as it is without)."""
        losses, kls = [], []
        for logits, targets, dense in zip(self._logits(replacements), self.targets, self.dense_logp):
            losses.append(_window_losses(logits, targets))
            logp = F.log_softmax(logits.float(), -1)
            kls.append((logp.exp() * (logp - dense)).sum(-1).sum(-1).double().cpu())
        nll = float(torch.cat(losses).mean())
        ppl = math.exp(nll) if nll < 709 else math.inf
        kl = float(torch.cat(kls).mean())
        return {"objective": ppl + self.kl_weight * kl, "perplexity": ppl, "kl": kl}
