"""CLIP tokenizer: ids identical to transformers' CLIPTokenizer built in the test.

Three folders: SD1.5's real `tokenizer/` (49,408-entry vocab, pad `<|endoftext|>`) and SDXL's
`tokenizer_2/` (same vocab, pad `!`) in the two tokenizer_config.json layouts found in the wild
(AddedToken dicts as written by transformers 4.3x; `added_tokens_decoder` as written by >= 4.34).
"""

import json
import random
import shutil

import numpy as np
import pytest
from conftest import shared_path

from leffa_jax.text.tokenizer import CLIPTokenizer, TokenizerError

transformers = pytest.importorskip("transformers")

_ADDED = {"lstrip": False, "rstrip": False, "single_word": False}

PROMPTS = [
    "", " ", "   \t\n  ", "a photo of a cat", "A Photo Of A Cat", "A PHOTO OF A CAT",
    "a photography of a model, best quality, high quality",
    "monochrome, lowres, bad anatomy, worst quality, low quality",
    "a man in a park, smiling", "portrait of a woman wearing a red dress, studio lighting, 8k",
    "masterpiece, best quality, ultra-detailed, (intricate details:1.2), [background]",
    "((smile)), (((blue eyes))), {hair}, <lora:foo:0.7>", "1girl, solo, long hair, looking at viewer",
    "Café au lait", "crème brûlée on a plate", "naïve façade, jalapeño, piñata", "São Paulo at night",
    "Zürich, Düsseldorf, Köln, Straße", "Ångström, Øresund, Æther", "e\u0301 (combining) vs é",
    "résumé", "ΟΔΟΣ ΣΟΦΙΑ", "Ελληνικά γράμματα", "Москва зимой", "Привет, мир!",
    "東京の夜景", "中文提示词：一只猫", "한국어 프롬프트", "ภาษาไทย", "العربية", "עברית",
    "हिन्दी भाषा", "emoji 🐶🐱🐭", "😀😃😄😁 smiling", "thumbs up 👍🏽", "❤️ love ❤",
    "flag 🇫🇷 and family 👨‍👩‍👧", "star ★ ☆ ✨", "music ♪ ♫", "arrows → ← ↑ ↓",
    "hello! world!!", "what?! no way!!!", "wow!!!!!!!!!!!!", "!", "!!", "a!b!c",
    "don't stop", "it's here", "they're there", "we've been", "I'm fine", "you'll see",
    "he'd go", "DON'T SHOUT", "rock 'n' roll", "'quoted'", '"double quoted"', "‘curly’ “quotes”",
    "3 cats and 42 dogs", "1234567890", "3.14159", "1,000,000", "2024-01-31", "12:30pm",
    "$100 €50 £20 ¥1000", "50% off", "#hashtag @mention", "a+b=c", "x^2 + y^2 = z^2",
    "C:\\path\\to\\file", "https://example.com/a?b=c&d=e", "user@example.com", "snake_case_name",
    "kebab-case-name", "CamelCaseName", "tabs\tand\nnewlines", "multiple     spaces",
    "non\u00a0breaking\u00a0space", "ideographic\u3000space", "zero\u200bwidth", "bom\ufeffhere",
    "ctrl\x01char\x7f", "null\x00byte", "line\u2028separator", "ﬁ ligature ﬂ", "½ ¼ ¾", "Ⅻ Ⅳ",
    "x² y³", "①②③", "ｆｕｌｌｗｉｄｔｈ", "İstanbul", "ıi", "ß and ẞ", "<|startoftext|>",
    "<|endoftext|>", "a<|endoftext|>b", "<|ENDOFTEXT|> shouting", "x <|startoftext|> y",
    "<|endoftext|><|endoftext|>", "<|endoftext", "<|", "|>", "<>", "...", "---", "___", "~~~",
    "a cat. a dog; a bird: a fish", "(a:1.3), [b], {c}", "word" * 30, "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    " leading and trailing ", "trailing!", "!leading", "mixed 中文 and English and 日本語",
    "red, green, blue, " * 20, "a very long prompt " * 30, " ".join(str(i) for i in range(120)),
    "😀" * 40, "café " * 60,
]


def _write_tokenizer_2(src, dst, layout):
    """SDXL's tokenizer_2 folder (pad "!") in one of the two config layouts."""
    dst.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, dst / name)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
               "unk_token": "<|endoftext|>"}
    if layout == "legacy":
        config = json.loads((src / "tokenizer_config.json").read_text())
        config["pad_token"] = "!"
    else:
        config = {
            "add_prefix_space": False, "clean_up_tokenization_spaces": True, "do_lower_case": True,
            "errors": "replace", "model_max_length": 77, "tokenizer_class": "CLIPTokenizer",
            "additional_special_tokens": [], **special,
            "added_tokens_decoder": {
                "0": {"content": "!", "normalized": False, "special": True, **_ADDED},
                "49406": {"content": "<|startoftext|>", "normalized": True, "special": False, **_ADDED},
                "49407": {"content": "<|endoftext|>", "normalized": False, "special": False, **_ADDED},
            },
        }
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    (dst / "special_tokens_map.json").write_text(json.dumps(special))
    return dst


