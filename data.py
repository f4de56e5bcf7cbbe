"""
The tasks the model is trained and judged on, built on the world (world.py): the word-level
vocabulary shared with the image codes, understanding and generation examples, token sequences,
and the preference pairs with their corruptions (hallucinated captions, cropped images, changed
prompts).
"""
import math
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from PIL import Image

from world import (CANONICAL, CELLS, COLOURS, COMPANION, HELD_OUT, MAX_OBJECTS, NAMES, NUMBERS, PLURAL,
                   PROBE_WORDS, Obj, RELATIONS, RELATION_CELLS, SHAPES, SYMBOLS, TRAIN_KINDS, caption_words,
                   hallucinated_mentions, in_test_bucket, mention_words, sample_scene)

# -----------------------------------------------------------------------------
# the word-level vocabulary, derived from the grammar

SPECIALS = ("<pad>", "<end>", "<und>", "<gen>", "<boi>", "<eoi>", "<ans>")
PLURAL_MARK = "+s"           # 'circles' is two tokens, 'circle' '+s': the plural shares its noun's embedding
STEM = {p: s for s, p in PLURAL.items()}
WORDS = sorted({w for phrase in (*COLOURS, *SHAPES, PLURAL_MARK, *CELLS, *NUMBERS, *RELATIONS,
                                 "yes no nothing describe what colour shape is at the how many "
                                 "there a and , ?", *SYMBOLS, *NAMES, PROBE_WORDS) for w in phrase.split()})


class Vocab:
    """One shared vocabulary: special tokens, then words, then `n_codes` image codes."""

    def __init__(self, n_codes):
        self.itos = list(SPECIALS) + WORDS
        self.n_text = len(self.itos)                     # ids below this are text/special tokens
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.n_codes = n_codes
        self.size = self.n_text + n_codes
        for name in SPECIALS:                            # self.pad, self.end, self.und, ...
            setattr(self, name.strip("<>"), self.stoi[name])

    @property
    def text_ids(self):
        """What a text position may emit: the words and <end>."""
        return [self.end] + list(range(len(SPECIALS), self.n_text))

    @property
    def image_ids(self):
        """What an image position may emit: the image codes."""
        return list(range(self.n_text, self.size))

    def encode(self, words):
        """Words -> ids; a plural noun becomes two tokens, its singular and the plural mark."""
        ids = []
        for w in words:
            if w in STEM:
                ids += [self.stoi[STEM[w]], self.stoi[PLURAL_MARK]]
            elif w in self.stoi:
                ids.append(self.stoi[w])
            else:
                raise ValueError(f"word {w!r} is not in the vocabulary")
        return ids

    def decode(self, ids):
        """Ids -> words, a noun and its plural mark joined again ('circle' '+s' -> 'circles')."""
        words = []
        for i in ids:
            w = self.itos[i] if i < self.n_text else f"<img{i - self.n_text}>"
            if w == PLURAL_MARK and words and words[-1] in PLURAL:
                words[-1] = PLURAL[words[-1]]
            else:
                words.append(w)
        return words


# -----------------------------------------------------------------------------
# tasks: understanding (image + question -> answer) and generation (prompt -> image)

UND_TASKS = ("caption", "colour", "shape", "count", "exists")
GENEVAL_TASKS = ("single", "two", "counting", "colours", "position", "attribution")
GEN_TASKS = ("full",) + GENEVAL_TASKS        # 'full' = the whole description -> the exact image


@dataclass
class Example:
    task: str
    scene: tuple             # the image's ground truth (for generation: the target image)
    question: list           # understanding: question words; generation: prompt words
    answer: list             # understanding: answer words; generation: [] (the image is the answer)

    @property
    def is_gen(self):
        return self.task in GEN_TASKS


def und_example(rng, scene, task, caption_noise=0.0):
    kinds = [o.kind for o in scene]
    shapes = Counter(o.shape for o in scene)
    if task == "colour":
        unique = [o for o in scene if shapes[o.shape] == 1]
        if unique:
            o = rng.choice(unique)
            return Example(task, scene, f"what colour is the {o.shape} ?".split(), [o.colour])
        task = "shape"                                   # no shape is unique: ask another question
    if task == "caption":
        return Example(task, scene, ["describe"], caption_words(scene, rng, caption_noise))
    if task == "shape":
        cell = rng.randrange(9)
        here = [o.shape for o in scene if o.cell == cell]
        return Example(task, scene, f"what shape is at {CELLS[cell]} ?".split(), here or ["nothing"])
    if task == "count":
        s = rng.choice(list(shapes)) if rng.random() < 0.7 else rng.choice(SHAPES)
        return Example(task, scene, f"how many {PLURAL[s]} ?".split(), [NUMBERS[shapes[s]]])
    if task == "exists":
        if rng.random() < 0.5:
            kind, ans = rng.choice(kinds), "yes"
        else:                                            # half of the 'no' questions are adversarial
            comps = [c for a, c in COMPANION.items() if a in kinds and c not in kinds]
            absent = [k for k in TRAIN_KINDS if k not in kinds]
            kind, ans = rng.choice(comps if comps and rng.random() < 0.5 else absent), "no"
        return Example(task, scene, f"is there a {kind[0]} {kind[1]} ?".split(), [ans])
    raise ValueError(f"unknown understanding task {task!r}")


