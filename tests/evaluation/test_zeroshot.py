"""Zero-shot tasks through lm-evaluation-harness: lm-eval's own prompts, the command line's numbers, clear bad input."""

import ast
import gzip
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from workbench.cli import main
from workbench.errors import UserError
from workbench.evaluation import zeroshot
from workbench.spec import spec_from_dict

ASSETS = Path(zeroshot.__file__).resolve().parents[1] / "assets" / "zeroshot"


# ----------------------------------------------------------------------------- the prompts are lm-eval's


class _Function(str):
    """A ``!function module.name`` reference of an upstream task file."""


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))


def _upstream(relative: str) -> tuple[dict, Path]:
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / relative
    return yaml.load(path.read_text(), Loader=_Loader), path.parent


def _render(spec, doc: dict, folder: Path):
    """What an upstream task field gives for a document: a field name, a Jinja template, a list or a !function."""
    from lm_eval.utils import apply_template

    if isinstance(spec, _Function):
        module, _, name = spec.rpartition(".")
        loaded = importlib.util.spec_from_file_location(module, folder / f"{module}.py")
        mod = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(mod)
        return getattr(mod, name)(doc)
    if isinstance(spec, list) or not isinstance(spec, str):
        return spec
    if spec in doc:
        return doc[spec]
    text = apply_template(spec, doc)
    return ast.literal_eval(text) if text.startswith("[") else int(text) if text.isdigit() else text


