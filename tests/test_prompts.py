"""Prompt pairs: substitution rules, label templates, pair tables (no Ray, no model)."""

import json

import pandas as pd
import pytest

from diffedit.manifests.schema import edit_id
from diffedit.pipelines.prompts import PromptSpec


def targets(spec, caption, label=None, key="k"):
    return [e.target_prompt for e in spec.edits(key, caption, label)]


RULES = {"rules": [{"from": "dog", "to": ["cat", "fox"]}, {"from": "red", "to": "blue"},
                   {"from": "puppy", "to": "kitten"}]}


def test_rules_whole_word_case_preserving_plurals_one_edit_per_target():
    spec = PromptSpec.from_dict(RULES)
    assert targets(spec, "A Dog and two dogs") == ["A Cat and two cats", "A Fox and two foxes"]
    assert targets(spec, "DOG") == ["CAT", "FOX"]
    assert targets(spec, "Puppies play") == ["Kittens play"]
    assert targets(spec, "hotdog stand") == []  # whole words only
    assert targets(spec, "red dogs") == ["red cats", "red foxes", "blue dogs"]
    assert all(e.source_prompt == "red dogs" for e in spec.edits("k", "red dogs", None))  # source = caption


@pytest.mark.parametrize("caption", ["nothing to swap", "", None])
def test_no_match_or_no_caption_gives_no_edit(caption):
    assert PromptSpec.from_dict(RULES).edits("k", caption, None) == []


def test_label_templates():
    spec = PromptSpec.from_dict({"labels": {"names": ["cat", "dog", "fox"]}})
    edits = spec.edits("k", None, "1")
    assert [e.source_prompt for e in edits] == ["a photo of a dog"] * 2
    assert [e.target_prompt for e in edits] == ["a photo of a cat", "a photo of a fox"]
    spec = PromptSpec.from_dict({"labels": {"names": {3: "cat", 7: "dog"}, "targets": ["horse"],
                                            "template": "an image of a {label}"}})
    assert targets(spec, None, 7) == ["an image of a horse"]
    assert spec.edits("k", "a dog on grass", 7)[0].source_prompt == "a dog on grass"  # the caption wins


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_pair_tables(tmp_path, suffix):
    df = pd.DataFrame({"key": ["a", "a", "b"], "source_prompt": ["x", "x", "y"], "target_prompt": ["x1", "x2", "y1"]})
    path = tmp_path / f"pairs{suffix}"
    {".csv": lambda: df.to_csv(path, index=False), ".jsonl": lambda: df.to_json(path, orient="records", lines=True),
     ".parquet": lambda: df.to_parquet(path)}[suffix]()
    spec = PromptSpec.load(path)
    assert targets(spec, "ignored caption", key="a") == ["x1", "x2"]
    assert spec.edits("b", None, None)[0].source_prompt == "y"
    assert spec.edits("missing", "a dog", None) == []


def test_files_and_errors(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(RULES))
    (tmp_path / "p.yaml").write_text("rules:\n  - from: dog\n    to: [cat, fox]\n  - from: red\n    to: blue\n")
    for name in ("p.json", "p.yaml"):
        assert targets(PromptSpec.load(tmp_path / name), "a red dog") == ["a red cat", "a red fox", "a blue dog"]
    with pytest.raises(ValueError, match="Unknown key"):
        PromptSpec.from_dict({"rule": []})
    with pytest.raises(ValueError, match="`from` and `to`"):
        PromptSpec.from_dict({"rules": [{"from": "dog"}]})
    with pytest.raises(FileNotFoundError):
        PromptSpec.load(tmp_path / "absent.yaml")
    assert targets(PromptSpec.load(None), "a red circle") == ["a blue circle", "a red square"]


def test_edit_id_is_stable_and_distinguishes_edits():
    assert edit_id("k", 0, "a dog", "a cat") == edit_id("k", 0, "a dog", "a cat")
    ids = {edit_id("k", i, "a dog", t) for i, t in enumerate(["a cat", "a fox"])}
    ids |= {edit_id("k2", 0, "a dog", "a cat")}
    assert len(ids) == 3
