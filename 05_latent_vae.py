"""Step 5: a miniature Stable Diffusion: the text-to-image flow of step 4, in a VAE's latent space.

What this step adds
    The flow, the text conditioning and the guidance of step 4 are unchanged: path
    x_t = (1 - t) * x0 + t * x1 (1), velocity v = x1 - x0 (2), loss || v_theta - v ||^2 (3),
    Euler x_{t - dt} = x_t - dt * v_theta (4) or Heun (4b), CFG v = v_uncond + w * (v_cond - v_uncond)
    (5), cross-attention to the text tokens (6).
    What changes is where the flow runs. Pixels are expensive: most of a 32x32x3 image is detail
    that a small network learns late. Latent diffusion (Rombach et al. 2022) first learns a
    compact code, then runs the flow on the code:
    Stage 1: a VAE compresses each image to a 4x8x8 latent (12x fewer numbers) and back.
        loss = mean over pixel values of (decode(z) - x)^2
               + kl_weight * mean over latent numbers of KL(q(z | x) || N(0, I)),
        KL per latent number = 1/2 * (mean^2 + sigma^2 - 1 - log sigma^2)                 (7)
    Both terms are means, so kl_weight does not depend on the image size; summed over one
    32x32x3 image and its 4x8x8 latent, the KL's weight is 3072 / 256 = 12 times kl_weight.
    The whole dataset is then encoded once, and the latents are scaled to unit standard
    deviation, the spread of the noise the flow starts from.
    Stage 2: the DiT of step 4 learns the flow from noise to latents: 16 tokens instead of 64,
    so each training step is several times cheaper. Sampling runs the flow in latent space,
    undoes the scaling, and the VAE's decoder turns the latent into pixels.
    --vae_downscale 8 adds a third stride-2 stage, as Stable Diffusion's VAE has (512x512 ->
    64x64 latents): a 64x64 image then gives the same 4x8x8 latent, and the same cheap DiT,
    as a 32x32 image with the default 4x VAE. The DiT's cost is set by the latent grid, not by
    the image, so the larger factor is what makes high resolutions affordable; its price is
    the detail that the decoder has to put back.

Run it
    python 05_latent_vae.py                      # full run (downloads CIFAR-10 and CLIP)
    python 05_latent_vae.py --tiny               # a few seconds, to see that it works
    python 05_latent_vae.py --vae_ckpt out/05_latent_vae/ckpt.pt --out_dir out/05b  # reuse a trained VAE
    python 05_latent_vae.py --sample_only --prompts "a photo of a ship" "a photo of a red car"

What to expect
    About 35 minutes on a slow 2-core CPU (24 on a faster one; a GPU is much faster): 9 to train
    the VAE (about 180 images/s), 2 to encode the data, 24 for the flow on latents (about 540
    images/s, 4 times step 4's), seconds for the pictures. out/05_latent_vae/ then holds
    recon.png (held-out images above their reconstructions), samples.png (a row per prompt),
    cfg_sweep.png, colours.png, attention.png, trajectory.png and .gif, nfe_sweep.png,
    progress.png, loss.png, log.csv (stage 2), vae_log.csv (stage 1) and ckpt.pt (the VAE
    included).
"""

import argparse
import copy
import csv
import dataclasses
import inspect
import io
import math
import os
import re
import shutil
import signal
import socket
import time
import urllib.parse
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from PIL import Image, ImageDraw, ImageFont
from torchvision import transforms
from torchvision.datasets import CIFAR10, ImageFolder
from transformers import AutoModelForTextEncoding, AutoTokenizer

SCRIPT = Path(__file__).stem  # written into checkpoints, so another script's are refused


# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    # data and outputs
    data_dir: str = "./data"  # CIFAR-10 is downloaded here when missing; or a folder of class sub-folders
    img_size: int = 32  # images are resized and center-cropped to this (CIFAR-10 is 32x32)
    train_images: int = 0  # train on this many images, picked at random; 0 = all of them
    captions: str = "colour"  # "colour": "a photo of a red car", the colour read from each image; "class": no colour
    out_dir: str = ""  # where outputs go; empty means out/<script name>
    # model
    text_encoder: str = "openai/clip-vit-base-patch32"  # frozen; a hub id or a local folder, CLIP or not
    latent_channels: int = 4  # the VAE turns a 3x32x32 image into a 4x8x8 latent
    vae_channels: int = 32  # the VAE's convolution width at full size (twice that below)
    vae_downscale: int = 4  # how much the VAE shrinks each side: 4 (32x32 -> 8x8) or 8, as Stable Diffusion's
    patch_size: int = 2  # 8x8 latent -> 4x4 = 16 tokens of 2x2 latent pixels
    embed_dim: int = 128  # token width
    depth: int = 6  # DiT blocks
    num_heads: int = 4  # attention heads (embed_dim must divide by it)
    mlp_ratio: float = 4.0  # MLP hidden width / embed_dim
    # training, stage 1: the VAE
    vae_steps: int = 1500  # VAE optimizer steps
    vae_batch_size: int = 64  # images per VAE step
    vae_lr: float = 1e-3  # VAE learning rate (the same warmup as stage 2)
    vae_weight_decay: float = 0.01  # AdamW weight decay of the VAE
    kl_weight: float = 1e-5  # weight of the KL term (7) in the VAE loss: small, as in Stable Diffusion
    vae_test_images: int = 1000  # held out of training, to measure the VAE's reconstructions (PSNR)
    vae_ckpt: str = ""  # reuse the VAE of this 05 checkpoint and skip stage 1
    # training, stage 2: the flow on latents
    steps: int = 6000  # optimizer steps (16 to 24 minutes on a 2-core CPU)
    batch_size: int = 128  # latents per step (twice step 4's: latent steps are cheap, bigger ones use the CPU better)
    lr: float = 1e-3  # learning rate, after a linear warmup
    warmup_steps: int = 100  # linear warmup from 0 to lr, then constant
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # clip the gradient norm to this
    ema: bool = True  # sample with an exponential moving average of the weights
    ema_decay: float = 0.999  # EMA decay: an average over the last 1 / (1 - decay) steps
    time_sampling: str = "logit_normal"  # how training picks t: "logit_normal" or "uniform"
    text_dropout: float = 0.1  # chance that a training caption becomes the empty prompt (for CFG)
    # sampling
    sampler: str = "heun"  # "euler" (4) or "heun" (4b)
    sample_steps: int = 4  # sampler steps from t=1 to t=0 (N Heun steps cost 2N - 1 network evaluations)
    prompts: tuple = ()  # what samples.png draws, e.g. --prompts "a photo of a cat" "a red car"; () = one per class
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
            sample_steps=4, num_samples=16, log_every=1.0, train_images=512,
            vae_channels=8, vae_steps=10, vae_batch_size=16, vae_test_images=3)

# The fields that define the model: a checkpoint is only loaded where they match.
MODEL_FIELDS = ("text_encoder", "img_size", "latent_channels", "vae_channels", "vae_downscale", "patch_size",
                "embed_dim", "depth", "num_heads", "mlp_ratio")


# ----------------------------------------------------------------------------- device

def get_device(name="auto"):
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


def uses_bf16(device):
    """bf16 autocast only on a GPU that computes in bf16 natively; float32 everywhere else."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def autocast(device):
    """bf16 autocast where uses_bf16 (faster, same results in practice); float32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device))


# ----------------------------------------------------------------------------- data

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def make_caption(class_name):
    """A class or folder name as a prompt in the form CLIP knows best: "a photo of a cat"."""
    name = class_name.replace("_", " ")
    return f"a photo of {'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def make_cifar10_captions(labels):
    """CIFAR-10 class indices -> captions: 0 -> "a photo of an airplane", 3 -> "a photo of a cat"."""
    return [make_caption(CIFAR10_CLASSES[int(label)]) for label in labels]


COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "brown", "white", "gray", "black")
HUE_EDGES = torch.tensor([15.0, 40, 70, 165, 260, 330])  # degrees: red|orange|yellow|green|blue|purple|red


def colour_of(image):
    """The colour of the object in a uint8 image [S, S, 3], or None where the rule is unsure.

    CIFAR-10 objects sit in the middle, so only the central half of each side counts. Each of its
    pixels is named from hue, saturation and brightness (HSV, all in [0, 1]): too dark is black,
    too grey is white or gray, anything else by its hue, with dark orange called brown. The image
    gets the most common name if at least 40% of the centre has it, else none."""
    s = image.shape[0]
    centre = np.ascontiguousarray(image[s // 4:s - s // 4, s // 4:s - s // 4])
    hue, sat, value = torch.from_numpy(np.array(Image.fromarray(centre).convert("HSV"))).float().div(255).unbind(-1)
    index = {colour: i for i, colour in enumerate(COLOURS)}
    name = torch.tensor([0, 1, 2, 3, 4, 5, 0])[torch.bucketize(hue * 360, HUE_EDGES)]  # red .. purple, red
    name = torch.where((name == index["orange"]) & (value < 0.6), index["brown"], name)  # dark orange
    no_colour = torch.where(value > 0.75, index["white"], index["gray"])
    name = torch.where(sat < 0.2, no_colour, name)  # too little saturation for a hue
    name = torch.where(value < 0.2, index["black"], name)  # too dark for a hue
    counts = name.flatten().bincount(minlength=len(COLOURS))
    return COLOURS[counts.argmax()] if counts.max() >= 0.4 * name.numel() else None


def describe(image, class_name, captions):
    """One image's training caption: "a photo of a red car" with --captions colour, except where
    colour_of is unsure or the class name has a colour already (red_car); "a photo of a car" with class."""
    colour = colour_of(image) if captions == "colour" else None
    if colour is None or any(word in COLOURS for word in class_name.split("_")):
        return make_caption(class_name)
    return make_caption(f"{colour} {class_name}")


def class_named_in(prompt, classes):
    """The index of the class that a prompt names ("a photo of a red cat" -> cat's), -1 if none."""
    words = " " + " ".join(re.findall(r"[a-z0-9]+", prompt.lower())) + " "
    named = [i for i, name in enumerate(classes) if f" {name.replace('_', ' ').lower()} " in words]
    return named[0] if named else -1


def open_dataset(data_dir, transform):
    """data_dir as a folder of images in class sub-folders, or CIFAR-10 there (downloaded into
    it when it holds nothing else). Returns the dataset and its class names."""
    root = Path(data_dir)
    if root.exists() and not root.is_dir():
        raise SystemExit(f"error: --data_dir {root} is a file: pass a folder")
    known = ("cifar-10-batches-py", "cifar-10-python.tar.gz", "MNIST")  # what the scripts download there
    if root.is_dir() and any(p.name not in known for p in root.iterdir()):
        return open_image_folder(root, transform)
    if not (root / "cifar-10-batches-py").is_dir():
        print(f"downloading CIFAR-10 to {data_dir} ...", flush=True)
        try:
            with removed_on_failure(root / "cifar-10-batches-py"), redirect_stdout(io.StringIO()):
                CIFAR10(data_dir, train=True, download=True)  # torchvision prints its progress
        except Exception:
            raise SystemExit(
                f"error: CIFAR-10 is not in {data_dir} and could not be downloaded: put cifar-10-python.tar.gz "
                f"in {data_dir}, or pass --data_dir a folder of images in class sub-folders (cat/1.jpg, ...)")
    try:
        return CIFAR10(data_dir, train=True, transform=transform), list(CIFAR10_CLASSES)
    except Exception:
        raise SystemExit(f"error: the CIFAR-10 files in {root / 'cifar-10-batches-py'} are corrupt or incomplete: "
                         f"delete them to download them again")


def open_image_folder(root, transform):
    """root/<class name>/<image>: torchvision's ImageFolder, and its class names."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if "train" in classes and set(classes) <= {"train", "test", "val", "valid"}:
        raise SystemExit(f"error: {root} holds the splits {', '.join(classes)}, not classes: "
                         f"pass --data_dir {root / 'train'}")
    if not classes:
        raise SystemExit(f"error: {root} has no class sub-folders: put the images in {root}/<class name>/")
    try:
        folder = ImageFolder(root, transform=transform)
    except FileNotFoundError as error:  # a class folder with no image in it
        raise SystemExit(f"error: {root}: {error}")
    return folder, folder.classes


def load_images(data_dir, img_size, device, train_images=0, captions="colour"):
    """The training images as one uint8 tensor [N, 3, S, S] on the device, the index of each
    one's caption [N], the distinct captions (see describe) and the class names; train_images > 0
    picks that many at random.

    The images are decoded once, so batches are drawn by index: no DataLoader, no per-image work.
    """
    resize = transforms.Compose([transforms.Resize(img_size), transforms.CenterCrop(img_size)])
    dataset, classes = open_dataset(data_dir, resize)
    picked = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:train_images or None]
    print(f"decoding {len(picked)} images of {len(classes)} classes ...", flush=True)
    images = torch.stack([decode(dataset, i) for i in picked.sort().values.tolist()])
    class_labels = torch.tensor(dataset.targets)[picked.sort().values]
    texts = [describe(image.numpy(), classes[label], captions) for image, label in zip(images, class_labels)]
    distinct = sorted(set(texts))
    labels = torch.tensor([distinct.index(text) for text in texts])
    print(f"{len(distinct)} distinct captions, e.g. {distinct[len(distinct) // 2]!r}", flush=True)
    return images.permute(0, 3, 1, 2).to(device), labels.to(device), distinct, classes


def decode(dataset, i):
    """Image i as a uint8 tensor [S, S, 3]; a file that is not a readable image stops the run, by name."""
    try:
        return torch.from_numpy(np.array(dataset[i][0].convert("RGB")))
    except OSError as error:  # PIL's errors for corrupt, truncated or unknown files
        name = dataset.samples[i][0] if hasattr(dataset, "samples") else f"image {i}"
        raise SystemExit(f"error: cannot read {name} ({error}): delete or replace it")


def get_batch(images, labels, batch_size):
    """A random batch scaled from uint8 [0, 255] to float [-1, 1], with its labels.
    Half the images are mirrored left-right: a cat facing left is as much a cat."""
    idx = torch.randint(len(images), (batch_size,), device=images.device)
    x = images[idx].float() / 127.5 - 1
    mirrored = torch.rand(batch_size, 1, 1, 1, device=x.device) < 0.5
    return torch.where(mirrored, x.flip(3), x), labels[idx]


def hold_out(images, labels, n):
    """Split off n random images that neither stage trains on: the VAE's test images."""
    if len(images) < 2 * n:
        raise SystemExit(f"error: {len(images)} images are too few to hold out --vae_test_images {n} and train on "
                         f"at least as many: add images or lower --vae_test_images")
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


def hub_reachable(timeout=3.0):
    """Whether the Hugging Face hub answers at all: without a network, loading an encoder that
    is not on disk then fails in seconds instead of after the hub's retries."""
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


class CLIPTextEncoder:
    """A frozen pretrained text encoder: prompts -> one embedding per token, and a padding mask.

    By default CLIP's text tower (Radford et al. 2021), trained on 400M image-caption pairs to
    match images, so its embeddings carry visual meaning. model_name is a hub id or a local
    folder; any other Hugging Face text encoder (a BERT, T5's encoder, ...) works too, through
    its last hidden state, so you can compare encoders. It is never trained: eval mode, no gradients.
    """

    def __init__(self, model_name="openai/clip-vit-base-patch32", device=None):
        self.device = torch.device(device or "cpu")
        local_only = Path(model_name).is_dir() or not hub_reachable()  # the local folder or cache only
        self.tokenizer = AutoTokenizer.from_pretrained(model_name, local_files_only=local_only)
        self.model = AutoModelForTextEncoding.from_pretrained(model_name, local_files_only=local_only)
        self.model.to(self.device).eval().requires_grad_(False)
        self.is_clip = self.model.config.model_type.startswith("clip")
        if self.tokenizer.pad_token is None:  # GPT-style tokenizers have none; padding is masked out anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
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


class VAE(nn.Module):
    """A small convolutional variational autoencoder (Kingma & Welling 2014), the first stage of
    Stable Diffusion: image [3, H, W] -> encoder -> mean and log-variance of a latent
    [latent_channels, H/downscale, W/downscale] -> a sample z -> decoder -> image.

    scale_factor maps latents to unit standard deviation for the flow; it is measured on the
    data after training (see encode_training_latents) and kept in the state dict.
    """

    def __init__(self, latent_channels=4, channels=32, downscale=4):
        super().__init__()
        c, stages = channels, int(math.log2(downscale))  # each stage halves the height and width
        down = [nn.Conv2d(3, c, 3, padding=1), ResBlock(c)]
        for k in range(stages):  # 32x32 -> 16x16 -> 8x8 (-> 4x4 ...)
            down += [nn.Conv2d(c if k == 0 else 2 * c, 2 * c, 4, stride=2, padding=1), ResBlock(2 * c)]
        self.encoder = nn.Sequential(*down, nn.GroupNorm(8, 2 * c), nn.SiLU(),
                                     nn.Conv2d(2 * c, 2 * latent_channels, 3, padding=1))
        up = [nn.Conv2d(latent_channels, 2 * c, 3, padding=1), ResBlock(2 * c)]
        for k in range(stages):  # and back up, to c channels at full size
            width = c if k == stages - 1 else 2 * c
            up += [nn.Upsample(scale_factor=2), nn.Conv2d(2 * c, width, 3, padding=1), ResBlock(width)]
        self.decoder = nn.Sequential(*up, nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1))
        self.register_buffer("scale_factor", torch.tensor(1.0))

    def encode(self, x):
        """Images [B, 3, H, W] in [-1, 1] -> mean and log-variance of q(z | x),
        each [B, latent_channels, H/downscale, W/downscale]."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)

    def decode(self, z):
        """Latents [B, latent_channels, H/downscale, W/downscale] -> images [B, 3, H, W]."""
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
        self.context_dim = context_dim
        self.patch_embed = nn.Linear(patch_size * patch_size * in_channels, embed_dim)
        grid_size = img_size // patch_size
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, grid_size))
        self.time_embed = TimeEmbedding(embed_dim)
        self.blocks = nn.ModuleList(TextConditionedDiTBlock(embed_dim, num_heads, mlp_ratio, context_dim)
                                    for _ in range(depth))
        self.final_layer = FinalLayer(embed_dim, patch_size, in_channels)

    def forward(self, x, t, text_embeddings, text_mask=None):
        if text_embeddings.shape[-1] != self.context_dim:
            raise ValueError(f"the text embeddings are {text_embeddings.shape[-1]}-dimensional but this model reads "
                             f"{self.context_dim}: build it with context_dim=text_encoder.embed_dim")
        tokens = self.patch_embed(patchify(x, self.patch_size)) + self.pos_embed
        c = self.time_embed(t)  # time steers every block via adaLN, the text via cross-attention
        for block in self.blocks:
            tokens = block(tokens, c, text_embeddings, text_mask)
        tokens = self.final_layer(tokens, c)
        return unpatchify(tokens, self.patch_size, self.in_channels, self.img_size, self.img_size)


# Seed 000's latent example builds a class-conditional DiT: in this step a class label reaches the
# model as its caption ("a photo of a cat", see sample_latent_conditional), so that DiT is this one.
ConditionalDiT = TextConditionalDiT


def build_model(cfg, context_dim):
    """The DiT of stage 2, on latents: [latent_channels, img_size/vae_downscale, ...] instead of pixels."""
    return TextConditionalDiT(img_size=cfg.img_size // cfg.vae_downscale, patch_size=cfg.patch_size,
                              in_channels=cfg.latent_channels, embed_dim=cfg.embed_dim, depth=cfg.depth,
                              num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, context_dim=context_dim)


def build_vae(cfg):
    return VAE(cfg.latent_channels, cfg.vae_channels, cfg.vae_downscale)


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
    """Stage 1 loss for images x in [-1, 1], eq. (7): the mean squared reconstruction error
    + kl_weight * the mean KL per latent number.

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
                              text_dropout=0.1, time_sampling="logit_normal", record=None):
    """Flow-matching loss (3) for a batch of data x0 in [-1, 1] with its captions' token
    embeddings [B, M, D] and masks [B, M].

    Each caption becomes the empty prompt (null_embedding [M, D], null_mask [M]) with
    probability text_dropout, so one network learns both the conditional and the
    unconditional velocity that CFG blends.
    record: a list that, when given, collects (t, the loss of each image): the loss by time.
    """
    dropped = torch.rand(len(x0), device=x0.device) < text_dropout
    text_embeddings = torch.where(dropped[:, None, None], null_embedding, text_embeddings)
    text_mask = torch.where(dropped[:, None], null_mask, text_mask)
    x1 = torch.randn_like(x0)                           # noise
    t = sample_timesteps(len(x0), time_sampling, x0.device)
    t_ = t[:, None, None, None]
    x_t = (1 - t_) * x0 + t_ * x1                       # the straight path (1)
    v_target = x1 - x0                                  # its velocity (2)
    loss_per_image = (model(x_t, t, text_embeddings, text_mask).float() - v_target).pow(2).flatten(1).mean(1)
    if record is not None:
        record.append((t.detach(), loss_per_image.detach()))
    return loss_per_image.mean()


