"""Step 5: a miniature Stable Diffusion: the text-to-image flow of step 4, in a VAE's latent space.

What this step adds
    The flow, the text conditioning and the guidance of step 4 are unchanged: path
    x_t = (1 - t) * x0 + t * x1 (1), velocity v = x1 - x0 (2), loss || v_theta - v ||^2 (3),
    Euler x_{t - dt} = x_t - dt * v_theta (4), CFG v = v_uncond + w * (v_cond - v_uncond) (5),
    cross-attention to the text tokens (6).
    What changes is where the flow runs. Pixels are expensive: most of a 32x32x3 image is detail
    that a small network learns late. Latent diffusion (Rombach et al. 2022) first learns a
    compact code, then runs the flow on the code:
    Stage 1: a VAE compresses each image to a 4x8x8 latent (12x fewer numbers) and back.
        loss = || decode(z) - x ||^2 + kl_weight * KL(q(z | x) || N(0, I)),
        KL = 1/2 * sum(mean^2 + sigma^2 - 1 - log sigma^2)                              (7)
    The whole dataset is then encoded once, and the latents are scaled to unit standard
    deviation, the spread of the noise the flow starts from.
    Stage 2: the DiT of step 4 learns the flow from noise to latents: 16 tokens instead of 64,
    so each training step is several times cheaper. Sampling runs the flow in latent space,
    undoes the scaling, and the VAE's decoder turns the latent into pixels.

Run it
    python 05_latent_vae.py                      # full run (downloads CIFAR-10 and CLIP)
    python 05_latent_vae.py --tiny               # a few seconds, to see that it works
    python 05_latent_vae.py --vae_ckpt out/05_latent_vae/ckpt.pt --out_dir out/05b  # reuse a trained VAE
    python 05_latent_vae.py --sample_only --prompts "a photo of a ship" "a photo of a red car"

What to expect
    About 24 minutes on a 2-core laptop CPU (a GPU is much faster): 5 to train the VAE (about
    310 images/s), 16 for the flow on latents (about 790 images/s, 3.5 times step 4's), a
    minute or two for encoding and pictures. out/05_latent_vae/ then holds recon.png (held-out
    images above their reconstructions), samples.png (a row per prompt), cfg_sweep.png,
    attention.png, trajectory.png, log.csv and ckpt.pt (the VAE included).
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
import transformers
from PIL import Image, ImageDraw
from torchvision import transforms
from torchvision.datasets import CIFAR10, ImageFolder
from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, CLIPTokenizer

SCRIPT = Path(__file__).stem  # written into checkpoints, so another script's are refused


# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    # data and outputs
    data_dir: str = "./data"  # CIFAR-10 is downloaded here when missing; or a folder of class sub-folders
    img_size: int = 32  # images are resized and center-cropped to this (CIFAR-10 is 32x32)
    out_dir: str = ""  # where outputs go; empty means out/<script name>
    # model
    text_encoder: str = "openai/clip-vit-base-patch32"  # frozen; a hub id or a local folder, CLIP or not
    latent_channels: int = 4  # the VAE turns a 3x32x32 image into a 4x8x8 latent
    vae_channels: int = 32  # the VAE's convolution width at 32x32 (twice that at 16x16 and 8x8)
    patch_size: int = 2  # 8x8 latent -> 4x4 = 16 tokens of 2x2 latent pixels
    embed_dim: int = 128  # token width
    depth: int = 6  # DiT blocks
    num_heads: int = 4  # attention heads (embed_dim must divide by it)
    mlp_ratio: float = 4.0  # MLP hidden width / embed_dim
    # training, stage 1: the VAE
    vae_steps: int = 1500  # VAE optimizer steps
    vae_batch_size: int = 64  # images per VAE step
    vae_lr: float = 1e-3  # VAE peak learning rate (the same warmup and cosine decay as stage 2)
    kl_weight: float = 1e-5  # weight of the KL term (7) in the VAE loss: small, as in Stable Diffusion
    vae_test_images: int = 1000  # held out of training, to measure the VAE's reconstructions (PSNR)
    vae_ckpt: str = ""  # reuse the VAE of this 05 checkpoint and skip stage 1
    # training, stage 2: the flow on latents
    steps: int = 6000  # optimizer steps (about 16 minutes on a 2-core CPU)
    batch_size: int = 128  # latents per step (twice step 4's: latent steps are cheap, bigger ones use the CPU better)
    lr: float = 1e-3  # peak learning rate
    warmup_steps: int = 100  # linear warmup from 0 to lr, then cosine decay to lr/10
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # clip the gradient norm to this
    ema: bool = True  # sample with an exponential moving average of the weights
    ema_decay: float = 0.999  # EMA decay (warmed up: early steps average over fewer steps)
    time_sampling: str = "logit_normal"  # how training picks t: "logit_normal" or "uniform"
    text_dropout: float = 0.1  # chance that a training caption becomes the empty prompt (for CFG)
    # sampling
    sample_steps: int = 50  # Euler steps from t=1 to t=0
    prompts: tuple = ()  # what samples.png draws, e.g. --prompts "a photo of a cat" "a red car"; () = the captions
    num_samples: int = 80  # images in samples.png, one row per prompt
    cfg_scale: float = 7.5  # guidance w in eq. (5): 0 unconditional, 1 conditional, >1 guided
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
            sample_steps=4, num_samples=16, log_every=1.0,
            vae_channels=8, vae_steps=10, vae_batch_size=16, vae_test_images=3)


def parse_config(argv=None):
    """Build Config from the command line: one flag per field, so the CLI cannot drift."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     argument_default=argparse.SUPPRESS)
    parser.error = lambda message: parser.exit(2, f"error: {message} (--help lists every flag)\n")
    for f in dataclasses.fields(Config):
        if f.type is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction,
                                help=f"default: {f.default}")
        elif f.type is tuple:
            parser.add_argument(f"--{f.name}", nargs="+", metavar="TEXT", help=f"default: {f.default}")
        else:
            parser.add_argument(f"--{f.name}", type=f.type, metavar=f.type.__name__.upper(),
                                help=f"default: {f.default}")
    given = vars(parser.parse_args(argv))  # only the flags actually typed
    cfg = Config(**{**(TINY if given.get("tiny") else {}), **given})
    at_least_1 = ("img_size", "steps", "batch_size", "sample_steps", "num_samples", "ckpt_every",
                  "latent_channels", "vae_batch_size", "vae_test_images")
    problems = [f"--{name} must be at least 1" for name in at_least_1 if getattr(cfg, name) < 1]
    not_negative = ("lr", "weight_decay", "grad_clip", "eval_samples", "warmup_steps", "log_every", "cfg_scale",
                    "vae_steps", "vae_lr", "kl_weight")
    problems += [f"--{name} must not be negative" for name in not_negative if getattr(cfg, name) < 0]
    if not 0 <= cfg.text_dropout <= 1:
        problems.append("--text_dropout must be in [0, 1]")
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

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def make_caption(class_name):
    """A class or folder name as a prompt in the form CLIP knows best: "a photo of a cat"."""
    name = class_name.replace("_", " ")
    return f"a photo of {'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def make_cifar10_captions(labels):
    """CIFAR-10 class indices -> captions: 0 -> "a photo of an airplane", 3 -> "a photo of a cat"."""
    return [make_caption(CIFAR10_CLASSES[int(label)]) for label in labels]


