"""TRL: a real KPOTrainer run on CPU with a tiny random model and a locally built tokenizer."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kpo_rs.integrations.trl import KPOConfig, KPOTrainer

VOCAB = ["<pad>", "<eos>", "<unk>", *"abcdefghij "]


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )


def _model(vocab: int) -> LlamaForCausalLM:
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


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_kpo_trainer_runs_and_learns(tmp_path, loss_type):
    tokenizer = _tokenizer()
    model = _model(len(VOCAB))
    before = [p.detach().clone() for p in model.parameters()]
    dataset = Dataset.from_dict({"prompt": ["abc", "hij", "ddd", "jab"] * 4})
    args = KPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=24,
        num_iterations=2,  # the second pass over each batch sees ratios != 1
        max_steps=4,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        bf16=False,
        use_cpu=True,
        seed=0,
        loss_type=loss_type,
        kpo_q=1e-3,
        kpo_p0=math.inf,
        save_strategy="no",
    )
    trainer = KPOTrainer(
        model=model,
        reward_funcs=reward_count_a,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs, trainer.state.log_history
    for entry in logs:
        assert math.isfinite(entry["loss"])
        for key in ("kpo/filtered_ratio_mean", "kpo/switch_rate_raw", "kpo/pg_clipfrac"):
            assert key in entry and math.isfinite(entry[key]), (key, entry)
    # The second iteration over a batch is off-policy: some raw ratio differs from 1.
    assert any(abs(e["kpo/ratio_std"]) > 0 for e in logs)
    changed = any(
        not torch.equal(a, b.detach()) for a, b in zip(before, trainer.model.parameters())
    )
    assert changed, "the weights changed"
    print(
        "\n".join(
            str({k: v for k, v in e.items() if k.startswith(("loss", "kpo/", "reward"))})
            for e in logs
        )
    )


def test_unsupported_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="loss_type"):
        KPOTrainer(
            model=_model(len(VOCAB)),
            reward_funcs=reward_count_a,
            args=KPOConfig(output_dir=str(tmp_path), loss_type="cispo", report_to=[], use_cpu=True),
            train_dataset=Dataset.from_dict({"prompt": ["a"]}),
            processing_class=_tokenizer(),
        )
