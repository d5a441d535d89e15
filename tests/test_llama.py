"""Llama / Qwen2: parity with transformers (logits, every gradient, generation), the HF adapter (config,
strict loading, sharded export that transformers loads), packing, decoding and input validation.

Parity means: build the transformers reference from a tiny config, move its weights into our tree with our
converter (``hf_llama.from_hf_state_dict``), compare. Tolerance 1e-5 (fp32) throughout: HF runs the same
math in a different op order (DESIGN.md §7).
"""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch._dynamo.utils import counters

from functional_mm import pytree, random
from functional_mm.models import llama
from functional_mm.models.hf import io as hf_io
from functional_mm.models.hf import llama as hf_llama

transformers = pytest.importorskip("transformers")

ATOL = RTOL = 1e-5
VOCAB, PAD, BOS, EOS = 64, 0, 1, 2
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Smaller than the test sequences, so the scaled band of frequencies is actually exercised.
    "original_max_position_embeddings": 8,
}


def _hf_config(kind="llama", *, tie=False, rope_scaling=None, attn="sdpa"):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        attn_implementation=attn,
    )
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, rope_theta=1e6)
    if rope_scaling is not None:
        return transformers.LlamaConfig(**common, rope_theta=5e5, rope_scaling=dict(rope_scaling))
    return transformers.LlamaConfig(**common, rope_theta=1e4)


