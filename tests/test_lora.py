"""LoRA: adapters train while the base stays put; feature dropout on the merged weights; PEFT export and
merged HF export load in transformers; diffusers export loads into SD3 and Flux transformers with equal output.
"""

import dataclasses
import json
import math

import pytest
import torch
import transformers

from functional_mm import lora, optim, pytree, random
from functional_mm.models import flux, llama, mmdit
from functional_mm.models.hf import flux as hf_flux
from functional_mm.models.hf import llama as hf_llama
from functional_mm.models.hf import mmdit as hf_mmdit
from functional_mm.train import TrainState, make_train_step

CFG = llama.LlamaConfig.variant(
    "tiny", vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64
)
LORA = lora.LoraConfig(rank=4, alpha=8.0, targets=(r"attn/(q|v)/weight$", r"mlp/down/weight$"))


def _setup():
    base = llama.init(random.key(0), CFG)
    adapters = lora.init(random.key(1), base, LORA)
    return base, adapters


def _random_b(adapters, std=0.1):
    """B is zero at init (the merge is then the base); a random B makes exports and dropout observable."""
    return pytree.map_with_path(
        lambda p, x: (
            random.normal(random.fold_in(random.key(5), len(p)), x.shape) * std if p.endswith("/b") else x
        ),
        adapters,
    )


def test_adapters_train_and_base_is_untouched():
    base, adapters = _setup()
    before = pytree.tree_map(torch.clone, base)
    assert sorted(lora.by_path(adapters)) == sorted(
        f"layers/{i}/{m}/weight" for i in range(2) for m in ("attn/q", "attn/v", "mlp/down")
    )
    tx = optim.adam(3e-2)
    state = TrainState.create(adapters, tx, random.key(2))  # the optimizer only ever sees the adapters
    assert pytree.leaf_count(state.opt_state) == 2 * pytree.leaf_count(adapters) + 1  # mu, nu, count
    step = make_train_step(lambda a, b, k: llama.loss(lora.merge(base, a, LORA), CFG, b), tx, compile=False)
    batch = {"tokens": random.randint(random.key(3), (4, 16), 0, 64)}
    losses = []
    for _ in range(30):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.3  # 4.16 -> 3.73 measured
    assert all(torch.equal(x, y) for x, y in zip(pytree.leaves(base), pytree.leaves(before)))


def test_peft_export_and_merged_export_match_in_transformers(tmp_path):
    peft = pytest.importorskip("peft")
    base, adapters = _setup()
    adapters = _random_b(adapters)
    cfg = dataclasses.replace(LORA, dropout=0.1)  # training-time only: the eval merge (key=None) ignores it
    tokens = random.randint(random.key(4), (2, 10), 0, 64)
    ours = llama.apply(lora.merge(base, adapters, cfg), CFG, tokens)

    hf_llama.save_pretrained(base, CFG, tmp_path / "base")
    lora.save_peft(adapters, cfg, tmp_path / "adapter", hf_llama.hf_name)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
    assert model.peft_config["default"].lora_dropout == 0.1
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens).logits, ours, atol=1e-5, rtol=1e-5)

    hf_llama.save_pretrained(lora.merge(base, adapters, LORA), CFG, tmp_path / "merged")
    merged, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(input_ids=tokens).logits, ours, atol=1e-5, rtol=1e-5)


def test_bad_targets_are_named():
    base, _ = _setup()
    with pytest.raises(ValueError, match="match no parameter"):
        lora.init(random.key(0), base, lora.LoraConfig(targets=("nothing_here",)))
    with pytest.raises(ValueError, match="only 2-D weights"):
        lora.init(random.key(0), base, lora.LoraConfig(targets=("final_norm/scale",)))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lora.LoraConfig(rank=0)
    for bad in (-0.1, 1.0, math.nan):
        with pytest.raises(ValueError, match=r"LoraConfig\.dropout must be in \[0, 1\)"):
            lora.LoraConfig(dropout=bad)


# ----------------------------------------------------------------------------------------------------------------
# dropout


