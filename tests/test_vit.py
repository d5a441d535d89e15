"""Vision towers (CLIP, SigLIP, InternViT): parity with transformers (every hidden state, pooled output and the
gradient of every parameter), the HF adapter (strict loading of both key spellings, exports that transformers
loads with no missing/unexpected keys), configs, variants and logical axes.

The helpers at the top are shared by the VLM test files (``from test_vit import ...``).

Tolerances: outputs and gradients 1e-5 relative to the largest value of the compared set (fp32): the math is
the same, the op order differs slightly (HF's conv / sdpa paths vs ours; DESIGN.md §7).
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from functional_mm import autodiff, parallelism, pytree, random
from functional_mm.models import vit
from functional_mm.models.hf import io as hf_io
from functional_mm.models.hf import vit as hf_vit

transformers = pytest.importorskip("transformers")

TOL = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# shared helpers


def perturb(model, seed=0):
    """Give a HF model non-trivial weights: matrices N(0, 0.2), norm scales 1 + N(0, 0.1), biases N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm = any(s in name for s in ("norm", "ln_q")) and not name.endswith("bias")
            if is_norm:
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.2 * noise)
    return model.eval()


def assert_close_scaled(actual, expected, what="", tol=TOL):
    scale = max(expected.abs().max().item(), 1e-30)
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol} * {scale:.3g}"


def assert_grads_match(model, our_grads_by_hf_name, tol=TOL):
    """Compare HF ``.grad`` (None = zero) with ours, keyed by HF in-memory names, against one global scale."""
    named = dict(model.named_parameters(remove_duplicate=False))
    assert set(our_grads_by_hf_name) <= set(named), sorted(set(our_grads_by_hf_name) - set(named))
    refs = {
        k: (named[k].grad if named[k].grad is not None else torch.zeros_like(named[k]))
        for k in our_grads_by_hf_name
    }
    scale = max(r.abs().max().item() for r in refs.values())
    assert scale > 0
    for k, g in our_grads_by_hf_name.items():
        err = (g - refs[k]).abs().max().item()
        assert err <= tol * scale, f"grad of {k}: max abs error {err:.3g} > {tol} * {scale:.3g}"
    # Every trainable HF parameter is covered (tied ones appear under one of their names).
    covered = {id(named[k]) for k in our_grads_by_hf_name}
    missing = [k for k, p in named.items() if id(p) not in covered]
    assert not missing, missing


def check_axes(abstract_fn, cfg, rules):
    """Every leaf has one logical name per dim, and every name resolves under ``rules`` on a 3-axis mesh."""
    shapes, axes = abstract_fn(cfg)
    flat_s = dict(pytree.flatten_with_paths(shapes)[0])
    flat_a = dict(pytree.flatten_with_paths(axes, is_leaf=lambda x: isinstance(x, tuple))[0])
    assert set(flat_s) == set(flat_a)
    mesh = {"dp": 1, "fsdp": 2, "tp": 2}
    for path, shape in flat_s.items():
        assert len(flat_a[path]) == shape.dim(), path
        parallelism.logical_to_spec(flat_a[path], rules, mesh, path=path)
    return flat_a


# ----------------------------------------------------------------------------------------------------------------
# towers

SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=16,
    patch_size=4,
)


def _hf_tower(kind):
    if kind == "clip":
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SMALL))
    if kind == "siglip":
        return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SMALL))
    if kind == "siglip_nohead":
        return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SMALL, vision_use_head=False))
    if kind == "internvit":  # InternViT-300M style: LayerNorm, qkv bias, mean pooling (no post norm)
        return transformers.InternVLVisionModel(
            transformers.InternVLVisionConfig(**SMALL, attention_bias=True)
        )
    if kind == "internvit_6b":  # InternViT-6B style: RMSNorm, q/k RMSNorm, no qkv bias
        return transformers.InternVLVisionModel(
            transformers.InternVLVisionConfig(**SMALL, use_qk_norm=True, norm_type="rms_norm")
        )
    if kind == "internvit_cls":  # post LayerNorm over the sequence
        return transformers.InternVLVisionModel(
            transformers.InternVLVisionConfig(**SMALL, attention_bias=True, use_mean_pooling=False)
        )
    raise ValueError(kind)


KINDS = ["clip", "siglip", "siglip_nohead", "internvit", "internvit_6b", "internvit_cls"]


