"""
Checkpoints and the plumbing every stage shares: the device, the seed, the log file, atomic
writes, and loading a checkpoint back as (model, tokenizer, vocabulary). Everything that reads
or writes a .pt file goes through here.
"""
import hashlib
import os
import random

import numpy as np
import torch
from tqdm import tqdm

import data
import world
from model import GPT, GPTConfig, PatchTokenizer


def pick_device():
    """cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def log(args, line):
    tqdm.write(line)
    with open(os.path.join(args.out_dir, "log.txt"), "a") as f:
        f.write(line + "\n")


def load_tokenizer(path, device):
    if not os.path.exists(path):
        raise SystemExit(f"error: no tokenizer at {path}; run `python train.py --stage tokenizer` first")
    ck = torch.load(path, map_location=device)
    tok = PatchTokenizer(ck["n_codes"], ck["patch"], world.CANVAS).to(device)
    tok.load_state_dict(ck["tokenizer"])
    return tok


def load_model(path, device):
    """A checkpoint -> (model in eval mode, tokenizer, vocab, checkpoint dict)."""
    if not os.path.exists(path):
        raise SystemExit(f"error: no checkpoint at {path}")
    ck = torch.load(path, map_location=device, weights_only=False)
    vocab = data.Vocab(ck["n_codes"])
    if ck["model_config"]["vocab_size"] != vocab.size:
        raise SystemExit(f"error: {path} has a vocabulary of {ck['model_config']['vocab_size']} tokens, this "
                         f"code's has {vocab.size}; it was trained by another version: retrain it")
    model = GPT(GPTConfig(**ck["model_config"])).to(device)
    model.load_state_dict(ck["model"])
    tok = PatchTokenizer(ck["n_codes"], ck["patch"], world.CANVAS).to(device)
    tok.load_state_dict(ck["tokenizer"])
    return model.eval(), tok, vocab, ck


def file_digest(path):
    """The first 12 hex digits of a file's SHA-256: which SFT model a result came from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]
