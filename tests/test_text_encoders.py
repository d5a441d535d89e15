"""CLIP text (with and without projection) and T5 encoder: parity with transformers (every output SD3 and
Flux read, and every parameter's gradient), padding masks, the transformers adapter and its accepted
checkpoint spellings, configs and variants.

Tolerance 1e-5 (fp32): with sdpa both sides are exact today; with transformers' eager attention outputs
differ by ~1e-6 and gradients by up to 1e-5 *of the largest gradient* (DESIGN.md §7), so gradient checks use
an absolute tolerance of 1e-5 x max|grad|.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from functional_mm import pytree, random
from functional_mm.models import text_encoders as te
from functional_mm.models.hf import io as hf_io
from functional_mm.models.hf import text_encoders as hf_te

transformers = pytest.importorskip("transformers")

ATOL = RTOL = 1e-5


def _randomize(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.2)
    return model.eval()


def _clip(with_projection, eos=2, attn="sdpa", seed=0):
    c = transformers.CLIPTextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=24,
        hidden_act="quick_gelu" if with_projection else "gelu",
        bos_token_id=1,
        eos_token_id=eos,
        pad_token_id=0,
        attn_implementation=attn,
    )
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return _randomize(cls(c), seed)


def _t5(ff="gated-gelu", attn="sdpa", seed=0):
    c = transformers.T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        feed_forward_proj=ff,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=12,
        dropout_rate=0.0,
        attn_implementation=attn,
    )
    return _randomize(transformers.T5EncoderModel(c), seed)


def _check_grads(model, params, ref, ours_fn, name_fn):
    """Compare a random projection's gradient w.r.t. every parameter (mapped by transformers name)."""
    flat, treedef = pytree.flatten_with_paths(params)
    leaves = [leaf.detach().requires_grad_(True) for _, leaf in flat]
    ours = ours_fn(pytree.unflatten(treedef, leaves))
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)
    w = torch.randn_like(ref)
    model.zero_grad()
    (ref * w).sum().backward()
    grads = torch.autograd.grad((ours * w).sum(), leaves)
    hf_params = dict(model.named_parameters())
    assert len(hf_params) == len(flat)
    # Absolute tolerance relative to the largest gradient: with eager attention transformers' op order differs
    # (~1e-7 per op) and that noise reaches 1e-5 relative in small entries of large gradients.
    atol = ATOL * max(1.0, max(float(g.abs().max()) for g in grads))
    for (path, _), g in zip(flat, grads):
        ref_grad = hf_params[name_fn(path)].grad
        assert ref_grad is not None and ref_grad.abs().max() > 0, path
        torch.testing.assert_close(g, ref_grad, atol=atol, rtol=RTOL, msg=lambda m, p=path: f"{p}: {m}")


CLIP_CASES = {
    "with_projection_legacy_eos_sdpa": dict(with_projection=True, eos=2, attn="sdpa"),
    "no_projection_eos_id_eager": dict(with_projection=False, eos=3, attn="eager"),
}


@pytest.mark.parametrize("case", sorted(CLIP_CASES))
def test_clip_outputs_and_gradients_match_transformers(case):
    kw = CLIP_CASES[case]
    model = _clip(**kw)
    proj = kw["with_projection"]
    cfg = hf_te.clip_config_from_hf(model.config.to_dict(), with_projection=proj)
    assert cfg.eos_token_id == kw["eos"]
    params = hf_te.from_hf_state_dict(model.state_dict(), cfg)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, 60, (2, 10), generator=g)
    tokens[:, 0] = 1
    tokens[0, 7], tokens[1, 9] = 3, 3  # an EOS id for the eos_token_id rule; the argmax rule picks the max
    mask = torch.ones_like(tokens)
    mask[0, 8:] = 0  # right padding after the EOS

    def pick(o, pooled, embeds, hidden):
        # Everything SD3/Flux read: projected / pooled vector, final states, penultimate layer's states.
        return torch.cat([(embeds if proj else pooled).flatten(), o.flatten(), hidden[-2].flatten()])

    ref_out = model(tokens, attention_mask=mask, output_hidden_states=True)
    ref = pick(
        ref_out.last_hidden_state,
        None if proj else ref_out.pooler_output,
        ref_out.text_embeds if proj else None,
        ref_out.hidden_states,
    )
    assert len(ref_out.hidden_states) == cfg.num_layers + 1

    def ours(p):
        o = te.clip_apply(p, cfg, tokens, attention_mask=mask, output_hidden_states=True)
        assert len(o.hidden_states) == cfg.num_layers + 1 and (o.text_embeds is None) != proj
        return pick(o.last_hidden_state, o.pooled, o.text_embeds, o.hidden_states)

    _check_grads(model, params, ref, ours, lambda p: hf_te.clip_hf_name(p, proj))


