"""Step 1: unconditional flow matching on MNIST.

What this step adds
    The whole idea of flow matching, with a small U-Net as the network.
    A straight path joins each training image x0 to a noise sample x1:
        x_t = (1 - t) * x0 + t * x1,        t in [0, 1]               (1)
    Along it the velocity is constant:
        v = dx_t/dt = x1 - x0                                           (2)
    The network v_theta(x_t, t) learns to predict it with a plain MSE loss:
        L = E_{x0, x1, t} || v_theta(x_t, t) - (x1 - x0) ||^2           (3)
    To generate, start from noise at t = 1 and walk back to t = 0 with Euler:
        x_{t - dt} = x_t - dt * v_theta(x_t, t)                         (4)

Run it
    python 01_flow_mnist.py                     # full run (downloads MNIST to ./data)
    python 01_flow_mnist.py --tiny              # a few seconds, to see that it works
    python 01_flow_mnist.py --help              # every flag, generated from Config

What to expect
    About 12 minutes on a 2-core laptop CPU (about 250 images/s; a GPU is much faster).
    out/01_flow_mnist/ then holds samples.png (64 random digits), trajectory.png
    (noise turning into digits as t goes from 1 to 0), log.csv and ckpt.pt.
"""

import argparse
import copy
import csv
import dataclasses
import io
import math
import os
import sys
import time
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.datasets import MNIST

SCRIPT = Path(__file__).stem  # written into checkpoints, so another script's are refused


# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    # data and outputs
    data_dir: str = "./data"  # MNIST is downloaded here when missing
    out_dir: str = ""  # where outputs go; empty means out/<script name>
    # model
    base_channels: int = 32  # U-Net width at 28x28; doubled at 14x14 and 7x7
    time_dim: int = 128  # size of the time embedding
    # training
    steps: int = 2800  # optimizer steps
    batch_size: int = 64  # images per step
    lr: float = 1e-3  # peak learning rate
    warmup_steps: int = 100  # linear warmup from 0 to lr, then cosine decay to lr/10
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # clip the gradient norm to this
    ema: bool = True  # sample with an exponential moving average of the weights
    ema_decay: float = 0.999  # EMA decay (warmed up: early steps average over fewer steps)
    time_sampling: str = "logit_normal"  # how training picks t: "logit_normal" or "uniform"
    # sampling
    sample_steps: int = 50  # Euler steps from t=1 to t=0
    num_samples: int = 64  # images in samples.png
    eval_samples: int = 0  # if > 0, also write this many samples to samples.npz
    # run
    seed: int = 0  # makes a run repeatable on one device
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    log_every: float = 5.0  # seconds between progress lines
    ckpt_every: int = 500  # steps between checkpoints
    resume: bool = False  # continue training from out_dir/ckpt.pt
    sample_only: bool = False  # load out_dir/ckpt.pt and only write the outputs
    tiny: bool = False  # a seconds-long run with a tiny model, for tests and a first look


# --tiny shrinks everything that costs time; flags given explicitly still win.
TINY = dict(base_channels=8, time_dim=32, steps=20, batch_size=16, warmup_steps=5,
            sample_steps=4, num_samples=16, log_every=1.0)


def parse_config(argv=None):
    """Build Config from the command line: one flag per field, so the CLI cannot drift."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     argument_default=argparse.SUPPRESS)
    parser.error = lambda message: parser.exit(2, f"error: {message} (--help lists every flag)\n")
    for f in dataclasses.fields(Config):
        if f.type is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction,
                                help=f"default: {f.default}")
        else:
            parser.add_argument(f"--{f.name}", type=f.type, metavar=f.type.__name__.upper(),
                                help=f"default: {f.default}")
    given = vars(parser.parse_args(argv))  # only the flags actually typed
    cfg = Config(**{**(TINY if given.get("tiny") else {}), **given})
    at_least_1 = ("steps", "batch_size", "sample_steps", "num_samples", "ckpt_every")
    problems = [f"--{name} must be at least 1" for name in at_least_1 if getattr(cfg, name) < 1]
    not_negative = ("lr", "weight_decay", "grad_clip", "eval_samples", "warmup_steps", "log_every")
    problems += [f"--{name} must not be negative" for name in not_negative if getattr(cfg, name) < 0]
    if not 0 <= cfg.ema_decay < 1:
        problems.append("--ema_decay must be in [0, 1)")
    if cfg.time_sampling not in ("logit_normal", "uniform"):
        problems.append("--time_sampling must be logit_normal or uniform")
    if problems:
        parser.error("; ".join(problems))
    return cfg, given


# ----------------------------------------------------------------------------- device

def pick_device(name):
    """cuda, then mps, then cpu; --device forces one."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: unknown --device {name!r}: use auto, cpu, cuda or mps")
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise SystemExit(f"error: --device {name} is not available here: use --device auto")
    return device


