"""Builds small GLM checkpoints with random weights and a locally trained tokenizer.

No model hub: the tokenizer is a byte-level BPE trained on a built-in English corpus (so any
text round-trips exactly), wrapped as `PreTrainedTokenizerFast` with a GLM-style chat template.

    make_model("tiny", Path("/tmp/tiny"))    # ~1M parameters, for tests
    make_model("small", Path("/tmp/small"))  # ~26M parameters, for benchmarks

Deterministic for a given seed (weights and tokenizer).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Literal

__all__ = ["SIZES", "make_model", "make_tokenizer", "num_parameters", "CHAT_TEMPLATE", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = ["<pad>", "<sop>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
PAD, BOS, EOS = "<pad>", "<sop>", "<|endoftext|>"

CHAT_TEMPLATE = (
    "<sop>"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is not none %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SIZES: dict[str, dict] = {
    # ~0.9M parameters: fast tests.
    "tiny": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
    ),
    # ~26M parameters: compute dominates Python overhead, for benchmarks.
    "small": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
    ),
}

VOCAB_SIZE = 4096

_TEXT = """\
The quick brown fox jumps over the lazy dog. A language model reads a sequence of tokens and
predicts the next one. Kubernetes runs containers on a cluster of machines; an operator watches
custom resources and reconciles the state of the cluster with the desired state written in the
spec. The server answers requests over HTTP, streams tokens as they are generated, and reports
metrics such as the number of running and waiting requests, the time to the first token and the
latency between tokens. Continuous batching lets new requests join the batch at every step, so
the accelerator is never idle while a long answer finishes. Once upon a time, in a small village
by the sea, there lived an old fisherman and his wife. Every morning he went out in his boat, and
every evening he came back with fish for the market. The weather was often cold and the wind
was strong, but he loved the sea and the quiet hours before sunrise. Science is the study of the
natural world through observation and experiment. Mathematics gives us numbers, shapes, proofs
and patterns: one, two, three, four, five, six, seven, eight, nine, ten, hundred, thousand.
Hello! How are you today? I am fine, thank you. What is your name? My name is Assistant. Can you
help me write a short story about a robot who learns to paint? Of course, here is a story.
"""

_WORDS = (
    "the of and to in is was for on that with as by at from it this be are or an have not which "
    "but had they you were his her their one all would there we been has when who will more no if "
    "out so said what up its about into than them can only other new some could time these two may "
    "then do first any my now such like our over man me even most made after also did many before "
    "must through back years where much your way well down should because each just those people "
    "how too little state good very make world still own see men work long get here between both "
    "life being under never day same another know while last might us great old year off come "
    "since against go came right used take three states himself few house use during without "
    "again place american around however home small found mrs thought went say part once general "
    "high upon school every don does got united left number course war until always away something "
    "fact though water less public put think almost hand enough far took head yet government system "
    "better set told nothing night end why called didn eyes find going look asked later knew point "
    "next city business give group toward young let room president side social given present "
    "several order national possible rather second face per among form important often things looked "
    "early white case john become large big need four within felt along children saw best church "
    "ever least power development light thing seemed family interest want members mind country area "
    "others done turned although open god service certain kind problem began different door thus "
    "help sense means whole matter perhaps itself york times law human line above name example "
    "action company hands local show five history whether gave either today act feet across taken "
    "past quite anything seen having death week experience body word half really field am car words "
    "already themselves information tell together college shall money period held keep sure free "
    "real seems behind cannot miss political air question making office brought whose special heard "
    "major problems ago became federal study available known result street economic boy position "
    "reason change south board individual job society areas west close turn love community true "
    "court force full seem am model token batch request server cluster node memory speed answer "
    "stream queue engine latency throughput cache layer attention network data learning compute"
).split()


def _corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = [line for line in _TEXT.splitlines() if line]
    for _ in range(3000):
        n = rng.randint(4, 16)
        words = [rng.choice(_WORDS) for _ in range(n)]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", ".", ".", "?", "!", ","]))
    lines += [str(i) for i in range(0, 1000, 7)]
    return lines


def make_tokenizer(vocab_size: int = VOCAB_SIZE, extra_special_tokens: tuple[str, ...] = ()):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on the built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + list(extra_special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[3:] + list(extra_special_tokens),
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(size: Literal["tiny", "small"], out: Path | str, seed: int = 0) -> Path:
    """Write a random-weight GLM checkpoint (`model_type: glm`) and its tokenizer to `out`."""
    import torch
    from transformers import GenerationConfig, GlmConfig, GlmForCausalLM

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    vocab_padded = (vocab + 63) // 64 * 64
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (PAD, BOS, EOS)}
    config = GlmConfig(
        vocab_size=vocab_padded,
        pad_token_id=ids[PAD],
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        tie_word_embeddings=False,
        attention_bias=True,
        **SIZES[size],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GlmForCausalLM(config)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], do_sample=False
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return readable_by_all(out)


def readable_by_all(out: Path) -> Path:
    """safetensors writes 0600; a pod runs as another user and mounts the folder read-only."""
    for f in out.iterdir():
        if f.is_file():
            f.chmod(0o644)
    return out


def num_parameters(model_dir: Path | str) -> int:
    """Parameter count of the safetensors checkpoint in `model_dir` (reads headers only)."""
    from safetensors import safe_open

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                total += math.prod(st.get_slice(k).get_shape())
    return total
