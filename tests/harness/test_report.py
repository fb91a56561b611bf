"""The report's rendering: labelled grid, bars with an axis, FD/PSNR/timing caveats."""
import re

import pytest
import torch

from fourbit.harness.compare import format_table
from fourbit.harness.font import render_text, text_width
from fourbit.harness.report import (FD_MIN_SAMPLES, _bar_svg, _nice_ticks, fd_text, labelled_grid, psnr_text,
                                    report_notes, variant_rows, write_grid)


def test_render_text_draws_each_glyph_differently():
    glyphs = {c: render_text(c) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:+-_.=,/()*%[]"}
    assert all(g.shape == (7, 6) for g in glyphs.values())
    assert len({g.numpy().tobytes() for g in glyphs.values()}) == len(glyphs)  # no two glyphs alike
    assert torch.equal(render_text("rtn"), render_text("RTN"))  # lowercase drawn as uppercase
    assert render_text("ab", scale=2).shape == (14, text_width("ab", 2))


def test_grid_rows_carry_their_labels():
    imgs = {"fp16": torch.zeros(3, 1, 28, 28), "svdquant:w4a4:r32": torch.ones(3, 1, 28, 28)}
    grid = labelled_grid(imgs, column_labels=["T-shirt", "Trouser", "Pullover"], corner="class")
    strips = variant_rows(imgs)
    label_w = grid.shape[1] - strips["fp16"].shape[1]
    header_h = grid.shape[0] - sum(s.shape[0] for s in strips.values())
    assert label_w >= text_width("svdquant:w4a4:r32", 2) and header_h > 7
    # the images sit unchanged right of the labels, below the header
    assert torch.equal(grid[header_h:header_h + strips["fp16"].shape[0], label_w:], strips["fp16"])
    # each row's label area has ink; the label of row 0 is the rendering of "fp16"
    row_h = strips["fp16"].shape[0]
    for r in range(2):
        assert (grid[header_h + r * row_h:header_h + (r + 1) * row_h, :label_w] < 128).any()
    text = render_text("fp16", 2)
    band = grid[header_h:header_h + row_h, :label_w]
    ys, xs = torch.nonzero(band < 128, as_tuple=True)
    crop = band[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    ink = torch.nonzero(text < 128, as_tuple=True)
    assert torch.equal(crop, text[ink[0].min():ink[0].max() + 1, ink[1].min():ink[1].max() + 1])
    # column labels: ink in the header above every column
    assert (grid[:header_h, label_w:] < 128).any()


def test_write_grid_writes_png(tmp_path):
    write_grid(tmp_path / "g.png", {"a": torch.zeros(2, 1, 28, 28)}, column_labels=["0", "1"])
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nice_ticks_cover_the_range():
    assert _nice_ticks(0.34) == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])
    assert _nice_ticks(175.0)[-1] >= 175 and _nice_ticks(175.0)[0] == 0
    assert _nice_ticks(0.0) == [0.0, 1.0]


def test_bars_have_an_axis_and_whiskers_stop_before_the_value_labels():
    items = [("rtn:w4a4", 0.34, 0.30, 0.38), ("svdquant:w4a4:r32", 0.20, 0.18, 0.26)]
    svg = _bar_svg("LPIPS", items)
    assert svg.count(">0.1<") == 1 and ">0.4<" in svg  # tick labels
    whiskers = re.findall(r'<path d="M([\d.]+) [\d.]+v8M[\d.]+ [\d.]+H([\d.]+)', svg)
    values = re.findall(r'<text x="([\d.]+)" y="[\d.]+" font-size="11">(0\.\d+)</text>', svg)
    assert len(whiskers) == 2 and len(values) == 2
    for (x0, x1), (xv, _) in zip(whiskers, values):
        assert float(xv) > float(x1) > float(x0)  # the value is written right of its whisker's end
    labels = re.findall(r'<text x="([\d.]+)"[^>]*text-anchor="end">', svg)
    assert all(float(x) < min(float(w[0]) for w in whiskers) for x in labels)


def _row(n=20, n_inf=0, kernel="reference"):
    ci = {"mean": 0.2, "lo": 0.1, "hi": 0.3, "n": n}
    return {"lpips": ci, "ssim": ci, "psnr": {**ci, "mean": 30.0, "n_inf": n_inf, "cap_db": 100.0},
            "fd_vs_fp16": {"value": 12.0, "lo": 10.0, "hi": 14.0, "n_a": n, "n_b": n}, "fd_vs_data": None,
            "weight_bits_per_element": 4.25, "model_bytes": 2**20, "calibration_seconds": 1.0,
            "sampling_seconds": 2.0, "kernel": kernel}


def test_caveats_fd_psnr_and_emulated_timings():
    fp16 = {**_row(n_inf=20), "kernel": None}
    report = {"device": "cpu", "variants": {"fp16": fp16, "rtn:w4a4": _row()}}
    notes = " ".join(report_notes(report))
    assert f"below {FD_MIN_SAMPLES}" in notes and "100 dB" in notes and "emulated" in notes and "cpu" in notes
    assert "unreliable" in fd_text(_row()["fd_vs_fp16"])
    assert "unreliable" not in fd_text(_row(n=FD_MIN_SAMPLES)["fd_vs_fp16"])
    assert psnr_text(fp16["psnr"]) == "identical (inf)" and "100" not in psnr_text(fp16["psnr"])
    assert "3/20 identical counted as 100 dB" in psnr_text(_row(n_inf=3)["psnr"])
    table = format_table(report)
    assert "identical" in table and "100.00" not in table and "12.00?" in table and " e" in table
    assert "times on cpu" in table
    gpu = {"device": "NVIDIA H100", "variants": {"rtn:w4a4": _row(n=FD_MIN_SAMPLES, kernel="triton")}}
    assert report_notes(gpu) == [] and "?" not in format_table(gpu).splitlines()[2]
