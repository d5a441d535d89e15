"""LLaVA 1.5: parity with transformers' LlavaForConditionalGeneration (logits, loss and the gradient of every
parameter, several images, padding), greedy generation equal to HF ``generate``, the HF adapter (all stored key
spellings, strict loading, exports transformers loads with no missing/unexpected keys), configs and sizes.

Tolerance 1e-5 relative to the largest compared value (fp32), as in test_vit.py.
"""

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_vit import assert_close_scaled, assert_grads_match, check_axes, perturb

from functional_mm import autodiff, pytree, random
from functional_mm.models import llava
from functional_mm.models.hf import io as hf_io
from functional_mm.models.hf import llava as hf_llava

transformers = pytest.importorskip("transformers")

VOCAB, PAD, BOS, EOS, IMG = 64, 0, 1, 2, 60
N_IMG = 4  # 8x8 image, 4x4 patches, CLS dropped


def _hf_model(*, vision="clip", feature_layer=-2, strategy="default", tie=False, seed=0):
    v = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
    )
    vision_cfg = (
        transformers.CLIPVisionConfig(**v) if vision == "clip" else transformers.SiglipVisionConfig(**v)
    )
    text = transformers.LlamaConfig(
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
        tie_word_embeddings=tie,
    )
    cfg = transformers.LlavaConfig(
        vision_config=vision_cfg,
        text_config=text,
        image_token_index=IMG,
        image_seq_length=N_IMG,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return perturb(transformers.LlavaForConditionalGeneration(cfg), seed=seed)


def _ours(model):
    cfg = hf_llava.config_from_hf(model.config.to_dict())
    return cfg, hf_llava.from_hf_state_dict(model.state_dict(), cfg)


def _prompt(*parts, n_img=N_IMG):
    """An int ``n`` -> n random text ids; ``"img"`` -> one expanded image (``n_img`` placeholders)."""
    g = torch.Generator().manual_seed(len(parts))
    out = [BOS]
    for p in parts:
        out += [IMG] * n_img if p == "img" else torch.randint(3, IMG, (p,), generator=g).tolist()
    return out


def _pixels(n, seed=0):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


CASES = {
    "clip": dict(),
    "two_layers_full": dict(feature_layer=[-3, -1], strategy="full"),
    "siglip_tied": dict(vision="siglip", strategy="full", tie=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_loss_and_gradients_match_transformers(case):
    model = _hf_model(**CASES[case])
    cfg, params = _ours(model)
    n = cfg.num_image_tokens  # 5 with the CLS token kept ("full")
    rows = [_prompt(3, "img", 2, "img", 1, n_img=n), _prompt(2, "img", 7, n_img=n)]
    width = max(map(len, rows))
    tokens = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])  # right padding
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    pixels = _pixels(3)
    labels = torch.where((tokens == IMG) | (mask == 0), -100, tokens)

    ref = model(input_ids=tokens, pixel_values=pixels, attention_mask=mask, labels=labels)
    logits = llava.apply(params, cfg, tokens, pixels, attention_mask=mask)
    real = mask.bool()
    assert_close_scaled(logits[real], ref.logits[real], "logits")
    batch = {"tokens": tokens, "pixel_values": pixels, "attention_mask": mask}
    loss, grads = autodiff.value_and_grad(lambda p: llava.loss(p, cfg, batch))(params)
    assert_close_scaled(loss, ref.loss, "loss")
    ref.loss.backward()
    assert_grads_match(model, hf_llava.to_hf_state_dict(grads, cfg, spelling="memory"))


def test_left_padding_matches_the_unpadded_rows():
    model = _hf_model()
    cfg, params = _ours(model)
    rows = [_prompt(1, "img", 1), _prompt(4, "img", 3)]
    width = max(map(len, rows))
    tokens = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([[width - len(r)] for r in rows])).long()
    pixels = _pixels(2, seed=5)
    logits = llava.apply(params, cfg, tokens, pixels, attention_mask=mask)
    for i, r in enumerate(rows):
        alone = model(input_ids=torch.tensor([r]), pixel_values=pixels[i : i + 1]).logits[0]
        assert_close_scaled(logits[i, width - len(r) :], alone, f"row {i}")


