import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from functional_mm import random
from functional_mm.data import (
    FeatureSource,
    ImageCaption,
    JsonlSource,
    Loader,
    SampleContext,
    ShuffleBatcher,
    synthetic,
    write_features,
)


def make_encoder(dim: int = 6, seed: int = 0):
    """A stand-in frozen encoder: 4x4 average pooling then a fixed random projection (a pure function)."""
    w = random.normal(random.key(seed), (3, dim))

    def encode(batch):
        x = torch.nn.functional.avg_pool2d(batch["pixels"], 4)  # [B, 3, h, w]
        return {"latent": torch.einsum("bchw,cd->bdhw", x, w), "mean": x.mean((2, 3))}

    return encode


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("mm"))
    return synthetic.make_images(d, 11)


def test_write_read_features_two_ranks_and_load(images, tmp_path):
    src, proc, enc = JsonlSource(images), ImageCaption(size=(16, 16)), make_encoder()
    out = str(tmp_path / "feats")
    for rank in range(2):  # as two torchrun processes would, each writing its own shards
        r = write_features(src, proc, enc, out, batch_size=2, rank=rank, world_size=2, shard_size=3)
        assert r["samples"] in (5, 6) and r["skipped"] == 0
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) == 4  # 6 -> 3+3, 5 -> 3+2
    feats = FeatureSource(out)
    assert len(feats) == 11
    for i in range(11):
        ref = enc({"pixels": proc(src[i], SampleContext(i, 0, 0))["pixels"][None]})
        assert feats[i]["index"] == i and feats[i]["caption"] == src[i]["caption"]
        torch.testing.assert_close(feats[i]["latent"], ref["latent"][0])
        torch.testing.assert_close(feats[i]["mean"], ref["mean"][0])
    # the loader path: features instead of media, batched, with workers (handles reopen per process)
    with Loader(feats, None, ShuffleBatcher(11, 4), num_workers=2, num_epochs=1) as loader:
        batches = list(loader)
    assert (
        len(batches) == 2 and batches[0]["latent"].shape == (4, 6, 4, 4) and len(batches[0]["caption"]) == 4
    )


def test_extract_features_binary(images, tmp_path):
    cfg = tmp_path / "extract_cfg.py"
    cfg.write_text(
        textwrap.dedent(
            f"""
            import ml_collections
            def get_config(arg=None):
                c = ml_collections.ConfigDict()
                c.manifest = {images!r}
                c.output_dir = {str(tmp_path / "out")!r}
                c.processor = "functional_mm.data.processors:ImageCaption"
                c.processor_kwargs = {{"size": (16, 16)}}
                c.encoder = "test_data_features:make_encoder"
                c.encoder_kwargs = {{"dim": 2}}
                c.batch_size = 4
                c.num_workers = 0
                c.shard_size = 8
                return c
            """
        )
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
    }
    r = subprocess.run(
        [sys.executable, "-m", "functional_mm.data.extract_features", f"--config={cfg}", "--config.batch_size=3"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "11 samples, 0 skipped" in r.stdout
    index = json.loads((tmp_path / "out" / "index-r00000.json").read_text())
    assert [s["index"] for s in index["samples"]] == list(range(11)) and len(index["shards"]) == 2
    assert FeatureSource(str(tmp_path / "out"))[3]["latent"].shape == (2, 4, 4)
