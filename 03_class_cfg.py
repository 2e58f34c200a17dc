"""Step 3: class-conditional flow matching with classifier-free guidance (CFG).

What this step adds
    The flow of steps 1 and 2 is unchanged: path x_t = (1 - t) * x0 + t * x1 (1), velocity
    v = x1 - x0 (2), loss || v_theta - v ||^2 (3), Euler x_{t - dt} = x_t - dt * v_theta (4).
    The DiT of step 2 now learns v_theta(x_t, t, y): "draw the digit y". The label's embedding
    is added to the time embedding, so it steers every block through adaLN.
    Label dropout: in training each label is replaced by a null class with probability 0.1,
    so the same network also learns the unconditional velocity v_theta(x_t, t, null).
    Classifier-free guidance (Ho & Salimans, 2022) then extrapolates from one to the other:
        v = v_uncond + w * (v_cond - v_uncond)                          (5)
    w = 0 is unconditional, w = 1 the plain conditional model, w > 1 pushes samples
    further towards what makes them "a 7". Both halves run in one batched forward pass.

Run it
    python 03_class_cfg.py                      # full run (downloads MNIST to ./data)
    python 03_class_cfg.py --tiny               # a few seconds, to see that it works
    python 03_class_cfg.py --cfg_scale 2        # resample with another guidance scale:
    python 03_class_cfg.py --sample_only --cfg_scale 2

What to expect
    About 11 minutes on a 2-core laptop CPU (about 390 images/s; a GPU is much faster).
    out/03_class_cfg/ then holds samples.png (row k = digit k), cfg_sweep.png (the same
    noise for every digit at guidance scales 0 to 6), trajectory.png, log.csv and ckpt.pt.
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
    patch_size: int = 4  # 28x28 image -> 7x7 = 49 tokens of 4x4 pixels
    embed_dim: int = 128  # token width
    depth: int = 6  # DiT blocks
    num_heads: int = 4  # attention heads (embed_dim must divide by it)
    mlp_ratio: float = 4.0  # MLP hidden width / embed_dim
    num_classes: int = 10  # digits 0-9; the embedding table has one more row, the null class
    # training
    steps: int = 4000  # optimizer steps (fewer than 02's: CFG sampling costs two passes)
    batch_size: int = 64  # images per step
    lr: float = 1e-3  # peak learning rate
    warmup_steps: int = 100  # linear warmup from 0 to lr, then cosine decay to lr/10
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # clip the gradient norm to this
    ema: bool = True  # sample with an exponential moving average of the weights
    ema_decay: float = 0.999  # EMA decay (warmed up: early steps average over fewer steps)
    time_sampling: str = "logit_normal"  # how training picks t: "logit_normal" or "uniform"
    label_dropout: float = 0.1  # chance that a training label becomes the null class (for CFG)
    # sampling
    sample_steps: int = 50  # Euler steps from t=1 to t=0
    num_samples: int = 80  # images in samples.png, one row per digit
    cfg_scale: float = 2.0  # guidance w in eq. (5): 0 unconditional, 1 conditional, >1 guided
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
TINY = dict(embed_dim=32, depth=2, num_heads=2, steps=20, batch_size=16, warmup_steps=5,
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
    not_negative = ("lr", "weight_decay", "grad_clip", "eval_samples", "warmup_steps", "log_every", "cfg_scale")
    problems += [f"--{name} must not be negative" for name in not_negative if getattr(cfg, name) < 0]
    if not 0 <= cfg.label_dropout <= 1:
        problems.append("--label_dropout must be in [0, 1]")
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
    """All 60,000 training digits as one uint8 tensor [N, 1, 28, 28] on the device,
    and their labels [N].

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
    return dataset.data.unsqueeze(1).to(device), dataset.targets.to(device)


def get_batch(images, labels, batch_size):
    """A random batch scaled from uint8 [0, 255] to float [-1, 1], with its labels."""
    idx = torch.randint(len(images), (batch_size,), device=images.device)
    return images[idx].float() / 127.5 - 1, labels[idx]


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


class ClassEmbedding(nn.Module):
    """A learned vector per class, plus one for the null class ("no label") at index num_classes."""

    def __init__(self, num_classes, dim):
        super().__init__()
        self.null_class = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels):
        return self.embedding(labels)


