"""TorchServe handler for the benchmark peer: TorchServe's own `image_classifier` handler,
with two changes that make it serve any model of this project correctly.

- The transform (Resize, CenterCrop, ToTensor, Normalize) is built from the model's
  metadata.json (resize_size, input_size, mean, std), archived beside the model, instead of
  the ImageNet constants hard-coded in `ImageClassifier`.
- Each image is `ImageOps.exif_transpose`d and converted to RGB first, as the FastAPI peer
  does: the stock handler passes grayscale photos to a three-channel Normalize, which fails
  the whole batch, and ignores the EXIF orientation that phones write.

Loading (torch.jit.load), batching, inference (torch.inference_mode) and the answer (softmax,
top 5 labels from index_to_name.json) are the stock handler's.
"""
import io
import json
import os

import torch
from PIL import Image, ImageOps
from torchvision import transforms
from ts.torch_handler.image_classifier import ImageClassifier


class MetadataImageClassifier(ImageClassifier):
    def initialize(self, context):
        super().initialize(context)
        model_dir = context.system_properties.get("model_dir")
        with open(os.path.join(model_dir, "metadata.json")) as f:
            meta = json.load(f)
        self.image_processing = transforms.Compose([
            transforms.Resize(meta["resize_size"]),
            transforms.CenterCrop(meta["input_size"]),
            transforms.ToTensor(),
            transforms.Normalize(mean=meta["mean"], std=meta["std"]),
        ])

    def preprocess(self, data):
        images = []
        for row in data:
            body = row.get("data") or row.get("body")
            image = ImageOps.exif_transpose(Image.open(io.BytesIO(body))).convert("RGB")
            images.append(self.image_processing(image))
        return torch.stack(images).to(self.device)
