"""compression.graphs: padded-length buckets, right-padding that leaves the logits alone, the eager fallback.

The capture itself needs CUDA (benchmarks/test_gpu.py); everything it rests on is checked here on the CPU.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForSequenceClassification

from compression import graphs
from compression.graphs import (
    GraphConfig,
    GraphedClassifier,
    bucket_length,
    capturable,
    compiled,
    pad_inputs,
    serving,
)
from compression.low_rank import LowRankConfig, factorize_embeddings_
from compression.models import load_base, mean_pool_class
from compression.prune import kept_heads, prune_heads_
from compression.prune_ffn import intermediate_size, prune_ffn_
from compression.quant_wo8 import Wo8Config, int8pack_works, quantize_wo8_

pytestmark = pytest.mark.usefixtures("one_torch_thread")

lengths_st = st.lists(st.integers(1, 256), min_size=1, max_size=6, unique=True).map(lambda v: tuple(sorted(v)))


def test_bucket_length_examples():
    assert bucket_length(1, (16, 32)) == 16
    assert bucket_length(16, (16, 32)) == 16
    assert bucket_length(17, (16, 32)) == 32
    assert bucket_length(33, (16, 32)) is None


@given(n=st.integers(1, 300), lengths=lengths_st)
@settings(max_examples=200, deadline=None)
def test_bucket_is_the_smallest_length_that_holds_the_tokens(n, lengths):
    got = bucket_length(n, lengths)
    fitting = [length for length in lengths if length >= n]
    if not fitting:
        assert got is None
    else:
        assert got == min(fitting) and got >= n


@pytest.mark.parametrize("bad", [{"lengths": ()}, {"lengths": (32, 16)}, {"lengths": (16, 16)},
                                 {"lengths": (0, 16)}, {"batch_sizes": ()}, {"batch_sizes": (2, 1)},
                                 {"warmup": 0}, {"compile": "yes"}])
def test_config_rejects_what_cannot_be_captured(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        GraphConfig(**bad)


def test_pad_inputs_right_pads_each_input_with_its_own_value():
    inputs = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
              "token_type_ids": torch.zeros(1, 3, dtype=torch.long)}
    out = pad_inputs(inputs, 5, pad_token_id=1)
    assert out["input_ids"].tolist() == [[5, 6, 7, 1, 1]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0]]
    assert out["token_type_ids"].tolist() == [[0, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="input_ids has 3 tokens"):
        pad_inputs(inputs, 2, pad_token_id=0)


@given(tokens=st.integers(1, 20), extra=st.integers(0, 20))
@settings(max_examples=30, deadline=None)
def test_right_padding_leaves_the_logits_alone_bert(tiny_mean_model_session, tiny_model_session, tokens, extra):
    torch.manual_seed(tokens)
    inputs = {"input_ids": torch.randint(5, 30, (1, tokens)), "attention_mask": torch.ones(1, tokens, dtype=torch.long)}
    padded = pad_inputs(inputs, tokens + extra, pad_token_id=0)
    for model in (tiny_mean_model_session, tiny_model_session):  # mean pool and [CLS]
        with torch.inference_mode():
            torch.testing.assert_close(model(**padded).logits, model(**inputs).logits, atol=1e-5, rtol=1e-4)


def test_right_padding_leaves_the_logits_alone_mpnet(tiny_mpnet_dir):
    # MPNet numbers positions from its pad id and adds a relative-position bias per pair of tokens
    model, tokenizer = load_base(str(tiny_mpnet_dir), pooling="mean")
    model.eval()
    inputs = dict(tokenizer(["a good movie ."], return_tensors="pt"))
    inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    padded = pad_inputs(inputs, inputs["input_ids"].shape[1] + 9, tokenizer.pad_token_id)
    with torch.inference_mode():
        torch.testing.assert_close(model(**padded).logits, model(**inputs).logits, atol=1e-5, rtol=1e-4)


def test_on_the_cpu_the_wrapper_is_the_model(tiny_mean_model_session, tiny_batch):
    graphed = GraphedClassifier(copy.deepcopy(tiny_mean_model_session), GraphConfig(lengths=(8, 16)))
    with torch.inference_mode():
        want = tiny_mean_model_session(**tiny_batch).logits
        got = graphed(**tiny_batch).logits
    torch.testing.assert_close(got, want)
    assert graphed.graphs == {}  # nothing captured without CUDA
    assert graphed.names == ("input_ids", "attention_mask", "token_type_ids")


def test_the_wrapper_takes_the_models_mode_and_timing_it_leaves_the_model_in_eval(tiny_mean_model_session):
    from compression.measure import latency

    model = copy.deepcopy(tiny_mean_model_session).eval()
    graphed = GraphedClassifier(model)
    assert not graphed.training
    latency(graphed, [{"input_ids": torch.tensor([[2, 7, 8, 3]])}], warmup=1, warmup_seconds=0)
    assert not any(m.training for m in model.modules())


def test_a_missing_mask_is_made_so_padding_stays_invisible(tiny_mean_model_session):
    graphed = GraphedClassifier(tiny_mean_model_session)
    ids = torch.tensor([[2, 7, 8, 3]])
    with torch.inference_mode():
        torch.testing.assert_close(graphed(input_ids=ids).logits, tiny_mean_model_session(input_ids=ids).logits)


def test_llm_int8_is_captured_only_without_its_outlier_decomposition(tiny_model):
    """At threshold > 0 LLM.int8 syncs with the host to find outliers; at 0 its ops have fixed shapes."""
    pytest.importorskip("bitsandbytes")
    from compression.quant_bnb8 import Bnb8Config, quantize_bnb8_

    assert capturable(tiny_model)
    with_outliers = quantize_bnb8_(copy.deepcopy(tiny_model), Bnb8Config(threshold=6.0))
    assert not capturable(with_outliers) and not GraphedClassifier(with_outliers).graphable
    assert capturable(quantize_bnb8_(copy.deepcopy(tiny_model), Bnb8Config(threshold=0.0)))


# --- what a CUDA graph cannot hold, seen on the CPU ----------------------------------------------------------

# Ops that move data between host and device inside a forward: a tensor built from Python values (copied to the
# GPU on every call) or a device value read back (a synchronisation). Either stalls an eager GPU forward, and a
# capture either fails or freezes the host value into the graph.
HOST_OPS = ("aten.lift_fresh", "aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item")


class _HostOps(TorchDispatchMode):
    """Counts the HOST_OPS a block dispatches."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith(HOST_OPS):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def host_ops(model, batch) -> Counter:
    with torch.inference_mode(), _HostOps() as seen:
        model(**batch)
    return seen.counts


