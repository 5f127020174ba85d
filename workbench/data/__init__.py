"""Calibration and evaluation text: where windows of token ids come from.

- ``sources``: the registry of calibration sources (built-in and registered),
  their descriptions and the validation checks; torch-free, asked by the spec
  validator, the engine, the UI, the preview and the worker alike;
- ``mixtures``: ``mix:A=0.5,B=0.5`` parsed and counted (torch-free);
- ``evaluation_text``: the registry of the texts perplexity is measured on
  (``workbench.perplexity`` reads them, the validator checks against it; torch-free);
- ``corpora``: the bundled C4, WikiText-2 and books texts, local files and Hub datasets;
- ``sampling``: windows cut from a source's documents (the papers' protocol), random tokens, mixtures built;
- ``cache``: the on-disk cache of windows and the fingerprints that key it;
- ``summary``: a calibration set described before pruning;
- ``selfgen``: text the model generates itself;
- ``windows``: the one rule for window lengths;
- ``preview``: the engine's calibration preview job;
- ``cli``: ``workbench calib``.
"""
