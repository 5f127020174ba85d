"""Mixtures of calibration sources, ``mix:A=0.5,B=0.5``: parsed, counted and described here. No torch.

A mixture draws the given fraction of the samples from each source and
concatenates them in the order given (``workbench.data.sampling.mixture``
builds them); the sources themselves are checked by the registry
(``workbench.data.sources.check_source``).
"""

from __future__ import annotations

from workbench.errors import UserError


def parse_mixture(spec: str, key: str = "calibration.source") -> list[tuple[str, float]]:
    """``"c4=0.5,selfgen=0.5"`` -> ``[("c4", 0.5), ("selfgen", 0.5)]``.

    Each part is ``SOURCE=FRACTION`` (the last ``=`` splits, so a source may
    hold one); fractions are positive and sum to 1. Sources are not checked
    here (``workbench.data.sources.check_source`` and ``resolve`` do).
    """
    hint = "write mix:SOURCE=FRACTION,SOURCE=FRACTION with fractions summing to 1, e.g. mix:c4=0.5,selfgen=0.5"
    parts = [p.strip() for p in spec.split(",")]
    if not spec.strip() or any(not p for p in parts):
        raise UserError(f"{key}: the mixture {spec!r} is empty or has an empty part", hint=hint)
    out: list[tuple[str, float]] = []
    for part in parts:
        source, sep, value = part.rpartition("=")
        source = source.strip()
        try:
            fraction = float(value)
        except ValueError:
            fraction = float("nan")
        if not sep or not source or not (0.0 < fraction <= 1.0):
            raise UserError(f"{key}: {part!r} in the mixture is not SOURCE=FRACTION with a fraction in (0, 1]", hint=hint)
        if source.lower().startswith("mix:") or source.lower() == "mix":
            raise UserError(f"{key}: a mixture cannot hold another mixture ({part!r})", hint="list every source in one mix:")
        if source in (s for s, _ in out):
            raise UserError(f"{key}: {source!r} appears twice in the mixture", hint="give each source once, with its total fraction")
        out.append((source, fraction))
    total = sum(f for _, f in out)
    if abs(total - 1.0) > 1e-6:
        raise UserError(f"{key}: the mixture fractions sum to {total:g}, not 1", hint=hint)
    return out


def mixture_counts(parts: list[tuple[str, float]], nsamples: int, key: str = "calibration.source") -> list[int]:
    """Samples per source: ``fraction * nsamples`` rounded so the counts sum to ``nsamples`` (largest remainders first)."""
    exact = [f * nsamples for _, f in parts]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(parts)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: nsamples - sum(counts)]:
        counts[i] += 1
    for (source, fraction), n in zip(parts, counts):
        if n == 0:
            raise UserError(
                f"{key}: {source} gets 0 of the {nsamples} samples at fraction {fraction:g}",
                hint="raise calibration.nsamples or that source's fraction",
            )
    return counts


def describe_mixture(arg: str) -> str:
    """``a mixture: 50% of the samples from c4, 50% of the samples from selfgen``."""
    parts = parse_mixture(arg)
    return "a mixture: " + ", ".join(f"{fraction:.0%} of the samples from {source}" for source, fraction in parts)


__all__ = ["parse_mixture", "mixture_counts", "describe_mixture"]
