"""Step 2: the same flow matching, with a Diffusion Transformer (DiT) as the network.

What this step adds
    Flow, loss and samplers stay step 1's (equations (1) to (4b)). The U-Net becomes a Diffusion Transformer (DiT,
    Peebles & Xie, 2023), the architecture of SD3 and Flux:
      1. patchify: 7x7 patches of the 28x28 image -> 4x4 = 16 tokens, linearly embedded, plus 2D sin-cos positions
      2. blocks of attention and an MLP with a 3x3 conv over the tokens, shifted, scaled and gated by t (adaLN-Zero)
      3. a final adaLN layer: each token paints a 13x13 patch around its 7x7 one, blended where they overlap: no seams
    A small DiT learns shapes slowly. What helps it (README): Muon, 16 tokens, the conv, a long EMA, 6 Heun steps.

Run it (about 33 minutes on a 2-core laptop CPU; outputs in out/02_dit_mnist/, the README shows each)
    python 02_dit_mnist.py                      # full run (downloads MNIST to ./data)
    python 02_dit_mnist.py --tiny               # a few seconds, to see that it works; --help lists every flag
"""

import argparse, copy, csv, dataclasses, inspect, io, math, os, re, shutil, signal, time
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.datasets import MNIST
from torchvision.utils import make_grid

SCRIPT = Path(__file__).stem  # written into checkpoints, so another script's are refused

# ----------------------------------------------------------------------------- config

@dataclasses.dataclass
class Config:
    data_dir: str = "./data"  # MNIST is downloaded here when missing
    out_dir: str = ""  # where outputs go; empty means out/<script name>
    patch_size: int = 7  # 28x28 image -> 4x4 = 16 tokens of 7x7 pixels (4: 49 tokens, 2.5x slower); must be at least 1
    embed_dim: int = 128  # token width; must be at least 1
    depth: int = 6  # DiT blocks; must be at least 1
    num_heads: int = 4  # attention heads (embed_dim must divide by it); must be at least 1
    mlp_ratio: float = 4.0  # MLP hidden width / embed_dim; must be above 0
    steps: int = 5400  # optimizer steps; must be at least 1
    batch_size: int = 128  # images per step (Muon costs per step: 64 gives 1.35x fewer images/s); must be at least 1
    lr: float = 8e-3  # learning rate, after a linear warmup (8x the U-Net's: see the README); must not be negative
    adam_beta2: float = 0.95  # AdamW's second-moment decay (PyTorch's default: 0.999); must be in [0, 1)
    muon_steps: int = 3  # Newton-Schulz steps per Muon update (0: plain AdamW); must not be negative
    warmup_steps: int = 100  # linear warmup from 0 to lr, then constant; must not be negative
    weight_decay: float = 0.0  # AdamW weight decay; must not be negative
    grad_clip: float = 1.0  # clip the gradient norm to this; must be above 0
    ema: bool = True  # sample with an exponential moving average of the weights
    ema_window: float = 0.3  # the EMA averages over about the last 30% (this share) of the steps; must be above 0
    time_sampling: str = "logit_normal"  # how training picks t; must be logit_normal or uniform
    time_mean: float = 0.5  # the logit-normal's mean: above 0 trains more near the noise, where shapes are decided
    sampler: str = "heun"  # "euler" (4) or "heun" (4b); must be euler or heun
    sample_steps: int = 6  # sampler steps from t=1 to 0 (N Heun: 2N - 1 NFE; 6: a DiT's paths bend); must be at least 1
    num_samples: int = 64  # images in samples.png; must be at least 1
    eval_samples: int = 0  # if > 0, also write this many samples to samples.npz; must not be negative
    seed: int = 0  # makes a run repeatable on one device
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    log_every: float = 5.0  # seconds between progress lines; must not be negative
    ckpt_every: int = 500  # steps between checkpoints; must be at least 1
    resume: bool = False  # continue training from out_dir/ckpt.pt
    sample_only: bool = False  # load out_dir/ckpt.pt and only write the outputs
    tiny: bool = False  # a seconds-long run with a tiny model, for tests and a first look

# --tiny shrinks what costs time (flags typed still win); a checkpoint only loads where the model's fields match.
TINY = dict(embed_dim=32, depth=2, num_heads=2, steps=20, batch_size=16, warmup_steps=5, num_samples=16, log_every=1.0)
MODEL_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")

# ----------------------------------------------------------------------------- device

