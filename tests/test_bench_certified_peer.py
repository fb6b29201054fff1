"""The peer's certificate in benchmarks/bench_certified_peer.py is sound on a constructed disjoint-neurons head
(issue 34 item 1): unit-norm rows whose pairwise distances exceed sqrt 2, where the former sqrt(2) radius was not."""
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_certified_peer import peer_certificate  # noqa: E402

from lcnn_timm.certify.radius import certified_radii  # noqa: E402


def disjoint_neurons_net(seed: int = 0) -> nn.Sequential:
    """Flatten -> a linear body of spectral norm 1 -> a head of unit-norm rows with obtuse angles between them."""
    generator = torch.Generator().manual_seed(seed)
    body = nn.Linear(6, 6)
    body.weight.data = torch.linalg.qr(torch.randn(6, 6, generator=generator))[0]  # orthogonal: norm exactly 1
    head = nn.Linear(6, 4)
    rows = torch.randn(4, 6, generator=generator)
    rows[1] = -rows[0] + 0.2 * rows[1]  # nearly opposite to row 0: ||w_0 - w_1|| close to 2
    head.weight.data = rows / rows.norm(dim=1, keepdim=True)
    head.bias.data.normal_(generator=generator)
    return nn.Sequential(nn.Flatten(), body, head).double().eval()


def exact_pair_lipschitz(net: nn.Sequential) -> torch.Tensor:
    """||(w_i - w_j)^T A||: the Lipschitz constant of z_i - z_j for the linear net."""
    matrix = net[2].weight.double() @ net[1].weight.double()
    return torch.cdist(matrix, matrix)


def test_the_peer_certificate_bounds_every_pair_where_sqrt_2_does_not():
    net = disjoint_neurons_net()
    certificate = peer_certificate(net, (1, 2, 3))
    exact = exact_pair_lipschitz(net)
    assert (certificate.lipschitz >= exact).all()
    # near-tight: Gram iteration over-estimates an orthogonal body by rank^(1/2^13) (1.0002 here)
    assert torch.allclose(certificate.lipschitz, exact, rtol=1e-3)
    assert exact.max() > math.sqrt(2) * 1.2  # the case the former L_ij = sqrt 2 under-stated


def test_peer_radii_never_exceed_the_exact_distance_to_the_decision_boundary():
    net = disjoint_neurons_net(1)
    certificate = peer_certificate(net, (1, 2, 3))
    x = torch.randn(200, 1, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = net(x)
    y = logits.argmax(1)
    margins = logits.gather(1, y[:, None]) - logits
    exact = exact_pair_lipschitz(net)[y]
    exact_radius = torch.where(margins > 0, margins / exact, torch.full_like(margins, math.inf)).amin(1)
    radius = certified_radii(net, x, y, certificate)["combined"]
    assert (radius <= exact_radius).all()
    assert (radius > 0.99 * exact_radius).float().mean() > 0.99  # and loses next to nothing


def test_an_unknown_peer_layer_is_refused():
    with pytest.raises(ValueError, match="no certified bound for the peer's ReLU"):
        peer_certificate(nn.Sequential(nn.Flatten(), nn.ReLU(), nn.Linear(6, 3)).double(), (1, 2, 3))