def open_dataset(data_dir, transform):
    """CIFAR-10 in data_dir, else data_dir as a folder of class sub-folders, else download
    CIFAR-10 there. Returns the dataset and one caption per class."""
    try:
        return CIFAR10(data_dir, train=True, download=False, transform=transform), make_cifar10_captions(range(10))
    except RuntimeError:
        pass
    try:
        folder = ImageFolder(data_dir, transform=transform)  # data_dir/<class name>/<image>
        return folder, [make_caption(name) for name in folder.classes]
    except FileNotFoundError:
        pass
    print(f"downloading CIFAR-10 to {data_dir} ...", flush=True)
    try:
        with redirect_stdout(io.StringIO()):  # torchvision prints its progress
            return CIFAR10(data_dir, train=True, download=True, transform=transform), make_cifar10_captions(range(10))
    except Exception:
        raise SystemExit(
            f"error: CIFAR-10 is not in {data_dir} and could not be downloaded: put cifar-10-python.tar.gz "
            f"in {data_dir}, or pass --data_dir a folder of images in class sub-folders (cat/1.jpg, ...)")


def load_images(data_dir, img_size, device):
    """All training images as one uint8 tensor [N, 3, S, S] on the device, their labels [N]
    and one caption per class.

    The images are decoded once, so batches are drawn by index: no DataLoader, no per-image work.
    """
    resize = transforms.Compose([transforms.Resize(img_size), transforms.CenterCrop(img_size)])
    dataset, captions = open_dataset(data_dir, resize)
    print(f"decoding {len(dataset)} images of {len(captions)} classes ...", flush=True)
    images = torch.stack([torch.from_numpy(np.array(image)) for image, _ in dataset])
    labels = torch.tensor(dataset.targets)
    return images.permute(0, 3, 1, 2).to(device), labels.to(device), captions


def get_batch(images, labels, batch_size):
    """A random batch scaled from uint8 [0, 255] to float [-1, 1], with its labels.
    Half the images are mirrored left-right: a cat facing left is as much a cat."""
    idx = torch.randint(len(images), (batch_size,), device=images.device)
    x = images[idx].float() / 127.5 - 1
    mirrored = torch.rand(batch_size, 1, 1, 1, device=x.device) < 0.5
    return torch.where(mirrored, x.flip(3), x), labels[idx]