def get_device(name="auto"):
    """cuda, then mps, then cpu; --device forces one."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(kind for kind, ok in available.items() if ok) if name == "auto" else name
    if not available.get(name.split(":")[0]):
        raise SystemExit(f"error: --device {name} is not available here: use --device auto, cpu, cuda or mps")
    return torch.device(name)

def autocast(device):
    """bf16 autocast only on a GPU that computes in bf16 natively; float32 everywhere else."""
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

# ----------------------------------------------------------------------------- data

def load_mnist(data_dir, device):
    """All 60,000 training digits as one uint8 tensor [N, 1, 28, 28] on the device: batches are drawn by index."""
    raw = Path(data_dir) / "MNIST" / "raw"
    if not all((raw / f"{split}-{kind}").is_file() for split in ("train", "t10k")
               for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")):
        download(lambda: MNIST(data_dir, download=True), raw, f"error: MNIST is not in {data_dir} and could not be "
                 f"downloaded: put train-images-idx3-ubyte and train-labels-idx1-ubyte (and the t10k files) in {raw}, "
                 f"or pass --data_dir")
    try:
        return MNIST(data_dir, train=True).data.unsqueeze(1).to(device)
    except Exception:
        raise SystemExit(f"error: the MNIST files in {raw} are corrupt or truncated: delete them to download "
                         f"them again, or pass another --data_dir")

def get_batch(images, batch_size):
    """A random batch scaled from uint8 [0, 255] to float [-1, 1]."""
    idx = torch.randint(len(images), (batch_size,), device=images.device)
    return images[idx].float() / 127.5 - 1

# ----------------------------------------------------------------------------- model

class TimeEmbedding(nn.Module):
    """t in [0, 1] -> sinusoidal features (as in the Transformer) -> MLP."""
    def __init__(self, dim, freq_dim=128, max_period=10000.0):
        super().__init__()
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(freq_dim // 2) / (freq_dim // 2)))
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
    def forward(self, t):
        angles = 1000 * t[:, None] * self.freqs[None]  # scale t so that small steps in t matter
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1))

def patchify(x, p):
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C]: each p x p patch becomes one token."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)

def overlap_add(tokens, p, c, h, w):
    """[B, (H/p)*(W/p), k*k*C] -> [B, C, H, W]: each token paints a k x k patch centred on its own p x p one (k = 2p
    for an even p, 13 for p = 7), tent-weighted; where patches overlap, their weighted average: no seams."""
    k = math.isqrt(tokens.shape[2] // c)  # the side of the patch each token paints (FinalLayer's k)
    tent = torch.minimum(torch.arange(k) + 0.5, k - 0.5 - torch.arange(k)).to(tokens.device)
    window = (tent[:, None] * tent[None]).flatten().repeat(c)[:, None]  # fold's layout: [C * k * k, tokens]
    fold = lambda x: F.fold(x, (h, w), kernel_size=k, stride=p, padding=p // 2)
    return fold(tokens.transpose(1, 2) * window) / fold(window.expand(-1, tokens.shape[1])[None])

def sincos_pos_embed_2d(dim, grid_size):
    """Fixed 2D sin-cos positions [grid*grid, dim]: sin(row f), cos(row f), sin(col f), cos(col f) at dim/4 freqs f."""
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    angles = [position.flatten().float()[:, None] * freqs[None] for position in (rows, cols)]
    return torch.cat([wave(a) for a in angles for wave in (torch.sin, torch.cos)], dim=1)

def modulate(x, shift, scale):
    """adaLN: a LayerNorm output, shifted and scaled per sample by the conditioning."""
    return x * (1 + scale[:, None]) + shift[:, None]

class Attention(nn.Module):
    """Multi-head self-attention over the patch tokens."""
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.qkv, self.proj = num_heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

class LocalMLP(nn.Module):
    """The MLP, plus a 3x3 depthwise conv over the token grid (SegFormer's Mix-FFN): each token sees its neighbours."""
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.local = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)  # one 3x3 filter per channel
    def forward(self, x):
        h = self.fc1(x)
        grid = h.transpose(1, 2).unflatten(2, (math.isqrt(x.shape[1]), -1))  # the tokens on their square grid
        return self.fc2(F.gelu(h + self.local(grid).flatten(2).transpose(1, 2), approximate="tanh"))

class DiTBlock(nn.Module):
    """A transformer block modulated by c (adaLN-Zero): shift, scale and a zero-init gate for attention and the MLP."""
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1, self.norm2 = (nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6) for _ in range(2))
        self.attn, self.mlp = Attention(dim, num_heads), LocalMLP(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)  # the "Zero" in adaLN-Zero
        nn.init.zeros_(self.adaLN_modulation[-1].bias)
    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))

class FinalLayer(nn.Module):
    """adaLN, then a linear map from each token to the k*k*C velocity values of the patch it paints (overlap_add)."""
    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, (patch_size + 2 * (patch_size // 2)) ** 2 * out_channels)  # k x k (p = 7: 13)
        for param in [*self.adaLN_modulation[-1].parameters(), *self.linear.parameters()]:  # start by predicting v = 0
            nn.init.zeros_(param)
    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))

