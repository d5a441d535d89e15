"""Sharded vision-language training on real gloo process groups matches single-process training.

Qwen2-VL: the tiny model (vision tower + Qwen2 decoder) trains for 3 eager AdamW steps on batches with images
(and a right-padded row) from the same weights, in this process and on 2 gloo ranks under
``qwen2_vl.default_rules()`` with mesh ``{"fsdp": 2}``, ``{"tp": 2}`` (Megatron TP with sequence parallelism
in the decoder *and* in the vision tower) and ``{"tp": 2}`` without sequence parallelism; losses are compared
step by step and the final parameters leaf by leaf (gathered). The tower packs all images into one sequence, so
over the data axes it runs whole on every rank; ``pixel_values`` / ``image_grid_thw`` may come plain or placed
by ``shard_batch`` (the model gathers them). The plain ViT towers (CLIP, SigLIP with its attention-pooling
head, InternViT with layer scale) give the same loss and gradients on both meshes as in one process.

LLaVA (CLIP tower + projector + Llama) and InternVL2 (InternViT + pixel shuffle + LayerNorm projector + Qwen2)
train the same way under ``{"fsdp": 2}`` and ``{"tp": 2}`` (their ``default_rules()``): the tower splits the
images over the data axes, so a row whose images another rank's tower ran gets them through the merge (the
first row holds both images of the batch, the second none).

One 2-rank launch runs every check (spawning is the expensive part on 2 cores): about 35 s for Qwen2-VL and the
towers; the 4 LLaVA-style runs of 3 steps add less than a launch of their own would cost.

Tolerances as in test_parallel_training.py: fp32; sharded runs sum partial products in another order, which
moves gradients by ~1e-7 relative, and Adam turns that into ~1e-6 (at most 1e-5 measured, on the merger's
weights) on the parameters after 3 steps at lr 1e-3: ``ATOL = 2e-5`` on parameters, 1e-5 on losses.
"""

import contextlib

import pytest
import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.debug import CommDebugMode

from functional_mm import autodiff, optim, pytree, random
from functional_mm.models import internvl, llava, qwen2_vl, vit
from functional_mm.parallelism import gather, make_mesh, run_local, shard, shard_batch, use_mesh
from functional_mm.train import TrainState, make_train_step

CFG = qwen2_vl.Qwen2VLConfig.variant("tiny")  # vision: 2 blocks, d 32, 4 heads; text: 2 layers, d 64
TX = optim.adamw(1e-3, weight_decay=0.1)
STEPS = 3
ATOL = 2e-5
LAYOUTS = {
    "fsdp2": ({"fsdp": 2}, True),
    "tp2": ({"tp": 2}, True),
    "tp2_no_sp": ({"tp": 2}, False),
}
GRIDS = [(1, 4, 4), (1, 2, 4)]  # one image per row: 4 and 2 merged tokens
VS, IMG, VE = CFG.vision_start_token_id, CFG.image_token_id, CFG.vision_end_token_id
TOWERS = ("clip_tiny", "siglip_tiny", "internvit_tiny")


def _batch(i: int) -> dict:
    """Two rows of 12 tokens with an image each; the second row is right-padded (``attention_mask``)."""
    g = torch.Generator().manual_seed(100 + i)
    text = torch.randint(3, 100, (12,), generator=g).tolist()
    rows = [
        [1, *text[:2], VS, *[IMG] * 4, VE, *text[2:5]],
        [1, VS, *[IMG] * 2, VE, *text[5:9], 0, 0, 0],
    ]
    n = sum(t * h * w for t, h, w in GRIDS)
    return {
        "tokens": torch.tensor(rows),
        "attention_mask": torch.tensor([[1] * 12, [1] * 9 + [0] * 3]),
        "pixel_values": torch.randn(n, CFG.vision.patch_dim, generator=g),
        "image_grid_thw": torch.tensor(GRIDS),
    }


def _scalar(x) -> float:
    return float(x.full_tensor() if isinstance(x, DTensor) else x)


def _loss_fn(p, b, k):
    return qwen2_vl.loss(p, CFG, b)


