"""Our CLIP BPE tokenizer against two independent references: open_clip's copy of OpenAI's tokenizer
(same clean-up, pads with 0) and transformers' CLIPTokenizer loaded from the files we write."""
import pickle

import pytest
import torch

from models.tokenizer import CLIPTokenizer, clean_text, default_vocab_path

BOS, EOS = 49406, 49407

# Captions that need no clean-up: transformers' tokenizer (NFC only, no ftfy/html) agrees on these.
PLAIN = [
    "a photo of a cat",
    "A painting of a fox sitting in a field at sunrise, trending on artstation",
    "portrait of an old man, oil on canvas, highly detailed, 8k",
    "it's a dog's life, don't you think? I'LL be there; we've been",
    "red-white-and-blue bunting on a porch (summer 2019)",
    "1920x1080 wallpaper of mountains #nature @home",
    "price: $1,234.56 - 50% off!!!",
    "naïve résumé of a café in Zürich",
    "Москва зимой, фотография",
    "東京タワーの夜景",
    "서울의 밤",
    "हिन्दी में लिखा हुआ वाक्य",
    "مدينة على البحر",
    "3D render of a robot, unreal engine 5, octane",
    "cats_and_dogs.jpg",
    "http://example.com/image?id=42&size=large",
    "UPPER CASE CAPTION WITH MIXED Case words",
    "the quick brown fox jumps over the lazy dog " * 3,
    "a",
    "!",
    "Ω≈ç√∫ µ≤≥÷",
    "x",
    "!~ and !\"# start with token 0",
]

# Captions that exercise CLIP's clean-up (ftfy, double html.unescape, whitespace) and truncation.
NEEDS_CLEANUP = [
    "“curly double quotes” and ‘curly single quotes’",
    "it’s the artist’s best work",
    "Tom &amp; Jerry",
    "Tom &amp;amp; Jerry (double escaped)",
    "&quot;quoted&quot; and &#39;apostrophe&#39; and &lt;tag&gt;",
    "cafÃ© and naÃ¯ve (mojibake)",
    "â€œmojibake quotesâ€\x9d",
    "emoji 😀🐱‍👤🇺🇸 party 🎉",
    "👩‍👩‍👧‍👦 family",
    "   leading and trailing spaces   ",
    "line one\nline two\r\nline three\ttabbed",
    "multiple     internal      spaces",
    "",
    "   ",
    "\n\n",
    "non\u00a0breaking\u2003spaces",
    "ﬁne ligature and full-width ＡＢＣ１２３",
    "zero\u200bwidth\u200bspace",
    "control\x00chars\x07here",
    "word " * 100,  # truncated to 75 tokens
    "supercalifragilisticexpialidocious " * 30,
    "0123456789" * 20,  # each digit is its own token
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et "
    "dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip.",
]


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


def _open_clip_ids(captions):
    open_clip = pytest.importorskip("open_clip")
    ref = open_clip.tokenize(captions)
    # open_clip pads with 0, SD v1 with EOS. Id 0 is also a real token ('!'), so only the zeros after
    # the (first) EOS are padding.
    for row in ref:
        row[row.tolist().index(EOS) + 1:] = EOS
    return ref


def test_vocab_layout(tok):
    assert tok.vocab_size == 49408
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (BOS, EOS, EOS)
    assert default_vocab_path().name == "bpe_simple_vocab_16e6.txt.gz"
    assert CLIPTokenizer(default_vocab_path()).encoder == tok.encoder  # explicit path works too


def test_matches_open_clip(tok):
    captions = PLAIN + NEEDS_CLEANUP
    assert len(captions) >= 40
    ours = tok(captions)
    assert ours.shape == (len(captions), 77) and ours.dtype == torch.long
    ref = _open_clip_ids(captions)
    for i, caption in enumerate(captions):
        assert ours[i].tolist() == ref[i].tolist(), f"caption {i}: {caption!r}"


def test_token_zero_is_not_padding(tok):
    # Id 0 is the symbol '!' (e.g. in '!~'); it must survive, and padding is EOS only.
    ids = tok("!~")[0].tolist()
    assert ids[:4] == [BOS, 0, 349, EOS] and ids[4:] == [EOS] * 73


def test_framing_and_truncation(tok):
    assert tok("")[0].tolist() == [BOS] + [EOS] * 76
    long = tok("word " * 100)[0].tolist()
    assert long[0] == BOS and long[-1] == EOS and len(tok.encode("word " * 100)) == 100
    assert long[1:76] == tok.encode("word " * 100)[:75]
    assert tok("a cat", context_length=10).shape == (1, 10)
    assert tok(["a", "b"]).shape == (2, 77)


def test_cleanup(tok):
    assert clean_text("  Tom &amp;amp; Jerry\n\tCafÃ©  ") == "tom & jerry café"
    assert tok.encode("“Hello”") == tok.encode('"hello"')


def test_decode(tok):
    assert tok.decode(tok("a photo of a cat")[0]) == "a photo of a cat"
    assert tok.decode(tok.encode("naïve café 東京")) == "naïve café 東京"
    assert tok.decode([BOS, 320, EOS], skip_special_tokens=False) == "<|startoftext|> a <|endoftext|>"


def test_cache_and_pickle(tok):
    first = tok.encode("an unusual wordthatisnotinthevocab")
    assert tok.encode("an unusual wordthatisnotinthevocab") == first
    # DataLoader workers started with spawn get a pickled copy.
    assert pickle.loads(pickle.dumps(tok)).encode("an unusual wordthatisnotinthevocab") == first


def test_transformers_tokenizer_from_written_files(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.write_hf_files(tmp_path)
    hf = transformers.CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert hf.model_max_length == 77 and hf.pad_token == "<|endoftext|>" and len(hf) == 49408
    # A literal special token in the text stays one token in both (as in OpenAI's tokenizer).
    captions = PLAIN + ["a cat <|endoftext|> a dog"]
    ref = hf(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ours = tok(captions)
    for i, caption in enumerate(captions):
        assert ours[i].tolist() == ref[i].tolist(), f"caption {i}: {caption!r}"