class DiT(nn.Module):
    """Diffusion Transformer (Peebles & Xie 2023): patchify -> embed + position -> DiT blocks on t -> overlap_add."""
    def __init__(self, img_size=28, patch_size=4, in_channels=1, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0):
        super().__init__()
        self.img_size, self.patch_size, self.in_channels = img_size, patch_size, in_channels
        self.patch_embed = nn.Linear(patch_size * patch_size * in_channels, embed_dim)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, img_size // patch_size))
        self.time_embed = TimeEmbedding(embed_dim)
        self.blocks = nn.ModuleList(DiTBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(embed_dim, patch_size, in_channels)
    def forward(self, x, t):
        tokens = self.patch_embed(patchify(x, self.patch_size)) + self.pos_embed
        c = self.time_embed(t)
        for block in self.blocks:
            tokens = block(tokens, c)
        return overlap_add(self.final_layer(tokens, c), self.patch_size, self.in_channels, self.img_size, self.img_size)

def build_model(cfg):
    return DiT(**{name: getattr(cfg, name) for name in MODEL_FIELDS})  # 28x28 images, 1 channel: DiT's defaults

# ----------------------------------------------------------------------------- flow-matching loss

def sample_timesteps(batch_size, time_sampling, device, mean=0.0):
    """t ~ U(0, 1), or logit-normal: sigmoid of a normal N(mean, 1) (SD3, Esser et al. 2024), which spends more
    steps at middle t, where predicting v is hardest; the ends are easy. A mean above 0 leans toward the noise."""
    if time_sampling == "uniform":
        return torch.rand(batch_size, device=device)
    return torch.sigmoid(mean + torch.randn(batch_size, device=device))

def get_loss(model, x0, time_sampling="logit_normal", record=None, time_mean=0.0):
    """Flow-matching loss (3) for data x0 in [-1, 1]; record, if a list, collects (t, each image's loss) for log.csv."""
    x1 = torch.randn_like(x0)                           # noise
    t = sample_timesteps(len(x0), time_sampling, x0.device, time_mean)
    t_ = t[:, None, None, None]
    x_t = (1 - t_) * x0 + t_ * x1                       # the straight path (1)
    v_target = x1 - x0                                  # its velocity (2)
    loss_per_image = (model(x_t, t).float() - v_target).pow(2).flatten(1).mean(1)
    if record is not None:
        record.append((t.detach(), loss_per_image.detach()))
    return loss_per_image.mean()

# ----------------------------------------------------------------------------- sampler

NFE = {"euler": lambda steps: steps, "heun": lambda steps: 2 * steps - 1}  # network evaluations: the real cost

@torch.no_grad()
def integrate(velocity, x, num_steps, sampler="euler", trajectory=True):
    """Integrate dx/dt = velocity(x, t) from t = 1 (noise) to 0 (data) with Euler (4) or Heun (4b); Heun's last step
    stays Euler (Karras et al. 2022). Returns every state [x at t=1, ..., x at t=0], or if not trajectory [x at t=0]."""
    ts = torch.linspace(1, 0, num_steps + 1, device=x.device)
    states = [x]
    for t, t_next in zip(ts[:-1], ts[1:]):
        dt = t_next - t  # negative: a step back in time
        v = velocity(x, t.expand(len(x)))
        if sampler == "heun" and t_next > 0:
            v = (v + velocity(x + dt * v, t_next.expand(len(x)))) / 2  # the trapezoid rule (4b)
        x = x + dt * v
        states = states + [x] if trajectory else [x]
    return states

def sample(model, num_samples, num_steps=50, image_shape=(1, 28, 28), device=None, trajectory=False, sampler="euler"):
    """Generate images in [-1, 1]; trajectory=True returns every sampler state instead."""
    device = torch.device(device or next(model.parameters()).device)
    def velocity(x, t):
        with autocast(device):
            return model(x, t).float()
    states = integrate(velocity, torch.randn(num_samples, *image_shape, device=device), num_steps, sampler, trajectory)
    return [x.clamp(-1, 1) for x in states] if trajectory else states[-1].clamp(-1, 1)

# ----------------------------------------------------------------------------- training

def lr_at(step, cfg):
    """Linear warmup, then constant: the EMA averages as a decaying rate would, and --resume can add steps."""
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr

@torch.no_grad()
def update_ema(ema_model, model, step, window):
    """ema <- d * ema + (1 - d) * weights, d = (1 + step) / (1 + step + 1 / window): an average over about the latest
    window * step steps, however long the run (a power-function EMA, Karras et al. 2024); window 0: the weights."""
    d = (1 + step) / (1 + step + 1 / window) if window else 0.0
    for e, p in zip(ema_model.parameters(), model.parameters()):
        e.lerp_(p, 1 - d)

def orthogonalise(g, steps=5):
    """~U V^T for each matrix g = U S V^T in a stack: quintic Newton-Schulz steps push its singular values to 1."""
    x = (g.mT if (tall := g.shape[-2] > g.shape[-1]) else g) / g.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)
    for _ in range(steps):
        a = x @ x.mT  # x is wide, so this is the small product
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x  # Jordan et al. 2024: fast; ends in ~[0.7, 1.2]
    return x.mT if tall else x

