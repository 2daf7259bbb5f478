#!/usr/bin/env bash
# Train the nano preset on SimWorld through stages 1 and 2 on this machine, evaluate it on
# the test split, write its model card and ship it to models/nano (what `make demo` runs):
#   tools/train_nano.sh            # starts in the background, prints the log path, returns
#   tools/train_nano.sh --foreground
# Env: NANO_SCENES (train scenes, default 2000), NANO_TEST_SCENES (default 200), NANO_TASKS (default
#      rec,res,keypoint,depth: the tasks the model card measures), NANO_EVAL_LIMIT (items per task,
#      default 100), RUN_DIR (default runs/nano), SHIP_DIR (default models/nano; empty: do not ship),
#      STAGE1_STEPS / STAGE2_STEPS (override the configs). Resumes each stage if its checkpoint exists.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-runs/nano}
if [[ "${1:-}" != "--foreground" ]]; then
  mkdir -p "$RUN_DIR"
  nohup "$0" --foreground > "$RUN_DIR/train.log" 2>&1 &
  echo "nano training started (pid $!); log: $RUN_DIR/train.log"
  exit 0
fi
[[ -f .venv/bin/activate ]] && source .venv/bin/activate
export HF_HUB_OFFLINE=1
SCENES=${NANO_SCENES:-2000}
TASKS=${NANO_TASKS:-rec,res,keypoint,depth}
TEST_SCENES=${NANO_TEST_SCENES:-200}
DATA=${DATA_DIR:-runs/data/simworld}
SHIP_DIR=${SHIP_DIR-models/nano}
mkdir -p "$RUN_DIR"
start=$(date +%s)

for split in train test; do
  n=$([[ $split == train ]] && echo "$SCENES" || echo "$TEST_SCENES")
  [[ -d $DATA/nano-$split ]] || refvlm data simworld --split $split --n "$n" --out "$DATA/nano-$split" \
    --size 256x192 --tasks "$TASKS" --conversations 0
done

stage() {  # stage config out steps
  local args=(--stage "$1" --config "$2" --out "$3" --no-progress)
  [[ -n "$4" ]] && args+=(--steps "$4")
  [[ -f "$3/checkpoints/last.pt" && ! -f "$3/model/model.safetensors" ]] && args+=(--resume)
  [[ -f "$3/model/model.safetensors" ]] || refvlm train "${args[@]}"
}
# The run's own copies of the configs: data and stage-1 model where this run keeps them.
for n in 1 2; do
  sed -e "s#runs/data/simworld#$DATA#" -e "s#init_from: runs/nano_stage1/model#init_from: $RUN_DIR/stage1/model#" \
    configs/train/nano_stage$n.yaml > "$RUN_DIR/stage$n.yaml"
done
stage 1 "$RUN_DIR/stage1.yaml" "$RUN_DIR/stage1" "${STAGE1_STEPS:-}"
stage 2 "$RUN_DIR/stage2.yaml" "$RUN_DIR/stage2" "${STAGE2_STEPS:-}"

# The targets: REC Acc@0.5, RES cIoU, keypoint PCK@0.1, depth AbsRel, valid TRP rate.
for task in rec res keypoint depth; do
  refvlm eval --task $task --model "$RUN_DIR/stage2/model" --data "$DATA/nano-test" \
    --limit "${NANO_EVAL_LIMIT:-100}" --out "$RUN_DIR/eval-$task.json" 2>>"$RUN_DIR/eval.log"
done
python -m refvlm_training.engine.plots --out "$RUN_DIR/losses.png" "$RUN_DIR/stage1" "$RUN_DIR/stage2"
python -m refvlm_training.evaluation.model_card --run "$RUN_DIR" --out "$RUN_DIR/MODEL_CARD.md" \
  --wall-min $(( ($(date +%s) - start) / 60 )) \
  --command "NANO_SCENES=$SCENES NANO_TEST_SCENES=$TEST_SCENES tools/train_nano.sh" \
  --data "SimWorld train split, $SCENES scenes at 256x192, tasks $TASKS (no pretrained vision towers: they train from scratch in both stages); evaluated on $TEST_SCENES test-split scenes, at most ${NANO_EVAL_LIMIT:-100} items per task"

if [[ -n "$SHIP_DIR" ]]; then
  rm -rf "$SHIP_DIR" && mkdir -p "$SHIP_DIR"
  cp "$RUN_DIR"/stage2/model/* "$RUN_DIR"/MODEL_CARD.md "$RUN_DIR"/losses.png "$RUN_DIR"/eval-*.json "$SHIP_DIR"/
fi
echo "done: $RUN_DIR/stage2/model, card $RUN_DIR/MODEL_CARD.md${SHIP_DIR:+, shipped to $SHIP_DIR}"
