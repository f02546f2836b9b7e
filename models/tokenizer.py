"""Text to token ids and back, for a GGUF file's embedded vocabulary or a Hugging Face checkpoint folder.

Every vocabulary is turned into one `tokenizers.Tokenizer` (the Rust library behind HF's fast tokenizers):

- GGUF `gpt2`: byte-level BPE from the stored vocab and merges, split by the regex llama.cpp names in
  `tokenizer.ggml.pre`.
- GGUF `llama` and a sentencepiece `tokenizer.model`: sentencepiece's pieces and scores. A BPE vocabulary
  gets merges ranked by the score of the piece they make, which is how sentencepiece (and llama.cpp) pick
  the next merge; a unigram `tokenizer.model` keeps sentencepiece's unigram model.
- `tokenizer.json`: loaded as is.

Control tokens (`<|im_start|>`, `<s>`) are special tokens, so they are matched whole when they appear in
text. `encode` never adds anything but BOS, and only when `add_bos` says to, as HF does for that vocabulary.
"""

import dataclasses
import functools
import json
from datetime import datetime
from pathlib import Path

import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from pallas_kernels.errors import UserError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6  # token types, same in GGUF and sentencepiece

_GPT2 = None  # the split built into the ByteLevel pre-tokenizer
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (split regex, split digits one by one first, llama3 family), after llama.cpp's
# llama-vocab.cpp. The llama3 family also takes a word that is a whole token before merging, and adds BOS
# unless the file says not to.
_PRE_SPLITS = {
    **dict.fromkeys(["default", "gpt-2", "phi-2", "mpt", "olmo"], (_GPT2, False, False)),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"],
                    (_GPT2, True, False)),
    **dict.fromkeys(["llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral"], (_LLAMA3, False, True)),
    **dict.fromkeys(["smaug-bpe", "dbrx"], (_LLAMA3, False, False)),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "stablelm2"], (_QWEN2, False, False)),
}


@dataclasses.dataclass
class Tokenizer:
    """A vocabulary plus the few facts generation uses: BOS, the ids that end a reply, the chat template."""

    backend: tokenizers.Tokenizer
    bos_id: int | None
    eos_ids: tuple[int, ...]
    pad_id: int
    add_bos: bool
    chat_template: str | None

    def save(self, directory) -> None:
        """Writes tokenizer.json, tokenizer_config.json and generation_config.json, which
        `tokenizer_from_hf_dir` (and HF) read back."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        token = lambda i: None if i is None else self.backend.id_to_token(i)
        config = dict(bos_token=token(self.bos_id), eos_token=token((self.eos_ids or (None,))[0]),
                      pad_token=token(self.pad_id), add_bos_token=self.add_bos,
                      chat_template=self.chat_template)
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
        (folder / "generation_config.json").write_text(
            json.dumps(dict(eos_token_id=list(self.eos_ids)), indent=1))

    def encode(self, text: str) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The prompt for `messages`, ending where the assistant's reply starts."""
        if self.chat_template is None:
            raise UserError("this checkpoint has no chat template; pass a raw prompt instead")
        named = {"bos_token": self.bos_id, "eos_token": self.eos_ids[0] if self.eos_ids else None}
        tokens = {name: self.backend.id_to_token(i) for name, i in named.items() if i is not None}
        return _compile(self.chat_template).render(messages=messages, add_generation_prompt=True, **tokens)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns generated ids into text deltas; a character split over tokens is held back until complete.

    Each push decodes only the tokens since the last complete character (plus the ones before it, for
    context such as a sentencepiece leading space), so the cost stays constant per token.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer, self._ids, self._prefix, self._read = tokenizer, [], 0, 0

    def push(self, token_id) -> str:
        self._ids.append(int(token_id))
        before = self._tokenizer.decode(self._ids[self._prefix:self._read])
        text = self._tokenizer.decode(self._ids[self._prefix:])
        if text.endswith("\ufffd"):  # an unfinished UTF-8 sequence decodes to U+FFFD: wait for more bytes
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before):]


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    """Compile a chat template in the sandboxed environment HF renders templates in."""
    def raise_exception(message):  # templates call this to refuse a conversation, e.g. roles not alternating
        raise UserError(f"the chat template refused these messages: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # Jinja's escapes HTML
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)


