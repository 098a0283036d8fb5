#!/usr/bin/env bash
# One step of `make prepare`, run beside others without mixing their output:
#
#   scripts/logged.sh NAME COMMAND [ARG...]
#
# runs COMMAND with its output in target/test-logs/prepare/NAME.log and prints one line with
# the time it took; when it fails, the log's last lines too, and its exit status is COMMAND's.
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
if [ "$status" -eq 0 ]; then
    echo "$name: done in $((took / 60)) min $((took % 60)) s (log: target/test-logs/prepare/$name.log)"
else
    tail -n 40 "$log"
    echo "$name: FAILED (exit $status) after $((took / 60)) min $((took % 60)) s (log: target/test-logs/prepare/$name.log)"
fi
exit "$status"