def _train(mesh=None, rules=None):
    """3 eager steps from the same weights: (losses, final params). Sharded when ``mesh`` is given."""
    params = qwen2_vl.init(random.key(0), CFG)
    if mesh is not None:
        params = shard(params, qwen2_vl.logical_axes(CFG), mesh, rules)
    state = TrainState.create(params, TX, random.key(1))
    step = make_train_step(_loss_fn, TX, compile=False)
    losses = []
    for i in range(STEPS):
        if mesh is None:
            state, metrics = step(state, _batch(i))
        else:
            with use_mesh(mesh, rules):
                state, metrics = step(state, _batch(i))
        losses.append(_scalar(metrics["loss"]))
    return losses, state.params


def _tower_loss_and_grads(name, mesh=None):
    """A ViT tower's loss (mean square of its outputs) and gradients on 4 images; sharded on ``mesh``."""
    cfg = vit.ViTConfig.variant(name)
    params = vit.init(random.key(0), cfg)
    pixels = torch.randn(4, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))

    def loss(p):
        out = vit.apply(p, cfg, pixels)
        pooled = out["pooled"].pow(2).mean() if out["pooled"] is not None else 0.0
        return out["last_hidden_state"].pow(2).mean() + pooled

    if mesh is None:
        return autodiff.value_and_grad(loss)(params)
    rules = vit.default_rules()
    params = shard(params, vit.logical_axes(cfg), mesh, rules)
    with use_mesh(mesh, rules):
        value, grads = autodiff.value_and_grad(loss)(params)
    return _scalar(value), gather(grads)


def _run() -> dict:
    report: dict = {}
    for name, (layout, sp) in LAYOUTS.items():
        mesh = make_mesh(layout)
        rules = qwen2_vl.default_rules(sequence_parallel=sp)
        losses, params = _train(mesh, rules)
        report[name] = {
            "losses": losses,
            "params": gather(params),
            "placements": {p: tuple(x.placements) for p, x in pytree.flatten_with_paths(params)[0]},
        }
        # One forward of the loss on a batch placed by shard_batch (which splits pixel_values and the grids
        # along dim 0 like any batch leaf): the model reads the vision inputs whole, so the loss is unchanged.
        start = shard(qwen2_vl.init(random.key(0), CFG), qwen2_vl.logical_axes(CFG), mesh, rules)
        with use_mesh(mesh, rules), torch.no_grad(), CommDebugMode() as comms:
            report[name]["placed_loss"] = _scalar(qwen2_vl.loss(start, CFG, shard_batch(_batch(0))))
        report[name]["forward_comms"] = {str(k).split(".")[-1]: v for k, v in comms.get_comm_counts().items()}
        if name in ("fsdp2", "tp2"):
            report[name]["towers"] = {t: _tower_loss_and_grads(t, mesh) for t in TOWERS}
    report["llava_style"] = _run_vlms()  # in the same launch: spawning 2 ranks costs more than the runs
    return report


@pytest.fixture(scope="module")
def reference():
    return _train()


@pytest.fixture(scope="module")
def two():
    return run_local(_run, 2, timeout=600)


def _max_err(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(pytree.leaves(a), pytree.leaves(b)))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_two_rank_training_matches_single_process(two, reference, name):
    ref_losses, ref_params = reference
    report = two[name]
    assert report["losses"] == pytest.approx(ref_losses, abs=1e-5)
    assert pytree.same_structure(report["params"], ref_params)
    assert _max_err(report["params"], ref_params) < ATOL
    # the vision tower trained too (fails with frozen or detached vision weights): 3 steps move it by ~3e-3
    start = qwen2_vl.init(random.key(0), CFG)
    for part in ("patch_embed", "layers", "merger"):
        assert _max_err(report["params"]["vision"][part], start["vision"][part]) > 1e-3, part
    assert report["placed_loss"] == pytest.approx(ref_losses[0], abs=1e-5)


def test_vision_weights_are_sharded(two):
    R, S = Replicate(), Shard
    fsdp, tp = two["fsdp2"]["placements"], two["tp2"]["placements"]
    assert fsdp["vision/patch_embed/weight"] == (S(0),)  # ("embed", "channels", ...): embed over fsdp
    assert fsdp["vision/layers/0/attn/q/weight"] == (S(1),)  # (heads, embed)
    assert fsdp["vision/layers/1/attn_norm/scale"] == (S(0),)
    assert fsdp["vision/merger/fc1/weight"] == (S(1),) and fsdp["vision/merger/fc2/weight"] == (S(0),)
    assert tp["vision/layers/0/attn/q/weight"] == tp["vision/layers/0/attn/q/bias"] == (S(0),)  # column
    assert tp["vision/layers/0/attn/o/weight"] == (S(1),)  # row parallel
    assert tp["vision/layers/0/mlp/fc1/weight"] == (S(0),) and tp["vision/layers/0/mlp/fc2/weight"] == (S(1),)
    assert tp["vision/merger/fc1/weight"] == (S(0),) and tp["vision/merger/fc2/weight"] == (S(1),)
    assert tp["vision/patch_embed/weight"] == (R,) and tp["vision/layers/0/attn_norm/scale"] == (R,)
    assert tp["text/embed/weight"] == (S(0),)  # vocab parallel


