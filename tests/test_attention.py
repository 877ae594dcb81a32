"""attend(): every backend against the float32 math reference; backend resolution and fallbacks."""

from __future__ import annotations

import pytest
import torch

from valle_cli.errors import ValleError
from valle_cli.model import attention
from valle_cli.model.attention import attend, causal_mask, resolve_backend
from valle_cli.model.masks import decode_step_mask, prefix_bidirectional_mask


def qkv(b: int = 2, h: int = 4, h_kv: int = 4, q_len: int = 7, s_len: int = 7, dh: int = 16, seed: int = 0,
        device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, q_len, dh, generator=g)
    k = torch.randn(b, h_kv, s_len, dh, generator=g)
    v = torch.randn(b, h_kv, s_len, dh, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def random_mask(b: int, q_len: int, s_len: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, 1, q_len, s_len, generator=g) < 0.6
    mask[..., 0] = True  # no fully masked query row (softmax of nothing is NaN in every backend)
    return mask


@pytest.mark.parametrize("h_kv", [4, 2, 1])
def test_sdpa_matches_math_with_random_masks(h_kv: int) -> None:
    q, k, v = qkv(h=4, h_kv=h_kv, q_len=9, s_len=9)
    mask = random_mask(2, 9, 9)
    ref = attend(q, k, v, mask=mask, backend="math")
    assert ref.shape == (2, 4, 9, 16)
    torch.testing.assert_close(attend(q, k, v, mask=mask, backend="sdpa"), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("h_kv", [4, 2])
def test_sdpa_matches_math_causal(h_kv: int) -> None:
    q, k, v = qkv(h=4, h_kv=h_kv, q_len=11, s_len=11)
    ref = attend(q, k, v, causal=True, backend="math")
    torch.testing.assert_close(attend(q, k, v, causal=True, backend="sdpa"), ref, atol=1e-5, rtol=1e-5)
    # causal=True is the same as the explicit lower-triangular mask
    explicit = attend(q, k, v, mask=causal_mask(11, 11)[None, None].expand(2, 1, 11, 11), backend="math")
    torch.testing.assert_close(explicit, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("h_kv", [4, 2])
def test_decode_shapes_causal_is_bottom_right(q_len: int, h_kv: int) -> None:
    q, k, v = qkv(h=4, h_kv=h_kv, q_len=q_len, s_len=10)
    ref = attend(q, k, v, causal=True, backend="math")
    torch.testing.assert_close(attend(q, k, v, causal=True, backend="sdpa"), ref, atol=1e-5, rtol=1e-5)
    # query i sits at absolute position S - Q + i: the same as the last Q rows of a full causal pass
    q_full = torch.cat([torch.randn(2, 4, 10 - q_len, 16), q], dim=2)
    full = attend(q_full, k, v, causal=True, backend="math")
    torch.testing.assert_close(ref, full[:, :, -q_len:], atol=1e-6, rtol=1e-6)
    # and the same as the decode step mask with every key valid
    stepped = attend(q, k, v, mask=decode_step_mask(torch.ones(2, 10, dtype=torch.bool), q_len), backend="sdpa")
    torch.testing.assert_close(stepped, ref, atol=1e-5, rtol=1e-5)


def test_decode_shapes_with_mask_and_gqa() -> None:
    q, k, v = qkv(h=4, h_kv=2, q_len=2, s_len=12)
    mask = random_mask(2, 2, 12, seed=3)
    ref = attend(q, k, v, mask=mask, backend="math")
    torch.testing.assert_close(attend(q, k, v, mask=mask, backend="sdpa"), ref, atol=1e-5, rtol=1e-5)


def test_mask_with_batch_dim_one_broadcasts() -> None:
    q, k, v = qkv(h=4, h_kv=2, q_len=5, s_len=5)
    mask = random_mask(1, 5, 5, seed=1)
    ref = attend(q, k, v, mask=mask.expand(2, 1, 5, 5), backend="math")
    torch.testing.assert_close(attend(q, k, v, mask=mask, backend="sdpa"), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attend(q, k, v, mask=mask, backend="math"), ref)


def test_prefix_bidirectional_mask_and_math_dtype() -> None:
    valid = torch.tensor([[True] * 8, [False, False] + [True] * 6])
    mask = prefix_bidirectional_mask(valid, torch.tensor([5, 8]))
    q, k, v = qkv(h=4, h_kv=2, q_len=8, s_len=8, dtype=torch.bfloat16)
    out = attend(q, k, v, mask=mask, backend="math")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_flash_falls_back_to_sdpa_on_cpu() -> None:
    q, k, v = qkv(h=4, h_kv=2, q_len=6, s_len=6)
    for causal in (True, False):
        torch.testing.assert_close(attend(q, k, v, causal=causal, backend="flash"),
                                   attend(q, k, v, causal=causal, backend="sdpa"))
    mask = random_mask(2, 6, 6)
    torch.testing.assert_close(attend(q, k, v, mask=mask, backend="flash"), attend(q, k, v, mask=mask, backend="sdpa"))


def test_resolve_backend_on_cpu() -> None:
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("sdpa", "cpu") == "sdpa"
    assert resolve_backend("math", "cpu") == "math"
    with pytest.raises(ValleError, match="flash"):
        resolve_backend("nonsense", "cpu")


def test_explicit_flash_unavailable_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "flash_import_error", lambda: "ModuleNotFoundError: No module named 'flash_attn'")
    with pytest.raises(ValleError, match="flash") as info:
        resolve_backend("flash", "cuda")
    assert "\n" not in str(info.value)
    assert resolve_backend("auto", "cuda") == "sdpa"
    if not attention.flash_available():  # the real check too, where flash-attn is not installed (CPU CI)
        monkeypatch.undo()
        with pytest.raises(ValleError, match="flash"):
            resolve_backend("flash", "cpu")


def test_bad_arguments_raise() -> None:
    q, k, v = qkv(h=4, h_kv=3, q_len=4, s_len=4)
    with pytest.raises(ValueError):
        attend(q, k, v)
    q, k, v = qkv(q_len=4, s_len=4)
    with pytest.raises(ValueError):
        attend(q, k, v, mask=random_mask(2, 4, 4), causal=True)
    with pytest.raises(ValueError):
        attend(q, k, v, mask=random_mask(2, 4, 5))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("b", "h_kv", "q_len", "s_len"), [(4, 8, 128, 128), (2, 2, 1, 300), (2, 1, 16, 300)])
def test_flash_matches_math_on_cuda(dtype: torch.dtype, b: int, h_kv: int, q_len: int, s_len: int) -> None:
    if not torch.cuda.is_available() or not attention.flash_available():
        pytest.skip("needs CUDA and flash-attn")
    q, k, v = qkv(b=b, h=8, h_kv=h_kv, q_len=q_len, s_len=s_len, dh=64, device="cuda", dtype=dtype)
    assert resolve_backend("auto", "cuda") == "flash"
    for causal in (True, False):
        ref = attend(q, k, v, causal=causal, backend="math").float()
        out = attend(q, k, v, causal=causal, backend="flash").float()
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
        sdpa = attend(q, k, v, causal=causal, backend="sdpa").float()
        torch.testing.assert_close(sdpa, ref, atol=2e-2, rtol=2e-2)
