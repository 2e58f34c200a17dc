"""Step 5: a miniature Stable Diffusion: the text-to-image flow of step 4, in a VAE's latent space.

What this step adds
    Step 4's flow, text conditioning and guidance, (1) to (6), now run on a compact code of the image, as in latent
    diffusion (Rombach et al. 2022): most of a 32x32x3 image is detail that a small network learns late.
    Stage 1: a VAE compresses each image to a 4x8x8 latent (12x fewer numbers) and back:
        loss = mean (decode(z) - x)^2 + kl_weight * mean KL(q(z | x) || N(0, I)),
        KL per latent number = 1/2 * (mean^2 + sigma^2 - 1 - log sigma^2)                 (7)
    Stage 2: the DiT of step 4 learns the flow to the data's latents, scaled to unit standard deviation: 16 tokens
    instead of 64, each step several times cheaper. Sampling ends with the VAE's decoder turning latents into pixels.
    --vae_downscale 8 (as in Stable Diffusion) gives 64x64 images the 4x8x8 latents, and cheap DiT, of 32x32 ones.

Run it (about 33 minutes on a 2-core laptop CPU: VAE 9, flow 19, encoding and pictures 5; outputs in out/05_latent_vae/)
    python 05_latent_vae.py                      # full run (downloads CIFAR-10, 170 MB, and CLIP, 600 MB)
    python 05_latent_vae.py --tiny               # a few seconds, to see that it works; --help lists every flag
    python 05_latent_vae.py --vae_ckpt out/05_latent_vae/ckpt.pt --out_dir out/05b  # reuse a trained VAE
"""

import argparse, copy, csv, dataclasses, inspect, io, math, os, re, shutil, signal, time
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from PIL import Image, ImageDraw, ImageFont
from torchvision import transforms
from torchvision.datasets import CIFAR10, ImageFolder
from torchvision.utils import make_grid
from transformers import AutoConfig, AutoModelForTextEncoding, AutoTokenizer, CLIPTextModel

SCRIPT = Path(__file__).stem  # written into checkpoints, so another script's are refused

# ----------------------------------------------------------------------------- config

@dataclasses.dataclass
class Config:
    data_dir: str = "./data"  # CIFAR-10 is downloaded here when missing; or a folder of class sub-folders
    img_size: int = 32  # images are resized and center-cropped to this (CIFAR-10 is 32x32); must be at least 1
    train_images: int = 0  # train on this many images, picked at random; 0 = all of them; must not be negative
    captions: str = "colour"  # with the colour read from each image ("a red car"), or not; must be colour or class
    out_dir: str = ""  # where outputs go; empty means out/<script name>
    text_encoder: str = "openai/clip-vit-base-patch32"  # frozen; a hub id or a local folder, CLIP or not
    latent_channels: int = 4  # the VAE turns a 3x32x32 image into a 4x8x8 latent; must be at least 1
    vae_channels: int = 32  # the VAE's convolution width at full size (twice that below); must be at least 1
    vae_downscale: int = 4  # how much the VAE shrinks each side: 4 (32x32 -> 8x8) or 8, as Stable Diffusion's
    patch_size: int = 2  # 8x8 latent -> 4x4 = 16 tokens of 2x2 latent pixels; must be at least 1
    embed_dim: int = 128  # token width; must be at least 1
    depth: int = 6  # DiT blocks; must be at least 1
    num_heads: int = 4  # attention heads (embed_dim must divide by it); must be at least 1
    mlp_ratio: float = 4.0  # MLP hidden width / embed_dim; must be above 0
    vae_steps: int = 750  # stage 1: VAE optimizer steps (1500: 26.8 dB, not 26.3, in 2x the time); must be at least 1
    vae_batch_size: int = 64  # images per VAE step; must be at least 1
    vae_lr: float = 1e-3  # VAE learning rate (the same warmup as stage 2); must not be negative
    vae_weight_decay: float = 0.01  # AdamW weight decay of the VAE; must not be negative
    kl_weight: float = 1e-5  # weight of the KL term (7): small, as in Stable Diffusion's; must not be negative
    vae_test_images: int = 1000  # held out of training, to measure the VAE's reconstructions (PSNR); must be at least 1
    vae_ckpt: str = ""  # reuse the VAE of this 05 checkpoint and skip stage 1
    steps: int = 2500  # stage 2: optimizer steps of the flow on latents (02: 5400); must be at least 1
    batch_size: int = 128  # latents per step (Muon costs per step: 64 gives 1.35x fewer images/s); must be at least 1
    lr: float = 8e-3  # learning rate, after a linear warmup (02's; 04's 3e-3 is no better here); must not be negative
    adam_beta2: float = 0.95  # AdamW's second-moment decay (PyTorch's default: 0.999); must be in [0, 1)
    muon_steps: int = 3  # Newton-Schulz steps per Muon update (0: plain AdamW); must not be negative
    warmup_steps: int = 100  # linear warmup from 0 to lr, then constant; must not be negative
    weight_decay: float = 0.0  # AdamW weight decay; must not be negative
    grad_clip: float = 1.0  # clip the gradient norm to this; must be above 0
    ema: bool = True  # sample with an exponential moving average of the weights
    ema_window: float = 0.3  # the EMA averages over about the last 30% (this share) of the steps; must be above 0
    time_sampling: str = "logit_normal"  # how training picks t; must be logit_normal or uniform
    time_mean: float = 0.5  # the logit-normal's mean: above 0 trains more near the noise, where shapes are decided
    text_dropout: float = 0.1  # chance that a training caption becomes the empty prompt (for CFG); must be in [0, 1]
    sampler: str = "heun"  # "euler" (4) or "heun" (4b); must be euler or heun
    sample_steps: int = 4  # sampler steps from t=1 to 0 (N Heun steps: 2N - 1 NFE); must be at least 1
    prompts: tuple = ()  # what samples.png draws, e.g. --prompts "a photo of a cat" "a red car"; () = one per class
    num_samples: int = 80  # images in samples.png, one row per prompt; must be at least 1
    cfg_scale: float = 12.0  # guidance w in eq. (5), 1 = conditional (7.5: fewer show the class); must not be negative
    eval_samples: int = 0  # if > 0, also write this many samples to samples.npz; must not be negative
    seed: int = 0  # makes a run repeatable on one device
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    log_every: float = 5.0  # seconds between progress lines; must not be negative
    ckpt_every: int = 500  # steps between checkpoints; must be at least 1
    resume: bool = False  # continue training from out_dir/ckpt.pt
    sample_only: bool = False  # load out_dir/ckpt.pt and only write the outputs
    tiny: bool = False  # a seconds-long run with a tiny model, for tests and a first look

