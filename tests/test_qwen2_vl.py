"""Qwen2-VL: the rotary helpers (2-D vision rotary, M-RoPE), the vision patch order, M-RoPE position ids
against HF ``get_rope_index``, parity with transformers' Qwen2VLForConditionalGeneration (images and videos:
logits, loss and the gradient of every parameter), greedy generation equal to HF ``generate``, the HF adapter,
configs and the published sizes.

Tolerance 1e-5 relative to the largest compared value (fp32), as in test_vit.py. One documented difference:
transformers 5.x restarts text after a *long* video (more temporal patches than merged rows/columns) at an id
that overlaps the video's; we keep the original Qwen2-VL rule (one past the largest id), see
``test_long_video_positions_follow_the_original_rule``.
"""

import functools

import pytest
import torch
from test_vit import assert_close_scaled, assert_grads_match, check_axes, perturb

from functional_mm import autodiff, nn, pytree, random
from functional_mm.models import qwen2_vl
from functional_mm.models.hf import io as hf_io
from functional_mm.models.hf import qwen2_vl as hf_qwen2_vl

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_vl import modeling_qwen2_vl as hf_mod  # noqa: E402

VOCAB, PAD, BOS, EOS = 128, 0, 1, 2
IMG, VID, VS, VE = 120, 121, 122, 123
PATCH_DIM = 3 * 2 * 2 * 2  # C * temporal_patch * P * P


def _hf_config(tie=False):
    vision = dict(
        depth=2,
        embed_dim=32,
        hidden_size=64,
        num_heads=4,
        patch_size=2,
        temporal_patch_size=2,
        spatial_merge_size=2,
        mlp_ratio=4,
    )
    text = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 2, 2]},
    )
    return transformers.Qwen2VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=VS,
        vision_end_token_id=VE,
        tie_word_embeddings=tie,
    )


def _hf_model(tie=False, seed=0):
    torch.manual_seed(seed)
    return perturb(transformers.Qwen2VLForConditionalGeneration(_hf_config(tie)), seed=seed)


def _ours(model):
    cfg = hf_qwen2_vl.config_from_hf(model.config.to_dict())
    return cfg, hf_qwen2_vl.from_hf_state_dict(model.state_dict(), cfg)


