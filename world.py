"""
The synthetic world: scenes with exact ground truth, their renders, leak-free splits, the
scene grammar as text, and the judges (the exact image parser and the prompt checks). Nothing
here knows about tokens or models; data.py builds the tasks and sequences on top of it.

A scene is a tuple of objects on a 3x3 grid of named 8x8-pixel cells of a 24x24 RGB canvas. Each
object has a colour, a shape, a cell and a +-1 pixel jitter. Generation prompts that do not name
positions ("a red circle and a blue square") place their objects in canonical cells, like the
pips of a die, so that a prompt determines its image up to jitter. The world is built to make a small model
HALLUCINATE like real multimodal models do (README, "The world"):
  (a) co-occurrence bias: each CUE object is joined by its COMPANION in ~35% of the training
      scenes it is in, by any other kind in ~13% (COOC = 0.3);
      the 'bias' test split holds scenes where a cue appears WITHOUT its companion;
  (b) noisy instructions: a fraction (`caption_noise`) of training captions of such scenes mention
      the absent companion anyway, as real instruction data does;
  (c) visual difficulty: 6x6-pixel shapes (a circle is a square minus four corner pixels),
      up to five objects, six colours, five shapes.
Splits cannot leak: a scene's canonical key (cells, colours, shapes; jitter excluded) is hashed
into a train or a test bucket, and a few colour+shape combinations never appear in training.
"""
import hashlib
import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image

# -----------------------------------------------------------------------------
# the world's constants

CANVAS = 24                  # pixels per side
CELL = 8                     # a cell is 8x8 pixels = 2x2 tokenizer patches, so cells never share a patch
SIZE = 6                     # an object's bounding box, pixels
STARTS = (1, 9, 17)          # top-left pixel of an un-jittered object in grid row/col 0, 1, 2
JITTER = (-1, 0, 1)          # per-axis jitter, pixels
MAX_OBJECTS = 5
BACKGROUND = (0, 0, 0)
COLOURS = {"red": (225, 35, 35), "green": (40, 185, 60), "blue": (50, 95, 235),
           "yellow": (235, 215, 40), "purple": (160, 60, 205), "orange": (245, 140, 25)}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURAL = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
# every cell is named by a row word and a column word (cell index = 3 * row + col)
CELLS = tuple(f"{r} {c}" for r in ("top", "middle", "bottom") for c in ("left", "center", "right"))
NUMBERS = ("zero", "one", "two", "three", "four", "five")
RELATIONS = ("left of", "right of", "above", "below")
# (a) the co-occurrence bias: cue -> companion, like "fork" -> "knife" in COCO
COMPANION = {("red", "circle"): ("blue", "square"), ("yellow", "triangle"): ("green", "cross"),
             ("purple", "diamond"): ("orange", "circle"), ("green", "square"): ("red", "triangle")}
# colour+shape combinations that never appear in training (compositional test split)
COOC = 0.3                   # default probability that a cue's companion joins a scene
HELD_OUT = {("green", "triangle"), ("blue", "cross"), ("orange", "diamond"), ("yellow", "square")}
KINDS = [(c, s) for c in COLOURS for s in SHAPES]
TRAIN_KINDS = [k for k in KINDS if k not in HELD_OUT]
TEST_BUCKET = 5              # 1 scene in 5 (by hash) is reserved for the test splits
# canonical cells of prompts that name no position: n objects -> cells, in prompt order
CANONICAL = {1: (4,), 2: (3, 5), 3: (3, 4, 5), 4: (0, 2, 6, 8), 5: (0, 2, 4, 6, 8)}
RELATION_CELLS = {"left of": (3, 5), "right of": (5, 3), "above": (1, 7), "below": (7, 1)}
# the reasoning and knowledge probes (probes.py): invented symbol words and invented names, whose
# meaning is taught through understanding text only, and the words of their grammar
SYMBOLS = ("zap", "dax", "wug", "fep", "blick", "toma")
NAMES = ("kiki", "bouba", "lumo", "pexi", "ruta", "zorb")
PROBE_WORDS = "plus minus means 's in whose this"


