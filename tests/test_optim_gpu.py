"""Optimizers on CUDA (skipped without a GPU): Triton and torch NorMuon agree at the record's shapes;
CUDA results match the CPU run of the same step."""
import pytest
import torch
from optim_helpers import labelled

from speedrun.optim.adam import DistAdam
from speedrun.optim.muon import NorMuon

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)   # every test sees the same random inputs


def _record_muon_params(device):
    torch.manual_seed(0)
    shapes = [((768, 3072), "attn")] * 2 + [((768, 3072), "mlp_fc")] * 2 + [((768, 3072), "mlp_proj")] * 2 \
        + [((6, 12), "attn_gate")] * 2 + [((1, 12), "smear_gate")]
    params = []
    for shape, label in shapes:
        p = torch.nn.Parameter((torch.randn(shape) * 0.02).to(device))
        p.label = label
        params.append(p)
    return params


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_normuon_cuda_matches_cpu(kernel):
    cpu, gpu = _record_muon_params("cpu"), _record_muon_params("cuda")
    start = [p.detach().clone() for p in cpu]
    opts = [NorMuon(cpu, kernel="torch"), NorMuon(gpu, kernel=kernel)]
    for step in range(3):
        for p, q in zip(cpu, gpu):
            g = torch.randn(p.shape)
            p.grad, q.grad = g, g.cuda()
        for o in opts:
            o.step(lr_mult=0.9, momentum=0.9)
    for p0, p, q in zip(start, cpu, gpu):
        # bf16 Polar Express on different hardware/kernels: the updates agree to ~10% (Frobenius)
        moved_cpu, moved_gpu = p.detach() - p0, q.detach().cpu() - p0
        err = (moved_gpu - moved_cpu).norm() / moved_cpu.norm()
        assert err < 0.1, (p.label, err.item())


def test_distadam_cuda_matches_cpu():
    torch.manual_seed(0)
    p = labelled((1024, 64), "embed", torch.bfloat16, scale=1.0)
    q = torch.nn.Parameter(p.detach().cuda())
    oa, ob = DistAdam([p], lr=0.6), DistAdam([q], lr=0.6)
    for _ in range(3):
        g = torch.randn(1024, 64).bfloat16()
        p.grad, q.grad = g, g.cuda()
        oa.step()
        ob.step()
    torch.testing.assert_close(q.detach().cpu().float(), p.detach().float(), atol=2e-2, rtol=1e-2)


def _record89_muon_params(device):
    """Record shapes with the record-89 NorMuon switches: bf16 block matrices, 6 heads."""
    torch.manual_seed(0)
    shapes = [((768, 3072), "attn")] * 2 + [((768, 3072), "mlp_fc")] * 2 + [((768, 3072), "mlp_proj")] * 2
    params = []
    for shape, label in shapes:
        p = torch.nn.Parameter((torch.randn(shape) * 0.02).to(device).bfloat16())
        p.label = label
        p.num_heads = 6
        params.append(p)
    return params


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_normuon_record89_switches_cuda_matches_cpu(kernel):
    """Q/K per head pair (256 x 768 blocks through the batched kernels), matrix axis, bf16 weights
    with mantissa: the CUDA step agrees with the CPU twin like the record-45 step does, and the
    CUDA mantissa and bf16 bits are exact halves of the CUDA fp32 masters."""
    from speedrun.optim.muon import join_master
    kw = dict(lr=0.023, beta2=0.9, axis="matrix", qk_head_pairs=True, bf16_weights=True)
    cpu, gpu = _record89_muon_params("cpu"), _record89_muon_params("cuda")
    start = [p.detach().float().clone() for p in cpu]
    opts = [NorMuon(cpu, kernel="torch", **kw), NorMuon(gpu, kernel=kernel, **kw)]
    for step in range(3):
        for p, q in zip(cpu, gpu):
            g = torch.randn(p.shape).bfloat16()
            p.grad, q.grad = g, g.cuda()
        for o in opts:
            o.step(lr_mult=0.9, momentum=0.9)

    def masters(opt):
        return {id(p): join_master(p.detach(), b.mantissa[i]) for b in opt.buckets for i, p in enumerate(b.params)}
    mc, mg = masters(opts[0]), masters(opts[1])
    for p0, p, q in zip(start, cpu, gpu):
        moved_cpu, moved_gpu = mc[id(p)] - p0, mg[id(q)].cpu() - p0
        err = (moved_gpu - moved_cpu).norm() / moved_cpu.norm()
        assert err < 0.1, (p.label, err.item())
        bits = mg[id(q)].view(torch.int32)
        assert torch.equal(q.detach().view(torch.int16), (bits >> 16).to(torch.int16))


def test_mantissa_split_join_cuda_equals_cpu():
    from speedrun.optim.muon import join_master, split_master_
    master = torch.randn(4096) * 10.0 ** torch.randint(-6, 6, (4096,)).float()
    outs = []
    for device in ("cpu", "cuda"):
        m = master.to(device)
        p = torch.empty(m.shape, dtype=torch.bfloat16, device=device)
        mant = torch.empty(m.shape, dtype=torch.uint16, device=device)
        split_master_(m, p, mant)
        assert torch.equal(join_master(p, mant).view(torch.int32), m.view(torch.int32))
        outs.append((p.cpu().view(torch.int16), mant.cpu().to(torch.int32)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
