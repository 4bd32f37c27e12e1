"""More of the backends module (registry.py, dispatch.py, known_answer.py), from its mutation run: the declaration
checks' edges (empty or non-str devices, a head dim of 1, min_compute_capability's shape), run_backend's error for an
lse that is not a tensor, and verify_backend's argument checks and its float64 log-sum-exp check."""
import pytest
import torch

from elit_kernels.attention import known_answer as KA
from elit_kernels.attention import registry as R
from elit_kernels.attention import validate_inputs
from elit_kernels.testing import random_varlen_inputs


class _Ref(R.Backend):
    """A CPU backend that answers with the reference; the tests set its declaration on the instance."""

    name, priority, known_answer = "_more", -60, False

    def forward(self, inp):
        return R.get_backend("reference").forward(inp)


def _registers(**decl) -> bool:
    """Whether register_backend accepts a _Ref with ``decl`` set on the instance (removed again either way)."""
    b = _Ref()
    for field, value in decl.items():
        setattr(b, field, value)
    try:
        R.register_backend(b)
    finally:
        accepted = R._REGISTRY.get("_more") is b
        R._REGISTRY.pop("_more", None)
    return accepted


@pytest.mark.parametrize("value", [(), (0,)])
def test_devices_must_be_a_non_empty_tuple_of_strs(value):
    """devices=() (runs nowhere) and a non-str device are refused as TypeErrors naming the field, each on its own:
    an int is not read as a CUDA index (torch.device(0) is cuda:0)."""
    with pytest.raises(TypeError, match=r"^backend: devices must be None \(any\) or a non-empty tuple of device types"):
        _registers(devices=value)
    assert "_more" not in R.known_backends()


def test_a_head_dim_of_one_is_a_valid_declaration():
    """head_dims takes ints >= 1: (1, 8) registers, (0, 8) does not."""
    assert _registers(head_dims=(1, 8))
    with pytest.raises(TypeError, match=r"^backend: head_dims must be "):
        _registers(head_dims=(0, 8))


@pytest.mark.parametrize("cc,ok", [
    ((8, 0), True), ([9, 0], True), (None, True),
    ((8,), False), ((8, 0, 0), False), ((8, "0"), False), ((8.0, 0), False), ((), False),
])
def test_min_compute_capability_is_major_and_minor(cc, ok):
    """min_compute_capability is None or exactly two ints (major, minor): a pair registers, one number, three, or a
    non-int part is a TypeError naming the field."""
    if ok:
        assert _registers(min_compute_capability=cc)
    else:
        with pytest.raises(TypeError, match=r"^backend: min_compute_capability must be None or \(major, minor\)"):
            _registers(min_compute_capability=cc)


def test_run_backend_names_the_type_of_an_lse_that_is_not_a_tensor():
    """A forward that returns (out, a list) for the lse: the error names the list's type (not NoneType)."""
    class _ListLse(_Ref):
        def forward(self, inp):
            out, lse = R.get_backend("reference").forward(inp)
            return out, lse.tolist()

    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 2], [3, 4], 2, 8, seed=1)
    inp = validate_inputs(q, k, v, cq, ck, mq, mk, return_lse=True)
    with pytest.raises(RuntimeError, match=r"^backend '_more': its forward returned an lse of list, the contract is "):
        R.run_backend(_ListLse(), inp)


@pytest.fixture
def clean_verdicts():
    before = dict(KA._VERDICTS)
    yield
    KA._VERDICTS.clear()
    KA._VERDICTS.update(before)


def test_verify_backend_head_dim_is_an_int_in_1_to_256(clean_verdicts):
    """head_dim 1 and 256 are checked (the reference passes its own case); 0 and 257 are ValueErrors naming it."""
    assert KA.verify_backend("reference", device="cpu", dtype=torch.float32, head_dim=1) is None
    assert KA.verify_backend("reference", device="cpu", dtype=torch.float32, head_dim=256, grad=False) is None
    for bad in (0, 257):
        with pytest.raises(ValueError, match=rf"^head_dim: expected an int in \[1, 256\], got {bad}$"):
            KA.verify_backend("reference", device="cpu", dtype=torch.float32, head_dim=bad)


@pytest.mark.parametrize("flag", ["causal", "gqa", "grad"])
def test_verify_backend_flag_errors_name_the_flag(flag, clean_verdicts):
    """A non-bool causal / gqa / grad is a TypeError that starts with that flag's name."""
    with pytest.raises(TypeError, match=rf"^{flag}: expected a bool, got str \('yes'\)$"):
        KA.verify_backend("reference", device="cpu", dtype=torch.float32, **{flag: "yes"})


class _LseOff(_Ref):
    """Float64 only; its out and gradients are the reference's, its lse is ``off`` too large. 1e-8 is far above
    float64's bound (twice the truth's distance to the reference in float64, plus float64's atol 1e-10) and far
    below the default atol 1e-5 and the ~4.6e-7 bound the check had while it rounded the float64 truth to float32."""

    name, dtypes = "_lse_off", (torch.float64,)
    off = 1e-8

    def forward(self, inp):
        res = R.get_backend("reference").forward(inp)
        return (res[0], res[1] + self.off) if inp.return_lse else res


def test_verify_backend_checks_a_float64_lse_at_float64s_tolerance(clean_verdicts):
    """The known-answer lse check of a float64-only backend runs (on float64 inputs) at float64's tolerance: an lse
    1e-8 off fails it (skipping the check, the default atol 1e-5, or the float64 truth rounded to float32 as the
    check did before would pass it)."""
    b = R.register_backend(_LseOff())
    try:
        verdict = KA.verify_backend("_lse_off", device="cpu", dtype=torch.float64, head_dim=16)
        assert verdict is not None and verdict.startswith("lse: "), verdict
        # the same backend with a right lse passes: the failure is the lse's alone
        b.forward = lambda inp: R.get_backend("reference").forward(inp)
        assert KA.verify_backend("_lse_off", device="cpu", dtype=torch.float64, head_dim=16) is None
    finally:
        R._REGISTRY.pop("_lse_off", None)
