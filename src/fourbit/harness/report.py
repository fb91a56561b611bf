"""Report files of the harness: the labelled same-seed grid (PNG) and a self-contained HTML page.

What the report must not overstate (shared with the CLI table, ``compare.format_table``):
- FD from fewer than ``FD_MIN_SAMPLES`` samples per set is marked unreliable and not plotted;
- PSNR of identical images is +inf, averaged as a cap (``PSNR_CAP_DB``): the cap and the count are stated;
- timings name the device; a quantized variant on the reference kernel is a plain-torch emulation, not a speed.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..data.png import image_grid, write_png
from .font import GLYPH_H, fit, render_text, text_width

# Two disjoint sets of 250 real Fashion-MNIST images are ~175 apart in FD-Alex (docs/metrics.md): below ~1000
# samples per set the estimate's bias swamps the differences between variants.
FD_MIN_SAMPLES = 1000
_SCALE = 2  # grid images are upscaled 2x
_ROW_FONT, _COL_FONT = 2, 1  # label font scales: variant names, column labels


def variant_rows(images: dict[str, torch.Tensor], scale: int = _SCALE) -> dict[str, torch.Tensor]:
    """One uint8 strip (H, W) per variant: its first images side by side, upscaled ``scale``x."""
    rows = {}
    for name, imgs in images.items():
        strip = image_grid(imgs, nrow=imgs.shape[0])  # (H + 4, n * (W + 2) + 2) uint8
        rows[name] = strip.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return rows


def labelled_grid(images: dict[str, torch.Tensor], column_labels: Optional[Sequence[str]] = None,
                  corner: str = "") -> torch.Tensor:
    """uint8 (H, W) picture (or (H, W, 3) for colour strips): one row per variant with its name on the left,
    ``column_labels`` above the columns."""
    strips = variant_rows(images)
    names = list(strips)
    label_w = max(text_width(n, _ROW_FONT) for n in names) + 12
    strip_w = max(s.shape[1] for s in strips.values())
    header_h = GLYPH_H * _COL_FONT + 8 if column_labels or corner else 0
    rows_h = sum(s.shape[0] for s in strips.values())
    colour = next(iter(strips.values())).ndim == 3  # (H, W, 3) strips
    canvas = torch.full((header_h + rows_h, label_w + strip_w) + ((3,) if colour else ()), 255, dtype=torch.uint8)

    def text(s: str, scale: int) -> torch.Tensor:  # (h, w) or (h, w, 3), as the canvas
        t = render_text(s, scale)
        return t.unsqueeze(-1).expand(*t.shape, 3) if colour else t

    n_img = next(iter(images.values())).shape[0]  # images: (N, C, H, W) per variant
    img_w = next(iter(images.values())).shape[-1]
    cell = (img_w + 2) * _SCALE  # one image plus its padding, upscaled
    if corner:
        t = text(fit(corner, label_w - 6, _COL_FONT), _COL_FONT)
        canvas[4:4 + t.shape[0], label_w - 6 - t.shape[1]:label_w - 6] = t
    for k, lab in enumerate((column_labels or [])[:n_img]):
        t = text(fit(str(lab), cell - 2, _COL_FONT), _COL_FONT)
        x = label_w + 2 * _SCALE + k * cell + max(0, (cell - 2 * _SCALE - t.shape[1]) // 2)
        canvas[4:4 + t.shape[0], x:x + t.shape[1]] = t
    y = header_h
    for name in names:
        s = strips[name]
        canvas[y:y + s.shape[0], label_w:label_w + s.shape[1]] = s
        t = text(name, _ROW_FONT)
        ty = y + (s.shape[0] - t.shape[0]) // 2
        canvas[ty:ty + t.shape[0], label_w - 6 - t.shape[1]:label_w - 6] = t
        y += s.shape[0]
    return canvas


def write_grid(path: Path, images: dict[str, torch.Tensor], column_labels: Optional[Sequence[str]] = None,
               corner: str = "") -> None:
    """grid.png: one labelled row per variant (in the order given, as in the report), same seeds per column."""
    write_png(path, labelled_grid(images, column_labels, corner))


def _nice_ticks(vmax: float, n: int = 4) -> list[float]:
    """0 and round steps (1, 2, 2.5 or 5 x 10^k) up to at least ``vmax``."""
    if not vmax > 0:
        return [0.0, 1.0]
    raw = vmax / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(math.ceil(vmax / step - 1e-9)) + 1)]


def _bar_svg(title: str, items: list[tuple[str, float, float, float]], width: int = 640) -> str:
    """Horizontal bars with an axis and 95% interval whiskers: items = (label, value, lo, hi).

    Labels sit left of the axis, each value right of its bar's whisker, so a whisker never crosses text."""
    items = [(n, v, lo, hi) for n, v, lo, hi in items if v is not None and v == v and math.isfinite(v)]
    if not items:
        return ""
    ticks = _nice_ticks(max(max(hi, v) for _, v, _, hi in items))
    vmax = ticks[-1]
    left = min(260, 16 + 7 * max(len(n) for n, *_ in items))
    bar_w, h = width - left - 70, 22
    top = 28
    height = top + h * len(items) + 30

    def x(v: float) -> float:
        return left + bar_w * max(0.0, v) / vmax

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">',
           f'<text x="4" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    axis_y = top + h * len(items) + 2
    for t in ticks:  # grid lines, tick labels
        out.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{top}" y2="{axis_y}" stroke="#ddd"/>')
        out.append(f'<text x="{x(t):.1f}" y="{axis_y + 14}" font-size="11" text-anchor="middle">{t:g}</text>')
    out.append(f'<line x1="{left}" x2="{left + bar_w}" y1="{axis_y}" y2="{axis_y}" stroke="#000"/>')
    out.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{axis_y}" stroke="#000"/>')
    for i, (name, v, lo, hi) in enumerate(items):
        y = top + i * h
        out.append(f'<text x="{left - 6}" y="{y + 15}" font-size="12" text-anchor="end">{html.escape(name)}</text>')
        out.append(f'<rect x="{left}" y="{y + 4}" width="{x(v) - left:.1f}" height="{h - 8}" fill="#8fb0dc"/>')
        x0, x1, ym = x(lo), x(hi), y + h / 2
        out.append(f'<path d="M{x0:.1f} {ym - 4}v8M{x0:.1f} {ym}H{x1:.1f}M{x1:.1f} {ym - 4}v8" stroke="#000"/>')
        out.append(f'<text x="{max(x(v), x1) + 5:.1f}" y="{y + 15}" font-size="11">{v:.3f}</text>')
    out.append("</svg>")
    return "".join(out)