@pytest.fixture(scope="module")
def sd15_folder():
    return shared_path("fixtures", "magic_clothing", "model", "tokenizer")


@pytest.fixture(scope="module", params=["sd15", "sdxl2_legacy", "sdxl2_modern"])
def tokenizer_pair(request, sd15_folder, tmp_path_factory):
    """(ours, transformers') for one tokenizer folder."""
    if request.param == "sd15":
        folder = sd15_folder
    else:
        layout = request.param.split("_")[1]
        folder = _write_tokenizer_2(sd15_folder, tmp_path_factory.mktemp("tok") / "tokenizer_2", layout)
    return CLIPTokenizer.from_pretrained(folder), transformers.CLIPTokenizer.from_pretrained(folder)


def test_prompt_ids_match_transformers(tokenizer_pair):
    ours, ref = tokenizer_pair
    assert len(PROMPTS) >= 100
    for prompt in PROMPTS:
        assert ours.encode(prompt) == ref(prompt).input_ids, prompt


def test_batch_padding_truncation_match(tokenizer_pair):
    ours, ref = tokenizer_pair
    assert ours.model_max_length == ref.model_max_length == 77
    assert ours.pad_token_id == ref.pad_token_id
    for kwargs in ({"padding": "max_length", "max_length": 77, "truncation": True},
                   {"padding": "longest", "truncation": False},
                   {"padding": "max_length", "max_length": 20, "truncation": True}):
        got = ours(PROMPTS, **kwargs)
        want = ref(PROMPTS, return_tensors="np", **kwargs)
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])
    long_row = ours("a very long prompt " * 30)["input_ids"][0]
    assert long_row.shape == (77,) and long_row[-1] == ours.eos_token_id


def test_random_strings_match(tokenizer_pair):
    """Fuzz: random mixes of vocabulary words, punctuation, digits, scripts and specials."""
    ours, ref = tokenizer_pair
    words = [w.removesuffix("</w>") for w in list(ours.encoder)[300:3000] if w.isalpha()]
    pieces = list("aZ09 ,.!?'\"-()<>|/\\:;#$%&*\t\n") + [
        "é", "ß", "中", "テ", "Σ", "İ", "ﬁ", "½", "²", "🐶", "👍🏽", "\u200b", "\u00a0", "\u0301",
        "\x00", "<|endoftext|>", "<|STARTOFTEXT|>", "'s", "'LL"]
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(words) + " " if rng.random() < 0.4 else rng.choice(pieces)
                       for _ in range(rng.randint(0, 25)))
        assert ours.encode(text) == ref(text).input_ids, repr(text)


def test_decode_matches(tokenizer_pair):
    ours, ref = tokenizer_pair
    for prompt in PROMPTS[:40]:
        ids = ref(prompt).input_ids
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), prompt


def test_sdxl_pad_token_is_exclamation(sd15_folder, tmp_path):
    tok = CLIPTokenizer.from_pretrained(_write_tokenizer_2(sd15_folder, tmp_path / "t2", "legacy"))
    ids = tok("hi!", max_length=8)["input_ids"][0].tolist()
    assert ids == [49406, 1883, 0, 49407, 0, 0, 0, 0]  # "!" is the pad token, split out as id 0


def test_official_magic_clothing_ids(sd15_folder):
    """Ids recorded by the official Magic Clothing run (transformers 4.31)."""
    tok = CLIPTokenizer.from_pretrained(sd15_folder)
    run = np.load(shared_path("fixtures", "magic_clothing", "joint_default.npz"))
    np.testing.assert_array_equal(tok(list(run["prompts"]))["input_ids"], run["cond_input_ids"])
    np.testing.assert_array_equal(tok([str(run["negative_prompt"])] * 2)["input_ids"],
                                  run["negative_input_ids"])
    np.testing.assert_array_equal(tok([""])["input_ids"], run["null_input_ids"])
    assert tok.encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_bad_folders(tmp_path, sd15_folder):
    with pytest.raises(TokenizerError, match="not found"):
        CLIPTokenizer.from_pretrained(tmp_path / "nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(sd15_folder / "vocab.json", broken / "vocab.json")
    shutil.copy(sd15_folder / "tokenizer_config.json", broken / "tokenizer_config.json")
    with pytest.raises(TokenizerError, match="merges.txt"):
        CLIPTokenizer.from_pretrained(broken)
