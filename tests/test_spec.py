"""Specs validate, resolve d_ff: match to the paper's widths, and reject mistakes with one clear line."""
import textwrap

import pytest
import yaml

from mqa_repro.errors import SpecError
from mqa_repro.model import Transformer, count_parameters
from mqa_repro.spec import KNOWN_VARIANTS, describe_rows, param_count
from mqa_repro.specfile import load_spec

from .conftest import EXPERIMENTS

SHIPPED = sorted(EXPERIMENTS.glob("*.yaml"))


def test_specs_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert {"wmt14_ende", "lm1b", "multi30k_ende", "lm1b_mini", "tiny"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_spec_validates(path):
    spec = load_spec(path)
    assert spec.variants
    for name in spec.variants:
        assert name in KNOWN_VARIANTS


def test_table1_rows_match_the_paper():
    spec = load_spec(EXPERIMENTS / "wmt14_ende.yaml")
    rows = {r["variant"]: r for r in describe_rows(spec)}
    paper_d_ff = {"multi_head": 4096, "multi_query": 5440, "multi_head_local": 4096,
                  "multi_query_local": 5440, "h1_dk128": 6784, "h2_dk64": 6784, "h4_dk32": 6784,
                  "h8_dk16": 6784}
    for name, d_ff in paper_d_ff.items():
        assert rows[name]["d_ff"] == d_ff, name
    for name, r in rows.items():
        assert abs(r["params"] - 211e6) / 211e6 < 0.005, (name, r["params"])
    assert rows["multi_query"]["window"] is None and rows["multi_query_local"]["window"] == 32
    assert spec.variants["multi_head"].model.padded_vocab == 33792
    # multi-query shrinks the cache by the head count
    assert rows["multi_head"]["kv_self_bytes_per_token"] == 8 * rows["multi_query"]["kv_self_bytes_per_token"]
    assert rows["gqa4"]["n_kv_heads"] == 4 and rows["gqa2"]["n_kv_heads"] == 2


def test_table3_rows_match_the_paper():
    spec = load_spec(EXPERIMENTS / "lm1b.yaml")
    rows = {r["variant"]: r for r in describe_rows(spec)}
    assert rows["multi_head"]["d_ff"] == 8192
    assert rows["multi_query"]["d_ff"] == 9088
    for name in ("h1_dk128", "h2_dk64", "h4_dk32", "h8_dk16"):
        assert rows[name]["d_ff"] == 9984
    counts = [r["params"] for r in rows.values()]
    assert abs(counts[0] - 192e6) / 192e6 < 0.01
    assert (max(counts) - min(counts)) / min(counts) < 0.001
    assert not spec.variants["multi_head"].model.tied_embeddings


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_analytic_count_equals_the_modules(path):
    spec = load_spec(path)
    for v in spec.variants.values():
        if param_count(v.model) > 60e6:
            continue  # the full-scale models are checked analytically above; building them is slow
        assert count_parameters(Transformer(v.model)) == param_count(v.model), v.name


def test_paper_scale_module_count():
    """One full-size model really has the analytic count (the formula is not just self-consistent)."""
    import torch

    spec = load_spec(EXPERIMENTS / "wmt14_ende.yaml")
    with torch.device("meta"):
        m = Transformer(spec.variants["multi_query"].model)
    assert count_parameters(m) == param_count(spec.variants["multi_query"].model)


BASE = {
    "name": "toy",
    "model": {"kind": "encoder-decoder", "encoder_layers": 1, "decoder_layers": 1, "d_model": 16,
              "d_ff": 32, "n_heads": 4, "n_kv_heads": 4, "d_k": 4, "d_v": 4, "vocab_size": 100,
              "max_positions": 32},
    "data": {"max_len": 32},
    "variants": {"multi_head": {}, "multi_query": {"model": {"n_kv_heads": 1, "d_ff": "match"}}},
}


def _write(tmp_path, obj, name="bad.yaml"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else yaml.safe_dump(obj))
    return p


def _with(path_keys, value):
    import copy

    d = copy.deepcopy(BASE)
    cur = d
    for k in path_keys[:-1]:
        cur = cur.setdefault(k, {})
    cur[path_keys[-1]] = value
    return d


@pytest.mark.parametrize("keys,value,expect_key,expect_text", [
    (("model", "n_head"), 8, "model.n_head", "did you mean 'n_heads'"),
    (("model", "n_kv_heads"), 3, "model.n_heads", "divisible by n_kv_heads"),
    (("model", "d_model"), "big", "model.d_model", "must be int"),
    (("model", "n_kv_heads"), 8, "model.n_kv_heads", "cannot exceed n_heads"),
    (("model", "kind"), "decoder", "model.kind", "'encoder-decoder' or 'decoder-only'"),
    (("model", "window"), 0, "model.window", "positive"),
    (("training", "steps"), 0, "training.steps", "positive"),
    (("training", "lr"), "fast", "training.lr", "must be float"),
    (("evaluation", "bleu_tokenizers"), ["moses"], "evaluation.bleu_tokenizers", "not a sacrebleu tokenizer"),
    (("variants", "gqa3"), {"model": {"n_kv_heads": 3}}, "variants.gqa3.model.n_heads", "divisible"),
    (("variants", "multi_query"), {"modle": {}}, "variants.multi_query.modle", "did you mean 'model'"),
    (("trainig",), {}, "trainig", "did you mean 'training'"),
    (("model", "d_ff"), "match", "model.d_ff", "only meaningful in a variant"),
    # wider heads than the base: attention alone outgrows the base model, no d_ff >= 1 matches (was d_ff = 1)
    (("variants", "wide"), {"model": {"d_k": 16, "d_v": 16, "d_ff": "match"}}, "variants.wide.model.d_ff",
     "no d_ff matches"),
])
def test_mistakes_name_file_and_key(tmp_path, keys, value, expect_key, expect_text):
    p = _write(tmp_path, _with(keys, value))
    with pytest.raises(SpecError) as e:
        load_spec(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: {expect_key}:"), msg
    assert expect_text in msg
    assert "\n" not in msg


def test_invalid_yaml_names_the_line(tmp_path):
    p = _write(tmp_path, "model:\n  d_model: [1, 2\n")
    with pytest.raises(SpecError, match=r"not valid YAML at line \d+"):
        load_spec(p)


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "missing.yaml")
    with pytest.raises(SpecError, match="a directory, not a spec file"):
        load_spec(tmp_path)


def test_unknown_variant_is_named(tmp_path):
    spec = load_spec(_write(tmp_path, BASE, "ok.yaml"))
    with pytest.raises(SpecError, match="no variant 'multi_qeury' .*did you mean 'multi_query'"):
        spec.select(["multi_qeury"])


def test_hash_is_stable_and_changes_with_content(tmp_path):
    a = load_spec(_write(tmp_path, BASE, "a.yaml")).variants["multi_query"]
    b = load_spec(_write(tmp_path, BASE, "b.yaml")).variants["multi_query"]
    assert a.hash == b.hash
    c = load_spec(_write(tmp_path, _with(("model", "d_model"), 32), "c.yaml")).variants["multi_query"]
    assert c.hash != a.hash
    # a resolved spec survives a round trip through plain data (checkpoints store it that way)
    from mqa_repro.spec import Variant
    assert Variant.from_dict(a.to_dict()).hash == a.hash


def test_match_needs_no_rounding_for_the_paper_widths():
    spec = load_spec(EXPERIMENTS / "wmt14_ende.yaml")
    base = param_count(spec.variants["multi_head"].model)
    for v in spec.variants.values():
        assert param_count(v.model) == base  # exact, not merely within rounding


# --------------------------------------------------------------------------------------------------
# Issue 18.14: e-notation numbers, duplicate keys, windows that are full attention, vocabularies too small
# --------------------------------------------------------------------------------------------------
_TOY_YAML = """name: toy
model: {kind: encoder-decoder, encoder_layers: 1, decoder_layers: 1, d_model: 16, d_ff: 32, n_heads: 4,
        n_kv_heads: 4, d_k: 4, d_v: 4, vocab_size: 100, max_positions: 32}
data: {max_len: 32}
training:
  lr: 3e-3
  steps: 1e3
  weight_decay: 1E-2
  label_smoothing: .5e-1
  z_loss: 1.0e-4
  warmup_steps: 10
variants: {multi_head: {}}
"""


def test_e_notation_is_a_number_everywhere(tmp_path):
    t = load_spec(_write(tmp_path, _TOY_YAML, "toy.yaml")).variants["multi_head"].training
    assert (t.lr, t.steps, t.weight_decay, t.label_smoothing, t.z_loss) == (3e-3, 1000, 1e-2, 0.05, 1e-4)
    assert isinstance(t.steps, int) and isinstance(t.warmup_steps, int)
    from mqa_repro.specfile import apply_overrides

    v = apply_overrides(load_spec(_write(tmp_path, _TOY_YAML, "toy.yaml")).variants["multi_head"],
                        ["training.lr=2e-4", "training.batch_tokens=4e3"])
    assert v.training.lr == 2e-4 and v.training.batch_tokens == 4000
    with pytest.raises(SpecError, match="training.steps: must be int, got 1.5"):
        load_spec(_write(tmp_path, _TOY_YAML.replace("steps: 1e3", "steps: 1.5"), "toy.yaml"))


@pytest.mark.parametrize("text,key,lines", [
    (_TOY_YAML.replace("  warmup_steps: 10\n", "  warmup_steps: 10\n  lr: 1e-3\n"), "training.lr", "6 and 12"),
    (_TOY_YAML + "name: other\n", "name", "1 and 13"),
    (_TOY_YAML.replace("variants: {multi_head: {}}", "variants: {multi_head: {}, multi_head: {model: {window: 4}}}"),
     "variants.multi_head", "12 and 12"),
], ids=["nested", "top", "flow"])
def test_duplicate_keys_are_refused(tmp_path, text, key, lines):
    p = _write(tmp_path, text, "dup.yaml")
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert str(e.value) == f"{p}: {key}: is given twice (lines {lines}); keep one"
    from mqa_repro.specfile import apply_overrides

    with pytest.raises(SpecError, match=r"--set: evaluation.beams\.a: is given twice"):
        apply_overrides(load_spec(_write(tmp_path, _TOY_YAML, "toy.yaml")).variants["multi_head"],
                        ["evaluation.beams={a: 1, a: 2}"])


@pytest.mark.parametrize("window,ok", [(31, True), (32, False), (1000, False)])
def test_a_window_covering_every_position_is_refused(tmp_path, window, ok):
    p = _write(tmp_path, _with(("variants", "multi_query_local"), {"model": {"window": window}}))
    if ok:
        assert load_spec(p).variants["multi_query_local"].model.window == window
    else:
        with pytest.raises(SpecError, match=rf"variants.multi_query_local.model.window: \({window}\) must be "
                                            r"below model.max_positions \(32\)"):
            load_spec(p)


@pytest.mark.parametrize("vocab", [1, 3, 5])
def test_a_vocabulary_below_sentencepieces_minimum_is_refused(tmp_path, vocab):
    with pytest.raises(SpecError, match=r"model.vocab_size: must be at least 6 .* got " + str(vocab)):
        load_spec(_write(tmp_path, _with(("model", "vocab_size"), vocab)))


def test_sentencepiece_minimum_is_what_the_spec_says():
    """MIN_VOCAB_SIZE is SentencePiece's real minimum: one less fails, the minimum trains (one-character text)."""
    import io

    import sentencepiece as spm

    from mqa_repro.specfile import MIN_VOCAB_SIZE

    def train(v):
        spm.SentencePieceTrainer.train(sentence_iterator=iter(["a"] * 20), model_writer=io.BytesIO(),
                                       vocab_size=v, model_type="bpe", character_coverage=1.0, pad_id=0,
                                       unk_id=1, bos_id=2, eos_id=3, minloglevel=2, num_threads=1)

    train(MIN_VOCAB_SIZE)
    with pytest.raises(RuntimeError):
        train(MIN_VOCAB_SIZE - 1)


@pytest.mark.parametrize("keys", [("training", "seed"), ("data", "spm_seed")])
def test_negative_seeds_are_refused_at_the_door(tmp_path, keys):
    with pytest.raises(SpecError, match=rf"{'.'.join(keys)}: must be 0 or more .* got -1"):
        load_spec(_write(tmp_path, _with(keys, -1)))