# ----------------------------------------------------------------------------- sampler

@torch.no_grad()
def euler_sample(velocity, x, num_steps, trajectory=True):
    """Integrate dx/dt = velocity(x, t) from t = 1 (noise) to t = 0 (data) with Euler, eq. (4).

    Returns [x at t=1, ..., x at t=0], every state, so a caller can show the trajectory;
    trajectory=False keeps only the last, [x at t=0], to save memory.
    """
    ts = torch.linspace(1, 0, num_steps + 1, device=x.device)
    states = [x]
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = velocity(x, t.expand(len(x)))
        x = x + (t_next - t) * v  # t_next - t = -dt < 0: a step back in time
        states = states + [x] if trajectory else [x]
    return states


@torch.no_grad()
def heun_sample(velocity, x, num_steps, trajectory=True):
    """The same integration with Heun's method, eq. (4b): an Euler step to t_next, then the
    step again with the average of the velocities at t and at t_next. The last step, to t = 0,
    stays an Euler step (as in Karras et al. 2022): training hardly ever draws t near 0, so the
    velocity there is the least reliable, and N steps cost 2N - 1 evaluations."""
    ts = torch.linspace(1, 0, num_steps + 1, device=x.device)
    states = [x]
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = velocity(x, t.expand(len(x)))
        x_euler = x + (t_next - t) * v
        if t_next > 0:
            v_next = velocity(x_euler, t_next.expand(len(x)))
            x_euler = x + (t_next - t) * (v + v_next) / 2
        x = x_euler
        states = states + [x] if trajectory else [x]
    return states


