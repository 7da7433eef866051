"""Boundary checks of the generated modules that other tests do not reach: devices and
strided inputs."""

from __future__ import annotations

import pytest
import torch

from mlagen.runtime import launch
from tests.helpers import generated, max_error


def test_input_on_another_device_is_rejected_before_any_launch():
    attn = generated("tiny_gqa").Attention()
    with pytest.raises(ValueError, match="is on meta but the module is on cpu"):
        attn(torch.empty(1, 4, 64, device="meta"))


@pytest.mark.parametrize("name", ["tiny_mla", "tiny_gqa", "tiny_hybrid"])
def test_strided_hidden_states_give_the_same_output(name):
    attn = generated(name).Attention()
    storage = torch.randn(9, 2, 64)
    strided = storage.transpose(0, 1)  # [2, 9, 64], not contiguous
    assert not strided.is_contiguous()
    assert max_error(attn(strided), attn(strided.contiguous())) < 1e-6


@pytest.mark.parametrize("prefilled", [False, True], ids=["empty-cache", "filled-cache"])
def test_cache_of_another_spec_or_dtype_is_rejected(prefilled):
    attn = generated("tiny_mla").Attention()
    foreign = generated("tiny_mla_yarn").Attention().new_cache(1, 16)
    wrong_dtype = attn.new_cache(1, 16)
    wrong_dtype.buffer = wrong_dtype.buffer.half()
    with torch.no_grad():
        if prefilled:
            generated("tiny_mla_yarn").Attention()(torch.randn(1, 3, 64), cache=foreign)
        with pytest.raises(ValueError, match="another spec"):
            attn(torch.randn(1, 2, 64), cache=foreign)
        with pytest.raises(ValueError, match="create the cache with new_cache"):
            attn(torch.randn(1, 2, 64), cache=wrong_dtype)


@pytest.mark.parametrize("name", ["tiny_gqa", "tiny_mla"])
def test_bf16_on_cpu_takes_the_reference_path(name, monkeypatch):
    """The interpreter's tl.dot multiplies bf16 bits (Triton issue 11584): bf16 modules on CPU
    must run the plain-torch path (with a warning) rather than return garbage."""
    monkeypatch.setattr(launch, "_warned", set())  # warn_once: a fresh slate for this test
    attn = generated(name).Attention(dtype=torch.bfloat16)
    hidden = torch.randn(1, 6, 64, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="11584"):
        out = attn(hidden)
    assert torch.equal(out, attn.reference_forward(hidden))
    if name == "tiny_mla":
        cache = attn.new_cache(1, 8)
        with torch.no_grad():
            attn(hidden[:, :5], cache=cache)
            step = attn(hidden[:, 5:], cache=cache)
        assert max_error(step, out[:, 5:]) <= 0.05 * out.abs().max().item()


@pytest.mark.parametrize("version, mended", [("3.6.0", True), ("3.9.0", False)])
def test_the_interpreter_of_triton_3_6_indexes_scalars_under_numpy_2_4(version, mended, monkeypatch):
    """Triton 3.6's interpreter converts a scalar tensor with int() of its one-element array,
    which numpy 2.4 refuses (triton-lang/triton#9171); under an older Triton the generated
    modules mend that conversion (mlagen.runtime.interpreter_fix), and leave 3.9's alone. Shown
    here on a stand-in of the interpreter's patch of tl.tensor: the one Triton installed in CI
    is 3.9 (with 3.6 and numpy 2.4 the test-sized kernels and `bench --suite gpu --smoke` ran)."""
    import numpy as np
    import triton
    from triton.runtime import interpreter

    from mlagen.runtime.interpreter_fix import index_scalars_under_any_numpy

    def triton_36_patch(tensor, scope):
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    class Handle:
        data = np.array([5], dtype=np.int32)  # a scalar, as the interpreter holds it

    class Tensor:
        handle = Handle()

    monkeypatch.setattr(triton, "__version__", version)
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", triton_36_patch)
    assert index_scalars_under_any_numpy() is mended
    assert index_scalars_under_any_numpy() is mended  # once is enough: patched, not wrapped twice
    scope = interpreter._LangPatchScope()
    interpreter._patch_lang_tensor(Tensor, scope)
    try:
        if mended:
            assert range(Tensor())[-1] == 4
        else:
            assert interpreter._patch_lang_tensor is triton_36_patch
    finally:
        scope.restore()
    assert not hasattr(Tensor, "__index__")


@pytest.mark.parametrize(
    "arch, dims, block_m, stages",
    [(90, (192, 128), 32, 1), (90, (192, 128), 16, None), (90, (128, 128), 32, None), (100, (192, 128), 32, None),
     (80, (192, 128), 16, None), (None, (192, 128), 32, None)],
)
def test_only_mla_on_sm90_unpipelines_the_backward_masked_steps(arch, dims, block_m, stages):
    """The dK/dV kernel's masked loops run at one stage only where that lets MLA's 32 streamed
    rows fit sm_90's registers; elsewhere it costs issue slots or spills (runtime.launch)."""
    from mlagen.runtime.launch import BlockConfig, LaunchTarget, launching_for, masked_steps_stages

    config = BlockConfig(block_m=block_m, block_n=128, num_warps=8, num_stages=2)
    if arch is None:  # the interpreter: no arch, nothing to pipeline
        assert masked_steps_stages(config, *dims, torch.device("cpu")) is None
        return
    with launching_for(LaunchTarget(arch, 132)):
        assert masked_steps_stages(config, *dims, torch.device("meta")) == stages
        if dims == (192, 128) and arch == 90:
            assert launch.default_backward_config(*dims, torch.device("meta"), dtype=torch.bfloat16).block_m == 32
