#!/usr/bin/env python3
"""Archives one of the project's models for TorchServe: the same TorchScript file, its
metadata.json (the handler builds its transform from it) and index_to_name.json made from
metadata.json's labels, with handler.py, into MODEL_STORE/NAME.mar.

    .venv-torchserve/bin/python bench/peers/torchserve/archive.py models/resnet18 target/torchserve/model-store
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def model_files(model_dir: str) -> tuple[str, dict]:
    """The folder holding metadata.json: the model folder itself or its highest numbered version."""
    versions = sorted((int(d) for d in os.listdir(model_dir) if d.isdigit()), reverse=True)
    folder = os.path.join(model_dir, str(versions[0])) if versions and not os.path.exists(
        os.path.join(model_dir, "metadata.json")) else model_dir
    with open(os.path.join(folder, "metadata.json")) as f:
        return folder, json.load(f)


def main() -> int:
    model_dir, store = sys.argv[1], sys.argv[2]
    name = os.path.basename(os.path.normpath(model_dir))
    folder, meta = model_files(model_dir)
    os.makedirs(store, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        index = os.path.join(tmp, "index_to_name.json")
        with open(index, "w") as f:
            json.dump({str(i): label for i, label in enumerate(meta["labels"])}, f)
        archiver = os.path.join(os.path.dirname(sys.executable), "torch-model-archiver")
        subprocess.run([
            archiver, "--model-name", name, "--version", "1.0",
            "--serialized-file", os.path.join(folder, meta.get("file", "model.pt")),
            "--handler", os.path.join(HERE, "handler.py"),
            "--extra-files", f"{index},{os.path.join(folder, 'metadata.json')}",
            "--export-path", store, "--force",
        ], check=True)
    print(f"archived {folder} as {os.path.join(store, name + '.mar')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