SAMPLERS = {"euler": euler_sample, "heun": heun_sample}
NFE = {"euler": lambda steps: steps, "heun": lambda steps: 2 * steps - 1}  # network evaluations: the real cost


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
def sample_latent_conditional(model, vae, text_encoder=None, prompts=None, class_labels=None, latent_shape=(4, 8, 8),
                              cfg_scale=3.0, num_steps=50, device=None, trajectory=False, sampler="euler"):
    """Generate one image in [-1, 1] per prompt (or per CIFAR-10 class label, as its caption):
    the flow runs in latent space with guidance scale cfg_scale, then the VAE decodes.
    trajectory=True returns every sampler state instead, each decoded. Without a text_encoder,
    the default CLIP is loaded."""
    device = torch.device(device or next(model.parameters()).device)
    if prompts is None and class_labels is None:
        raise ValueError("pass prompts=[...] (text) or class_labels=[...] (CIFAR-10 classes 0..9)")
    if prompts is None:
        if not all(0 <= int(label) < len(CIFAR10_CLASSES) for label in class_labels):
            raise ValueError(f"class labels must be CIFAR-10 classes 0..9, got {list(class_labels)}")
        prompts = make_cifar10_captions(class_labels)
    if not (math.isfinite(cfg_scale) and cfg_scale >= 0):
        raise ValueError(f"cfg_scale must be >= 0 (0 = unconditional, 1 = conditional), got {cfg_scale}")
    text_encoder = text_encoder or CLIPTextEncoder(device=device)
    embeddings, mask = encode_prompts(text_encoder, [prompts] if isinstance(prompts, str) else prompts, device)

    def velocity(x, t):
        with autocast(device):
            return guided_velocity(model, x, t, embeddings[:-1], mask[:-1], embeddings[-1], mask[-1], cfg_scale)

    def decode(z):  # undo the scaling to unit standard deviation, then latents -> pixels
        with autocast(device):
            return vae.decode(z / vae.scale_factor).float().clamp(-1, 1)

    noise = torch.randn(len(embeddings) - 1, *latent_shape, device=device)
    states = SAMPLERS[sampler](velocity, noise, num_steps, trajectory)
    return [decode(z) for z in states] if trajectory else decode(states[-1])


# ----------------------------------------------------------------------------- training

def lr_at(step, cfg):
    """Linear warmup, then constant. The EMA of the weights does the averaging that a decaying
    rate would, and since the rate does not depend on --steps, a finished run can be trained
    further with --resume as if it had been asked for more steps from the start."""
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr


@torch.no_grad()
def update_ema(ema_model, model, step, decay):
    """ema <- d * ema + (1 - d) * weights. Until step 1 / (1 - decay), d = 1 - 1 / (step + 1) makes
    the EMA the plain mean of all weights so far; from then on it averages over the last
    1 / (1 - decay) steps, as the number says."""
    d = min(decay, 1 - 1 / (step + 1))
    for e, p in zip(ema_model.parameters(), model.parameters()):
        e.lerp_(p, 1 - d)


def train_vae(vae, vae_optimizer, images, labels, cfg, out_dir, device, parts, extras):
    """Stage 1: train the VAE on images, from extras["vae_step"] to cfg.vae_steps, with the
    same schedule, checkpoints, log (vae_log.csv) and stops as stage 2."""
    stage = dataclasses.replace(cfg, lr=cfg.vae_lr, steps=cfg.vae_steps, batch_size=cfg.vae_batch_size)
    ckpt_path = out_dir / "ckpt.pt"
    step = extras["vae_step"]
    saved_step = step if cfg.resume else None  # the step the checkpoint on disk holds, for this run
    print("stage 1: the VAE", flush=True)
    log = TrainingLog(out_dir / "vae_log.csv", stage, step, device, vae)
    vae.train()
    stop = []
    try:
        with on_stop_signals(lambda signum, frame: stop.append(signum)):
            while step < stage.steps and not stop:
                rng = rng_states(device)  # the random state at the start of this step, for a checkpoint
                lr = lr_at(step, stage)
                for group in vae_optimizer.param_groups:
                    group.update(lr=lr, weight_decay=cfg.vae_weight_decay)
                with autocast(device):
                    x, _ = get_batch(images, labels, stage.batch_size)
                    loss = get_vae_loss(vae, x, cfg.kl_weight)
                check_finite("VAE loss", loss, step, ckpt_path, saved_step)
                vae_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                check_finite("VAE gradient norm", nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip),
                             step, ckpt_path, saved_step)
                vae_optimizer.step()
                step = extras["vae_step"] = step + 1
                log.step(step, loss.item(), lr)
                if step % cfg.ckpt_every == 0 or step == stage.steps or stop:
                    save_checkpoint(ckpt_path, cfg, 0, parts, rng_states(device), extras)
                    saved_step = step
    except KeyboardInterrupt:  # raised inside a step: that step never reached the weights
        save_checkpoint(ckpt_path, cfg, 0, parts, rng, extras)
        stop.append(signal.SIGINT)
    finally:
        log.close()
    if stop:
        raise SystemExit(f"interrupted at VAE step {step}: saved {ckpt_path}; add --resume to continue")
    vae.eval()
    return ["vae_log.csv"]


@torch.no_grad()
def encode_images(vae, images, batch_size=500):
    """uint8 images [N, 3, H, W] -> the VAE's posterior means [N, latent_channels, H/downscale, W/downscale]."""
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


def train(model, ema_model, optimizer, latents, labels, text_encoder, vae, cfg, out_dir, step, device, parts,
          extras):
    """Stage 2, the training loop, from step to cfg.steps. Ctrl-C and SIGTERM stop it between two
    steps with a checkpoint; a non-finite loss or gradient stops it before it touches the weights."""
    # the training captions and the empty prompt, encoded once: the encoder never runs per batch
    text_embeddings, text_mask = encode_prompts(text_encoder, extras["captions"], device)
    preview_prompts = [make_caption(extras["classes"][i % len(extras["classes"])]) for i in range(8)]
    ckpt_path = out_dir / "ckpt.pt"
    saved_step = step if cfg.resume else None  # the step the checkpoint on disk holds, for this run
    print("stage 2: the flow on latents", flush=True)
    log = TrainingLog(out_dir / "log.csv", cfg, step, device, model)
    previews = Previews(cfg, extras)
    stop = []
    try:
        with on_stop_signals(lambda signum, frame: stop.append(signum)):
            while step < cfg.steps and not stop:
                rng = rng_states(device)  # the random state at the start of this step, for a checkpoint
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group.update(lr=lr, weight_decay=cfg.weight_decay)
                with autocast(device):
                    x0, y = get_latent_batch(latents, labels, cfg.batch_size)
                    loss = get_text_conditional_loss(model, x0, text_embeddings[y], text_mask[y], text_embeddings[-1],
                                                     text_mask[-1], cfg.text_dropout, cfg.time_sampling, log.by_time)
                check_finite("loss", loss, step, ckpt_path, saved_step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                check_finite("gradient norm", nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip),
                             step, ckpt_path, saved_step)
                optimizer.step()
                update_ema(ema_model, model, step, cfg.ema_decay if cfg.ema else 0.0)
                step += 1
                log.step(step, loss.item(), lr)
                previews.maybe_add(step, lambda: sample_latent_conditional(
                    ema_model, vae, text_encoder, preview_prompts,
                    latent_shape=latent_shape_of(cfg), cfg_scale=cfg.cfg_scale, num_steps=cfg.sample_steps,
                    device=device, sampler=cfg.sampler))
                if step % cfg.ckpt_every == 0 or step == cfg.steps or stop:
                    save_checkpoint(ckpt_path, cfg, step, parts, rng_states(device), extras)
                    saved_step = step
    except KeyboardInterrupt:  # raised inside a step: that step never reached the weights
        save_checkpoint(ckpt_path, cfg, step, parts, rng, extras)
        stop.append(signal.SIGINT)
    finally:
        log.close()
    if stop:
        raise SystemExit(f"interrupted at step {step}: saved {ckpt_path}; add --resume to continue")
    return ["ckpt.pt", "log.csv"] + previews.save(out_dir / "progress.png") + plot_loss(out_dir / "log.csv",
                                                                                       out_dir / "loss.png")


