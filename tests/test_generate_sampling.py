"""Sampling and streaming in the VLMs' ``generate`` (LLaVA, Qwen2-VL, InternVL2), all on the shared
:func:`functional_mm.models.llama.decode_loop`: ``top_k=1`` / a tiny ``top_p`` reduce to greedy, the same key
gives the same tokens, ``on_token`` streams every step before the next forward pass, stop tokens pad finished
rows, and sampling without a key is refused. Tiny random models with left-padded batches of two prompts;
greedy parity with transformers lives in each model's own test file.
"""

import pytest
import torch

from functional_mm import random
from functional_mm.models import internvl, llama, llava, qwen2_vl

PAD, BOS = 0, 1
NEW = 6


def _text(n, seed):
    return torch.randint(3, 100, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _left_pad(rows):
    width = max(map(len, rows))
    tokens = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return tokens, mask


def _llava():
    cfg = llava.LlavaConfig.variant("tiny")
    params = llava.init(random.key(0), cfg)
    img = [cfg.image_token_id]
    rows = [llava.expand_image_tokens([BOS, *_text(2, 1), *img, *_text(1, 2)], cfg)]
    rows.append(llava.expand_image_tokens([BOS, *img, *_text(4, 3)], cfg))
    tokens, mask = _left_pad(rows)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))

    def gen(**kw):
        return llava.generate(params, cfg, tokens, pixels, attention_mask=mask, **kw)

    return gen, tokens.shape[1], (llama, "decode")


def _qwen2_vl():
    cfg = qwen2_vl.Qwen2VLConfig.variant("tiny")
    params = qwen2_vl.init(random.key(0), cfg)
    grids = [(1, 4, 4), (1, 2, 4)]

    def item(grid):
        t, h, w = grid
        return (
            [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // 4) + [cfg.vision_end_token_id]
        )

    rows = [[BOS, *_text(1, 1), *item(grids[0]), *_text(2, 2)], [BOS, *item(grids[1]), *_text(5, 3)]]
    tokens, mask = _left_pad(rows)
    n_patches = sum(t * h * w for t, h, w in grids)
    pixels = torch.randn(n_patches, cfg.vision.patch_dim, generator=torch.Generator().manual_seed(4))

    def gen(**kw):
        return qwen2_vl.generate(
            params,
            cfg,
            tokens,
            pixel_values=pixels,
            image_grid_thw=torch.tensor(grids),
            attention_mask=mask,
            **kw,
        )

    return gen, tokens.shape[1], (qwen2_vl, "decode")


def _internvl():
    cfg = internvl.InternVLConfig.variant("tiny")
    params = internvl.init(random.key(0), cfg)
    img = [cfg.image_token_id] * cfg.num_image_tokens
    tokens, mask = _left_pad([[BOS, *img, *_text(2, 1)], [BOS, *_text(3, 2), *img, *_text(1, 3)]])
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))

    def gen(**kw):
        return internvl.generate(params, cfg, tokens, pixels, attention_mask=mask, **kw)

    return gen, tokens.shape[1], (llama, "decode")


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def model(request):
    return {"llava": _llava, "qwen2_vl": _qwen2_vl}[request.param]()


def test_top_k_one_and_tiny_top_p_reduce_to_greedy(model):
    gen, width, _ = model
    greedy = gen(max_new_tokens=NEW)
    assert greedy.shape == (2, width + NEW)
    kw = dict(max_new_tokens=NEW, key=random.key(3), temperature=1.0)
    assert torch.equal(gen(top_k=1, **kw), greedy)
    assert torch.equal(gen(top_p=1e-6, **kw), greedy)
    assert torch.equal(gen(top_k=1, top_p=0.5, **kw), greedy)