def autocast(device):
    """bf16 autocast on CUDA (faster, same results in practice); float32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------- data

def load_mnist(data_dir, device):
    """All 60,000 training digits as one uint8 tensor [N, 1, 28, 28] on the device.

    MNIST fits in memory, so batches are drawn by index: no DataLoader, no per-image work.
    """
    try:
        dataset = MNIST(data_dir, train=True, download=False)
    except RuntimeError:
        print(f"downloading MNIST to {data_dir} ...", flush=True)
        try:
            with redirect_stdout(io.StringIO()):  # torchvision prints every mirror it tries
                dataset = MNIST(data_dir, train=True, download=True)
        except Exception:
            raise SystemExit(
                f"error: MNIST is not in {data_dir} and could not be downloaded: put "
                f"train-images-idx3-ubyte and train-labels-idx1-ubyte (and the t10k files) "
                f"in {Path(data_dir) / 'MNIST' / 'raw'}, or pass --data_dir")
    return dataset.data.unsqueeze(1).to(device)


def get_batch(images, batch_size):
    """A random batch scaled from uint8 [0, 255] to float [-1, 1]."""
    idx = torch.randint(len(images), (batch_size,), device=images.device)
    return images[idx].float() / 127.5 - 1


# ----------------------------------------------------------------------------- model

class TimeEmbedding(nn.Module):
    """t in [0, 1] -> sinusoidal features (as in the Transformer) -> MLP."""

    def __init__(self, dim, freq_dim=128, max_period=10000.0):
        super().__init__()
        half = freq_dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half))
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        angles = 1000 * t[:, None] * self.freqs[None]  # scale t so that small steps in t matter
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1))


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with the time embedding added in between."""

    def __init__(self, in_ch, out_ch, time_dim):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_ch)
        self.norm2 = nn.GroupNorm(8, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, t_emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(t_emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    """A small U-Net: 28x28 -> 14x14 -> 7x7 and back, with skip connections."""

    def __init__(self, in_channels=1, base_channels=32, time_dim=128):
        super().__init__()
        c1, c2, c3 = base_channels, 2 * base_channels, 4 * base_channels
        self.time_embed = TimeEmbedding(time_dim)
        self.stem = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, time_dim)                      # 28x28
        self.pool1 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)       # -> 14x14
        self.down2 = ResBlock(c1, c2, time_dim)                      # 14x14
        self.pool2 = nn.Conv2d(c2, c2, 3, stride=2, padding=1)       # -> 7x7
        self.mid1 = ResBlock(c2, c3, time_dim)                       # 7x7
        self.mid2 = ResBlock(c3, c3, time_dim)
        self.unpool2 = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(c3, c2, 3, padding=1))
        self.up2 = ResBlock(c2 + c2, c2, time_dim)                   # 14x14, with skip
        self.unpool1 = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(c2, c1, 3, padding=1))
        self.up1 = ResBlock(c1 + c1, c1, time_dim)                   # 28x28, with skip
        self.out = nn.Sequential(nn.GroupNorm(8, c1), nn.SiLU(), nn.Conv2d(c1, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # start by predicting v = 0
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t):
        t_emb = self.time_embed(t)
        h1 = self.down1(self.stem(x), t_emb)
        h2 = self.down2(self.pool1(h1), t_emb)
        h = self.mid2(self.mid1(self.pool2(h2), t_emb), t_emb)
        h = self.up2(torch.cat([self.unpool2(h), h2], dim=1), t_emb)
        h = self.up1(torch.cat([self.unpool1(h), h1], dim=1), t_emb)
        return self.out(h)


def build_model(cfg):
    if cfg.base_channels % 8:
        raise SystemExit("error: --base_channels must divide by 8 (GroupNorm uses 8 groups)")
    return UNet(in_channels=1, base_channels=cfg.base_channels, time_dim=cfg.time_dim)


# ----------------------------------------------------------------------------- flow-matching loss

def sample_timesteps(batch_size, time_sampling, device):
    """t ~ U(0, 1), or logit-normal: sigmoid of a standard normal (SD3, Esser et al. 2024).

    Logit-normal spends more steps at middle t, where predicting v is hardest; the ends
    (almost pure data or pure noise) are easy. On MNIST it gave lower Frechet distance than
    uniform for the same training time (see README), so it is the default.
    """
    if time_sampling == "uniform":
        return torch.rand(batch_size, device=device)
    return torch.sigmoid(torch.randn(batch_size, device=device))


def get_loss(model, x0, time_sampling="logit_normal"):
    """Flow-matching loss (3) for a batch of data x0 in [-1, 1]."""
    x1 = torch.randn_like(x0)                           # noise
    t = sample_timesteps(len(x0), time_sampling, x0.device)
    t_ = t[:, None, None, None]
    x_t = (1 - t_) * x0 + t_ * x1                       # the straight path (1)
    v_target = x1 - x0                                  # its velocity (2)
    return F.mse_loss(model(x_t, t).float(), v_target)


# ----------------------------------------------------------------------------- sampler

@torch.no_grad()
def euler_sample(velocity, x, num_steps):
    """Integrate dx/dt = velocity(x, t) from t = 1 (noise) to t = 0 (data), eq. (4).

    Returns every state [x at t=1, ..., x at t=0], so a caller can show the trajectory.
    """
    ts = torch.linspace(1, 0, num_steps + 1, device=x.device)
    states = [x]
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = velocity(x, t.expand(len(x)))
        x = x + (t_next - t) * v  # t_next - t = -dt < 0: a step back in time
        states.append(x)
    return states


def sample(model, num_samples, num_steps=50, image_shape=(1, 28, 28), device=None, trajectory=False):
    """Generate images in [-1, 1]; trajectory=True returns every Euler state instead."""
    device = torch.device(device or next(model.parameters()).device)

    def velocity(x, t):
        with autocast(device):
            return model(x, t).float()

    states = euler_sample(velocity, torch.randn(num_samples, *image_shape, device=device), num_steps)
    return [x.clamp(-1, 1) for x in states] if trajectory else states[-1].clamp(-1, 1)


# ----------------------------------------------------------------------------- training

def lr_at(step, cfg):
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def update_ema(ema_model, model, step, decay):
    """ema <- d * ema + (1 - d) * weights, with d warmed up so short runs benefit too."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema_model.parameters(), model.parameters()):
        e.lerp_(p, 1 - d)


def save_checkpoint(path, model, ema_model, optimizer, cfg, step):
    """Write to a temporary file, then rename: a crash never leaves half a checkpoint."""
    state = {"script": SCRIPT, "config": dataclasses.asdict(cfg), "step": step,
             "model": model.state_dict(), "ema": ema_model.state_dict(),
             "optimizer": optimizer.state_dict()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """Read a checkpoint of this script; anything else stops with a clear message."""
    if not path.exists():
        raise SystemExit(f"error: no checkpoint at {path}: train first (without --resume/--sample_only)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise SystemExit(f"error: {path} is corrupt or not a checkpoint: delete it or use another --out_dir")
    if not isinstance(ckpt, dict) or ckpt.get("script") != SCRIPT:
        owner = ckpt.get("script", "something else") if isinstance(ckpt, dict) else "something else"
        raise SystemExit(f"error: {path} was written by {owner}, not {SCRIPT}: use another --out_dir")
    return ckpt


def format_time(seconds):
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def train(model, ema_model, optimizer, images, cfg, out_dir, start_step, device):
    """The training loop: progress lines, log.csv, checkpoints, Ctrl-C and NaN handling."""
    ckpt_path = out_dir / "ckpt.pt"
    log_file = open(out_dir / "log.csv", "a" if start_step else "w", newline="")
    log = csv.writer(log_file)
    if not start_step:
        log.writerow(["step", "loss", "lr", "images_per_s"])
    print(f"training {SCRIPT}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"steps {start_step}->{cfg.steps}, batch {cfg.batch_size}, on {device}", flush=True)
    t_start = t_last = time.time()
    loss_sum, loss_count, step_last = 0.0, 0, start_step
    step = start_step
    try:
        while step < cfg.steps:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device):
                loss = get_loss(model, get_batch(images, cfg.batch_size), cfg.time_sampling)
            if not torch.isfinite(loss):
                raise SystemExit(f"error: loss became {loss.item()} at step {step}; {ckpt_path} keeps "
                                 f"the last good state: try a lower --lr, then --resume")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            update_ema(ema_model, model, step, cfg.ema_decay if cfg.ema else 0.0)
            step += 1
            loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1

            now = time.time()
            if now - t_last >= cfg.log_every or step == cfg.steps or step == start_step + 10:
                speed = (step - step_last) * cfg.batch_size / (now - t_last)
                eta = (cfg.steps - step) * cfg.batch_size / speed
                print(f"step {step:>6}/{cfg.steps} | loss {loss_sum / loss_count:.4f} | "
                      f"{speed:6.0f} img/s | {format_time(now - t_start)} elapsed | "
                      f"ETA {format_time(eta)}", flush=True)
                log.writerow([step, f"{loss_sum / loss_count:.5f}", f"{lr:.3g}", f"{speed:.1f}"])
                log_file.flush()
                t_last, step_last, loss_sum, loss_count = now, step, 0.0, 0
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                save_checkpoint(ckpt_path, model, ema_model, optimizer, cfg, step)
    except KeyboardInterrupt:
        save_checkpoint(ckpt_path, model, ema_model, optimizer, cfg, step)
        raise SystemExit(f"\ninterrupted at step {step}: saved {ckpt_path}; add --resume to continue")
    finally:
        log_file.close()


# ----------------------------------------------------------------------------- outputs

def to_uint8(images):
    """[-1, 1] float [N, C, H, W] -> uint8 [N, H, W, C]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_grid(images, path, ncol, title="", col_labels=None, scale=2):
    """Save images [N, C, H, W] in [-1, 1] as a grid PNG with a title and column labels."""
    pixels = to_uint8(images).numpy()
    n, h, w, c = pixels.shape
    nrow = math.ceil(n / ncol)
    header = 14 + (12 if col_labels else 0)
    grid = np.full((nrow * (h + 2), ncol * (w + 2), c), 255, np.uint8)
    for i, img in enumerate(pixels):
        r, k = divmod(i, ncol)
        grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, k * (w + 2) + 1:k * (w + 2) + 1 + w] = img
    picture = Image.fromarray(grid.squeeze(-1) if c == 1 else grid).convert("RGB")
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    canvas = Image.new("RGB", (picture.width, picture.height + header), "white")
    canvas.paste(picture, (0, header))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), title, fill="black")
    for k, label in enumerate(col_labels or []):
        draw.text((k * (w + 2) * scale + 2, 13), label, fill="black")
    canvas.save(path)