class TextConditionalTrainer:
    """Seed 002's notebook interface, a thin layer over this script's loss and optimizer:
    train(num_epochs) runs over a DataLoader of (images in [-1, 1], labels), captions each batch
    with caption_fn(labels) and returns the mean loss of each epoch. main() does not use it: its
    loop adds the EMA, the log, checkpoints and signals. In step 5, the loader yields latents."""

    def __init__(self, model, text_encoder, dataloader, caption_fn, lr=1e-4, weight_decay=0.01, text_drop_prob=0.1,
                 device=None):
        self.device = torch.device(device or next(model.parameters()).device)
        self.model, self.text_encoder, self.dataloader = model.to(self.device), text_encoder, dataloader
        self.caption_fn, self.text_drop_prob = caption_fn, text_drop_prob
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.epoch_losses = []

    def train(self, num_epochs):
        print(f"Training on {self.device}", flush=True)
        for _ in range(num_epochs):
            losses = []
            for images, labels in self.dataloader:
                embeddings, mask = encode_prompts(self.text_encoder, self.caption_fn(labels), self.device)
                with autocast(self.device):
                    loss = get_text_conditional_loss(self.model, images.to(self.device), embeddings[:-1], mask[:-1],
                                                     embeddings[-1], mask[-1], self.text_drop_prob)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                self.optimizer.step()
                losses.append(loss.item())
            self.epoch_losses.append(sum(losses) / len(losses))
            print(f"Epoch {len(self.epoch_losses)}: avg_loss = {self.epoch_losses[-1]:.4f}", flush=True)
        return self.epoch_losses[-num_epochs:]

    def save_checkpoint(self, path):
        state = dict(script=SCRIPT, model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                     epoch_losses=self.epoch_losses)
        write_atomically(Path(path), lambda f: torch.save(state, f))


# ----------------------------------------------------------------------------- outputs

