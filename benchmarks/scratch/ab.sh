#!/bin/bash
# One measured 1% change on a fresh copy of a benchmark HOME, with the code at $2 (a checkout: PYTHONPATH), and its
# wall time minus the model's encode time. A/B: a worktree of the old commit and this checkout, alternated:
#   git worktree add /tmp/wt_old OLD; for r in H1:/tmp/wt_old N1:$PWD H2:/tmp/wt_old N2:$PWD; do
#     bash benchmarks/scratch/ab.sh ${r%%:*} ${r#*:} /tmp/embed_incr_88ct0sd9; done
# $1 = label, $2 = PYTHONPATH root, $3 = the benchmark HOME's folder (copied, never changed)
cd "$(dirname "$0")/../.."
rm -rf /tmp/embed_incr_again && cp -r "$3" /tmp/embed_incr_again
PYTHONPATH=$2 FUNCS=embed_assets.core.encoder.Encoder.encode .venv/bin/python benchmarks/scratch/timed_change.py /tmp/embed_incr_again $1 > /tmp/ab_$1.log 2>&1
w=$(grep -o "change ([0-9,]* rows edited or new): [0-9.]* s wall" /tmp/ab_$1.log | grep -o "[0-9.]* s wall" | cut -d' ' -f1)
e=$(grep "^Encoder.encode" /tmp/ab_$1.log | awk '{print $2}' | tr -d s)
echo "$1 wall $w encode $e non-encode $(python3 -c "print(round($w-$e,2))")"
grep "^runs" /tmp/ab_$1.log
