"""Config files, the ``:arg`` grammar, and the image tasks of the train loop (VLM captioning with a resumable
data.Loader, text-to-image with sampling) on very small models, eager."""

import importlib
import io
import json
import os
import sys

import numpy as np
import pytest
import torch

from functional_mm import checkpoint, generate, pytree, random, sample
from functional_mm.models import registry
from functional_mm.train import config_lib, loop, tasks

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))

CONFIGS = {
    "llama": ["tiny", "llama2_7b", "llama3_8b", "qwen2_7b", "tiny,mesh=fsdp2,lora"],
    "llava": ["tiny", "llava1.5_7b", "llava1.5_7b,stage=pretrain,mesh=fsdp4tp2"],
    "qwen2_vl": ["tiny", "qwen2_vl_2b", "qwen2_vl_7b", "qwen2_vl_72b,stage=lora"],
    "internvl2": ["tiny", "internvl2_2b", "internvl2_8b", "internvl2_76b"],
    "sd3": ["tiny", "sd3_medium", "sd3.5_large,lora"],
    "flux": ["tiny", "flux_dev"],
}


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in CONFIGS.items() for a in args])
def test_every_config_variant_validates_and_builds_its_model_config(name, arg):
    c = importlib.import_module(name).get_config(arg)
    loop.validate(c)
    family = registry.get(c.model.family)
    cfg = family.make_config(c.model.variant, c.model.overrides.to_dict())
    assert "parameters" in loop.memory_estimate(family, cfg, c, None)  # abstract init: nothing allocated


def test_parse_arg_and_mesh_shorthand_errors_name_the_problem():
    a = config_lib.parse_arg("7b,mesh=fsdp8,lora,steps=5", variant="tiny", mesh="", lora=False, steps=1)
    assert (a.variant, a.mesh, a.lora, a.steps) == ("7b", "fsdp8", True, 5)
    with pytest.raises(ValueError, match="unknown key 'foo'"):
        config_lib.parse_arg("foo=1", variant="tiny")
    with pytest.raises(ValueError, match="steps='x': expected a int"):
        config_lib.parse_arg("steps=x", steps=1)
    assert config_lib.mesh_axes("dp2fsdp4tp2") == {"dp": 2, "fsdp": 4, "tp": 2}
    with pytest.raises(ValueError, match="mesh spec 'fsdp'"):
        config_lib.mesh_axes("fsdp")
    with pytest.raises(ValueError, match="unknown variant 'huge'"):
        importlib.import_module("llava").get_config("huge")
    with pytest.raises(ValueError, match="stage='warmup'"):
        importlib.import_module("llava").get_config("tiny,stage=warmup")


def _vlm_config(num_steps):
    c = importlib.import_module("llava").get_config("tiny")
    c.model.overrides.vision.update(dict(image_size=16, dim=32, num_heads=2, mlp_dim=64))  # 4 image tokens
    c.model.overrides.text.update(dict(dim=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64))
    c.data.update(dict(image_size=16, train_images=24, eval_images=8, batch_size=4, seq_len=48))
    c.train.update(dict(num_steps=num_steps, log_every=2, eval_every=4, eval_batches=1, compile=False))
    c.optim.update(dict(warmup_steps=1, decay_steps=8))
    c.checkpoint.every_steps = 4
    c.sample.update(dict(num_images=4, max_new_tokens=6))
    return c


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_captioning_run_resumes_the_loader_exactly_and_scores_held_out_captions(tmp_path, capsys):
    c = _vlm_config(8)  # the data is generated once into the first workdir, then shared via config.data.path
    loop.train(c, str(tmp_path / "straight"))
    c.data.path = str(tmp_path / "straight" / "data")
    short = _vlm_config(6)  # 6 steps = one and a half epochs of 4 batches: the resume crosses an epoch
    short.data.path = c.data.path
    loop.train(short, str(tmp_path / "split"))
    loop.train(c, str(tmp_path / "split"))
    straight = [r for r in _rows(tmp_path / "straight") if "loss" in r]
    split = [r for r in _rows(tmp_path / "split") if "loss" in r]
    assert [r["loss"] for r in straight] == [r["loss"] for r in split]

    def final(workdir):
        with checkpoint.CheckpointManager(os.path.join(workdir, "checkpoints")) as mgr:
            out = mgr.restore(targets={"state": None, "data": None})
        return pytree.to_flat_dict(out["state"]), out["data"]

    (a, data_a), (b, data_b) = final(tmp_path / "straight"), final(tmp_path / "split")
    assert data_a == data_b and data_a  # the loader position travels with the checkpoint
    assert all(torch.equal(a[k], b[k]) for k in a if a[k] is not None)
    out = capsys.readouterr().out
    assert "held-out captions: " in out and "truth 'a" in out
    assert "caption_accuracy" in _rows(tmp_path / "split")[-1]

    # The generate binary streams what it returns; greedy decoding equals the captions the run printed.
    image = os.path.join(c.data.path, "eval", "images", "00000.png")
    stream = io.StringIO()
    got = generate.generate(c, str(tmp_path / "split"), image=image, stream=stream, max_new_tokens=6)
    assert got == stream.getvalue() and f"00000.png: {got!r}" in out
    sample_twice = [
        generate.generate(c, str(tmp_path / "split"), image=image, max_new_tokens=6, temperature=1.0,
                          key=random.key(0))
        for _ in range(2)
    ]  # fmt: skip
    assert sample_twice[0] == sample_twice[1]  # sampling is a pure function of the key
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face directory"):
        generate.generate(c, str(tmp_path / "nothing"), image=image)


