"""
Checkpoints and the plumbing every stage shares: the device, the seed, the log file, atomic
writes, and loading a checkpoint back as (model, tokenizer, vocabulary). Everything that reads
or writes a .pt file goes through here.
"""
import hashlib
import json
import os
import pickle
import random
import sys

import numpy as np
import torch
from tqdm import tqdm

import data
import dist
from errors import Refused   # (here too: every entry point imports it from checkpoint)
import world
from model import GPT, GPTConfig, PatchTokenizer
from vq import VQVAE


def pick_device():
    """cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def auto_dtype(device):
    """The autocast dtype of --dtype auto: bfloat16 on a CUDA device that supports it, else float32."""
    return "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)   # (every CUDA device too)


def global_rng_state():
    """The global generators' state (python, numpy, torch CPU and CUDA), to interleave several runs
    exactly as if each ran alone."""
    return (random.getstate(), np.random.get_state(), torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_global_rng_state(state):
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])
    if state[3] is not None:
        torch.cuda.set_rng_state_all(state[3])


def save_atomic(obj, path):
    """torch.save to a temporary file, flushed to disk, then renamed: a crash leaves the old file or the
    new one, never half of one."""
    with open(path + ".tmp", "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def write_atomic(path, text):
    """The same for a text file (results, tables, the report)."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def writable(out_dir):
    """Create out_dir if needed and make sure files can be written there, before any work starts."""
    probe = os.path.join(out_dir, f".write_test{dist.RANK}.tmp")   # (one per rank under torchrun)
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise Refused(f"error: cannot write to out_dir {out_dir}: {e.strerror or e}") from None


def log(args, line):
    """A line on the terminal and in out_dir/log.txt; under torchrun, rank 0's. The other ranks write
    theirs to out_dir/log.rank<r>.txt alone (the preference runs they train, for one)."""
    if dist.is_main():
        tqdm.write(line)
    with open(os.path.join(args.out_dir, "log.txt" if dist.is_main() else f"log.rank{dist.RANK}.txt"), "a") as f:
        f.write(line + "\n")


def command_line(main):
    """Run an entry point's main(): a Refused becomes one line on stderr and exit status 2, no traceback."""
    try:
        main()
    except Refused as e:
        if str(e):    # (an empty one: another process of the run has said it)
            print(e, file=sys.stderr)
        sys.exit(2)


def pick(flag, value, labels):
    """The slugs --<flag> names: 'all' (every one, in order) or a comma-separated list of them.
    labels: {slug: its label in the tables}. A label typed where its slug belongs, or an unknown name,
    is refused in one line that says what to type."""
    if value == "all":
        return list(labels)
    names = [v.strip() for v in value.split(",")]
    slugs = {label: slug for slug, label in labels.items()}
    fixed = [slugs.get(v, v) for v in names]
    if fixed != names and all(v in labels for v in fixed):
        raise Refused(f"error: --{flag} takes short names, not the tables' labels: use --{flag} {','.join(fixed)}")
    unknown = [v for v in fixed if v not in labels]
    if unknown:
        raise Refused(f"error: --{flag}: unknown {unknown[0]!r}; choose all, or from {', '.join(labels)}")
    return names


def read_checkpoint(path, device, keys, what="checkpoint"):
    """torch.load with weights_only=True: tensors, numbers, strings and containers only, so a
    pickle that would call a function (open a file, run a command) is refused before it runs.
    Every failure is a Refused naming the file."""
    if not os.path.exists(path):
        raise Refused(f"error: no {what} at {path}")
    if os.path.getsize(path) == 0:
        raise Refused(f"error: {path} is empty, not a {what}")
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):   # a GLOBAL opcode: the pickle names a function or class to call
            raise Refused(f"error: {path} is refused: it names {str(e).split('GLOBAL ')[-1].split()[0]}, which "
                          f"a {what} never holds, and loading it would run code (only tensors, numbers, "
                          f"strings and containers are loaded)") from None
        raise Refused(f"error: {path} is not a readable {what} (not written by torch.save)") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:
        raise Refused(f"error: {path} is not a readable {what} (truncated, or not written by torch.save): "
                      f"{str(e).splitlines()[0][:120] if str(e) else type(e).__name__}") from None
    require(ck, keys, path, what)
    return ck


