#!/usr/bin/env bash
# Train the nano preset on SimWorld on this machine: stage 0 (vision towers on dense ground
# truth), stage 2 (projector + LoRA + decoders, towers frozen), then decoder phases on cached
# REF states (every unit; then the box chooser that reads the object heads' attributes);
# evaluate it on the test split under the model's default system prompt, write its model card
# and ship it to models/nano (what `make demo` runs):
#   tools/train_nano.sh            # starts in the background, prints the log path, returns
#   tools/train_nano.sh --foreground
# Env: NANO_SCENES (train scenes, default 1500), NANO_TEST_SCENES (default 200), NANO_TASKS (default
#      rec,res,keypoint,depth,ovd), NANO_EVAL_LIMIT (items per task, default 100), RUN_DIR (default
#      runs/nano), SHIP_DIR (default models/nano; empty: do not ship), STAGE0_STEPS / STAGE2_STEPS /
#      DECODER_STEPS (override the configs), NANO_LLM_FROM (a trained nano model folder: keep its LLM with
#      its adapters, its ViT and projector, skip stage 2, and train the decoders over the new pyramid
#      towers: configs/train/nano_decoders_over_llm.yaml). Resumes each stage if its checkpoint exists.
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
SCENES=${NANO_SCENES:-1500}
TASKS=${NANO_TASKS:-rec,res,keypoint,depth,ovd}
TEST_SCENES=${NANO_TEST_SCENES:-200}
DATA=${DATA_DIR:-runs/data/simworld}
SHIP_DIR=${SHIP_DIR-models/nano}
mkdir -p "$RUN_DIR"
start=$(date +%s)

# Samples carry no system prompt (--system default): the model learns to answer under the
# prompt the node and `refvlm infer` send; train has mixed conversations, test single requests.
[[ -d $DATA/nano-train ]] || refvlm data simworld --split train --n "$SCENES" --out "$DATA/nano-train" \
  --size 256x192 --tasks "$TASKS" --conversations 1 --system default
[[ -d $DATA/nano-test ]] || refvlm data simworld --split test --n "$TEST_SCENES" --out "$DATA/nano-test" \
  --size 256x192 --tasks rec,res,keypoint,depth --conversations 0 --system default

stage() {  # stage config out steps
  local args=(--stage "$1" --config "$2" --out "$3" --no-progress)
  [[ -n "$4" ]] && args+=(--steps "$4")
  [[ -f "$3/checkpoints/last.pt" && ! -d "$3/model" ]] && args+=(--resume)
  [[ -d "$3/model" ]] || refvlm train "${args[@]}"  # a stage writes model/ when it ends
}
# The run's own copies of the configs: data and each stage's input where this run keeps them.
# Stage 0 fine-tunes the towers of the model in models/nano: keep a copy, as shipping replaces it.
[[ -d $RUN_DIR/previous ]] || cp -r models/nano "$RUN_DIR/previous"
decoders=decoders
[[ -n "${NANO_LLM_FROM:-}" ]] && decoders=decoders_over_llm
run_config() {  # name sed-expressions...: writes the run's copy of configs/train/nano_<name>.yaml
  local name=$1; shift
  sed -e "s#runs/data/simworld#$DATA#" "$@" configs/train/nano_$name.yaml > "$RUN_DIR/${name%_over_llm}.yaml"
}
for name in stage0 stage2 $decoders; do
  run_config "$name" -e "s#runs/nano_stage\([0-9]\)/#$RUN_DIR/stage\1/#g" \
    -e "s#models/nano/model.safetensors#$RUN_DIR/previous/model.safetensors#g" \
    -e "s#init_from: models/nano\$#init_from: ${NANO_LLM_FROM:-}#"
done
stage 0 "$RUN_DIR/stage0.yaml" "$RUN_DIR/stage0" "${STAGE0_STEPS:-}"
# The towers' gate (per-object linear probes, held-out pairs) before anything trains on them.
[[ -f $RUN_DIR/probe-towers.json ]] || refvlm probe towers --towers "$RUN_DIR/stage0/model" --preset nano \
  --out "$RUN_DIR/probe-towers.json"
[[ -n "${NANO_LLM_FROM:-}" ]] || stage 2 "$RUN_DIR/stage2.yaml" "$RUN_DIR/stage2" "${STAGE2_STEPS:-}"
stage 2 "$RUN_DIR/decoders.yaml" "$RUN_DIR/stage2_decoders" "${DECODER_STEPS:-}"
MODEL="$RUN_DIR/stage2_decoders/model"

