import json

import pytest
import torch

from functional_mm.data import chat, load_tokenizer
from functional_mm.data.text import ByteTokenizer

SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The chat template published with Qwen2-VL-*-Instruct (tokenizer_config.json), verbatim.
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The same ChatML layout with HF's {% generation %} markers on the assistant replies (for the assistant mask);
# the newline after a reply is an expression because HF renders with trim_blocks (a literal one would vanish).
CHATML_GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% if message['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}{{ message['content'] }}<|im_end|>"
    "{% endgeneration %}{{ '\\n' }}{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
)

CONVERSATIONS = [
    [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ],
    [
        {"role": "system", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "image"}],
        },
        {"role": "assistant", "content": "the left one is blue"},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "and this?"}]},
    ],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer trained here and saved as a HF tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "You are a helpful assistant.",
        "What colour is the circle?",
        "the left one is blue",
        "user assistant system",
    ]
    tok.train_from_iterator(
        corpus * 20,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.save(str(d / "tokenizer.json"))
    cfg = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": QWEN2_VL_TEMPLATE}
    (d / "tokenizer_config.json").write_text(
        json.dumps({**cfg, "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    return str(d)


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("gen", [False, True])
def test_render_and_ids_equal_transformers_qwen2_vl(tok_dir, conv, gen):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    n_img = sum(
        p.get("type") == "image" for m in conv if not isinstance(m["content"], str) for p in m["content"]
    )
    n_vid = sum(
        p.get("type") == "video" for m in conv if not isinstance(m["content"], str) for p in m["content"]
    )
    text = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    runs = chat.render(
        chat.CHATML, conv, image_tokens=[1] * n_img, video_tokens=[1] * n_vid, add_generation_prompt=gen
    )
    assert "".join(t for t, _ in runs) == text
    # Placeholder expansion as Qwen2VLProcessor does it: each pad repeated grid.prod() // merge**2 times.
    counts = [3, 5][:n_img]
    expanded = text
    for n in counts:
        expanded = expanded.replace("<|image_pad|>", "<|placeholder|>" * n, 1)
    expanded = expanded.replace("<|placeholder|>", "<|image_pad|>").replace(
        "<|video_pad|>", "<|video_pad|>" * 4
    )
    ours = chat.encode_conversation(
        load_tokenizer(tok_dir),
        chat.CHATML,
        conv,
        image_tokens=counts,
        video_tokens=[4] * n_vid,
        add_generation_prompt=gen,
    )
    assert ours["tokens"].tolist() == hf(expanded, add_special_tokens=False)["input_ids"]


def test_loss_mask_equals_transformers_assistant_mask(tok_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    conv = [
        {"role": "user", "content": "What colour is the circle?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "and the left one?"},
        {"role": "assistant", "content": "the left one is blue"},
    ]
    ref = hf.apply_chat_template(
        conv,
        chat_template=CHATML_GENERATION_TEMPLATE,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ours = chat.encode_conversation(load_tokenizer(tok_dir), chat.CHATML, conv)
    assert ours["tokens"].tolist() == ref["input_ids"]
    assert ours["loss_mask"].tolist() == ref["assistant_masks"]


def test_byte_tokenizer_chatml_masks_only_replies_and_expands_images():
    tok = ByteTokenizer(special_tokens=chat.CHATML.special_tokens)
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a cat"}]
    out = chat.encode_conversation(tok, chat.CHATML, conv, image_tokens=[7])
    pad = tok.token_to_id("<|image_pad|>")
    assert int((out["tokens"] == pad).sum()) == 7
    assert tok.decode(out["tokens"][out["loss_mask"].bool()]) == "a cat<|im_end|>"
    assert out["loss_mask"][-1] == 0  # the trailing newline after <|im_end|> is not a target
    assert tok.decode(out["tokens"]).startswith("<|im_start|>system\nYou are a helpful assistant.")


def test_plain_template_bos_caption_eos():
    tok = ByteTokenizer(special_tokens=chat.PLAIN.special_tokens)
    conv = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a red circle"}]
    out = chat.encode_conversation(tok, chat.PLAIN, conv, image_tokens=[3])
    ids = out["tokens"].tolist()
    assert ids[0] == tok.bos and ids[-1] == tok.eos and ids[1:4] == [tok.token_to_id("<image>")] * 3
    labelled = out["tokens"][out["loss_mask"].bool()]
    assert tok.decode(labelled) == "a red circle" and labelled[-1] == tok.eos


def test_internvl_template_and_errors():
    tok = ByteTokenizer(special_tokens=chat.INTERNVL.special_tokens)
    conv = [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "yo"}]
    out = chat.encode_conversation(tok, chat.INTERNVL, conv, image_tokens=[2])
    assert "<img><IMG_CONTEXT><IMG_CONTEXT></img>\nhi" in tok.decode(out["tokens"])
    with pytest.raises(ValueError, match="more image placeholders"):
        chat.encode_conversation(tok, chat.INTERNVL, conv)
    with pytest.raises(ValueError, match="2 image token counts"):
        chat.encode_conversation(tok, chat.INTERNVL, conv, image_tokens=[2, 2])
    with pytest.raises(ValueError, match="unknown chat role"):
        chat.encode_conversation(tok, chat.INTERNVL, [{"role": "robot", "content": "x"}])
    assert out["tokens"].dtype == torch.int64


def test_hf_tokenizer_wrapper(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert (
        tok.eos == tok.token_to_id("<|im_end|>")
        and tok.pad == tok.token_to_id("<|endoftext|>")
        and tok.bos is None
    )
    assert tok.decode(tok.encode("the left one is blue")) == "the left one is blue"
    assert tok.encode("hi", eos=True)[-1] == tok.eos
    with pytest.raises(ValueError, match="no bos"):
        tok.encode("hi", bos=True)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tok_dir + "/nope")