def test_forward_collectives(two):
    lt, lv = CFG.text.num_layers, CFG.vision.num_layers
    # Sequence parallel in both towers: a reduce-scatter after the embedding and after each attention / MLP,
    # an all-gather before each of them, before the head and before the patch merger; the merger's row-parallel
    # output is all-reduced (the features are replicated) and the vocab-parallel loss all-reduces 3 [N]
    # vectors. Nothing is left for the [B, T, V] logits.
    assert two["tp2"]["forward_comms"] == {
        "reduce_scatter_tensor": 2 * lt + 1 + 2 * lv,
        "all_gather_into_tensor": 2 * lt + 1 + 2 * lv + 1,
        "all_reduce": 3 + 1,
    }
    assert two["tp2_no_sp"]["forward_comms"] == {"all_reduce": 2 * lt + 1 + 2 * lv + 1 + 3}
    # fsdp: one bucketed all-gather per block (the weights of a layer move as one buffer) plus the patch embed,
    # the merger, the text embedding and the head, and one per placed batch input (tokens, mask, pixels, grids:
    # read whole); the vision tower's activations are whole on every rank, so nothing else but the loss's sums.
    placements = two["fsdp2"]["placements"].values()
    n_sharded = sum(any(isinstance(p, Shard) for p in ps) for ps in placements)
    gathers = two["fsdp2"]["forward_comms"]["all_gather_into_tensor"]
    assert gathers == lt + lv + 4 + len(_batch(0)) < n_sharded


@pytest.mark.parametrize("layout", ["fsdp2", "tp2"])
@pytest.mark.parametrize("tower", TOWERS)
def test_vit_towers_match_single_process(two, tower, layout):
    ref_loss, ref_grads = _tower_loss_and_grads(tower)
    loss, grads = two[layout]["towers"][tower]
    assert loss == pytest.approx(float(ref_loss), abs=1e-6)
    scale = max(g.abs().max().item() for g in pytree.leaves(ref_grads))
    assert pytree.same_structure(grads, ref_grads)
    assert _max_err(grads, ref_grads) <= 1e-5 * scale


def test_vision_heads_not_divisible_by_tp_fail_without_processes():
    rules = qwen2_vl.default_rules()
    vit.check_layout(CFG.vision, {"fsdp": 8, "tp": 2}, rules)  # 4 heads over tp=2; fsdp is gathered at use
    one_head = qwen2_vl.Qwen2VLConfig.variant("tiny", vision={"num_heads": 1})
    with pytest.raises(ValueError, match=r"Qwen2-VL vision layout: num_heads=1 is not divisible .*\('tp',\)"):
        vit.check_layout(one_head.vision, {"tp": 2}, rules, what="Qwen2-VL vision")
    with pytest.raises(ValueError, match=r"ViT layout: num_heads=4 is not divisible .* of size 8"):
        vit.check_layout(vit.ViTConfig.variant("clip_tiny"), {"tp": 8}, vit.default_rules())


# ----------------------------------------------------------------------------------------------------------------
# LLaVA and InternVL2: the LLaVA-style glue of llava.py (embedding, merge, decoder, loss) shared by both

VLMS = {
    "llava": (llava, llava.LlavaConfig.variant("tiny")),  # CLIP 4x4 patches + CLS -> 16 tokens per image
    "internvl": (internvl, internvl.InternVLConfig.variant("tiny")),  # InternViT 8x8 -> pixel shuffle -> 16
}
VLM_LAYOUTS = {"fsdp2": {"fsdp": 2}, "tp2": {"tp": 2}}


