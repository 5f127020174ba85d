"""``workbench calib``: preview a calibration source, or export a self-generated set. No torch at import.

The commands load the model and build windows exactly as a run does: ``preview``
prints what the worker's preview job answers (``workbench.data.preview``). The
engine's modules (torch) are imported when a command runs, not when the CLI
builds its parser.
"""

from __future__ import annotations

import sys

from workbench.errors import UserError
from workbench.spec import RunSpec, apply_override, spec_from_dict

from .windows import window_length


def register(sub) -> dict:
    """Add ``workbench calib`` to ``sub``; return ``{name: handler}``."""
    calib = sub.add_parser("calib", help="preview or export calibration data")
    calib_sub = calib.add_subparsers(dest="calib_command", required=True)
    for name, help_text in (("preview", "show a calibration source's summary and first windows"),
                            ("export", "write a self-generated set as JSON lines")):
        p = calib_sub.add_parser(name, help=help_text)
        p.add_argument("source", help="a calibration source, e.g. books, selfgen, selfgen:c4, mix:c4=0.5,selfgen=0.5")
        p.add_argument("--model", default="demo", help="the model (for selfgen, perplexity and the tokenizer)")
        p.add_argument("--nsamples", type=int, default=32)
        p.add_argument("--seqlen", type=int, help="tokens per window (default: min(2048, the model's context))")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="e.g. --set calibration.selfgen.prefix_tokens=8 (repeatable)")
        if name == "preview":
            p.add_argument("--compare", help="a source to measure the token-distribution divergence from")
            p.add_argument("--show", type=int, default=3, help="windows to print")
        else:
            p.add_argument("--out", required=True, help="the .jsonl file to write")
            p.add_argument("--all", action="store_true", help="also the samples the perplexity filter dropped")

    def cmd_calib(args) -> int:
        return cmd_calib_preview(args) if args.calib_command == "preview" else cmd_calib_export(args)

    return {"calib": cmd_calib}


def _calib_spec(args) -> RunSpec:
    data = {"model": {"name": args.model}, "calibration": {"source": args.source, "nsamples": args.nsamples, "seed": args.seed}}
    if args.seqlen:
        data["calibration"]["seqlen"] = args.seqlen
    if getattr(args, "compare", None):
        data["calibration"]["compare"] = args.compare
    for item in args.overrides:
        apply_override(data, item)
    return spec_from_dict(data)


def _selfgen_set(spec: RunSpec, loaded, seqlen: int, console):
    """The generated set of a ``selfgen[:CORPUS]`` source (from the cache when it was made before), with a progress bar."""
    from rich.progress import Progress

    from workbench.history import cache_dir

    from .selfgen import generated_set, params_from

    c = spec.calibration
    params = params_from(c.selfgen, c.source.partition(":")[2])
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("self-generation", total=None)
        return generated_set(loaded.model, loaded.tokenizer, params, c.nsamples, seqlen, c.seed, device=loaded.device,
                             cache_dir=cache_dir() / "calibration",
                             progress=lambda done, total, detail: bar.update(task, completed=done, total=total, description=detail))


def cmd_calib_preview(args) -> int:
    """The preview job's answer (``workbench.data.preview``), printed: more windows read, the comparison, ``--show`` windows."""
    from rich.console import Console
    from rich.table import Table

    from workbench.events import WarningEvent
    from workbench.models import load_spec_model

    from .preview import preview_calibration
    from .sources import describe_source
    from .summary import SUMMARY_WINDOWS

    spec = _calib_spec(args)
    c = spec.calibration
    console = Console()
    loaded = load_spec_model(spec.model)
    console.print(f"[bold]{c.source}[/]: {describe_source(c.source)}")
    if c.source.split(":")[0] == "selfgen":
        gset = _selfgen_set(spec, loaded, window_length(c.seqlen, loaded.adapter.context_length), Console(stderr=True))
        rate = f", {gset.new_tokens / gset.seconds:,.0f} tokens/s" if gset.seconds else ""
        console.print(f"generated {len(gset.samples)} texts ({gset.new_tokens:,} new tokens in {gset.seconds:.1f} s{rate}"
                      f"{', from the cache' if gset.from_cache else ''}); kept {len(gset.kept)} below the perplexity "
                      f"threshold {gset.threshold:.2f}")

    def emit(event) -> None:
        if isinstance(event, WarningEvent):
            print(f"warning: {event.message}", file=sys.stderr)

    result = preview_calibration(spec, emit, loaded=loaded, compare=True, max_windows=SUMMARY_WINDOWS, show=args.show,
                                 seqlen_key="--seqlen")
    table = Table(title=f"calibration data: {c.nsamples} x {result['seqlen']} tokens of {c.source}, seed {c.seed}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("documents", f"{result['documents']:,}" if result["documents"] is not None else "- (token ids)")
    table.add_row("tokens in the documents", f"{result['document_tokens']:,}" if result["document_tokens"] is not None else "-")
    table.add_row(f"dense perplexity on the windows (the first {result['perplexity_windows']})", f"{result['perplexity']:.2f}")
    if "divergence" in result:
        table.add_row(f"token JS divergence from {c.compare}", f"{result['divergence']['js_bits']:.4f} bits")
    console.print(table)
    for sample in result["samples"]:
        console.print(f"[bold]window {sample['window']}[/]: {sample['text']!r}{' ...' if sample['truncated'] else ''}", highlight=False)
    return 0


def cmd_calib_export(args) -> int:
    from rich.console import Console

    from workbench.models import load_spec_model

    from .selfgen import export_jsonl

    spec = _calib_spec(args)
    if spec.calibration.source.split(":")[0] != "selfgen":
        raise UserError(f"only a self-generated set can be exported, not {spec.calibration.source!r}",
                        "other sources are data you already have; export selfgen with: workbench calib export selfgen --out FILE.jsonl")
    loaded = load_spec_model(spec.model)
    seqlen = window_length(spec.calibration.seqlen, loaded.adapter.context_length, "--seqlen",
                           lambda message: print(f"warning: {message}", file=sys.stderr))
    gset = _selfgen_set(spec, loaded, seqlen, Console(stderr=True))
    path = export_jsonl(gset, args.out, include_dropped=args.all)
    what = f"{len(gset.samples)} samples ({len(gset.kept)} kept)" if args.all else f"the {len(gset.kept)} kept samples"
    print(f"wrote {what} to {path}; use it as calibration.source = \"file:{path}\"")
    return 0
