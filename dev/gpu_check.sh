#!/usr/bin/env bash
# The GPU acceptance check: run it once on a machine with a GPU, read the PASS/FAIL table at the end.
#
#   bash dev/gpu_check.sh --quick        # ~4 min on one H200: training memory/speed, decode bench, engine check
#   bash dev/gpu_check.sh                # the longer run: more training steps (d20, speedrun settings)
#   bash dev/gpu_check.sh --dry-run      # list the steps and their commands, run nothing
#   bash dev/gpu_check.sh --device=cpu --quick   # rehearse every step on the CPU at toy sizes
#   bash dev/gpu_check.sh --depth=12     # another model size
#   bash dev/gpu_check.sh --quick --only=decode,engine   # some of the steps
#
# Steps (each runs even if an earlier one failed; each has a time limit; all output is unbuffered):
#   decode        python -m bench.decode --json (batch 1/8/32 x context 256/1k/2k, TTFT, kernels/step)
#   engine        dev/gpu_engine_check.py: the KV-cache engine vs naive generate on the device
#   train_bf16    bench/train.py at d20, device_batch_size 32, seq 2048, vocab 65,536, compile on,
#                 the reference's bf16 embedding: tok/s, MFU, peak memory (max_memory_allocated)
#   train_fp32emb the same with --fp32_embedding=1, printed side by side with train_bf16
#   compile       dev/gpu_train_check.py --check=compile: eager vs torch.compile losses agree
#   ranks         dev/gpu_train_check.py --check=ranks: N ranks (torchrun, NCCL) = 1 process with
#                 gradient accumulation; SKIP with fewer than 2 GPUs
#   serve         dev/gpu_serve_check.py: chat_web -n <all GPUs>, 16 concurrent streaming requests
# Worst case (every step at its limit), --quick on CUDA: 240 + 60 + 2 x 130 + 3 x 120 s = 15 min;
# expected ~6. --only=decode,engine,train_bf16,train_fp32emb keeps to the first four.
# Needs only python3 with torch and tiktoken: random tokens, no dataset, no trained tokenizer, no
# network, no rustbpe. On a machine without a GPU it says so and exits 0.
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
QUICK=0; DRY=0; DEVICE=cuda; DEPTH=20; ONLY=""
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        --dry-run) DRY=1 ;;
        --device=*) DEVICE="${arg#--device=}" ;;
        --depth=*) DEPTH="${arg#--depth=}" ;;
        --only=*) ONLY=",${arg#--only=}," ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument '$arg' (see --help)"; exit 2 ;;
    esac
done

if [ "$DEVICE" = cuda ]; then
    SEQ=2048; BATCH=32; VOCAB=65536; STEPS=$([ $QUICK = 1 ] && echo 3 || echo 50); WARM=2
    DECODE_ARGS="--depth=$DEPTH"; ENGINE_DEPTH=4; LIMIT_TRAIN=$([ $QUICK = 1 ] && echo 130 || echo 400)
    LIMIT_DECODE=240; LIMIT_ENGINE=60; MATMUL=8192; LIMIT_CHECK=120; CHECK_DEPTH=4; SERVE_DEPTH=4
else  # a rehearsal at toy sizes: the same commands, so a typo shows up here and not on the GPU
    DEPTH=2; SEQ=64; BATCH=2; VOCAB=512; STEPS=1; WARM=1
    DECODE_ARGS="--depth=2 --vocab_size=512 --batches=1,2 --contexts=32,64 --tokens=4 --compile_decode=1"; ENGINE_DEPTH=2
    LIMIT_TRAIN=300; LIMIT_DECODE=300; LIMIT_ENGINE=300; MATMUL=256; LIMIT_CHECK=300; CHECK_DEPTH=2; SERVE_DEPTH=2
fi
# How many ranks and replicas: every GPU (two CPU processes in the rehearsal).
if [ "$DEVICE" = cuda ]; then
    NGPU=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
else
    NGPU=2
fi
if [ $DRY = 1 ]; then  # the dry run creates nothing: it names the folder a real run would make
    LOGDIR="${GPU_CHECK_LOGS:-/tmp/gpu_check.XXXXXX}"
else
    LOGDIR="${GPU_CHECK_LOGS:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
fi
TRAIN="$PY -m bench.train --device_type=$DEVICE --depth=$DEPTH --max_seq_len=$SEQ --device_batch_size=$BATCH"
TRAIN="$TRAIN --vocab_size=$VOCAB --grad_accum_steps=1 --steps=$STEPS --warmup_steps=$WARM --compile=1 --matmul_size=$MATMUL"
CHECK="-m dev.gpu_train_check --device=$DEVICE --depth=$CHECK_DEPTH"
if [ "$NGPU" -ge 2 ]; then  # the torchrun run writes its result, the plain run computes the reference
    RANKS="$PY -m torch.distributed.run --standalone --nproc_per_node=$NGPU $CHECK --check=ranks --out=$LOGDIR/ranks"
    RANKS="$RANKS && $PY $CHECK --check=ranks --out=$LOGDIR/ranks"
