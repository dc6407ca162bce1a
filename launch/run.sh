#!/usr/bin/env bash
# Launch `oceanda infer` on NRANKS MPI ranks (one GPU each when there are GPUs, else CPU).
# Environment overrides (defaults in brackets):
#   NRANKS    number of ranks [2]                 MPIEXEC    launcher [mpiexec]
#   PYTHON    interpreter [python3]               THREADS    CPU threads per rank [1]
#   CONFIG_DIR  extra hydra config dir []         MPI_ARGS   extra launcher arguments []
#   DRY_RUN=1   compose the config and print the rank / tile / patch map for NRANKS ranks
#               without computing (one process, no MPI needed)
# Everything after the script name is passed to the app as hydra overrides:
#   NRANKS=4 ./launch/run.sh obs_path=runs/osse/obs.zarr out_dir=runs/oi truth_path=runs/osse/truth.zarr
#   DRY_RUN=1 NRANKS=64 ./launch/run.sh obs_path=runs/natl/obs.zarr out_dir=runs/natl_oi patch=anchor
#   ./launch/run.sh                     # the Gulf Stream demo on 2 ranks
set -euo pipefail

NRANKS=${NRANKS:-2}
MPIEXEC=${MPIEXEC:-mpiexec}
PYTHON=${PYTHON:-python3}
THREADS=${THREADS:-1}
CONFIG_DIR=${CONFIG_DIR:-}
MPI_ARGS=${MPI_ARGS:-}
DRY_RUN=${DRY_RUN:-0}

export OMP_NUM_THREADS=${THREADS} MKL_NUM_THREADS=${THREADS} OPENBLAS_NUM_THREADS=${THREADS}
extra=()
if [[ -n "${CONFIG_DIR}" ]]; then
    extra+=(--config-dir "${CONFIG_DIR}")
fi

if [[ "${DRY_RUN}" == "1" ]]; then
    exec "${PYTHON}" -m oceanda infer dry_run=true ranks="${NRANKS}" system.threads="${THREADS}" "$@" "${extra[@]}"
fi
# shellcheck disable=SC2086
exec "${MPIEXEC}" -n "${NRANKS}" ${MPI_ARGS} "${PYTHON}" -m oceanda infer system.threads="${THREADS}" "$@" "${extra[@]}"
