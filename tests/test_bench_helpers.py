"""Shared helpers of the bench tests: a tiny in-process word-level tokenizer, a tiny model, a prose file.

No downloads: the tokenizer is built with ``tokenizers`` from the words the bench tasks use, the model
is a tiny random Llama, and the prose file is written into a temporary directory.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kvstack.bench.tasks import NOISE_TEXT, TASKS, render

CHAT_TEMPLATE = (
    "{% for message in messages %}<s> {{ message['role'] }} : {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)

PROSE_PARAGRAPH = (
    "It was a bright cold morning in the valley, and the river ran fast beneath the old stone bridge. "
    "The miller stood at his door and watched the carts go by, counting them as his father had done. "
    "Nobody in the village could remember a winter so long, nor a spring that came so suddenly. "
    "When the bells rang at noon, the children ran out of the school and down to the water. "
)


def write_prose(directory: Path, paragraphs: int = 60) -> str:
    """A UTF-8 prose file (blank-line separated paragraphs) for tasks that read prose; returns its path."""
    path = directory / "prose.txt"
    path.write_text("\n\n".join(f"Chapter {i}. {PROSE_PARAGRAPH}" for i in range(paragraphs)), encoding="utf-8")
    return str(path)


def _task_words(prose: str) -> set[str]:
    texts = [NOISE_TEXT, Path(prose).read_text(encoding="utf-8"), "user assistant"]
    for cls in TASKS.values():
        if cls.kind != "generate":
            continue
        task = cls(prose=prose)
        for variant in task.variants():
            parts = variant.build(random.Random(0), 10, 512)
            texts += [render(parts, "both"), parts.answer_prefix]
    words: set[str] = set()
    for text in texts:
        words.update(w for w in re.findall(r"\w+|[^\w\s]+", text) if not any(c.isdigit() for c in w))
    return words


def word_tokenizer(prose: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (digits split one per token) with a simple chat template."""
    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[UNK]": 3}
    for token in [str(d) for d in range(10)] + sorted(_task_words(prose)):
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="[UNK]", pad_token="[PAD]"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(vocab_size: int, max_context: int = 2048, seed: int = 0) -> torch.nn.Module:
    """A tiny random Llama (2 layers, 4 query heads sharing 2 KV heads) in eval mode."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_context, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def prose_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_prose(tmp_path_factory.mktemp("prose"))


@pytest.fixture(scope="session")
def tokenizer(prose_file: str) -> PreTrainedTokenizerFast:
    return word_tokenizer(prose_file)


@pytest.fixture(scope="session")
def model(tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    return tiny_llama(len(tokenizer))
