"""msrnn.tokenizer against transformers, sentencepiece and tokenizers on the bundled GGUF and on tiny tokenizers."""
import json

import jinja2
import pytest

from msrnn.errors import InputError, MsrnnError
from msrnn.gguf import bundled_gguf_path
from msrnn.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
spm = pytest.importorskip("sentencepiece")
tk = pytest.importorskip("tokenizers")

# Varied text: punctuation, contractions, accents, CJK, Cyrillic, Arabic, emoji (skin tone, flag, ZWJ family),
# numbers, whitespace runs, tabs, CRLF, code, and special tokens written inline.
VARIED = (
    "Hello, world! It's a beautiful day; isn't it? I'd say we'll see.\n"
    "Café naïve résumé façade Ångström — «quotes» “curly” ‘single’…\n"
    "日本語のテキスト、中文测试，한국어 텍스트입니다. Россия и Україна. مرحبا بالعالم\n"
    "Emoji: 😀👍🏽🇺🇸 ❤️ 👨‍👩‍👧‍👦 and math ∑ ∫ √2 ≈ 1.414\n"
    "Numbers: 3.14159, 1,000,000 and 2024-01-31 or 0xFF 12345678901234567890\n"
    "Whitespace:  two   three    four\t\ttabs \r\n windows\n\n\nthree newlines   \n"
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    "<|im_start|>user\nspecial tokens inline<|im_end|>\n"
)
# A whitespace run before a digit: the one place SmolLM's digit-isolating pre-tokenizer shows (see below).
DIGITS_AFTER_SPACES = "x = [\n    1,\n    22,\n  333]\n\t4  5   6\n\n7"


@pytest.fixture(scope="module")
def smol():
    return Tokenizer.from_pretrained(bundled_gguf_path())


@pytest.fixture(scope="module")
def smol_ref():
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    path = bundled_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_gguf_ids_equal_transformers(smol, smol_ref):
    ids = smol.encode(VARIED)
    assert ids == smol_ref.encode(VARIED)
    assert ids.count(1) == ids.count(2) == 1  # <|im_start|> and <|im_end|> were matched whole
    assert smol.decode(ids) == VARIED == smol_ref.decode(ids)
    assert smol.decode(ids, skip_special_tokens=True) == smol_ref.decode(ids, skip_special_tokens=True)
    assert "<|im_start|>" not in smol.decode(ids, skip_special_tokens=True)


def test_gguf_digits_are_isolated_like_llama_cpp(smol, smol_ref):
    """llama.cpp's "smollm" pre-tokenizer (and SmolLM2's tokenizer.json) split every digit off before the GPT-2 regex,
    so "\\n    1" is ['ĊĠĠĠĠ', '1']. transformers' GGUF converter uses the plain GPT-2 regex for "smollm", giving
    ['ĊĠĠĠ', 'Ġ', '1']; we compare with transformers' vocabulary under SmolLM2's published pre-tokenizer."""
    ids = smol.encode(DIGITS_AFTER_SPACES)
    tokens = [smol_ref.convert_ids_to_tokens(i) for i in ids]
    assert tokens[3:5] == ["ĊĠĠĠĠ", "1"]
    fixed = tk.Tokenizer.from_str(smol_ref.backend_tokenizer.to_str())
    fixed.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Digits(individual_digits=True),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    for text in (DIGITS_AFTER_SPACES, VARIED):
        assert smol.encode(text) == fixed.encode(text, add_special_tokens=False).ids
    assert smol.decode(ids) == DIGITS_AFTER_SPACES


def test_gguf_special_ids_and_bos(smol, smol_ref):
    assert (smol.bos_id, smol.eos_ids, smol.vocab_size) == (1, (2,), len(smol_ref))
    assert smol.add_bos is False and smol.encode("hi") == smol_ref.encode("hi")  # SmolLM2 adds no BOS
    assert smol.encode("hi", add_bos=True) == [1] + smol.encode("hi")


CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."}],
    [{"role": "user", "content": "Hi! ça va? 😀"}, {"role": "assistant", "content": "Fine, thanks."},
     {"role": "user", "content": "Now count:\n1 2 3"}],  # no system message: the template inserts SmolLM's default
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gguf_chat_template_equals_transformers(smol, smol_ref, messages, add_generation_prompt):
    ours = smol.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    ref = smol_ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == ref and ours.count("<|im_start|>") == len(messages) + (messages[0]["role"] != "system") + (
        add_generation_prompt)


# --- streaming -----------------------------------------------------------------------------------------------------