def test_greedy_generation_matches_transformers():
    model = _hf_model(seed=3)
    cfg, params = _ours(model)
    rows = [_prompt(2, "img", 1), _prompt(5, "img", 3)]
    width = max(map(len, rows))
    tokens = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = (tokens != PAD).long()
    pixels = _pixels(2, seed=7)
    ref = model.generate(
        input_ids=tokens,
        attention_mask=mask,
        pixel_values=pixels,
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    out = llava.generate(
        params, cfg, tokens, pixels, max_new_tokens=8, attention_mask=mask, stop_tokens=(EOS,), pad_token=PAD
    )
    assert out.tolist() == ref.tolist()
    assert out.shape[1] > width  # something was generated


def test_image_token_expansion_and_mismatch_errors():
    cfg = llava.LlavaConfig.variant("tiny")
    params = llava.init(random.key(0), cfg)
    prompt = [1, 5, cfg.image_token_id, 6, cfg.image_token_id]
    expanded = llava.expand_image_tokens(prompt, cfg)
    assert len(expanded) == 3 + 2 * cfg.num_image_tokens and expanded.count(cfg.image_token_id) == 32
    with pytest.raises(ValueError, match="has 2 image placeholder tokens .* but there are 16"):
        llava.apply(params, cfg, torch.tensor([prompt]), torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="no pixel_values"):
        llava.apply(params, cfg, torch.tensor([expanded]))
    with pytest.raises(TypeError, match="tokens must be an integer"):
        llava.apply(params, cfg, torch.tensor([expanded]).float())
    text_only = torch.tensor([[1, 2, 3]])
    assert llava.apply(params, cfg, text_only).shape == (1, 3, cfg.text.vocab_size)


# ----------------------------------------------------------------------------------------------------------------
# save / load


def test_every_key_spelling_loads_and_export_round_trips(tmp_path):
    model = _hf_model(seed=1)
    cfg, params = _ours(model)
    tokens = torch.tensor([_prompt(2, "img", 3)])
    pixels = _pixels(1, seed=2)
    with torch.no_grad():
        ref = model(input_ids=tokens, pixel_values=pixels).logits

    # 1) our export (hub spelling, sharded) loads in transformers with nothing missing or unexpected
    files = hf_llava.save_pretrained(
        params, cfg, tmp_path / "ours", max_shard_bytes=40_000, extra_config={"pad_token_id": PAD}
    )
    assert "model.safetensors.index.json" in files
    keys = set(hf_io.tensor_files(tmp_path / "ours"))
    assert (
        "language_model.lm_head.weight" in keys and "vision_tower.vision_model.post_layernorm.weight" in keys
    )
    loaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "ours", dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        assert_close_scaled(
            loaded(input_ids=tokens, pixel_values=pixels).logits, ref, "reloaded in transformers"
        )

    # 2) transformers' own save (language_model.model.* + vision_tower.*) and 3) the in-memory spelling on disk
    model.save_pretrained(tmp_path / "hf")
    mem = tmp_path / "mem"
    hf_io.write_tensors(mem, hf_llava.to_hf_state_dict(params, cfg, spelling="memory"))
    hf_io.write_config(mem, hf_llava.config_to_hf(cfg))
    for d in ("ours", "hf", "mem"):
        cfg_back, back = hf_llava.load_pretrained(tmp_path / d)
        assert cfg_back == cfg, d
        assert pytree.same_structure(back, params)
        assert all(torch.equal(x, y) for x, y in zip(pytree.leaves(back), pytree.leaves(params))), d
        assert_close_scaled(llava.apply(back, cfg, tokens, pixels), ref, d)


def test_loader_is_strict(tmp_path):
    model = _hf_model()
    cfg, params = _ours(model)
    hf_llava.save_pretrained(params, cfg, tmp_path)
    weights = tmp_path / "model.safetensors"
    bad = load_file(weights)
    del bad["multi_modal_projector.linear_2.bias"]
    bad["vision_tower.vision_model.encoder.layers.0.extra.weight"] = torch.zeros(2)
    bad["language_model.model.norm.weight"] = torch.ones(3)
    save_file(bad, weights, metadata={"format": "pt"})
    with pytest.raises(hf_io.CheckpointMismatchError) as err:
        hf_llava.load_pretrained(tmp_path)
    msg = str(err.value)
    for key in (
        "model.multi_modal_projector.linear_2.bias",
        "model.vision_tower.encoder.layers.0.extra.weight",
        "model.language_model.norm.weight: checkpoint [3] vs model [32]",
    ):
        assert key in msg, msg


def test_tied_head_copy_must_equal_the_embedding(tmp_path):
    model = _hf_model(tie=True, vision="siglip", strategy="full")
    cfg, params = _ours(model)
    assert cfg.text.tie_embeddings
    hf_llava.save_pretrained(params, cfg, tmp_path)
    weights = tmp_path / "model.safetensors"
    good = load_file(weights)
    assert "language_model.lm_head.weight" not in good
    emb = good["language_model.model.embed_tokens.weight"]
    save_file({**good, "language_model.lm_head.weight": emb.clone()}, weights, metadata={"format": "pt"})
    hf_llava.load_pretrained(tmp_path)  # a stored copy is fine
    save_file({**good, "language_model.lm_head.weight": emb + 1}, weights, metadata={"format": "pt"})
    with pytest.raises(hf_io.CheckpointMismatchError, match="lm_head.weight differs"):
        hf_llava.load_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# configs, sizes, axes

# llava-hf/llava-1.5-7b-hf's config.json: the sub-configs list only what differs from transformers' defaults.
LLAVA_15_7B_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 32000,
    "model_type": "llava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}


def test_llava15_7b_config_and_size():
    cfg = hf_llava.config_from_hf(LLAVA_15_7B_CONFIG, dtype="bfloat16")
    assert cfg == llava.LlavaConfig.variant("llava1.5_7b")
    assert llava.num_params(cfg) == 7_063_427_072  # llava-hf/llava-1.5-7b-hf
    with torch.device("meta"):
        hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**LLAVA_15_7B_CONFIG))
    assert llava.num_params(cfg) == sum(p.numel() for p in hf.parameters())
    assert hf_llava.config_from_hf(hf_llava.config_to_hf(cfg)) == cfg


