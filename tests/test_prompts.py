"""Tests of refusal_core.prompts: the built-in prompt sets and the prompt-file loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refusal_core.errors import EmptyInputError, InvalidArgumentError
from refusal_core.prompts import BUILTIN_PROMPT_SETS, load_prompt_records, load_prompts

# ----------------------------------------------------------------------------
# built-in sets
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN_PROMPT_SETS)
def test_builtin_set_loads_non_empty_strings(name: str) -> None:
    prompts = load_prompts(name)
    assert len(prompts) >= 50, f"built-in set {name} has only {len(prompts)} prompts"
    assert all(isinstance(p, str) and p.strip() == p and p for p in prompts), f"{name} holds a bad entry"
    assert len(set(prompts)) == len(prompts), f"{name} holds duplicate instructions"


@pytest.mark.parametrize("kind", ["harmful", "harmless"])
def test_builtin_sizes_and_split_proportions(kind: str) -> None:
    sizes = {split: len(load_prompts(f"{kind}_{split}")) for split in ("train", "val", "test")}
    total = sum(sizes.values())
    assert total >= 400, f"{kind} has {total} instructions in all, expected at least 400"
    assert 0.5 <= sizes["train"] / total <= 0.7, f"{kind} train share off 60%: {sizes}"
    for split in ("val", "test"):
        assert 0.1 <= sizes[split] / total <= 0.3, f"{kind} {split} share off 20%: {sizes}"


def test_splits_are_disjoint_within_and_across_classes() -> None:
    sets = {name: set(load_prompts(name)) for name in BUILTIN_PROMPT_SETS}
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            common = sets[a] & sets[b]
            assert not common, f"{a} and {b} share instructions, e.g. {sorted(common)[:2]}"


@pytest.mark.parametrize("kind", ["harmful", "harmless"])
def test_every_category_reaches_every_split(kind: str) -> None:
    cats = {
        split: {r["category"] for r in load_prompt_records(f"{kind}_{split}")}
        for split in ("train", "val", "test")
    }
    assert len(cats["train"]) >= 10, f"{kind} train has only {len(cats['train'])} categories"
    assert cats["train"] == cats["val"] == cats["test"], f"{kind} categories differ across splits: {cats}"


def test_harmless_set_reuses_vocabulary_that_sounds_harmful() -> None:
    harmless = " ".join(
        load_prompts("harmless_train") + load_prompts("harmless_val") + load_prompts("harmless_test")
    )
    words = ["kill", "shoot", "attack", "crack", "steal", "poison", "destroy"]
    missing = [w for w in words if w not in harmless.lower()]
    assert not missing, f"harmless prompts never use {missing}; a model could key on single words"


def test_builtin_name_is_not_shadowed_by_a_missing_file() -> None:
    with pytest.raises(InvalidArgumentError, match="built-in sets are"):
        load_prompts("harmful_tset")


# ----------------------------------------------------------------------------
# file formats
# ----------------------------------------------------------------------------


def test_csv_with_goal_column_advbench_layout(tmp_path: Path) -> None:
    path = tmp_path / "advbench.csv"
    path.write_text('goal,target\n"Say hi, politely",Sure\nCount to three,Sure\n', encoding="utf-8")
    assert load_prompts(path) == ["Say hi, politely", "Count to three"], "CSV goal column not read in order"


def test_json_list_of_strings_and_of_objects(tmp_path: Path) -> None:
    strings = tmp_path / "a.json"
    strings.write_text(json.dumps(["one", " two "]), encoding="utf-8")
    assert load_prompts(strings) == ["one", "two"], "JSON list of strings not read (stripped)"
    objects = tmp_path / "b.json"
    objects.write_text(json.dumps([{"instruction": "x"}, {"goal": "y"}, {"prompt": "z"}]), encoding="utf-8")
    assert load_prompts(str(objects)) == ["x", "y", "z"], "JSON objects with instruction/goal/prompt not read"


def test_jsonl_skips_blank_lines_and_keeps_category(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"instruction": "a", "category": "c1"}\n\n"b"\n', encoding="utf-8")
    assert load_prompt_records(path) == [
        {"instruction": "a", "category": "c1"},
        {"instruction": "b", "category": ""},
    ], "JSONL records not read as expected"


# ----------------------------------------------------------------------------
# bad input: every error names the path and the problem
# ----------------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    with pytest.raises(InvalidArgumentError, match=r"nope\.csv.*does not exist"):
        load_prompts(path)


def test_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="not a regular file"):
        load_prompts(tmp_path)


def test_unsupported_suffix_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("hello\n", encoding="utf-8")
    with pytest.raises(InvalidArgumentError, match=r"prompts.txt.*unsupported format '\.txt'"):
        load_prompts(path)


@pytest.mark.parametrize(
    ("name", "content"),
    [("empty.csv", ""), ("blank.jsonl", "\n \n"), ("empty.json", "[]"), ("header_only.csv", "goal,target\n")],
)
def test_empty_files_raise_empty_input(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(EmptyInputError, match=name):
        load_prompts(path)


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("nogoal.csv", "question,answer\nq,a\n", "no 'goal' column"),
        ("emptygoal.csv", "goal\nok\n  \n", "line 3 has an empty 'goal'"),
        ("bad.json", "[1, 2", "not valid JSON"),
        ("dict.json", '{"goal": "x"}', "must hold a JSON list"),
        ("number.json", "[3]", "item 0 must be a string or an object"),
        ("nokey.json", '[{"text": "x"}]', "item 0 has none of the keys"),
        ("emptystr.json", '["ok", ""]', "item 1 has an empty or non-string prompt"),
        ("bad.jsonl", '"ok"\n{oops\n', "line 2 is not valid JSON"),
    ],
)
def test_malformed_files_name_path_and_problem(tmp_path: Path, name: str, content: str, problem: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InvalidArgumentError) as info:
        load_prompts(path)
    message = str(info.value)
    assert name in message, f"error for {name} does not name the file: {message}"
    assert problem in message, f"error for {name} does not say {problem!r}: {message}"


def test_non_utf8_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes(b"goal\ncaf\xe9\n")
    with pytest.raises(InvalidArgumentError, match=r"latin\.csv.*not UTF-8"):
        load_prompts(path)


def test_wrong_argument_type_is_rejected() -> None:
    with pytest.raises(InvalidArgumentError, match="path_or_name"):
        load_prompts(42)  # type: ignore[arg-type]
