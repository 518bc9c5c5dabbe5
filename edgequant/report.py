"""`edgequant build --report FILE.html`: the build summary as one self-contained page (inline SVG, no script, no
external resources), so it can be archived or mailed and opens the same anywhere.

    header            model, target, method, size, bits/weight, time per phase, peak memory
    types             per tensor type: tensors, parameters, MiB, bits/weight
    type map          the recipe: decoder layers (rows) x tensor kinds (columns), each cell colored by its type
    frontier          a size-budgeted build's: predicted KLD against file size, llama.cpp's ftypes marked
    loss per tensor   GPTQ's calibration loss next to the importance-weighted fit's (log scale), for every GPTQ tensor

It renders the dict of edgequant.commands.build.summary, i.e. exactly what --json prints.
"""

from __future__ import annotations

import math
from html import escape

import gguf

from .model import layer_of

# Colors by rank of bits/weight, fewest bits first (viridis stops; readable for the usual color vision deficiencies).
PALETTE = ["#440154", "#482878", "#3e4a89", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"]
FLOAT_COLOR = "#d0d0d0"
KIND_ORDER = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: right; } th { border-bottom: 1px solid #888; }
td:first-child, th:first-child { text-align: left; } .muted { color: #666; }
td.fit { background: #f6d8c8; }
svg text { font: 11px system-ui, sans-serif; }
"""


def bits_per_weight(qtype_name: str) -> float:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype_name]]
    return 8 * size / block


def render(s: dict, title: str) -> str:
    """The page for summary `s`; `title` names the build (model -> target)."""
    colors = type_colors(s["types"])
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{escape(title)}</h1>", header(s),
             "<h2>Tensor types</h2>", types_table(s, colors),
             "<h2>Type map (the recipe)</h2>" if "allocation" not in s else "<h2>Type map (the allocation)</h2>",
             type_map(s["recipe"], colors)]
    if "allocation" in s:
        a = s["allocation"]
        parts += ["<h2>Size and predicted quality</h2>",
                  f"<p class='muted'>{escape(a['what'])}: {a['file_bytes']:,} of {a['budget']:,} bytes. The predicted KLD "
                  "is edgequant.sensitivity's estimate for the importance-weighted fit on each type (GPTQ then lowers "
                  "the errors); the line is the best allocation at each size, the squares llama.cpp's recipes on the "
                  "same estimate.</p>", frontier_chart(a, s["params"])]
        if "speed" in a:
            from .commands.build import speed_line

            parts += ["<h2>Predicted speed in llama.cpp</h2>",
                      f"<p>{escape(speed_line(a['speed']))}.</p>",
                      "<p class='muted'>Each type's compute cost per weight, measured on the building machine "
                      f"through libggml's CPU backend ({escape(a['speed']['compute_cost']['source'])}); speeds are "
                      "the reference recipe's summed time over the file's, weights only.</p>"]
    if s["gptq"]:
        parts += ["<h2>Calibration loss per tensor: GPTQ vs importance-weighted fit</h2>",
                  "<p class='muted'>½·tr(E H Eᵀ), E = W − Ŵ, H = 2XᵀX over the calibration activations; the fit is "
                  "what llama-quantize --imatrix would write. Lower is better; the ratio is GPTQ / fit.</p>",
                  loss_chart(s["gptq"])]
        if any("experts" in e for e in s["gptq"].values()):
            parts += ["<h2>Experts: calibration tokens and what was solved</h2>",
                      "<p class='muted'>Tokens routed to each expert (of every calibration token's top-k), per expert "
                      "tensor; shaded: too few tokens for its Hessian, so the importance-weighted fit was written "
                      "(what --method imatrix writes); otherwise GPTQ, each row kept only where it beats that fit "
                      "(hover: rows kept).</p>", experts_table(s["gptq"])]
    return "\n".join(parts + ["</body></html>\n"])


def experts_table(gptq: dict[str, dict]) -> str:
    stacks = {name: e["experts"] for name, e in gptq.items() if "experts" in e}
    n = max(len(x) for x in stacks.values())
    head = "".join(f"<th>{i}</th>" for i in range(n))
    rows = "".join(
        f"<tr><td>{escape(name)}</td>" + "".join(
            f"<td class='{'fit' if x['solve'] == 'fit' else 'gptq'}' title='{x['solve']}, {x['gptq_rows']} GPTQ rows'>"
            f"{x['tokens']:,}</td>" for x in experts) + "</tr>"
        for name, experts in sorted(stacks.items(), key=lambda kv: (int(kv[0].split('.')[1]), kv[0])))
    return f"<table><tr><th>tensor \\ expert</th>{head}</tr>{rows}</table>"


def describe_calibration(parts: list[dict]) -> str:
    """The calibration sources of a build's summary, for people."""
    out = []
    for p in parts:
        text = f"{p['windows']} windows of {p['source']}"
        if p["source"] == "self":
            chat = f", {p['chat_windows']} of them chats" if p.get("chat_windows") else ""
            text += f" (sampled from the model: {p['sampling']}{chat}, {p['seconds']:.1f} s)"
        out.append(text)
    return " + ".join(out)


def header(s: dict) -> str:
    phases = ", ".join(f"{escape(k)} {v:.1f} s" for k, v in s["seconds"].items())
    memory = ", ".join(f"{v / 2**30:.2f} GiB {escape(k.removesuffix('_bytes').upper())}" for k, v in s["peak_memory"].items())
    return (f"<p>{escape(s['output'])}: {s['file_bytes'] / 2**20:.2f} MiB, {s['tensors']} tensors, "
            f"{s['params']:,} parameters, <b>{s['bits_per_weight']:.3f} bits/weight</b><br>"
            f"time: {phases} (total {sum(s['seconds'].values()):.1f} s); peak memory: {memory}"
            + (f"<br>calibration: {escape(describe_calibration(s['calibration']))}" if s.get("calibration") else "")
            + "</p>")


def type_colors(types: dict) -> dict[str, str]:
    quantized = sorted((t for t in types if t not in ("F32", "F16", "BF16")), key=bits_per_weight)
    step = (len(PALETTE) - 1) / max(len(quantized) - 1, 1)
    colors = {t: PALETTE[round(i * step)] for i, t in enumerate(quantized)}
    return {t: colors.get(t, FLOAT_COLOR) for t in types}


def swatch(color: str) -> str:
    return f"<svg width='12' height='12'><rect width='12' height='12' fill='{color}'/></svg>"


def types_table(s: dict, colors: dict[str, str]) -> str:
    rows = "".join(f"<tr><td>{swatch(colors[t])} {escape(t)}</td><td>{e['tensors']}</td><td>{e['params']:,}</td>"
                   f"<td>{e['bytes'] / 2**20:.2f}</td><td>{8 * e['bytes'] / e['params']:.3f}</td></tr>"
                   for t, e in sorted(s["types"].items(), key=lambda kv: bits_per_weight(kv[0])))
    return f"<table><tr><th>type</th><th>tensors</th><th>params</th><th>MiB</th><th>bits/weight</th></tr>{rows}</table>"


def type_map(recipe: dict[str, str], colors: dict[str, str]) -> str:
    """Rows: decoder layers, then one row per tensor outside them; columns: tensor kinds in the order data flows."""
    rows: dict[str, dict[str, str]] = {}
    for name, qtype in recipe.items():
        i = layer_of(name)
        short = name.removesuffix(".weight")
        if i is None:
            rows[short] = {"": qtype}
        else:
            rows.setdefault(f"blk.{i}", {})[short.split(".", 2)[2]] = qtype
    rows = dict(sorted(rows.items(), key=lambda kv: layer_of(kv[0] + ".") is None))  # layers first, stable
    kinds = sorted({k for cells in rows.values() for k in cells if k}, key=kind_order)
    cw, ch, left, top = 80, 18, 100, 20
    out = [svg_open(left + cw * max(len(kinds), 1) + 10, top + ch * len(rows) + 10,
                    "type map: layers by tensor kinds, colored by type")]
    for j, kind in enumerate(kinds):
        out.append(f"<text x='{left + cw * j + cw / 2}' y='{top - 6}' text-anchor='middle'>{escape(kind)}</text>")
    for r, (row, cells) in enumerate(rows.items()):
        y = top + ch * r
        out.append(f"<text x='{left - 6}' y='{y + 13}' text-anchor='end'>{escape(row)}</text>")
        for kind, qtype in cells.items():
            x = left + cw * (kinds.index(kind) if kind else 0)
            out.append(f"<rect x='{x}' y='{y}' width='{cw - 2}' height='{ch - 2}' fill='{colors[qtype]}'>"
                       f"<title>{escape(row)} {escape(kind)}: {escape(qtype)}</title></rect>"
                       f"<text x='{x + cw / 2 - 1}' y='{y + 12}' text-anchor='middle' "
                       f"fill='{'#fff' if colors[qtype] in PALETTE[:5] else '#000'}'>{escape(qtype)}</text>")
    out.append("</svg>")
    return "".join(out)


def kind_order(kind: str) -> tuple[int, str]:
    base = kind.split(".")[0]
    return (KIND_ORDER.index(base) if base in KIND_ORDER else len(KIND_ORDER), kind)


def loss_chart(losses: dict[str, dict]) -> str:
    """One row per tensor: the fit's loss (grey) and GPTQ's (blue) on a shared log axis, joined by a line."""
    values = [v for e in losses.values() for v in (e["gptq_loss"], e["fit_loss"]) if v > 0]
    if not values:
        return "<p>no positive losses to plot</p>"
    lo, hi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
    hi = max(hi, lo + 1)
    left, right, top, rh, plot_w = 190, 70, 24, 14, 760
    height = top + rh * len(losses) + 30

    def x(v: float) -> float:
        return left + plot_w * (math.log10(max(v, 10.0**lo)) - lo) / (hi - lo)

    out = [svg_open(left + plot_w + right, height, "calibration loss per tensor, GPTQ and importance-weighted fit")]
    axis_y = top + rh * len(losses) + 4
    for p in range(lo, hi + 1):
        out.append(f"<line x1='{x(10.0**p)}' y1='{top - 4}' x2='{x(10.0**p)}' y2='{axis_y}' stroke='#e4e4e4'/>"
                   f"<text x='{x(10.0**p)}' y='{axis_y + 14}' text-anchor='middle'>1e{p}</text>")
    out.append(f"<circle cx='{left}' cy='8' r='4' fill='#999'/><text x='{left + 8}' y='12'>importance-weighted fit</text>"
               f"<circle cx='{left + 170}' cy='8' r='4' fill='#1f5fbf'/><text x='{left + 178}' y='12'>GPTQ</text>"
               f"<text x='{left + plot_w + 8}' y='12'>GPTQ / fit</text>")
    for r, (name, e) in enumerate(losses.items()):
        y = top + rh * r + rh / 2
        g, f = e["gptq_loss"], e["fit_loss"]
        ratio = f"{g / f:.3f}" if f > 0 else "-"
        out.append(f"<g><title>{escape(name)}: GPTQ {g:.4g}, fit {f:.4g}, ratio {ratio}</title>"
                   f"<text x='{left - 8}' y='{y + 4}' text-anchor='end'>{escape(name.removesuffix('.weight'))}</text>"
                   f"<line x1='{x(g)}' y1='{y}' x2='{x(f)}' y2='{y}' stroke='#bbb' stroke-width='2'/>"
                   f"<circle cx='{x(f)}' cy='{y}' r='4' fill='#999'/><circle cx='{x(g)}' cy='{y}' r='4' fill='#1f5fbf'/>"
                   f"<text x='{left + plot_w + 8}' y='{y + 4}'>{ratio}</text></g>")
    out.append("</svg>")
    return "".join(out)


def frontier_chart(a: dict, params: int) -> str:
    """Predicted KLD (log) against bits per weight of the file: the frontier, the ftypes, this build."""
    ftypes = {f: (8 * b / params, k) for f, (b, k) in a["ftypes"].items() if k > 0}
    here = (8 * a["file_bytes"] / params, a["predicted_kld"])
    # up to a bit past the largest ftype or this build: beyond, the curve falls to F16's almost nothing
    right = max([here[0], *(p[0] for p in ftypes.values())]) + 1
    points = [(8 * b / params, k) for b, k in a["frontier"] if k > 0 and 8 * b / params <= right]
    everything = points + list(ftypes.values()) + ([here] if here[1] > 0 else [])
    if not everything:
        return "<p>nothing to plot</p>"
    x0, x1 = min(p[0] for p in everything), max(p[0] for p in everything)
    lo = math.floor(math.log10(min(p[1] for p in everything)))
    hi = max(math.ceil(math.log10(max(p[1] for p in everything))), lo + 1)
    left, top, w, h = 60, 20, 700, 320

    def x(v: float) -> float:
        return left + w * (v - x0) / max(x1 - x0, 1e-9)

    def y(v: float) -> float:
        return top + h * (hi - math.log10(max(v, 10.0**lo))) / (hi - lo)

    out = [svg_open(left + w + 40, top + h + 40, "predicted KLD against bits per weight")]
    for e in range(lo, hi + 1):
        out.append(f"<line x1='{left}' y1='{y(10.0**e)}' x2='{left + w}' y2='{y(10.0**e)}' stroke='#e4e4e4'/>"
                   f"<text x='{left - 6}' y='{y(10.0**e) + 4}' text-anchor='end'>1e{e}</text>")
    for b in range(math.ceil(x0), math.floor(x1) + 1):
        out.append(f"<text x='{x(b)}' y='{top + h + 16}' text-anchor='middle'>{b}</text>")
    out.append(f"<text x='{left + w / 2}' y='{top + h + 34}' text-anchor='middle'>bits per weight (file)</text>")
    out.append("<polyline fill='none' stroke='#1f5fbf' stroke-width='2' points='"
               + " ".join(f"{x(a_):.1f},{y(b_):.1f}" for a_, b_ in points) + "'/>")
    for i, (f, (a_, b_)) in enumerate(sorted(ftypes.items(), key=lambda t: t[1][0])):
        dy = -8 if i % 2 else 16  # neighbours' labels above and below
        out.append(f"<g><title>{escape(f)}: {a_:.3f} bits/weight, predicted KLD {b_:.4g}</title>"
                   f"<rect x='{x(a_) - 4}' y='{y(b_) - 4}' width='8' height='8' fill='#999'/>"
                   f"<text x='{x(a_) + 2}' y='{y(b_) + dy}'>{escape(f)}</text></g>")
    if here[1] > 0:
        out.append(f"<g><title>this build: {here[0]:.3f} bits/weight, predicted KLD {here[1]:.4g}</title>"
                   f"<circle cx='{x(here[0])}' cy='{y(here[1])}' r='6' fill='#e4572e'/></g>")
    out.append("</svg>")
    return "".join(out)


def svg_open(width: float, height: float, label: str) -> str:
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width:.0f}' height='{height:.0f}' "
            f"viewBox='0 0 {width:.0f} {height:.0f}' role='img' aria-label='{escape(label)}'>")
