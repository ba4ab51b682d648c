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