def patchify(x, p):
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C]: each p x p patch becomes one token."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens, p, c, h, w):
    """The exact inverse of patchify: [B, (H/p)*(W/p), p*p*C] -> [B, C, H, W]."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h // p, w // p, p, p, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


def sincos_pos_embed_2d(dim, grid_size):
    """Fixed 2D sin-cos position embedding [grid*grid, dim]: half the features encode
    the row, half the column, each with the Transformer's sin/cos at many frequencies."""
    def embed_1d(positions, d):
        freqs = 1.0 / 10000 ** (torch.arange(d // 2) / (d // 2))
        angles = positions[:, None] * freqs[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    return torch.cat([embed_1d(rows.flatten().float(), dim // 2),
                      embed_1d(cols.flatten().float(), dim // 2)], dim=1)


def modulate(x, shift, scale):
    """adaLN: a LayerNorm output, shifted and scaled per sample by the conditioning."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head self-attention over the patch tokens."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """A transformer block whose LayerNorms are modulated by the conditioning c (adaLN-Zero).

    From c come a shift, a scale and a gate for each half (attention, MLP). The gates start
    at zero, so every block starts as the identity and training switches it on gradually.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)  # the "Zero" in adaLN-Zero
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    """adaLN, then a linear map from each token to its patch's p*p*C velocity values."""

    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        for layer in (self.adaLN_modulation[-1], self.linear):  # start by predicting v = 0
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class ConditionalDiT(nn.Module):
    """Diffusion Transformer (Peebles & Xie 2023): patchify -> embed + position -> DiT blocks
    conditioned on the time embedding plus the class embedding -> final layer -> unpatchify."""

    def __init__(self, num_classes=10, img_size=28, patch_size=4, in_channels=1, embed_dim=128,
                 depth=6, num_heads=4, mlp_ratio=4.0):
        super().__init__()
        self.num_classes = num_classes
        self.img_size, self.patch_size, self.in_channels = img_size, patch_size, in_channels
        self.patch_embed = nn.Linear(patch_size * patch_size * in_channels, embed_dim)
        grid_size = img_size // patch_size
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, grid_size))
        self.time_embed = TimeEmbedding(embed_dim)
        self.class_embed = ClassEmbedding(num_classes, embed_dim)
        self.blocks = nn.ModuleList(DiTBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(embed_dim, patch_size, in_channels)

    def forward(self, x, t, y):
        tokens = self.patch_embed(patchify(x, self.patch_size)) + self.pos_embed
        c = self.time_embed(t) + self.class_embed(y)  # the label steers every block via adaLN
        for block in self.blocks:
            tokens = block(tokens, c)
        tokens = self.final_layer(tokens, c)
        return unpatchify(tokens, self.patch_size, self.in_channels, self.img_size, self.img_size)


def build_model(cfg):
    if 28 % cfg.patch_size or cfg.embed_dim % 4 or cfg.embed_dim % cfg.num_heads:
        raise SystemExit("error: --patch_size must divide 28; --embed_dim must divide by 4 and by --num_heads")
    return ConditionalDiT(num_classes=cfg.num_classes, img_size=28, patch_size=cfg.patch_size,
                          in_channels=1, embed_dim=cfg.embed_dim, depth=cfg.depth,
                          num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio)


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


def get_conditional_loss(model, x0, labels, label_dropout=0.1, time_sampling="logit_normal"):
    """Flow-matching loss (3) for a batch of data x0 in [-1, 1] with its labels.

    Each label becomes the null class with probability label_dropout, so one network learns
    both the conditional and the unconditional velocity that CFG blends.
    """
    dropped = torch.rand(len(labels), device=labels.device) < label_dropout
    labels = torch.where(dropped, model.num_classes, labels)
    x1 = torch.randn_like(x0)                           # noise
    t = sample_timesteps(len(x0), time_sampling, x0.device)
    t_ = t[:, None, None, None]
    x_t = (1 - t_) * x0 + t_ * x1                       # the straight path (1)
    v_target = x1 - x0                                  # its velocity (2)
    return F.mse_loss(model(x_t, t, labels).float(), v_target)


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


def guided_velocity(model, x, t, labels, cfg_scale):
    """Classifier-free guidance, eq. (5): v = v_uncond + w * (v_cond - v_uncond).

    The conditional and the unconditional (null-class) halves go through one forward pass.
    """
    null = torch.full_like(labels, model.num_classes)
    v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).float().chunk(2)
    return v_uncond + cfg_scale * (v_cond - v_uncond)


def sample_conditional(model, class_labels, cfg_scale=4.0, num_steps=50, image_shape=(1, 28, 28),
                       device=None, trajectory=False):
    """Generate one image in [-1, 1] per class label, with guidance scale cfg_scale;
    trajectory=True returns every Euler state instead."""
    device = torch.device(device or next(model.parameters()).device)
    labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).flatten()
    if labels.numel() and not 0 <= labels.min() <= labels.max() < model.num_classes:
        raise ValueError(f"class labels must be in 0..{model.num_classes - 1}, got {labels.tolist()}")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0 (0 = unconditional, 1 = conditional), got {cfg_scale}")

    def velocity(x, t):
        with autocast(device):
            return guided_velocity(model, x, t, labels, cfg_scale)

    states = euler_sample(velocity, torch.randn(len(labels), *image_shape, device=device), num_steps)
    return [x.clamp(-1, 1) for x in states] if trajectory else states[-1].clamp(-1, 1)


def sample_each_class(model, num_per_class=8, cfg_scale=4.0, num_steps=50, device=None):
    """num_per_class images of every class, in class order: in a grid num_per_class wide,
    row k is class k."""
    labels = torch.arange(model.num_classes).repeat_interleave(num_per_class)
    return sample_conditional(model, labels, cfg_scale, num_steps, device=device)


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


def train(model, ema_model, optimizer, images, labels, cfg, out_dir, start_step, device):
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
                x0, y = get_batch(images, labels, cfg.batch_size)
                loss = get_conditional_loss(model, x0, y, cfg.label_dropout, cfg.time_sampling)
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


def save_grid(images, path, ncol, title="", col_labels=None, row_labels=None, scale=2):
    """Save images [N, C, H, W] in [-1, 1] as a grid PNG with a title, column and row labels."""
    pixels = to_uint8(images).numpy()
    n, h, w, c = pixels.shape
    nrow = math.ceil(n / ncol)
    header = 14 + (12 if col_labels else 0)
    margin = 6 * max(map(len, row_labels)) + 10 if row_labels else 0
    grid = np.full((nrow * (h + 2), ncol * (w + 2), c), 255, np.uint8)
    for i, img in enumerate(pixels):
        r, k = divmod(i, ncol)
        grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, k * (w + 2) + 1:k * (w + 2) + 1 + w] = img
    picture = Image.fromarray(grid.squeeze(-1) if c == 1 else grid).convert("RGB")
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    canvas = Image.new("RGB", (margin + picture.width, picture.height + header), "white")
    canvas.paste(picture, (margin, header))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), title, fill="black")
    for k, label in enumerate(col_labels or []):
        draw.text((margin + k * (w + 2) * scale + 2, 13), label, fill="black")
    for r, label in enumerate(row_labels or []):
        draw.text((2, header + r * (h + 2) * scale + h * scale // 2 - 5), label, fill="black")
    canvas.save(path)


def write_outputs(model, cfg, out_dir, device, step):
    """samples.png, cfg_sweep.png, trajectory.png and, with --eval_samples, samples.npz."""
    model.eval()
    torch.manual_seed(cfg.seed)  # the same noise whenever this checkpoint is sampled
    per_class = max(1, cfg.num_samples // cfg.num_classes)
    images = sample_each_class(model, per_class, cfg.cfg_scale, cfg.sample_steps, device=device)
    save_grid(images, out_dir / "samples.png", ncol=per_class, row_labels=list(map(str, range(cfg.num_classes))),
              title=f"{SCRIPT}, step {step}, w={cfg.cfg_scale:g}")

    scales = [0, 1, 2, 3, 4, 6]
    sweep = []
    for w in scales:
        torch.manual_seed(cfg.seed)  # the same noise at every scale
        sweep.append(sample_conditional(model, torch.arange(cfg.num_classes), w, cfg.sample_steps, device=device))
    save_grid(torch.stack(sweep, dim=1).flatten(0, 1), out_dir / "cfg_sweep.png", ncol=len(scales),
              title="guidance scale w", col_labels=[f"w={w}" for w in scales],
              row_labels=list(map(str, range(cfg.num_classes))))

    states = sample_conditional(model, torch.arange(8) % cfg.num_classes, cfg.cfg_scale, cfg.sample_steps,
                                device=device, trajectory=True)
    keep = torch.linspace(0, cfg.sample_steps, 8).round().long().tolist()
    frames = torch.stack([states[i] for i in keep], dim=1)  # [8 samples, 8 times, C, H, W]
    save_grid(frames.flatten(0, 1), out_dir / "trajectory.png", ncol=len(keep),
              title="noise (t=1) -> data (t=0)", col_labels=[f"t={1 - i / cfg.sample_steps:.2f}" for i in keep])

    if cfg.eval_samples:  # 500 images at a time, so memory stays small for any N
        labels = torch.arange(cfg.eval_samples) % cfg.num_classes  # equal numbers of every digit
        chunks = [sample_conditional(model, labels[n:n + 500], cfg.cfg_scale, cfg.sample_steps, device=device)
                  for n in range(0, cfg.eval_samples, 500)]
        np.savez_compressed(out_dir / "samples.npz", images=to_uint8(torch.cat(chunks)).numpy(),
                            labels=labels.numpy())
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
        images, labels = load_mnist(cfg.data_dir, device)
        train(model, ema_model, optimizer, images, labels, cfg, out_dir, step, device)
        step = max(step, cfg.steps)
    write_outputs(ema_model, cfg, out_dir, device, step)


if __name__ == "__main__":
    main()
