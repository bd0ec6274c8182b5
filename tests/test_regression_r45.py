"""Record 45 does not move: the training losses and eval logits of a small record-45-shaped model
(tests/r45_regression.py) are bitwise those captured before the record-89 switches were added."""
import r45_regression
import torch


def test_record45_losses_and_logits_bitwise_unchanged():
    expected = torch.load(r45_regression.FIXTURE, weights_only=True)
    got = r45_regression.compute()
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        assert torch.equal(got[name], expected[name]), (
            f"{name} changed: {got[name].flatten()[:6].tolist()} vs {expected[name].flatten()[:6].tolist()}")