def test_text_to_image_run_writes_samples_and_scores_colours(tmp_path, capsys):
    c = importlib.import_module("sd3").get_config("tiny")
    c.model.overrides = dict(
        denoiser=dict(num_layers=1, num_heads=2, head_dim=8, sample_size=16, pos_embed_max_size=4,
                      joint_attention_dim=16, pooled_projection_dim=16),
        text=dict(hidden_size=16, intermediate_size=32, num_layers=1, projection_dim=16, num_heads=2),
        image_size=16,
    )  # fmt: skip
    c.data.update(dict(image_size=16, train_images=16, eval_images=4, batch_size=4))
    c.train.update(dict(num_steps=3, log_every=1, eval_every=3, eval_batches=1, compile=False))
    c.optim.warmup_steps = 1
    c.sample.update(dict(num_images=4, num_steps=2, prompts=["a red circle", "a blue square"]))
    last = loop.train(c, str(tmp_path))
    assert 0.0 <= last["colour_accuracy"] <= 1.0
    assert (tmp_path / "samples.png").stat().st_size > 100
    assert "prompted colour dominant in" in capsys.readouterr().out
    images = sample.sample(c, str(tmp_path), ["a red circle", "a blue square"], num_per_prompt=2, steps=2,
                           out=str(tmp_path / "grid.png"))  # fmt: skip
    assert images.shape == (4, 16, 16, 3) and (tmp_path / "grid.png").exists()


def test_dominant_colour_metric_reads_the_shape_not_the_background():
    from functional_mm.data import synthetic

    img = synthetic._frame(32, 32, "circle", "blue", 16, 16, 230)
    assert tasks.dominant_colour(img) == "blue"
    assert tasks.dominant_colour(np.full((32, 32, 3), 230, np.uint8)) is None  # nothing saturated


def test_text_to_image_trains_on_precomputed_features(tmp_path):
    from functional_mm.data.features import FeatureWriter

    for split, n in (("train", 8), ("eval", 4)):
        w = FeatureWriter(str(tmp_path / "feats" / split))
        for i in range(n):
            g = torch.Generator().manual_seed(i)
            w.add(i, {"latents": torch.randn(3, 16, 16, generator=g), "context": torch.randn(5, 16, generator=g),
                      "pooled": torch.randn(16, generator=g)})  # fmt: skip
        w.close()
    c = importlib.import_module("sd3").get_config("tiny")
    c.model.overrides = dict(
        text=None, image_size=16,
        denoiser=dict(num_layers=1, num_heads=2, head_dim=8, sample_size=16, pos_embed_max_size=4,
                      joint_attention_dim=16, pooled_projection_dim=16),
    )  # fmt: skip
    c.data.update(dict(path=str(tmp_path / "feats"), batch_size=4))
    c.train.update(dict(num_steps=3, log_every=1, eval_every=3, eval_batches=1, compile=False))
    c.optim.warmup_steps = 1
    last = loop.train(c, str(tmp_path / "run"))
    assert last["eval_loss"] > 0 and "colour_accuracy" not in last  # no text encoder: nothing to sample
    c.data.path = ""
    with pytest.raises(ValueError, match="set config.data.path to a directory with train/ and eval/ feature"):
        loop.train(c, str(tmp_path / "run2"))