def tokenizer_from_gguf_metadata(metadata: dict) -> Tokenizer:
    """The tokenizer a GGUF file's `tokenizer.*` metadata describes."""
    def get(key, default=None):
        return metadata.get("tokenizer.ggml." + key, default)

    tokens, kind = list(get("tokens", [])), get("model")
    types = [int(t) for t in get("token_type", [NORMAL] * len(tokens))]
    if kind == "gpt2":
        pre = get("pre", "default")
        if pre not in _PRE_SPLITS:
            raise UserError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(sorted(_PRE_SPLITS))}")
        split, digits, llama3 = _PRE_SPLITS[pre]
        backend = _byte_level_bpe(tokens, list(get("merges", [])), types, split, digits, llama3)
        add_bos = bool(get("add_bos_token", llama3))
    elif kind == "llama":
        unk = get("unknown_token_id")
        backend = _sentencepiece(tokens, [float(s) for s in get("scores")], types, unigram=False,
                                 add_dummy_prefix=bool(get("add_space_prefix", True)),
                                 unk_id=None if unk is None else int(unk))
        add_bos = bool(get("add_bos_token", True))  # llama.cpp adds BOS unless the file says not to
    else:
        raise UserError(f"GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2', 'llama'")
    eos = [int(get(k)) for k in ("eos_token_id", "eot_token_id", "eom_token_id") if get(k) is not None]
    bos, pad = get("bos_token_id"), get("padding_token_id")
    return Tokenizer(backend, None if bos is None else int(bos), tuple(dict.fromkeys(eos)),
                     int(pad) if pad is not None else (eos[0] if eos else 0), add_bos,
                     metadata.get("tokenizer.chat_template"))


def tokenizer_from_hf_dir(directory) -> Tokenizer:
    """The tokenizer of a HF checkpoint folder: `tokenizer.json`, else sentencepiece `tokenizer.model`.

    `tokenizer_config.json` (and `chat_template.jinja`, `generation_config.json`) supply the chat template,
    the BOS/EOS/pad tokens and whether to add BOS.
    """
    folder = Path(directory)
    config = _read_json(folder / "tokenizer_config.json")
    if (folder / "tokenizer.json").exists():
        backend, model_ids = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")), {}
    elif (folder / "tokenizer.model").exists():
        backend, model_ids = _sentencepiece_model_file(folder / "tokenizer.model")
    else:
        raise UserError(f"{folder} has neither tokenizer.json nor tokenizer.model; point at a checkpoint folder")

    def token_id(name):
        token = config.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        return backend.token_to_id(token) if token is not None else model_ids.get(name)

    bos_id, eos_id, pad_id = token_id("bos_token"), token_id("eos_token"), token_id("pad_token")
    generation_eos = _read_json(folder / "generation_config.json").get("eos_token_id")
    eos = [eos_id, *(generation_eos if isinstance(generation_eos, list) else [generation_eos])]
    eos_ids = tuple(dict.fromkeys(int(i) for i in eos if i is not None))
    if "add_bos_token" in config:
        add_bos = bool(config["add_bos_token"])
    elif model_ids:  # a sentencepiece model alone: add BOS, as llama.cpp and sentencepiece-era HF Llama do
        add_bos = bos_id is not None
    else:  # tokenizer.json adds BOS through its post-processor, if at all
        add_bos = bos_id is not None and backend.encode("a").ids[:1] == [bos_id]
    template = config.get("chat_template")
    if (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return Tokenizer(backend, bos_id, eos_ids, pad_id if pad_id is not None else (eos_ids or (0,))[0],
                     add_bos, template)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _byte_to_char() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 bytes that byte-level vocabularies are written in."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(moved)}


def _byte_level_bpe(tokens, merges, types, split, digits, llama3) -> tokenizers.Tokenizer:
    """Byte-level BPE (GPT-2 style) from a GGUF vocabulary, split the way its merges were learnt."""
    spelling = _byte_to_char()
    alphabet = set(spelling.values())
    # A token written outside the byte alphabet is respelled in it, as HF does.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i for i, t in enumerate(tokens)}
    backend = tokenizers.Tokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges],
                                              ignore_merges=llama3))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is not None:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None))
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    # A control token outside the byte alphabet is a converter mislabel that no text can produce; skip it.
    _add_atomic_tokens(backend, tokens, [t if set(tok) <= alphabet else NORMAL for tok, t in zip(tokens, types)])
    return backend


