"""Image embeddings from a CLIP checkpoint on Ray Data: evaluate embeds eval images with it, dedup's semantic
step (pipelines/dedup/semantic.py) training rows. One class, so both see a checkpoint the same way (loader,
preprocessing, normalisation). Imports torch: import it where a stage embeds, not in a stage's module top.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from clip_model.export import load_export
from clip_model.transforms import EvalTransform
from pipelines.core.checkpoints import local_checkpoint
from pipelines.core.storage import S3Options


class ImageEmbedder:
    """Ray Data callable class: loads the checkpoint once per actor, embeds the `image` column.

    Every other column passes through; `embedding` is L2-normalised float32. With `with_phash`
    it also adds the 64-bit phash (as dedup computes it) for the overlap analysis.
    """

    def __init__(self, checkpoint: str, s3: S3Options | None, with_phash: bool, threads: int = 1,
                 activation: str | None = None, what: str = "eval image") -> None:
        torch.set_num_threads(threads)  # actors share the node's cores; torch would take them all
        self.model, _ = load_export(local_checkpoint(checkpoint, s3), activation=activation)
        self.transform = EvalTransform(self.model.image_size)
        self.with_phash = with_phash
        self.what = what  # names a row in errors: dedup embeds training rows with it too

    def _decode(self, data: bytes, ident: str) -> torch.Tensor:
        try:
            return self.transform(data)
        except (OSError, ValueError, SyntaxError) as err:
            raise ValueError(f"{self.what} {ident}: not a decodable image ({err})") from err

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.stack([self._decode(b, str(i)) for b, i in zip(batch["image"], batch["id"])])  # B, 3, S, S
        feats = F.normalize(self.model.encode_image(images).float(), dim=-1)  # B, D
        out = {k: v for k, v in batch.items() if k != "image"}
        out["embedding"] = feats.numpy().astype(np.float32)
        if self.with_phash:
            from pipelines.core.images import phash_of_encoded

            out["phash"] = np.array([phash_of_encoded(b) for b in batch["image"]], dtype=np.int64)
        return out