def _mask(shape):
    """The 6x6 boolean mask of a shape, from its formula on pixel centres."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5 - SIZE / 2          # (6, 6) centred coordinates
    if shape == "circle":
        return x ** 2 + y ** 2 <= 9.0
    if shape == "square":
        return np.ones((SIZE, SIZE), bool)
    if shape == "triangle":                                    # apex up, widening row by row
        return np.abs(x) <= (y + SIZE / 2 + 0.5) / 2
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= 3.0
    if shape == "cross":
        return (np.abs(x) <= 1.0) | (np.abs(y) <= 1.0)
    raise ValueError(f"unknown shape {shape!r}")


MASKS = {s: _mask(s) for s in SHAPES}
MASK_IMAGES = {s: Image.fromarray(m.astype(np.uint8) * 255) for s, m in MASKS.items()}   # Pillow paste masks


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    cell: int
    dx: int = 0              # jitter, pixels
    dy: int = 0

    @property
    def kind(self):
        return (self.colour, self.shape)


def scene_key(scene):
    """Canonical identity of a scene (what a caption can say): jitter excluded."""
    return tuple(sorted((o.cell, o.colour, o.shape) for o in scene))


def in_test_bucket(scene):
    digest = hashlib.md5(repr(scene_key(scene)).encode()).hexdigest()   # stable across runs
    return int(digest, 16) % TEST_BUCKET == 0


def breaks_bias(scene):
    kinds = {o.kind for o in scene}
    return any(a in kinds and c not in kinds for a, c in COMPANION.items())


# -----------------------------------------------------------------------------
# rendering (Pillow) and sampling

def render(scene):
    """scene -> (H, W, 3) uint8 RGB array."""
    img = Image.new("RGB", (CANVAS, CANVAS), BACKGROUND)
    for o in scene:
        r, c = divmod(o.cell, 3)
        box = (STARTS[c] + o.dx, STARTS[r] + o.dy)
        img.paste(COLOURS[o.colour], box + (box[0] + SIZE, box[1] + SIZE), mask=MASK_IMAGES[o.shape])
    return np.asarray(img)


def _draw(rng, n, kinds, same=False, cells=None):
    cells = cells or rng.sample(range(9), n)
    kind = rng.choice(kinds)
    return tuple(Obj(*(kind if same else rng.choice(kinds)), cell,
                     rng.choice(JITTER), rng.choice(JITTER)) for cell in cells)


def _add_companions(rng, scene, cooc):
    """(a) With probability `cooc`, a cue's companion joins the scene."""
    objs = list(scene)
    for cue, comp in COMPANION.items():
        kinds = [o.kind for o in objs]
        if cue in kinds and comp not in kinds and rng.random() < cooc:
            free = sorted(set(range(9)) - {o.cell for o in objs})
            jitter = (rng.choice(JITTER), rng.choice(JITTER))
            others = [i for i, o in enumerate(objs) if o.kind not in COMPANION]
            if len(objs) < MAX_OBJECTS or not others:
                objs.append(Obj(*comp, rng.choice(free), *jitter))
            else:                                  # scene is full: the companion replaces one
                i = rng.choice(others)
                objs[i] = Obj(*comp, objs[i].cell, *jitter)
    return tuple(sorted(objs, key=lambda o: o.cell))


def sample_scene(rng, split, n=None, same=False, cooc=None, cells=None):
    """One scene of a split: 'train', 'test' (ordinary held-out), 'bias' (held-out, a cue
    without its companion) or 'combo' (contains a held-out colour+shape combination).
    n: number of objects (default 2..5); same: all objects of one kind (counting);
    cells: the objects' cells, in order (default: random). Objects are returned in that order.
    cooc: the co-occurrence probability of training and ordinary test scenes (default COOC)."""
    cooc = COOC if cooc is None else cooc
    if split not in ("train", "test", "bias", "combo"):
        raise ValueError(f"unknown split {split!r}")
    for _ in range(10_000):
        k = len(cells) if cells else (n if n is not None else rng.randint(2, MAX_OBJECTS))
        if split == "combo":
            scene = _draw(rng, k, KINDS, same, cells)
            if any(o.kind in HELD_OUT for o in scene):
                return scene if cells else tuple(sorted(scene, key=lambda o: o.cell))
            continue
        scene = _draw(rng, k, TRAIN_KINDS, same, cells)
        if split == "bias":
            if not breaks_bias(scene) or not in_test_bucket(scene):
                continue
            return tuple(sorted(scene, key=lambda o: o.cell))
        if n is None and not same and not cells:
            scene = _add_companions(rng, scene, cooc)
        if in_test_bucket(scene) == (split == "test"):
            return scene if cells else tuple(sorted(scene, key=lambda o: o.cell))
    raise RuntimeError(f"could not sample a {split!r} scene with n={n}")