# --tiny shrinks what costs time (flags typed still win); a checkpoint only loads where the model's fields match.
TINY = dict(embed_dim=32, depth=2, num_heads=2, steps=20, batch_size=16, warmup_steps=5, num_samples=16, log_every=1.0,
            train_images=512, vae_channels=8, vae_steps=10, vae_batch_size=16, vae_test_images=3)
MODEL_FIELDS = ("text_encoder", "img_size", "latent_channels", "vae_channels", "vae_downscale", "patch_size",
                "embed_dim", "depth", "num_heads", "mlp_ratio")

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

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

def make_caption(class_name):
    """A class or folder name as a prompt in the form CLIP knows best: "a photo of a cat"."""
    name = class_name.replace("_", " ")
    return f"a photo of {'an' if name[0].lower() in 'aeiou' else 'a'} {name}"

def make_cifar10_captions(labels):
    """CIFAR-10 class indices -> captions: 0 -> "a photo of an airplane", 3 -> "a photo of a cat"."""
    return [make_caption(CIFAR10_CLASSES[int(label)]) for label in labels]

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "brown", "white", "gray", "black")

def colour_of(image):
    """The colour of the object in a uint8 image [S, S, 3]: the name (from HSV) of most pixels in the central half
    of each side, where CIFAR-10 objects sit, if at least 40% of them have it; else None."""
    s = image.shape[0]
    centre = np.ascontiguousarray(image[s // 4:s - s // 4, s // 4:s - s // 4])
    hue, sat, value = torch.from_numpy(np.array(Image.fromarray(centre).convert("HSV"))).float().div(255).unbind(-1)
    index = {colour: i for i, colour in enumerate(COLOURS)}
    hue_edges = torch.tensor([15.0, 40, 70, 165, 260, 330])  # degrees: red|orange|yellow|green|blue|purple|red
    name = torch.tensor([0, 1, 2, 3, 4, 5, 0])[torch.bucketize(hue * 360, hue_edges)]
    name = torch.where((name == index["orange"]) & (value < 0.6), index["brown"], name)  # dark orange
    name = torch.where(sat < 0.2, torch.where(value > 0.75, index["white"], index["gray"]), name)  # too grey for a hue
    name = torch.where(value < 0.2, index["black"], name)  # too dark for a hue
    counts = name.flatten().bincount(minlength=len(COLOURS))
    return COLOURS[counts.argmax()] if counts.max() >= 0.4 * name.numel() else None

def describe(image, class_name, captions):
    """One image's caption: "a photo of a red car", or "a photo of a car" where colour_of is unsure, the class name
    has a colour already (red_car) or --captions is class."""
    colour = colour_of(image) if captions == "colour" and not set(class_name.split("_")) & set(COLOURS) else None
    return make_caption(f"{colour} {class_name}" if colour else class_name)

def class_named_in(prompt, classes):
    """The index of the class that a prompt names ("a photo of a red cat" -> cat's), -1 if none."""
    words = " " + " ".join(re.findall(r"[a-z0-9]+", prompt.lower())) + " "
    return next((i for i, name in enumerate(classes) if f" {name.replace('_', ' ').lower()} " in words), -1)

def open_dataset(data_dir, transform):
    """data_dir as a folder of images in class sub-folders, or CIFAR-10 there (downloaded into it when it holds
    nothing else). Returns the dataset and its class names."""
    root = Path(data_dir)
    if root.exists() and not root.is_dir():
        raise SystemExit(f"error: --data_dir {root} is a file: pass a folder")
    if root.is_dir() and any(p.name not in ("cifar-10-batches-py", "cifar-10-python.tar.gz", "MNIST")
                             for p in root.iterdir()):  # anything but what the scripts download there
        return open_image_folder(root, transform)
    if not (root / "cifar-10-batches-py").is_dir():
        download(lambda: CIFAR10(data_dir, train=True, download=True), root / "cifar-10-batches-py",
                 f"error: CIFAR-10 is not in {data_dir} and could not be downloaded: put cifar-10-python.tar.gz in "
                 f"{data_dir}, or pass --data_dir a folder of images in class sub-folders (cat/1.jpg, ...)")
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
    try:
        folder = ImageFolder(root, transform=transform)
    except FileNotFoundError as error:  # no class sub-folder, or one with no image in it
        raise SystemExit(f"error: {root} has no class sub-folders of images ({error}): put them in {root}/<class>/")
    return folder, folder.classes

def load_images(data_dir, img_size, device, train_images=0, captions="colour"):
    """The images, decoded once (batches are drawn by index), as uint8 [N, 3, S, S] on the device, the index of
    each one's caption [N], the distinct captions and the class names; train_images > 0 picks that many at random."""
    resize = transforms.Compose([transforms.Resize(img_size), transforms.CenterCrop(img_size)])
    dataset, classes = open_dataset(data_dir, resize)
    picked = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:train_images or None]
    print(f"decoding {len(picked)} images of {len(classes)} classes ...", flush=True)
    order = picked.sort().values.tolist()
    images = torch.stack([decode(dataset, i) for i in order])
    texts = [describe(image.numpy(), classes[dataset.targets[i]], captions) for image, i in zip(images, order)]
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
    """A random batch scaled from uint8 [0, 255] to float [-1, 1], with its labels, half of it mirrored left-right."""
    idx = torch.randint(len(images), (batch_size,), device=images.device)
    x, mirrored = images[idx].float() / 127.5 - 1, torch.rand(batch_size, 1, 1, 1, device=images.device) < 0.5
    return torch.where(mirrored, x.flip(3), x), labels[idx]

def hold_out(images, labels, n):
    """Split off n random images that neither stage trains on: the VAE's test images."""
    if len(images) < 2 * n:
        raise SystemExit(f"error: {len(images)} images are too few to hold out --vae_test_images {n} and train on "
                         f"at least as many: add images or lower --vae_test_images")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).to(images.device)
    return images[order[n:]], labels[order[n:]], images[order[:n]]

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