def fd_reliable(m: Optional[dict]) -> bool:
    """True when both sets of an FD entry have at least ``FD_MIN_SAMPLES`` samples."""
    return bool(m) and min(m.get("n_a", 0), m.get("n_b", 0)) >= FD_MIN_SAMPLES


def fd_text(m: Optional[dict]) -> str:
    if not m or m.get("value") is None:
        return "n/a"
    s = _ci(m, "value")
    return s if fd_reliable(m) else f"{s} (unreliable: n = {min(m['n_a'], m['n_b'])} < {FD_MIN_SAMPLES})"


def psnr_text(m: Optional[dict], digits: int = 2) -> str:
    """PSNR with its interval; identical pairs (+inf) are named, and the cap they are averaged at is stated."""
    if not m:
        return "n/a"
    n_inf, n = m.get("n_inf", 0), m.get("n", 0)
    if n and n_inf == n:
        return "identical (inf)"
    s = f"{m['mean']:.{digits}f} [{m['lo']:.{digits}f}, {m['hi']:.{digits}f}]"
    return s if not n_inf else f"{s}, {n_inf}/{n} identical counted as {m.get('cap_db', 100):g} dB"


def is_emulated(row: dict) -> bool:
    """A quantized variant that ran on the plain-torch reference kernel: its time is not the speed of 4 bits."""
    return row.get("kernel") == "reference"


def timing_text(seconds: float, row: dict) -> str:
    return f"{seconds:.1f} (emulated)" if is_emulated(row) else f"{seconds:.1f}"


