#!/usr/bin/env bash
# The measurements we take on a lent 2-GPU machine (nvidia-h200-x2), in parts of < 10 minutes:
#   bash bench/gpu_session.sh S   # GPU 0: loaders (+ MAE stall), MedMNIST eval (12 tasks);
#                                 # GPU 1 at the same time: DINOv2 ViT-L vs naive, ViT-g with AC at batch 64
#   bash bench/gpu_session.sh F   # NCCL bandwidth, FSDP2 1 -> 2 GPU scaling of MAE ViT-L (profiled)
#   bash bench/gpu_session.sh F2  # FSDP2 variants: block groups, no reshard, compiled (and F3: batch 512)
#   bash bench/gpu_session.sh L   # loaders + MAE stall alone on the machine (+ torchrun engine.run on 2 GPUs)
#   bash bench/gpu_session.sh B   # loaders --breakdown: workers alone, each GPU backend's device half alone
#   bash bench/gpu_session.sh L2  # loaders after the worker rewrite: DALI settings swept, stall with/without max_ahead
#   bash bench/gpu_session.sh K3  # MAE kernels with variants; L5: stall at normal vs high stream priority
#   bash bench/gpu_session.sh L6  # the stall profiled by CUDA stream, at two GIL switch intervals
#   bash bench/gpu_session.sh L7  # the stall with the whole MAE model compiled (the engine's setting)
#   bash bench/gpu_session.sh M   # DINOv2 multi-crop from each backend vs PIL + torchvision v2
#   (later parts, K* kernels / L* loaders / P1 a py-spy profile, say what each measures where they start)
# Loader parts with several bench invocations: pass --data-dir /tmp/bench-data to each, so the shard sets are built once
# per machine (100k rows at 256 px + 64k at 512 take ~45 s there) and reused by the later steps.
# Wheels the GPU image lacks (DALI, mosaicml-streaming and their dependencies) are unpacked from
# /tmp/wheels (see ../shared/GPU.md: ../shared/tools/device-wheels ...) into /tmp/site once.
set -u
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
if [ ! -d /tmp/site ] && ls /tmp/wheels/part.* >/dev/null 2>&1; then
  cat /tmp/wheels/part.* | tar x -C /tmp/wheels && \
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/wheels/*.whl
fi
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
step() {  # step SECONDS CMD...: one measurement; a failure or time-out does not stop the others
  local t=$1; shift
  local log; log=$(mktemp)
  echo "=== $* (limit ${t}s)" >> "$OUT/session-$PART.log"
  timeout "$t" "$@" > "$log" 2>&1
  local rc=$?
  grep -vE "Warning|warn\(|^\s*$" "$log" | tail -40 > "$log.tail"
  { echo "=== $* -> exit $rc"; cat "$log.tail"; } | tee -a "$OUT/summary-$PART.log"
  cat "$log" >> "$OUT/session-$PART.log"
  echo "    ($(( $(date +%s) - T0 )) s into the part)" | tee -a "$OUT/summary-$PART.log"
  tar czf "$OUT/results-$PART.tgz" bench/results  # after every step: a call cut short still brings back what ran
}
site38() {  # Triton 3.8.0 (torch 2.14's) unpacked into /tmp/site38 from a carried .whl/t38s.tar.xz (K95's comment says
           # how it is built); fails, saying so, where neither is there
  if [ ! -d /tmp/site38/triton ] && [ -f .whl/t38s.tar.xz ]; then
    mkdir -p /tmp/site38 && xz -dc .whl/t38s.tar.xz | tar x -C /tmp/site38
  fi
  [ -d /tmp/site38/triton/backends/amd ] || { echo "no /tmp/site38: carry .whl/t38s.tar.xz (K95's comment)"; return 1; }
}
T0=$(date +%s)
PART=$1
case $PART in
K101)  # session 34: the forward as persistent programs (PERSIST per SM, each looping over every num_programs-th tile;
       # .notes/probe_persist.py with .notes/persist's kernels/, ignored by git; source kept in ...-s34-persist.json)
       # against the defaults, under the stock Triton 3.6 then 3.8
  step 200 sh -c "python3 .notes/probe_persist.py > $OUT/persist-36.json"
  site38 && PYTHONPATH=/tmp/site38:. step 200 \
    sh -c "python3 .notes/probe_persist.py > $OUT/persist-38.json"
  ;;
K100)  # session 34: the forward's grouped tails as four unrolled 2D walks (TAIL_GU: 2D tiles, whose shared copies keep
       # a conflict-free order under Triton 3.8) against the 3D groups and per-head tails, under 3.8 then the stock 3.6
       # (.notes/probe_gu.py with .notes/t38g's kernels/, ignored by git; source kept in ...-s34-tail-gu.json)
  site38 || exit 3
  PYTHONPATH=/tmp/site38:. step 200 sh -c "python3 .notes/probe_gu.py > $OUT/gu-38.json"
  step 200 sh -c "python3 .notes/probe_gu.py > $OUT/gu-36.json"
  ;;
K99)  # session 34: K98 showed the tail groups' loss under Triton 3.8 comes from its front end, not ptxas; offline the
      # grouped tail's Q and V copies in shared memory take order [2, 0, 1] under 3.8 ([2, 1, 0] under 3.6): rows of
      # one head 4 lines apart, so ldmatrix meets 4-way bank conflicts. Probe (.notes/probe_qt.py, .notes/t38g's
      # kernels/, ignored by git; source kept in ...-s34-triton38-qt.json): Q loaded rows-first and permuted (TAIL_QT,
      # which gives Q order [2, 1, 0] under 3.8), groups of 4 and 2, against per-head tails, forward, under 3.8
  site38 || exit 3
  PYTHONPATH=/tmp/site38:. step 200 sh -c "python3 .notes/probe_qt.py > $OUT/qt-38.json"
  ;;
K98)  # session 34: why tail groups lose under Triton 3.8 (K97: one launch or two, the grouped forward ~0.025-0.045 ms
      # slower than per-head tails, while under 3.6 it is faster): each Triton with its own ptxas and with the other's
      # (TRITON_PTXAS_PATH: 3.6 brings ptxas 12.8, 3.8 brings 12.9; a fresh cache each), per-head against grouped
      # tails, forward and backward (.notes/probe_ptxas.py, ignored by git; its source is kept in ...-s34-ptxas.json)
  site38 || exit 3
  P36=$(python3 -c "import triton, os; print(os.path.dirname(triton.__file__))")/backends/nvidia/bin/ptxas
  P38=/tmp/site38/triton/backends/nvidia/bin/ptxas
  for t in 36 38; do for p in 36 38; do
    pp=P$p
    if [ $t = 38 ]; then pre=/tmp/site38:.; else pre=.; fi
    PYTHONPATH=$pre TRITON_PTXAS_PATH=${!pp} TRITON_CACHE_DIR=/tmp/tc-$t-$p step 150 \
      sh -c "python3 .notes/probe_ptxas.py > $OUT/ptxas-triton$t-ptxas$p.json"
  done; done
  ;;
K97)  # session 34: every attention default under Triton 3.8.0 with the tail steps on there (TAIL_STEP_DEFAULTS, after
      # K96); then a probe (.notes/probe_tailsep.py with .notes/tailsep's kernels/, both ignored by git; the source is
      # kept in ...-s34-tailsep.json): the forward's grouped tails launched as a kernel of their own, after or before
      # the full blocks, against one launch and against per-head tails, under 3.8 and then the stock 3.6
  site38 || exit 3
  PYTHONPATH=/tmp/site38:. step 200 python3 -m bench kernels --only attention --tag s34-triton38-defaults-step
  PYTHONPATH=/tmp/site38:. step 120 sh -c "python3 .notes/probe_tailsep.py > $OUT/tailsep-38.json"
  step 120 sh -c "python3 .notes/probe_tailsep.py > $OUT/tailsep-36.json"
  ;;
K96)  # session 34: K95's tail steps under Triton 3.8 as defaults (HEAD's kernels/ with TAIL_STEP_DEFAULTS on, unpacked
      # in .notes/t38_step, which git ignores) against HEAD's, alternating processes, 4 rounds; /tmp/site38 as for K95
  site38 || exit 3
  PYTHONPATH=/tmp/site38:. ROUNDS=4 step 500 python3 -m bench._probe_ab_trees .notes/t38_step
  ;;
K95)  # session 34: TAIL_PRE / TAIL_FIRST under Triton 3.8.0 (torch 2.14's, what a fresh install takes), where the
      # defaults drop them (TAIL_STEP_DEFAULTS): --tune-tail-step on the d = 64 shapes and the MAE decoder, then those
      # shapes' defaults against every SDPA backend. /tmp/site38 from .whl/t38s.tar.xz: K79's package with libtriton.so
      # stripped (strip --strip-unneeded: 506 -> 192 MB), the test instrumentation library left out and backends/amd
      # put in, tar | xz -9: 49 MB, one carry
  site38 || exit 3
  PYTHONPATH=/tmp/site38:. step 330 python3 -m bench kernels --only attention --tune-tail-step \
    --tag s34-triton38-tune-tail-step --shapes vit-l-n197-d64,dinov2-g-n261-d64,dinov2-l-n257-d64,mae-l-dec-n197-d32
  PYTHONPATH=/tmp/site38:. step 200 python3 -m bench kernels --only attention --tag s34-triton38-defaults \
    --shapes vit-l-n197-d64,dinov2-g-n261-d64,dinov2-l-n257-d64
  ;;
K94)  # session 33: the dQ pass's TAIL_FIRST beside the dK/dV pass's (HEAD's kernels/ with _bwd_config wrapped to add it
      # at d = 64 up to N = 320, unpacked in .notes/dqfirst, which git ignores: the wrapper is the 'prototype' entry
      # of kernels-probe-nvidia-h200-2026-11-30-s33-ab-dq-first.json) against HEAD's, alternating processes, 5 rounds
  ROUNDS=5 step 400 python3 -m bench._probe_ab_trees .notes/dqfirst
  ;;
K93)  # session 33: N = 197, 261 and 257 (d = 64) against every SDPA backend three times more at K92's defaults
  for i in 2 3 4; do
    step 150 python3 -m bench kernels --only attention --tag s33-defaults-first-$i \
      --shapes vit-l-n197-d64,dinov2-g-n261-d64,dinov2-l-n257-d64
  done
  ;;
K92)  # session 33: the defaults before TAIL_PRE / TAIL_FIRST (f73f63c's kernels/ in .notes/base_kernels) against HEAD's in
      # alternating processes, 4 rounds; then every attention default once
  ROUNDS=4 step 300 python3 -m bench._probe_ab_trees .notes/base_kernels
  step 330 python3 -m bench kernels --only attention --tag s33-defaults-first
  ;;
K91)  # session 33: --tune-tail-step (TAIL_PRE and TAIL_FIRST; the dK/dV pass's TAIL_FIRST now the d = 64 default): the
      # split head dims twice (their dK/dV pass then took TAIL_FIRST, a form since removed), the d = 64 shapes and the
      # MAE decoder once
  for i in 1 2; do
    step 200 python3 -m bench kernels --only attention --tune-tail-step --tag s33-tune-tail-step-split-$i \
      --shapes vit-g-n257-d88,vit-h-n257-d80,mae-g-enc-n65-d88
  done
  step 280 python3 -m bench kernels --only attention --tune-tail-step --tag s33-tune-tail-step \
    --shapes vit-l-n197-d64,dinov2-g-n261-d64,dinov2-l-n257-d64,mae-l-dec-n197-d32
  ;;
K90)  # session 33: TAIL_FIRST (the walk's tail steps before the full-tile loop; .notes/tail_first.py, which git ignores
      # and the result JSONs keep as 'script', swaps the --tune-tail-pre variants for it; both are --tune-tail-step's
      # since) against the defaults, twice
  for i in 1 2; do
    PYTHONPATH=/tmp/site:. step 240 python3 .notes/tail_first.py --only attention --tune-tail-pre \
      --tag s33-tune-tail-first-$i \
      --shapes vit-l-n197-d64,dinov2-g-n261-d64,dinov2-l-n257-d64,mae-l-dec-n197-d32,dinov2-g518-n1374-d64
  done
  ;;
K89)  # session 33: the defaults before TAIL_PRE (f73f63c's kernels/, unpacked in .notes/base_kernels) against HEAD's, in
      # alternating processes on one machine (bench/_probe_ab_trees.py), 4 rounds
  ROUNDS=4 step 500 python3 -m bench._probe_ab_trees .notes/base_kernels
  ;;
# K85-K88 (session 33) ran TAIL_PRE as commit 132d7db has it: levels 1 / 2 and a split-head-dim form on the dK/dV pass,
# since removed (they lost), and the flag then named --tune-tail-pre (now --tune-tail-step, with TAIL_FIRST)
K88)  # session 33: TAIL_PRE on the split head dims' dK/dV pass (d = 88, 80; the MAE ViT-g encoder), twice; then every
      # attention default twice more (K87's defaults call put N = 261 at 1.43x, its sweep after it at 1.49x)
  for i in 1 2; do
    step 200 python3 -m bench kernels --only attention --tune-tail-pre --tag s33-tune-tail-pre-split-$i \
      --shapes vit-g-n257-d88,vit-h-n257-d80,mae-g-enc-n65-d88
  done
  for i in 2 3; do
    step 330 python3 -m bench kernels --only attention --tag s33-defaults-$i
  done
  ;;
K87)  # session 33: every attention default with TAIL_PRE in the defaults (the d = 64 dK/dV pass, the MAE decoder's
      # forward), then the TAIL_PRE sweep at N = 197 and 261 again, now with each kernel's shared memory in the JSON
  step 330 python3 -m bench kernels --only attention --tag s33-defaults
  step 200 python3 -m bench kernels --only attention --tune-tail-pre --tag s33-tune-tail-pre3 \
    --shapes vit-l-n197-d64,dinov2-g-n261-d64
  ;;
K86)  # session 33: K85 again with TAIL_PRE at two levels (1: the operand a tail step uses first; 2: the whole tile),
      # the forward and the dQ pass also under other caps, and each kernel's registers and spills in the JSON
  for i in 1 2; do
    step 280 python3 -m bench kernels --only attention --tune-tail-pre --tag s33-tune-tail-pre2-$i \
      --shapes vit-l-n197-d64,dinov2-g-n261-d64,dinov2-l-n257-d64,mae-l-dec-n197-d32
  done
  ;;
K85)  # session 33: TAIL_PRE (each walk's first tail tile loaded before its full-tile loop, so the tail step does not
      # wait out a load after the loop) on the forward and each backward pass, twice
  for i in 1 2; do
    step 280 python3 -m bench kernels --only attention --tune-tail-pre --tag s33-tune-tail-pre-$i \
      --shapes vit-l-n197-d64,dinov2-g-n261-d64,dinov2-l-n257-d64,mae-l-dec-n197-d32,dinov2-g518-n1374-d64
  done
  ;;
K84)  # session 32: every attention default and the MAE kernels at HEAD (DQ_TAIL removed since session 30's table,
      # the launch arithmetic in kernels/host.py): the "Where it stands" table of kernels/README.md
  step 330 python3 -m bench kernels --only attention --tag s32-defaults
  step 220 python3 -m bench kernels --only mae --tag s32-defaults-mae
  ;;
# K81-K83 (session 31): DQ_TAIL, measured and removed (commit 58413a7 has its third form and `--tune-dq-tail`,
# 4d43c71 its first; kernels/README.md, "The tail rows' dQ from the dK/dV pass")
K83)  # session 31: K82 again after moving the tail keys' share of the tail rows' dQ (and their delta) into the dQ
      # pass's last full program per head: _attn_bwd_dq_tail only sums the slots (no products, no q / k / v / dO loads)
  PYTHONPATH=. step 60 python3 .notes/probe_dqtail.py
  for i in 1 2; do
    step 240 python3 -m bench kernels --only attention --tune-dq-tail --tag s31-tune-dq-tail-prep-$i \
      --shapes vit-l-n197-d64,dinov2-g-n261-d64,dinov2-l-n257-d64
  done
  ;;
K82)  # session 31: K81 again after two changes to DQ_TAIL: each slot stored as [rows, head dim] (dS K, lanes along the
      # head dim: coalesced) instead of (dS K)^T, and _attn_bwd_dq_tail's slot loads unrolled (N_FULL constexpr)
  for i in 1 2; do
    step 240 python3 -m bench kernels --only attention --tune-dq-tail --tag s31-tune-dq-tail-coalesced-$i \
      --shapes vit-l-n197-d64,dinov2-g-n261-d64,dinov2-l-n257-d64
  done
  ;;
K81)  # session 31: DQ_TAIL (the tail rows' dQ from the dK/dV pass's full key tiles, slots summed by a third kernel,
      # instead of the dQ pass's tail programs) against each shape's current backward, twice in one call
  for i in 1 2; do
    step 240 python3 -m bench kernels --only attention --tune-dq-tail --tag s31-tune-dq-tail-$i \
      --shapes vit-l-n197-d64,dinov2-g-n261-d64,dinov2-l-n257-d64,mae-l-dec-n197-d32,dinov2-g518-n1374-d64
  done
  ;;
K80)  # session 30: every attention default under Triton 3.8.0 (what a fresh install runs) after K79's changes
      # (SPLIT_TAIL_GROUPS off, 3.8's own winners for d = 88 / 80 / N = 65 in TUNED_NEWER_TRITON); /tmp/site38 as in
      # K79 (its three parts, plus .whl/amd.tar.xz unpacked into /tmp/site38/triton/backends)
  if [ ! -d /tmp/site38/triton ] && ls /tmp/w38/t38.part.* >/dev/null 2>&1; then
    mkdir -p /tmp/site38 && cat /tmp/w38/t38.part.* | xz -d | tar x -C /tmp/site38
  fi
  [ -d /tmp/site38/triton/backends/amd ] || { [ -f .whl/amd.tar.xz ] && tar xJf .whl/amd.tar.xz -C /tmp/site38; }
  [ -d /tmp/site38/triton/backends/amd ] || { echo "no /tmp/site38 with backends/amd: see K79's comment"; exit 3; }
  PYTHONPATH=/tmp/site38:. step 300 python3 -m bench kernels --only attention --tag s30-triton38-defaults
  ;;
K79)  # session 30: the split grouped tails (K78) under Triton 3.8.0, torch 2.14's, which a fresh install takes. Needs
      # /tmp/site38: the cp312 triton 3.8.0 wheel's package less proton, CUPTI, ptxas-blackwell, nvdisasm and cuobjdump
      # (keep backends/amd: 3.8's backend discovery imports it), tar | xz (100 MB), carried in three 34 MB parts
      # (.whl/t38.part.a{a,b,c}) to /tmp/w38 on one warm machine, then unpacked. Then the stock Triton 3.6 run of every
      # attention default (the "Where it stands" table in kernels/README.md). Run three times on 2026-11-30 (the first
      # two with a cp311 package, then without backends/amd: their 3.8 steps failed): ...-s30-defaults{,-2,-3}.json
  if [ ! -d /tmp/site38/triton ] && ls /tmp/w38/t38.part.* >/dev/null 2>&1; then
    mkdir -p /tmp/site38 && cat /tmp/w38/t38.part.* | xz -d | tar x -C /tmp/site38
  fi
  [ -d /tmp/site38/triton ] || { echo "no /tmp/site38: see K79's comment"; exit 3; }
  PYTHONPATH=/tmp/site38:. step 300 python3 -m bench kernels --only attention --tune-tail-split \
    --shapes vit-g-n257-d88,vit-h-n257-d80,mae-g-enc-n65-d88 --tag s30-triton38-tune-tail-split
  step 240 python3 -m bench kernels --only attention --tag s30-defaults
  ;;
K78)  # session 30: split grouped tails (TAIL_GS: where the full blocks split the head dim, the grouped tail splits it
      # alike, 64 + 32 columns at d = 88 instead of 128) on the forward and both backward passes; first what the tail
      # rows cost at all (each shape's defaults at N and at its full blocks' length: the bound on any tail scheme)
  step 150 python3 -m bench._probe_tail_bound --tag s30-tail-bound
  step 400 python3 -m bench kernels --only attention --tune-tail-split --tag s30-tune-tail-split \
    --shapes vit-g-n257-d88,vit-h-n257-d80,mae-g-enc-n65-d88
  ;;
S)
  ( export CUDA_VISIBLE_DEVICES=0 PART=S-gpu0
    step 330 python3 -m bench loaders --backends dali,nvjpeg,cpu,pil --workers 4 --seconds 6 --stall
    step 200 python3 -m bench eval ) &
  ( export CUDA_VISIBLE_DEVICES=1 PART=S-gpu1
    step 330 python3 -m bench train --recipes recipes/vit_l_dinov2.yaml --batch 32 --steps 10 --warmup 3
    step 200 python3 -m bench train --recipes recipes/vit_g_mae.yaml --batch 64 --variants engine-triton --steps 5 --warmup 2 ) &
  wait
  ;;
F)
  step 60 python3 -m bench comm --gpus 2
  step 200 python3 -m bench train --recipes recipes/vit_l_mae.yaml --batch 128 --variants engine-triton --gpus 1 2 --steps 10 --warmup 3 --no-compile --profile --tag eager
  step 150 python3 -m bench train --recipes recipes/vit_l_mae.yaml --batch 128 --variants engine-triton --gpus 2 --steps 10 --warmup 3 --no-compile --profile --tag eager-bf16reduce --override train.fsdp_reduce_dtype=bf16
  step 170 python3 -m bench train --recipes recipes/vit_l_mae.yaml --batch 256 --variants engine-triton --gpus 1 2 --steps 10 --warmup 3 --no-compile --tag eager-b256
  ;;
F2)
  T="python3 -m bench train --recipes recipes/vit_l_mae.yaml --variants engine-triton --steps 8 --warmup 3"
  step 100 $T --batch 128 --gpus 2 --no-compile --profile --tag eager-g4-noreshard --override train.fsdp_blocks_per_group=4 train.fsdp_reshard_after_forward=false
  step 200 $T --batch 256 --gpus 1 2 --tag compiled-b256
  step 130 $T --batch 256 --gpus 2 --tag compiled-b256-noreshard --override train.fsdp_reshard_after_forward=false
  step 130 $T --batch 256 --gpus 2 --tag compiled-b256-g4-noreshard --override train.fsdp_blocks_per_group=4 train.fsdp_reshard_after_forward=false
  ;;
F3)
  T="python3 -m bench train --recipes recipes/vit_l_mae.yaml --variants engine-triton --steps 8 --warmup 3"
  step 240 $T --batch 512 --gpus 1 2 --tag compiled-b512-g4-noreshard --override train.fsdp_blocks_per_group=4 train.fsdp_reshard_after_forward=false
  step 150 $T --batch 256 --gpus 2 --profile --tag compiled-b256-g8-noreshard --override train.fsdp_blocks_per_group=8 train.fsdp_reshard_after_forward=false
  ;;
L)
  step 330 env CUDA_VISIBLE_DEVICES=0 python3 -m bench loaders --backends dali,nvjpeg,cpu,pil --workers 4 --seconds 6 --stall --compile
  [ "$(nvidia-smi -L | wc -l)" -ge 2 ] && step 200 python3 -m torch.distributed.run --standalone --nproc_per_node=2 -m engine.run recipes/vit_l_mae.yaml \
    data.shards=synthetic train.steps=60 train.batch_size=1024 log.every_steps=20 log.tensorboard=false run.dir=/tmp/run-l
  cp /tmp/run-l/metrics.jsonl bench/results/engine-run-vit_l_mae-2gpu-metrics.jsonl 2>/dev/null
  ;;
B)
  step 300 env CUDA_VISIBLE_DEVICES=0 python3 -m bench loaders --backends dali,nvjpeg --workers 4 --seconds 4 --breakdown
  ;;
L2)  # after the worker rewrite: worker counts, DALI settings swept in the breakdown, stall with/without max_ahead
  export CUDA_VISIBLE_DEVICES=0
  step 330 python3 -m bench loaders --backends dali,nvjpeg,cpu,pil --workers 2,4 --seconds 4 --warmup 5 --breakdown \
    --dali-threads 2,4 --hw-decoder-load 0.9,1.0 --dali-no-copy 1
  step 240 python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 3 --warmup 5 --stall --compile \
    --stall-backends dali,nvjpeg --max-ahead 2,0
  ;;
L3)  # defaults after L2 (hw_decoder_load 1.0, no_copy, 2 workers): throughput + DALI threads/queue, stall
  export CUDA_VISIBLE_DEVICES=0
  step 300 python3 -m bench loaders --backends dali,nvjpeg,pil --workers 2,3 --seconds 5 --warmup 5 \
    --dali-threads 4,2 --dali-queue 2,3
  step 200 python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 3 --warmup 5 --stall --compile \
    --stall-backends dali --max-ahead 2,1 --stall-steps 60
  ;;
L4)  # final loaders figures at the chosen defaults (6 s per run), then the stall: max_ahead 2/3, replayed batch
  export CUDA_VISIBLE_DEVICES=0
  step 220 python3 -m bench loaders --backends dali,nvjpeg,pil --workers 2 --seconds 6 --warmup 5 --dali-queue 2,3
  step 330 python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 3 --warmup 5 --stall --compile \
    --stall-backends dali,nvjpeg --stall-replay --max-ahead 2,3 --stall-steps 80 --tag stall
  ;;
K)  # attention block-config sweep incl. the two-pass backward, then the kernel table
  step 400 python3 -m bench kernels --tune --skip-mae
  ;;
K2)  # wider two-pass sweep, then the MAE ViT-L step with Triton kernels vs SDPA/torch in the same run
  step 300 python3 -m bench kernels --tune
  step 300 python3 -m bench train --recipes recipes/vit_l_mae.yaml --batch 256 --variants engine-triton engine-torch --steps 8 --warmup 3
  ;;
K3)  # MAE kernels: learnable vs fixed pos_embed, fwd/bwd split, launch-shape variants of the masking kernels
  step 300 python3 -m bench kernels --only mae --mae-variants --tag mae-final
  ;;
L5)  # stall with the training step on a normal vs a high-priority CUDA stream (train.stream_priority)
  export CUDA_VISIBLE_DEVICES=0
  step 420 python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 3 --warmup 5 --stall --compile \
    --stall-backends dali,nvjpeg --stall-replay --max-ahead 2 --stall-priority normal,high --stall-steps 80 --tag stall-prio
  ;;
L6)  # the stall taken apart: GPU time per step by stream (torch.profiler), GIL switch interval 5 ms vs 0.5 ms
  export CUDA_VISIBLE_DEVICES=0
  step 480 python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 3 --warmup 5 --stall --compile \
    --stall-backends dali --stall-replay --max-ahead 2 --stall-gil 0.005,0.0005 --stall-profile 12 --stall-steps 60 \
    --tag stall-profile
  ;;
L7)  # the stall with the MAE model compiled whole, as engine.run does on one GPU (L6: blocks only, CPU-bound)
  export CUDA_VISIBLE_DEVICES=0
  step 540 python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 3 --warmup 5 --stall --compile model \
    --stall-backends dali,nvjpeg --stall-replay --max-ahead 2 --stall-profile 8 --stall-steps 80 --tag stall-model
  ;;
L8)  # the stall with the training step on torch's default (legacy NULL) stream vs a non-blocking side stream
  export CUDA_VISIBLE_DEVICES=0
  step 540 python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 2 --warmup 5 --stall --compile model \
    --stall-backends dali,nvjpeg --max-ahead 2 --stall-priority normal,side --stall-steps 80 --tag stall-side
  ;;
L9)  # where the stall's idle time goes: training-stream gaps ended by a loader op (data) or not (host)
  export CUDA_VISIBLE_DEVICES=0
  step 540 python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 2 --warmup 5 --stall --compile model \
    --stall-backends dali,nvjpeg --stall-replay --max-ahead 2 --stall-profile 16 --stall-steps 80 --tag stall-gaps
  ;;
L10)  # the stall with the compiled step replayed as CUDA graphs (no per-kernel launches from the host)
  export CUDA_VISIBLE_DEVICES=0
  step 270 python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 2 --warmup 5 --stall --compile model \
    --compile-mode reduce-overhead --stall-backends dali,nvjpeg --max-ahead 2 --stall-steps 80 --tag stall-graphs
  ;;
L11)  # loader streams at high CUDA priority vs normal; where the consumer's and producer's time goes (PrefetchMeter)
  export CUDA_VISIBLE_DEVICES=0
  step 330 python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 2 --warmup 5 --stall --compile model \
    --stall-backends dali,nvjpeg --max-ahead 2 --loader-priority normal,high --stall-repeats 3 --stall-steps 60 --tag stall-lprio
  step 240 python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 1 --warmup 3 --stall --compile model \
    --compile-mode reduce-overhead --stall-backends dali,nvjpeg --max-ahead 2 --loader-priority normal,high --stall-repeats 2 \
    --stall-steps 60 --tag stall-lprio-graphs
  ;;
L12)  # L11 showed the producer held to one batch per step under CUDA graphs: the step on torch's legacy
      # default stream (which blocking streams synchronize with) vs a non-blocking side stream
  export CUDA_VISIBLE_DEVICES=0
  step 300 python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 1 --warmup 3 --stall --compile model \
    --compile-mode reduce-overhead --stall-backends dali,nvjpeg --max-ahead 2 --stall-priority side,normal --stall-repeats 2 \
    --stall-steps 60 --tag stall-graphs-side
  step 250 python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 1 --warmup 3 --stall --compile model \
    --stall-backends dali,nvjpeg --max-ahead 2 --stall-priority side --stall-repeats 2 --stall-steps 60 --tag stall-side-meter
  ;;
L13)  # L11/L12: under CUDA graphs the producer makes one batch per step whatever the streams. Which CUDA
      # runtime calls block (frees synchronize the device), and DALI's legacy executor (buffers allocated once)
  export CUDA_VISIBLE_DEVICES=0
  step 330 python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 1 --warmup 3 --stall --compile model \
    --compile-mode reduce-overhead --stall-backends dali,nvjpeg --max-ahead 2 --dali-dynamic 1,0 --stall-repeats 2 \
    --stall-profile 8 --stall-steps 60 --tag stall-graphs-api
  step 200 python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 1 --warmup 3 --stall --compile model \
    --stall-backends dali --max-ahead 2 --dali-dynamic 1,0 --stall-repeats 2 --stall-steps 60 --tag stall-legacy
  ;;
L14)  # L13: ~300 cudaEventSynchronize per step in the decoders, the longest 31 ms (a wait on queued training
      # work, not on SMs): streams aliased onto CUDA's 8 hardware queues? 32 connections instead
  export CUDA_VISIBLE_DEVICES=0 CUDA_DEVICE_MAX_CONNECTIONS=32
  step 300 python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 1 --warmup 3 --stall --compile model \
    --compile-mode reduce-overhead --stall-backends dali,nvjpeg --max-ahead 2 --stall-repeats 2 \
    --stall-profile 8 --stall-steps 60 --tag stall-graphs-conn32
  step 200 python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 1 --warmup 3 --stall --compile model \
    --stall-backends dali,nvjpeg --max-ahead 2 --stall-repeats 2 --stall-steps 60 --tag stall-conn32
  ;;
L15)  # the code's default now (bench loaders / engine.run call loaders.prepare_cuda: 32 queues) vs 8 in the same call
  export CUDA_VISIBLE_DEVICES=0
  step 200 python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 1 --warmup 3 --stall --compile model \
    --compile-mode reduce-overhead --stall-backends dali --max-ahead 2 --stall-repeats 3 --stall-steps 60 --tag stall-graphs-q32
  step 130 env CUDA_DEVICE_MAX_CONNECTIONS=8 python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 1 \
    --warmup 3 --stall --compile model --compile-mode reduce-overhead --stall-backends dali --max-ahead 2 --stall-steps 60 \
    --tag stall-graphs-q8
  ;;
L16)  # the stall in engine.run's own loop (CUDA graphs, dali); the bench stall with nvjpeg decoding one batch ahead
  export CUDA_VISIBLE_DEVICES=0
  step 260 python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 2 --warmup 5 --stall-engine \
    --stall-backends dali --compile model --compile-mode reduce-overhead --stall-steps 80 --tag engine-stall
  step 200 python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 1 --warmup 3 --stall --compile model \
    --compile-mode reduce-overhead --stall-backends nvjpeg --nvjpeg-ahead 1 --max-ahead 2 --stall-repeats 2 \
    --stall-steps 60 --tag stall-graphs-nvahead
  ;;
L17)  # loader throughput, 3 interleaved rounds of 4 s per variant: 32 CUDA queues (the default now) vs 8;
      # nvjpeg decoding one batch ahead vs in line
  export CUDA_VISIBLE_DEVICES=0
  T="python3 -m bench loaders --backends dali,nvjpeg --nvjpeg-ahead 1,0 --workers 2 --seconds 4 --warmup 10 --repeats 3"
  step 235 $T --tag q32
  step 235 env CUDA_DEVICE_MAX_CONNECTIONS=8 $T --tag q8
  ;;
K4)  # MAE kernels launched with programmatic dependent launch (Hopper) vs without (variant ENABLED=False);
     # then the MAE ViT-L step, Triton kernels vs SDPA/torch, in the same run
  step 300 python3 -m bench kernels --only mae --mae-variants --tag mae-pdl
  step 270 python3 -m bench train --recipes recipes/vit_l_mae.yaml --batch 256 --variants engine-triton engine-torch \
    --steps 8 --warmup 3 --tag pdl
  ;;
L18)  # engine.run's stall without CUDA graphs (its default compile mode); DALI's stream policies (throughput)
  export CUDA_VISIBLE_DEVICES=0
  step 250 python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 2 --warmup 5 --stall-engine \
    --stall-backends dali,nvjpeg --compile model --stall-steps 80 --tag engine-stall-nographs
  step 150 python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 4 --warmup 10 --repeats 2 \
    --dali-streams backend,single,operator --tag dali-streams
  ;;
K5)  # the engine's default compile mode now (auto: CUDA graphs for the one-GPU MAE step) vs torch's default, same
     # run; the MAE kernels with and without programmatic dependent launch again (a second sample)
  T="python3 -m bench train --recipes recipes/vit_l_mae.yaml --batch 256 --steps 8 --warmup 3"
  step 200 $T --variants engine-triton engine-torch --tag auto
  step 120 $T --variants engine-triton --compile-mode default --tag default
  step 150 python3 -m bench kernels --only mae --mae-variants --tag mae-pdl-2
  ;;
K6)  # next: the fixed-pos mask backward at its new default (8 x WALK_PROGRAMS programs; measured so far only as
     # the WALK_PROGRAMS=1024 variant), three times for the spread
  for i in 1 2 3; do step 150 python3 -m bench kernels --only mae --tag mae-walk8-$i; done
  ;;
K7)  # attention at N = 1374 (0.93x cuDNN): the backward's neighbours of its winner swept (deeper pipelines, one
     # tail tile, other dQ tiles), timed against every SDPA backend in the same run; then the mask at its new default
  step 360 python3 -m bench kernels --only attention --tune --shapes dinov2-g518-n1374-d64 --tag tune-1374
  for i in 1 2; do step 110 python3 -m bench kernels --only mae --tag mae-walk8-$i; done
  ;;
L19)  # dali throughput vs DALI's prefetch queue depth and thread count (3 interleaved rounds each): 8 CUDA queues
      # (decode-only jobs), then the training default of 32
  export CUDA_VISIBLE_DEVICES=0
  T="python3 -m bench loaders --backends dali --workers 2 --seconds 4 --warmup 10 --repeats 3"
  step 330 env CUDA_DEVICE_MAX_CONNECTIONS=8 $T --dali-queue 2,3,4 --dali-threads 4,6 --tag dali-q8-depth
  step 200 $T --dali-queue 2,3 --dali-threads 4 --tag dali-q32-depth
  ;;
L20)  # attention N = 1374 again (0.96x cuDNN): 128-row dK/dV sub-tiles, 8-warp programs, register caps; then
      # dali at 512 px (19-20k img/s vs 20k wanted): a share of the JPEGs on the CUDA decoder, more DALI threads
  export CUDA_VISIBLE_DEVICES=0
  step 200 python3 -m bench kernels --only attention --tune --shapes dinov2-g518-n1374-d64 --tag tune-1374-2
  step 260 env CUDA_DEVICE_MAX_CONNECTIONS=8 python3 -m bench loaders --backends dali --sizes 512 --workers 2 --seconds 4 \
    --warmup 10 --repeats 3 --hw-decoder-load 1.0,0.95,0.9 --dali-threads 4,6 --tag dali-512-hw
  ;;
K8)  # L20: a register cap of 168 per thread (3 programs per SM) sped the N = 1374 dK/dV pass up 3.8 %; each
     # shape's current configs under caps of 128 / 168 on the forward and on each backward pass
  step 300 python3 -m bench kernels --only attention --tune-regs \
    --shapes vit-l-n197-d64,dinov2-g-n261-d64,vit-g-n257-d88,dinov2-g518-n1374-d64 --tag tune-regs
  ;;
P1)  # dali at 512 px runs 84 % of its decode half alone (19.1k vs 22.7k img/s): where the loader's Python threads
     # spend the time (py-spy, carried as a wheel: all threads with idle, then only the thread holding the GIL).
     # First try (2026-11-28): sampled from 14 s on, both windows fell in the start-up (imports, shard writing,
     # DALI's pipeline build: ~20 s on that machine), so it now samples from 32 s into a 44 s measurement
  export CUDA_VISIBLE_DEVICES=0 CUDA_DEVICE_MAX_CONNECTIONS=8
  python3 -m pip install -q --no-index --no-deps --target /tmp/pyspy .whl/py_spy-*.whl
  SPY=/tmp/pyspy/bin/py-spy
  python3 -m bench loaders --backends dali --sizes 512 --workers 2 --seconds 44 --warmup 10 --tag pyspy-512 \
    > "$OUT/bench-P1.log" 2>&1 &
  PID=$!
  sleep 32
  $SPY dump --pid $PID > "$OUT/pyspy-dump-512.txt" 2>&1
  $SPY record --pid $PID --duration 6 --rate 250 --threads --idle --nonblocking --format raw \
    -o "$OUT/pyspy-512-all.txt" > "$OUT/pyspy-P1.log" 2>&1
  $SPY record --pid $PID --duration 6 --rate 250 --threads --gil --nonblocking --format raw \
    -o "$OUT/pyspy-512-gil.txt" >> "$OUT/pyspy-P1.log" 2>&1
  wait $PID
  tail -5 "$OUT/bench-P1.log"; tail -5 "$OUT/pyspy-P1.log"
  ;;
L21)  # dali at 512 px: where the producer thread's time goes (DaliLoader.timing: waiting for the workers' next
      # batch vs in DALI's run vs the copy to torch, ms per batch, printed under each run) and two feeds that
      # touch the JPEG bytes before DALI does: DALI's own copy (no_copy 0) and a pinned staging copy (stage)
  export CUDA_VISIBLE_DEVICES=0 CUDA_DEVICE_MAX_CONNECTIONS=8
  L="python3 -m bench loaders --backends dali --sizes 512 --seconds 4 --warmup 10"
  step 300 $L --workers 2 --repeats 3 --dali-no-copy 1,0 --dali-stage 0,1 --tag dali-512-stage
  step 100 $L --workers 3 --repeats 2 --tag dali-512-w3
  ;;
L22)  # L21 found DALI's source waiting ~3 ms per batch for the workers at 512 px: the shard sets were 8,000 rows
      # (31 batches, an epoch every 0.4 s), so each run crossed ~10 epoch boundaries (workers restart, DALI drains).
      # The loaders at the new default sets (100k rows at 256 px, 64k at 512: ~3 s epochs) with the PIL baseline at
      # the same cores, then 512 px at the old 8,000 rows in the same call; rows carry epoch_boundary_ms
  export CUDA_VISIBLE_DEVICES=0 CUDA_DEVICE_MAX_CONNECTIONS=8
  L="python3 -m bench loaders --workers 2 --seconds 4 --warmup 10 --repeats 3"
  step 420 $L --backends dali,nvjpeg,pil --sizes 256,512 --tag steady
  step 120 $L --backends dali --sizes 512 --images 8000 --tag rows8k
  ;;
L23)  # L22 ran dali slower at 256 px (23.5k, DALI's own run 9-10 ms per batch) than earlier calls with 20k rows and
      # dali alone (29-35k): the set size or the nvjpeg / PIL runs interleaved? dali alone, paired in one call:
      # 256 px at 20k and 100k rows, 512 px at 64k and 8k rows
  export CUDA_VISIBLE_DEVICES=0 CUDA_DEVICE_MAX_CONNECTIONS=8
  L="python3 -m bench loaders --backends dali --workers 2 --seconds 4 --warmup 10 --repeats 3"
  step 100 $L --sizes 256 --images 20000 --tag dali-256-rows20k
  step 130 $L --sizes 256 --tag dali-256-rows100k
  step 120 $L --sizes 512 --tag dali-512-rows64k
  step 90 $L --sizes 512 --images 8000 --tag dali-512-rows8k
  ;;
L24)  # epoch starts with streaming's barrier polling every 1 ms (was: its file lock every 50 ms, its wait loop every
      # 7 ms; ~200 ms per epoch start on a 2-core CPU, ~30 ms after): 512 px at the old 8,000 rows (boundaries every
      # 0.4 s: 19.1k img/s, +68-94 ms each before), then the default sets with the PIL baseline
  export CUDA_VISIBLE_DEVICES=0 CUDA_DEVICE_MAX_CONNECTIONS=8
  L="python3 -m bench loaders --workers 2 --seconds 4 --warmup 10 --repeats 3"
  step 100 $L --backends dali --sizes 512 --images 8000 --tag dali-512-rows8k-fastbarrier
  step 300 $L --backends dali,pil --sizes 256,512 --tag fastbarrier
  ;;
L25)  # the #4 figures again at the new shard sets, built once (--data-dir): dali / nvjpeg / PIL, 3 rounds; then dali's
      # CPU threads 2 vs 4 at both sizes (512 px used up to 4.1 cores in L24; 2 threads were as fast at 512 px on the
      # old sets, L3 sweep), 3 rounds
  export CUDA_VISIBLE_DEVICES=0 CUDA_DEVICE_MAX_CONNECTIONS=8
  L="python3 -m bench loaders --workers 2 --seconds 4 --warmup 10 --repeats 3 --data-dir /tmp/bench-data"
  step 330 $L --backends dali,nvjpeg,pil --tag new-sets
  step 200 $L --backends dali --dali-threads 4,2 --tag dali-threads
  ;;
T4)  # K21: at the MAE ViT-g encoder's N = 65 the split default's 128-row query blocks ran the forward 3x slower than
     # 64-row ones; with TUNED[(65, 88)] and a default of 64-row blocks up to N = 128, T3 again
  step 560 python3 -m bench train --recipes recipes/vit_g_mae.yaml --batch 64 --variants engine-triton engine-torch \
    --steps 6 --warmup 2 --tag vitg-split-n65
  ;;
K38)  # K37's tail groups (under register caps) in TUNED for N = 197 / 261 (d = 64) and 197 (d = 32). Do they also win
      # where the d <= 64 bucket default runs (DINOv2 ViT-L/14's N = 257, N = 1374)? Then every shape with the defaults
  step 200 python3 -m bench kernels --only attention --tune-tail-groups \
    --shapes dinov2-l-n257-d64,dinov2-g518-n1374-d64 --tag tune-tailg-bucket
  step 200 python3 -m bench kernels --only attention --tag defaults-tailg
  ;;
K55)  # the defaults after K52 (the forward's lean softmax): every attention shape and the MAE ops
  step 300 python3 -m bench kernels --tag defaults-lean
  ;;
K61)  # the MAE ViT-L step after kernels.attention's "auto" took our kernel up to 1,374 tokens (was 128: the engine's
      # decoder at N = 197 ran on SDPA); ...-2026-11-29-large-vitl-auto1374.json
  step 450 python3 -m bench train --recipes recipes/vit_l_mae.yaml --batch 256 --variants engine-triton engine-torch \
    --steps 8 --warmup 3 --tag vitl-auto1374
  ;;
K62)  # under Triton 3.8.0 (torch 2.14's): needs /tmp/site38 prepared as kernels/README.md "Under Triton 3.8" says
      # (three calls carrying the wheel's parts first). The 3.6-tuned defaults gave ...-triton38.json; with
      # POW2_TAIL_GROUPS (off from 3.7) ...-triton38-defaults.json; then WS and the TMA forward re-timed there
  [ -d /tmp/site38/triton ] || { echo "no /tmp/site38: see kernels/README.md, Under Triton 3.8"; exit 3; }
  PYTHONPATH=/tmp/site38:. step 300 python3 -m bench kernels --tag triton38-defaults
  PYTHONPATH=/tmp/site38:. step 260 python3 -m bench kernels --only attention --tune-ws \
    --shapes vit-l-n197-d64,dinov2-g-n261-d64,vit-g-n257-d88 --tag triton38-tune-ws
  PYTHONPATH=/tmp/site38:. step 230 python3 -m bench kernels --only attention --tune-tma \
    --shapes vit-l-n197-d64,dinov2-g-n261-d64 --tag triton38-tune-tma
  step 200 python3 -m bench kernels --only attention --tag triton36-beside
  ;;
K63)  # the DINOv2 ViT-L step with kernels.attention's "auto" limit at 128 and at 1,374 tokens, one after the other
      # (...-2026-11-29-large-dinov2-dinov2-ab-auto{128,1374}.json). The same call's ad hoc scripts, whose source
      # their JSONs hold: the warp-specialized prototype forward (...-ws-device-desc.json: python3 ws_fwd.py bench OUT)
      # and the eager launch's CPU split (...-launch-cpu.json: python3 launch_prof.py OUT)
  # python3 -m bench with kernels.attn.AUTO_TRITON_MAX_SEQLEN set to $1 first
  AUTO="import sys, runpy, kernels.attn as A; A.AUTO_TRITON_MAX_SEQLEN = int(sys.argv[1]); \
sys.argv = ['bench'] + sys.argv[2:]; runpy.run_module('bench', run_name='__main__')"
  DINO="train --recipes recipes/vit_l_dinov2.yaml --batch 32 --steps 20 --warmup 3"
  for lim in 128 1374; do
    step 250 python3 -c "$AUTO" $lim $DINO --variants engine-triton engine-torch --tag dinov2-ab-auto$lim
  done
  # then three interleaved rounds, engine-triton only (...-large-dinov2-ab3.json gathers them)
  for round in 1 2 3; do for lim in 1374 128; do
    step 140 python3 -c "$AUTO" $lim $DINO --variants engine-triton --tag dinov2-ab3-auto$lim-r$round
  done; done
  ;;
K64)  # under Triton 3.8.0 again (/tmp/site38 as for K62): neighbouring blocks at N = 261 and d = 88, whose d = 88 dQ-pass
      # winner became TUNED_NEWER_TRITON; then the defaults under 3.8 and under the stock 3.6, one after the other
  [ -d /tmp/site38/triton ] || { echo "no /tmp/site38: see kernels/README.md, Under Triton 3.8"; exit 3; }
  for s in dinov2-g-n261-d64 vit-g-n257-d88 vit-l-n197-d64 mae-l-dec-n197-d32 dinov2-g518-n1374-d64 vit-h-n257-d80 \
      mae-g-enc-n65-d88; do
    PYTHONPATH=/tmp/site38:. step 190 python3 -m bench kernels --only attention --tune-blocks --shapes $s \
      --tag triton38-tune-blocks-$s
  done
  PYTHONPATH=/tmp/site38:. step 230 python3 -m bench kernels --only attention --tag triton38-defaults-2
  step 230 python3 -m bench kernels --only attention --tag triton36-defaults-2
  ;;
K65)  # L2 eviction hints on the masking kernels: the EVICT variant (then one flag; now MASK_EVICT / UNMASK_EVICT) and
      # two unmask-only repeats, then the defaults (the unmask with hints) under 3.8 (/tmp/site38 as for K62) and 3.6
  step 280 python3 -m bench kernels --only mae --mae-variants mask,unmask --tag mae-evict
  for i in 1 2; do step 120 python3 -m bench kernels --only mae --mae-variants unmask --tag mae-evict-u$i; done
  [ -d /tmp/site38/triton ] && PYTHONPATH=/tmp/site38:. step 100 python3 -m bench kernels --only mae --tag triton38-mae-evict
  step 100 python3 -m bench kernels --only mae --tag triton36-mae-evict
  ;;
K66)  # the unmask forward's 16-bit adds (UNMASK_NATIVE_ADD): bit-exactness on the GPU (an ad hoc script, its source in
      # ...-2026-11-29-unmask-native.json), then the unmask variants under 3.8 (/tmp/site38 as for K62) and 3.6
  [ -d /tmp/site38/triton ] && PYTHONPATH=/tmp/site38:. step 60 python3 -m bench kernels --only mae --mae-variants unmask \
    --tag triton38-unmask-native
  step 50 python3 -m bench kernels --only mae --mae-variants unmask --tag triton36-unmask-native
  ;;
K67)  # (UNMASK_FOLD and its bench variant were removed after K67, slower; kernels/masking.py describes the fold)
      # the unmask backward's sums reduced by the walk's last programs: the unmask variants under 3.8 (/tmp/site38 as for
      # K62) and 3.6, ...-2026-11-29-{triton38,triton36}-unmask-fold.json
  [ -d /tmp/site38/triton ] && PYTHONPATH=/tmp/site38:. step 80 python3 -m bench kernels --only mae --mae-variants unmask \
    --tag triton38-unmask-fold
  step 70 python3 -m bench kernels --only mae --mae-variants unmask --tag triton36-unmask-fold
  ;;
K69)  # every default under the stock Triton after K68's fix, then the unmask's sum shapes / walk programs and the
      # fixed-pos walk with and without PDL (UNMASK_FIXED_WALK_PDL) under 3.8 (/tmp/site38 as for K62, three runs) and 3.6
  step 420 python3 -m bench kernels --tag triton36-defaults-3
  for i in 1 2 3; do
    [ -d /tmp/site38/triton ] && PYTHONPATH=/tmp/site38:. step 70 python3 -m bench kernels --only mae --mae-variants unmask \
      --tag triton38-unmask-walkpdl-$i
  done
  step 60 python3 -m bench kernels --only mae --mae-variants unmask --tag triton36-unmask-walkpdl-1
  ;;
K70)  # the learnable-pos unmask walk at 8 samples a step in one wave (LEARNABLE_WALK_VARIANTS, in --mae-variants unmask)
      # under 3.8 (/tmp/site38 as for K62, two runs) and 3.6
  for i in 1 2; do
    [ -d /tmp/site38/triton ] && PYTHONPATH=/tmp/site38:. step 70 python3 -m bench kernels --only mae --mae-variants unmask \
      --tag triton38-unmask-lwalk-$i
  done
  step 60 python3 -m bench kernels --only mae --mae-variants unmask --tag triton36-unmask-lwalk
  ;;
K71)  # DINOv2's packed crops: our grouped launches (attention_qkv(seq_groups=...)) and our varlen launch vs SDPA per crop
      # size; then the DINOv2 steps with our kernels vs SDPA + torch (the grouped attention and the vector-form
      # Sinkhorn-Knopp in both variants' objective)
  step 120 python3 -m bench kernels --only packed --tag packed
  step 330 python3 -m bench train --recipes recipes/vit_s_dinov2.yaml recipes/vit_l_dinov2.yaml --batch 256 32 \
    --steps 12 --warmup 3 --variants engine-triton engine-torch --tag dinov2-grouped
  ;;
K72)  # DINOv2's iBOT Sinkhorn targets (kept as factors) and cross-entropy in our kernels (measured 2026-11-29): the
      # kernels vs the torch form, the switch alone in one process (bench ab), the DINOv2 steps triton vs torch
  step 150 python3 -m bench kernels --only soft-ce --tag sinkhorn-ce
  step 150 python3 -m bench ab --recipe recipes/vit_s_dinov2.yaml --batch 256 --switch fused_ce
  step 250 python3 -m bench train --recipes recipes/vit_s_dinov2.yaml recipes/vit_l_dinov2.yaml --batch 256 32 \
    --steps 12 --warmup 3 --variants engine-triton engine-torch --tag dinov2-factored
  ;;
K77)  # session 24 (measured 2026-11-30; one H200 unless said): the MAE ops at the ViT-L recipe's micro batch (512)
      # beside 256 (unmask 74.2-74.6 % of copy at 512); the soft-ce plumbing after session 23's review; DINOv2 ViT-S
      # b256 after the iBOT masks became row bit masks, profiled (1,552 img/s; the idle-gap table on a real trace);
      # DINOv2 ViT-L at micro batch 32 vs 64 (176 vs 209 img/s: the recipe takes 64); ViT-g DINOv2's first GPU run
      # (47.2 img/s, 27.0 GiB). Python's GC in the step came from an ad hoc script (kept in its result JSONs)
  step 200 python3 -m bench kernels --only mae --mae-batch 256 512 --tag s24-mae-b512
  step 150 python3 -m bench kernels --only soft-ce --quick --tag s24-softce
  step 330 python3 -m bench train --recipes recipes/vit_s_dinov2.yaml --batch 256 --steps 12 --warmup 5 \
    --variants engine-triton --gpus 1 --profile --tag s24-dino-s-prof
  step 560 python3 -m bench train --recipes recipes/vit_l_dinov2.yaml recipes/vit_l_dinov2.yaml --batch 32 64 \
    --steps 20 --warmup 8 --variants engine-triton --tag s24-l-b32-b64
  step 300 python3 -m bench train --recipes recipes/vit_g_dinov2.yaml --steps 8 --warmup 4 --variants engine-triton \
    --override model.compile_tuning=false --tag s24-g
  ;;
F4)  # session 24, nvidia-h200-x2: DINOv2 ViT-L (micro batch 64) under FSDP2, 1 vs 2 GPUs, then profiled on 2.
     # Measured 2026-11-30: 207 vs 411 img/s (1.98x) on a warm machine; 1.81x in a first, cold call
  step 300 python3 -m bench train --recipes recipes/vit_l_dinov2.yaml --gpus 1 2 --steps 15 --warmup 8 \
    --variants engine-triton --tag s24-fsdp-2
  step 330 python3 -m bench train --recipes recipes/vit_l_dinov2.yaml --gpus 2 --steps 8 --warmup 5 \
    --variants engine-triton --profile --tag s24-fsdp-prof
  ;;
G25)  # session 25, nvidia-h200-x2: the giant recipes' activation checkpointing. The dry run (fixed in session 24) says
      # MAE ViT-g fits without it (24.9 GiB at micro 64, ~53 at 256) and DINOv2 ViT-g at ac_every=2 (62 GiB, micro 32)
      # or without it at micro 16 (59 GiB). Two processes at once, one per GPU; each compares in-process against a
      # baseline row. GPU 0: MAE recipe (AC, 64) vs no AC at 256; GPU 1: no AC at 64 and at 128.
  ( export CUDA_VISIBLE_DEVICES=0 PART=G25-gpu0
    step 560 python3 -m bench train --recipes recipes/vit_g_mae.yaml \
      "recipes/vit_g_mae.yaml::model.activation_checkpointing=false::train.micro_batch=256" \
      --variants engine-triton --steps 6 --warmup 2 --tag s25-g-ac ) &
  ( export CUDA_VISIBLE_DEVICES=1 PART=G25-gpu1
    step 560 python3 -m bench train --recipes "recipes/vit_g_mae.yaml::model.activation_checkpointing=false" \
      "recipes/vit_g_mae.yaml::model.activation_checkpointing=false::train.micro_batch=128" \
      --variants engine-triton --steps 6 --warmup 2 --tag s25-g-noac ) &
  wait
  ;;
G26)  # session 25, nvidia-h200-x2: DINOv2 ViT-g, the recipe (AC on every block, micro 32) against ac_every=2 (GPU 0),
      # and without AC at micro 16 against AC at micro 64 (GPU 1); compile tuning off to save compile time
  ( export CUDA_VISIBLE_DEVICES=0 PART=G26-gpu0
    step 560 python3 -m bench train --recipes recipes/vit_g_dinov2.yaml "recipes/vit_g_dinov2.yaml::model.ac_every=2" \
      --variants engine-triton --steps 8 --warmup 4 --override model.compile_tuning=false --tag s25-g-dino-ac2 ) &
  ( export CUDA_VISIBLE_DEVICES=1 PART=G26-gpu1
    step 560 python3 -m bench train \
      "--recipes" "recipes/vit_g_dinov2.yaml::model.activation_checkpointing=false::train.micro_batch=16" \
      "recipes/vit_g_dinov2.yaml::train.micro_batch=64" \
      --variants engine-triton --steps 8 --warmup 4 --override model.compile_tuning=false --tag s25-g-dino-noac ) &
  wait
  ;;
G27)  # session 25, nvidia-h200-x2: the ViT-H recipes (never measured before) with and without activation checkpointing:
      # MAE (GPU 0: the recipe, AC at 64, vs no AC at 256) and DINOv2 (GPU 1: the recipe, AC at 32, vs no AC at 32)
  ( export CUDA_VISIBLE_DEVICES=0 PART=G27-gpu0
    step 560 python3 -m bench train --recipes recipes/vit_h_mae.yaml \
      "recipes/vit_h_mae.yaml::model.activation_checkpointing=false::train.micro_batch=256" \
      --variants engine-triton --steps 6 --warmup 2 --tag s25-h-ac ) &
  ( export CUDA_VISIBLE_DEVICES=1 PART=G27-gpu1
    step 560 python3 -m bench train --recipes recipes/vit_h_dinov2.yaml \
      "recipes/vit_h_dinov2.yaml::model.activation_checkpointing=false" \
      --variants engine-triton --steps 8 --warmup 4 --override model.compile_tuning=false --tag s25-h-dino-ac ) &
  wait
  ;;
G28)  # session 25, nvidia-h200-x2: the giant recipes as changed after G25 / G26 (MAE: no AC, micro 256; DINOv2: AC on
      # every 2nd block, micro 32) under FSDP2 on 2 GPUs
  step 280 python3 -m bench train --recipes recipes/vit_g_mae.yaml --gpus 2 --steps 8 --warmup 3 \
    --variants engine-triton --tag s25-g-mae-fsdp
  step 280 python3 -m bench train --recipes recipes/vit_g_dinov2.yaml --gpus 2 --steps 8 --warmup 4 \
    --variants engine-triton --override model.compile_tuning=false --tag s25-g-dino-fsdp
  ;;
G29)  # session 25, nvidia-h200-x2: the small MAE recipes' micro batch (ViT-T / ViT-S never measured before; ViT-B
      # measured at 256 only): GPU 0 ViT-B at 256 / 512 / 1024, GPU 1 ViT-T and ViT-S at 512 / 2048
  ( export CUDA_VISIBLE_DEVICES=0 PART=G29-gpu0
    step 560 python3 -m bench train --recipes recipes/vit_b_mae.yaml recipes/vit_b_mae.yaml recipes/vit_b_mae.yaml \
      --batch 256 512 1024 --variants engine-triton --steps 8 --warmup 3 --tag s25-b-batch ) &
  ( export CUDA_VISIBLE_DEVICES=1 PART=G29-gpu1
    step 560 python3 -m bench train --recipes recipes/vit_t_mae.yaml recipes/vit_t_mae.yaml recipes/vit_s_mae.yaml \
      recipes/vit_s_mae.yaml --batch 512 2048 512 2048 --variants engine-triton --steps 8 --warmup 3 --tag s25-ts-batch ) &
  wait
  ;;
G30)  # session 25, nvidia-h200-x2: the MAE ViT-g recipe (no AC, micro 256) on 1 and 2 GPUs with 4 micro-batches a step
      # (one gradient reduction a step, as a run at the global batch does), against G28's one micro-batch a step
  step 560 python3 -m bench train --recipes recipes/vit_g_mae.yaml --gpus 1 2 --accum 4 --steps 5 --warmup 3 \
    --variants engine-triton --tag s25-g-mae-fsdp-accum4
  ;;
G31)  # session 25, one H200 (run as a plain call, not through this script): engine.run on the quickstart recipe with
      # activation checkpointing on (its note names a lighter setting), then MAE ViT-S at micro 512 vs 1024
  step 120 python3 -m engine.run recipes/quickstart.yaml data.shards=synthetic model.activation_checkpointing=true \
    run.dir=/tmp/qs log.progress=false --stop-after-steps 20
  step 170 python3 -m bench train --recipes recipes/vit_s_mae.yaml recipes/vit_s_mae.yaml --batch 512 1024 \
    --variants engine-triton --steps 8 --warmup 3 --tag s25-s-batch
  ;;
G32)  # session 26, nvidia-h200-x2: GPU 0 DINOv2 ViT-g at the recipe's every 2nd block vs every 3rd (the dry run's
      # suggestion on 1 GPU, 64.3 GiB estimated), one process; GPU 1 where the MAE steps' peak memory goes
      # (bench._probe_memory: per-step peaks and the allocator's history at the peak), ViT-L at 1 and 2 micro-batches a
      # step, then ViT-g at 1
  ( export CUDA_VISIBLE_DEVICES=0 PART=G32-gpu0
    step 570 python3 -m bench train --recipes recipes/vit_g_dinov2.yaml "recipes/vit_g_dinov2.yaml::model.ac_every=3" \
      --variants engine-triton --steps 8 --warmup 4 --override model.compile_tuning=false --tag s26-g-dino-ac3 ) &
  ( export CUDA_VISIBLE_DEVICES=1 PART=G32-gpu1
    R=bench/results/memprobe-nvidia-h200-2026-11-30-s26
    step 150 python3 -m bench._probe_memory recipes/vit_l_mae.yaml --batch 256 --accum 1 \
      --override model.compile_tuning=false --out $R-l-b256-a1.json
    step 150 python3 -m bench._probe_memory recipes/vit_l_mae.yaml --batch 256 --accum 2 \
      --override model.compile_tuning=false --out $R-l-b256-a2.json
    step 250 python3 -m bench._probe_memory recipes/vit_g_mae.yaml --batch 256 --accum 1 \
      --override model.compile_tuning=false --out $R-g-b256-a1.json ) &
  wait
  ;;
G33)  # session 26, nvidia-h200-x2: what the recipes' steps hold on the card (bench._probe_memory: peak reserved, held
      # after empty_cache, by pool) against the dry run with the graphed step's gradient sums: GPU 0 DINOv2 ViT-g at
      # every 3rd block and MAE ViT-B at micro 1024, GPU 1 MAE ViT-g and ViT-L at their recipes' micro batches, with
      # accumulation as on one GPU
  ( export CUDA_VISIBLE_DEVICES=0 PART=G33-gpu0
    R=bench/results/memprobe-nvidia-h200-2026-11-30-s26
    step 280 python3 -m bench._probe_memory recipes/vit_g_dinov2.yaml --batch 32 --accum 2 --steps 6 \
      --override model.compile_tuning=false model.ac_every=3 --out $R-g-dino-ac3-b32-a2.json
    step 200 python3 -m bench._probe_memory recipes/vit_b_mae.yaml --batch 1024 --accum 2 \
      --override model.compile_tuning=false --out $R-b-b1024-a2.json ) &
  ( export CUDA_VISIBLE_DEVICES=1 PART=G33-gpu1
    R=bench/results/memprobe-nvidia-h200-2026-11-30-s26
    step 250 python3 -m bench._probe_memory recipes/vit_g_mae.yaml --batch 256 --accum 4 \
      --override model.compile_tuning=false --out $R-g-b256-a4.json
    step 200 python3 -m bench._probe_memory recipes/vit_l_mae.yaml --batch 512 --accum 4 \
      --override model.compile_tuning=false --out $R-l-b512-a4.json ) &
  wait
  ;;
G34)  # session 26, nvidia-h200-x2: what the giant recipes hold per GPU under FSDP2 on 2 GPUs (bench._probe_memory under
      # torchrun) against the dry run for 2 GPUs: MAE ViT-g at micro 256 with 4 micro-batches a step, DINOv2 ViT-g at
      # micro 32, every 3rd block checkpointed, 2 a step
  R=bench/results/memprobe-nvidia-h200-2026-11-30-s26
  TR="python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m bench._probe_memory"
  step 280 $TR recipes/vit_g_mae.yaml --batch 256 --accum 4 --steps 8 --override model.compile_tuning=false \
    --out $R-g-b256-a4-fsdp2.json
  step 300 $TR recipes/vit_g_dinov2.yaml --batch 32 --accum 2 --steps 6 --override model.compile_tuning=false \
    --out $R-g-dino-ac3-b32-a2-fsdp2.json
  ;;
G35)  # session 26, nvidia-h200-x2: DINOv2 ViT-g (the recipe: every 3rd block, micro 32) under FSDP2 on 2 GPUs with the
      # allocator's default segments vs expandable segments (PYTORCH_CUDA_ALLOC_CONF): throughput and the peak held;
      # G34 found 67.0 GiB held against 59.8 allocated with the default
  T="python3 -m bench train --recipes recipes/vit_g_dinov2.yaml --gpus 2 --steps 6 --warmup 3 --variants engine-triton"
  step 280 $T --override model.compile_tuning=false --tag s26-g-dino-fsdp2
  step 280 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True $T --override model.compile_tuning=false \
    --tag s26-g-dino-fsdp2-expandable
  ;;
G36)  # session 26, nvidia-h200-x2: the smaller DINOv2 recipes' held memory against the dry run (bench._probe_memory,
      # two micro-batches a step as on one GPU, compile tuning off): GPU 0 ViT-L at 64, GPU 1 ViT-S at 256 and ViT-B
      # at 128
  R=bench/results/memprobe-nvidia-h200-2026-11-30-s26
  P="python3 -m bench._probe_memory"
  ( export CUDA_VISIBLE_DEVICES=0 PART=G36-gpu0
    step 280 $P recipes/vit_l_dinov2.yaml --batch 64 --accum 2 --steps 6 --override model.compile_tuning=false \
      --out $R-l-dino-b64-a2.json ) &
  ( export CUDA_VISIBLE_DEVICES=1 PART=G36-gpu1
    step 200 $P recipes/vit_s_dinov2.yaml --batch 256 --accum 2 --steps 6 --override model.compile_tuning=false \
      --out $R-s-dino-b256-a2.json
    step 200 $P recipes/vit_b_dinov2.yaml --batch 128 --accum 2 --steps 6 --override model.compile_tuning=false \
      --out $R-b-dino-b128-a2.json ) &
  wait
  ;;
G37)  # session 26, nvidia-h200-x2: DINOv2 ViT-S (the recipe, micro 256; compile tuning off) with the allocator's
      # default segments vs expandable segments, 20 timed steps each, crosswise on the two GPUs: G36 saw its held
      # memory grow by ~7.5 GiB every other step (55 -> 78 GiB in 6 steps) at a steady 48.6 GiB allocated
  T="python3 -m bench train --recipes recipes/vit_s_dinov2.yaml --steps 20 --warmup 5 --variants engine-triton"
  E="env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
  ( export CUDA_VISIBLE_DEVICES=0 PART=G37-gpu0
    step 250 $T --override model.compile_tuning=false --tag s26-s-dino-default-gpu0
    step 250 $E $T --override model.compile_tuning=false --tag s26-s-dino-expandable-gpu0 ) &
  ( export CUDA_VISIBLE_DEVICES=1 PART=G37-gpu1
    step 250 $E $T --override model.compile_tuning=false --tag s26-s-dino-expandable-gpu1
    step 250 $T --override model.compile_tuning=false --tag s26-s-dino-default-gpu1 ) &
  wait
  ;;
G38)  # session 26, one H200: DINOv2 ViT-S with train.allocator auto (expandable segments, set by the Trainer at run
      # time): speed and held memory against G37's environment-variable runs; the probe's per-step hold
  R=bench/results/memprobe-nvidia-h200-2026-11-30-s26
  step 200 python3 -m bench train --recipes recipes/vit_s_dinov2.yaml \
    "recipes/vit_s_dinov2.yaml::train.allocator=default" --steps 20 --warmup 5 --variants engine-triton \
    --override model.compile_tuning=false --tag s26-s-dino-allocator
  step 200 python3 -m bench._probe_memory recipes/vit_s_dinov2.yaml --batch 256 --accum 2 --steps 6 \
    --override model.compile_tuning=false --out $R-s-dino-b256-a2-expandable.json
  ;;
K76)  # session 23: the soft-ce rows on the GPU after session 22's review, with the new "softmax+ce" rows (DINO's softmax
      # centering as factors, kernels.softmax_targets); the iBOT switch alone under centering: softmax (compile tuning
      # off to save its ~100 s); MAE ViT-L re-timed with the day's defaults. Measured 2026-11-29: softmax+ce 7.78x /
      # 7.50x, the ViT-S step 1.21x, MAE ViT-L 3,275 vs 3,022 img/s
  step 200 python3 -m bench kernels --only soft-ce --tag s23-softmax
  step 170 python3 -m bench ab --recipe recipes/vit_s_dinov2.yaml --batch 256 --switch fused_ce --blocks 4 --steps 5 \
    --override objective.dinov2.centering=softmax model.compile_tuning=false --tag softmax-fused-ce
  step 215 python3 -m bench train --recipes recipes/vit_l_mae.yaml --steps 20 --warmup 8 \
    --variants engine-triton engine-torch --tag s23-mae-l
  # then DINOv2 ViT-B / ViT-L re-timed with the day's defaults (engine-triton only: ~130 s of compile each with tuning):
  # 612 / 190 img/s. The step profiles (train-probe-...-s23-*-profile.json) came from an ad hoc script (see their command)
  step 540 python3 -m bench train --recipes recipes/vit_b_dinov2.yaml recipes/vit_l_dinov2.yaml --batch 128 32 \
    --steps 20 --warmup 8 --variants engine-triton --tag s23-dinov2-bl
  # The student-graph A/Bs (ab-...-student-graph*.json) ran on commit bdd4b49, whose switch was removed after
  ;;
K75)  # DINO's class-token loss by kernels.crop_cross_entropy (measured 2026-11-29): the op with its Sinkhorn vs the torch
      # dino_loss, the switch alone in one process (bench ab --switch fused_dino), then DINOv2 ViT-S with the session's
      # defaults (model.compile_tuning from the DINOv2 recipes: a first compile of ~140 s). Measured: op 8.07x / 4.30x,
      # steps 1.04x (ViT-S b256) / 1.01x (ViT-L b32), ViT-S 1,546 img/s. The compile-tuning A/B itself (four trainers
      # built in turn in one process) and the step curves / copy profile were ad hoc scripts: the result JSONs
      # (train-...-compile-tuning-*.json, train-probe-...-dinov2-*.json) hold their methods
  step 200 python3 -m bench kernels --only soft-ce --tag dino-ce
  step 190 python3 -m bench ab --recipe recipes/vit_s_dinov2.yaml --batch 256 --switch fused_dino
  step 190 python3 -m bench ab --recipe recipes/vit_l_dinov2.yaml --batch 32 --switch fused_dino
  step 300 python3 -m bench train --recipes recipes/vit_s_dinov2.yaml --batch 256 --steps 20 --warmup 8 \
    --variants engine-triton --tag dinov2-s-tuned
  ;;
K74)  # DINOv2 ViT-L b32 was host-bound (185 ms a step, 151 of device time; the profile below): the teacher's pass as a
      # CUDA graph (objective.dinov2.teacher_graph), in one process. Measured 2026-11-29: 1.01x ViT-L, 0.99x ViT-S; off
  step 150 python3 -m bench train --recipes recipes/vit_l_dinov2.yaml --batch 32 --steps 10 --warmup 3 \
    --variants engine-triton --gpus 1 --profile --tag prof-l
  step 150 python3 -m bench ab --recipe recipes/vit_l_dinov2.yaml --batch 32 --switch teacher_graph \
    --override objective.dinov2.teacher_graph=true --tag teacher-graph
  step 100 python3 -m bench ab --recipe recipes/vit_s_dinov2.yaml --batch 256 --switch teacher_graph \
    --override objective.dinov2.teacher_graph=true --tag teacher-graph
  ;;
K73)  # the patch embedding as one matrix product (model.patch_matmul, engine.models.PatchMatmul): cuDNN ran
      # implicit_convolve_sgemm at 2.7 ms a call in the DINOv2 ViT-S profile. The op vs the convolution (cuDNN
      # heuristics and cudnn.benchmark), then the switch alone in one process at DINOv2 ViT-S and MAE ViT-L (CUDA
      # graphs: 10 warm-up steps a setting). Measured 2026-11-29: op 3.2-4.8x, steps 1.04x both; on by default since
  step 120 python3 -m bench kernels --only patch-embed --tag patch-embed
  step 150 python3 -m bench ab --recipe recipes/vit_s_dinov2.yaml --batch 256 --switch matmul \
    --override model.patch_matmul=true --tag patch
  step 200 python3 -m bench ab --recipe recipes/vit_l_mae.yaml --batch 256 --switch matmul --warmup 10 \
    --override model.patch_matmul=true --tag patch
  # DINOv2 ViT-B's recipes/README figure (461 img/s) predates the factored targets
  step 150 python3 -m bench train --recipes recipes/vit_b_dinov2.yaml --batch 128 --steps 12 --warmup 3 \
    --variants engine-triton engine-torch --tag dinov2-b-factored
  ;;
K68)  # TMA descriptors built in autograd's backward thread after the kernels loaded in the main thread (kernels/
      # cuda_context.py): the GPU test, which runs its case in a subprocess with compiled kernels (so pytest itself keeps
      # conftest.py's TRITON_INTERPRET=1 for the test module's import)
  step 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_attention.py -k autograds_thread
  ;;
K60)  # occupancy: Nsight Compute (K51) had 4 forward / 5 dQ-pass programs per SM, limited by registers and shared memory
      # at once. Offline (sm_90) the d = 64 forward's full blocks fit 96 registers without spills and its dQ pass 84: one
      # stage fewer (41 / 33 KB) under those caps fits 5 forward / 6 dQ programs per SM
  step 300 python3 -m bench kernels --only attention --tune-occupancy --tag tune-occupancy \
    --shapes dinov2-g-n261-d64,vit-l-n197-d64,dinov2-l-n257-d64,mae-l-dec-n197-d32,dinov2-g518-n1374-d64
  ;;
K59)  # (--tune-kv-tma and KV_TMA were removed after K59, no gain; commit 6c88da9 has them)
      # the dK/dV programs' key tiles by TMA (KV_TMA) beside their walked Q / dO tiles: offline (sm_90) the pass takes 134
      # registers instead of 148 without tail groups, 120 bytes of spills under the 128 cap with them instead of 172
  step 300 python3 -m bench kernels --only attention --tune-kv-tma --tag tune-kv-tma \
    --shapes dinov2-g-n261-d64,vit-l-n197-d64,dinov2-l-n257-d64,mae-l-dec-n197-d32,dinov2-g518-n1374-d64
  ;;
K58)  # K53's neighbouring blocks (every other knob kept) at the other shapes' configs: N = 1374 (at parity with cuDNN,
      # 1.01-1.02x), the MAE ViT-L decoder (d = 32), ViT-g/14 (d = 88, split head dim)
  step 500 python3 -m bench kernels --only attention --tune-blocks --tag tune-blocks-2 \
    --shapes dinov2-g518-n1374-d64,mae-l-dec-n197-d32,vit-g-n257-d88
  ;;
K57)  # (WALK_COLS was removed after K57, no gain; commit c4e3531 has it)
      # the walks (the masking backwards) over whole rows: WALK_COLS 512 / 1024 (the unmask's 512-wide decoder rows, the
      # mask's 1,024-wide encoder rows in one program's tile instead of 256-column halves / quarters, so each step reads
      # whole rows: 1-4 KB contiguous runs instead of 512-byte pieces 1-2 KB apart), fewer samples a step (the same
      # bytes); mask and unmask variants
  step 280 python3 -m bench kernels --only mae --mae-variants mask,unmask --tag mae-walk-cols
  ;;
K56)  # the MAE ViT-L step with the defaults after K52
  step 450 python3 -m bench train --recipes recipes/vit_l_mae.yaml --batch 256 --variants engine-triton engine-torch \
    --steps 8 --warmup 3 --tag vitl-lean
  ;;
K54)  # (--tune-pdl and the backward's PDL were removed after K54: within 0.5 % either way; commit 1ab42bc has them)
      # the two-pass backward launched by programmatic dependent launch (kernels/pdl.py, as the MAE kernels): the dK/dV
      # pass's programs scheduled as the dQ pass drains (its last of ~23 waves at N = 261), each waiting for it before
      # any load; the dQ pass likewise after the kernel before it. Every two-pass shape, plain vs PDL, twice
  for t in 1 2; do
    step 200 python3 -m bench kernels --only attention --tune-pdl --tag tune-pdl-$t \
      --shapes vit-l-n197-d64,mae-l-dec-n197-d32,dinov2-g-n261-d64,dinov2-l-n257-d64,vit-g-n257-d88,vit-h-n257-d80,mae-g-enc-n65-d88,dinov2-g518-n1374-d64
  done
  ;;
K53)  # the block sweeps (--tune, K1-K8) predate TMA, tail groups, caps and LEAN: the current d = 64 configs with their
      # blocks, warps and depth swapped for neighbours (8-warp 128-key dK/dV programs sharing each Q / dO tile, 128-query
      # dQ programs, 128-key forward steps, other depths), every other knob kept
  step 560 python3 -m bench kernels --only attention --tune-blocks --tag tune-blocks \
    --shapes dinov2-g-n261-d64,vit-l-n197-d64,dinov2-l-n257-d64
  ;;
K52)  # K51 (Nsight Compute): our kernels issue ~2.1-2.4 instructions per cycle per SM with the tensor pipe ~30-37 %
      # active, so instructions count. The forward's loop per 64 x 64 tile (offline PTX, N = 261's config): 336 per
      # thread, 64 of them multiplies (the scale on every score, the rescale of the output), and its epilogue 32
      # full-range divisions per thread. LEAN: the row max of the raw scores, the scale folded into exp2's FMA (306
      # per tile), one reciprocal per row. Every shape's forward, plain vs LEAN, twice
  for t in 1 2; do
    step 200 python3 -m bench kernels --only attention --tune-lean --tag tune-lean-$t \
      --shapes mae-l-enc-n50-d64,vit-l-n197-d64,mae-l-dec-n197-d32,dinov2-g-n261-d64,dinov2-l-n257-d64,vit-g-n257-d88,vit-h-n257-d80,mae-g-enc-n65-d88,dinov2-g518-n1374-d64
  done
  ;;
K51)  # where the attention kernels' time goes at N = 261 and 197 (d = 64), ours beside cuDNN's on the same inputs: Nsight
      # Compute on one warm launch of each kernel (bench/_probe_attn.py): duration, occupancy, registers, SM and memory
      # throughput, L2 hit rate, tensor-pipe activity, and what the warps wait on
  STALLS=$(for s in long_scoreboard short_scoreboard barrier mio_throttle math_pipe_throttle wait not_selected \
    selected dispatch_stall no_instruction lg_throttle branch_resolving membar sleeping drain imc_miss misc; do
    printf 'smsp__average_warps_issue_stalled_%s_per_issue_active.ratio,' $s; done)
  NCU="ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    --metrics ${STALLS}sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active"
  F=bench/results/kernels-nvidia-h200-$(date +%F)-ncu-attn.txt
  step 400 sh -c "$NCU python3 -m bench._probe_attn --shapes dinov2-g-n261-d64,vit-l-n197-d64 > $F 2>&1; \
    grep -E '^  [_a-zA-Z]|Duration|Achieved Occupancy|Registers Per|Theoretical Occ|Compute \(SM\) Thr|Memory Thr|L2 Hit|DRAM Thr|issue_stalled_(long|barrier|short|mio|math|wait|not_sel|selected)|tensor_op|Warp Cycles Per Issued|Issued Ipc|Block Limit|Dynamic Shared|Static Shared' $F | head -400"
  ;;
K50)  # (--tune-tail-bd and TAIL_BD were removed after K50, slower on every pass; commit 2f6a1dc has them)
      # the tail programs as 2D block-diagonal tiles (TAIL_BD): the rows past the last full block of G heads stacked in one
      # [G x R, d] tile (N = 261: 4 heads x 8 rows), every product one 2D tl.dot with the blocks off the diagonal masked
      # (G times the tail's MMA work, which is latency-bound), in place of TAIL_G's 3D tiles, which raised the whole
      # kernel's registers (128 caps, spills in the tail); and on the dQ pass, where 3D groups lost. Offline (sm_90,
      # pointer loads): G = 2 keeps the kernels near their registers without groups (fwd 116 vs 110, dQ 128 vs 106,
      # dK/dV 156 vs 159); G = 4 takes 162 / 162 / 210
  step 560 python3 -m bench kernels --only attention --tune-tail-bd \
    --shapes dinov2-g-n261-d64,vit-l-n197-d64 --tag tune-tailbd
  ;;
K49)  # (KV_TAIL_DQ removed again after K49, commit c0f7abd has it; .notes/regs2.py was an ad hoc script outside the repo:
      # it printed the compiled passes' registers, kernels/README quotes them)
      # KV_TAIL_DQ again (restored from commit 1d4fcf6): K44 lost 0.04 ms at N = 261, i.e. its dQ pass ran ~0.08 ms
      # slower for two small products per program. Suspect: registers (106 -> 116 offline, non-TMA) cost the dQ pass a
      # program per SM (5 fit at <= 102). Its registers on the GPU (ad hoc), then KV_TAIL_DQ under dQ caps 96-112
  step 60 python3 .notes/regs2.py
  step 300 python3 -m bench kernels --only attention --tune-kv-tail \
    --shapes vit-l-n197-d64,dinov2-g-n261-d64,dinov2-l-n257-d64 --tag tune-kvtail-caps
  ;;
K48)  # (--tune-tail-walk and TAIL_WALK were removed after K48, no gain; commit 9ed9985 has them)
      # the tails again, without new tile layouts: an ungrouped tail program walks the same 32-row steps as the full
      # blocks (dQ pass: keys; dK/dV pass: queries), 9 steps at N = 261, each as latency-bound as a full block's.
      # TAIL_WALK = 64: half the steps (offline: 110 registers vs 106 on the dQ pass, no more shared memory), on the dQ
      # pass (its per-head tails, ~0.035 ms of N = 261) and on the dK/dV pass in place of its tail groups
  step 300 python3 -m bench kernels --only attention --tune-tail-walk \
    --shapes vit-l-n197-d64,dinov2-g-n261-d64,dinov2-l-n257-d64,mae-l-dec-n197-d32 --tag tune-tailwalk
  ;;
K47)  # the defaults after K42-K46 (the unmask's split forward with the engine's mask, no zero-filled gradients, the
      # unmask walk launched plainly): the MAE ops, then the MAE ViT-L step (the engine now passes the mask to the
      # unmask)
  step 120 python3 -m bench kernels --only mae --tag defaults-mae-split
  step 400 python3 -m bench train --recipes recipes/vit_l_mae.yaml --batch 256 --variants engine-triton engine-torch \
    --steps 8 --warmup 3 --tag vitl-unmask-split
  ;;
K46)  # K45 / the A/B call: without the zero-filled inverse gradient (a torch kernel between the unmask forward and the
      # backward walk), the learnable-pos unmask backward ran 0.033 ms vs 0.0293 (same machine, old and new trees), the
      # fixed-pos one 0.027 vs 0.0297. Suspect: the walk launches by PDL straight after the forward, its ~4.5 programs
      # per SM (one wave) placed onto SMs as the forward drains, up to 8 on one SM at 64 registers (learnable) vs 5 at
      # 96 (fixed). WALK_PDL=False: the walks launched plainly; mask and unmask variants, two runs
  for t in 1 2; do
    step 280 python3 -m bench kernels --only mae --mae-variants mask,unmask --tag mae-walk-pdl-$t
  done
  ;;
K45)  # (WALK_STAGES was removed after K45: slower in every variant)
      # the unmask backward's walk (21.5 us of the ~50-us fwd+bwd, per-kernel probe `...-unmask-bwd-probe.json`) holds one
      # step's rows in flight per program. WALK_STAGES: the walks as Triton software-pipelined loops (the next steps'
      # rows copied to shared memory by cp.async; offline: 80 registers at 2 stages vs 96); mask and unmask variants
      # (also the gather backward's walk), two runs
  for t in 1 2; do
    step 280 python3 -m bench kernels --only mae --mae-variants mask,unmask --tag mae-walk-stages-$t
  done
  ;;
K44)  # (--tune-kv-tail and KV_TAIL_DQ were removed after K44, slower on every shape; commit 076eefb has them)
      # K43: KV_TAIL_DQ lost everywhere (N = 261 bwd 0.734-0.746 ms vs 0.644): offline (ptxas, sm_90) its dQ pass held a
      # second copy of Q and dO in shared memory across the loop (41 -> 57 KB) for the tail products. Now those read Q
      # and dO again after the loop (41 KB, 116 registers vs 106): the same sweep again
  step 300 python3 -m bench kernels --only attention --tune-kv-tail \
    --shapes vit-l-n197-d64,dinov2-g-n261-d64,dinov2-l-n257-d64,dinov2-g518-n1374-d64 --tag tune-kvtail-2
  ;;
K43)  # (--tune-kv-tail: removed after K44, see there)
      # what still bounds N = 197 / 261 is the tail: the dK/dV pass's tail programs (5 keys each, grouped by 4 heads)
      # walk every query tile, ~0.06 ms of N = 261's 0.41-ms pass. KV_TAIL_DQ: the dQ pass's tail step already holds
      # P and dS for those keys; their products with each query tile's dO and Q are that tile's share of the tail
      # keys' dV / dK, left in slots the dK/dV pass only adds up. The current backward vs KV_TAIL_DQ (as it is, without
      # the dK/dV cap, 2-stage dQ pass); then every attention shape with the defaults (the zero LSE gradient gone)
  step 300 python3 -m bench kernels --only attention --tune-kv-tail \
    --shapes vit-l-n197-d64,dinov2-g-n261-d64,dinov2-l-n257-d64,dinov2-g518-n1374-d64 --tag tune-kvtail
  step 200 python3 -m bench kernels --only attention --tag defaults-nozero
  ;;
K42)  # kernels/README's next step for the unmask (57 % of copy: latency-bound, two dependent memory round trips per
      # program). With mae_mask's bool mask (mae_unmask(mask=...)) the visible rows are scattered and the masked
      # positions filled by separate programs (the fill's loads depend on nothing), and the fixed-pos backward
      # gathers dvisible and sums the masked rows in separate programs: vs the ids compare ("triton:ids"), the split
      # forward with the walk backward, other launch shapes; two runs
  for t in 1 2; do
    step 280 python3 -m bench kernels --only mae --mae-variants unmask --tag mae-unmask-split-$t
  done
  ;;
K41)  # the defaults after K40 (tail groups in the ViT-H/14 d = 80 and MAE ViT-g/14 encoder N = 65 configs): every
      # attention shape, then the MAE ViT-g/14 step (its encoder runs N = 65, d = 88)
  step 150 python3 -m bench kernels --only attention --tag defaults-tailg-3
  step 330 python3 -m bench train --recipes recipes/vit_g_mae.yaml --batch 64 --variants engine-triton engine-torch \
    --steps 6 --warmup 2 --tag vitg-tailg
  ;;
K40)  # tail groups where the full blocks split the head dim (d = 88 as 64 + 32, 80 as 64 + 16; the grouped tail pads
      # it to 128): ViT-g/14 (N = 257 = 2 x 128 + 1 in the forward), ViT-H/14, the MAE ViT-g/14 encoder (N = 65 = 64 + 1)
  step 420 python3 -m bench kernels --only attention --tune-tail-groups \
    --shapes vit-g-n257-d88,vit-h-n257-d80,mae-g-enc-n65-d88 --tag tune-tailg-split
  ;;
K39)  # the MAE ViT-L step with the defaults after K37 (its decoder: N = 197, d = 32, now with tail groups), then every
      # attention shape with the defaults after K38 (the d = 64 bucket default up to N = 320 with tail groups)
  step 360 python3 -m bench train --recipes recipes/vit_l_mae.yaml --batch 256 --variants engine-triton engine-torch \
    --steps 8 --warmup 3 --tag vitl-tailg
  step 200 python3 -m bench kernels --only attention --tag defaults-tailg-2
  ;;
K37)  # K36: the grouped tail's 3D tiles raise the whole kernel's registers (N = 197 forward 121 -> 158 per thread, dK/dV
      # pass 125 -> 185: fewer programs per SM); the variants again, each also under the register cap that keeps them
  step 420 python3 -m bench kernels --only attention --tune-tail-groups \
    --shapes vit-l-n197-d64,dinov2-g-n261-d64,mae-l-dec-n197-d32 --tag tune-tailg-caps
  ;;
K36)  # K33: the tail costs ~30 % at N = 197 / 261 (a tail program walks every key tile for 5 rows). TAIL_G: the tail
      # rows of G heads in one program (3D tl.dot, a head per warp), launched beside their full blocks
  step 420 python3 -m bench kernels --only attention --tune-tail-groups \
    --shapes vit-l-n197-d64,dinov2-g-n261-d64,mae-l-dec-n197-d32,dinov2-g518-n1374-d64,mae-l-enc-n50-d64 --tag tune-tailg
  # (its sweep then: G = 2, 4, 8 and G = 4 with 32- / 64-row walk steps, no register caps; the JSON lists each config.
  # --tune-tail-groups has since swept G = 2, 4 bare and under caps: this part now times that on these shapes)
  ;;
K35)  # K33: the tail costs ~30 % at N = 197 / 261. OVERLAP: each walk's tail steps (16-wide) replaced by one full tile
      # ending at the sequence's end, its already-walked part masked; the current configs without / with it
  # (measured slower everywhere, ...-tune-overlap.json; OVERLAP and --tune-overlap were then removed: run this part at
  # commit 74cccee)
  step 300 python3 -m bench kernels --only attention --tune-overlap \
    --shapes vit-l-n197-d64,dinov2-g-n261-d64,mae-l-dec-n197-d32,dinov2-g518-n1374-d64 --tag tune-overlap
  ;;
K34)  # K33: a 16-row tail tile costs ~30 % at N = 197 / 261 (a tail program walks every tile for 5 rows). FOLD: the last
      # full program also takes the first tail tile; the current configs without / with it on each kernel
  # (measured slower everywhere, ...-tune-fold.json; FOLD and --tune-fold were then removed: run this part at commit 7ea787d)
  step 300 python3 -m bench kernels --only attention --tune-fold \
    --shapes vit-l-n197-d64,dinov2-g-n261-d64,mae-l-dec-n197-d32,dinov2-g518-n1374-d64 --tag tune-fold
  ;;
K33)  # what the 16-row tail tiles cost (N = 197 = 3 x 64 + 5: a tail program walks every tile for 5 rows): fwd / bwd at
      # N = 192 / 197 / 208 / 224 / 256 and 256 / 261 / 272 with the same configs (an ad hoc script, if carried)
  [ -f .notes/tail_cost.py ] && step 120 python3 .notes/tail_cost.py
  ;;
K32)  # TMA loads take no address registers, so register caps (Triton's maxnreg: 128 = 4 programs of 4 warps per SM,
      # 168 = 3) may now fit without spills: the current configs (TMA backward) under each cap on each pass
  step 300 python3 -m bench kernels --only attention --tune-regs \
    --shapes dinov2-g518-n1374-d64,vit-l-n197-d64,dinov2-g-n261-d64,vit-g-n257-d88 --tag tune-regs-tma
  ;;
K31)  # kernels/README's next step for the unmask (57 % of copy): each position's row read from the mask's rank kernel
      # (mae_unmask(rank=...)) instead of compared with ids_keep; the unmask variants, two runs
  for t in 1 2; do
    step 200 python3 -m bench kernels --only mae --mae-variants unmask --tag mae-unmask-rank-$t
  done
  ;;
K30)  # Triton's warp specialization (WS) gave nothing on pointer loads (K9); its producer warps are made for TMA, which
      # the backward passes now use: the current configs (TMA) with WS off/on on each pass
  step 300 python3 -m bench kernels --only attention --tune-ws \
    --shapes vit-l-n197-d64,dinov2-g-n261-d64,dinov2-g518-n1374-d64,vit-g-n257-d88,mae-l-dec-n197-d32 --tag tune-ws-tma
  ;;
K29)  # N = 1374 runs 0.998-1.011x cuDNN in three defaults runs; its backward with TMA on both passes vs on the dK/dV
      # pass only (0.6566 / 0.6748 vs 0.6605 ms in K24 / K25): three more sweeps of the TMA settings, back to back
  for t in a b c; do
    step 120 python3 -m bench kernels --only attention --tune-tma --shapes dinov2-g518-n1374-d64 --tag tune-tma-1374-$t
  done
  ;;
K28)  # every attention shape with the defaults after K27 (the MAE ViT-L decoder's N = 197 / d = 32 now also with a TMA
      # forward), then the MAE ViT-g/14 step (its decoder: N = 257, d = 32, the bucket default with TMA backward passes)
  step 150 python3 -m bench kernels --only attention --tag defaults-tma-3
  step 420 python3 -m bench train --recipes recipes/vit_g_mae.yaml --batch 64 --variants engine-triton engine-torch \
    --steps 6 --warmup 2 --tag vitg-tma
  ;;
K27)  # the defaults after K24-K26 (TMA on the backward passes at d = 64 and d = 88); the MAE ViT-L decoder's shape
      # (N = 197, d = 32: the d <= 64 bucket default, now with TMA) without / with TMA; the MAE ViT-L step
  step 120 python3 -m bench kernels --only attention --tune-tma --shapes mae-l-dec-n197-d32 --tag tune-tma-d32
  step 200 python3 -m bench kernels --only attention --tag defaults-tma-2
  step 300 python3 -m bench train --recipes recipes/vit_l_mae.yaml --batch 256 --variants engine-triton engine-torch \
    --steps 8 --warmup 3 --tag vitl-tma
  ;;
K26)  # K25: TMA on both backward passes at 3 stages is the d = 64 default now; the split head dims (d = 88 / 80 as
      # two pieces, two descriptors per tensor) the same way, then every attention shape with the defaults
  step 300 python3 -m bench kernels --only attention --tune-tma \
    --shapes vit-g-n257-d88,vit-h-n257-d80,mae-g-enc-n65-d88 --tag tune-tma-split
  step 200 python3 -m bench kernels --only attention --tag defaults-tma
  ;;
K25)  # K24: TMA on both backward passes at 3 stages ran N = 197 / 261 / 1374 3-4 % faster, TMA forwards were slower:
      # TMA per pass now (top-level key: dK/dV pass, the DQ blocks' key: dQ pass), each combination at two depths
  step 300 python3 -m bench kernels --only attention --tune-tma \
    --shapes vit-l-n197-d64,dinov2-g-n261-d64,dinov2-g518-n1374-d64 --tag tune-tma-2
  ;;
K24)  # README's next step for the attention backward: TMA loads (Triton tensor descriptors, config key TMA) of the full
      # tiles each loop walks (forward K/V, dQ pass K/V, dK/dV pass Q/dO); the current configs without / with it and
      # block neighbours with it, at the d = 64 shapes (the split head dims have no TMA path yet)
  step 560 python3 -m bench kernels --only attention --tune-tma \
    --shapes vit-l-n197-d64,dinov2-g-n261-d64,dinov2-g518-n1374-d64 --tag tune-tma
  ;;
K23)  # the MAE objective hands the decoder's bf16 output to the loss as it is (no fp32 copy of pred first): the loss
      # op fwd+bwd on bf16 vs .float() pred (an ad hoc script, if carried), then the MAE ViT-L step, ours vs SDPA + torch
  [ -f .notes/loss_dtype.py ] && step 60 python3 .notes/loss_dtype.py
  step 300 python3 -m bench train --recipes recipes/vit_l_mae.yaml --batch 256 --variants engine-triton engine-torch \
    --steps 8 --warmup 3 --tag vitl-bf16pred
  ;;
K22)  # the MAE ViT-L step, our kernels vs SDPA + torch masking/loss in the same run, with this session's code (the
      # unmask's hoisted loads and the split head dim landed since it was last timed)
  step 300 python3 -m bench train --recipes recipes/vit_l_mae.yaml --batch 256 --variants engine-triton engine-torch \
    --steps 8 --warmup 3 --tag vitl-recheck
  ;;
L33)  # L32: two pipelines of one DALI thread each ran 33.6k / 34.3k img/s at 3.4-3.5 cores, but one round of three
      # collapsed to 19.0k (one pipeline's rate); again with 4 rounds, beside 1 x 4 (the default), 1 x 1 and 2 x 4; then 3 x 1
  export CUDA_VISIBLE_DEVICES=0 CUDA_DEVICE_MAX_CONNECTIONS=8
  L="python3 -m bench loaders --sizes 256 --workers 2 --seconds 4 --warmup 10 --repeats 4 --data-dir /tmp/bench-data --backends dali"
  step 300 $L --dali-pipelines 2,1 --dali-threads 1,4 --tag pipes-threads-2
  step 120 $L --dali-pipelines 3 --dali-threads 1 --tag pipes-threads-3x1
  ;;
L32)  # L29/L31: two pipelines 34-35k img/s at 256 px but 3.8-4.2 cores; fewer DALI threads per pipeline (1, 2) beside 4,
      # one and two pipelines, 3 rounds (run inline in its session, this exact command)
  export CUDA_VISIBLE_DEVICES=0 CUDA_DEVICE_MAX_CONNECTIONS=8
  step 300 python3 -m bench loaders --sizes 256 --workers 2 --seconds 4 --warmup 10 --repeats 3 --data-dir /tmp/bench-data \
    --backends dali --dali-pipelines 2,1 --dali-threads 1,2,4 --tag pipes-threads
  ;;
L31)  # the loader bench with the defaults (one DALI pipeline, 4 threads) beside 2 pipelines, nvjpeg and PIL, 256 and
      # 512 px, 3 rounds: the record for the #4 targets (L29: one pipeline 32.7k img/s at 3.3 cores, two 34.1k at 3.8)
  export CUDA_VISIBLE_DEVICES=0 CUDA_DEVICE_MAX_CONNECTIONS=8
  step 500 python3 -m bench loaders --workers 2 --seconds 4 --warmup 10 --repeats 3 --data-dir /tmp/bench-data \
    --backends dali,nvjpeg,pil --dali-pipelines 1,2 --tag final
  ;;
L30)  # engine.run's data stall (MAE ViT-B, batch 256, CUDA graphs as auto picks) with DALI pipelines 2 vs 1 (L29: the
      # loader alone), dali, 256 px
  export CUDA_VISIBLE_DEVICES=0
  S="python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 2 --warmup 5 --stall-engine \
    --stall-backends dali --compile model --stall-steps 80 --data-dir /tmp/bench-data"
  step 280 $S --dali-pipelines 2 --tag engine-stall-p2
  step 280 $S --dali-pipelines 1 --tag engine-stall-p1
  ;;
L29)  # bench._dali_pipes (DALI alone) decoded 256-px JPEGs at 37.5-39.6k img/s with one pipeline and 46.3-57.0k with
      # two (a thread each; transcribed, the call's device time ran out): the probe again with the committed script,
      # then the loader with DaliLoader pipelines 1 vs 2 (fed in turn from one thread) at 2 / 4 DALI threads each,
      # beside PIL, 256 and 512 px, 3 rounds
  export CUDA_VISIBLE_DEVICES=0 CUDA_DEVICE_MAX_CONNECTIONS=8
  step 120 python3 -m bench._dali_pipes
  step 420 python3 -m bench loaders --workers 2 --seconds 4 --warmup 10 --repeats 3 --data-dir /tmp/bench-data \
    --backends dali,pil --dali-pipelines 1,2 --dali-threads 4,2 --tag pipelines
  ;;
K21)  # T3: the MAE ViT-g step ran 645 img/s with our kernels vs 659 with SDPA + torch; its encoder attends over N = 65
      # (64 kept patches + class token) at d = 88, not a benchmarked shape: the split head dim there, and vs SDPA
  step 300 python3 -m bench kernels --only attention --tune-split --shapes mae-g-enc-n65-d88 --tag tune-split-n65
  ;;
K20)  # every attention shape and MAE op with the defaults after K18/K19 (d = 80 / 88 split in two pieces)
  step 400 python3 -m bench kernels --tag defaults-split
  ;;
T3)  # the ViT-g/14 MAE step (d = 88, split head dim) with our kernels vs SDPA + torch masking/loss
  step 560 python3 -m bench train --recipes recipes/vit_g_mae.yaml --batch 64 --variants engine-triton engine-torch \
    --steps 6 --warmup 2 --tag vitg-split
  ;;
K19)  # K18: the split head dim took d = 88 from 0.97x to 1.15x cuDNN (fwd 0.2018 vs 0.2449 ms, bwd 0.5948 vs 0.6956);
      # now ViT-H/14's d = 80 (64 + 16 instead of 128) the same way, and d = 88 again with its new TUNED entry
  step 420 python3 -m bench kernels --only attention --tune-split --shapes vit-h-n257-d80,vit-g-n257-d88 --tag tune-split-2
  ;;
K18)  # d = 88 (timm's ViT-g/14) runs 0.97x cuDNN: its head dim pads to 128 columns (1.45x the MMA work). The head
      # dim in two pieces, 64 + 32 (SPLIT_D), in the forward and both backward passes: the current configs with and
      # without it, block neighbours with it; then the shape against SDPA with the winners
  step 420 python3 -m bench kernels --only attention --tune-split --shapes vit-g-n257-d88 --tag tune-split
  ;;
L28)  # dali at 256 px is bound by its run() (~8 ms a batch in the fast runs, GPU 44 % busy): the hardware decoder.
      # Share the JPEGs with the CUDA decoder (hw_decoder_load 0.9 / 0.75) with their Huffman stage on the GPU
      # (hybrid_huffman_threshold 0) vs on DALI's CPU threads (DALI's default threshold), 3 rounds
  export CUDA_VISIBLE_DEVICES=0 CUDA_DEVICE_MAX_CONNECTIONS=8
  step 400 python3 -m bench loaders --sizes 256 --workers 2 --seconds 4 --warmup 10 --repeats 3 \
    --data-dir /tmp/bench-data --backends dali --hw-decoder-load 1,0.9,0.75 --dali-huffman 0,1000000 --tag huffman
  ;;
K17)  # the hoisted unmask loads as the default (K15/K16), with the old order as the variant, twice
  step 200 python3 -m bench kernels --only mae --mae-variants unmask --tag mae-hoist-1
  step 200 python3 -m bench kernels --only mae --mae-variants unmask --tag mae-hoist-2
  ;;
K16)  # (K15 and K16 ran the unmask variants then listed in bench/kernels.py; the ones that lost are gone since)
      # K15: of the unmask alternatives only the hoisted pos_embed loads helped (forward 0.0258 vs 0.0275 ms); now
      # programs of 2 / 4 / 8 samples sharing one load of the pos_embed rows (the forward reads them from L2 once
      # per sample: 51 MB), and a backward walking each sample's rows instead of the batch, twice
  step 200 python3 -m bench kernels --only mae --mae-variants unmask --tag mae-unmask-variants-2
  step 200 python3 -m bench kernels --only mae --mae-variants unmask --tag mae-unmask-variants-3
  ;;
K15)  # the unmask at 53-55 % of copy (target 70): its alternative kernels (bench --mae-variants unmask): a persistent
      # forward with ids_keep loaded an item ahead, hoisted pos_embed loads, streaming stores, a backward walk loading a
      # step ahead, steps of 4 / 16 samples; then dali at 256 px with 2 vs 3 workers and 4 vs 2 DALI threads beside
      # PIL at the same workers (the slow 256-px runs were bound by 2 workers), 3 rounds
  step 240 python3 -m bench kernels --only mae --mae-variants unmask --tag mae-unmask-variants
  export CUDA_VISIBLE_DEVICES=0 CUDA_DEVICE_MAX_CONNECTIONS=8
  step 330 python3 -m bench loaders --sizes 256 --workers 2,3 --seconds 4 --warmup 10 --repeats 3 \
    --data-dir /tmp/bench-data --backends dali,pil --dali-threads 4,2 --tag w23
  ;;
K14)  # the masking backwards store the pos_embed / mask_token gradients in the parameters' dtypes themselves (no cast
      # kernels after them), twice
  step 150 python3 -m bench kernels --only mae --tag mae-nocast
  step 150 python3 -m bench kernels --only mae --tag mae-nocast-2
  ;;
K13)  # the sorting rank kernel (now the default) at 1 / 2 / 8 warps per sample beside 4 and the counting one, twice
  step 200 python3 -m bench kernels --only mae --mae-variants --tag mae-rank-warps
  step 200 python3 -m bench kernels --only mae --mae-variants --tag mae-rank-warps-2
  ;;
K12)  # the mask forward's rank kernel (9.4 of its 26.6 us under Nsight Compute in K11, compute-bound): counting (the
      # default) vs counting with one packed int64 key compare per pair vs one bitonic sort per sample, twice
  step 200 python3 -m bench kernels --only mae --mae-variants --tag mae-rank
  step 200 python3 -m bench kernels --only mae --mae-variants --tag mae-rank-2
  ;;
K11)  # K10's kernel half once (the MAE loss with pred channel-major beside MAE's order), then the MAE ops under
      # Nsight Compute (DRAM throughput, occupancy, warp stalls; bench/_probe_mae.py), then the MAE ViT-L step with
      # objective.mae.pred_layout cpq vs pqc
  step 130 python3 -m bench kernels --only mae --tag mae-cpq
  NCU="ncu --clock-control none --nvtx --nvtx-include probe/ --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section Occupancy --section LaunchStats --section WarpStateStats"
  step 100 sh -c "$NCU python3 -m bench._probe_mae > bench/results/kernels-nvidia-h200-$(date +%F)-ncu-mae.txt 2>&1; \
    grep -E '^  [_a-z]|DRAM Throughput|Memory Throughput|Duration|Achieved Occupancy' bench/results/kernels-nvidia-h200-$(date +%F)-ncu-mae.txt"
  T="python3 -m bench train --recipes recipes/vit_l_mae.yaml --batch 256 --variants engine-triton --steps 8"
  step 165 $T --override objective.mae.pred_layout=cpq --tag large-cpq
  step 165 $T --tag large-pqc
  ;;
L26)  # DALI decoding only each crop box (decode_crop) vs the whole image, DALI threads 4 vs 2, beside nvjpeg and PIL,
      # both sizes, 3 rounds, at the new shard sets built once (--data-dir)
  export CUDA_VISIBLE_DEVICES=0 CUDA_DEVICE_MAX_CONNECTIONS=8
  L="python3 -m bench loaders --workers 2 --seconds 4 --warmup 10 --repeats 3 --data-dir /tmp/bench-data"
  step 560 $L --backends dali,nvjpeg,pil --dali-decode-crop 0,1 --dali-threads 4,2 --tag decode-crop
  ;;
K10)  # the MAE loss with pred channel-major (layout cpq: the image read in 32-byte row pieces, not gathered across
      # its planes) beside MAE's order, twice; then the MAE ViT-L step with objective.mae.pred_layout cpq vs pqc (the
      # engine's default stays pqc until this says otherwise)
  step 200 python3 -m bench kernels --only mae --tag mae-cpq-1
  step 200 python3 -m bench kernels --only mae --tag mae-cpq-2
  T="python3 -m bench train --recipes recipes/vit_l_mae.yaml --batch 256 --variants engine-triton --steps 8"
  step 150 $T --override objective.mae.pred_layout=cpq --tag large-cpq
  step 150 $T --tag large-pqc
  ;;
K9)  # Triton's warp specialization (tl.range(warp_specialize=True), config key WS) on the full-tile loops of the
     # forward and of each backward pass, for each shape's current configs; the backward is the gap everywhere
  step 300 python3 -m bench kernels --only attention --tune-ws \
    --shapes vit-l-n197-d64,dinov2-g-n261-d64,vit-g-n257-d88,dinov2-g518-n1374-d64 --tag tune-ws
  ;;
T1)  # CUDA graphs with gradient accumulation (model.compile_mode=reduce-overhead set explicitly; measured 2026-11-28,
     # after which auto picks it): the GPU test (same parameters as without graphs; the Triton kernels compiled, not
     # interpreted as conftest.py sets for CPU runs), then ViT-B 2 x 256 per step
  step 240 env TRITON_INTERPRET=0 python3 -m pytest -q -x tests/test_engine_train.py -k cuda_graph_accumulation_on_gpu
  T="python3 -m bench train --recipes recipes/vit_b_mae.yaml --batch 256 --accum 2 --variants engine-triton --steps 8"
  step 200 $T --compile-mode reduce-overhead --tag accum-graphs
  step 150 $T --compile-mode default --tag accum-default
  ;;
T2)  # engine.run's data stall with accumulation (2 x 256 per step, the real recipes' case on one GPU): CUDA graphs
     # (explicit reduce-overhead) vs torch's default mode, dali
  export CUDA_VISIBLE_DEVICES=0
  S="python3 -m bench loaders --backends dali --sizes 256 --workers 2 --seconds 2 --warmup 5 --stall-engine \
    --stall-backends dali --compile model --stall-steps 80 --stall-accum 2"
  step 260 $S --compile-mode reduce-overhead --tag engine-stall-accum-graphs
  step 220 $S --tag engine-stall-accum-default
  ;;
G1)  # (nvidia-h200-x2) DINOv2 ViT-L under FSDP2 on 2 GPUs for 300 steps after the DTensor-leak fix (engine.optim),
     # train.gc_freeze_after at its default, then the same with torch's own DTensor paths put back
     # (bench/torch_dtensor_paths, BIOVFM_PREFIX=1): each rank's gen-2 pauses (gc_pauses_ranks) should stay short and
     # flat with the fix and grow without it, as in ...-s29-gc-freeze.json (22 -> 110 ms). G2 right after, on the warm
     # machine: the fix again, with the compile cache warm as the second run's was.
  step 300 python3 -m bench train --recipes recipes/vit_l_dinov2.yaml --gpus 2 --steps 300 --warmup 8 \
    --variants engine-triton --tag s30-leak-fixed
  step 280 env BIOVFM_PREFIX=1 PYTHONPATH=bench/torch_dtensor_paths:$PYTHONPATH python3 -m bench train \
    --recipes recipes/vit_l_dinov2.yaml --gpus 2 --steps 300 --warmup 8 --variants engine-triton --tag s30-leak-torch
  ;;
G2)
  step 280 python3 -m bench train --recipes recipes/vit_l_dinov2.yaml --gpus 2 --steps 300 --warmup 8 \
    --variants engine-triton --tag s30-leak-fixed-2
  ;;
M)
  step 200 env CUDA_VISIBLE_DEVICES=0 python3 -m bench loaders --backends dali,nvjpeg,pil --sizes 256 --workers 4 --seconds 5 --warmup 2 --images 8000 --multicrop
  ;;
esac
tar czf "$OUT/results-$PART.tgz" bench/results
