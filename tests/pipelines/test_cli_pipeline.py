"""``fourbit quantize --pipeline`` (resumable: a run killed after N layers continues, bit-identically) and
``fourbit generate`` on a tiny Stable Diffusion pipeline saved to disk."""
from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from fourbit.cli import main  # noqa: E402
from fourbit.pipelines.resume import WorkFolder  # noqa: E402

from .tiny import save_sd_pipeline  # noqa: E402

VARIANT = "svdquant:w4a4:r4:g=8:alpha=0.5"


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    return save_sd_pipeline(tmp_path_factory.mktemp("sd"))


def _quantize(sd_path, prompts, out, *extra):
    return main(["quantize", "--pipeline", sd_path, "--variant", VARIANT, "--prompts", str(prompts), "--out",
                 str(out), "--calib-steps", "2", "--height", "16", "--width", "16", "--device", "cpu", *extra])


def test_killed_quantize_resumes_bit_identical(sd_path, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in snow\n# a comment\n\na lighthouse at night, waves\n")
    assert _quantize(sd_path, prompts, tmp_path / "straight") == 0
    assert not (tmp_path / "straight.work").exists()  # removed once the folder is written

    saved = []
    original = WorkFolder.save_layer

    def dies_after_five(self, name, layer):
        if len(saved) == 5:
            raise KeyboardInterrupt("killed")  # what Ctrl-C or a kill looks like to the loop
        original(self, name, layer)
        saved.append(name)

    monkeypatch.setattr(WorkFolder, "save_layer", dies_after_five)
    assert _quantize(sd_path, prompts, tmp_path / "resumed") == 130  # the CLI: "interrupted", exit status 130
    assert capsys.readouterr().err.strip().endswith("fourbit quantize: interrupted")
    assert len(list((tmp_path / "resumed.work" / "layers").iterdir())) == 5
    assert not (tmp_path / "resumed").exists()
    monkeypatch.setattr(WorkFolder, "save_layer", original)
    capsys.readouterr()
    assert _quantize(sd_path, prompts, tmp_path / "resumed") == 0
    assert "calibration statistics and 5 converted layer(s) reused" in capsys.readouterr().err
    a = (tmp_path / "straight" / "fourbit_model.safetensors").read_bytes()
    b = (tmp_path / "resumed" / "fourbit_model.safetensors").read_bytes()
    assert a == b


def test_work_folder_of_another_run_is_refused(sd_path, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in snow\n")
    work = tmp_path / "w"
    WorkFolder(work, {"something": "else"})
    assert _quantize(sd_path, prompts, tmp_path / "out", "--work", str(work)) == 2
    assert "was started for a different run" in capsys.readouterr().err


def test_generate_with_the_quantized_denoiser(sd_path, tmp_path):
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat on a tree\n")
    assert _quantize(sd_path, prompts, tmp_path / "q") == 0
    args = ["generate", "--pipeline", sd_path, "--prompt", "a small house", "--seed", "3", "--steps", "2",
            "--height", "16", "--width", "16", "--device", "cpu"]
    assert main(args + ["--quantized", str(tmp_path / "q"), "--out", str(tmp_path / "q.png")]) == 0
    assert main(args + ["--out", str(tmp_path / "fp.png")]) == 0
    q = torch.tensor(list(Image.open(tmp_path / "q.png").convert("RGB").tobytes()), dtype=torch.float32)
    fp = torch.tensor(list(Image.open(tmp_path / "fp.png").convert("RGB").tobytes()), dtype=torch.float32)
    assert q.shape == fp.shape == (16 * 16 * 3,)
    assert not torch.equal(q, fp)  # the 4-bit denoiser was used...
    assert main(args + ["--quantized", str(tmp_path / "q"), "--out", str(tmp_path / "q2.png"), "--repeat", "3"]) == 0
    assert (tmp_path / "q2.png").read_bytes() == (tmp_path / "q.png").read_bytes()  # ...deterministically


def test_generate_compiled(sd_path, tmp_path, capsys):
    """--compile: the UNet's transformer blocks compiled (inductor, CPU, reference kernel) before the image."""
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat on a tree\n")
    assert _quantize(sd_path, prompts, tmp_path / "q") == 0
    args = ["generate", "--pipeline", sd_path, "--quantized", str(tmp_path / "q"), "--prompt", "a small house",
            "--seed", "3", "--steps", "2", "--height", "16", "--width", "16", "--device", "cpu"]
    assert main(args + ["--compile", "--out", str(tmp_path / "compiled.png")]) == 0
    err = capsys.readouterr().err
    assert "unet (UNet2DConditionModel): compiled 4 modules (BasicTransformerBlock)" in err and ", compiled; " in err
    # not compared with the eager image: this tiny 4-bit UNet is chaotic (a 1-ulp jitter of its input moves the
    # latents by 2.2%, inductor's fp32 summation order by 4.2%, 4 bits by 6%); test_compile_pipeline.py compares
    # compiled and eager latents where that is meaningful
    assert Image.open(tmp_path / "compiled.png").size == (16, 16)


def test_compare_pipeline_writes_the_report(sd_path, tmp_path, capsys):
    import json

    prompts = tmp_path / "eval.txt"
    prompts.write_text("a small house\na red cat\n")
    out = tmp_path / "cmp"
    assert main(["compare", "--pipeline", sd_path, "--prompts", str(prompts), "--variants", f"fp16,{VARIANT}",
                 "--samples", "2", "--steps", "2", "--calib-samples", "2", "--calib-steps", "2", "--height", "16",
                 "--width", "16", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["variants"]) == ["fp16", VARIANT]
    fp, q = report["variants"]["fp16"], report["variants"][VARIANT]
    assert fp["lpips"]["mean"] == 0 and q["lpips"]["mean"] > 0 and q["lpips"]["n"] == 2
    assert q["preset"] == "unet" and q["weight_bits_per_element"] < 16
    assert report["settings"]["evaluation_prompts"] == ["a small house", "a red cat"]
    assert not set(report["settings"]["calibration_prompts"]) & {"a small house", "a red cat"}
    assert (out / "grid.png").stat().st_size > 0 and (out / "report.html").stat().st_size > 0
    assert VARIANT in capsys.readouterr().out


def test_quantize_with_a_saved_plan_keeps_its_16_bit_layers(sd_path, tmp_path, capsys):
    """A plan made in Python (timings given) drives `quantize --pipeline --plan`; a plan of another variant and
    --speed-plan without a GPU are refused with the reason."""
    import json

    import fourbit
    from fourbit.harness.variants import parse_variant
    from fourbit.nn import QuantLinear
    from fourbit.pipelines.pretrained import load_pipeline

    pipe = load_pipeline(sd_path, None, "cpu")
    config = parse_variant(VARIANT).config()

    def timer(variants):  # the layers reading 16 channels (Q/K/V among them) pay in 4 bits, the others do not
        x = variants["16-bit"][0].args[0]
        return {"16-bit": 1.0, "config": 0.5 if x.shape[-1] == 16 else 2.0}

    plan = fourbit.plan_pipeline(pipe, config, "a red fox", call_kwargs=dict(height=16, width=16), timer=timer,
                                 progress=False, verbose=False)
    kept = {lp.name for lp in plan.layers if lp.choice == "16-bit"}
    assert kept and len(kept) < len(plan.layers)
    plan.save(tmp_path / "plan.json")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in snow\n")
    assert _quantize(sd_path, prompts, tmp_path / "out", "--plan", str(tmp_path / "plan.json")) == 0
    assert json.loads((tmp_path / "out" / "fourbit_plan.json").read_text())["layers"] == plan.to_dict()["layers"]
    unet = fourbit.from_pretrained(tmp_path / "out")
    for lp in plan.layers:
        assert isinstance(unet.get_submodule(lp.name), QuantLinear) == (lp.name not in kept), lp.name
    capsys.readouterr()
    other = main(["quantize", "--pipeline", sd_path, "--variant", "rtn:w4a4", "--prompts", str(prompts), "--out",
                  str(tmp_path / "o2"), "--device", "cpu", "--plan", str(tmp_path / "plan.json")])
    assert other == 2 and "this plan was made for another quantization (method" in capsys.readouterr().err
    assert _quantize(sd_path, prompts, tmp_path / "o3", "--speed-plan") == 2
    assert "--speed-plan times the GPU kernels" in capsys.readouterr().err
    assert _quantize(sd_path, prompts, tmp_path / "o3", "--min-speedup", "1.2") == 2
    assert "--min-speedup applies to --speed-plan only" in capsys.readouterr().err
    assert _quantize(sd_path, prompts, tmp_path / "o3", "--fallback", "weights=fp8,activations=fp8") == 2
    assert "--fallback applies to --speed-plan only" in capsys.readouterr().err
    assert _quantize(sd_path, prompts, tmp_path / "o3", "--prefer-fastest") == 2
    assert "--prefer-fastest applies to --speed-plan only" in capsys.readouterr().err
    # a plan made for the unfused denoiser names Q/K/V one by one: with --fuse-siblings they are gone
    assert _quantize(sd_path, prompts, tmp_path / "o4", "--plan", str(tmp_path / "plan.json"), "--fuse-siblings") == 2
    assert "the plan names" in capsys.readouterr().err and not (tmp_path / "o4").exists()


def test_quantize_fuse_siblings_from_the_shell(sd_path, tmp_path):
    import fourbit

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in snow\n")
    assert _quantize(sd_path, prompts, tmp_path / "out", "--fuse-siblings") == 0
    unet = fourbit.from_pretrained(tmp_path / "out")
    assert unet.fourbit_siblings and any(n.endswith(".group.linear") for n, _ in unet.named_modules())


def test_fallback_option_parses_config_fields():
    from fourbit.cli.pipeline import parse_fallback
    from fourbit.harness.variants import parse_variant

    config = parse_variant(VARIANT).config()
    assert parse_fallback("weights=fp8, activations=fp8,rank=0,group_size=none", config) == {
        "weights": "fp8", "activations": "fp8", "rank": 0, "group_size": None}
    with pytest.raises(ValueError, match="FIELD=VALUE pairs"):
        parse_fallback("fp8", config)
    with pytest.raises(ValueError, match="colour is not a field of the variant's config"):
        parse_fallback("colour=red", config)
    with pytest.raises(ValueError, match="unknown"):
        parse_fallback("weights=int3", config)
    with pytest.raises(ValueError, match="leave group_size unset"):  # the config's own check, with its advice
        parse_fallback("weights=fp8,activations=fp8", config)


def test_under_several_ranks_every_rank_takes_rank_0s_plan():
    """--speed-plan under torchrun: rank 0 plans, the others wait and take its plan (timings differ per GPU, and
    ranks quantizing with different plans would disagree on the layers they calibrate)."""
    from dataclasses import dataclass

    import fourbit
    from fourbit.cli.pipeline import shared_plan
    from fourbit.precision_plan import SIXTEEN_BIT

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 8))
    config = fourbit.RTNConfig(weights="int4p2", activations="int4p2")
    made = fourbit.plan_precision(model, config, lambda m: m(torch.randn(4, 16)), progress=False,
                                  timer=lambda variants: {label: 1.0 if label == SIXTEEN_BIT else 2.0
                                                          for label in variants})
    sent = []

    @dataclass
    class FakeRanks:
        rank: int
        world_size: int = 2

        @property
        def is_root(self):
            return self.rank == 0

        def gather(self, obj, what):
            sent.append(obj)
            return [made.to_dict(), None]

    calls = []
    root = shared_plan(FakeRanks(0), lambda: calls.append(0) or made)
    other = shared_plan(FakeRanks(1), lambda: calls.append(1) or made)
    assert calls == [0] and root is made and sent == [made.to_dict(), None]  # rank 1 did not plan
    assert other.config == made.config and other.summary() == made.summary()
    single = shared_plan(FakeRanks(0, world_size=1), lambda: made)
    assert single is made


def test_generate_repeat_prints_the_median(sd_path, tmp_path, capsys):
    args = ["generate", "--pipeline", sd_path, "--prompt", "a small house", "--steps", "1", "--height", "16",
            "--width", "16", "--device", "cpu", "--out", str(tmp_path / "x.png")]
    assert main(args + ["--repeat", "2"]) == 0
    assert re.search(r"16-bit; median [0-9.]+ s of 2 \(min [0-9.]+, max [0-9.]+\)\)", capsys.readouterr().err)
    assert main(args + ["--repeat", "0"]) == 2
    assert "--repeat must be at least 1, got 0" in capsys.readouterr().err


def test_generate_cuda_graphs_needs_compile(sd_path, tmp_path, capsys):
    args = ["generate", "--pipeline", sd_path, "--prompt", "a small house", "--steps", "1", "--height", "16",
            "--width", "16", "--device", "cpu", "--no-cuda-graphs", "--out", str(tmp_path / "x.png")]
    assert main(args) != 0
    assert "--no-cuda-graphs is about the compiled denoiser: add --compile" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
