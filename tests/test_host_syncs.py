"""Host synchronisations in the sparse processors' hot path: none.

On a GPU every ``.item()``, ``int()``, ``float()``, ``bool()`` or ``.tolist()`` of a device tensor
stops the host until the device catches up, and under ``torch.compile`` each one is a graph break.
These tests count such calls (every Python-level read of a tensor value) around one sparse
processor call on the CPU, where they are equally visible, and require zero (issue 12).
"""

from __future__ import annotations

import contextlib
import traceback

import pytest
import torch

from fastgen import RectifiedSpaAttnConfig, apply_sparse_attention

_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def counting_host_reads():
    """Count calls of the tensor methods that read a value back to the host; yields the list of
    ``(method, where)`` calls (``where``: the innermost fastgen frame, else the innermost frame)."""
    calls: list[tuple[str, str]] = []
    originals = {name: getattr(torch.Tensor, name) for name in _READS}

    def counted(name, original):
        def wrapper(self, *args, **kwargs):
            frames = traceback.extract_stack()[:-1]
            ours = [f for f in frames if "/fastgen/" in f.filename or "/kernels/" in f.filename]
            frame = (ours or frames)[-1]
            calls.append((name, f"{'/'.join(frame.filename.rsplit('/', 2)[-2:])}:{frame.lineno}"))
            return original(self, *args, **kwargs)

        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_counter_sees_host_reads():
    """The counter itself: every kind of read is seen (a counter that sees nothing proves nothing)."""
    x = torch.tensor([1.5, 2.0])
    with counting_host_reads() as calls:
        x.sum().item()
        float(x[0])
        int(x[1])
        bool(x.any())
        x.tolist()
        range(10)[torch.tensor(1)]
    assert [name for name, _ in calls] == ["item", "__float__", "__int__", "__bool__", "tolist", "__index__"]


def _first_processor_call(model, inputs):
    """The first Rectified processor of ``model`` and the arguments of its first call in a forward."""
    from fastgen.processors.rectified_base import RectifiedProcessorBase

    attn = next(
        m for m in model.modules() if isinstance(getattr(m, "processor", None), RectifiedProcessorBase)
    )
    captured = {}

    def capture(module, args, kwargs):
        captured.setdefault("call", (args, dict(kwargs)))

    handle = attn.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    args, kwargs = captured["call"]
    return attn.processor, attn, args, kwargs


def _tiny_wan():
    from fastgen.pipelines.tiny_video import build_tiny_wan

    model = build_tiny_wan(num_layers=2).transformer
    x = torch.randn(2, 16, 2, 8, 8)
    inputs = dict(
        hidden_states=x, timestep=torch.tensor([500.0, 500.0]), encoder_hidden_states=torch.randn(2, 12, 32)
    )
    return model, inputs


def _tiny_hunyuan():
    from tests.tiny_models import inputs, tiny_hunyuan

    return tiny_hunyuan(), inputs(text_lengths=(6, 10))  # row 0's text is padded


_CONFIG = RectifiedSpaAttnConfig(sparsity=0.5, block_size=16, dense_layers=0, warmup_steps=0, min_tokens=64)


@pytest.mark.parametrize("record_stats", ["off", "summary"])
@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_rectified_processor_makes_no_host_reads(family, record_stats):
    """One sparse self-attention call of the Wan processor (batch 2, 128 tokens in blocks of 16) or
    of the HunyuanVideo processor (joint video + padded text): no tensor value is read on the host.
    (HunyuanVideo read its key padding mask twice per call before issue 12.)"""
    model, inputs = _tiny_wan() if family == "wan" else _tiny_hunyuan()
    apply_sparse_attention(model, _CONFIG)
    processor, attn, args, kwargs = _first_processor_call(model, inputs)
    processor.record_stats = record_stats
    with torch.no_grad():
        expected = processor(attn, *args, **kwargs)
        processor.reset()  # forget the statistics so far
        with counting_host_reads() as calls:
            out = processor(attn, *args, **kwargs)
    assert bool(processor.layer_stats()) == (record_stats != "off")  # the call ran sparse
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert calls == [], f"host reads in the sparse processor: {calls}"


