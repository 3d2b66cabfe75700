#!/usr/bin/env bash
# Reproduce the README's claims tables on beacon (about 40 minutes on 2 CPU cores).
#
# How to run (from the repository root, after `pip install -e ".[test]"`):
#     bash scripts/reproduce_claims.sh
# Results to expect: the tables of README.md, "Benchmarks and the claims, measured" (one seed;
# expect the numbers to move by about their confidence intervals on another machine).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=runs/claims
mkdir -p "$runs" results
train() {  # name, then flags; reruns skip a finished run and resume an interrupted one
  local name=$1; shift
  if grep -qs '^iter_00080$' "$runs/$name/checkpoints/latest"; then
    return 0
  elif [ -f "$runs/$name/run.json" ]; then
    marl-fgmf train --out "$runs/$name" --iterations 80 --resume --quiet
  else
    marl-fgmf train --env beacon --iterations 80 --seed 0 "$@" --out "$runs/$name" --quiet
  fi
}
train ppo
train adv --defense adv
train fgmf --defense fgmf
train fgmf_l3 --defense fgmf --scorpio lambda_curv=0.001,lambda_grad=0.001
for name in ppo adv fgmf; do
  marl-fgmf attack --checkpoint "$runs/$name" --attack pgd,bpda,eot --eps 4/255,8/255 \
    --episodes 10 --seed 0 --quiet --out "results/robust_$name.json"
done
marl-fgmf tournament --config examples/claims_tournament.yaml --out results/claims --workers 2
python scripts/bench_explain.py --checkpoint "$runs/ppo" --fgmf-checkpoint "$runs/fgmf"
