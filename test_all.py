"""Tests for the series: `pytest test_all.py`.

Offline and small: the tests write their own tiny MNIST in torchvision's raw format, a small
folder of images and a tiny CLIP text model, and run each script end to end in --tiny mode.
They also check the math on the functions themselves.
"""

import importlib
import inspect
import json
import os
import signal
import struct
import time
import subprocess
import sys
from contextlib import nullcontext
from unittest import mock
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never download: a test that tried would fail, not hang

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (BertConfig, BertModel, BertTokenizer, CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel,
                          CLIPTokenizer, CLIPVisionConfig, CLIPVisionModel)

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
MNIST_SCRIPTS = ["01_flow_mnist", "02_dit_mnist", "03_class_cfg"]
UNCONDITIONAL = ["01_flow_mnist", "02_dit_mnist"]
TEXT_SCRIPTS = ["04_text_clip_cifar", "05_latent_vae"]
SCRIPTS = MNIST_SCRIPTS + TEXT_SCRIPTS


def load(name):
    return importlib.import_module(name)


def make_mnist(root):
    """A fake MNIST (random strokes) in torchvision's raw idx format: the real loader runs."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 16)):
        images = np.zeros((n, 28, 28), np.uint8)
        for img in images:
            r, c = rng.integers(4, 20, size=2)
            img[r:r + 8, c:c + 3] = 255
        labels = rng.integers(0, 10, n).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    return root


def make_image_folder(root, classes=("cat", "ship", "airplane")):
    """A few images per class in class sub-folders, in odd sizes that the loader must resize."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, (30 + 4 * k, 36, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def make_tiny_clip(root, positions=77, width=32, whole=False):
    """A tiny random CLIP text model and a letter-level CLIP tokenizer, saved with save_pretrained as a real one
    would be: CLIPTextEncoder loads it from the folder. whole: a CLIP with an image tower too, as on the hub."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in LETTERS:
        vocab[letter], vocab[letter + "</w>"] = len(vocab), len(vocab) + 1
    root.mkdir(parents=True)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")  # no merges: one token per letter
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=77)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=positions, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16)
    model = CLIPModel(CLIPConfig(text_config=config.to_dict(), vision_config=vision.to_dict())) if whole else (
        CLIPTextModel(config))
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def make_tiny_bert(root):
    """A tiny random BERT, to check that a non-CLIP encoder works through AutoModel."""
    vocab_file = root / "vocab.txt"
    root.mkdir()
    vocab_file.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *LETTERS]))
    BertTokenizer(str(vocab_file)).save_pretrained(root)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=31, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=48)).save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"mnist": make_mnist(root), "images": make_image_folder(root / "images"),
            "clip": make_tiny_clip(root / "clip"), "bert": make_tiny_bert(root / "bert")}


def run(name, out_dir, data, *flags, pictures=True):
    """A --tiny run; pictures=False skips the pictures at the end, for tests of training and checkpoints only."""
    if name in TEXT_SCRIPTS:
        inputs = ["--data_dir", str(data["images"]), "--text_encoder", str(data["clip"])]
    else:
        inputs = ["--data_dir", str(data["mnist"])]
    with mock.patch.object(load(name), "write_outputs", lambda *args: []) if not pictures else nullcontext():
        load(name).main(["--tiny", *inputs, "--out_dir", str(out_dir), *flags])


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------- the math

@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("num_steps", [1, 3, 10])
def test_euler_follows_a_straight_flow_exactly(name, num_steps):
    """For one data point x0 the true velocity is v = (x_t - x0) / t = x1 - x0, constant along
    the path, so Euler from x1 at t=1 must land on x0 and pass through x_t = (1-t) x0 + t x1."""
    m = load(name)
    x0, x1 = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
    states = m.integrate(lambda x, t: (x - x0) / t[:, None, None, None], x1, num_steps, "euler")
    assert len(states) == num_steps + 1
    assert torch.allclose(states[0], x1)
    assert torch.allclose(states[-1], x0, atol=1e-5)
    t = 1 - 1 / num_steps
    assert torch.allclose(states[1], (1 - t) * x0 + t * x1, atol=1e-5)


@pytest.mark.parametrize("name", SCRIPTS)
def test_euler_moves_against_the_velocity(name):
    """x <- x - dt * v from t=1 to 0: a constant velocity c moves the noise by -c in total."""
    m = load(name)
    noise, c = torch.randn(2, 1, 28, 28), torch.randn(2, 1, 28, 28)
    assert torch.allclose(m.integrate(lambda x, t: c, noise, 7, "euler")[-1], noise - c, atol=1e-5)


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("num_steps", [1, 3])
def test_heun_follows_a_straight_flow_exactly_too(name, num_steps):
    m = load(name)
    x0, x1 = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
    t_ = lambda t: t[:, None, None, None]  # noqa: E731
    # the velocity is x1 - x0 on the straight path (1), and pulls back towards the path off it
    velocity = lambda x, t: (x1 - x0) + (x - (1 - t_(t)) * x0 - t_(t) * x1)  # noqa: E731
    states = m.integrate(velocity, x1, num_steps, "heun")
    assert len(states) == num_steps + 1 and torch.allclose(states[-1], x0, atol=1e-5)
    assert len(m.integrate(lambda x, t: x, x1, num_steps, "heun", trajectory=False)) == 1  # only the sample kept


def test_heun_is_second_order_and_euler_first_order_on_a_curved_flow():
    """dx/dt = x from t = 1 to 0 has the exact solution x(0) = x(1) / e. Doubling the steps
    halves Euler's error and quarters Heun's; and Heun counts two evaluations a step."""
    m = load("01_flow_mnist")
    x1 = torch.ones(1, dtype=torch.float64)
    errors = {name: [(m.integrate(lambda x, t: x, x1, n, name)[-1] - x1 / np.e).abs().item() for n in (8, 16, 32)]
              for name in m.NFE}
    for name, order in (("euler", 1), ("heun", 2)):
        ratios = [a / b for a, b in zip(errors[name], errors[name][1:])]
        assert all(abs(r - 2 ** order) < 0.15 * 2 ** order for r in ratios), (name, ratios)
    assert errors["heun"][0] < errors["euler"][-1]  # Heun at 16 evaluations beats Euler at 32
    calls = []
    m.integrate(lambda x, t: calls.append(t[0].item()) or x, x1, 5, "heun")
    assert len(calls) == m.NFE["heun"](5) == 9 and m.NFE["euler"](5) == 5
    assert 0.0 not in calls  # the last step stays Euler: v at t = 0 is never asked for


@pytest.mark.parametrize("name", UNCONDITIONAL)
@pytest.mark.parametrize("time_sampling", ["uniform", "logit_normal"])
def test_loss_targets_the_velocity_x1_minus_x0(name, time_sampling):
    """With every data point equal to x0, the exact velocity (x_t - x0)/t scores zero loss
    and its negation does not: the loss's path and target have the right sign and direction."""
    m = load(name)
    x0 = torch.rand(1, 1, 28, 28).expand(64, 1, 28, 28) * 2 - 1
    exact = lambda x, t: (x - x0) / t[:, None, None, None]  # noqa: E731
    assert m.get_loss(exact, x0, time_sampling).item() < 1e-6
    assert m.get_loss(lambda x, t: -exact(x, t), x0, time_sampling).item() > 1.0


@pytest.mark.parametrize("name", SCRIPTS)
def test_time_sampling(name):
    m = load(name)
    for mode in ("uniform", "logit_normal"):
        t = m.sample_timesteps(20000, mode, "cpu")
        assert 0 < t.min() and t.max() < 1 and abs(t.mean() - 0.5) < 0.01
    # logit-normal concentrates on the middle: far fewer t near the ends than uniform's 20%
    t = m.sample_timesteps(20000, "logit_normal", "cpu")
    assert ((t < 0.1) | (t > 0.9)).float().mean() < 0.06
    if name != "01_flow_mnist":  # from step 2 on, the logit-normal's mean moves its median to sigmoid(mean)
        assert abs(m.sample_timesteps(20000, "logit_normal", "cpu", 0.5).median() - 0.6225) < 0.01


@pytest.mark.parametrize("name", SCRIPTS[1:])
def test_every_dit_trains_at_the_configured_time_mean(name, data, tmp_path, monkeypatch):
    m, means = load(name), []
    sample_timesteps = m.sample_timesteps
    monkeypatch.setattr(m, "sample_timesteps", lambda *args: means.append(args[-1]) or sample_timesteps(*args))
    vae_steps = ["--vae_steps", "1"] if name == "05_latent_vae" else []  # the VAE's loss samples no t
    run(name, tmp_path, data, "--steps", "2", *vae_steps, "--time_mean", "1.5", pictures=False)
    assert means == [1.5, 1.5] and m.Config().time_mean == 0.5  # step 2's recipe carries into steps 3 to 5


@pytest.mark.parametrize("name", MNIST_SCRIPTS)
def test_model_predicts_an_image_shaped_velocity_starting_at_zero(name):
    m = load(name)
    model = m.build_model(m.Config())
    x, t = torch.randn(3, 1, 28, 28), torch.rand(3)
    out = model(x, t, torch.tensor([0, 9, 10])) if name == "03_class_cfg" else model(x, t)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output layer: v = 0 at the start
    (out - 1).pow(2).sum().backward()  # and the loss can move it
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def tiny_conditional_dit(m):
    """A small ConditionalDiT with random (not zero) output layers, so its outputs differ."""
    torch.manual_seed(0)
    model = m.ConditionalDiT(num_classes=10, embed_dim=32, depth=2, num_heads=2)
    for p in model.parameters():
        if torch.count_nonzero(p) == 0:
            torch.nn.init.normal_(p, std=0.1)
    return model


def test_cfg_scale_1_is_the_conditional_and_0_the_unconditional_prediction():
    m = load("03_class_cfg")
    model = tiny_conditional_dit(m)
    x, t, y = torch.randn(4, 1, 28, 28), torch.tensor([0.1, 0.5, 0.8, 0.9]), torch.tensor([7, 0, 3, 9])
    v_cond, v_uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
    assert not torch.allclose(v_cond, v_uncond)
    assert torch.allclose(m.guided_velocity(model, x, t, y, 1.0), v_cond, atol=1e-5)
    assert torch.allclose(m.guided_velocity(model, x, t, y, 0.0), v_uncond, atol=1e-5)
    guided = m.guided_velocity(model, x, t, y, 3.0)
    assert torch.allclose(guided[:3], (v_uncond + 3 * (v_cond - v_uncond))[:3], atol=1e-4)
    assert torch.allclose(guided[3], v_cond[3], atol=1e-5)  # t > 0.8: near the noise, w is at most 1
    # one Euler step of the sampler from t=1 is x1 - v(x1, 1)
    torch.manual_seed(1)
    noise = torch.randn(4, 1, 28, 28)
    torch.manual_seed(1)
    one_step = m.sample_conditional(model, y, cfg_scale=1.0, num_steps=1)
    assert torch.allclose(one_step, (noise - model(noise, torch.ones(4), y)).clamp(-1, 1), atol=1e-5)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 1.0])
def test_label_dropout_replaces_labels_with_the_null_class_at_its_rate(rate):
    m = load("03_class_cfg")

    class LabelRecorder(torch.nn.Module):
        num_classes = 10

        def forward(self, x, t, y):
            self.seen = y
            return torch.zeros_like(x)

    model = LabelRecorder()
    torch.manual_seed(0)
    m.get_conditional_loss(model, torch.zeros(20000, 1, 2, 2), torch.full((20000,), 3), rate)
    assert set(model.seen.unique().tolist()) <= {3, 10}
    assert (model.seen == 10).float().mean().item() == pytest.approx(rate, abs=0.01)


def test_conditional_loss_targets_the_velocity_x1_minus_x0():
    m = load("03_class_cfg")
    x0 = torch.rand(1, 1, 28, 28).expand(64, 1, 28, 28) * 2 - 1

    class Exact(torch.nn.Module):
        num_classes = 10

        def __init__(self, sign):
            super().__init__()
            self.sign = sign

        def forward(self, x, t, y):
            return self.sign * (x - x0) / t[:, None, None, None]

    assert m.get_conditional_loss(Exact(1), x0, torch.zeros(64, dtype=torch.long)).item() < 1e-6
    assert m.get_conditional_loss(Exact(-1), x0, torch.zeros(64, dtype=torch.long)).item() > 1.0


def test_class_embedding_has_a_null_row_and_labels_reach_the_output():
    m = load("03_class_cfg")
    embed = m.ClassEmbedding(10, 16)
    assert embed.embedding.num_embeddings == 11 and embed.null_class == 10
    model = tiny_conditional_dit(m)
    x, t = torch.randn(2, 1, 28, 28), torch.rand(2)
    assert not torch.allclose(model(x, t, torch.tensor([1, 1])), model(x, t, torch.tensor([2, 2])))


def test_seed_usage_example_runs_as_written():
    m = importlib.import_module("03_class_cfg")
    model = m.ConditionalDiT(num_classes=10)
    samples = m.sample_conditional(
        model,
        class_labels=[7, 7, 7, 7],  # Generate four 7s
        cfg_scale=4.0
    )
    assert samples.shape == (4, 1, 28, 28) and samples.isfinite().all()
    grid = m.sample_each_class(model, num_per_class=2, num_steps=2)
    assert grid.shape == (20, 1, 28, 28)


def test_bad_class_labels_and_scales_are_refused():
    m = load("03_class_cfg")
    model = m.ConditionalDiT(num_classes=10, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=r"0\.\.9"):
        m.sample_conditional(model, [3, 10])
    with pytest.raises(ValueError, match=r"0\.\.9"):
        m.sample_conditional(model, [-1])
    with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
        m.sample_conditional(model, [3], cfg_scale=-1.0)


def test_patchify_cuts_the_image_into_patch_tokens():
    m = load("02_dit_mnist")
    for c, size, p in ((1, 28, 4), (3, 32, 4), (4, 8, 2)):
        x = torch.randn(2, c, size, size)
        tokens = m.patchify(x, p)
        assert tokens.shape == (2, (size // p) ** 2, p * p * c)
        # token 1 is the patch in the first row, second column
        assert torch.equal(tokens[:, 1], x[:, :, :p, p:2 * p].permute(0, 2, 3, 1).reshape(2, -1))


def test_overlap_add_averages_overlapping_patches_so_no_seam_can_form():
    m = load("02_dit_mnist")
    for c, size, p in ((1, 28, 4), (3, 32, 4), (4, 8, 2), (2, 9, 3), (1, 5, 1)):
        k, n = p + 2 * (p // 2), (size // p) ** 2
        flat = m.overlap_add(torch.full((1, n, k * k * c), 3.0), p, c, size, size)
        assert torch.allclose(flat, torch.full((1, c, size, size), 3.0))  # a weighted average: a constant stays
    paint = torch.zeros(1, 49, 8 * 8)
    paint[0, 7 * 3 + 3] = 1.0  # the middle token of 28x28 pixels in 4x4 patches paints ones, all others zeros
    image = m.overlap_add(paint, 4, 1, 28, 28)[0, 0]
    assert image[10:18, 10:18].gt(0).all() and image.sum() == image[10:18, 10:18].sum()  # its 4x4 is 12:16
    jumps = torch.cat([image.diff(dim=0).abs().flatten(), image.diff(dim=1).abs().flatten()])
    assert jumps.max() <= 0.25 + 1e-6  # the tent fades in steps of 1/4: no jump of 1 at the patch's border


def test_position_embedding_is_distinct_per_patch():
    m = load("02_dit_mnist")
    pe = m.sincos_pos_embed_2d(64, 7)
    assert pe.shape == (49, 64)
    assert torch.cdist(pe, pe).add(torch.eye(49)).min() > 0.1  # no two positions alike
    # token k = row * 7 + column, as patchify orders them: the first half of the features encodes
    # the row, the second half the column
    assert torch.equal(pe[1, :32], pe[0, :32]) and not torch.equal(pe[1, 32:], pe[0, 32:])
    assert torch.equal(pe[7, 32:], pe[0, 32:]) and not torch.equal(pe[7, :32], pe[0, :32])
    assert torch.equal(pe[7 * 3 + 5, :32], pe[7 * 3, :32]) and torch.equal(pe[7 * 3 + 5, 32:], pe[5, 32:])


@pytest.mark.parametrize("name", SCRIPTS[1:])
def test_the_local_mlp_mixes_a_token_with_its_8_neighbours_only(name):
    mlp = load(name).LocalMLP(8, 16)
    x = torch.randn(1, 49, 8)
    moved = x.clone()
    moved[0, 7 * 3 + 3] += 1.0  # the token in the middle of the 7x7 grid
    changed = (mlp(moved) - mlp(x)).abs().sum(-1).reshape(7, 7) > 0
    assert changed[2:5, 2:5].all() and changed.sum() == 9  # itself and its 8 neighbours, nothing else


def test_adaln_zero_blocks_start_as_the_identity():
    m = load("02_dit_mnist")
    block = m.DiTBlock(32, 4)
    x, c = torch.randn(2, 49, 32), torch.randn(2, 32)
    assert torch.equal(block(x, c), x)


@pytest.mark.parametrize("name", SCRIPTS)
def test_lr_warms_up_then_stays_whatever_the_number_of_steps(name):
    m = load(name)
    lrs = [m.lr_at(s, m.Config(lr=1.0, warmup_steps=10, steps=100)) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[4] == pytest.approx(0.5) and lrs[9:] == [1.0] * 91
    # a run asked for fewer steps sees the same rates: --steps k, then --resume to n, is one run
    assert [m.lr_at(s, m.Config(lr=1.0, warmup_steps=10, steps=20)) for s in range(20)] == lrs[:20]
    assert m.lr_at(5, m.Config(lr=0.5, warmup_steps=0)) == 0.5


@pytest.mark.parametrize("name", SCRIPTS)
def test_ema_averages_the_weights(name):
    m = load(name)
    model, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    torch.nn.init.zeros_(ema.weight)
    torch.nn.init.ones_(model.weight)
    m.update_ema(ema, model, step=0, window=0.25)  # d = 1 / (1 + 4) at the first step: mostly the new weights
    assert torch.allclose(ema.weight, torch.full((2, 2), 0.8))
    torch.nn.init.zeros_(model.weight)
    m.update_ema(ema, model, step=3, window=0.25)  # d = 4 / 8 by step 3: the window grows with the run
    assert torch.allclose(ema.weight, torch.full((2, 2), 0.4))
    m.update_ema(ema, model, step=9, window=0.0)  # --no-ema: the weights themselves
    assert torch.allclose(ema.weight, model.weight)
    weights = torch.randn(6, 2, 2)
    with torch.no_grad():
        ema.weight.copy_(weights[0])  # the EMA starts as a copy of the initial weights
        for step, w in enumerate(weights[1:]):
            model.weight.copy_(w)
            m.update_ema(ema, model, step, window=1.0)  # window 1: the mean of all the weights so far
    assert torch.allclose(ema.weight, weights.mean(0), atol=1e-6)


@pytest.mark.parametrize("shape", [(48, 12), (12, 48), (20, 20)])
def test_orthogonalise_pushes_every_singular_value_towards_one(shape):
    m = load("02_dit_mnist")
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape)))
    v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape)))
    g = u @ torch.diag(torch.logspace(-1, 1, min(shape))) @ v.T  # singular values from 0.1 to 10
    o = m.orthogonalise(g)
    assert o.shape == g.shape
    assert torch.linalg.svdvals(o).min() > 0.6 and torch.linalg.svdvals(o).max() < 1.25  # all near 1
    assert torch.nn.functional.cosine_similarity((u @ v.T).flatten(), o.flatten(), dim=0) > 0.95  # U V^T's direction
    assert torch.allclose(m.orthogonalise(1000 * g), o, atol=1e-5)  # the gradient's size does not matter
    assert torch.allclose(m.orthogonalise(torch.stack([g, 1000 * g])), torch.stack([o, o]), atol=1e-5)  # each alone


@pytest.mark.parametrize("name", SCRIPTS[1:])
@pytest.mark.parametrize("muon_steps", [3, 0])
def test_muon_steps_matrices_by_orthogonalised_momentum_and_the_rest_as_adamw(name, muon_steps):
    m = load(name)
    torch.manual_seed(0)
    layer, twin = torch.nn.Linear(8, 32), torch.nn.Linear(8, 32)
    twin.load_state_dict(layer.state_dict())
    groups = [dict(params=[layer.bias]), dict(params=[layer.weight], muon_steps=muon_steps)]
    muon = m.Muon(groups, lr=0.01, weight_decay=0.1)
    adamw = torch.optim.AdamW(twin.parameters(), lr=0.01, weight_decay=0.1)
    grad = torch.randn(32, 8)
    layer.weight.grad, twin.weight.grad = grad.clone(), grad.clone()
    layer.bias.grad, twin.bias.grad = torch.ones(32), torch.ones(32)
    before = layer.weight.detach().clone()
    muon.step()
    adamw.step()
    # the first step: momentum 0.05 g, Nesterov 0.0975 g, orthogonalised (its scale does not matter), times
    # lr * 0.2 * sqrt(32) (Liu et al.'s match to AdamW's update size), after decoupled weight decay
    expected = before * (1 - 0.01 * 0.1) - 0.01 * 0.2 * 32 ** 0.5 * m.orthogonalise(grad, muon_steps)
    assert torch.allclose(layer.weight, expected if muon_steps else twin.weight, atol=1e-6)  # 0 steps: AdamW's
    assert torch.allclose(layer.bias, twin.bias)  # the rest: AdamW's own step
    assert ("exp_avg" in muon.state[layer.weight]) == (muon_steps == 0) and "exp_avg" in muon.state[layer.bias]


# ----------------------------------------------------------------------------- text conditioning (04)

TEXT = "04_text_clip_cifar"


def tiny_text_dit(m, context_dim=32):
    """A small TextConditionalDiT with random (not zero) output layers, so its outputs differ."""
    torch.manual_seed(0)
    model = m.TextConditionalDiT(embed_dim=32, depth=2, num_heads=2, context_dim=context_dim)
    for p in model.parameters():
        if torch.count_nonzero(p) == 0:
            torch.nn.init.normal_(p, std=0.1)
    return model


def test_cross_attention_is_softmax_qk_v_and_ignores_masked_tokens():
    m = load(TEXT)
    torch.manual_seed(0)
    attn = m.CrossAttention(embed_dim=32, context_dim=24, num_heads=4)
    assert (attn.num_heads, attn.head_dim, attn.scale) == (4, 8, 8 ** -0.5)
    x, context = torch.randn(2, 16, 32), torch.randn(2, 5, 24)
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, False]])
    out = attn(x, context, mask)
    assert out.shape == (2, 16, 32)
    # forward (fused attention) equals eq. (6) written out with the weights
    weights = attn.attention_weights(x, context, mask)
    assert weights.shape == (2, 4, 16, 5) and torch.allclose(weights.sum(-1), torch.ones(2, 4, 16))
    assert (weights[0, ..., 3:] == 0).all() and (weights[1, ..., 4] == 0).all()
    v = m.split_heads(attn.v_proj(context), 4)
    assert torch.allclose(out, attn.out_proj((weights @ v).transpose(1, 2).flatten(2)), atol=1e-5)
    # padded tokens cannot change the output, real ones do
    changed = context.clone()
    changed[0, 3:], changed[1, 4] = 100.0, -100.0
    assert torch.allclose(attn(x, changed, mask), out, atol=1e-6)
    changed[0, 1] = 100.0
    assert not torch.allclose(attn(x, changed, mask)[0], out[0], atol=1e-3)


def test_text_model_predicts_an_image_shaped_velocity_starting_at_zero_and_reads_the_text():
    m = load(TEXT)
    model = m.build_model(m.Config(), context_dim=24)
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    text, mask = torch.randn(2, 6, 24), torch.ones(2, 6, dtype=torch.bool)
    out = model(x, t, text, mask)
    assert out.shape == x.shape and torch.count_nonzero(out) == 0  # zero-initialised output layer
    (out - 1).pow(2).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model = tiny_text_dit(m, context_dim=24)
    assert not torch.allclose(model(x, t, text, mask), model(x, t, text.flip(0), mask))
    block = m.TextConditionedDiTBlock(32, 4, context_dim=24)  # adaLN-Zero: starts as the identity
    tokens = torch.randn(2, 64, 32)
    assert torch.equal(block(tokens, torch.randn(2, 32), text, mask), tokens)


def test_text_cfg_scale_1_is_the_conditional_and_0_the_unconditional_prediction(data):
    m = load(TEXT)
    model = tiny_text_dit(m)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.8, 0.9])
    text, mask = torch.randn(2, 6, 32), torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    null, null_mask = torch.randn(6, 32), torch.tensor([True, True, False, False, False, False])
    v_cond = model(x, t, text, mask)
    v_uncond = model(x, t, null.expand(2, 6, 32), null_mask.expand(2, 6))
    assert not torch.allclose(v_cond, v_uncond)
    for w in (0.0, 1.0, 7.5):
        guided = m.guided_velocity(model, x, t, text, mask, null, null_mask, w)
        assert torch.allclose(guided[0], (v_uncond + w * (v_cond - v_uncond))[0], atol=1e-4)
        assert torch.allclose(guided[1], (v_uncond + min(w, 1) * (v_cond - v_uncond))[1], atol=1e-4)  # t > 0.8
    # one Euler step of the sampler from t=1 is x1 - v(x1, 1), with the text encoder's embeddings
    encoder = m.CLIPTextEncoder(str(data["clip"]))
    embeddings, masks = m.encode_prompts(encoder, ["a cat", "a big ship"], "cpu")
    torch.manual_seed(1)
    noise = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    one_step = m.sample_text_conditional(model, encoder, ["a cat", "a big ship"], num_steps=1, cfg_scale=1.0)
    expected = noise - model(noise, torch.ones(2), embeddings[:2], masks[:2])
    assert torch.allclose(one_step, expected.clamp(-1, 1), atol=1e-5)


@pytest.mark.parametrize("rate", [0.0, 0.1, 1.0])
def test_text_dropout_swaps_in_the_empty_prompt_at_its_rate(rate):
    m = load(TEXT)

    class TextRecorder(torch.nn.Module):
        def forward(self, x, t, text, mask):
            self.text, self.mask = text, mask
            return torch.zeros_like(x)

    model, n = TextRecorder(), 20000
    torch.manual_seed(0)
    caption, null = torch.ones(n, 3, 2), torch.zeros(3, 2)
    caption_mask, null_mask = torch.ones(n, 3, dtype=torch.bool), torch.tensor([True, False, False])
    m.get_text_conditional_loss(model, torch.zeros(n, 3, 2, 2), caption, caption_mask, null, null_mask, rate)
    dropped = (model.text == 0).all(dim=(1, 2))
    assert ((model.text == 1).all(dim=(1, 2)) | dropped).all()
    assert torch.equal(model.mask[dropped], null_mask.expand(int(dropped.sum()), 3))
    assert dropped.float().mean().item() == pytest.approx(rate, abs=0.01)


def test_text_conditional_loss_targets_the_velocity_x1_minus_x0():
    m = load(TEXT)
    x0 = torch.rand(1, 3, 8, 8).expand(64, 3, 8, 8) * 2 - 1
    text, mask = torch.randn(64, 2, 4), torch.ones(64, 2, dtype=torch.bool)

    class Exact(torch.nn.Module):
        def __init__(self, sign):
            super().__init__()
            self.sign = sign

        def forward(self, x, t, text, mask):
            return self.sign * (x - x0) / t[:, None, None, None]

    assert m.get_text_conditional_loss(Exact(1), x0, text, mask, text[0], mask[0]).item() < 1e-6
    assert m.get_text_conditional_loss(Exact(-1), x0, text, mask, text[0], mask[0]).item() > 1.0


@pytest.mark.parametrize("encoder", ["clip", "bert"])
def test_text_encoder_gives_token_embeddings_masks_and_pooled_vectors(encoder, data):
    m = load(TEXT)
    text_encoder = m.CLIPTextEncoder(model_name=str(data[encoder]))
    width = {"clip": 32, "bert": 24}[encoder]
    assert (text_encoder.embed_dim, text_encoder.max_length) == (width, 77)
    prompts = ["a photo of a cat", "a ship", ""]
    embeddings, mask = text_encoder(prompts)
    assert embeddings.shape == (3, 77, width) and mask.shape == (3, 77) and mask.dtype == torch.bool
    real_tokens = [len(text_encoder.tokenizer(p)["input_ids"]) for p in prompts]
    assert mask.sum(1).tolist() == real_tokens and real_tokens[2] == 2  # "" is just start and end
    assert not any(p.requires_grad for p in text_encoder.model.parameters())
    tokens, pooled = text_encoder.encode(prompts, return_pooled=True)
    assert torch.equal(tokens, embeddings) and pooled.shape == (3, width)
    if encoder == "clip":  # CLIP's pooled vector is its end-of-text token, the last real one
        assert torch.allclose(pooled, embeddings[torch.arange(3), mask.sum(1) - 1], atol=1e-6)
    else:  # others: the mean of the real tokens
        assert torch.allclose(pooled[0], embeddings[0, :real_tokens[0]].mean(0), atol=1e-6)
    assert torch.equal(text_encoder.encode("a ship"), embeddings[1:2])
    # the cache cuts only columns that are padding everywhere, and puts "" last
    cached, cached_mask = m.encode_prompts(text_encoder, prompts[:2], "cpu")
    assert cached.shape == (3, real_tokens[0], width) and torch.equal(cached_mask, mask[:, :real_tokens[0]])
    assert torch.equal(cached[2], embeddings[2, :real_tokens[0]])


def test_a_text_model_with_fewer_positions_reads_fewer_tokens(tmp_path):
    m = load(TEXT)
    text_encoder = m.CLIPTextEncoder(str(make_tiny_clip(tmp_path / "clip16", positions=16)))
    embeddings, mask = text_encoder(["a photo of an airplane, long enough to be cut"])
    assert text_encoder.max_length == 16 and embeddings.shape == (1, 16, 32) and mask.all()


def test_cutting_padding_columns_changes_no_prediction(data):
    m = load(TEXT)
    model, encoder = tiny_text_dit(m), m.CLIPTextEncoder(str(data["clip"]))
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    full, full_mask = encoder(["a cat", "a big ship"])
    cut, cut_mask = m.encode_prompts(encoder, ["a cat", "a big ship"], "cpu")
    assert cut.shape[1] < 20
    assert torch.allclose(model(x, t, full, full_mask), model(x, t, cut[:2], cut_mask[:2]), atol=1e-5)


def test_captions_and_mirrored_batches():
    m = load(TEXT)
    assert m.make_cifar10_captions(torch.tensor([0, 3, 5, 8])) == [
        "a photo of an airplane", "a photo of a cat", "a photo of a dog", "a photo of a ship"]
    assert m.make_caption("red_car") == "a photo of a red car"
    images = torch.arange(2 * 3 * 2 * 2, dtype=torch.uint8).reshape(2, 3, 2, 2)
    x, labels = m.get_batch(images, torch.tensor([0, 1]), 400)
    originals = images[labels].float() / 127.5 - 1
    same, mirrored = (x == originals).all(dim=(1, 2, 3)), (x == originals.flip(3)).all(dim=(1, 2, 3))
    assert (same | mirrored).all() and 0.4 < mirrored.float().mean() < 0.6


def centred(rgb, border=(0, 0, 0)):
    """A 32x32 image whose central 16x16 pixels have one colour and the rest another."""
    image = np.full((32, 32, 3), border, np.uint8)
    image[8:24, 8:24] = rgb
    return image


COLOURED = {"red": (200, 20, 20), "orange": (240, 140, 20), "yellow": (230, 220, 40), "green": (30, 160, 40),
            "blue": (30, 60, 220), "purple": (140, 40, 200), "brown": (120, 70, 20), "white": (240, 240, 240),
            "gray": (128, 128, 128), "black": (10, 10, 10)}


def test_colour_of_reads_the_centre_and_abstains_when_unsure():
    m = load(TEXT)
    for name, rgb in COLOURED.items():
        assert m.colour_of(centred(rgb, border=COLOURED["green" if name == "blue" else "blue"])) == name
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert m.colour_of(noise) is None
    assert m.describe(centred(COLOURED["red"]), "car", "colour") == "a photo of a red car"
    assert m.describe(centred(COLOURED["red"]), "car", "class") == "a photo of a car"
    assert m.describe(centred(COLOURED["blue"]), "red_car", "colour") == "a photo of a red car"  # named already
    assert m.describe(noise, "apple", "colour") == "a photo of an apple"
    assert m.class_named_in("A photo of a RED cat.", ["dog", "cat"]) == 1
    assert m.class_named_in("a catalogue", ["dog", "cat"]) == -1
    assert m.class_named_in("a photo of a red car", ["red_car"]) == 0


@pytest.mark.parametrize("name", TEXT_SCRIPTS)
def test_captions_name_each_images_colour_unless_told_class(name, data, tmp_path):
    folder = tmp_path / "photos"
    for class_name, colours in {"car": ("red", "white"), "bird": ("blue", "blue")}.items():
        (folder / class_name).mkdir(parents=True)
        for i, colour in enumerate(colours * 2):
            Image.fromarray(centred(COLOURED[colour])).save(folder / class_name / f"{i}.png")
    held_out = ["--vae_test_images", "1"] if name == LATENT else []
    run_in(name, folder, tmp_path / "colour", data, "--steps", "1", *held_out)
    ckpt = torch.load(tmp_path / "colour" / "ckpt.pt", weights_only=True)
    assert ckpt["captions"] == ["a photo of a blue bird", "a photo of a red car", "a photo of a white car"]
    run_in(name, folder, tmp_path / "class", data, "--steps", "1", "--captions", "class", *held_out,
           "--eval_samples", "3", "--prompts", "a photo of a red car", "a bird", "a cow")
    ckpt = torch.load(tmp_path / "class" / "ckpt.pt", weights_only=True)
    assert ckpt["captions"] == ["a photo of a bird", "a photo of a car"] and ckpt["classes"] == ["bird", "car"]
    npz = np.load(tmp_path / "class" / "samples.npz")
    assert npz["prompts"].tolist() == ["a photo of a red car", "a bird", "a cow"]
    assert npz["labels"].tolist() == [1, 0, -1]  # the class each prompt names


def test_seed_text_usage_example_runs_as_written(data):
    m = importlib.import_module("04_text_clip_cifar")
    text_encoder = m.CLIPTextEncoder(model_name=str(data["clip"]))
    model = m.TextConditionalDiT(context_dim=text_encoder.embed_dim, embed_dim=32, depth=1)
    samples = m.sample_text_conditional(
        model, text_encoder,
        prompts=["a photo of a cat", "a photo of a dog"],
        cfg_scale=7.5
    )
    assert samples.shape == (2, 3, 32, 32) and samples.isfinite().all()
    with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
        m.sample_text_conditional(model, text_encoder, ["a cat"], cfg_scale=-1.0)


def test_prompts_flag_picks_what_to_draw_after_training(data, tmp_path):
    run(TEXT, tmp_path, data, "--steps", "2")
    cfg, _ = load(TEXT).parse_config(["--prompts", "a red car", "a photo of a ship"])
    assert cfg.prompts == ["a red car", "a photo of a ship"]
    load(TEXT).main(["--out_dir", str(tmp_path), "--sample_only", "--prompts", "a red car", "--num_samples", "3"])
    assert Image.open(tmp_path / "samples.png").size[1] < 100  # one row: the prompt typed, not the captions


def test_many_prompts_wrap_into_columns_of_labelled_rows(data, tmp_path):
    run(TEXT, tmp_path, data, "--steps", "1")
    prompts = [f"a photo of cat number {k}" for k in range(40)]
    load(TEXT).main(["--out_dir", str(tmp_path), "--sample_only", "--prompts", *prompts, "--num_samples", "1"])
    width, height = Image.open(tmp_path / "samples.png").size
    assert height < 17 * 68 + 40 and width > 3 * 68  # three blocks of at most 16 rows, not one column of 40


@pytest.mark.parametrize("name", TEXT_SCRIPTS)
def test_missing_cifar_or_text_encoder_without_network_says_what_to_do(name, data, tmp_path, monkeypatch):
    m = load(name)

    def no_network(self):
        raise RuntimeError("no network")

    monkeypatch.setattr(m.CIFAR10, "download", no_network)
    with pytest.raises(SystemExit, match="cifar-10-python.tar.gz") as error:
        m.main(["--tiny", "--data_dir", str(tmp_path / "empty"), "--text_encoder", str(data["clip"]),
                "--out_dir", str(tmp_path)])
    assert "\n" not in error.value.code and "class sub-folders" in error.value.code
    with pytest.raises(SystemExit, match="could not load the text encoder") as error:
        m.main(["--tiny", "--text_encoder", str(tmp_path / "no_such_model"), "--out_dir", str(tmp_path)])
    assert "\n" not in error.value.code


# ----------------------------------------------------------------------------- latent diffusion (05)

LATENT = "05_latent_vae"


def test_vae_shapes_and_reparameterisation():
    m = load(LATENT)
    torch.manual_seed(0)
    vae = m.VAE(latent_channels=4)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (2, 4, 8, 8)
    assert vae.decode(mean).shape == (2, 3, 32, 32)
    reconstruction, mean2, _ = vae(x)
    assert reconstruction.shape == x.shape and torch.equal(mean, mean2)
    # z = mean + sigma * noise: two draws differ, and gradients reach the encoder through it
    assert not torch.equal(vae(x)[0], vae(x)[0])
    m.get_vae_loss(vae, x, kl_weight=1.0).backward()
    assert vae.encoder[0].weight.grad.abs().sum() > 0
    assert vae.scale_factor.item() == 1.0 and "scale_factor" in vae.state_dict()


def test_vae_loss_is_reconstruction_plus_weighted_kl():
    m = load(LATENT)
    torch.manual_seed(0)
    vae, x = m.VAE(latent_channels=4, channels=8), torch.rand(3, 3, 32, 32) * 2 - 1
    mean, logvar = vae.encode(x)
    posterior = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    prior = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    kl = torch.distributions.kl_divergence(posterior, prior).mean()  # eq. (7): the mean KL per latent number
    losses = []
    for weight in (0.0, 0.5):
        torch.manual_seed(1)  # the same noise in z, so the same reconstruction
        losses.append(m.get_vae_loss(vae, x, weight))
    torch.manual_seed(1)
    assert losses[0].item() == pytest.approx(torch.nn.functional.mse_loss(vae(x)[0], x).item(), rel=1e-5)
    assert (losses[1] - losses[0]).item() == pytest.approx(0.5 * kl.item(), rel=1e-4)


def test_psnr():
    m = load(LATENT)
    images = torch.rand(4, 3, 8, 8) * 1.6 - 0.8
    assert m.psnr(images, images + 0.1) == pytest.approx(10 * np.log10(4 / 0.01), abs=1e-3)  # 26.02 dB
    assert m.psnr(images, images + 0.2) < m.psnr(images, images + 0.1)


def test_training_latents_have_unit_std_and_include_mirror_images():
    m = load(LATENT)
    torch.manual_seed(0)
    vae = m.VAE(latent_channels=4, channels=8)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    latents, labels = m.encode_training_latents(vae, images, torch.arange(6))
    assert latents.shape == (12, 4, 8, 8) and labels.tolist() == [*range(6), *range(6)]
    assert latents.std().item() == pytest.approx(1.0, abs=1e-4)
    raw = m.encode_images(vae, images.flip(3))
    assert torch.allclose(latents[6:], raw * vae.scale_factor, atol=1e-5)
    assert vae.scale_factor.item() == pytest.approx(1 / torch.cat([m.encode_images(vae, images), raw]).std().item())


def test_latent_sampler_undoes_the_scale_and_decodes(data):
    m = load(LATENT)
    encoder = m.CLIPTextEncoder(str(data["clip"]))
    torch.manual_seed(0)
    vae = m.VAE(latent_channels=4, channels=8)
    vae.scale_factor.fill_(2.0)
    model = m.TextConditionalDiT(img_size=8, patch_size=2, in_channels=4, embed_dim=32, depth=1, num_heads=2,
                                 context_dim=32)  # a fresh model predicts v = 0: the latent stays the noise
    torch.manual_seed(1)
    noise = torch.randn(2, 4, 8, 8)
    torch.manual_seed(1)
    images = m.sample_latent_conditional(model, vae, encoder, ["a cat", "a ship"], num_steps=3)
    assert torch.allclose(images, vae.decode(noise / 2).clamp(-1, 1), atol=1e-5)
    states = m.sample_latent_conditional(model, vae, encoder, ["a cat"], num_steps=3, trajectory=True)
    assert len(states) == 4 and states[0].shape == (1, 3, 32, 32)


def test_seed_latent_usage_example_runs_with_a_text_encoder_passed_in(data):
    m = importlib.import_module("05_latent_vae")
    text_encoder = m.CLIPTextEncoder(model_name=str(data["clip"]))
    vae = m.VAE(latent_channels=4)
    model = m.TextConditionalDiT(in_channels=4, img_size=8, context_dim=text_encoder.embed_dim)
    samples = m.sample_latent_conditional(
        model, vae, text_encoder,
        class_labels=[0, 1, 2, 3],
        latent_shape=(4, 8, 8),
        cfg_scale=3.0
    )
    assert samples.shape == (4, 3, 32, 32) and samples.isfinite().all()
    with pytest.raises(ValueError, match="0..9"):
        m.sample_latent_conditional(model, vae, text_encoder, class_labels=[10])


SEED_000_STEP_5 = """
from text_to_image import VAE, ConditionalDiT, sample_latent_conditional
vae = VAE(latent_channels=4)
model = ConditionalDiT(in_channels=4, img_size=8) # Works on latents
# ... train VAE, then train model on encoded latents ...
# Generate in latent space, decode to pixels
samples = sample_latent_conditional(
model, vae,
class_labels=[0, 1, 2, 3],
latent_shape=(4, 8, 8),
cfg_scale=3.0
)
"""


def test_seed_latent_example_runs_as_written_with_clip_from_the_local_cache(tmp_path):
    """No text encoder passed: the default CLIP loads from the Hugging Face cache, as it would
    offline on a learner's machine. The cache holds a tiny CLIP of CLIP's width under CLIP's name."""
    repo = tmp_path / "hub" / "models--openai--clip-vit-base-patch32"
    make_tiny_clip(repo / "snapshots" / "0123abcd", width=512, whole=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    check = ("import importlib, sys; sys.modules['text_to_image'] = importlib.import_module('05_latent_vae')\n"
             + SEED_000_STEP_5 + "\nassert samples.shape == (4, 3, 32, 32) and samples.abs().max() <= 1\nprint('ok')")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9"}  # no hub
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]


SEED_002_TRAINER_CELL = r"""
trainer = TextConditionalTrainer(
model=model,
text_encoder=text_encoder,
dataloader=train_loader,
caption_fn=make_cifar10_captions,
lr=1e-4,
weight_decay=0.01,
text_drop_prob=0.1, # 10% text dropout for CFG
device=device,
)
print("Training Text-Conditional DiT with CFG text dropout...")
print("(10% of samples trained with null text)\n")
NUM_EPOCHS = 30
losses = trainer.train(num_epochs=NUM_EPOCHS)
trainer.save_checkpoint("phase4_text_conditional_dit.pt")
"""


@pytest.mark.parametrize("name", TEXT_SCRIPTS)
def test_seed_trainer_cell_runs_as_written(name, data, tmp_path, monkeypatch, capsys):
    m = load(name)
    torch.manual_seed(0)  # the shuffling and the model's start, whatever the tests before drew
    folder = m.ImageFolder(data["images"], transform=m.transforms.Compose([
        m.transforms.Resize(8), m.transforms.CenterCrop(8), m.transforms.ToTensor(),
        m.transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]))
    train_loader = torch.utils.data.DataLoader(folder, batch_size=4, shuffle=True, drop_last=True)
    text_encoder = m.CLIPTextEncoder(str(data["clip"]))
    model = m.TextConditionalDiT(img_size=8, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                                 context_dim=text_encoder.embed_dim)
    images, labels = next(iter(torch.utils.data.DataLoader(folder, batch_size=16)))
    embeddings, mask = m.encode_prompts(text_encoder, m.make_cifar10_captions(labels), "cpu")

    def held_loss():  # the same images, noise and t before and after training: the epochs' losses are too noisy
        torch.manual_seed(1)
        with torch.no_grad():
            return m.get_text_conditional_loss(model, images, embeddings[:-1], mask[:-1], embeddings[-1], mask[-1], 0.0)

    before = held_loss()
    monkeypatch.chdir(tmp_path)
    names = dict(vars(m), model=model, text_encoder=text_encoder, train_loader=train_loader, device=m.get_device())
    exec(SEED_002_TRAINER_CELL, names)
    losses = names["losses"]
    assert len(losses) == 30 and all(np.isfinite(losses)) and held_loss() < before
    assert "Epoch 30: avg_loss = " in capsys.readouterr().out
    saved = torch.load(tmp_path / "phase4_text_conditional_dit.pt", weights_only=True)
    assert saved["script"] == name and saved["epoch_losses"] == losses
    assert all(torch.equal(saved["model"][k], v) for k, v in model.state_dict().items())


def test_latents_buy_resolution(data, tmp_path):
    """An 8x VAE gives 64x64 images the 4x8x8 latents (16 tokens) that 32x32 ones get with a 4x VAE."""
    m = load(LATENT)
    latent_shape = lambda *flags: m.latent_shape_of(m.parse_config(["--tiny", *flags])[0])  # noqa: E731
    assert latent_shape() == latent_shape("--img_size", "64", "--vae_downscale", "8") == (4, 8, 8)
    assert latent_shape("--img_size", "64") == (4, 16, 16)
    run(LATENT, tmp_path, data, "--img_size", "64", "--vae_downscale", "8", "--eval_samples", "2")
    assert np.load(tmp_path / "samples.npz")["images"].shape == (2, 64, 64, 3)
    assert Image.open(tmp_path / "recon.png").height > 2 * 64


def test_vae_training_resumes_after_ctrl_c_and_a_trained_vae_can_be_reused(data, tmp_path, monkeypatch):
    m = load(LATENT)
    calls = []
    real_get_batch = m.get_batch

    def interrupted_on_the_fourth_batch(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_get_batch(*args)

    monkeypatch.setattr(m, "get_batch", interrupted_on_the_fourth_batch)
    with pytest.raises(SystemExit, match="interrupted at VAE step 3"):
        run(LATENT, tmp_path / "a", data, pictures=False)
    assert torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["vae_step"] == 3
    run(LATENT, tmp_path / "a", data, "--resume", pictures=False)
    first = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    assert first["vae_step"] == m.TINY["vae_steps"] and first["step"] == m.TINY["steps"]
    assert len(calls) == 4 + m.TINY["vae_steps"] - 3  # stage 1 went on from step 3
    # --vae_ckpt: stage 1 is skipped and the VAE is the one given
    run(LATENT, tmp_path / "b", data, "--vae_ckpt", str(tmp_path / "a" / "ckpt.pt"), pictures=False)
    second = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert len(calls) == 4 + m.TINY["vae_steps"] - 3
    assert all(torch.equal(first["vae"][k], second["vae"][k]) for k in first["vae"])


# ----------------------------------------------------------------------------- the CLI

@pytest.mark.parametrize("name", SCRIPTS)
def test_every_config_field_is_a_flag(name, capsys):
    m = load(name)
    cfg, given = m.parse_config(["--tiny", "--steps", "3", "--no-ema", "--lr", "0.5"])
    assert (cfg.steps, cfg.ema, cfg.lr, cfg.batch_size) == (3, False, 0.5, m.TINY["batch_size"])
    assert set(given) == {"tiny", "steps", "ema", "lr"}
    with pytest.raises(SystemExit):
        m.parse_config(["--help"])
    help_text = capsys.readouterr().out
    for field in m.Config.__dataclass_fields__:
        assert f"--{field}" in help_text


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("flags, message", [
    (["--no_such_flag"], "unrecognized arguments"),
    (["--steps", "ten"], "invalid int value"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--ckpt_every", "0", "--grad_clip", "-1"], "--ckpt_every must be at least 1; --grad_clip must be above 0"),
    (["--lr", "nan"], "argument --lr: must be a finite number, not nan"),
    (["--ema_window", "inf"], "argument --ema_window: must be a finite number, not inf"),
    (["--sampler", "rk4"], "--sampler must be euler or heun"),
    (["--time_sampling", "cubic"], "--time_sampling must be logit_normal or uniform"),
    (["--device", "tpu9"], "--device"),
])
def test_bad_flags_fail_with_one_clear_line(name, flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        load(name).main([*flags, "--out_dir", str(tmp_path / "out")])
    stderr = capsys.readouterr().err + (error.value.code if isinstance(error.value.code, str) else "")
    assert error.value.code != 0 and message in stderr and stderr.strip().count("\n") == 0
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_says_one_line_and_no_traceback(tmp_path):
    """From the shell too, an error is one line: here a corrupt checkpoint (bad flags: the tests above), for one
    script, as every script ends in the same call to main() (01 and 05 from the shell: the SIGTERM test)."""
    assert all((ROOT / f"{name}.py").read_text().endswith('\nif __name__ == "__main__":\n    main()\n')
               for name in SCRIPTS)
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    result = run_cli(str(ROOT / "04_text_clip_cifar.py"), "--out_dir", str(tmp_path), "--sample_only", cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == "" and result.stderr.count("\n") == 1
    assert "corrupt" in result.stderr


@pytest.mark.parametrize("name, flags, message", [
    ("03_class_cfg", ["--cfg_scale", "-1"], "--cfg_scale must not be negative"),
    ("03_class_cfg", ["--label_dropout", "1.5"], "--label_dropout must be in [0, 1]"),
    ("04_text_clip_cifar", ["--cfg_scale", "-1"], "--cfg_scale must not be negative"),
    ("04_text_clip_cifar", ["--text_dropout", "-0.1"], "--text_dropout must be in [0, 1]"),
    ("04_text_clip_cifar", ["--img_size", "0"], "--img_size must be at least 1"),
    ("03_class_cfg", ["--cfg_scale", "nan"], "argument --cfg_scale: must be a finite number, not nan"),
    ("03_class_cfg", ["--num_classes", "5"], "--num_classes must be at least 10: MNIST has 10 digits"),
    ("02_dit_mnist", ["--num_heads", "0", "--depth", "-1"],
     "--depth must be at least 1; --num_heads must be at least 1"),
    ("02_dit_mnist", ["--patch_size", "5"], "--patch_size must divide 28"),
    ("04_text_clip_cifar", ["--img_size", "30"], "--patch_size must divide --img_size"),
    ("05_latent_vae", ["--vae_downscale", "3"], "--vae_downscale must be 2, 4, 8 or 16"),
    ("05_latent_vae", ["--img_size", "40", "--vae_downscale", "8"], "must divide by --vae_downscale * --patch_size"),
    ("01_flow_mnist", ["--base_channels", "12"], "--base_channels must divide by 8"),
])
def test_bad_model_and_guidance_flags_fail_with_one_clear_line_and_create_nothing(name, flags, message, tmp_path,
                                                                                  capsys):
    with pytest.raises(SystemExit) as error:
        load(name).main([*flags, "--out_dir", str(tmp_path / "out"), "--data_dir", str(tmp_path / "data")])
    assert error.value.code == 2 and list(tmp_path.iterdir()) == []
    stderr = capsys.readouterr().err
    assert message in stderr and stderr.count("\n") == 1


def test_import_only_defines_things(tmp_path):
    code = f"import sys, importlib; sys.path.insert(0, {str(ROOT)!r})\nfor name in {SCRIPTS!r}:\n" \
           "    importlib.import_module(name); print(name)"
    result = run_cli("-c", code, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.split() == SCRIPTS and result.stderr == ""
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- runs end to end

@pytest.mark.parametrize("name", SCRIPTS)
def test_tiny_run_writes_every_output(name, data, tmp_path, capsys):
    run(name, tmp_path, data, "--eval_samples", "30")
    pictures = ["samples.png", "trajectory.png", "trajectory.gif", "nfe_sweep.png", "progress.png", "loss.png"]
    for file in pictures + ["log.csv", "ckpt.pt", "samples.npz"]:
        assert (tmp_path / file).exists(), file
    wrote = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 1 and all(file in wrote[0] for file in pictures)
    header, *rows = (tmp_path / "log.csv").read_text().splitlines()
    assert header.startswith("step,loss,lr,images_per_s,loss_t0.0-0.1,") and header.endswith(",loss_t0.9-1.0")
    assert rows[-1].startswith(f"{load(name).TINY['steps']},") and len(rows[-1].split(",")) == 14
    gif = Image.open(tmp_path / "trajectory.gif")
    assert gif.n_frames == load(name).Config(**load(name).TINY).sample_steps + 1
    assert (tmp_path / "trajectory.gif").stat().st_size < 2**20
    npz = np.load(tmp_path / "samples.npz")
    image_shape = (32, 32, 3) if name in TEXT_SCRIPTS else (28, 28, 1)
    assert npz["images"].shape == (30, *image_shape) and npz["images"].dtype == np.uint8
    assert npz["labels"].dtype == np.int64
    if name in UNCONDITIONAL:
        assert (npz["labels"] == -1).all()
    else:  # equal numbers of every class, and the guidance sweep
        num_classes = 3 if name in TEXT_SCRIPTS else 10
        assert np.bincount(npz["labels"]).tolist() == [30 // num_classes] * num_classes
        assert (tmp_path / "cfg_sweep.png").exists()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["script"] == name and ckpt["step"] == load(name).TINY["steps"]
    assert {"model", "ema", "optimizer", "config", "rng"} <= set(ckpt)
    assert len(ckpt["progress"]) == 6  # progress.png's rows: 6 points of training
    assert not list(tmp_path.glob("*.tmp"))  # the atomic writes left nothing behind
    if name in TEXT_SCRIPTS:  # the folder names became the captions, in ImageFolder's (sorted) order
        assert ckpt["classes"] == ["airplane", "cat", "ship"]
        assert {caption.split()[-1] for caption in ckpt["captions"]} == set(ckpt["classes"])
        assert (tmp_path / "attention.png").exists() and (tmp_path / "colours.png").exists()
        assert npz["prompts"].tolist() == [load(name).make_caption(ckpt["classes"][k]) for k in npz["labels"]]
    if name == "05_latent_vae":
        assert (tmp_path / "recon.png").exists() and ckpt["vae_step"] == load(name).TINY["vae_steps"]
        assert (tmp_path / "vae_log.csv").read_text().splitlines()[-1].startswith(f"{load(name).TINY['vae_steps']},")


@pytest.mark.parametrize("name", SCRIPTS)
def test_seed_makes_a_run_repeatable(name, data, tmp_path):
    run(name, tmp_path / "a", data, "--steps", "3", "--eval_samples", "4")
    run(name, tmp_path / "b", data, "--steps", "3", "--eval_samples", "4")
    run(name, tmp_path / "c", data, "--steps", "3", "--seed", "1", pictures=False)
    a, b = (np.load(tmp_path / d / "samples.npz")["images"] for d in "ab")
    assert np.array_equal(a, b) and not same_weights(tmp_path / "a" / "ckpt.pt", tmp_path / "c" / "ckpt.pt")


def same_weights(path_a, path_b, parts=("model", "ema", "optimizer")):
    a, b = torch.load(path_a, weights_only=True), torch.load(path_b, weights_only=True)
    flat = lambda state: [v for v in torch.utils._pytree.tree_leaves(state) if torch.is_tensor(v)]  # noqa: E731
    return all(len(flat(a[p])) == len(flat(b[p])) and all(torch.equal(x, y) for x, y in zip(flat(a[p]), flat(b[p])))
               for p in parts)


@pytest.mark.parametrize("name", SCRIPTS)
def test_resume_continues_the_same_run_exactly_and_sample_only_changes_nothing(name, data, tmp_path):
    run(name, tmp_path / "whole", data, "--steps", "9", pictures=False)
    run(name, tmp_path / "parts", data, "--steps", "6", pictures=False)  # past the 5 warmup steps of --tiny
    run(name, tmp_path / "parts", data, "--steps", "9", "--resume")
    assert same_weights(tmp_path / "whole" / "ckpt.pt", tmp_path / "parts" / "ckpt.pt")  # bit for bit
    header, *rows = (tmp_path / "parts" / "log.csv").read_text().splitlines()
    assert header.startswith("step,") and rows[-1].startswith("9,")
    before = (tmp_path / "parts" / "ckpt.pt").read_bytes()
    (tmp_path / "parts" / "samples.png").unlink()
    # --sample_only needs no data and no repeated flags: the checkpoint's config is used, and
    # flags that only change sampling may differ
    load(name).main(["--out_dir", str(tmp_path / "parts"), "--sample_only", "--data_dir", "/nonexistent",
                     "--sample_steps", "2", "--sampler", "heun", "--num_samples", "4", "--device", "cpu"])
    assert (tmp_path / "parts" / "samples.png").exists()
    assert (tmp_path / "parts" / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_signal_inside_a_step_stops_after_it_with_a_whole_checkpoint(name, data, tmp_path, monkeypatch):
    """Ctrl-C arriving in the middle of a step (here: while its batch is drawn) lets the step
    finish: the checkpoint holds whole steps, and resuming it ends where the whole run does."""
    m = load(name)
    run(name, tmp_path / "whole", data, "--steps", "8", pictures=False)
    batches = "get_text_conditional_loss" if name == "05_latent_vae" else "get_batch"  # 05: in stage 2
    real_get_batch, calls = getattr(m, batches), []

    def ctrl_c_on_the_fourth_batch(*args):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return real_get_batch(*args)

    monkeypatch.setattr(m, batches, ctrl_c_on_the_fourth_batch)
    with pytest.raises(SystemExit, match="interrupted at step 4: saved"):
        run(name, tmp_path / "parts", data, "--steps", "8", pictures=False)
    assert torch.load(tmp_path / "parts" / "ckpt.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(m, batches, real_get_batch)
    run(name, tmp_path / "parts", data, "--steps", "8", "--resume", pictures=False)
    assert same_weights(tmp_path / "whole" / "ckpt.pt", tmp_path / "parts" / "ckpt.pt")


@pytest.mark.parametrize("name", SCRIPTS)
def test_ctrl_c_raised_inside_a_step_saves_the_steps_before_it(name, data, tmp_path, monkeypatch):
    m = load(name)
    calls = []

    def interrupted_on_the_fourth_batch(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_get_batch(*args)

    batches = "get_text_conditional_loss" if name == "05_latent_vae" else "get_batch"  # 05: in stage 2
    real_get_batch = getattr(m, batches)
    monkeypatch.setattr(m, batches, interrupted_on_the_fourth_batch)
    with pytest.raises(SystemExit, match="interrupted at step 3"):
        run(name, tmp_path, data, "--steps", "10", pictures=False)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 3


@pytest.mark.parametrize("name", ["01_flow_mnist", "05_latent_vae"])
def test_sigterm_saves_like_ctrl_c(name, data, tmp_path):
    inputs = (["--data_dir", str(data["images"]), "--text_encoder", str(data["clip"])] if name in TEXT_SCRIPTS
              else ["--data_dir", str(data["mnist"])])
    process = subprocess.Popen([sys.executable, str(ROOT / f"{name}.py"), "--tiny", *inputs, "--out_dir",
                                str(tmp_path), "--steps", "100000", "--log_every", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # wait until stage 2 trains
        if line.startswith("step ") and "/100000" in line:
            break
    process.terminate()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1 and stderr.count("\n") == 1 and "interrupted at step" in stderr
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] > 0


@pytest.mark.parametrize("name", ["02_dit_mnist", "04_text_clip_cifar"])
def test_ctrl_c_outside_training_exits_with_one_line(name, data, tmp_path, monkeypatch):
    m = load(name)

    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(m, "load_images" if name in TEXT_SCRIPTS else "load_mnist", ctrl_c)
    with pytest.raises(SystemExit, match="^interrupted") as error:
        run(name, tmp_path / "out", data)
    assert "\n" not in error.value.code and not (tmp_path / "out").exists()


@pytest.mark.parametrize("writer, reader", [("01_flow_mnist", "02_dit_mnist"), ("02_dit_mnist", "03_class_cfg"),
                                            ("03_class_cfg", "04_text_clip_cifar"),
                                            ("04_text_clip_cifar", "05_latent_vae")])
def test_checkpoint_of_another_script_is_refused(writer, reader, data, tmp_path):
    run(writer, tmp_path, data, "--steps", "2", pictures=False)
    with pytest.raises(SystemExit, match=f"written by {writer}, not {reader}"):
        load(reader).main(["--out_dir", str(tmp_path), "--sample_only"])


MODEL_FLAGS = {"01_flow_mnist": ["--time_dim", "64"], "02_dit_mnist": ["--num_heads", "4"],
               "03_class_cfg": ["--num_classes", "12"], "04_text_clip_cifar": ["--mlp_ratio", "2"],
               "05_latent_vae": ["--vae_channels", "16"]}


@pytest.mark.parametrize("name", SCRIPTS)
def test_corrupt_missing_or_mismatched_checkpoint_is_refused(name, data, tmp_path):
    m = load(name)
    with pytest.raises(SystemExit, match="no checkpoint"):
        m.main(["--out_dir", str(tmp_path), "--sample_only"])
    run(name, tmp_path, data, "--steps", "2", pictures=False)
    good = (tmp_path / "ckpt.pt").read_bytes()
    # a flag that changes the model, even where the shapes would still fit (--num_heads), is named
    flag, value = MODEL_FLAGS[name]
    for mode in ("--sample_only", "--resume"):
        with pytest.raises(SystemExit, match=f"holds another model: it was trained with {flag} ") as error:
            m.main(["--out_dir", str(tmp_path), mode, "--steps", "5", flag, value])
        assert f"not {flag} {value}" in error.value.code and "--steps" not in error.value.code
    with pytest.raises(SystemExit, match="at step 2 already: pass --steps above 2"):
        m.main(["--out_dir", str(tmp_path), "--resume", "--steps", "2"])
    assert (tmp_path / "ckpt.pt").read_bytes() == good
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="corrupt"):
        m.main(["--out_dir", str(tmp_path), "--sample_only"])


def test_another_text_encoder_of_the_same_width_is_refused(data, tmp_path):
    run(TEXT, tmp_path, data, "--steps", "2", pictures=False)
    other = make_tiny_clip(tmp_path / "other_clip")  # the same width, other weights
    with pytest.raises(SystemExit, match="it was trained with --text_encoder .*, not --text_encoder .*other_clip"):
        load(TEXT).main(["--out_dir", str(tmp_path), "--sample_only", "--text_encoder", str(other)])


@pytest.mark.parametrize("name", MNIST_SCRIPTS)
def test_missing_data_without_network_says_where_to_put_it(name, tmp_path, monkeypatch):
    m = load(name)

    def no_network(self):
        raise RuntimeError("no network")

    monkeypatch.setattr(m.MNIST, "download", no_network)
    with pytest.raises(SystemExit, match="MNIST.raw") as error:
        m.main(["--tiny", "--data_dir", str(tmp_path / "empty"), "--out_dir", str(tmp_path / "out")])
    assert "\n" not in error.value.code and "train-images-idx3-ubyte" in error.value.code
    assert list(tmp_path.iterdir()) == []  # no empty data or output folders left behind


def test_truncated_mnist_is_called_corrupt_not_missing(tmp_path):
    raw = make_mnist(tmp_path / "data") / "MNIST" / "raw"
    (raw / "train-images-idx3-ubyte").write_bytes((raw / "train-images-idx3-ubyte").read_bytes()[:1000])
    with pytest.raises(SystemExit, match="corrupt or truncated"):
        load("01_flow_mnist").main(["--tiny", "--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", SCRIPTS)
def test_non_finite_loss_or_gradient_stops_and_keeps_the_last_checkpoint(name, data, tmp_path, monkeypatch):
    m = load(name)
    run(name, tmp_path, data, "--steps", "2", pictures=False)
    good = (tmp_path / "ckpt.pt").read_bytes()
    loss_name = {"03_class_cfg": "get_conditional_loss", "04_text_clip_cifar": "get_text_conditional_loss",
                 "05_latent_vae": "get_text_conditional_loss"}.get(name, "get_loss")
    with monkeypatch.context() as patch:
        patch.setattr(m, loss_name, lambda *args: torch.tensor(float("nan"), requires_grad=True))
        with pytest.raises(SystemExit, match="loss became nan at step 2; .*ckpt.pt keeps step 2"):
            run(name, tmp_path, data, "--steps", "4", "--resume")
    assert (tmp_path / "ckpt.pt").read_bytes() == good
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *args, **kwargs: torch.tensor(float("inf")))
    with pytest.raises(SystemExit, match="gradient norm became inf at step 0; no checkpoint of this run"):
        run(name, tmp_path / "fresh", data, "--steps", "4", "--vae_ckpt" if name == LATENT else "--seed",
            str(tmp_path / "ckpt.pt") if name == LATENT else "0")
    assert not (tmp_path / "fresh" / "ckpt.pt").exists()


@pytest.mark.parametrize("name", ["01_flow_mnist", "04_text_clip_cifar"])
def test_unusable_out_dir_or_full_disk_ends_in_one_line_and_keeps_the_old_checkpoint(name, data, tmp_path,
                                                                                   monkeypatch):
    m = load(name)
    (tmp_path / "a_file").write_text("")
    for out_dir in (tmp_path / "a_file", tmp_path / "a_file" / "below"):
        with pytest.raises(SystemExit, match="is a file") as error:
            run(name, out_dir, data)
        assert "\n" not in error.value.code
    run(name, tmp_path / "out", data, "--steps", "2", pictures=False)
    good = (tmp_path / "out" / "ckpt.pt").read_bytes()

    def disk_full(state, file):
        file.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit, match="could not write .*ckpt.pt .No space left on device.") as error:
        run(name, tmp_path / "out", data, "--steps", "4", "--resume")
    assert "\n" not in error.value.code
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == good and not list((tmp_path / "out").glob("*.tmp"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_shows_each_flags_comment(name, capsys):
    with pytest.raises(SystemExit):
        load(name).parse_config(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--seed INT makes a run repeatable on one device (default: 0)" in help_text
    assert "--sampler STR \"euler\" (4) or \"heun\" (4b)" in help_text


# ----------------------------------------------------------------------------- the series keeps its parts in step

SHARED = {  # what a later step copies word for word from the earlier ones
    "get_device": SCRIPTS, "autocast": SCRIPTS, "TimeEmbedding": SCRIPTS,
    "sample_timesteps": SCRIPTS[1:], "integrate": SCRIPTS, "lr_at": SCRIPTS,
    "update_ema": SCRIPTS, "save_trajectory": SCRIPTS, "save_nfe_sweep": SCRIPTS,
    "save_progress": SCRIPTS, "parse_config": MNIST_SCRIPTS, "config_problems": SCRIPTS, "finite_float": SCRIPTS,
    "check_out_dir": SCRIPTS, "download": SCRIPTS, "load_checkpoint": SCRIPTS,
    "restore": SCRIPTS, "rng_states": SCRIPTS, "save_checkpoint": SCRIPTS, "write_atomically": SCRIPTS,
    "on_stop_signals": SCRIPTS, "one_line_errors": SCRIPTS, "check_finite": SCRIPTS,
    "TrainingLog": SCRIPTS, "fit": SCRIPTS, "to_uint8": SCRIPTS, "grid_image": SCRIPTS,
    "save_grid": SCRIPTS, "plot_loss": SCRIPTS,
    "patchify": SCRIPTS[1:], "overlap_add": SCRIPTS[1:], "sincos_pos_embed_2d": SCRIPTS[1:], "modulate": SCRIPTS[1:],
    "Attention": SCRIPTS[1:], "LocalMLP": SCRIPTS[1:], "FinalLayer": SCRIPTS[1:],
    "orthogonalise": SCRIPTS[1:], "Muon": SCRIPTS[1:],
    "load_mnist": UNCONDITIONAL, "get_batch": UNCONDITIONAL, "sample": UNCONDITIONAL,
    "CIFAR10_CLASSES": TEXT_SCRIPTS, "make_caption": TEXT_SCRIPTS, "make_cifar10_captions": TEXT_SCRIPTS,
    "open_dataset": TEXT_SCRIPTS, "open_image_folder": TEXT_SCRIPTS, "load_images": TEXT_SCRIPTS,
    "COLOURS": TEXT_SCRIPTS, "colour_of": TEXT_SCRIPTS, "describe": TEXT_SCRIPTS, "class_named_in": TEXT_SCRIPTS,
    "decode": TEXT_SCRIPTS, "CLIPTextEncoder": TEXT_SCRIPTS, "optimizer_step": SCRIPTS,
    "encode_prompts": TEXT_SCRIPTS, "split_heads": TEXT_SCRIPTS, "CrossAttention": TEXT_SCRIPTS,
    "TextConditionedDiTBlock": TEXT_SCRIPTS, "TextConditionalDiT": TEXT_SCRIPTS,
    "get_text_conditional_loss": TEXT_SCRIPTS, "guided_velocity": TEXT_SCRIPTS,
    "TextConditionalTrainer": TEXT_SCRIPTS,
}


SHARED_AGAIN = [("parse_config", TEXT_SCRIPTS)]  # 04 adds the --prompts list to the CLI; 05 keeps it


@pytest.mark.parametrize("name, scripts", sorted(SHARED.items()) + SHARED_AGAIN)
def test_shared_parts_are_word_for_word_the_same(name, scripts):
    """The skeleton is shared: a fix in one script is made in all, so 01's tests cover 05's copy."""
    first, *others = scripts
    def source(script):
        part = getattr(load(script), name)
        return repr(part) if isinstance(part, tuple) else inspect.getsource(part)

    for script in others:
        assert source(script) == source(first), f"{name} differs between {first} and {script}"


# ----------------------------------------------------------------------------- bad data, bad encoders (04, 05)

@pytest.mark.parametrize("name", TEXT_SCRIPTS)
def test_a_corrupt_image_is_named(name, data, tmp_path):
    folder = make_image_folder(tmp_path / "photos")
    (folder / "cat" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(SystemExit, match=r"cannot read .*broken\.png") as error:
        run_in(name, folder, tmp_path / "out", data)
    assert "\n" not in error.value.code and not (tmp_path / "out").exists()
    (folder / "cat" / "broken.png").unlink()
    jpg = (folder / "cat" / "0.jpg").read_bytes()
    (folder / "cat" / "0.jpg").write_bytes(jpg[:len(jpg) // 2])  # a truncated JPEG
    with pytest.raises(SystemExit, match=r"cannot read .*0\.jpg"):
        run_in(name, folder, tmp_path / "out", data)


def run_in(name, data_dir, out_dir, data, *flags):
    load(name).main(["--tiny", "--data_dir", str(data_dir), "--text_encoder", str(data["clip"]),
                     "--out_dir", str(out_dir), *flags])


def test_folders_that_are_not_datasets_say_what_they_are_and_never_download(data, tmp_path, monkeypatch):
    m = load(TEXT)

    def no_download(self):
        raise AssertionError("tried to download CIFAR-10 into a folder of the user's")

    monkeypatch.setattr(m.CIFAR10, "download", no_download)
    (tmp_path / "empty_classes" / "cat").mkdir(parents=True)
    (tmp_path / "empty_classes" / "dog").mkdir()
    with pytest.raises(SystemExit, match="Found no valid file") as error:
        run_in(TEXT, tmp_path / "empty_classes", tmp_path / "out", data)
    assert "CIFAR-10" not in error.value.code
    make_image_folder(tmp_path / "split" / "train")
    (tmp_path / "split" / "test").mkdir()
    with pytest.raises(SystemExit, match=r"holds the splits test, train, not classes: pass --data_dir .*train"):
        run_in(TEXT, tmp_path / "split", tmp_path / "out", data)
    (tmp_path / "loose").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "loose" / "a.png")
    with pytest.raises(SystemExit, match="no class sub-folders"):
        run_in(TEXT, tmp_path / "loose", tmp_path / "out", data)
    assert not (tmp_path / "out").exists()


def test_a_folder_too_small_for_the_held_out_images_is_refused(data, tmp_path):
    with pytest.raises(SystemExit, match="too few to hold out --vae_test_images 7"):
        run_in(LATENT, data["images"], tmp_path / "out", data, "--vae_test_images", "7")


def test_tiny_decodes_only_the_images_it_uses(data, tmp_path, capsys):
    run_in(TEXT, data["images"], tmp_path / "out", data, "--steps", "1", "--train_images", "5")
    assert "decoding 5 images of 3 classes" in capsys.readouterr().out


def test_text_encoders_without_pad_token_or_text_tower(data, tmp_path):
    m = load(TEXT)
    no_pad = tmp_path / "bert_no_pad"
    encoder = m.CLIPTextEncoder(str(data["bert"]))
    encoder.tokenizer.pad_token = None
    encoder.tokenizer.save_pretrained(no_pad)
    encoder.model.save_pretrained(no_pad)
    loaded = m.CLIPTextEncoder(str(no_pad))
    embeddings, mask = loaded(["a cat", "a big ship"])  # padded with another token, and masked out
    assert mask.sum(1).tolist() == [len(loaded.tokenizer(p)["input_ids"]) for p in ("a cat", "a big ship")]
    assert embeddings.shape[:2] == mask.shape == (2, 77) and not mask.all()
    vision_only = tmp_path / "clip_vision"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=32, patch_size=16)).save_pretrained(vision_only)
    for folder in (vision_only, tmp_path / "no_such_model"):
        with pytest.raises(SystemExit, match="could not load the text encoder") as error:
            m.main(["--tiny", "--text_encoder", str(folder), "--out_dir", str(tmp_path / "out")])
        assert "\n" not in error.value.code
    start = time.time()
    with pytest.raises(SystemExit, match="could not load the text encoder 'nobody/no-such-model'"):
        m.main(["--tiny", "--text_encoder", "nobody/no-such-model", "--out_dir", str(tmp_path / "out")])
    assert time.time() - start < 15 and not (tmp_path / "out").exists()


def test_api_misuse_says_what_to_pass(data):
    m5 = load(LATENT)
    encoder = m5.CLIPTextEncoder(str(data["clip"]))
    model = m5.TextConditionalDiT(img_size=8, patch_size=2, in_channels=4, embed_dim=32, depth=1, num_heads=2,
                                  context_dim=512)
    with pytest.raises(ValueError, match="context_dim=text_encoder.embed_dim"):
        m5.sample_latent_conditional(model, m5.VAE(channels=8), encoder, ["a cat"])
    with pytest.raises(ValueError, match="pass prompts"):
        m5.sample_latent_conditional(model, m5.VAE(channels=8), encoder)
    for m, call in ((load("03_class_cfg"), lambda m, w: m.sample_conditional(
            m.ConditionalDiT(embed_dim=32, depth=1, num_heads=2), [3], cfg_scale=w)),
            (load(TEXT), lambda m, w: m.sample_text_conditional(tiny_text_dit(m), encoder, ["a cat"], cfg_scale=w)),
            (m5, lambda m, w: m.sample_latent_conditional(model, m.VAE(channels=8), encoder, ["a cat"],
                                                          cfg_scale=w))):
        for w in (float("nan"), float("inf"), -1.0):
            with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
                call(m, w)


def test_vae_ckpt_errors_name_vae_ckpt(data, tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at .*missing.pt.*--vae_ckpt"):
        run_in(LATENT, data["images"], tmp_path / "b", data, "--vae_ckpt", str(tmp_path / "missing.pt"))
    run_in(LATENT, data["images"], tmp_path / "a", data, "--steps", "1")
    with pytest.raises(SystemExit, match="trained with --vae_channels 8, not --vae_channels 16: .*--vae_ckpt"):
        run_in(LATENT, data["images"], tmp_path / "b", data, "--vae_ckpt", str(tmp_path / "a" / "ckpt.pt"),
               "--vae_channels", "16")


def test_a_500_word_prompt_makes_pictures_of_sensible_width(data, tmp_path):
    run(TEXT, tmp_path, data, "--steps", "1")
    prompt = " ".join(["a photo of a very long red car"] * 72)  # about 500 words
    load(TEXT).main(["--out_dir", str(tmp_path), "--sample_only", "--prompts", prompt, "a cat", "--num_samples", "2"])
    for picture in ("samples.png", "cfg_sweep.png", "attention.png", "trajectory.png", "nfe_sweep.png"):
        assert Image.open(tmp_path / picture).width <= 4000, picture


def test_labels_keep_their_spaces():
    """Pillow's old bitmap font drew a space as wide as the gap between letters."""
    m = load("01_flow_mnist")
    assert m.FONT.getlength("a b") - m.FONT.getlength("ab") >= 3
    assert m.fit("a photo of a cat", 1000) == "a photo of a cat"
    cut = m.fit("a photo of a cat " * 100, 120)
    assert cut.endswith("…") and m.FONT.getlength(cut) <= 120
