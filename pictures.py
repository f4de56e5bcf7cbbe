"""
The pictures of a run, drawn with Pillow alone and sized to be read at README width (800 px):

    eval_sft.png   held-out images with the model's captions, prompts with its drawings, and what
                   the judge found wrong in each (eval.py)
    compare.png    bias-breaking scenes: the SFT and the mDPO captions, wrong clauses marked (pref.py)
    curves.png     the preference runs' training curves, four panels (report.py)
    headline.png   bias CHAIR_i and Cover per method, the spread as whiskers (report.py, seeds.py)

Text is measured with the font and wrapped between words, never inside one; axes carry round tick
values (1, 2 or 5 x 10^k). The same inputs give the same bytes: nothing here reads the clock.
"""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import world

WIDTH, PAD, LINE = 800, 8, 16            # picture width, margin, text line height (pixels)
INK, GREY, RULE, WHITE = (25, 25, 25), (100, 100, 100), (215, 215, 215), (255, 255, 255)
RED, ORANGE, PURPLE, GREEN = (205, 30, 30), (200, 110, 0), (125, 50, 175), (30, 135, 60)
# a caption clause judged against its scene (clause_verdicts) -> its colour
VERDICT_COLOURS = {"right": INK, "hallucinated": RED, "wrong cell": ORANGE, "unparseable": PURPLE}
LEGEND = [("Clauses in", GREY), ("red", RED), ("are hallucinated (no object of that colour and shape in the scene:"
          " what CHAIR_i counts); in", GREY), ("orange", ORANGE), ("name an object of the scene at a wrong cell; in",
          GREY), ("purple", PURPLE), ("do not parse (the metrics skip them).", GREY), ("missing:", RED),
          ("kinds of object the caption never names (what Cover counts).", GREY)]
# the comparison's rows (pref.METHODS, pref.REMEDY_ROWS) as people read them
LABELS = {"sft": "SFT", "dpo": "DPO", "mdpo": "mDPO", "dama": "DAMA", "dpo_noimage": "DPO without images",
          "mdpo_nocond": "mDPO without cond. term", "mdpo_noanchor": "mDPO without anchor", "dpo + NLL": "DPO + NLL",
          "dpo + SFT mix": "DPO + SFT mix"}
CURVE_METHODS = {"dpo": (40, 90, 200), "mdpo": (210, 60, 40), "dama": (40, 150, 60)}   # drawn in curves.png
CURVE_ROW = "gen DPO"                    # the joint-study row whose generation DPO loss is drawn