def _sentencepiece(pieces, scores, types, *, unigram, add_dummy_prefix, unk_id=None,
                   charsmap=b"", remove_extra_whitespaces=False) -> tokenizers.Tokenizer:
    """Sentencepiece's encoding: optional normalization, spaces as '▁', then BPE-by-score or unigram."""
    byte_fallback = BYTE in types
    unk_id = unk_id if unk_id is not None else (types.index(UNKNOWN) if UNKNOWN in types else None)
    if unigram:
        model = models.Unigram(list(zip(pieces, scores)), unk_id=unk_id, byte_fallback=byte_fallback)
    else:
        vocab = {p: i for i, p in enumerate(pieces)}
        mergeable = {p for p, t in zip(pieces, types) if t in (NORMAL, USER_DEFINED)}
        merges = [(p[:k], p[k:], score) for p, score in zip(pieces, scores) if p in mergeable
                  for k in range(1, len(p)) if p[:k] in mergeable and p[k:] in mergeable]
        merges.sort(key=lambda merge: -merge[2])  # best-scoring result first
        model = models.BPE(vocab, [(left, right) for left, right, _ in merges], byte_fallback=byte_fallback,
                           unk_token=None if unk_id is None else pieces[unk_id], fuse_unk=True)
    backend = tokenizers.Tokenizer(model)
    steps = [normalizers.Precompiled(charsmap)] if charsmap else []
    if remove_extra_whitespaces:  # sentencepiece drops leading/trailing spaces and squeezes runs of them
        steps += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    # The dummy prefix goes before every stretch of text, also after a special token, as llama.cpp does.
    steps += [normalizers.Prepend("▁")] if add_dummy_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if add_dummy_prefix else []))
    _add_atomic_tokens(backend, pieces, types)
    return backend


def _sentencepiece_model_file(path: Path) -> tuple[tokenizers.Tokenizer, dict]:
    """A sentencepiece `tokenizer.model`, with the bos/eos/pad ids it was trained with."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:  # the generated proto module imports the protobuf package
        raise UserError(f"reading {path} requires protobuf: pip install protobuf ({e})") from e

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    kind, norm, spec = proto.trainer_spec.model_type, proto.normalizer_spec, proto.trainer_spec
    if kind not in (1, 2):  # 1 UNIGRAM, 2 BPE
        raise UserError(f"{path}: sentencepiece model type {kind} is not supported; only unigram and BPE are")
    backend = _sentencepiece([p.piece for p in proto.pieces], [p.score for p in proto.pieces],
                             [p.type for p in proto.pieces], unigram=kind == 1, add_dummy_prefix=norm.add_dummy_prefix,
                             charsmap=norm.precompiled_charsmap, remove_extra_whitespaces=norm.remove_extra_whitespaces)
    ids = {"bos_token": spec.bos_id, "eos_token": spec.eos_id, "pad_token": spec.pad_id}
    return backend, {name: i for name, i in ids.items() if i >= 0}


def _add_atomic_tokens(backend: tokenizers.Tokenizer, tokens, types) -> None:
    """Control tokens become special tokens and user-defined ones added tokens, so text matches them whole."""
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind == CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, types) if kind == USER_DEFINED])
