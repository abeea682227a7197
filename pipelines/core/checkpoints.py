"""Exported CLIP weights where torch can load them: a local path stays as it is, an s3:// export is copied
to a fresh local directory (torch.load wants a file). Used by evaluate and the CLIP-score filter."""

from __future__ import annotations

import os
import tempfile

from pipelines.core.storage import S3Options, Storage


def local_checkpoint(uri: str, s3: S3Options | None = None) -> str:
    """A local path to load_export: s3:// checkpoints are downloaded to a fresh temp dir per process."""
    from clip_model.export import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE  # torch: only when a checkpoint is read

    if not uri.startswith("s3://"):
        if not os.path.exists(uri):
            raise FileNotFoundError(f"checkpoint {uri}: no such file or directory")
        return uri
    st = Storage.from_uri(uri, s3)
    dest = tempfile.mkdtemp(prefix="clip-eval-ckpt-")
    if st.exists(MODEL_FILE):
        for name in (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE):
            if st.exists(name):
                with open(os.path.join(dest, name), "wb") as f:
                    f.write(st.read_bytes(name))
        return dest
    parent, _, base = uri.rstrip("/").rpartition("/")
    pst = Storage.from_uri(parent, s3)
    if not base or not pst.exists(base):
        raise FileNotFoundError(f"checkpoint {uri}: neither an export directory with {MODEL_FILE} nor a file")
    with open(os.path.join(dest, base), "wb") as f:
        f.write(pst.read_bytes(base))
    return os.path.join(dest, base)