class Muon(torch.optim.AdamW):
    """AdamW, except for groups with muon_steps > 0: their matrices step by orthogonalised Nesterov momentum."""
    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for shape in {p.shape for p in group["params"] if group.get("muon_steps")}:  # a stack per shape
                mats = [p for p in group["params"] if p.shape == shape]  # fewer, larger products; momentum 0.95
                momenta = [self.state[p].setdefault("momentum", torch.zeros_like(p)).lerp_(p.grad, 0.05) for p in mats]
                nesterov = torch.stack([p.grad.lerp(m, 0.95) for p, m in zip(mats, momenta)])  # Nesterov: a step ahead
                for p, update in zip(mats, orthogonalise(nesterov, group["muon_steps"])):
                    self.state[p].setdefault("step", torch.tensor(0.0))  # AdamW's loader expects one in every state
                    p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled weight decay, as in AdamW
                    p.sub_(update, alpha=group["lr"] * 0.2 * max(p.shape) ** 0.5)  # RMS 0.2 as AdamW's (Liu et al.)
                    p.grad = None  # AdamW's step below skips a parameter without a gradient
        super().step()

def optimizer_step(model, optimizer, loss, grad_clip):
    """Backpropagate, clip the gradient norm and step, unless that norm is nan or inf; return the norm."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if torch.isfinite(grad_norm := nn.utils.clip_grad_norm_(model.parameters(), grad_clip)):
        optimizer.step()
    return grad_norm

def train(model, ema_model, optimizer, images, cfg, out_dir, step, device, parts, extras):
    """The training loop, from step to cfg.steps. Ctrl-C and SIGTERM stop it between two steps
    with a checkpoint; a non-finite loss or gradient stops it before it touches the weights."""
    ckpt_path, saved_step = out_dir / "ckpt.pt", step if cfg.resume else None  # the step on disk
    log = TrainingLog(out_dir / "log.csv", cfg, step, device, model)
    preview_at, stop = {round(cfg.steps * k / 6) for k in range(1, 7)}, []  # progress.png: 6 rows in training
    try:
        with on_stop_signals(lambda signum, frame: stop.append(signum)):
            while step < cfg.steps and not stop:
                rng = rng_states(device)  # the random state at the start of this step, for a checkpoint
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group.update(lr=lr, weight_decay=cfg.weight_decay)
                with autocast(device):
                    loss = get_loss(model, get_batch(images, cfg.batch_size), cfg.time_sampling, log.by_time,
                                    cfg.time_mean)
                check_finite("loss", loss, step, ckpt_path, saved_step)
                check_finite("gradient norm", optimizer_step(model, optimizer, loss, cfg.grad_clip), step, ckpt_path,
                             saved_step)
                update_ema(ema_model, model, step, cfg.ema_window if cfg.ema else 0.0)
                step += 1
                log.step(step, loss.item(), lr)
                if step in preview_at:  # a row of progress.png: the seed's noise, in a forked random stream
                    with torch.random.fork_rng():
                        torch.manual_seed(cfg.seed)
                        extras["progress"][step] = to_uint8(sample(ema_model, 8, cfg.sample_steps, sampler=cfg.sampler))
                if step % cfg.ckpt_every == 0 or step == cfg.steps or stop:
                    save_checkpoint(ckpt_path, cfg, step, parts, rng_states(device), extras)
                    saved_step = step
    except KeyboardInterrupt:  # raised inside a step: that step never reached the weights
        save_checkpoint(ckpt_path, cfg, step, parts, rng, extras)
        stop.append(signal.SIGINT)
    finally:
        log.file.close()
    if stop:
        raise SystemExit(f"interrupted at step {step}: saved {ckpt_path}; add --resume to continue")
    return ["ckpt.pt", "log.csv"] + save_progress(extras["progress"], out_dir) + plot_loss(out_dir)

# ----------------------------------------------------------------------------- outputs

def write_outputs(model, cfg, out_dir, device, step):
    """samples.png, trajectory.png and .gif, nfe_sweep.png and, with --eval_samples, samples.npz: their names."""
    model.eval()
    def draw(n, num_steps=cfg.sample_steps, sampler=cfg.sampler, trajectory=False):
        torch.manual_seed(cfg.seed)  # the same noise whenever this checkpoint is sampled
        return sample(model, n, num_steps, device=device, trajectory=trajectory, sampler=sampler)
    title = f"{SCRIPT}, step {step}, {cfg.sample_steps} {cfg.sampler} steps = {NFE[cfg.sampler](cfg.sample_steps)} NFE"
    wrote = save_grid(draw(cfg.num_samples), out_dir / "samples.png", ncol=8, title=title)
    wrote += save_trajectory(draw(8, trajectory=True), out_dir, cfg)
    wrote += save_nfe_sweep(lambda num_steps, sampler: draw(4, num_steps, sampler), out_dir, cfg)
    if cfg.eval_samples:  # 500 images at a time, so memory stays small for any N
        torch.manual_seed(cfg.seed)
        chunks = [to_uint8(sample(model, min(500, cfg.eval_samples - n), cfg.sample_steps, device=device,
                                  sampler=cfg.sampler)) for n in range(0, cfg.eval_samples, 500)]
        wrote += write_atomically(out_dir / "samples.npz", lambda f: np.savez_compressed(
            f, images=torch.cat(chunks).numpy(), labels=np.full(cfg.eval_samples, -1)))
    return wrote

# ----------------------------------------------------------------------------- plumbing
# The machinery around the lesson (command line, checks, checkpoints, signals, log, pictures): skip it at first.

def parse_config(argv=None):
    """Build Config from the command line: one flag per field, so the CLI cannot drift."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS)
    parser.error = lambda message: parser.exit(2, f"error: {message} (--help lists every flag)\n")
    comments = dict(re.findall(r"^\s+(\w+): \w+ = .*?  # (.*)$", inspect.getsource(Config), re.MULTILINE))
    for f in dataclasses.fields(Config):
        text = f"{comments[f.name]} (default: {f.default})".replace("%", "%%")
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(
            type=finite_float if f.type is float else f.type, metavar=f.type.__name__.upper())
        parser.add_argument(f"--{f.name}", help=text, **kind)
    given = vars(parser.parse_args(argv))  # only the flags actually typed
    cfg = Config(**{**(TINY if given.get("tiny") else {}), **given})
    if problems := config_problems(cfg):
        parser.error("; ".join(problems))
    return cfg, given

