"""``fourbit ptqd-ablation``: the PTQD component ablation for one quantized model (see ``fourbit.harness.ptqd_ablation``)."""
from __future__ import annotations

from pathlib import Path

from . import at_least_two, command, nonnegative_int, positive_int, resolve_device


@command("ptqd-ablation", "PTQD ablation for one quantized model: none / +correlated / +bias / +variance "
                          "calibration / +mixed precision, with LPIPS, FD and PSNR vs the 16-bit model")
def _ablation(p):
    p.add_argument("--model", default="fashion-dit", help="bundled model (fashion-dit, fashion-unet)")
    p.add_argument("--weights", default=None, help="a weights file to use instead of the bundled one")
    p.add_argument("--variant", default="svdquant:w4a4:r32",
                   help="the quantized model, METHOD:wXaY[:rN] (a mixed wXaA-B variant sets the mixed widths)")
    p.add_argument("--samples", type=at_least_two, default=256, help="evaluation samples per row")
    p.add_argument("--steps", type=positive_int, default=50, help="sampling steps")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    p.add_argument("--eta", default="0,1", help="comma-separated DDIM etas, one table each (default 0,1)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (model default)")
    p.add_argument("--seed", type=int, default=0, help="first evaluation seed")
    p.add_argument("--calib-samples", type=positive_int, default=64, help="quantizer calibration trajectories")
    p.add_argument("--calib-steps", type=positive_int, default=None, help="quantizer calibration steps (default: --steps)")
    p.add_argument("--stats-samples", type=positive_int, default=256, help="PTQD statistics trajectories per eta")
    p.add_argument("--stats-seed", type=int, default=20_000, help="first PTQD statistics seed")
    p.add_argument("--mixed", default="4-8", help="activation widths of the mixed-precision row ('' to skip)")
    p.add_argument("--bias", default="residual", choices=["residual", "total"],
                   help="PTQD bias: mean of the residual (paper) or of the total noise (authors' code)")
    p.add_argument("--data-samples", type=nonnegative_int, default=1000, help="Fashion-MNIST test images for FD vs data (0: skip)")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples for LPIPS/PSNR intervals")
    p.add_argument("--fd-n-boot", type=positive_int, default=100, help="bootstrap resamples for FD intervals")
    p.add_argument("--save", default=None, help="write the quantized model with its PTQD statistics here")
    p.add_argument("--no-validate", action="store_true",
                   help="skip the 'validated PTQD' rows (components chosen on the statistics seeds)")
    p.add_argument("--validate-samples", type=positive_int, default=None,
                   help="validation trajectories (default: --stats-samples)")
    p.add_argument("--out", default="out/ptqd-ablation", help="output directory")


def _run(args) -> int:
    from ..harness.ptqd_ablation import AblationSettings, run_ablation

    from ..utils.files import check_output_dir, check_output_file

    try:
        etas = tuple(float(e) for e in args.eta.split(",") if e.strip())
    except ValueError:
        raise ValueError(f"--eta: expected comma-separated numbers, got {args.eta!r}") from None
    if not etas or any(not e >= 0 for e in etas):
        raise ValueError("--eta: give one or more values >= 0, e.g. 0,1")
    check_output_dir(args.out)
    if args.save:
        check_output_file(args.save)
    settings = AblationSettings(
        model=args.model, variant=args.variant, samples=args.samples, steps=args.steps, sampler=args.sampler,
        etas=etas, guidance_scale=args.guidance, seed=args.seed, calib_samples=args.calib_samples,
        calib_steps=args.calib_steps, stats_samples=args.stats_samples, stats_seed=args.stats_seed,
        mixed=args.mixed, bias=args.bias, data_samples=args.data_samples, batch_size=args.batch_size,
        device=resolve_device(args.device), n_boot=args.n_boot, fd_n_boot=args.fd_n_boot, weights=args.weights, save=args.save,
        validate=not args.no_validate, validate_samples=args.validate_samples)
    run_ablation(settings, args.out)
    print(Path(args.out, "ablation.md").read_text())
    print(f"report: {args.out}/ablation.json  {args.out}/ablation.md")
    return 0


_ablation.run = _run
