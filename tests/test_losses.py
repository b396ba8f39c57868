import math

import pytest
import torch

from modalign.losses.contrastive import (TextQueue, clip_loss, positives, queue_loss, random_token_mask,
                                         siglip_loss)


def test_clip_loss_hand_computed():
    # modality rows m0=(1,0), m1=(0,1); text rows t0=(1,0), t1=(0.6,0.8); scale 2.
    # logits = 2 * m @ t.T = [[2, 1.2], [0, 1.6]]
    # m2t: row0 -log softmax([2,1.2])[0] = log(1+e^-0.8) = 0.371101
    #      row1 -log softmax([0,1.6])[1] = log(1+e^-1.6) = 0.183901  -> mean 0.277501
    # t2m: columns: col0 [2,0] -> log(1+e^-2) = 0.126928; col1 [1.2,1.6] -> log(1+e^-0.4) = 0.513015
    #      -> mean 0.319971
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    terms = clip_loss(m, t, torch.tensor(2.0))
    assert terms["clip_m2t"].item() == pytest.approx(0.277501, abs=1e-5)
    assert terms["clip_t2m"].item() == pytest.approx(0.319971, abs=1e-5)
    assert terms["clip"].item() == pytest.approx((0.277501 + 0.319971) / 2, abs=1e-5)


def test_clip_loss_shared_captions_are_soft_positives():
    # samples 0 and 1 are in the same caption group: target row 0 = (1/2, 1/2, 0), in both directions.
    m = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [0.9, 0.1], [0.0, 1.0]]), dim=1)
    t = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.3], [0.0, 1.0]]), dim=1)
    groups = torch.tensor([7, 7, 3])
    scale = torch.tensor(5.0)
    terms = clip_loss(m, t, scale, groups)
    for name, logits in (("clip_m2t", scale * m @ t.T), ("clip_t2m", scale * t @ m.T)):
        logp = torch.log_softmax(logits, 1)
        want = -((logp[0, 0] + logp[0, 1]) / 2 + (logp[1, 0] + logp[1, 1]) / 2 + logp[2, 2]) / 3
        assert terms[name].item() == pytest.approx(want.item(), abs=1e-6)
    # one-hot targets would push sample 0 away from caption 1 of its own group
    assert clip_loss(m, t, scale)["clip"].item() != pytest.approx(terms["clip"].item(), abs=1e-3)


def test_identical_captions_soft_targets_equal_one_hot():
    # With byte-identical captions the duplicate columns are equal, so soft targets and one-hot
    # cross-entropy agree in value (and gradient); the loss floor is log(2), not 0.
    m = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [0.9, 0.1], [0.0, 1.0]]), dim=1)
    t = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=1)
    a = clip_loss(m, t, torch.tensor(5.0), torch.tensor([7, 7, 3]))["clip"].item()
    b = clip_loss(m, t, torch.tensor(5.0))["clip"].item()
    assert a == pytest.approx(b, abs=1e-6)


def test_clip_loss_distinct_groups_equal_one_hot():
    torch.manual_seed(0)
    m = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    t = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    a = clip_loss(m, t, torch.tensor(10.0), torch.arange(6))
    b = clip_loss(m, t, torch.tensor(10.0))
    assert a["clip"].item() == pytest.approx(b["clip"].item(), abs=1e-6)


def test_siglip_loss_hand_computed():
    # logits = 1 * m @ t.T + 0 = [[1, 0], [0, 1]]; labels diag +1, off -1.
    # each diagonal term -log sigmoid(1) = 0.313262, each off-diagonal -log sigmoid(-0)... = log 2 = 0.693147
    # sum = 2*0.313262 + 2*0.693147 = 2.012818, / B=2 -> 1.006409
    m = torch.eye(2)
    t = torch.eye(2)
    got = siglip_loss(m, t, torch.tensor(1.0), torch.tensor(0.0))["siglip"].item()
    assert got == pytest.approx(1.006409, abs=1e-5)


def test_queue_masks_same_caption_and_empty_slots():
    q = TextQueue(size=4, text_dim=2)
    q.push(torch.tensor([[1.0, 0.0]]), torch.tensor([5]))  # same caption group as query 0: not a negative
    m = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[1.0, 0.0]])
    scale = torch.tensor(3.0)
    loss = queue_loss(m, t, q.text, scale, torch.tensor([5]), q.groups)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # only the positive remains
    q.push(torch.tensor([[0.0, 1.0]]), torch.tensor([9]))  # a real negative with logit 0
    loss = queue_loss(m, t, q.text, scale, torch.tensor([5]), q.groups)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-3.0)), abs=1e-6)
    assert positives(torch.tensor([1, 2]), torch.tensor([2, 2, 1])).tolist() == [[False, False, True], [True, True, False]]


def test_random_token_mask_respects_padding_and_ratio():
    mask = torch.tensor([[True] * 10, [True] * 3 + [False] * 7])
    noise = torch.rand(2, 10, generator=torch.Generator().manual_seed(0))
    hidden = random_token_mask(mask, 0.3, noise)
    assert not (hidden & ~mask).any()
    assert hidden[0].sum().item() == 3 and hidden[1].sum().item() == 1  # at least one per sample
    # the positions with the smallest noise are the ones hidden
    assert set(hidden[0].nonzero().flatten().tolist()) == set(noise[0].argsort()[:3].tolist())
    assert torch.equal(random_token_mask(mask, 0.3, noise), hidden)  # a function of the noise alone


def test_masked_token_loss_is_the_mean_over_hidden_positions_and_splits_into_rank_shares():
    from modalign.losses.contrastive import masked_token_loss

    torch.manual_seed(0)
    pred, target = torch.randn(4, 5, 7), torch.randint(0, 7, (4, 5))
    hidden = torch.rand(4, 5) < 0.5
    hidden[0, 0] = True
    want = torch.nn.functional.cross_entropy(pred[hidden], target[hidden])
    assert masked_token_loss(pred, target, hidden).item() == pytest.approx(want.item(), rel=1e-6)
    # two ranks with two samples each, divided by the global count over 2: their mean is the whole mean
    n = hidden.sum() / 2
    shares = [masked_token_loss(pred[i:i + 2], target[i:i + 2], hidden[i:i + 2], n) for i in (0, 2)]
    assert ((shares[0] + shares[1]) / 2).item() == pytest.approx(want.item(), rel=1e-6)
    cont = torch.randn(4, 5, 3)  # continuous features: MSE over hidden positions and channels
    want = torch.nn.functional.mse_loss(pred[..., :3][hidden], cont[hidden])
    assert masked_token_loss(pred[..., :3], cont, hidden).item() == pytest.approx(want.item(), rel=1e-6)
