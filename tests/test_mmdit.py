"""SD3 / SD3.5 MMDiT: parity with diffusers' ``SD3Transformer2DModel`` (output and the gradient of every
parameter), the diffusers adapter (strict loading, exports ``from_pretrained`` loads with no missing keys),
configs, variants and logical axes.

Parity: a diffusers model built from a tiny config, re-randomised so no weight is at its (often zero) init,
converted with our adapter. Tolerance 1e-5 (fp32): both sides run the same ops; the comparisons are in fact
exact on CPU today.
"""

import json
import re

import pytest
import torch

from functional_mm import autodiff, nn, pytree, random
from functional_mm.models import mmdit
from functional_mm.models.hf import io as hf_io
from functional_mm.models.hf import mmdit as hf_mmdit

diffusers = pytest.importorskip("diffusers")

ATOL = RTOL = 1e-5
DEAD = re.compile(r"^blocks/2/c_attn/(q|q_norm)/")  # last of the 3 test blocks
BASE = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    caption_projection_dim=16,
    pooled_projection_dim=10,
    out_channels=4,
    pos_embed_max_size=12,
)
CASES = {
    "sd3": {},
    # SD3.5 Medium's MMDiT-X (dual attention in the first blocks) and SD3.5's qk RMSNorm.
    "sd3.5": dict(dual_attention_layers=(0, 1), qk_norm="rms_norm"),
}


def _hf_model(case: str, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.SD3Transformer2DModel(**BASE, **CASES[case])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm_q" in name or "norm_k" in name or "norm_added" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return model.eval()


def _inputs(b=2, h=8, w=6, t=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, 4, h, w, generator=g),
        torch.tensor([999.0, 3.5][:b]),
        torch.randn(b, t, 12, generator=g),
        torch.randn(b, 10, generator=g),
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_and_gradients_match_diffusers(case):
    model = _hf_model(case)
    cfg = hf_mmdit.config_from_hf(dict(model.config))
    assert cfg.dual_attention_layers == CASES[case].get("dual_attention_layers", ())
    params = hf_mmdit.from_hf_state_dict(model.state_dict(), cfg)
    # Non-square latents smaller than the position grid: exercises the centre crop.
    x, t, ctx, pooled = _inputs()
    ref = model(x, ctx, pooled, t).sample
    flat, treedef = pytree.flatten_with_paths(params)
    leaves = [leaf.detach().requires_grad_(True) for _, leaf in flat]
    ours = mmdit.apply(pytree.unflatten(treedef, leaves), cfg, x, t, ctx, pooled)
    assert ours.shape == x.shape and ref.abs().max() > 1.0
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)

    w = torch.randn_like(ref)
    (ref * w).sum().backward()
    grads = torch.autograd.grad((ours * w).sum(), leaves, allow_unused=True)
    hf_params = dict(model.named_parameters())
    assert len(hf_params) == len(flat)  # every diffusers parameter has exactly one of ours
    for (path, _), g in zip(flat, grads):
        ref_grad = hf_params[hf_mmdit.hf_name(path)].grad
        # The last block's text queries: computed and discarded by diffusers, skipped by us.
        if DEAD.match(path):
            assert g is None and not ref_grad.any(), path
            continue
        assert ref_grad is not None and ref_grad.abs().max() > 0, path
        torch.testing.assert_close(g, ref_grad, atol=ATOL, rtol=RTOL, msg=lambda m, p=path: f"{p}: {m}")