# -----------------------------------------------------------------------------
# the exact scene parser (the judge): pixels -> objects

PALETTE = np.array([BACKGROUND] + list(COLOURS.values()), np.float32)       # (7, 3)
PALETTE_NAMES = [None] + list(COLOURS)
REGION = CELL                # a cell's 8x8 pixel region holds its object at any jitter
# every shape at every jitter offset inside a region: (5 shapes * 9 offsets, 8, 8)
TEMPLATES, TEMPLATE_INFO = [], []
for _s in SHAPES:
    for _dy in JITTER:
        for _dx in JITTER:
            t = np.zeros((REGION, REGION), bool)
            t[_dy + 1:_dy + 1 + SIZE, _dx + 1:_dx + 1 + SIZE] = MASKS[_s]
            TEMPLATES.append(t)
            TEMPLATE_INFO.append((_s, _dx, _dy))
TEMPLATES = np.stack(TEMPLATES)


def parse(img, tol=3):
    """(H, W, 3) uint8 image -> tuple of Obj, sorted by cell.
    Each pixel snaps to the nearest palette colour; each cell's region is matched against every
    shape template at every jitter offset (Hamming distance). A blob that matches no template
    within `tol` pixels is returned with shape 'blob', so it satisfies no prompt."""
    img = np.asarray(img, np.float32)
    if img.shape != (CANVAS, CANVAS, 3):
        raise ValueError(f"parse expects a ({CANVAS}, {CANVAS}, 3) image, got {img.shape}")
    lab = ((img[:, :, None, :] - PALETTE) ** 2).sum(-1).argmin(-1)           # (H, W) palette index
    objs = []
    for cell in range(9):
        r, c = divmod(cell, 3)
        reg = lab[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]
        fg = reg > 0                                                          # (8, 8)
        if fg.sum() <= tol:
            continue
        colour = PALETTE_NAMES[np.bincount(reg[fg]).argmax()]
        dist = (TEMPLATES != fg).sum(axis=(1, 2))                             # (45,)
        best = int(dist.argmin())
        shape, dx, dy = TEMPLATE_INFO[best]
        objs.append(Obj(colour, shape if dist[best] <= tol else "blob", cell, dx, dy))
    return tuple(objs)


def centre(o):
    """Pixel centre (x, y) of an object."""
    r, c = divmod(o.cell, 3)
    return STARTS[c] + o.dx + SIZE / 2, STARTS[r] + o.dy + SIZE / 2



# -----------------------------------------------------------------------------
# the scene grammar as text: captions and their parser

def caption_words(scene, rng=None, noise=0.0):
    """'top left red circle , middle center blue square'. (b) With probability `noise`, a scene
    that breaks the co-occurrence bias gets its missing companion mentioned anyway, in the first
    free cell after its cue (reading order), where a real companion would most often be
    described. A fixed place makes the error learnable: at a random free cell it would be
    spread over many continuations and greedy decoding would never make it."""
    mentions = [(o.cell, o.colour, o.shape) for o in scene]
    kinds = {o.kind for o in scene}
    if noise > 0 and rng.random() < noise:
        missing = [(a, c) for a, c in COMPANION.items() if a in kinds and c not in kinds]
        taken = {o.cell for o in scene}
        if missing and len(taken) < 9:
            cue, comp = rng.choice(missing)
            start = next(o.cell for o in scene if o.kind == cue)
            cell = next((start + k) % 9 for k in range(1, 9) if (start + k) % 9 not in taken)
            mentions.append((cell, *comp))
    return mention_words(mentions)


def mention_words(mentions):
    """[(cell, colour, shape), ...] -> caption words, clauses in cell order."""
    clauses = [f"{CELLS[cell]} {col} {shp}" for cell, col, shp in sorted(mentions)]
    return " , ".join(clauses).split()


def parse_caption(words):
    """Caption words -> list of (colour, shape, cell or None); malformed clauses are skipped."""
    out = []
    for clause in " ".join(words).split(","):
        w = clause.split()
        if len(w) >= 2 and w[-2] in COLOURS and w[-1] in SHAPES:
            pos = " ".join(w[:-2])
            out.append((w[-2], w[-1], CELLS.index(pos) if pos in CELLS else None))
    return out


