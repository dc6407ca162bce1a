#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI), once, before hpc/device/check.sh goes to a GPU machine that
# reaches nothing: downloads into .whl/ (git-ignored) the wheels of oceanda's dependencies that the
# device image lacks (its python3 3.12 already holds torch+CUDA, numpy, scipy, numba, xarray, pandas,
# matplotlib, tqdm, threadpoolctl, pytest, hypothesis, pytest-timeout). About 50 MB.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)
for req in zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 crc32c==2.9.post0 dask==2026.11.0 partd==1.4.2 \
           locket==1.0.0 netCDF4==1.7.5.1.post1 cftime==1.6.6.1 pyproj==3.7.2 hydra-core==1.3.8 \
           omegaconf==2.3.1 global-land-mask==1.0.0 xrft==1.0.1 mpich==5.0.2 mpi4py==4.1.2; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLAT[@]}" -d .whl "$req"
done
# hydra-core needs antlr4-python3-runtime 4.9.*, published as an sdist only: build its (pure-Python) wheel.
python3 -m pip wheel -q --no-deps "antlr4-python3-runtime==4.9.3" -w .whl
du -sh .whl
