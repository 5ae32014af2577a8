"""TRL with dumping on: KPOTrainer trains a few steps writing rollout dumps (kpo_dump_dir), then
``kpo analyze`` on the dump folder reports the statistics and the fit; q='fit' logs the fitted
settings."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("trl")
pq = pytest.importorskip("pyarrow.parquet")


from helpers import (  # noqa: E402
    TINY_VOCAB,
    reward_count_a,
    tiny_llama,
    tiny_prompts,
    tiny_tokenizer,
    tiny_training,
)
from kpo_rs import cli  # noqa: E402
from kpo_rs.integrations.trl import KPOConfig, KPOTrainer  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _train(tmp_path, **kpo):
    args = KPOConfig(output_dir=str(tmp_path / "out"), **tiny_training(), **kpo)
    trainer = KPOTrainer(
        model=tiny_llama(len(TINY_VOCAB)),
        reward_funcs=reward_count_a,
        args=args,
        train_dataset=tiny_prompts(),
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    return trainer, [e for e in trainer.state.log_history if "loss" in e]


def test_trained_run_dumps_and_kpo_analyze_reads_them(tmp_path, capsys):
    dumps = tmp_path / "dumps"
    _, logs = _train(tmp_path, kpo_dump_dir=str(dumps), kpo_dump_every=1, kpo_dump_rows=4)
    for entry in logs:
        for key in (
            "kpo/kpo_log_ratio_acf1",
            "kpo/kpo_filtered_var_ratio",
            "kpo/kpo_clip_share_pos",
        ):
            assert key in entry and math.isfinite(entry[key]), (key, entry)
    shards = sorted(p.name for p in dumps.iterdir())
    assert shards == [f"step-{s:08d}-rank-00000.parquet" for s in range(4)]
    table = pq.read_table(dumps / shards[0])
    assert table.num_rows == 4 and table.column("engine_log_prob").null_count == 4  # no vLLM
    capsys.readouterr()  # the trainer's own output
    assert cli.main(["analyze", str(dumps), "--no-progress", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 4 and result["rows"] == 16 and result["tokens"] > 0
    assert [s["step"] for s in result["by_step"]] == [0, 1, 2, 3]
    assert result["fit"]["q"] >= 0 and result["fit"]["r"] > 0
    assert len(result["verdicts"]) == 5 and result["advice"]
    assert cli.main(["analyze", str(dumps), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "verdict:" in text and "fit on" in text


def test_q_fit_logs_the_fitted_settings(tmp_path):
    trainer, logs = _train(tmp_path, kpo_q="fit", kpo_fit_every=2)
    assert trainer.kpo_fitter is not None and trainer.kpo_fitter.refits >= 1
    for entry in logs:
        q, r = entry["kpo/kpo_fitted_q"], entry["kpo/kpo_fitted_r"]
        assert math.isfinite(q) and math.isfinite(r) and q > 0 and r > 0
