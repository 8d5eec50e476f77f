"""compression.schema: what results.json and baselines.json may hold, and the one-line errors for what they may not."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compression import schema
from compression.schema import (
    GPU_VARIANTS,
    VARIANTS,
    Baselines,
    Budgets,
    Results,
    VariantRow,
    dumps,
    json_schema,
    key_path,
    read_baselines,
    read_json,
    read_results,
)

ENVIRONMENT = {"device": "cpu", "gpu": None, "cpu": "Test CPU", "threads": 2, "python": "3.11.0", "torch": "2.4.0",
               "transformers": "5.0.0", "onnxruntime": "1.20.0", "bitsandbytes": None}


def row(name="student", **changes) -> dict:
    doc = {
        "name": name, "parameters": 11_000_000, "size_mb": 43.2, "val_accuracy": 88.8, "flips": 40,
        "backend": "pytorch fp32", "latency_ms": {"median": 5.0, "p90": 6.0, "samples": 300},
        "latency_ratio": 0.5, "throughput_per_s": 120.0, "build_seconds": 12.5,
    }
    return {**doc, **changes}


def results_doc() -> dict:
    teacher = row("teacher", flips=0)
    del teacher["latency_ratio"]
    return {
        "schema_version": 1, "profile": "smoke", "base": "tiny", "teacher": None, "student_base": None, "data": "sst2",
        "pooling": "mean",
        "environment": dict(ENVIRONMENT), "stages_seconds": {"teacher": 10.0, "student": 0.0},
        "total_seconds": 30.5, "variants": [teacher, row("student"), row("student_int8", backend="onnxruntime int8")],
    }


def baselines_doc() -> dict:
    return {
        "schema_version": 1,
        "profiles": {"smoke": {
            "teacher": {"min_accuracy": 89.4, "max_accuracy_drop": 0.6, "max_flips": 4, "max_size_mb": 88.38},
            "student": {"min_accuracy": 88.2, "max_latency_ratio": 0.6},
        }},
        "gpu": {"smoke": {"latency_ms": {"Tesla T4": {"teacher": 9.92}}, "latency_ratio": {"student": 0.7}}},
    }


def set_in(doc, dotted: str, value):
    *path, last = dotted.split(".")
    target = doc
    for part in path:
        target = target[int(part)] if isinstance(target, list) else target[part]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return doc


def write_raw(path, doc: dict, dotted: str, raw: str):
    """`doc` as JSON with the value at `dotted` replaced by the text `raw` (e.g. a bare NaN)."""
    path.write_text(json.dumps(set_in(doc, dotted, "@RAW@"), indent=2).replace('"@RAW@"', raw))
    return path


def error_of(reader, path) -> str:
    with pytest.raises(ValueError) as err:
        reader(path)
    message = str(err.value)
    assert "\n" not in message
    return message


# --- valid documents ---------------------------------------------------------------------------------------


def test_valid_results_read_and_round_trip(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results_doc()))
    results = read_results(path)
    assert [r.name for r in results.variants] == ["teacher", "student", "student_int8"]
    assert results.rows()["teacher"].latency_ratio is None
    assert results.rows()["student"].latency_ms.median == 5.0
    path.write_text(dumps(results))
    assert read_results(path) == results


def test_new_optional_row_fields():
    plain = VariantRow.model_validate(row())
    assert (plain.val_accuracy_batched, plain.e2e_latency_ms, plain.folder) == (None, None, None)
    full = VariantRow.model_validate(row(val_accuracy_batched=88.6, folder="/cache/student-abc",
                                         e2e_latency_ms={"median": 6.5, "p90": 8.0, "samples": 300}))
    assert full.val_accuracy_batched == 88.6 and full.e2e_latency_ms.p90 == 8.0 and full.folder == "/cache/student-abc"
    with pytest.raises(ValueError, match="e2e_latency_ms"):
        schema.parse(VariantRow, row(e2e_latency_ms={"median": 0, "p90": 1, "samples": 3}), "row")


def test_rows_may_record_what_pruning_kept_per_layer():
    assert VariantRow.model_validate(row()).heads_per_layer is None  # a row from before pruning was recorded
    kept = VariantRow.model_validate(row("slim_student", heads_per_layer=[9, 12, 10],
                                         neurons_per_layer=[700, 1536, 2]))
    assert kept.heads_per_layer == [9, 12, 10] and kept.neurons_per_layer == [700, 1536, 2]
    for value, message in (([], "at least 1 item"), ([3, 0], "greater than or equal to 1"), ([1.5], "integer"),
                           (["3"], "integer"), (4, "list")):
        with pytest.raises(ValueError, match=message) as err:
            schema.parse(VariantRow, row(neurons_per_layer=value), "row")
        assert "key 'neurons_per_layer" in str(err.value)
    vocab = VariantRow.model_validate(row("slim_student", tokens_kept=11_576, tokens_before=30_522))
    assert (vocab.tokens_kept, vocab.tokens_before) == (11_576, 30_522)
    for bad, message in (({"tokens_kept": 5}, "come together"), ({"tokens_before": 5}, "come together"),
                         ({"tokens_kept": 6, "tokens_before": 5}, "exceeds"),
                         ({"tokens_kept": 0, "tokens_before": 5}, "greater than or equal to 1")):
        with pytest.raises(ValueError, match=message):
            schema.parse(VariantRow, row("slim_student", **bad), "row")


def test_environment_keeps_extra_keys():
    doc = results_doc()
    doc["environment"]["cuda"] = "12.4"
    assert Results.model_validate(doc).environment.model_dump()["cuda"] == "12.4"


def test_committed_baselines_are_valid_and_written_back_byte_for_byte():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "baselines.json"
    assert dumps(read_baselines(path)) == path.read_text()


def test_variants_are_every_model_alone_and_quantized():
    assert len(VARIANTS) == len(set(VARIANTS)) == 12
    for model in ("teacher", "student", "pruned_student", "slim_student"):
        assert {model, f"{model}_int8", f"{model}_bnb8"} <= set(VARIANTS)
        assert f"{model}_wo8" in GPU_VARIANTS and f"{model}_wo8" not in VARIANTS  # a CPU run makes no wo8 row
    assert VariantRow.model_validate(row("slim_student_wo8")).name == "slim_student_wo8"
    with pytest.raises(ValueError, match="unknown variant 'student_wo4'"):
        VariantRow.model_validate(row("student_wo4"))


def test_an_extended_variants_tuple_is_honoured(monkeypatch):
    with pytest.raises(ValueError, match="unknown variant 'student_fp16'"):
        VariantRow.model_validate(row("student_fp16"))
    monkeypatch.setattr(schema, "VARIANTS", (*VARIANTS, "student_fp16"))
    assert VariantRow.model_validate(row("student_fp16")).name == "student_fp16"


def test_key_path():
    assert key_path(("variants", 0, "latency_ms", "median")) == "variants[0].latency_ms.median"
    assert key_path(("profiles", "smoke", "tacher", "[key]")) == "profiles.smoke.tacher"
    assert key_path(()) == ""


# --- malformed results.json: one line naming the file and the key -----------------------------------------


@pytest.mark.parametrize(
    ("dotted", "raw", "key", "says"),
    [
        ("profile", '["smoke"]', "profile", "should be a valid string"),
        ("environment", '"cpu"', "environment", "should be an object, got 'cpu'"),
        ("environment.threads", "0", "environment.threads", "greater than or equal to 1"),
        ("variants", "{}", "variants", "should be a list"),
        ("variants.0.latency_ms.median", "0", "variants[0].latency_ms.median", "greater than 0"),
        ("variants.0.latency_ms.p90", "1.0", "variants[0].latency_ms", "p90 1 is below the median 5"),
        ("variants.0.latency_ms.samples", "0", "variants[0].latency_ms.samples", "greater than or equal to 1"),
        ("variants.1.val_accuracy", "NaN", "variants[1].val_accuracy", "NaN is not a finite number"),
        ("variants.1.val_accuracy", "150", "variants[1].val_accuracy", "less than or equal to 100"),
        ("variants.1.val_accuracy", '"88.8"', "variants[1].val_accuracy", "valid number"),
        ("variants.1.size_mb", "Infinity", "variants[1].size_mb", "Infinity is not a finite number"),
        ("variants.1.size_mb", "-Infinity", "variants[1].size_mb", "-Infinity is not a finite number"),
        ("variants.1.size_mb", "1e400", "variants[1].size_mb", "1e400 is not a finite number"),
        ("variants.1.flips", "-5", "variants[1].flips", "greater than or equal to 0"),
        ("variants.1.flips", "true", "variants[1].flips", "valid integer"),
        ("variants.1.parameters", "0", "variants[1].parameters", "greater than 0"),
        ("variants.1.latency_ratio", "0", "variants[1].latency_ratio", "greater than 0"),
        ("variants.1.throughput_per_s", "-1", "variants[1].throughput_per_s", "greater than 0"),
        ("variants.1.build_seconds", "-0.1", "variants[1].build_seconds", "greater than or equal to 0"),
        ("variants.1.val_accuracy_batched", "101", "variants[1].val_accuracy_batched", "less than or equal to 100"),
        ("variants.1.name", '"teacher"', "variants", "variant named more than once: teacher"),
        ("variants.1.name", '"distilled"', "variants[1].name", "unknown variant 'distilled'"),
        ("variants.1.acuracy", "88", "variants[1].acuracy", "unknown key (known: name, parameters"),
        ("schema_version", "2", "schema_version", "Input should be 1"),
        ("schema_version", "true", "schema_version", "Input should be 1, got True"),  # equal to 1 in Python
        ("schema_version", "1.0", "schema_version", "Input should be 1, got 1.0"),
        # a count past JSON's exact integers: refused here, not an OverflowError in the gate's float comparison
        ("variants.1.flips", "1" + "0" * 400, "variants[1].flips", "... (401 characters)"),
        ("pooling", '"max"', "pooling", "'cls' or 'mean'"),
        ("stages_seconds.teacher", "NaN", "stages_seconds.teacher", "NaN is not a finite number"),
    ],
)
def test_malformed_results(tmp_path, dotted, raw, key, says):
    path = write_raw(tmp_path / "results.json", results_doc(), dotted, raw)
    message = error_of(read_results, path)
    assert message.startswith(f"{path}: key '{key}': ")
    assert says in message


@pytest.mark.parametrize("key", ["profile", "variants", "environment", "schema_version"])
def test_results_missing_a_key(tmp_path, key):
    doc = results_doc()
    del doc[key]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(doc))
    assert error_of(read_results, path) == f"{path}: key '{key}': missing"


def test_results_row_missing_a_figure(tmp_path):
    doc = results_doc()
    del doc["variants"][2]["flips"]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(doc))
    assert error_of(read_results, path) == f"{path}: key 'variants[2].flips': missing"


# --- malformed baselines.json ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dotted", "raw", "key", "says"),
    [
        ("profiles", "[]", "profiles", "should be an object"),
        ("profiles.smoke", "[]", "profiles.smoke", "should be an object"),
        ("profiles.smoke", "{}", "profiles.smoke", "no variants"),
        ("profiles.smoke.student", "{}", "profiles.smoke.student", "no budgets"),
        ("profiles.smoke.student", "3", "profiles.smoke.student", "should be an object"),
        ("profiles.smoke.teacher.max_size_mb", "Infinity", "profiles.smoke.teacher.max_size_mb", "Infinity is not"),
        ("profiles.smoke.teacher.max_size_mb", "0", "profiles.smoke.teacher.max_size_mb", "greater than 0"),
        ("profiles.smoke.teacher.min_accuracy", "-50", "profiles.smoke.teacher.min_accuracy", "greater than or equal"),
        ("profiles.smoke.teacher.min_accuracy", "100.5", "profiles.smoke.teacher.min_accuracy", "less than or equal"),
        ("profiles.smoke.teacher.min_accuracy", "NaN", "profiles.smoke.teacher.min_accuracy", "NaN is not"),
        ("profiles.smoke.teacher.min_accuracy", "null", "profiles.smoke.teacher.min_accuracy", "leave the key out"),
        ("profiles.smoke.teacher.max_flips", "-1", "profiles.smoke.teacher.max_flips", "greater than or equal to 0"),
        ("profiles.smoke.teacher.max_flips", "4.5", "profiles.smoke.teacher.max_flips", "valid integer"),
        ("profiles.smoke.teacher.max_flips", '"10"', "profiles.smoke.teacher.max_flips", "valid integer"),
        ("profiles.smoke.teacher.max_flips", "true", "profiles.smoke.teacher.max_flips", "valid integer"),
        ("profiles.smoke.teacher.max_accuracy_drop", "-0.1", "profiles.smoke.teacher.max_accuracy_drop",
         "greater than or equal to 0"),
        ("profiles.smoke.student.max_latency_ratio", "0", "profiles.smoke.student.max_latency_ratio", "greater than 0"),
        ("profiles.smoke.student.max_acuracy", "90", "profiles.smoke.student.max_acuracy",
         "unknown key (known: min_accuracy, max_accuracy_drop, max_flips, max_size_mb, max_latency_ratio)"),
        ("profiles.smoke.distilled", '{"max_flips": 3}', "profiles.smoke.distilled", "unknown variant 'distilled'"),
        ("schema_version", '"1"', "schema_version", "Input should be 1"),
        ("gpu", "[]", "gpu", "should be an object"),
        ("gpu.smoke", "[]", "gpu.smoke", "should be an object"),
        ("gpu.smoke.latency_ms", "[]", "gpu.smoke.latency_ms", "should be an object"),
        ("gpu.smoke.latency_ms.Tesla T4.teacher", '"fast"', "gpu.smoke.latency_ms.Tesla T4.teacher", "valid number"),
        ("gpu.smoke.latency_ms.Tesla T4.teacher", "0", "gpu.smoke.latency_ms.Tesla T4.teacher", "greater than 0"),
        ("gpu.smoke.latency_ms.Tesla T4.distilled", "1", "gpu.smoke.latency_ms.Tesla T4.distilled",
         "unknown variant 'distilled'"),
        ("gpu.smoke.latency_ratio.student", "null", "gpu.smoke.latency_ratio.student", "valid number"),
        ("gpu.smoke.latency_ratio.student", "Infinity", "gpu.smoke.latency_ratio.student", "Infinity is not"),
        ("gpu.smoke.speed", "{}", "gpu.smoke.speed", "unknown key (known: latency_ms, latency_ratio)"),
        # the first layout (one GPU block for every profile) is named, not read as a profile called latency_ms
        ("gpu", '{"latency_ms": {"Tesla T4": {"teacher": 9.92}}}', "gpu", "GPU budgets are kept per profile"),
    ],
)
def test_malformed_baselines(tmp_path, dotted, raw, key, says):
    path = write_raw(tmp_path / "baselines.json", baselines_doc(), dotted, raw)
    message = error_of(read_baselines, path)
    assert message.startswith(f"{path}: key '{key}': ")
    assert says in message


def test_baselines_missing_version(tmp_path):
    doc = baselines_doc()
    del doc["schema_version"]
    path = tmp_path / "baselines.json"
    path.write_text(json.dumps(doc))
    assert error_of(read_baselines, path) == f"{path}: key 'schema_version': missing"


def test_baselines_without_gpu_section():
    doc = baselines_doc()
    del doc["gpu"]
    assert Baselines.model_validate(doc).gpu == {}
    assert Baselines.model_validate(doc).gpu_of("smoke").latency_ms == {}


def test_budgets_need_at_least_one_key():
    assert Budgets(max_flips=3).max_flips == 3
    with pytest.raises(ValueError, match="no budgets"):
        Budgets()


# --- read_json ---------------------------------------------------------------------------------------------


def test_read_json_missing_file(tmp_path):
    assert error_of(read_json, tmp_path / "nope.json") == f"{tmp_path / 'nope.json'}: no such file"


def test_read_json_folder(tmp_path):
    assert "is a folder" in error_of(read_json, tmp_path)


@pytest.mark.parametrize("content", ["{truncated", "", "\xff"])
def test_read_json_not_json(tmp_path, content):
    path = tmp_path / "x.json"
    path.write_bytes(content.encode("latin-1"))
    message = error_of(read_json, path)
    assert message.startswith(f"{path}: not valid JSON")


@pytest.mark.parametrize("content", ["[]", "3", "null"])
def test_read_json_top_level_not_object(tmp_path, content):
    path = tmp_path / "x.json"
    path.write_text(content)
    assert "JSON object" in error_of(read_json, path)


@pytest.mark.parametrize(("text", "key", "token"), [
    ('{"a": NaN}', "a", "NaN"),
    ('{"a": {"b": [1, 2, Infinity]}}', "a.b[2]", "Infinity"),
    ('{"a": [{"c": -Infinity}]}', "a[0].c", "-Infinity"),
    ('{"a": 1, "b": 2e308}', "b", "2e308"),
])
def test_read_json_refuses_non_finite_numbers_naming_the_key(tmp_path, text, key, token):
    path = tmp_path / "x.json"
    path.write_text(text)
    assert error_of(read_json, path) == f"{path}: key '{key}': {token} is not a finite number"


@pytest.mark.parametrize("text, key", [
    ('{"a": 1, "a": 1}', "a"),
    ('{"p": {"student": {"max_flips": 91, "max_flips": 100000}}}', "max_flips"),
    ('{"v": [{"name": "x"}, {"name": "y", "name": "z"}]}', "name"),
])
def test_read_json_refuses_a_key_twice_in_one_object(tmp_path, text, key):
    """json.loads keeps the last of two equal keys: a second budget would silently replace the first."""
    path = tmp_path / "x.json"
    path.write_text(text)
    assert error_of(read_json, path) == f"{path}: key {key!r} appears twice in one object"


def test_read_json_ok(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": [1, 2.5, -0.0, 1e300], "b": {"c": null, "d": "NaN"}}')
    assert read_json(path) == {"a": [1, 2.5, -0.0, 1e300], "b": {"c": None, "d": "NaN"}}


def test_read_json_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, compression.schema; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# --- writing: strict JSON ----------------------------------------------------------------------------------


def test_dumps_is_strict_json():
    text = dumps(Baselines.model_validate(baselines_doc()))

    def refuse(token):
        raise AssertionError(token)

    assert json.loads(text, parse_constant=refuse) == baselines_doc()


@pytest.mark.parametrize("value", [math.nan, [1.0, math.inf], {"x": -math.inf}])
def test_extra_environment_values_must_be_finite(value):
    doc = results_doc()
    doc["environment"]["clock_ghz"] = value  # extra keys are free-form, but must stay strict JSON
    with pytest.raises(ValueError, match="key 'environment': 'clock_ghz' must be plain finite JSON"):
        schema.parse(Results, doc, "results.json")


def test_json_schemas_published():
    results, baselines = json_schema("results"), json_schema("baselines")
    assert results["$defs"]["VariantRow"]["properties"]["name"]["enum"] == [*VARIANTS, *GPU_VARIANTS]
    budgets = baselines["$defs"]["Budgets"]
    assert budgets["additionalProperties"] is False and budgets["minProperties"] == 1
    assert budgets["properties"]["min_accuracy"] == {
        "description": "validation accuracy floor, percent", "maximum": 100, "minimum": 0,
        "title": "Min Accuracy", "type": "number"}  # optional, but not nullable
    assert baselines["properties"]["profiles"]["additionalProperties"]["minProperties"] == 1


# --- properties --------------------------------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=0, exclude_min=True, allow_nan=False, allow_infinity=False)
non_negative = st.floats(min_value=0, allow_nan=False, allow_infinity=False)
percent = st.floats(min_value=0, max_value=100)


@st.composite
def latencies(draw) -> dict:
    median = draw(positive)
    return {"median": median, "p90": draw(st.floats(min_value=median, allow_infinity=False)),
            "samples": draw(st.integers(1, 10**6))}


@st.composite
def rows(draw) -> dict:
    return {
        "name": draw(st.sampled_from(VARIANTS)),
        "parameters": draw(st.integers(1, 10**12)),
        "size_mb": draw(positive),
        "val_accuracy": draw(percent),
        "flips": draw(st.integers(0, 10**6)),
        "backend": draw(st.text(min_size=1, max_size=20)),
        "latency_ms": draw(latencies()),
        "latency_ratio": draw(st.none() | positive),
        "throughput_per_s": draw(positive),
        "build_seconds": draw(non_negative),
        "val_accuracy_batched": draw(st.none() | percent),
        "e2e_latency_ms": draw(st.none() | latencies()),
        "folder": draw(st.none() | st.text(min_size=1, max_size=20)),
        "heads_per_layer": draw(st.none() | st.lists(st.integers(1, 64), min_size=1, max_size=12)),
        "neurons_per_layer": draw(st.none() | st.lists(st.integers(1, 4096), min_size=1, max_size=12)),
        **draw(st.just({"tokens_kept": None, "tokens_before": None})
               | st.integers(1, 300_000).flatmap(
                   lambda before: st.integers(1, before).map(lambda kept: {"tokens_kept": kept,
                                                                           "tokens_before": before}))),
    }


@settings(max_examples=200, deadline=None)
@given(doc=rows())
def test_any_finite_valid_row_round_trips_through_json(doc):
    parsed = VariantRow.model_validate(doc)
    text = json.dumps(parsed.model_dump(mode="json"), allow_nan=False)
    assert VariantRow.model_validate(json.loads(text)) == parsed
    assert parsed.model_dump(mode="json") == doc


@settings(max_examples=30, deadline=None)
@given(variants=st.lists(rows(), min_size=1, max_size=4, unique_by=lambda r: r["name"]))
def test_any_valid_results_file_round_trips(tmp_path_factory, variants):
    doc = {**results_doc(), "variants": variants}
    path = tmp_path_factory.mktemp("r") / "results.json"
    path.write_text(dumps(Results.model_validate(doc)))
    assert read_results(path).model_dump(mode="json") == doc


NUMERIC = ["size_mb", "val_accuracy", "latency_ms.median", "latency_ms.p90", "latency_ratio", "throughput_per_s",
           "build_seconds", "val_accuracy_batched", "e2e_latency_ms.median"]


@settings(max_examples=100, deadline=None)
@given(doc=rows(), field=st.sampled_from(NUMERIC), bad=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_any_row_with_a_non_finite_figure_is_refused(doc, field, bad):
    if field.startswith("e2e_") and doc["e2e_latency_ms"] is None:
        doc["e2e_latency_ms"] = {"median": 1.0, "p90": 2.0, "samples": 3}
    set_in(doc, field, bad)
    with pytest.raises(ValueError) as err:
        schema.parse(VariantRow, doc, "row.json")
    assert str(err.value).startswith(f"row.json: key '{field}': Input should be a finite number")


@settings(max_examples=50, deadline=None)
@given(doc=rows(), field=st.sampled_from(NUMERIC), token=st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999"]))
def test_any_results_file_with_a_non_finite_token_is_refused(tmp_path_factory, doc, field, token):
    if field.startswith("e2e_") and doc["e2e_latency_ms"] is None:
        doc["e2e_latency_ms"] = {"median": 1.0, "p90": 2.0, "samples": 3}
    results = {**results_doc(), "variants": [doc]}
    path = write_raw(tmp_path_factory.mktemp("r") / "results.json", results, f"variants.0.{field}", token)
    with pytest.raises(ValueError) as err:
        read_results(path)
    assert str(err.value) == f"{path}: key 'variants[0].{field}': {token} is not a finite number"


@pytest.mark.parametrize("raw, says", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("1" * 5_000, "not valid JSON (Exceeds the limit"),  # more digits than Python converts
])
def test_pathological_json_is_one_line_naming_the_file(tmp_path, raw, says):
    path = tmp_path / "results.json"
    path.write_text('{"schema_version": 1, "x": ' + raw + "}")
    message = error_of(read_results, path)
    assert message.startswith(f"{path}: ") and says in message and len(message) < 400