def test_export_loads_in_diffusers_without_missing_keys_and_back(tmp_path):
    model = _hf_model("sd3.5", seed=2)
    cfg = hf_mmdit.config_from_hf(dict(model.config))
    params = hf_mmdit.from_hf_state_dict(model.state_dict(), cfg)
    # Sharded (tiny shard limit) so the index path is covered as well.
    files = hf_mmdit.save_pretrained(params, cfg, tmp_path / "ours", max_shard_bytes=20_000)
    assert "diffusion_pytorch_model.safetensors.index.json" in files
    loaded, info = diffusers.SD3Transformer2DModel.from_pretrained(
        tmp_path / "ours", output_loading_info=True
    )
    assert (
        not info["missing_keys"]
        and not info["unexpected_keys"]
        and not info["mismatched_keys"]
        and not info["error_msgs"]
    )
    x, t, ctx, pooled = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x, ctx, pooled, t).sample, model(x, ctx, pooled, t).sample, atol=ATOL, rtol=RTOL
        )
    # diffusers' own export loads into ours, equal leaf for leaf, position table checked.
    model.save_pretrained(tmp_path / "theirs")
    cfg2, params2 = hf_mmdit.load_pretrained(tmp_path / "theirs")
    assert cfg2 == cfg
    for (p, a), (_, b) in zip(pytree.flatten_with_paths(params)[0], pytree.flatten_with_paths(params2)[0]):
        assert torch.equal(a, b), p
    cfg3, _ = hf_mmdit.load_pretrained(tmp_path / "ours")
    assert cfg3 == cfg


def test_strict_loading_names_every_problem(tmp_path):
    model = _hf_model("sd3")
    cfg = hf_mmdit.config_from_hf(dict(model.config))
    sd = dict(model.state_dict())
    sd.pop("transformer_blocks.0.attn.to_q.bias")
    sd["transformer_blocks.0.attn.extra.weight"] = torch.zeros(1)
    sd["proj_out.weight"] = torch.zeros(3, 16)
    with pytest.raises(hf_io.CheckpointMismatchError) as e:
        hf_mmdit.from_hf_state_dict(sd, cfg)
    msg = str(e.value)
    assert "to_q.bias" in msg and "extra.weight" in msg and "proj_out.weight" in msg
    # A position table that is not the 2-D sincos one is refused (learned positions are not supported).
    sd = dict(model.state_dict())
    sd[hf_mmdit.POS_EMBED] = sd[hf_mmdit.POS_EMBED] + 0.01
    with pytest.raises(hf_io.CheckpointMismatchError, match="pos_embed"):
        hf_mmdit.from_hf_state_dict(sd, cfg)
    # The same checks through a directory.
    model.save_pretrained(tmp_path / "d")
    files = hf_io.tensor_files(tmp_path / "d", hf_mmdit.WEIGHTS_NAME)
    from safetensors.torch import load_file, save_file

    path = next(iter(files.values()))
    tensors = load_file(path)
    del tensors[hf_mmdit.POS_EMBED]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(hf_io.CheckpointMismatchError, match="missing"):
        hf_mmdit.load_pretrained(tmp_path / "d")


def test_config_validation_and_from_dict():
    with pytest.raises(ValueError, match="MMDiTConfig.num_heads"):
        mmdit.MMDiTConfig(num_heads=0)
    with pytest.raises(ValueError, match="caption_projection_dim"):
        mmdit.MMDiTConfig(num_heads=2, head_dim=8, caption_projection_dim=12)
    with pytest.raises(ValueError, match="dual_attention_layers"):
        mmdit.MMDiTConfig(num_layers=2, dual_attention_layers=(2,))
    with pytest.raises(ValueError, match="qk_norm"):
        mmdit.MMDiTConfig(qk_norm="layer_norm")
    with pytest.raises(ValueError, match="unknown field.*num_head"):
        mmdit.MMDiTConfig.from_dict({"num_head": 2})
    with pytest.raises(ValueError, match="unknown MMDiT variant"):
        mmdit.MMDiTConfig.variant("sd4")
    cfg = mmdit.MMDiTConfig.variant("sd3.5_medium")
    assert mmdit.MMDiTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="_class_name"):
        hf_mmdit.config_from_hf({"_class_name": "FluxTransformer2DModel"})


