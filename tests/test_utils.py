"""Tests of sknpeff.utils: validation messages, thread limits restored, CSR without copy."""

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

from sknpeff.utils import (
    InvalidParameterError,
    check_choice,
    check_float,
    check_int,
    csr_from_parts,
    limit_threads,
)


def test_check_int():
    assert check_int(np.int64(3), "n", low=1) == 3
    assert check_int(None, "n", allow_none=True) is None
    for bad in (0, 2.0, True, "3", None, 11):
        with pytest.raises(InvalidParameterError, match=r"n must be an integer >= 1 and <= 10"):
            check_int(bad, "n", low=1, high=10)
    # both exception types, as scikit-learn's InvalidParameterError
    with pytest.raises(ValueError):
        check_int(-1, "n", low=0)
    with pytest.raises(TypeError):
        check_int("a", "n")


def test_check_float_and_choice():
    assert check_float(1, "tol", low=0) == 1.0
    for bad in (float("nan"), float("inf"), -0.1, True, "1"):
        with pytest.raises(InvalidParameterError, match="tol must be a finite number >= 0"):
            check_float(bad, "tol", low=0)
    with pytest.raises(InvalidParameterError, match="> 0"):
        check_float(0.0, "lr", low=0, strict=True)
    assert check_choice("cd", "solver", ("cd", "mu")) == "cd"
    with pytest.raises(InvalidParameterError, match="sign must be one of 1, -1; got True"):
        check_choice(True, "sign", (1, -1))
    assert check_choice(False, "flag", (True, False)) is False
    for bad in ("x", ["cd"]):
        with pytest.raises(InvalidParameterError, match="solver must be one of 'cd', 'mu'"):
            check_choice(bad, "solver", ("cd", "mu"))


def test_limit_threads_restores_on_error():
    n = torch.get_num_threads()
    blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    with pytest.raises(KeyboardInterrupt):
        with limit_threads(1):
            assert torch.get_num_threads() == 1
            assert all(i["num_threads"] == 1 for i in threadpool_info()
                       if i["user_api"] == "blas")
            raise KeyboardInterrupt
    assert torch.get_num_threads() == n
    assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == blas
    with limit_threads(None):
        assert torch.get_num_threads() == n
    with limit_threads(n + 4, blas_threads=False):  # never raises the count
        assert torch.get_num_threads() == n


def test_csr_from_parts_no_copy():
    data = np.arange(3, dtype=np.float32)
    m = csr_from_parts(data, np.array([0, 2, 1]), np.array([0, 2, 3]), (2, 4),
                       index_dtype="auto")
    assert m.data is data and m.indices.dtype == np.int32
    np.testing.assert_array_equal(m.toarray(), [[0, 0, 1, 0], [0, 2, 0, 0]])
