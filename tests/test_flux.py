"""Flux: parity with diffusers' ``FluxTransformer2DModel`` (output and every parameter's gradient, with and
without the guidance embedding), latent packing and position ids against the Flux pipeline's helpers, the
diffusers adapter, configs and variants. Tolerance 1e-5 (fp32; exact on CPU today).
"""

import json

import pytest
import torch

from functional_mm import autodiff, pytree, random
from functional_mm.models import flux
from functional_mm.models.hf import flux as hf_flux
from functional_mm.models.hf import io as hf_io

diffusers = pytest.importorskip("diffusers")

ATOL = RTOL = 1e-5
BASE = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=20,
    axes_dims_rope=(4, 6, 6),
)


def _hf_model(guidance: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(**BASE, guidance_embeds=guidance)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm_q" in name or "norm_k" in name or "norm_added" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
    return model.eval()


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 6, generator=g)  # [B, C, H, W] -> 4x3 packed tokens of 16 channels
    return dict(
        x=flux.pack_latents(latents),
        timestep=torch.tensor([1.0, 0.35]),
        context=torch.randn(2, 5, 24, generator=g),
        pooled=torch.randn(2, 20, generator=g),
        img_ids=flux.image_ids(4, 3),
        txt_ids=flux.text_ids(5),
    )


@pytest.mark.parametrize("guidance", [True, False], ids=["dev_guidance", "schnell_no_guidance"])
def test_output_and_gradients_match_diffusers(guidance):
    model = _hf_model(guidance)
    cfg = hf_flux.config_from_hf(dict(model.config))
    assert cfg.guidance_embeds == guidance
    params = hf_flux.from_hf_state_dict(model.state_dict(), cfg)
    inp = _inputs()
    g = torch.tensor([3.5, 5.0]) if guidance else None
    ref = model(
        inp["x"], inp["context"], inp["pooled"], inp["timestep"], inp["img_ids"], inp["txt_ids"], guidance=g
    ).sample
    flat, treedef = pytree.flatten_with_paths(params)
    leaves = [leaf.detach().requires_grad_(True) for _, leaf in flat]
    ours = flux.apply(pytree.unflatten(treedef, leaves), cfg, **inp, guidance=g)
    assert ours.shape == inp["x"].shape and ref.abs().max() > 1.0
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)

    w = torch.randn_like(ref)
    (ref * w).sum().backward()
    grads = torch.autograd.grad((ours * w).sum(), leaves)
    hf_params = dict(model.named_parameters())
    assert len(hf_params) == len(flat)
    for (path, _), gr in zip(flat, grads):
        ref_grad = hf_params[hf_flux.hf_name(path)].grad
        assert ref_grad is not None and ref_grad.abs().max() > 0, path
        torch.testing.assert_close(gr, ref_grad, atol=ATOL, rtol=RTOL, msg=lambda m, p=path: f"{p}: {m}")


def test_packing_and_ids_match_the_flux_pipeline():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 10)
    packed = flux.pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 10), atol=0, rtol=0)
    # The pipeline unpacks from pixel sizes (vae_scale_factor 8): 48x80 pixels -> 6x10 latents.
    ref = FluxPipeline._unpack_latents(packed, 48, 80, 8)
    assert torch.equal(flux.unpack_latents(packed, 6, 10), ref) and torch.equal(ref, latents)
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    assert torch.equal(flux.image_ids(3, 5), ids)
    with pytest.raises(ValueError, match="even"):
        flux.pack_latents(torch.zeros(1, 4, 5, 6))
    with pytest.raises(ValueError, match="does not pack"):
        flux.unpack_latents(packed, 6, 12)


