import pytest

from pipelines.core.config import load_config
from pipelines.filter.stage import FilterStageConfig, run
from pipelines.filter.rules import FilterConfig, caption_reason, detect_language, image_reason, query_cutoffs
from pipelines.core.storage import Storage
from pipelines.demo.synthetic import shape_samples

from .stage_data import commit_rows, sample_row

# One shared local Ray for the session (tests/conftest.py), started after the S3 server.
pytestmark = pytest.mark.usefixtures("ray_session")


def test_caption_rules() -> None:
    cfg = FilterConfig(min_caption_chars=5, max_caption_chars=80, min_words=2, max_words=12, languages=["en"])
    assert caption_reason("a photo of a red circle on the table", cfg) == ""
    assert caption_reason("cat", cfg) == "caption_too_short"
    assert caption_reason("x" * 81, cfg) == "caption_too_long"
    assert caption_reason("supercalifragilistic", cfg) == "caption_too_few_words"
    assert caption_reason("a " * 13, cfg) == "caption_too_many_words"
    assert caption_reason(None, cfg) == "caption_missing"
    assert caption_reason("Ein großer roter Kreis liegt auf dem Tisch neben der Tasse", cfg) == "caption_language"
    assert caption_reason("un grand cercle rouge est posé sur la table de la cuisine", cfg) == "caption_language"
    assert caption_reason("a big cat", cfg) == ""  # short captions skip language id
    assert detect_language("the quick brown fox jumps over the lazy dog")[0] == "en"
    assert caption_reason("Ein großer roter Kreis liegt auf dem Tisch", FilterConfig(languages=[])) == ""


def test_image_rules_and_config_errors() -> None:
    cfg = FilterConfig(min_image_side=32, max_aspect_ratio=3.0)
    assert image_reason(64, 64, 640, 480, cfg) == ""
    assert image_reason(20, 64, 20, 64, cfg) == "image_too_small"
    assert image_reason(64, 16, 1000, 100, cfg) == "image_too_small"
    assert image_reason(64, 40, 400, 100, cfg) == "image_aspect_ratio"
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        FilterConfig(max_aspect_ratio=0.5)
    with pytest.raises(ValueError, match="max_per_query"):
        FilterConfig(max_per_query=0)


def test_query_cutoffs_keep_smallest_keys() -> None:
    cut = query_cutoffs({"a": ["k3", "k1", "k2", "k9"], "b": ["k5"]}, cap=2)
    assert cut == {"a": "k2"}


