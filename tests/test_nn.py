"""Layers against their PyTorch / transformers references."""

import math

import pytest
import torch
import torch.nn.functional as F

from functional_mm import nn, random


def _unbox(boxed):
    return nn.unbox(boxed)[0]


def test_linear_matches_torch_and_carries_axes():
    boxed = nn.linear.init(random.key(0), 6, 4, axes=("embed", "mlp"), bias=True)
    p, axes = nn.unbox(boxed)
    assert axes == {"weight": ("mlp", "embed"), "bias": ("mlp",)}
    ref = torch.nn.Linear(6, 4)
    with torch.no_grad():
        ref.weight.copy_(p["weight"]), ref.bias.copy_(torch.randn(4))
    p["bias"] = ref.bias.detach().clone()
    x = torch.randn(3, 6)
    torch.testing.assert_close(nn.linear.apply(p, x), ref(x))
    with pytest.raises(ValueError, match="input feature size 5"):
        nn.linear.apply(p, torch.randn(3, 5))


def test_param_axes_must_match_rank():
    with pytest.raises(ValueError, match="2 axis names"):
        nn.param(torch.ones(3), ("a", "b"))


def test_abstract_init_is_free_and_exact():
    shapes, axes = nn.abstract(nn.attention.init, random.key(0), 4096, 32, 8)
    assert shapes["q"]["weight"].is_meta and shapes["k"]["weight"].shape == (1024, 4096)
    assert axes["o"]["weight"] == ("embed", "heads")


def test_norms_match_references():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(2, 5, 8)
    p = _unbox(nn.norms.init_layer_norm(8))
    p["scale"], p["bias"] = torch.randn(8), torch.randn(8)
    torch.testing.assert_close(nn.norms.layer_norm(p, x), F.layer_norm(x, (8,), p["scale"], p["bias"], 1e-5))
    ref = LlamaRMSNorm(8, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(8))
    for dtype in (torch.float32, torch.bfloat16):
        ref = ref.to(dtype)
        q = {"scale": ref.weight.detach()}
        torch.testing.assert_close(nn.norms.rms_norm(q, x.to(dtype)), ref(x.to(dtype)))


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_rope_matches_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    rope_parameters = {"rope_type": "default", "rope_theta": 500000.0} | (scaling or {})
    cfg = LlamaConfig(
        hidden_size=64, num_attention_heads=2, max_position_embeddings=256, rope_parameters=rope_parameters
    )
    ref = LlamaRotaryEmbedding(cfg)
    inv = nn.rope.frequencies(32, 500000.0, scaling)
    torch.testing.assert_close(inv, ref.inv_freq, rtol=1e-6, atol=0)
    pos = torch.arange(100)[None].expand(2, 100)
    x = torch.randn(2, 3, 100, 32)
    cos_r, sin_r = ref(x, pos)
    cos, sin = nn.rope.cos_sin(pos, inv)
    torch.testing.assert_close((cos, sin), (cos_r, sin_r))
    q_ref, _ = apply_rotary_pos_emb(x, x, cos_r, sin_r)
    torch.testing.assert_close(nn.rope.apply(x, cos, sin), q_ref)


