#!/usr/bin/env bash
# Run every benchmark in bench/ with bounded options, then print one summary table.
#
#   bash scripts/bench.sh             # every bench (about 15 minutes on 2 cores)
#   bash scripts/bench.sh --quick     # shorter runs of each (about 3 minutes)
#
# Bootstraps like scripts/test.sh (.venv, redis-server, the broker), then installs the bench
# extras (quixstreams for the comparison, py-spy for profiles). Each bench's own output goes to
# the terminal and to out/bench-<time>/<bench>.txt; its headline rows (bench/summary.py) make
# the table at the end, also written to summary.md there. After them, bench_mesh.py --scale
# replays the real day once per record layout, bars shards and mirror instances. A bench that
# fails or runs past its time limit is listed as failed and the others still run; the exit
# status is then 1.
# Environment: TICKMESH_BENCH_TIMEOUT_S (per bench, default 1200), TICKMESH_DATA (real data).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
quick=0
for arg in "$@"; do
    case "$arg" in
        --quick) quick=1 ;;
        -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "bench.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    esac
done

bash scripts/bootstrap.sh
stamp=.venv/.tickmesh-bench-extras.stamp
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
    echo "bench.sh: installing the bench extras (pip install -e '.[test,bench]')" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,bench]"
    touch "$stamp"
fi

# Bounded options per bench (full, then quick). A bench not listed here still runs, with its
# own defaults, so that none is forgotten.
declare -A full=(
    [bench_bar_core]="--repeat 3"
    [bench_ingest_decode]="--frames 1000 --repeat 5"
    [bench_ingest_publish]="--frames 2000 --repeat 3"
    [bench_bars_kafka]="--repeat 3 --timeout-s 120"
    [bench_mirror]="--repeat 2"
    [bench_mesh]=""
    [bench_dashboard]="--minutes 30"
)
declare -A short=(
    [bench_bar_core]="--repeat 2"
    [bench_ingest_decode]="--frames 300 --repeat 2"
    [bench_ingest_publish]="--frames 500 --repeat 1"
    [bench_bars_kafka]="--repeat 1 --timeout-s 60"
    [bench_mirror]="--repeat 1"
    [bench_mesh]="--quick"
    [bench_dashboard]="--minutes 2 --clients 10"
)

out="out/bench-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
summary="$out/summary.jsonl"
: >"$summary"
limit="${TICKMESH_BENCH_TIMEOUT_S:-1200}"
failed=()
started=$SECONDS

# run_bench LABEL SCRIPT OPTIONS: one bench, its output to the terminal and to LABEL.txt; a
# failure or a run past the time limit is recorded in the summary and the others still run.
run_bench() {
    local label="$1" path="$2" options="$3" status=0 reason
    echo
    echo "=== $label $options"
    # shellcheck disable=SC2086  # the options are words
    timeout --signal=TERM --kill-after=30 "$limit" \
        .venv/bin/python "$path" $options --summary "$summary" 2>&1 | tee "$out/$label.txt" ||
        status=$?
    if [[ $status -ne 0 ]]; then
        failed+=("$label")
        reason="exit $status"
        [[ $status -eq 124 ]] && reason="ran past ${limit} s"
        printf '{"bench": "%s", "figure": "FAILED (%s)", "result": "see %s"}\n' \
            "$label" "$reason" "$out/$label.txt" >>"$summary"
    fi
}

# the whole-mesh runs keep their services' logs and their full results beside the table, so
# that a surprising run can be looked into afterwards (a few hundred KiB a run)
kept() { echo "--workdir $out/$1-logs --json $out/$1.json"; }

for path in bench/bench_*.py; do
    name="$(basename "$path" .py)"
    if [[ $quick == 1 ]]; then options="${short[$name]-}"; else options="${full[$name]-}"; fi
    [[ $name == bench_mesh ]] && options="$options $(kept "$name")"
    run_bench "$name" "$path" "$options"
done

# The real day once per record layout, bars shards and mirror instances (docs/scaling.md).
if [[ $quick == 1 ]]; then
    run_bench bench_mesh_scale bench/bench_mesh.py \
        "--scale --quick --scale-setups 1x1:frame,1x1:batch $(kept bench_mesh_scale)"
else
    run_bench bench_mesh_scale bench/bench_mesh.py "--scale $(kept bench_mesh_scale)"
fi

echo
echo "== tickmesh benchmarks: $(( SECONDS - started )) s; $(nproc) CPUs, load average" \
    "$(cut -d' ' -f1 /proc/loadavg) =="
.venv/bin/python bench/summary.py "$summary" | tee "$out/summary.md"
echo
echo "outputs: $out"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "bench.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
