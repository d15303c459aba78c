"""CLIP tokenizer: vocabulary, text cleaning, identity with ComfyUI's reference ids and transformers' CLIPTokenizer."""

from __future__ import annotations

import json
import statistics
import time
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import diffusion.tokenizer
from diffusion.tokenizer import VOCABULARY_SIZE, ClipTokenizer, byte_symbols, export_hf_files

# ComfyUI's token ids and weights for a few prompts (a copy of the shared reference file tokenizer_sd1.json).
COMFYUI_REFERENCE = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizer_sd1.json"

TRICKY_TEXTS = [
    "a photograph of an astronaut riding a horse",
    "Hello, World!",
    "it's they're we've I'm you'll he'd IT'S DON'T x''s 's'",
    "8k uhd, 1920x1080, 3.14159, -0.5e10",
    "café naïve résumé Ærøskøbing",
    "Ελληνικά ΑΣ ΣΑΣ",
    "中文提示词 日本語のテキスト 한국어",
    "emoji 🐱\u200d👤 🎨🖌️ 👍🏽",
    "tabs\tand\nnewlines\r\n  spaces   ",
    "\u00a0nbsp\u2009thin\u3000ideographic\u2028line",
    "<|startoftext|>a<|endoftext|>b <|endoftext|>",
    "<|STARTOFTEXT|> <|endoftext|",
    "((masterpiece)), (red:1.3), \\(escaped\\)",
    "embedding:foo, embedding:bar.pt",
    "a_b-c.d/e\\f g+h=i~j`k@l#m$n%o^p&q*r",
    "!!!???... --- ***",
    "",
    "   ",
    "ﬁ ligature, Ｆｕｌｌｗｉｄｔｈ, ①②③, ½",
    "e\u0301 A\u030a combining",
    "İstanbul ß ẞ ǅ Ǆ",
    "\x00\x01control\x7f\x1c\x85",
    "\ufeffbom a\u200bzero width",
    "a" * 300,
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "1girl, solo, long_hair, looking_at_viewer, (((best quality)))",
]


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """transformers' CLIPTokenizer built from vocab.json/merges.txt derived from our gz (no network).

    In transformers 5 ``CLIPTokenizerFast`` is ``CLIPTokenizer`` (the ``tokenizers``-backed one ComfyUI now gets);
    naming the fast class keeps the comparison meaningful if a transformers 4 install is ever used.
    """
    from transformers import CLIPTokenizerFast

    directory = tmp_path_factory.mktemp("clip_tokenizer")
    export_hf_files(directory)
    return CLIPTokenizerFast.from_pretrained(str(directory))


def reference_ids(reference, text: str) -> list[int]:
    return reference(text, add_special_tokens=False)["input_ids"]


def test_vocabulary_layout(tokenizer):
    assert len(tokenizer) == VOCABULARY_SIZE == 49408
    assert (tokenizer.bos_id, tokenizer.eos_id) == (49406, 49407)
    assert tokenizer.tokens[0] == "!" and tokenizer.tokens[256] == "!</w>"
    assert tokenizer.token_ids["a</w>"] == 320
    assert tokenizer.tokens[49405] == "jekyll</w>"  # the last merge CLIP uses
    symbols = byte_symbols()
    assert len(set(symbols)) == 256 and symbols[ord("a")] == "a" and symbols[ord(" ")] == "Ġ"


def test_known_ids(tokenizer):
    assert tokenizer.encode("a photograph of an astronaut riding a horse") == [
        320,
        8853,
        539,
        550,
        18376,
        6765,
        320,
        4558,
    ]
    assert tokenizer.encode("") == []
    assert tokenizer.encode("<|endoftext|>") == [49407]


