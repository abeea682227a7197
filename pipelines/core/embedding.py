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
                 activation: str | None = None, what: str = "eval image", flag_undecodable: bool = False) -> None:
        torch.set_num_threads(threads)  # actors share the node's cores; torch would take them all
        model, _ = load_export(local_checkpoint(checkpoint, s3), activation=activation)
        self._setup(model, with_phash, what, flag_undecodable)

    @classmethod
    def with_model(cls, model: torch.nn.Module, with_phash: bool, what: str = "eval image") -> "ImageEmbedder":
        """The same embedder on a model this process has already loaded (evaluate's driver, for small sets),
        with the process's own torch threads."""
        self = cls.__new__(cls)
        self._setup(model, with_phash, what, flag_undecodable=False)
        return self

    def _setup(self, model: torch.nn.Module, with_phash: bool, what: str, flag_undecodable: bool) -> None:
        self.model = model
        self.transform = EvalTransform(self.model.image_size)
        self.with_phash = with_phash
        self.what = what  # names a row in errors: dedup embeds training rows with it too
        # True: an image that does not decode gets a zero embedding and its error in an `error` column (dedup
        # rejects such rows with a reason) instead of raising out of the stage.
        self.flag_undecodable = flag_undecodable

    def _decode(self, data: bytes, ident: str) -> torch.Tensor:
        try:
            return self.transform(data)
        except (OSError, ValueError, SyntaxError) as err:
            raise ValueError(f"{self.what} {ident}: not a decodable image ({err})") from err

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors, errors = [], []
        for b, i in zip(batch["image"], batch["id"]):
            try:
                tensors.append(self._decode(b, str(i)))
                errors.append("")
            except ValueError as err:
                if not self.flag_undecodable:
                    raise
                tensors.append(None)
                errors.append(str(err)[:300])
        ok = [t for t in tensors if t is not None]
        feats = F.normalize(self.model.encode_image(torch.stack(ok)).float(), dim=-1).numpy() if ok else None
        size = self.model.text_projection.shape[1] if feats is None else feats.shape[1]  # embed_dim
        emb = np.zeros((len(tensors), size), np.float32)
        if feats is not None:
            emb[[j for j, t in enumerate(tensors) if t is not None]] = feats
        out = {k: v for k, v in batch.items() if k != "image"}
        out["embedding"] = emb
        if self.flag_undecodable:
            out["error"] = np.array(errors, dtype=object)
        if self.with_phash:
            from pipelines.core.images import phash_of_encoded

            out["phash"] = np.array([phash_of_encoded(b) for b in batch["image"]], dtype=np.int64)
        return out
