#!/usr/bin/env bash
# The one-GPU run, measured, in one command: the bench, the whole study (`python train.py`), the
# data-parallel checks and the 64-token world's SFT, each under a time limit, with what they wrote
# copied to DEST.
#
#     ./gpu_run.sh DEST [SECONDS]      # SECONDS: the budget of the whole script (default 570)
#     TINY=1 ./gpu_run.sh DEST         # the same steps at tiny sizes, on any machine (test_gpu_run.py)
#
# DEST receives: env.txt (the machine), bench.txt and bench.json, timeline.txt (each step's exit status
# and wall time), full_report.md and full_log.txt (the study), vq64_log.txt (the 64-token SFT) and
# results.tar.gz (every step's out_dir without its checkpoints, the GPU's load sampled each second).
set -u
dest=${1:?usage: ./gpu_run.sh DEST [SECONDS]}
budget=${2:-570}
cd "$(dirname "$0")"
mkdir -p "$dest"
work=$(mktemp -d)
t0=$(date +%s)
export PYTHONUNBUFFERED=1
left() { echo $(( budget - $(date +%s) + t0 )); }

if [ -n "${TINY:-}" ]; then     # every stage, barely: a check that the script runs end to end
    tiny=(--device cpu --preset quick --n_layer 1 --n_head 2 --n_embd 32 --batch_size 8 --steps 3 --log_every 1
          --tok_images 500 --vq_steps 20 --eval_n 4 --pairs 12 --pref_steps 2 --pref_batch 4 --pref_seeds 1
          --gen_pairs 6 --diag_every 1 --joint_steps 2 --joint_eval_n 4 --probe_steps 2 --probe_n 4
          --self_prompts 8 --self_steps 2)
    bench=(--tiny --device cpu)
    full=("${tiny[@]}" --rows gen_dpo_world)   # (one row of the joint study: its others are tested elsewhere)
    ddp=("${tiny[@]}")
    vq64=("${tiny[@]}" --curve_every 2 --curve_n 4)
else
    bench=(--seconds 2)
    full=()
    ddp=(--steps 100 --log_every 50)
    vq64=(--curve_every 500 --curve_n 100)
fi

# step NAME LIMIT COMMAND...: run it under `timeout`, its output in $work/NAME.txt; log status and time
step() {
    local name=$1 limit=$2 s rc
    shift 2
    if [ "$limit" -le 5 ]; then
        echo "$name | skipped: the budget is spent" | tee -a "$dest/timeline.txt"
        return
    fi
    s=$(date +%s)
    timeout "$limit" "$@" > "$work/$name.txt" 2>&1
    rc=$?
    echo "$name | exit $rc$([ $rc = 124 ] && echo ' (timed out)') | $(( $(date +%s) - s )) s (limit $limit s) | $*" \
        | tee -a "$dest/timeline.txt"
}

{ date -u; nvidia-smi 2>&1 | head -15; nproc; python -c "import torch, sys; print('python', sys.version.split()[0],
'| torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  git log -1 --format='commit %H %cd' 2>/dev/null; } > "$dest/env.txt" 2>&1
# the GPU's load and memory, sampled each second while the steps run
(command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used \
    --format=csv -l 1 > "$work/gpu_load.csv" 2>&1) &
sampler=$!

step bench 120 python bench.py "${bench[@]}" --json "$dest/bench.json"
cp "$work/bench.txt" "$dest/bench.txt"
# the whole study at the defaults (on CUDA: the gpu preset, 3 preference seeds); it leaves 210 s for the rest
step full $(( $(left) - 210 )) python train.py --out_dir "$work/full" "${full[@]}"
# data parallelism: one process on the GPU through torchrun (NCCL); two processes on one GPU refused
step ddp_1 $(( $(left) - 170 < 90 ? $(left) - 170 : 90 )) \
    torchrun --standalone --nproc_per_node=1 train.py --stage tokenizer,sft --out_dir "$work/ddp" "${ddp[@]}"
if [ -z "${TINY:-}" ]; then
    step ddp_2 $(( $(left) - 140 < 60 ? $(left) - 140 : 60 )) \
        torchrun --standalone --nproc_per_node=2 train.py --stage sft --out_dir "$work/ddp" "${ddp[@]}"
fi
# the 64-token world (a VQ-VAE, 8 x 8 tokens an image) at the gpu preset: does the model read and draw?
step vq64 $(( $(left) - 20 )) python train.py --tokenizer vq --stage tokenizer,sft,eval --out_dir "$work/vq64" "${vq64[@]}"

kill $sampler 2> /dev/null
cp "$work/full/report.md" "$dest/full_report.md" 2> /dev/null
cp "$work/full/log.txt" "$dest/full_log.txt" 2> /dev/null
cp "$work/vq64/log.txt" "$dest/vq64_log.txt" 2> /dev/null
tar -C "$work" --exclude='*.pt' --exclude='*.part' -czf "$dest/results.tar.gz" .
echo "gpu_run | done in $(( $(date +%s) - t0 )) s | $dest" | tee -a "$dest/timeline.txt"
rm -rf "$work"
