#!/bin/bash
# Chu & Liu on FER2013 faces, CPU budget: N=48 (FER's own size), 5,000
# training faces (fixed stratified subset), budget 2 + 8 epochs, seed 0.
set -x
cd /work/snap
. .venv/bin/activate
DATA="--flagfile=experiments/chu_fer2013_data.flags --image_size=48 --train_limit=5000"
python -m experiments.chu_tables --root=runs/chu_fer2013/rows --profile=quick --budget=2,8 -- $DATA --splits=0
# Emotion weight on PublicTest (never PrivateTest): multi-task rows without ES.
for W in 1 0.1 0.01; do
  python -m experiments.run --flagfile=experiments/chu_multitask.flags --flagfile=experiments/chu_quick_size.flags $DATA \
    --splits=0 --stage1_epochs=2 --stage2_epochs=8 --test_sets=public_test --emotion_weight=$W \
    --workdir=runs/chu_fer2013/emotion_weight/w$W
done
