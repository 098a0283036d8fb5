"""Benchmark peer: the common Python design for serving an image classifier.

FastAPI + PyTorch + PIL: one TorchScript model loaded at import, torchvision's ImageNet
transform, `POST /predict` with a multipart `file`, the top 5 classes back as JSON. It serves
the same model folder as tch-serve, with the resize, crop, mean and std read from the
model's metadata.json, so it is fair to any model the project exports.

    MODEL_DIR=models/resnet18 TORCH_THREADS=2 \
        .venv/bin/uvicorn app:app --app-dir bench/peers/fastapi --port 8101 --workers 1

MODEL_DIR: a model folder (model.pt and metadata.json, directly or in numbered version
folders, the highest one served). TORCH_THREADS: torch's intra-op threads per worker
process. EXIF_TRANSPOSE=0 skips applying the EXIF orientation (on by default, as phones
store portrait photos rotated).
"""
import io
import json
import os

import torch
from fastapi import FastAPI, File, UploadFile
from PIL import Image, ImageOps
from torchvision import transforms


def model_folder(path: str) -> str:
    if os.path.exists(os.path.join(path, "metadata.json")):
        return path
    versions = [int(d) for d in os.listdir(path) if d.isdigit()]
    return os.path.join(path, str(max(versions)))


MODEL_DIR = model_folder(os.environ.get("MODEL_DIR", "models/resnet18"))
EXIF_TRANSPOSE = os.environ.get("EXIF_TRANSPOSE", "1") != "0"
torch.set_num_threads(int(os.environ.get("TORCH_THREADS", str(os.cpu_count()))))

with open(os.path.join(MODEL_DIR, "metadata.json")) as f:
    META = json.load(f)
LABELS = META.get("labels", [])
model = torch.jit.load(os.path.join(MODEL_DIR, META.get("file", "model.pt")), map_location="cpu").eval()
transform = transforms.Compose([
    transforms.Resize(META["resize_size"]),
    transforms.CenterCrop(META["input_size"]),
    transforms.ToTensor(),
    transforms.Normalize(mean=META["mean"], std=META["std"]),
])

app = FastAPI()


@app.get("/health")
def health():
    return {"status": "healthy", "model": META.get("name", os.path.basename(MODEL_DIR))}


@app.post("/predict")
async def predict(file: UploadFile = File(...)):
    image = Image.open(io.BytesIO(await file.read()))
    if EXIF_TRANSPOSE:
        image = ImageOps.exif_transpose(image)
    x = transform(image.convert("RGB")).unsqueeze(0)
    with torch.inference_mode():
        probs = torch.softmax(model(x), dim=1)[0]
    top = torch.topk(probs, 5)
    return {"predictions": [
        {"label": LABELS[i] if i < len(LABELS) else str(i), "index": i, "probability": float(p)}
        for p, i in zip(top.values.tolist(), top.indices.tolist())
    ]}