FAMILY_CONFIGS = ("tiny_config", "tiny_roberta_config", "tiny_mpnet_config", "tiny_distilbert_config")


@pytest.mark.parametrize("config_name", FAMILY_CONFIGS)
def test_compression_adds_no_host_transfer_to_the_forward(request, config_name):
    """Every compressed form of every family dispatches no host<->device op that its plain model does not: a
    head-pruned MPNet once indexed the shared position bias by a Python list, a host-to-GPU copy per layer."""
    config = copy.deepcopy(request.getfixturevalue(config_name))
    torch.manual_seed(0)
    plain = AutoModelForSequenceClassification.from_config(config).eval()
    ids = torch.randint(5, config.vocab_size, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["attention_mask"][1, 6:] = 0
    layers, heads = len(kept_heads(plain)), config.num_attention_heads
    keep = torch.ones(layers, heads, dtype=torch.bool)
    keep[0, [0, 2]] = False
    keep[-1, 1] = False
    ffn = intermediate_size(plain)
    neurons = torch.ones(layers, ffn, dtype=torch.bool)
    neurons[:, ::3] = False
    pruned = prune_heads_(copy.deepcopy(plain), keep)
    forms = {
        "mean-pooled": mean_pool_class(config.model_type)(config).eval(),
        "head-pruned": pruned,
        "head- and FFN-pruned": prune_ffn_(copy.deepcopy(pruned), neurons),
        "wo8 (dequant)": quantize_wo8_(copy.deepcopy(pruned), Wo8Config(kernel="dequant")),
    }
    if int8pack_works("cpu", torch.float32):
        forms["wo8 (int8pack)"] = quantize_wo8_(copy.deepcopy(pruned), Wo8Config(kernel="int8pack"))
    low_rank = copy.deepcopy(pruned)
    factorize_embeddings_(low_rank, LowRankConfig(rank=8))
    forms["low-rank embedding"] = low_rank.eval()
    baseline = host_ops(plain, batch)
    for form, model in forms.items():
        extra = host_ops(model, batch) - baseline
        assert not extra, f"{config.model_type} {form}: forward adds {dict(extra)}"


def test_the_host_op_probe_sees_a_list_index():
    """The probe above can fail: indexing by a Python list is what it exists to see."""
    x = torch.randn(2, 4, 3)
    with torch.inference_mode(), _HostOps() as seen:
        x[:, [0, 2]]
    assert seen.counts["aten.lift_fresh"] == 1


def test_serving_is_the_model_itself_off_the_gpu(tiny_model):
    assert serving(tiny_model, 0) is tiny_model


def test_serving_on_a_gpu_wraps_capturable_models_only(monkeypatch, tiny_model):
    """On a GPU (the device faked: capture itself is benchmarks/test_gpu.py's) a PyTorch model is served behind
    graphs for batch 1 and the throughput's batch 32, with its pad id; LLM.int8 with outliers is served as it is."""
    monkeypatch.setattr(graphs, "model_device", lambda model: torch.device("cuda"))
    served = serving(tiny_model, pad_token_id=7)
    assert isinstance(served, GraphedClassifier) and served.model is tiny_model
    assert served.pad_token_id == 7 and served.config.batch_sizes == (1, 32)
    bnb = pytest.importorskip("bitsandbytes")
    tiny_model.classifier = bnb.nn.Linear8bitLt(32, 2, has_fp16_weights=False, threshold=6.0)
    assert serving(tiny_model, 7) is tiny_model


# --- the compiled forward (GraphConfig.compile): traced here, compiled by inductor on the GPU ----------------


class _CountingBackend:
    """A torch.compile backend that runs what dynamo traced as it is, and counts the graphs it was handed."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


@pytest.mark.parametrize("config_name", ["tiny_config", "tiny_mpnet_config"])
def test_every_served_form_compiles_whole_once_for_all_lengths(request, config_name):
    """What `compress run` serves on a GPU (the smoke chain's BERT, the full profile's MPNet teacher; plain, and
    head-, FFN-pruned, low-rank and wo8 at once) is traced by dynamo as one graph (fullgraph: a break would raise)
    whose logits are the model's, and lengths 16 and 32 share it: one compilation serves every bucket at batch 1."""
    config = copy.deepcopy(request.getfixturevalue(config_name))
    torch.manual_seed(0)
    plain = mean_pool_class(config.model_type)(config).eval()
    layers, heads = len(kept_heads(plain)), config.num_attention_heads
    keep = torch.ones(layers, heads, dtype=torch.bool)
    keep[0, [0, 2]] = False
    neurons = torch.ones(layers, intermediate_size(plain), dtype=torch.bool)
    neurons[:, ::3] = False
    slim = prune_ffn_(prune_heads_(copy.deepcopy(plain), keep), neurons)
    factorize_embeddings_(slim, LowRankConfig(rank=8))
    slim = quantize_wo8_(slim.eval(), Wo8Config(kernel="dequant"))
    torch._dynamo.reset()
    for form, model in {"plain": plain, "pruned, low-rank, wo8": slim}.items():
        backend = _CountingBackend()
        fast = compiled(model, backend=backend)
        for length in (16, 32):
            ids = torch.randint(5, config.vocab_size, (1, length))
            mask = torch.ones_like(ids)
            mask[0, length - 5:] = 0  # right padding, as the buckets add it
            with torch.inference_mode():
                torch.testing.assert_close(fast(input_ids=ids, attention_mask=mask).logits,
                                           model(input_ids=ids, attention_mask=mask).logits)
        assert backend.graphs == 1, f"{config.model_type} {form}: {backend.graphs} compilations for two lengths"


def test_a_compiled_capture_that_fails_falls_back_to_the_eager_forward_for_good(monkeypatch, caplog, tiny_model):
    """A compiler failure (no Triton, an unsupported op) costs the compiled forward, not the graph: the model's
    own forward is captured, and later shapes do not try the compiler again."""
    graphed = GraphedClassifier(tiny_model, GraphConfig(compile=True))
    assert graphed.compiled is not None
    tried = []

    def capture(forward, padded):
        tried.append("compiled" if forward is graphed.compiled else "eager")
        if forward is graphed.compiled:
            raise RuntimeError("backend='inductor' raised:\nRuntimeError: Cannot find a working triton installation")
        return "graph"

    monkeypatch.setattr(graphed, "_capture_forward", capture)
    padded = {"input_ids": torch.ones(1, 16, dtype=torch.long)}
    with caplog.at_level("WARNING", logger="compression.graphs"):
        assert graphed._capture(padded) == "graph"
        assert graphed._capture(padded) == "graph"
    assert tried == ["compiled", "eager", "eager"] and graphed.compiled is None
    assert "capturing the eager forward instead" in caplog.text and "working triton installation" in caplog.text


def test_a_capture_that_fails_without_the_compiler_runs_eagerly(monkeypatch, tiny_model):
    graphed = GraphedClassifier(tiny_model, GraphConfig())
    assert graphed.compiled is None

    def capture(forward, padded):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphed, "_capture_forward", capture)
    assert graphed._capture({"input_ids": torch.ones(1, 16, dtype=torch.long)}) is None


def test_llm_int8_with_outliers_is_not_compiled_either(tiny_model):
    pytest.importorskip("bitsandbytes")
    from compression.quant_bnb8 import Bnb8Config, quantize_bnb8_

    with_outliers = quantize_bnb8_(copy.deepcopy(tiny_model), Bnb8Config(threshold=6.0))
    assert GraphedClassifier(with_outliers, GraphConfig(compile=True)).compiled is None
