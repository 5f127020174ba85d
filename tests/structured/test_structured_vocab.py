"""Vocabulary pruning: exact round trips, kept rows, identical logits on kept-token text, reloading, other BPE kinds."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from test_structured_models import tiny_model, tiny_run
from workbench.data import corpora
from workbench.errors import UserError
from workbench.export import export_model
from workbench.models import load_model
from workbench.structured.family import VocabStep
from workbench.structured import vocab as V

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo():
    return load_model("demo", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def text():
    return corpora.wikitext2_text("valid")[:60_000]


@pytest.fixture(scope="module")
def sample(text):
    return text[1000:3000]


@pytest.fixture(scope="module")
def pruned(demo, text, sample):
    """The demo model and tokenizer pruned to 1,024 tokens counted on a slice of WikiText-2 (``sample`` weighted up)."""
    model = copy.deepcopy(demo.model)
    size = len(demo.tokenizer)
    counts = torch.bincount(torch.tensor(demo.tokenizer(text, add_special_tokens=False)["input_ids"]), minlength=size)
    counts += 1000 * torch.bincount(torch.tensor(demo.tokenizer(sample, add_special_tokens=False)["input_ids"]), minlength=size)
    result = V.prune_vocabulary(model, demo.tokenizer, counts, 1024)
    return model, result


def _random_text(rng: random.Random) -> str:
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x17F), (0x300, 0x36F), (0x400, 0x4FF), (0x4E00, 0x4FFF),
              (0x1F300, 0x1F64F), (0x10000, 0x10FFF), (0x2000, 0x206F)]
    chars = []
    for _ in range(rng.randint(0, 60)):
        lo, hi = rng.choice(ranges)
        chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars)


def test_pruned_tokenizer_round_trips_any_text(pruned):
    _, result = pruned
    tokenizer = result.tokenizer
    assert len(tokenizer) == 1024
    rng = random.Random(0)
    for _ in range(300):
        s = _random_text(rng)
        ids = tokenizer(s, add_special_tokens=False)["input_ids"]
        assert max(ids, default=0) < 1024
        assert tokenizer.decode(ids) == s


def test_pruned_embedding_and_head_rows_are_the_kept_rows(demo, pruned):
    model, result = pruned
    kept = torch.tensor(result.kept)
    assert torch.equal(model.get_input_embeddings().weight, demo.model.get_input_embeddings().weight[kept])
    assert torch.equal(model.get_output_embeddings().weight, demo.model.get_output_embeddings().weight[kept])
    assert model.config.vocab_size == 1024
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (0, 0, 1)


def test_text_made_of_kept_tokens_gets_the_same_tokens_and_logits(demo, pruned, sample):
    model, result = pruned
    new_id = {old: new for new, old in enumerate(result.kept)}
    old_ids = demo.tokenizer(sample, add_special_tokens=False)["input_ids"]
    assert all(i in new_id for i in old_ids)  # weighted up in the counts: every token of the sample is kept
    new_ids = result.tokenizer(sample, add_special_tokens=False)["input_ids"]
    assert new_ids == [new_id[i] for i in old_ids]
    with torch.no_grad():
        before = demo.model(input_ids=torch.tensor([old_ids[:256]])).logits[..., result.kept]
        after = model(input_ids=torch.tensor([new_ids[:256]])).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_kept_tokens_are_built_as_before_and_merges_are_consistent(demo, pruned):
    _, result = pruned
    new_id = {old: new for new, old in enumerate(result.kept)}
    data = V.read_vocabulary(result.tokenizer)
    before = demo.tokenizer.backend_tokenizer.model
    after = result.tokenizer.backend_tokenizer.model
    specials = {t["content"] for t in data.data["added_tokens"]}
    for token in set(data.vocab) - specials:  # the pruned BPE splits every kept token's characters as the original did
        assert [t.id for t in after.tokenize(token)] == [new_id[t.id] for t in before.tokenize(token)], token
    for a, b in data.merges:
        assert a in data.vocab and b in data.vocab and a + b in data.vocab
    assert len(data.alphabet()) == 256


def test_calibration_tokens_keep_their_text_in_the_new_ids(demo, text):
    tokens = torch.tensor(demo.tokenizer(text[:20_000], add_special_tokens=False)["input_ids"][:1200]).reshape(6, 200)
    counts = torch.bincount(tokens[:2].reshape(-1), minlength=len(demo.tokenizer))  # many of the tokens are dropped
    model = copy.deepcopy(demo.model)
    result = V.prune_vocabulary(model, demo.tokenizer, counts, 400)
    remapped = V.remap_tokens(tokens, result.table)
    assert remapped.shape == tokens.shape and int(remapped.max()) < 400
    for old, new in zip(tokens.tolist(), remapped.tolist()):
        old_text = "".join(demo.tokenizer.convert_ids_to_tokens(old))
        new_text = "".join(result.tokenizer.convert_ids_to_tokens(new))
        assert old_text.startswith(new_text) and len(new_text) > len(old_text) // 3


def test_vocab_step_exports_a_model_that_auto_classes_reload(demo, tmp_path):
    model = copy.deepcopy(demo.model)
    tokens = torch.tensor(demo.tokenizer(corpora.wikitext2_text("valid")[:40_000], add_special_tokens=False)["input_ids"][:4096]).reshape(16, 256)
    run = tiny_run(model, tokens, tokenizer=demo.tokenizer)
    report = run.compress(0, VocabStep(fraction=0.25))
    assert report["vocab_after"] == 2048 and report["parameters_after"] == report["parameters_before"] - (8256 - 2048) * 256 * 2
    assert run.loaded.tokenizer is not demo.tokenizer and run.tokens.max() < 2048
    export_model(model, run.loaded.tokenizer, tmp_path / "out", {})
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    sample = "The pruned vocabulary still encodes ünïcödé, emoji 🙂 and 漢字 exactly."
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    assert ids == run.loaded.tokenizer(sample, add_special_tokens=False)["input_ids"] and tokenizer.decode(ids) == sample
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=torch.tensor([ids])).logits, model(input_ids=torch.tensor([ids])).logits)


def _byte_fallback_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer: BPE over characters with byte fallback, spaces as "▁"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=900, special_tokens=["<unk>", "<s>", "</s>"] + bytes_,
                                                       limit_alphabet=60, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_byte_fallback_bpe_and_a_tied_head(text, tmp_path):
    tokenizer = _byte_fallback_tokenizer(text.split("\n")[:800])
    model = tiny_model("gemma", vocab=len(tokenizer))  # gemma ties the LM head to the embeddings
    ids = tokenizer(text[:8000], add_special_tokens=False)["input_ids"]
    counts = torch.bincount(torch.tensor(ids), minlength=len(tokenizer))
    old_emb = model.get_input_embeddings().weight.detach().clone()
    result = V.prune_vocabulary(model, tokenizer, counts, 400)
    assert not V.read_vocabulary(result.tokenizer).byte_level and V.read_vocabulary(result.tokenizer).data["model"]["byte_fallback"]
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, old_emb[torch.tensor(result.kept)])
    rng = random.Random(1)
    for _ in range(200):
        s = _random_text(rng)
        assert result.tokenizer.decode(result.tokenizer(s, add_special_tokens=False)["input_ids"]) == \
            tokenizer.decode(tokenizer(s, add_special_tokens=False)["input_ids"])
    export_model(model, result.tokenizer, tmp_path / "out", {})
    assert len(AutoTokenizer.from_pretrained(tmp_path / "out")) == 400
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.vocab_size == 400


def test_impossible_vocabularies_are_refused(demo):
    counts = torch.ones(len(demo.tokenizer))
    model = copy.deepcopy(demo.model)
    with pytest.raises(UserError, match="cannot hold the 258 special and byte tokens"):
        V.prune_vocabulary(model, demo.tokenizer, counts, 257)
    with pytest.raises(UserError, match="removes nothing"):
        V.prune_vocabulary(model, demo.tokenizer, counts, 8192)
    assert model.get_input_embeddings().weight.shape[0] == 8256  # nothing changed

    from tokenizers import Tokenizer, models

    wordpiece = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")))
    with pytest.raises(UserError, match="supports BPE tokenizers"):
        V.read_vocabulary(wordpiece)


@pytest.mark.parametrize("model_type", ["qwen2", "gpt2", "opt", "gpt_neox", "phi", "phi3"])
def test_other_families_keep_the_logits_of_kept_tokens(demo, sample, model_type):
    model = tiny_model(model_type, vocab=len(demo.tokenizer))
    old_ids = demo.tokenizer(sample, add_special_tokens=False)["input_ids"][:48]
    counts = torch.bincount(torch.tensor(old_ids), minlength=len(demo.tokenizer)) * 1000 + 1
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([old_ids])).logits
    result = V.prune_vocabulary(model, demo.tokenizer, counts, 600)
    new_ids = result.tokenizer(sample, add_special_tokens=False)["input_ids"][:48]
    assert model.config.vocab_size == 600 and max(new_ids) < 600
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=torch.tensor([new_ids])).logits, expected[..., result.kept], atol=1e-5, rtol=1e-5)
