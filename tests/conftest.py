import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def minilm():
    from ptv2.assets import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def smollm2():
    from ptv2.assets import smollm2_path

    return smollm2_path()