def report_notes(report: dict) -> list[str]:
    """What the metrics and timings of this report can and cannot say (added to the page and the CLI table)."""
    rows = report["variants"].values()
    notes = []
    fds = [r.get("fd_vs_fp16") for r in rows if r.get("fd_vs_fp16")]
    if fds and not all(fd_reliable(m) for m in fds):
        n = min(min(m["n_a"], m["n_b"]) for m in fds)
        notes.append(f"FD-Alex is unreliable here: {n} samples per set, below {FD_MIN_SAMPLES} (two disjoint sets of 250 "
                     "real images are ~175 apart); it is listed, not plotted.")
    if any((r.get("psnr") or {}).get("n_inf") for r in rows):
        notes.append("PSNR of identical images is infinite; in the means they count as "
                     f"{next(r['psnr'].get('cap_db', 100) for r in rows if r.get('psnr')):g} dB (the cap), and the number "
                     "of identical pairs is given.")
    if any(is_emulated(r) for r in rows):
        notes.append(f"Times were measured on {report.get('device', '?')}. Quantized variants on the reference kernel "
                     "run a plain-torch emulation (dequantize, then a float matmul): their times are marked "
                     "'emulated' and say nothing about the speed of 4-bit kernels.")
    return notes


def write_html(path: Path, report: dict, grid_png: Path) -> None:
    """report.html: settings, the metric table with intervals, bar plots, and the labelled grid."""
    rows = report["variants"]
    s = report["settings"]
    dev = html.escape(str(report["device"]))
    th = ("variant", "LPIPS vs fp16", "PSNR vs fp16 (dB)", "SSIM vs fp16", "FD-Alex vs fp16", "FD-Alex vs data",
          "weight bits/elem", "model MiB", f"calibration s ({dev})", f"sampling s ({dev})")
    body = []
    for name, r in rows.items():
        fdd = r.get("fd_vs_data")
        cells = [name, _ci(r["lpips"]), psnr_text(r["psnr"], 3), _ci(r["ssim"]), fd_text(r["fd_vs_fp16"]),
                 fd_text(fdd) if fdd else "n/a", f"{r['weight_bits_per_element']:.2f}",
                 f"{r['model_bytes'] / 2**20:.2f}", f"{r['calibration_seconds']:.1f}",
                 timing_text(r["sampling_seconds"], r)]
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    lp = [(n, r["lpips"]["mean"], r["lpips"]["lo"], r["lpips"]["hi"]) for n, r in rows.items()]
    fd_rows = {n: r["fd_vs_fp16"] for n, r in rows.items() if r.get("fd_vs_fp16")}
    if fd_rows and all(fd_reliable(m) for m in fd_rows.values()):
        fd_plot = _bar_svg("FD-Alex vs fp16 samples (lower is better)",
                           [(n, m["value"], m["lo"], m["hi"]) for n, m in fd_rows.items()])
    else:
        fd_plot = f"FD-Alex is not plotted: fewer than {FD_MIN_SAMPLES} samples per set."
    grid = base64.b64encode(Path(grid_png).read_bytes()).decode()
    notes = list(report["notes"]) + [n for n in report_notes(report) if n not in report["notes"]]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fourbit compare: {html.escape(s['model'])}</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:right}}td:first-child{{text-align:left}}</style>
</head><body>
<h1>fourbit compare: {html.escape(s['model'])}</h1>
<p>{s['samples']} samples per variant, {s['sampler']} {s['steps']} steps, eta {s['eta']}, guidance {s['guidance_scale']},
seeds {s['seed']}..{s['seed'] + s['samples'] - 1} ({html.escape(s.get('plan', 'class = i mod 10'))}). Calibration: {s['calib_samples']} trajectories x
{s['calib_steps']} steps, seeds from {s['calib_seed']}. Device: {dev}, torch {report['torch']},
fourbit {report['fourbit_version']}, {report['date']}.</p>
<ul>{''.join(f'<li>{html.escape(n)}</li>' for n in notes)}</ul>
<table><tr>{''.join(f'<th>{h}</th>' for h in th)}</tr>{''.join(body)}</table>
<p>{_bar_svg('LPIPS-Alex vs fp16, 95% interval (lower is better)', lp)}</p>
<p>{fd_plot}</p>
<h2>Same seeds: one row per variant, one column per seed</h2>
<img src="data:image/png;base64,{grid}" alt="same-seed grid, rows labelled with the variant"/>
</body></html>"""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page)
    tmp.replace(path)


def _ci(m: Optional[dict], key: str = "mean") -> str:
    if m is None:
        return "n/a"
    v = m.get(key)
    if v is None:
        return "n/a"
    if v == float("inf"):
        return "inf"
    return f"{v:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]"
