"""The model's training loss with multi-token and prefix-token terms (``GPT.forward(...,
loss_weights=LossWeights(...))``): against a float64 computation from the model's own rescaled
logits, the prefix table as a buffer, zero weights = no weights, evaluation untouched, errors."""
import pytest
import torch
from r89_helpers import randomized89, small_r89
from test_model_gpt import batch, graph_counter, small_cfg

from speedrun.data.prefix import prefix_table
from speedrun.model import GPT, LossWeights

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def expected_loss(s: torch.Tensor, targets, weights, table=None, pw=0.0) -> float:
    """sum_i sum_k [i+k < T] w_k (lse_i - s_i[y_{i+k}]) + [table[y_i] >= 0] pw (lse_i - s_i[table[y_i]]),
    float64, loops."""
    s = s.double()
    lse = torch.logsumexp(s, 1)
    T, total = s.shape[0], 0.0
    for i in range(T):
        for k, w in enumerate(weights):
            if i + k < T:
                total += w * float(lse[i] - s[i, targets[i + k]])
        if table is not None and table[targets[i]] >= 0:
            total += pw * float(lse[i] - s[i, table[targets[i]]])
    return total


def model_and_batch(cfg, prefix_loss=True, seed=0):
    torch.manual_seed(seed)
    model = randomized89(GPT(cfg, torch.float64, flex_block_size=16, prefix_loss=prefix_loss), seed)
    ids, targets, cu = batch(vocab=cfg.vocab_size)
    # tokens 256.. are merges whose prefixes lie inside a 500-token vocabulary: the prefix term counts
    targets = torch.where(targets < 256, targets + 256, targets).clamp_max(cfg.vocab_size - 1)
    return model, ids, targets, cu


@pytest.mark.parametrize("cfg", [small_r89(), small_cfg()], ids=["record89", "record45"])
def test_training_loss_with_terms_equals_float64_sum(cfg):
    model, ids, targets, cu = model_and_batch(cfg)
    table = prefix_table(cfg.padded_vocab_size)
    assert (table[targets.numpy()] >= 0).sum() > 40          # the prefix term carries signal
    weights = LossWeights(torch.tensor([1.0, 0.5, 0.25]), torch.tensor(0.25))
    with torch.no_grad():
        s = model(ids, None, cu)       # rescaled logits (the logits path returns them in fp32)
        loss = model(ids, targets, cu, loss_weights=weights)
    want = expected_loss(s, targets, [1.0, 0.5, 0.25], table, 0.25)
    assert loss.item() == pytest.approx(want, rel=1e-6)      # fp32 s and fp32 sum (as the plain path)
    # the next-token loss is a different number: the terms are in it
    with torch.no_grad():
        plain = model(ids, targets, cu)
    assert plain.item() == pytest.approx(expected_loss(s, targets, [1.0]), rel=1e-6)
    assert loss.item() > 1.5 * plain.item()


def test_zero_weights_are_the_next_token_loss_and_gradients():
    model, ids, targets, cu = model_and_batch(small_r89())
    padded = LossWeights(torch.tensor([1.0, 0.0, 0.0]), torch.tensor(0.0))
    grads = []
    for weights in (padded, None):
        model.zero_grad(set_to_none=True)
        loss = model(ids, targets, cu, loss_weights=weights)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (a, ga), (b, gb) = grads
    assert a.item() == pytest.approx(b.item(), rel=1e-6)     # both summed in fp32
    assert len(ga) == len(gb)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


def test_prefix_table_is_a_constant_buffer_only_with_prefix_loss():
    model, *_ = model_and_batch(small_r89())
    assert torch.equal(model.prefix_table, torch.from_numpy(prefix_table(512)))
    assert "prefix_table" not in model.state_dict()            # a constant of the vocabulary: not saved
    plain, *_ = model_and_batch(small_r89(), prefix_loss=False)
    assert plain.prefix_table is None and sum(b.numel() for b in plain.buffers()) < sum(
        b.numel() for b in model.buffers())


def test_errors_and_eval_is_next_token_only():
    model, ids, targets, cu = model_and_batch(small_r89(), prefix_loss=False)
    with pytest.raises(ValueError, match="prefix_loss=True"):
        model(ids, targets, cu, loss_weights=LossWeights(torch.ones(2), torch.tensor(0.25)))
    with pytest.raises(ValueError, match="next-token only"):
        model(ids, targets, cu, reduction="mean", loss_weights=LossWeights(torch.ones(2)))
    with torch.no_grad():     # MTP weights without a prefix term need no table
        assert torch.isfinite(model(ids, targets, cu, loss_weights=LossWeights(torch.tensor([1.0, 0.5]))))


@pytest.mark.slow
def test_compiled_loss_takes_new_weights_without_recompiling():
    """The loss region compiled (fullgraph): each step's weights are tensor values, so new values
    (zeros in the padded slots, a zero prefix weight) add no graph, and the compiled loss and
    gradients equal the eager ones."""
    torch._dynamo.reset()
    counting_backend, graphs = graph_counter()
    cfg = small_r89()
    eager, ids, targets, cu = model_and_batch(cfg)
    eager = eager.float()
    compiled = GPT(cfg, flex_block_size=16, prefix_loss=True)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_regions(backend=counting_backend)
    counts = []
    for w in ([1.0, 0.5, 0.25, 0.25], [1.0, 0.5, 0.0, 0.25], [1.0, 0.0, 0.0, 0.0]):
        weights = LossWeights(torch.tensor(w[:3]), torch.tensor(w[3]))
        results = []
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)
            loss = m(ids, targets, cu, loss_weights=weights)
            loss.backward()
            results.append((loss.detach(), m.lm_head.weight.grad.clone()))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-7)
        counts.append(len(graphs))
    assert counts[0] == counts[-1] > 0, counts
    torch._dynamo.reset()
