"""Small tokenizers trained here, built the way the hub's tokenizer.json files are: GPT-2, SmolLM, Llama 3 and
Qwen2 byte-level BPE (their pre-tokenizers), and a SentencePiece-converted BPE (Llama 2 / Mistral: byte fallback,
byte tokens <0x00>…<0xFF>, ▁ for spaces, merges listing every pair whose joined piece is in the vocabulary, in
the order of that piece, as transformers' converter writes them). Tests export them to GGUF and let llama.cpp
tokenize with them."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# the split expressions as Meta-Llama-3's and Qwen2's tokenizer.json files spell them
SPLIT_OF = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+",
}
SAMPLES = [
    "Hello world! It's 2026; don't panic -- we'll tokenize 1234567 items at 3.14159.",
    "  leading spaces,\ttabs\tand\n\nnew lines\r\n  end   ",
    "Unicode: café, naïve, Größe, 東京, 🙂 and ∑x² ≠ y.",
    "def f(x):\n    return x**2  # comment\n",
    "I'm, you're, they've, she'd, we'LL, IT'S",
]


def _train(tok: Tokenizer, text: str, vocab: int, **kw) -> Tokenizer:
    trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False, **kw)
    tok.train_from_iterator([line for line in text.splitlines() if line.strip()], trainer)
    return tok


def byte_bpe(kind: str, text: str, vocab: int = 1200) -> PreTrainedTokenizerFast:
    """A byte-level BPE split as llama.cpp's pre-tokenizer `kind` does (gpt-2, smollm, llama-bpe, qwen2)."""
    byte = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind in ("gpt-2", "smollm"))
    pre = {"gpt-2": byte, "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte])}
    pre = pre.get(kind) or pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_OF[kind]), behavior="isolated", invert=False), byte])
    tok = Tokenizer(models.BPE(ignore_merges=kind == "llama-bpe"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    _train(tok, text, vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", bos_token="<|end|>")


def sentencepiece_bpe(text: str, legacy: bool = True, vocab: int = 1200) -> PreTrainedTokenizerFast:
    """A SentencePiece BPE as transformers converts Llama 2's: legacy normalizer (Prepend + Replace) or Metaspace."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    pieces = sorted(_train(trained, text, vocab).get_vocab().items(), key=lambda kv: kv[1])
    specials = ["<unk>", "<s>", "</s>"]
    order = specials + [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in pieces]
    vocab_ids = {p: i for i, p in enumerate(dict.fromkeys(order))}
    merges = sorted(((a, p[len(a):]) for p in vocab_ids for a in (p[:k] for k in range(1, len(p)))
                     if a in vocab_ids and p[len(a):] in vocab_ids and p not in specials and not p.startswith("<0x")),
                    key=lambda m: (vocab_ids[m[0] + m[1]], vocab_ids[m[0]], vocab_ids[m[1]]))
    tok = Tokenizer(models.BPE(vocab=vocab_ids, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if legacy:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   add_bos_token=True)