def latent_shape_of(cfg):
    return (cfg.latent_channels, cfg.img_size // cfg.vae_downscale, cfg.img_size // cfg.vae_downscale)


@torch.no_grad()
def save_reconstructions(vae, test_images, out_dir):
    """recon.png: held-out images, each row of up to 8 above its reconstructions (the posterior
    mean, decoded), and the PSNR over all the held-out images."""
    images = test_images.float() / 127.5 - 1
    reconstructions = torch.cat([vae.decode(z) for z in encode_images(vae, test_images).split(500)])
    quality = psnr(images, reconstructions)
    per_row = min(8, len(images))
    rows = [torch.cat([images[n:n + per_row], reconstructions[n:n + per_row]])
            for n in range(0, min(32, len(images)) - per_row + 1, per_row)]
    print(f"VAE reconstruction PSNR on {len(images)} held-out images: {quality:.2f} dB", flush=True)
    return save_grid(torch.cat(rows), out_dir / "recon.png", ncol=per_row,
                     title=f"held-out images / VAE reconstructions: PSNR {quality:.1f} dB")


def heat_colors(values):
    """Values in [0, 1] [..., H, W] -> a black-red-yellow-white heat map in [-1, 1] [..., 3, H, W]."""
    rgb = torch.stack([3 * values, 3 * values - 1, 3 * values - 2], dim=-3).clamp(0, 1)
    return rgb * 2 - 1


def save_attention_maps(model, vae, text_encoder, prompt, cfg, out_dir, device):
    """attention.png: an image drawn for the prompt, then for each of its tokens where the
    patches looked while drawing it: the cross-attention weights (6) of the conditional half,
    averaged over heads, blocks and sampler steps, each map scaled to its own maximum. The first
    16 tokens at most, so that a long prompt still makes a picture of sensible width."""
    weights = []

    def record(cross_attn, inputs):  # runs before every cross-attention: recompute its weights
        x, context, context_mask = inputs
        weights.append(cross_attn.attention_weights(x[:1], context[:1], context_mask[:1])[0].mean(0))

    hooks = [block.cross_attn.register_forward_pre_hook(record) for block in model.blocks]
    torch.manual_seed(cfg.seed)
    image = sample_latent_conditional(model, vae, text_encoder, [prompt], latent_shape=latent_shape_of(cfg),
                                      cfg_scale=cfg.cfg_scale, num_steps=cfg.sample_steps, device=device,
                                      sampler=cfg.sampler)
    for hook in hooks:
        hook.remove()
    token_ids = text_encoder.tokenizer(prompt, truncation=True, max_length=text_encoder.max_length)["input_ids"]
    tokens = text_encoder.tokenizer.convert_ids_to_tokens(token_ids)[:16]
    attention = torch.stack(weights).float().mean(0)[:, :len(tokens)]  # [patches, tokens]
    share = attention.mean(0)  # the fraction of all attention each token gets
    patch_pixels = cfg.vae_downscale * cfg.patch_size  # one latent patch covers this many pixels a side
    grid = cfg.img_size // patch_pixels
    maps = attention.T.reshape(len(tokens), grid, grid)
    maps = maps / maps.amax(dim=(1, 2), keepdim=True)
    maps = maps.repeat_interleave(patch_pixels, 1).repeat_interleave(patch_pixels, 2)  # patch -> pixels
    return save_grid(torch.cat([image, heat_colors(maps).to(image.device)]), out_dir / "attention.png",
                     ncol=len(tokens) + 1, scale=3, title=f'cross-attention while drawing "{prompt}"',
                     col_labels=["image"] + [f"{token} {p:.0%}" for token, p in zip(tokens, share)])


def write_outputs(model, vae, text_encoder, classes, cfg, out_dir, device, step):
    """samples.png, cfg_sweep.png, colours.png, attention.png, trajectory.png and .gif,
    nfe_sweep.png and, with --eval_samples, samples.npz. Returns the names of the files written."""
    model.eval()
    wrote = []
    prompts = list(cfg.prompts) or [make_caption(name) for name in classes]
    shape = latent_shape_of(cfg)

    def draw(prompts, num_steps=cfg.sample_steps, sampler=cfg.sampler, trajectory=False, cfg_scale=cfg.cfg_scale):
        torch.manual_seed(cfg.seed)  # the same noise whenever this checkpoint is sampled
        return sample_latent_conditional(model, vae, text_encoder, prompts, latent_shape=shape, cfg_scale=cfg_scale,
                                         num_steps=num_steps, device=device, trajectory=trajectory, sampler=sampler)

    nfe = NFE[cfg.sampler](cfg.sample_steps)
    per_prompt = max(1, cfg.num_samples // len(prompts))
    wrote += save_grid(draw([p for p in prompts for _ in range(per_prompt)]), out_dir / "samples.png",
                       ncol=per_prompt, row_labels=prompts,
                       title=f"{SCRIPT}, step {step}, w={cfg.cfg_scale:g}, {cfg.sample_steps} {cfg.sampler} steps "
                             f"= {nfe} NFE")

    scales = [0, 1, 2, 3, 5, 7.5]
    sweep = [draw(prompts, cfg_scale=w) for w in scales]  # the same noise at every scale
    wrote += save_grid(torch.stack(sweep, dim=1).flatten(0, 1), out_dir / "cfg_sweep.png", ncol=len(scales),
                       title="guidance scale w", col_labels=[f"w={w}" for w in scales], row_labels=prompts)

    colours, columns = ("red", "yellow", "green", "blue", "white", "black"), classes[:10]
    wrote += save_grid(draw([make_caption(f"{colour} {name}") for colour in colours for name in columns]),
                       out_dir / "colours.png", ncol=len(columns), title='"a photo of a {colour} {class}"',
                       col_labels=columns, row_labels=colours)

    attention_prompt = cfg.prompts[0] if cfg.prompts else make_caption(f"red {classes[-1]}")
    wrote += save_attention_maps(model, vae, text_encoder, attention_prompt, cfg, out_dir, device)
    trajectory_prompts = [prompts[i % len(prompts)] for i in range(8)]
    wrote += save_trajectory(draw(trajectory_prompts, trajectory=True), out_dir, cfg, row_labels=trajectory_prompts)
    wrote += save_nfe_sweep(lambda num_steps, sampler: draw(trajectory_prompts[:4], num_steps, sampler), out_dir, cfg)

    if cfg.eval_samples:  # 500 images at a time, so memory stays small for any N
        eval_prompts = [prompts[k % len(prompts)] for k in range(cfg.eval_samples)]  # equal numbers of each
        labels = [class_named_in(prompt, classes) for prompt in eval_prompts]
        torch.manual_seed(cfg.seed)
        chunks = [to_uint8(sample_latent_conditional(model, vae, text_encoder, eval_prompts[n:n + 500],
                                                     latent_shape=shape, cfg_scale=cfg.cfg_scale,
                                                     num_steps=cfg.sample_steps, device=device, sampler=cfg.sampler))
                  for n in range(0, cfg.eval_samples, 500)]
        wrote += save_npz(out_dir / "samples.npz", images=torch.cat(chunks).numpy(),
                          labels=np.array(labels, np.int64), prompts=np.array(eval_prompts))
    return wrote


def save_trajectory(states, out_dir, cfg, row_labels=None):
    """trajectory.png (8 samples at 8 times from t=1 to 0) and trajectory.gif (up to 20 frames)."""
    keep = sorted(set(torch.linspace(0, cfg.sample_steps, 8).round().long().tolist()))
    frames = torch.stack([states[i] for i in keep], dim=1)  # [8 samples, times, C, H, W]
    animate = sorted(set(torch.linspace(0, cfg.sample_steps, 20).round().long().tolist()))
    return (save_grid(frames.flatten(0, 1), out_dir / "trajectory.png", ncol=len(keep), row_labels=row_labels,
                      title="noise (t=1) -> data (t=0)", col_labels=[f"t={1 - i / cfg.sample_steps:.2f}" for i in keep])
            + save_gif([states[i] for i in animate], out_dir / "trajectory.gif", ncol=4,
                       titles=[f"t = {1 - i / cfg.sample_steps:.2f}" for i in animate]))


def save_nfe_sweep(draw, out_dir, cfg):
    """nfe_sweep.png: the same noise with at most 1, 2, 4, 8, 16 network evaluations and the
    default's, one block of rows per sampler. Also prints how straight the paths are: the mean
    squared difference between one Euler step (the straight-line guess x1 - v(x1, 1)) and the sample."""
    nfes = sorted({1, 2, 4, 8, 16, NFE[cfg.sampler](cfg.sample_steps)})
    rows = []
    for sampler, cost in NFE.items():
        steps = [max(s for s in range(1, n + 1) if cost(s) <= n) for n in nfes]  # the most steps within n
        rows.append(torch.stack([draw(s, sampler) for s in steps], dim=1))  # [4, nfes, C, H, W]
    one_step, final = draw(1, "euler"), draw(cfg.sample_steps, cfg.sampler)
    print(f"straightness: one Euler step lands {(one_step - final).pow(2).mean():.4f} (mean squared "
          f"difference) from the {cfg.sampler} sample; 0 would be perfectly straight paths", flush=True)
    return save_grid(torch.cat(rows).flatten(0, 1), out_dir / "nfe_sweep.png", ncol=len(nfes),
                     title="at most this many network evaluations (NFE)", col_labels=[f"NFE {n}" for n in nfes],
                     row_labels=[name if i == 0 else "" for name in NFE for i in range(len(rows[0]))])


class Previews:
    """progress.png: the same noise, sampled with the EMA model at 6 evenly spaced steps of
    training, one row each. The rows live in the checkpoint, so a resumed run keeps them."""

    def __init__(self, cfg, extras):
        self.cfg, self.rows = cfg, extras.setdefault("progress", {})
        self.at = {round(cfg.steps * k / 6) for k in range(1, 7)}

    def maybe_add(self, step, draw):
        if step in self.at:
            with torch.random.fork_rng():  # draws its own noise, and leaves training's random stream alone
                torch.manual_seed(self.cfg.seed)
                self.rows[step] = to_uint8(draw())

    def save(self, path):
        if not self.rows:
            return []
        steps = sorted(self.rows)
        images = torch.cat([self.rows[s] for s in steps]).permute(0, 3, 1, 2).float() / 127.5 - 1
        return save_grid(images, path, ncol=len(images) // len(steps), title="the same noise during training",
                         row_labels=[f"step {s}" for s in steps])


# ----------------------------------------------------------------------------- plumbing
# Everything below is the machinery around the lesson: the command line and its checks,
# checkpoints, signals, the training log and drawing pictures. A first read can skip it.

def parse_config(argv=None):
    """Build Config from the command line: one flag per field, so the CLI cannot drift."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     argument_default=argparse.SUPPRESS)
    parser.error = lambda message: parser.exit(2, f"error: {message} (--help lists every flag)\n")
    comments = config_comments()
    for f in dataclasses.fields(Config):
        text = f"{comments[f.name]} (default: {f.default})".replace("%", "%%")
        if f.type is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=text)
        elif f.type is tuple:
            parser.add_argument(f"--{f.name}", nargs="+", metavar="TEXT", help=text)
        else:
            parser.add_argument(f"--{f.name}", type=finite_float if f.type is float else f.type,
                                metavar=f.type.__name__.upper(), help=text)
    given = vars(parser.parse_args(argv))  # only the flags actually typed
    cfg = Config(**{**(TINY if given.get("tiny") else {}), **given})
    problems = config_problems(cfg)
    if problems:
        parser.error("; ".join(problems))
    return cfg, given


def config_problems(cfg):
    """Every bad value in cfg, by flag name, so that a run stops before it loads or creates anything."""
    at_least_1 = ("img_size", "latent_channels", "vae_channels", "patch_size", "embed_dim", "depth", "num_heads",
                  "vae_steps", "vae_batch_size", "vae_test_images", "steps", "batch_size", "sample_steps",
                  "num_samples", "ckpt_every")
    problems = [f"--{name} must be at least 1" for name in at_least_1 if getattr(cfg, name) < 1]
    not_negative = ("lr", "weight_decay", "warmup_steps", "eval_samples", "log_every", "cfg_scale", "train_images",
                    "vae_lr", "vae_weight_decay", "kl_weight")
    problems += [f"--{name} must not be negative" for name in not_negative if getattr(cfg, name) < 0]
    if cfg.grad_clip <= 0:
        problems.append("--grad_clip must be above 0")
    if not 0 <= cfg.text_dropout <= 1:
        problems.append("--text_dropout must be in [0, 1]")
    if not 0 <= cfg.ema_decay < 1:
        problems.append("--ema_decay must be in [0, 1)")
    if cfg.captions not in ("colour", "class"):
        problems.append("--captions must be colour or class")
    if cfg.time_sampling not in ("logit_normal", "uniform"):
        problems.append("--time_sampling must be logit_normal or uniform")
    if cfg.sampler not in SAMPLERS:
        problems.append(f"--sampler must be {' or '.join(SAMPLERS)}")
    if cfg.mlp_ratio <= 0:
        problems.append("--mlp_ratio must be above 0")
    if cfg.vae_downscale not in (2, 4, 8, 16):
        problems.append("--vae_downscale must be 2, 4, 8 or 16 (each stride-2 stage halves the side)")
    elif min(cfg.patch_size, cfg.num_heads) >= 1 and (cfg.img_size % (cfg.vae_downscale * cfg.patch_size)
                                                      or cfg.embed_dim % 4 or cfg.embed_dim % cfg.num_heads):
        problems.append("--vae_downscale * --patch_size must divide --img_size; --embed_dim must divide by 4 "
                        "and by --num_heads")
    if cfg.vae_channels % 8:
        problems.append("--vae_channels must divide by 8 (GroupNorm uses 8 groups)")
    if any(not prompt.strip() for prompt in cfg.prompts):
        problems.append("--prompts must not be empty: the empty prompt is the unconditional half of guidance")
    return problems


def finite_float(text):
    """A float flag's type: nan and inf never reach the math."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


def config_comments():
    """Each Config field's one-line comment, read from this file, for --help."""
    return dict(re.findall(r"^\s+(\w+): \w+ = .*?  # (.*)$", inspect.getsource(Config), re.MULTILINE))


def check_out_dir(out_dir):
    """--out_dir must be a folder we can create or write to; checked before anything is created."""
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if not existing.is_dir():
        raise SystemExit(f"error: --out_dir {out_dir} cannot be a folder: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"error: --out_dir {out_dir} is not writable: pass another --out_dir")


@contextmanager
def removed_on_failure(folder):
    """If the block fails, remove what it created of folder and its parents: a failed download
    leaves no empty folders behind."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        yield
    except BaseException:
        if created:
            shutil.rmtree(created[-1], ignore_errors=True)
        raise


def load_checkpoint(path, flag="--out_dir"):
    """Read a checkpoint of this script, named by flag; anything else stops with a clear message."""
    if not path.is_file():
        raise SystemExit(f"error: no checkpoint at {path}: train first (without --resume/--sample_only), "
                         f"or pass another {flag}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise SystemExit(f"error: {path} is corrupt or not a checkpoint: delete it or pass another {flag}")
    if not isinstance(ckpt, dict) or ckpt.get("script") != SCRIPT:
        owner = ckpt.get("script", "something else") if isinstance(ckpt, dict) else "something else"
        raise SystemExit(f"error: {path} was written by {owner}, not {SCRIPT}: pass another {flag}")
    return ckpt


def config_from_checkpoint(ckpt, given, path):
    """The checkpoint's settings with the flags typed now on top. Flags that would change the
    model are refused, by name; so is --resume with no steps left to train."""
    saved = {k: v for k, v in ckpt["config"].items() if k in Config.__dataclass_fields__}
    cfg = Config(**{**saved, **(TINY if given.get("tiny") else {}), **given})
    differ = [name for name in MODEL_FIELDS if name in saved and getattr(cfg, name) != saved[name]]
    if differ:
        flags = lambda values: " ".join(f"--{name} {values[name]}" for name in differ)  # noqa: E731
        raise SystemExit(f"error: {path} holds another model: it was trained with {flags(saved)}, not "
                         f"{flags(vars(cfg))}: drop those flags or use another --out_dir")
    if cfg.resume and not cfg.sample_only and ckpt["step"] >= cfg.steps:
        raise SystemExit(f"error: {path} is at step {ckpt['step']} already: pass --steps above "
                         f"{ckpt['step']} to train on, or --sample_only to sample it")
    problems = config_problems(cfg)
    if problems:
        raise SystemExit(f"error: {'; '.join(problems)}")
    return cfg


def restore(ckpt, parts, device, path):
    """Load every part (model, EMA, optimizer, ...) and the random state; return the step."""
    try:
        for name, part in parts.items():
            if name in ckpt or not name.endswith("optimizer"):  # an older checkpoint may lack an optimizer
                part.load_state_dict(ckpt[name])
    except (RuntimeError, ValueError, KeyError):
        raise SystemExit(f"error: {path} holds a model of another shape: use another --out_dir")
    if "rng" in ckpt:  # older checkpoints have none: their resumed runs draw other random numbers
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type != "cpu" and device.type in ckpt["rng"]:
            getattr(torch, device.type).set_rng_state(ckpt["rng"][device.type])
    return ckpt["step"]


def load_vae(path, vae, cfg):
    """--vae_ckpt: the VAE of another 05 run, refused when it was built with other VAE flags."""
    saved = load_checkpoint(path, flag="--vae_ckpt")
    differ = [name for name in ("latent_channels", "vae_channels", "vae_downscale")
              if saved["config"].get(name, getattr(Config, name)) != getattr(cfg, name)]
    if differ:
        flags = lambda values: " ".join(f"--{name} {values(name)}" for name in differ)  # noqa: E731
        raise SystemExit(f"error: the VAE in --vae_ckpt {path} was trained with "
                         f"{flags(lambda n: saved['config'].get(n, getattr(Config, n)))}, not "
                         f"{flags(lambda n: getattr(cfg, n))}: pass those flags or another --vae_ckpt")
    vae.load_state_dict(saved["vae"])


def rng_states(device):
    """The random generators' states, so that a resumed run draws what the uninterrupted one would."""
    states = {"cpu": torch.get_rng_state()}
    if device.type != "cpu":
        states[device.type] = getattr(torch, device.type).get_rng_state()
    return states


def save_checkpoint(path, cfg, step, parts, rng, extras):
    """The config, the step, the random state, every part's state_dict and the extras, in one file."""
    state = {"script": SCRIPT, "config": dataclasses.asdict(cfg), "step": step, "rng": rng,
             **{name: part.state_dict() for name, part in parts.items()}, **extras}
    write_atomically(path, lambda f: torch.save(state, f))


def write_atomically(path, write):
    """write(file) to a temporary file, then rename it to path: a crash or a full disk never
    leaves half a file, and the file that was there stays intact. Returns [path's name]."""
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


def save_npz(path, **arrays):
    return write_atomically(path, lambda f: np.savez_compressed(f, **arrays))


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
    """A progress line every cfg.log_every seconds, and the same numbers in log.csv: step, loss,
    lr, images/s, and the mean loss in ten bins of t, to see where on the path learning is hard."""

    def __init__(self, path, cfg, step, device, model):
        self.cfg, self.first_step, self.last_step = cfg, step, step
        self.file = open(path, "a" if cfg.resume else "w", newline="")
        self.csv = csv.writer(self.file)
        if self.file.tell() == 0:  # a new file, also when a resume finds none
            self.csv.writerow(["step", "loss", "lr", "images_per_s"]
                              + [f"loss_t{k / 10:.1f}-{(k + 1) / 10:.1f}" for k in range(10)])
        self.by_time, self.losses = [], []  # the loss function fills by_time with (t, loss per image)
        self.start = self.last = time.time()
        print(f"training {SCRIPT}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"steps {step}->{cfg.steps}, batch {cfg.batch_size}, on {device} "
              f"({'bf16 autocast' if uses_bf16(device) else 'float32'})", flush=True)

    def step(self, step, loss, lr):
        self.losses.append(loss)
        now = time.time()
        if now - self.last < self.cfg.log_every and step not in (self.cfg.steps, self.first_step + 10):
            return
        speed = (step - self.last_step) * self.cfg.batch_size / (now - self.last)
        eta = (self.cfg.steps - step) * self.cfg.batch_size / speed
        loss = sum(self.losses) / len(self.losses)
        print(f"step {step:>6}/{self.cfg.steps} | loss {loss:.4f} | {speed:6.0f} img/s | "
              f"{format_time(now - self.start)} elapsed | ETA {format_time(eta)}", flush=True)
        records = self.by_time or [(torch.zeros(0), torch.zeros(0))]  # (t, loss per image) from the loss function
        t, loss_per_image = (torch.cat(column).float().cpu() for column in zip(*records))
        bins = (t * 10).long().clamp(0, 9)
        by_bin = [f"{loss_per_image[bins == k].mean():.5f}" if (bins == k).any() else "" for k in range(10)]
        self.csv.writerow([step, f"{loss:.5f}", f"{lr:.3g}", f"{speed:.1f}", *by_bin])
        self.file.flush()
        self.last, self.last_step, self.losses, self.by_time[:] = now, step, [], []

    def close(self):
        self.file.close()


def format_time(seconds):
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


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
    pixels = to_uint8(images).numpy()
    n, h, w, c = pixels.shape
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + 2), ncol * (w + 2), c), 255, np.uint8)
    for i, img in enumerate(pixels):
        r, k = divmod(i, ncol)
        grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, k * (w + 2) + 1:k * (w + 2) + 1 + w] = img
    picture = Image.fromarray(grid.squeeze(-1) if c == 1 else grid).convert("RGB")
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    cell_w, cell_h = (w + 2) * scale, (h + 2) * scale
    header = 18 + (16 if col_labels else 0)
    margin = min(240, max(FONT.getlength(label) for label in row_labels) + 8) if any(row_labels or []) else 0
    width = max(margin + picture.width, min(FONT.getlength(title) + 8, 800))
    canvas = Image.new("RGB", (int(width), picture.height + header), "white")
    canvas.paste(picture, (int(margin), header))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), fit(title, width - 8), fill="black", font=FONT)
    for k, label in enumerate(col_labels or []):
        draw.text((margin + k * cell_w + 2, 18), fit(label, cell_w - 4), fill="black", font=FONT)
    for r, label in enumerate(row_labels or []):
        draw.text((4, header + r * cell_h + cell_h // 2 - 7), fit(label, margin - 8), fill="black", font=FONT)
    return canvas


def save_grid(images, path, ncol, title="", col_labels=None, row_labels=None, scale=2):
    """Save images [N, C, H, W] in [-1, 1] as a grid PNG (see grid_image); returns [path's name]."""
    canvas = grid_image(images, ncol, title, col_labels, row_labels, scale)
    return write_atomically(path, lambda f: canvas.save(f, format="PNG"))


def save_gif(states, path, ncol, titles):
    """An animated GIF, one frame per state [N, C, H, W], holding the last frame for 2 seconds.
    Each frame gets its own 128 colours, without dithering: noise compresses badly enough."""
    frames = [grid_image(x, ncol, title).quantize(128, dither=Image.Dither.NONE) for x, title in zip(states, titles)]
    durations = [150] * (len(frames) - 1) + [2000]
    return write_atomically(path, lambda f: frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:],
                                                            duration=durations, loop=0))


