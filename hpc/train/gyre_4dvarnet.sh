#!/usr/bin/env bash
# Train the Gulf Stream (truth=gyre) 4DVarNet on a 2-core machine: the data (independent seeds), then
# one training stage that runs for hours in the background, checkpoints after every epoch and resumes.
#
#   D=runs/gyre_data OUT=runs/train_gyre nohup nice -n 5 hpc/train/gyre_4dvarnet.sh > train.log 2>&1 &
#   (rerun the same command after an interruption: finished OSSEs are kept, training resumes from
#    $OUT/checkpoint.pt; without it (a fresh machine) INIT=src/oceanda/weights/gyre_4nadirs.pt starts from
#    the committed weights)
#
# Data: every seed starts from the shipped spun-up state plus a small perturbation and integrates from its
# reference date (2012-09-01); the OSSEs keep 2013-02-01..2014-01-31 (5 months after it, 2 months after the
# test window: python hpc/bench/seed_decorrelation.py measures how far apart they are). Seeds 2.. train,
# seed 1 validates (VAL_PERIOD: the per-epoch validation; the learning curve scores other windows of it),
# seed 0 is the test year (only its evaluation window 2012-10-07..12-17 is generated: the default period).
set -euo pipefail
D=${D:-runs/gyre_data}
OUT=${OUT:-runs/train_gyre}
TRAIN_SEEDS=${TRAIN_SEEDS:-"2 3"}
EPOCHS=${EPOCHS:-40}
BATCHES=${BATCHES:-30}            # batches of 4 patches an epoch: an epoch every few minutes on a share of a core
VAL_PERIOD=${VAL_PERIOD:-"[2013-05-15,2013-07-15]"}  # 62 days: what selected the shipped stage 5 (stages 1-3: 2013-06-01..06-21)
INIT=${INIT:-default}             # first stage: the shipped weights, ConvLSTM output zeroed (the OI); a later stage: a checkpoint
LR=${LR:-1e-3}
THREADS=${THREADS:-1}
export OMP_NUM_THREADS=$THREADS

gen() {  # seed out_dir [period overrides...]
  local s=$1 o=$2; shift 2
  [ -d "$o/obs.zarr" ] || oceanda generate truth=gyre seed="$s" figures=false progress=false out_dir="$o" "$@"
}
gen 0 "$D/test_seed0"
gen 1 "$D/seed1" period.start=2013-02-01 period.end=2014-01-31
extra=()
first=""
for s in $TRAIN_SEEDS; do
  gen "$s" "$D/seed$s" period.start=2013-02-01 period.end=2014-01-31
  if [ -z "$first" ]; then first=$s; else extra+=("[$D/seed$s/truth.zarr,$D/seed$s/obs.zarr]"); fi
done
EXTRA=$(IFS=,; echo "${extra[*]-}")
start=(init_checkpoint="$INIT")
[ "$INIT" = default ] && start+=(zero_update=true)
# resume=true only when there is a checkpoint to resume from (oceanda train refuses it otherwise)
[ -f "$OUT/checkpoint.pt" ] && start+=(resume=true)
oceanda train truth_path="$D/seed$first/truth.zarr" obs_path="$D/seed$first/obs.zarr" "extra_train=[$EXTRA]" \
  val_truth_path="$D/seed1/truth.zarr" val_obs_path="$D/seed1/obs.zarr" "val_period=$VAL_PERIOD" \
  patch=gulfstream 'patch.size=[15,64,64]' 'patch.stride=[1,34,34]' 'patch.crop=[8,8]' aug=1 \
  model.prior_hidden=32 model.lstm_hidden=32 model.n_steps=8 model.lstm_downsample=2 model.init=oi \
  system.threads="$THREADS" train.max_batches="$BATCHES" train.batch_size=4 train.lr="$LR" train.epochs="$EPOCHS" \
  "${start[@]}" snapshots=true progress=false out_dir="$OUT"
