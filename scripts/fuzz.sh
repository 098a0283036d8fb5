#!/usr/bin/env bash
# cargo fuzz (libFuzzer) on the image decode path, for a bounded time:
#
#   scripts/fuzz.sh                   # FUZZ_SECONDS=60 by default
#   FUZZ_SECONDS=600 scripts/fuzz.sh
#
# The target is fuzz/fuzz_targets/decode.rs (see its header for the invariants), in the
# standalone crate fuzz/ that compiles the server's src/preprocess/ without libtorch. The
# script installs cargo-fuzz into target/tools when it is missing (from crates.io, pinned),
# builds the target without a sanitizer (`-s none`, which works on stable Rust), and runs it
# over a working copy of fuzz/corpus/decode (the corpus kept in the repository, copied into
# target/fuzz/corpus) and tests/fuzz-corpus (seed images, read only): a run leaves the
# repository's files as they are. After a run without a crash the grown corpus is minimised
# (libFuzzer's -merge=1: only inputs that add coverage beyond the seeds stay); with
# FUZZ_UPDATE_CORPUS=1 the minimised corpus replaces fuzz/corpus/decode, to be committed.
#
# The last line is a summary: executions, exec/s, coverage, corpus size. Exit status: 0 no
# crash; 1 a crash, a timeout or an out-of-memory (the input is left in fuzz/artifacts/decode/
# and the command to reproduce it is printed); 2 cargo-fuzz or the target could not be built.
#
# Environment: FUZZ_SECONDS (60), FUZZ_TIMEOUT (seconds for one input, 10), FUZZ_MINIMISE
# (1; 0 keeps the grown corpus as it is), FUZZ_UPDATE_CORPUS (0; 1 writes the minimised corpus
# back to fuzz/corpus/decode), FUZZ_BUILD_ONLY (0; 1 stops once the target is built),
# CARGO_FUZZ_VERSION (0.13.2).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 2
scripts/build-tools.sh || exit 2

FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
FUZZ_TIMEOUT="${FUZZ_TIMEOUT:-10}"
FUZZ_MINIMISE="${FUZZ_MINIMISE:-1}"
FUZZ_UPDATE_CORPUS="${FUZZ_UPDATE_CORPUS:-0}"
CARGO_FUZZ_VERSION="${CARGO_FUZZ_VERSION:-0.13.2}"
target=decode
committed="fuzz/corpus/$target"
seeds="tests/fuzz-corpus"
artifacts="fuzz/artifacts/$target"
work="$root/target/fuzz"
corpus="$work/corpus"
log="$work/$target.log"
mkdir -p "$work" "$committed" "$artifacts"
# The run grows a copy of the committed corpus.
rm -rf "$corpus" && cp -r "$committed" "$corpus"
export PATH="$root/target/tools/bin:$PATH"

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }'; }
# Files and bytes of a corpus folder.
size_of() { find "$1" -type f | wc -l | tr -d ' '; }
bytes_of() { find "$1" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }'; }

echo "fuzz: $(rustc --version), cargo-fuzz $CARGO_FUZZ_VERSION, target $target, ${FUZZ_SECONDS} s"

if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
    t0=$(now)
    echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION into target/tools"
    if ! cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION" --root target/tools \
        >"$work/install.log" 2>&1; then
        tail -20 "$work/install.log"
        echo "fuzz: cargo install cargo-fuzz failed (see $work/install.log)"
        exit 2
    fi
    echo "fuzz: installed in $(since "$t0") s"
fi

t0=$(now)
if ! cargo fuzz build -s none "$target" >"$work/build.log" 2>&1; then
    tail -30 "$work/build.log"
    echo "fuzz: building the fuzz target failed (see $work/build.log)"
    exit 2
fi
echo "fuzz: built in $(since "$t0") s"
[ "${FUZZ_BUILD_ONLY:-0}" = 1 ] && exit 0