# Published sizes: SD3 Medium 2B, SD3.5 Medium 2.5B (with its 147k-entry position table excluded: 2.24B
# parameters), SD3.5 Large 8.1B. Cross-checked against diffusers on the meta device for the smaller two.
COUNTS = {"sd3_medium": 2_028_328_000, "sd3.5_medium": 2_243_171_520, "sd3.5_large": 8_056_627_520}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_variant_parameter_counts(name):
    cfg = mmdit.MMDiTConfig.variant(name)
    assert mmdit.num_params(cfg) == COUNTS[name]
    if name != "sd3.5_large":
        hf_cfg = {k: v for k, v in hf_mmdit.config_to_hf(cfg).items() if not k.startswith("_")}
        with torch.device("meta"):
            ref = diffusers.SD3Transformer2DModel(**hf_cfg)
        assert sum(p.numel() for p in ref.parameters()) == COUNTS[name]


def test_every_parameter_has_logical_axes():
    known = {"embed", "mlp", "heads", "kv_heads", "norm", "channels", None}
    for name in ("tiny", "sd3.5_medium"):
        shapes, axes = mmdit.abstract(mmdit.MMDiTConfig.variant(name))
        flat_axes = pytree.flatten_with_paths(axes, is_leaf=lambda a: isinstance(a, tuple))[0]
        for (path, leaf), (_, ax) in zip(pytree.flatten_with_paths(shapes)[0], flat_axes, strict=True):
            assert leaf.device.type == "meta" and len(ax) == leaf.dim() and set(ax) <= known, (path, ax)


def test_adaln_zero_init_and_remat():
    cfg = mmdit.MMDiTConfig.variant("tiny")
    params = mmdit.init(random.key(0), cfg)
    x = random.normal(random.key(1), (2, 4, 16, 12))
    t, ctx = torch.tensor([500.0, 20.0]), random.normal(random.key(2), (2, 3, 24))
    pooled = random.normal(random.key(3), (2, 20))
    # adaLN-Zero: the modulations and the output projection start at zero, so the first prediction is 0.
    assert torch.equal(mmdit.apply(params, cfg, x, t, ctx, pooled), torch.zeros_like(x))
    # With every weight perturbed, remat gives the same values and gradients as the plain forward.
    gen = torch.Generator().manual_seed(4)
    params = pytree.tree_map(lambda p: p + 0.05 * torch.randn(p.shape, generator=gen), params)

    def loss(p, policy):
        return mmdit.apply(p, cfg, x, t, ctx, pooled, remat_policy=policy).square().mean()

    base = autodiff.grad(loss)(params, None)
    again = autodiff.grad(loss)(params, "full")
    last = f"blocks/{cfg.num_layers - 1}/c_attn/"
    for (path, a), (_, b) in zip(pytree.flatten_with_paths(base)[0], pytree.flatten_with_paths(again)[0]):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
        dead = path.startswith((last + "q/", last + "q_norm/"))
        assert bool(a.abs().max() > 0) != dead, path


def test_input_validation_and_position_table():
    cfg = mmdit.MMDiTConfig.variant("tiny")
    params = mmdit.init(random.key(0), cfg)
    ctx, pooled = torch.zeros(1, 3, 24), torch.zeros(1, 20)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        mmdit.apply(params, cfg, torch.zeros(1, 4, 15, 16), torch.zeros(1), ctx, pooled)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        mmdit.apply(params, cfg, torch.zeros(1, 4, 34, 16), torch.zeros(1), ctx, pooled)
    with pytest.raises(ValueError, match="timestep"):
        mmdit.apply(params, cfg, torch.zeros(1, 4, 16, 16), torch.zeros(2), ctx, pooled)
    # The crop equals diffusers' PatchEmbed.cropped_pos_embed on the stored table.
    from diffusers.models.embeddings import PatchEmbed

    pe = PatchEmbed(
        height=16, width=16, patch_size=2, in_channels=4, embed_dim=cfg.dim, pos_embed_max_size=16
    )
    torch.testing.assert_close(mmdit.pos_embed(cfg, 5, 3), pe.cropped_pos_embed(10, 6), atol=0, rtol=0)
    assert isinstance(nn.sincos.timestep_embedding(torch.tensor([1.0]), 7), torch.Tensor)
