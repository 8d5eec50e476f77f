"""compression.data: reading and validating GLUE SST-2 files, tokenizing, and length-sorted batches."""

from __future__ import annotations

import datasets
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compression import data
from compression.data import DataError, batches, load_sst2, read_tsv, resolve_data_dir, tokenize
from conftest import make_sentences, write_tsv


# --- read_tsv: good files ---------------------------------------------------------------------------------


def test_read_tsv_good_file(tmp_path):
    path = write_tsv(tmp_path / "dev.tsv", [("a good movie", 1), ("dull", 0), ("not very funny", 0)])
    assert read_tsv(path) == {"sentence": ["a good movie", "dull", "not very funny"], "label": [1, 0, 0]}


def test_read_tsv_columns_in_any_order_and_extra_columns(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("idx\tlabel\tsentence\n0\t1\tgreat fun\n1\t0\tslow mess\n", encoding="utf-8")
    assert read_tsv(path) == {"sentence": ["great fun", "slow mess"], "label": [1, 0]}


def test_read_tsv_carriage_return_before_tab_is_stripped(tmp_path):
    # The local train.tsv ends every sentence with "\r" before the tab; lines end with "\r\n" too.
    path = tmp_path / "train.tsv"
    path.write_bytes(b"sentence\tlabel\r\nhide new secretions \r\t0\r\nthe greatest musicians \r\t1\r\n")
    out = read_tsv(path)
    assert out == {"sentence": ["hide new secretions", "the greatest musicians"], "label": [0, 1]}
    assert all("\r" not in s for s in out["sentence"])


def test_read_tsv_keeps_unicode_line_separators_inside_sentences(tmp_path):
    # str.splitlines() would break this row in two; the reader splits on "\n" only.
    path = tmp_path / "dev.tsv"
    path.write_text("sentence\tlabel\nfoo\u2028bar\t1\nbaz\x0cqux\t0\n", encoding="utf-8")
    assert read_tsv(path) == {"sentence": ["foo\u2028bar", "baz\x0cqux"], "label": [1, 0]}


def test_read_tsv_bom_and_blank_lines(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("\ufeffsentence\tlabel\n\nwarm\t1\n   \nflat\t0\n", encoding="utf-8")
    assert read_tsv(path) == {"sentence": ["warm", "flat"], "label": [1, 0]}


@settings(max_examples=25, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.text(
                alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), min_size=1, max_size=20
            ),
            st.integers(0, 1),
        ),
        min_size=1,
        max_size=15,
    )
)
def test_read_tsv_round_trips_written_rows(tmp_path_factory, rows):
    path = write_tsv(tmp_path_factory.mktemp("rt") / "dev.tsv", rows)
    assert read_tsv(path) == {"sentence": [s for s, _ in rows], "label": [label for _, label in rows]}


# --- read_tsv: bad files -----------------------------------------------------------------------------------


def test_read_tsv_missing_file_names_it(tmp_path):
    path = tmp_path / "dev.tsv"
    with pytest.raises(DataError, match="no such file") as err:
        read_tsv(path)
    assert str(path) in str(err.value)


def test_read_tsv_a_folder_in_place_of_the_file_is_named_as_one(tmp_path):
    path = tmp_path / "dev.tsv"
    path.mkdir()
    with pytest.raises(DataError, match="is a folder, not a file") as err:
        read_tsv(path)
    assert str(path) in str(err.value)


