#!/usr/bin/env bash
# A newcomer's first hour, measured: clone this repository afresh, make a fresh virtual environment, and run the
# README's two set-up commands exactly as written (the main job, then the tests), timing each.
#
#   bash benchmarks/newcomer_check.sh            # writes benchmarks/results/newcomer/README.md and logs
#
# The clone is of the committed HEAD (uncommitted changes are not part of it). The model cache
# ($KVSTACK_HOME) and the kernel build (PyTorch's extension directory) are this machine's: a machine that has
# never run kvstack also downloads and converts the model once (about 20 s) and compiles the kernels once
# (about a minute); the log says whether that happened.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="$repo/benchmarks/results/newcomer"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
git clone --quiet "$repo" "$work/kvstack"
cd "$work/kvstack"
commit="$(git rev-parse --short HEAD)"
python -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
python -m pip install --quiet --upgrade pip
# The two commands, extracted from the README's first two ```bash blocks, so the check runs what users read.
main_job="$(awk '/^```bash$/{n++; next} /^```$/{next} n==1' README.md | head -1)"
tests="$(awk '/^```bash$/{n++; next} /^```$/{next} n==2' README.md | head -1)"
run() {  # name, command: run it, keep its log, print seconds and exit status
  local start end status
  start=$(date +%s.%N)
  set +e
  bash -c "$2" > "$out/$1.log" 2>&1
  status=$?
  set -e
  end=$(date +%s.%N)
  printf '%s %.0f %d\n' "$1" "$(echo "$end - $start" | bc)" "$status"
}
main_line="$(run main-job "$main_job")"
test_line="$(run tests "$tests")"
read -r _ main_s main_rc <<< "$main_line"
read -r _ test_s test_rc <<< "$test_line"
summary="$(grep -E '^[0-9]+ (passed|failed)' "$out/tests.log" | tail -1 || true)"
{
  echo "# A newcomer's first hour: the README's set-up commands on a fresh clone"
  echo
  echo "\`bash benchmarks/newcomer_check.sh\` on $(date -u +%Y-%m-%dT%H:%M:%SZ), $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, Python $(python -c 'import platform; print(platform.python_version())'), commit $commit."
  echo "A fresh \`git clone\` and a fresh virtual environment (not the development one); each command is the README's, verbatim."
  echo
  echo "| step | command | wall time | exit status |"
  echo "| --- | --- | ---: | ---: |"
  echo "| main job | \`$main_job\` | ${main_s} s | $main_rc |"
  echo "| tests | \`$tests\` | ${test_s} s | $test_rc |"
  echo
  echo "Test summary: ${summary:-none found}."
  echo
  echo "The main job's last lines:"
  echo
  echo '```text'
  tail -4 "$out/main-job.log"
  echo '```'
  if grep -q "compiling the fused C++ kernels" "$out"/*.log; then echo; echo "The kernels were compiled during this check (first use on this machine)."; fi
} > "$out/README.md"
cat "$out/README.md"
[ "$main_rc" = 0 ] && [ "$test_rc" = 0 ]