def test_filter_stage_counts_every_drop(tmp_path) -> None:
    samples = shape_samples(60, seed=11)
    rows = []
    for i, s in enumerate(samples):
        caption = s.caption
        if i % 10 == 1:
            caption = "ok"  # too short
        if i % 10 == 2:
            caption = "Ein großer roter Kreis liegt auf dem Tisch neben der Tasse"
        rows.append(sample_row(s.image, caption, f"http://x.test/{i}.jpg", query="popular" if i < 30 else s.label))
    crawl_dir = str(tmp_path / "crawl")
    commit_rows(crawl_dir, rows, rows_per_part=25)
    out = str(tmp_path / "filter")
    cfg = load_config(FilterStageConfig, None, [f"input={crawl_dir}", f"output.path={out}", "rules.max_per_query=10",
                                                "rules.min_image_side=32", "ray.num_cpus=4"])
    m = run(cfg)
    assert m.rows_in == 60
    assert m.rejected["caption_too_short"] == 6 and m.rejected["caption_language"] == 6
    # "popular" had 30 rows, 6 of them dropped by caption rules first; the cap keeps 10 of the rest.
    assert m.rejected["query_cap"] == 30 - 6 - 10
    assert m.rows_out == 60 - sum(m.rejected.values())
    st = Storage.from_uri(out)
    kept = st.read_parquet(m.file_paths())
    assert kept.num_rows == m.rows_out
    assert sum(q == "popular" for q in kept.column("query").to_pylist()) == 10
    rejected = st.read_parquet([f["path"] for f in m.extra["rejected_files"]])
    assert rejected.num_rows == sum(m.rejected.values())
    assert set(rejected.column("stage").to_pylist()) == {"filter"}
    # Output parts keep their input names: reruns and audits map one to one.
    assert [f.path for f in m.files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    with pytest.raises(FileNotFoundError, match="run the crawl stage first"):
        run(load_config(FilterStageConfig, None, [f"input={tmp_path / 'nothing'}", f"output.path={out}2"]))


def test_clip_score_filter_uses_a_checkpoint(tmp_path) -> None:
    import torch

    from clip_model import build_model, get_config
    from clip_model.export import save_export
    from clip_model.tokenizer import ClipTokenizer

    torch.manual_seed(0)
    ckpt = str(tmp_path / "export")
    save_export(build_model(get_config("tiny-vit")), ckpt, ClipTokenizer.from_openai_bpe())
    samples = shape_samples(12, seed=2)
    rows = [sample_row(s.image, s.caption, f"http://x.test/{i}.jpg") for i, s in enumerate(samples)]
    crawl_dir = str(tmp_path / "crawl")
    commit_rows(crawl_dir, rows)
    out = str(tmp_path / "filter")
    base = [f"input={crawl_dir}", f"output.path={out}", "rules.languages=[]", f"rules.clip_score_checkpoint={ckpt}",
            "ray.num_cpus=4"]
    m = run(load_config(FilterStageConfig, None, base + ["rules.min_clip_score=-1.0"]))
    assert m.rows_out == 12
    scores = Storage.from_uri(out).read_parquet(m.file_paths()).column("clip_score").to_pylist()
    assert all(-1.0 <= s <= 1.0 for s in scores) and len(set(scores)) > 1
    threshold = sorted(scores)[6]
    m2 = run(load_config(FilterStageConfig, None, [*base[:1], f"output.path={out}2", *base[2:],
                                                   f"rules.min_clip_score={threshold}"]))
    assert m2.rejected == {"clip_score_low": 6}


def test_clip_score_activation_key(tmp_path) -> None:
    """A GELU checkpoint in open_clip's format that records no activation: the filter's scorer stops with an error
    naming rules.clip_score_activation; with it set to gelu the scores are the cosines of evaluate's embeddings
    (same loader, same image and text paths); and the key is validated and counts in the fingerprint."""
    import numpy as np
    import torch

    from clip_model import build_model, get_config
    from clip_model.export import load_export
    from pipelines.core.config import to_dict
    from pipelines.core.manifest import fingerprint, read_committed
    from pipelines.core.storage import S3Options
    from pipelines.core.embedding import ImageEmbedder
    from pipelines.evaluate.stage import _text_features
    from pipelines.filter.stage import ClipScorer, fingerprint_of

    torch.manual_seed(0)
    (tmp_path / "oc").mkdir()
    ckpt = str(tmp_path / "oc" / "open_clip_pytorch_model.bin")  # no open_clip_config.json beside it
    torch.save(build_model(get_config("tiny-vit", activation="gelu")).state_dict(), ckpt)
    with pytest.raises(ValueError, match="does not say which activation.*rules.clip_score_activation"):
        ClipScorer(ckpt, S3Options())
    rows = [sample_row(s.image, s.caption, f"http://x.test/{i}.jpg") for i, s in enumerate(shape_samples(6, seed=3))]
    images, captions = [r["image"] for r in rows], [r["caption"] for r in rows]
    scores = ClipScorer(ckpt, S3Options(), activation="gelu")(images, captions)
    threads = torch.get_num_threads()  # ImageEmbedder sets its actor's thread count; give it back after
    img = ImageEmbedder(ckpt, None, with_phash=False, activation="gelu")(
        {"image": np.array(images, dtype=object), "id": np.arange(len(images))})["embedding"]
    torch.set_num_threads(threads)
    model, tokenizer = load_export(ckpt, activation="gelu")
    txt = _text_features(model, tokenizer, captions).numpy()
    assert np.allclose(scores, (img * txt).sum(axis=1), atol=1e-5, rtol=0)
    assert not np.allclose(scores, ClipScorer(ckpt, S3Options(), activation="quick_gelu")(images, captions),
                           atol=1e-3)  # the wrong activation loads fine and scores otherwise
    with pytest.raises(ValueError, match="filter clip_score_activation must be quick_gelu, gelu or null, got 'relu'"):
        FilterConfig(clip_score_activation="relu")
    crawl_dir = str(tmp_path / "crawl")
    commit_rows(crawl_dir, rows)
    base = [f"input={crawl_dir}", f"output.path={tmp_path / 'filter'}", f"rules.clip_score_checkpoint={ckpt}"]
    fps = {act: fingerprint_of(load_config(FilterStageConfig, None, base + [f"rules.clip_score_activation={act}"]))
           for act in ("null", "gelu", "quick_gelu")}
    assert len(set(fps.values())) == 3
    # Unset, it is left out: fingerprints committed before the key existed stay valid.
    rules = to_dict(FilterConfig(clip_score_checkpoint=ckpt))
    del rules["clip_score_activation"]
    assert fps["null"] == fingerprint("filter", {"rules": rules}, [read_committed(crawl_dir, None, "input")[1]])