def _one_weight(p=0.5, in_dim=64, names="uv"):
    """Same-shaped adapted weights (two by default, so per-weight masks can be told apart), random A and B."""
    base = {name: {"weight": random.normal(random.key(i), (16, in_dim))} for i, name in enumerate(names)}
    cfg = lora.LoraConfig(rank=4, alpha=6.0, targets=("weight$",), dropout=p)
    return base, _random_b(lora.init(random.key(1), base, cfg), std=0.5), cfg


def _deltas(base, adapters, cfg, key=None):
    merged = lora.merge(base, adapters, cfg, key=key)
    return {n: merged[n]["weight"] - base[n]["weight"] for n in base}  # [out, in] each


def test_no_key_or_no_dropout_is_the_exact_plain_merge():
    base, adapters, cfg = _one_weight(p=0.3)
    ab = lora.by_path(adapters)
    plain = {n: base[n]["weight"] + cfg.scale * (ab[f"{n}/weight"][1] @ ab[f"{n}/weight"][0]) for n in base}
    no_dropout = dataclasses.replace(cfg, dropout=0.0)
    for merged in (
        lora.merge(base, adapters, cfg),  # eval / export: key=None
        lora.merge(base, adapters, no_dropout, key=random.key(3)),
        lora.merge(base, adapters, no_dropout),
    ):
        assert all(torch.equal(merged[n]["weight"], plain[n]) for n in base)


def test_dropout_drops_whole_input_features_of_each_adapter():
    p = 0.5
    base, adapters, cfg = _one_weight(p)
    ab = lora.by_path(adapters)
    deltas = _deltas(base, adapters, cfg, random.key(7))
    dropped = {}
    for n, d in deltas.items():
        a, b = ab[f"{n}/weight"]
        dropped[n] = (d == 0).all(dim=0)  # [in]: a dropped input feature leaves its column of W untouched
        assert 10 < int(dropped[n].sum()) < 54  # ~Binomial(64, 0.5)
        kept = (~dropped[n]).to(a.dtype)
        torch.testing.assert_close(d, cfg.scale * b @ (a * kept[None, :] / (1 - p)), atol=1e-6, rtol=1e-5)
        assert (d[:, ~dropped[n]] != 0).any(dim=0).all()  # every kept feature does contribute
    assert not torch.equal(dropped["u"], dropped["v"])  # one mask per adapted weight
    again = _deltas(base, adapters, cfg, random.key(7))
    assert all(torch.equal(again[n], deltas[n]) for n in base)  # same key, same mask
    other = _deltas(base, adapters, cfg, random.key(8))
    assert not torch.equal((other["u"] == 0).all(dim=0), dropped["u"])


def test_dropout_is_unbiased_over_keys():
    base, adapters, cfg = _one_weight(p=0.25, in_dim=128, names="u")
    full = _deltas(base, adapters, cfg)["u"]
    n = 150
    samples = [_deltas(base, adapters, cfg, random.fold_in(random.key(11), i))["u"] for i in range(n)]

    def rel_err(x):
        return float((x - full).norm() / full.norm())

    # One draw is far off (relative error ~ sqrt(p / (1 - p)) = 0.58); the mean of n draws is ~0.58 / sqrt(n).
    assert rel_err(samples[0]) > 0.3
    assert rel_err(torch.stack(samples).mean(0)) < 0.1  # ~0.047 expected


# ----------------------------------------------------------------------------------------------------------------
# diffusers export


def _check_diffusers_file(path, adapters, cfg, hf_name):
    from safetensors.torch import load_file

    written = load_file(path)
    ab = lora.by_path(adapters)
    assert len(written) == 2 * len(ab)
    for p, (a, b) in ab.items():
        module = "transformer." + hf_name(p).removesuffix(".weight")
        assert torch.equal(written[f"{module}.lora_A.weight"], a)
        # alpha / rank is folded into B: diffusers applies a file without alphas as W + B @ A.
        torch.testing.assert_close(written[f"{module}.lora_B.weight"], cfg.scale * b)
    return {hf_name(p).removesuffix(".weight") for p in ab}


