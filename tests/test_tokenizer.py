"""ClipTokenizer against the two references it must equal: OpenAI's simple_tokenizer.py and open_clip's
tokenizer.py. Both are loaded by file path: `import clip` / `import open_clip` would import torchvision,
which cannot import here."""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import random
import string
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from clip_model.tokenizer import (
    DEFAULT_OPENAI_BPE,
    EOT,
    EOW,
    OPENAI_NUM_MERGES,
    SOT,
    _FTFY_INVARIANT,
    ClipTokenizer,
    bytes_to_unicode,
    clean_text,
    pre_tokenize,
)


def load_reference(package: str, filename: str) -> ModuleType:
    """Execute one standalone file of an installed package without running the package's __init__."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"reference package {package!r} is not installed (pip install --no-deps openai-clip "
                    "open_clip_torch)")
    path = Path(spec.submodule_search_locations[0]) / filename
    module_spec = importlib.util.spec_from_file_location(f"_reference_{package}_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def openai_ref():
    return load_reference("clip", "simple_tokenizer.py").SimpleTokenizer()


@pytest.fixture(scope="module")
def open_clip_module() -> ModuleType:
    return load_reference("open_clip", "tokenizer.py")


@pytest.fixture(scope="module")
def open_clip_ref(open_clip_module: ModuleType):
    return open_clip_module.SimpleTokenizer()


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return ClipTokenizer.from_openai_bpe()


# --- a caption corpus that hits every cleaning and splitting corner --------------------------

SUBJECTS = ["a dog", "Two cats", "the Eiffel Tower", "A RED car", "my grandmother's kitchen", "an astronaut",
            "a bowl of phở", "Zürich at night", "a 1960s Ford Mustang", "children's books"]
ACTIONS = ["sitting on", "running through", "photographed near", "next to", "painted above", "under"]
PLACES = ["the beach", "a snowy forest", "Tokyo's Shibuya crossing", "São Paulo", "the café", "Mount Fuji (富士山)"]
SPECIAL_CASES = [
    "", " ", "\t\n\r ", "A photo of a cat.",
    # accents and scripts
    "Café crème brûlée, naïve façade, Ångström, İstanbul, ǅemal", "Ελληνικά γράμματα και Русский текст",
    "東京タワーの夜景", "北京烤鸭 和 上海小笼包", "한국어 문장입니다", "ภาษาไทย", "עברית וערבית العربية", "हिन्दी देवनागरी",
    # emoji: plain, skin tone, ZWJ family, flags, keycaps
    "🐱🐶 cute!!", "👍🏽 thumbs up", "👨‍👩‍👧‍👦 family", "🇯🇵🇫🇷 flags", "#️⃣ 1️⃣ keycap", "✔ done ❤️",
    # HTML entities, one to three times escaped (ftfy unescapes once unless the text has a "<", then
    # OpenAI twice more), numeric, invalid
    "Tom &amp; Jerry", "fish &amp;amp; chips", "&lt;b&gt;bold&lt;/b&gt;", "it&#39;s &quot;quoted&quot;",
    "non&nbsp;breaking", "&#x2019;curly&#x2019;", "&amp;#28;control", "&#0;zero &#xD800;surrogate", "&bogus; &amp",
    "<b>tag with &amp; kept</b>", "<i>salt &amp;amp; pepper</i>", "triple &amp;amp;amp;lt; escaped", "5 &lt; 6 &amp;&amp; 7 &gt; 3",
    # mojibake ftfy repairs
    "cafÃ©", "itâ€™s a trap", "Ã¼ber cool", "â€œsmart quotesâ€\x9d", "ÐŸÑ€Ð¸Ð²ÐµÑ‚", "The Mona Lisa doesnÃ¢â‚¬â„¢t",
    # weird whitespace and control characters
    "tab\tseparated\tcaption", "line\nbreaks\n\nhere", "windows\r\nline", "nbsp\u00a0space", "em\u2003space",
    "ideographic\u3000space", "zero\u200bwidth", "line\u2028separator", "next\x85line", "vertical\x0btab",
    "file\x1cgroup\x1drecord\x1eunit\x1fseparators", "nul\x00byte", "\x1b[31mred terminal\x1b[0m", "bell\x07",
    "   leading and trailing   ", "lone \ud800 surrogate", "paired \ud83d\ude00 surrogates",
    # case folding corners: long s under IGNORECASE, Kelvin sign, ligatures, full width
    "it'ſ here", "IT'S HERE", "we'LL see", "5\u212a resolution", "ﬁne ﬂour", "ＬＯＵＤ　ＮＯＩＳＥＳ",
    # numbers and punctuation
    "1,234.56 $9.99 3:45pm 50% off", "#hashtag @user http://example.com/a?b=c&d=e", "don't can't won't I'm you're",
    "...!!!???", "c++ e-mail x_y a/b", "١٢٣ ٤٥٦ arabic digits", "①②③ ⅷ ½", "2023-01-01T12:00:00Z", "'''",
    # very long: far past 77 tokens, so truncation runs
    " ".join(["a very long caption about many things"] * 30),
    "supercalifragilisticexpialidocious" * 20, "🐱" * 200, "東" * 300, "!" * 500,
]


def make_corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = list(SPECIAL_CASES)
    spice = [c for c in SPECIAL_CASES if 0 < len(c) < 80]
    while len(out) < n:
        caption = f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(PLACES)}"
        r = rng.random()
        if r < 0.3:
            caption = f"{caption} {rng.choice(spice)}"
        elif r < 0.4:
            caption = caption.upper()
        elif r < 0.5:
            caption = "".join(chr(rng.randrange(0x20, 0x3100)) for _ in range(rng.randrange(1, 40)))
        elif r < 0.55:
            caption = " ".join([caption] * rng.randrange(8, 20))
        out.append(caption)
    return out


CORPUS = make_corpus(600)


def test_corpus_exercises_the_hard_parts(tok: ClipTokenizer) -> None:
    lengths = [len(tok.encode(c)) for c in CORPUS]
    assert sum(n > 75 for n in lengths) >= 10, "truncation must be exercised"
    assert lengths.count(0) >= 2, "empty results must be exercised"
    assert sum(not _FTFY_INVARIANT.fullmatch(c) for c in CORPUS) >= 100, "the ftfy path must be exercised"
    assert sum(clean_text(c) != " ".join(c.split()).lower() for c in CORPUS) >= 30, "cleaning must change some"


# --- parity ----------------------------------------------------------------------------------

def test_openai_vocab_layout(tok: ClipTokenizer, open_clip_ref) -> None:
    assert (tok.vocab_size, tok.sot_token_id, tok.eot_token_id) == (49408, 49406, 49407)
    assert len(tok.merges) == OPENAI_NUM_MERGES
    assert [tok.decode([i]) for i in range(tok.vocab_size)] == [
        open_clip_ref.decode([i]) for i in range(open_clip_ref.vocab_size)
    ]


def test_encode_matches_openai(tok: ClipTokenizer, openai_ref) -> None:
    mismatches = [(c, tok.encode(c), openai_ref.encode(c)) for c in CORPUS if tok.encode(c) != openai_ref.encode(c)]
    assert not mismatches, mismatches[:3]


@pytest.mark.parametrize("context_length", [77, 16, 2])
def test_call_matches_open_clip(tok: ClipTokenizer, open_clip_ref, context_length: int) -> None:
    ours = tok(CORPUS, context_length=context_length)
    ref = open_clip_ref(CORPUS, context_length=context_length)
    assert ours.dtype == torch.long and ours.shape == (len(CORPUS), context_length)
    bad = [CORPUS[i] for i in range(len(CORPUS)) if not torch.equal(ours[i], ref[i])]
    assert not bad, bad[:3]
    # The NumPy form (what the training loaders use, without torch) holds the same ids, and decodes alike.
    arr = tok.token_array(CORPUS, context_length=context_length)
    assert arr.dtype == np.int64 and np.array_equal(arr, ref.numpy())
    assert tok.decode(arr[1]) == tok.decode(ours[1]) == tok.decode(ours[1].tolist())


def test_call_matches_openai_sot_eot_layout(tok: ClipTokenizer, openai_ref) -> None:
    text = "a diagram"
    row = tok(text)[0]
    ids = [49406, *openai_ref.encode(text), 49407]
    assert row[: len(ids)].tolist() == ids and not row[len(ids):].any()
    long_text = " ".join(["a very long caption about many things"] * 30)
    long_row = tok(long_text)[0]
    assert long_row[0] == tok.sot_token_id and long_row[-1] == tok.eot_token_id
    assert long_row[1:-1].tolist() == openai_ref.encode(long_text)[:75]


def test_special_token_literals_follow_open_clip(tok: ClipTokenizer, open_clip_ref) -> None:
    # "<ſtart_of_text>" matches the special alternative under IGNORECASE and stays one (non-special) word.
    texts = ["before <start_of_text> after", "x<END_OF_TEXT>y", "<end_of_text>", "!<start_of_text>",
             "<start_of_text >", "<ſtart_of_text>", "<|startoftext|>"]
    assert torch.equal(tok(texts), open_clip_ref(texts))
    assert tok.encode("<end_of_text>") == [tok.eot_token_id]


def test_ascii_fast_path_equals_ftfy(open_clip_module: ModuleType) -> None:
    """The skip-ftfy shortcut must not change the cleaned text on anything it accepts."""
    rng = random.Random(1)
    alphabet = string.printable + "\r\r\n&;#"
    samples = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60))) for _ in range(3000)]
    samples += ["&amp;", "a\r\nb", "\x0bx", "\x1b[0m", "&#39;"]
    fast = 0
    for s in samples:
        assert clean_text(s) == open_clip_module._clean_lower(s), repr(s)
        fast += bool(_FTFY_INVARIANT.fullmatch(s))
    assert 100 < fast < len(samples), "both paths must be covered"


# --- persistence, pickling, threads ----------------------------------------------------------

def test_save_load_roundtrip_openai(tok: ClipTokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tok.json"
    tok.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]
    loaded = ClipTokenizer.load(path)
    assert loaded.merges == tok.merges and loaded.vocab_size == tok.vocab_size
    assert torch.equal(loaded(CORPUS), tok(CORPUS))


def test_pickle_roundtrip(tok: ClipTokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.context_length == tok.context_length
    assert torch.equal(clone(CORPUS), tok(CORPUS))


def test_threads_give_serial_results(tok: ClipTokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cold tokenizer, four threads, a word memo capped small so hits, fills and overflow all race."""
    expected = tok(CORPUS)
    monkeypatch.setattr("clip_model.tokenizer.WORD_CACHE_SIZE", 300)
    cold = pickle.loads(pickle.dumps(tok))
    chunks = [CORPUS[i::8] for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(cold, chunks * 3))
    for i, got in enumerate(results):
        assert torch.equal(got, expected[i % 8::8])
    assert len(cold._word_cache) == 300