@pytest.mark.parametrize("ff,attn", [("gated-gelu", "sdpa"), ("relu", "eager")])
def test_t5_outputs_and_gradients_match_transformers(ff, attn):
    model = _t5(ff, attn)
    cfg = hf_te.config_from_hf(model.config.to_dict())
    assert isinstance(cfg, te.T5EncoderConfig) and cfg.is_gated == ff.startswith("gated")
    params = hf_te.from_hf_state_dict(model.state_dict(), cfg)
    tokens = torch.randint(2, 60, (2, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(tokens)
    mask[1, 15:] = 0
    # Sequences longer than max_distance / 2 so the logarithmic buckets are used.
    ref = model(tokens, attention_mask=mask).last_hidden_state
    _check_grads(
        model, params, ref, lambda p: te.t5_apply(p, cfg, tokens, attention_mask=mask), hf_te.t5_hf_name
    )


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 300)[None]
    for buckets, dist in ((32, 128), (8, 12)):
        ref = T5Attention._relative_position_bucket(
            rel, bidirectional=True, num_buckets=buckets, max_distance=dist
        )
        assert torch.equal(te.relative_position_bucket(rel, buckets, dist), ref)


def test_exports_load_in_transformers_and_checkpoint_spellings(tmp_path):
    for model, proj in ((_clip(True), True), (_clip(False, eos=3), False), (_t5(), None)):
        is_clip = proj is not None
        cfg = (
            hf_te.clip_config_from_hf(model.config.to_dict(), with_projection=proj)
            if is_clip
            else hf_te.config_from_hf(model.config.to_dict())
        )
        params = hf_te.from_hf_state_dict(model.state_dict(), cfg)
        out = tmp_path / f"ours_{proj}"
        hf_te.save_pretrained(params, cfg, out)
        cls = type(model)
        loaded, info = cls.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        tokens = torch.tensor([[1, 5, 9, 3, 2]])
        with torch.no_grad():
            torch.testing.assert_close(loaded(tokens).last_hidden_state, model(tokens).last_hidden_state)
        model.save_pretrained(tmp_path / f"theirs_{proj}")
        cfg2, params2 = hf_te.load_pretrained(tmp_path / f"theirs_{proj}")
        assert cfg2 == cfg
        for (p, a), (_, b) in zip(
            pytree.flatten_with_paths(params)[0], pytree.flatten_with_paths(params2)[0]
        ):
            assert torch.equal(a, b), p

    # transformers 4.x / hub spelling of a CLIPTextModel: "text_model." prefixes and the position_ids buffer.
    path = tmp_path / "theirs_False" / "model.safetensors"
    tensors = {f"text_model.{k}": v for k, v in load_file(path).items()}
    tensors["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    save_file(tensors, path, metadata={"format": "pt"})
    cfg3, params3 = hf_te.load_pretrained(tmp_path / "theirs_False")
    assert not cfg3.with_projection and torch.equal(
        params3["final_norm"]["scale"], tensors["text_model.final_layer_norm.weight"]
    )

    # T5: the tied table stored under the encoder's name, or under both names (which must agree).
    path = tmp_path / "theirs_None" / "model.safetensors"
    tensors = load_file(path)
    shared = tensors["shared.weight"]
    save_file({**tensors, "encoder.embed_tokens.weight": shared.clone()}, path, metadata={"format": "pt"})
    assert torch.equal(hf_te.load_pretrained(tmp_path / "theirs_None")[1]["embed"]["weight"], shared)
    save_file({**tensors, "encoder.embed_tokens.weight": shared + 1}, path, metadata={"format": "pt"})
    with pytest.raises(hf_io.CheckpointMismatchError, match="differ"):
        hf_te.load_pretrained(tmp_path / "theirs_None")
    rest = {k: v for k, v in tensors.items() if k != "shared.weight"}
    save_file({**rest, "encoder.embed_tokens.weight": shared}, path, metadata={"format": "pt"})
    assert torch.equal(hf_te.load_pretrained(tmp_path / "theirs_None")[1]["embed"]["weight"], shared)
    save_file({k: v for k, v in rest.items() if "wo" not in k}, path, metadata={"format": "pt"})
    with pytest.raises(hf_io.CheckpointMismatchError, match="missing"):
        hf_te.load_pretrained(tmp_path / "theirs_None")


def test_configs_variants_and_our_init():
    with pytest.raises(ValueError, match="CLIPTextConfig.num_heads"):
        te.CLIPTextConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="T5EncoderConfig.d_kv"):
        te.T5EncoderConfig(d_kv=0)
    with pytest.raises(ValueError, match="unknown field"):
        te.CLIPTextConfig.from_dict({"hidden_dim": 8})
    with pytest.raises(ValueError, match="neither"):
        hf_te.config_from_hf({"model_type": "bert"})
    for cfg in (te.CLIPTextConfig.variant("clip_g"), te.T5EncoderConfig.variant("t5_v1_1_xxl")):
        assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    counts = {
        "clip_l": 123_650_304,
        "clip_l_no_projection": 123_060_480,
        "clip_g": 694_659_840,
    }
    for name, n in counts.items():
        assert te.num_params(te.CLIPTextConfig.variant(name)) == n
    assert te.num_params(te.T5EncoderConfig.variant("t5_v1_1_xxl")) == 4_762_310_656
    c = te.CLIPTextConfig.variant("clip_g")
    hf_cfg = {k: v for k, v in hf_te.clip_config_to_hf(c).items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        ref = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**hf_cfg))
    assert sum(p.numel() for p in ref.parameters()) == counts["clip_g"]
    # Our own init runs, every parameter gets a gradient, axes cover every dim.
    for cfg, init, apply_fn, abstract in (
        (
            te.CLIPTextConfig.variant("tiny"),
            te.clip_init,
            lambda p, c, t: te.clip_apply(p, c, t).text_embeds,
            te.clip_abstract,
        ),
        (te.T5EncoderConfig.variant("tiny"), te.t5_init, te.t5_apply, te.t5_abstract),
    ):
        params = init(random.key(0), cfg)
        tokens = torch.tensor([[1, 7, 8, 2, 0]])
        flat, treedef = pytree.flatten(params)
        leaves = [x.requires_grad_(True) for x in flat]
        out = apply_fn(pytree.unflatten(treedef, leaves), cfg, tokens)
        assert all(g.abs().max() > 0 for g in torch.autograd.grad(out.square().sum(), leaves))
        shapes, axes = abstract(cfg)
        flat_axes = pytree.flatten_with_paths(axes, is_leaf=lambda a: isinstance(a, tuple))[0]
        for (path, leaf), (_, ax) in zip(pytree.flatten_with_paths(shapes)[0], flat_axes, strict=True):
            assert len(ax) == leaf.dim(), path