def test_sd3_lora_export_loads_in_diffusers_with_equal_output(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from diffusers.loaders.lora_pipeline import SD3LoraLoaderMixin

    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=8,
    )
    with torch.no_grad():
        for w in model.parameters():  # off the (often zero) init so that every path matters
            w.normal_(0, 0.15)
    model.eval()
    cfg = hf_mmdit.config_from_hf(dict(model.config))
    params = hf_mmdit.from_hf_state_dict(model.state_dict(), cfg)
    lcfg = lora.LoraConfig(rank=4, alpha=6.0, dropout=0.1)  # scale 1.5: a dropped alpha would show
    adapters = _random_b(lora.init(random.key(1), params, lcfg), std=0.2)
    assert len(lora.by_path(adapters)) == 15  # image and text q/k/v/o; the last block has no text output

    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 6, generator=g), torch.tensor([999.0, 3.5])
    ctx, pooled = torch.randn(2, 5, 16, generator=g), torch.randn(2, 16, generator=g)
    ours = mmdit.apply(lora.merge(params, adapters, lcfg), cfg, x, t, ctx, pooled)
    assert (ours - mmdit.apply(params, cfg, x, t, ctx, pooled)).abs().max() > 0.05

    path = lora.save_diffusers(adapters, lcfg, tmp_path, hf_mmdit.hf_name)
    modules = _check_diffusers_file(path, adapters, lcfg, hf_mmdit.hf_name)
    # What StableDiffusion3Pipeline.load_lora_weights does for the transformer, without the text encoders.
    state_dict = SD3LoraLoaderMixin.lora_state_dict(tmp_path)
    SD3LoraLoaderMixin.load_lora_into_transformer(state_dict, model)
    assert set(model.peft_config["default_0"].target_modules) == modules
    with torch.no_grad():
        torch.testing.assert_close(model(x, ctx, pooled, t).sample, ours, atol=1e-5, rtol=1e-5)


def test_flux_lora_export_loads_in_diffusers_with_equal_output(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

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
        axes_dims_rope=(4, 6, 6),
    )
    with torch.no_grad():
        for w in model.parameters():
            w.normal_(0, 0.1)
    model.eval()
    cfg = hf_flux.config_from_hf(dict(model.config))
    params = hf_flux.from_hf_state_dict(model.state_dict(), cfg)
    lcfg = lora.LoraConfig(
        rank=4, alpha=6.0, targets=(r"attn/(q|k|v|o)/weight$", r"single/\d+/(mlp_in|proj_out)/weight$")
    )
    adapters = _random_b(lora.init(random.key(1), params, lcfg), std=0.2)
    assert len(lora.by_path(adapters)) == 13  # double: 8 attention; single: q/k/v, proj_mlp, proj_out

    g = torch.Generator().manual_seed(1)
    inp = dict(
        x=flux.pack_latents(torch.randn(2, 4, 8, 6, generator=g)),  # [B, 12, 16]
        timestep=torch.tensor([1.0, 0.35]),
        context=torch.randn(2, 5, 24, generator=g),
        pooled=torch.randn(2, 20, generator=g),
        img_ids=flux.image_ids(4, 3),
        txt_ids=flux.text_ids(5),
    )
    ours = flux.apply(lora.merge(params, adapters, lcfg), cfg, **inp)
    assert (ours - flux.apply(params, cfg, **inp)).abs().max() > 0.05

    path = lora.save_diffusers(adapters, lcfg, tmp_path, hf_flux.hf_name)
    modules = _check_diffusers_file(path, adapters, lcfg, hf_flux.hf_name)
    # What FluxPipeline.load_lora_weights does for the transformer (no alphas in the file: scale 1).
    state_dict, alphas = FluxLoraLoaderMixin.lora_state_dict(tmp_path, return_alphas=True)
    assert not alphas
    FluxLoraLoaderMixin.load_lora_into_transformer(state_dict, alphas, model)
    assert set(model.peft_config["default_0"].target_modules) == modules
    with torch.no_grad():
        ref = model(
            inp["x"], inp["context"], inp["pooled"], inp["timestep"], inp["img_ids"], inp["txt_ids"]
        ).sample
    torch.testing.assert_close(ref, ours, atol=1e-5, rtol=1e-5)