class CLIPTextEncoder:
    """A frozen pretrained text encoder: prompts -> an embedding per token and a padding mask. By default CLIP's text
    tower (Radford et al. 2021), trained on 400M image-caption pairs, so its embeddings carry visual meaning; any
    Hugging Face text encoder (a hub id or a local folder: BERT, T5's encoder, ...) works through its last layer."""
    def __init__(self, model_name="openai/clip-vit-base-patch32", device=None):
        self.device = torch.device(device or "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_name)
        whole_clip = AutoConfig.from_pretrained(model_name).model_type == "clip"  # the hub's CLIP: text + image
        encoder = CLIPTextModel if whole_clip else AutoModelForTextEncoding  # of a whole CLIP, only the text tower
        self.model = encoder.from_pretrained(model_name).to(self.device).eval().requires_grad_(False)
        self.is_clip = self.model.config.model_type.startswith("clip")
        if self.tokenizer.pad_token is None:  # GPT-style tokenizers have none; padding is masked out anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.embed_dim = self.model.config.hidden_size  # 512 for CLIP ViT-B/32
        positions = getattr(self.model.config, "max_position_embeddings", 77)  # CLIP reads 77 tokens at most
        self.max_length = min(self.tokenizer.model_max_length, positions, 77)
    @torch.no_grad()
    def __call__(self, prompts, return_pooled=False):
        """A prompt or B prompts -> token embeddings [B, max_length, embed_dim] and mask [B, max_length] (True: a
        real token); return_pooled adds a vector per prompt [B, embed_dim] (CLIP: end-of-text token; else the mean)."""
        tokens = self.tokenizer([prompts] if isinstance(prompts, str) else list(prompts), padding="max_length",
                                max_length=self.max_length, truncation=True, return_tensors="pt").to(self.device)
        out = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        mask = tokens["attention_mask"].bool()
        mean = (out.last_hidden_state * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        pooled = out.pooler_output if self.is_clip else mean
        return (out.last_hidden_state, mask, pooled) if return_pooled else (out.last_hidden_state, mask)
    def encode(self, prompts, return_pooled=False):
        """Token embeddings [B, max_length, embed_dim], and with return_pooled the pooled vectors [B, embed_dim]."""
        return self(prompts, return_pooled=True)[::2] if return_pooled else self(prompts)[0]

def encode_prompts(text_encoder, prompts, device):
    """Token embeddings [P + 1, M, D] and mask [P + 1, M] of the prompts and, last, the empty prompt "" (CFG's
    unconditional input), on the device, without the positions that are padding in all (CLIP pads to 77)."""
    embeddings, mask = text_encoder(list(prompts) + [""])
    used = mask.any(dim=0)
    return embeddings[:, used].to(device), mask[:, used].to(device)

class ResBlock(nn.Sequential):
    """Two 3x3 convolutions with a skip connection: x + f(x)."""
    def __init__(self, c):
        super().__init__(*[m for _ in range(2) for m in (nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))])
    def forward(self, x):
        return x + super().forward(x)

class VAE(nn.Module):
    """A small convolutional variational autoencoder (Kingma & Welling 2014): image [3, H, W] -> mean and
    log-variance of a latent [latent_channels, H/downscale, W/downscale] -> a sample z -> image."""
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
        self.decode = nn.Sequential(*up, nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1))  # z -> image
        self.register_buffer("scale_factor", torch.tensor(1.0))  # set by encode_training_latents
    def encode(self, x):
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)
    def forward(self, x):
        mean, logvar = self.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)  # reparameterised: gradients reach the encoder
        return self.decode(z), mean, logvar

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

