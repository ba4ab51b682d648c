import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"


def data_dir() -> Path:
    """Real corpora: $MQA_REPRO_DATA, else ../shared/data beside the checkout."""
    env = os.environ.get("MQA_REPRO_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = data_dir()
    if not (d / "multi30k" / "train.en").exists():
        pytest.fail(f"real corpora not found at {d}; set MQA_REPRO_DATA")
    return d


# --------------------------------------------------------------------------------------------------
# Training and evaluation fixtures (tests/test_train.py, tests/test_evaluate.py): the tiny spec's data is
# prepared once and one multi_head model trained once per session, on real Multi30k.
# --------------------------------------------------------------------------------------------------
TINY = EXPERIMENTS / "tiny.yaml"


def write_tiny_lm_spec(folder: Path, steps: int) -> Path:
    """The tiny spec as a decoder-only language model (multi-query row) on Multi30k's German side, trained
    for ``steps`` steps; written to ``folder/tiny_lm.yaml``."""
    import yaml

    raw = yaml.safe_load(TINY.read_text())
    raw.update(name="tiny_lm", variants={"multi_query": {"model": {"n_kv_heads": 1}}})
    raw["model"].update(kind="decoder-only", encoder_layers=0)
    raw["data"].update(src_lang=None, tgt_lang=None, file_pattern="{stem}.de", hub=None, too_long="truncate")
    raw["training"].update(steps=steps, eval_every=steps, checkpoint_every=steps, log_every=10, batch_tokens=1024)
    spec = Path(folder) / "tiny_lm.yaml"
    spec.write_text(yaml.safe_dump(raw))
    return spec


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, shared_data) -> Path:
    from mqa_repro.prepare import prepare
    from mqa_repro.specfile import load_spec

    out = tmp_path_factory.mktemp("tiny_data") / "tiny"
    prepare(load_spec(TINY), data_dir=shared_data, out=out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data):
    """The tiny spec's multi_head row trained for training.steps (300) steps on the CPU: a TrainResult."""
    from mqa_repro.specfile import load_spec
    from mqa_repro.train import train_variant

    root = tmp_path_factory.mktemp("tiny_run")
    v = load_spec(TINY).variants["multi_head"]
    return train_variant(v, 0, device="cpu", out_root=root / "results", checkpoint_root=root / "checkpoints",
                         data=tiny_data, progress=False)