def hold_out(images, labels, n):
    """Split off n random images that neither stage trains on: the VAE's test images."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).to(images.device)
    return images[order[n:]], labels[order[n:]], images[order[:n]]


def get_latent_batch(latents, labels, batch_size):
    """A random batch of (already scaled) latents, with their labels."""
    idx = torch.randint(len(latents), (batch_size,), device=latents.device)
    return latents[idx], labels[idx]


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


class CLIPTextEncoder:
    """A frozen pretrained text encoder: prompts -> one embedding per token, and a padding mask.

    By default CLIP's text tower (Radford et al. 2021), trained on 400M image-caption pairs to
    match images, so its embeddings carry visual meaning. model_name is a hub id or a local
    folder; a non-CLIP Hugging Face encoder (a BERT, ...) works too, through its last hidden
    state, so you can compare encoders. It is never trained: eval mode, no gradients.
    """

    def __init__(self, model_name="openai/clip-vit-base-patch32", device=None):
        self.device = torch.device(device or "cpu")
        self.is_clip = AutoConfig.from_pretrained(model_name).model_type.startswith("clip")
        if self.is_clip:
            self.tokenizer = CLIPTokenizer.from_pretrained(model_name)
            self.model = CLIPTextModel.from_pretrained(model_name)
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(model_name)
            self.model = AutoModel.from_pretrained(model_name)
        self.model.to(self.device).eval().requires_grad_(False)
        self.embed_dim = self.model.config.hidden_size  # 512 for CLIP ViT-B/32
        # CLIP reads 77 tokens at most; a smaller model or tokenizer may read fewer
        positions = getattr(self.model.config, "max_position_embeddings", 77)
        self.max_length = min(self.tokenizer.model_max_length, positions, 77)

    def __call__(self, prompts):
        """A prompt or a list of B prompts -> token embeddings [B, max_length, embed_dim] and
        the attention mask [B, max_length]: True for real tokens, False for padding."""
        embeddings, mask, _ = self.run(prompts)
        return embeddings, mask

    def encode(self, prompts, return_pooled=False):
        """Token embeddings [B, max_length, embed_dim]; return_pooled=True adds one vector per
        prompt [B, embed_dim] (CLIP: its end-of-text token; others: the mean of the real tokens)."""
        embeddings, _, pooled = self.run(prompts)
        return (embeddings, pooled) if return_pooled else embeddings

    @torch.no_grad()
    def run(self, prompts):
        """Tokenize (padded to max_length), encode: token embeddings, mask and pooled vectors."""
        tokens = self.tokenizer([prompts] if isinstance(prompts, str) else list(prompts), padding="max_length",
                                max_length=self.max_length, truncation=True, return_tensors="pt").to(self.device)
        out = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        mask = tokens["attention_mask"].bool()
        if self.is_clip:
            pooled = out.pooler_output
        else:
            pooled = (out.last_hidden_state * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return out.last_hidden_state, mask, pooled


def encode_prompts(text_encoder, prompts, device):
    """Token embeddings [P + 1, M, D] and mask [P + 1, M] of the prompts and, last, of the
    empty prompt "" (the unconditional input of CFG), on the device.

    Token positions that are padding in every prompt are cut off: they would get no attention
    anyway, so this changes no result, only the cost (CLIP pads to 77; our captions need ~8).
    """
    embeddings, mask = text_encoder(list(prompts) + [""])
    used = mask.any(dim=0)
    return embeddings[:, used].to(device), mask[:, used].to(device)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with a skip connection: x + f(x)."""

    def __init__(self, channels):
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x):
        return x + self.block(x)


VAE_DOWNSCALE = 4  # the VAE's two stride-2 convolutions shrink each side 4x: 32x32 -> 8x8


