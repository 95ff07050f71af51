"""Prompt pairs: substitution rules, label templates, pair tables (no Ray, no model)."""

import json
import re
import time

import pandas as pd
import pytest

from diffedit.manifests.schema import edit_id
from diffedit.pipelines import prompts
from diffedit.pipelines.prompts import PromptSpec


def targets(spec, caption, label=None, key="k"):
    return [e.target_prompt for e in spec.edits(key, caption, label)]


RULES = {"rules": [{"from": "dog", "to": ["cat", "fox"]}, {"from": "red", "to": "blue"},
                   {"from": "puppy", "to": "kitten"}]}


def test_rules_whole_word_case_preserving_plurals_one_edit_per_target():
    spec = PromptSpec.from_dict(RULES)
    assert targets(spec, "A Dog and two dogs") == ["A Cat and two dogs", "A Fox and two dogs"]  # count 1
    assert targets(spec, "two dogs") == ["two cats", "two foxes"]
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
    with pytest.raises(ValueError, match="unknown key 'rule'"):
        PromptSpec.from_dict({"rule": []})
    with pytest.raises(ValueError, match="`from` and `to`"):
        PromptSpec.from_dict({"rules": [{"from": "dog"}]})
    with pytest.raises(FileNotFoundError):
        PromptSpec.load(tmp_path / "absent.yaml")
    assert targets(PromptSpec.load(None), "a red circle") == ["a blue circle", "a red square"]


def test_edit_id_is_stable_and_distinguishes_edits():
    assert edit_id("s", "k", 0, "a dog", "a cat") == edit_id("s", "k", 0, "a dog", "a cat")
    ids = {edit_id("s", "k", i, "a dog", t) for i, t in enumerate(["a cat", "a fox"])}
    ids |= {edit_id("s", "k2", 0, "a dog", "a cat")}
    assert len(ids) == 3


# Item 10: a pair table loses nothing: keys (and prompts) are text, never numbers.
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_pair_table_keys_keep_leading_zeros(tmp_path, suffix):
    df = pd.DataFrame({"key": ["000001", "000001", "0042"], "source_prompt": ["a dog", "a dog", "NA"],
                       "target_prompt": ["a cat", "a fox", "1.50"]})
    path = tmp_path / f"pairs{suffix}"
    df.to_csv(path, index=False) if suffix == ".csv" else df.to_json(path, orient="records", lines=True)
    spec = PromptSpec.load(path)
    assert targets(spec, None, key="000001") == ["a cat", "a fox"]  # a key given twice: two edits
    assert spec.edits("0042", None, None) == [prompts.Edit("NA", "1.50")]  # no NaN, no 1.5
    assert spec.edits("1", None, None) == []


def test_parquet_table_with_integer_keys_is_refused(tmp_path):
    pd.DataFrame({"key": [1, 2], "source_prompt": ["a", "b"], "target_prompt": ["c", "d"]}).to_parquet(tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"p\.parquet.*`key` holds numbers"):
        PromptSpec.load(tmp_path / "p.parquet")


def test_skip_reason_says_key_not_in_table(tmp_path):
    pd.DataFrame({"key": ["a"], "source_prompt": ["x"], "target_prompt": ["y"]}).to_csv(tmp_path / "p.csv", index=False)
    table = PromptSpec.load(tmp_path / "p.csv")
    assert table.skip_reason("b", "a red dog", None) == "key not in the pair table"
    assert table.skip_reason("a", None, None) == ""  # it has edits
    rules = PromptSpec.from_dict(RULES)
    assert rules.skip_reason("k", "a green cube", None) == "no prompt rule matches"
    assert rules.skip_reason("k", None, None) == "no caption or label"


