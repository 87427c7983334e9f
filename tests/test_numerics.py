"""The tolerance rule of tests/helpers/numerics.py on hand-made results: it reads every shape of result the
tests hand it, and it cannot pass vacuously."""
import pytest
import torch

from helpers.numerics import EXTRA_ROUNDINGS, FACTOR, assert_matches, eps, mismatches, parts, rel_l2

pytestmark = pytest.mark.quick


class Nested:
    """Stands in for ComfyUI's NestedTensor (no torch.Tensor subclass): is_nested and unbind."""
    is_nested = True

    def __init__(self, *tensors):
        self.tensors = tensors

    def unbind(self):
        return self.tensors


def results(seed=0, n=4096):
    """A float64 reference and a float32 rounding of it (stock), as a video and an audio part."""
    g = torch.Generator().manual_seed(seed)
    ref = [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(2)]
    return [r.float() for r in ref], ref


def test_parts_reads_latents_nested_tensors_and_lists():
    a, b = torch.ones(2), torch.zeros(3)
    for x in ({"samples": Nested(a, b)}, Nested(a, b), [a, b], (a, [b])):
        got = parts(x)
        assert len(got) == 2 and got[0] is a and got[1] is b
    with pytest.raises(AssertionError, match="not a result"):
        parts(object())


def test_within_the_bound_passes_and_beyond_it_fails():
    stock, ref = results()
    assert_matches(stock, stock, ref)
    e_stock = rel_l2(stock[0], ref[0])
    bound = FACTOR * e_stock + EXTRA_ROUNDINGS * eps(torch.float32)
    for factor, fails in ((0.5, False), (2.0, True)):
        got = [stock[0] + (factor * bound) * ref[0].norm() / (4096 ** 0.5) * torch.ones(4096), stock[1]]
        assert mismatches(got, stock, ref) is fails, factor


def test_cannot_pass_vacuously():
    stock, ref = results()
    with pytest.raises(AssertionError):
        assert_matches([], [], [])  # nothing compared
    with pytest.raises(AssertionError, match="not the same computation"):
        assert_matches(stock, stock, [s.double() for s in stock])  # a "reference" equal to stock: no reference
    with pytest.raises(AssertionError, match="not the same computation"):
        assert_matches(stock, stock, results(seed=1)[1])  # another computation's reference
    with pytest.raises(AssertionError):
        assert_matches(stock[:1], stock, ref)  # a part missing
