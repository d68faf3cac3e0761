"""model.py execution modes: our fused/in-place blocks against the official form (forward and backward),
activation checkpointing against the plain pass (outputs, gradients, BatchNorm statistics, saved memory)."""
import pytest
import torch
import torch.nn.functional as F

import methods
import model as M

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPE_TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def randn(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def forward_backward(module, official_form, inputs, seed=0):
    """Outputs and the gradients of a fixed random projection of them w.r.t. the inputs and the parameters."""
    for m in module.modules():
        if hasattr(type(m), "official_form"):
            m.official_form = official_form
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    module.zero_grad(set_to_none=True)
    out = module(*inputs)
    (out * randn(out.shape, seed, out.dtype)).sum().backward()
    return [out.detach()] + [x.grad for x in inputs] + [p.grad.clone() for p in module.parameters()]


def assert_parity(module, inputs, dtype):
    module = module.to(dtype)
    inputs = [x.to(dtype) for x in inputs]
    ours, official = forward_backward(module, False, inputs), forward_backward(module, True, inputs)
    assert len(ours) == len(official)
    for a, b in zip(ours, official):
        torch.testing.assert_close(a, b, **DTYPE_TOLERANCES[dtype])


def activate(module, seed=3):
    """Non-zero values for the zero-initialised gates (Non_local output BN, NAF beta/gamma, delta), so that
    every branch reaches the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("W.1.weight") or name.split(".")[-1] in ("beta", "gamma", "delta"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


# -------------------------------------------------------------------- fused blocks vs official form


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("inter", [1, 4])
def test_non_local_associated_product_matches_the_l_by_l_form(dtype, inter):
    torch.manual_seed(0)
    block = activate(M.Non_local(8, inter)).eval()
    assert_parity(block, [randn((2, 8, 6, 4), 1)], dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("side", [None, "ATT_narrow1", "ATT_narrow2"])
def test_layer_att_fused_attention_matches_written_out_attention(dtype, side):
    torch.manual_seed(0)
    # layer-3 map 4x2 (edim 8, 2 heads of 4), 6 channel tokens; side maps at the resolutions the convs divide.
    side_size = {None: None, "ATT_narrow1": (16, 8), "ATT_narrow2": (8, 4)}[side]
    block = M.layerATT(12, 6, 8, 2, side, 5 if side else None).train()
    inputs = [randn((3, 12, 4, 2), 2)] + ([randn((3, 5) + side_size, 3)] if side else [])
    assert_parity(block, inputs, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lpa_in_place_quadrants_match_the_official_quadrant_loop(dtype, channels_last):
    torch.manual_seed(0)
    x = randn((2, 16, 8, 6), 4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert_parity(M.LPA(16), [x], dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_norm_2d_fused_matches_the_official_expression(dtype, channels_last):
    norm = M.LayerNorm2d(6)
    with torch.no_grad():
        norm.weight.copy_(randn((6,), 5))
        norm.bias.copy_(randn((6,), 6))
    x = 3 + 2 * randn((2, 6, 5, 3), 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert_parity(norm, [x], dtype)


def small_net(method="irl", dtype=torch.float64):
    torch.manual_seed(0)
    return activate(methods.get(method).build_model(5, "resnet18", 64, 32)).to(dtype)


def train_outputs_and_grads(net, xs):
    net.zero_grad(set_to_none=True)
    pool, logits = net(*xs)
    (F.cross_entropy(logits, torch.arange(len(logits)) % 5) + pool.square().mean()).backward()
    grads = {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}
    return pool.detach(), logits.detach(), grads


@pytest.mark.parametrize("method", ["irl", "agw"])
def test_whole_network_official_form_gives_the_same_outputs_and_gradients(method):
    net = small_net(method)
    xs = [randn((2, 3, 64, 32), 10 + i, torch.float64) for i in range(net.num_inputs)]
    ours = train_outputs_and_grads(net.train(), xs)
    official = train_outputs_and_grads(net.set_official_form(True), xs)
    torch.testing.assert_close(ours[:2], official[:2], rtol=1e-9, atol=1e-10)
    assert ours[2].keys() == official[2].keys()
    torch.testing.assert_close(ours[2], official[2], rtol=1e-7, atol=1e-10)
    net.eval()
    with torch.no_grad():
        for modal in (1, 2):
            torch.testing.assert_close(net.set_official_form(False)(*xs, modal=modal),
                                       net.set_official_form(True)(*xs, modal=modal), rtol=1e-9, atol=1e-10)


def test_set_official_form_reaches_every_block_with_two_forms():
    net = small_net().set_official_form(True)
    forms = [m.official_form for m in net.modules() if hasattr(type(m), "official_form")]
    kinds = {type(m) for m in net.modules() if hasattr(type(m), "official_form")}
    assert kinds == {M.Non_local, M.LPA, M.layerATT, M.LayerNorm2d} and all(forms)
    assert not any(m.official_form for m in net.set_official_form(False).modules()
                   if hasattr(type(m), "official_form"))


# ------------------------------------------------------------------------- activation checkpointing


def batchnorm_buffers(net):
    return {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("method", ["irl", "agw"])
def test_checkpointing_gives_the_plain_outputs_gradients_and_batchnorm_statistics(method):
    xs = [randn((2, 3, 64, 32), 20 + i, torch.float64) for i in range(methods.get(method).network.num_inputs)]
    plain_net, checkpointed_net = small_net(method).train(), small_net(method).train()
    checkpointed_net.set_grad_checkpointing(True)
    plain = train_outputs_and_grads(plain_net, xs)
    checkpointed = train_outputs_and_grads(checkpointed_net, xs)
    torch.testing.assert_close(plain[:2], checkpointed[:2], rtol=0, atol=0)
    assert plain[2].keys() == checkpointed[2].keys()
    torch.testing.assert_close(plain[2], checkpointed[2], rtol=1e-12, atol=1e-14)
    # The recomputation in backward leaves the running statistics as one forward left them.
    before = batchnorm_buffers(small_net(method))
    after = batchnorm_buffers(checkpointed_net)
    torch.testing.assert_close(after, batchnorm_buffers(plain_net), rtol=0, atol=0)
    assert all(after[k] == before[k] + 1 for k in after if k.endswith("num_batches_tracked"))


def saved_bytes(net, xs):
    """Bytes of the tensors autograd keeps for backward during one training forward."""
    total = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        net(*xs)
    return sum(total)


def test_checkpointing_keeps_a_fraction_of_the_activations():
    net = small_net(dtype=torch.float32).train()
    xs = [randn((2, 3, 64, 32), 30 + i) for i in range(net.num_inputs)]
    plain = saved_bytes(net, xs)
    checkpointed = saved_bytes(net.set_grad_checkpointing(True), xs)
    assert checkpointed < 0.35 * plain, (checkpointed, plain)


def test_checkpointing_is_inactive_without_gradients_and_in_eval():
    net = small_net(dtype=torch.float32).set_grad_checkpointing(True)
    xs = [randn((2, 3, 64, 32), 40 + i) for i in range(net.num_inputs)]
    reference = small_net(dtype=torch.float32)
    with torch.no_grad():
        for modal in (1, 2):
            torch.testing.assert_close(net.eval()(*xs, modal=modal), reference.eval()(*xs, modal=modal),
                                       rtol=0, atol=0)
        torch.testing.assert_close(net.train()(*xs), reference.train()(*xs), rtol=0, atol=0)
    assert not net.set_grad_checkpointing(False).grad_checkpoint
