"""fastssl.compat.diffsort.DiffSortNet: diffsort's README usage with only the import changed,
against diffsort 0.2.0 itself when it is importable (the dev extra installs it)."""
import inspect

import torch

from fastssl.compat.diffsort import DiffSortNet
import peers


def test_readme_usage():
    # diffsort's README: sorter = DiffSortNet('bitonic', 16, steepness=5);
    # sorted_vectors, permutation_matrices = sorter(vectors)
    torch.manual_seed(0)
    vectors = torch.randn(4, 16, requires_grad=True)
    sorter = DiffSortNet('bitonic', 16, steepness=5)
    sorted_vectors, permutation_matrices = sorter(vectors)
    assert sorted_vectors.shape == (4, 16) and permutation_matrices.shape == (4, 16, 16)
    torch.testing.assert_close(sorted_vectors,
                               (vectors.unsqueeze(1) @ permutation_matrices).squeeze(1))
    assert (sorted_vectors[:, 1:] >= sorted_vectors[:, :-1] - 0.5).all()  # nearly ascending
    sorted_vectors.sum().backward()
    assert sorter.device == torch.device("cpu")  # diffsort's default device


def test_equals_peer():
    peer = peers.diffsort_module()
    ours_sig = inspect.signature(DiffSortNet.__init__)
    theirs_sig = inspect.signature(peer.DiffSortNet.__init__)
    assert [(p.name, p.default) for p in ours_sig.parameters.values()] == \
        [(p.name, p.default) for p in theirs_sig.parameters.values()]
    for network, n in (("bitonic", 8), ("odd_even", 6)):
        torch.manual_seed(1)
        x = torch.randn(5, n, dtype=torch.float64, requires_grad=True)
        s1, p1 = DiffSortNet(network, n, steepness=7)(x)
        g1 = torch.autograd.grad((s1 * torch.arange(n)).sum(), x)[0]
        s2, p2 = peer.DiffSortNet(network, n, steepness=7)(x)
        g2 = torch.autograd.grad((s2 * torch.arange(n)).sum(), x)[0]
        torch.testing.assert_close(s1, s2)
        torch.testing.assert_close(p1, p2)
        torch.testing.assert_close(g1, g2)
