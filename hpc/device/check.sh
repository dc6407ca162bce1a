#!/usr/bin/env bash
# oceanda's GPU check, in under 10 minutes on one device machine (1 GPU, 16 cores). Prepared once here:
#     bash hpc/device/fetch_wheels.sh                      # fills .whl/ (git-ignored)
# then through the device tool:  run(command="bash hpc/device/check.sh", carry=[".whl"], timeout_s=600)
# Steps (each under its own time limit, each writes its log/JSON to $OUT, which comes back):
#   1. environment (nvidia-smi, torch/CUDA)               -> env.txt
#   2. the GPU tests (pytest -m gpu) + the kernel tests on CUDA -> gpu_tests.log
#   3. the demo on 2 MPI ranks, one GPU per rank (ranks share the GPU when there is one) -> mpi_demo.log
#   4. throughput benches: banded kernels, 4DVarNet year, truth generation -> bench_*.json
#   5. a 4DVarNet training run on a generated OSSE; its best weights come back -> train/best_checkpoint.pt
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/oceanda_device_out}
mkdir -p "$OUT" "$OUT/train"
T0=$(date +%s)
left() { echo $(( ${BUDGET_S:-570} - ($(date +%s) - T0) )); }
step() {  # step NAME SECONDS CMD...: run with a time limit that never overruns the budget
    local name=$1 lim=$2; shift 2
    local l; l=$(left); (( l < lim )) && lim=$l
    if (( lim < 20 )); then echo "skip $name: budget spent" | tee -a "$OUT/steps.txt"; return; fi
    local t=$(date +%s)
    timeout --kill-after=10 "$lim" "$@" > "$OUT/$name.log" 2>&1
    echo "$name rc=$? ${lim}s-limit $(( $(date +%s) - t ))s" | tee -a "$OUT/steps.txt"
}
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed" | tee "$OUT/steps.txt"; exit 1; }
    export PATH=/tmp/site/bin:$PATH PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
{ nvidia-smi; python3 -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"; nproc; } > "$OUT/env.txt" 2>&1
step gpu_tests 150 python3 -m pytest -q -p no:cacheprovider -m "gpu" tests
step mpi_demo 150 mpiexec -n 2 python3 -m oceanda infer system.device=cuda
step bench_banded 60 python3 hpc/bench/banded.py --quick --device cuda --json "$OUT/bench_banded.json"
step bench_fourdvarnet_year 60 python3 hpc/bench/fourdvarnet_year.py --device cuda --repeat 2 --json "$OUT/bench_fourdvarnet_year.json"
step bench_generate 40 python3 hpc/bench/generate.py --device cuda --days 5 --json "$OUT/bench_generate.json"
# Training: 150 days of the 240x240 training box (QG truth on the GPU), 4 nadirs; the shipped model's
# architecture and patches, trained for what the budget leaves; validation = the last 21 days.
step train_osse 90 python3 -m oceanda generate domain=gulfstream_train period.start=2012-12-10 \
    period.end=2013-05-08 out_dir=/tmp/osse_train figures=false progress=false device=cuda
step train 9999 python3 -m oceanda train truth_path=/tmp/osse_train/truth.zarr obs_path=/tmp/osse_train/obs.zarr \
    out_dir=/tmp/train_gpu val_period=[2013-04-17,2013-05-08] gap_days=7 \
    patch=gulfstream patch.size=[15,64,64] patch.stride=[1,34,34] patch.crop=[8,8] \
    model.prior_hidden=32 model.lstm_hidden=32 model.n_steps=8 model.lstm_downsample=2 model.init=oi \
    init_checkpoint=default train.batch_size=16 train.max_batches=60 train.epochs=6 system.device=cuda progress=false
cp /tmp/train_gpu/best_checkpoint.pt /tmp/train_gpu/history.json "$OUT/train/" 2>/dev/null
echo "total $(( $(date +%s) - T0 ))s" | tee -a "$OUT/steps.txt"
