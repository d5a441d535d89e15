"""AutoencoderKL: parity with diffusers (posterior mean/logvar, decoded images and every parameter's gradient),
keyed posterior sampling, KL, latent scaling, the diffusers adapter (incl. legacy attention names), configs.

Tolerance 1e-5 (fp32). With the mid-block attention the outputs differ from diffusers by ~1e-6 relative
(the single-head attention over H*W runs on differently laid-out tensors); without it they are exact.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from functional_mm import pytree, random
from functional_mm.models import vae
from functional_mm.models.hf import io as hf_io
from functional_mm.models.hf import vae as hf_vae

diffusers = pytest.importorskip("diffusers")

ATOL = RTOL = 1e-5
CASES = {
    # SD 1.x/XL layout: quant convs, mid-block attention, a channel change (shortcut convs).
    "sd_like": dict(block_out_channels=(8, 16, 16), layers_per_block=1),
    # SD3 / Flux layout: no quant convs; here also no mid attention and two resnets per block.
    "sd3_like": dict(
        block_out_channels=(8, 16),
        layers_per_block=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
        scaling_factor=1.5305,
        shift_factor=0.0609,
    ),
}


def _hf_model(case, seed=0):
    torch.manual_seed(seed)
    n = len(CASES[case]["block_out_channels"])
    model = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4,
        norm_num_groups=4,
        **CASES[case],
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_encode_decode_and_gradients_match_diffusers(case):
    model = _hf_model(case)
    cfg = hf_vae.config_from_hf(dict(model.config))
    params = hf_vae.from_hf_state_dict(model.state_dict(), cfg)
    x = torch.randn(2, 3, 16, 12, generator=torch.Generator().manual_seed(1))
    post = model.encode(x).latent_dist
    ref_img = model.decode(post.mean).sample

    flat, treedef = pytree.flatten_with_paths(params)
    leaves = [leaf.detach().requires_grad_(True) for _, leaf in flat]
    p = pytree.unflatten(treedef, leaves)
    dist = vae.encode(p, cfg, x)
    img = vae.decode(p, cfg, vae.mode(dist))
    torch.testing.assert_close(dist.mean, post.mean, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(dist.logvar, post.logvar, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(vae.kl(dist), post.kl(), atol=ATOL, rtol=RTOL)
    assert img.shape == x.shape and ref_img.abs().max() > 0.5
    torch.testing.assert_close(img, ref_img, atol=ATOL, rtol=RTOL)

    w = torch.randn_like(ref_img)
    ((ref_img * w).sum() + post.logvar.sum()).backward()
    grads = torch.autograd.grad((img * w).sum() + dist.logvar.sum(), leaves)
    hf_params = dict(model.named_parameters())
    assert len(hf_params) == len(flat)
    scale = max(float(g.abs().max()) for g in grads)
    for (path, _), g in zip(flat, grads):
        ref_grad = hf_params[hf_vae.hf_name(path)].grad
        # The attention's key bias has an exactly-zero true gradient (softmax is shift-invariant): both sides
        # hold rounding noise there, hence the absolute floor relative to the largest gradient.
        torch.testing.assert_close(
            g, ref_grad, atol=ATOL * scale, rtol=RTOL, msg=lambda m, p=path: f"{p}: {m}"
        )


def test_sampling_is_keyed_and_scaling_round_trips():
    cfg = vae.AutoencoderKLConfig.variant("tiny")
    params = vae.init(random.key(0), cfg)
    dist = vae.encode(params, cfg, random.uniform(random.key(1), (2, 3, 16, 16)) * 2 - 1)
    a, b = vae.sample(dist, random.key(2)), vae.sample(dist, random.key(2))
    assert torch.equal(a, b) and not torch.equal(a, vae.sample(dist, random.key(3)))
    # The sample is mean + std * eps with eps ~ N(0, 1) drawn from the key.
    eps = random.normal(random.key(2), dist.mean.shape)
    torch.testing.assert_close(a, dist.mean + dist.std * eps)
    z = vae.scale_latents(cfg, a)
    torch.testing.assert_close(z, (a - 0.1) * 1.5)  # the tiny variant's shift 0.1, scale 1.5
    torch.testing.assert_close(vae.unscale_latents(cfg, z), a)
    stats = dict(latents_mean=(0.1, 0.2, 0.3, 0.4), latents_std=(1.0, 2.0, 3.0, 4.0))
    cfg2 = vae.AutoencoderKLConfig.variant("tiny", **stats)
    z2 = vae.scale_latents(cfg2, a)
    torch.testing.assert_close(z2[:, 1], (a[:, 1] - 0.2) * 1.5 / 2.0)
    torch.testing.assert_close(vae.unscale_latents(cfg2, z2), a)


def test_export_loads_in_diffusers_and_legacy_names_load(tmp_path):
    model = _hf_model("sd_like", seed=4)
    cfg = hf_vae.config_from_hf(dict(model.config))
    params = hf_vae.from_hf_state_dict(model.state_dict(), cfg)
    hf_vae.save_pretrained(params, cfg, tmp_path / "ours")
    loaded, info = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.config.scaling_factor == cfg.scaling_factor
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).sample, model(x).sample)

    model.save_pretrained(tmp_path / "theirs")
    cfg2, params2 = hf_vae.load_pretrained(tmp_path / "theirs")
    assert cfg2 == cfg
    for (p, a), (_, b) in zip(pytree.flatten_with_paths(params)[0], pytree.flatten_with_paths(params2)[0]):
        assert torch.equal(a, b), p
    # Pre-0.14 attention names (query/key/value/proj_attn) load as diffusers loads them.
    path = tmp_path / "theirs" / hf_vae.WEIGHTS_NAME
    tensors = load_file(path)
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
        for side in ("encoder", "decoder"):
            for leaf in ("weight", "bias"):
                tensors[f"{side}.mid_block.attentions.0.{old}.{leaf}"] = tensors.pop(
                    f"{side}.mid_block.attentions.0.{new}.{leaf}"
                )
    save_file(tensors, path, metadata={"format": "pt"})
    _, params3 = hf_vae.load_pretrained(tmp_path / "theirs")
    assert torch.equal(
        params3["encoder"]["mid"]["attn"]["o"]["weight"], params["encoder"]["mid"]["attn"]["o"]["weight"]
    )
    del tensors["decoder.conv_out.bias"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(hf_io.CheckpointMismatchError, match="decoder.conv_out.bias"):
        hf_vae.load_pretrained(tmp_path / "theirs")


def test_config_validation_and_variants():
    with pytest.raises(ValueError, match="AutoencoderKLConfig.norm_num_groups"):
        vae.AutoencoderKLConfig(block_out_channels=(8, 12), norm_num_groups=8)
    with pytest.raises(ValueError, match="latents_mean and latents_std"):
        vae.AutoencoderKLConfig(latents_mean=(0.0,) * 4)
    with pytest.raises(ValueError, match="unknown field"):
        vae.AutoencoderKLConfig.from_dict({"latent_channel": 4})
    with pytest.raises(ValueError, match="down_block_types"):
        hf_vae.config_from_hf({"block_out_channels": [8], "down_block_types": ["AttnDownEncoderBlock2D"]})
    cfg = vae.AutoencoderKLConfig.variant("flux")
    assert vae.AutoencoderKLConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for name, count in (("sd3", 83_819_683), ("sd", 83_653_863)):
        c = vae.AutoencoderKLConfig.variant(name)
        assert vae.num_params(c) == count
        with torch.device("meta"):
            ref = diffusers.AutoencoderKL(
                **{k: v for k, v in hf_vae.config_to_hf(c).items() if not k.startswith("_")}
            )
        assert sum(p.numel() for p in ref.parameters()) == count
    with pytest.raises(ValueError, match="divisible by 2"):
        tiny = vae.AutoencoderKLConfig.variant("tiny")
        vae.encode(vae.init(random.key(0), tiny), tiny, torch.zeros(1, 3, 15, 16))
    shapes, axes = vae.abstract(cfg)
    flat_axes = pytree.flatten_with_paths(axes, is_leaf=lambda a: isinstance(a, tuple))[0]
    for (path, leaf), (_, ax) in zip(pytree.flatten_with_paths(shapes)[0], flat_axes, strict=True):
        assert len(ax) == leaf.dim(), path
