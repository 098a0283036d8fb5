"""cargo fuzz (libFuzzer) on the image decode path, for FUZZ_SECONDS (60) over the committed
corpus: scripts/fuzz.sh installs cargo-fuzz into target/tools when missing, builds fuzz/
(src/preprocess/ without libtorch) and runs it on a working copy of the corpus; a crash
leaves its input in fuzz/artifacts/decode/. Needs no server.
"""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from harness import ROOT


CORPUS = ROOT / "fuzz/corpus/decode"


def corpus_digest() -> tuple[int, str]:
    """(files, a digest of their names and bytes) of the committed corpus."""
    h = hashlib.sha256()
    files = sorted(p for p in CORPUS.iterdir() if p.is_file())
    for p in files:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return len(files), h.hexdigest()


@pytest.fixture(scope="module")
def fuzz(phase):
    seconds = os.environ.get("FUZZ_SECONDS", "60")
    before = corpus_digest()
    log = phase.logs / "fuzz.log"
    with open(log, "wb") as out:
        rc = subprocess.run([str(ROOT / "scripts/fuzz.sh")], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            env=dict(os.environ, FUZZ_SECONDS=seconds), timeout=1800).returncode
    lines = log.read_text(errors="replace").splitlines()
    for line in lines:
        if line.startswith("fuzz: ") and ("installed" in line or "built" in line or "passed" in line
                                          or "minimised" in line or "FAILED" in line):
            phase.note(line)
    phase.figures.update(seconds=int(seconds), exit=rc, summary=lines[-1] if lines else "")
    return {"rc": rc, "log": log, "tail": "\n".join(lines[-15:]), "corpus": (before, corpus_digest())}


def test_cargo_fuzz_and_the_decode_target_build(fuzz):
    assert fuzz["rc"] != 2, f"see {fuzz['log']}:\n{fuzz['tail']}"


def test_no_crash_on_the_decode_path(fuzz):
    assert fuzz["rc"] == 0, f"input in fuzz/artifacts/decode/; see {fuzz['log']}:\n{fuzz['tail']}"


def test_the_committed_corpus_is_left_as_it_is(fuzz):
    before, after = fuzz["corpus"]
    assert before == after, f"fuzz/corpus/decode changed: {before[0]} files before, {after[0]} after"
