#!/bin/bash
# Exploratory follow-ups of the decisive sweep (decided after reading its report; not pre-registered).
# Run from the repository root: bash docs/sweep/decisive-exploratory/run.sh
set -e
cd "$(dirname "$0")/../../.."
K=".venv/bin/kpo sweep --minibatches 4 --lag 1 --response-len 128 --steps 40 --workers 2"
O=docs/sweep/decisive-exploratory
# 1. learning rates beyond the grid's edge, on the tuning seeds and the tuning engine
$K --variant grpo=grpo --variant kpoc_resc_w1=kpo_clipped:filter=window:1,band=rescaled:16 \
   --variant gspo=gspo:old_logp=trainer,tis=2 --lr 0.04 --seeds 2 --seed0 1000 \
   --mismatch logit-noise:0.25 --out $O/lr-high
$K --variant kpoc_resc_ratio=kpo_clipped:filter=window:16,band=rescaled,space=ratio --variant gpg=gpg \
   --lr 0.0025 --seeds 2 --seed0 1000 --mismatch logit-noise:0.25 --out $O/lr-low
# 2. the decoupled arms on the offset engine: without TIS, and GRPO + TIS at the other rates
$K --variant grpo_dec=grpo:old_logp=trainer --variant grpo_tis=grpo:old_logp=trainer,tis=2 \
   --lr 0.005,0.02 --seeds 4 --mismatch offset:0.4 --out $O/offset-decoupled
$K --variant grpo_dec=grpo:old_logp=trainer --lr 0.01 --seeds 4 --mismatch offset:0.4 --out $O/offset-decoupled-lr01
echo EXPLORE-DONE