def test_stream_decoder_matches_decode(smol):
    ids = smol.encode(VARIED)
    pieces = list(smol.decode_stream(ids))
    assert "".join(pieces) == smol.decode(ids) and len(pieces) > 50
    assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_holds_split_characters(smol):
    ids = smol.encode("a😀")  # byte-level BPE: the emoji is several tokens, none of them a character alone
    assert len(ids) > 2
    decoder = smol.stream_decoder()
    out = [decoder.push(i) for i in ids]
    assert out[0] == "a" and all(p == "" for p in out[1:-1]) and out[-1] == "😀"
    partial = smol.stream_decoder()
    partial.push(ids[0]), partial.push(ids[1])
    assert partial.flush() == "\ufffd"  # end of stream inside a character: shown as a replacement character


# --- sentencepiece: a directory with tokenizer.model, and the same model as a GGUF ----------------------------------

SPM_TEXTS = ["the quick brown fox", " leading space", "two  spaces and trailing  ", "Café naïve 東京 数字 😀 Ωmega",
             "line1\nline2\n\n  indented", "", "12345 digits", "Ünïcödé ∑"]


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    words = "the quick brown fox jumps over lazy dog café naïve 東京 数字 hello world line indented".split()
    corpus = "\n".join(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(10)) for i in range(400))
    (root / "corpus.txt").write_text(corpus)
    spm.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2)
    return root


@pytest.fixture(scope="module")
def sp(spm_dir):
    return spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def spm_gguf(spm_dir, sp, tmp_path_factory):
    """The sentencepiece model as llama.cpp's converter stores it: pieces, scores and token types."""
    path = tmp_path_factory.mktemp("spm_gguf") / "sp.gguf"
    n = sp.get_piece_size()
    kinds = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1), w.add_context_length(64), w.add_embedding_length(8), w.add_feed_forward_length(8)
    w.add_head_count(1), w.add_head_count_kv(1), w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama"), w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)]), w.add_token_types(kinds)
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


@pytest.mark.parametrize("source", ["dir", "gguf"])
def test_sentencepiece_ids_equal_sentencepiece(source, spm_dir, spm_gguf, sp):
    tok = Tokenizer.from_pretrained(spm_dir if source == "dir" else spm_gguf)
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size, tok.add_bos) == (1, (2,), 400, True)
    for text in SPM_TEXTS:
        ids = tok.encode(text, add_bos=False)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == text == sp.decode(ids)
        assert tok.encode(text) == [1] + ids  # Llama-style models add BOS
    assert any(sp.is_byte(i) for i in tok.encode("😀"))  # out-of-vocabulary text falls back to bytes
    inline = tok.encode("<s>the fox</s>", add_bos=False)
    assert inline == [1] + sp.encode("the fox") + [2]  # control tokens in text are parsed, not spelled out
    assert tok.decode(inline) == "<s>the fox</s>" and tok.decode(inline, skip_special_tokens=True) == "the fox"
    assert "".join(tok.decode_stream(tok.encode(SPM_TEXTS[3]))) == tok.decode(tok.encode(SPM_TEXTS[3]))