# The box chooser that describes each proposal by stage 0's object heads (docs/model_probes.md):
# a mixed phase over this model builds it, a phase on rec samples of 1650 more scenes trains
# it, and it replaces this model's box decoder (the other units stay as they are).
simworld_train() {  # seed scenes tasks folder
  [[ -d $DATA/$4 ]] || refvlm data simworld --split train --seed "$1" --n "$2" --size 256x192 --tasks "$3" \
    --conversations 0 --system default --out "$DATA/$4"
}
simworld_train 1 1000 rec,res,keypoint refer-train
simworld_train 2 550 rec rec-train
simworld_train 3 1100 rec rec-train-2
mkdir -p "$DATA/rec-train-3300"
for folder in rec-train rec-train-2; do  # one folder of shards for the phase's data.train
  for f in "$DATA/$folder"/*.tar; do ln -sf "$(realpath "$f")" "$DATA/rec-train-3300/$folder-${f##*/}"; done
done
run_config decoders_attributes -e "s#runs/nano/stage0/#$RUN_DIR/stage0/#g" -e "s#init_from: models/nano\$#init_from: $MODEL#"
run_config box_rec -e "s#init_from: runs/nano_attributes/model#init_from: $RUN_DIR/stage2_decoders_attributes/model#"
stage 2 "$RUN_DIR/decoders_attributes.yaml" "$RUN_DIR/stage2_decoders_attributes" ""
stage 2 "$RUN_DIR/box_rec.yaml" "$RUN_DIR/stage2_decoders_box_rec" ""
[[ -d $RUN_DIR/model ]] || python tools/swap_decoder.py --base "$MODEL" --unit box \
  --donor "$RUN_DIR/stage2_decoders_box_rec/model" --out "$RUN_DIR/model"
MODEL="$RUN_DIR/model"

# The <REF> states' gate: their spread at the decoders' input.
[[ -f $RUN_DIR/probe-refs.json ]] || refvlm probe refs --model "$MODEL" --data "$DATA/nano-test" --limit 120 \
  --out "$RUN_DIR/probe-refs.json"
# The choice's gate: does a proposal cover the referred object, and is that one chosen.
[[ -f $RUN_DIR/probe-choice.json ]] || refvlm probe choice --model "$MODEL" --data "$DATA/nano-test" --limit 150 \
  --out "$RUN_DIR/probe-choice.json"
# The targets: REC Acc@0.5 (and per kind of expression), RES cIoU, keypoint PCK@0.1, depth AbsRel, valid TRP rate.
for task in rec res keypoint depth; do
  refvlm eval --task $task --model "$MODEL" --data "$DATA/nano-test" \
    --limit "${NANO_EVAL_LIMIT:-100}" --out "$RUN_DIR/eval-$task.json" 2>>"$RUN_DIR/eval.log"
done
python -m refvlm_training.engine.plots --out "$RUN_DIR/losses.png" \
  $(for d in stage0 stage2 stage2_decoders stage2_decoders_attributes stage2_decoders_box_rec; do [[ -d $RUN_DIR/$d ]] && echo "$RUN_DIR/$d"; done)
python -m refvlm_training.evaluation.model_card --run "$RUN_DIR" --out "$RUN_DIR/MODEL_CARD.md" \
  --wall-min $(( ($(date +%s) - start) / 60 )) \
  --command "NANO_SCENES=$SCENES NANO_TEST_SCENES=$TEST_SCENES tools/train_nano.sh" \
  --data "SimWorld train split, $SCENES scenes at 256x192, tasks $TASKS plus mixed conversations, every sample under the model's default system prompt (stage 0 renders its own train-split scenes); evaluated on $TEST_SCENES test-split scenes with the held-out evaluation phrasings, at most ${NANO_EVAL_LIMIT:-100} items per task"

if [[ -n "$SHIP_DIR" ]]; then
  rm -rf "$SHIP_DIR" && mkdir -p "$SHIP_DIR"
  cp "$MODEL"/* "$RUN_DIR"/MODEL_CARD.md "$RUN_DIR"/losses.png "$RUN_DIR"/eval-*.json "$RUN_DIR"/probe-*.json "$SHIP_DIR"/
fi
echo "done: $MODEL, card $RUN_DIR/MODEL_CARD.md${SHIP_DIR:+, shipped to $SHIP_DIR}"
