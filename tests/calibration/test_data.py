import pytest
import torch

from calq.calibration.data import (
    DatasetSpec,
    calibration_windows,
    evaluation_windows,
    load_text,
    parse_dataset_spec,
)
from calq.errors import DatasetError


@pytest.mark.parametrize("spec,expected", [
    ("stdlib", DatasetSpec("stdlib", "stdlib", "train")),
    ("stdlib:train", DatasetSpec("stdlib", "stdlib", "train")),
    ("stdlib:test", DatasetSpec("stdlib", "stdlib", "test")),
    ("wikitext2", DatasetSpec("hub", "wikitext2", None)),
    ("wikitext2:validation", DatasetSpec("hub", "wikitext2", "validation")),
    ("c4", DatasetSpec("hub", "c4", None)),
])
def test_parse_named_specs(spec, expected):
    assert parse_dataset_spec(spec) == expected


def test_parse_and_read_local_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("hello world\n")
    raw = tmp_path / "b.raw"
    raw.write_text(" = Title = \n text \n")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "first row"}\n{"text": "second row"}\n')
    assert parse_dataset_spec(str(txt)) == DatasetSpec("file", str(txt))
    assert load_text(str(txt)) == "hello world\n"
    assert load_text(str(raw)) == " = Title = \n text \n"
    assert load_text(str(jsonl)) == "first row\n\nsecond row"


def test_parquet_with_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["alpha", "beta"], "id": [1, 2]}), path)
    assert load_text(str(path)) == "alpha\n\nbeta"


@pytest.mark.parametrize("spec,needle", [
    ("missing/file.txt", "not found"),
    ("nosuchname", "unknown dataset"),
    ("stdlib:validation", "unknown stdlib split"),
    ("wikitext2:dev", "unknown split"),
    ("", "empty"),
])
def test_bad_specs_name_the_problem(spec, needle):
    with pytest.raises(DatasetError, match=needle):
        parse_dataset_spec(spec)


def test_empty_file_and_missing_text_field(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DatasetError, match="is empty"):
        load_text(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(DatasetError, match="no `text` field"):
        load_text(str(bad))


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # both libraries read the variables once, at import: an earlier test may have imported them already
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetError, match="could not load wikitext2"):
        load_text("wikitext2")


def test_calibration_windows_are_seeded(tokenizer):
    text = load_text("stdlib:train")
    a = calibration_windows(text, tokenizer, num_samples=4, seq_len=64, seed=1)
    b = calibration_windows(text, tokenizer, num_samples=4, seq_len=64, seed=1)
    c = calibration_windows(text, tokenizer, num_samples=4, seq_len=64, seed=2)
    assert a.shape == (4, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_evaluation_windows_follow_gptq_protocol(tokenizer):
    text = "def f(x):\n    return x\n" * 200
    ids = tokenizer(text)["input_ids"]
    w = evaluation_windows(text, tokenizer, seq_len=50)
    assert w.shape == (len(ids) // 50, 50)                       # tail dropped, no overlap
    assert w.flatten().tolist() == ids[: w.numel()]              # tokenized once, cut in order
    assert evaluation_windows(text, tokenizer, seq_len=50, max_windows=3).shape == (3, 50)
    with pytest.raises(DatasetError, match="fewer than seq_len"):
        evaluation_windows("short", tokenizer, seq_len=50)