@pytest.mark.parametrize("kind", KINDS)
def test_tower_matches_transformers(kind):
    model = perturb(_hf_tower(kind), seed=KINDS.index(kind))
    cfg = hf_vit.config_from_hf(model.config.to_dict())
    params = hf_vit.from_hf_state_dict(model.state_dict(), cfg)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ref = model(pixel_values=pixels, output_hidden_states=True)
    out = vit.apply(params, cfg, pixels)

    assert_close_scaled(out["last_hidden_state"], ref.last_hidden_state, "last_hidden_state")
    if cfg.pool == "none":
        assert out["pooled"] is None
    else:
        assert_close_scaled(out["pooled"], ref.pooler_output, "pooled")
    ours_hs = vit.hidden_states(params, cfg, pixels, range(cfg.num_layers + 1))
    assert len(ref.hidden_states) == cfg.num_layers + 1
    for i, (h, r) in enumerate(zip(ours_hs, ref.hidden_states)):
        assert_close_scaled(h, r, f"hidden_states[{i}]")

    # Gradients of every parameter through a loss that touches every output.
    w = torch.randn(ref.last_hidden_state.shape, generator=torch.Generator().manual_seed(2))
    wp = torch.randn(2, cfg.dim, generator=torch.Generator().manual_seed(3))

    def objective(last, pooled):
        return (last * w).mean() + (0 if pooled is None else (pooled * wp).mean())

    objective(ref.last_hidden_state, ref.pooler_output if cfg.pool != "none" else None).backward()
    _, grads = autodiff.value_and_grad(lambda p: objective(*vit.apply(p, cfg, pixels).values()))(params)
    assert_grads_match(model, hf_vit.to_hf_state_dict(grads, cfg))


def test_hidden_states_runs_only_the_needed_blocks():
    cfg = vit.ViTConfig.variant("clip_tiny", num_layers=3)
    params = vit.init(random.key(0), cfg)
    pixels = torch.randn(1, 3, 16, 16)
    # An unused last block gets an exact zero gradient (LLaVA's feature layer -2 never runs it).
    _, grads = autodiff.value_and_grad(lambda p: vit.hidden_states(p, cfg, pixels, [-2])[0].sum())(params)
    assert all(torch.count_nonzero(g) == 0 for g in pytree.leaves(grads["layers"][2]))
    assert torch.count_nonzero(grads["layers"][1]["mlp"]["fc2"]["weight"]) > 0
    with pytest.raises(ValueError, match="hidden state index 4 is out of range for 3 layers"):
        vit.hidden_states(params, cfg, pixels, [4])


# ----------------------------------------------------------------------------------------------------------------
# save / load


@pytest.mark.parametrize("kind", ["clip", "siglip", "internvit_6b"])
def test_save_pretrained_loads_in_transformers_and_back(tmp_path, kind):
    cls = {
        "clip": transformers.CLIPVisionModel,
        "siglip": transformers.SiglipVisionModel,
        "internvit_6b": transformers.InternVLVisionModel,
    }[kind]
    model = perturb(_hf_tower(kind))
    cfg = hf_vit.config_from_hf(model.config.to_dict())
    params = hf_vit.from_hf_state_dict(model.state_dict(), cfg)
    hf_vit.save_pretrained(params, cfg, tmp_path / "ours", max_shard_bytes=20_000)
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()  # sharded
    loaded, info = cls.from_pretrained(tmp_path / "ours", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ref = loaded(pixel_values=pixels).last_hidden_state
    assert_close_scaled(vit.apply(params, cfg, pixels)["last_hidden_state"], ref, "reloaded")

    # Our loader reads our export and transformers' own save, with the same result.
    model.save_pretrained(tmp_path / "hf")
    for d in ("ours", "hf"):
        cfg_back, back = hf_vit.load_pretrained(tmp_path / d)
        assert cfg_back == cfg
        assert all(torch.equal(x, y) for x, y in zip(pytree.leaves(back), pytree.leaves(params)))


def test_old_spelling_and_full_clip_checkpoint_load(tmp_path):
    model = perturb(_hf_tower("clip"))
    cfg = hf_vit.config_from_hf(model.config.to_dict())
    params = hf_vit.from_hf_state_dict(model.state_dict(), cfg)
    sd = hf_vit.to_hf_state_dict(params, cfg)

    # Pre-5.x CLIPVisionModel files prefix the tower with "vision_model.".
    old = tmp_path / "old"
    hf_io.write_tensors(old, {"vision_model." + k: v for k, v in sd.items()})
    hf_io.write_config(old, hf_vit.config_to_hf(cfg))
    assert all(
        torch.equal(x, y)
        for x, y in zip(pytree.leaves(hf_vit.load_pretrained(old)[1]), pytree.leaves(params))
    )

    # A full CLIPModel directory (as LLaVA's tower is published): the text tower is skipped, the vision one strict.
    full = transformers.CLIPModel(
        transformers.CLIPConfig(
            vision_config=model.config.to_dict(),
            text_config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                vocab_size=50,
                max_position_embeddings=16,
            ),
        )
    )
    full.vision_model.load_state_dict(model.state_dict())
    full.save_pretrained(tmp_path / "full")
    cfg_full, p_full = hf_vit.load_pretrained(tmp_path / "full")
    assert cfg_full == cfg
    assert all(torch.equal(x, y) for x, y in zip(pytree.leaves(p_full), pytree.leaves(params)))