def test_rope_rejects_unknown_scaling_and_odd_dims():
    with pytest.raises(ValueError, match="yarn"):
        nn.rope.frequencies(8, 1e4, {"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="even head_dim"):
        nn.rope.frequencies(7, 1e4)


def _reference_attention(q, k, v, mask):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ v


def test_gqa_attention_with_padding_and_segments():
    b, h, hkv, t, d = 2, 4, 2, 6, 8
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    pos = torch.arange(t)[None].expand(b, t)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    seg = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    mask = nn.attention.make_mask(pos, pos, kv_valid=valid, q_segments=seg, kv_segments=seg)
    out = nn.attention.dot_product_attention(q, k, v, mask=mask)
    ref = _reference_attention(q, k, v, mask)
    rows = mask.any(-1, keepdim=True).expand_as(out)  # fully masked query rows are excluded from the check
    torch.testing.assert_close(out[rows], ref[rows])
    assert torch.isfinite(out).all()
    assert not mask[0, 0, 3, 2] and mask[0, 0, 4, 3] and not mask[1, 0, 3, 1]
    with pytest.raises(ValueError, match="not a multiple"):
        nn.attention.dot_product_attention(q, torch.randn(b, 3, t, d), torch.randn(b, 3, t, d))


def test_attention_kv_cache_equals_full_pass():
    p = _unbox(nn.attention.init(random.key(1), 16, 4, 2))
    x = torch.randn(1, 5, 16)
    pos = torch.arange(5)[None]
    cs = nn.rope.cos_sin(pos, nn.rope.frequencies(4, 1e4))
    full, _ = nn.attention.apply(p, x, head_dim=4, cos_sin=cs, is_causal=True)
    cache = {"k": torch.zeros(1, 2, 8, 4), "v": torch.zeros(1, 2, 8, 4)}
    slots = torch.arange(8)[None]
    outs = []
    for i in range(5):
        m = nn.attention.make_mask(pos[:, i : i + 1], slots, kv_valid=slots <= i)
        cs_i = (cs[0][:, i : i + 1], cs[1][:, i : i + 1])
        o, cache = nn.attention.apply(
            p, x[:, i : i + 1], head_dim=4, cos_sin=cs_i, mask=m, cache=cache, cache_index=torch.tensor([i])
        )
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full)


def test_mlps():
    x = torch.randn(3, 8)
    g = _unbox(nn.mlp.init_gated(random.key(0), 8, 16))
    ref = F.linear(
        F.silu(F.linear(x, g["gate"]["weight"])) * F.linear(x, g["up"]["weight"]), g["down"]["weight"]
    )
    torch.testing.assert_close(nn.mlp.gated(g, x), ref)
    m = _unbox(nn.mlp.init_mlp(random.key(1), 8, 16))
    ref = F.linear(
        F.gelu(F.linear(x, m["fc1"]["weight"], m["fc1"]["bias"])), m["fc2"]["weight"], m["fc2"]["bias"]
    )
    torch.testing.assert_close(nn.mlp.mlp(m, x), ref)
    with pytest.raises(ValueError, match="unknown activation 'swish2'"):
        nn.mlp.gated(g, x, act="swish2")


@pytest.mark.parametrize("patch", [(4, 4), (2, 4, 4)])
def test_patch_embed_matches_conv(patch):
    p = _unbox(nn.patch_embed.init(random.key(0), 3, 10, patch))
    x = torch.randn(2, 3, *([4] if len(patch) == 3 else []), 8, 8)
    conv = (torch.nn.Conv2d if len(patch) == 2 else torch.nn.Conv3d)(3, 10, patch, stride=patch)
    with torch.no_grad():
        conv.weight.copy_(p["weight"]), conv.bias.copy_(p["bias"])
    torch.testing.assert_close(nn.patch_embed.apply(p, x), conv(x).flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match="expected a"):
        nn.patch_embed.apply(p, torch.randn(3, 8, 8))


def test_dropout_is_keyed():
    x = torch.ones(1000)
    a = nn.dropout(random.key(0), x, 0.25)
    assert torch.equal(a, nn.dropout(random.key(0), x, 0.25))
    assert abs((a == 0).float().mean() - 0.25) < 0.05 and torch.allclose(a[a != 0], torch.tensor(1 / 0.75))
    assert nn.dropout(random.key(0), x, 0.25, deterministic=True) is x


def test_embedding_errors_and_attend():
    p = _unbox(nn.embedding.init(random.key(0), 10, 4))
    ids = torch.tensor([[1, 2]])
    assert nn.embedding.apply(p, ids).shape == (1, 2, 4)
    torch.testing.assert_close(nn.embedding.attend(p, torch.eye(4)[:1]), p["weight"][:, 0][None])
    with pytest.raises(TypeError, match="int32/int64"):
        nn.embedding.apply(p, ids.float())
