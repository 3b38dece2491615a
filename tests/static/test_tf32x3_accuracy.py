"""float32 inputs go to the tensor cores through tf32x3 (kernels' config()). The interpreter
ignores input_precision (it computes every dot in IEEE float32), so the CPU tolerance tests
prove the kernels' logic only; this test proves the arithmetic: tf32x3, emulated bit-exactly
in torch (each operand split into a TF32 high part and a TF32-rounded remainder, three
products, float32 accumulation), keeps the project's rule against the float64 reference
(error <= 2x that of IEEE float32), where plain TF32 misses it by two orders of magnitude."""
import pytest
import torch

from fastssl.kernels import contrastive as KC, sphere as KP


def _tf32(x: torch.Tensor) -> torch.Tensor:
    # round to nearest (ties to even) at 10 mantissa bits, as a tensor core reads float32
    i = x.view(torch.int32)
    return ((i + 0x0FFF + ((i >> 13) & 1)) & ~0x1FFF).view(torch.float32)


def _tf32x3(a, b):
    ah, bh = _tf32(a), _tf32(b)
    al, bl = _tf32(a - ah), _tf32(b - bh)
    return ah @ bh.T + (ah @ bl.T + al @ bh.T)


@pytest.mark.parametrize("d", [16, 128, 1024, 32768])
def test_tf32x3_products_keep_float32_accuracy(d):
    g = torch.Generator().manual_seed(d)
    a = torch.randn(64, d, generator=g)
    b = torch.randn(48, d, generator=g)
    exact = a.double() @ b.double().T
    err_ieee = (a @ b.T - exact).abs().max().item()
    err_x3 = (_tf32x3(a, b) - exact).abs().max().item()
    err_tf32 = (_tf32(a) @ _tf32(b).T - exact).abs().max().item()
    assert err_x3 <= 2 * err_ieee
    assert err_tf32 > 50 * err_ieee  # one TF32 product would not do


@pytest.mark.parametrize("cc", [80, 90])
def test_float32_gemms_are_configured_for_tf32x3(cc):
    for kernel in KC.KERNELS:
        cfg = KC.config(kernel, torch.float32, 128, cc)
        assert cfg["PRECISION"] == "tf32x3" and cfg["GRAD_PRECISION"] == "tf32x3"
    for kernel in KP.KERNELS:
        assert KP.config(kernel, torch.float32, False, cc)["PRECISION"] == "tf32x3"
