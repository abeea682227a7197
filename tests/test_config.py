from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from clip_model.config import ClipConfig
from pipelines.core.config import ConfigError, load_config, to_dict


@dataclass
class Optim:
    lr: float = 0.1
    schedule: Literal["cosine", "constant"] = "cosine"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class Job:
    name: str = "run"
    steps: int = 10
    verbose: bool = False
    tags: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    limit: int | None = None
    shape: tuple[int, int] = (1, 2)
    optim: Optim = field(default_factory=Optim)


def write_yaml(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_without_file() -> None:
    assert load_config(Job, None, []) == Job()


def test_nested_yaml_then_overrides_win(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"steps": 5, "optim": {"lr": 0.5}, "tags": ["x"]})
    cfg = load_config(
        Job,
        path,
        ["optim.lr=3", "verbose=true", "tags=[a,b]", "weights={img: 1, txt: 2.5}", "shape=[3,4]", "name=007"],
    )
    assert cfg.steps == 5  # from the file
    assert cfg.optim.lr == 3.0 and isinstance(cfg.optim.lr, float)  # an int is a fine float
    assert cfg.optim.schedule == "cosine"  # untouched default inside an overridden section
    assert cfg.verbose is True
    assert cfg.tags == ["a", "b"]
    assert cfg.weights == {"img": 1.0, "txt": 2.5}
    assert cfg.shape == (3, 4)
    assert cfg.name == "007"  # a str field keeps the text as typed, not the int 7


def test_unknown_key_names_key_file_and_valid_keys(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"optim": {"lrr": 1.0}})
    with pytest.raises(ConfigError) as info:
        load_config(Job, path, [])
    msg = str(info.value)
    assert "optim.lrr" in msg and str(path) in msg and "lr, schedule" in msg


def test_unknown_override_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown key stepz .*overrides.*valid keys .*steps"):
        load_config(Job, None, ["stepz=3"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("steps=ten", r"steps .* must be int, got 'ten'"),
        ("steps=true", r"steps .* must be int, got True"),  # bool is an int in Python, not here
        ("steps=2.5", r"steps .* must be int, got 2.5"),
        ("verbose=1", r"verbose .* must be bool, got 1"),
        ("tags=oops", r"tags .* must be list\[str\], got 'oops'"),
        ("tags=[1, b]", r"tags\[0\] .* must be str, got 1"),
        ("limit=abc", r"limit .* must be int \| None, got 'abc'"),
        ("shape=[1,2,3]", r"shape .* must have 2 items"),
        ("optim=5", r"optim .* must be a mapping"),
        ("optim.lr=-1", r"invalid optim \(Optim\).*lr must be positive"),
    ],
)
def test_type_errors_name_key_type_and_value(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(Job, None, [override])


def test_literal_accepts_members_only() -> None:
    assert load_config(Job, None, ["optim.schedule=constant"]).optim.schedule == "constant"
    with pytest.raises(ConfigError, match=r"optim.schedule .* must be one of \['cosine', 'constant'\], got 'linear'"):
        load_config(Job, None, ["optim.schedule=linear"])


def test_optional_takes_null_and_value() -> None:
    assert load_config(Job, None, ["limit=null"]).limit is None
    assert load_config(Job, None, ["limit=7"]).limit == 7


def test_to_dict_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(Job, None, ["optim.lr=0.25", "tags=[a]", "shape=[5,6]", "limit=3"])
    saved = to_dict(cfg)
    assert saved["shape"] == [5, 6]  # plain YAML types only
    assert load_config(Job, write_yaml(tmp_path, saved), []) == cfg


def test_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Job, tmp_path / "missing.yaml", [])
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=f"{bad}.*mapping"):
        load_config(Job, bad, [])


def test_loads_the_model_config_with_unions_and_postponed_annotations() -> None:
    # ClipConfig uses `from __future__ import annotations` and `int | tuple[int, int, int, int]`.
    cfg = load_config(ClipConfig, None, ["vision.patch_size=null", "vision.layers=[3,4,6,3]", "vision.width=64"])
    assert cfg.vision.layers == (3, 4, 6, 3) and not cfg.vision.is_vit
    with pytest.raises(ConfigError, match="vision.layers"):
        load_config(ClipConfig, None, ["vision.layers=[1,2]"])