else
    RANKS="echo 'ranks: $NGPU GPU here, nothing to split'; exit 77"
fi
SERVE_GPUS=$([ "$DEVICE" = cuda ] && echo $(( NGPU > 0 ? NGPU : 1 )) || echo 1)
NAMES=(decode engine train_bf16 train_fp32emb compile ranks serve)  # most wanted first: a run cut short keeps them
LIMITS=($LIMIT_DECODE $LIMIT_ENGINE $LIMIT_TRAIN $LIMIT_TRAIN $LIMIT_CHECK $LIMIT_CHECK $LIMIT_CHECK)
CMDS=(
    "$PY -m bench.decode --device=$DEVICE $DECODE_ARGS --json"
    "$PY -m dev.gpu_engine_check --device=$DEVICE --depth=$ENGINE_DEPTH"
    "$TRAIN --fp32_embedding=0"
    "$TRAIN --fp32_embedding=1"
    "$PY $CHECK --check=compile"
    "$RANKS"
    "$PY -m dev.gpu_serve_check --device=$DEVICE --gpus=$SERVE_GPUS --requests=16 --depth=$SERVE_DEPTH"
)

if [ $DRY = 1 ]; then
    echo "gpu_check steps (device $DEVICE, depth $DEPTH, quick $QUICK):"
    for i in "${!NAMES[@]}"; do echo "  ${NAMES[$i]} (limit ${LIMITS[$i]}s): ${CMDS[$i]}"; done
    exit 0
fi
if [ "$DEVICE" = cuda ]; then
    if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu_check: no CUDA GPU visible to torch here; nothing to check (--dry-run lists the steps)"
        exit 0
    fi
    $PY -c "import torch; print('GPUs:', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], 'torch', torch.__version__)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
fi

mkdir -p "$LOGDIR"
echo "gpu_check: logs in $LOGDIR"
STATUS=(); SECONDS_TAKEN=()
for i in "${!NAMES[@]}"; do
    name="${NAMES[$i]}"; log="$LOGDIR/$name.log"
    if [ -n "$ONLY" ] && [[ "$ONLY" != *",$name,"* ]]; then STATUS[$i]="skipped"; SECONDS_TAKEN[$i]=0; continue; fi
    echo; echo "=== [$((i + 1))/${#NAMES[@]}] $name (limit ${LIMITS[$i]}s): ${CMDS[$i]}"
    start=$(date +%s)
    timeout --kill-after=10 "${LIMITS[$i]}" bash -c "${CMDS[$i]}" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    SECONDS_TAKEN[$i]=$(( $(date +%s) - start ))
    if [ "$rc" = 0 ]; then STATUS[$i]=PASS; elif [ "$rc" = 77 ]; then STATUS[$i]=SKIP; elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then STATUS[$i]="FAIL (timeout)"; else STATUS[$i]="FAIL (rc $rc)"; fi
done

row() { grep -m1 "^$2" "$LOGDIR/$1.log" 2>/dev/null | awk -F'  +' '{print $2}'; }  # name, 2+ spaces, value
echo; echo "=== training, side by side (d$DEPTH, batch $BATCH x $SEQ)"
printf "%-28s %-28s %-28s\n" "" "bf16 embedding (default)" "--fp32_embedding=1"
for key in "embedding dtype" "step time (median)" "tokens/s" "MFU vs" "peak memory"; do
    printf "%-28s %-28s %-28s\n" "$key" "$(row train_bf16 "$key")" "$(row train_fp32emb "$key")"
done
echo; echo "=== decode (bench/decode.py)"
grep -m1 '^{"device"' "$LOGDIR/decode.log" 2>/dev/null | $PY -c "
import json, sys
r = json.load(sys.stdin)
print(f\"{'batch':>6} {'context':>8} {'eager tok/s':>12} {'fast tok/s':>11} {'greedy agree':>13}\")
for c in r['cases']:
    print(f\"{c['batch']:>6} {c['context']:>8} {c['eager_tok_s']:>12} {c['fast_tok_s']:>11} {c['greedy_agree']:>13}\")
print({k: v for k, v in r.items() if k != 'cases'})
" 2>/dev/null || echo "(no JSON from the decode step)"
echo; echo "=== gpu_check summary (device $DEVICE, depth $DEPTH)"
printf "%-16s %-16s %8s\n" step status seconds
for i in "${!NAMES[@]}"; do printf "%-16s %-16s %8s\n" "${NAMES[$i]}" "${STATUS[$i]}" "${SECONDS_TAKEN[$i]}"; done
echo "logs: $LOGDIR"
exit 0