class VAE(nn.Module):
    """A small convolutional variational autoencoder (Kingma & Welling 2014), the first stage of
    Stable Diffusion: image [3, H, W] -> encoder -> mean and log-variance of a latent
    [latent_channels, H/4, W/4] -> a sample z -> decoder -> image.

    scale_factor maps latents to unit standard deviation for the flow; it is measured on the
    data after training (see encode_training_latents) and kept in the state dict.
    """

    def __init__(self, latent_channels=4, channels=32):
        super().__init__()
        c = channels
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), ResBlock(c),
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), ResBlock(2 * c),      # 32x32 -> 16x16
            nn.Conv2d(2 * c, 2 * c, 4, stride=2, padding=1), ResBlock(2 * c),  # 16x16 -> 8x8
            nn.GroupNorm(8, 2 * c), nn.SiLU(), nn.Conv2d(2 * c, 2 * latent_channels, 3, padding=1))
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, 2 * c, 3, padding=1), ResBlock(2 * c),
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * c, 2 * c, 3, padding=1), ResBlock(2 * c),  # 8 -> 16
            nn.Upsample(scale_factor=2), nn.Conv2d(2 * c, c, 3, padding=1), ResBlock(c),          # 16 -> 32
            nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1))
        self.register_buffer("scale_factor", torch.tensor(1.0))

    def encode(self, x):
        """Images [B, 3, H, W] in [-1, 1] -> mean and log-variance [B, latent_channels, H/4, W/4] of q(z | x)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)

    def decode(self, z):
        """Latents [B, latent_channels, H/4, W/4] -> images [B, 3, H, W]."""
        return self.decoder(z)

    def forward(self, x):
        """Encode, draw z = mean + sigma * noise, decode. Written this way (the reparameterisation
        trick) the sample is a function of mean and sigma, so gradients reach the encoder."""
        mean, logvar = self.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        return self.decode(z), mean, logvar


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


def split_heads(x, num_heads):
    """[B, L, heads * d] -> [B, heads, L, d]: each head attends on its own slice of the features."""
    b, n, dim = x.shape
    return x.reshape(b, n, num_heads, dim // num_heads).transpose(1, 2)


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


class CrossAttention(nn.Module):
    """Eq. (6): queries from the image patches, keys and values from the text tokens, so each
    patch gathers what it needs from the prompt. Padding tokens are masked out of the softmax."""

    def __init__(self, embed_dim, context_dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim ** -0.5  # 1 / sqrt(d)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(context_dim, embed_dim)  # text width (512 for CLIP) -> patch width
        self.v_proj = nn.Linear(context_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x, context, context_mask=None):
        """x [B, N, embed_dim] patches, context [B, M, context_dim] tokens, context_mask [B, M]
        (True = a real token) -> [B, N, embed_dim]."""
        q = split_heads(self.q_proj(x), self.num_heads)
        k = split_heads(self.k_proj(context), self.num_heads)
        v = split_heads(self.v_proj(context), self.num_heads)
        mask = None if context_mask is None else context_mask[:, None, None, :]  # the same for every head and patch
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def attention_weights(self, x, context, context_mask=None):
        """The attention matrix softmax(Q K^T / sqrt(d)) [B, heads, N, M] that forward applies,
        written out: entry (n, m) is how much patch n looks at token m. For pictures and tests."""
        q = split_heads(self.q_proj(x), self.num_heads)
        k = split_heads(self.k_proj(context), self.num_heads)
        scores = q @ k.transpose(-2, -1) * self.scale
        if context_mask is not None:
            scores = scores.masked_fill(~context_mask[:, None, None, :], float("-inf"))
        return scores.softmax(dim=-1)


class TextConditionedDiTBlock(nn.Module):
    """A DiT block with cross-attention to the text between self-attention and the MLP:
        x = x + gate1 * SelfAttn(adaLN(x))
        x = x + gate2 * CrossAttn(adaLN(x), text)
        x = x + gate3 * MLP(adaLN(x))
    Shift, scale and gate of each part come from the time embedding c (adaLN-Zero). The gates
    start at zero, so every block starts as the identity and training switches it on gradually.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, context_dim=512):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = CrossAttention(dim, context_dim, num_heads)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 9 * dim))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)  # the "Zero" in adaLN-Zero
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x, c, context, context_mask=None):
        (shift1, scale1, gate1, shift2, scale2, gate2,
         shift3, scale3, gate3) = self.adaLN_modulation(c).chunk(9, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2[:, None] * self.cross_attn(modulate(self.norm2(x), shift2, scale2), context, context_mask)
        x = x + gate3[:, None] * self.mlp(modulate(self.norm3(x), shift3, scale3))
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


class TextConditionalDiT(nn.Module):
    """Diffusion Transformer (Peebles & Xie 2023): patchify -> embed + position -> DiT blocks
    conditioned on the time embedding (adaLN) and on the text tokens (cross-attention)
    -> final layer -> unpatchify."""

    def __init__(self, img_size=32, patch_size=4, in_channels=3, embed_dim=256, depth=6, num_heads=8,
                 mlp_ratio=4.0, context_dim=512):
        super().__init__()
        self.img_size, self.patch_size, self.in_channels = img_size, patch_size, in_channels
        self.patch_embed = nn.Linear(patch_size * patch_size * in_channels, embed_dim)
        grid_size = img_size // patch_size
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, grid_size))
        self.time_embed = TimeEmbedding(embed_dim)
        self.blocks = nn.ModuleList(TextConditionedDiTBlock(embed_dim, num_heads, mlp_ratio, context_dim)
                                    for _ in range(depth))
        self.final_layer = FinalLayer(embed_dim, patch_size, in_channels)

    def forward(self, x, t, text_embeddings, text_mask=None):
        tokens = self.patch_embed(patchify(x, self.patch_size)) + self.pos_embed
        c = self.time_embed(t)  # time steers every block via adaLN, the text via cross-attention
        for block in self.blocks:
            tokens = block(tokens, c, text_embeddings, text_mask)
        tokens = self.final_layer(tokens, c)
        return unpatchify(tokens, self.patch_size, self.in_channels, self.img_size, self.img_size)