def test_loader_is_strict_and_names_every_offending_key(tmp_path):
    model = perturb(_hf_tower("siglip"))
    cfg = hf_vit.config_from_hf(model.config.to_dict())
    hf_vit.save_pretrained(hf_vit.from_hf_state_dict(model.state_dict(), cfg), cfg, tmp_path)
    weights = tmp_path / "model.safetensors"
    bad = load_file(weights)
    del bad["head.attention.in_proj_bias"]
    bad["encoder.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    bad["post_layernorm.weight"] = torch.ones(31)
    save_file(bad, weights, metadata={"format": "pt"})
    with pytest.raises(hf_io.CheckpointMismatchError) as err:
        hf_vit.load_pretrained(tmp_path)
    msg = str(err.value)
    for key in (
        "head.attention.in_proj_bias",
        "encoder.layers.0.self_attn.extra.weight",
        "post_layernorm.weight: checkpoint [31] vs model [32]",
    ):
        assert key in msg, msg
    with pytest.raises(hf_io.CheckpointMismatchError, match="extra"):
        hf_vit.from_hf_state_dict(bad, cfg)


# ----------------------------------------------------------------------------------------------------------------
# configs, variants, axes


def test_config_round_trip_and_validation_names_the_field():
    for name in (
        "clip_tiny",
        "siglip_tiny",
        "internvit_tiny",
        "internvit_6b_448_v1_5",
        "siglip_so400m_14_384",
    ):
        cfg = vit.ViTConfig.variant(name)
        assert hf_vit.config_from_hf(hf_vit.config_to_hf(cfg)) == cfg, name
        assert vit.ViTConfig.from_dict(cfg.to_dict()) == cfg
    base = vit.VARIANTS["clip_tiny"]
    bad = [
        (dict(dim=30), "ViTConfig.dim=30 is not divisible by num_heads=4"),
        (dict(num_layers=0), "ViTConfig.num_layers must be a positive int"),
        (dict(act="swish"), "unknown activation 'swish'"),
        (dict(norm="batch"), "ViTConfig.norm='batch'"),
        (dict(pool="map"), "ViTConfig.pool='map' / post_norm='cls'"),
        (dict(class_token=False), "ViTConfig.pool='cls' needs class_token=True"),
        (dict(family="dino"), "ViTConfig.family='dino'"),
        (dict(patch_size=32), "ViTConfig.patch_size=32 exceeds image_size=16"),
        (dict(dtype="fp8"), "ViTConfig.dtype='fp8'"),
    ]
    for override, msg in bad:
        with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("(", r"\(")):
            vit.ViTConfig.from_dict({**base, **override})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['heads'\]"):
        vit.ViTConfig.from_dict({**base, "heads": 4})
    with pytest.raises(ValueError, match="unknown ViT variant"):
        vit.ViTConfig.variant("clip_huge")
    with pytest.raises(ValueError, match="use_mask_token=True"):
        hf_vit.config_from_hf(
            {**hf_vit.config_to_hf(vit.ViTConfig.variant("internvit_tiny")), "use_mask_token": True}
        )
    with pytest.raises(ValueError, match="cannot be written for transformers"):
        hf_vit.config_to_hf(vit.ViTConfig.variant("clip_tiny", layer_scale=0.1))


def test_variants_match_transformers_parameter_counts():
    # Built on the meta device: sizes only, no memory.
    with torch.device("meta"):
        for name in (
            "clip_vit_l14_336",
            "siglip_so400m_14_384",
            "internvit_300m_448",
            "internvit_6b_448_v1_5",
        ):
            cfg = vit.ViTConfig.variant(name)
            hf_cfg = hf_vit.config_to_hf(cfg)
            cls = {
                "clip": transformers.CLIPVisionModel,
                "siglip": transformers.SiglipVisionModel,
                "internvit": transformers.InternVLVisionModel,
            }[cfg.family]
            model = cls(transformers.AutoConfig.for_model(**hf_cfg))
            assert vit.num_params(cfg) == sum(p.numel() for p in model.parameters()), name
    assert vit.num_params(vit.ViTConfig.variant("clip_vit_l14_336")) == 303_507_456
    assert vit.ViTConfig.variant("siglip_so400m_14_384").num_patches == 729  # 384 // 14 = 27 per side


def test_logical_axes_cover_every_parameter():
    for name in ("clip_tiny", "siglip_tiny", "internvit_6b_448_v1_5"):
        axes = check_axes(vit.abstract, vit.ViTConfig.variant(name), vit.default_rules())
    assert axes["layers/0/attn/q/weight"] == ("heads", "embed")
    assert axes["layers/0/attn/q_norm/scale"] == ("heads",)
    assert axes["layers/0/mlp/fc2/weight"] == ("embed", "mlp")
    assert axes["patch_embed/weight"] == ("embed", "channels", None, None)
    assert axes["pos_embed"] == (None, "embed") and axes["layers/0/ls1"] == ("norm",)


def test_bad_pixels_are_named():
    cfg = vit.ViTConfig.variant("clip_tiny")
    params = vit.init(random.key(0), cfg)
    with pytest.raises(ValueError, match=r"pixel_values must be \[B, 3, 16, 16\], got \[1, 3, 32, 32\]"):
        vit.apply(params, cfg, torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"pixel_values must be a float tensor \[B, C, H, W\]"):
        vit.apply(params, cfg, torch.zeros(3, 16, 16))


def test_config_json_is_plain_json(tmp_path):
    cfg = vit.ViTConfig.variant("internvit_tiny")
    hf_io.write_config(tmp_path, hf_vit.config_to_hf(cfg))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "internvl_vision"
