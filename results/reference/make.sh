#!/usr/bin/env bash
# The reference runs behind the README's tables and figures: every strategy at mTHP orders 2, 4,
# 6 and 8 (and pmd-clear at PMD order 9), with GUP-fast pins, mmap() churn and both walkers
# beside the faulting CPUs and khugepaged — on the virtual-time backend (kernel costs from
# core/analysis/costs_default.json, deterministic: the same files on any host) — plus the worked example
# on the process backend at order 4.  tests/test_reference.py checks that this script's runs are
# valid and that the committed files load with the current code.
#
#   bash results/reference/make.sh            # remake them (about 5 minutes on 2 cores)
#   PTLAB=echo bash results/reference/make.sh # print the commands only
set -euo pipefail
cd "$(dirname "$0")/../.."
PTLAB=${PTLAB:-.venv/bin/ptlab}
OUT=results/reference
LOAD="--app 2 --gup-fast 1 --mmap 1 --rmap-walk 1 --pt-walk 1 --khugepaged 1 --workload hotset --nr-pmds 2"
if [ "$PTLAB" != echo ]; then rm -f "$OUT"/*.arrow "$OUT"/process/*.arrow; fi
# virtual seconds per order: enough collapses at every order (an order-8 collapse is 1 MiB)
for spec in 2:0.02 4:0.02 6:0.05 8:0.1; do
    $PTLAB run --backend virtual --order "${spec%%:*}" --duration "${spec##*:}" $LOAD --out "$OUT" --no-compare --no-progress
done
$PTLAB run --backend virtual -s pmd-clear --order 9 --duration 0.1 $LOAD --out "$OUT" --no-compare --no-progress
# the worked example: real processes (oversubscribed on 2 cores: the ratio is in each file)
$PTLAB run --order 4 --duration 3 --app 1 --gup-fast 1 --mmap 1 --khugepaged 1 --out "$OUT/process" --no-progress