def build_model(cfg, context_dim):
    """The DiT of stage 2, on latents: [latent_channels, img_size/4, img_size/4] instead of pixels."""
    if cfg.img_size % (VAE_DOWNSCALE * cfg.patch_size) or cfg.embed_dim % 4 or cfg.embed_dim % cfg.num_heads:
        raise SystemExit("error: 4 * --patch_size must divide --img_size; "
                         "--embed_dim must divide by 4 and by --num_heads")
    return TextConditionalDiT(img_size=cfg.img_size // VAE_DOWNSCALE, patch_size=cfg.patch_size,
                              in_channels=cfg.latent_channels, embed_dim=cfg.embed_dim, depth=cfg.depth,
                              num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, context_dim=context_dim)


def build_vae(cfg):
    if cfg.vae_channels % 8:
        raise SystemExit("error: --vae_channels must divide by 8 (GroupNorm uses 8 groups)")
    return VAE(cfg.latent_channels, cfg.vae_channels)


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


def get_vae_loss(vae, x, kl_weight):
    """Stage 1 loss for images x in [-1, 1]: reconstruction error + kl_weight * KL (7).

    The reconstruction term wants every detail kept. The KL term pulls each image's latent
    distribution towards N(0, I): it keeps latents in a compact range with no gaps between
    them, a space the flow of stage 2 can fill. Its weight is small (Stable Diffusion's is
    1e-6 on its loss scale), since a strong pull blurs the reconstructions.
    """
    reconstruction, mean, logvar = vae(x)
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
    return F.mse_loss(reconstruction.float(), x) + kl_weight * kl.float()


def psnr(images, reconstructions):
    """Peak signal-to-noise ratio in dB, 10 * log10(peak^2 / MSE), per image and averaged;
    images in [-1, 1], so the peak (the range) is 2."""
    mse = (reconstructions.clamp(-1, 1) - images).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(4 / mse)).mean().item()


def get_text_conditional_loss(model, x0, text_embeddings, text_mask, null_embedding, null_mask,
                              text_dropout=0.1, time_sampling="logit_normal"):
    """Flow-matching loss (3) for a batch of data x0 in [-1, 1] with its captions' token
    embeddings [B, M, D] and masks [B, M].

    Each caption becomes the empty prompt (null_embedding [M, D], null_mask [M]) with
    probability text_dropout, so one network learns both the conditional and the
    unconditional velocity that CFG blends.
    """
    dropped = torch.rand(len(x0), device=x0.device) < text_dropout
    text_embeddings = torch.where(dropped[:, None, None], null_embedding, text_embeddings)
    text_mask = torch.where(dropped[:, None], null_mask, text_mask)
    x1 = torch.randn_like(x0)                           # noise
    t = sample_timesteps(len(x0), time_sampling, x0.device)
    t_ = t[:, None, None, None]
    x_t = (1 - t_) * x0 + t_ * x1                       # the straight path (1)
    v_target = x1 - x0                                  # its velocity (2)
    return F.mse_loss(model(x_t, t, text_embeddings, text_mask).float(), v_target)


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


def guided_velocity(model, x, t, text_embeddings, text_mask, null_embedding, null_mask, cfg_scale):
    """Classifier-free guidance, eq. (5): v = v_uncond + w * (v_cond - v_uncond).

    The conditional (the prompts) and the unconditional (the empty prompt) halves go through
    one forward pass.
    """
    null_embeddings = null_embedding.expand_as(text_embeddings)
    null_masks = null_mask.expand_as(text_mask)
    v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text_embeddings, null_embeddings]),
                             torch.cat([text_mask, null_masks])).float().chunk(2)
    return v_uncond + cfg_scale * (v_cond - v_uncond)