def require(ck, keys, path, what="checkpoint"):
    missing = [k for k in keys if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise Refused(f"error: {path} is not a unipref {what}: it lacks {', '.join(missing)}")


def tokenizer_fields(tok):
    """What a checkpoint keeps of its tokenizer: the weights, and what rebuilds it (vq: the VQ-VAE's
    configuration; None for the k-means patch tokenizer)."""
    return {"tokenizer": tok.state_dict(), "n_codes": tok.n_codes, "patch": tok.patch,
            "vq": tok.config() if isinstance(tok, VQVAE) else None}


def build_tokenizer(ck, path, device):
    """The tokenizer of checkpoint dict `ck` (read from `path`), in eval mode on `device`."""
    try:
        tok = VQVAE(**ck["vq"]) if ck.get("vq") else PatchTokenizer(ck["n_codes"], ck["patch"], world.CANVAS)
    except (TypeError, ValueError) as e:
        raise Refused(f"error: {path} has a tokenizer configuration this code does not know: {e}") from None
    tok = tok.to(device)
    _load_state(tok, ck["tokenizer"], path)
    return tok.eval()


def load_tokenizer(path, device):
    if not os.path.exists(path):
        raise Refused(f"error: no tokenizer at {path}; run `python train.py --stage tokenizer` first")
    return build_tokenizer(read_checkpoint(path, device, ("tokenizer", "n_codes", "patch"), "tokenizer"), path, device)


def load_model(path, device):
    """A checkpoint -> (model in eval mode, tokenizer, vocab, checkpoint dict)."""
    ck = read_checkpoint(path, device, ("model_config", "n_codes"))
    vocab = data.Vocab(ck["n_codes"])
    if ck["model_config"].get("vocab_size") != vocab.size:
        raise Refused(f"error: {path} has a vocabulary of {ck['model_config'].get('vocab_size')} tokens, this "
                      f"code's has {vocab.size}; it was trained by another version: retrain it")
    require(ck, ("model", "patch", "tokenizer"), path)
    try:
        model = GPT(GPTConfig(**ck["model_config"])).to(device)
    except TypeError as e:
        raise Refused(f"error: {path} has a model configuration this code does not know: {e}") from None
    _load_state(model, ck["model"], path)
    return model.eval(), build_tokenizer(ck, path, device), vocab, ck


def _load_state(module, state, path):
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise Refused(f"error: {path} does not fit this code's {type(module).__name__}: "
                      f"{str(e).splitlines()[0][:160]}") from None


def settings(args):
    """The settings a run's outputs depend on: every flag but which stage runs and --resume, as JSON types.
    Not the number of processes, nor which GPU of them (the device's kind only): the outputs of a
    stage do not depend on them (SFT's checkpoint checks its process count itself)."""
    kept = {k: v for k, v in vars(args).items() if k not in ("stage", "resume", "world_size")}
    kept["device"] = torch.device(args.device).type
    return json.loads(json.dumps(kept))


def differences(old, new):
    """'--beta 0.1 -> 0.2, ...' for the settings that differ ('' if none)."""
    keys = sorted(set(old) | set(new))
    return ", ".join(f"--{k} {old.get(k)} -> {new.get(k)}" for k in keys if old.get(k) != new.get(k))


def file_digest(path):
    """The first 12 hex digits of a file's SHA-256: which SFT model a result came from. Remembered
    while the file stays the same one, unchanged (a study asks for sft.pt's dozens of times)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns)   # (a rewrite is a new file: save_atomic)
    if key not in _DIGESTS:
        _DIGESTS[key] = _sha256(path)
    return _DIGESTS[key]


_DIGESTS = {}


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]