def test_sentencepiece_gguf_equals_transformers(spm_gguf):
    """transformers (v5) skips sentencepiece's dummy prefix on text that starts with a space, so only other text."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(spm_gguf.parent, gguf_file=spm_gguf.name)
    tok = Tokenizer.from_pretrained(spm_gguf)
    for text in SPM_TEXTS:
        if text[:1] != " ":
            assert tok.encode(text) == ref.encode(text), text


def test_sentencepiece_config_overrides_bos(spm_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((spm_dir / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert Tokenizer.from_pretrained(tmp_path).encode("the fox")[0] != 1


# --- tokenizer.json + tokenizer_config.json ------------------------------------------------------------------------

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role ' + m.role) }}{% endif %}"
    "{% if loop.index > 5 %}{% break %}{% endif %}"
    "<|{{ m.role }}|>\n  {{ m.content | trim }}{% if m.role == 'assistant' %}{% generation %}{{ eos_token }}"
    "{% endgeneration %}{% endif %}\n{% endfor %}"
    "{% if tools %}{{ tools | tojson }}{% endif %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def json_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokjson")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<|user|>", "<|assistant|>"],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([VARIED] * 3, trainer)
    tok.post_processor = tk.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True},
        "chat_template": TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}))
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3]}))
    return root


def test_tokenizer_json_directory(json_dir):
    tok = Tokenizer.from_pretrained(json_dir)
    raw = tk.Tokenizer.from_file(str(json_dir / "tokenizer.json"))
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (0, (1, 3), True)  # BOS because the post-processor adds it
    ids = tok.encode(VARIED)
    assert ids == raw.encode(VARIED).ids and ids[0] == 0
    assert tok.decode(ids[1:]) == VARIED and "".join(tok.decode_stream(ids[1:])) == VARIED
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(json_dir)
    assert ids == ref.encode(VARIED)


def test_tokenizer_json_chat_template_equals_transformers(json_dir):
    tok = Tokenizer.from_pretrained(json_dir)
    messages = [{"role": "system", "content": " Be kind. "}, {"role": "user", "content": "Привет"},
                {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Again"}]
    tools = [{"name": "ünïcode", "parameters": {}}]
    ours = tok.apply_chat_template(messages, tools=tools)
    # trim_blocks eats the newline after {% endif %}; lstrip_blocks nothing here; tojson keeps non-ASCII
    assert ours.startswith("<s><|system|>\n  Be kind.<|user|>") and "Hi</s>" in ours and '"ünïcode"' in ours
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(json_dir)
    assert ours == ref.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    with pytest.raises(InputError, match="refused the conversation: bad role tool") as e:  # raise_exception(...)
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    assert isinstance(e.value.__cause__, jinja2.TemplateError)


def test_tokenizer_config_add_bos_false(json_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text((json_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "add_bos_token": False}))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.bos_id == 0 and tok.encode("hi")[0] != 0 and tok.chat_template is None
    with pytest.raises(MsrnnError, match="no chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


# --- byte-level BPE GGUFs for each supported pre-tokenizer family -------------------------------------------------

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # from Meta-Llama-3's tokenizer.json


def _pre_tokenizer(pre):
    """The pre-tokenizer each family's own tokenizer.json uses (the split its merges were learned with)."""
    byte_level = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "llama-bpe")
    first = {"gpt2": [], "smollm": [tk.pre_tokenizers.Digits(individual_digits=True)],
             "llama-bpe": [tk.pre_tokenizers.Split(tk.Regex(LLAMA3_REGEX), behavior="isolated")]}[pre]
    return tk.pre_tokenizers.Sequence(first + [byte_level])


@pytest.mark.parametrize("pre", ["gpt2", "smollm", "llama-bpe"])
def test_byte_level_gguf_equals_its_source_tokenizer(pre, tmp_path):
    """Train a byte-level BPE, store it the way llama.cpp's converter does, and read it back."""
    source = tk.Tokenizer(tk.models.BPE())
    source.pre_tokenizer, source.decoder = _pre_tokenizer(pre), tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=600, special_tokens=["<|begin|>", "<|end|>"], show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    source.train_from_iterator([VARIED + DIGITS_AFTER_SPACES] * 3, trainer)
    vocab = source.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(source.to_str())["model"]["merges"]]
    w = gguf.GGUFWriter(str(tmp_path / "bpe.gguf"), "llama")
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre(pre), w.add_token_list(tokens), w.add_token_merges(merges)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens]), w.add_bos_token_id(vocab["<|begin|>"])
    w.add_eos_token_id(vocab["<|end|>"]), w.add_add_bos_token(True)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    tok = Tokenizer.from_pretrained(tmp_path / "bpe.gguf")
    for text in (VARIED, DIGITS_AFTER_SPACES, "<|begin|>hi<|end|>"):
        assert tok.encode(text, add_bos=False) == source.encode(text).ids, text
        assert tok.decode(tok.encode(text)) == "<|begin|>" + text
    assert tok.encode("x")[0] == tok.bos_id == vocab["<|begin|>"] and tok.eos_ids == (vocab["<|end|>"],)


# --- errors --------------------------------------------------------------------------------------------------------


def test_directory_without_tokenizer(tmp_path):
    with pytest.raises(MsrnnError, match="neither tokenizer.json nor tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)


def _tokenizer_gguf(path, model, pre=None):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model), w.add_token_list(["a", "b", "ab"]), w.add_token_merges(["a b"])
    if pre:
        w.add_tokenizer_pre(pre)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def test_unsupported_gguf_tokenizers(tmp_path):
    with pytest.raises(MsrnnError, match="tokenizer model 'bert'"):
        Tokenizer.from_pretrained(_tokenizer_gguf(tmp_path / "bert.gguf", "bert"))
    with pytest.raises(MsrnnError, match="pre-tokenizer 'qwen2'"):
        Tokenizer.from_pretrained(_tokenizer_gguf(tmp_path / "qwen.gguf", "gpt2", "qwen2"))
    tok = Tokenizer.from_pretrained(_tokenizer_gguf(tmp_path / "gpt2.gguf", "gpt2", "gpt2"))
    assert tok.encode("abab") == [2, 2] and tok.bos_id is None and tok.eos_ids == ()