@torch.no_grad()
def sample_latent_conditional(model, vae, text_encoder, prompts=None, class_labels=None, latent_shape=(4, 8, 8),
                              cfg_scale=3.0, num_steps=50, device=None, trajectory=False):
    """Generate one image in [-1, 1] per prompt (or per CIFAR-10 class label, as its caption):
    the flow runs in latent space with guidance scale cfg_scale, then the VAE decodes.
    trajectory=True returns every Euler state instead, each decoded."""
    device = torch.device(device or next(model.parameters()).device)
    if prompts is None:
        if not all(0 <= int(label) < len(CIFAR10_CLASSES) for label in class_labels):
            raise ValueError(f"class labels must be CIFAR-10 classes 0..9, got {list(class_labels)}")
        prompts = make_cifar10_captions(class_labels)
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0 (0 = unconditional, 1 = conditional), got {cfg_scale}")
    embeddings, mask = encode_prompts(text_encoder, [prompts] if isinstance(prompts, str) else prompts, device)

    def velocity(x, t):
        with autocast(device):
            return guided_velocity(model, x, t, embeddings[:-1], mask[:-1], embeddings[-1], mask[-1], cfg_scale)

    def decode(z):  # undo the scaling to unit standard deviation, then latents -> pixels
        with autocast(device):
            return vae.decode(z / vae.scale_factor).float().clamp(-1, 1)

    states = euler_sample(velocity, torch.randn(len(embeddings) - 1, *latent_shape, device=device), num_steps)
    return [decode(z) for z in states] if trajectory else decode(states[-1])


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


def save_checkpoint(path, model, ema_model, optimizer, cfg, step, captions, vae, vae_step):
    """Write to a temporary file, then rename: a crash never leaves half a checkpoint."""
    state = {"script": SCRIPT, "config": dataclasses.asdict(cfg), "step": step,
             "model": model.state_dict(), "ema": ema_model.state_dict(),
             "optimizer": optimizer.state_dict(), "captions": captions,
             "vae": vae.state_dict(), "vae_step": vae_step}
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


def train_vae(vae, images, labels, cfg, start_step, device):
    """Stage 1: train the VAE on images. Returns the step reached: fewer than --vae_steps if
    stopped with Ctrl-C (--resume then goes on from there, with a fresh optimizer)."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    schedule = dataclasses.replace(cfg, lr=cfg.vae_lr, steps=cfg.vae_steps)  # lr_at with the VAE's lr and steps
    print(f"stage 1, the VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, "
          f"steps {start_step}->{cfg.vae_steps}, batch {cfg.vae_batch_size}, on {device}", flush=True)
    vae.train()
    t_start = t_last = time.time()
    step, step_last = start_step, start_step
    try:
        while step < cfg.vae_steps:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, schedule)
            with autocast(device):
                x, _ = get_batch(images, labels, cfg.vae_batch_size)
                loss = get_vae_loss(vae, x, cfg.kl_weight)
            if not torch.isfinite(loss):
                raise SystemExit(f"error: VAE loss became {loss.item()} at step {step}: try a lower --vae_lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            now = time.time()
            if now - t_last >= cfg.log_every or step == cfg.vae_steps:
                speed = (step - step_last) * cfg.vae_batch_size / (now - t_last)
                print(f"vae step {step:>6}/{cfg.vae_steps} | loss {loss.item():.4f} | {speed:6.0f} img/s | "
                      f"{format_time(now - t_start)} elapsed | "
                      f"ETA {format_time((cfg.vae_steps - step) * cfg.vae_batch_size / speed)}", flush=True)
                t_last, step_last = now, step
    except KeyboardInterrupt:
        pass
    return step


@torch.no_grad()
def encode_images(vae, images, batch_size=500):
    """uint8 images [N, 3, H, W] -> the VAE's posterior means [N, latent_channels, H/4, W/4]."""
    vae.eval()
    return torch.cat([vae.encode(images[n:n + batch_size].float() / 127.5 - 1)[0]
                      for n in range(0, len(images), batch_size)])


def encode_training_latents(vae, images, labels):
    """Stage 2's data, encoded once: the latents of every image and of its mirror image (step 4's
    flips, done before encoding), scaled to unit standard deviation.

    Why scale: the flow starts from N(0, I) noise, so the data should have a similar spread;
    the encoder's latents have whatever spread training gave them. Stable Diffusion's 0.18215
    is the same number: 1 / (standard deviation of its VAE's latents), measured on its data.
    """
    latents = torch.cat([encode_images(vae, images), encode_images(vae, images.flip(3))])
    vae.scale_factor.fill_(1 / latents.std().item())
    print(f"encoded {len(latents)} images to latents {tuple(latents.shape[1:])}; scale factor 1/std = "
          f"{vae.scale_factor.item():.4f} (Stable Diffusion's VAE: 0.18215)", flush=True)
    return latents * vae.scale_factor, torch.cat([labels, labels])


