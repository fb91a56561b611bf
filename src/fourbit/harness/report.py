"""Report files of the harness: the same-seed grid (PNG) and a self-contained HTML page."""
from __future__ import annotations

import base64
import html
from pathlib import Path

import torch

from ..data.png import image_grid, write_png


def variant_rows(images: dict[str, torch.Tensor], scale: int = 2) -> dict[str, torch.Tensor]:
    """One uint8 strip (H, W) per variant: its first images side by side, upscaled ``scale``x."""
    rows = {}
    for name, imgs in images.items():
        strip = image_grid(imgs, nrow=imgs.shape[0])  # (H + 4, n * (W + 2) + 2) uint8
        rows[name] = strip.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return rows


def write_grid(path: Path, images: dict[str, torch.Tensor]) -> None:
    """grid.png: one row per variant (in the order given, the report lists the same order), same seeds."""
    strips = list(variant_rows(images).values())
    write_png(path, torch.cat(strips, dim=0))


def _bar_svg(title: str, items: list[tuple[str, float, float, float]], width: int = 560) -> str:
    """Horizontal bars with interval whiskers: items = (label, value, lo, hi)."""
    items = [(n, v, lo, hi) for n, v, lo, hi in items if v is not None and v == v]
    if not items:
        return ""
    vmax = max(max(hi, v) for _, v, _, hi in items) or 1.0
    left, bar_w, h = 210, width - 230, 22
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{30 + h * len(items)}">',
           f'<text x="4" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    for i, (name, v, lo, hi) in enumerate(items):
        y = 26 + i * h
        w = bar_w * v / vmax
        out.append(f'<text x="{left - 6}" y="{y + 14}" font-size="12" text-anchor="end">{html.escape(name)}</text>')
        out.append(f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="{h - 8}" fill="#4a78b5"/>')
        x0, x1 = left + bar_w * lo / vmax, left + bar_w * hi / vmax
        out.append(f'<line x1="{x0:.1f}" x2="{x1:.1f}" y1="{y + 11}" y2="{y + 11}" stroke="#000"/>')
        out.append(f'<text x="{left + w + 4:.1f}" y="{y + 14}" font-size="11">{v:.3f}</text>')
    out.append("</svg>")
    return "".join(out)


def write_html(path: Path, report: dict, grid_png: Path) -> None:
    """report.html: settings, the metric table with intervals, bar plots, and the grid with row labels."""
    rows = report["variants"]
    s = report["settings"]
    th = ("variant", "LPIPS vs fp16", "PSNR vs fp16 (dB)", "SSIM vs fp16", "FD-Alex vs fp16", "FD-Alex vs data",
          "weight bits/elem", "model MiB", "calibration s", "sampling s")
    body = []
    for name, r in rows.items():
        fdd = r.get("fd_vs_data")
        cells = [name, _ci(r["lpips"]), _ci(r["psnr"]), _ci(r["ssim"]), _ci(r["fd_vs_fp16"], "value"),
                 _ci(fdd, "value") if fdd else "n/a", f"{r['weight_bits_per_element']:.2f}",
                 f"{r['model_bytes'] / 2**20:.2f}", f"{r['calibration_seconds']:.1f}", f"{r['sampling_seconds']:.1f}"]
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    lp = [(n, r["lpips"]["mean"], r["lpips"]["lo"], r["lpips"]["hi"]) for n, r in rows.items()]
    fd = [(n, r["fd_vs_fp16"]["value"], r["fd_vs_fp16"]["lo"], r["fd_vs_fp16"]["hi"]) for n, r in rows.items()]
    grid = base64.b64encode(Path(grid_png).read_bytes()).decode()
    row_px = 2 * (s.get("image_px", 28) + 4)  # write_grid: 28-pixel images (default), padding, upscaled 2x
    labels = "".join(f"<div style='height:{row_px}px;line-height:{row_px}px'>{html.escape(n)}</div>" for n in rows)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fourbit compare: {html.escape(s['model'])}</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:right}}td:first-child{{text-align:left}}
.grid{{display:flex;gap:8px;align-items:flex-start}}.labels{{font-size:13px;text-align:right}}</style></head><body>
<h1>fourbit compare: {html.escape(s['model'])}</h1>
<p>{s['samples']} samples per variant, {s['sampler']} {s['steps']} steps, eta {s['eta']}, guidance {s['guidance_scale']},
seeds {s['seed']}..{s['seed'] + s['samples'] - 1} ({html.escape(s.get('plan', 'class = i mod 10'))}). Calibration: {s['calib_samples']} trajectories x
{s['calib_steps']} steps, seeds from {s['calib_seed']}. Device: {html.escape(str(report['device']))}, torch {report['torch']},
fourbit {report['fourbit_version']}, {report['date']}.</p>
<ul>{''.join(f'<li>{html.escape(n)}</li>' for n in report['notes'])}</ul>
<table><tr>{''.join(f'<th>{h}</th>' for h in th)}</tr>{''.join(body)}</table>
<p>{_bar_svg('LPIPS-Alex vs fp16 (lower is better)', lp)}</p>
<p>{_bar_svg('FD-Alex vs fp16 samples (lower is better)', fd)}</p>
<h2>Same seeds, one row per variant</h2>
<div class="grid"><div class="labels">{labels}</div><img src="data:image/png;base64,{grid}" alt="grid"/></div>
</body></html>"""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page)
    tmp.replace(path)


def _ci(m: dict, key: str = "mean") -> str:
    if m is None:
        return "n/a"
    v = m.get(key)
    if v is None:
        return "n/a"
    if v == float("inf"):
        return "inf"
    return f"{v:.3f} [{m['lo']:.3f}, {m['hi']:.3f}]"