def split_heads(x, num_heads):
    """[B, L, heads * d] -> [B, heads, L, d]: each head attends on its own slice of the features."""
    b, n, dim = x.shape
    return x.reshape(b, n, num_heads, dim // num_heads).transpose(1, 2)

class CrossAttention(nn.Module):
    """Eq. (6): queries from the image patches, keys and values from the text tokens, so each
    patch gathers what it needs from the prompt. Padding tokens are masked out of the softmax."""
    def __init__(self, embed_dim, context_dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = num_heads, embed_dim // num_heads, (embed_dim // num_heads) ** -0.5
        self.q_proj, self.out_proj = nn.Linear(embed_dim, embed_dim), nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(context_dim, embed_dim)  # text width (512 for CLIP) -> patch width
        self.v_proj = nn.Linear(context_dim, embed_dim)
    def forward(self, x, context, context_mask=None):
        """x [B, N, embed_dim] patches, context [B, M, context_dim] tokens, context_mask [B, M] (True: real)."""
        q, k, v = (split_heads(proj(y), self.num_heads) for proj, y in
                   ((self.q_proj, x), (self.k_proj, context), (self.v_proj, context)))
        mask = None if context_mask is None else context_mask[:, None, None, :]  # the same for every head and patch
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.out_proj(out.transpose(1, 2).flatten(2))
    def attention_weights(self, x, context, context_mask=None):
        """forward's softmax(Q K^T / sqrt(d)) [B, heads, N, M], written out: how much patch n looks at token m."""
        q, k = split_heads(self.q_proj(x), self.num_heads), split_heads(self.k_proj(context), self.num_heads)
        scores = q @ k.transpose(-2, -1) * self.scale
        if context_mask is not None:
            scores = scores.masked_fill(~context_mask[:, None, None, :], float("-inf"))
        return scores.softmax(dim=-1)

class TextConditionedDiTBlock(nn.Module):
    """A DiT block with cross-attention to the text between self-attention and the MLP, each part shifted, scaled
    and gated by the time embedding c (adaLN-Zero): x = x + gate2 * CrossAttn(adaLN(x), text), and so on."""
    def __init__(self, dim, num_heads, mlp_ratio=4.0, context_dim=512):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6) for _ in range(3))
        self.attn = Attention(dim, num_heads)
        self.cross_attn = CrossAttention(dim, context_dim, num_heads)
        self.mlp = LocalMLP(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 9 * dim))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)  # the "Zero" in adaLN-Zero
        nn.init.zeros_(self.adaLN_modulation[-1].bias)
    def forward(self, x, c, context, context_mask=None):
        shift1, scale1, gate1, shift2, scale2, gate2, shift3, scale3, gate3 = self.adaLN_modulation(c).chunk(9, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2[:, None] * self.cross_attn(modulate(self.norm2(x), shift2, scale2), context, context_mask)
        return x + gate3[:, None] * self.mlp(modulate(self.norm3(x), shift3, scale3))

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

class TextConditionalDiT(nn.Module):
    """Diffusion Transformer (Peebles & Xie 2023): patchify -> embed + position -> DiT blocks
    conditioned on the time embedding (adaLN) and on the text tokens (cross-attention) -> final layer -> overlap_add."""
    def __init__(self, img_size=32, patch_size=4, in_channels=3, embed_dim=256, depth=6, num_heads=8,
                 mlp_ratio=4.0, context_dim=512):
        super().__init__()
        self.context_dim = context_dim
        self.img_size, self.patch_size, self.in_channels = img_size, patch_size, in_channels
        self.patch_embed = nn.Linear(patch_size * patch_size * in_channels, embed_dim)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, img_size // patch_size))
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
        return overlap_add(self.final_layer(tokens, c), self.patch_size, self.in_channels, self.img_size, self.img_size)

ConditionalDiT = TextConditionalDiT  # seed 000's name: a class label reaches the model as its caption

def build_model(cfg, context_dim):
    return TextConditionalDiT(img_size=cfg.img_size // cfg.vae_downscale, patch_size=cfg.patch_size,
                              in_channels=cfg.latent_channels, embed_dim=cfg.embed_dim, depth=cfg.depth,
                              num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, context_dim=context_dim)

# ----------------------------------------------------------------------------- flow-matching loss

def sample_timesteps(batch_size, time_sampling, device, mean=0.0):
    """t ~ U(0, 1), or logit-normal: sigmoid of a normal N(mean, 1) (SD3, Esser et al. 2024), which spends more
    steps at middle t, where predicting v is hardest; the ends are easy. A mean above 0 leans toward the noise."""
    if time_sampling == "uniform":
        return torch.rand(batch_size, device=device)
    return torch.sigmoid(mean + torch.randn(batch_size, device=device))

def get_vae_loss(vae, x, kl_weight):
    """Stage 1 loss (7) for images x in [-1, 1]. The KL term pulls each latent distribution towards N(0, I), a
    compact space with no gaps for the flow to fill; a strong pull would blur the reconstructions."""
    reconstruction, mean, logvar = vae(x)
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
    return F.mse_loss(reconstruction.float(), x) + kl_weight * kl.float()

def psnr(images, reconstructions):
    """Peak signal-to-noise ratio in dB, 10 * log10(2^2 / MSE) for images in [-1, 1], averaged over images."""
    mse = (reconstructions.clamp(-1, 1) - images).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(4 / mse)).mean().item()