def plot_loss(log_path, path):
    """loss.png from log.csv: the training loss against step, and the loss in each bin of t over
    the second half of training (where on the path the flow is hard to learn)."""
    with open(log_path, newline="") as f:
        rows = list(csv.DictReader(f))
    bins = [name for name in rows[0] if name.startswith("loss_t")] if rows else []
    late = rows[len(rows) // 2:]
    by_time = [np.mean([float(r[b]) for r in late if r[b]] or [0.0]) for b in bins]
    canvas = Image.new("RGB", (760, 260), "white")
    draw = ImageDraw.Draw(canvas)
    chart(draw, (50, 30, 360, 220), [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows],
          "training loss", "step")
    chart(draw, (430, 30, 740, 220), list(range(len(bins))), by_time, "loss by t (second half of training)",
          "t = 0 (data) ... 1 (noise)", bars=True)
    return write_atomically(path, lambda f: canvas.save(f, format="PNG"))


def chart(draw, box, xs, ys, title, x_label, bars=False):
    """A minimal line or bar chart of ys against xs inside box (left, top, right, bottom)."""
    left, top, right, bottom = box
    draw.rectangle(box, outline="black")
    draw.text((left, top - 18), title, fill="black", font=FONT)
    draw.text((left, bottom + 6), x_label, fill="black", font=FONT)
    if not ys:
        return
    low, high = min(0.0, min(ys)), max(ys) or 1.0
    draw.text((left - 46, top - 6), f"{high:.3g}", fill="black", font=FONT)
    draw.text((left - 46, bottom - 8), f"{low:.3g}", fill="black", font=FONT)
    x_at = lambda x: left + (right - left) * (x - xs[0] + bars * 0.5) / (max(xs[-1] - xs[0], 1) + bars)  # noqa: E731
    y_at = lambda y: bottom - (bottom - top) * (y - low) / (high - low or 1)  # noqa: E731
    if bars:
        width = (right - left) / (len(xs) + 1) * 0.8
        for x, y in zip(xs, ys):
            draw.rectangle((x_at(x) - width / 2, y_at(y), x_at(x) + width / 2, bottom), fill="steelblue")
    else:
        draw.line([(x_at(x), y_at(y)) for x, y in zip(xs, ys)], fill="steelblue", width=2)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    cfg, given = parse_config(argv)
    with on_stop_signals(signal.default_int_handler), one_line_errors():  # SIGTERM acts like Ctrl-C
        out_dir = Path(cfg.out_dir or Path("out") / SCRIPT)
        check_out_dir(out_dir)
        ckpt = None
        if cfg.resume or cfg.sample_only:
            ckpt = load_checkpoint(out_dir / "ckpt.pt")
            cfg = config_from_checkpoint(ckpt, given, out_dir / "ckpt.pt")
        device = get_device(cfg.device)
        torch.manual_seed(cfg.seed)

        transformers.logging.set_verbosity_error()  # no warnings or "Loading weights" bars on every run
        transformers.logging.disable_progress_bar()
        try:
            text_encoder = CLIPTextEncoder(cfg.text_encoder, device)
        except Exception as error:  # no network, not a text model, a broken folder: one line, not a traceback
            reason = str(error).strip().split("\n")[0][:200]
            raise SystemExit(f"error: could not load the text encoder {cfg.text_encoder!r} ({reason}): pass "
                             f"--text_encoder a hub id or a local folder of a Hugging Face text model")

        vae = build_vae(cfg).to(device)
        model = build_model(cfg, text_encoder.embed_dim).to(device)
        ema_model = copy.deepcopy(model).requires_grad_(False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        vae_optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=cfg.vae_weight_decay)
        parts = dict(model=model, ema=ema_model, optimizer=optimizer, vae=vae, vae_optimizer=vae_optimizer)
        extras, step, wrote = {"progress": {}, "captions": [], "classes": [], "vae_step": 0}, 0, []  # beside the parts
        if ckpt:
            step = restore(ckpt, parts, device, out_dir / "ckpt.pt")
            extras = {name: ckpt.get(name, value) for name, value in extras.items()}
        if cfg.vae_ckpt and not cfg.sample_only:  # a VAE trained before: stage 1 is done
            load_vae(Path(cfg.vae_ckpt), vae, cfg)
            extras["vae_step"] = cfg.vae_steps
        if not cfg.sample_only:
            images, labels, extras["captions"], extras["classes"] = load_images(cfg.data_dir, cfg.img_size, device,
                                                                                cfg.train_images, cfg.captions)
            images, labels, test_images = hold_out(images, labels, cfg.vae_test_images)
            out_dir.mkdir(parents=True, exist_ok=True)
            if extras["vae_step"] < cfg.vae_steps:
                wrote += train_vae(vae, vae_optimizer, images, labels, cfg, out_dir, device, parts, extras)
            vae.eval().requires_grad_(False)
            wrote += save_reconstructions(vae, test_images, out_dir)
            latents, latent_labels = encode_training_latents(vae, images, labels)
            wrote += train(model, ema_model, optimizer, latents, latent_labels, text_encoder, vae, cfg, out_dir, step,
                           device, parts, extras)
            step = cfg.steps
        classes = extras["classes"] or [re.sub("^a photo of an? ", "", c) for c in extras["captions"]]  # older ckpts
        wrote += write_outputs(ema_model, vae, text_encoder, classes, cfg, out_dir, device, step)
        print(f"wrote {', '.join(wrote)} to {out_dir}", flush=True)


if __name__ == "__main__":
    main()