files_before=$(size_of "$corpus")
bytes_before=$(bytes_of "$corpus")
started=$(date +%s)
# -max_len: corpus files stay under 64 KB. -rss_limit_mb: the whole process. -malloc_limit_mb
# only works under a sanitizer; the target counts its own allocations (see its header).
cargo fuzz run -s none "$target" "$corpus" "$seeds" -- \
    -max_total_time="$FUZZ_SECONDS" -max_len=65536 -timeout="$FUZZ_TIMEOUT" \
    -rss_limit_mb=2048 -malloc_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1
status=$?

final_stat() { awk -v k="stat::$1:" '$1 == k { print $2 }' "$log" | tail -1; }
execs=$(final_stat number_of_executed_units)
rate=$(final_stat average_exec_per_sec)
peak=$(final_stat peak_rss_mb)
final=$(grep -E '^#[0-9]+[[:space:]]+(DONE|INITED|pulse|NEW|REDUCE)' "$log" | tail -1)
cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$final")
ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$final")

if [ "$status" -ne 0 ]; then
    # The input that failed: the newest artifact written since the run started.
    crash=$(find "$artifacts" -type f -newermt "@$started" -printf '%T@ %p\n' 2>/dev/null |
        sort -n | tail -1 | cut -d' ' -f2-)
    echo "---- from $log"
    grep -m4 -A3 -E 'panicked at|memory allocation of|ERROR: libFuzzer|^SUMMARY' "$log"
    echo "----"
    echo "fuzz: $target FAILED (libFuzzer exit $status) after ${execs:-?} executions"
    if [ -n "$crash" ]; then
        echo "fuzz: the input is $crash ($(stat -c %s "$crash" 2>/dev/null || echo '?') bytes); reproduce with:"
        echo "  cargo fuzz run -s none $target $crash"
    fi
    exit 1
fi

files_after=$(size_of "$corpus")
bytes_after=$(bytes_of "$corpus")
if [ "$FUZZ_MINIMISE" = 1 ]; then
    # Keep what adds coverage beyond the seeds: the seeds are the merge's initial corpus (what
    # is covered already), the grown corpus is merged into it, then the seeds are taken out.
    t0=$(now)
    min="$work/min"
    rm -rf "$min" && mkdir -p "$min" && cp "$seeds"/* "$min"/
    bin="fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release/$target"
    if "$bin" -merge=1 -max_len=65536 -timeout="$FUZZ_TIMEOUT" -rss_limit_mb=2048 \
        "$min" "$corpus" >"$work/merge.log" 2>&1; then
        for s in "$seeds"/*; do rm -f "$min/$(basename "$s")"; done
        rm -rf "${corpus:?}" && mv "$min" "$corpus"
        echo "fuzz: corpus minimised in $(since "$t0") s: $files_after files ($bytes_after bytes) -> $(size_of "$corpus") files ($(bytes_of "$corpus") bytes)"
        if [ "$FUZZ_UPDATE_CORPUS" = 1 ]; then
            rm -rf "${committed:?}" && cp -r "$corpus" "$committed"
            echo "fuzz: $committed replaced by the minimised corpus: commit it"
        fi
    else
        echo "fuzz: minimising the corpus failed (see $work/merge.log); kept as it is"
    fi
fi

big=$(find "$corpus" -type f -size +64k | wc -l)
[ "$big" -eq 0 ] || echo "fuzz: warning: $big corpus files over 64 KB"
total=$(bytes_of "$corpus")
[ "$total" -le 1048576 ] || echo "fuzz: warning: the corpus is $total bytes, over 1 MB: minimise it before committing"
echo "fuzz: $target passed: ${execs:-?} executions in ${FUZZ_SECONDS} s (${rate:-?} exec/s), coverage ${cov:-?} edges (${ft:-?} features), peak RSS ${peak:-?} MB, corpus $files_before -> $(size_of "$corpus") files ($bytes_before -> $total bytes), no crash"