def get_text_conditional_loss(model, x0, text_embeddings, text_mask, null_embedding, null_mask,
                              text_dropout=0.1, time_sampling="logit_normal", record=None, time_mean=0.0):
    """Flow-matching loss (3) for a batch of data x0 in [-1, 1] with its captions' token embeddings [B, M, D] and
    masks [B, M], each of which becomes the empty prompt's (null_embedding [M, D], null_mask [M]) with probability
    text_dropout: one network learns both velocities that CFG blends. record, a list when given, collects
    (t, each image's loss): the loss by time, for log.csv."""
    dropped = torch.rand(len(x0), device=x0.device) < text_dropout
    text_embeddings = torch.where(dropped[:, None, None], null_embedding, text_embeddings)
    text_mask = torch.where(dropped[:, None], null_mask, text_mask)
    x1 = torch.randn_like(x0)                           # noise
    t = sample_timesteps(len(x0), time_sampling, x0.device, time_mean)
    t_ = t[:, None, None, None]
    x_t = (1 - t_) * x0 + t_ * x1                       # the straight path (1)
    v_target = x1 - x0                                  # its velocity (2)
    loss_per_image = (model(x_t, t, text_embeddings, text_mask).float() - v_target).pow(2).flatten(1).mean(1)
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

def guided_velocity(model, x, t, text_embeddings, text_mask, null_embedding, null_mask, cfg_scale):
    """Classifier-free guidance, eq. (5): v = v_uncond + w * (v_cond - v_uncond), both halves in one forward pass
    (the prompts, and the empty prompt); at t > 0.8, where x_t is nearly pure noise, w is at most 1 (README)."""
    v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]),
                             torch.cat([text_embeddings, null_embedding.expand_as(text_embeddings)]),
                             torch.cat([text_mask, null_mask.expand_as(text_mask)])).float().chunk(2)
    w = torch.where(t > 0.8, min(cfg_scale, 1.0), cfg_scale)[:, None, None, None]  # w <= 1 where x_t is near noise
    return v_uncond + w * (v_cond - v_uncond)

@torch.no_grad()
def sample_latent_conditional(model, vae, text_encoder=None, prompts=None, class_labels=None, latent_shape=(4, 8, 8),
                              cfg_scale=3.0, num_steps=50, device=None, trajectory=False, sampler="euler"):
    """One image in [-1, 1] per prompt (or CIFAR-10 class label, as its caption): the guided flow in latent space,
    then the VAE decodes (every state if trajectory). Without a text_encoder, the default CLIP is loaded."""
    device = torch.device(device or next(model.parameters()).device)
    if not (math.isfinite(cfg_scale) and cfg_scale >= 0):
        raise ValueError(f"cfg_scale must be >= 0 (0 = unconditional, 1 = conditional), got {cfg_scale}")
    if prompts is None and class_labels is None:
        raise ValueError("pass prompts=[...] (text) or class_labels=[...] (CIFAR-10 classes 0..9)")
    if prompts is None and not all(0 <= int(label) < len(CIFAR10_CLASSES) for label in class_labels):
        raise ValueError(f"class labels must be CIFAR-10 classes 0..9, got {list(class_labels)}")
    prompts = [prompts] if isinstance(prompts, str) else prompts or make_cifar10_captions(class_labels)
    embeddings, mask = encode_prompts(text_encoder or CLIPTextEncoder(device=device), prompts, device)
    def velocity(x, t):
        with autocast(device):
            return guided_velocity(model, x, t, embeddings[:-1], mask[:-1], embeddings[-1], mask[-1], cfg_scale)
    states = integrate(velocity, torch.randn(len(prompts), *latent_shape, device=device), num_steps, sampler,
                       trajectory)
    with autocast(device):  # undo the scaling to unit standard deviation, then latents -> pixels
        images = [vae.decode(z / vae.scale_factor).float().clamp(-1, 1) for z in states]
    return images if trajectory else images[-1]

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

