"""Structured compression: depth (layers), width (MLP channels, heads) and vocabulary pruning.

The result is a physically smaller model: ``depth`` removes decoder layers,
``width`` rows and columns of the projections, ``vocab`` tokens with their
embedding and LM head rows. Uniform widths, fewer layers and a smaller
vocabulary stay ordinary checkpoints that ``transformers`` loads as they
are; per-layer widths are rebuilt by ``workbench.load``.

- ``depth``: layer importance (Block Influence, angular distance, perplexity
  increase), selection, removal with consistent per-layer config;
- ``width``: channel and head scores, grouped-query-safe removal, bias
  compensation, the ``width`` structure entry;
- ``vocab``: token choice with merge closure, tokenizer rebuild, embedding
  slicing;
- ``layout``: what they share (family checks, resizing linears);
- ``step``: the engine's runner for the three step types.
"""
