"""The paper's few-shot benchmarks read from their published files (evaluation/benchmarks.py):
every layout's quirks, the support split the shots come from, the one-line error for a
missing file, and the Table-3-shaped table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mm1_megatron.evaluation.benchmarks import (BENCHMARKS, SUITE_FOLDERS, BenchmarkError,
                                                load_benchmark)
from mm1_megatron.evaluation.evaluator import TaskResult, paper_table
from mm1_megatron.evaluation.tasks import CAPTION, VQA
from tests._helpers.benchmarks import QUERIES, SUPPORT, write_benchmarks


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_benchmarks(tmp_path_factory.mktemp("bench"))


def _load(root: Path, name: str):
    support = root / "coco" if name == "nocaps" else None
    return load_benchmark(name, root / SUITE_FOLDERS[name], support)


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_each_published_layout_reads_into_queries_and_a_support_split(root, name):
    task = _load(root, name)
    assert len(task) == QUERIES and len(task.support) >= SUPPORT - 1
    assert task.kind == BENCHMARKS[name].kind and task.meta["metric"] == BENCHMARKS[name].metric
    for e in task.examples + task.support.examples:
        assert len(e.images) == 1 and Path(e.images[0]).is_file(), e
    queried = {e.images for e in task.examples}
    assert not queried & {e.images for e in task.support.examples}  # shots never the query
    shots = task.support_for(0, 8, seed=0)
    assert len(shots) == 8 and shots == task.support_for(0, 8, seed=0)


def test_the_quirks_of_each_format(root):
    coco = _load(root, "coco-karpathy")
    raw = json.loads((root / "coco" / "dataset_coco.json").read_text())["images"]
    assert [e.id for e in coco.examples] == [str(i["cocoid"]) for i in raw
                                              if i["split"] == "test"]
    splits = {str(i["cocoid"]): i["split"] for i in raw}
    assert {splits[e.id] for e in coco.support.examples} == {"train", "restval"}
    assert all(len(e.captions) == 5 for e in coco.examples)
    # TextCaps: one row per caption, grouped by image
    textcaps = _load(root, "textcaps")
    assert all(len(e.captions) == 5 for e in textcaps.examples)
    # nocaps: 10 captions per image, shots from COCO Karpathy train
    nocaps = _load(root, "nocaps")
    assert all(len(e.captions) == 10 for e in nocaps.examples)
    assert nocaps.support.examples[0].images[0].startswith(str(root / "coco"))
    # VQAv2: questions joined with annotations, COCO file names
    vqa = _load(root, "vqav2")
    assert vqa.examples[0].images[0].endswith("val2014/COCO_val2014_000000000300.jpg")
    assert len(vqa.examples[0].answers) == 10 and vqa.kind == VQA
    # VizWiz: every answer counts, "unanswerable" included, whatever its confidence
    vizwiz = _load(root, "vizwiz")
    assert any("unanswerable" in e.answers for e in vizwiz.examples)
    assert all(len(e.answers) == 10 for e in vizwiz.examples)
    # GQA: a dict keyed by question id, one answer, exact match
    gqa = _load(root, "gqa")
    assert gqa.examples[0].id == "20001100" and gqa.examples[0].answers == ("dog",)
    assert gqa.meta["metric"] == "exact_match" and coco.kind == CAPTION
    # OK-VQA v1.1: scored against the stemmed answers; predictions are stemmed with the word
    # table the training split's raw and stemmed answers give
    okvqa = _load(root, "okvqa")
    assert "ride horse" in okvqa.examples[0].answers and "riding horses" not in \
        okvqa.examples[0].answers
    assert okvqa.meta["answer_stems"] == {"riding": "ride", "horses": "horse",
                                          "christmas": "christmas", "morning": "morn",
                                          "kites": "kite"}


def test_okvqa_stemming_of_predictions():
    """The learned table first (a word the annotations keep stays, whatever the rules say),
    then open_flamingo's rules: "-ing" words to their verb lemma, plural nouns singular; a
    word neither covers is left alone."""
    from mm1_megatron.evaluation.okvqa_stem import learn_stems, okvqa_stem

    stems = learn_stems([("christmas lights", "christmas light"), ("morning", "morn"),
                         ("morning", "morn"), ("morning", "morning"), ("two words", "one")])
    assert stems == {"christmas": "christmas", "lights": "light", "morning": "morn"}
    assert okvqa_stem("Christmas", stems) == "christmas"  # not singularised to "christma"
    assert okvqa_stem("morning", stems) == "morn"  # the most frequent stem of the word
    assert okvqa_stem("surfing", stems) == "surf"
    assert okvqa_stem("playing frisbee", stems) == "play frisbee"
    assert okvqa_stem("umbrellas", stems) == "umbrella"
    assert okvqa_stem("children", stems) == "child"
    assert okvqa_stem("glasses", stems) == "glass"
    assert okvqa_stem("news", stems) == "news"  # a singular noun that ends in s
    assert okvqa_stem("blorping", stems) == "blorping"  # unknown to the lexicon: as it is
    assert okvqa_stem("red bus", stems) == "red bus"


def test_a_missing_file_or_folder_is_one_line_naming_it_and_the_layout(root, tmp_path):
    with pytest.raises(BenchmarkError) as err:
        load_benchmark("textvqa", tmp_path)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "TextVQA_0.5.1_val.json") in message
    assert "train_images/" in message
    (tmp_path / "vqa").mkdir()
    with pytest.raises(BenchmarkError, match=r"val2014/ is missing"):
        for name in ("v2_OpenEnded_mscoco_val2014_questions.json",
                     "v2_mscoco_val2014_annotations.json"):
            (tmp_path / "vqa" / name).write_text(
                (root / "vqav2" / name).read_text())
        load_benchmark("vqav2", tmp_path / "vqa")
    with pytest.raises(BenchmarkError, match="--support-data"):
        load_benchmark("nocaps", root / "nocaps")
    with pytest.raises(BenchmarkError, match="not one of"):
        load_benchmark("flickr30k", root)


def test_the_table_has_the_papers_shape():
    results = [TaskResult(name, BENCHMARKS[name].kind, k, BENCHMARKS[name].metric,
                          score, 3)
               for name, score in (("coco-karpathy", 1.0512), ("vqav2", 55.25), ("gqa", 40.0))
               for k in (0, 4, 8)]
    markdown, figures = paper_table(results, {n: b.column for n, b in BENCHMARKS.items()})
    lines = markdown.splitlines()
    assert lines[0] == "| shots | COCO | VQAv2 | GQA |"
    assert lines[2] == "| 0 | 105.1 | 55.2 | 40.0 |" and lines[4].startswith("| 8 |")
    assert figures["rows"]["4"] == {"COCO": 105.12, "VQAv2": 55.25, "GQA": 40.0}
    assert figures["metrics"]["GQA"] == "exact match"