# The rules a Config comment may end with ("; must be at least 1"): checked before anything is created.
RULES = {"be at least 1": lambda v: v >= 1, "not be negative": lambda v: v >= 0, "be above 0": lambda v: v > 0,
         "be in [0, 1)": lambda v: 0 <= v < 1, "be in [0, 1]": lambda v: 0 <= v <= 1}

def config_problems(cfg):
    """Every value in cfg that breaks its field's rule, by flag name, then the model's own constraints."""
    rules = dict(re.findall(r"^\s+(\w+): .*; must (.*)$", inspect.getsource(Config), re.MULTILINE))
    problems = [f"--{name} must {rule}" for rule, ok in RULES.items() for name in rules
                if rules[name] == rule and not ok(getattr(cfg, name))]
    problems += [f"--{name} must {rule}" for name, rule in rules.items()
                 if rule not in RULES and getattr(cfg, name) not in rule[3:].split(" or ")]  # "be a or b"
    return problems + model_problems(cfg)

def model_problems(cfg):
    bad = min(cfg.patch_size, cfg.num_heads) > 0 and (28 % cfg.patch_size or cfg.embed_dim % math.lcm(4, cfg.num_heads))
    return ["--patch_size must divide 28; --embed_dim must divide by 4 and by --num_heads"] if bad else []

def finite_float(text):
    """A float flag's type: nan and inf never reach the math."""
    if not math.isfinite(value := float(text)):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value

def check_out_dir(out_dir):
    """--out_dir must be a folder we can create or write to; checked before anything is created."""
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"error: --out_dir {out_dir} cannot be made: {existing} is "
                         f"{'not writable' if existing.is_dir() else 'a file'}: pass another --out_dir")

def download(fetch, folder, failed):
    """fetch() a data set into folder, quietly; if it fails, remove the folders it made and stop with failed."""
    print(f"downloading to {folder} ...", flush=True)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        with redirect_stdout(io.StringIO()):  # torchvision prints every mirror
            fetch()
    except BaseException as error:
        if created:
            shutil.rmtree(created[-1], ignore_errors=True)
        raise SystemExit(failed) if isinstance(error, Exception) else error