def test_encoding_is_the_tokenizers_library_not_a_hand_written_bpe(tokenizer):
    """Issue #11: the hand-written BPE (apply_merges, pre_tokenize, normalize, a piece cache) is gone."""
    from tokenizers import Tokenizer

    assert isinstance(tokenizer.backend, Tokenizer)
    for name in ("apply_merges", "pre_tokenize", "normalize", "CLIP_PIECE", "PIECE_CACHE_LIMIT"):
        assert not hasattr(diffusion.tokenizer, name), name


def test_plain_comfyui_reference_prompt_has_the_reference_ids(tokenizer):
    """The unweighted prompt of ComfyUI's reference file: its ids between the start and end tokens."""
    text = "a photograph of an astronaut riding a horse"
    reference = [token for token, _ in json.loads(COMFYUI_REFERENCE.read_text())[text][0]]
    body = reference[1 : reference.index(tokenizer.eos_id)]
    assert tokenizer.encode(text) == body


def test_text_is_cleaned_and_lowercased_per_character(tokenizer):
    assert tokenizer.encode("ΑΣ") == tokenizer.encode("ασ")  # no final-sigma rule, as the Rust tokenizer does it
    assert tokenizer.encode("A\t\n B\u3000C") == tokenizer.encode("a b c")
    assert tokenizer.encode("e\u0301") == tokenizer.encode("é")
    assert tokenizer.encode("it's 8k, ok!!") == tokenizer.encode("it 's 8 k , ok !!")


def test_decode_round_trips_words(tokenizer):
    assert tokenizer.decode(tokenizer.encode("a café in Zürich")) == "a café in zürich"
    assert tokenizer.decode([49406, 320, 49407]) == "<|startoftext|>a <|endoftext|>"


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_tricky_texts_match_transformers(tokenizer, reference, text):
    assert tokenizer.encode(text) == reference_ids(reference, text)


def same_nfc_in_both_libraries(text: str) -> bool:
    """Python's unicodedata and the ``tokenizers`` crate disagree on the combining class of ~50 recent marks."""
    from tokenizers import normalizers

    return normalizers.NFC().normalize_str(text) == unicodedata.normalize("NFC", text)


# Characters assigned in this Python's Unicode database: for newer ones, letter/number classes and case mappings
# depend on each library's Unicode version.
ASSIGNED_CHARACTERS = st.characters(exclude_categories=("Cs", "Cn"))
PROMPT_CHARACTERS = st.sampled_from(list("aAbBzZ019 ,.!?'()[]{}:;\\<|>_-\n\t\r\"sStTdDmMlLvVréΣς中文🙂\u0301\u00a0"))
PROMPT_PIECES = st.sampled_from(
    [
        "<|startoftext|>",
        "<|endoftext|>",
        "<|EndOfText|>",
        "'s",
        "'LL",
        "'Re",
        "hello",
        "ΑΣ",
        "1.5",
        " ",
        "\n",
        "(",
        ":1.2)",
        "ǅ",
    ]
)
TEXTS = st.one_of(
    st.text(alphabet=ASSIGNED_CHARACTERS, max_size=40),
    st.text(alphabet=PROMPT_CHARACTERS, max_size=60),
    st.lists(PROMPT_PIECES, max_size=12).map("".join),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
def test_generated_texts_match_transformers(tokenizer, reference, text):
    assume(same_nfc_in_both_libraries(text))
    assert tokenizer.encode(text) == reference_ids(reference, text)


def test_75_token_prompt_is_fast(tokenizer):
    prompt = (
        "masterpiece, best quality, a highly detailed photograph of an astronaut riding a white horse on mars, "
        "dramatic lighting, 8k, sharp focus, intricate details, cinematic composition, volumetric fog, trending "
        "on artstation, by greg rutkowski and alphonse mucha, golden hour, bokeh, 35mm"
    )
    assert 60 <= len(tokenizer.encode(prompt)) <= 75
    timings = []
    for _ in range(200):
        start = time.perf_counter()
        tokenizer.encode(prompt)
        timings.append(time.perf_counter() - start)
    assert statistics.median(timings) < 0.5e-3
