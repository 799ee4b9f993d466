"""Text <-> token ids for a checkpoint, plus its chat template, without transformers.

Sources: a directory with `tokenizer.json` (run by the `tokenizers` library) or a sentencepiece `tokenizer.model`,
or a `.gguf` file, whose tokenizer llama.cpp stores as metadata (vocabulary, merges or scores) and which we rebuild
with `tokenizers`: the BPE algorithms always stay in those libraries. As in transformers and llama.cpp, BOS is added
only when the checkpoint says so (SmolLM2 says no), special tokens written in the text (`<|im_start|>`) become their
ids, and the chat template is rendered by a sandboxed jinja environment configured like transformers'.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

import tokenizers as tk

from .errors import CheckpointError, MsrnnError
from .template import render

# How llama.cpp's `tokenizer.ggml.pre` names split text before byte-level BPE; it must be the split the merges were
# learned with. "smollm"/"starcoder" isolate every digit first (their tokenizer.json has Digits(individual_digits)
# before ByteLevel), which shows only on a whitespace run before a digit: "\n    1" is ['ĊĠĠĠĠ', '1'].
_GPT2 = ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais")
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "command-r")
_LLAMA3 = ("llama3", "llama-bpe", "llama-v3", "smaug-bpe", "falcon3", "dbrx")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4  # llama.cpp's token types


class Tokenizer:
    """One checkpoint's tokenizer. Build it with `Tokenizer.from_pretrained(directory_or_gguf_file)`."""

    def __init__(self, backend, *, bos_id: int | None, eos_ids: Iterable[int] = (), add_bos: bool = False,
                 chat_template: str | None = None, special_tokens: dict[str, str] | None = None,
                 source: str = "this tokenizer"):
        self._backend = backend  # _HFBackend or _SPBackend: encode (never adds BOS), decode, vocab_size
        self.bos_id, self.eos_ids, self.add_bos = bos_id, tuple(dict.fromkeys(eos_ids)), add_bos
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})  # {"bos_token": "<s>", ...}: variables of the template
        self.source = source  # where it came from, for error messages

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if path.suffix == ".gguf" or (path.is_file() and _magic(path) == b"GGUF"):
            return _built(path, _from_gguf, path)
        if (path / "tokenizer.json").is_file():
            file, make = path / "tokenizer.json", lambda f: _HFBackend(tk.Tokenizer.from_file(str(f)))
        elif (path / "tokenizer.model").is_file():
            file, make = path / "tokenizer.model", lambda f: _SPBackend(str(f))
        else:
            raise MsrnnError(f"{path} has neither tokenizer.json nor tokenizer.model (nor is it a .gguf file); "
                             "a checkpoint directory needs one of them.")
        return _built(path, _from_directory, path, _built(file, make, file))

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; BOS first when `add_bos` (default: when the checkpoint asks for it)."""
        ids = self._backend.encode(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The conversation as the model was trained to read it (a string; `encode` it next)."""
        if self.chat_template is None:
            raise MsrnnError("this tokenizer has no chat_template; format the prompt yourself or use a chat model.")
        variables = {**self.special_tokens, "tools": None, "documents": None, **kwargs}
        return render(self.chat_template, self.source, messages=messages,
                      add_generation_prompt=add_generation_prompt, **variables)

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    def decode_stream(self, ids: Iterable[int], skip_special_tokens: bool = False) -> Iterator[str]:
        """Text pieces for `ids` as they arrive (e.g. from a generator); concatenated they equal `decode(ids)`."""
        decoder = self.stream_decoder(skip_special_tokens)
        for token in ids:
            if piece := decoder.push(token):
                yield piece
        if piece := decoder.flush():
            yield piece


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the newly completed text, `flush()` the rest at the end.

    Decoding token by token is wrong twice over: a character may span several tokens (an emoji is four byte-level
    tokens; the first three alone decode to U+FFFD), and sentencepiece drops the leading space of the first token it
    decodes. So we decode the last emitted tokens plus the pending ones, emit what grew past the emitted part, and hold
    text back while it ends in an incomplete character. The window then restarts, so the work per token is constant.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._decode = functools.partial(tokenizer.decode, skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []  # the window: _ids[:_done] were emitted (context), the rest are pending
        self._done = 0

    def push(self, token: int) -> str:
        self._ids.append(int(token))
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end decodes to U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        done, text = self._decode(self._ids[:self._done]), self._decode(self._ids)
        if not final and (len(text) <= len(done) or text.endswith("\ufffd")):
            return ""
        self._ids = self._ids[self._done:]
        self._done = len(self._ids)
        return text[len(done):]


class _HFBackend:
    """A `tokenizers.Tokenizer`. `per_segment`: sentencepiece-style, where the text between special tokens was
    encoded with its own dummy-prefix space, so it is decoded run by run too (else "<s>hi" comes back "<s> hi")."""

    def __init__(self, tokenizer, per_segment: bool = False):
        self.tokenizer, self.per_segment = tokenizer, per_segment
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.special = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self.token_to_id = tokenizer.token_to_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if self.per_segment:
            return _decode_runs(ids, self.special, self.tokenizer.decode, skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class _SPBackend:
    """A sentencepiece model. sentencepiece reads "<s>" in text as three characters, so we cut the text at control
    tokens ourselves, like llama.cpp and transformers' legacy Llama tokenizer (each piece gets the dummy-prefix
    space); on decode, control tokens come back as their text unless skipped (sentencepiece would drop them)."""

    def __init__(self, model_file: str):
        import sentencepiece

        self.sp = sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = sp.get_piece_size()
        self.special = {i: sp.id_to_piece(i) for i in range(self.vocab_size) if sp.is_control(i)}
        self.control = {t: i for i, t in self.special.items()}
        names = sorted(self.control, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")").split if names else lambda t: [t]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(self._split(text)):  # odd positions hold the control tokens matched by the split
            ids.extend([self.control[part]] if i % 2 else self.sp.encode(part) if part else [])
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return _decode_runs(ids, self.special, self.sp.decode, skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None


def _decode_runs(ids: list[int], special: dict[int, str], decode, skip_special_tokens: bool) -> str:
    """Decode the runs between special tokens separately; special tokens become their text unless skipped."""
    out, run = [], []
    for i in ids + [None]:
        if i is None or i in special:
            out.append(decode(run) if run else "")
            out.append("" if i is None or skip_special_tokens else special[i])
            run = []
        else:
            run.append(i)
    return "".join(out)


def _from_directory(path: Path, backend) -> Tokenizer:
    """Special tokens, BOS policy and chat template from tokenizer_config.json and its companions."""
    config = _read_json(path / "tokenizer_config.json")
    names = {k: v.get("content") if isinstance(v, dict) else v  # AddedToken dicts or plain strings
             for k, v in {**_read_json(path / "special_tokens_map.json"), **config}.items()
             if k in ("bos_token", "eos_token", "unk_token", "pad_token") and v is not None}
    if isinstance(backend, _SPBackend):  # a sentencepiece model names its own BOS/EOS/UNK
        for key, i in (("bos_token", backend.sp.bos_id()), ("eos_token", backend.sp.eos_id()),
                       ("unk_token", backend.sp.unk_id())):
            if i >= 0:
                names.setdefault(key, backend.sp.id_to_piece(i))
    bos_id = backend.token_to_id(names["bos_token"]) if "bos_token" in names else None
    eos = _read_json(path / "generation_config.json").get("eos_token_id")  # e.g. Llama 3's end-of-turn ids
    eos_ids = [backend.token_to_id(names.get("eos_token", ""))] + (eos if isinstance(eos, list) else [eos])
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # no flag: sentencepiece (Llama) models add BOS; tokenizer.json ones if the post-processor does
        add_bos = isinstance(backend, _SPBackend) or (
            bos_id is not None and backend.tokenizer.encode("a").ids[:1] == [bos_id])
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: transformers uses "default"
        template = {t["name"]: t["template"] for t in template}.get("default")
    if (path / "chat_template.jinja").is_file():  # newer transformers save it apart from tokenizer_config.json
        template = (path / "chat_template.jinja").read_text()
    elif (path / "chat_template.json").is_file():  # ... or, for processors, as {"chat_template": "..."}
        template = _read_json(path / "chat_template.json").get("chat_template", template)
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"the chat template in {path} must be a string, got {type(template).__name__}.")
    return Tokenizer(backend, bos_id=bos_id, eos_ids=[i for i in eos_ids if i is not None], add_bos=bool(add_bos),
                     chat_template=template, special_tokens=names, source=str(path))


def _from_gguf(path: Path) -> Tokenizer:
    """Rebuild the tokenizer llama.cpp describes in GGUF metadata (compare transformers/integrations/gguf)."""
    from .gguf import read_gguf_metadata

    meta = {k[10:]: v for k, v in read_gguf_metadata(path).items() if k.startswith("tokenizer.")}
    check_gguf_vocab(path, meta)
    model, tokens = meta.get("ggml.model"), meta.get("ggml.tokens") or []
    types = meta.get("ggml.token_type") or [_NORMAL] * len(tokens)
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}  # a duplicated string keeps its first id
    if model == "gpt2":  # byte-level BPE: the file has the merges; ggml.pre names the split before BPE
        pre = meta.get("ggml.pre", "default")
        if pre not in _GPT2 + _DIGITS_THEN_GPT2 + _LLAMA3:
            raise MsrnnError(f"GGUF pre-tokenizer {pre!r} is not supported; msrnn knows "
                             f"{', '.join(_GPT2 + _DIGITS_THEN_GPT2 + _LLAMA3)}.")
        tok = tk.Tokenizer(tk.models.BPE(vocab, [tuple(m.split(" ", 1)) for m in meta["ggml.merges"]],
                                         ignore_merges=pre in _LLAMA3))  # Llama 3 takes whole words in the vocab
        steps = [tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _LLAMA3)]
        if pre in _DIGITS_THEN_GPT2:
            steps.insert(0, tk.pre_tokenizers.Digits(individual_digits=True))
        elif pre in _LLAMA3:
            steps.insert(0, tk.pre_tokenizers.Split(tk.Regex(_LLAMA3_SPLIT), behavior="isolated"))
        tok.pre_tokenizer, tok.decoder = tk.pre_tokenizers.Sequence(steps), tk.decoders.ByteLevel()
    elif model == "llama":  # sentencepiece BPE: no merges in the file; a pair merges earlier the higher its score
        scores, normal = meta["ggml.scores"], {t for t, ty in zip(tokens, types) if ty == _NORMAL}
        merges = sorted((-scores[vocab[t]], vocab[t], t[:k], t[k:]) for t in normal for k in range(1, len(t))
                        if t[:k] in normal and t[k:] in normal)
        unk = next((t for t, ty in zip(tokens, types) if ty == _UNKNOWN), None)
        tok = tk.Tokenizer(tk.models.BPE(vocab, [m[2:] for m in merges], unk_token=unk, fuse_unk=True,
                                         byte_fallback=True))
        prefix = int(meta.get("ggml.add_space_prefix", True))  # sentencepiece's dummy prefix: "hi" -> "▁hi"
        tok.normalizer = tk.normalizers.Sequence([tk.normalizers.Prepend("\u2581")] * prefix
                                                 + [tk.normalizers.Replace(" ", "\u2581")])
        tok.decoder = tk.decoders.Sequence([tk.decoders.Replace("\u2581", " "), tk.decoders.ByteFallback(),
                                            tk.decoders.Fuse()] + [tk.decoders.Strip(" ", 1, 0)] * prefix)
    else:
        raise MsrnnError(f"GGUF tokenizer model {model!r} is not supported; msrnn rebuilds 'gpt2' (byte-level BPE) "
                         "and 'llama' (sentencepiece) tokenizers.")
    # Control tokens (<|im_start|>) are matched whole and skippable; user-defined ones are matched whole only.
    tok.add_special_tokens([tk.AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([tk.AddedToken(t, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    ids = {k: meta.get(f"ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding", "eot", "eom")}
    names = {f"{k[:3]}_token": tokens[ids[k]] for k in ("bos", "eos", "unknown", "padding") if ids[k] is not None}
    return Tokenizer(_HFBackend(tok, per_segment=model == "llama"), bos_id=ids["bos"],
                     eos_ids=[ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None],  # eot: end of turn
                     add_bos=bool(meta.get("ggml.add_bos_token", model == "llama")),  # transformers' defaults
                     chat_template=meta.get("chat_template"), special_tokens=names, source=str(path))


def _magic(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(4)


def _read_json(path: Path) -> dict:
    """A JSON object from `path` ({} if there is no such file)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download it.") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}; re-download it.")
    return data


def _built(where: Path, build, *args):
    """build(*args), with any foreign error (the tokenizers or sentencepiece library refusing a file, a setting of
    the wrong type) turned into one CheckpointError that names `where`."""
    try:
        return build(*args)
    except MsrnnError:
        raise
    except Exception as e:
        raise CheckpointError(f"the tokenizer in {where} could not be built ({type(e).__name__}: {e}); its files are "
                              "damaged or inconsistent: re-download them.") from e


def check_gguf_vocab(path: Path, meta: dict) -> None:
    """The tokenizer.ggml.* metadata `_from_gguf` needs, of the right types and sizes: tokens (strings), token types
    and scores (one per token), merges (byte-level BPE), and special token ids inside the vocabulary."""
    def fail(problem: str) -> CheckpointError:
        return CheckpointError(f"GGUF file {path}: {problem}; the file is damaged or incomplete, re-download or "
                               "re-convert it.")

    model, tokens = meta.get("ggml.model"), meta.get("ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise fail("tokenizer.ggml.tokens must be a non-empty list of strings")
    n = len(tokens)
    for key, kind in (("ggml.token_type", int), ("ggml.scores", (int, float))):
        value = meta.get(key)
        if value is not None and (not isinstance(value, list) or len(value) != n
                                  or not all(isinstance(x, kind) for x in value)):
            raise fail(f"tokenizer.{key} must be a list of {n:,} numbers, one per token")
    if model == "gpt2":
        merges = meta.get("ggml.merges")
        if not isinstance(merges, list) or not all(isinstance(m, str) and " " in m for m in merges):
            raise fail("a byte-level BPE ('gpt2') tokenizer needs tokenizer.ggml.merges, a list of 'left right' "
                       "strings" + (", and it has none" if merges is None else ""))
    if model == "llama" and meta.get("ggml.scores") is None:
        raise fail("a sentencepiece ('llama') tokenizer needs tokenizer.ggml.scores, and it has none")
    for key in ("bos", "eos", "unknown", "padding", "eot", "eom"):
        i = meta.get(f"ggml.{key}_token_id")
        if i is not None and (isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n):
            raise fail(f"tokenizer.ggml.{key}_token_id is {i!r}, not an id of its {n:,} tokens")
    template = meta.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise fail("tokenizer.chat_template must be a string")
