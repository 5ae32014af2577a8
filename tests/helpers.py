"""Helpers that several test modules share (``from helpers import ...``; ``tests`` is on
``sys.path`` through pytest's ``pythonpath`` setting, so this works in every import mode). Each
imports what it needs when called, so that collecting a test needs no optional package."""

import contextlib
import importlib.util

import pytest


def requires(*modules: str):
    """Marks a test ``integration`` and skips it, naming what is missing, unless every one of
    ``modules`` (top-level package names: "verl", "ray", ...) can be imported. For test modules
    that need a stack throughout, use ``pytest.importorskip`` at the top instead."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]

    def apply(fn):
        fn = pytest.mark.integration(fn)
        return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}")(fn)

    return apply


def write_rollouts_parquet(
    path, rows: int = 40, length: int = 50, seed: int = 0, row_group: int = 16, *, ids: bool = False
):
    """A Parquet file of ``rows`` rollouts of ``length`` tokens each: float32 list columns
    ``logp`` and ``old_logp`` (old in [-3, 0], new = old + N(0, 0.2)), ``row_group`` rows per
    row group; with ``ids``, an int64 column ``id`` (0, 1, ...) before them. Returns the table
    written."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    old = (-rng.random(rows * length) * 3).astype(np.float32)
    new = (old + rng.normal(0, 0.2, old.size)).astype(np.float32)
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * length)
    table = pa.table(
        {
            **({"id": np.arange(rows)} if ids else {}),
            "logp": pa.ListArray.from_arrays(offsets, new),
            "old_logp": pa.ListArray.from_arrays(offsets, old),
        }
    )
    pq.write_table(table, path, row_group_size=row_group)
    return table


def with_value(table, column: str, row: int, position: int, value: float):
    """``table`` with ``value`` at ``position`` of row ``row``'s list in the list column
    ``column`` (the column's type kept)."""
    import pyarrow as pa

    lists = table.column(column).to_pylist()
    lists[row][position] = value
    return table.set_column(
        table.schema.get_field_index(column), column, pa.array(lists, type=table[column].type)
    )


def loss_and_grad(fn, old, logp, adv, mask, **kw):
    """``fn`` called with verl's keywords (``old_log_prob``, ``log_prob``, ``advantages``,
    ``response_mask``) and ``kw``: the loss, its gradient with respect to ``logp``, and the
    metrics."""
    lp = logp.clone().requires_grad_(True)
    loss, metrics = fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask, **kw)
    loss.backward()
    return loss.detach(), lp.grad, metrics


def verl_actor_config(**kw):
    """verl's FSDP actor config for a single-process, one-rollout run, with ``kw`` on top."""
    from verl.workers.config import FSDPActorConfig

    base = {"strategy": "fsdp", "rollout_n": 1, "ppo_micro_batch_size_per_gpu": 1}
    return FSDPActorConfig(**(base | kw))


def verl_loss_and_grad(name, old, logp, adv, mask, *, mode, config, weights):
    """verl's registered policy loss ``name`` called as verl's actor calls it, with the
    aggregation ``mode``, the actor ``config`` and the rollout ``weights``: as
    :func:`loss_and_grad`."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    fn = get_policy_loss_fn(name)
    return loss_and_grad(
        fn, old, logp, adv, mask, loss_agg_mode=mode, config=config, rollout_is_weights=weights
    )


def error_steps(backend: str, length: int) -> int:
    """The row length to give ``kpo_rs.testing.tolerance`` for ``backend``'s results on rows of
    ``length``: the bound the backend registered (``kpo_rs.backends.get(backend).error_steps``),
    the same one ``kpo doctor`` judges it by."""
    from kpo_rs import backends

    return backends.get(backend).error_steps(length)


def backend_devices(*, tests_only: bool = False) -> list:
    """``(backend, device)`` for the op's property tests, from the backend registry: every
    registered backend available on the CPU now (triton only under ``TRITON_INTERPRET=1``), and on
    CUDA every one that can run there (marked to skip without a CUDA device). ``tests_only``:
    include the backends registered as not a user's choice (the plain loop)."""
    import torch

    from kpo_rs import backends

    needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    pairs: list = []
    for name, entry in backends.registered().items():
        if not (entry.choice or tests_only):
            continue
        if entry.available(torch.device("cpu")):
            pairs.append((name, "cpu"))
        if entry.available(torch.device("cuda")):  # without a device: those that run anywhere
            pairs.append(pytest.param(name, "cuda", marks=needs_cuda))
    return pairs


@contextlib.contextmanager
def triton_tile(tile: int | None):
    """Inside the block the triton backend cuts rows into tiles of ``tile`` tokens (None: its
    own choice); its setting before is restored on leaving."""
    from kpo_rs.backends import triton

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(triton, "TILE", tile)
        yield


def tiny_demo(**kw):
    """A :class:`~kpo_rs.experiments.config.DemoConfig` small enough for a test (2 prompts x 4
    answers of 16 tokens, 2 minibatches, 3 steps), with ``kw`` on top."""
    from kpo_rs.experiments.config import DemoConfig

    base = {
        "steps": 3,
        "seeds": 1,
        "prompts_per_step": 2,
        "group_size": 4,
        "response_len": 16,
        "minibatches": 2,
    }
    return DemoConfig(**(base | kw))


def interruptible(*args, **kwargs):
    """``subprocess.Popen(*args, **kwargs)`` whose child takes SIGINT as Ctrl-C even where this
    process ignores it (a shell starts background jobs with SIGINT ignored, and a child inherits
    that): the child's SIGINT is reset to the default before it starts, so Python installs its
    KeyboardInterrupt handler."""
    import signal
    import subprocess

    def default_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return subprocess.Popen(*args, preexec_fn=default_sigint, **kwargs)


#: The tiny TRL tests' vocabulary: three special tokens, then one token per character.
TINY_VOCAB = ["<pad>", "<eos>", "<unk>", *"abcdefghij "]


def tiny_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` over :data:`TINY_VOCAB`, built here (no
    download), padding on the left."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(TINY_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )


def tiny_llama(vocab: int):
    """A random 2-layer ``LlamaForCausalLM`` (hidden size 32) over ``vocab`` tokens, seeded 0."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    return LlamaForCausalLM(cfg)


def reward_count_a(completions, **kwargs):
    """Reward: the share of the letter 'a' in the completion."""
    return [c.count("a") / max(len(c), 1) for c in completions]


def tiny_training() -> dict:
    """The TRL trainer settings of the tiny training runs (a fresh dict each call): 4 steps on
    CPU of 4 prompts x 4 completions of up to 24 tokens, two passes over each batch (so the
    second sees ratios != 1), learning rate 5e-3, float32, seed 0, a log entry every step, no
    reporting and no checkpoints."""
    return {
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 24,
        "num_iterations": 2,
        "max_steps": 4,
        "learning_rate": 5e-3,
        "logging_steps": 1,
        "report_to": [],
        "bf16": False,
        "use_cpu": True,
        "seed": 0,
        "save_strategy": "no",
    }


def tiny_prompts():
    """The tiny TRL runs' training set: a ``datasets.Dataset`` of 16 three-letter prompts."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": ["abc", "hij", "ddd", "jab"] * 4})
