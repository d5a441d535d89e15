"""LoRA: adapters train while the base stays put; PEFT export and merged HF export load in transformers."""

import pytest
import torch
import transformers

from functional_mm import lora, optim, pytree, random
from functional_mm.models import llama
from functional_mm.models.hf import llama as hf_llama
from functional_mm.train import TrainState, make_train_step

CFG = llama.LlamaConfig.variant(
    "tiny", vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64
)
LORA = lora.LoraConfig(rank=4, alpha=8.0, targets=(r"attn/(q|v)/weight$", r"mlp/down/weight$"))


def _setup():
    base = llama.init(random.key(0), CFG)
    adapters = lora.init(random.key(1), base, LORA)
    return base, adapters


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
    adapters = pytree.map_with_path(
        lambda p, x: (
            random.normal(random.fold_in(random.key(5), len(p)), x.shape) * 0.1 if p.endswith("/b") else x
        ),
        adapters,
    )
    tokens = random.randint(random.key(4), (2, 10), 0, 64)
    ours = llama.apply(lora.merge(base, adapters, LORA), CFG, tokens)

    hf_llama.save_pretrained(base, CFG, tmp_path / "base")
    lora.save_peft(adapters, LORA, tmp_path / "adapter", hf_llama.hf_name)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
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