# --- training --------------------------------------------------------------------------------

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sta", "pho", "gra", "ble", "tion", "ing", "ed", "qu", "zy", "ör", "é"]
LEXICON = ["".join(random.Random(i).choices(SYLLABLES, k=1 + i % 4)) for i in range(400)]


def training_corpus(n: int = 2000, seed: int = 2) -> list[str]:
    """Captions over a 400-word made-up lexicon with Zipf-like word frequencies (like real captions)."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(len(LEXICON))]
    return [f"{rng.choice(SUBJECTS)} {' '.join(rng.choices(LEXICON, weights, k=rng.randrange(3, 12)))}, "
            f"{rng.choice(ACTIONS)} {rng.choice(PLACES)}" for _ in range(n)]


@pytest.fixture(scope="module")
def trained() -> ClipTokenizer:
    return ClipTokenizer.train(training_corpus(), num_merges=300)


def write_openai_bpe(merges: list[tuple[str, str]], path: Path) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(["#version: 0.2", *(f"{a} {b}" for a, b in merges)]))
    return path


def test_trained_vocab_layout(trained: ClipTokenizer) -> None:
    chars = list(bytes_to_unicode().values())
    assert len(trained.merges) == 300
    assert trained.vocab_size == 512 + 300 + 2
    assert (trained.sot_token_id, trained.eot_token_id) == (812, 813)
    assert [trained.decode([i]) for i in (0, 256, 812, 813)] == ["!", "! ", SOT, EOT]
    assert trained._id_to_token[:512] == chars + [c + EOW for c in chars]
    assert trained._id_to_token[512:812] == [a + b for a, b in trained.merges]


def test_trained_merges_compress_and_roundtrip(trained: ClipTokenizer) -> None:
    texts = training_corpus(300, seed=3)
    n_tokens = sum(len(trained.encode(t)) for t in texts)
    n_bytes = sum(len(clean_text(t).replace(" ", "").encode()) for t in texts)
    assert n_tokens < 0.4 * n_bytes, (n_tokens, n_bytes)
    assert len(trained.encode("running through")) == 2  # frequent words become one token each
    for t in texts + ["unseen wörds ünd 東京 🐱 42", "a", ""]:
        text = clean_text(t)
        assert trained.decode(trained.encode(text)).split() == pre_tokenize(text), t


def test_trained_equals_open_clip_on_same_merges(trained: ClipTokenizer, open_clip_module: ModuleType,
                                                 tmp_path: Path) -> None:
    """open_clip's own BPE loop, fed our merges, gives the same ids: the layout really is OpenAI's."""
    ref = open_clip_module.SimpleTokenizer(bpe_path=str(write_openai_bpe(trained.merges, tmp_path / "m.txt.gz")))
    assert ref.vocab_size == trained.vocab_size
    assert torch.equal(trained(CORPUS), ref(CORPUS))


def test_training_is_deterministic_and_greedy(trained: ClipTokenizer) -> None:
    again = ClipTokenizer.train(training_corpus(), num_merges=300)
    fewer = ClipTokenizer.train(training_corpus(), num_merges=50)
    assert again.merges == trained.merges
    assert fewer.merges == trained.merges[:50]


def test_training_stops_when_pairs_run_out() -> None:
    small = ClipTokenizer.train(["ab ab ab"], num_merges=100)
    assert small.merges == [("a", "b</w>")]
    assert small.encode("ab") == [512]
    assert ClipTokenizer.train(["anything"], num_merges=0).vocab_size == 514


def test_trained_save_load_and_pickle(trained: ClipTokenizer, tmp_path: Path) -> None:
    trained.save(tmp_path / "t.json")
    for clone in (ClipTokenizer.load(tmp_path / "t.json"), pickle.loads(pickle.dumps(trained))):
        assert clone.merges == trained.merges
        assert torch.equal(clone(CORPUS[:100]), trained(CORPUS[:100]))


# --- errors ----------------------------------------------------------------------------------

def test_missing_merges_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt.gz"
    with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
        ClipTokenizer.from_openai_bpe(missing)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        ClipTokenizer.load(tmp_path / "nope.json")


def test_corrupt_merges_files_name_path(tmp_path: Path) -> None:
    not_gzip = tmp_path / "plain.txt.gz"
    not_gzip.write_text("#version: 0.2\ni n\n")
    truncated = tmp_path / "truncated.txt.gz"
    truncated.write_bytes(DEFAULT_OPENAI_BPE.read_bytes()[:5000])
    too_short = write_openai_bpe([("i", "n")], tmp_path / "short.txt.gz")
    with gzip.open(bad_line := tmp_path / "badline.txt.gz", "wt") as f:
        f.write("#version: 0.2\n" + "i n\n" * 10 + "three symbols here\n" + "i n\n" * OPENAI_NUM_MERGES)
    with gzip.open(no_header := tmp_path / "noheader.txt.gz", "wt") as f:
        f.write("i n\n" * (OPENAI_NUM_MERGES + 1))
    for path, why in [(not_gzip, "gzip"), (truncated, "gzip"), (too_short, "has 1 merges"),
                      (bad_line, "line 12"), (no_header, "#version")]:
        with pytest.raises(ValueError, match=why) as err:
            ClipTokenizer.from_openai_bpe(path)
        assert str(path) in str(err.value)


def test_inconsistent_merges_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="merge 0"):
        ClipTokenizer([("in", "g</w>")])
    with gzip.open(path := tmp_path / "undefined.txt.gz", "wt") as f:
        f.write("#version: 0.2\n" + "zz q\n" * (OPENAI_NUM_MERGES + 1))
    with pytest.raises(ValueError, match="undefined.txt.gz.*'zz'"):
        ClipTokenizer.from_openai_bpe(path)


def test_corrupt_saved_file_names_path(tok: ClipTokenizer, tmp_path: Path) -> None:
    cases = {
        "garbage.json": "{not json",
        "other.json": '{"format": "something else"}',
        "nomerges.json": '{"format": "clip_model.ClipTokenizer", "version": 1, "context_length": 77, '
                         '"special_tokens": ["<start_of_text>", "<end_of_text>"], "vocab_size": 514}',
    }
    for name, body in cases.items():
        (tmp_path / name).write_text(body)
        with pytest.raises(ValueError, match=name):
            ClipTokenizer.load(tmp_path / name)


def test_bad_arguments(tok: ClipTokenizer) -> None:
    for bad in (1, 0, -5, 2.0, True):
        with pytest.raises(ValueError, match="context_length"):
            tok(["a cat"], context_length=bad)
    with pytest.raises(ValueError, match="context_length"):
        ClipTokenizer([], context_length=1)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tok(["ok", None])
    for bad in (42, b"bytes"):
        with pytest.raises(TypeError, match="texts"):
            tok(bad)
    with pytest.raises(ValueError, match="49408"):
        tok.decode([49408])
    with pytest.raises(ValueError, match="num_merges"):
        ClipTokenizer.train(["a"], num_merges=-1)
    with pytest.raises(TypeError, match="training text 1"):
        ClipTokenizer.train(["a b", b"bytes"], num_merges=3)


def test_accepts_numpy_and_generators(tok: ClipTokenizer) -> None:
    texts = ["a dog", "Café &amp;amp; co"]
    expected = tok(texts)
    assert torch.equal(tok(np.array(texts, dtype=object)), expected)
    assert torch.equal(tok(t for t in texts), expected)
    assert tok([]).shape == (0, 77)


def test_single_string_and_tensor_decode(tok: ClipTokenizer) -> None:
    row = tok("Hello   World!")
    assert row.shape == (1, 77)
    n = int((row != 0).sum())
    assert tok.decode(row[0, 1 : n - 1]) == "hello world ! "