def test_export_loads_in_diffusers_without_missing_keys_and_back(tmp_path):
    model = _hf_model(True, seed=3)
    cfg = hf_flux.config_from_hf(dict(model.config))
    params = hf_flux.from_hf_state_dict(model.state_dict(), cfg)
    files = hf_flux.save_pretrained(params, cfg, tmp_path / "ours", max_shard_bytes=50_000)
    assert "diffusion_pytorch_model.safetensors.index.json" in files
    loaded, info = diffusers.FluxTransformer2DModel.from_pretrained(
        tmp_path / "ours", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    inp = _inputs(seed=4)
    args = (inp["x"], inp["context"], inp["pooled"], inp["timestep"], inp["img_ids"], inp["txt_ids"])
    g = torch.tensor([3.5, 3.5])
    with torch.no_grad():
        torch.testing.assert_close(loaded(*args, guidance=g).sample, model(*args, guidance=g).sample)
    model.save_pretrained(tmp_path / "theirs")
    cfg2, params2 = hf_flux.load_pretrained(tmp_path / "theirs")
    assert cfg2 == cfg
    for (p, a), (_, b) in zip(pytree.flatten_with_paths(params)[0], pytree.flatten_with_paths(params2)[0]):
        assert torch.equal(a, b), p
    # Strict: a Flux-dev checkpoint does not load as schnell (unexpected guidance embedder weights).
    d = json.loads((tmp_path / "theirs" / "config.json").read_text())
    d["guidance_embeds"] = False
    (tmp_path / "theirs" / "config.json").write_text(json.dumps(d))
    with pytest.raises(hf_io.CheckpointMismatchError, match="unexpected.*guidance_embedder"):
        hf_flux.load_pretrained(tmp_path / "theirs")


def test_config_validation_variants_and_axes():
    with pytest.raises(ValueError, match="FluxConfig.axes_dims_rope"):
        flux.FluxConfig(num_heads=2, head_dim=16, axes_dims_rope=(4, 4, 4))
    with pytest.raises(ValueError, match="FluxConfig.guidance_embeds"):
        flux.FluxConfig(guidance_embeds=1)
    with pytest.raises(ValueError, match="unknown field"):
        flux.FluxConfig.from_dict({"num_double_layers": 19})
    cfg = flux.FluxConfig.variant("flux_dev")
    assert flux.FluxConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # Published: FLUX.1 [dev] / [schnell] 12B (11.90B; schnell lacks the guidance embedder).
    assert flux.num_params(cfg) == 11_901_408_320
    assert flux.num_params(flux.FluxConfig.variant("flux_schnell")) == 11_891_178_560
    with torch.device("meta"):
        ref = diffusers.FluxTransformer2DModel(
            **{k: v for k, v in hf_flux.config_to_hf(cfg).items() if not k.startswith("_")}
        )
    assert sum(p.numel() for p in ref.parameters()) == flux.num_params(cfg)
    shapes, axes = flux.abstract(cfg)
    known = {"embed", "mlp", "heads", "kv_heads", "norm", None}
    flat_axes = pytree.flatten_with_paths(axes, is_leaf=lambda a: isinstance(a, tuple))[0]
    for (path, leaf), (_, ax) in zip(pytree.flatten_with_paths(shapes)[0], flat_axes, strict=True):
        assert len(ax) == leaf.dim() and set(ax) <= known, (path, ax)


def test_guidance_input_is_checked_and_grads_flow_from_our_init():
    cfg = flux.FluxConfig.variant("tiny")
    params = flux.init(random.key(0), cfg)
    inp = _inputs()
    inp["x"] = random.normal(random.key(1), inp["x"].shape)
    with pytest.raises(ValueError, match="guidance"):
        flux.apply(params, cfg, **inp)
    gen = torch.Generator().manual_seed(2)
    params = pytree.tree_map(lambda p: p + 0.05 * torch.randn(p.shape, generator=gen), params)
    g = torch.tensor([3.5, 3.5])

    def loss(p, policy):
        return flux.apply(p, cfg, **inp, guidance=g, remat_policy=policy).square().mean()

    base = autodiff.grad(loss)(params, None)
    again = autodiff.grad(loss)(params, "full")
    for (path, a), (_, b) in zip(pytree.flatten_with_paths(base)[0], pytree.flatten_with_paths(again)[0]):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
        assert a.abs().max() > 0, path