def test_read_tsv_missing_label_column(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tscore\ngood\t1\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_tsv(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:1:")
    assert "missing column 'label'" in msg


def test_read_tsv_missing_sentence_column(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("text\tlabel\ngood\t1\n", encoding="utf-8")
    with pytest.raises(DataError, match="missing column 'sentence'") as err:
        read_tsv(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("bad_line", [2, 4, 7])
def test_read_tsv_bad_label_names_file_line_and_value(tmp_path, bad_line):
    rows = [("fine words", i % 2) for i in range(8)]
    rows[bad_line - 2] = ("a bad label", 2)  # line 1 is the header
    path = write_tsv(tmp_path / "dev.tsv", rows)
    with pytest.raises(DataError) as err:
        read_tsv(path)
    msg = str(err.value)
    assert f"{path}:{bad_line}:" in msg
    assert "'2'" in msg and "label" in msg


def test_read_tsv_non_integer_label(tmp_path):
    path = write_tsv(tmp_path / "dev.tsv", [("ok", 1), ("also ok", "positive")])
    with pytest.raises(DataError, match=r":3: column 'label' is 'positive'"):
        read_tsv(path)


@pytest.mark.parametrize("content", [b"", b"\n", b"   \n"])
def test_read_tsv_empty_file(tmp_path, content):
    path = tmp_path / "train.tsv"
    path.write_bytes(content)
    with pytest.raises(DataError, match="empty file") as err:
        read_tsv(path)
    assert str(path) in str(err.value)


def test_read_tsv_header_only(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\n", encoding="utf-8")
    with pytest.raises(DataError, match="no data rows") as err:
        read_tsv(path)
    assert str(path) in str(err.value)


def test_read_tsv_not_utf8_names_line(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes(b"sentence\tlabel\ngood\t1\nbad \xff\xfe bytes\t0\nfine\t1\n")
    with pytest.raises(DataError) as err:
        read_tsv(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:3:")
    assert "UTF-8" in msg


def test_read_tsv_wrong_number_of_fields(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("sentence\tlabel\nok\t1\nextra\ttab\t0\nno tab here\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_tsv(path)
    msg = str(err.value)
    assert f"{path}:3:" in msg
    assert "expected 2" in msg and "found 3" in msg


def test_read_tsv_too_few_fields(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("sentence\tlabel\nno tab here\n", encoding="utf-8")
    with pytest.raises(DataError, match=r":2: expected 2 tab-separated fields, found 1"):
        read_tsv(path)


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


# --- folders -----------------------------------------------------------------------------------------------


def test_resolve_data_dir_missing_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="no such data folder") as err:
        resolve_data_dir(missing)
    assert str(missing) in str(err.value)


def test_resolve_data_dir_none_without_env_means_hub(monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    assert resolve_data_dir(None) is None


def test_no_folder_and_no_hub_is_one_error_naming_both_ways(monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)

    def offline(*args, **kwargs):  # what datasets raises with HF_DATASETS_OFFLINE=1 and GLUE not cached
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(data.datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        load_sst2(None)
    assert str(err.value) == ("no SST-2 folder given (--data DIR, or $SST2_DIR), and GLUE SST-2 (nyu-mll/glue) cannot "
                              "be had from the hub: Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")


def test_resolve_data_dir_env(monkeypatch, sst2_dir):
    monkeypatch.setenv(data.DATA_ENV, str(sst2_dir))
    assert resolve_data_dir(None) == sst2_dir


def test_resolve_data_dir_argument_beats_env(monkeypatch, sst2_dir, tmp_path):
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "elsewhere"))
    assert resolve_data_dir(sst2_dir) == sst2_dir


def test_resolve_data_dir_env_missing_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "gone"))
    with pytest.raises(DataError, match="gone"):
        resolve_data_dir(None)


def test_load_sst2_missing_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    with pytest.raises(DataError) as err:
        load_sst2(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(err.value)


def test_load_sst2_missing_dev_file(sst2_dir):
    (sst2_dir / "dev.tsv").unlink()
    with pytest.raises(DataError, match="no such file") as err:
        load_sst2(sst2_dir)
    assert str(sst2_dir / "dev.tsv") in str(err.value)


def test_load_sst2_bad_train_file_names_it(sst2_dir):
    (sst2_dir / "train.tsv").write_text("sentence\tlabel\nok\t1\noops\t-1\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_sst2(sst2_dir)
    assert f"{sst2_dir / 'train.tsv'}:3:" in str(err.value)


def test_load_sst2_from_argument(sst2_dir, monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    sst2 = load_sst2(sst2_dir)
    assert sst2.source == str(sst2_dir)
    assert set(sst2.splits) == {"train", "validation"}
    assert len(sst2.splits["train"]) == 96 and len(sst2.splits["validation"]) == 32
    expected_dev = make_sentences(32, seed=2)
    assert sst2.splits["validation"]["sentence"] == [s for s, _ in expected_dev]
    assert sst2.splits["validation"]["label"] == [label for _, label in expected_dev]
    assert sst2.splits["train"].features["label"].names == ["negative", "positive"]
    assert len(sst2.checksum) == 64


def test_load_sst2_from_env(sst2_dir, monkeypatch):
    monkeypatch.setenv(data.DATA_ENV, str(sst2_dir))
    sst2 = load_sst2()
    assert sst2.source == str(sst2_dir)
    assert sst2.splits["train"]["sentence"] == [s for s, _ in make_sentences(96, seed=1)]
    assert sst2.checksum == load_sst2(sst2_dir).checksum


def test_load_sst2_checksum_changes_with_content(sst2_dir):
    before = load_sst2(sst2_dir).checksum
    assert load_sst2(sst2_dir).checksum == before  # stable
    write_tsv(sst2_dir / "dev.tsv", make_sentences(32, seed=3))
    after_dev = load_sst2(sst2_dir).checksum
    assert after_dev != before
    rows = make_sentences(96, seed=1)
    rows[0] = (rows[0][0], 1 - rows[0][1])
    write_tsv(sst2_dir / "train.tsv", rows)
    assert load_sst2(sst2_dir).checksum not in (before, after_dev)


# --- tokenize and batches ----------------------------------------------------------------------------------


@pytest.fixture
def tokenized(tiny_tokenizer):
    rows = make_sentences(45, seed=5)
    ds = datasets.Dataset.from_dict({"sentence": [s for s, _ in rows], "label": [label for _, label in rows]})
    return tokenize(ds, tiny_tokenizer), rows


def test_tokenize_adds_length_and_renames_label(tokenized, tiny_tokenizer):
    ds, rows = tokenized
    assert "sentence" not in ds.column_names
    assert "label" not in ds.column_names
    assert {"input_ids", "attention_mask", "length", "labels"} <= set(ds.column_names)
    assert ds["labels"] == [label for _, label in rows]
    assert ds["length"] == [len(ids) for ids in ds["input_ids"]]
    for i in (0, 7, 44):
        assert ds[i]["input_ids"] == tiny_tokenizer(rows[i][0])["input_ids"]


def test_tokenize_truncates_to_max_length(tiny_tokenizer):
    ds = datasets.Dataset.from_dict({"sentence": [" ".join(["good"] * 50), "dull"], "label": [1, 0]})
    out = tokenize(ds, tiny_tokenizer, max_length=10)
    assert out["length"] == [10, 3]


def test_batches_by_length_cover_every_row_once_in_sorted_order(tokenized, tiny_tokenizer):
    ds, _ = tokenized
    out = batches(ds, tiny_tokenizer, batch_size=8, by_length=True)
    assert [len(b["index"]) for b in out] == [8, 8, 8, 8, 8, 5]
    index = torch.cat([b["index"] for b in out]).tolist()
    assert sorted(index) == list(range(len(ds)))
    padded = [b["input_ids"].shape[1] for b in out]
    assert padded == sorted(padded)
    lengths = ds["length"]
    for b in out:
        assert b["input_ids"].shape[1] == max(lengths[i] for i in b["index"].tolist())
        assert "labels" not in b
        # each row of the batch is the row `index` names, padded
        for row, i in zip(b["input_ids"].tolist(), b["index"].tolist()):
            assert row[: lengths[i]] == ds[i]["input_ids"]
            assert all(t == tiny_tokenizer.pad_token_id for t in row[lengths[i] :])


def test_batches_in_dataset_order_with_labels(tokenized, tiny_tokenizer):
    ds, rows = tokenized
    out = batches(ds, tiny_tokenizer, batch_size=10, by_length=False, with_labels=True)
    assert torch.cat([b["index"] for b in out]).tolist() == list(range(len(ds)))
    assert torch.cat([b["labels"] for b in out]).tolist() == [label for _, label in rows]
    assert set(out[0]) >= {"input_ids", "attention_mask", "labels", "index"}
    assert "length" not in out[0]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch_size=st.integers(1, 50), by_length=st.booleans())
def test_batches_partition_property(tokenized, tiny_tokenizer, batch_size, by_length):
    ds, _ = tokenized
    out = batches(ds, tiny_tokenizer, batch_size=batch_size, by_length=by_length)
    index = torch.cat([b["index"] for b in out]).tolist()
    assert sorted(index) == list(range(len(ds)))
    assert all(1 <= len(b["index"]) <= batch_size for b in out)
    assert len(out) == -(-len(ds) // batch_size)
    if by_length:
        lengths = ds["length"]
        assert [lengths[i] for i in index] == sorted(lengths)
