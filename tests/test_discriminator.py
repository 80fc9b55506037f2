import pytest
import torch

import mmdit
from discriminator import (Discriminator, DiscriminatorHead, approx_r1, hinge_heads_loss,
                           hinge_student_loss, parse_blocks)

D, DP, HIDDEN = 16, 6, 16  # small feature width, pooled width and head width for fast tests


ONE_THREAD = True  # see conftest.py


def randomize(module, seed=0, std=0.2):
    """Overwrite every parameter (including the zero-initialised output layers) with noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g))
    return module


def inputs(B=3, h=8, w=8, blocks=1, seed=0, dim=D):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(B, dim, h, w, generator=g) for _ in range(blocks)]
    return feats, torch.rand(B, generator=g), torch.randn(B, DP, generator=g)


# ----------------------------------------------------------------------------------------------
# heads


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("h,w", [(8, 8), (12, 6), (6, 12), (1, 1)])
def test_head_any_grid_and_batch(B, h, w):
    head = randomize(DiscriminatorHead(D, DP, HIDDEN))
    (x,), t_hat, pooled = inputs(B, h, w)
    logits = head(x, t_hat, pooled)
    assert logits.shape == (B,) and torch.isfinite(logits).all()


def test_head_starts_at_zero_logits():
    head = DiscriminatorHead(D, DP, HIDDEN)
    (x,), t_hat, pooled = inputs()
    logits = head(x, t_hat, pooled)
    assert torch.equal(logits, torch.zeros(3))
    assert hinge_heads_loss([logits], [logits]).item() == 2.0  # 1 per term
    assert hinge_student_loss([logits]).item() == 0.0


def test_head_conditioned_on_t_hat_and_pooled():
    head = randomize(DiscriminatorHead(D, DP, HIDDEN))
    (x,), t_hat, pooled = inputs()
    base = head(x, t_hat, pooled)
    assert not torch.allclose(base, head(x, (t_hat + 0.3) % 1, pooled), atol=1e-4)
    assert not torch.allclose(base, head(x, t_hat, torch.randn_like(pooled)), atol=1e-4)


def test_gradients_reach_every_head_parameter_and_the_features():
    disc = randomize(Discriminator(D, DP, [0, 2], HIDDEN))
    feats, t_hat, pooled = inputs(blocks=2, h=6, w=10)
    feats = [f.requires_grad_() for f in feats]
    hinge_student_loss(disc(feats, t_hat, pooled)).backward()
    for name, p in disc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for f in feats:
        assert f.grad is not None and f.grad.abs().sum() > 0


def test_head_width_must_suit_groupnorm():
    with pytest.raises(ValueError, match="hidden=12"):
        DiscriminatorHead(D, DP, hidden=12)


# ----------------------------------------------------------------------------------------------
# the multi-head discriminator


def test_discriminator_one_logit_list_per_block():
    disc = Discriminator(D, DP, [3, 1], HIDDEN)
    assert disc.blocks == [1, 3] and list(disc.heads) == ["1", "3"]
    feats, t_hat, pooled = inputs(blocks=2, h=4, w=8)
    logits = disc(feats, t_hat, pooled)
    assert len(logits) == 2 and all(l.shape == (3,) for l in logits)
    assert Discriminator(**disc.config).config == disc.config


def test_discriminator_rejects_bad_inputs():
    disc = Discriminator(D, DP, [0, 1], HIDDEN)
    feats, t_hat, pooled = inputs(blocks=2)
    with pytest.raises(ValueError, match="got 1 feature maps for 2 heads"):
        disc(feats[:1], t_hat, pooled)
    with pytest.raises(ValueError, match="block 1.*16"):
        disc([feats[0], feats[1][:, :8]], t_hat, pooled)
    with pytest.raises(ValueError, match="t_hat"):
        disc(feats, t_hat[:2], pooled)
    with pytest.raises(ValueError, match="pooled"):
        disc(feats, t_hat, pooled[:, :3])
    with pytest.raises(ValueError, match="distinct"):
        Discriminator(D, DP, [1, 1], HIDDEN)


def test_for_teacher_blocks():
    cfg = mmdit.CONFIGS["test"]
    assert Discriminator.for_teacher(cfg, hidden=8).blocks == [0, 1, 2]
    assert Discriminator.for_teacher(cfg, "last2", hidden=8).blocks == [1, 2]
    assert Discriminator.for_teacher(cfg, [2, 0], hidden=8).blocks == [0, 2]
    with pytest.raises(ValueError, match="outside"):
        Discriminator.for_teacher(cfg, [3], hidden=8)


def test_heads_are_a_few_percent_of_the_shapes_teacher():
    cfg = mmdit.CONFIGS["shapes"]
    with torch.device("meta"):
        teacher, disc = mmdit.MMDiT(cfg), Discriminator.for_teacher(cfg)
    n_teacher, n_disc = mmdit.count_params(teacher), mmdit.count_params(disc)
    assert len(disc.heads) == cfg.depth
    assert 0.01 * n_teacher < n_disc < 0.10 * n_teacher, (n_disc, n_teacher)


@pytest.mark.parametrize("spec,expected", [
    ("all", [0, 1, 2, 3]), ("0,2,3", [0, 2, 3]), (" 3, 1 ", [1, 3]), ("last2", [2, 3]),
    ("LAST1", [3]), ("last4", [0, 1, 2, 3]), ("2", [2]),
])
def test_parse_blocks(spec, expected):
    assert parse_blocks(spec, 4) == expected


@pytest.mark.parametrize("spec,match", [
    ("4", "outside"), ("-1", "outside"), ("0,5", "outside"), ("last0", "lastN"),
    ("last5", "lastN"), ("lastx", "lastN"), ("", "cannot parse"), ("0,,1", "cannot parse"),
    ("first2", "cannot parse"), ("1.5", "cannot parse"), ("1,1", "twice"),
])
def test_parse_blocks_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_blocks(spec, 4)


# ----------------------------------------------------------------------------------------------
# losses


def test_hinge_losses_by_hand():
    real = [torch.tensor([2.0, 0.5, -1.0]), torch.tensor([0.0])]
    fake = [torch.tensor([-2.0, 0.0, 1.0]), torch.tensor([-0.5])]
    # head 0: real relu(1 - r) = [0, .5, 2] -> 5/6; fake relu(1 + f) = [0, 1, 2] -> 1
    # head 1: real 1; fake .5
    assert hinge_heads_loss(real, fake).item() == pytest.approx(5 / 6 + 1 + 1 + 0.5)
    # G: -(mean(fake_0) + mean(fake_1)) = -((-2 + 0 + 1) / 3 + (-0.5)) = 1/3 + 1/2
    assert hinge_student_loss(fake).item() == pytest.approx(5 / 6)
    assert hinge_student_loss(real).item() == pytest.approx(-0.5)  # -((2 + .5 - 1) / 3 + 0)
    saturated = hinge_heads_loss([torch.tensor([1.0, 3.0])], [torch.tensor([-1.0, -7.0])])
    assert saturated.item() == 0.0
    with pytest.raises(ValueError, match="same non-zero number"):
        hinge_heads_loss(real, fake[:1])
    with pytest.raises(ValueError):
        hinge_student_loss([])


def test_discriminator_learns_to_separate_two_distributions():
    torch.manual_seed(0)
    disc = Discriminator(D, DP, [0, 1], HIDDEN)
    opt = torch.optim.Adam(disc.parameters(), lr=3e-3, betas=(0.0, 0.99))
    g = torch.Generator().manual_seed(1)

    def batch(mean):
        return [mean + torch.randn(8, D, 6, 6, generator=g) for _ in range(2)]

    t_hat, pooled = torch.rand(8, generator=g), torch.randn(8, DP, generator=g)
    losses = []
    for _ in range(30):
        loss = hinge_heads_loss(disc(batch(1.0), t_hat, pooled), disc(batch(-1.0), t_hat, pooled))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(4.0)  # 2 heads starting at logit 0
    assert losses[-1] < 0.2 * losses[0]
    with torch.no_grad():
        real, fake = disc(batch(1.0), t_hat, pooled), disc(batch(-1.0), t_hat, pooled)
    for r, f in zip(real, fake):
        assert r.min() > f.max()


def test_approx_r1():
    feats, t_hat, pooled = inputs(blocks=2)
    constant = Discriminator(D, DP, [0, 1], HIDDEN)  # zero-init: logits 0 whatever the input
    assert approx_r1(constant, feats, t_hat, pooled).item() == pytest.approx(0.0, abs=1e-8)
    disc = randomize(Discriminator(D, DP, [0, 1], HIDDEN))
    g = torch.Generator().manual_seed(0)
    r1 = approx_r1(disc, feats, t_hat, pooled, generator=g)
    assert r1.item() > 1e-4
    again = approx_r1(disc, feats, t_hat, pooled, generator=torch.Generator().manual_seed(0))
    assert torch.equal(r1, again)  # the generator makes it reproducible
    r1.backward()  # usable as a penalty: gradients reach the heads
    assert all(p.grad is not None for p in disc.parameters())
    with pytest.raises(ValueError, match="sigma"):
        approx_r1(disc, feats, t_hat, pooled, sigma=0.0)


def test_approx_r1_matches_the_true_gradient_norm():
    """For small sigma the estimate's expectation is |grad_F D(F)|^2 (averaged over the batch)."""
    disc = randomize(Discriminator(D, DP, [0], HIDDEN), std=0.1).double()
    (x,), t_hat, pooled = inputs(B=2, h=4, w=4)
    x, t_hat, pooled = x.double().requires_grad_(), t_hat.double(), pooled.double()
    (grad,) = torch.autograd.grad(disc([x], t_hat, pooled)[0].sum(), x)
    exact = grad.pow(2).sum(dim=(1, 2, 3)).mean()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        est = torch.stack([approx_r1(disc, [x], t_hat, pooled, sigma=1e-3, generator=g)
                           for _ in range(200)]).mean()
    assert est.item() == pytest.approx(exact.item(), rel=0.2)


