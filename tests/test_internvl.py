"""InternVL: parity with transformers' InternVLForConditionalGeneration (Qwen2 and Llama-layout decoders, the
InternViT-300M and -6B tower styles; logits, loss and the gradient of every parameter), pixel shuffle, greedy
generation, the HF adapter (spellings, tying, strict loading, exports transformers loads cleanly), configs and
the published InternVL2 sizes.

Tolerance 1e-5 relative to the largest compared value (fp32), as in test_vit.py.
"""

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_vit import assert_close_scaled, assert_grads_match, check_axes, perturb

from functional_mm import autodiff, pytree, random
from functional_mm.models import internvl
from functional_mm.models.hf import internvl as hf_internvl
from functional_mm.models.hf import io as hf_io

transformers = pytest.importorskip("transformers")

VOCAB, PAD, BOS, EOS, IMG = 64, 0, 1, 2, 60


def _hf_model(text="qwen2", tower="300m", tie=True, seed=0):
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
    )
    vision.update(attention_bias=True) if tower == "300m" else vision.update(
        use_qk_norm=True, norm_type="rms_norm"
    )
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    text_cfg = transformers.Qwen2Config(**common) if text == "qwen2" else transformers.LlamaConfig(**common)
    cfg = transformers.InternVLConfig(
        vision_config=transformers.InternVLVisionConfig(**vision),
        text_config=text_cfg,
        image_token_id=IMG,
        image_seq_length=4,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return perturb(transformers.InternVLForConditionalGeneration(cfg), seed=seed)


def _ours(model):
    cfg = hf_internvl.config_from_hf(model.config.to_dict())
    return cfg, hf_internvl.from_hf_state_dict(model.state_dict(), cfg)


def _row(*parts, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = [BOS]
    for p in parts:
        out += [IMG] * 4 if p == "img" else torch.randint(3, IMG, (p,), generator=g).tolist()
    return out


def _pixels(n, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_pixel_shuffle_matches_transformers():
    model = _hf_model()
    x = torch.randn(2, 6, 6, 8)
    torch.testing.assert_close(
        internvl.pixel_shuffle(x, 2), model.model.pixel_shuffle(x, 0.5), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="a 5x5 grid is not divisible by 2"):
        internvl.pixel_shuffle(torch.zeros(1, 5, 5, 2), 2)


CASES = {
    "qwen2_tied_300m": dict(),
    "llama_untied_6b": dict(text="llama", tower="6b", tie=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_loss_and_gradients_match_transformers(case):
    model = _hf_model(**CASES[case], seed=len(case))
    cfg, params = _ours(model)
    assert cfg.text.tie_embeddings == CASES[case].get("tie", True)
    rows = [_row(2, "img", "img", 3, seed=1), _row("img", 6, seed=2)]  # several tiles per prompt
    width = max(map(len, rows))
    tokens = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    pixels = _pixels(3, seed=3)
    labels = torch.where((tokens == IMG) | (mask == 0), -100, tokens)

    ref = model(input_ids=tokens, pixel_values=pixels, attention_mask=mask, labels=labels)
    batch = {"tokens": tokens, "pixel_values": pixels, "attention_mask": mask}
    logits = internvl.apply(params, cfg, tokens, pixels, attention_mask=mask)
    real = mask.bool()
    assert_close_scaled(logits[real], ref.logits[real], "logits")
    loss, grads = autodiff.value_and_grad(lambda p: internvl.loss(p, cfg, batch))(params)
    assert_close_scaled(loss, ref.loss, "loss")
    ref.loss.backward()
    assert_grads_match(model, hf_internvl.to_hf_state_dict(grads, cfg, spelling="memory"))


def test_greedy_generation_matches_transformers():
    model = _hf_model(seed=5)
    cfg, params = _ours(model)
    rows = [_row(1, "img", 2, seed=1), _row("img", 5, seed=2)]
    width = max(map(len, rows))
    tokens = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = (tokens != PAD).long()
    pixels = _pixels(2, seed=6)
    ref = model.generate(
        input_ids=tokens,
        attention_mask=mask,
        pixel_values=pixels,
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    out = internvl.generate(
        params, cfg, tokens, pixels, max_new_tokens=8, attention_mask=mask, stop_tokens=(EOS,), pad_token=PAD
    )
    assert out.tolist() == ref.tolist()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_save_load_round_trip_and_spellings(tmp_path, tie):
    model = _hf_model(text="llama", tie=tie, seed=7)
    cfg, params = _ours(model)
    tokens = torch.tensor([_row(2, "img", 3, seed=4)])
    pixels = _pixels(1, seed=8)
    with torch.no_grad():
        ref = model(input_ids=tokens, pixel_values=pixels).logits

    hf_internvl.save_pretrained(params, cfg, tmp_path / "ours", max_shard_bytes=50_000)
    keys = set(hf_io.tensor_files(tmp_path / "ours"))
    assert "vision_tower.encoder.layer.0.lambda_1" in keys and "multi_modal_projector.layer_norm.bias" in keys
    assert ("language_model.lm_head.weight" in keys) == (not tie)
    loaded, info = transformers.InternVLForConditionalGeneration.from_pretrained(
        tmp_path / "ours", dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert (loaded.lm_head.weight is loaded.model.language_model.embed_tokens.weight) == tie
    with torch.no_grad():
        assert_close_scaled(
            loaded(input_ids=tokens, pixel_values=pixels).logits, ref, "reloaded in transformers"
        )

    model.save_pretrained(tmp_path / "hf")
    mem = tmp_path / "mem"
    hf_io.write_tensors(mem, hf_internvl.to_hf_state_dict(params, cfg, spelling="memory"))
    hf_io.write_config(mem, hf_internvl.config_to_hf(cfg))
    for d in ("ours", "hf", "mem"):
        cfg_back, back = hf_internvl.load_pretrained(tmp_path / d)
        assert cfg_back == cfg, d
        assert all(torch.equal(x, y) for x, y in zip(pytree.leaves(back), pytree.leaves(params))), d


def test_loader_is_strict(tmp_path):
    model = _hf_model()
    cfg, params = _ours(model)
    hf_internvl.save_pretrained(params, cfg, tmp_path)
    weights = tmp_path / "model.safetensors"
    bad = load_file(weights)
    del bad["vision_tower.encoder.layer.1.lambda_2"]
    bad["mlp1.0.weight"] = torch.zeros(2)  # an original (trust-remote-code) InternVL name
    save_file(bad, weights, metadata={"format": "pt"})
    with pytest.raises(hf_io.CheckpointMismatchError) as err:
        hf_internvl.load_pretrained(tmp_path)
    assert "model.vision_tower.encoder.layer.1.lambda_2" in str(err.value) and "mlp1.0.weight" in str(
        err.value
    )


# ----------------------------------------------------------------------------------------------------------------
# configs, sizes, axes


def test_variants_have_the_published_sizes():
    # InternVL2 model cards: 2.21B, 8.08B, 76.26B parameters.
    expect = {"internvl2_2b": 2.21e9, "internvl2_8b": 8.08e9, "internvl2_76b": 76.26e9}
    for name, count in expect.items():
        cfg = internvl.InternVLConfig.variant(name)
        assert abs(internvl.num_params(cfg) - count) < 0.005 * count, (name, internvl.num_params(cfg))
        assert cfg.num_image_tokens == 256
    cfg = internvl.InternVLConfig.variant("internvl2_8b")
    with torch.device("meta"):  # transformers builds the same tree (InternLM2 in Llama layout)
        hf = transformers.InternVLForConditionalGeneration(
            transformers.InternVLConfig(**hf_internvl.config_to_hf(cfg))
        )
    assert internvl.num_params(cfg) == sum(p.numel() for p in hf.parameters())
    assert hf_internvl.config_from_hf(hf_internvl.config_to_hf(cfg)) == cfg


def test_config_validation_names_the_field():
    base = internvl.VARIANTS["tiny"]
    cfg = internvl.InternVLConfig.variant("tiny")
    assert internvl.InternVLConfig.from_dict(cfg.to_dict()) == cfg
    bad = [
        (dict(downsample_ratio=0.3), r"downsample_ratio=0.3 must be 1/k"),
        (
            dict(downsample_ratio=0.25, vision=dict(base["vision"], image_size=12)),
            "the 6x6 patch grid is not divisible by 1/downsample_ratio=4",
        ),
        (dict(feature_layer=3), "feature_layer=3 is out of range"),
        (dict(feature_select="full"), "feature_select must be 'default'"),
        (dict(image_token_id=-1), r"image_token_id=-1 must be an int in \[0, vocab_size=128\)"),
    ]
    for override, msg in bad:
        with pytest.raises(ValueError, match=msg):
            internvl.InternVLConfig.from_dict({**base, **override})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['ratio'\]"):
        internvl.InternVLConfig.from_dict({**base, "ratio": 0.5})
    with pytest.raises(ValueError, match="is not 'internvl'"):
        hf_internvl.config_from_hf({"model_type": "internvl_chat"})


def test_logical_axes_cover_every_parameter():
    axes = check_axes(internvl.abstract, internvl.InternVLConfig.variant("tiny"), internvl.default_rules())
    assert axes["projector/norm/scale"] == ("norm",) and axes["projector/fc1/weight"] == ("mlp", "embed")
    assert axes["vision/layers/0/ls2"] == ("norm",)
    params = internvl.init(random.key(0), internvl.InternVLConfig.variant("tiny"))
    assert params["vision"]["layers"][0]["ls1"].eq(0.1).all()  # InternViT's layer-scale init
