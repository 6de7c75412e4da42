"""The demo CNN's head: the spatial pooling of its score map, per-slice standardisation, seeded reproducibility."""
import math

import pytest
import torch

from tonno_fast.demo.model import SliceCNN, pool_map


def test_pool_map_formulas_on_a_known_map():
    m = torch.tensor([[0.0, 1.0, 3.0, -2.0], [5.0, 5.0, -1.0, 0.0]])
    torch.testing.assert_close(pool_map(m, "mean", 10.0, 2), torch.tensor([0.5, 2.25]))
    torch.testing.assert_close(pool_map(m, "topk", 10.0, 2), torch.tensor([2.0, 5.0]))
    torch.testing.assert_close(pool_map(m, "topk", 10.0, 1), torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(pool_map(m, "topk", 10.0, 99), torch.tensor([0.5, 2.25]))  # k capped: the mean
    r = 2.0
    expect = torch.stack([(torch.logsumexp(r * row, 0) - math.log(4)) / r for row in m])
    torch.testing.assert_close(pool_map(m, "lse", r, 2), expect)
    # Top-k: the gradient reaches exactly the k largest positions, each with weight 1/k.
    mm = m.clone().requires_grad_()
    pool_map(mm, "topk", 10.0, 2).sum().backward()
    torch.testing.assert_close(mm.grad, torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.5, 0.5, 0.0, 0.0]]))


def test_slicecnn_heads_and_bad_arguments():
    x = torch.randn(3, 1, 32, 32)
    for pooling in ("lse", "topk", "mean"):
        net = SliceCNN(pooling=pooling).eval()
        m = net.score(net.features(x)).flatten(1)
        torch.testing.assert_close(net(x), pool_map(m, pooling, net.sharpness, net.top_k)[:, None])
    with pytest.raises(ValueError, match="pooling"):
        SliceCNN(pooling="attention")
    with pytest.raises(ValueError, match="top_k"):
        SliceCNN(pooling="topk", top_k=0)


def test_standardize_makes_the_logit_invariant_to_per_slice_intensity_scale_and_shift():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 32, 32)
    a = torch.tensor([0.5, 2.0, 3.0, 10.0])[:, None, None, None]
    b = torch.tensor([-1.0, 0.0, 4.0, 7.0])[:, None, None, None]
    net = SliceCNN(standardize=True).eval()
    torch.testing.assert_close(net(a * x + b), net(x), atol=1e-4, rtol=1e-4)
    plain = SliceCNN().eval()
    plain.load_state_dict(net.state_dict())
    assert not torch.allclose(plain(a * x + b), plain(x), atol=1e-3)


@pytest.mark.parametrize("kw", [dict(pooling="topk"), dict(standardize=True)])
def test_seeded_cpu_training_step_is_bitwise_reproducible(kw):
    def run():
        torch.manual_seed(5)
        net = SliceCNN(widths=(4, 4, 8, 8), **kw)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.rand(8, 1, 32, 32, generator=g)
            y = (torch.arange(8) % 2).float()[:, None]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return net.state_dict()

    a, b = run(), run()
    for k in a:
        assert torch.equal(a[k], b[k]), k