def _vlm_batch(cfg, i: int) -> dict:
    """Two rows of 38 tokens: the first holds both images of the batch, the second is text, right-padded."""
    g = torch.Generator().manual_seed(200 + i)
    text = torch.randint(3, 100, (12,), generator=g).tolist()
    img = [cfg.image_token_id] * cfg.num_image_tokens
    rows = [[1, *text[:2], *img, *text[2:4], *img, text[4]], [1, *text[5:12]]]
    t = len(rows[0])
    size = cfg.vision.image_size
    return {
        "tokens": torch.tensor([rows[0], rows[1] + [0] * (t - len(rows[1]))]),
        "attention_mask": torch.tensor([[1] * t, [1] * len(rows[1]) + [0] * (t - len(rows[1]))]),
        "loss_mask": torch.tensor([[0] * 3 + [1] * (t - 3), [1] * t]),  # no target in the first prompt words
        "pixel_values": torch.randn(2, 3, size, size, generator=g),
    }


def _train_vlm(name: str, mesh=None, rules=None):
    """3 eager steps of ``name`` from the same weights: (losses, final params). Sharded when ``mesh`` is given."""
    model, cfg = VLMS[name]
    params = model.init(random.key(0), cfg)
    if mesh is not None:
        params = shard(params, model.logical_axes(cfg), mesh, rules)
    state = TrainState.create(params, TX, random.key(1))
    step = make_train_step(lambda p, b, k: model.loss(p, cfg, b), TX, compile=False)
    losses = []
    for i in range(STEPS):
        with use_mesh(mesh, rules) if mesh is not None else contextlib.nullcontext():
            state, metrics = step(state, _vlm_batch(cfg, i))
        losses.append(_scalar(metrics["loss"]))
    return losses, state.params


def _run_vlms() -> dict:
    report: dict = {}
    for name, (model, cfg) in VLMS.items():
        rules = model.default_rules()
        for layout_name, layout in VLM_LAYOUTS.items():
            mesh = make_mesh(layout)
            losses, params = _train_vlm(name, mesh, rules)
            # a batch placed by shard_batch (tokens, masks and pixels split over the data axes) gives the same loss
            start = shard(model.init(random.key(0), cfg), model.logical_axes(cfg), mesh, rules)
            with use_mesh(mesh, rules), torch.no_grad():
                placed = _scalar(model.loss(start, cfg, shard_batch(_vlm_batch(cfg, 0))))
            report[name, layout_name] = {
                "losses": losses,
                "params": gather(params),
                "placements": {p: tuple(x.placements) for p, x in pytree.flatten_with_paths(params)[0]},
                "placed_loss": placed,
            }
    return report


@pytest.fixture(scope="module")
def vlm_reference():
    return {name: _train_vlm(name) for name in VLMS}


@pytest.fixture(scope="module")
def vlm_two(two):
    return two["llava_style"]


@pytest.mark.parametrize("layout", list(VLM_LAYOUTS))
@pytest.mark.parametrize("name", list(VLMS))
def test_llava_style_two_rank_training_matches_single_process(vlm_two, vlm_reference, name, layout):
    ref_losses, ref_params = vlm_reference[name]
    report = vlm_two[name, layout]
    assert report["losses"] == pytest.approx(ref_losses, abs=1e-5)
    assert pytree.same_structure(report["params"], ref_params)
    assert _max_err(report["params"], ref_params) < ATOL
    # every part trained (fails with a frozen or detached tower / projector): 3 steps move each by > 1e-3
    model, cfg = VLMS[name]
    start = model.init(random.key(0), cfg)
    for part in ("vision", "projector", "text"):
        assert _max_err(report["params"][part], start[part]) > 1e-3, part
    assert report["placed_loss"] == pytest.approx(ref_losses[0], abs=1e-5)


@pytest.mark.parametrize("name", list(VLMS))
def test_llava_style_weights_are_sharded(vlm_two, name):
    R, S = Replicate(), Shard
    fsdp, tp = vlm_two[name, "fsdp2"]["placements"], vlm_two[name, "tp2"]["placements"]
    # [out, in]: the "embed" dim is split over fsdp (fc1's input, fc2's output)
    assert fsdp["projector/fc1/weight"] == (S(1),) and fsdp["projector/fc2/weight"] == (S(0),)
    assert tp["projector/fc1/weight"] == tp["projector/fc1/bias"] == (S(0),)  # column parallel
    assert tp["projector/fc2/weight"] == (S(1),) and tp["projector/fc2/bias"] == (R,)  # row parallel
    assert fsdp["text/embed/weight"] == (S(1),) and tp["text/embed/weight"] == (S(0),)  # vocab parallel
    assert tp["vision/layers/0/attn/q/weight"] == (S(0),) and fsdp["vision/layers/0/attn/q/weight"] == (S(1),)