def gen_example(rng, split, task):
    """A generation prompt and a scene that satisfies it exactly. Prompts that name no position
    put their objects in CANONICAL cells (in prompt order), so the prompt fixes the layout."""
    if task == "full":
        scene = sample_scene(rng, split, n=rng.randint(1, MAX_OBJECTS))
        return Example(task, scene, caption_words(scene), [])
    if task == "counting":
        k = rng.randint(2, MAX_OBJECTS)
        scene = sample_scene(rng, split, same=True, cells=CANONICAL[k])
        o = scene[0]
        return Example(task, scene, [NUMBERS[k], o.colour, PLURAL[o.shape]], [])
    if task in ("single", "colours"):
        a = sample_scene(rng, split, cells=CANONICAL[1])[0]
        words = ["a", a.shape] if task == "single" else ["a", a.colour, a.shape]
        return Example(task, (a,), words, [])
    rel = rng.choice(RELATIONS)
    while True:                          # two objects of different shapes, in prompt order
        a, b = sample_scene(rng, split, cells=RELATION_CELLS[rel] if task == "position" else CANONICAL[2])
        if a.shape != b.shape:
            break
    scene = tuple(sorted((a, b), key=lambda o: o.cell))
    if task == "two":
        return Example(task, scene, f"a {a.shape} and a {b.shape}".split(), [])
    if task == "attribution":
        return Example(task, scene, f"a {a.colour} {a.shape} and a {b.colour} {b.shape}".split(), [])
    if task == "position":
        return Example(task, scene, f"a {a.shape} {rel} a {b.shape}".split(), [])
    raise ValueError(f"unknown generation task {task!r}")


# words that can be swapped for another of their group without breaking the grammar
SWAPS = (tuple(COLOURS), SHAPES, tuple(PLURAL.values()), NUMBERS[2:], ("top", "middle", "bottom"),
         ("left", "center", "right"), ("above", "below"))


def corrupt_prompt(rng, words):
    """The generation prompt with ONE attribute changed: a colour, shape, number, cell or relation
    word replaced by another of its group. The mDPO-style corrupted condition for generation (ours).
    A shape never becomes one the prompt already names ('a square and a square' asks for less),
    and no held-out colour+shape combination appears, so corrupted prompts do not leak that split."""
    singular = {p: s for s, p in PLURAL.items()}

    def options(i):
        if i + 1 < len(words) and words[i + 1] == "of":          # 'left of' is a relation, not a cell
            group = ("left", "right")
        else:
            group = next((g for g in SWAPS if words[i] in g), ())
        return [x for x in group if x != words[i] and not (group is SHAPES and x in words)]

    spots = [i for i in range(len(words)) if options(i)]
    while True:
        i = rng.choice(spots)
        new = list(words)
        new[i] = rng.choice(options(i))
        combos = {(a, singular.get(b, b)) for a, b in zip(new, new[1:]) if a in COLOURS}
        if not combos & HELD_OUT:
            return new


def sample_example(rng, split, task, caption_noise=0.0, cooc=None):
    if task in GEN_TASKS:
        return gen_example(rng, split, task)
    return und_example(rng, sample_scene(rng, split, cooc=cooc), task, caption_noise if split == "train" else 0.0)


# -----------------------------------------------------------------------------
# token sequences

def image_tokens(vocab, codes):
    """Tokenizer codes -> their ids in the shared vocabulary (after the text tokens)."""
    codes = [int(c) for c in codes]
    if any(not 0 <= c < vocab.n_codes for c in codes):
        raise ValueError(f"image codes must lie in [0, {vocab.n_codes}), got {min(codes)}..{max(codes)}")
    return [vocab.n_text + c for c in codes]


