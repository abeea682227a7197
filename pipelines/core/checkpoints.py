"""CLIP weights where torch can load them: a local path stays as it is, an s3:// checkpoint is copied to a
fresh local directory (torch.load wants a file). Used by evaluate and the CLIP-score filter.

An s3:// URI may name any checkpoint `clip_model.formats.load_checkpoint` reads:

- a directory (a prefix): our export, a Hugging Face CLIPModel directory (shards included: they sit beside
  their index) or an open_clip hub directory. Every object directly under the prefix is copied under its own
  name (no format reads a sub-directory), except weights no loader here reads: other frameworks' (.h5,
  .msgpack, .onnx, .ot, as a mirrored Hub repository holds them) and a PyTorch pickle whose safetensors twin
  is there (the loaders read the safetensors file then). A prefix with none of the files that make a
  directory a checkpoint is refused before anything is downloaded.
- a single file (OpenAI's TorchScript .pt, open_clip's epoch_N.pt, .bin, .safetensors): copied with the
  sidecars the loader consults beside it locally, open_clip_config.json next to it and ../params.txt (an
  open_clip run's, for its epoch_N.pt), so it loads with the same activation as from a local disk.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from urllib.parse import urlparse

from pipelines.core.storage import S3Options, Storage

_CHUNK = 16 << 20  # bytes per read while copying an object to disk
# Weights of other frameworks, which a mirrored Hub repository holds beside PyTorch's; no loader here reads them.
_UNREAD_SUFFIXES = (".h5", ".msgpack", ".onnx", ".ot")
_OPEN_CLIP_PARAMS = "params.txt"  # an open_clip run's, beside its checkpoints/ directory


def local_checkpoint(uri: str, s3: S3Options | None = None) -> str:
    """A local path to load_checkpoint: an s3:// checkpoint (directory or file) is downloaded to a fresh temp
    dir per call; the directory itself, or the file inside it, is returned."""
    if not uri.startswith("s3://"):
        if not os.path.exists(uri):
            raise FileNotFoundError(f"checkpoint {uri}: no such file or directory")
        return uri
    parsed = urlparse(uri)
    # One Storage at the bucket, so that a file's sidecars one and two levels up are in reach.
    bucket = Storage.from_uri(f"s3://{parsed.netloc}", s3)
    key = parsed.path.strip("/")
    listed = bucket.list(key, recursive=False)
    names = [posixpath.basename(p) for p in listed if not p.endswith("/")]
    if names:
        return _download(bucket, key, _dir_files(uri, names), tempfile.mkdtemp(prefix="clip-ckpt-"))
    if not key or not _is_file(bucket, key):
        subdirs = [posixpath.basename(p.rstrip("/")) + "/" for p in listed]
        more = ", ..." if len(subdirs) > 5 else ""
        inside = f" (only sub-prefixes: {', '.join(subdirs[:5])}{more})" if subdirs else ""
        raise FileNotFoundError(f"checkpoint {uri}: no such object and no objects directly under that prefix{inside}")
    parent, base = posixpath.split(key)
    dest = tempfile.mkdtemp(prefix="clip-ckpt-")
    # The file goes one level down, so that the loader's ../params.txt is this temp dir's, never its parent's.
    sub = posixpath.basename(parent) or "checkpoint"
    from clip_model.formats import OPEN_CLIP_CONFIG  # torch: only when a checkpoint is read

    files = {posixpath.join(sub, base): key}
    beside = posixpath.join(parent, OPEN_CLIP_CONFIG)
    if _is_file(bucket, beside):
        files[posixpath.join(sub, OPEN_CLIP_CONFIG)] = beside
    if parent:
        params = posixpath.join(posixpath.dirname(parent), _OPEN_CLIP_PARAMS)
        if _is_file(bucket, params):
            files[_OPEN_CLIP_PARAMS] = params
    _download(bucket, "", files, dest)
    return os.path.join(dest, sub, base)


def _dir_files(uri: str, names: list[str]) -> dict[str, str]:
    """{local name: object name} for a checkpoint directory's objects; refuses a prefix that is none."""
    from clip_model.formats import EXPORT_CONFIG_FILE, EXPORT_MODEL_FILE, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS
    from clip_model.hf import LEGACY_WEIGHTS_FILE, WEIGHTS_FILE

    have = set(names)
    markers = (EXPORT_MODEL_FILE, EXPORT_CONFIG_FILE, OPEN_CLIP_CONFIG)  # formats._load_dir's three branches
    if not have.intersection(markers):
        raise ValueError(f"checkpoint {uri}: its {len(names)} objects (e.g. {names[0]}) include none of "
                         f"{', '.join(markers)}: not a checkpoint directory (or name the checkpoint file itself)")
    skip: set[str] = set()
    if have.intersection({WEIGHTS_FILE, WEIGHTS_FILE + ".index.json"}):  # HF reads safetensors when there
        stem = LEGACY_WEIGHTS_FILE.removesuffix(".bin")  # pytorch_model.bin, its index, pytorch_model-0000N-of-M.bin
        skip |= {n for n in have if n.startswith(stem) and (n.endswith(".bin") or n.endswith(".bin.index.json"))}
    if OPEN_CLIP_WEIGHTS[0] in have:  # open_clip_model.safetensors before open_clip_pytorch_model.bin
        skip |= set(OPEN_CLIP_WEIGHTS[1:])
    return {n: n for n in names if n not in skip and not n.endswith(_UNREAD_SUFFIXES)}


def _is_file(st: Storage, path: str) -> bool:
    try:
        st.size(path)
    except FileNotFoundError:
        return False
    return True


def _download(st: Storage, prefix: str, files: dict[str, str], dest: str) -> str:
    """Copy each object (`prefix`/name) to dest/local name in chunks (weights can be GBs); `dest` on success."""
    try:
        for local, name in files.items():
            target = os.path.join(dest, local)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with st.open_input(posixpath.join(prefix, name)) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest
