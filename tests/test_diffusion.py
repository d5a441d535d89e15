"""Flow matching: the Euler sampler equals diffusers' ``FlowMatchEulerDiscreteScheduler`` step for step (and
the SD3 / Flux pipelines end to end, CFG and guidance embedding included), and the training pieces equal
diffusers' training utilities (timestep densities, schedule lookup, ``scale_noise``, loss weightings).
"""

import math

import numpy as np
import pytest
import torch

from functional_mm import autodiff, diffusion, pytree, random
from functional_mm.models import flux, mmdit
from functional_mm.models.hf import flux as hf_flux
from functional_mm.models.hf import mmdit as hf_mmdit

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.training_utils import (  # noqa: E402
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

SCHEDULES = {
    "sd3_shift3": (dict(shift=3.0), dict(num_inference_steps=28)),
    "no_shift": (dict(), dict(num_inference_steps=10)),
    "flux_dynamic": (
        dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
        dict(num_inference_steps=7, sigmas=np.linspace(1.0, 1 / 7, 7), mu=diffusion.resolution_mu(1024)),
    ),
    "dynamic_linear_default_sigmas": (
        dict(use_dynamic_shifting=True, time_shift_type="linear"),
        dict(num_inference_steps=5, mu=0.8),
    ),
}


def _ours(sched_kw, set_kw):
    return diffusion.flow_match_schedule(
        set_kw["num_inference_steps"],
        shift=sched_kw.get("shift", 1.0),
        use_dynamic_shifting=sched_kw.get("use_dynamic_shifting", False),
        time_shift_type=sched_kw.get("time_shift_type", "exponential"),
        mu=set_kw.get("mu"),
        sigmas=set_kw.get("sigmas"),
    )


@pytest.mark.parametrize("case", sorted(SCHEDULES))
def test_schedule_and_euler_steps_equal_the_scheduler(case):
    sched_kw, set_kw = SCHEDULES[case]
    ref = FlowMatchEulerDiscreteScheduler(**sched_kw)
    ref.set_timesteps(**set_kw)
    ours = _ours(sched_kw, set_kw)
    assert torch.equal(ours.sigmas, ref.sigmas) and torch.equal(ours.timesteps, ref.timesteps)

    # A non-linear velocity field that depends on t: every step must agree bit for bit.
    def velocity(x, t, cond):
        return torch.tanh(x) * (t[:, None, None, None] / 1000) + cond

    x = x_ref = random.normal(random.key(0), (2, 3, 4, 4))
    cond = torch.full((2, 1, 1, 1), 0.1)
    steps = []
    out = diffusion.sample(velocity, x, ours, cond=cond, callback=lambda i, s: steps.append(s))
    for i, t in enumerate(ref.timesteps):
        x_ref = ref.step(velocity(x_ref, t.expand(2), cond), t, x_ref).prev_sample
        assert torch.equal(steps[i], x_ref), i
    assert torch.equal(out, x_ref)


def _sd3_model():
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=16,
        pooled_projection_dim=10,
        out_channels=4,
        pos_embed_max_size=12,
        qk_norm="rms_norm",
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def _tiny_vae():
    return diffusers.AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
    )