# Item 14: the whole file is checked at load time; every message names the file and the entry.
BAD_FILES = {
    "template_unknown_field": ("labels: {names: [cat, dog], template: 'a photo of a {labell}'}", r"labels.template.*\{labell\}"),
    "template_conversion": ("labels: {names: [cat, dog], template: 'a photo of a {label!r}'}", r"labels.template.*\{label!r\}"),
    "template_positional": ("labels: {names: [cat, dog], template: 'a photo of a {}'}", r"labels.template.*field \{\}"),
    "template_bad_spec": ("labels: {names: [cat, dog], template: 'a photo of a {label:d}'}", r"labels.template.*cannot be filled"),
    "template_unbalanced": ("labels: {names: [cat, dog], template: 'a photo of a {label'}", r"labels.template.*not a valid"),
    "from_empty": ("rules: [{from: '', to: cat}]", r"rule 0 `from`: is empty"),
    "from_blank": ("rules: [{from: '   ', to: cat}]", r"rule 0 `from`: is empty"),
    "to_null": ("rules: [{from: dog, to: null}]", r"rule 0 `to`: must be text or a list"),
    "to_empty_list": ("rules: [{from: dog, to: []}]", r"rule 0 `to`: is an empty list"),
    "to_nested_list": ("rules: [{from: dog, to: [[cat]]}]", r"rule 0 `to` entry 0: must be text, got a list of 1"),
    "to_mapping": ("rules: [{from: dog, to: {cat: 1}}]", r"rule 0 `to`: must be text or a list"),
    "to_number": ("rules: [{from: dog, to: 010}]", r"rule 0 `to` entry 0: 8 is not text; quote it"),
    "to_bool": ("rules: [{from: dog, to: yes}]", r"rule 0 `to` entry 0: True is not text"),
    "rule_unknown_key": ("rules: [{from: dog, to: cat, too: fox}]", r"rule 0: unknown key 'too'"),
    "labels_unknown_key": ("labels: {names: [cat], target: [dog]}", r"`labels`: unknown key 'target'"),
    "names_not_scalar": ("labels: {names: [cat, [dog]]}", r"labels.names` entry 1: must be text, got a list"),
    "names_mapping_value": ("labels: {names: {0: cat, 1: {a: b}}}", r"labels.names` entry 1: must be text, got a mapping"),
    "duplicate_yaml_key": ("rules: [{from: dog, from: cat, to: fox}]", r"line 1.*appears twice"),
    "not_yaml": ("rules:\n  - from: dog\n    to: [cat\n", r"not valid YAML at line 4"),
    "nothing": ("rules: []", r"no rules, labels or table"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_prompt_files_are_refused_at_load(tmp_path, name):
    text, message = BAD_FILES[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"{name}\.yaml.*{message}"):
        PromptSpec.load(path)


def test_targets_string_is_one_target(tmp_path):
    (tmp_path / "p.yaml").write_text("labels: {names: [cat, dog], targets: fox}\n")
    assert targets(PromptSpec.load(tmp_path / "p.yaml"), None, "0") == ["a photo of a fox"]  # not f, o, x


def test_invalid_json_names_the_line(tmp_path):
    (tmp_path / "p.json").write_text('{"rules": [\n  {"from": "dog", "to": "cat"},\n]}')
    with pytest.raises(ValueError, match=r"p\.json is not valid JSON.*line 3"):
        PromptSpec.load(tmp_path / "p.json")


@pytest.mark.parametrize("where", ["rules: [{from: dog, to: BOMB}]", "labels: {names: BOMB}"])
def test_yaml_alias_bomb_is_refused_without_expanding(tmp_path, where):
    # ~300 bytes whose last list expands to 9**7 (4.8 million) strings, a ~30 MB string if anything prints it
    levels = ["&a [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"&{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdef", "bcdefg")]
    path = tmp_path / "bomb.yaml"
    path.write_text(where.replace("BOMB", "[" + ", ".join(levels) + "]") + "\n")
    t0 = time.time()
    with pytest.raises(ValueError, match=r"bomb\.yaml: .*entry 0: must be text, got a list of 9") as e:
        PromptSpec.load(path)
    assert len(str(e.value)) < 300 and time.time() - t0 < 5


def test_entry_cap_and_file_size_cap(tmp_path, monkeypatch):
    path = tmp_path / "many.json"
    path.write_text(json.dumps({"rules": [{"from": "dog", "to": ["cat"] * 100_001}]}))
    with pytest.raises(ValueError, match=r"many\.json has more than 100000"):
        PromptSpec.load(path)
    monkeypatch.setattr(prompts, "MAX_FILE_BYTES", 1000)
    with pytest.raises(ValueError, match=r"many\.json is \d+ bytes; at most 1000"):
        PromptSpec.load(path)


# Grammar: the article before a replaced word agrees with the new word.
def test_rules_make_the_article_agree():
    spec = PromptSpec.from_dict({"rules": [{"from": "astronaut", "to": "diver"}, {"from": "red", "to": "orange"},
                                           {"from": "apple", "to": ["pear", "hour"]}, {"from": "cat", "to": "unicorn"}]})
    assert targets(spec, "a photo of an astronaut") == ["a photo of a diver"]
    assert targets(spec, "A red circle") == ["An orange circle"]
    assert targets(spec, "A RED CIRCLE") == ["AN ORANGE CIRCLE"]
    assert targets(spec, "an apple, a red hat") == ["an apple, an orange hat", "a pear, a red hat", "an hour, a red hat"]
    assert targets(spec, "a cat and a red car") == ["a cat and an orange car", "a unicorn and a red car"]
    labels = PromptSpec.from_dict({"labels": {"names": ["cat", "owl"]}})
    assert targets(labels, None, "0") == ["a photo of an owl"]


# Part of item 15: the digest covers what a YAML file points to.
def test_digest_follows_the_table(tmp_path):
    (tmp_path / "p.yaml").write_text("table: pairs.csv\n")
    (tmp_path / "pairs.csv").write_text("key,source_prompt,target_prompt\na,x,y\n")
    before = PromptSpec.load(tmp_path / "p.yaml").digest()
    assert PromptSpec.load(tmp_path / "p.yaml").digest() == before and len(before) == 16
    (tmp_path / "pairs.csv").write_text("key,source_prompt,target_prompt\na,x,z\n")
    assert PromptSpec.load(tmp_path / "p.yaml").digest() != before
    assert PromptSpec.from_dict(RULES).digest() != PromptSpec.default().digest()


# `count`: how many matches a rule replaces, in caption order (default 1: one edit changes one object).
def rule(count=None, source="square", to="circle"):
    return PromptSpec.from_dict({"rules": [{"from": source, "to": to, **({} if count is None else {"count": count})}]})


def test_count_defaults_to_the_first_match():
    assert targets(rule(), "a green square, a purple square") == ["a green circle, a purple square"]
    assert prompts.Rule("square", ["circle"]).count == 1
    assert targets(PromptSpec.default(), "a red circle and a red square") == [
        "a blue circle and a red square", "a red square and a red square", "a red circle and a red circle"]


def test_count_all_and_count_n():
    caption = "a square, two squares and a Square"
    assert targets(rule("all"), caption) == ["a circle, two circles and a Circle"]
    assert targets(rule(2), caption) == ["a circle, two circles and a Square"]
    assert targets(rule(1), caption) == ["a circle, two squares and a Square"]
    assert targets(rule(3), caption) == targets(rule(10**30), caption) == targets(rule("all"), caption)


def test_count_counts_plurals_in_caption_order():
    assert targets(rule(source="dog", to=["cat", "fox"]), "two dogs and a dog") == ["two cats and a dog",
                                                                                    "two foxes and a dog"]
    assert targets(rule(2, source="dog", to="cat"), "a dog, two dogs, three dogs") == ["a cat, two cats, three dogs"]


def test_count_changes_only_the_articles_of_replaced_words():
    caption = "a red circle and a red square"
    assert targets(rule(source="red", to="orange"), caption) == ["an orange circle and a red square"]
    assert targets(rule("all", source="red", to="orange"), caption) == ["an orange circle and an orange square"]
    assert targets(rule(source="red", to="orange"), "A red circle and a red square") == [
        "An orange circle and a red square"]


def test_several_rules_each_rewrite_the_caption_with_their_own_count():
    spec = PromptSpec.from_dict({"rules": [{"from": "red", "to": "orange"},
                                           {"from": "circle", "to": "egg", "count": "all"}]})
    assert targets(spec, "a circle and a red circle") == ["a circle and an orange circle", "an egg and a red egg"]


COUNT_ERRORS = [(True, "True"), (False, "False"), (0, "0"), (-1, "-1"), (1.0, "1.0"), (2.5, "2.5"), ("All", "'All'"),
                ("1", "'1'"), ("", "''"), (None, "None"), ([2], "a list of 1"), ({}, "a mapping of 0")]


@pytest.mark.parametrize("count, shown", COUNT_ERRORS)
def test_bad_count_is_refused_naming_the_rule(count, shown):
    with pytest.raises(ValueError) as e:
        PromptSpec.from_dict({"rules": [{"from": "dog", "to": "cat"}, {"from": "red", "to": "blue", "count": count}]})
    assert str(e.value) == (f"Prompt spec: rule 1 `count`: must be a positive integer (the first n matches) or all, "
                            f"got {shown}.")


def test_bad_count_in_a_yaml_file_and_unknown_rule_key(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("rules: [{from: dog, to: cat, count: yes}]\n")
    with pytest.raises(ValueError) as e:
        PromptSpec.load(path)
    assert str(e.value) == (f"Prompts file {path}: rule 0 `count`: must be a positive integer (the first n matches) "
                            f"or all, got True.")
    with pytest.raises(ValueError) as e:
        PromptSpec.from_dict({"rules": [{"from": "dog", "to": "cat", "counts": 2}]})
    assert str(e.value) == "Prompt spec: rule 0: unknown key 'counts'; expected from, to, count."
    path.write_text("rules: [{from: dog, to: cat, count: all}, {from: red, to: blue, count: 2}]\n")
    assert [r.count for r in PromptSpec.load(path).rules] == [None, 2]


def test_digest_covers_count_and_version(monkeypatch):
    digests = {c: rule(c).digest() for c in (None, 1, 2, "all")}
    assert digests[None] == digests[1]  # the default, written or not
    assert len({digests[1], digests[2], digests["all"]}) == 3
    monkeypatch.setattr(prompts, "PROMPTS_VERSION", 2)
    assert rule().digest() != digests[1]


def cased(article: str, word: str) -> str:
    """``word`` (a lowercase article) written like ``article``."""
    if article.isupper() and len(article) > 1:
        return word.upper()
    return word.capitalize() if article[0].isupper() else word


# Grammar: the default colour and shape rules never write "a orange" or "an diver".
@pytest.mark.parametrize("article", ["a", "an", "A", "An", "AN"])
def test_default_rules_keep_every_article_right(article):
    bad = re.compile(r"\b(a\s+[aeiou]|an\s+[b-df-hj-np-tv-z])", re.IGNORECASE)
    for r in prompts.DEFAULT_RULES:
        for target in r["to"]:
            want = cased(article, "an" if target[0] in "aeiou" else "a")
            caption = f"{article} {r['from']} and {article} {r['from']}"
            assert targets(rule(None, r["from"], target), caption) == [f"{want} {target} and {article} {r['from']}"]
            out = targets(rule("all", r["from"], target), caption)
            assert out == [f"{want} {target} and {want} {target}"] and not bad.search(out[0])


@pytest.mark.parametrize("caption, source, target, want", [
    ("a photo of an astronaut", "astronaut", "diver", "a photo of a diver"),
    ("A photo of An astronaut", "astronaut", "diver", "A photo of A diver"),
    ("AN ASTRONAUT", "astronaut", "diver", "A DIVER"),
    ("An Astronaut", "astronaut", "diver", "A Diver"),
    ("a photo of a diver", "diver", "astronaut", "a photo of an astronaut"),
    ("A diver", "diver", "astronaut", "An astronaut"),
    ("A DIVER", "diver", "astronaut", "AN ASTRONAUT"),
    ("A red circle", "red", "orange", "An orange circle"),
    ("an orange circle", "orange", "red", "a red circle"),
])
def test_articles_agree_in_any_case(caption, source, target, want):
    assert targets(rule(None, source, target), caption) == [want]
