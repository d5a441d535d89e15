import pytest
import torch

from functional_mm import random
from functional_mm.data import text


def test_corpus_is_deterministic_and_splits_differ():
    assert text.synthetic_corpus(0, 5) == text.synthetic_corpus(0, 5)
    assert text.synthetic_corpus(0, 5) != text.synthetic_corpus(1, 5)


def test_byte_tokenizer_roundtrip_and_specials():
    tok = text.ByteTokenizer()
    ids = tok.encode("naïve 1 + 2 = 3.", bos=True, eos=True)
    assert ids[0] == tok.bos and ids[-1] == tok.eos and max(ids) < tok.vocab_size
    assert tok.decode(ids) == "naïve 1 + 2 = 3."


def test_random_windows_are_keyed_crops_of_the_stream():
    stream = text.token_stream(text.synthetic_corpus(0, 20), text.ByteTokenizer())
    a = text.random_windows(random.key(3), stream, 4, 32)["tokens"]
    assert a.shape == (4, 32) and torch.equal(a, text.random_windows(random.key(3), stream, 4, 32)["tokens"])
    for row in a:  # every row is a contiguous slice of the stream
        starts = (stream.unfold(0, 32, 1) == row).all(-1).nonzero()
        assert len(starts) >= 1
    with pytest.raises(ValueError, match="too short"):
        text.random_windows(random.key(0), stream[:10], 1, 32)