def write_outputs(model, cfg, out_dir, device, step):
    """samples.png, trajectory.png and, with --eval_samples, samples.npz."""
    model.eval()
    torch.manual_seed(cfg.seed)  # the same noise whenever this checkpoint is sampled
    images = sample(model, cfg.num_samples, cfg.sample_steps, device=device)
    save_grid(images, out_dir / "samples.png", ncol=8,
              title=f"{SCRIPT}, step {step}, {cfg.sample_steps} Euler steps")

    states = sample(model, 8, cfg.sample_steps, device=device, trajectory=True)
    keep = torch.linspace(0, cfg.sample_steps, 8).round().long().tolist()
    frames = torch.stack([states[i] for i in keep], dim=1)  # [8 samples, 8 times, C, H, W]
    save_grid(frames.flatten(0, 1), out_dir / "trajectory.png", ncol=len(keep),
              title="noise (t=1) -> data (t=0)", col_labels=[f"t={1 - i / cfg.sample_steps:.2f}" for i in keep])

    if cfg.eval_samples:  # 500 images at a time, so memory stays small for any N
        chunks = [sample(model, min(500, cfg.eval_samples - n), cfg.sample_steps, device=device)
                  for n in range(0, cfg.eval_samples, 500)]
        np.savez_compressed(out_dir / "samples.npz", images=to_uint8(torch.cat(chunks)).numpy(),
                            labels=np.full(cfg.eval_samples, -1, np.int64))
    print(f"wrote {', '.join(sorted(p.name for p in out_dir.iterdir() if p.suffix in ('.png', '.npz')))} "
          f"to {out_dir}", flush=True)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    cfg, given = parse_config(argv)
    out_dir = Path(cfg.out_dir or Path("out") / SCRIPT)
    ckpt = None
    if cfg.resume or cfg.sample_only:
        ckpt = load_checkpoint(out_dir / "ckpt.pt")
        # keep the checkpoint's settings (its model size above all), except flags typed now
        cfg = Config(**{**ckpt["config"], **(TINY if given.get("tiny") else {}), **given})
    device = pick_device(cfg.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    model = build_model(cfg).to(device)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    if ckpt:
        try:
            model.load_state_dict(ckpt["model"])
            ema_model.load_state_dict(ckpt["ema"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError):
            flags = " ".join(f"--{k} {v}" for k, v in ckpt["config"].items()
                             if k in given and given[k] != v)
            raise SystemExit(f"error: {out_dir / 'ckpt.pt'} holds a model of another shape (it was trained "
                             f"with {flags or 'other settings'}): drop those flags or use another --out_dir")
        step = ckpt["step"]
    if not cfg.sample_only:
        images = load_mnist(cfg.data_dir, device)
        train(model, ema_model, optimizer, images, cfg, out_dir, step, device)
        step = max(step, cfg.steps)
    write_outputs(ema_model, cfg, out_dir, device, step)


if __name__ == "__main__":
    main()
