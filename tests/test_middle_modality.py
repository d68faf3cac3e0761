"""The middle-modality family's shared parts (middle_modality.py): the generators' registration and gray maps,
and the routing of a batch's rows into original and middle-modality parts."""
import torch
import torch.nn.functional as F
from torch import nn

import middle_modality as mm


def test_split_and_join_route_the_four_blocks_as_the_official_code():
    x = torch.arange(8.)[:, None]                              # rows VIS 0-1, M-VIS 2-3, IR 4-5, M-IR 6-7
    original, middle = mm.split_original_middle(x, training_rows=True)
    assert original.flatten().tolist() == [0, 1, 4, 5] and middle.flatten().tolist() == [2, 3, 6, 7]
    assert torch.equal(mm.join_original_middle(original, middle, training_rows=True), x)
    original, middle = mm.split_original_middle(x, training_rows=False)      # test rows: original half, middle half
    assert original.flatten().tolist() == [0, 1, 2, 3] and middle.flatten().tolist() == [4, 5, 6, 7]
    assert torch.equal(mm.join_original_middle(original, middle, training_rows=False), x)


def test_the_generators_are_registered_in_the_official_order_with_the_official_initial_values():
    net = nn.Module()
    mm.add_gray_generators(net)
    assert list(net.state_dict()) == [
        f"{part}{modal}.{key}" for modal in (1, 2) for part, keys in (
            ("encode", ("weight", "bias")), ("fc", ("weight", "bias")),
            ("bn", ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))) for key in keys]
    for modal in (1, 2):
        encode, fc = getattr(net, f"encode{modal}"), getattr(net, f"fc{modal}")
        assert encode.weight.shape == (1, 3, 1, 1) and fc.weight.shape == (1, 1, 1, 1)
        for conv in (encode, fc):
            assert torch.equal(conv.weight, torch.full_like(conv.weight, 0.333)) and not conv.bias.any()


def test_gray_map_runs_the_generator_of_the_modality_asked_for():
    net = nn.Module()
    mm.add_gray_generators(net)
    torch.manual_seed(0)
    for p in net.parameters():          # distinct generators, so that using the other one shows
        nn.init.normal_(p)
    images = torch.randn(3, 3, 4, 2, dtype=torch.float64)
    net.double().eval()
    for modal in (1, 2):
        encode, fc, bn = (getattr(net, f"{part}{modal}") for part in ("encode", "fc", "bn"))
        # Written out: 1x1 convolutions as per-pixel weighted sums, eval BN from its running statistics.
        encoded = F.relu(torch.einsum("oc,nchw->nohw", encode.weight[:, :, 0, 0], images)
                         + encode.bias[None, :, None, None])
        mapped = F.relu(fc.weight[0, 0, 0, 0] * encoded + fc.bias[0])
        expected = (mapped - bn.running_mean[0]) / torch.sqrt(bn.running_var[0] + bn.eps) * bn.weight[0] + bn.bias[0]
        torch.testing.assert_close(mm.gray_map(net, images, modal), expected)
        assert mm.gray_map(net, images, modal).shape == (3, 1, 4, 2)
    assert not torch.allclose(mm.gray_map(net, images, 1), mm.gray_map(net, images, 2))
