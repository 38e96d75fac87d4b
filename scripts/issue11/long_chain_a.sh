#!/bin/bash
# The 4K pieces of the long slice, one after another (each <= ~25 min on the shared machine).
export PYTHONPATH=. OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
for piece in "4096 query_aware 0 15" "4096 query_agnostic 0 15" "4096 query_aware 15 30" "4096 query_agnostic 15 30"; do
  /usr/bin/time -f "piece $piece wall %e s" /work/main/.venv/bin/python scripts/issue11/long_slice.py $piece
done
