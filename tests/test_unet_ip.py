"""The IP-token UNet wrapper against diffusers' own IP-Adapter path, and the ip-scale invariants."""

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from nsdedge.export.ip_adapter import read_ip_adapter  # noqa: E402
from nsdedge.export.wrappers import UNetIP, install_ip_adapter  # noqa: E402


@pytest.fixture(scope="module")
def unets(tiny_weights):
    from diffusers import UNet2DConditionModel

    plain = UNet2DConditionModel.from_pretrained(tiny_weights["sd"] / "unet").eval()
    ip = read_ip_adapter(tiny_weights["ip_bin"])
    ours = copy.deepcopy(plain)
    install_ip_adapter(ours, ip)
    ref = copy.deepcopy(plain)
    ref._load_ip_adapter_weights([ip.state_dict()], low_cpu_mem_usage=False)   # diffusers' own loader
    ref.encoder_hid_proj = None
    return plain, UNetIP(ours).eval(), ref


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 32, 32, generator=g), torch.tensor([321.0]),
            torch.randn(batch, 77, 768, generator=g), torch.randn(batch, 16, 768, generator=g))


@torch.no_grad()
def test_matches_diffusers_ip_adapter_processor(unets):
    _, ours, ref = unets
    x, t, text, ip = _inputs()
    for scale in (1.0, 0.6):
        for proc in ref.attn_processors.values():
            if hasattr(proc, "scale"):
                proc.scale = [scale]
        expected = ref(x, t, encoder_hidden_states=(text, [ip])).sample
        got = ours(x, t, text, ip, torch.tensor([scale]))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_ip_scale_zero_equals_unet_without_adapter(unets):
    plain, ours, _ = unets
    x, t, text, ip = _inputs(seed=1)
    assert torch.equal(ours(x, t, text, ip, torch.tensor([0.0])), plain(x, t, text).sample)


@torch.no_grad()
def test_nonzero_scale_and_tokens_change_the_output(unets):
    _, ours, _ = unets
    x, t, text, ip = _inputs(seed=2)
    base = ours(x, t, text, ip, torch.tensor([0.0]))
    one = ours(x, t, text, ip, torch.tensor([1.0]))
    other = ours(x, t, text, ip + 1.0, torch.tensor([1.0]))
    assert (one - base).abs().max() > 1e-3
    assert (other - one).abs().max() > 1e-3