def train_vae(vae, vae_optimizer, images, labels, cfg, out_dir, device, parts, extras):
    """Stage 1: the VAE, from extras["vae_step"] to cfg.vae_steps, with stage 2's warmup, checkpoints and stops."""
    stage = dataclasses.replace(cfg, lr=cfg.vae_lr, steps=cfg.vae_steps, batch_size=cfg.vae_batch_size)
    ckpt_path, step = out_dir / "ckpt.pt", extras["vae_step"]
    saved_step, stop = step if cfg.resume else None, []  # the step on disk
    log = TrainingLog(out_dir / "vae_log.csv", stage, step, device, vae)
    try:
        with on_stop_signals(lambda signum, frame: stop.append(signum)):
            while step < stage.steps and not stop:
                rng = rng_states(device)  # the random state at the start of this step, for a checkpoint
                lr = lr_at(step, stage)
                vae_optimizer.param_groups[0].update(lr=lr, weight_decay=cfg.vae_weight_decay)
                with autocast(device):
                    loss = get_vae_loss(vae, get_batch(images, labels, stage.batch_size)[0], cfg.kl_weight)
                check_finite("VAE loss", loss, step, ckpt_path, saved_step)
                check_finite("VAE gradient norm", optimizer_step(vae, vae_optimizer, loss, cfg.grad_clip), step,
                             ckpt_path, saved_step)
                step = extras["vae_step"] = step + 1
                log.step(step, loss.item(), lr)
                if step % cfg.ckpt_every == 0 or step == stage.steps or stop:
                    save_checkpoint(ckpt_path, cfg, 0, parts, rng_states(device), extras)
                    saved_step = step
    except KeyboardInterrupt:  # raised inside a step: that step never reached the weights
        save_checkpoint(ckpt_path, cfg, 0, parts, rng, extras)
        stop.append(signal.SIGINT)
    finally:
        log.file.close()
    if stop:
        raise SystemExit(f"interrupted at VAE step {step}: saved {ckpt_path}; add --resume to continue")
    return ["vae_log.csv"]

@torch.no_grad()
def encode_images(vae, images):
    """uint8 images [N, 3, H, W] -> the VAE's posterior means [N, latent_channels, h, w], 500 at a time."""
    return torch.cat([vae.encode(x.float() / 127.5 - 1)[0] for x in images.split(500)])

def encode_training_latents(vae, images, labels):
    """Stage 2's data, encoded once: the latents of every image and its mirror image, scaled by scale_factor to
    unit standard deviation, as the noise has (Stable Diffusion's 0.18215 is 1 / the std of its VAE's latents)."""
    latents = torch.cat([encode_images(vae, images), encode_images(vae, images.flip(3))])
    vae.scale_factor.fill_(1 / latents.std().item())
    print(f"encoded {len(latents)} latents {tuple(latents.shape[1:])}, scaled by 1/std = {vae.scale_factor.item():.4f}")
    return latents * vae.scale_factor, torch.cat([labels, labels])