# ----------------------------------------------------------------------------------------------
# the generator's path goes student -> frozen teacher features -> heads -> G loss; the whole of
# it is tested on train_ladd.student_step itself (tests/test_train_ladd.py); here the teacher's
# part: every feature map the heads read carries gradient to the input, none to the weights


def test_frozen_teacher_features_pass_gradient_to_the_input_only():
    cfg = mmdit.CONFIGS["test"]
    torch.manual_seed(0)
    teacher = mmdit.MMDiT(cfg)
    randomize(teacher, std=0.05)  # random weights: no block is the identity of a fresh init
    teacher.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, 8, 16, generator=g, requires_grad=True)  # 4x8 tokens
    t_hat = torch.rand(2, generator=g)
    context = torch.randn(2, 5, cfg.context_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_dim, generator=g)
    grads = {}
    for checkpointing in (False, True):  # train_ladd checkpoints the teacher's blocks on CUDA
        teacher.gradient_checkpointing = checkpointing
        feats = teacher.features(x, t_hat, context, pooled, blocks=[2, 0, 1])
        assert [f.shape for f in feats] == [(2, cfg.hidden_size, 4, 8)] * cfg.depth
        grads[checkpointing] = [torch.autograd.grad(f.square().mean(), x, retain_graph=True)[0]
                                for f in feats]  # each map on its own, the last block's included
        sum(f.square().mean() for f in feats).backward()
        assert all(p.grad is None for p in teacher.parameters())
    for k, (plain, checkpointed) in enumerate(zip(grads[False], grads[True])):
        assert plain.abs().sum() > 0 and torch.allclose(plain, checkpointed, atol=1e-6), k
    assert x.grad.abs().sum() > 0