def hallucinated_mentions(scene, words):
    """How many object mentions of a caption are not in the scene (an object = colour + shape
    at its cell; a right object at a wrong cell counts as a hallucination too)."""
    truth = {(o.colour, o.shape, o.cell) for o in scene}
    return sum(m not in truth for m in parse_caption(words))


def clauses(words):
    """Caption words -> one clause (list of words) per mentioned object: DAMA's sub-sentences."""
    return [c.split() for c in " ".join(words).split(",") if c.split()]


# -----------------------------------------------------------------------------
# the judges of generated images (GenEval-style checks on the parsed image)

def relation_holds(a, b, rel, margin=2.0):
    """GenEval 'position': compare object centres with a margin (pixels)."""
    (xa, ya), (xb, yb) = centre(a), centre(b)
    return {"left of": xa < xb - margin, "right of": xa > xb + margin,
            "above": ya < yb - margin, "below": ya > yb + margin}[rel]


def prompt_checks(ex, parsed):
    """The checks a generated image (already parsed) must pass for its prompt, each True or False:
    the named objects, their colours, the count, the relation. GenEval's rules, split up so that
    a wrong image can be PARTLY right: the mean of the checks is the parser's score of a sample
    (it ranks generation preference pairs) and all pass exactly when `geneval_correct`.
    The checks read only the prompt's words and the image, never the scene the prompt came from.
    Extra objects are allowed, except that counting is exact and 'full' asks for the exact scene."""
    kinds = {o.kind for o in parsed}
    shapes = {o.shape for o in parsed}
    w = ex.question
    if ex.task == "full":
        want = {(cell, colour, shape) for colour, shape, cell in parse_caption(w)}
        got = {(o.cell, o.colour, o.shape) for o in parsed}
        return [m in got for m in sorted(want)] + [got <= want]
    if ex.task == "single":
        return [w[1] in shapes]
    if ex.task == "colours":
        return [w[2] in shapes, (w[1], w[2]) in kinds]
    if ex.task == "two":
        return [w[1] in shapes, w[4] in shapes]
    if ex.task == "attribution":
        return [w[2] in shapes, w[6] in shapes, (w[1], w[2]) in kinds, (w[5], w[6]) in kinds]
    if ex.task == "counting":
        shape = next(s for s, p in PLURAL.items() if p == w[2])
        n = sum(o.kind == (w[1], shape) for o in parsed)
        return [shape in shapes, (w[1], shape) in kinds, n == NUMBERS.index(w[0])]
    if ex.task == "position":
        A = [o for o in parsed if o.shape == w[1]]
        B = [o for o in parsed if o.shape == w[-1]]
        rel = " ".join(w[2:-2])
        return [bool(A), bool(B), any(relation_holds(a, b, rel) for a in A for b in B)]
    raise ValueError(f"unknown generation task {ex.task!r}")


def geneval_correct(ex, parsed):
    """Is a generated image (already parsed) correct for its prompt? Every check passes."""
    return all(prompt_checks(ex, parsed))


def prompt_score(ex, parsed):
    """The parser's score of a generated image: the fraction of the prompt's checks it passes."""
    checks = prompt_checks(ex, parsed)
    return sum(checks) / len(checks)


# -----------------------------------------------------------------------------
# training statistics of the co-occurrence bias (POPE's negatives, AMBER's Cog)

def training_statistics(n=5000, seed=0, cooc=None):
    """Measured on training scenes: how often each object kind appears, and how often each
    ordered pair of kinds appears together (POPE's popular / adversarial negatives, AMBER's Cog)."""
    rng = random.Random(seed)
    freq, pairs = Counter(), Counter()
    for _ in range(n):
        kinds = {o.kind for o in sample_scene(rng, "train", cooc=cooc)}
        freq.update(kinds)
        pairs.update((a, b) for a in kinds for b in kinds if a != b)
    return freq, pairs


def prone_kinds(scene, freq, pairs, lift=2.0):
    """The hallucination-prone absent kinds of a scene: absent objects that, in training, join
    some present object at least `lift` times as often as the other kinds join it on average
    (with COOC = 0.3 a companion joins its cue in ~35% of its scenes, the others ~13%)."""
    present = {o.kind for o in scene}
    prone = set()
    for a in present:
        if freq[a]:
            rate = {k: pairs[(a, k)] / freq[a] for k in TRAIN_KINDS if k != a}
            mean = sum(rate.values()) / len(rate)
            prone |= {k for k, r in rate.items() if k not in present and r >= lift * mean}
    return prone
