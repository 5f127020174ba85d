"""Test-time adaptation of the classification-style evaluations: Tent and perturbation consistency learning (PCL).

An :class:`Adapter` wraps one evaluation. Before each test batch (``batch``
queries, the prompts the plain evaluation would build) it takes ``steps``
Adam steps on a small set of parameters, without labels, then the batch is
predicted exactly as the plain evaluation predicts it:

- ``tent`` (Wang et al., ICLR 2021): minimize the entropy of each query's
  label distribution (softmax over the scores the evaluation compares: label
  words, or a multiple-choice set's per-byte choice scores);
- ``pcl`` (Su et al., EMNLP 2023): with dropout off, one clean forward and one
  forward whose internal features are perturbed (``where``: ``layers``, every
  decoder layer's input; ``layer:N``, the hidden states after layer N;
  ``embeddings``; ``how``: ``dropout``, a random mask at rate ``strength``
  rescaled by 1/(1-rate), or ``gaussian``, noise of ``strength`` times each
  token's RMS); the loss is KL(clean || perturbed) over the label
  distribution, the clean distribution being the target (no gradient through
  it), plus ``ce`` times the perturbed prediction's cross-entropy against the
  clean prediction's label (the pseudo-label).

The adapted parameters (``params``): ``norms``, the weights and biases of
every normalization layer, adapted in place and put back bitwise; or
``lora``, low-rank adapters added to the outputs of the named linear layers
through forward hooks (B starts at zero, so they start as the identity) that
belong to the evaluation only. ``episodic`` (the default) puts the parameters
back after every batch; otherwise they keep adapting through the stream. When
the evaluation ends (or fails) every parameter, ``requires_grad`` flag and
hook is as before: the evaluated model is bitwise unchanged.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import UserError

from .tta_settings import HOW, MODES, PARAMS, TTAConfig, check

__all__ = ["HOW", "MODES", "PARAMS", "TTAConfig", "check", "Adapter", "pcl_loss", "tent_loss", "entropy", "norm_parameters"]

# ----------------------------------------------------------------------------- losses


def entropy(scores: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(scores) (nats)."""
    logp = F.log_softmax(scores.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def tent_loss(scores: torch.Tensor) -> torch.Tensor:
    return entropy(scores)


def pcl_loss(clean: torch.Tensor, perturbed: torch.Tensor, ce: float = 0.0) -> torch.Tensor:
    """KL(softmax(clean) || softmax(perturbed)), the clean side a fixed target; plus ``ce`` x CE(perturbed, argmax clean)."""
    target = F.log_softmax(clean.detach().float(), dim=-1)
    logq = F.log_softmax(perturbed.float(), dim=-1)
    loss = (target.exp() * (target - logq)).sum(-1)
    if ce:
        loss = loss - ce * logq[..., int(torch.argmax(clean))]
    return loss


# ----------------------------------------------------------------------------- the adapter


def norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights and biases of every normalization layer (LayerNorm, RMSNorm and their family variants)."""
    out, seen = [], set()
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            for p in module.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


class _LoRA(nn.Module):
    """x -> x A^T B^T added to a linear layer's output; B starts at zero."""

    def __init__(self, linear: nn.Linear, rank: int, generator: torch.Generator):
        super().__init__()
        w = linear.weight
        a = torch.randn(rank, w.shape[1], generator=generator) / math.sqrt(w.shape[1])
        self.a = nn.Parameter(a.to(w.device, torch.float32))
        self.b = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=torch.float32))

    def hook(self, module, inputs, output):
        x = inputs[0]
        return output + ((x.float() @ self.a.T) @ self.b.T).to(output.dtype)


def _hidden(args, kwargs):
    if args:
        return args[0], lambda x: ((x, *args[1:]), kwargs)
    return kwargs["hidden_states"], lambda x: (args, {**kwargs, "hidden_states": x})