def test_same_key_same_tokens_different_key_different_tokens(model):
    gen, width, _ = model
    kw = dict(max_new_tokens=NEW, temperature=3.0)
    a = gen(key=random.key(7), **kw)
    assert torch.equal(a[:, :width], gen(max_new_tokens=1)[:, :width])  # the prompt is kept
    assert torch.equal(a, gen(key=random.key(7), **kw))
    assert not torch.equal(a, gen(key=random.key(8), **kw))
    assert not torch.equal(a, gen(max_new_tokens=NEW))
    # top-k / top-p sampling is reproducible per key as well
    kw.update(top_k=5, top_p=0.9)
    assert torch.equal(gen(key=random.key(7), **kw), gen(key=random.key(7), **kw))


def test_on_token_streams_each_step_before_the_next_forward(model, monkeypatch):
    gen, width, (module, name) = model
    events, calls = [], []
    forward = getattr(module, name)

    def logged_forward(*a, **kw):
        events.append("forward")
        return forward(*a, **kw)

    def on_token(new):
        assert new.dtype == torch.long and new.shape == (2,)
        events.append("token")
        calls.append(new.clone())

    monkeypatch.setattr(module, name, logged_forward)
    out = gen(max_new_tokens=NEW, key=random.key(1), temperature=1.0, top_k=20, on_token=on_token)
    assert len(calls) == out.shape[1] - width == NEW
    assert torch.equal(torch.stack(calls, dim=1), out[:, width:])
    # prefill, then each token is handed over before the forward pass that consumes it
    assert events == ["forward"] + ["token", "forward"] * (NEW - 1) + ["token"]


def test_stop_tokens_pad_finished_rows_and_end_generation(model):
    gen, width, _ = model
    kw = dict(max_new_tokens=NEW, key=random.key(5), temperature=2.0)
    free = gen(**kw)
    stop = int(free[0, width])  # row 0 stops at once
    calls = []
    out = gen(stop_tokens=(stop,), pad_token=PAD, on_token=calls.append, **kw)
    assert out[0, width] == stop and (out[0, width + 1 :] == PAD).all()
    row1_stop = (free[1, width:] == stop).nonzero()
    if len(row1_stop):  # generation ends when every row has stopped
        assert out.shape[1] == width + int(row1_stop[0]) + 1
    else:
        assert torch.equal(out[1], free[1])
    assert torch.equal(torch.stack(calls, dim=1), out[:, width:])
    # every row stops at its first token: one step only
    both = gen(stop_tokens=(stop, int(free[1, width])), pad_token=PAD, **kw)
    assert torch.equal(both, free[:, : width + 1])


def test_bad_sampling_arguments_are_refused(model):
    gen, _, _ = model
    with pytest.raises(ValueError, match="key"):
        gen(max_new_tokens=2, temperature=0.7)
    with pytest.raises(ValueError, match="top_k"):
        gen(max_new_tokens=2, key=random.key(0), temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        gen(max_new_tokens=2, key=random.key(0), temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        gen(max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="on_token"):
        gen(max_new_tokens=2, on_token="print")


def test_internvl_samples_and_streams_through_the_shared_loop():
    gen, width, _ = _internvl()
    greedy = gen(max_new_tokens=4)
    kw = dict(max_new_tokens=4, key=random.key(2), temperature=1.0)
    assert torch.equal(gen(top_k=1, **kw), greedy)
    calls = []
    a = gen(on_token=calls.append, **kw)
    assert torch.equal(a, gen(**kw)) and torch.equal(torch.stack(calls, dim=1), a[:, width:])
    with pytest.raises(ValueError, match="key"):
        gen(max_new_tokens=2, temperature=0.5)


def test_llama_generate_streams_through_the_shared_loop():
    cfg = llama.LlamaConfig.variant("tiny")
    params = llama.init(random.key(0), cfg)
    prompt = torch.tensor([[0, 7, 8], [4, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    kw = dict(max_new_tokens=5, attention_mask=mask, key=random.key(1), temperature=0.8, top_k=20)
    calls = []
    out = llama.generate(params, cfg, prompt, on_token=calls.append, **kw)
    assert torch.equal(out, llama.generate(params, cfg, prompt, **kw))
    assert torch.equal(torch.stack(calls, dim=1), out[:, 3:])
