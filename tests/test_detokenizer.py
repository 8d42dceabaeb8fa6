"""Incremental detokenization (engine/detokenizer.py): with SmolLM2's real tokenizer the text grown one
token at a time is, at every step, the full decode of the tokens so far (less the piece of a token
that ends in an incomplete UTF-8 character, held back), and the finished text is exactly the full
decode. Tokenizers whose decode cleans up spaces across tokens, and slow ones, decode in full."""

import copy
import random

import pytest
from transformers import AutoTokenizer

from loraserve.demo.canary import smollm2_gguf
from loraserve.engine.detokenizer import Detokenizer
from tiny_models import IdTokenizer

REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def tokenizer():
    gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def outputs(tokenizer) -> list[list[int]]:
    rng = random.Random(0)
    text = "Hello, world! Ünïcödé 日本語 🙂 café . , 's  two  spaces\n\tnew line"
    real = tokenizer.encode(text)
    special = [tokenizer.eos_token_id, tokenizer.bos_token_id]
    return ([real, real + special + real[:5]]
            + [[rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 60))] for _ in range(100)])


def grow(detok: Detokenizer, prompt: list[int], out: list[int]) -> list[str]:
    ids, texts = list(prompt), []
    for token in out:
        ids.append(token)
        texts.append(detok.add(ids, len(prompt)))
    return texts


def test_streamed_text_is_the_full_decode_at_every_step(tokenizer):
    assert Detokenizer(tokenizer)._stream is not None          # the fast path is the one under test
    prompt = tokenizer.encode("A prompt that must not show up")
    for out in outputs(tokenizer):
        detok = Detokenizer(tokenizer)
        for n, text in enumerate(grow(detok, prompt, out), start=1):
            full = tokenizer.decode(out[:n], skip_special_tokens=True)
            held = full[len(text):]      # a token whose piece ends in an incomplete character waits whole
            assert full.startswith(text) and (held == "" or REPLACEMENT in held), (out[:n], text, full)
        assert detok.final(out) == tokenizer.decode(out, skip_special_tokens=True)


def test_a_split_character_is_held_back_until_complete(tokenizer):
    ids = tokenizer.encode("日本語🙂")
    detok = Detokenizer(tokenizer)
    texts = grow(detok, [], ids)
    assert REPLACEMENT not in "".join(texts)
    assert texts[-1] == "日本語🙂"


def test_tokenizers_that_clean_up_spaces_and_slow_ones_decode_in_full(tokenizer):
    cleaning = copy.deepcopy(tokenizer)
    cleaning.clean_up_tokenization_spaces = True
    ids = tokenizer.encode("Hello , world . It 's here")
    detok = Detokenizer(cleaning)
    assert detok._stream is None
    assert grow(detok, [], ids)[-1] == cleaning.decode(ids, skip_special_tokens=True)
    slow = Detokenizer(IdTokenizer())
    assert slow._stream is None and grow(slow, [7], [1, 2])[-1] == " 1 2"