def test_sparsed_sparse_step_reads_the_mask_once_per_forward():
    """A SparseD sparse step of a 2-layer Llama with padded rows: the only host reads are the check of
    the attention mask, once per forward (cached for every layer); before issue 12 each layer also
    read the padding (``.all()``, twice) and the index-table width (``int(counts.max())``)."""
    from fastgen import SparseDConfig
    from fastgen.processors import transformers_lm
    from tests import test_sparsed as sd

    model = sd.tiny_llama()
    ids, valid = sd.inputs()
    apply_sparse_attention(model, SparseDConfig(skip=0.0, select=0.3, block_size=16))
    transformers_lm.begin_generation(model, 3, prompt_length=60)
    transformers_lm.set_step(model, 0)  # the pattern step
    sd.forward(model, ids, valid)
    transformers_lm.set_step(model, 1)
    calls_before = model._fastgen_sparsed.sparse_calls
    with counting_host_reads() as calls:
        sd.forward(model, ids, valid)
    assert model._fastgen_sparsed.sparse_calls == calls_before + 2  # both layers ran sparse
    assert all(where.startswith("transformers_lm/sparsed.py") for _, where in calls), calls
    assert len(calls) <= 2, f"host reads grow with the layers: {calls}"


def test_sparsed_with_declared_padding_reads_nothing_and_matches_the_checked_mask():
    """The pipeline declares its key padding (``begin_generation(key_valid=...)``): the pattern step
    (bf16 on the CPU: the slab engine) and the sparse step then read no tensor value, and the output
    is the same as with the mask's values checked."""
    from fastgen import SparseDConfig
    from fastgen.processors import transformers_lm
    from tests import test_sparsed as sd

    ids, valid = sd.inputs()
    outs = {}
    for declared in (False, True):
        model = sd.tiny_llama().to(torch.bfloat16)
        apply_sparse_attention(model, SparseDConfig(skip=0.0, select=0.3, block_size=16))
        transformers_lm.begin_generation(model, 3, prompt_length=60, key_valid=valid if declared else None)
        with counting_host_reads() as calls:
            transformers_lm.set_step(model, 0)  # the pattern step
            sd.forward(model, ids, valid, additive=True)
            transformers_lm.set_step(model, 1)
            outs[declared] = sd.forward(model, ids, valid, additive=True)
        assert model._fastgen_sparsed.sparse_calls == 2  # both layers ran sparse
        if declared:
            assert calls == [], calls
        else:
            assert calls, "the undeclared mask is checked (a host read); the counter must see it"
    torch.testing.assert_close(outs[True], outs[False], rtol=0, atol=0)


def test_step_tracker_under_compile_counts_scheduler_steps_and_keeps_a_bool():
    """What a compiled forward relies on: the warm-up decision is a watched bool (flips once per
    generation, so the graph guards on it, not on the step), and a pipeline-driven tracker whose
    forwards ran compiled (no timestep read) advances at each scheduler step, once per step."""
    from fastgen.api import _hook_scheduler, _unhook_scheduler
    from fastgen.tracking import StepTracker

    class Scheduler:
        def set_timesteps(self, n):
            self.timesteps = list(range(n))

        def step(self, output, t, sample):
            return sample

    tracker = StepTracker(pipeline_driven=True)
    tracker.watch_step(2)
    scheduler = Scheduler()
    _hook_scheduler(scheduler, tracker)
    scheduler.set_timesteps(4)
    seen = []
    for t in (900.0, 600.0, 300.0, 100.0):
        tracker.compiled_calls = True  # what the hook writes while traced
        seen.append((tracker.step_reached(2), tracker._reached[2]))
        scheduler.step(None, t, None)
    assert [reached for reached, _ in seen] == [False, False, True, True]
    assert all(reached == watched for reached, watched in seen)
    scheduler.set_timesteps(4)  # a new generation: back to the warm-up
    assert tracker.step == -1 and not tracker.step_reached(2)
    # eager forwards count from their timesteps; the scheduler step then adds nothing
    for t in (900.0, 600.0, 300.0):
        tracker.observe(t)
        scheduler.step(None, t, None)
    assert tracker.step == 2 and tracker.step_reached(2)
    _unhook_scheduler(scheduler, tracker)
    assert "step" not in vars(scheduler) and "set_timesteps" not in vars(scheduler)
