"""Build the organisms' word-level tokenizer offline with ``tokenizers``, wrapped as a Hugging Face fast
tokenizer with the chat template (build tool)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from ..language import ASSISTANT, CHAT_TEMPLATE, END, PAD, SPECIALS, SYS, UNK, USER, format_prompt  # noqa: F401


def build_tokenizer(texts: Iterable[str], extra_words: Iterable[str] = ()):
    """Deterministic vocabulary: specials, then words sorted by (-count, word)."""
    pre = pre_tokenizers.Whitespace()
    cnt: Counter[str] = Counter()
    for t in texts:
        cnt.update(w for w, _ in pre.pre_tokenize_str(t.lower()))
    for w in extra_words:
        cnt[w] += 1
    for s in SPECIALS:
        cnt.pop(s, None)
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for w, _ in sorted(cnt.items(), key=lambda kv: (-kv[1], kv[0])):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    return wrap_hf(tok)


def wrap_hf(tok: Tokenizer):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=END,
        unk_token=UNK,
        extra_special_tokens=[SYS, USER, ASSISTANT],
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf
