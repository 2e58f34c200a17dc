"""Tests for the series: `pytest test_all.py`.

Offline and small: the tests write their own tiny MNIST in torchvision's raw format and run
each script end to end in --tiny mode. They also check the math on the functions themselves.
"""

import importlib
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
MNIST_SCRIPTS = ["01_flow_mnist", "02_dit_mnist", "03_class_cfg"]
UNCONDITIONAL = ["01_flow_mnist", "02_dit_mnist"]


def load(name):
    return importlib.import_module(name)


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    """A fake MNIST (random strokes) in torchvision's raw idx format: the real loader runs."""
    root = tmp_path_factory.mktemp("data")
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


def run(name, out_dir, data_dir, *flags):
    load(name).main(["--tiny", "--data_dir", str(data_dir), "--out_dir", str(out_dir), *flags])


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------- the math

@pytest.mark.parametrize("name", MNIST_SCRIPTS)
@pytest.mark.parametrize("num_steps", [1, 3, 10])
def test_euler_follows_a_straight_flow_exactly(name, num_steps):
    """For one data point x0 the true velocity is v = (x_t - x0) / t = x1 - x0, constant along
    the path, so Euler from x1 at t=1 must land on x0 and pass through x_t = (1-t) x0 + t x1."""
    m = load(name)
    x0, x1 = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
    states = m.euler_sample(lambda x, t: (x - x0) / t[:, None, None, None], x1, num_steps)
    assert len(states) == num_steps + 1
    assert torch.allclose(states[0], x1)
    assert torch.allclose(states[-1], x0, atol=1e-5)
    t = 1 - 1 / num_steps
    assert torch.allclose(states[1], (1 - t) * x0 + t * x1, atol=1e-5)


@pytest.mark.parametrize("name", MNIST_SCRIPTS)
def test_euler_moves_against_the_velocity(name):
    """x <- x - dt * v from t=1 to 0: a constant velocity c moves the noise by -c in total."""
    m = load(name)
    noise, c = torch.randn(2, 1, 28, 28), torch.randn(2, 1, 28, 28)
    assert torch.allclose(m.euler_sample(lambda x, t: c, noise, 7)[-1], noise - c, atol=1e-5)


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


@pytest.mark.parametrize("name", MNIST_SCRIPTS)
def test_time_sampling(name):
    m = load(name)
    for mode in ("uniform", "logit_normal"):
        t = m.sample_timesteps(20000, mode, "cpu")
        assert 0 < t.min() and t.max() < 1 and abs(t.mean() - 0.5) < 0.01
    # logit-normal concentrates on the middle: far fewer t near the ends than uniform's 20%
    t = m.sample_timesteps(20000, "logit_normal", "cpu")
    assert ((t < 0.1) | (t > 0.9)).float().mean() < 0.06


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
    x, t, y = torch.randn(4, 1, 28, 28), torch.rand(4), torch.tensor([7, 0, 3, 9])
    v_cond, v_uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
    assert not torch.allclose(v_cond, v_uncond)
    assert torch.allclose(m.guided_velocity(model, x, t, y, 1.0), v_cond, atol=1e-5)
    assert torch.allclose(m.guided_velocity(model, x, t, y, 0.0), v_uncond, atol=1e-5)
    assert torch.allclose(m.guided_velocity(model, x, t, y, 3.0), v_uncond + 3 * (v_cond - v_uncond), atol=1e-4)
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
    assert samples.shape == (4, 1, 28, 28) and samples.abs().max() <= 1
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


def test_patchify_then_unpatchify_is_the_identity():
    m = load("02_dit_mnist")
    for c, size, p in ((1, 28, 4), (3, 32, 4), (4, 8, 2)):
        x = torch.randn(2, c, size, size)
        tokens = m.patchify(x, p)
        assert tokens.shape == (2, (size // p) ** 2, p * p * c)
        assert torch.equal(m.unpatchify(tokens, p, c, size, size), x)
        # token 1 is the patch in the first row, second column
        assert torch.equal(tokens[:, 1], x[:, :, :p, p:2 * p].permute(0, 2, 3, 1).reshape(2, -1))


def test_position_embedding_is_distinct_per_patch():
    m = load("02_dit_mnist")
    pe = m.sincos_pos_embed_2d(64, 7)
    assert pe.shape == (49, 64)
    assert torch.cdist(pe, pe).add(torch.eye(49)).min() > 0.1  # no two positions alike


def test_adaln_zero_blocks_start_as_the_identity():
    m = load("02_dit_mnist")
    block = m.DiTBlock(32, 4)
    x, c = torch.randn(2, 49, 32), torch.randn(2, 32)
    assert torch.equal(block(x, c), x)


@pytest.mark.parametrize("name", MNIST_SCRIPTS)
def test_lr_warms_up_then_decays_to_a_tenth(name):
    m = load(name)
    cfg = m.Config(lr=1.0, warmup_steps=10, steps=100)
    lrs = [m.lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert m.lr_at(100, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("name", MNIST_SCRIPTS)
def test_ema_averages_the_weights(name):
    m = load(name)
    model, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    torch.nn.init.zeros_(ema.weight)
    torch.nn.init.ones_(model.weight)
    m.update_ema(ema, model, step=0, decay=0.999)  # warmup: d = 1/10 at the first step
    assert torch.allclose(ema.weight, torch.full((2, 2), 0.9))
    m.update_ema(ema, model, step=10**6, decay=0.5)  # later: d = the decay
    assert torch.allclose(ema.weight, torch.full((2, 2), 0.95))


# ----------------------------------------------------------------------------- the CLI

@pytest.mark.parametrize("name", MNIST_SCRIPTS)
def test_every_config_field_is_a_flag(name):
    m = load(name)
    cfg, given = m.parse_config(["--tiny", "--steps", "3", "--no-ema", "--lr", "0.5"])
    assert (cfg.steps, cfg.ema, cfg.lr, cfg.batch_size) == (3, False, 0.5, m.TINY["batch_size"])
    assert set(given) == {"tiny", "steps", "ema", "lr"}
    help_text = run_cli(f"{name}.py", "--help").stdout
    for field in m.Config.__dataclass_fields__:
        assert f"--{field}" in help_text


@pytest.mark.parametrize("name", MNIST_SCRIPTS)
@pytest.mark.parametrize("flags, message", [
    (["--no_such_flag"], "unrecognized arguments"),
    (["--steps", "ten"], "invalid int value"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--ckpt_every", "0", "--grad_clip", "-1"], "--ckpt_every must be at least 1; --grad_clip must not be negative"),
    (["--time_sampling", "cubic"], "--time_sampling must be logit_normal or uniform"),
    (["--device", "tpu9"], "--device"),
])
def test_bad_flags_fail_with_one_clear_line(name, flags, message, tmp_path):
    result = run_cli(str(ROOT / f"{name}.py"), *flags, "--out_dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, message", [(["--cfg_scale", "-1"], "--cfg_scale must not be negative"),
                                            (["--label_dropout", "1.5"], "--label_dropout must be in [0, 1]")])
def test_bad_guidance_flags_fail_with_one_clear_line(flags, message, tmp_path):
    result = run_cli(str(ROOT / "03_class_cfg.py"), *flags, "--out_dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == f"error: {message} (--help lists every flag)\n"


@pytest.mark.parametrize("name", MNIST_SCRIPTS)
def test_import_only_defines_things(name, tmp_path):
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import importlib; importlib.import_module({name!r})"
    result = run_cli("-c", code, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- runs end to end

@pytest.mark.parametrize("name", MNIST_SCRIPTS)
def test_tiny_run_writes_every_output(name, mnist_dir, tmp_path):
    run(name, tmp_path, mnist_dir, "--eval_samples", "20")
    for file in ("samples.png", "trajectory.png", "log.csv", "ckpt.pt", "samples.npz"):
        assert (tmp_path / file).exists(), file
    log = (tmp_path / "log.csv").read_text().splitlines()
    assert log[0] == "step,loss,lr,images_per_s" and log[-1].startswith(f"{load(name).TINY['steps']},")
    npz = np.load(tmp_path / "samples.npz")
    assert npz["images"].shape == (20, 28, 28, 1) and npz["images"].dtype == np.uint8
    assert npz["labels"].dtype == np.int64
    if name == "03_class_cfg":  # two of every digit, and the guidance sweep
        assert (np.bincount(npz["labels"]) == 2).all() and len(np.bincount(npz["labels"])) == 10
        assert (tmp_path / "cfg_sweep.png").exists()
    else:
        assert (npz["labels"] == -1).all()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["script"] == name and ckpt["step"] == load(name).TINY["steps"]
    assert {"model", "ema", "optimizer", "config"} <= set(ckpt)
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left nothing behind


@pytest.mark.parametrize("name", MNIST_SCRIPTS)
def test_seed_makes_a_run_repeatable(name, mnist_dir, tmp_path):
    run(name, tmp_path / "a", mnist_dir, "--steps", "3", "--eval_samples", "4")
    run(name, tmp_path / "b", mnist_dir, "--steps", "3", "--eval_samples", "4")
    run(name, tmp_path / "c", mnist_dir, "--steps", "3", "--eval_samples", "4", "--seed", "1")
    a, b, c = (np.load(tmp_path / d / "samples.npz")["images"] for d in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("name", MNIST_SCRIPTS)
def test_resume_and_sample_only(name, mnist_dir, tmp_path):
    run(name, tmp_path, mnist_dir, "--steps", "4")
    run(name, tmp_path, mnist_dir, "--steps", "7", "--resume")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 7
    assert [line.split(",")[0] for line in (tmp_path / "log.csv").read_text().splitlines()][-1] == "7"
    before = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "samples.png").unlink()
    # --sample_only needs no data and no repeated flags: the checkpoint's config is used
    load(name).main(["--out_dir", str(tmp_path), "--sample_only", "--data_dir", "/nonexistent"])
    assert (tmp_path / "samples.png").exists()
    assert (tmp_path / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("writer, reader", [("01_flow_mnist", "02_dit_mnist"), ("02_dit_mnist", "03_class_cfg")])
def test_checkpoint_of_another_script_is_refused(writer, reader, mnist_dir, tmp_path):
    run(writer, tmp_path, mnist_dir, "--steps", "2")
    with pytest.raises(SystemExit, match=f"written by {writer}, not {reader}"):
        load(reader).main(["--out_dir", str(tmp_path), "--sample_only"])


@pytest.mark.parametrize("name", MNIST_SCRIPTS)
def test_corrupt_missing_or_mismatched_checkpoint_is_refused(name, mnist_dir, tmp_path):
    m = load(name)
    with pytest.raises(SystemExit, match="no checkpoint"):
        m.main(["--out_dir", str(tmp_path), "--sample_only"])
    run(name, tmp_path, mnist_dir, "--steps", "2")
    wider = {"01_flow_mnist": ["--base_channels", "16"]}.get(name, ["--embed_dim", "64"])
    with pytest.raises(SystemExit, match="model of another shape") as error:
        m.main(["--out_dir", str(tmp_path), "--sample_only", *wider])
    assert wider[0] in str(error.value.code)
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="corrupt"):
        m.main(["--out_dir", str(tmp_path), "--sample_only"])
    result = run_cli(str(ROOT / f"{name}.py"), "--out_dir", str(tmp_path), "--sample_only", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "corrupt" in result.stderr


@pytest.mark.parametrize("name", MNIST_SCRIPTS)
def test_missing_data_without_network_says_where_to_put_it(name, tmp_path, monkeypatch):
    m = load(name)

    def no_network(self):
        raise RuntimeError("no network")

    monkeypatch.setattr(m.MNIST, "download", no_network)
    with pytest.raises(SystemExit, match="MNIST.raw") as error:
        m.main(["--tiny", "--data_dir", str(tmp_path / "empty"), "--out_dir", str(tmp_path)])
    assert "\n" not in error.value.code and "train-images-idx3-ubyte" in error.value.code


@pytest.mark.parametrize("name", MNIST_SCRIPTS)
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(name, mnist_dir, tmp_path, monkeypatch):
    m = load(name)
    run(name, tmp_path, mnist_dir, "--steps", "2")
    good = (tmp_path / "ckpt.pt").read_bytes()
    loss_name = "get_conditional_loss" if name == "03_class_cfg" else "get_loss"
    monkeypatch.setattr(m, loss_name, lambda *args: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit, match="loss became nan at step 2"):
        run(name, tmp_path, mnist_dir, "--steps", "4", "--resume")
    assert (tmp_path / "ckpt.pt").read_bytes() == good


@pytest.mark.parametrize("name", MNIST_SCRIPTS)
def test_ctrl_c_saves_a_checkpoint(name, mnist_dir, tmp_path, monkeypatch):
    m = load(name)
    calls = []
    real_get_batch = m.get_batch

    def interrupted_on_the_fourth_batch(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_get_batch(*args)

    monkeypatch.setattr(m, "get_batch", interrupted_on_the_fourth_batch)
    with pytest.raises(SystemExit, match="interrupted at step 3"):
        run(name, tmp_path, mnist_dir, "--steps", "10")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 3
