import pytest
import torch
import torch.nn.functional as F

from clip_model.zeroshot import (build_classifier, classification_metrics, load_templates,
                                 openai_imagenet_templates, retrieval_metrics, imagenet_classnames)


def test_shipped_templates_and_classnames() -> None:
    t = openai_imagenet_templates()
    assert len(t) == 80 and all(x.count("{}") == 1 for x in t)
    assert t[0] == "a bad photo of a {}." and "itap of a {}." in t
    assert len(imagenet_classnames()) == 1000
    assert load_templates("simple") == ["a photo of a {}."]


def test_templates_file_errors(tmp_path) -> None:
    p = tmp_path / "t.txt"
    p.write_text("a {} photo\nno placeholder\n")
    with pytest.raises(ValueError, match="no placeholder"):
        load_templates(str(p))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_templates(str(tmp_path / "nope.txt"))


def test_classifier_averages_normalised_prompt_embeddings() -> None:
    # A fake text encoder: each prompt maps to a fixed vector, so the expected ensemble is known.
    table = {"a cat": torch.tensor([3.0, 0.0]), "the cat": torch.tensor([0.0, 1.0]),
             "a dog": torch.tensor([-1.0, 0.0]), "the dog": torch.tensor([-2.0, 0.0])}
    prompts_seen = []

    def tokenize(prompts):
        prompts_seen.extend(prompts)
        return torch.arange(len(prompts_seen) - len(prompts), len(prompts_seen))

    def encode(idx):
        return torch.stack([table[prompts_seen[i]] for i in idx.tolist()])

    w = build_classifier(encode, tokenize, ["cat", "dog"], ["a {}", "the {}"])
    assert w.shape == (2, 2)
    # cat: mean of unit vectors (1,0) and (0,1) renormalised = (0.707, 0.707): unequal norms do not weigh in.
    assert torch.allclose(w[:, 0], torch.tensor([2 ** -0.5, 2 ** -0.5]), atol=1e-6)
    assert torch.allclose(w[:, 1], torch.tensor([-1.0, 0.0]))


def test_classification_metrics() -> None:
    logits = torch.tensor([[5.0, 1, 0], [0, 5, 1], [0, 1, 5], [5, 0, 1]])
    labels = torch.tensor([0, 1, 1, 2])  # two right, the 3rd has label 1 in 2nd place, the 4th in 2nd place
    m = classification_metrics(logits, labels, 3)
    assert m["top1"] == 0.5 and m["top5"] == 1.0
    assert m["per_class"] == [1.0, 0.5, 0.0]
    assert m["confusion"][1] == [0, 1, 1]


def test_retrieval_metrics() -> None:
    img = F.normalize(torch.eye(3), dim=-1)
    txt = F.normalize(torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 0, 1.0], [0, 1.0, 0.5]]), dim=-1)
    owner = [0, 1, 2, 1]  # text 1 belongs to image 1 but looks like image 0
    m = retrieval_metrics(img, txt, owner, ks=(1, 2))
    assert m["text_to_image_R@1"] == 0.75  # texts 0, 2 and 3; text 1 ranks image 0 first
    assert m["text_to_image_R@2"] == 1.0
    assert m["image_to_text_R@1"] == pytest.approx(1.0)  # image 1's best text is text 3, its own