def cell_word_ids(vocab, grid):
    """For each of an image's grid*grid tokens (row-major), the ids of its cell's two words (CELLS):
    ((id('top'), id('left')), ...); with a 6x6 grid, 2x2 tokens share a cell. A tuple, as GPTConfig stores it."""
    return tuple(tuple(vocab.encode(CELLS[r * 3 // grid * 3 + c * 3 // grid].split()))
                 for r in range(grid) for c in range(grid))


def und_prompt(vocab, codes, question):
    """<und> <boi> image codes <eoi> question <ans>. The image comes first (as in LLaVA), so its
    tokens always sit at the same positions and several questions about it can follow
    (und_sequence). A text-only question (no codes: the probes' facts) has an empty image."""
    return [vocab.und, vocab.boi] + image_tokens(vocab, codes) + [vocab.eoi] + vocab.encode(question) + [vocab.ans]


def gen_prompt(vocab, prompt_words):
    """<gen> prompt <boi>; an empty prompt is the unconditional branch of classifier-free guidance."""
    return [vocab.gen] + vocab.encode(prompt_words) + [vocab.boi]


def und_sequence(vocab, codes, question, answer, more=()):
    """und_prompt | answer <end>, then one more turn `question <ans> | answer <end>` for each
    (question, answer) in `more` (the same image, asked again); labelled on the answers and their
    <end> only (-100 elsewhere). Several questions per image = several answers to learn from for
    one image's tokens (SFT's --turns)."""
    ids, labels = [], []
    for k, (q, a) in enumerate([(question, answer), *more]):
        prompt = und_prompt(vocab, codes, q) if k == 0 else vocab.encode(q) + [vocab.ans]
        target = vocab.encode(a) + [vocab.end]
        ids += prompt + target
        labels += [-100] * len(prompt) + target
    return ids, labels


def gen_sequence(vocab, codes, prompt_words):
    """gen_prompt | image codes <eoi>, labelled on the codes and <eoi> only."""
    prompt = gen_prompt(vocab, prompt_words)
    target = image_tokens(vocab, codes) + [vocab.eoi]
    return prompt + target, [-100] * len(prompt) + target


def collate(seqs, pad):
    """[(ids, labels), ...] -> (ids, labels), each (B, T) int64, right-padded (pad / -100).
    Right padding is harmless under causal attention: no real token attends to a pad."""
    T = max(len(ids) for ids, _ in seqs)
    ids = np.full((len(seqs), T), pad, np.int64)
    labels = np.full((len(seqs), T), -100, np.int64)
    for i, (x, y) in enumerate(seqs):
        ids[i, :len(x)], labels[i, :len(y)] = x, y
    return ids, labels


# -----------------------------------------------------------------------------
# preference pairs for understanding: chosen = faithful, rejected = hallucinating

@dataclass
class Pair:
    scene: tuple
    question: list           # ['describe'] or an exists question
    chosen: list             # answer words
    rejected: list
    source: str              # 'constructed' or 'on-policy'
    n_edits: int = 1         # constructed pairs: 1 = hard (one subtle error), 2-3 = easy


@dataclass
class PairSet:
    """A set of preference pairs and what the losses need of them, computed once per seed and shared
    by every run that trains on them (pref.build_pairs for understanding, genpairs.gen_pair_data for
    generation). N pairs."""
    pairs: list                   # data.Pair (understanding) or genpairs.GenPair (generation)
    task: str = "und"             # 'und': image + question -> answer; 'gen': prompt -> image codes
    codes: list = None            # und: each pair's image codes
    crop_codes: list = None       # und: those of its ONE corrupted crop, for policy and reference alike
    n_onpolicy: int = 0           # und: pairs sampled from the SFT model (the others are constructed)
    # images (True, or False for the no-image control) -> (N, 3) float32: the frozen reference's
    # log-probs of chosen, rejected and corrupted chosen (mDPO's condition)
    ref_logps: dict = field(default_factory=dict)
    scores: object = None         # (N, 2) float32 tensor: DAMA's data-aware scores of chosen, rejected
    score_gap_mean: float = None  # DAMA's dbar: the mean of scores[:, 0] - scores[:, 1]

    def ref(self, images=True):
        """(N, 3): the reference's log-probs of chosen, rejected, corrupted chosen, with or without images."""
        return self.ref_logps[images]

    def to_dict(self):
        """Understanding pairs as plain containers and tensors, what pairs_s<seed>.pt holds (read back
        with torch.load(weights_only=True), which loads no class)."""
        return {"pairs": [asdict(p) for p in self.pairs], "codes": self.codes, "crop_codes": self.crop_codes,
                "n_onpolicy": self.n_onpolicy, "ref_1": self.ref_logps[True], "ref_0": self.ref_logps[False],
                "scores": self.scores, "score_gap_mean": self.score_gap_mean}

    @classmethod
    def from_dict(cls, d):
        pairs = [Pair(tuple(Obj(**o) for o in p["scene"]), **{k: v for k, v in p.items() if k != "scene"})
                 for p in d["pairs"]]
        return cls(pairs, "und", d["codes"], d["crop_codes"], d["n_onpolicy"],
                   {True: d["ref_1"], False: d["ref_0"]}, d["scores"], d["score_gap_mean"])


def hallucinate(rng, scene, n_edits, keep_length=False):
    """The faithful caption of `scene` with up to `n_edits` plausible errors, each either an
    absent object added at a free cell (usually the missing companion of a present cue: the
    co-occurrence bias) or a true mention whose colour or shape is changed. keep_length: never
    add; the absent object REPLACES a true mention instead, so both captions have equal length."""
    mentions = [(o.cell, o.colour, o.shape) for o in scene]
    truth = set(mentions)
    for _ in range(n_edits):
        kinds = {(c, s) for _, c, s in mentions} | {o.kind for o in scene}
        free = sorted(set(range(9)) - {m[0] for m in mentions})
        comps = [c for a, c in COMPANION.items() if a in kinds and c not in kinds]
        true_idx = [i for i, m in enumerate(mentions) if m in truth]
        absent = [k for k in TRAIN_KINDS if k not in kinds]
        if keep_length and not true_idx:
            break
        if not keep_length and free and (comps or rng.random() < 0.5 or not true_idx):
            kind = rng.choice(comps) if comps and rng.random() < 0.8 else rng.choice(absent)
            mentions.append((rng.choice(free), *kind))
            continue
        i = rng.choice(true_idx)
        cell, col, shp = mentions[i]
        if keep_length and comps and rng.random() < 0.8:
            kind = rng.choice(comps)                     # the companion, in a true object's place
        else:
            kind = rng.choice([k for k in absent if k[0] == col or k[1] == shp] or absent)
        mentions[i] = (cell, *kind)
    return mention_words(mentions)


def alter_scene(rng, scene, tries=100):
    """The scene with ONE object changed: its colour, its shape, or its cell (the jitter kept); never
    into a held-out colour+shape combination, onto another object's cell, or into the test bucket, so
    the altered scene is as much a training scene as the original. None if `tries` draws fail. The
    rejected image of a generation pair built from the world (genpairs.build_world_pairs)."""
    for _ in range(tries):
        i = rng.randrange(len(scene))
        o = scene[i]
        what = rng.choice(("colour", "shape", "cell"))
        if what == "colour":
            new = replace(o, colour=rng.choice([c for c in COLOURS if c != o.colour]))
        elif what == "shape":
            new = replace(o, shape=rng.choice([s for s in SHAPES if s != o.shape]))
        else:
            free = sorted(set(range(9)) - {x.cell for x in scene})
            if not free:
                continue
            new = replace(o, cell=rng.choice(free))
        altered = scene[:i] + (new,) + scene[i + 1:]
        if new.kind not in HELD_OUT and not in_test_bucket(altered):
            return altered
    return None


def constructed_pair(rng, scene, task="caption", keep_length=False):
    """A pair whose rejected side differs from the faithful answer by known errors."""
    if task == "exists":
        ex = und_example(rng, scene, "exists")
        return Pair(scene, ex.question, ex.answer, ["no" if ex.answer == ["yes"] else "yes"], "constructed")
    rejected = hallucinate(rng, scene, 1 if rng.random() < 0.5 else rng.randint(2, 3), keep_length)
    return Pair(scene, ["describe"], caption_words(scene), rejected, "constructed",
                hallucinated_mentions(scene, rejected))



def corrupt_image(rng, img, low=0.01, high=0.2):
    """mDPO's corrupted image: a random-resized crop keeping a uniformly drawn `low`..`high`
    of the area (aspect ratio 3/4..4/3), resized back to full size. Returns (image, kept area)."""
    H, W = img.shape[:2]
    for _ in range(100):
        target = rng.uniform(low, high) * H * W
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 1 <= w <= W and 1 <= h <= H and low <= w * h / (H * W) <= high:
            break
    else:
        raise RuntimeError("no crop found")
    x, y = rng.randint(0, W - w), rng.randint(0, H - h)
    out = Image.fromarray(img).crop((x, y, x + w, y + h)).resize((W, H), Image.BILINEAR)
    return np.asarray(out), w * h / (H * W)
