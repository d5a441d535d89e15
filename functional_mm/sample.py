"""Sample images from a trained text-to-image model (SD3 / Flux families)::

    python -m functional_mm.sample --config configs/sd3.py:tiny --checkpoint runs/sd3_tiny \\
        --prompt "a red circle" --prompt "a blue square" --num_per_prompt 4 --out grid.png

``--checkpoint``: one of our workdirs (newest checkpoint). Writes one PNG grid (a row per prompt, a column
per seed) to ``--out``; ``--steps`` Euler steps with classifier-free guidance ``--guidance``.
"""

from __future__ import annotations

import os

import torch
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from functional_mm import random
from functional_mm.data import text
from functional_mm.models import t2i
from functional_mm.train import loop, tasks


def sample(c, checkpoint: str, prompts: list[str], *, num_per_prompt: int = 4, steps: int = 20,
           guidance: float = 3.0, seed: int = 0, out: str = "samples.png") -> torch.Tensor:  # fmt: skip
    """Sample ``num_per_prompt`` images per prompt, write the grid to ``out``; returns uint8 ``[N, H, W, 3]``
    in prompt-major order."""
    run, params = loop.load_for_inference(c, checkpoint)
    if run.family.inputs != "text_to_image":
        raise ValueError(f"--config: the {run.family.name!r} family does not generate images")
    if run.model_cfg.text is None:
        raise ValueError(
            f"{c.model.variant}: conditioned on precomputed features; sampling needs its text encoders"
        )
    tok = text.ByteTokenizer()
    rows = []
    for p in tqdm(prompts, desc="sampling", unit="prompt"):
        ids = tasks.encode_prompts(tok, run.model_cfg, [p] * num_per_prompt)
        key = random.fold_in(random.key(seed), len(rows))
        img = t2i.sample(params, run.model_cfg, ids, key=key, num_steps=steps, guidance_scale=guidance)
        rows.append(torch.from_numpy(tasks.to_uint8(img)))
    images = torch.cat(rows).numpy()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tasks.write_grid(images, out, cols=num_per_prompt)
    print(f"wrote {len(images)} images to {out}")
    return images


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if flags.FLAGS.config is None or flags.FLAGS.checkpoint is None or not flags.FLAGS.prompt:
        raise app.UsageError("--config, --checkpoint and at least one --prompt are required")
    f = flags.FLAGS
    sample(
        f.config, f.checkpoint, f.prompt, num_per_prompt=f.num_per_prompt, steps=f.steps, guidance=f.guidance,
        seed=f.seed, out=f.out,
    )  # fmt: skip


def _define_flags():
    # Only when run as a binary: importing this module (tests, notebooks) defines no flags.
    config_flags.DEFINE_config_file("config", None, "The run's config file, e.g. configs/sd3.py:tiny.")
    flags.DEFINE_string("checkpoint", None, "A workdir of ours.")
    flags.DEFINE_multi_string("prompt", None, "A prompt (repeat the flag for several).")
    flags.DEFINE_integer("num_per_prompt", 4, "Images per prompt (seeds seed, seed + 1, ...).")
    flags.DEFINE_integer("steps", 20, "Euler steps.")
    flags.DEFINE_float("guidance", 3.0, "Classifier-free guidance scale (1: none).")
    flags.DEFINE_integer("seed", 0, "Noise seed.")
    flags.DEFINE_string("out", "samples.png", "Output PNG (a grid).")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