def _rows(name: str) -> list[dict]:
    with gzip.open(ASSETS / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _hf(task: str, row: dict) -> dict:
    """The Hugging Face data set's record for a bundled llm-foundry row (the schema lm-eval's own task reads)."""
    labels = list("ABCDE")[: len(row.get("choices", []))]
    if task in ("arc_easy", "arc_challenge"):
        return {"question": row["query"][len("Question: "):], "choices": {"text": row["choices"], "label": labels},
                "answerKey": labels[row["gold"]]}
    if task == "openbookqa":
        return {"question_stem": row["query"], "choices": {"text": row["choices"], "label": labels}, "answerKey": labels[row["gold"]]}
    if task == "piqa":
        return {"goal": row["query"][len("Question: "):-1], "sol1": row["choices"][0], "sol2": row["choices"][1], "label": row["gold"]}
    if task == "boolq":
        passage, question = re.match(r"^Passage: (.*)\nQuestion: (.*)\?$", row["query"], re.S).groups()
        return {"passage": passage, "question": question, "label": row["gold"]}
    if task == "copa":
        premise, connector = row["query"].rsplit(" ", 1)
        return {"premise": premise + ".", "question": {"because": "cause", "therefore": "effect"}[connector],
                "choice1": row["choices"][0], "choice2": row["choices"][1], "label": row["gold"]}
    if task == "siqa":
        context, question, a, b = re.match(r"^Context: (.*)\nQuestion: (.*)\nChoices:\nA\. (.*)\nB\. (.*)\nAnswer:$",
                                           row["query"], re.S).groups()
        return {"context": context, "question": question, "answerA": a, "answerB": b, "answerC": "", "label": str(row["gold"] + 1)}
    raise KeyError(task)


UPSTREAM = {"arc_easy": "arc/arc_easy.yaml", "openbookqa": "openbookqa/openbookqa.yaml", "piqa": "piqa/piqa.yaml",
            "boolq": "super_glue/boolq/default.yaml", "copa": "super_glue/copa/default.yaml", "siqa": "siqa/siqa.yaml"}


@pytest.fixture(scope="module")
def bundled():
    return zeroshot.load_tasks(list(zeroshot.BUNDLED_TASKS))


@pytest.mark.parametrize("name", sorted(UPSTREAM))
def test_bundled_tasks_ask_what_lm_evals_own_tasks_ask(bundled, name):
    """For the first documents, the prompt, the choices and the answer equal those of lm-eval's task file on the hub data."""
    config, folder = _upstream(UPSTREAM[name])
    task = bundled[name][name + zeroshot.LOCAL_SUFFIX]
    docs = task.eval_docs
    assert len(docs) == len(_rows("openbook_qa" if name == "openbookqa" else name))
    assert task.config.target_delimiter == config.get("target_delimiter", " ")
    for i in range(5):
        ours, theirs = docs[i], _hf(name, _rows("openbook_qa" if name == "openbookqa" else name)[i])
        choices = _render(config["doc_to_choice"], theirs, folder)
        target = _render(config["doc_to_target"], theirs, folder)
        if name == "siqa":  # the bundled set keeps two of the three answers
            choices = choices[:2]
        assert task.doc_to_text(ours) == _render(config["doc_to_text"], theirs, folder)
        assert task.doc_to_choice(ours) == choices
        answer = target if isinstance(target, str) else choices[target]
        assert task.doc_to_choice(ours)[task.doc_to_target(ours)] == answer


def test_winogrande_and_lambada_rebuild_lm_evals_requests(bundled):
    wino = bundled["winogrande"]["winogrande_local"]
    for doc, row in zip(wino.eval_docs, _rows("winogrande")[:5]):
        assert wino.doc_to_choice(doc) == row["context_options"] and wino.doc_to_text(doc) == row["gold"]
        assert wino.doc_to_target(doc) == row["continuation"]
    lambada = bundled["lambada_openai"]["lambada_openai_local"]
    rows = _rows("lambada_openai")
    for doc, row in zip(lambada.eval_docs, rows[:5]):
        assert lambada.doc_to_text(doc) == row["context"] and lambada.doc_to_target(doc) == " " + row["continuation"]
    odd = next(i for i, r in enumerate(rows) if r["continuation"] != r["continuation"].strip())
    doc = lambada.eval_docs[odd]  # lm-eval cuts the passage at its last space, llm-foundry at the last word
    text = lambada.doc_to_text(doc) + lambada.doc_to_target(doc)
    assert text == rows[odd]["context"] + rows[odd]["continuation"]


# ----------------------------------------------------------------------------- the numbers are lm-eval's


def _command_line(folder: Path, tasks: list[str], limit: int, out: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32",
           "--tasks", ",".join(t + zeroshot.LOCAL_SUFFIX for t in tasks), "--include_path", str(zeroshot.TASKS_DIR),
           "--limit", str(limit), "--device", "cpu", "--batch_size", "1", "--output_path", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out.parent, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = out.rglob("results_*.json")
    return json.loads(result.read_text())["results"]


@pytest.mark.slow
def test_in_memory_evaluation_equals_lm_evals_command_line_on_the_export(tmp_path, one_thread):
    from workbench.export import export_model
    from workbench.models import load_model

    loaded = load_model("demo", dtype="float32", device="cpu")
    folder = export_model(loaded.model, loaded.tokenizer, tmp_path / "demo", {})
    tasks = list(zeroshot.BUNDLED_TASKS)
    ours = zeroshot.evaluate_tasks(loaded.model, loaded.tokenizer, tasks, limit=6, batch_size=1)
    theirs = _command_line(folder, tasks, 6, tmp_path / "lm_eval_out")
    compared = 0
    for m in ours:
        value = theirs[m["extra"]["task"]][f"{m['name']},none"]
        if m["name"] == "perplexity":
            assert m["value"] == pytest.approx(value, rel=1e-6)
        else:
            assert m["value"] == value, m
            assert m["stderr"] == pytest.approx(theirs[m["extra"]["task"]][f"{m['name']}_stderr,none"])
        assert m["samples"] == 6 and m["extra"]["lm_eval"] == zeroshot.lm_eval_version()
        compared += 1
    assert compared == 14  # acc for nine tasks, acc_norm for arc (2), openbookqa and piqa, LAMBADA's perplexity


def test_a_task_file_of_ones_own_scores_like_a_direct_computation(tmp_path, one_thread):
    """A YAML over a local JSON file (dataset_path: json); its accuracy equals argmax log-likelihood computed by hand."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from workbench.models import DEMO_MODEL_DIR

    docs = [{"q": "The sky is", "options": ["blue", "green", "loud"], "gold": i % 3} for i in range(3)]
    docs += [{"q": "Two plus two is", "options": ["four", "five"], "gold": 0}]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    task = tmp_path / "mine.yaml"
    task.write_text(f"task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                    "output_type: multiple_choice\ntest_split: test\ndoc_to_text: \"Q: {{q}}\\nA:\"\n"
                    "doc_to_choice: options\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=8256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)).eval()
    (acc,) = zeroshot.evaluate_tasks(model, tokenizer, [f"file:{task}"], batch_size=2)
    correct = 0
    for d in docs:
        context = tokenizer(f"Q: {d['q']}\nA:")["input_ids"]
        scores = []
        for option in d["options"]:
            whole = tokenizer(f"Q: {d['q']}\nA: {option}")["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
            scores.append(sum(float(logp[j - 1, whole[j]]) for j in range(len(context), len(whole))))
        correct += max(range(len(scores)), key=scores.__getitem__) == d["gold"]
    assert acc["name"] == "acc" and acc["dataset"] == f"file:{task}" and acc["samples"] == 4
    assert acc["value"] == correct / 4


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name, words", [("pica", ["unknown zero-shot task 'pica'", "piqa"]),
                                         ("file:tasks.json", ["not a task file", ".yaml"]),
                                         ("lm_eval:", ["unknown zero-shot task"])])
def test_unknown_task_names_are_refused_before_anything_runs(name, words):
    with pytest.raises(UserError) as err:
        spec_from_dict({"evaluate": {"zeroshot": [name]}})
    for word in words:
        assert word in err.value.message + err.value.hint


def test_a_task_file_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "task.yaml"
    with pytest.raises(UserError, match="does not exist"):
        zeroshot.load_tasks([f"file:{missing}"])
    code = main(["eval", "--model", "demo", "--zeroshot", f"file:{missing}", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and str(missing) in err and "Traceback" not in err


def test_unknown_task_on_the_command_line(capsys):
    assert main(["eval", "--model", "demo", "--zeroshot", "hellaswag"]) == 2
    err = capsys.readouterr().err
    assert "unknown zero-shot task 'hellaswag'" in err and "lm_eval:NAME" in err


def test_a_task_whose_data_is_on_the_hub_says_so_when_offline(tmp_path):
    task = tmp_path / "hub.yaml"
    task.write_text("task: hubbed\ndataset_path: allenai/ai2_arc\ndataset_name: ARC-Easy\noutput_type: multiple_choice\n"
                    "test_split: test\ndoc_to_text: question\ndoc_to_choice: '{{choices.text}}'\ndoc_to_target: 0\n")
    with pytest.raises(UserError) as err:
        zeroshot.load_tasks([f"file:{task}"])
    assert "Hugging Face Hub" in err.value.message and "bundled" in err.value.hint
