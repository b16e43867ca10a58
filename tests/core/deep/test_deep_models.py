"""Deep pose networks: fast Wigner matrices, the so3grid head's output and its exact equivariance (the test of
CryoSphere, Chheda & Nori 2024), the symmetry-aware losses."""

import numpy as np
import pytest
import torch
from e3nn import o3

from bayespose.core.deep.data import inplane_rotation_matrix, symmetry_quaternions
from bayespose.core.deep.models import (
    GridReadout,
    QuaternionNet,
    SO3Activation,
    SO3GridNet,
    beta_quadrature_weights,
    compact_alpha_samples,
    flat_wigner_of,
    relion_to_e3nn,
    wigner_D_fast,
)
from bayespose.core.deep.train import TrainConfig, _Task
from bayespose.core.geometry.grids import healpix_grid
from bayespose.core.geometry.rotations import random_rotations
from bayespose.core.geometry.symmetry import symmetry_group


def test_fast_wigner_equals_e3nn():
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.rand(50, generator=gen, dtype=torch.float64) * 6.2 for _ in range(3))
    for l in range(7):
        np.testing.assert_allclose(wigner_D_fast(l, a, b, c).numpy(), o3.wigner_D(l, a, b, c).numpy(), atol=1e-5)
    # a representation: D(g1 g2) = D(g1) D(g2) for the e3nn matrices of RELION poses
    r = random_rotations(2, rng=1)
    d = [flat_wigner_of(relion_to_e3nn(x), 3) for x in (r[0], r[1], r[0] @ r[1])]
    blocks = [slice(l * (4 * l * l - 1) // 3, (l + 1) * (4 * (l + 1) ** 2 - 1) // 3) for l in range(4)]
    for l, sl in enumerate(blocks):
        n = 2 * l + 1
        m = [x[sl].reshape(n, n).double() / n ** 0.5 for x in d]
        np.testing.assert_allclose((m[0] @ m[1]).numpy(), m[2].numpy(), atol=1e-5)


@pytest.fixture(scope="module", params=[0, 12], ids=["e3nn_activation_grid", "compact_activation_grid"])
def small_net(request):
    torch.manual_seed(0)
    return SO3GridNet(32, grid_order=1, lmax=4, channels=16, s2_channels=8, so3_channels=4,
                      activation_alpha=request.param).eval()


def test_so3grid_output_is_a_distribution_on_the_grid(small_net):
    x = torch.randn(3, 32, 32)
    with torch.no_grad():
        logits = small_net(x)
        assert logits.shape == (3, len(healpix_grid(1)))
        p = torch.softmax(logits.double(), 1)
        np.testing.assert_allclose(p.sum(1).numpy(), 1.0, atol=1e-12)
        assert (p > 0).all()
        # the same band-limited function evaluated at the grid rotations directly
        at = small_net.logits_at(x, healpix_grid(1).rotations)
        np.testing.assert_allclose(at.numpy(), logits.numpy(), atol=1e-3 * float(logits.abs().max()))


@pytest.mark.parametrize("order, lmax, factorised", [(0, 4, False), (1, 4, True), (1, 6, False), (3, 4, True)])
def test_grid_readout_equals_the_dense_wigner_matrix(order, lmax, factorised):
    """The Fourier-over-psi read-out gives the values ``flat_wigner(g_k) · G`` at every grid rotation (the dense
    matrix where the grid has too few psi angles for lmax: n_psi = 6 at order 0, 12 at order 1)."""
    readout = GridReadout(order, lmax)
    assert hasattr(readout, "readout") == factorised
    dense = flat_wigner_of(relion_to_e3nn(healpix_grid(order).rotations), lmax)
    h = torch.randn(5, dense.shape[1], generator=torch.Generator().manual_seed(order))
    expected = h @ dense.T
    np.testing.assert_allclose(readout(h).numpy(), expected.numpy(), atol=2e-5 * float(expected.abs().max()))


def _head(net, fmap, activation):
    x = net.s2conv(net.projector(fmap))
    if activation:
        x = net.activation(x)
    return net.so3conv(x)[:, 0]


def test_so3grid_head_is_equivariant_to_quarter_turns(small_net):
    """Turning the feature map by a quarter turn (torch.rot90: image content turned by -90°, pose Rz(-90°) A)
    moves the head's log-density exactly: logits'(Rz(-90°) A) = logits(A). The SO(3) activation (ReLU on a
    discrete SO(3) grid) is only approximately equivariant."""
    fmap = torch.randn(2, 16, 8, 8)
    turned = torch.rot90(fmap, 1, dims=(-2, -1))
    rots = random_rotations(300, rng=3)
    w = flat_wigner_of(relion_to_e3nn(rots), 4)
    w_turned = flat_wigner_of(relion_to_e3nn(inplane_rotation_matrix(-90.0) @ rots), 4)
    w_wrong = flat_wigner_of(relion_to_e3nn(inplane_rotation_matrix(90.0) @ rots), 4)
    with torch.no_grad():
        for activation, tol in ((False, 1e-4), (True, 0.08)):
            h0, h1 = _head(small_net, fmap, activation), _head(small_net, turned, activation)
            ref = h0 @ w.T
            scale = float(ref.std())
            err = float((h1 @ w_turned.T - ref).abs().max()) / scale
            wrong = float((h1 @ w_wrong.T - ref).abs().max()) / scale
            assert err < tol, (activation, err)
            assert wrong > 0.5


def test_losses_invariant_to_symmetry_mates():
    """Replacing the target by a symmetry mate A @ L_g leaves both losses unchanged; without the symmetry the
    loss changes."""
    rots = random_rotations(6, rng=5)
    group = symmetry_group("D3")
    torch.manual_seed(1)
    q_pred = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    logits = torch.randn(6, len(healpix_grid(1)))
    for model, output in (("quaternion", q_pred), ("so3grid", logits)):
        task = _Task(TrainConfig(model=model, grid_order=1, symmetry="D3"))
        base = float(task.loss(output, task.targets(rots)))
        for g in group[1:]:
            assert float(task.loss(output, task.targets(rots @ g))) == pytest.approx(base, rel=1e-6)
        naive = _Task(TrainConfig(model=model, grid_order=1, symmetry="C1"))
        assert float(naive.loss(output, naive.targets(rots @ group[1]))) != pytest.approx(
            float(naive.loss(output, naive.targets(rots))), rel=1e-3)
    # the quaternion loss is 0 at any mate of the truth, and 1 - cos²(θ/2) for a θ rotation away
    q_true = symmetry_quaternions(rots, "D3")[:, 2]
    task = _Task(TrainConfig(model="quaternion", symmetry="D3"))
    assert float(task.loss(q_true, task.targets(rots))) == pytest.approx(0.0, abs=1e-6)


def test_quaternion_net_outputs_unit_quaternions():
    net = QuaternionNet(32, channels=16).eval()
    with torch.no_grad():
        q = net(torch.randn(4, 32, 32))
    np.testing.assert_allclose(q.norm(dim=1).numpy(), 1.0, atol=1e-6)


@pytest.mark.parametrize("res_beta", [2, 4, 6, 10, 14])
def test_beta_quadrature_integrates_polynomials_exactly(res_beta):
    """sum_j w_j cos(beta_j)^m = ∫ cos(β)^m sin(β)/2 dβ over [0, π] (1/(m+1) for even m, 0 for odd m) for every
    m < res_beta, and not for m = res_beta (the rule is exact to that degree, no further)."""
    w = beta_quadrature_weights(res_beta)
    beta = np.pi * (np.arange(res_beta) + 0.5) / res_beta
    for m in range(res_beta):
        exact = 1.0 / (m + 1) if m % 2 == 0 else 0.0
        assert float(w @ np.cos(beta) ** m) == pytest.approx(exact, abs=1e-13), m
    assert abs(float(w @ np.cos(beta) ** res_beta) - 1.0 / (res_beta + 1)) > 1e-9
    with pytest.raises(ValueError, match="even"):
        beta_quadrature_weights(5)


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("lmax", [1, 3, 6])
def test_so3_activation_quadrature_makes_wigner_matrices_orthonormal(lmax, compact):
    """On the activation's grid (e3nn's, or the compact one with compact_alpha_samples(lmax) > 2 lmax samples of
    alpha and gamma), the weighted sums of products of the Wigner matrices sqrt(2l+1) D^l_mn are their Haar
    integrals (Schur orthogonality): the identity. So the activation with the identity function returns its input
    coefficients (up to e3nn's normalize2mom constant, 1 for the identity)."""
    act = SO3Activation(lmax, lambda x: x, lmax + 1, alpha_samples=compact_alpha_samples(lmax) if compact else 0)
    assert act.D.shape[0] == (compact_alpha_samples(lmax) if compact else 4 * (lmax + 1)) ** 2 * 2 * (lmax + 1)
    gram = (act.D.double() * act.qw.double()[:, None]).T @ act.D.double()
    np.testing.assert_allclose(gram.numpy(), np.eye(act.D.shape[1]), atol=2e-6)
    x = torch.randn(3, act.D.shape[1])
    np.testing.assert_allclose(act(x).numpy(), x.numpy(), atol=1e-3, rtol=1e-3)
