#!/usr/bin/env bash
# One step of `make prepare`, run beside others without mixing their output:
#
#   scripts/logged.sh NAME COMMAND [ARG...]
#
# runs COMMAND with its output in target/test-logs/prepare/NAME.log and prints one line with
# the time it took and the processor time it used; when it fails, the log's last lines too, and
# its exit status is COMMAND's.
set -uo pipefail
name=$1
shift
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log="$root/target/test-logs/prepare/$name.log"
mkdir -p "$(dirname "$log")"
start=$(date +%s)
echo "$name: started"
"$@" >"$log" 2>&1
status=$?
took=$(( $(date +%s) - start ))
# The processor time of COMMAND and everything it waited for (bash's `times`, children's user +
# system); a Docker build's steps run under the Docker daemon and are not counted.
# `times` runs in this shell (redirected, not in a command substitution's subshell, whose
# children would be none).
times >"$log.times"
cpu=$(awk 'END { t = 0; for (i = 1; i <= 2; i++) { split($i, a, "m"); t += a[1] * 60 + a[2] } printf "%d min %02d s", t / 60, t % 60 }' "$log.times")
rm -f "$log.times"
if [ "$status" -eq 0 ]; then
    echo "$name: done in $((took / 60)) min $((took % 60)) s, processor $cpu (log: target/test-logs/prepare/$name.log)"
else
    tail -n 40 "$log"
    echo "$name: FAILED (exit $status) after $((took / 60)) min $((took % 60)) s (log: target/test-logs/prepare/$name.log)"
fi
exit "$status"