def test_config_validation_names_the_field():
    base = llava.VARIANTS["tiny"]
    assert llava.LlavaConfig.from_dict(
        llava.LlavaConfig.variant("tiny").to_dict()
    ) == llava.LlavaConfig.variant("tiny")
    bad = [
        (dict(image_token_id=128), r"LlavaConfig.image_token_id=128 must be an int in \[0, vocab_size=128\)"),
        (dict(feature_layers=(5,)), "LlavaConfig.feature_layers: 5 is out of range for a 2-layer tower"),
        (dict(feature_select="cls"), "LlavaConfig.feature_select='cls'"),
        (dict(projector_act="swish"), "unknown activation 'swish'"),
        (dict(vision=dict(base["vision"], dim=30)), "ViTConfig.dim=30"),
        (dict(text=dict(base["text"], num_heads=3)), "LlamaConfig.num_kv_heads=2 must divide num_heads=3"),
    ]
    for override, msg in bad:
        with pytest.raises(ValueError, match=msg):
            llava.LlavaConfig.from_dict({**base, **override})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['image_token'\]"):
        llava.LlavaConfig.from_dict({**base, "image_token": 3})
    with pytest.raises(ValueError, match="LlavaConfig.feature_select='default' drops the CLS token"):
        llava.LlavaConfig.variant(
            "tiny",
            vision=dict(llava.VARIANTS["tiny"]["vision"], class_token=False, post_norm="all", pool="none"),
        )


def test_logical_axes_cover_every_parameter():
    axes = check_axes(llava.abstract, llava.LlavaConfig.variant("tiny"), llava.default_rules())
    assert axes["projector/fc1/weight"] == ("mlp", "embed") and axes["projector/fc2/weight"] == (
        "embed",
        "mlp",
    )
    assert axes["text/embed/weight"] == ("vocab", "embed")
    assert axes["vision/layers/0/attn/k/weight"] == ("kv_heads", "embed")


def test_remat_gives_the_same_gradients():
    cfg = llava.LlavaConfig.variant("tiny")
    params = llava.init(random.key(2), cfg)
    tokens = torch.tensor([llava.expand_image_tokens([1, 5, cfg.image_token_id, 6, 7], cfg)])
    batch = {"tokens": tokens, "pixel_values": torch.randn(1, 3, 16, 16)}
    ref_loss, ref = autodiff.value_and_grad(lambda p: llava.loss(p, cfg, batch))(params)
    loss, grads = autodiff.value_and_grad(lambda p: llava.loss(p, cfg, batch, remat_policy="full"))(params)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for g, r in zip(pytree.leaves(grads), pytree.leaves(ref)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
