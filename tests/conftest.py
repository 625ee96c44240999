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


S3_BUCKET = "ptv2-test"


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 with bucket S3_BUCKET; the AWS variables point every process
    started meanwhile at it. Yields a boto3 client."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from tests.helpers import free_port

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
    try:
        yield boto3.client("s3")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
