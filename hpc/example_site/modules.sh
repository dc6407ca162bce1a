# Example site profile, sourced by the job scripts: modules, the MPI that mpi4py was built
# against, the Python environment, scratch paths. Copy to hpc/<your_site>/ and edit.
module purge
module load gcc/12 cuda/12.4 openmpi/4.1          # the site's MPI (mpi4py built against it:
                                                   #   MPICC=mpicc pip install --no-binary=mpi4py mpi4py)
source "${OCEANDA_VENV:-$HOME/venvs/oceanda}/bin/activate"
export OCEANDA_SCRATCH=${OCEANDA_SCRATCH:-/scratch/$USER/oceanda}
export OMP_NUM_THREADS=1
export PYTHONUNBUFFERED=1
