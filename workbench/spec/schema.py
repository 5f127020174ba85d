"""The run spec's sections as dataclasses: what to load, how to calibrate, what to evaluate and export. No torch.

A spec is plain data (dataclasses of str/int/float/bool/lists). It is read from
TOML presets, edited with ``--set key=value``, sent to workers as JSON and
stored in the run history. The ``[[steps]]`` dataclasses belong to their
method families (``workbench.registry``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from workbench.data.evaluation_text import builtin_evaluation_sets

DTYPES = ("auto", "float32", "bfloat16", "float16")
# The bundled evaluation texts (the registry, workbench.data.evaluation_text, also knows file:PATH and registered ones).
EVAL_DATASETS_BUILTIN = builtin_evaluation_sets()


@dataclass
class ModelSpec:
    name: str = "demo"
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False


@dataclass
class SelfGenSpec:
    """``[calibration.selfgen]``: how ``selfgen`` makes its text (``workbench.data.selfgen``; defaults from Ji et al., ICLR 2025)."""

    corpus: str = "wikitext2"  # seed texts: wikitext2 (validation), c4 (train), books, file:PATH, hf:...
    prefix_tokens: int = 2  # k: generation starts from the first k tokens of each seed text
    samples: int | None = None  # texts to generate; None: ceil(nsamples / keep)
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 50
    repetition_penalty: float = 1.2
    max_new_tokens: int | None = None  # None: the calibration seqlen
    keep: float = 0.8  # keep the samples whose perplexity is below this quantile
    batch_size: int = 32  # sequences generated at once


@dataclass
class CalibrationSpec:
    source: str = "c4"
    nsamples: int = 128
    seqlen: int | None = None  # None: min(2048, the model's context)
    seed: int = 0
    batch_size: int = 8
    offload_activations: bool = False  # keep calibration activations in CPU memory
    summary: bool = True  # documents, tokens and the dense model's perplexity on the windows, before pruning
    compare: str | None = None  # a source to measure the token-distribution divergence from
    selfgen: SelfGenSpec = field(default_factory=SelfGenSpec)


@dataclass
class EvalSpec:
    perplexity: list[str] = field(default_factory=lambda: ["wikitext2"])
    seqlen: int | None = None  # None: the model's context, capped at 2048
    limit: int | None = None  # the first N windows only
    before: bool = True  # also evaluate the dense model
    fresh: bool = False  # measure the dense model again even when an identical measurement is stored (--fresh)
    batch_size: int = 4
    # zero-shot accuracy through lm-evaluation-harness (workbench.evaluation.zeroshot)
    zeroshot: list[str] = field(default_factory=list)  # bundled task names, lm_eval:NAME or file:TASK.yaml
    zeroshot_limit: int | None = None  # the first N samples of each task (None: the full sets)
    # in-context learning (workbench.evaluation.icl): zero-shot, few-shot and DAIL on classification sets
    icl: list[str] = field(default_factory=list)  # bundled data set names or file:PATH.jsonl
    icl_modes: list[str] = field(default_factory=lambda: ["dail"])  # zeroshot, fewshot, dail
    icl_k: int = 4  # demonstrations per query
    icl_memory: int = 32  # DAIL: at most M earlier (query, predicted label) pairs kept
    icl_retriever: str = "bm25"  # bm25 | hidden (cosine of the model's mean-pooled hidden states)
    icl_max_entropy: float | None = None  # DAIL: only predictions at most this uncertain (0..1) serve as demonstrations
    icl_seeds: int = 3  # query orders (and few-shot draws); accuracy is reported as mean and std over them
    icl_limit: int | None = None  # a fixed random subset of N test queries per data set
    icl_labels: list[str] = field(default_factory=list)  # label words of a file: data set, by label index
    icl_template: str = ""  # prompt of a file: data set, e.g. "Review: {text}\nSentiment:"
    # test-time adaptation of the icl sets and zero-shot tasks (workbench.evaluation.tta); an icl set NAME@typo:0.15 is shifted
    tta: list[str] = field(default_factory=lambda: ["none"])  # none, tent, pcl: each is evaluated
    tta_steps: int = 1  # optimizer (Adam) steps per test batch
    tta_lr: float = 1e-2  # Adam
    tta_batch: int = 4  # queries per test batch
    tta_episodic: bool = True  # put the parameters back after every batch (false: keep adapting through the stream)
    tta_params: str = "norms"  # norms (normalization weights) | lora (adapters on tta_lora_targets)
    tta_lora_rank: int = 4
    tta_lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    pcl_where: str = "layers"  # layers (every decoder layer's input) | layer:N (after layer N) | embeddings
    pcl_how: str = "dropout"  # dropout (random mask at rate pcl_strength) | gaussian (noise of pcl_strength x RMS)
    pcl_strength: float = 0.1
    pcl_ce: float = 0.0  # weight of the clean prediction's cross-entropy as a pseudo-label
    efficiency: bool = False  # parameters, size, prefill tokens/s, decode latency, peak memory


EXPORT_FORMATS = ("auto", "dense", "compressed-tensors")


@dataclass
class ExportSpec:
    save: bool = False
    out: str | None = None  # None: a folder in the run's directory
    dtype: str = "auto"  # auto: the checkpoint's dtype
    overwrite: bool = False  # replace an earlier workbench export at ``out`` (never any other folder)
    format: str = "auto"  # auto | dense | compressed-tensors (auto: compressed-tensors for a quantized model)


@dataclass
class RunSpec:
    name: str = "run"
    description: str = ""
    reference: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    steps: list = field(default_factory=list)
    evaluate: EvalSpec = field(default_factory=EvalSpec)
    export: ExportSpec = field(default_factory=ExportSpec)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def summary(self) -> str:
        steps = ", ".join(s.label() for s in self.steps) or "no compression"
        return f"{self.model.name}: {steps}"


SECTIONS = {
    "model": ModelSpec,
    "calibration": CalibrationSpec,
    "evaluate": EvalSpec,
    "export": ExportSpec,
}
# Fields that are tables of their own, e.g. [calibration.selfgen].
NESTED_TABLES = {"SelfGenSpec": SelfGenSpec}
