"""benchmarks/hlo_stats.py's bytes-moved counter on hand-written optimized HLO."""

from __future__ import annotations

from benchmarks import hlo_stats

_MODULE = """HloModule m

%fused (p0: bf16[11,64,768], p1: s32[]) -> {ROOT_SHAPE} {
  %p0 = bf16[11,64,768]{2,1,0} parameter(0)
  %bc = bf16[11,768,64]{2,1,0} bitcast(%p0)
  %p1 = s32[] parameter(1)
  %c0 = s32[] constant(0)
  %ds = bf16[1,768,64]{2,1,0} dynamic-slice(%bc, %p1, %c0, %c0), dynamic_slice_sizes={1,768,64}
  {ROOT}
}

ENTRY %main (a: bf16[11,64,768], i: s32[]) -> {ROOT_SHAPE} {
  %a = bf16[11,64,768]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  ROOT %f = {ROOT_SHAPE} fusion(%a, %i), kind=kLoop, calls=%fused
}
"""
_SLICE = 768 * 64 * 2  # bytes of one bf16 [1, 768, 64] slice
_WHOLE = 11 * _SLICE


def _stats(root_shape: str, root: str) -> hlo_stats.ProgramStats:
    return hlo_stats.program_stats(_MODULE.replace("{ROOT_SHAPE}", root_shape).replace("{ROOT}", root))


def test_a_stacked_buffer_sliced_through_a_bitcast_counts_the_slice() -> None:
    stats = _stats("bf16[1,768,64]", "ROOT %out = bf16[1,768,64]{2,1,0} negate(%ds)")
    assert stats.kernels == 1
    assert stats.bytes_moved == _SLICE + 4 + _SLICE  # the slice read, the index, the result written


def test_a_bitcast_view_used_whole_counts_the_whole_buffer() -> None:
    stats = _stats("bf16[11,768,64]", "ROOT %out = bf16[11,768,64]{2,1,0} negate(%bc)")
    assert stats.bytes_moved == _WHOLE + 4 + _WHOLE


def test_an_async_fusion_counts_once_by_what_its_computation_touches() -> None:
    """XLA from JAX 0.11 wraps some fusions as fusion-start / fusion-done: one kernel, whose
    result tuple (its operands, its output, a context) is not what it writes."""
    text = _MODULE.replace("{ROOT_SHAPE}", "bf16[1,768,64]").replace("{ROOT}", "ROOT %out = bf16[1,768,64]{2,1,0} negate(%ds)")
    text = text.replace(
        "  ROOT %f = bf16[1,768,64] fusion(%a, %i), kind=kLoop, calls=%fused\n",
        "  %s = ((bf16[11,64,768]{2,1,0}, s32[]), bf16[1,768,64]{2,1,0}, u32[]) fusion-start(%a, %i), kind=kLoop, calls=%fused\n"
        "  ROOT %f = bf16[1,768,64]{2,1,0} fusion-done(%s)\n",
    )
    assert "fusion-start" in text
    stats = hlo_stats.program_stats(text)
    assert stats.kernels == 1
    assert stats.bytes_moved == _SLICE + 4 + _SLICE
