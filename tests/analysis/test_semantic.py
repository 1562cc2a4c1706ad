"""The semantic basis: rows solve (U^T U + lambda I) s_y = U[y], looked up on device."""

import pytest
import torch

from freezekern.analysis.semantic import SemanticBasis


def _head(vocab=97, dim=13, seed=0):
    return torch.randn(vocab, dim, generator=torch.Generator().manual_seed(seed))


def test_rows_solve_the_ridge_system():
    u = _head()
    basis = SemanticBasis(u)
    assert basis.inverse is not None and basis.factor is None  # fp64: rows by one GEMM with G^-1
    ids = torch.tensor([5, 0, 96, 5])
    gram = u.double().t() @ u.double() + basis.ridge * torch.eye(u.shape[1], dtype=torch.float64)
    expected = torch.linalg.solve(gram, u.double()[ids].t()).t()
    got = basis.rows(ids)
    assert got.dtype == torch.float32 and got.shape == (4, 13)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_index_maps_ignored_to_minus_one_and_reuses_solved_rows():
    basis = SemanticBasis(_head())
    first = basis.index(torch.tensor([[3, -100], [7, 3]]))
    assert first.shape == (2, 2) and first[0, 1] == -1
    assert first[0, 0] == first[1, 1] and basis.size == 2
    second = basis.index(torch.tensor([7, 11, 3]))
    assert second[0] == first[1, 0] and second[2] == first[0, 0] and basis.size == 3
    table = basis.table
    assert table.shape == (3, 13)
    torch.testing.assert_close(table[second], basis.rows(torch.tensor([7, 11, 3])))


def test_table_grows_across_many_batches_without_changing_rows():
    basis = SemanticBasis(_head(vocab=500))
    early = basis.rows(torch.arange(10)).clone()
    for start in range(10, 500, 37):
        basis.index(torch.arange(start, min(start + 37, 500)))
    assert basis.size == 500 and basis._table.shape[0] == 500  # never grown past the vocabulary
    torch.testing.assert_close(basis.rows(torch.arange(10)), early, rtol=0, atol=0)


def test_fp32_solve_path(monkeypatch):
    """Wide heads (D > FP64_MAX_DIM) solve in fp32 by triangular solves."""
    from freezekern.analysis import semantic

    u = _head()
    exact = SemanticBasis(u).rows(torch.arange(20))
    monkeypatch.setattr(semantic, "FP64_MAX_DIM", 4)
    basis = SemanticBasis(u)
    assert basis.solve_dtype == torch.float32 and basis.inverse is None and basis.factor is not None
    torch.testing.assert_close(basis.rows(torch.arange(20)), exact, rtol=1e-4, atol=1e-5)


def test_bad_ids_are_refused():
    basis = SemanticBasis(_head())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        basis.index(torch.tensor([1, 97]))
    with pytest.raises(ValueError, match="non-negative"):
        basis.rows(torch.tensor([-1]))


def test_empty_ids():
    basis = SemanticBasis(_head())
    assert basis.index(torch.empty(0, dtype=torch.long)).shape == (0,)
    assert basis.rows(torch.empty(0, dtype=torch.long)).shape == (0, 13)


def test_basis_is_reused_while_the_head_is_unchanged():
    from freezekern.analysis.semantic import basis_for

    weight = torch.nn.Parameter(torch.randn(50, 8))
    first = basis_for(weight)
    assert basis_for(weight) is first
    assert basis_for(weight, ridge=1e-3) is not first  # another ridge is another basis
    with torch.no_grad():
        weight.mul_(1.1)  # an optimizer step on a trained head
    changed = basis_for(weight)
    assert changed is not first and basis_for(weight) is changed
    weight.data = torch.randn(50, 8)  # new storage
    assert basis_for(weight) is not changed