def train(model, ema_model, optimizer, latents, labels, captions, text_encoder, vae, cfg, out_dir, start_step,
          device):
    """Stage 2, the training loop: progress lines, log.csv, checkpoints, Ctrl-C and NaN handling."""
    # the class captions and the empty prompt, encoded once: the encoder never runs per batch
    text_embeddings, text_mask = encode_prompts(text_encoder, captions, device)
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
                x0, y = get_latent_batch(latents, labels, cfg.batch_size)
                loss = get_text_conditional_loss(model, x0, text_embeddings[y], text_mask[y], text_embeddings[-1],
                                                 text_mask[-1], cfg.text_dropout, cfg.time_sampling)
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
                save_checkpoint(ckpt_path, model, ema_model, optimizer, cfg, step, captions, vae, cfg.vae_steps)
    except KeyboardInterrupt:
        save_checkpoint(ckpt_path, model, ema_model, optimizer, cfg, step, captions, vae, cfg.vae_steps)
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


def latent_shape_of(cfg):
    return (cfg.latent_channels, cfg.img_size // VAE_DOWNSCALE, cfg.img_size // VAE_DOWNSCALE)


@torch.no_grad()
def save_reconstructions(vae, test_images, out_dir):
    """recon.png: held-out images, each row of 8 above its reconstructions (the posterior mean,
    decoded), and the PSNR over all the held-out images."""
    images = test_images.float() / 127.5 - 1
    reconstructions = torch.cat([vae.decode(z) for z in encode_images(vae, test_images).split(500)])
    quality = psnr(images, reconstructions)
    rows = [torch.cat([images[n:n + 8], reconstructions[n:n + 8]]) for n in range(0, min(32, len(images)), 8)]
    save_grid(torch.cat(rows), out_dir / "recon.png", ncol=8,
              title=f"held-out images / VAE reconstructions: PSNR {quality:.1f} dB")
    print(f"VAE reconstruction PSNR on {len(images)} held-out images: {quality:.2f} dB", flush=True)


def heat_colors(values):
    """Values in [0, 1] [..., H, W] -> a black-red-yellow-white heat map in [-1, 1] [..., 3, H, W]."""
    rgb = torch.stack([3 * values, 3 * values - 1, 3 * values - 2], dim=-3).clamp(0, 1)
    return rgb * 2 - 1


def save_attention_maps(model, vae, text_encoder, prompt, cfg, out_dir, device):
    """attention.png: an image drawn for the prompt, then for each of its tokens where the
    patches looked while drawing it: the cross-attention weights (6) of the conditional half,
    averaged over heads, blocks and Euler steps, each map scaled to its own maximum."""
    weights = []

    def record(cross_attn, inputs):  # runs before every cross-attention: recompute its weights
        x, context, context_mask = inputs
        weights.append(cross_attn.attention_weights(x[:1], context[:1], context_mask[:1])[0].mean(0))

    hooks = [block.cross_attn.register_forward_pre_hook(record) for block in model.blocks]
    torch.manual_seed(cfg.seed)
    image = sample_latent_conditional(model, vae, text_encoder, [prompt], latent_shape=latent_shape_of(cfg),
                                      cfg_scale=cfg.cfg_scale, num_steps=cfg.sample_steps)
    for hook in hooks:
        hook.remove()
    token_ids = text_encoder.tokenizer(prompt, truncation=True, max_length=text_encoder.max_length)["input_ids"]
    tokens = text_encoder.tokenizer.convert_ids_to_tokens(token_ids)
    attention = torch.stack(weights).float().mean(0)[:, :len(tokens)]  # [patches, tokens]
    share = attention.mean(0)  # the fraction of all attention each token gets
    patch_pixels = VAE_DOWNSCALE * cfg.patch_size  # one latent patch covers this many pixels a side
    grid = cfg.img_size // patch_pixels
    maps = attention.T.reshape(len(tokens), grid, grid)
    maps = maps / maps.amax(dim=(1, 2), keepdim=True)
    maps = maps.repeat_interleave(patch_pixels, 1).repeat_interleave(patch_pixels, 2)  # patch -> pixels
    save_grid(torch.cat([image, heat_colors(maps).to(image.device)]), out_dir / "attention.png",
              ncol=len(tokens) + 1, scale=3, title=f'cross-attention while drawing "{prompt}"',
              col_labels=["image"] + [f"{token[:10]} {p:.0%}" for token, p in zip(tokens, share)])


def write_outputs(model, vae, text_encoder, captions, cfg, out_dir, device, step):
    """samples.png, cfg_sweep.png, attention.png, trajectory.png and, with --eval_samples, samples.npz."""
    model.eval()
    prompts = list(cfg.prompts) or captions
    shape = latent_shape_of(cfg)
    torch.manual_seed(cfg.seed)  # the same noise whenever this checkpoint is sampled
    per_prompt = max(1, cfg.num_samples // len(prompts))
    images = sample_latent_conditional(model, vae, text_encoder, [p for p in prompts for _ in range(per_prompt)],
                                       latent_shape=shape, cfg_scale=cfg.cfg_scale, num_steps=cfg.sample_steps)
    save_grid(images, out_dir / "samples.png", ncol=per_prompt, row_labels=prompts,
              title=f"{SCRIPT}, step {step}, w={cfg.cfg_scale:g}")

    scales = [0, 1, 2, 3, 5, 7.5]
    sweep = []
    for w in scales:
        torch.manual_seed(cfg.seed)  # the same noise at every scale
        sweep.append(sample_latent_conditional(model, vae, text_encoder, prompts, latent_shape=shape, cfg_scale=w,
                                               num_steps=cfg.sample_steps))
    save_grid(torch.stack(sweep, dim=1).flatten(0, 1), out_dir / "cfg_sweep.png", ncol=len(scales),
              title="guidance scale w", col_labels=[f"w={w}" for w in scales], row_labels=prompts)

    save_attention_maps(model, vae, text_encoder, prompts[0], cfg, out_dir, device)

    states = sample_latent_conditional(model, vae, text_encoder, [prompts[i % len(prompts)] for i in range(8)],
                                       latent_shape=shape, cfg_scale=cfg.cfg_scale, num_steps=cfg.sample_steps,
                                       trajectory=True)
    keep = torch.linspace(0, cfg.sample_steps, 8).round().long().tolist()
    frames = torch.stack([states[i] for i in keep], dim=1)  # [8 samples, 8 times, C, H, W]
    save_grid(frames.flatten(0, 1), out_dir / "trajectory.png", ncol=len(keep),
              title="noise (t=1) -> data (t=0)", col_labels=[f"t={1 - i / cfg.sample_steps:.2f}" for i in keep])

    if cfg.eval_samples:  # 500 images at a time, so memory stays small for any N
        labels = torch.arange(cfg.eval_samples) % len(captions)  # equal numbers of every class
        chunks = [sample_latent_conditional(model, vae, text_encoder, [captions[k] for k in labels[n:n + 500]],
                                            latent_shape=shape, cfg_scale=cfg.cfg_scale, num_steps=cfg.sample_steps)
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
    transformers.logging.disable_progress_bar()  # no "Loading weights" bar on every run
    try:
        text_encoder = CLIPTextEncoder(cfg.text_encoder, device)
    except (OSError, ValueError):
        raise SystemExit(f"error: could not load the text encoder {cfg.text_encoder!r} (no network, or not a "
                         f"Hugging Face text model): pass --text_encoder a hub id or a local model folder")

    vae = build_vae(cfg).to(device)
    model = build_model(cfg, text_encoder.embed_dim).to(device)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = vae_step = 0
    if ckpt:
        try:
            vae.load_state_dict(ckpt["vae"])
            model.load_state_dict(ckpt["model"])
            ema_model.load_state_dict(ckpt["ema"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError):
            flags = " ".join(f"--{k} {v}" for k, v in ckpt["config"].items()
                             if k in given and given[k] != v)
            raise SystemExit(f"error: {out_dir / 'ckpt.pt'} holds a model of another shape (it was trained "
                             f"with {flags or 'other settings'}): drop those flags or use another --out_dir")
        step, vae_step = ckpt["step"], ckpt["vae_step"]
    if cfg.vae_ckpt and not cfg.sample_only:  # a VAE trained before: stage 1 is done
        try:
            vae.load_state_dict(load_checkpoint(Path(cfg.vae_ckpt))["vae"])
        except RuntimeError:
            raise SystemExit(f"error: the VAE in {cfg.vae_ckpt} has another shape: pass its --latent_channels "
                             f"and --vae_channels")
        vae_step = cfg.vae_steps
    captions = ckpt["captions"] if ckpt else []
    if not cfg.sample_only:
        images, labels, captions = load_images(cfg.data_dir, cfg.img_size, device)
        images, labels, test_images = hold_out(images, labels, min(cfg.vae_test_images, len(images) // 2))
        if vae_step < cfg.vae_steps:
            vae_step = train_vae(vae, images, labels, cfg, vae_step, device)
            save_checkpoint(out_dir / "ckpt.pt", model, ema_model, optimizer, cfg, step, captions, vae, vae_step)
            if vae_step < cfg.vae_steps:
                raise SystemExit(f"\ninterrupted at VAE step {vae_step}: saved {out_dir / 'ckpt.pt'}; "
                                 f"add --resume to continue")
        vae.requires_grad_(False)
        save_reconstructions(vae, test_images, out_dir)
        latents, latent_labels = encode_training_latents(vae, images, labels)
        train(model, ema_model, optimizer, latents, latent_labels, captions, text_encoder, vae, cfg, out_dir, step,
              device)
        step = max(step, cfg.steps)
    write_outputs(ema_model, vae, text_encoder, captions, cfg, out_dir, device, step)


if __name__ == "__main__":
    main()