def font(size):
    """Pillow's own font at `size` pixels; Pillow before 10.1 has only its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


FONT, SMALL, BIG = font(13), font(11), font(16)
_RULER = ImageDraw.Draw(Image.new("L", (1, 1)))


def text_width(s, fnt=FONT):
    return _RULER.textlength(s, font=fnt)


# -----------------------------------------------------------------------------
# text: wrapped between words, by the font's measure

def layout(paragraphs, width, fnt=FONT):
    """Flow paragraphs of coloured text into lines at most `width` pixels wide, broken only between
    words (a word wider than `width` gets a line of its own). paragraphs: [[(text, colour), ...], ...],
    each starting on a new line. Returns ([(x, line, word, colour)], number of lines)."""
    placed, line = [], -1
    for para in paragraphs:
        line, current = line + 1, ""
        for text, colour in para:
            for word in text.split():
                trial = current + " " + word if current else word
                if current and text_width(trial, fnt) > width:
                    line, current, trial = line + 1, "", word
                placed.append((text_width(current + " ", fnt) if current else 0, line, word, colour))
                current = trial
    return placed, line + 1


def wrap(text, width, fnt=FONT):
    """Plain text -> its lines, each at most `width` pixels wide, broken between words only."""
    placed, n = layout([[(text, INK)]], width, fnt)
    return [" ".join(w for _, ln, w, _ in placed if ln == k) for k in range(n)]


def draw_text(d, xy, paragraphs, width, fnt=FONT):
    """Draw the paragraphs at xy, wrapped to `width`; returns the height they take."""
    placed, n = layout(paragraphs, width, fnt)
    for x, line, word, colour in placed:
        d.text((xy[0] + x, xy[1] + line * LINE), word, fill=colour, font=fnt)
    return n * LINE


def words_text(words):
    """Caption or prompt words as text: 'top left red circle , a' -> 'top left red circle, a'."""
    return " ".join(words).replace(" ,", ",")


def objects_text(objs):
    return ", ".join(f"{world.CELLS[o.cell]} {o.colour} {o.shape}" for o in objs) or "nothing"


# -----------------------------------------------------------------------------
# what the judges found: in a caption, and in a drawing

def clause_verdicts(scene, words):
    """Each clause of a caption judged against its scene, as the metrics see it: [(clause words, verdict)],
    verdict 'right' (that object at that cell), 'hallucinated' (no object of that colour and shape in the
    scene: CHAIR_i), 'wrong cell' (there is one, elsewhere) or 'unparseable' (world.parse_caption skips it)."""
    truth, kinds = {(o.colour, o.shape, o.cell) for o in scene}, {o.kind for o in scene}
    out = []
    for clause in world.clauses(words):
        m = world.parse_caption(clause)
        out.append((clause, "unparseable" if not m else "right" if m[0] in truth
                    else "wrong cell" if m[0][:2] in kinds else "hallucinated"))
    return out


def missing_kinds(scene, words):
    """The kinds of object in the scene that the caption never names (Cover's misses), in scene order."""
    said = {(c, s) for c, s, _ in world.parse_caption(words)}
    return list(dict.fromkeys(o.kind for o in scene if o.kind not in said))


def caption_text(scene, words, who=None):
    """A caption as coloured paragraphs: its clauses coloured by verdict, then what is wrong."""
    verdicts = clause_verdicts(scene, words)
    said = [(" ".join(c) + ("," if k < len(verdicts) - 1 else ""), VERDICT_COLOURS[v])
            for k, (c, v) in enumerate(verdicts)]
    paras = [([(who + ":", GREY)] if who else []) + (said or [("(nothing)", GREY)])]
    for clause, v in verdicts:
        if v == "unparseable":
            paras.append([("unparseable: " + " ".join(clause), PURPLE)])
        elif v != "right":
            c, s, _ = world.parse_caption(clause)[0]
            where = ", ".join(world.CELLS[o.cell] for o in scene if o.kind == (c, s))
            paras.append([(f"{v}: {c} {s}" + (f" (it is at {where})" if where else ""), VERDICT_COLOURS[v])])
    missing = missing_kinds(scene, words)
    if missing:
        paras.append([("missing: " + ", ".join(f"{c} {s}" for c, s in missing), RED)])
    return paras


def check_phrases(ex, parsed):
    """One phrase per check of world.prompt_checks(ex, parsed), in its order, saying what its failure means;
    '' where that failure follows from an earlier one (no circle at all: no red circle is no news)."""
    w, shapes = ex.question, {o.shape for o in parsed}
    if ex.task == "full":
        want = sorted({(cell, colour, shape) for colour, shape, cell in world.parse_caption(w)})
        at = {o.cell: o for o in parsed}
        extra = [o for o in parsed if (o.cell, o.colour, o.shape) not in want]
        wrong = [f"at {world.CELLS[c]}: drew {at[c].colour} {at[c].shape}, prompt says {col} {shp}" if c in at
                 else f"missing: {world.CELLS[c]} {col} {shp}" for c, col, shp in want]
        return wrong + [f"extra: {objects_text(extra)}"]
    if ex.task in ("single", "two"):
        return [f"no {s}" for s in (w[1:2] if ex.task == "single" else (w[1], w[4]))]
    if ex.task in ("colours", "attribution"):
        kinds = [(w[1], w[2])] + ([(w[5], w[6])] if ex.task == "attribution" else [])
        return [f"no {s}" for _, s in kinds] + [f"no {c} {s}" if s in shapes else "" for c, s in kinds]
    if ex.task == "counting":
        shape = next(s for s, p in world.PLURAL.items() if p == w[2])
        n = sum(o.kind == (w[1], shape) for o in parsed)
        return [f"no {shape}", f"no {w[1]} {shape}" if shape in shapes else "",
                f"drew {n} {w[1]} {w[2]}, prompt says {w[0]}" if n else ""]
    if ex.task == "position":
        return [f"no {w[1]}", f"no {w[-1]}",
                f"the {w[1]} is not {' '.join(w[2:-2])} the {w[-1]}" if {w[1], w[-1]} <= shapes else ""]
    raise ValueError(f"unknown generation task {ex.task!r}")


def drawing_faults(ex, parsed):
    """What the judge found wrong with a drawing (already parsed): the phrases of its failed checks."""
    return [why for ok, why in zip(world.prompt_checks(ex, parsed), check_phrases(ex, parsed)) if not ok and why]


def drawing_text(ex, img):
    parsed = world.parse(img)
    faults = drawing_faults(ex, parsed)
    paras = [[(f"[{ex.task}]", GREY), (words_text(ex.question), INK)]]
    if not faults:
        return paras + [[("judge: correct", GREEN)]]
    return paras + [[("judge: wrong: " + "; ".join(faults), RED)], [("the judge sees: " + objects_text(parsed), GREY)]]


# -----------------------------------------------------------------------------
# cards: an image with its text beside it, two to a row

def card_grid(path, title, notes, sections, side, cols=2):
    """A PNG: the title, note paragraphs, then each section's heading and its cards [(image, paragraphs)]
    in `cols` columns, each an image `side` pixels wide with its text to the right."""
    col_w = (WIDTH - PAD * (cols + 1)) // cols
    text_w = col_w - side - PAD
    heights = [[max(side, layout(p, text_w)[1] * LINE) for _, p in cards] for _, cards in sections]
    top = PAD + LINE + 6 + layout(notes, WIDTH - 2 * PAD, SMALL)[1] * LINE + 4
    rows = [[max(h[k:k + cols]) for k in range(0, len(h), cols)] for h in heights]
    height = top + sum((LINE + 6 if head else 0) + sum(r) + PAD * len(r) for (head, _), r in zip(sections, rows)) + PAD
    canvas = Image.new("RGB", (WIDTH, height), WHITE)
    d = ImageDraw.Draw(canvas)
    d.text((PAD, PAD), title, fill=INK, font=BIG)
    draw_text(d, (PAD, PAD + LINE + 6), notes, WIDTH - 2 * PAD, SMALL)
    y = top
    for (head, cards), row_h in zip(sections, rows):
        if head:
            d.line((PAD, y + 2, WIDTH - PAD, y + 2), fill=RULE)
            d.text((PAD, y + 4), head, fill=GREY, font=FONT)
            y += LINE + 6
        for k, (img, paras) in enumerate(cards):
            x = PAD + (k % cols) * (col_w + PAD)
            canvas.paste(Image.fromarray(img).resize((side, side), Image.NEAREST), (x, y))
            draw_text(d, (x + side + PAD, y), paras, text_w)
            if k % cols == cols - 1 or k == len(cards) - 1:
                y += row_h[k // cols] + PAD
    canvas.save(path)


def eval_picture(path, caption_groups, drawings, scale=3):
    """eval_sft.png: held-out images with the model's captions, then prompts with the model's drawings,
    each with what the judge found. caption_groups: [(heading, [(example, predicted words)])];
    drawings: [(example, (H, W, 3) uint8 image)]."""
    sections = [(head, [(world.render(ex.scene), caption_text(ex.scene, pred)) for ex, pred in samples])
                for head, samples in caption_groups]
    sections.append(("Drawings for held-out prompts (greedy), judged by the exact image parser",
                     [(img, drawing_text(ex, img)) for ex, img in drawings]))
    notes = [LEGEND, [("A drawing passes if every check of its prompt holds (GenEval's rules);", GREY),
                      ("red", RED), ("says which failed.", GREY)]]
    card_grid(path, "Held-out images with the model's captions, prompts with its drawings", notes, sections,
              world.CANVAS * scale)


def compare_picture(path, sft_samples, pref_samples, name="mDPO", scale=4):
    """compare.png: bias-breaking scenes with the SFT and the preference-trained captions, each clause
    coloured by what the judge found. *_samples: [(scene, predicted words)], the same scenes in order."""
    cards = [(world.render(scene), caption_text(scene, a, "SFT") + caption_text(scene, b, name))
             for (scene, a), (_, b) in zip(sft_samples, pref_samples)]
    card_grid(path, f"Bias-breaking scenes (a cue object without its companion): SFT's and {name}'s captions",
              [LEGEND], [("", cards)], world.CANVAS * scale)


# -----------------------------------------------------------------------------
# charts: round ticks, labelled axes, a legend

def nice_ticks(lo, hi, n=5):
    """Round tick values spanning [lo, hi], spaced 1, 2 or 5 x 10^k, whichever is nearest (in ratio) to
    (hi - lo) / n; the axis runs from the first to the last. A bound within a millionth of a step of a
    tick is on it (-4.8e-08 is 0)."""
    lo, hi = float(lo), float(hi)
    if hi - lo < 1e-12:                                         # a flat line: a range around it
        pad = abs(lo) / 10 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / n
    k = math.floor(math.log10(raw))
    step = min((m * 10.0 ** k for m in (1, 2, 5, 10)), key=lambda s: abs(math.log(s / raw)))
    digits = max(0, -math.floor(math.log10(step) + 1e-9))     # the decimals a tick needs, no more
    first, last = math.floor(lo / step + 1e-6), math.ceil(hi / step - 1e-6)
    return [round(i * step, digits) for i in range(first, last + 1)]


def tick_label(v, ticks):
    """A tick value in the decimals the ticks' spacing needs, trailing zeros dropped: 0.25, 20, 0.0005,
    never 1e-05 or -0."""
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    s = f"{v:.{max(0, -math.floor(math.log10(step) + 1e-9))}f}"
    s = s.rstrip("0").rstrip(".") if "." in s else s
    return "0" if s == "-0" else s


def vertical_text(canvas, xy, text, fill, fnt=FONT):
    """Text turned to read upwards, its top-left corner at xy: an axis title on the left."""
    im = Image.new("L", (int(text_width(text, fnt)) + 2, LINE), 0)
    ImageDraw.Draw(im).text((0, 0), text, fill=255, font=fnt)
    im = im.rotate(90, expand=True)
    canvas.paste(fill, (xy[0], xy[1], xy[0] + im.width, xy[1] + im.height), im)


def legend(d, xy, items):
    """A row of legend entries [(label, colour, dashed)] at xy, each a short line then its label."""
    x, y = xy
    for label, colour, dashed in items:
        for a in range(0, 18, 6 if dashed else 18):
            d.line((x + a, y + 7, x + a + (3 if dashed else 18), y + 7), fill=colour, width=2)
        d.text((x + 22, y), label, fill=INK, font=SMALL)
        x += 22 + text_width(label, SMALL) + 14


def line_chart(canvas, box, title, y_title, series, reference=None):
    """One panel in box (x0, y0, x1, y1): series [(label, colour, [(x, y), ...])], and an optional
    reference line (label, y), dashed. Axes: x is the step, y is y_title."""
    d = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = box
    px0, py0, px1, py1 = x0 + 62, y0 + 2 * LINE + 10, x1 - 14, y1 - 2 * LINE - 6   # the plot area
    xs = [x for _, _, s in series for x, _ in s]
    ys = [y for _, _, s in series for _, y in s] + ([reference[1]] if reference else [])
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    X = lambda x: px0 + (x - xt[0]) / (xt[-1] - xt[0]) * (px1 - px0)     # noqa: E731
    Y = lambda y: py1 - (y - yt[0]) / (yt[-1] - yt[0]) * (py1 - py0)     # noqa: E731
    d.text((x0 + 10, y0 + 4), title, fill=INK, font=FONT)
    legend(d, (px0, y0 + LINE + 6), [(lab, col, False) for lab, col, _ in series]
           + ([(reference[0], GREY, True)] if reference else []))
    for v in yt:
        d.line((px0, Y(v), px1, Y(v)), fill=RULE)
        d.text((px0 - 6 - text_width(tick_label(v, yt), SMALL), Y(v) - 7), tick_label(v, yt), fill=GREY, font=SMALL)
    for v in xt:
        d.line((X(v), py1, X(v), py1 + 4), fill=GREY)
        d.text((X(v) - text_width(tick_label(v, xt), SMALL) / 2, py1 + 6), tick_label(v, xt), fill=GREY, font=SMALL)
    d.rectangle((px0, py0, px1, py1), outline=GREY)
    d.text(((px0 + px1 - text_width("step")) / 2, py1 + LINE + 4), "step", fill=INK, font=FONT)
    vertical_text(canvas, (x0 + 6, int((py0 + py1 - text_width(y_title)) / 2)), y_title, INK)
    if reference:
        for x in range(int(px0), int(px1), 8):
            d.line((x, Y(reference[1]), min(x + 4, px1), Y(reference[1])), fill=GREY, width=2)
    for _, colour, s in series:
        d.line([(X(x), Y(y)) for x, y in s], fill=colour, width=2)


def smooth(points, k=10):
    """The running mean over the last k points: one step's log-probs are one batch's, and noisy."""
    ys = np.cumsum([y for _, y in points])
    return [(x, (ys[i] - (ys[i - k] if i >= k else 0)) / min(i + 1, k)) for i, (x, _) in enumerate(points)]


def curves(path, pref_curves, joint_curves):
    """curves.png: the understanding preference runs (seed 0) of DPO, mDPO and DAMA: logps/chosen,
    logps/rejected (summed over the response) and rewards/margins per step; and the joint study's
    generation DPO row (seed 0): its plain DPO loss per step against ln 2, its value while the policy
    equals the reference. Every curve is a running mean of 10 steps."""
    methods = [m for m in CURVE_METHODS if m in pref_curves]
    panels = [(title, key, [(LABELS[m], CURVE_METHODS[m], smooth([(h["step"], h[key]) for h in pref_curves[m][0]]))
                            for m in methods], None)
              for title, key in (("log-prob of the chosen caption", "logps/chosen"),
                                 ("log-prob of the rejected caption", "logps/rejected"),
                                 ("reward margin, chosen minus rejected", "rewards/margins"))]
    if CURVE_ROW in joint_curves:
        gen = smooth([(h["step"], h["dpo_loss"]) for h in joint_curves[CURVE_ROW][0]["gen"]])
        panels.append(("generation DPO loss, joint study", "DPO loss", [("gen DPO", (120, 40, 160), gen)],
                       ("ln 2: policy = reference", math.log(2))))
    panels = [p for p in panels if any(s for _, _, s in p[2])]
    w, h, top = WIDTH // 2, 270, PAD + LINE + 10
    canvas = Image.new("RGB", (WIDTH, top + h * ((len(panels) + 1) // 2)), WHITE)
    ImageDraw.Draw(canvas).text((PAD, PAD), "Preference training, seed 0: every curve a running mean of 10 steps",
                                fill=INK, font=BIG)
    for k, (title, y_title, series, reference) in enumerate(panels):
        x0, y0 = (k % 2) * w, top + (k // 2) * h
        line_chart(canvas, (x0, y0, x0 + w, y0 + h), title, y_title, [s for s in series if s[2]], reference)
    canvas.save(path)


# -----------------------------------------------------------------------------
# the headline: hallucination and coverage per method

HEADLINE_METRICS = (("CHAIR_i", "bias CHAIR_i (lower is better)", "named objects not in the scene"),
                    ("Cover", "bias Cover (higher is better)", "kinds of object in the scene named"))


def headline(path, units, whiskers):
    """headline.png: bias CHAIR_i and bias Cover per comparison row, side by side. units: {row: [[results of
    one unit], ...]}, a unit being a preference seed or an SFT model, a result a compare.json row. A bar is
    the mean over all of a row's results (the tables' number); its whiskers run from the lowest to the
    highest unit mean, where it has several units. `whiskers` says what the units are."""
    stats = {row: {key: (float(np.mean([r["bias"][key] for u in us for r in u])),
                         [float(np.mean([r["bias"][key] for r in u])) for u in us]) for key, _, _ in HEADLINE_METRICS}
             for row, us in units.items()}
    labels = {row: LABELS.get(row.split(" (")[0], row) for row in units}
    label_w = int(max(text_width(s) for s in labels.values())) + 2 * PAD
    notes = [[(f"Bars: the mean over all runs, as in the report's tables; {whiskers}. Dashed: SFT's value.", GREY)]]
    top = PAD + LINE + 6 + layout(notes, WIDTH - 2 * PAD, SMALL)[1] * LINE + LINE + 8
    row_h, panel_w = 22, (WIDTH - label_w - 6 * PAD) // 2
    canvas = Image.new("RGB", (WIDTH, top + row_h * len(units) + 2 * LINE + 16), WHITE)
    d = ImageDraw.Draw(canvas)
    d.text((PAD, PAD), "Hallucination and coverage on bias-breaking scenes, per method", fill=INK, font=BIG)
    draw_text(d, (PAD, PAD + LINE + 6), notes, WIDTH - 2 * PAD, SMALL)
    for i, row in enumerate(units):
        d.text((PAD, top + i * row_h + 3), labels[row], fill=INK, font=FONT)
    for k, (key, title, axis) in enumerate(HEADLINE_METRICS):
        px0 = label_w + k * (panel_w + 5 * PAD)
        ticks = nice_ticks(0, max(max(m, *us) for m, us in (s[key] for s in stats.values())), n=4)
        X = lambda v: px0 + v / ticks[-1] * panel_w                      # noqa: E731
        py1 = top + row_h * len(units)
        d.text((px0, top - LINE - 4), title, fill=INK, font=FONT)
        for v in ticks:
            d.line((X(v), top - 2, X(v), py1), fill=RULE)
            s = tick_label(v, ticks)
            d.text((X(v) - text_width(s, SMALL) / 2, py1 + 4), s, fill=GREY, font=SMALL)
        d.text((px0 + (panel_w - text_width(axis)) / 2, py1 + LINE + 4), axis, fill=INK, font=FONT)
        for i, row in enumerate(units):
            mean, us = stats[row][key]
            y = top + i * row_h + 4
            d.rectangle((X(0), y, X(mean), y + row_h - 8), fill=(150, 150, 150) if row == "sft" else (70, 110, 200))
            right = X(max([mean] + us))
            if len(us) > 1:
                d.line((X(min(us)), y + 7, right, y + 7), fill=INK, width=2)
                for v in (min(us), max(us)):
                    d.line((X(v), y + 2, X(v), y + 12), fill=INK, width=2)
            s = f"{mean:.3f}"
            inside = right + 4 + text_width(s, SMALL) > px0 + panel_w
            d.text((X(mean) - 4 - text_width(s, SMALL) if inside else right + 4, y + 1), s,
                   fill=WHITE if inside else INK, font=SMALL)
        if "sft" in stats:
            for yy in range(top - 2, py1, 6):
                d.line((X(stats["sft"][key][0]), yy, X(stats["sft"][key][0]), yy + 3), fill=INK)
    canvas.save(path)