def load_checkpoint(path, given, flag="--out_dir"):
    """Read a checkpoint of this script and return it with its config, the flags typed now on top.
    Anything else, a flag that would change the model, or --resume with no steps left stops in one line."""
    if not path.is_file():
        raise SystemExit(f"error: no checkpoint at {path}: train first (without --resume/--sample_only), "
                         f"or pass another {flag}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        owner = ckpt["script"]
    except Exception:
        raise SystemExit(f"error: {path} is corrupt or not a checkpoint: delete it or pass another {flag}")
    if owner != SCRIPT:
        raise SystemExit(f"error: {path} was written by {owner}, not {SCRIPT}: pass another {flag}")
    saved = {k: v for k, v in ckpt["config"].items() if k in Config.__dataclass_fields__}
    cfg = Config(**{**saved, **(TINY if given.get("tiny") else {}), **given})
    if differ := [name for name in MODEL_FIELDS if name in saved and getattr(cfg, name) != saved[name]]:
        flags = lambda values: " ".join(f"--{name} {values[name]}" for name in differ)  # noqa: E731
        raise SystemExit(f"error: {path} holds another model: it was trained with {flags(saved)}, not "
                         f"{flags(vars(cfg))}: drop those flags or use another {flag}")
    if cfg.resume and not cfg.sample_only and ckpt["step"] >= cfg.steps:
        raise SystemExit(f"error: {path} is at step {ckpt['step']} already: pass --steps above "
                         f"{ckpt['step']} to train on, or --sample_only to sample it")
    return ckpt, cfg

def restore(ckpt, parts, device, path):
    """Load every part (model, EMA, optimizer, ...) and the random state; return the step."""
    try:
        for name, part in parts.items():
            part.load_state_dict(ckpt[name])
    except (RuntimeError, ValueError, KeyError):
        raise SystemExit(f"error: {path} holds a model of another shape: use another --out_dir")
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if device.type in ckpt["rng"] and device.type != "cpu":
        getattr(torch, device.type).set_rng_state(ckpt["rng"][device.type])
    return ckpt["step"]

def rng_states(device):
    """The random generators' states, so that a resumed run draws what the uninterrupted one would."""
    accelerator = {} if device.type == "cpu" else {device.type: getattr(torch, device.type).get_rng_state()}
    return {"cpu": torch.get_rng_state(), **accelerator}

def save_checkpoint(path, cfg, step, parts, rng, extras):
    state = {"script": SCRIPT, "config": dataclasses.asdict(cfg), "step": step, "rng": rng,
             **{name: part.state_dict() for name, part in parts.items()}, **extras}
    write_atomically(path, lambda f: torch.save(state, f))

def write_atomically(path, write):
    """write(file) to a temporary file, renamed to path: never half a file, the old one intact. Returns [path.name]."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"error: could not write {path} ({error.strerror or error}): free some disk space "
                         f"or pass another --out_dir; the previous {path.name} is intact")
    return [path.name]

@contextmanager
def on_stop_signals(handler):
    """Inside, Ctrl-C (SIGINT) and SIGTERM (a closed laptop lid, a cluster's time limit) call handler."""
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)

@contextmanager
def one_line_errors():
    """Ctrl-C outside the training loop, or a disk that fails us: one line, not a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        raise SystemExit("interrupted: --resume or --sample_only goes on from the last checkpoint, if any")
    except OSError as error:
        raise SystemExit(f"error: {error}")

def check_finite(what, value, step, ckpt_path, saved_step):
    """Stop, before the weights change, when the loss or the gradient norm is nan or inf."""
    if not torch.isfinite(value):
        kept = (f"{ckpt_path} keeps step {saved_step}: try a lower --lr, then --resume" if saved_step is not None
                else "no checkpoint of this run was written yet: try a lower --lr")
        raise SystemExit(f"error: {what} became {value.item()} at step {step}; {kept}")

class TrainingLog:
    """A progress line every cfg.log_every seconds; log.csv: step, loss, lr, images/s, the loss in ten bins of t."""
    def __init__(self, path, cfg, step, device, model):
        self.cfg, self.first_step, self.last_step, self.start = cfg, step, step, time.time()
        self.file = open(path, "a" if cfg.resume else "w", newline="")
        self.csv, self.by_time, self.losses, self.last = csv.writer(self.file), [], [], self.start
        if self.file.tell() == 0:  # a new file, also when a resume finds none
            self.csv.writerow(["step", "loss", "lr", "images_per_s"] + [f"loss_t{k / 10:.1f}-{(k + 1) / 10:.1f}"
                                                                        for k in range(10)])
        print(f"training {SCRIPT}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"steps {step}->{cfg.steps}, batch {cfg.batch_size}, on {device}", flush=True)
    def step(self, step, loss, lr):
        self.losses.append(loss)
        now, clock = time.time(), lambda seconds: time.strftime("%H:%M:%S", time.gmtime(seconds))
        if now - self.last < self.cfg.log_every and step not in (self.cfg.steps, self.first_step + 10):
            return
        speed, loss = (step - self.last_step) * self.cfg.batch_size / (now - self.last), np.mean(self.losses)
        print(f"step {step:>6}/{self.cfg.steps} | loss {loss:.4f} | {speed:6.0f} img/s | {clock(now - self.start)} "
              f"elapsed | ETA {clock((self.cfg.steps - step) * self.cfg.batch_size / speed)}", flush=True)
        records = self.by_time or [(torch.zeros(0), torch.zeros(0))]  # empty for a loss that records none
        t, loss_per_image = (torch.cat(column).float().cpu() for column in zip(*records))
        bins = (t * 10).long().clamp(0, 9)
        by_bin = [f"{loss_per_image[bins == k].mean():.5f}" if (bins == k).any() else "" for k in range(10)]
        self.csv.writerow([step, f"{loss:.5f}", f"{lr:.3g}", f"{speed:.1f}", *by_bin])
        self.file.flush()
        self.last, self.last_step, self.losses, self.by_time[:] = now, step, [], []

def save_progress(rows, out_dir):
    """progress.png: the same noise, sampled with the EMA model at 6 steps of training, a row each."""
    images = torch.cat([rows[s] for s in sorted(rows)]).permute(0, 3, 1, 2).float() / 127.5 - 1
    return save_grid(images, out_dir / "progress.png", ncol=len(images) // len(rows),
                     title="the same noise during training", row_labels=[f"step {s}" for s in sorted(rows)])

def save_trajectory(states, out_dir, cfg, row_labels=None):
    """trajectory.png (8 samples at 8 times from t=1 to 0) and trajectory.gif (up to 20 frames, the last held 2 s)."""
    keep, animate = (sorted(set(torch.linspace(0, cfg.sample_steps, n).round().long().tolist())) for n in (8, 20))
    t = lambda i: f"{1 - i / cfg.sample_steps:.2f}"  # noqa: E731
    frames = [grid_image(states[i], 4, f"t = {t(i)}").quantize(128, dither=Image.Dither.NONE) for i in animate]
    gif = dict(format="GIF", save_all=True, append_images=frames[1:], loop=0, duration=[150] * len(frames[1:]) + [2000])
    return (save_grid(torch.stack([states[i] for i in keep], dim=1).flatten(0, 1), out_dir / "trajectory.png",
                      ncol=len(keep), title="noise (t=1) -> data (t=0)", col_labels=[f"t={t(i)}" for i in keep],
                      row_labels=row_labels)
            + write_atomically(out_dir / "trajectory.gif", lambda f: frames[0].save(f, **gif)))

def save_nfe_sweep(draw, out_dir, cfg):
    """nfe_sweep.png: the same noise at most 1, 2, 4, 8, 16 network evaluations and the default's, one block
    of rows per sampler. Prints how straight the paths are: how far one Euler step lands from the sample."""
    nfes = sorted({1, 2, 4, 8, 16, NFE[cfg.sampler](cfg.sample_steps)})
    rows = [torch.stack([draw(max(s for s in range(1, n + 1) if cost(s) <= n), sampler) for n in nfes], dim=1)
            for sampler, cost in NFE.items()]  # per sampler [4, nfes, C, H, W], at the most steps within n NFE
    one_step, final = draw(1, "euler"), draw(cfg.sample_steps, cfg.sampler)
    print(f"straightness: one Euler step lands {(one_step - final).pow(2).mean():.4f} (mean squared "
          f"difference) from the {cfg.sampler} sample; 0 would be perfectly straight paths", flush=True)
    return save_grid(torch.cat(rows).flatten(0, 1), out_dir / "nfe_sweep.png", ncol=len(nfes),
                     title="at most this many network evaluations (NFE)", col_labels=[f"NFE {n}" for n in nfes],
                     row_labels=[name if i == 0 else "" for name in NFE for i in range(len(rows[0]))])

FONT = ImageFont.load_default(size=12)  # Pillow's own font, at a size where spaces show

def fit(text, width):
    """text, cut to at most width pixels: a 500-word prompt never makes a huge picture."""
    text = text[:max(0, int(width) // 3)]
    while text and FONT.getlength(text) > width:
        text = text[:-2] + "…"
    return text

def to_uint8(images):
    """[-1, 1] float [N, C, H, W] -> uint8 [N, H, W, C]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()

def grid_image(images, ncol, title="", col_labels=None, row_labels=None, scale=2):
    """Images [N, C, H, W] in [-1, 1] as one picture: a grid with a title, column and row labels."""
    grid = make_grid((images.float().cpu().clamp(-1, 1) + 1) / 2, nrow=ncol, padding=2, pad_value=1)
    picture = Image.fromarray((grid * 255).round().byte().permute(1, 2, 0).numpy())
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    cell_w, cell_h, header = (images.shape[-1] + 2) * scale, (images.shape[-2] + 2) * scale, 18 + 16 * bool(col_labels)
    margin = int(min(240, max(FONT.getlength(label) for label in row_labels) + 8)) if any(row_labels or []) else 0
    canvas = Image.new("RGB", (int(max(margin + picture.width, min(FONT.getlength(title) + 8, 800))),
                               picture.height + header), "white")
    canvas.paste(picture, (margin, header))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), fit(title, canvas.width - 8), fill="black", font=FONT)
    for k, label in enumerate(col_labels or []):
        draw.text((margin + k * cell_w + 4, 18), fit(label, cell_w - 4), fill="black", font=FONT)
    for r, label in enumerate(row_labels or []):
        draw.text((4, header + r * cell_h + cell_h // 2 - 7), fit(label, margin - 8), fill="black", font=FONT)
    return canvas

def save_grid(images, path, ncol, title="", col_labels=None, row_labels=None, scale=2):
    canvas = grid_image(images, ncol, title, col_labels, row_labels, scale)
    return write_atomically(path, lambda f: canvas.save(f, format="PNG"))

def plot_loss(out_dir):
    """loss.png from log.csv: the loss by step, and by t over the second half of training (where learning is hard)."""
    rows = list(csv.DictReader((out_dir / "log.csv").read_text().splitlines()))
    by_time = [np.mean([float(r[b]) for r in rows[len(rows) // 2:] if r[b]] or [0]) for b in rows[0] if "_t" in b]
    canvas = Image.new("RGB", (760, 260), "white")
    draw = ImageDraw.Draw(canvas)
    charts = ((50, [float(r["loss"]) for r in rows], f"training loss, steps 1 to {rows[-1]['step']}"),
              (430, by_time, "loss by t = 0 (data) ... 1 (noise), second half"))
    for left, ys, title in charts:
        right, top, bottom, high = left + 310, 30, 220, max(ys) or 1.0
        draw.rectangle((left, top, right, bottom), outline="black")
        draw.text((left, top - 18), title, fill="black", font=FONT)
        draw.text((left - 46, top - 6), f"{high:.3g}", fill="black", font=FONT)  # the axis starts at 0
        xy = [(left + (right - left) * i / max(len(ys) - 1, 1), bottom - (bottom - top) * y / high)
              for i, y in enumerate(ys)]
        draw.line(xy if len(xy) > 1 else [], fill="steelblue", width=2)
    return write_atomically(out_dir / "loss.png", lambda f: canvas.save(f, format="PNG"))

# ----------------------------------------------------------------------------- main

def main(argv=None):
    cfg, given = parse_config(argv)
    with on_stop_signals(signal.default_int_handler), one_line_errors():  # SIGTERM acts like Ctrl-C
        out_dir = Path(cfg.out_dir or Path("out") / SCRIPT)
        check_out_dir(out_dir)
        ckpt, cfg = load_checkpoint(out_dir / "ckpt.pt", given) if cfg.resume or cfg.sample_only else (None, cfg)
        device = get_device(cfg.device)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg).to(device)
        ema_model = copy.deepcopy(model).requires_grad_(False)
        matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and "blocks" in n and "adaLN" not in n]
        rest = [p for p in model.parameters() if all(p is not m for m in matrices)]  # AdamW: embeddings, biases, adaLN
        optimizer = Muon([dict(params=rest), dict(params=matrices, muon_steps=cfg.muon_steps)], lr=cfg.lr,
                         betas=(0.9, cfg.adam_beta2))
        parts = dict(model=model, ema=ema_model, optimizer=optimizer)  # what a checkpoint holds
        extras = {"progress": ckpt["progress"] if ckpt else {}}  # beside the parts: progress.png's rows so far
        step, wrote = restore(ckpt, parts, device, out_dir / "ckpt.pt") if ckpt else 0, []
        if not cfg.sample_only:
            images = load_mnist(cfg.data_dir, device)
            out_dir.mkdir(parents=True, exist_ok=True)
            wrote += train(model, ema_model, optimizer, images, cfg, out_dir, step, device, parts, extras)
            step = cfg.steps
        wrote += write_outputs(ema_model, cfg, out_dir, device, step)
        print(f"wrote {', '.join(wrote)} to {out_dir}", flush=True)

if __name__ == "__main__":
    main()