def _hf_model(hf_config, seed=0):
    """A transformers model with weights large enough that the comparison is not trivially near-uniform:
    projections/embeddings N(0, 0.2), norm scales 1 + N(0, 0.1), biases N(0, 0.1)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.2)
    return model


def _ours(model):
    cfg = hf_llama.config_from_hf(model.config.to_dict())
    return cfg, hf_llama.from_hf_state_dict(model.state_dict(), cfg)


def _tokens(b, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (b, t), generator=g)  # no pad/bos/eos inside prompts


CASES = {
    "llama_gqa_untied": dict(kind="llama"),
    "llama3_rope_scaling_eager": dict(kind="llama", rope_scaling=LLAMA3_SCALING, attn="eager"),
    "llama_tied": dict(kind="llama", tie=True),
    "qwen2_qkv_bias": dict(kind="qwen2"),
}


# ----------------------------------------------------------------------------------------------------------------
# parity: logits and gradients


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_gradients_match_transformers(case):
    model = _hf_model(_hf_config(**CASES[case]))
    cfg, params = _ours(model)
    assert cfg.tie_embeddings == CASES[case].get("tie", False) and ("lm_head" in params) != cfg.tie_embeddings
    assert cfg.qkv_bias == (CASES[case]["kind"] == "qwen2")
    tokens = _tokens(2, 24)

    # Logits.
    with torch.no_grad():
        ref = model(tokens).logits
    ours = llama.apply(params, cfg, tokens)
    assert ours.shape == (2, 24, VOCAB) and ref.abs().max() > 1.0  # not a trivially flat distribution
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)

    # Gradients of the mean next-token cross entropy w.r.t. every parameter, mapped by HF name. A loss mask
    # (HF: labels = -100) makes the reduction non-trivial.
    loss_mask = torch.ones_like(tokens)
    loss_mask[0, 5:9] = 0
    model.zero_grad()
    ref_loss = model(tokens, labels=tokens.masked_fill(loss_mask == 0, -100)).loss
    ref_loss.backward()
    flat, treedef = pytree.flatten_with_paths(params)
    leaves = [x.detach().requires_grad_(True) for _, x in flat]
    our_loss = llama.loss(pytree.unflatten(treedef, leaves), cfg, {"tokens": tokens, "loss_mask": loss_mask})
    grads = torch.autograd.grad(our_loss, leaves)
    torch.testing.assert_close(our_loss, ref_loss, atol=ATOL, rtol=RTOL)
    hf_params = dict(model.named_parameters())  # tied: lm_head is the embedding and listed once
    assert len(hf_params) == len(flat)
    for (path, _), g in zip(flat, grads):
        ref_grad = hf_params[hf_llama.hf_name(path)].grad
        assert ref_grad is not None and ref_grad.abs().max() > 0, path
        torch.testing.assert_close(g, ref_grad, atol=ATOL, rtol=RTOL, msg=lambda m, p=path: f"{p}: {m}")


@pytest.mark.parametrize("case", ["llama_gqa_untied", "qwen2_qkv_bias"])
def test_left_padded_batch_matches_transformers(case):
    model = _hf_model(_hf_config(**CASES[case]))
    cfg, params = _ours(model)
    tokens = _tokens(3, 12, seed=1)
    mask = torch.ones_like(tokens)
    mask[0, :4] = 0
    mask[2, :1] = 0
    tokens = tokens.masked_fill(mask == 0, PAD)
    # HF's forward numbers positions 0..T-1 whatever the mask; generate() passes cumsum - 1, which we derive.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(tokens, attention_mask=mask, position_ids=position_ids).logits
    ours = llama.apply(params, cfg, tokens, attention_mask=mask)
    real = mask.bool()  # padding queries have no defined output
    torch.testing.assert_close(ours[real], ref[real], atol=ATOL, rtol=RTOL)
    # A left-padded row is the unpadded sequence.
    alone = llama.apply(params, cfg, tokens[:1, 4:])
    torch.testing.assert_close(ours[0, 4:], alone[0], atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------------------------------------
# generation


@pytest.mark.parametrize("padded", [False, True], ids=["single_prompt", "left_padded_batch"])
def test_greedy_generation_matches_transformers(padded):
    model = _hf_model(_hf_config("qwen2" if padded else "llama"), seed=3)
    cfg, params = _ours(model)
    if padded:
        prompt = _tokens(2, 7, seed=4)
        mask = torch.ones_like(prompt)
        mask[1, :3] = 0
        prompt = prompt.masked_fill(mask == 0, PAD)
    else:
        prompt, mask = _tokens(1, 5, seed=4), None
    kw = {} if mask is None else {"attention_mask": mask}
    with torch.no_grad():
        ref = model.generate(
            prompt, max_new_tokens=10, do_sample=False, pad_token_id=PAD, eos_token_id=EOS, **kw
        )
    ours = llama.generate(params, cfg, prompt, max_new_tokens=10, stop_tokens=(EOS,), pad_token=PAD, **kw)
    assert ours.shape[1] > prompt.shape[1]
    assert torch.equal(ours, ref), (ours, ref)


def test_stop_tokens_pad_finished_rows_and_end_early():
    model = _hf_model(_hf_config(), seed=3)
    cfg, params = _ours(model)
    prompt = _tokens(2, 5, seed=4)
    free = llama.generate(params, cfg, prompt, max_new_tokens=6)
    stop = int(free[0, 5])  # row 0 stops at once
    out = llama.generate(params, cfg, prompt, max_new_tokens=6, stop_tokens=(stop,), pad_token=PAD)
    assert out[0, 5] == stop and (out[0, 6:] == PAD).all()
    row1_stop = (free[1, 5:] == stop).nonzero()
    if len(row1_stop):  # generation ends when every row has stopped
        assert out.shape[1] == 5 + int(row1_stop[0]) + 1
    else:
        assert torch.equal(out[1], free[1])


def test_sampling_is_deterministic_per_key_and_filters_reduce_to_greedy():
    model = _hf_model(_hf_config(), seed=3)
    cfg, params = _ours(model)
    prompt = _tokens(2, 4, seed=5)
    kw = dict(max_new_tokens=12, temperature=1.0)
    a = llama.generate(params, cfg, prompt, key=random.key(7), **kw)
    b = llama.generate(params, cfg, prompt, key=random.key(7), **kw)
    c = llama.generate(params, cfg, prompt, key=random.key(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = llama.generate(params, cfg, prompt, max_new_tokens=12)
    assert not torch.equal(a, greedy)
    assert torch.equal(llama.generate(params, cfg, prompt, key=random.key(7), top_k=1, **kw), greedy)
    assert torch.equal(llama.generate(params, cfg, prompt, key=random.key(7), top_p=1e-6, **kw), greedy)
    with pytest.raises(ValueError, match="key"):
        llama.generate(params, cfg, prompt, max_new_tokens=2, temperature=0.7)


def test_incremental_decode_matches_full_forward():
    cfg = llama.LlamaConfig.variant("tiny", vocab_size=VOCAB, max_seq_len=16)
    params = llama.init(random.key(0), cfg)
    tokens = _tokens(2, 8, seed=6)
    full = llama.apply(params, cfg, tokens)
    cache = llama.init_cache(cfg, 2, 9)
    logits, cache = llama.decode(params, cfg, tokens[:, :5], cache)
    steps = [logits]
    for t in range(5, 8):
        logits, cache = llama.decode(params, cfg, tokens[:, t : t + 1], cache)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=RTOL)
    assert int(cache["index"]) == 8 and cache["valid"][:, :8].all() and not cache["valid"][:, 8:].any()
    with pytest.raises(ValueError, match="cache is full"):
        llama.decode(params, cfg, tokens[:, :2], cache)


# ----------------------------------------------------------------------------------------------------------------
# packing, remat


def test_packed_segments_equal_separate_sequences():
    cfg = llama.LlamaConfig.variant("tiny", vocab_size=VOCAB, max_seq_len=16)
    params = llama.init(random.key(1), cfg)
    a, b = _tokens(1, 5, seed=7), _tokens(1, 7, seed=8)
    packed = torch.cat([a, b], 1)
    seg = torch.tensor([[1] * 5 + [2] * 7])
    out = llama.apply(params, cfg, packed, segment_ids=seg)
    torch.testing.assert_close(out[:, :5], llama.apply(params, cfg, a), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out[:, 5:], llama.apply(params, cfg, b), atol=ATOL, rtol=RTOL)
    # The loss skips the boundary target (b's first token predicted from a's last) and averages per target.
    la, lb = llama.loss(params, cfg, {"tokens": a}), llama.loss(params, cfg, {"tokens": b})
    packed_loss = llama.loss(params, cfg, {"tokens": packed, "segment_ids": seg})
    torch.testing.assert_close(packed_loss, (4 * la + 6 * lb) / 10, atol=ATOL, rtol=RTOL)


def test_target_loss_heads_only_the_targets_in_at_most_four_shapes():
    cfg = llama.LlamaConfig.variant("tiny", vocab_size=VOCAB, max_seq_len=16)
    params = llama.init(random.key(2), cfg)
    tokens = _tokens(2, 16, seed=3)  # B * T = 32: the head runs on 8, 16, 24 or 32 rows
    flat, treedef = pytree.flatten_with_paths(params)
    compiled = torch.compile(lambda p, h, t: llama.target_loss(p, cfg, h, t), dynamic=False)
    torch._dynamo.reset()
    graphs = []
    for counts in ((0, 1, 8, 9, 17, 31), (2, 7, 10, 23, 25)):  # the second pass reuses the first's 4 shapes
        for n in counts:
            where = torch.randperm(32, generator=torch.Generator().manual_seed(n))[:n]
            targets = torch.full((32,), -100).index_fill(0, where, 0).view(2, 16)
            targets = torch.where(targets == 0, _tokens(2, 16, seed=n), -100)
            leaves = [x.detach().requires_grad_(True) for _, x in flat]
            p = pytree.unflatten(treedef, leaves)
            h = llama.apply(p, cfg, tokens, return_hidden=True)
            ours = llama.target_loss(p, cfg, h, targets)
            logits = llama.apply(p, cfg, tokens)  # reference: every position through the head
            ref = F.cross_entropy(logits.view(32, -1), targets.view(32), reduction="sum") / max(n, 1)
            torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)
            if n:
                for a, b, (path, _) in zip(
                    torch.autograd.grad(ours, leaves), torch.autograd.grad(ref, leaves), flat
                ):
                    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m, p=path: f"{p}: {m}")
            torch.testing.assert_close(compiled(p, h.detach(), targets), ours.detach(), atol=ATOL, rtol=RTOL)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0], "a new target count within seen buckets recompiled"


def test_remat_policies_give_the_same_gradients():
    cfg = llama.LlamaConfig.variant("tiny", vocab_size=VOCAB)
    params = llama.init(random.key(2), cfg)
    batch = {"tokens": _tokens(2, 10, seed=9)}
    base = None
    for policy in (None, "full", "selective"):
        leaves, treedef = pytree.flatten(params)
        leaves = [x.detach().requires_grad_(True) for x in leaves]
        value = llama.loss(pytree.unflatten(treedef, leaves), cfg, batch, remat_policy=policy)
        grads = torch.autograd.grad(value, leaves)
        if base is None:
            base = (value, grads)
        else:
            torch.testing.assert_close(value, base[0], atol=0, rtol=0)
            for g, g0 in zip(grads, base[1]):
                torch.testing.assert_close(g, g0, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# save / load


@pytest.mark.parametrize(
    "max_shard_bytes", [hf_io.DEFAULT_MAX_SHARD_BYTES, 30_000], ids=["single", "sharded"]
)
@pytest.mark.parametrize("qwen2", [False, True], ids=["llama", "qwen2_tied"])
def test_save_pretrained_loads_in_transformers_and_back(tmp_path, max_shard_bytes, qwen2):
    cfg = llama.LlamaConfig(
        vocab_size=VOCAB,
        dim=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=48,
        max_seq_len=64,
        qkv_bias=qwen2,
        tie_embeddings=qwen2,
        rope_theta=1e6 if qwen2 else 5e5,
        rope_scaling=None if qwen2 else LLAMA3_SCALING,
        init_std=0.2,
    )
    params = llama.init(random.key(3), cfg)
    if qwen2:  # zero-initialised biases would not prove they are written and read
        for layer in params["layers"]:
            for n in "qkv":
                layer["attn"][n]["bias"] = random.normal(random.key(4), layer["attn"][n]["bias"].shape) * 0.1
    files = hf_llama.save_pretrained(
        params, cfg, tmp_path, max_shard_bytes=max_shard_bytes, extra_config={"eos_token_id": EOS}
    )
    sharded = max_shard_bytes < hf_io.DEFAULT_MAX_SHARD_BYTES
    assert ("model.safetensors.index.json" in files) == sharded
    assert (len([f for f in files if f.endswith(".safetensors")]) > 1) == sharded

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True
    )
    assert type(model).__name__ == ("Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.eos_token_id == EOS
    tokens = _tokens(2, 16, seed=10)
    with torch.no_grad():
        ref = model(tokens).logits
    torch.testing.assert_close(llama.apply(params, cfg, tokens), ref, atol=ATOL, rtol=RTOL)

    # Our loader reads our export and transformers' own export (which writes its config in 5.x layout).
    cfg_back, params_back = hf_llama.load_pretrained(tmp_path)
    assert cfg_back == cfg
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir, max_shard_size=max_shard_bytes if sharded else "5GB")
    cfg_hf, params_hf = hf_llama.load_pretrained(hf_dir)
    assert cfg_hf == cfg
    for back in (params_back, params_hf):
        assert pytree.same_structure(back, params)
        for x, y in zip(pytree.leaves(back), pytree.leaves(params)):
            assert torch.equal(x, y)


def test_loader_is_strict_and_names_every_offending_key(tmp_path):
    model = _hf_model(_hf_config("qwen2"))
    cfg, params = _ours(model)
    hf_llama.save_pretrained(params, cfg, tmp_path)
    weights = tmp_path / "model.safetensors"
    good = load_file(weights)

    # A known non-parameter buffer is tolerated.
    save_file({**good, "model.rotary_emb.inv_freq": torch.ones(4)}, weights, metadata={"format": "pt"})
    hf_llama.load_pretrained(tmp_path)

    bad = dict(good)
    del bad["model.layers.1.self_attn.k_proj.bias"]
    bad["model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(2, 2)
    bad["model.norm.weight"] = torch.ones(31)
    save_file(bad, weights, metadata={"format": "pt"})
    with pytest.raises(hf_io.CheckpointMismatchError) as err:
        hf_llama.load_pretrained(tmp_path)
    msg = str(err.value)
    for key in (
        "model.layers.1.self_attn.k_proj.bias",
        "model.layers.0.self_attn.extra_proj.weight",
        "model.norm.weight: checkpoint [31] vs model [32]",
        str(tmp_path),
    ):
        assert key in msg, msg
    assert "missing (1)" in msg and "unexpected (1)" in msg and "wrong shape (1)" in msg

    # The in-memory converter is just as strict.
    with pytest.raises(hf_io.CheckpointMismatchError, match="extra_proj"):
        hf_llama.from_hf_state_dict(bad, cfg)


def test_tied_checkpoint_with_stored_head(tmp_path):
    model = _hf_model(_hf_config(tie=True))
    cfg, params = _ours(model)
    hf_llama.save_pretrained(params, cfg, tmp_path)
    weights = tmp_path / "model.safetensors"
    good = load_file(weights)
    save_file(
        {**good, "lm_head.weight": good["model.embed_tokens.weight"].clone()},
        weights,
        metadata={"format": "pt"},
    )
    assert "lm_head" not in hf_llama.load_pretrained(tmp_path)[1]  # an identical copy is accepted
    save_file({**good, "lm_head.weight": torch.zeros(VOCAB, 32)}, weights, metadata={"format": "pt"})
    with pytest.raises(hf_io.CheckpointMismatchError, match="lm_head.weight differs"):
        hf_llama.load_pretrained(tmp_path)


def test_missing_directory_config_and_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf_llama.load_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_llama.load_pretrained(tmp_path)
    cfg = llama.LlamaConfig.variant("tiny")
    (tmp_path / "config.json").write_text(json.dumps(hf_llama.config_to_hf(cfg)))
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors or model\.safetensors\.index\.json"):
        hf_llama.load_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        hf_llama.load_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# config


def test_config_from_hf_handles_both_rope_layouts_and_rejects_unsupported():
    base = dict(
        model_type="llama",
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=128,
    )
    v4 = hf_llama.config_from_hf(
        {**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}
    )
    v5 = hf_llama.config_from_hf(
        {**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}}
    )
    assert v4 == v5 and v4.rope_theta == 5e5 and v4.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert v4.num_kv_heads == 4 and v4.head_dim == 8 and not v4.qkv_bias
    assert (
        hf_llama.config_from_hf(base).rope_theta == 1e4 and hf_llama.config_from_hf(base).rope_scaling is None
    )
    # llama3 without original_max_position_embeddings falls back to max_position_embeddings, as in HF.
    scaling = {k: v for k, v in LLAMA3_SCALING.items() if k != "original_max_position_embeddings"}
    assert (
        hf_llama.config_from_hf({**base, "rope_scaling": scaling}).rope_scaling[
            "original_max_position_embeddings"
        ]
        == 128
    )
    for cfg in (v4, llama.LlamaConfig.variant("qwen2_0.5b"), llama.LlamaConfig.variant("tiny", head_dim=24)):
        assert hf_llama.config_from_hf(hf_llama.config_to_hf(cfg)) == cfg
    for bad, what in (
        ({"model_type": "mistral"}, "mistral"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "yarn"),
    ):
        with pytest.raises(ValueError, match=what):
            hf_llama.config_from_hf({**base, **bad})
    with pytest.raises(ValueError, match="use_sliding_window"):
        hf_llama.config_from_hf({**base, "model_type": "qwen2", "use_sliding_window": True})


def test_config_validation_names_the_field():
    tiny = llama.VARIANTS["tiny"]
    for overrides, field in (
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"num_heads": 6}, "head_dim"),  # 64 not divisible by 6
        ({"head_dim": 15}, "head_dim"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"dtype": "float8"}, "dtype"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"norm_eps": -1.0}, "norm_eps"),
    ):
        with pytest.raises(ValueError, match=field):
            llama.LlamaConfig(**{**tiny, **overrides})
    with pytest.raises(ValueError, match="bogus"):
        llama.LlamaConfig.from_dict({**tiny, "bogus": 1})
    with pytest.raises(ValueError, match="llama9"):
        llama.LlamaConfig.variant("llama9")
    cfg = llama.LlamaConfig.variant("tiny", num_heads=8, num_kv_heads=2)
    assert cfg.head_dim == 8 and llama.LlamaConfig.from_dict(cfg.to_dict()) == cfg
    scaled = llama.LlamaConfig(**{**tiny, "rope_scaling": LLAMA3_SCALING})
    assert hash(scaled) == hash(dataclasses.replace(scaled)) and scaled.rope_scaling is not LLAMA3_SCALING


def test_variants_have_the_published_sizes():
    # Parameter counts of the published checkpoints (counted on the meta device: no memory).
    published = {
        "llama2_7b": 6_738_415_616,
        "llama3_8b": 8_030_261_248,
        "qwen2_0.5b": 494_032_768,
        "qwen2_1.5b": 1_543_714_304,
        "qwen2_7b": 7_615_616_512,
    }
    for name, count in published.items():
        assert llama.num_params(llama.LlamaConfig.variant(name)) == count, name
    cfg = llama.LlamaConfig.variant("llama2_7b")
    # MHA with untied head: 6 * (N - embedding) + 12 * L * D * T.
    n_matmul = llama.num_params(cfg) - cfg.vocab_size * cfg.dim - (2 * cfg.num_layers + 1) * cfg.dim
    assert llama.flops_per_token(cfg, 4096) == 6 * n_matmul + 12 * cfg.num_layers * cfg.dim * 4096


def test_logical_axes_and_init():
    cfg = llama.LlamaConfig.variant("qwen2_0.5b")
    axes = llama.logical_axes(cfg)  # a 0.5B model on the meta device
    assert axes["embed"]["weight"] == ("vocab", "embed") and "lm_head" not in axes
    assert axes["final_norm"]["scale"] == ("norm",) and axes["layers"][3]["mlp_norm"]["scale"] == ("norm",)
    assert axes["layers"][0]["attn"]["q"]["weight"] == ("heads", "embed")
    assert axes["layers"][0]["attn"]["k"]["bias"] == ("kv_heads",)
    assert llama.logical_axes(llama.LlamaConfig.variant("tiny"))["lm_head"]["weight"] == ("vocab", "embed")
    tiny = llama.LlamaConfig.variant("tiny", dtype="bfloat16")
    shapes, _ = llama.abstract(tiny)
    p1, p2 = llama.init(random.key(0), tiny), llama.init(random.key(0), tiny)
    assert pytree.same_structure(shapes, p1)
    for x, y in zip(pytree.leaves(shapes), pytree.leaves(p1)):
        assert (x.shape, x.dtype, x.device.type) == (y.shape, y.dtype, "meta")
    assert all(
        torch.equal(x, y) and x.dtype == torch.bfloat16 for x, y in zip(pytree.leaves(p1), pytree.leaves(p2))
    )
    assert not torch.equal(p1["layers"][0]["attn"]["q"]["weight"], p1["layers"][1]["attn"]["q"]["weight"])
    std = p1["layers"][0]["mlp"]["up"]["weight"].float().std().item()
    assert abs(std - tiny.init_std) < 0.002


# ----------------------------------------------------------------------------------------------------------------
# bad inputs


def test_bad_inputs_name_the_argument():
    cfg = llama.LlamaConfig.variant("tiny", max_seq_len=16)
    params = llama.init(random.key(0), cfg)
    tokens = _tokens(2, 8)
    cases = [
        (dict(tokens=tokens.float()), TypeError, "tokens must be an integer"),
        (dict(tokens=tokens[0]), ValueError, r"tokens must have shape \[B, T\]"),
        (dict(tokens=_tokens(1, 17)), ValueError, "tokens: sequence length T=17 exceeds max_seq_len=16"),
        (dict(tokens=tokens, attention_mask=torch.ones(2, 7)), ValueError, "attention_mask must have shape"),
        (dict(tokens=tokens, segment_ids=torch.zeros(2, 8)), TypeError, "segment_ids must be an integer"),
        (
            dict(tokens=tokens, positions=torch.zeros(1, 8, dtype=torch.long)),
            ValueError,
            "positions must have",
        ),
        (dict(tokens=None), ValueError, "tokens"),
    ]
    for kwargs, exc, msg in cases:
        tok = kwargs.pop("tokens")
        with pytest.raises(exc, match=msg):
            llama.apply(params, cfg, tok, **kwargs)
    with pytest.raises(ValueError, match="unknown keys \\['labels'\\]"):
        llama.loss(params, cfg, {"tokens": tokens, "labels": tokens})
    with pytest.raises(ValueError, match="max_new_tokens"):
        llama.generate(params, cfg, tokens, max_new_tokens=9)
    with pytest.raises(TypeError, match="prompt_tokens"):
        llama.generate(params, cfg, tokens.float(), max_new_tokens=2)