def test_sd3_pipeline_with_cfg_equals_our_sampler():
    model = _sd3_model()
    cfg = hf_mmdit.config_from_hf(dict(model.config))
    params = hf_mmdit.from_hf_state_dict(model.state_dict(), cfg)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=model,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(),  # only for vae_scale_factor (2): latents 8x8 <-> 16x16 pixels
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(3)
    cond = {"ctx": torch.randn(2, 5, 12, generator=g), "pooled": torch.randn(2, 10, generator=g)}
    uncond = {"ctx": torch.randn(2, 5, 12, generator=g), "pooled": torch.randn(2, 10, generator=g)}
    noise = random.normal(random.key(1), (2, 4, 8, 8))
    ref = pipe(
        prompt_embeds=cond["ctx"],
        pooled_prompt_embeds=cond["pooled"],
        negative_prompt_embeds=uncond["ctx"],
        negative_pooled_prompt_embeds=uncond["pooled"],
        latents=noise.clone(),
        num_inference_steps=4,
        guidance_scale=4.5,
        height=16,
        width=16,
        output_type="latent",
    ).images

    def velocity(x, t, c):
        return mmdit.apply(params, cfg, x, t, c["ctx"], c["pooled"])

    ours = diffusion.sample(
        velocity,
        noise,
        diffusion.flow_match_schedule(4, shift=3.0),
        cond=cond,
        uncond=uncond,
        guidance_scale=4.5,
    )
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_flux_pipeline_with_guidance_embedding_equals_our_sampler():
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=20,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    cfg = hf_flux.config_from_hf(dict(model.config))
    params = hf_flux.from_hf_state_dict(model.state_dict(), cfg)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    pipe = diffusers.FluxPipeline(
        transformer=model,
        scheduler=sched,
        vae=_tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(4)
    ctx, pooled = torch.randn(1, 5, 24, generator=g), torch.randn(1, 20, generator=g)
    latents = random.normal(random.key(2), (1, 4, 8, 8))  # [B, C, H, W] latents, 16x16 pixels
    noise = flux.pack_latents(latents)
    n = 4
    ref = pipe(
        prompt_embeds=ctx,
        pooled_prompt_embeds=pooled,
        latents=noise.clone(),
        num_inference_steps=n,
        guidance_scale=3.5,
        height=16,
        width=16,
        output_type="latent",
    ).images

    # What the pipeline does: sigmas linspace(1, 1/n, n), mu from the image token count.
    mu = diffusion.resolution_mu(noise.shape[1])
    schedule = diffusion.flow_match_schedule(
        n, use_dynamic_shifting=True, mu=mu, sigmas=np.linspace(1.0, 1 / n, n)
    )
    img_ids, txt_ids = flux.image_ids(4, 4), flux.text_ids(5)

    def velocity(x, t, c):  # the Flux transformer takes t / 1000 and the raw guidance scale
        return flux.apply(
            params, cfg, x, t / 1000, ctx, pooled, img_ids, txt_ids, guidance=torch.full((1,), 3.5)
        )

    ours = diffusion.sample(velocity, noise, schedule)
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# training pieces


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform"])
def test_timestep_densities_match_diffusers(scheme):
    n = 20000
    kw = dict(logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
    ref = compute_density_for_timestep_sampling(scheme, n, generator=torch.Generator().manual_seed(0), **kw)
    ours = diffusion.sample_u(random.key(0), n, scheme, **kw)
    assert ours.shape == (n,) and bool(((ours > 0) & (ours < 1)).all())
    q = torch.linspace(0.01, 0.99, 25)
    torch.testing.assert_close(torch.quantile(ours, q), torch.quantile(ref, q), atol=0.02, rtol=0)
    if scheme == "mode":  # the transform itself, exactly, on the same uniforms diffusers drew
        u = torch.rand(n, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(diffusion.mode_transform(u, 1.29), ref, atol=0, rtol=0)
    assert torch.equal(ours, diffusion.sample_u(random.key(0), n, scheme, **kw))  # keyed: reproducible


def test_discrete_sigmas_noise_and_weights_match_diffusers():
    cfg = diffusion.FlowMatchingConfig(shift=3.0)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    u = torch.tensor([0.0, 0.0004, 0.25, 0.5, 0.9999])
    sigmas, timesteps = diffusion.sigmas_from_u(u, cfg)
    idx = (u * 1000).long()  # diffusers' training scripts
    assert torch.equal(timesteps, sched.timesteps[idx]) and torch.equal(sigmas, sched.sigmas[idx])
    x0, noise = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    ref = sched.scale_noise(x0, timesteps, noise)
    torch.testing.assert_close(diffusion.add_noise(x0, noise, sigmas), ref, atol=0, rtol=0)
    for scheme, ref_scheme in (("none", "logit_normal"), ("sigma_sqrt", "sigma_sqrt"), ("cosmap", "cosmap")):
        torch.testing.assert_close(
            diffusion.loss_weighting(scheme, sigmas), compute_loss_weighting_for_sd3(ref_scheme, sigmas)
        )
    # Static shift = exponential time shift with mu = log(shift); resolution mu = the Flux pipeline's.
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    s = torch.linspace(0.01, 1, 50)
    torch.testing.assert_close(diffusion.time_shift(math.log(3.0), s), diffusion.shift_sigmas(s, 3.0))
    assert diffusion.resolution_mu(1024) == pytest.approx(calculate_shift(1024))
    # Continuous, resolution-dependent: sigma = time_shift(mu(seq), u).
    dyn = diffusion.FlowMatchingConfig(dynamic_shift=True, discrete=False)
    s2, t2 = diffusion.sigmas_from_u(u[1:], dyn, image_seq_len=4096)
    torch.testing.assert_close(s2, diffusion.time_shift(1.15, u[1:]))
    torch.testing.assert_close(t2, s2 * 1000)
    with pytest.raises(ValueError, match="image_seq_len"):
        diffusion.sigmas_from_u(u, dyn)


def test_flow_matching_loss_is_the_weighted_velocity_mse_and_trains():
    cfg = mmdit.MMDiTConfig.variant("tiny")
    gen = torch.Generator().manual_seed(0)
    params = pytree.tree_map(
        lambda p: p + 0.02 * torch.randn(p.shape, generator=gen), mmdit.init(random.key(0), cfg)
    )
    x0 = random.normal(random.key(1), (3, 4, 8, 8))
    ctx, pooled = random.normal(random.key(2), (3, 5, 24)), random.normal(random.key(3), (3, 20))
    fm = diffusion.FlowMatchingConfig(shift=3.0, loss_weighting="cosmap")

    def loss_fn(p, key):
        return diffusion.flow_matching_loss(lambda x, t: mmdit.apply(p, cfg, x, t, ctx, pooled), x0, key, fm)

    loss, aux = loss_fn(params, random.key(4))
    # The same number by hand from the key's noise and sigmas (the documented derivation of both).
    k_noise, k_t = random.split(random.key(4))
    noise = random.normal(k_noise, x0.shape)
    sigmas, timesteps = diffusion.sample_sigmas(k_t, fm, 3)
    assert torch.equal(sigmas, aux["sigmas"]) and torch.equal(timesteps, aux["timesteps"])
    pred = mmdit.apply(params, cfg, diffusion.add_noise(x0, noise, sigmas), timesteps, ctx, pooled)
    w = compute_loss_weighting_for_sd3("cosmap", sigmas)
    ref = torch.mean((w[:, None, None, None] * (pred - (noise - x0)) ** 2).reshape(3, -1), 1).mean()
    torch.testing.assert_close(loss, ref)
    # Three SGD steps on one fixed key reduce it (the objective is differentiable end to end).
    grad_fn = autodiff.value_and_grad(lambda p: loss_fn(p, random.key(5))[0])
    first, _ = grad_fn(params)
    for _ in range(3):
        _, grads = grad_fn(params)
        params = pytree.tree_map(lambda p, g: p - 0.05 * g, params, grads)
    assert grad_fn(params)[0] < first


def test_drop_conditioning():
    cond = {"ctx": torch.ones(4000, 3, 2), "pooled": torch.ones(4000, 2)}
    null = {"ctx": torch.full((3, 2), 5.0), "pooled": torch.full((2,), 7.0)}
    out = diffusion.drop_conditioning(random.key(0), cond, 0.3, null)
    dropped = out["pooled"][:, 0] == 7.0
    assert torch.equal(dropped, (out["ctx"] == 5.0).all(-1).all(-1))  # one draw per sample covers all leaves
    assert abs(float(dropped.float().mean()) - 0.3) < 0.03
    assert bool(((out["pooled"] == 1) | (out["pooled"] == 7)).all())
    ind = diffusion.drop_conditioning(random.key(0), cond, 0.3, independent=True)
    a, b = ind["ctx"][:, 0, 0] == 0, ind["pooled"][:, 0] == 0
    assert not torch.equal(a, b) and abs(float((a & b).float().mean()) - 0.09) < 0.03
    assert diffusion.drop_conditioning(random.key(0), cond, 0.0)["ctx"].eq(1).all()
    with pytest.raises(ValueError, match="rate"):
        diffusion.drop_conditioning(random.key(0), cond, 1.0)


def test_config_validation():
    with pytest.raises(ValueError, match="FlowMatchingConfig.timestep_sampling"):
        diffusion.FlowMatchingConfig(timestep_sampling="cosmap")
    with pytest.raises(ValueError, match="FlowMatchingConfig.loss_weighting"):
        diffusion.FlowMatchingConfig(loss_weighting="snr")
    with pytest.raises(ValueError, match="either shift"):
        diffusion.FlowMatchingConfig(shift=3.0, dynamic_shift=True)
    with pytest.raises(ValueError, match="unknown field"):
        diffusion.FlowMatchingConfig.from_dict({"weighting_scheme": "none"})
    with pytest.raises(ValueError, match="needs mu"):
        diffusion.flow_match_schedule(4, use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="sigmas given"):
        diffusion.flow_match_schedule(4, sigmas=[1.0, 0.5])