def train(model, ema_model, optimizer, latents, labels, text_encoder, vae, cfg, out_dir, step, device, parts, extras):
    """Stage 2, the training loop, from step to cfg.steps. Ctrl-C and SIGTERM stop it between two steps
    with a checkpoint; a non-finite loss or gradient stops it before it touches the weights."""
    ckpt_path, saved_step = out_dir / "ckpt.pt", step if cfg.resume else None  # the step on disk
    log = TrainingLog(out_dir / "log.csv", cfg, step, device, model)
    preview_at, stop = {round(cfg.steps * k / 6) for k in range(1, 7)}, []  # progress.png: 6 rows in training
    text_embeddings, text_mask = encode_prompts(text_encoder, extras["captions"], device)  # once, not per batch
    preview_prompts = [make_caption(extras["classes"][i % len(extras["classes"])]) for i in range(8)]
    try:
        with on_stop_signals(lambda signum, frame: stop.append(signum)):
            while step < cfg.steps and not stop:
                rng = rng_states(device)  # the random state at the start of this step, for a checkpoint
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group.update(lr=lr, weight_decay=cfg.weight_decay)
                with autocast(device):
                    idx = torch.randint(len(latents), (cfg.batch_size,), device=latents.device)
                    x0, y = latents[idx], labels[idx]  # latents are scaled already, and include the mirror images
                    loss = get_text_conditional_loss(model, x0, text_embeddings[y], text_mask[y], text_embeddings[-1],
                                                     text_mask[-1], cfg.text_dropout, cfg.time_sampling, log.by_time,
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
                        extras["progress"][step] = to_uint8(sample_latent_conditional(
                            ema_model, vae, text_encoder, preview_prompts, latent_shape=latent_shape_of(cfg),
                            cfg_scale=cfg.cfg_scale, num_steps=cfg.sample_steps, device=device, sampler=cfg.sampler))
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

class TextConditionalTrainer:
    """A notebook's interface to this script's loss and optimizer step: train(num_epochs) runs over a DataLoader of
    (images in [-1, 1], labels), captioned by caption_fn(labels); main() does not use it (no EMA, log, checkpoints)."""
    def __init__(self, model, text_encoder, dataloader, caption_fn, lr=1e-4, weight_decay=0.01, text_drop_prob=0.1,
                 device=None):
        self.device = torch.device(device or next(model.parameters()).device)
        self.model, self.text_encoder, self.dataloader = model.to(self.device), text_encoder, dataloader
        self.caption_fn, self.text_drop_prob, self.epoch_losses = caption_fn, text_drop_prob, []
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    def train(self, num_epochs):
        print(f"Training on {self.device}", flush=True)
        for _ in range(num_epochs):
            losses = []
            for images, labels in self.dataloader:
                embeddings, mask = encode_prompts(self.text_encoder, self.caption_fn(labels), self.device)
                with autocast(self.device):
                    loss = get_text_conditional_loss(self.model, images.to(self.device), embeddings[:-1], mask[:-1],
                                                     embeddings[-1], mask[-1], self.text_drop_prob)
                optimizer_step(self.model, self.optimizer, loss, grad_clip=1.0)
                losses.append(loss.item())
            self.epoch_losses.append(sum(losses) / len(losses))
            print(f"Epoch {len(self.epoch_losses)}: avg_loss = {self.epoch_losses[-1]:.4f}", flush=True)
        return self.epoch_losses[-num_epochs:]
    def save_checkpoint(self, path):
        save_checkpoint(Path(path), Config(), len(self.epoch_losses), dict(model=self.model, optimizer=self.optimizer),
                        rng_states(self.device), dict(epoch_losses=self.epoch_losses))

# ----------------------------------------------------------------------------- outputs

def latent_shape_of(cfg):
    return (cfg.latent_channels, cfg.img_size // cfg.vae_downscale, cfg.img_size // cfg.vae_downscale)

@torch.no_grad()
def save_reconstructions(vae, test_images, out_dir):
    """recon.png: rows of held-out images above their reconstructions, and the PSNR over all held-out images."""
    images = test_images.float() / 127.5 - 1
    reconstructions = torch.cat([vae.decode(z) for z in encode_images(vae, test_images).split(500)])
    quality, per_row = psnr(images, reconstructions), min(8, len(images))
    rows = [torch.cat([images[n:n + per_row], reconstructions[n:n + per_row]])
            for n in range(0, min(32, len(images)) - per_row + 1, per_row)]
    print(f"VAE reconstruction PSNR on {len(images)} held-out images: {quality:.2f} dB", flush=True)
    return save_grid(torch.cat(rows), out_dir / "recon.png", ncol=per_row,
                     title=f"held-out images / VAE reconstructions: PSNR {quality:.1f} dB")

def save_attention_maps(model, vae, text_encoder, prompt, cfg, out_dir, device):
    """attention.png: an image drawn for the prompt, then for each of its first 16 tokens where the patches looked:
    the cross-attention weights (6), averaged over heads, blocks and steps, each map scaled to its maximum."""
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
    patch_pixels = cfg.vae_downscale * cfg.patch_size  # one latent patch covers this many pixels a side
    maps = attention.T.reshape(len(tokens), 1, *[cfg.img_size // patch_pixels] * 2)
    maps = F.interpolate(maps / maps.amax(dim=(2, 3), keepdim=True), scale_factor=patch_pixels)  # patch -> pixels
    heat = torch.cat([3 * maps, 3 * maps - 1, 3 * maps - 2], dim=1).clamp(0, 1) * 2 - 1  # black-red-yellow-white
    return save_grid(torch.cat([image, heat.to(image.device)]), out_dir / "attention.png",
                     ncol=len(tokens) + 1, scale=3, title=f'cross-attention while drawing "{prompt}"',
                     col_labels=["image"] + [f"{token} {p:.0%}" for token, p in zip(tokens, attention.mean(0))])

def write_outputs(model, vae, text_encoder, classes, cfg, out_dir, device, step):
    """samples.png, cfg_sweep.png, colours.png, attention.png, trajectory.png and .gif, nfe_sweep.png and, with
    --eval_samples, samples.npz: their names."""
    model.eval()
    prompts, shape = list(cfg.prompts) or [make_caption(name) for name in classes], latent_shape_of(cfg)
    def draw(prompts, num_steps=cfg.sample_steps, sampler=cfg.sampler, trajectory=False, cfg_scale=cfg.cfg_scale):
        torch.manual_seed(cfg.seed)  # the same noise whenever this checkpoint is sampled
        return sample_latent_conditional(model, vae, text_encoder, prompts, latent_shape=shape, cfg_scale=cfg_scale,
                                         num_steps=num_steps, device=device, trajectory=trajectory, sampler=sampler)
    title = f"{SCRIPT}, step {step}, {cfg.sample_steps} {cfg.sampler} steps = {NFE[cfg.sampler](cfg.sample_steps)} NFE"
    per_prompt = max(1, cfg.num_samples // len(prompts))
    wrote = save_prompt_grid(draw([p for p in prompts for _ in range(per_prompt)]), prompts, out_dir / "samples.png",
                             title=f"{title}, w={cfg.cfg_scale:g}")
    scales = [0, 1, 2, 4, 8, 12]
    sweep = [draw(prompts, cfg_scale=w) for w in scales]  # the same noise at every scale
    wrote += save_grid(torch.stack(sweep, dim=1).flatten(0, 1), out_dir / "cfg_sweep.png", ncol=len(scales),
                       title="guidance scale w", col_labels=[f"w={w}" for w in scales], row_labels=prompts)
    colours, columns = ("red", "yellow", "green", "blue", "white", "black"), classes[:10]
    wrote += save_grid(draw([make_caption(f"{colour} {name}") for colour in colours for name in columns]),
                       out_dir / "colours.png", ncol=len(columns), title='"a photo of a {colour} {class}"',
                       col_labels=columns, row_labels=colours)
    attention_prompt = cfg.prompts[0] if cfg.prompts else make_caption(f"red {classes[-1]}")
    wrote += save_attention_maps(model, vae, text_encoder, attention_prompt, cfg, out_dir, device)
    eight = [prompts[i % len(prompts)] for i in range(8)]
    wrote += save_trajectory(draw(eight, trajectory=True), out_dir, cfg, row_labels=eight)
    wrote += save_nfe_sweep(lambda num_steps, sampler: draw(eight[:4], num_steps, sampler), out_dir, cfg)
    if cfg.eval_samples:  # 500 images at a time, so memory stays small for any N
        eval_prompts = [prompts[k % len(prompts)] for k in range(cfg.eval_samples)]  # equal numbers of each
        labels = np.array([class_named_in(prompt, classes) for prompt in eval_prompts], np.int64)
        torch.manual_seed(cfg.seed)
        chunks = [to_uint8(sample_latent_conditional(model, vae, text_encoder, eval_prompts[n:n + 500],
                                                     latent_shape=shape, cfg_scale=cfg.cfg_scale,
                                                     num_steps=cfg.sample_steps, device=device, sampler=cfg.sampler))
                  for n in range(0, cfg.eval_samples, 500)]
        wrote += write_atomically(out_dir / "samples.npz", lambda f: np.savez_compressed(
            f, images=torch.cat(chunks).numpy(), labels=labels, prompts=np.array(eval_prompts)))
    return wrote

def save_prompt_grid(images, prompts, path, title, rows=16):
    """samples.png: a labelled row per prompt, in blocks of 16 rows side by side (60 prompts: 4, not a column)."""
    n = len(images) // len(prompts)
    blocks = [grid_image(images[i * n:(i + rows) * n], n, title if i == 0 else "", row_labels=prompts[i:i + rows])
              for i in range(0, len(prompts), rows)]
    canvas = Image.new("RGB", (sum(block.width for block in blocks), blocks[0].height), "white")
    for k, block in enumerate(blocks):
        canvas.paste(block, (sum(b.width for b in blocks[:k]), 0))
    return write_atomically(path, lambda f: canvas.save(f, format="PNG"))

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
        kind = dict(nargs="+", metavar="TEXT") if f.type is tuple else kind  # --prompts "a cat" "a red car"
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
    if cfg.vae_downscale not in (2, 4, 8, 16) or cfg.vae_channels % 8:
        return ["--vae_downscale must be 2, 4, 8 or 16; --vae_channels must divide by 8 (GroupNorm's 8 groups)"]
    bad = min(cfg.patch_size, cfg.num_heads) > 0 and (cfg.img_size % (cfg.vae_downscale * cfg.patch_size)
                                                       or cfg.embed_dim % math.lcm(4, cfg.num_heads))
    problems = (["--img_size must divide by --vae_downscale * --patch_size, --embed_dim by 4 and --num_heads"]
                if bad else [])
    if any(not prompt.strip() for prompt in cfg.prompts):
        problems.append("--prompts must not be empty: the empty prompt is the unconditional half of guidance")
    return problems

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
        transformers.logging.set_verbosity_error()  # no warnings or "Loading weights" bars on every run
        transformers.logging.disable_progress_bar()
        try:
            text_encoder = CLIPTextEncoder(cfg.text_encoder, device)
        except Exception as error:  # no network, not a text model, a broken folder: one line, not a traceback
            reason = " ".join(str(error).split())[:200]
            raise SystemExit(f"error: could not load the text encoder {cfg.text_encoder!r} ({reason}): pass "
                             f"--text_encoder a hub id or a local folder of a Hugging Face text model")
        model = build_model(cfg, text_encoder.embed_dim).to(device)
        ema_model = copy.deepcopy(model).requires_grad_(False)
        matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and "blocks" in n and "adaLN" not in n]
        rest = [p for p in model.parameters() if all(p is not m for m in matrices)]  # AdamW: embeddings, biases, adaLN
        optimizer = Muon([dict(params=rest), dict(params=matrices, muon_steps=cfg.muon_steps)], lr=cfg.lr,
                         betas=(0.9, cfg.adam_beta2))
        vae = VAE(cfg.latent_channels, cfg.vae_channels, cfg.vae_downscale).to(device)
        vae_optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=cfg.vae_weight_decay)
        parts = dict(model=model, ema=ema_model, optimizer=optimizer, vae=vae, vae_optimizer=vae_optimizer)
        extras = {k: ckpt[k] for k in ("progress", "captions", "classes", "vae_step")} if ckpt else {
            "progress": {}, "vae_step": 0}  # beside the parts
        step, wrote = restore(ckpt, parts, device, out_dir / "ckpt.pt") if ckpt else 0, []
        if cfg.vae_ckpt and not cfg.sample_only:  # another 05 run's VAE, refused if built with other VAE flags
            flags = {name: getattr(cfg, name) for name in ("latent_channels", "vae_channels", "vae_downscale")}
            vae.load_state_dict(load_checkpoint(Path(cfg.vae_ckpt), dict(flags, resume=False), "--vae_ckpt")[0]["vae"])
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
        wrote += write_outputs(ema_model, vae, text_encoder, extras["classes"], cfg, out_dir, device, step)
        print(f"wrote {', '.join(wrote)} to {out_dir}", flush=True)

if __name__ == "__main__":
    main()