class Adapter:
    """One evaluation's adaptation: ``with Adapter(model, config, seed) as a: ... a.adapt(batch, score) ...``."""

    def __init__(self, model: nn.Module, config: TTAConfig, seed: int = 0):
        check(config)
        self.model, self.config = model, config
        self.generator = torch.Generator().manual_seed(seed)
        self.perturbing = False
        self._hooks: list = []
        self._flags: list[tuple[nn.Parameter, bool]] = []
        self.params: list[nn.Parameter] = []
        self._saved: list[torch.Tensor] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self.steps_taken = 0

    # -- set up and put back

    def __enter__(self) -> Adapter:
        self._flags = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            for p, _ in self._flags:
                p.requires_grad_(False)
            if self.config.params == "norms":
                self.params = norm_parameters(self.model)
                if not self.params:
                    raise UserError(f"{type(self.model).__name__} has no normalization parameters to adapt",
                                    "use evaluate.tta_params = \"lora\"")
            else:
                self.params = self._add_lora()
            for p in self.params:
                p.requires_grad_(True)
            self._saved = [p.detach().clone() for p in self.params]
            self._optimizer = torch.optim.Adam(self.params, lr=self.config.lr)
            if self.config.mode == "pcl":
                self._add_perturbation()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.reset()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for p, flag in self._flags:
            p.requires_grad_(flag)
            p.grad = None
        self._optimizer = None

    def reset(self) -> None:
        """The adapted parameters back to their values before the evaluation, bitwise; the optimizer's state cleared."""
        with torch.no_grad():
            for p, saved in zip(self.params, self._saved):
                p.copy_(saved)
                p.grad = None
        if self._optimizer is not None:
            self._optimizer.state.clear()

    def end_batch(self) -> None:
        if self.config.episodic:
            self.reset()

    def _add_lora(self) -> list[nn.Parameter]:
        params = []
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in self.config.lora_targets:
                lora = _LoRA(module, self.config.lora_rank, self.generator)
                self._hooks.append(module.register_forward_hook(lora.hook))
                params += [lora.a, lora.b]
        if not params:
            raise UserError(f"no linear layer is named {', '.join(self.config.lora_targets)}",
                            "set evaluate.tta_lora_targets to names of the model's linear layers, e.g. q_proj, v_proj")
        return params

    # -- perturbation (PCL)

    def _perturb(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.how == "dropout":
            keep = torch.rand(x.shape, generator=self.generator).to(x.device) >= c.strength
            return x * keep.to(x.dtype) / (1 - c.strength)
        noise = torch.randn(x.shape, generator=self.generator).to(x.device, x.dtype)
        rms = x.float().pow(2).mean(-1, keepdim=True).sqrt().to(x.dtype)
        return x + c.strength * rms * noise

    def _add_perturbation(self) -> None:
        from workbench.models import get_adapter

        where = self.config.where
        family = get_adapter(self.model)
        if where == "embeddings":
            def after(module, inputs, output):
                return self._perturb(output) if self.perturbing else output

            self._hooks.append(family.embed_tokens.register_forward_hook(after))
        elif where == "layers":
            def before(module, args, kwargs):
                if not self.perturbing:
                    return None
                x, rebuild = _hidden(args, kwargs)
                return rebuild(self._perturb(x))

            for layer in family.layers:
                self._hooks.append(layer.register_forward_pre_hook(before, with_kwargs=True))
        else:
            index = int(where.split(":")[1])
            if not -family.num_layers <= index < family.num_layers:
                raise UserError(f"pcl_where = {where!r}: the model has {family.num_layers} layers",
                                f"use layer:0 to layer:{family.num_layers - 1}")

            def after_layer(module, inputs, output):
                if not self.perturbing:
                    return None
                if isinstance(output, tuple):
                    return (self._perturb(output[0]), *output[1:])
                return self._perturb(output)

            self._hooks.append(family.layers[index].register_forward_hook(after_layer))

    # -- one batch

    def loss(self, score: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The adaptation loss of one query, ``score()`` computing its scores with gradients."""
        if self.config.mode == "tent":
            return tent_loss(score())
        with torch.no_grad():  # the clean prediction is the target (and the pseudo-label): no gradient through it
            clean = score()
        self.perturbing = True
        try:
            perturbed = score()
        finally:
            self.perturbing = False
        return pcl_loss(clean, perturbed, self.config.ce)

    def adapt(self, queries: list[Callable[[], torch.Tensor]]) -> list[float]:
        """``steps`` optimizer steps on the batch's mean loss; each query's backward is taken alone (one query's graph in memory)."""
        losses = []
        if self.config.mode == "none" or not queries:
            return losses
        with torch.enable_grad():  # the engine evaluates under no_grad
            for _ in range(self.config.steps):
                losses.append(self._step(queries))
        return losses

    def _step(self, queries: list[Callable[[], torch.Tensor]]) -> float:
        self._optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for score in queries:
            loss = self.loss(score) / len(queries)
            loss.backward()
            total += float(loss.detach())
        self._optimizer.step()
        self.steps_taken += 1
        return total