class _FakeTokenizer:
    """Stands in for a tokenizer (none can be downloaded here): fixed ids, padded to ``max_length``."""

    added_tokens_encoder: dict = {}  # read by Flux's textual-inversion prompt conversion

    def __init__(self, ids, model_max_length, pad=0):
        self.ids, self.model_max_length, self.pad = ids, model_max_length, pad

    def tokenize(self, prompt):
        return prompt.split()

    def __call__(self, prompt, padding="longest", max_length=None, **kwargs):
        from types import SimpleNamespace

        n = len(self.ids) if padding == "longest" else (max_length or self.model_max_length)
        row = (self.ids + [self.pad] * n)[:n]
        return SimpleNamespace(input_ids=torch.tensor([row] * len(prompt)), attention_mask=None)


def test_sd3_and_flux_conditioning_equal_the_pipelines_encode_prompt():
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    # SD3's encoders differ in width (CLIP-L 768, CLIP-G 1280, T5 4096): here 32, 48 and 96.
    clip_l, clip_g, t5 = _clip(True, seed=1), _clip(True, seed=2), _t5(seed=3)
    c = clip_g.config.to_dict()
    c.update(hidden_size=48, intermediate_size=64, num_attention_heads=4)
    clip_g = _randomize(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**c)), 2)
    t5c = t5.config.to_dict()
    t5c.update(d_model=96, num_heads=4, d_kv=8)
    t5 = _randomize(transformers.T5EncoderModel(transformers.T5Config(**t5c)), 3)
    ids_clip, ids_t5 = [1, 9, 17, 2], [7, 8, 9, 1]
    pipe = StableDiffusion3Pipeline(
        transformer=None,
        scheduler=None,
        vae=None,
        text_encoder=clip_l,
        tokenizer=_FakeTokenizer(ids_clip, 12),
        text_encoder_2=clip_g,
        tokenizer_2=_FakeTokenizer(ids_clip, 12),
        text_encoder_3=t5,
        tokenizer_3=_FakeTokenizer(ids_t5, 10),
    )
    ref_ctx, _, ref_pooled, _ = pipe.encode_prompt(
        "a red circle", None, None, do_classifier_free_guidance=False, max_sequence_length=10, device="cpu"
    )
    ours = []
    for m in (clip_l, clip_g):
        cfg = hf_te.clip_config_from_hf(m.config.to_dict(), with_projection=True)
        params = hf_te.from_hf_state_dict(m.state_dict(), cfg)
        ours.append(te.clip_apply(params, cfg, torch.tensor([ids_clip + [0] * 8]), output_hidden_states=True))
    t5_cfg = hf_te.config_from_hf(t5.config.to_dict())
    t5_out = te.t5_apply(
        hf_te.from_hf_state_dict(t5.state_dict(), t5_cfg), t5_cfg, torch.tensor([ids_t5 + [0] * 6])
    )
    ctx, pooled = te.sd3_conditioning(*ours, t5_out)
    assert ctx.shape == (1, 12 + 10, 96) and pooled.shape == (1, 48)
    torch.testing.assert_close(ctx, ref_ctx, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(pooled, ref_pooled, atol=ATOL, rtol=RTOL)

    flux_clip = _clip(False, seed=4)
    fpipe = FluxPipeline(
        transformer=None,
        scheduler=None,
        vae=None,
        text_encoder=flux_clip,
        tokenizer=_FakeTokenizer(ids_clip, 12),
        text_encoder_2=t5,
        tokenizer_2=_FakeTokenizer(ids_t5, 10),
    )
    ref_ctx, ref_pooled, ref_ids = fpipe.encode_prompt(
        "a red circle", None, max_sequence_length=10, device="cpu"
    )
    cfg = hf_te.clip_config_from_hf(flux_clip.config.to_dict(), with_projection=False)
    out = te.clip_apply(
        hf_te.from_hf_state_dict(flux_clip.state_dict(), cfg), cfg, torch.tensor([ids_clip + [0] * 8])
    )
    ctx, pooled = te.flux_conditioning(out, t5_out)
    torch.testing.assert_close(ctx, ref_ctx, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(pooled, ref_pooled, atol=ATOL, rtol=RTOL)
    assert not ref_ids.any() and ref_ids.shape == (10, 3)
