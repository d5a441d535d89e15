"""Generate text from a trained model, streaming it as it comes::

    python -m functional_mm.generate --config configs/llava.py:tiny --checkpoint runs/llava_tiny \\
        --image shape.png [--prompt "..."] [--temperature 0.8 --top_k 20 --top_p 0.9 --seed 0]

``--checkpoint``: one of our workdirs (newest checkpoint; LoRA runs come back merged) or a Hugging Face
directory. ``--config`` is the run's config (same overrides as training). With ``--image`` (VLM families)
the prompt is ``<bos> <image placeholders> PROMPT``, the layout the captioning task trains; without, it is
``<bos> PROMPT``. Greedy unless ``--temperature`` > 0. Text is printed token by token.
"""

from __future__ import annotations

import codecs
import sys

import torch
from absl import app, flags
from ml_collections import config_flags

from functional_mm import random
from functional_mm.data import image as image_lib
from functional_mm.data import text
from functional_mm.train import loop, tasks


def generate(
    c, checkpoint: str, prompt: str = "", image: str | None = None, *, stream=None, **sampling
) -> str:
    """The completion of ``prompt`` (after ``image``) by the model in ``checkpoint``; each new piece of text is
    also written to ``stream`` as soon as its token is chosen. ``sampling``: ``max_new_tokens``,
    ``temperature``, ``top_k``, ``top_p``, ``key``."""
    run, params = loop.load_for_inference(c, checkpoint)
    family, cfg = run.family, run.model_cfg
    tok = text.ByteTokenizer(special_tokens=family.special_tokens)
    if image is not None:
        if family.image_inputs is None:
            raise ValueError(f"--image: the {family.name!r} family reads no images")
        inputs, ids = tasks.vlm_prompt(family, cfg, tok, image_lib.load_image(image), prompt)
    else:
        inputs, ids = {}, tok.encode(prompt, bos=True)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = []

    def on_token(new: torch.Tensor) -> None:  # new: [1]
        t = int(new[0])
        piece = decoder.decode(bytes([t])) if t < 256 else ""
        pieces.append(piece)
        if stream is not None and piece:
            stream.write(piece)
            stream.flush()

    with torch.no_grad():
        family.generate(
            params, cfg, torch.tensor([ids]), inputs, stop_tokens=(tok.eos,), pad_token=tok.pad,
            on_token=on_token, **sampling,
        )  # fmt: skip
    return "".join(pieces) + decoder.decode(b"", final=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    if f.config is None or f.checkpoint is None:
        raise app.UsageError("--config and --checkpoint are required")
    sampling = dict(max_new_tokens=f.max_new_tokens, temperature=f.temperature, top_k=f.top_k, top_p=f.top_p)
    if f.temperature > 0:
        sampling["key"] = random.key(f.seed)
    generate(f.config, f.checkpoint, f.prompt, f.image, stream=sys.stdout, **sampling)
    print()


def _define_flags():
    # Only when run as a binary: importing this module (tests, notebooks) defines no flags.
    config_flags.DEFINE_config_file("config", None, "The run's config file, e.g. configs/llava.py:tiny.")
    flags.DEFINE_string("checkpoint", None, "A workdir of ours or a Hugging Face directory.")
    flags.DEFINE_string("image", None, "An image file (VLM families).")
    flags.DEFINE_string("prompt", "", "Text after the image (or the whole prompt for a text model).")
    flags.DEFINE_integer("max_new_tokens", 64, "Upper bound on generated tokens.")
    flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sample.")
    flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens.")
    flags.DEFINE_float("top_p", None, "Sample among the smallest set holding this much probability.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