def _item(token, grid):
    t, h, w = grid
    return [VS] + [token] * (t * h * w // 4) + [VE]


def _text(n, seed):
    return torch.randint(3, 100, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _type_ids(tokens):
    tt = torch.zeros_like(tokens)
    tt[tokens == IMG] = 1
    tt[tokens == VID] = 2
    return tt


def _pixels(grids, seed):
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, PATCH_DIM, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# rotary helpers and patch order


def test_mrope_and_axial_rotary_match_transformers():
    cfg = _hf_config()
    text_rope = hf_mod.Qwen2VLRotaryEmbedding(cfg.text_config)
    pos = torch.randint(0, 50, (3, 2, 7))
    ref_cos, ref_sin = text_rope(torch.zeros(1), pos)
    cos, sin = nn.rope.cos_sin_mrope(pos, nn.rope.frequencies(16, 1e6), (4, 2, 2))
    torch.testing.assert_close(cos, ref_cos, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin, rtol=1e-6, atol=1e-6)
    # Text-only positions (three equal rows) reduce M-RoPE to plain RoPE.
    same = pos[:1].expand(3, -1, -1)
    torch.testing.assert_close(
        nn.rope.cos_sin_mrope(same, nn.rope.frequencies(16, 1e6), (4, 2, 2))[0],
        nn.rope.cos_sin(same[0], nn.rope.frequencies(16, 1e6))[0],
    )
    with pytest.raises(ValueError, match=r"mrope sections \(4, 2, 1\) must sum to head_dim // 2 = 8"):
        nn.rope.cos_sin_mrope(pos, nn.rope.frequencies(16, 1e6), (4, 2, 1))

    vision_rope = hf_mod.Qwen2VLVisionRotaryEmbedding(cfg.vision_config)
    grid = torch.tensor([[2, 4, 6], [1, 2, 2]])
    hw = hf_mod.get_vision_position_ids(grid, 2)  # [N, 2]
    assert torch.equal(qwen2_vl.vision_positions(grid, 2), hw)
    ref_cos, ref_sin = vision_rope(torch.zeros(1), hw)
    cos, sin = nn.rope.cos_sin_axial(hw, nn.rope.frequencies(8 // 2, 10000.0))  # head_dim 8
    torch.testing.assert_close(cos, ref_cos, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# position ids


def test_rope_index_matches_transformers_with_padding():
    model = _hf_model()
    cfg, _ = _ours(model)
    img_a, img_b, vid = (1, 4, 6), (1, 2, 4), (2, 4, 4)  # the video has 2 <= max(4, 4) / 2 temporal patches
    rows = [
        [BOS] + _text(2, 1) + _item(IMG, img_a) + _text(1, 2) + _item(VID, vid) + _text(3, 3),
        [BOS] + _item(IMG, img_b) + _text(4, 4) + _item(IMG, img_a) + _text(2, 5),
        [BOS] + _text(5, 6),  # text only
    ]
    width = max(map(len, rows))
    tokens = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([[width - len(r)] for r in rows])).long()
    image_grid, video_grid = torch.tensor([img_a, img_b, img_a]), torch.tensor([vid])
    ref_pos, ref_delta = model.model.get_rope_index(tokens, _type_ids(tokens), image_grid, video_grid, mask)
    pos, delta = qwen2_vl.rope_index(
        tokens, cfg, image_grid_thw=image_grid, video_grid_thw=video_grid, attention_mask=mask
    )
    assert torch.equal(pos, ref_pos) and torch.equal(delta, ref_delta)
    # Without a mask every token is real.
    ref_pos, ref_delta = model.model.get_rope_index(
        tokens[:1], _type_ids(tokens[:1]), image_grid[:1], video_grid
    )
    pos, delta = qwen2_vl.rope_index(
        tokens[:1], cfg, image_grid_thw=image_grid[:1], video_grid_thw=video_grid
    )
    assert torch.equal(pos, ref_pos) and torch.equal(delta, ref_delta)


def test_long_video_positions_follow_the_original_rule():
    model = _hf_model()
    cfg, _ = _ours(model)
    vid = (3, 4, 4)  # 3 temporal patches > max(4, 4) / 2 = 2 merged rows/columns
    tokens = torch.tensor([[BOS, *_item(VID, vid), 7, 8]])
    pos, delta = qwen2_vl.rope_index(tokens, cfg, video_grid_thw=torch.tensor([vid]))
    ref_pos, _ = model.model.get_rope_index(tokens, _type_ids(tokens), None, torch.tensor([vid]))
    start = 2  # BOS, <vision_start>
    n = 12  # 3 * 2 * 2 video tokens
    assert pos[0, 0, start : start + n].max() == start + 2  # the last temporal id
    end = start + n  # <vision_end>
    assert (
        pos[:, 0, end].tolist() == [start + 3] * 3
    )  # ours: one past the largest id (Qwen2-VL, transformers 4.x)
    assert (
        ref_pos[:, 0, end].tolist() == [start + 2] * 3
    )  # transformers 5.x: start + max(h, w) / 2, overlapping
    assert torch.equal(pos[:, :, :end], ref_pos[:, :, :end])  # identical up to the video's end
    assert int(delta) == int(pos.max()) + 1 - tokens.shape[1]


def test_rope_index_errors_name_the_problem():
    cfg = qwen2_vl.Qwen2VLConfig.variant("tiny")
    tokens = torch.tensor([[1, cfg.image_token_id] * 2])
    with pytest.raises(ValueError, match="more image placeholders than image_grid_thw rows"):
        qwen2_vl.rope_index(tokens, cfg)
    with pytest.raises(ValueError, match=r"needs 4 consecutive placeholder tokens at position 1"):
        qwen2_vl.rope_index(tokens, cfg, image_grid_thw=[[1, 4, 4], [1, 4, 4]])
    with pytest.raises(ValueError, match=r"grid_thw rows without placeholders in the prompt: \{'video': 1\}"):
        qwen2_vl.rope_index(torch.tensor([[1, 2]]), cfg, video_grid_thw=[[2, 2, 2]])


def test_placeholders_without_pixels_raise_eagerly_and_compiled():
    cfg = qwen2_vl.Qwen2VLConfig.variant("tiny")
    params = qwen2_vl.init(random.key(1), cfg)
    tokens = torch.tensor([[BOS, VS, *[cfg.image_token_id] * 4, VE, 5]])
    positions = torch.arange(8).expand(3, 1, 8)  # given: rope_index's own check does not run
    msg = "tokens hold image placeholders but no image pixel values were given"
    with pytest.raises(ValueError, match=msg):
        qwen2_vl.embed_inputs(params, cfg, tokens)
    compiled = torch.compile(lambda p, t, pos: qwen2_vl.apply(p, cfg, t, positions=pos), dynamic=False)
    for fn in (lambda p, t, pos: qwen2_vl.apply(p, cfg, t, positions=pos), compiled):
        with pytest.raises(ValueError, match=msg):
            fn(params, tokens, positions)


# ----------------------------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_logits_loss_and_gradients_match_transformers(tie):
    model = _hf_model(tie=tie, seed=int(tie))
    cfg, params = _ours(model)
    img_a, img_b, vid = (1, 4, 4), (1, 2, 4), (2, 4, 4)
    rows = [
        [BOS] + _text(2, 1) + _item(IMG, img_a) + _text(1, 2) + _item(VID, vid) + _text(3, 3),
        [BOS] + _item(IMG, img_b) + _text(6, 4),
    ]
    width = max(map(len, rows))
    tokens = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])  # right padding
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    image_grid, video_grid = torch.tensor([img_a, img_b]), torch.tensor([vid])
    px, pv = _pixels([img_a, img_b], 1), _pixels([vid], 2)
    labels = torch.where((tokens == IMG) | (tokens == VID) | (mask == 0), -100, tokens)

    ref = model(
        input_ids=tokens,
        attention_mask=mask,
        pixel_values=px,
        image_grid_thw=image_grid,
        pixel_values_videos=pv,
        video_grid_thw=video_grid,
        mm_token_type_ids=_type_ids(tokens),
        labels=labels,
    )
    batch = {
        "tokens": tokens,
        "attention_mask": mask,
        "pixel_values": px,
        "image_grid_thw": image_grid,
        "pixel_values_videos": pv,
        "video_grid_thw": video_grid,
    }
    logits = qwen2_vl.apply(params, cfg, tokens, **{k: v for k, v in batch.items() if k != "tokens"})
    real = mask.bool()
    assert_close_scaled(logits[real], ref.logits[real], "logits")
    loss, grads = autodiff.value_and_grad(lambda p: qwen2_vl.loss(p, cfg, batch))(params)
    assert_close_scaled(loss, ref.loss, "loss")
    ref.loss.backward()
    assert_grads_match(model, hf_qwen2_vl.to_hf_state_dict(grads, cfg, spelling="memory"))


def test_vision_tower_keeps_images_and_frames_apart():
    cfg = qwen2_vl.Qwen2VLConfig.variant("tiny")
    params = qwen2_vl.init(random.key(0), cfg)
    grids = [(1, 4, 4), (2, 2, 2)]
    px = _pixels(grids, 3)
    both = qwen2_vl.vision_apply(params["vision"], cfg.vision, px, grids)  # [4 + 2, D]
    first = qwen2_vl.vision_apply(params["vision"], cfg.vision, px[:16], grids[:1])
    frame = qwen2_vl.vision_apply(params["vision"], cfg.vision, px[16:20], [(1, 2, 2)])
    torch.testing.assert_close(both[:4], first, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both[4:5], frame, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"pixel_values must be \[sum\(t\*h\*w\)=24, patch_dim=24\]"):
        qwen2_vl.vision_apply(params["vision"], cfg.vision, px[:10], grids)
    with pytest.raises(ValueError, match="not divisible by spatial_merge_size=2"):
        qwen2_vl.vision_apply(params["vision"], cfg.vision, px[:9], [(1, 3, 3)])


def test_greedy_generation_matches_transformers():
    model = _hf_model(seed=4)
    cfg, params = _ours(model)
    img_a, img_b = (1, 4, 4), (1, 2, 4)
    rows = [[BOS] + _text(1, 1) + _item(IMG, img_a) + _text(2, 2), [BOS] + _item(IMG, img_b) + _text(5, 3)]
    width = max(map(len, rows))
    tokens = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = (tokens != PAD).long()
    grid, px = torch.tensor([img_a, img_b]), _pixels([img_a, img_b], 4)
    ref = model.generate(
        input_ids=tokens,
        attention_mask=mask,
        pixel_values=px,
        image_grid_thw=grid,
        mm_token_type_ids=_type_ids(tokens),
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    out = qwen2_vl.generate(
        params,
        cfg,
        tokens,
        pixel_values=px,
        image_grid_thw=grid,
        attention_mask=mask,
        max_new_tokens=8,
        stop_tokens=(EOS,),
        pad_token=PAD,
    )
    assert out.tolist() == ref.tolist()


# ----------------------------------------------------------------------------------------------------------------
# save / load


def test_save_load_round_trip_and_both_spellings(tmp_path):
    model = _hf_model(tie=True, seed=2)
    cfg, params = _ours(model)
    grid = torch.tensor([[1, 4, 4]])
    tokens = torch.tensor([[BOS] + _item(IMG, (1, 4, 4)) + [5, 6]])
    px = _pixels([(1, 4, 4)], 5)
    kw = dict(pixel_values=px, image_grid_thw=grid)
    with torch.no_grad():
        ref = model(input_ids=tokens, mm_token_type_ids=_type_ids(tokens), **kw).logits

    hf_qwen2_vl.save_pretrained(params, cfg, tmp_path / "ours", max_shard_bytes=100_000)
    keys = set(hf_io.tensor_files(tmp_path / "ours"))
    assert (
        "visual.blocks.0.attn.qkv.weight" in keys
        and "model.norm.weight" in keys
        and "lm_head.weight" not in keys
    )
    loaded, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        tmp_path / "ours", dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        assert_close_scaled(
            loaded(input_ids=tokens, mm_token_type_ids=_type_ids(tokens), **kw).logits,
            ref,
            "reloaded in transformers",
        )

    model.save_pretrained(tmp_path / "hf")
    mem = tmp_path / "mem"
    hf_io.write_tensors(mem, hf_qwen2_vl.to_hf_state_dict(params, cfg, spelling="memory"))
    hf_io.write_config(mem, hf_qwen2_vl.config_to_hf(cfg))
    for d in ("ours", "hf", "mem"):
        cfg_back, back = hf_qwen2_vl.load_pretrained(tmp_path / d)
        assert cfg_back == cfg, d
        assert all(torch.equal(x, y) for x, y in zip(pytree.leaves(back), pytree.leaves(params))), d
    assert_close_scaled(qwen2_vl.apply(back, cfg, tokens, **kw), ref, "loaded")


def test_flat_4x_config_layout():
    # Qwen/Qwen2-VL-7B-Instruct's config.json (transformers 4.x layout: text fields at the top).
    flat = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": 3584,
        "initializer_range": 0.02,
        "intermediate_size": 18944,
        "max_position_embeddings": 32768,
        "max_window_layers": 28,
        "model_type": "qwen2_vl",
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": 32,
            "embed_dim": 1280,
            "mlp_ratio": 4,
            "num_heads": 16,
            "in_chans": 3,
            "hidden_size": 3584,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": 152064,
    }
    cfg = hf_qwen2_vl.config_from_hf(flat)
    assert cfg == qwen2_vl.Qwen2VLConfig.variant("qwen2_vl_7b")
    assert hf_qwen2_vl.config_from_hf(hf_qwen2_vl.config_to_hf(cfg)) == cfg
    with pytest.raises(ValueError, match="use_sliding_window=True"):
        hf_qwen2_vl.config_from_hf({**flat, "use_sliding_window": True})


# ----------------------------------------------------------------------------------------------------------------
# configs, sizes, axes


def test_variants_have_the_published_sizes():
    published = {"qwen2_vl_2b": 2_208_985_600, "qwen2_vl_7b": 8_291_375_616, "qwen2_vl_72b": 73_405_560_320}
    for name, count in published.items():
        cfg = qwen2_vl.Qwen2VLConfig.variant(name)
        assert qwen2_vl.num_params(cfg) == count, name
    with torch.device("meta"):  # transformers agrees (2B: tied head counted once)
        hf = transformers.Qwen2VLForConditionalGeneration(
            transformers.Qwen2VLConfig(
                **hf_qwen2_vl.config_to_hf(qwen2_vl.Qwen2VLConfig.variant("qwen2_vl_2b"))
            )
        )
    assert sum(p.numel() for p in hf.parameters()) == published["qwen2_vl_2b"]


def test_config_validation_names_the_field():
    base = qwen2_vl.VARIANTS["tiny"]
    cfg = qwen2_vl.Qwen2VLConfig.variant("tiny")
    assert qwen2_vl.Qwen2VLConfig.from_dict(cfg.to_dict()) == cfg
    bad = [
        (dict(mrope_section=(4, 4, 4)), r"mrope_section=\(4, 4, 4\) must sum to text.head_dim // 2 = 8"),
        (dict(video_token_id=120), "special token ids .* must be distinct"),
        (dict(image_token_id=500), r"image_token_id=500 must be an int in \[0, vocab_size=128\)"),
        (dict(vision=dict(base["vision"], out_dim=32)), "vision.out_dim=32 must equal text.dim=64"),
    ]
    for override, msg in bad:
        with pytest.raises(ValueError, match=msg):
            qwen2_vl.Qwen2VLConfig.from_dict({**base, **override})
    with pytest.raises(ValueError, match="Qwen2VLVisionConfig: head_dim=6 must be a multiple of 4"):
        qwen2_vl.Qwen2VLConfig.from_dict({**base, "vision": dict(base["vision"], dim=24)})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['depth'\]"):
        qwen2_vl.Qwen2VLConfig.variant("tiny", vision={"depth": 3})


def test_logical_axes_cover_every_parameter():
    axes = check_axes(qwen2_vl.abstract, qwen2_vl.Qwen2VLConfig.variant("tiny"), qwen2_vl.default_rules())
    assert axes["vision/patch_embed/weight"] == ("embed", "channels", None, None, None)
    assert axes["vision/merger/fc1/weight"] == ("mlp", "embed") and axes["text/layers/0/attn/k/bias"] == (
        "kv_heads",
    )


def test_remat_gives_the_same_loss_and_gradients():
    cfg = qwen2_vl.Qwen2VLConfig.variant("tiny")
    params = qwen2_vl.init(random.key(1), cfg)
    grid = [(1, 4, 4), (2, 2, 2)]
    tokens = torch.tensor(
        [[BOS, VS, *[cfg.image_token_id] * 4, VE, 5, VS, *[cfg.image_token_id] * 2, VE, 6, 7]]
    )
    batch = {"tokens": tokens, "pixel_values": _pixels(grid, 9), "image_grid_thw": grid}
    ref_loss, ref = autodiff.value_and_grad(lambda p: qwen2_vl.loss(p, cfg, batch))(params)
    for policy in ("full", "selective"):
        fn = functools.partial(qwen2_vl.loss, cfg=cfg, batch=batch, remat_policy=policy)
        loss, grads = autodiff.value_and_grad(fn)(params)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        for g, r in zip(pytree.leaves(grads), pytree.leaves(ref)):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
